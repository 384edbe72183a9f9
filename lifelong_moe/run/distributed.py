"""Several processes, each running the whole experience loop, started by torchrun or srun.

One path for one machine and many: a launcher (``torchrun --nproc-per-node N``, ``srun``, or
any cluster that sets RANK and WORLD_SIZE) starts every process; each builds the same stream
and model from the same seed, trains its shard of every batch under Lightning's plain ``ddp``,
evaluates its shard of every test experience (sums all-reduced, so every rank gets the whole
row), and only global rank 0 writes to MLflow (``tracking.mlflow_run.tracker_for_rank``).

``trainer.devices=N`` without a launcher is refused with the torchrun command to use (exit 2),
rather than starting torchrun from inside the job: the user's terminal, SLURM, and Ctrl-C then
see the launcher they started, and the command that ran is the command that was typed.

The process group is created once, before the first evaluation (which is sharded), and every
Trainer of the loop finds it open (Lightning skips its own initialisation then).

DDP runs with ``forward_sync_buffers=False``: frozen expert banks and gate rows are buffers,
and DDP's default broadcasts every buffer from rank 0 before each forward, so the bytes sent
per step would grow with every experience (tests/test_torchrun.py counts them). Frozen buffers
never change; DDP still syncs all of them once when it wraps the model for an experience. The
one buffer that changes in training, each MoE layer's ``expert_usage`` counter, is summed over
the ranks at the end of every fit (``SumCounters``): then it holds what one process would have
counted, and growth (``expand_init=copy_most_used``) picks the same expert on every rank.
"""

from __future__ import annotations

import atexit
import os
import shlex
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig

from lifelong_moe import compat
from lifelong_moe.errors import ConfigError
from lifelong_moe.log import LOGGER
from lifelong_moe.moe.expert_parallel import ExpertParallelMoE
from lifelong_moe.run import expert_parallel
from lifelong_moe.run.resume import capture_rng, restore_rng

COUNTERS = ("expert_usage",)  # buffers that training changes on each rank: summed after a fit


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def _slurm() -> bool:
    """srun started this process as one task of several (Lightning's own detection)."""
    return SLURMEnvironment.detect() and (_env_int("SLURM_NTASKS") or 1) > 1


def world_size() -> int:
    """How many processes a launcher started (torchrun: WORLD_SIZE, srun: SLURM_NTASKS); 1 alone."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return _env_int("SLURM_NTASKS") if _slurm() else 1


def global_rank() -> int:
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return _env_int("SLURM_PROCID") if _slurm() else 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0


def local_world_size(cfg: DictConfig) -> int:
    """Processes on this machine: torchrun's LOCAL_WORLD_SIZE, srun's tasks per node, or the
    config's ``trainer.devices`` (a cluster that sets RANK/WORLD_SIZE alone)."""
    n = _env_int("LOCAL_WORLD_SIZE")
    if n is None and _slurm():
        n = _env_int("SLURM_NTASKS_PER_NODE")
    if n is None:
        n = world_size() // max(int(cfg.trainer.num_nodes), 1)
    return n


def requested_devices(cfg: DictConfig) -> int:
    """How many devices ``trainer.devices`` asks for on this machine."""
    devices = cfg.trainer.devices
    if devices == "auto" or devices == -1:
        gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d.strip()])
    if not isinstance(devices, int):  # a list of device ids
        return len(devices)
    return devices


def torchrun_command(nproc: int, argv: list[str]) -> str:
    """The command that starts this one with ``nproc`` processes on this machine."""
    return shlex.join(["torchrun", "--nproc-per-node", str(nproc), "-m", "lifelong_moe.cli", *argv])


def check_launch(cfg: DictConfig, argv: list[str] | None = None) -> None:
    """Refuse, before anything is built, a process count that no launcher started.

    Without a launcher: ``trainer.devices`` above 1 (or ``num_nodes``) -> the torchrun command.
    Under one: the config's devices/nodes, when given, must match what the launcher started.
    """
    t = cfg.trainer
    wanted = requested_devices(cfg)
    args = sys.argv[1:] if argv is None else argv
    nproc = max(wanted, expert_parallel.degree(cfg))
    expert_parallel.check(cfg, world_size(), torchrun_command(nproc, args))
    if world_size() == 1:
        if wanted > 1 and int(t.num_nodes) == 1:
            raise ConfigError(
                f"trainer.devices={t.devices} needs one process per device, started by a "
                f"launcher; run: {torchrun_command(wanted, args)}"
            )
        if int(t.num_nodes) > 1:
            raise ConfigError(
                f"trainer.num_nodes={t.num_nodes} needs a launcher on every node (torchrun "
                "--nnodes, srun); none started this process"
            )
        return
    local = local_world_size(cfg)
    if wanted not in (1, local):
        raise ConfigError(
            f"trainer.devices={t.devices} but the launcher started {local} processes on this "
            f"machine; set trainer.devices={local} or leave it at 1"
        )


def launched() -> bool:
    return world_size() > 1


def init(cfg: DictConfig) -> None:
    """Open the process group of a launched run (once per process), on this rank's device."""
    if not launched() or dist.is_initialized():
        return
    if _slurm():  # srun sets no MASTER_ADDR/PORT: Lightning's SLURM environment derives them
        slurm = SLURMEnvironment()
        os.environ.setdefault("MASTER_ADDR", slurm.main_address)
        os.environ.setdefault("MASTER_PORT", str(slurm.main_port))
    gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        backend="nccl" if gpu else "gloo", rank=global_rank(), world_size=world_size()
    )
    atexit.register(_close)
    if global_rank() != 0:  # one console: rank 0 speaks for all (warnings still show)
        LOGGER.setLevel("WARNING")


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def trainer_layout(cfg: DictConfig) -> dict:
    """Devices, nodes and strategy of the Trainer of one experience."""
    t = cfg.trainer
    if not launched():
        return {"devices": t.devices, "num_nodes": t.num_nodes, "strategy": t.strategy}
    local = local_world_size(cfg)
    strategy = t.strategy
    if strategy in ("auto", "ddp"):
        strategy = LoopDDP(forward_sync_buffers=False)
    return {"devices": local, "num_nodes": world_size() // local, "strategy": strategy}


class LoopDDP(DDPStrategy):
    """Lightning's ``ddp`` that leaves the random state of the loop as it is.

    Lightning re-seeds every process from the run's seed as it sets up DDP (``reset_seed``), at
    every experience's fit: experts grown after a fit would then be drawn from another state
    than one process draws them from.
    """

    def setup_distributed(self) -> None:
        state = capture_rng()
        super().setup_distributed()
        restore_rng(state)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Experts sharded over ranks (trainer.expert_parallel) stay out of DDP: their names
        are set again at every fit, since growth adds new ones."""
        compat.ddp_ignore(model, expert_parallel.ddp_ignored(model))
        return super()._setup_model(model)


class SumCounters(L.Callback):
    """At the end of a fit, sum over the ranks what each counted in ``COUNTERS`` buffers.

    Each rank counted its shard of the experience since the fit began (from equal values: DDP
    synced every buffer when it wrapped the model); the sum of those increments is what one
    process counts over the whole experience. A fit resumed from a step checkpoint starts from
    rank 0's counts at that step (the checkpoint's), so rank 1's counts before it are lost.
    """

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}

    def _counters(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A sharded layer's counter is left alone: its layer's count is the sum over ranks
        already (moe/expert_parallel.py gathers it so)."""
        sharded = [f"{n}." for n, m in module.named_modules() if isinstance(m, ExpertParallelMoE)]
        return {
            name: buf
            for name, buf in module.named_buffers()
            if name.rsplit(".", 1)[-1] in COUNTERS and not name.startswith(tuple(sharded))
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in self._counters(pl_module).items()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1 or not dist.is_initialized():
            return
        for name, buf in self._counters(pl_module).items():
            added = buf - self.start[name]
            dist.all_reduce(added)
            buf.copy_(self.start[name] + added)
