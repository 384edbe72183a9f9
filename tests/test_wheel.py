"""The wheel carries conf/: the installed ``lifelong-moe`` runs from any directory, no source tree.

Builds the wheel from a copy of the sources (no build isolation: setuptools comes from the test
venv), installs it without dependencies into a target folder, and runs that folder's entry
point from an empty directory with only the target folder on PYTHONPATH; the heavy
dependencies (torch, Lightning, ...) come from the test venv's site-packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_carries_conf_and_runs_from_an_empty_directory(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("lifelong_moe", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(dist)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml"))
    missing = [str(c) for c in configs if f"lifelong_moe/conf/{c}" not in names]
    assert not missing, f"config files missing from the wheel: {missing}"
    modules = sorted(p.relative_to(REPO) for p in (REPO / "lifelong_moe").rglob("*.py"))
    assert not [str(m) for m in modules if str(m) not in names]

    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1"}
    script = [str(target / "bin" / "lifelong-moe")]
    helped = subprocess.run(
        [*script, "--help"], cwd=empty, env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "benchmark" in helped.stdout
    uri = f"sqlite:///{empty / 'mlflow.db'}"
    one = [
        "benchmark=split_digits",
        "benchmark.n_experiences=1",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        "tracking.log_checkpoints=false",
        f"tracking.uri={uri}",
    ]
    probe = "import lifelong_moe.cli as c; print(c.__file__); print(c.CONF_DIR)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True
    )
    assert where.stdout.splitlines() == [
        str(target / "lifelong_moe" / "cli.py"),
        str(target / "lifelong_moe" / "conf"),
    ], where.stderr[-2000:]
    ran = subprocess.run(
        [*script, *one], cwd=empty, env=env, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "[1/1]" in ran.stdout
    # lifelong-moe-bench loop composes conf/ too: from the wheel it must find the packaged one.
    bench = [str(target / "bin" / "lifelong-moe-bench"), "loop", "benchmark=split_digits"]
    bench += ["benchmark.n_experiences=1", "--epochs", "1", "--repeats", "1", "--threads", "1"]
    timed = subprocess.run(bench, cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert timed.returncode == 0, timed.stderr[-3000:]
    assert "runner / bare" in timed.stdout
