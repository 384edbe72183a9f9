"""EWC, LwF and replay: the mechanics on a tiny stream, then one real CLI run of each."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.distillation import distillation
from lifelong_moe.methods.ewc import EWC
from lifelong_moe.methods.lifelong_moe import LifelongMoE
from lifelong_moe.methods.lwf import LwF
from lifelong_moe.methods.naive import Naive
from lifelong_moe.methods.replay import Replay
from lifelong_moe.methods.replay_buffer import ReplayBuffer, balanced_quotas
from lifelong_moe.models import moe_layers
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.moe import MoESettings
from lifelong_moe.stream import Experience, Stream
from tests.conftest import artifact_json, run_cli, runs, store_uri


def class_stream(n_experiences: int = 2, per_class: int = 24) -> Stream:
    """Class-incremental: two new classes per experience, one shared 4-way head."""
    g = torch.Generator().manual_seed(0)
    experiences = []
    for i in range(n_experiences):
        classes = [2 * i, 2 * i + 1]
        y = torch.tensor(classes).repeat_interleave(per_class)
        x = torch.randn(len(y), 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float()
        data = TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))
        experiences.append(Experience(i, data, data, classes=classes))
    return Stream("tiny", experiences, 2 * n_experiences, (1, 4, 4), "class_incremental")


def model(moe: bool = False, n_classes: int = 4) -> ResidualMLP:
    torch.manual_seed(0)
    settings = MoESettings(enabled=moe, blocks=[0])
    return ResidualMLP([1, 4, 4], n_classes, d_model=16, d_hidden=8, moe=settings)


def fit(method: ContinualMethod, exp: Experience, epochs: int = 2) -> None:
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = DataLoader(
        method.train_dataset(exp), batch_size=16, shuffle=True, generator=torch.Generator()
    )
    trainer.fit(method, loader)


def run_stream(method: ContinualMethod, stream: Stream) -> None:
    method.setup_stream(stream)
    for exp in stream.experiences:
        method.before_experience(exp)
        fit(method, exp)
        method.after_experience(exp)


# -- EWC -----------------------------------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_distance():
    stream = class_stream()
    method = EWC(model(), lambda_ewc=1.0)
    method.setup_stream(stream)
    exp = stream.experiences[0]
    method.before_experience(exp)
    fit(method, exp)
    method.after_experience(exp)
    assert method.fisher and all((f >= 0).all() for f in method.fisher.values())
    assert sum(f.sum() for f in method.fisher.values()) > 0
    assert method.penalty().item() == 0.0
    direction = {n: torch.randn_like(p) for n, p in method.model.named_parameters()}
    values = []
    for scale in (0.01, 0.1, 1.0):
        with torch.no_grad():
            for n, p in method.model.named_parameters():
                p.copy_(method.anchor[n] + scale * direction[n])
        values.append(method.penalty().item())
    assert 0 < values[0] < values[1] < values[2]
    # quadratic: ten times the distance, a hundred times the penalty
    assert values[2] / values[1] == pytest.approx(100, rel=1e-3)
    loss = method.extra_loss(None, None, None, [])["ewc"]
    assert loss.item() == pytest.approx(0.5 * values[2], rel=1e-5)


def test_ewc_online_fisher_decays_and_holds_the_weights():
    stream = class_stream()
    gamma = 0.5
    method = EWC(model(), lambda_ewc=1e4, gamma=gamma)
    method.setup_stream(stream)
    first = stream.experiences[0]
    method.before_experience(first)
    fit(method, first)
    method.after_experience(first)
    f1 = {n: f.clone() for n, f in method.fisher.items()}
    anchor = {n: a.clone() for n, a in method.anchor.items()}

    second = stream.experiences[1]
    method.before_experience(second)
    fit(method, second)
    pulled = sum(((p - anchor[n]) ** 2).sum() for n, p in method.model.named_parameters())
    f2 = method.estimate_fisher(second.train)
    method.after_experience(second)
    for n, f in method.fisher.items():
        torch.testing.assert_close(f, gamma * f1[n] + f2[n])

    free = Naive(model())
    with torch.no_grad():
        for n, p in free.model.named_parameters():
            p.copy_(anchor[n])
    free.before_experience(second)
    fit(free, second)
    moved = sum(((p - anchor[n]) ** 2).sum() for n, p in free.model.named_parameters())
    assert pulled < 0.5 * moved


def test_ewc_skips_parameters_whose_shape_changed():
    stream = class_stream()
    method = EWC(model(moe=True), lambda_ewc=1.0)
    method.setup_stream(stream)
    exp = stream.experiences[0]
    method.before_experience(exp)
    fit(method, exp, epochs=1)
    method.after_experience(exp)
    (layer,) = moe_layers(method.model).values()
    layer.freeze_existing()
    layer.expand(2)
    shapes = {n: p.shape for n, p in method.model.named_parameters()}
    changed = [n for n, f in method.fisher.items() if shapes.get(n) != f.shape]
    assert changed, "growth must change the expert parameters"
    assert method.penalty().item() == 0.0  # unchanged ones sit at the anchor
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.1)
    assert method.penalty().item() > 0
    method.before_experience(stream.experiences[1])
    fit(method, stream.experiences[1], epochs=1)
    method.after_experience(stream.experiences[1])
    assert {n: f.shape for n, f in method.fisher.items()} == {
        n: p.shape for n, p in method.model.named_parameters() if p.requires_grad
    }


def test_ewc_state_round_trip_and_validation():
    stream = class_stream()
    method = EWC(model(), lambda_ewc=3.0, replay_buffer_size=8)
    run_stream(method, stream)
    state = method.method_state()
    other = EWC(model(), lambda_ewc=3.0, replay_buffer_size=8)
    other.load_method_state(state)
    other.model.load_state_dict(method.model.state_dict())
    assert other.penalty().item() == pytest.approx(method.penalty().item())
    assert torch.equal(other.replay.x, method.replay.x)
    for bad, match in (
        ({"lambda_ewc": -1}, "lambda_ewc=-1"),
        ({"gamma": 0}, "gamma=0"),
        ({"fisher_batch_size": 0}, "fisher_batch_size=0"),
    ):
        with pytest.raises(ConfigError, match=match):
            EWC(model(), **bad)


# -- LwF -----------------------------------------------------------------------------------------
def test_lwf_snapshots_the_previous_model_and_distills_old_classes_only():
    stream = class_stream()
    method = LwF(model(), lambda_kd=1.0, temperature=2.0)
    method.setup_stream(stream)
    first, second = stream.experiences
    method.before_experience(first)
    assert method.teacher is None
    fit(method, first)
    method.after_experience(first)
    x = second.train.tensors[0][:16]
    before = method.model(x)[0].detach()

    method.before_experience(second)
    teacher = method.teacher
    assert teacher is not None and teacher is not method.model
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(n.startswith("teacher") for n, _ in method.named_modules())
    assert method.old_classes.tolist() == [0, 1]
    torch.testing.assert_close(teacher(x)[0], before)
    # the student starts as the teacher: nothing to distill yet
    y = second.train.tensors[1][:16]
    assert method.extra_loss(x, y, method.model(x)[0], [])["kd"].item() == pytest.approx(0)
    snapshot = {n: p.clone() for n, p in teacher.named_parameters()}
    fit(method, second)
    for n, p in teacher.named_parameters():
        assert torch.equal(p, snapshot[n]), n
    after = method.model(x)[0]
    assert not torch.allclose(after, before)
    # only logits of classes 0 and 1 enter the KD term
    shifted = after.detach().clone()
    shifted[:, 2:] += 5.0
    kd = method.extra_loss(x, y, shifted, [])["kd"]
    expected = distillation(after[:, :2], teacher(x)[0][:, :2], 2.0)
    assert kd.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lwf_validation():
    with pytest.raises(ConfigError, match="lambda_kd=-1"):
        LwF(model(), lambda_kd=-1)
    with pytest.raises(ConfigError, match="temperature=0"):
        LwF(model(), temperature=0)


# -- the class-balanced reservoir ----------------------------------------------------------------
def labelled(labels: list[int], offset: float = 0.0) -> TensorDataset:
    y = torch.tensor(labels)
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1) + offset
    return TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))


def test_buffer_keeps_capacity_and_balances_classes():
    buffer = ReplayBuffer(20, seed=0)
    buffer.add(labelled([0] * 50 + [1] * 50))
    assert len(buffer) == 20 and buffer.class_counts() == {0: 10, 1: 10}
    buffer.add(labelled([2] * 50 + [3] * 3 + [4] * 50, offset=1000))
    counts = buffer.class_counts()
    # a small class keeps all it has, the others share the rest evenly
    assert len(buffer) == 20 and counts.pop(3) == 3
    assert sorted(counts.values()) == [4, 4, 4, 5]
    assert sorted(set(buffer.dataset().tensors[1].tolist())) == [0, 1, 2, 3, 4]
    assert balanced_quotas([100, 100, 100], 10) == [3, 3, 4]
    assert balanced_quotas([1, 100], 10) == [1, 9]
    assert balanced_quotas([2, 3], 10) == [2, 3]


def test_buffer_is_seeded_and_a_uniform_sample_of_each_class():
    def fill(seed: int) -> torch.Tensor:
        buffer = ReplayBuffer(8, seed=seed)
        buffer.add(labelled([0] * 100))
        buffer.add(labelled([0] * 100, offset=1000))  # the same class arrives again
        return buffer.x.flatten()

    assert torch.equal(fill(0), fill(0))
    assert not torch.equal(fill(0), fill(1))
    # reservoir: items of the second batch are kept as often as those of the first
    late = np.mean([(fill(s) >= 1000).float().mean().item() for s in range(200)])
    assert late == pytest.approx(0.5, abs=0.05)


def test_buffer_state_resumes_bit_identically():
    a = ReplayBuffer(12, seed=3)
    a.add(labelled([0, 1] * 30))
    b = ReplayBuffer(12, seed=99)
    b.load_state_dict(
        {k: v.clone() if torch.is_tensor(v) else v for k, v in a.state_dict().items()}
    )
    for buffer in (a, b):
        buffer.add(labelled([2, 3] * 30, offset=500))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_buffer_reads_any_dataset_and_sequence_targets():
    lazy = ReplayBuffer(6, seed=0)
    data = labelled([0, 1] * 10)
    lazy.add(torch.utils.data.Subset(data, list(range(20))))
    eager = ReplayBuffer(6, seed=0)
    eager.add(data)
    assert torch.equal(lazy.x, eager.x) and torch.equal(lazy.y, eager.y)
    # language modelling: y is a sequence, there are no classes, one reservoir
    text = ReplayBuffer(5, seed=0)
    tokens = torch.randint(0, 96, (40, 9))
    text.add(TensorDataset(tokens[:, :-1], tokens[:, 1:], torch.zeros(40, dtype=torch.long)))
    assert len(text) == 5 and text.class_counts() == {0: 5} and text.y.shape == (5, 8)


def test_replay_composes_through_the_base_class():
    stream = class_stream()
    torch.manual_seed(0)
    method = Naive(model(), replay_buffer_size=10)
    method.setup_stream(stream)
    first, second = stream.experiences
    method.before_experience(first)
    assert method.train_dataset(first) is first.train
    fit(method, first)
    method.after_experience(first)
    assert method.replay.class_counts() == {0: 5, 1: 5}
    method.before_experience(second)
    data = method.train_dataset(second)
    assert isinstance(data, ConcatDataset) and len(data) == len(second.train) + 10
    fit(method, second)
    method.after_experience(second)  # the buffer takes the experience, not the replay
    assert len(method.replay) == 10 and set(method.replay.class_counts()) == {0, 1, 2, 3}
    assert method.method_state()["replay"]["y"].tolist() == method.replay.y.tolist()
    assert Naive(model()).replay is None and Naive(model()).method_state() == {}
    with pytest.raises(ConfigError, match="replay_buffer_size=-1"):
        Naive(model(), replay_buffer_size=-1)
    with pytest.raises(ConfigError, match="replay_buffer_size=0: expected a positive integer"):
        Replay(model(), replay_buffer_size=0)


def test_replay_composes_with_lifelong_moe():
    stream = class_stream(3)
    method = LifelongMoE(model(moe=True, n_classes=6), experts_per_experience=1)
    method.replay = ReplayBuffer(12, seed=0)
    run_stream(method, stream)
    (layer,) = moe_layers(method.model).values()
    assert layer.n_experts == 4 + 2
    assert method.replay.class_counts() == {c: 2 for c in range(6)}
    assert "replay" in method.method_state()


def test_lifelong_moe_takes_replay_buffer_size_from_config():
    method = LifelongMoE(model(moe=True), replay_buffer_size=16)
    assert method.replay is not None and method.replay.capacity == 16


# -- the real CLI --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_ewc_lwf_replay_and_naive_with_replay(workdir):
    uri = store_uri(workdir)
    common = [
        "benchmark=split_digits",
        f"tracking.uri={uri}",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        "tracking.log_checkpoints=false",
    ]
    run_cli(workdir, "-m", "method=ewc,lwf,replay", *common)
    run_cli(workdir, "method=naive", "method.replay_buffer_size=100", *common)
    found = runs(uri)
    assert [r.data.tags["method"] for r in found] == ["ewc", "lwf", "replay", "naive"]
    for run in found:
        assert run.info.status == "FINISHED"
        R = np.array(artifact_json(uri, run.info.run_id, "accuracy_matrix.json")["R"])
        assert R.shape == (5, 5)
        assert 0 <= run.data.metrics["acc/forgetting"] <= 1
    replay, naive_replay = found[2], found[3]
    assert replay.data.params["method.replay_buffer_size"] == "200"
    assert naive_replay.data.params["method.replay_buffer_size"] == "100"
    # with replay the first classes are still recognised at the end
    R = np.array(artifact_json(uri, replay.info.run_id, "accuracy_matrix.json")["R"])
    assert R[-1, 0] > 0.2


def kill_and_resume(workdir: Path, args: list[str]) -> tuple[list, list]:
    """R of an uninterrupted run, and R of the same run SIGKILLed at experience 3 and resumed."""
    (workdir / "reference").mkdir()
    reference_uri = store_uri(workdir / "reference")
    run_cli(workdir, f"tracking.uri={reference_uri}", *args)
    (reference,) = runs(reference_uri)
    uri = store_uri(workdir)
    # kill -9 at a named point (not by timing), which every method's loop passes
    env = {"LIFELONG_MOE_SIGNAL_AT": "before_experience:3=SIGKILL"}
    killed = run_cli(workdir, f"tracking.uri={uri}", *args, check=False, extra_env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "resuming run" in run_cli(workdir, f"tracking.uri={uri}", "resume=last").stdout
    (resumed,) = runs(uri)
    return (
        artifact_json(reference_uri, reference.info.run_id, "accuracy_matrix.json")["R"],
        artifact_json(uri, resumed.info.run_id, "accuracy_matrix.json")["R"],
    )


@pytest.mark.slow
def test_resumed_ewc_with_replay_matches_uninterrupted(workdir):
    """The Fisher, the anchor and the buffer (with its generator) come back from state.pt."""
    expected, got = kill_and_resume(
        workdir,
        [
            "method=ewc",
            "method.replay_buffer_size=100",
            "trainer.max_epochs=2",
            "trainer.progress_bar=false",
            "tracking.log_checkpoints=false",
            "seed=3",
        ],
    )
    assert got == expected
