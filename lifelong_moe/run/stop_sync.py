"""The stop decision under DDP: every rank stops at the same step.

A signal reaches the ranks of a DDP run one by one or not at all: ``kill <pid>`` reaches one
process, torchrun forwards a Ctrl-C to the ranks at slightly different moments. A rank that
decided alone to stop would wait in the checkpoint's collective save while the others run the
next step's gradient all-reduce: a hang, or a crash. So the decision is collective: at every
step boundary (and at an epoch's end) the ranks all-reduce the signal each has recorded (the
maximum, 0 for none), and all of them act on the result: they write the checkpoint of that
step and raise ``Interrupted`` together; one process takes no extra step.

Every rank runs the whole loop (run/distributed.py). Outside training nothing is collective: a
signal there stops only the process it reaches, whose peers then fail at their next collective
(torchrun and scancel signal every rank).
"""

from __future__ import annotations

import lightning as L
import torch

from lifelong_moe import compat
from lifelong_moe.run import signals


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
    """Stop training here, after this boundary's checkpoint."""
    raise signals.Interrupted(signum)


def after_fit(trainer: L.Trainer) -> None:
    """Right after ``fit``: raise for a signal that came after the last step boundary (every
    rank knows of it: ``StopSync.on_train_end``), before the method's post-fit work."""
    signals.check()


def _keep_our_handlers() -> None:
    """Stands in for Lightning's ``register_signal_handlers`` on DDP ranks (see ``StopSync``)."""


class StopSync(L.Callback):
    """Puts a DDP rank's signal handling in the hands of ``decide``.

    Lightning's own SIGTERM handler broadcasts from inside the handler (it pairs with whatever
    collective the other ranks run next) and, through ``SIGTERMException``, ends a rank without
    the checkpoint of the agreed step: on DDP ranks it is not installed
    (``compat.keep_signal_handlers``), and ours stays.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            compat.keep_signal_handlers(trainer, _keep_our_handlers)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            decide(trainer)  # a signal after the last step boundary: every rank knows it
