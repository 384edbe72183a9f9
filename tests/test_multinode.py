"""Two 'nodes' on localhost (one CPU process each, gloo, started as a cluster would): they train
together with ddp and only global rank 0 writes to MLflow and the console."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.conftest import FAST, artifact_json, cli, runs, store_uri

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_run(workdir):
    uri = store_uri(workdir)
    port = free_port()
    processes = []
    for rank in (0, 1):
        folder = workdir / f"node{rank}"
        folder.mkdir()
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": str(rank),
            "LOCAL_RANK": "0",
            "RANK": str(rank),
        }
        args = [
            *cli("lifelong-moe", "lifelong_moe.cli"),
            f"tracking.uri={uri}",
            "benchmark=split_digits",
            "benchmark.n_experiences=2",
            "trainer.num_nodes=2",
            "trainer.devices=1",
            "trainer.strategy=ddp",
            *FAST,
        ]
        processes.append(
            subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    (run,) = runs(uri)  # rank 1 wrote nothing
    assert run.info.status == "FINISHED"
    assert "See this run" in outputs[0] and "See this run" not in outputs[1]
    R = artifact_json(uri, run.info.run_id, "accuracy_matrix.json")["R"]
    assert R[0][0] > 0.9 and R[1][1] > 0.9
    # rank 0 speaks for both: rank 1 prints no experience lines (its evaluation shard is summed
    # into rank 0's row; tests/test_torchrun.py checks the result against one process)
    rows = [[line for line in out.splitlines() if line.startswith("[")] for out in outputs]
    assert len(rows[0]) == 2 and rows[1] == []
