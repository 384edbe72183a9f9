"""method=dense_heads: the dense peer of lifelong_moe_specialized given the same side information
(issue 24): one head per experience, chosen at test time by the same inferred experience."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from lifelong_moe.data.text import VOCAB_SIZE
from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation.evaluate import forward
from lifelong_moe.methods.dense_heads import DenseHeads
from lifelong_moe.models import count_parameters, load_model, save_model
from lifelong_moe.models.checkpoint import model_payload, restore_model
from lifelong_moe.models.experience_heads import ExperienceHeads
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.moe import MoESettings
from lifelong_moe.stream import Experience, Stream
from tests.conftest import TINY_RUN, artifact_json, run_cli, runs, store_uri
from tests.test_lm import TINY

N_CLASSES, D_MODEL = 4, 16


def separable_stream(n_experiences: int = 3) -> Stream:
    """Experience i's inputs are centred on 10 * i: any input's experience is obvious."""
    g = torch.Generator().manual_seed(0)
    experiences = []
    for i in range(n_experiences):
        x = torch.randn(64, 1, 4, 4, generator=g) + 10 * i
        y = torch.randint(0, N_CLASSES, (64,), generator=g)
        data = TensorDataset(x, y, torch.zeros(64, dtype=torch.long))
        experiences.append(Experience(i, data, data, classes=list(range(N_CLASSES))))
    return Stream("separable", experiences, N_CLASSES, (1, 4, 4), "domain_incremental", False)


def make(**kwargs) -> tuple[DenseHeads, Stream]:
    torch.manual_seed(0)
    model = ResidualMLP([1, 4, 4], N_CLASSES, d_model=D_MODEL, d_hidden=8, moe=None)
    method = DenseHeads(model, **kwargs)
    stream = separable_stream()
    method.setup_stream(stream)
    return method, stream


def train(method: DenseHeads, exp: Experience) -> None:
    """What the runner does for one experience, short of evaluation and logging."""
    method.before_experience(exp)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = DataLoader(method.train_dataset(exp), batch_size=32, shuffle=True)
    method.fit_experience(exp, loader, trainer)


def trained(**kwargs) -> tuple[DenseHeads, Stream]:
    method, stream = make(**kwargs)
    for exp in stream.experiences:
        train(method, exp)
    method.model.eval()
    return method, stream


@pytest.mark.parametrize(
    ("source", "expected_head"),
    [("statistics", 0), ("oracle", 2), ("shuffled", 1)],
)
def test_each_source_picks_its_head(source, expected_head):
    """Experience 0's inputs evaluated as test experience 2 (the evaluator's path): the statistics
    name experience 0, the oracle the true label 2, shuffled labels the wrong 0 + 1."""
    method, stream = trained(infer_source=source)
    x = stream.experiences[0].test.tensors[0]
    with torch.no_grad():
        logits, _ = forward(method.model, x, method.expert_mask(stream.experiences[2]))
        features, _ = method.model.backbone(x)
        by_head = [head(features) for head in method.model.heads]
    torch.testing.assert_close(logits, by_head[expected_head], rtol=0, atol=0)
    others = [k for k in range(3) if k != expected_head]
    assert all(not torch.equal(logits, by_head[k]) for k in others)


def test_the_oracle_uses_each_test_experiences_own_head_and_the_newest_for_future_ones():
    method, stream = make(infer_source="oracle")
    train(method, stream.experiences[0])
    train(method, stream.experiences[1])
    method.model.eval()
    heads = [method.expert_mask(exp).float().argmax().item() for exp in stream.experiences]
    assert heads == [0, 1, 1]


def test_earlier_heads_stay_bit_identical_while_the_trunk_keeps_training():
    method, stream = make(weight_decay=0.1)  # weight decay would move any head it reached
    train(method, stream.experiences[0])
    head_0 = {k: v.clone() for k, v in method.model.heads[0].state_dict().items()}
    trunk = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    train(method, stream.experiences[1])
    head_1 = {k: v.clone() for k, v in method.model.heads[1].state_dict().items()}
    train(method, stream.experiences[2])
    for frozen, head in ((head_0, method.model.heads[0]), (head_1, method.model.heads[1])):
        for name, value in head.state_dict().items():
            assert torch.equal(value, frozen[name]), name
    assert not method.model.heads[0].weight.requires_grad
    assert method.model.heads[2].weight.requires_grad
    # naive's trunk: it trained on every experience (same training as the naive peer)
    assert not torch.equal(method.model.backbone.embed.weight, trunk["embed.weight"])
    assert not torch.equal(method.model.heads[2].weight, method.model.heads[1].weight)


@pytest.mark.parametrize(("source", "expected"), [("statistics", 1.0), ("shuffled", 0.0)])
def test_inference_accuracy_on_separable_experiences(source, expected):
    method, _ = trained(infer_source=source)
    out = method.evaluation_metrics(2)
    assert out["routing/inference_acc"] == expected
    assert [out[f"routing/inference_acc/exp_{j}"] for j in range(3)] == [expected] * 3


def test_costs_count_every_head_and_one_active():
    method, _ = trained()
    counts = count_parameters(method.model)
    head = D_MODEL * N_CLASSES + N_CLASSES
    trunk = sum(p.numel() for p in method.model.backbone.parameters())
    assert counts == {"total": trunk + 3 * head, "trainable": trunk + head, "active": trunk + head}


def test_a_saved_model_and_a_resumed_run_get_every_head_back(tmp_path):
    method, stream = trained()
    x = stream.experiences[1].test.tensors[0]
    mask = method.head_mask(x)
    with torch.no_grad():
        expected = method.model(x)[0]  # through the inferred choice
    save_model(method.model, {"_target_": "lifelong_moe.models.mlp.ResidualMLP", "moe": False,
               "d_model": D_MODEL, "d_hidden": 8}, tmp_path / "m.pt",
               input_shape=[1, 4, 4], n_classes=N_CLASSES)  # fmt: skip
    loaded = load_model(tmp_path / "m.pt").eval()
    assert isinstance(loaded, ExperienceHeads) and len(loaded.heads) == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, expert_mask=mask)[0], expected, rtol=0, atol=0)
    # resume: a fresh one-head model takes the saved state and keeps the old heads frozen
    fresh, _ = make()
    restore_model(fresh.model, model_payload(method.model))
    assert len(fresh.model.heads) == 3
    assert [h.weight.requires_grad for h in fresh.model.heads] == [False, False, True]


def test_an_moe_backbone_is_refused_in_one_line():
    model = ResidualMLP(
        [1, 4, 4], N_CLASSES, d_model=D_MODEL, d_hidden=8, moe=MoESettings(blocks=[0])
    )
    with pytest.raises(ConfigError, match="model=mlp") as error:
        DenseHeads(model)
    assert "\n" not in str(error.value)
    plain = ResidualMLP([1, 4, 4], N_CLASSES, d_model=D_MODEL, d_hidden=8)
    with pytest.raises(ConfigError, match="method.head_init"):
        DenseHeads(plain, head_init="zeros")


TINY_TEXT = [
    "experiment=lm_cpu",
    "model=lm",
    "benchmark.domains=[yaml,python]",
    "benchmark.max_bytes_per_domain=6144",
    "trainer.max_epochs=1",
    "trainer.batch_size=16",
    "trainer.progress_bar=false",
    "tracking.log_checkpoints=false",
    *[f"model.{k}={v}" for k, v in TINY.items()],
    "model.moe_blocks=[1]",  # the MoE twin's blocks: its dense FFNs are twice as wide
]


@pytest.mark.parametrize(
    ("args", "n_classes"),
    [
        ([*TINY_RUN], 10),
        ([*TINY_RUN, "benchmark=permuted_digits"], 10),
        (TINY_TEXT, VOCAB_SIZE),
    ],
    ids=["split_digits", "permuted_digits", "text_domains"],
)
def test_cli_runs_it_and_mlflow_holds_its_metrics(workdir, args, n_classes):
    uri = store_uri(workdir)
    run_cli(workdir, "method=dense_heads", *args, f"tracking.uri={uri}")
    (run,) = runs(uri, "lm" if "experiment=lm_cpu" in args else "lifelong-moe")
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "dense_heads"
    metrics = run.data.metrics
    assert 0.0 <= metrics["routing/inference_acc"] <= 1.0
    assert {"routing/inference_acc/exp_0", "routing/inference_acc/exp_1"} <= set(metrics)
    # two experiences: the second adds one head (d_model 32); one head is active per input
    client = MlflowClient(uri)
    total = [m.value for m in client.get_metric_history(run.info.run_id, "cost/params_total")]
    assert total[0] == metrics["cost/params_active"]
    assert total[1] - total[0] == 32 * n_classes + n_classes


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(workdir, monkeypatch):
    """The resumed run gets its heads (frozen as they were) and its statistics back."""
    args = [*TINY_RUN, "benchmark=permuted_digits", "benchmark.n_experiences=3",
            "method=dense_heads", "seed=3"]  # fmt: skip
    (workdir / "reference").mkdir()
    reference_uri = store_uri(workdir / "reference")
    run_cli(workdir, f"tracking.uri={reference_uri}", *args)
    (reference,) = runs(reference_uri)
    uri = store_uri(workdir)
    monkeypatch.setenv("LIFELONG_MOE_SIGNAL_AT", "train_step:2:3=SIGKILL")
    killed = run_cli(workdir, f"tracking.uri={uri}", *args, check=False)
    monkeypatch.delenv("LIFELONG_MOE_SIGNAL_AT")
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_cli(workdir, f"tracking.uri={uri}", "resume=last")
    (resumed,) = runs(uri)
    assert resumed.info.status == "FINISHED"
    for key in ("acc/final", "acc/forgetting", "routing/inference_acc", "cost/params_total"):
        assert resumed.data.metrics[key] == reference.data.metrics[key], key
    expected = artifact_json(reference_uri, reference.info.run_id, "accuracy_matrix.json")
    assert artifact_json(uri, resumed.info.run_id, "accuracy_matrix.json")["R"] == expected["R"]
