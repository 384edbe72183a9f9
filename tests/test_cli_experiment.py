"""The real CLI on split_digits, read back from the real MLflow store."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from lifelong_moe.evaluation import metrics
from tests.conftest import FAST, artifact_json, run_cli, runs, store_uri

pytestmark = pytest.mark.slow


def test_naive_forgets_joint_does_not(workdir):
    uri = store_uri(workdir)
    result = run_cli(
        workdir, "-m", "method=naive,joint", "benchmark=split_digits", f"tracking.uri={uri}", *FAST
    )
    assert "mlflow ui --backend-store-uri" in result.stdout
    assert "[5/5]" in result.stdout
    found = {r.data.tags["method"]: r for r in runs(uri)}
    assert set(found) == {"naive", "joint"}
    client = MlflowClient(uri)
    for method, run in found.items():
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["benchmark"] == "split_digits" and tags["seed"] == "0" and tags["sweep_id"]
        assert run.data.params["method.name"] == method
        matrix = artifact_json(uri, run.info.run_id, "accuracy_matrix.json")
        R, b = np.array(matrix["R"]), np.array(matrix["b"])
        assert R.shape == (5, 5) and b.shape == (5,)
        m = run.data.metrics
        summary = metrics.summarize(R, b)
        for key in ("acc/final", "acc/avg_incremental", "acc/forgetting", "acc/bwt", "acc/fwt"):
            assert m[key] == pytest.approx(summary[key], abs=1e-9), key
        for i in range(5):
            history = client.get_metric_history(run.info.run_id, f"acc/exp_{i}")
            assert [h.step for h in history] == list(range(5))
            assert [h.value for h in history] == pytest.approx(R[:, i].tolist())
        seen = client.get_metric_history(run.info.run_id, "acc/seen")
        assert [h.value for h in seen] == pytest.approx(
            [metrics.average_accuracy(R, t) for t in range(5)]
        )
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            "config.yaml",
            "accuracy_matrix.json",
            "accuracy_matrix.png",
            "summary.json",
        } <= names
    assert found["naive"].data.metrics["acc/forgetting"] > 0.3
    assert found["joint"].data.metrics["acc/forgetting"] < 0.1


def test_lifelong_moe_logs_costs_routing_and_checkpoints(workdir):
    uri = store_uri(workdir)
    run_cli(
        workdir,
        "method=lifelong_moe",
        "benchmark=permuted_digits",
        "benchmark.n_experiences=3",
        f"tracking.uri={uri}",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
    )
    (run,) = runs(uri)
    client = MlflowClient(uri)
    total = [h.value for h in client.get_metric_history(run.info.run_id, "cost/params_total")]
    active = [h.value for h in client.get_metric_history(run.info.run_id, "cost/params_active")]
    trainable = [
        h.value for h in client.get_metric_history(run.info.run_id, "cost/params_trainable")
    ]
    assert len(set(active)) == 1, "compute per token must stay constant"
    assert total[0] < total[1] < total[2]
    assert total[1] - total[0] == total[2] - total[1]
    assert trainable[1] < total[1]
    routing = artifact_json(uri, run.info.run_id, "routing.json")
    assert routing["expert_origin"] == [0] * 4 + [1] * 2 + [2] * 2
    for shares in routing["layers"].values():
        assert len(shares) == 3 and all(len(row) == 8 for row in shares)
        assert all(sum(row) == pytest.approx(1.0) for row in shares)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert names == {f"checkpoints/model_exp_{i}.pt" for i in range(3)}
