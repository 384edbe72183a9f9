"""Lifelong-MoE (Chen et al., ICML 2023): grow experts, freeze the old ones, distill to the past.

Before every experience t > 0, each MoE layer moves all its experts and gate rows into the
frozen bank and appends ``experts_per_experience`` new trainable ones. Training then minimises

    CE(student) + lambda_aux * balance + lambda_kd * T^2 * KL(teacher || student)

on the current batch, the teacher being the model as it stood at the end of experience t-1.
The teacher shares the frozen banks with the student by reference (``deepcopy`` with a memo),
so its cost is the shared (non-expert) weights only; with ``freeze_shared`` nothing is copied:
the teacher is the student with the new experts masked out. top_k is fixed, so compute per
token stays constant while capacity grows.

Router-level options (off by default): ``lambda_router`` distills the teacher's routing
distribution over the old experts into the student's on the current batch (loss term
``router_kd``); ``model.balance_scope=trainable`` applies the balance loss to the new experts only;
``infer_routing`` routes each input toward the experts grown for the experience it most likely
comes from, inferred from per-experience input statistics (see ``inferred_routing.py``).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lifelong_moe import checks
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.distillation import distillation, router_distillation
from lifelong_moe.methods.inferred_routing import (
    ExperienceInference,
    ExperienceStatistics,
    routing_bias,
)
from lifelong_moe.models import moe_layers
from lifelong_moe.moe.domain import router_input_means
from lifelong_moe.moe.experts import EXPERT_INITS
from lifelong_moe.moe.quant import check_frozen_dtype
from lifelong_moe.moe.router import GATE_INITS
from lifelong_moe.stream import Experience

# Weight of the balance loss when neither the config nor the model (router_aux_loss_coef) sets one.
DEFAULT_LAMBDA_AUX = 0.01
# New experts and gate rows of the toolkit's own backbones (a model may state its own).
DEFAULT_GROWTH_INIT = {"expand_init": "random", "gate_init": "mean"}
# gate_init=domain: how many of the new experience's inputs the mean router input is taken over.
DOMAIN_WINDOWS = 1024


class LifelongMoE(ContinualMethod):
    def __init__(
        self,
        model: nn.Module,
        experts_per_experience: int = 2,
        freeze_old: bool = True,
        freeze_shared: bool = False,
        lambda_kd: float = 1.0,
        temperature: float = 2.0,
        lambda_aux: float | None = None,
        lambda_z: float = 0.0,
        expand_init: str | None = None,
        gate_init: str | None = None,
        task_aware_routing: bool = False,
        lambda_router: float = 0.0,
        infer_routing: bool = False,
        infer_bonus: float = 0.0,
        infer_restrict: bool = True,
        frozen_dtype: str = "fp32",
        infer_source: str = "statistics",
        **base: Any,
    ) -> None:
        super().__init__(model, **base)  # lr, weight_decay, replay: ContinualMethod's
        checks.non_negative_int("method.experts_per_experience", experts_per_experience)
        if lambda_aux is None:  # the model's own weight (a Hugging Face family's), else Switch's
            lambda_aux = getattr(model, "aux_loss_coef", None)
            lambda_aux = DEFAULT_LAMBDA_AUX if lambda_aux is None else lambda_aux
        for key, value in (
            ("lambda_kd", lambda_kd),
            ("lambda_aux", lambda_aux),
            ("lambda_z", lambda_z),
            ("lambda_router", lambda_router),
            ("infer_bonus", infer_bonus),
        ):
            checks.non_negative(f"method.{key}", value)
        checks.positive("method.temperature", temperature)
        if not moe_layers(model):
            raise ConfigError(
                f"method=lifelong_moe needs a backbone with MoE layers, got {type(model).__name__} "
                "without any; use model=moe_mlp, model=moe_vit, model=moe_lm or model=olmoe"
            )
        # null: the backbone's measured choice (HFMoECausalLM.growth_init), else the defaults.
        preferred = {**DEFAULT_GROWTH_INIT, **getattr(model, "growth_init", {})}
        expand_init = preferred["expand_init"] if expand_init is None else expand_init
        gate_init = preferred["gate_init"] if gate_init is None else gate_init
        checks.choice("method.expand_init", expand_init, EXPERT_INITS)
        checks.choice("method.gate_init", gate_init, GATE_INITS)
        # How frozen expert banks are stored (moe/quant.py); freeze_existing() converts to it.
        self.frozen_dtype = check_frozen_dtype("method.frozen_dtype", frozen_dtype)
        for layer in moe_layers(model).values():
            layer.experts.set_frozen_dtype(self.frozen_dtype)
        if infer_routing and task_aware_routing:
            raise ConfigError(
                "method.infer_routing=true and method.task_aware_routing=true: choose one "
                "(inferred routing is for when no task label is known at test time)"
            )
        self.experts_per_experience = experts_per_experience
        self.task_aware_routing = task_aware_routing
        self.lambda_router = lambda_router
        self.infer_routing = infer_routing
        self.infer_bonus = float(infer_bonus)
        self.infer_restrict = infer_restrict
        self.inference = ExperienceInference(infer_source)
        if infer_routing:
            model.register_forward_pre_hook(_InferredRoutingHook(self), with_kwargs=True)
        top_k = next(iter(moe_layers(model).values())).top_k
        if task_aware_routing and experts_per_experience < top_k:
            raise ConfigError(
                f"method.task_aware_routing=true needs method.experts_per_experience >= top_k "
                f"({top_k}) so that each task has its own top_k experts, got {experts_per_experience}"
            )
        # Experience that created each expert (task-aware routing and the routing plot). A
        # model restored from an export brings its own (< 0: grown by the run it continues);
        # it has trained already, so this run grows before its first experience too.
        restored = getattr(model, "expert_origin", None)
        n_experts = next(iter(moe_layers(model).values())).n_experts
        self.continues = restored is not None
        self.expert_origin = list(restored) if restored is not None else [0] * n_experts
        self.freeze_old = freeze_old
        self.freeze_shared = freeze_shared
        self.lambda_kd = lambda_kd
        self.temperature = temperature
        self.lambda_aux = lambda_aux
        self.lambda_z = lambda_z
        self.expand_init = expand_init
        self.gate_init = gate_init
        # Distillation target: a separate module, or the student with the new experts masked.
        self._set_teacher(None)
        self.teacher_mask: torch.Tensor | None = None
        # Routing distillation needs a teacher even without output distillation.
        self.needs_teacher = lambda_kd > 0 or lambda_router > 0

    def keeps_frozen_experts(self) -> bool:
        """Restored frozen experts stay frozen when this method freezes old experts itself;
        without ``freeze_old`` (moe_finetune, lifelong_moe_no_freeze) every expert trains."""
        return self.freeze_old

    @property
    def statistics(self) -> ExperienceStatistics:
        """The per-experience input statistics behind inferred routing."""
        return self.inference.statistics

    @property
    def infer_source(self) -> str:
        return self.inference.source

    @property
    def layers(self) -> dict:
        """Looked up each time: a resumed run swaps in layers of the grown size."""
        return moe_layers(self.model)

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self._set_teacher(None)
        self.teacher_mask = None
        if exp.index == 0 and not self.continues:
            return
        n_old = next(iter(self.layers.values())).n_experts
        if self.freeze_old:
            for layer in self.layers.values():
                layer.freeze_existing()
        if self.freeze_shared:
            self._freeze_shared()
        # Masking the new experts reproduces the old model only if nothing old can change.
        mask_teacher = self.freeze_shared and self.freeze_old
        if self.needs_teacher and not mask_teacher:
            self._set_teacher(self._snapshot_teacher())
        domains = self._domain_embeddings(exp) if self.gate_init == "domain" else {}
        for name, layer in self.layers.items():
            if self.experts_per_experience:
                layer.expand(
                    self.experts_per_experience,
                    init=self.expand_init,
                    gate_init=self.gate_init,
                    domain=domains.get(name),
                )
        self.expert_origin += [exp.index] * self.experts_per_experience
        if self.needs_teacher and mask_teacher:
            n_new = next(iter(self.layers.values())).n_experts
            self.teacher_mask = torch.arange(n_new) < n_old

    def experts_after(self, n_done: int, n_built: int) -> int:
        """Growth before every experience but the first (every one, for a continued model)."""
        growths = n_done if self.continues else max(n_done - 1, 0)
        return n_built + self.experts_per_experience * growths

    def _domain_embeddings(self, exp: Experience) -> dict[str, torch.Tensor]:
        """gate_init=domain: each layer's mean router input over the first DOMAIN_WINDOWS
        training inputs of the new experience (Nexus / FlexOlmo router embeddings)."""
        device = next(self.model.parameters()).device
        loader = DataLoader(exp.train, batch_size=64, shuffle=False)
        batches = itertools.islice(loader, -(-DOMAIN_WINDOWS // 64))
        return router_input_means(self.model, batches, lambda b: self.model(b[0].to(device)))

    def setup_stream(self, stream) -> None:
        super().setup_stream(stream)
        if self.infer_routing and stream.language_modeling:
            self.statistics.vocab_size = stream.n_classes
        if self.task_aware_routing and not stream.task_labels:
            raise ConfigError(
                "method.task_aware_routing=true needs task labels at test time: set "
                "benchmark.task_labels=true (the task-incremental setting)"
            )

    def task_mask(self, task: int) -> torch.Tensor | None:
        """Task-aware routing: a task's tokens go only to the experts grown for it."""
        if not self.task_aware_routing or task not in self.expert_origin:
            return None
        return torch.tensor([origin == task for origin in self.expert_origin])

    def expert_mask(self, exp: Experience) -> torch.Tensor | None:
        if self.infer_routing and self.infer_source == "oracle" and not self.model.training:
            if len(self.inference) == 0:
                return None
            experience = torch.tensor(self.inference.oracle(exp.index))
            origin = torch.tensor(self.expert_origin)
            return routing_bias(experience, origin, self.infer_bonus, self.infer_restrict)
        return self.task_mask(exp.task_id)

    def inferred_experience(self, x: torch.Tensor, oracle: int) -> torch.Tensor:
        """The experience inferred routing uses for x at test time (``infer_source``); ``oracle``
        is the true one, clamped to the experiences learned so far."""
        return self.inference.infer(x, oracle)

    def expert_origins(self) -> list[int]:
        return list(self.expert_origin)

    def fitted(self, exp: Experience) -> None:
        # Before evaluation, which must recognise this experience too.
        if self.infer_routing:
            self.inference.add(exp.train)

    def routing_bias(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-input logit bias of inferred routing; in training the experience is known."""
        if self.model.training:
            if self.experience is None:
                return None
            experience = torch.full(
                x.shape[:2] if not x.is_floating_point() else x.shape[:1],
                self.experience.index,
                device=x.device,
            )
        elif len(self.statistics) == 0:
            return None
        else:  # the oracle comes through expert_mask, which knows the test experience
            experience = self.inferred_experience(x, oracle=len(self.statistics) - 1)
        origin = torch.tensor(self.expert_origin, device=x.device)
        return routing_bias(experience, origin, self.infer_bonus, self.infer_restrict)

    def teacher_bias(self, x: torch.Tensor, n_experts: int) -> torch.Tensor | None:
        """The routing the evaluated model had after the previous experience: the bias of
        inferred routing (eval mode) from the statistics of the experiences before this one
        (this experience's are added only after its fit), over the ``n_old`` experts that
        existed then; experts grown since are disabled (-inf) for a teacher of ``n_experts``."""
        if not self.infer_routing or len(self.statistics) == 0:
            return None
        n_old = sum(o < self.experience.index for o in self.expert_origin)
        origin = torch.tensor(self.expert_origin[:n_old], device=x.device)
        # The batch is experience t's; the model after t-1 knew t-1 as its latest experience.
        experience = self.inferred_experience(x, oracle=len(self.statistics) - 1)
        bias = routing_bias(experience, origin, self.infer_bonus, self.infer_restrict)
        hidden = bias.new_full((*bias.shape[:-1], n_experts - n_old), float("-inf"))
        return torch.cat([bias, hidden], dim=-1)

    def evaluation_metrics(self, t: int) -> dict[str, float]:
        """Inferred routing: ``routing/inference_acc`` (``ExperienceInference.accuracy``)."""
        if not self.infer_routing or self.stream is None:
            return {}
        return self.inference.accuracy(self.stream, t)

    def method_state(self) -> dict:
        return super().method_state() | {
            "expert_origin": self.expert_origin,
            "statistics": self.statistics.state_dict(),
        }

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self.expert_origin = state.get("expert_origin", self.expert_origin)
        if "statistics" in state:
            self.statistics.load_state_dict(state["statistics"])

    def _freeze_shared(self) -> None:
        """Every non-expert weight stops training; the new experts and gate rows stay trainable."""
        expert_params = {id(p) for layer in self.layers.values() for p in layer.parameters()}
        for p in self.model.parameters():
            if id(p) not in expert_params:
                p.requires_grad_(False)

    def _set_teacher(self, teacher: nn.Module | None) -> None:
        """Outside the module tree (see ContinualMethod.__setattr__); it follows the batch's device
        in ``teacher_logits``."""
        self.teacher = teacher
        self.teacher_device: torch.device | None = None

    def _snapshot_teacher(self) -> nn.Module:
        """A copy of the model whose frozen expert banks are the student's own tensors."""
        shared = {id(b): b for layer in self.layers.values() for b in layer.buffers()}
        teacher = copy.deepcopy(self.model, memo=dict(shared))
        teacher.requires_grad_(False)
        return teacher.eval()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        out = self.teacher_outputs(x)
        return None if out is None else out[0]

    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list] | None:
        """The previous phase's (logits, aux) on x, or None before the first growth."""
        with torch.no_grad():
            if self.teacher is not None:
                if self.teacher_device != x.device:
                    self.teacher.to(x.device)  # once per experience: not a submodule (see above)
                    self.teacher_device = x.device
                n_experts = next(iter(moe_layers(self.teacher).values())).n_experts
                bias = self.teacher_bias(x, n_experts)
                return self.teacher(x) if bias is None else self.teacher(x, expert_mask=bias)
            if self.teacher_mask is not None:
                was_training = self.model.training
                self.model.eval()
                self.teacher_mask = self.teacher_mask.to(x.device)  # once, not every step
                mask = self.teacher_bias(x, len(self.teacher_mask))
                if mask is None:
                    mask = self.teacher_mask
                out = self.model(x, expert_mask=mask)
                self.model.train(was_training)
                return out
        return None

    def extra_loss(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, aux: list
    ) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.lambda_aux > 0 and aux:
            terms["balance"] = self.lambda_aux * sum(a.balance_loss for a in aux)
        if self.lambda_z > 0 and aux:
            terms["z"] = self.lambda_z * sum(a.z_loss for a in aux)
        teacher = self.teacher_outputs(x) if self.needs_teacher else None
        if teacher is not None and self.lambda_kd > 0:
            terms["kd"] = self.lambda_kd * distillation(logits, teacher[0], self.temperature)
        if teacher is not None and self.lambda_router > 0 and aux:
            n_old = sum(o < self.experience.index for o in self.expert_origin)
            terms["router_kd"] = self.lambda_router * router_distillation(aux, teacher[1], n_old)
        return terms


class _InferredRoutingHook:
    """Forward pre-hook of the student model: adds the inferred routing bias when the caller
    gave no expert mask (an explicit mask, e.g. the masked teacher, wins). Copies of the model
    (the teacher snapshot) share the hook object, which ignores any module but the student."""

    def __init__(self, method: LifelongMoE) -> None:
        self.method = method

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if module is not self.method.model or kwargs.get("expert_mask") is not None:
            return None
        if len(args) > 1:
            return None
        bias = self.method.routing_bias(args[0])
        return None if bias is None else (args, {**kwargs, "expert_mask": bias})

    def __deepcopy__(self, memo: dict) -> _InferredRoutingHook:
        return self
