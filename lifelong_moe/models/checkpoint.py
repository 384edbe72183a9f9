"""Save and reload a (possibly grown) backbone: config + MoE layer shapes + weights.

A grown model cannot be rebuilt from its Hydra config alone, because every MoE layer has
gained experts; each layer's own config records its size and frozen bank.

A method may also build its predictor around the backbone (SEED's ensemble of experts and
class Gaussians, dense_heads' head per experience). The file then names that wrapper and its arguments, so that ``load_model``
rebuilds the same predictor and not the bare backbone. The name is looked up in a fixed table
(``wrapper_classes``), never imported from the file, so a file can only choose among these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lifelong_moe.models.build import build_model
from lifelong_moe.models.experience_heads import ExperienceHeads
from lifelong_moe.models.params import moe_layers
from lifelong_moe.models.seed_ensemble import SeedEnsemble
from lifelong_moe.moe import MoELayer
from lifelong_moe.moe.expert_parallel import ExpertParallelMoE
from lifelong_moe.targets import check_own_targets


def wrapper_classes() -> dict[str, type[nn.Module]]:
    """The predictors a method builds around a backbone, by the name a checkpoint records.

    Each takes ``(backbone, **config)`` and returns its ``config`` from ``get_config()``.
    """
    return {"seed": SeedEnsemble, "dense_heads": ExperienceHeads}


def save_model(model: nn.Module, model_cfg: dict[str, Any], path: str | Path, **build: Any) -> None:
    """``model_cfg`` is the flat ``model`` config (``_target_``, ``n_experts``, ...) as
    ``build_model`` reads it; ``build`` holds its other arguments (input_shape, n_classes).
    ``model`` is the backbone or one of ``wrapper_classes()`` around it."""
    torch.save(
        {
            "model_cfg": model_cfg,
            "build": build,
            "wrapper": wrapper_entry(model),
            **model_payload(model),
        },
        path,
    )


def wrapper_entry(model: nn.Module) -> dict[str, Any] | None:
    """``{"name", "config"}`` of a wrapped model; None for a bare backbone."""
    names = {cls: name for name, cls in wrapper_classes().items()}
    name = names.get(type(model))
    return None if name is None else {"name": name, "config": model.get_config()}


def load_model(path: str | Path, trust: bool = False) -> nn.Module:
    """Rebuild the model at its saved size, wrapped as it was saved, and load its weights.

    ``weights_only=True``: the file holds tensors, numbers, strings and containers only, so a
    crafted file cannot run code (it fails with ``pickle.UnpicklingError`` instead). The model's
    ``_target_`` must be one of the toolkit's classes, since it is called with the file's
    arguments; ``trust=True`` allows others (your own backbone, from a file you trust).
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not trust:
        check_own_targets(
            {"model": saved["model_cfg"]}, str(path), "pass trust=True if you trust the file"
        )
    model = build_model(saved["model_cfg"], **saved["build"])
    wrapper = saved.get("wrapper")  # absent from files saved before wrappers were recorded
    if wrapper is not None:
        known = wrapper_classes()
        if wrapper["name"] not in known:
            raise ValueError(
                f"{path}: unknown model wrapper {wrapper['name']!r}; known: {', '.join(known)}"
            )
        model = known[wrapper["name"]](model, **wrapper["config"])
    restore_model(model, saved)
    return model


def model_payload(model: nn.Module) -> dict[str, Any]:
    """What ``restore_model`` needs to bring a freshly built model to this (grown) state.

    Layers sharded over ranks (expert parallelism) are gathered, so the payload is the one
    process's model and loads anywhere: collective, every rank must call it."""
    return {
        "moe": {name: layer_config(layer) for name, layer in moe_layers(model).items()},
        "state_dict": gathered_state_dict(model),
        "frozen_parameters": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def layer_config(layer: MoELayer | ExpertParallelMoE) -> dict[str, Any]:
    return layer.full_config() if isinstance(layer, ExpertParallelMoE) else layer.get_config()


def sharded_layers(module: nn.Module) -> dict[str, ExpertParallelMoE]:
    """The MoE layers of ``module`` sharded over ranks (trainer.expert_parallel), by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, ExpertParallelMoE)}


def _replace(state: dict[str, Any], prefix: str, layer_state: dict[str, Any]) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    state.update({prefix + k: v for k, v in layer_state.items()})


def gathered_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every sharded MoE layer gathered into its plain MoELayer's
    state (collective over the ranks; the module itself unchanged)."""
    state = module.state_dict()
    for name, layer in sharded_layers(module).items():
        _replace(state, f"{name}.", layer.full_state_dict())
    return state


def sharded_state_dict(module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A gathered state dict cut to what this rank's sharded layers hold (any ep degree)."""
    state = dict(state)
    for name, layer in sharded_layers(module).items():
        prefix = f"{name}."
        full = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        _replace(state, prefix, layer.local_state_dict(full))
    return state


def restore_model(model: nn.Module, payload: dict[str, Any]) -> None:
    """In place: resize every MoE layer, load the weights, re-freeze what was frozen. A layer
    sharded over ranks is rebuilt full from the (gathered) payload and sharded again on its
    mesh: a different expert-parallel degree than the payload's re-shards."""
    meshes = {name: layer.mesh for name, layer in sharded_layers(model).items()}
    device = next(model.parameters()).device
    for name, layer_cfg in payload["moe"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoELayer.from_config(layer_cfg).to(device))
    model.load_state_dict(payload["state_dict"])
    for name, mesh in meshes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelMoE.from_layer(getattr(parent, child), mesh))
    frozen = set(payload["frozen_parameters"])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


def expert_param_names(module: nn.Module) -> set[str]:
    """Parameter names of every MoE layer's expert weights (sharded or not)."""
    return {
        f"{name}.experts.{n}"
        for name, layer in moe_layers(module).items()
        for n, _ in layer.experts.named_parameters()
    }


def drop_expert_moments(module: nn.Module, optimizer_states: list[dict[str, Any]]) -> None:
    """Forget the optimizer state of expert weights in a training checkpoint of ``module``.

    Each rank's moments cover its own shard, so they cannot travel in rank 0's file: a resumed
    sharded experience starts the experts' AdamW moments afresh (the rest keep theirs). The
    indices are those of ``configure_optimizers``: the trainable parameters in module order.
    """
    experts = expert_param_names(module)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    drop = {i for i, n in enumerate(trainable) if n in experts}
    for state in optimizer_states:
        for i in drop:
            state["state"].pop(i, None)
