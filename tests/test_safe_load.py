"""Nothing loaded on resume can run code, and a resume against the wrong thing stops in one line.

One short run is stopped by SIGTERM after its first experience (a KILLED run with a valid
resume state); each test then changes one thing about it and resumes.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mlflow.tracking import MlflowClient

from lifelong_moe.errors import ConfigError
from lifelong_moe.run.resume import STATE
from tests.conftest import TINY_RUN, run_cli, runs, store_uri

pytestmark = pytest.mark.slow
ARGS = TINY_RUN


class RunsCode:
    """Unpickling this would touch ``path``: what a crafted state file could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[str, str, Path]:
    """(uri, run id, its state file) of a run KILLED after experience 0 of 2."""
    folder = tmp_path_factory.mktemp("killed")
    os.environ["LIFELONG_MOE_SIGNAL_AT"] = "before_experience:1=SIGTERM"
    try:
        done = run_cli(folder, f"tracking.uri={store_uri(folder)}", *ARGS, check=False)
    finally:
        os.environ.pop("LIFELONG_MOE_SIGNAL_AT")
    assert done.returncode == 143, done.stderr[-2000:]
    uri = store_uri(folder)
    (run,) = runs(uri)
    state = Path(urlparse(run.info.artifact_uri).path) / STATE
    assert state.is_file()
    return uri, run.info.run_id, state


@pytest.fixture
def store(killed) -> tuple[str, str, Path]:
    """The killed run, put back as it was after each test (state file, status, commit tag)."""
    uri, run_id, state = killed
    client = MlflowClient(uri)
    saved, commit = state.read_bytes(), client.get_run(run_id).data.tags["git_commit"]
    yield killed
    state.parent.mkdir(parents=True, exist_ok=True)  # a resume that FINISHED deleted ~resume/
    state.write_bytes(saved)
    client.set_tag(run_id, "git_commit", commit)
    client.set_terminated(run_id, "KILLED")


def resume(workdir: Path, uri: str, *extra: str):
    return run_cli(workdir, f"tracking.uri={uri}", *extra, check=False)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "warning:"))]


def test_state_that_would_run_code_is_refused(tmp_path, store):
    uri, run_id, state = store
    marker = tmp_path / "code-ran"
    torch.save({"next": 1, "payload": RunsCode(marker)}, state)
    done = resume(tmp_path, uri, f"resume={run_id}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert error_lines(done.stderr) == [
        f"error: resume={run_id}: refused to load {STATE}: it holds objects other than tensors "
        "and plain values, and unpickling them could run code"
    ]
    assert not marker.exists()
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"  # nothing overwritten


def test_corrupt_or_missing_state_is_refused(tmp_path, store):
    uri, run_id, state = store
    state.write_bytes(b"not a state file")
    done = resume(tmp_path, uri, "resume=last")
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert line.startswith(f"error: resume={run_id}: {STATE} is corrupt (")
    assert line.endswith("); it cannot be resumed")
    state.unlink()
    done = resume(tmp_path, uri, "resume=last")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"error: resume={run_id}: the run logged 1 experience(s) but its resume state "
        f"{STATE} is missing; it cannot be resumed"
    ]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_finished_run_and_run_of_another_experiment_are_refused(tmp_path, store):
    uri, run_id, _ = store
    done = resume(tmp_path, uri, f"resume={run_id}", "tracking.experiment=other")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"error: resume={run_id}: the run belongs to experiment 'lifelong-moe', not 'other'; "
        "add tracking.experiment=lifelong-moe"
    ]
    MlflowClient(uri).set_terminated(run_id, "FINISHED")
    done = resume(tmp_path, uri, f"resume={run_id}")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"error: resume={run_id}: the run is FINISHED; there is nothing to resume"
    ]


def test_run_of_another_commit_needs_resume_force(tmp_path, store):
    uri, run_id, _ = store
    client = MlflowClient(uri)
    client.set_tag(run_id, "git_commit", "0123abc")
    done = resume(tmp_path, uri, f"resume={run_id}")
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert line.startswith(f"error: run {run_id} was recorded by git commit 0123abc, this is ")
    assert line.endswith("; resuming could mix code versions: add resume_force=true")
    assert client.get_run(run_id).info.status == "KILLED"
    done = resume(tmp_path, uri, f"resume={run_id}", "resume_force=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert error_lines(done.stderr)[0].startswith(f"warning: run {run_id} was recorded by")
    assert done.stdout.splitlines()[0] == f"resuming run {run_id} after 1 of 2 experiences"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_avalanche_plugins_are_unpickled_only_from_a_trusted_store():
    from lifelong_moe.methods.avalanche_peer import AvalanchePeer
    from lifelong_moe.models.mlp import ResidualMLP
    from lifelong_moe.tracking.store import is_local

    model = ResidualMLP(input_shape=[64], n_classes=10, d_model=16, d_hidden=16, n_blocks=1)
    peer = AvalanchePeer(model, strategy="Naive")
    assert not peer.trust_pickles
    plugin = pickle.dumps(RunsCode(Path("/nonexistent/never")))
    with pytest.raises(ConfigError, match="add resume_trust=true"):
        peer.load_method_state({"strategy": "Naive", "plugins": [plugin]})
    assert is_local("sqlite:///mlflow.db") and is_local("file:///tmp/mlruns")
    assert not is_local("http://tracking.example:5000")


def test_a_stored_config_builds_only_the_toolkits_classes_from_a_remote_store(
    store, tmp_path, monkeypatch
):
    """A run's config.yaml names the classes a resume builds; on a server anyone may edit it."""
    from omegaconf import OmegaConf

    from lifelong_moe import names
    from lifelong_moe.run import resume as resume_module

    uri, run_id, state = store
    config = state.parent.parent / names.CONFIG
    original = config.read_text()
    crafted = OmegaConf.create(original)
    crafted.model = {"_target_": "os.system", "command": f"touch {tmp_path / 'ran'}"}
    config.write_text(OmegaConf.to_yaml(crafted))
    cfg = OmegaConf.create(
        {"tracking": OmegaConf.create(original).tracking, "resume": run_id, "resume_force": True}
    )
    cfg.tracking.uri = uri
    try:
        monkeypatch.setattr(resume_module.store, "is_local", lambda uri: False)
        with pytest.raises(ConfigError) as refused:
            resume_module.resume_target(cfg, commit="")
        assert str(refused.value) == (
            f"resume={run_id}: model._target_='os.system' is not one of lifelong_moe's classes; "
            "the store is not local: add resume_trust=true if you trust it"
        )
        # trusted on purpose: the config comes back as stored (building it is the user's call)
        cfg.resume_trust = True
        _, stored = resume_module.resume_target(cfg, commit="")
        assert stored.model._target_ == "os.system"
    finally:
        config.write_text(original)
    assert not (tmp_path / "ran").exists()


def test_a_model_file_builds_only_the_toolkits_classes(tmp_path):
    from lifelong_moe.models import load_model
    from lifelong_moe.models.checkpoint import save_model
    from lifelong_moe.models.mlp import ResidualMLP

    model_cfg = {"_target_": "lifelong_moe.models.mlp.ResidualMLP", "d_model": 16, "d_hidden": 16}
    build = {"input_shape": [64], "n_classes": 10}
    model = ResidualMLP(**build, d_model=16, d_hidden=16)
    path = tmp_path / "model.pt"
    save_model(model, model_cfg, path, **build)
    x = torch.ones(2, 64)
    assert torch.equal(load_model(path)(x)[0], model(x)[0])

    crafted = torch.load(path, weights_only=True)
    crafted["model_cfg"] = {"_target_": "os.system", "command": f"touch {tmp_path / 'ran'}"}
    torch.save(crafted, path)
    with pytest.raises(ConfigError, match=r"model\._target_='os.system' is not one of"):
        load_model(path)
    assert not (tmp_path / "ran").exists()
