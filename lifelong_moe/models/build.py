"""From a ``model`` config node to a backbone, the one way every caller builds a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lifelong_moe.moe import MoESettings
from lifelong_moe.targets import instantiate


def build_model(node: Mapping[str, Any], input_shape: Sequence[int], n_classes: int) -> nn.Module:
    """The backbone a ``model`` config node describes, as ``runner.build`` makes it.

    The user's keys stay flat (``model.n_experts=8``); the backbones take them as one
    ``moe: MoESettings``. A wrong key or type is one ConfigError line.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    moe, backbone = MoESettings.split(node)
    return instantiate(
        backbone, "model", input_shape=list(input_shape), n_classes=n_classes, moe=moe
    )
