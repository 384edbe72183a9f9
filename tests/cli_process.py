"""The real ``lifelong-moe`` CLI in a fresh process, without paying its imports every time.

A forkserver (one per test worker) imports the CLI and the runner once; each run is a child
forked from it: a separate process with its own stdout/stderr (file descriptors 1 and 2 go to
files), signals, cwd, environment and exit status, as the console script would have, minus the
~6 s of importing torch, Lightning and MLflow. The forkserver never runs a torch op, so no
thread pool is forked mid-use.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["lifelong_moe.cli", "lifelong_moe.run.loop", __name__])
    return _CONTEXT


def _child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    old = {id(sys.stdout): 1, id(sys.stderr): 2}
    # Line-buffered, as PYTHONUNBUFFERED; the child exits with these streams open.
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    # Handlers made at import time hold the streams of that time: point them at the new ones.
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in old:
                new = sys.stdout if old[id(handler.stream)] == 1 else sys.stderr
                handler.setStream(new)
    sys.argv = [str(Path(sys.executable).parent / "lifelong-moe"), *args]
    from lifelong_moe.cli import main

    main()


def run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: int
) -> subprocess.CompletedProcess:
    """Run the CLI with ``args`` in ``cwd``; returncode is negative for a signal, as subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = _context().Process(target=_child, args=(args, str(cwd), env, str(out), str(err)))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["lifelong-moe", *args], timeout)
        stdout = out.read_text() if out.exists() else ""
        stderr = err.read_text() if err.exists() else ""
    return subprocess.CompletedProcess(["lifelong-moe", *args], child.exitcode, stdout, stderr)
