"""Expert parallelism in a run: ``trainer.expert_parallel=N`` under torchrun or srun.

Every process builds the same seeded model; ``shard`` then replaces each MoE layer by its
shard over the "ep" dimension of a (dp, ep) DeviceMesh (moe/expert_parallel.py), so a rank
holds at most ceil(E/N) experts of a layer. The router, attention and embeddings stay data
parallel under DDP; the expert weights are DDP-ignored (``ddp_ignored``: DDP would broadcast
rank 0's shard over the others' at every wrap and average gradients of different experts), and
their gradients are summed over the replicas of the same shard before each optimizer step
(``ExpertGrads``), then divided by the world size as DDP averages the rest.

What is refused, in one line before any run exists (``check`` before the process group opens,
``check_method`` while building): N that does not divide the world size, N > 1 without a
launcher, gradient clipping (its norm would be taken over each rank's own experts), an HF
export, shared experts and a capacity factor. Every growth init works sharded
(ExpertParallelMoE.expand).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.models import moe_layers
from lifelong_moe.models.checkpoint import sharded_layers
from lifelong_moe.moe.expert_parallel import (
    ExpertParallelMoE,
    check_expert_parallel,
    expert_mesh,
    shard_moe_layers,
)


def degree(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("expert_parallel", 1))


def check(cfg: DictConfig, world_size: int, command: str) -> None:
    """``trainer.expert_parallel`` against the processes a launcher started (``command``: the
    torchrun command to use when none did)."""
    n = degree(cfg)
    if n == 1:
        return
    if world_size == 1:
        raise ConfigError(
            f"trainer.expert_parallel={n} shards experts over processes started by a launcher "
            f"(torchrun, srun); run: {command}"
        )
    check_expert_parallel(n, world_size)
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} with trainer.expert_parallel={n}: expected null "
            "(each rank would clip by the norm of its own experts)"
        )
    if cfg.get("tracking", {}).get("export", "none") != "none":
        raise ConfigError(
            f"tracking.export={cfg.tracking.export} with trainer.expert_parallel={n}: expected "
            "none (export a gathered checkpoint from load_model instead)"
        )


def check_method(cfg: DictConfig, method: nn.Module) -> None:
    """The model and growth of a run that will be sharded (while building, before any run)."""
    n = degree(cfg)
    if n == 1:
        return
    model = method.model
    if not moe_layers(model):
        raise ConfigError(
            f"trainer.expert_parallel={n} with model {type(model).__name__}: expected a backbone "
            "with MoE layers"
        )
    for name, layer in moe_layers(model).items():
        if layer.shared is not None or layer.capacity_factor is not None:
            raise ConfigError(
                f"trainer.expert_parallel={n} with MoE layer {name} (shared expert or "
                f"capacity_factor={layer.capacity_factor}): expected dropless routed experts only"
            )


def shard(cfg: DictConfig, method: nn.Module, device_type: str) -> dict[str, ExpertParallelMoE]:
    """Shard every MoE layer of the method's model over a (dp, ep) mesh of the open process
    group; {} when N is 1. Every rank built the same seeded model, so the shards fit together."""
    n = degree(cfg)
    if n == 1:
        return {}
    return shard_moe_layers(method.model, expert_mesh(n, device_type))


def ddp_ignored(module: nn.Module) -> list[str]:
    """Names of what each rank holds for itself: every sharded layer's experts, its usage
    counter (rank 0 holds the full layer's counts, the others their increments) and placement."""
    found = []
    for name, layer in module.named_modules():
        if isinstance(layer, ExpertParallelMoE):
            held = [*layer.experts.named_parameters(), *layer.experts.named_buffers()]
            found += [f"{name}.experts.{n}" for n, _ in held]
            found += [f"{name}.expert_usage", f"{name}.placement"]
    return found


class ExpertGrads(L.Callback):
    """Before each optimizer step: every sharded expert's gradient summed over the replicas of
    its shard (the dp dimension) and divided by the world size, as DDP averages the router's."""

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        layers = list(sharded_layers(pl_module).values())
        if not layers:
            return
        world = dist.get_world_size()
        for layer in layers:
            layer.reduce_expert_grads()
            for p in layer.experts.parameters():
                if p.grad is not None:
                    p.grad.div_(world)


def expert_params_per_rank(model: nn.Module) -> float:
    """Expert weights (frozen and trainable, all layers) the fullest rank holds:
    ``cost/expert_params_per_rank`` (collective in a launched run)."""
    held = 0
    for layer in moe_layers(model).values():
        experts = layer.experts
        held += sum(
            getattr(experts, f"{w}{bank}").numel() for w in ("w1", "w2") for bank in ("", "_frozen")
        )
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return float(held)
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    count = torch.tensor(float(held), dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return float(count)
