"""A parallel sweep into one sqlite store, then lifelong-moe-compare on it, checked against the runs."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest

from tests.conftest import FAST, cli, run_cli, runs, store_uri

pytestmark = pytest.mark.slow


def test_parallel_sweep_then_compare(workdir):
    uri = store_uri(workdir)
    run_cli(
        workdir,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method=naive,joint",
        "seed=0,1",
        "benchmark=permuted_digits",
        "benchmark.n_experiences=3",
        f"tracking.uri={uri}",
        *FAST,
    )
    found = runs(uri)
    assert len(found) == 4 and all(r.info.status == "FINISHED" for r in found)
    assert len({r.data.tags["sweep_id"] for r in found}) == 1
    (parent,) = runs(uri, kind="sweep")  # one parent, though two jobs raced to create it
    assert {r.data.tags["mlflow.parentRunId"] for r in found} == {parent.info.run_id}
    assert all(len(r.data.metrics) == len(found[0].data.metrics) for r in found)

    compare = subprocess.run(
        [
            *cli("lifelong-moe-compare", "lifelong_moe.compare"),
            f"--tracking-uri={uri}",
            "--format=json",
            f"--filter=sweep_id={found[0].data.tags['sweep_id']}",
            f"--plot={workdir / 'plots'}",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    table = json.loads(compare.stdout)
    assert table["n_runs"] == 4
    by_method = {row["method"]: row for row in table["rows"]}
    assert set(by_method) == {"naive", "joint"}
    for method, row in by_method.items():
        mine = [r for r in found if r.data.tags["method"] == method]
        assert row["n"] == 2 and set(row["run_ids"]) == {r.info.run_id for r in mine}
        for metric in ("acc/final", "acc/forgetting", "acc/bwt", "acc/fwt", "cost/params_total"):
            values = [r.data.metrics[metric] for r in mine]
            assert row["metrics"][metric]["mean"] == pytest.approx(statistics.mean(values))
            assert row["metrics"][metric]["std"] == pytest.approx(statistics.stdev(values))
    assert (workdir / "plots" / "accuracy_curves.png").stat().st_size > 0
