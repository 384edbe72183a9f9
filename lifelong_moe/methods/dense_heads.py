"""Dense heads: the dense peer given the same side information as ``lifelong_moe_specialized``.

A reviewer's question (issue 24): ``lifelong_moe_specialized`` infers each test input's
experience from input statistics and routes it to the experts grown for that experience; how
much of its result is the inferred experience rather than the mixture of experts? This method
gives a dense backbone the same answer and nothing else:

- one output head per experience (``models/experience_heads.py``), added when the experience
  starts, as a copy of the newest head (``head_init=copy``, so the model starts the experience
  as it ended the previous one) or freshly initialised (``head_init=random``);
- the heads of earlier experiences are frozen (out of the optimizer, bit-identical
  afterwards), like Lifelong-MoE's frozen experts;
- the trunk (everything but the heads) trains on every experience as ``naive`` trains it: no
  distillation, no regularisation, no freezing. That is the fair peer: the dense model gets the
  side information, not a protection of its trunk that Lifelong-MoE's shared weights lack;
- in training every input uses the current experience's head (the experience is known); at
  test time each input (each position, for text) uses the head of the experience that
  ``ExperienceInference`` gives, the same piece and the same ``method.infer_source`` switch
  (statistics | oracle | shuffled) as ``lifelong_moe_specialized``, and
  ``routing/inference_acc`` is logged the same way.

Parameters: ``cost/params_total`` counts every head; ``cost/params_active`` the trunk plus one
head (``ExperienceHeads.active_parameters``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lifelong_moe import checks
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.inferred_routing import ExperienceInference, ExperienceStatistics
from lifelong_moe.models import moe_layers
from lifelong_moe.models.experience_heads import HEAD_INITS, ExperienceHeads
from lifelong_moe.stream import Experience, Stream


class DenseHeads(ContinualMethod):
    """Naive training of a dense trunk, one frozen-after-use head per experience, the head chosen
    at test time by the inferred experience; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        head_init: str = "copy",
        infer_source: str = "statistics",
        **base: Any,
    ) -> None:
        if moe_layers(model):
            raise ConfigError(
                f"method=dense_heads is the dense peer: it needs a dense backbone, got "
                f"{type(model).__name__} with MoE layers; use model=mlp, model=vit or model=lm"
            )
        checks.choice("method.head_init", head_init, HEAD_INITS)
        super().__init__(ExperienceHeads(model), **base)  # lr, weight_decay, replay
        self.head_init = head_init
        self.inference = ExperienceInference(infer_source)
        self.model.register_forward_pre_hook(_HeadChoiceHook(self), with_kwargs=True)

    @property
    def statistics(self) -> ExperienceStatistics:
        return self.inference.statistics

    def setup_stream(self, stream: Stream) -> None:
        super().setup_stream(stream)
        if stream.language_modeling:
            self.statistics.vocab_size = stream.n_classes

    def before_experience(self, exp: Experience) -> None:
        """Experience t trains head t; heads 0..t-1 are frozen. A resumed run already has the
        heads of the experiences it finished, so only the missing ones are added."""
        super().before_experience(exp)
        while len(self.model.heads) < exp.index + 1:
            self.model.freeze_heads()
            self.model.add_head(self.head_init)

    def fitted(self, exp: Experience) -> None:
        # Before evaluation, which must recognise this experience too (as inferred routing).
        self.inference.add(exp.train)

    def head_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """One-hot head choice of each input at test time (None in training: the newest head,
        which is the current experience's)."""
        if self.model.training or len(self.inference) == 0:
            return None
        experience = self.inference.infer(x, oracle=len(self.inference) - 1)
        return nn.functional.one_hot(experience, len(self.model.heads)).bool()

    def expert_mask(self, exp: Experience) -> torch.Tensor | None:
        """``infer_source=oracle``: the test experience's own head (the newest for a future one)."""
        if self.inference.source != "oracle" or self.model.training or len(self.inference) == 0:
            return None
        index = torch.tensor(self.inference.oracle(exp.index))
        return nn.functional.one_hot(index, len(self.model.heads)).bool()

    def evaluation_metrics(self, t: int) -> dict[str, float]:
        """``routing/inference_acc`` as ``lifelong_moe_specialized`` logs it."""
        return {} if self.stream is None else self.inference.accuracy(self.stream, t)

    def method_state(self) -> dict:
        return super().method_state() | {"statistics": self.statistics.state_dict()}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        if "statistics" in state:
            self.statistics.load_state_dict(state["statistics"])


class _HeadChoiceHook:
    """Forward pre-hook of the model: adds the inferred head choice when the caller gave no
    mask (an explicit one, e.g. the oracle's from ``expert_mask``, wins)."""

    def __init__(self, method: DenseHeads) -> None:
        self.method = method

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if kwargs.get("expert_mask") is not None or len(args) > 1:
            return None
        mask = self.method.head_mask(args[0])
        return None if mask is None else (args, {**kwargs, "expert_mask": mask})

    def __deepcopy__(self, memo: dict) -> _HeadChoiceHook:
        return self
