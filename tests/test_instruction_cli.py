"""benchmark=instruction_domains end to end: the real CLI on two tiny instruction domains, read
back from MLflow, gives the exact-match and response-loss forgetting matrices; each row is what
the logged model of that experience scores on the held-out examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.data.instructions import instruction_domains
from lifelong_moe.evaluation.evaluate_lm import evaluate_lm
from lifelong_moe.models import load_model
from tests.conftest import artifact_json, run_cli, runs, store_uri

# One answer per domain, learnt in a few steps: the second domain's answer overwrites the first.
DOMAINS = {
    "yes": [
        {"prompt": f"is {a} < {a + b}?", "response": "y"} for a in range(6) for b in range(1, 6)
    ],
    "no": [
        {"prompt": f"is {a + b} < {a}?", "response": "n"} for a in range(5) for b in range(1, 6)
    ],
}
ARGS = [
    "benchmark=instruction_domains",
    "benchmark.domains=[yes,no]",
    "benchmark.context_length=16",
    "benchmark.val_fraction=0.2",
    "model=moe_lm",
    "model.d_model=16",
    "model.d_hidden=16",
    "model.n_heads=2",
    "model.n_blocks=2",
    "model.moe_blocks=[1]",
    "method=naive",
    "method.lr=0.01",
    "trainer.max_epochs=4",
    "trainer.batch_size=8",
    "trainer.progress_bar=false",
    "tracking.log_checkpoints=true",
]


def write_domains(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, examples in DOMAINS.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    return root


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    assert [m.step for m in points] == list(range(len(points))), key
    return [m.value for m in points]


def matrix(client: MlflowClient, run_id: str, family: str, n: int = 2) -> list[list[float]]:
    """M[i][j] = <family>/exp_j at step i."""
    columns = [history(client, run_id, names.exp_metric(family, j)) for j in range(n)]
    assert all(len(c) == n for c in columns), family
    return [[columns[j][i] for j in range(n)] for i in range(n)]


@pytest.mark.slow
def test_cli_instruction_run_gives_exact_match_and_loss_matrices(tmp_path: Path) -> None:
    text = write_domains(tmp_path / "text")
    uri = store_uri(tmp_path)
    run_cli(tmp_path, f"tracking.uri={uri}", f"benchmark.text_dir={text}", *ARGS)
    (run,) = runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["benchmark.name"] == "instruction_domains"
    client, run_id = MlflowClient(uri), run.info.run_id

    # rows: R[i][j] = acc/exp_j at step i (exact match), L[i][j] = loss/exp_j at step i
    R = matrix(client, run_id, names.ACC)
    L = matrix(client, run_id, names.LOSS)
    assert artifact_json(uri, run_id, "accuracy_matrix.json")["R"] == R

    # each row is what that experience's model scores: exact match per held-out example
    stream = instruction_domains(
        str(text), ["yes", "no"], context_length=16, val_fraction=0.2, seed=0
    )
    held = [len(e.test) for e in stream.experiences]
    assert held == [6, 5]
    for i in range(2):
        local = client.download_artifacts(run_id, f"{names.CHECKPOINTS}/model_exp_{i}.pt")
        scored = evaluate_lm(load_model(local).eval(), stream)
        assert scored.accuracy == pytest.approx(R[i], abs=1e-12)
        assert scored.loss == pytest.approx(L[i], rel=1e-5)
        for j in range(2):
            assert round(R[i][j] * held[j]) == pytest.approx(R[i][j] * held[j])

    # naive training on "no" overwrites "yes" (this seed: R = [[1, 0], [0, 1]]), and the
    # forgetting metrics come from that matrix (Chaudhry: max over earlier rows minus last)
    assert R[0][0] > R[1][0] and R[1][1] > R[0][1]
    forgetting = client.get_metric_history(run_id, names.ACC_FORGETTING)
    assert forgetting[-1].value == pytest.approx(R[0][0] - R[1][0])
    (bwt,) = client.get_metric_history(run_id, names.LOSS_BWT)
    assert bwt.value == pytest.approx(L[1][0] - L[0][0]) and bwt.value > 0
