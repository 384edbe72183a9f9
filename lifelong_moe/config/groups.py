"""The plain config groups as dataclasses: what each holds, its types, and its range checks.

``config/schema.py`` validates a composed node against its group's dataclass (an unknown key or a
value of the wrong type is one line naming the key, the value and the expected type) and then
builds it, so ``__post_init__`` checks ranges and the relations between keys. The code reads the
built object where a group feeds one place: ``CheckpointPolicy`` the step checkpoints,
``LRSchedule`` (methods/lr_schedule.py, the ``schedule`` group) the learning rate.

Why not Hydra's structured configs in a ConfigStore: OmegaConf converts values silently
(``"3"`` -> 3), knows no ``Literal`` and no unions but ``Optional``, and refuses a value in a
multi-line message that names no expected type. The defaults here equal conf/<group>/default.yaml
(a test checks it): they fill in keys a config stored by an older run lacks.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lifelong_moe import checks, compat
from lifelong_moe.errors import ConfigError


def _precision(key: str, value: Any) -> None:
    """The values Lightning accepts: 32-true, bf16-mixed, ..., and the aliases 32, "bf16"."""

    def flat(annotation: Any) -> list:
        args = typing.get_args(annotation)
        literal = typing.get_origin(annotation) is Literal
        return list(args) if literal else [v for a in args for v in flat(a)]

    valid = flat(compat.precision_input())
    if not any(value == v and type(value) is type(v) for v in valid):
        checks.choice(key, value, dict.fromkeys(str(v) for v in valid))


def _lightning_strategies() -> tuple:
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def check_budget(trainer: Mapping[str, Any]) -> None:
    """One budget per experience (run/budget.py): ``max_steps`` and ``max_tokens`` together are
    refused."""
    steps, tokens = trainer.get("max_steps"), trainer.get("max_tokens")
    if steps is not None and tokens is not None:
        raise ConfigError(
            f"trainer.max_steps={steps} with trainer.max_tokens={tokens}: expected one budget "
            "per experience (set the other to null)"
        )


@dataclass(frozen=True)
class TrainerConfig:
    """``trainer``: the Lightning Trainer's arguments (a new Trainer per experience) and data
    loading."""

    max_epochs: int = 5
    # run/budget.py: either replaces max_epochs; both together are refused
    max_steps: int | None = None
    max_tokens: int | None = None
    accumulate_grad_batches: int = 1
    val_check_interval: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 1024
    num_workers: int = 0
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = "cpu"
    devices: int | Literal["auto"] = 1
    num_nodes: int = 1
    expert_parallel: int = 1  # run/expert_parallel.py: a divisor of the world size
    strategy: str = "auto"
    precision: str | int = "32-true"
    progress_bar: bool = True
    gradient_clip_val: float | None = None
    deterministic: bool | Literal["warn"] = True  # Lightning: warn instead of failing
    compile: bool = False

    def __post_init__(self) -> None:
        for key in ("max_epochs", "accumulate_grad_batches", "batch_size", "eval_batch_size"):
            checks.positive_int(f"trainer.{key}", getattr(self, key))
        for key in ("max_steps", "max_tokens", "val_check_interval"):
            checks.optional(checks.positive_int, f"trainer.{key}", getattr(self, key))
        checks.non_negative_int("trainer.num_workers", self.num_workers)
        if self.devices != "auto":
            checks.positive_int("trainer.devices", self.devices)
        checks.positive_int("trainer.num_nodes", self.num_nodes)
        checks.positive_int("trainer.expert_parallel", self.expert_parallel)
        checks.choice("trainer.strategy", self.strategy, _lightning_strategies())
        _precision("trainer.precision", self.precision)
        checks.optional(checks.non_negative, "trainer.gradient_clip_val", self.gradient_clip_val)
        check_budget({"max_steps": self.max_steps, "max_tokens": self.max_tokens})
        if self.num_nodes > 1 and self.strategy != "ddp":
            raise ConfigError(
                f"trainer.strategy={self.strategy} with trainer.num_nodes={self.num_nodes}: "
                "several nodes need trainer.strategy=ddp (one process per device, started by "
                "SLURM/torchrun)"
            )


@dataclass(frozen=True)
class CheckpointPolicy:
    """``checkpoint``: training checkpoints inside an experience (run/checkpoints.py)."""

    every_n_steps: int = 100  # and at the end of every epoch; 0: at the end of epochs only
    dir: str = "checkpoints"  # local folder of <run_id>/exp<i>-step<s>.ckpt
    keep: int = 2  # the run's newest checkpoints kept
    background: bool | Literal["auto"] = "auto"  # write in a thread; auto: on a GPU only

    def __post_init__(self) -> None:
        checks.non_negative_int("checkpoint.every_n_steps", self.every_n_steps)
        checks.positive_int("checkpoint.keep", self.keep)


@dataclass(frozen=True)
class TrackingConfig:
    """``tracking``: the MLflow store and what a run records there."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "lifelong-moe"
    run_name: str | None = None
    sweep_id: str | None = None
    log_checkpoints: bool = True
    keep_resume_state: bool = False
    system_metrics: bool = True
    system_metrics_interval_s: float = 2.0
    export: Literal["none", "hf"] = "none"
    export_every: int = 1
    log_every_n_steps: int = 50  # training curves (run/curves.py); 0: none

    def __post_init__(self) -> None:
        checks.positive("tracking.system_metrics_interval_s", self.system_metrics_interval_s)
        checks.positive_int("tracking.export_every", self.export_every)
        checks.non_negative_int("tracking.log_every_n_steps", self.log_every_n_steps)


@dataclass(frozen=True)
class LMEvalConfig:
    """``evaluation.lm_eval``: downstream tasks with lm-evaluation-harness."""

    tasks: list[str] = field(default_factory=list)  # evaluation/downstream.py checks the names
    include_path: str | None = None
    every: int = 1
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    progress_every: int = 100  # requests between lm-eval progress lines

    def __post_init__(self) -> None:
        for key in ("every", "batch_size", "progress_every"):
            checks.positive_int(f"evaluation.lm_eval.{key}", getattr(self, key))
        checks.optional(checks.positive_int, "evaluation.lm_eval.limit", self.limit)
        checks.optional(checks.non_negative_int, "evaluation.lm_eval.num_fewshot", self.num_fewshot)


@dataclass(frozen=True)
class EvaluationConfig:
    """``evaluation``: how experiences are evaluated, beside training."""

    max_batches: int | None = None
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)

    def __post_init__(self) -> None:
        checks.optional(checks.positive_int, "evaluation.max_batches", self.max_batches)
