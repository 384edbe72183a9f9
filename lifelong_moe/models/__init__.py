"""Backbones: every model maps inputs to ``(logits, aux)``, aux being one MoEAux per MoE layer.

Layout, from a model config to the grouped GEMM:

- ``build_model`` (here) turns the flat ``model`` config into a backbone: the MoE keys
  (``moe``, ``moe_blocks``, ``n_experts``, ``top_k``, ``router_noise``, ``capacity_factor``,
  ``dispatch``) become one ``MoESettings``, the rest are the ``_target_`` class's arguments.
- mlp.py (ResidualMLP), vit.py (PatchTransformer), lm.py (CausalLM): the backbones; each
  builds its FFNs with ``MoESettings.ffns`` (moe/layer.py): a MoELayer, whose forward runs
  moe/dispatch.py's grouped GEMMs, or the dense twin's DenseMLP.
- transformer.py: the pre-norm block stack shared by vit.py and lm.py; it receives the FFNs.
- checkpoint.py: save and reload a grown model; params.py: total / trainable / active counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lifelong_moe.models.checkpoint import load_model, moe_layers, save_model
from lifelong_moe.models.params import count_parameters
from lifelong_moe.moe import MoESettings

__all__ = ["build_model", "count_parameters", "load_model", "moe_layers", "save_model"]


def build_model(node: Mapping[str, Any], input_shape: Sequence[int], n_classes: int) -> nn.Module:
    """The backbone a ``model`` config node describes, as ``runner.build`` makes it.

    The user's keys stay flat (``model.n_experts=8``); the backbones take them as one
    ``moe: MoESettings``. A wrong key or type is one ConfigError line.
    """
    from lifelong_moe.config.schema import instantiate  # it imports the MoE core, not models

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    moe, backbone = MoESettings.split(node)
    return instantiate(
        backbone, "model", input_shape=list(input_shape), n_classes=n_classes, moe=moe
    )
