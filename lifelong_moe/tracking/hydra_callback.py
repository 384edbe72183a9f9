"""Hydra callback (conf/config.yaml, ``hydra.callbacks``) that gives every sweep one parent run.

Hydra calls ``on_multirun_start`` / ``on_multirun_end`` once, in the launching process, for the
basic, joblib and submitit launchers alike. A failed job (``cli.JobFailed``) lets the other jobs
run, then makes Hydra raise before ``on_multirun_end``: ``lifelong-moe``'s entry point closes the
parent on its way out (:func:`close_open_parents`), with atexit as the last resort for other
entry points.
"""

from __future__ import annotations

import atexit
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lifelong_moe.errors import ConfigError
from lifelong_moe.log import LOGGER

_OPEN: list[SweepParentCallback] = []


def close_open_parents() -> None:
    """Finish every parent this process opened and did not finish (a job failed, Ctrl-C)."""
    while _OPEN:
        _OPEN.pop().close()


class SweepParentCallback(Callback):
    def __init__(self) -> None:
        self.parent = None  # a lifelong_moe.tracking.sweep.SweepParent once a sweep starts

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lifelong_moe.tracking.sweep import open_parent  # imports MLflow: only for sweeps

        try:
            self.parent = open_parent(config)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if self.parent is not None:
            _OPEN.append(self)
            # Downloads need threads, which atexit no longer has: prefer close_open_parents().
            atexit.register(self.close)
            LOGGER.info(f"sweep {self.parent.sweep_id}: parent run {self.parent.run_id}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Finish the parent once (at the sweep's end, or at exit after a failed job)."""
        parent = self.parent
        if parent is None or parent.status:
            return
        status = parent.close()
        finished = parent.client.get_run(parent.run_id).data.tags.get("sweep.runs_finished")
        LOGGER.info(f"\nSweep {parent.sweep_id}: {finished} runs finished, parent run {status}.")
        LOGGER.info(f"See the sweep (its comparison): {parent.hint()}")
