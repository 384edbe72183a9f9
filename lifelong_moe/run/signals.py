"""SIGINT, SIGTERM and the SLURM requeue signals, handled by the toolkit at any moment.

The first signal asks the run to stop; where it lands decides how:

- during ``Trainer.fit`` (``training()``): the step in progress completes, the checkpoint
  callback writes a checkpoint at that step boundary and raises ``Interrupted``;
- inside a ``deferred()`` section (writes to MLflow, saving the resume state): the section
  completes first, so the store never holds half a row;
- anywhere else (startup, evaluation, before/after an experience): ``Interrupted`` at once.

The runner turns ``Interrupted`` into a KILLED run and one line; the CLI exits with 128 + the
signal number (130 for SIGINT, 143 for SIGTERM). A second signal exits at once, with one line.
SIGUSR1 and SIGUSR2 (sent by SLURM ahead of a preemption or a time limit, see ``requeue``)
stop the run the same way, then requeue the job so that it resumes from its checkpoint.

Under DDP every rank is a process of its own that runs the whole loop, started by torchrun or
srun, which forward a Ctrl-C (or scancel's SIGTERM) to every rank; the ranks agree at every step
boundary to stop at the same step (``run/stop_sync.py``) and all raise ``Interrupted`` there.

Tests trigger signals at named points (``point``) through ``LIFELONG_MOE_SIGNAL_AT``, so that
no outcome depends on timing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE = (signal.SIGUSR1, signal.SIGUSR2)
TEST_HOOK = "LIFELONG_MOE_SIGNAL_AT"


class Interrupted(BaseException):
    """A signal stopped the run (BaseException: nothing catches it by accident)."""

    kills_run = True  # the run recorder ends the MLflow run KILLED, not FAILED

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def requeue(self) -> bool:
        return self.signum in REQUEUE


class _State:
    requested: int | None = None
    training: bool = False
    deferred: int = 0
    run_id: str | None = None
    experience: int | None = None
    step: int | None = None


STATE = _State()


def where() -> str:
    """``experience i step s`` as far as known, for the one-line messages."""
    parts = []
    if STATE.experience is not None:
        parts.append(f"experience {STATE.experience}")
    if STATE.step is not None:
        parts.append(f"step {STATE.step}")
    return " ".join(parts) or "startup"


def _handler(signum: int, frame: Any) -> None:
    if STATE.requested is not None:
        run = STATE.run_id
        tail = f"; continue with resume={run}" if run else ""
        print(
            f"interrupted again ({signal.Signals(signum).name}): exiting now at {where()}{tail}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)
    STATE.requested = signum
    if STATE.training or STATE.deferred:
        return  # stopped at the next step boundary or at the end of the section
    raise Interrupted(signum)


def install() -> None:
    """Take over the handled signals (main thread only; Lightning composes its own on top)."""
    reset()
    for signum in HANDLED:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signum, _handler)


def reset() -> None:
    STATE.requested, STATE.training, STATE.deferred = None, False, 0
    STATE.run_id, STATE.experience, STATE.step = None, None, None


def requested() -> int | None:
    return STATE.requested


def check() -> None:
    """Raise ``Interrupted`` if a signal arrived while it was held back."""
    if STATE.requested is not None:
        raise Interrupted(STATE.requested)


@contextlib.contextmanager
def training() -> Iterator[None]:
    """While ``Trainer.fit`` runs: a signal only asks the checkpoint callback to stop."""
    STATE.training = True
    try:
        yield
    finally:
        STATE.training = False
    check()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section that a signal must not cut in half (a write to the tracking store)."""
    STATE.deferred += 1
    try:
        yield
    finally:
        STATE.deferred -= 1
    if not STATE.deferred and not STATE.training:
        check()


def point(
    name: str,
    experience: int | None = None,
    step: int | None = None,
    settle: Callable[[], None] | None = None,
) -> None:
    """Test hook: ``LIFELONG_MOE_SIGNAL_AT=name[:experience[:step]][@rank]=[group:]SIG[,SIG]``
    sends those signals when the run first reaches the named point.

    Points: startup, before_experience, train_step, evaluate, after_experience, log_metrics,
    checkpoint_write (in the background writer, before the new checkpoint takes its name).
    ``@rank`` fires in the process of that rank only, else every process that reaches the point
    fires. The signals go to this process, with ``group:`` to its whole process group, as
    Ctrl-C in a terminal does, or with ``parent:`` to the process that started this one (under
    torchrun: the launcher, which forwards them to every rank, as it does with a Ctrl-C). ``settle`` runs first when the point matches (at
    train_step: wait for checkpoint writes in flight), so that what the signal finds on disk
    never depends on a thread's speed.
    """
    spec = os.environ.get(TEST_HOOK)
    if not spec:
        return
    target, _, sig_spec = spec.partition("=")
    target, _, rank = target.partition("@")
    if rank and int(rank) != _rank():
        return
    here = [name]
    if experience is not None:
        here.append(str(experience))
        if step is not None:
            here.append(str(step))
    wanted = target.split(":")
    if len(wanted) > len(here) or wanted != here[: len(wanted)]:
        return
    os.environ.pop(TEST_HOOK)  # once: the signal handler may run more of this code
    if settle is not None:
        settle()
    to, _, sig_names = sig_spec.rpartition(":")
    for one in (sig_names or "SIGINT").split(","):  # SIGINT,SIGINT: twice
        if to == "group":
            os.killpg(os.getpgrp(), getattr(signal, one))
        elif to == "parent":  # wait until the launcher's forward arrives: no race with the step
            os.kill(os.getppid(), getattr(signal, one))
            deadline = time.monotonic() + 30
            while STATE.requested is None and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            os.kill(os.getpid(), getattr(signal, one))


def _rank() -> int:
    """This process's global rank: RANK (torchrun), SLURM_PROCID (srun), else 0."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0
