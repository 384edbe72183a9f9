"""Lifelong-MoE's mechanics: growth, exact freezing, a teacher that shares the frozen banks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.distillation import distillation
from lifelong_moe.methods.lifelong_moe import LifelongMoE
from lifelong_moe.models import moe_layers
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.moe import MoESettings
from lifelong_moe.stream import Experience, Stream


def tiny_stream(n_experiences: int = 3, task_labels: bool = False) -> Stream:
    g = torch.Generator().manual_seed(0)
    experiences = []
    for i in range(n_experiences):
        x = torch.randn(96, 1, 4, 4, generator=g) + i
        y = torch.randint(0, 4, (96,), generator=g)
        data = TensorDataset(x, y, torch.zeros(96, dtype=torch.long))
        task = i if task_labels else 0
        experiences.append(Experience(i, data, data, classes=[0, 1, 2, 3], task_id=task))
    return Stream("tiny", experiences, 4, (1, 4, 4), "domain_incremental", task_labels)


def make(
    task_labels: bool = False, moe: MoESettings | None = None, **kwargs
) -> tuple[LifelongMoE, Stream]:
    torch.manual_seed(0)
    moe = moe or MoESettings(blocks=[0, 1], n_experts=4)
    model = ResidualMLP([1, 4, 4], 4, d_model=16, d_hidden=8, moe=moe)
    method = LifelongMoE(model, **kwargs)
    stream = tiny_stream(task_labels=task_labels)
    method.setup_stream(stream)
    return method, stream


def fit(method: LifelongMoE, exp: Experience) -> None:
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(method, DataLoader(method.train_dataset(exp), batch_size=32, shuffle=True))


def frozen_state(method: LifelongMoE) -> dict[str, torch.Tensor]:
    return {
        name: buf.clone()
        for name, buf in method.model.named_buffers()
        if "frozen" in name and buf.numel()
    }


def test_expert_origins_come_from_the_method_that_grew_them():
    method, stream = make(experts_per_experience=2)
    for exp in stream.experiences:
        method.before_experience(exp)
    assert method.expert_origins() == [0, 0, 0, 0, 1, 1, 2, 2]
    # A method that does not grow: every expert is experience 0's.
    moe = MoESettings(blocks=[0], n_experts=4)
    assert ContinualMethod(ResidualMLP([1, 4, 4], 4, moe=moe)).expert_origins() == [0, 0, 0, 0]
    assert ContinualMethod(ResidualMLP([1, 4, 4], 4)).expert_origins() == []


def test_growth_freezing_and_teacher_sharing_over_three_experiences():
    method, stream = make(experts_per_experience=2)
    snapshots = []
    for exp in stream.experiences:
        method.before_experience(exp)
        layers = moe_layers(method.model)
        n = 4 + 2 * exp.index
        assert all(layer.n_experts == n for layer in layers.values())
        if exp.index:
            assert all(layer.n_frozen == n - 2 for layer in layers.values())
            # the teacher's frozen banks are the student's tensors, not copies
            for name, layer in layers.items():
                twin = method.teacher.get_submodule(name)
                assert twin.n_experts == n - 2
                assert twin.experts.w1_frozen.data_ptr() == layer.experts.w1_frozen.data_ptr()
                assert twin.router is not layer.router
            # outside the module tree: not in the state, not a module "in eval mode" to Lightning
            assert not any(n.startswith("teacher") for n, _ in method.named_modules())
            assert not any(k.startswith("teacher") for k in method.state_dict())
            optimizer = method.configure_optimizers()
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            frozen_ids = {id(b) for b in method.model.buffers()}
            assert not in_optimizer & frozen_ids
        fit(method, exp)
        snapshots.append(frozen_state(method))
    # everything frozen before experience 2 is bit-identical after training on it
    for name, value in snapshots[1].items():
        assert torch.equal(snapshots[2][name][: value.shape[0]], value), name


def test_kd_is_zero_at_the_first_step_while_new_experts_are_masked():
    for freeze_shared in (False, True):
        method, stream = make(experts_per_experience=2, freeze_shared=freeze_shared)
        method.before_experience(stream.experiences[0])
        fit(method, stream.experiences[0])
        method.before_experience(stream.experiences[1])
        x = stream.experiences[1].train.tensors[0][:32]
        old = torch.arange(6) < 4
        method.model.eval()
        student = method.model(x, expert_mask=old)[0]
        teacher = method.teacher_logits(x)
        assert teacher is not None
        assert distillation(student, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
        # unmasked, the new experts change the output and the KD term is live
        assert distillation(method.model(x)[0], teacher, 2.0).item() > 0


def test_freeze_shared_makes_no_copy_and_trains_only_new_experts():
    method, stream = make(experts_per_experience=1, freeze_shared=True)
    method.before_experience(stream.experiences[0])
    fit(method, stream.experiences[0])
    method.before_experience(stream.experiences[1])
    assert method.teacher is None and method.teacher_mask.tolist() == [True] * 4 + [False]
    trainable = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".experts." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    fit(method, stream.experiences[1])
    for n, p in method.model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n


def test_validation():
    with pytest.raises(ConfigError, match="experts_per_experience=-1"):
        make(experts_per_experience=-1)
    with pytest.raises(ConfigError, match="MoE"):
        LifelongMoE(ResidualMLP([1, 4, 4], 4, moe=MoESettings(enabled=False)))


def test_task_aware_routing_sends_each_task_to_its_own_experts():
    method, stream = make(task_labels=True, experts_per_experience=2, task_aware_routing=True)
    for exp in stream.experiences[:2]:
        method.before_experience(exp)
        fit(method, exp)
    assert method.expert_origin == [0, 0, 0, 0, 1, 1]
    x = stream.experiences[1].test.tensors[0][:16]
    mask = method.expert_mask(stream.experiences[1])
    assert mask.tolist() == [False] * 4 + [True] * 2
    _, aux = method.model(x, expert_mask=mask)
    for a in aux:
        assert a.tokens_per_expert[:4].sum() == 0 and a.tokens_per_expert[4:].sum() == 2 * 16
    assert method.expert_mask(stream.experiences[2]) is None  # no experts grown for it yet


def test_task_aware_routing_needs_task_labels():
    with pytest.raises(ConfigError, match="task_labels"):
        make(experts_per_experience=2, task_aware_routing=True)
