"""Signals under torchrun (2 CPU processes, gloo): the ranks stop at the same step, one
checkpoint, one line, a KILLED run that resumes (under torchrun again) to FINISHED; and inferred
routing's statistics are those of one process (every rank computes them from the whole
experience, not from its shard).

Each signal is sent by a rank itself at a named point (``LIFELONG_MOE_SIGNAL_AT``, with a rank
filter), so what is tested never depends on timing. torchrun itself exits 1 when its workers
fail or it was signalled (printing its own traceback): what is checked is what the ranks did.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lifelong_moe.methods.inferred_routing import ExperienceStatistics
from lifelong_moe.run.resume import load_state
from lifelong_moe.run.signals import TEST_HOOK
from tests.conftest import TINY_RUN, benchmark_from_yaml, runs, store_uri
from tests.test_torchrun import torchrun

pytestmark = pytest.mark.slow
# 10 batches an epoch on one process; 2 ranks take 5 steps each, so step 3 is mid-epoch.
ARGS = [*TINY_RUN, "checkpoint.every_n_steps=5"]


def interrupt_and_resume(cwd: Path, hook: str, *extra: str) -> str:
    """Run with the signal hook, check the stop at experience 0 step 3, resume; the run id."""
    uri = store_uri(cwd)
    done = torchrun(cwd, 2, f"tracking.uri={uri}", *ARGS, *extra, env={TEST_HOOK: hook})
    assert done.returncode == 1, done.stderr[-3000:]  # torchrun's status for failed workers
    ours = [line for line in done.stderr.splitlines() if "lifelong_moe" in line]
    assert not [line for line in ours if line.lstrip().startswith("File ")], done.stderr[-3000:]
    (run,) = runs(uri)
    run_id = run.info.run_id
    assert run.info.status == "KILLED"
    lines = [line for line in done.stderr.splitlines() if line.startswith("interrupted")]
    assert lines == [
        f"interrupted: run {run_id} marked KILLED at experience 0 step 3; "
        f"continue with resume={run_id}"
    ]
    folder = Path(run.data.tags["checkpoint_dir"])
    assert [p.name for p in folder.iterdir()] == ["exp0-step3.ckpt"]  # one, at the agreed step

    resumed = torchrun(cwd, 2, f"tracking.uri={uri}", f"resume={run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.splitlines()[0].endswith("at experience 0, epoch 0, step 3")
    (run,) = runs(uri)
    assert run.info.status == "FINISHED"
    return run_id


def test_ctrl_c_to_torchrun_stops_all_ranks_at_one_step_and_resumes(workdir):
    """Ctrl-C in a terminal reaches torchrun (its workers run in sessions of their own), which
    forwards SIGINT to every rank."""
    interrupt_and_resume(workdir, "train_step:0:3@0=parent:SIGINT")


def test_sigterm_to_rank_0_alone_stops_both_ranks_and_statistics_are_one_process(workdir):
    """SIGTERM to one rank: rank 1 learns of it at the step boundary and stops there too.

    With inferred routing, the resumed run's per-experience statistics equal those one
    process computes from each experience's training set (each rank only trains on half).
    """
    run_id = interrupt_and_resume(
        workdir,
        "train_step:0:3@0=SIGTERM",
        "method=lifelong_moe_specialized",
        "tracking.keep_resume_state=true",
    )
    saved = load_state(store_uri(workdir), run_id)
    stored = saved["method"]["statistics"]["stats"]
    expected = ExperienceStatistics()
    for experience in benchmark_from_yaml("split_digits", n_experiences=2).experiences:
        expected.add(experience.train)
    assert len(stored) == len(expected.stats) == 2
    for got, want in zip(stored, expected.stats, strict=True):
        assert got["n"] == want["n"]  # every training example, not one rank's shard
        torch.testing.assert_close(got["sum"], want["sum"], rtol=1e-12, atol=0)
        torch.testing.assert_close(got["outer"], want["outer"], rtol=1e-12, atol=0)
