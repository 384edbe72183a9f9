"""Screenshots of the MLflow UI for the README (results/ui/): run once, by hand; not a test.

It starts an ``mlflow server`` on a store in a folder of its own, fills it with the demo sweep
(naive, joint, moe_finetune, lifelong_moe on permuted digits, as `make demo`), and photographs,
with headless Chromium, the runs list, the sweep's parent run (description with the verdict,
its charts, the aggregate table, the plots) and one lifelong_moe run (its charts, accuracy
matrix, routing heatmap).

    apt-get update && apt-get install -y chromium        # Debian's Chromium, once
    python experiments/ui_screenshots.py                 # a fresh store in a temp folder
    python experiments/ui_screenshots.py --store DIR     # reuse DIR (mlflow.db, mlartifacts/)
    python experiments/ui_screenshots.py -- trainer.max_epochs=1   # more overrides for the sweep

No machine path shows: the server runs in the store's folder with relative paths and serves the
artifacts itself, so runs store ``mlflow-artifacts:/...`` URIs. The MLflow UI is a JavaScript
app that fetches and draws after the page loaded: Chromium is driven over its DevTools pipe
(``--remote-debugging-pipe``, standard library only) and each picture is taken once the page
shows no spinner or skeleton and its charts have drawn. Look at the PNGs before committing them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
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

from lifelong_moe import names
from lifelong_moe.tracking import queries
from lifelong_moe.tracking import store as tracking_store

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
# True once the page has content and nothing in view is loading: no spinner (any element that
# animates forever: MLflow's spinners carry no telling class), skeleton or busy element, and
# every chart container holds a drawn plot (MLflow draws charts with Plotly).
READY = """(() => {
  const inView = e => [...e.getClientRects()].some(r => r.bottom > 0 && r.top < innerHeight);
  const spinning = [...document.querySelectorAll('body *')].filter(e => {
    const style = getComputedStyle(e);
    return style.animationName !== 'none' && style.animationIterationCount === 'infinite';
  });
  const busy = document.querySelectorAll(
    '[role="progressbar"], [aria-busy="true"], [class*="skeleton" i], [class*="spinner" i]');
  const loading = [...spinning, ...busy].filter(inView);
  const text = document.body ? document.body.innerText.trim() : '';
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  const drawn = plots.every(p => p.querySelector('.main-svg'));
  return loading.length === 0 && text.length > 200 && drawn;
})()"""
# The UI's own settings in the browser's storage: the assistant side panel (a third of the width)
# closed, as if the user had closed it once.
UI_SETTINGS = {
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
}
# The element to click before a picture, if any (JavaScript that finds it): the description's
# "Show more", so the parent's page shows its whole verdict and table.
SHOW_MORE = """[...document.querySelectorAll('button, a, span')]
  .find(e => e.innerText && e.innerText.trim() === 'Show more')"""


def fill(store: Path, uri: str, overrides: list[str]) -> None:
    """The demo sweep into the store (its parent run holds the comparison)."""
    command = [
        str(BIN / "lifelong-moe"),
        "-m",
        "experiment=demo",
        "method=naive,joint,moe_finetune,lifelong_moe",
        f"tracking.sweep_id={SWEEP_ID}",
        f"tracking.uri={uri}",
        *overrides,
    ]
    subprocess.run(command, cwd=store, check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(store: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on store/mlflow.db, serving store/mlartifacts; up before we return."""
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        "--backend-store-uri=sqlite:///mlflow.db",
        "--artifacts-destination=mlartifacts",
    ]
    log = open(store / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        command, cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow server did not start; see {store / 'server.log'}")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 in Chromium:
    NUL-terminated JSON messages), one page of a given size."""

    def __init__(self, width: int = 1600, height: int = 1000) -> None:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("no chromium: apt-get update && apt-get install -y chromium")
        self.profile = tempfile.TemporaryDirectory()
        to_child, self.writer = os.pipe()
        self.reader, from_child = os.pipe()
        # Above fd 4, so that placing them at 3 and 4 in the child cannot clobber one another.
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
        os.close(to_child)
        os.close(from_child)

        def place() -> None:  # in the child, before exec
            os.dup2(theirs[0], 3)
            os.dup2(theirs[1], 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile.name}",
                "about:blank",
            ],
            close_fds=False,
            preexec_fn=place,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in theirs:
            os.close(fd)
        self.last_id, self.buffer, self.session, self.configured = 0, b"", None, False
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        self.resize(width, height)

    def send(self, method: str, params: dict | None = None) -> dict:
        """One command; returns its result (events in between are skipped)."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.reader, 1 << 20)
                if not chunk:
                    raise SystemExit(f"chromium exited during {method}")
                self.buffer += chunk
            raw, _, self.buffer = self.buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def resize(self, width: int, height: int) -> None:
        size = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", size)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def settle(self, timeout: float) -> bool:
        """Wait until the page has rendered and stayed so for 3 s; False after timeout."""
        ready_since, deadline = None, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(READY):
                ready_since = ready_since or time.monotonic()
                if time.monotonic() - ready_since >= 3:
                    return True
            else:
                ready_since = None
            time.sleep(0.5)
        return False

    def click(self, finder: str) -> bool:
        """A real mouse click (menus open on pointer events) on the element ``finder`` returns."""
        where = self.evaluate(
            f"(() => {{ const e = {finder}; if (!e) return null; e.scrollIntoView(); "
            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if not where:
            return False
        for kind in ("mousePressed", "mouseReleased"):
            event = {"type": kind, "x": where[0], "y": where[1], "button": "left", "clickCount": 1}
            self.send("Input.dispatchMouseEvent", event)
        return True

    def shoot(
        self,
        url: str,
        path: Path,
        width: int,
        height: int,
        click: str | None = None,
        timeout: float = 180,
    ) -> None:
        """Open url, wait until it has rendered, click ``click`` if given, and save a PNG."""
        self.resize(width, height)
        if not self.configured:  # the UI's settings live in its origin's storage
            self.send("Page.navigate", {"url": url})
            time.sleep(2)
            for key, value in UI_SETTINGS.items():
                self.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
            self.configured = True
        self.send("Page.navigate", {"url": "about:blank"})
        self.send("Page.navigate", {"url": url})
        time.sleep(2)
        ready = self.settle(timeout)
        if ready and click and self.click(click):
            time.sleep(1)
            ready = self.settle(timeout)
        if not ready:
            print(f"warning: {path.name}: still loading after {timeout:.0f} s", file=sys.stderr)
        # Back to the top of every scrolled panel (the click may have scrolled one).
        self.evaluate("document.querySelectorAll('*').forEach(e => { e.scrollTop = 0; })")
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")

    def close(self) -> None:
        self.session = None
        with contextlib.suppress(SystemExit, RuntimeError, OSError):  # already gone
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.profile.cleanup()


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


def shots(client: MlflowClient, base: str, parent, run) -> dict[str, tuple]:
    """Picture name -> (URL, width, height, element to click first or None)."""
    p, r = parent.info.run_id, run.info.run_id
    found = {
        "runs": (f"{base}/runs?{MODE}", 1400, 420, None),
        "parent_description": (f"{base}/runs/{p}?{MODE}", 1400, 1000, SHOW_MORE),
        # The runs folded under their parent: the chart view shows the parent's own charts
        # (below the runs' sections, empty while they are folded).
        "parent_charts": (f"{base}/runs?{MODE}&compareRunsMode=CHART", 1400, 1400, None),
        "parent_table": (
            f"{base}/runs/{p}/artifacts/{names.COMPARISON_TABLE}?{MODE}",
            1400,
            420,
            None,
        ),
        "run_charts": (f"{base}/runs/{r}/model-metrics?{MODE}", 1400, 1000, None),
    }
    for who, run_id, pictures in (
        ("parent", p, ("accuracy_curves.png", "accuracy_matrices.png")),
        ("run", r, (names.ACCURACY_PLOT, names.ROUTING_PLOT)),
    ):
        for name in pictures:
            path = find_artifact(client, run_id, name)
            if path:
                url = f"{base}/runs/{run_id}/artifacts/{path}?{MODE}"
                found[f"{who}_{Path(name).stem}"] = (url, 1400, 720, None)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="folder with (or for) mlflow.db")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "ui")
    parser.add_argument("--only", nargs="*", help="take only these pictures (names without .png)")
    parser.add_argument("overrides", nargs="*", help="more overrides for the demo sweep")
    args = parser.parse_args()
    store = (args.store or Path(tempfile.mkdtemp(prefix="ui-demo-"))).resolve()
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = serve(store, port)
    browser = None
    try:
        client = tracking_store.client(uri)

        def parent_run():
            experiment_id = queries.experiment_id(client, EXPERIMENT)
            if experiment_id is None:
                return None, None
            clause = f"tags.{names.TAG_KIND} = '{names.KIND_SWEEP}'"
            found = queries.search_runs(client, [experiment_id], clause)
            newest = max(found, key=lambda r: r.info.start_time) if found else None
            return experiment_id, newest

        experiment_id, parent = parent_run()
        if parent is None:
            fill(store, uri, args.overrides)
            experiment_id, parent = parent_run()
        sweep = parent.data.tags[names.TAG_SWEEP_ID]
        (run,) = [
            r
            for r in queries.sweep_runs(client, experiment_id, sweep)
            if r.data.tags.get(names.TAG_METHOD) == "lifelong_moe"
        ]
        args.out.mkdir(parents=True, exist_ok=True)
        base = f"{uri}/#/experiments/{experiment_id}"
        browser = Browser()
        for name, (url, width, height, click) in shots(client, base, parent, run).items():
            if not args.only or name in args.only:
                browser.shoot(url, args.out / f"{name}.png", width, height, click)
    finally:
        if browser is not None:
            browser.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
