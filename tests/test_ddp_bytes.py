"""No per-step broadcast of frozen weights: the bytes a DDP rank sends per training step do not
depend on how many frozen experts exist (2 gloo processes under torchrun).

Frozen expert banks and gate rows are buffers; DDP's default broadcasts every buffer from rank
0 before each forward, so with it on a step sends the gradients plus every buffer, and the
count grows with each experience. The run's DDP (run/distributed.py) sends the gradients only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bytes_per_step_do_not_grow_with_frozen_experts(workdir):
    out = workdir / "bytes.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(REPO / "tests" / "ddp_bytes_probe.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    one, three, synced = report["1"], report["3"], report["3 sync"]
    print({name: (case["per_step"], case["buffer_bytes"]) for name, case in report.items()})
    assert three["params"]["total"] > one["params"]["total"]  # more frozen experts...
    assert three["buffer_bytes"] > one["buffer_bytes"]
    assert len(one["per_step"]) >= 2
    # ...and the same bytes at every step: the gradients' and a few bytes of Lightning's own
    assert set(one["per_step"]) == set(three["per_step"]) == {one["per_step"][0]}
    assert one["per_step"][0] < one["trainable_bytes"] + 64
    assert one["trainable_bytes"] == three["trainable_bytes"]  # trainable size stays constant
    # DDP's default adds every buffer to every step: the counter sees that broadcast
    assert set(synced["per_step"]) == {three["per_step"][0] + three["buffer_bytes"]}
