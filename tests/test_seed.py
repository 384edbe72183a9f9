"""SEED: expert selection by least overlap, the Bayes ensemble against a hand computation,
which parts train at each experience, input checks, checkpoints that reload as the trained
ensemble, and one CLI run read back from MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from lifelong_moe import names
from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation.evaluate import evaluate
from lifelong_moe.methods.seed import Seed, fit_gaussian, gaussian, overlap_score, select_expert
from lifelong_moe.models import load_model, save_model
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.models.params import count_parameters
from lifelong_moe.models.seed_ensemble import bayes_log_probs
from lifelong_moe.models.vit import PatchTransformer
from lifelong_moe.stream import Experience, Stream
from tests.conftest import FAST, artifact_json, benchmark_from_yaml, run_cli, runs, store_uri


def test_overlap_is_the_mean_pairwise_kl():
    # isotropic unit Gaussians: KL(N(a, I) || N(b, I)) = |a - b|^2 / 2
    means = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    covs = torch.eye(2, dtype=torch.float64).repeat(2, 1, 1)
    # 2x2 matrix with zeros on the diagonal and 25 / 2 off it
    assert float(overlap_score(means, covs)) == pytest.approx(2 * 12.5 / 4)


def test_selection_picks_the_expert_whose_new_classes_overlap_least():
    eye = torch.eye(2, dtype=torch.float64).repeat(2, 1, 1)
    overlapping = (torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64), eye)
    separated = (torch.tensor([[0.0, 0.0], [6.0, 0.0]], dtype=torch.float64), eye)
    wide = (separated[0], 50 * eye)  # same means, but broad Gaussians: they overlap again
    k, scores = select_expert([overlapping, separated, wide])
    assert k == 1
    assert scores[1] > scores[2] > scores[0]


def normal_logpdf(x: float, mean: float, var: float) -> float:
    return -0.5 * (math.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def test_bayes_ensemble_equals_the_hand_computed_decision():
    # K=2 experts, C=3 classes, 1-d features. Expert 0 knows classes 0, 1; expert 1 knows 1, 2.
    means = torch.tensor([[[0.0], [2.0], [0.0]], [[0.0], [-1.0], [1.0]]], dtype=torch.float64)
    variances = [[1.0, 0.5, 1.0], [1.0, 1.0, 2.0]]
    covs = torch.tensor(variances, dtype=torch.float64).view(2, 3, 1, 1)
    present = torch.tensor([[True, True, False], [False, True, True]])
    f0, f1 = 1.2, 0.4  # the two experts' features of one input
    tau = 3.0
    out = bayes_log_probs([torch.tensor([[f0]]), torch.tensor([[f1]])], means, covs, present, tau)

    def softmax(values):
        e = [math.exp(v / tau) for v in values]
        return [v / sum(e) for v in e]

    p0 = softmax([normal_logpdf(f0, 0.0, 1.0), normal_logpdf(f0, 2.0, 0.5)])  # classes 0, 1
    p1 = softmax([normal_logpdf(f1, -1.0, 1.0), normal_logpdf(f1, 1.0, 2.0)])  # classes 1, 2
    expected = [p0[0] / 1, (p0[1] + p1[0]) / 2, p1[1] / 1]
    assert out.exp()[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert int(out.argmax()) == max(range(3), key=lambda c: expected[c])


def test_fit_gaussian_adds_shrinkage_to_the_sample_covariance():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    mean, cov = fit_gaussian(x, shrinkage=0.5)
    assert mean.tolist() == [2.0, 1.0]
    assert cov.tolist() == [[4.5, 0.0], [0.0, 0.5]]


def test_original_shrinkage_is_raised_tenfold_while_the_covariance_is_singular():
    # Rank 1 at a scale of 1e9: cov + 1e-8 I is singular in float64 (round-off of the large
    # entries is far above 1e-8), so eps goes up by powers of ten until Cholesky succeeds.
    x = torch.tensor([[0.0, 0.0, 0.0], [1e9, 1e9, 1e9]])
    mean, cov, eps = gaussian(x, shrinkage=1e-8)
    assert eps > 1e-8 and math.log10(eps / 1e-8) == pytest.approx(round(math.log10(eps / 1e-8)))
    assert torch.linalg.cholesky_ex(cov).info == 0
    # a well-conditioned covariance keeps the eps it was given
    y = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 1.0]])
    assert gaussian(y, shrinkage=1e-8)[2] == 1e-8


def test_active_parameters_count_every_expert_that_predicts():
    stream = class_stream()
    method = Seed(mlp(), n_experts=2, shrinkage=1e-8)
    method.setup_stream(stream)
    m = method.ensemble
    stem = sum(p.numel() for p in m.stem.parameters())
    expert = sum(p.numel() for p in m.experts[0].parameters())
    assert count_parameters(m)["active"] == stem  # nothing fitted: the stem alone runs
    for exp, n_experts in zip(stream.experiences, (1, 2, 2), strict=True):
        method.before_experience(exp)
        fit(method, exp)
        counts = count_parameters(m)
        assert counts["active"] == stem + n_experts * expert
        assert counts["total"] == stem + 2 * expert  # the throw-away head is gone
    assert method.evaluation_metrics(2)["train/shrinkage_max"] >= 1e-8


def class_stream(n_experiences: int = 3, per_class: int = 30) -> Stream:
    g = torch.Generator().manual_seed(0)
    experiences = []
    for i in range(n_experiences):
        classes = [2 * i, 2 * i + 1]
        y = torch.tensor(classes).repeat_interleave(per_class)
        x = torch.randn(len(y), 1, 4, 4, generator=g) + 2 * y.view(-1, 1, 1, 1).float()
        data = TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))
        experiences.append(Experience(i, data, data, classes=classes))
    return Stream("tiny", experiences, 2 * n_experiences, (1, 4, 4), "class_incremental")


MLP_CFG = {
    "_target_": "lifelong_moe.models.mlp.ResidualMLP",
    "d_model": 8,
    "d_hidden": 8,
    "n_blocks": 2,
}


def mlp(n_classes: int = 6) -> ResidualMLP:
    torch.manual_seed(0)
    return ResidualMLP([1, 4, 4], n_classes, d_model=8, d_hidden=8, n_blocks=2)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def fit(method: Seed, exp: Experience) -> None:
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = DataLoader(method.train_dataset(exp), batch_size=16, shuffle=True)
    method.fit_experience(exp, loader, trainer)


def test_each_experience_trains_only_its_expert_and_fits_gaussians():
    stream = class_stream()
    method = Seed(mlp(), n_experts=2, shrinkage=0.1)
    method.setup_stream(stream)
    m = method.ensemble
    for exp in stream.experiences:
        stem, experts = snapshot(m.stem), [snapshot(e) for e in m.experts]
        method.before_experience(exp)
        fit(method, exp)
        k = method.chosen[-1]
        assert same(snapshot(m.stem), stem) == (exp.index > 0)  # shared part: experience 0 only
        for j, before in enumerate(experts):
            if j != k and not (exp.index == 1 and j == 1):  # expert 1 starts as expert 0's copy
                assert same(snapshot(m.experts[j]), before)
        assert not same(snapshot(m.experts[k]), experts[k])
        # Gaussians of this experience's classes in every expert that exists by now
        for j in range(min(exp.index + 1, 2)):
            assert m.present[j, exp.classes].all()
    assert method.chosen[:2] == [0, 1]
    assert len(method.overlaps) == 1 and method.chosen[2] == max(
        (0, 1), key=lambda j: method.overlaps[0][j]
    )
    assert m.present.tolist() == [[True] * 6, [False, False, True, True, True, True]]
    m.eval()
    x, y = stream.experiences[0].test.tensors[:2]
    logits, aux = m(x)
    assert logits.shape == (len(x), 6) and aux == [] and torch.isfinite(logits).all()
    assert (logits.argmax(1) == y).float().mean() > 0.5  # separable toy data, no task label


def test_saved_ensemble_reloads_with_identical_predictions(tmp_path: Path):
    stream = class_stream()
    method = Seed(mlp(), n_experts=2, shared_blocks=1, tau=2.0)
    method.setup_stream(stream)
    for exp in stream.experiences:
        method.before_experience(exp)
        fit(method, exp)
    path = tmp_path / "seed.pt"
    save_model(method.ensemble, MLP_CFG, path, input_shape=[1, 4, 4], n_classes=6)
    reloaded = load_model(path)
    assert type(reloaded) is type(method.ensemble)
    assert reloaded.get_config() == method.ensemble.get_config()
    assert torch.equal(reloaded.present, method.ensemble.present)
    x = torch.cat([e.test.tensors[0] for e in stream.experiences])
    method.ensemble.eval(), reloaded.eval()
    assert torch.equal(reloaded(x)[0], method.ensemble(x)[0])
    # A file can only name a wrapper from the fixed table, never an importable class of its own.
    saved = torch.load(path, weights_only=True)
    saved["wrapper"]["name"] = "os.system"
    torch.save(saved, path)
    with pytest.raises(ValueError, match="unknown model wrapper 'os.system'; known: seed"):
        load_model(path)


def test_vit_backbone_splits_into_stem_and_experts():
    torch.manual_seed(0)
    vit = PatchTransformer([1, 4, 4], 4, patch_size=2, d_model=8, d_hidden=8, n_heads=2, n_blocks=2)
    method = Seed(vit, n_experts=2, shared_blocks=1)
    m = method.ensemble
    assert len(m.stem.blocks) == 1 and len(m.experts[0].blocks) == 1
    assert m.features(torch.randn(3, 1, 4, 4), 1).shape == (3, 8)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match="method.n_experts=0"):
        Seed(mlp(), n_experts=0)
    with pytest.raises(
        ConfigError, match=r"method.shared_blocks=2: expected an integer in \[0, 1\]"
    ):
        Seed(mlp(), shared_blocks=2)
    with pytest.raises(ConfigError, match="method.alpha=1"):
        Seed(mlp(), alpha=1.0)
    domain = class_stream()
    domain.scenario = "domain_incremental"
    with pytest.raises(ConfigError, match="is domain_incremental"):
        Seed(mlp()).setup_stream(domain)
    reused = class_stream()
    reused.experiences[1].classes = [0, 1]  # task-IL relabelling: every task uses labels 0, 1
    with pytest.raises(ConfigError, match="disjoint classes"):
        Seed(mlp()).setup_stream(reused)


def test_cli_run_of_seed_read_back_from_mlflow(tmp_path: Path):
    uri = store_uri(tmp_path)
    result = run_cli(
        tmp_path,
        "method=seed",
        "method.n_experts=2",
        "benchmark.n_experiences=5",
        "model.d_model=32",
        "model.d_hidden=32",
        *FAST,
        f"tracking.uri={uri}",
    )
    (run,) = runs(uri)
    assert run.data.tags["method"] == "seed"
    assert run.data.params["method.n_experts"] == "2"
    assert "[5/5] Seed" in result.stdout
    final = run.data.metrics["acc/final"]
    assert 0.5 < final <= 1  # class-IL over 10 digits without exemplars or task labels
    assert run.data.metrics["acc/forgetting"] < 0.3
    assert "train/loss" in run.data.metrics


def test_logged_checkpoints_reload_as_the_ensemble_that_was_evaluated(tmp_path: Path):
    """Every experience's logged checkpoint, reloaded, scores exactly the accuracy row the run
    logged after that experience: the experts and their class Gaussians come back."""
    uri = store_uri(tmp_path)
    run_cli(
        tmp_path,
        "method=seed",
        "method.n_experts=2",
        "benchmark=split_digits",
        "benchmark.n_experiences=5",
        "model.d_model=32",
        "model.d_hidden=32",
        *[a for a in FAST if not a.startswith("tracking.log_checkpoints")],
        "tracking.log_checkpoints=true",
        f"tracking.uri={uri}",
    )
    (run,) = runs(uri)
    R = artifact_json(uri, run.info.run_id, names.ACCURACY_MATRIX)["R"]
    folder = Path(MlflowClient(uri).download_artifacts(run.info.run_id, names.CHECKPOINTS))
    stream = benchmark_from_yaml("split_digits", seed=0, n_experiences=5)
    batch = int(run.data.params["trainer.eval_batch_size"])
    for i, row in enumerate(R):
        model = load_model(folder / f"model_exp_{i}.pt")
        assert int(model.present.any(1).sum()) == min(i + 1, 2)  # experts with Gaussians
        assert evaluate(model, stream, batch_size=batch).accuracy == row
