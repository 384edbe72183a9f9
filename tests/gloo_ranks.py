"""Run a test body on N forked gloo ranks of one process group; a failure shows every rank's
traceback. The expert-parallel tests share this harness."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, body: Callable, world: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        rdv = f"file://{folder}/rdv"
        dist.init_process_group("gloo", init_method=rdv, rank=rank, world_size=world)
        body(rank, world, *args)
        dist.barrier()
    except BaseException:
        Path(folder, f"error{rank}").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(body: Callable, world: int, folder: Path, *args: object) -> None:
    """``body(rank, world, *args)`` on ``world`` forked ranks (fork: the workers skip importing
    torch again; the parent is single-threaded, so forking is safe); ``folder`` holds the
    rendezvous file and the ranks' tracebacks."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(
            _rank, args=(body, world, str(folder), args), nprocs=world, start_method="fork"
        )
    except Exception:
        errors = [p.read_text() for p in sorted(folder.glob("error*"))]
        pytest.fail("\n".join(errors) or "a worker failed")
