"""The stop decision under DDP: every rank stops at the same step, and the main process hears.

A signal reaches the ranks of a DDP run one by one or not at all: ``kill <pid>`` reaches one
process, a terminal's Ctrl-C reaches them at slightly different moments. A rank that decided
alone to stop would wait in the checkpoint's collective save while the others run the next
step's gradient all-reduce: a hang, or a crash. So the decision is collective: at every step
boundary (and at an epoch's end) the ranks all-reduce the signal each has recorded (the
maximum, 0 for none), and all of them act on the result; one process takes no extra step.

On one machine (``ddp_fork``/``ddp_spawn``, see ``trainer.make_trainer``) the ranks are worker
processes that the main process starts at every ``fit`` and that only train: the main one
evaluates and logs. There a stop ends ``fit`` normally (``trainer.should_stop``) after the
checkpoint at that step, rank 0 reports the signal and its step through the callback metrics
that Lightning hands back to the main process, and the main process raises ``Interrupted``
(``after_fit``): no worker raises, so none prints a traceback. The main process forwards its own
signals to the workers (``forwarder``) and is the only one that acts on a second signal.

Outside training nothing is collective, and only the main process exists between fits. A
signal that reaches a worker before its first step boundary is acted on at that boundary; one
that arrives after the last (on_train_end, where the ranks agree once more) is acted on by the
main process if it reached rank 0, and is lost if it reached another rank only: the experience
then completes as if no signal had come.

Across machines (every process runs the whole loop, started by a cluster) ranks raise
``Interrupted`` together at the agreed step; a signal outside training stops only the process
it reaches, whose peers then fail at their next collective (a cluster's scancel signals all).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from lifelong_moe import compat
from lifelong_moe.run import signals

REPORT = "signals/stop"  # [signal number or 0, step]: rank 0's word to the main process


def decide(trainer: L.Trainer) -> int | None:
    """The signal that stops every rank at this step boundary, or None; the same on every rank.

    A rank that got no signal adopts the agreed one, so it names the same signal from here on.
    """
    if trainer.world_size == 1:
        return signals.requested()
    local = torch.tensor(signals.requested() or 0, device=trainer.strategy.root_device)
    agreed = int(trainer.strategy.reduce(local, reduce_op="max"))
    if agreed and signals.requested() is None:
        signals.STATE.requested = agreed
    return agreed or None


def stop(trainer: L.Trainer, signum: int) -> None:
    """Stop training here, after this boundary's checkpoint: raise ``Interrupted``, or in a
    worker end ``fit`` and leave it to the main process (``after_fit``)."""
    if not signals.STATE.worker:
        raise signals.Interrupted(signum)
    trainer.should_stop = True


def forwarder(trainer: L.Trainer) -> Callable[[int], None] | None:
    """What sends a signal on to the trainer's worker processes (``signals.training``)."""
    launcher = trainer.strategy.launcher
    return launcher.kill if isinstance(launcher, compat.multiprocessing_launcher()) else None


def after_fit(trainer: L.Trainer) -> None:
    """In the process that called ``fit``: take rank 0's report, raise if a signal stopped it.

    One process raised inside ``fit`` already; this catches a signal that came after its last
    step boundary, before the method's post-fit work (statistics, SEED's Gaussians).
    """
    report = trainer.callback_metrics.pop(REPORT, None)
    if report is not None:
        signum, step = (int(v) for v in report.tolist())
        signals.STATE.step = step
        if signum and signals.requested() is None:
            signals.STATE.requested = signum
    signals.check()


def _keep_our_handlers() -> None:
    """Stands in for Lightning's ``register_signal_handlers`` on DDP ranks (see ``StopSync``)."""


class StopSync(L.Callback):
    """Puts a DDP rank's signal handling in the hands of ``decide``, and reports to the main
    process.

    Lightning's own SIGTERM handler broadcasts from inside the handler (it pairs with whatever
    collective the other ranks run next) and, through ``SIGTERMException``, ends a worker with
    status 0 without handing rank 0's results back (the main process would then wait forever):
    on DDP ranks it is not installed (``compat.keep_signal_handlers``), and ours stays.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            compat.keep_signal_handlers(trainer, _keep_our_handlers)
        if isinstance(trainer.strategy.launcher, compat.multiprocessing_launcher()):
            signals.enter_worker()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            decide(trainer)  # a signal after the last step boundary: every rank knows it

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if signals.STATE.worker and trainer.is_global_zero:
            report = [signals.requested() or 0, trainer.global_step]
            trainer.callback_metrics[REPORT] = torch.tensor(report)
