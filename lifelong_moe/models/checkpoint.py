"""Save and reload a (possibly grown) backbone: config + MoE layer shapes + weights.

A grown model cannot be rebuilt from its Hydra config alone, because every MoE layer has
gained experts; each layer's own config records its size and frozen bank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lifelong_moe.moe import MoELayer


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The model's MoE layers by module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def save_model(model: nn.Module, model_cfg: dict[str, Any], path: str | Path, **build: Any) -> None:
    """``model_cfg`` is the flat ``model`` config (``_target_``, ``n_experts``, ...) as
    ``build_model`` reads it; ``build`` holds its other arguments (input_shape, n_classes)."""
    torch.save({"model_cfg": model_cfg, "build": build, **model_payload(model)}, path)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the backbone at its saved size and load its weights.

    ``weights_only=True``: the file holds tensors, numbers, strings and containers only, so a
    crafted file cannot run code (it fails with ``pickle.UnpicklingError`` instead).
    """
    from lifelong_moe.models import build_model  # the package imports this module first

    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(saved["model_cfg"], **saved["build"])
    restore_model(model, saved)
    return model


def model_payload(model: nn.Module) -> dict[str, Any]:
    """What ``restore_model`` needs to bring a freshly built model to this (grown) state."""
    return {
        "moe": {name: layer.get_config() for name, layer in moe_layers(model).items()},
        "state_dict": model.state_dict(),
        "frozen_parameters": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def restore_model(model: nn.Module, payload: dict[str, Any]) -> None:
    """In place: resize every MoE layer, load the weights, re-freeze what was frozen."""
    for name, layer_cfg in payload["moe"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = next(model.parameters()).device
        setattr(parent, child, MoELayer.from_config(layer_cfg).to(device))
    model.load_state_dict(payload["state_dict"])
    frozen = set(payload["frozen_parameters"])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
