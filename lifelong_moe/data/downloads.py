"""Decide, before Avalanche starts, whether a classic dataset can be had: on disk, or downloadable.

torchvision's downloaders retry mirrors and can sit on a dead network for minutes, then fail
with a multi-line traceback. Here a missing dataset costs a file check and, at most, one
connection attempt with a short timeout; the user gets one line saying where the files go.
"""

from __future__ import annotations

import pickle
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from lifelong_moe.errors import ConfigError

PROBE_TIMEOUT_S = 3.0

LOAD_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)
LOAD_ERRORS += (tarfile.TarError,)


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to ``url``'s host? Name lookup included, within ``timeout``.

    The attempt runs in a daemon thread because ``getaddrinfo`` ignores socket timeouts.
    """
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ok: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def resolve_root(root: str | Path | None, avalanche_name: str) -> Path:
    """The folder Avalanche reads: ``root`` or Avalanche's default (``~/.avalanche/data/NAME``)."""
    if root is None:
        from avalanche.benchmarks.datasets import default_dataset_location

        return Path(default_dataset_location(avalanche_name))
    return Path(root).expanduser()


def require(
    root: Path, files: Sequence[str], *, what: str, url: str, download: bool, hint: str
) -> None:
    """Return if ``files`` (relative to ``root``) exist or a download can start; else ConfigError."""
    missing = [name for name in files if not (root / name).exists()]
    if not missing:
        return
    if download and reachable(url):
        return
    reason = (
        "benchmark.download=false"
        if not download
        else f"it could not be downloaded ({urlparse(url).hostname} unreachable: offline?)"
    )
    raise ConfigError(
        f"benchmark.dataset_root={root} has no {what} data ({missing[0]} missing) and {reason}: "
        f"put {hint} there or run where the internet is reachable"
    )


@contextmanager
def loading(root: Path, what: str) -> Iterator[None]:
    """Turn a failed read or download inside Avalanche/torchvision into one ConfigError line."""
    try:
        yield
    except LOAD_ERRORS as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"benchmark.dataset_root={root}: could not load or download {what} "
            f"({type(err).__name__}: {first})"
        ) from None
