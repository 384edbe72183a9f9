"""Where the configuration lives: the packaged conf/, the user's own config directories, and the
groups a command line may choose from.

Installed from a wheel, conf/ is the package ``lifelong_moe.conf``; in a source checkout it is the
top-level conf/. A user's own config directories (``--config-dir``/``-cd DIR`` and
``hydra.searchpath=[file://DIR, pkg://package]``) add choices to every group; ``choices`` reads
them all, so the one-line check of ``method=mine`` agrees with what Hydra composes. Python files
beside a user's configs are importable (``_target_: my_method.MyMethod``): the CLI puts every
user config directory on ``sys.path`` (:func:`importable`) before it composes or builds anything,
and every job does again (a launcher may run it in a process of its own).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from lifelong_moe.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent.parent
SEARCHPATH = "hydra.searchpath"


def conf_dir() -> Path:
    """conf/ inside the installed package (wheel), else the source tree's top-level conf/."""
    packaged = _PACKAGE / "conf"
    return packaged if (packaged / "config.yaml").is_file() else _PACKAGE.parent / "conf"


CONF_DIR = conf_dir()
GROUPS = (
    "benchmark",
    "model",
    "method",
    "trainer",
    "schedule",
    "checkpoint",
    "tracking",
    "experiment",
)


def choices(group: str, extra_dirs: Iterable[Path] = ()) -> list[str]:
    """The options of one group: the packaged ones and those in the user's config directories."""
    found = {p.stem for d in (CONF_DIR, *extra_dirs) for p in (Path(d) / group).glob("*.yaml")}
    return sorted(found)


def _option_value(args: Sequence[str], *flags: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` (the last one given, as argparse)."""
    found = None
    for k, arg in enumerate(args):
        name, sep, value = arg.partition("=")
        if name in flags:
            found = value if sep else (args[k + 1] if k + 1 < len(args) else None)
    return found


def searchpath_entries(args: Sequence[str]) -> list[str]:
    """The entries of ``hydra.searchpath=[...]`` on the command line (Hydra reads the first)."""
    overrides = [a for a in args if a.lstrip("+~").startswith(SEARCHPATH + "=")]
    if not overrides:
        return []
    try:
        (override,) = OverridesParser.create().parse_overrides(overrides[:1])
    except HydraException as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{overrides[0]}: {first}") from None
    value = override.value()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{overrides[0]}: expected a list such as [file:///path/to/configs]")
    return value


def _directory(entry: str, where: str) -> Path:
    """A search path entry as a directory: ``file://DIR`` (or a plain path), ``pkg://package``."""
    scheme, sep, rest = entry.partition("://")
    if sep and scheme == "pkg":
        try:
            spec = importlib.util.find_spec(rest.replace("/", "."))
        except ImportError:
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise ConfigError(f"{where}={entry}: expected an importable package of configs")
        return Path(locations[0])
    if sep and scheme != "file":
        raise ConfigError(f"{where}={entry}: expected file://DIR or pkg://package")
    path = Path(rest if sep else entry).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{where}={entry}: expected a directory ({path} is none)")
    return path


def user_config_dirs(args: Sequence[str]) -> list[Path]:
    """The user's config directories on a command line, in Hydra's search order:
    ``--config-dir``/``-cd`` first, then the ``hydra.searchpath`` entries."""
    dirs = []
    config_dir = _option_value(args, "--config-dir", "-cd")
    if config_dir is not None:
        dirs.append(_directory(config_dir, "--config-dir"))
    dirs += [_directory(entry, SEARCHPATH) for entry in searchpath_entries(args)]
    return dirs


def importable(dirs: Iterable[Path]) -> None:
    """Python files beside the user's configs import by their name (``my_method.MyMethod``):
    each directory goes to the front of ``sys.path``, once."""
    for path in reversed([str(d) for d in dirs]):
        if path not in sys.path:
            sys.path.insert(0, path)
