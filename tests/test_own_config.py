"""A user's own configs and code: the example method in experiments/own_method, and a config
directory of the user's for each other group, through ``--config-dir`` and ``hydra.searchpath``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifelong_moe.compare import main as compare_main
from tests.conftest import REPO, TINY_RUN, artifact_json, run_cli, runs, store_uri

pytestmark = pytest.mark.slow
EXAMPLE = REPO / "experiments" / "own_method"


def error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    return line


def test_example_method_sweeps_shows_in_compare_and_resumes_from_its_config_dir(workdir, capsys):
    uri = store_uri(workdir)
    assert len((EXAMPLE / "my_method.py").read_text().splitlines()) < 60
    own = ["--config-dir", str(EXAMPLE), f"tracking.uri={uri}", *TINY_RUN]
    run_cli(workdir, "-m", *own, "method=my_method,naive")
    mine = {r.data.tags["method"]: r for r in runs(uri)}
    assert set(mine) == {"my_method", "naive"}
    assert mine["my_method"].data.params["method._target_"] == "my_method.MyMethod"
    assert all(r.info.status == "FINISHED" for r in mine.values())
    # The anchor term trained: it is logged beside the cross-entropy.
    assert "train/anchor" in mine["my_method"].data.metrics
    (parent,) = runs(uri, kind="sweep")
    assert parent.info.status == "FINISHED"
    table = artifact_json(uri, parent.info.run_id, "comparison.json")
    assert sorted(row["method"] for row in table["rows"]) == ["my_method", "naive"]
    assert compare_main(["--tracking-uri", uri, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["method"]: r["n"] for r in rows} == {"my_method": 1, "naive": 1}

    # An own-method run stopped before its second experience resumes from the local store when
    # the command names the config dir again (its Python file must import).
    stop = {"LIFELONG_MOE_SIGNAL_AT": "before_experience:1=SIGTERM"}
    done = run_cli(workdir, *own, "method=my_method", check=False, extra_env=stop)
    assert done.returncode == 143, done.stderr[-3000:]
    (killed,) = [r for r in runs(uri) if r.info.status == "KILLED"]
    run_id = killed.info.run_id
    without = run_cli(workdir, f"tracking.uri={uri}", f"resume={run_id}", check=False)
    assert error_line(without).startswith("error: method._target_='my_method.MyMethod'")
    resumed = run_cli(
        workdir, "--config-dir", str(EXAMPLE), f"tracking.uri={uri}", f"resume={run_id}"
    )
    assert resumed.stdout.splitlines()[0] == f"resuming run {run_id} after 1 of 2 experiences"
    assert {r.info.run_id: r.info.status for r in runs(uri)}[run_id] == "FINISHED"


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A config dir of the user's: a model, a benchmark and an experiment that selects both."""
    root = tmp_path / "my_configs"
    files = {
        "model/tiny_mlp.yaml": "name: tiny_mlp\n_target_: lifelong_moe.models.mlp.ResidualMLP\n"
        "moe: false\nd_model: 16\nd_hidden: 16\nn_blocks: 1\nmoe_blocks: [0]\n",
        "benchmark/two_digits.yaml": "name: two_digits\n"
        "_target_: lifelong_moe.data.digits.split_digits\nn_experiences: 2\nseed: ${seed}\n",
        "experiment/tiny.yaml": "# @package _global_\ndefaults:\n"
        "  - override /model: tiny_mlp\n  - override /benchmark: two_digits\n"
        "trainer:\n  max_epochs: 1\n  progress_bar: false\n"
        "tracking:\n  log_checkpoints: false\n",
        "model/typo.yaml": "name: typo\n_target_: lifelong_moe.models.mlp.ResidualMLP\n"
        "d_hiden: 16\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_user_config_dir_for_every_group(workdir, user_dir):
    uri = store_uri(workdir)
    searchpath = f"hydra.searchpath=[file://{user_dir}]"
    run_cli(workdir, searchpath, "experiment=tiny", f"tracking.uri={uri}")
    (run,) = runs(uri)
    tags = run.data.tags
    assert (tags["model"], tags["benchmark"], tags["method"]) == ("tiny_mlp", "two_digits", "naive")
    assert run.data.params["model.d_model"] == "16"

    # The one-line errors list the user's options beside the packaged ones, for every group
    # and both ways of naming the directory; the user's _target_ is checked like a packaged one.
    for where in (["--config-dir", str(user_dir)], [searchpath]):
        for group, mine in (
            ("model", "tiny_mlp"),
            ("benchmark", "two_digits"),
            ("experiment", "tiny"),
        ):
            line = error_line(run_cli(workdir, *where, f"{group}=nope", check=False))
            assert line.startswith(f"error: unknown {group} 'nope'; choose one of: ")
            assert mine in line.split(": ", 2)[2].split(", ")
        line = error_line(run_cli(workdir, *where, "model=typo", check=False))
        assert line == "error: model.d_hiden: unknown key; did you mean model.d_hidden?"
    line = error_line(run_cli(workdir, "--config-dir", str(EXAMPLE), "method=nope", check=False))
    assert "my_method" in line.split(": ", 2)[2].split(", ")
    line = error_line(
        run_cli(
            workdir,
            "--config-dir",
            str(EXAMPLE),
            "method=my_method",
            "method.strenght=1",
            check=False,
        )
    )
    assert line == "error: method.strenght: unknown key; did you mean method.strength?"
    missing = workdir / "missing"
    line = error_line(run_cli(workdir, f"hydra.searchpath=[file://{missing}]", check=False))
    assert (
        line
        == f"error: hydra.searchpath=file://{missing}: expected a directory ({missing} is none)"
    )
    assert [r.info.run_id for r in runs(uri)] == [run.info.run_id]  # no error left a run
