"""lifelong-moe-bench loop: the runner and the bare loop do the same training, and the report
gives their times and ratio."""

from __future__ import annotations

import json

import pytest
import torch

from lifelong_moe import bench
from lifelong_moe.errors import NonFiniteLossError
from lifelong_moe.methods.step_stats import StepStats
from lifelong_moe.run.loop import build
from lifelong_moe.run.loop_bench import bare_side, compose, runner_side

TINY = [
    "method=naive",
    "benchmark=split_digits",
    "benchmark.n_experiences=2",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "tracking.log_checkpoints=false",
]


def test_both_sides_train_the_same_model_to_the_same_weights():
    """Same seed, data order, optimizer and loss: the comparison is like for like."""
    cfg = compose([*TINY, "method=moe_finetune"])
    runner, bare = runner_side(cfg), bare_side(cfg)
    want, got = runner.model.state_dict(), bare.model.state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
    untrained = build(cfg).model.state_dict()
    assert not torch.equal(untrained["head.weight"], want["head.weight"])  # both sides trained
    assert runner.wall > 0 and bare.cpu > 0


def test_loop_command_reports_the_ratio(tmp_path, capsys):
    out = tmp_path / "loop.json"
    code = bench.main(["loop", *TINY[:3], "--epochs", "1", "--repeats", "1", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "runner / bare (wall)" in table and "benchmark=split_digits" in table
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ratio"] == row["runner_median_s"] / row["bare_median_s"]
    assert len(row["runner_s"]) == len(row["bare_s"]) == 1


def test_guard_names_the_first_bad_step_though_it_looks_only_every_n_steps():
    stats = StepStats(check_every=50)
    for step in range(7):
        loss = torch.tensor(1.0 if step < 4 else float("nan"))
        stats.update(loss, {"ce": loss}, step, 8)
        if stats.due(step + 1):  # the host looks at step 0, 50, ...: not here
            stats.check(2)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at experience 2, step 4 "):
        stats.check(2)
    stats.reset()
    for step, value in enumerate([1.0, 3.0]):
        stats.update(torch.tensor(value), {"ce": torch.tensor(value)}, step, 2 + 2 * step)
    assert stats.mean().item() == pytest.approx((1.0 * 2 + 3.0 * 4) / 6)  # batch-size weighted
    stats.check(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guard_update_never_syncs_on_cuda():
    stats = StepStats()
    loss = torch.tensor(1.0, device="cuda")
    stats.update(loss, {"ce": loss}, 0, 4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 5):
            stats.update(loss * step, {"ce": loss}, step, 4)
    finally:
        torch.cuda.set_sync_debug_mode(0)
