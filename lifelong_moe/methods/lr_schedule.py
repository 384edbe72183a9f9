"""Learning-rate schedules per experience: the continual pre-training recipe as an option.

Lightning builds a fresh optimizer at every experience (see ``methods/base.py``), so a schedule
here is a function of (step within the experience, steps of the experience, experience index).
It multiplies ``method.lr`` (eta_max):

- ``constant``: eta_max, after an optional linear warm-up (today's behaviour with 0 steps).
- ``cosine_rewarm`` (Ibrahim et al. 2024, "Simple and scalable strategies to continually
  pre-train LLMs", Sec. 5; Thérien et al. 2025, TMLR): at *every* experience, re-warm linearly
  from 0 to eta_max over ``warmup_steps``, then re-decay by a half cosine to
  eta_min = ``lr_floor`` * eta_max at the experience's last step.
- ``infinite`` (Ibrahim et al. 2024, Sec. 7.2 "infinite learning rate schedules", the schedule
  Thérien et al. use for continually pre-trained MoEs): on the first experience only, linear
  warm-up to eta_max then a cosine cool-down over ``cooldown_steps`` to the constant level
  eta_const = ``lr_constant`` * eta_max; afterwards eta_const with no re-warming, so a new
  experience continues where the last left off. The last ``anneal_steps`` of each experience
  decay linearly from eta_const to eta_min (the paper anneals a branch of the run; we have one
  model, so the next experience resumes at eta_const).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lifelong_moe import checks
from lifelong_moe.errors import ConfigError

SCHEDULES = ("constant", "cosine_rewarm", "infinite")


@dataclass(frozen=True)
class LRSchedule:
    """The ``schedule`` group (conf/schedule/default.yaml): its node builds this object."""

    name: str = "constant"
    warmup_steps: int = 0
    lr_floor: float = 0.1
    lr_constant: float = 0.5
    cooldown_steps: int = 0
    anneal_steps: int = 0

    def __post_init__(self) -> None:
        checks.choice("schedule.name", self.name, SCHEDULES)
        for key in ("warmup_steps", "cooldown_steps", "anneal_steps"):
            checks.non_negative_int(f"schedule.{key}", getattr(self, key))
        for key in ("lr_floor", "lr_constant"):  # fractions of method.lr
            checks.fraction(f"schedule.{key}", getattr(self, key))
        if self.name == "infinite" and self.lr_floor > self.lr_constant:
            raise ConfigError(
                f"schedule.lr_floor={self.lr_floor}: expected a number <= schedule.lr_constant="
                f"{self.lr_constant} (infinite anneals from the constant level down to the floor)"
            )

    @property
    def is_constant(self) -> bool:
        """True when every step runs at eta_max: no scheduler is needed at all."""
        return self.name == "constant" and self.warmup_steps == 0

    def factor(self, step: int, total: int, experience: int) -> float:
        """Multiplier of eta_max at optimizer ``step`` (0-based) of an experience of ``total`` steps."""
        warmup = self.warmup_steps if self.name != "infinite" or experience == 0 else 0
        if step < warmup:
            return step / warmup
        if self.name == "constant":
            return 1.0
        if self.name == "cosine_rewarm":
            span = max(total - 1 - warmup, 1)
            progress = min((step - warmup) / span, 1.0)
            return self.lr_floor + (1 - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
        # infinite
        anneal_start = total - self.anneal_steps
        if step >= anneal_start and self.anneal_steps > 0:
            progress = (step - anneal_start + 1) / self.anneal_steps
            return self.lr_constant + (self.lr_floor - self.lr_constant) * progress
        if experience == 0 and step - warmup < self.cooldown_steps:
            progress = (step - warmup) / self.cooldown_steps
            return self.lr_constant + (1 - self.lr_constant) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        return self.lr_constant
