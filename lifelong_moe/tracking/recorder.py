"""The MLflow run of one experiment, from its tags to its status: FINISHED, FAILED or KILLED.

``RunRecorder`` is what the experience loop runs inside. ``start`` (or ``reopen`` on a resume)
opens the run with its identity tags, resolved config and dataset inputs; entering the recorder
starts the system-metrics sampler; leaving it ends the run:

- FINISHED when the loop returned, and only then drops the resume state (unless it is kept): a
  crash in between leaves a finished run with a spare state, never an unfinished run without one;
- KILLED when a stop was asked for: Ctrl-C (``KeyboardInterrupt``, or the ``SystemExit`` Lightning
  makes of it) or any exception whose ``kills_run`` is true (``signals.Interrupted``);
- FAILED for any other exception.

The exception is never swallowed: the caller decides what to print and how to exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lifelong_moe import names
from lifelong_moe.log import LOGGER
from lifelong_moe.stream import Stream
from lifelong_moe.tracking import report
from lifelong_moe.tracking.mlflow_run import RunTracker, flatten, git_commit, library_versions


def run_tags(
    cfg: DictConfig, stream: Stream, identity: Mapping[str, str], slurm_job: str | None
) -> dict[str, str]:
    """Every tag of a new run: its identity, what kind of matrix it has, code and job."""
    language = stream.language_modeling
    tags = {
        **identity,
        names.TAG_SPLIT: cfg.benchmark.get("split", "test"),  # the held-out set evaluated
        names.TAG_KIND: names.KIND_EXPERIMENT,
        names.TAG_MATRIX: names.MATRIX_PERPLEXITY if language else names.MATRIX_ACCURACY,
        names.TAG_SCENARIO: stream.scenario,
        names.TAG_GIT_COMMIT: git_commit(),
        **library_versions(),
    }
    if slurm_job:
        tags[names.TAG_SLURM_JOB] = slurm_job
    if cfg.tracking.get("sweep_id"):
        tags[names.TAG_SWEEP_ID] = str(cfg.tracking.sweep_id)
    return tags


class RunRecorder:
    """Opens the run, samples system metrics while it trains, and ends it with its status."""

    def __init__(self, tracker: RunTracker, cfg: DictConfig) -> None:
        self.tracker = tracker
        self.cfg = cfg
        self.resumed = False

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def start(self, stream: Stream, tags: dict[str, str], checkpoint_root: Path) -> str:
        """A new run: tags, params (the flattened resolved config), description, config and
        dataset inputs; its step checkpoints go to ``checkpoint_root/<run id>`` (a tag)."""
        cfg, tracker = self.cfg, self.tracker
        if names.TAG_SWEEP_ID in tags:  # nests the sweep's runs under one parent in the UI
            parent = tracker.sweep_parent(tags[names.TAG_SWEEP_ID])
            if parent:
                tags[names.TAG_PARENT] = parent
        resolved = OmegaConf.to_container(cfg, resolve=True)
        method, benchmark = tags[names.TAG_METHOD], tags[names.TAG_BENCHMARK]
        run_name = cfg.tracking.run_name or f"{method}-{benchmark}-s{cfg.seed}"
        run_id = tracker.start(run_name, tags, flatten(resolved))
        try:  # the run exists now: a failure before the recorder's context still ends it
            tracker.set_tags({names.TAG_CHECKPOINT_DIR: str((checkpoint_root / run_id).resolve())})
            tracker.describe(report.running_description(tags, len(stream)))
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), names.CONFIG)
            tracker.log_inputs(report.dataset_inputs(resolved["benchmark"], stream))
        except BaseException as error:
            tracker.finish(_end_status(error))
            raise
        LOGGER.info(f"run {run_id} ({run_name}): {len(stream)} experiences of {stream.name}")
        return run_id

    def reopen(self, run_id: str) -> None:
        """Continue a recorded run (resume): it is RUNNING again until the recorder ends it."""
        self.tracker.reopen(run_id)
        self.resumed = True

    def __enter__(self) -> RunRecorder:
        if self.cfg.tracking.get("system_metrics", True):
            interval = float(self.cfg.tracking.get("system_metrics_interval_s", 2.0))
            self.tracker.start_system_metrics(interval, resume=self.resumed)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.tracker.stop_system_metrics()
        if error is None:
            self.tracker.finish("FINISHED")
            self._drop_resume_state()
            return
        self.tracker.finish(_end_status(error))

    def _drop_resume_state(self) -> None:
        if self.cfg.tracking.get("keep_resume_state", False):
            return
        try:
            self.tracker.delete_artifacts(names.RESUME_FOLDER)
        except Exception as error:  # a store that cannot delete keeps it; the run is done
            first = (str(error).splitlines() or [type(error).__name__])[0][:200]
            LOGGER.info(f"note: could not delete {names.RESUME_FOLDER}/ of the run: {first}")

    def summary(self, summary: dict[str, Any]) -> None:
        """The run's end-of-stream summary, as summary.json."""
        self.tracker.log_json(report.rounded(summary), names.SUMMARY)


def _end_status(error: BaseException) -> str:
    """KILLED for Ctrl-C, an exit, or an exception whose ``kills_run`` is true; else FAILED."""
    killed = isinstance(error, KeyboardInterrupt | SystemExit) or getattr(error, "kills_run", False)
    return "KILLED" if killed else "FAILED"
