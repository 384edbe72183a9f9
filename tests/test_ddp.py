"""An experience trained with DDP on 2 CPU processes (gloo) reaches the single-process R row."""

from __future__ import annotations

import pytest

from lifelong_moe import names
from tests.conftest import FAST, artifact_json, run_cli, runs, store_uri

pytestmark = pytest.mark.slow
ARGS = ["benchmark=split_digits", "benchmark.n_experiences=2", *FAST, "trainer.max_epochs=4"]


def test_ddp_two_processes_match_one(workdir):
    rows = {}
    for devices in (1, 2):
        uri = store_uri(workdir / str(devices))
        (workdir / str(devices)).mkdir()
        strategy = "ddp" if devices > 1 else "auto"
        run_cli(
            workdir,
            f"tracking.uri={uri}",
            f"trainer.devices={devices}",
            f"trainer.strategy={strategy}",
            *ARGS,
        )
        (run,) = runs(uri)  # one run: the workers neither evaluate nor log
        assert run.info.status == "FINISHED"
        rows[devices] = artifact_json(uri, run.info.run_id, "accuracy_matrix.json")["R"]
        # the checkpoint costs come back from the worker that wrote them
        assert run.data.metrics[names.COST_CHECKPOINT_MB] > 0
        assert run.data.metrics[names.COST_CHECKPOINT_WRITE_S] > 0
    # 2 processes see each batch split in two (effective batch doubles), so training differs a
    # little: the learned experience must reach the same accuracy within 5 points.
    assert rows[2][0][0] == pytest.approx(rows[1][0][0], abs=0.05)
    assert rows[2][1][1] == pytest.approx(rows[1][1][1], abs=0.05)
    assert rows[2][0][0] > 0.9
