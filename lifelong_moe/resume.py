"""Resume an interrupted run from its last completed experience, in the same MLflow run.

After every experience the runner stores ``~resume/state.pt`` beside the run's artifacts: the
grown model, the method's own state (EWC's Fisher, the replay buffer), the history of R and
of what was logged, and the RNG states. Optimizer state is not needed: every experience starts
a fresh optimizer (see methods/base.py). Restoring the RNG states makes the resumed run
bit-identical to an uninterrupted one on CPU. The state is deleted once the run FINISHED
(``tracking.keep_resume_state=true`` keeps it).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lifelong_moe.errors import ConfigError
from lifelong_moe.tracking import names

STATE = names.RESUME_STATE


def capture_rng() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_run(uri: str, experiment: str, spec: str) -> str:
    """``spec`` is a run id, or ``last``: the newest run of the experiment that did not finish."""
    client = MlflowClient(uri)
    if spec != "last":
        try:
            return client.get_run(spec).info.run_id
        except Exception:
            raise ConfigError(f"resume={spec}: no such run in {uri}") from None
    found = client.get_experiment_by_name(experiment)
    candidates = (
        client.search_runs(
            [found.experiment_id],
            filter_string="tags.kind = 'experiment' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found
        else []
    )
    if not candidates:
        raise ConfigError(
            f"resume=last: experiment '{experiment}' in {uri} has no unfinished run to resume"
        )
    return candidates[0].info.run_id


def run_config(uri: str, run_id: str) -> DictConfig:
    """The resolved config the run started with (its config.yaml artifact)."""
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception:
            raise ConfigError(
                f"resume={run_id}: the run has no config.yaml to resume from"
            ) from None
        return OmegaConf.load(path)


def load_state(uri: str, run_id: str) -> dict[str, Any] | None:
    """The last saved state, or None when the run died before its first experience ended."""
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        for where in (STATE, names.LEGACY_RESUME_STATE):  # runs started before issue 13
            try:
                path = client.download_artifacts(run_id, where, tmp)
                break
            except Exception:
                continue
        else:
            return None
        return torch.load(Path(path), map_location="cpu", weights_only=False)
