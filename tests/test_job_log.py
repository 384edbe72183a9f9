"""What a run shows on the console also lands in Hydra's job log (``outputs/<day>/<time>/*.log``)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_RUN, run_cli, store_uri

pytestmark = pytest.mark.slow


def test_job_log_holds_the_lines_the_console_shows_once(workdir):
    result = run_cli(workdir, f"tracking.uri={store_uri(workdir)}", *TINY_RUN)
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith(("run ", "[1/2] ", "[2/2] "))]
    assert [line.split(" ")[0] for line in progress] == ["run", "[1/2]", "[2/2]"]
    assert lines.count(progress[1]) == 1  # printed once, bare, as before: not again by Hydra
    assert not any("[lifelong_moe]" in line for line in lines)
    (log,) = workdir.glob("outputs/*/*/*.log")
    logged = log.read_text()
    for line in progress:
        assert f"[lifelong_moe][INFO] - {line}\n" in logged, (line, logged)
    assert "Accuracy matrix R[i][j]" in logged and "| acc/final | " in logged
