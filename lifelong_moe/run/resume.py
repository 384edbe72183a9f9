"""Resume an interrupted run in the same MLflow run, from inside the experience it was in.

After every experience the runner stores ``~resume/state.pt`` beside the run's artifacts
(:func:`state`): the grown model, the method's own state (EWC's Fisher, the replay buffer,
expert origins), the :class:`History` of R and of what was logged, and the RNG states. Inside an experience, training checkpoints on local
disk (``checkpointing.py``) carry the rest: optimizer, loop progress, data position, RNG.
Restoring both makes the resumed run bit-identical to an uninterrupted one on CPU. The state is
deleted once the run FINISHED (``tracking.keep_resume_state=true`` keeps it).

Nothing loaded can run code: states and checkpoints are read with ``weights_only=True``
(tensors, numbers, strings and containers only). Before anything is written, ``check_run``
refuses a FINISHED run, a run of another experiment, a missing or unreadable state, and warns
about a run recorded by another git commit (continue only with ``resume_force=true``).
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lifelong_moe import names
from lifelong_moe.config.aliases import migrate
from lifelong_moe.errors import ConfigError
from lifelong_moe.log import LOGGER
from lifelong_moe.targets import check_own_targets
from lifelong_moe.tracking import queries, store

STATE = names.RESUME_STATE


@dataclass
class History:
    """Everything the loop accumulates; saved after each experience so a run can resume."""

    R: list[list[float]] = field(default_factory=list)
    R_task: list[list[float]] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    b_task: list[float] = field(default_factory=list)
    routing: list = field(default_factory=list)
    # routing_stats[i][layer][j]: evaluation/routing.py's statistics (empty before issue 24)
    routing_stats: list = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)
    # language modelling: L[i][j] = validation loss (nats per byte) on domain j after i
    L: list[list[float]] = field(default_factory=list)
    b_loss: list[float] = field(default_factory=list)

    @classmethod
    def from_state(cls, saved: dict[str, Any]) -> History:
        """Read back what ``asdict`` saved; keys of older layouts (expert_counts) are ignored,
        and rows saved before the metric rename (issue 13) continue under today's names."""
        known = {f.name for f in fields(cls)}
        history = cls(**{k: v for k, v in saved.items() if k in known})
        history.logged = [names.modernize(row) for row in history.logged]
        # States saved before issue 24 have no routing statistics: earlier rows stay empty.
        missing = len(history.routing) - len(history.routing_stats)
        history.routing_stats = [[]] * max(missing, 0) + history.routing_stats
        return history


def state(
    history: History, model: dict[str, Any], method: dict[str, Any], next_index: int
) -> dict[str, Any]:
    """The resume state after experience ``next_index - 1``: plain values and tensors only."""
    return {
        "next": next_index,
        "history": asdict(history),
        "model": model,
        "method": method,
        "rng": capture_rng(),
    }


def capture_rng() -> dict[str, Any]:
    """RNG states in types that ``torch.load(weights_only=True)`` reads (tensors, ints, lists)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_run(uri: str, experiment: str, spec: str) -> str:
    """``spec`` is a run id, or ``last``: the newest run of the experiment that did not finish."""
    mlflow_client = store.client(uri)
    if spec != "last":
        run = queries.get_run(mlflow_client, spec)
        if run is None:
            raise ConfigError(f"resume={spec}: no such run in {uri}")
        return run.info.run_id
    found = queries.newest_unfinished(mlflow_client, experiment)
    if found is None:
        raise ConfigError(
            f"resume=last: experiment '{experiment}' in {uri} has no unfinished run to resume"
        )
    return found


def run_config(uri: str, run_id: str) -> DictConfig:
    """The resolved config the run started with (its config.yaml artifact), with keys renamed
    since then under today's names (config/aliases.py)."""
    text = queries.run_config_text(store.client(uri), run_id)
    if text is None:
        raise ConfigError(f"resume={run_id}: the run has no {names.CONFIG} to resume from")
    stored = OmegaConf.create(text)
    migrate(stored, f"resume={run_id}")
    return stored


def check_run(uri: str, experiment: str, run_id: str, commit: str, force: bool) -> None:
    """Refuse, in one line and before anything is written, a run that must not be resumed."""
    mlflow_client = store.client(uri)
    run = mlflow_client.get_run(run_id)
    if run.info.status == "FINISHED":
        raise ConfigError(f"resume={run_id}: the run is FINISHED; there is nothing to resume")
    kind = run.data.tags.get(names.TAG_KIND, names.KIND_EXPERIMENT)
    if kind != names.KIND_EXPERIMENT:
        raise ConfigError(f"resume={run_id}: the run is a {kind}, not an experiment")
    if queries.experiment_id(mlflow_client, experiment) != run.info.experiment_id:
        other = queries.experiment_name(mlflow_client, run.info.experiment_id)
        raise ConfigError(
            f"resume={run_id}: the run belongs to experiment '{other}', not '{experiment}'; "
            f"add tracking.experiment={other}"
        )
    recorded = run.data.tags.get(names.TAG_GIT_COMMIT, "unknown")
    if recorded != commit:
        message = f"run {run_id} was recorded by git commit {recorded}, this is {commit}"
        if not force:
            raise ConfigError(f"{message}; resuming could mix code versions: add resume_force=true")
        LOGGER.warning(f"warning: {message}; resuming anyway (resume_force=true)")


def load_state(uri: str, run_id: str) -> dict[str, Any] | None:
    """The last saved state, or None when the run died before its first experience ended.

    Read with ``weights_only=True``: a state file that would run code when unpickled (or is
    corrupt) stops the resume with one line instead.
    """
    mlflow_client = store.client(uri)
    completed = queries.logged_steps(mlflow_client, run_id, names.ACC_SEEN)
    with tempfile.TemporaryDirectory() as tmp:
        path = queries.resume_state_file(mlflow_client, run_id, tmp)
        if path is None:
            if completed:
                raise ConfigError(
                    f"resume={run_id}: the run logged {len(completed)} experience(s) but its "
                    f"resume state {STATE} is missing; it cannot be resumed"
                )
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            # weights_only names the first object it would not build: "Unsupported global".
            if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
                raise ConfigError(
                    f"resume={run_id}: refused to load {STATE}: it holds objects other than "
                    "tensors and plain values, and unpickling them could run code"
                ) from None
            first = (str(error).splitlines() or [type(error).__name__])[0][:200]
            raise ConfigError(
                f"resume={run_id}: {STATE} is corrupt ({first}); it cannot be resumed"
            ) from None


def resume_target(cfg: DictConfig, commit: str) -> tuple[str | None, DictConfig]:
    """The run this command continues, checked, and the config to continue it with.

    ``resume=<id>|last`` names it; a requeued SLURM job runs the same command again and
    continues its own run. The run's stored config wins (the store URI, the resume options and
    ``trainer.expert_parallel`` come from the command); a new run keeps ``cfg`` as is.
    """
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    if cfg.get("resume"):
        run_id = find_run(uri, experiment, str(cfg.resume))
    elif slurm_job():
        run_id = find_requeued(uri, experiment, slurm_job())
    else:
        return None, cfg
    if run_id is None:
        return None, cfg
    check_run(uri, experiment, run_id, commit, bool(cfg.get("resume_force")))
    stored = run_config(uri, run_id)
    if not (store.is_local(uri) or cfg.get("resume_trust")):
        check_own_targets(
            stored,
            f"resume={run_id}",
            "the store is not local: add resume_trust=true if you trust it",
        )
    with open_dict(stored):
        stored.tracking.uri, stored.resume = uri, run_id
        # The process layout is the launcher's: a resume may shard experts another way.
        if "trainer" in stored:
            stored.trainer.expert_parallel = OmegaConf.select(
                cfg, "trainer.expert_parallel", default=1
            )
        stored.resume_force = bool(cfg.get("resume_force"))
        stored.resume_trust = bool(cfg.get("resume_trust"))
    return run_id, stored


def checkpoint_dir(uri: str, run_id: str) -> str | None:
    """Where the run wrote its training checkpoints (its tag), None for runs before the tag."""
    return queries.run_tag(store.client(uri), run_id, names.TAG_CHECKPOINT_DIR)


# -- SLURM: a preempted or timed-out job is requeued and continues its own run ----------------
def slurm_job() -> str | None:
    """This job's id as SLURM keeps it across requeues (array jobs: ``<array id>_<task id>``)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def find_requeued(uri: str, experiment: str, job: str) -> str | None:
    """The unfinished run that this SLURM job started before it was requeued, if any."""
    return queries.requeued_run(store.client(uri), experiment, job)


def requeue(run_id: str) -> None:
    """``scontrol requeue`` this job (after SIGUSR1/SIGUSR2): it restarts and resumes ``run_id``."""
    job = slurm_job()
    if job is None:
        LOGGER.warning(f"not a SLURM job: nothing requeued; continue with resume={run_id}")
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        ok = done.returncode == 0
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
    except OSError as error:
        ok, why = False, str(error)
    if ok:
        LOGGER.warning(f"requeued SLURM job {job}: it will resume run {run_id}")
    else:
        LOGGER.warning(f"requeue of SLURM job {job} failed ({why}); resume={run_id}")
