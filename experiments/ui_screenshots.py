"""Screenshots of the MLflow UI for the README (results/ui/): run once, by hand; not a test.

It fills a store with the demo sweep (naive, joint, moe_finetune, lifelong_moe on permuted
digits, as `make demo`), serves it with `mlflow ui`, and photographs, with headless Chromium,
the sweep's parent run (description with the verdict, the aggregate table, the plots) and one
lifelong_moe run (its charts, accuracy matrix, routing heatmap).

    apt-get update && apt-get install -y chromium        # Debian's Chromium, once
    python experiments/ui_screenshots.py                 # a fresh store in a temp folder
    python experiments/ui_screenshots.py --store DIR     # reuse DIR/mlflow.db if it has a sweep
    python experiments/ui_screenshots.py -- trainer.max_epochs=1   # more overrides for the sweep

The MLflow UI is a JavaScript app: Chromium's --virtual-time-budget lets it fetch and render
before the screenshot is taken. Look at the PNGs before committing them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXPERIMENT = "demo"
SWEEP_ID = "ui-demo"
MODE = "workflowType=machine_learning"  # the UI's model-training view (not GenAI)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def fill(store: Path, overrides: list[str]) -> None:
    """The demo sweep into store/mlflow.db (its parent run holds the comparison)."""
    command = [
        str(BIN / "lifelong-moe"),
        "-m",
        "experiment=demo",
        "method=naive,joint,moe_finetune,lifelong_moe",
        f"tracking.sweep_id={SWEEP_ID}",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        *overrides,
    ]
    subprocess.run(command, cwd=store, check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(store: Path, port: int) -> subprocess.Popen:
    """``mlflow ui`` on the store, answering /health before we return."""
    command = [
        str(BIN / "mlflow"),
        "ui",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        f"--backend-store-uri=sqlite:///{store / 'mlflow.db'}",
    ]
    log = open(store / "ui.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        command, cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not start; see {store / 'ui.log'}")


def shoot(url: str, path: Path, width: int = 1600, height: int = 1000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium: apt-get update && apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--virtual-time-budget=30000",
            f"--screenshot={path}",
            url,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=180)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def find_artifact(client: MlflowClient, run_id: str, name: str, folder: str = "") -> str | None:
    """The path of the first artifact called ``name``, searching folders (the layout may nest)."""
    for item in client.list_artifacts(run_id, folder or None):
        if item.is_dir:
            found = find_artifact(client, run_id, name, item.path)
            if found:
                return found
        elif Path(item.path).name == name:
            return item.path
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="folder with (or for) mlflow.db")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "ui")
    parser.add_argument("overrides", nargs="*", help="more overrides for the demo sweep")
    args = parser.parse_args()
    store = (args.store or Path(tempfile.mkdtemp(prefix="ui-demo-"))).resolve()
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)

    def parent_run():
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return None, None
        found = client.search_runs(
            [experiment.experiment_id], "tags.kind = 'sweep'", order_by=["start_time DESC"]
        )
        return experiment, (found[0] if found else None)

    experiment, parent = parent_run()
    if parent is None:
        fill(store, args.overrides)
        experiment, parent = parent_run()
    sweep = parent.data.tags["sweep_id"]
    (run,) = client.search_runs(
        [experiment.experiment_id],
        f"tags.kind = 'experiment' and tags.sweep_id = '{sweep}' and tags.method = 'lifelong_moe'",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = serve(store, port)
    try:
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
        p, r = parent.info.run_id, run.info.run_id
        shots = {
            "runs": (f"{base}/runs?{MODE}", 1600, 700),
            "parent_description": (f"{base}/runs/{p}?{MODE}", 1600, 800),
            "parent_table": (f"{base}/runs/{p}/artifacts/comparison_table.json?{MODE}", 1600, 600),
        }
        for name in ("accuracy_curves.png", "accuracy_forgetting.png", "accuracy_matrices.png"):
            path = find_artifact(client, p, name)
            if path:
                shots[f"parent_{Path(name).stem}"] = (
                    f"{base}/runs/{p}/artifacts/{path}?{MODE}",
                    1600,
                    900,
                )
        # The run's Model metrics tab is left out: its charts were still spinners in every shot.
        for name in ("accuracy_matrix.png", "routing.png"):
            path = find_artifact(client, r, name)
            if path:
                shots[f"run_{Path(name).stem}"] = (
                    f"{base}/runs/{r}/artifacts/{path}?{MODE}",
                    1600,
                    1000,
                )
        for name, (url, width, height) in shots.items():
            shoot(url, args.out / f"{name}.png", width, height)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
