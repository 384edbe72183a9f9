"""Where the configuration lives: the packaged conf/ and the groups a command line may choose from.

Installed from a wheel, conf/ is the package ``lifelong_moe.conf``; in a source checkout it is the
top-level conf/. A user's own config directories (``--config-dir``, ``hydra.searchpath``) add
choices to every group; ``choices`` reads them all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def conf_dir() -> Path:
    """conf/ inside the installed package (wheel), else the source tree's top-level conf/."""
    packaged = _PACKAGE / "conf"
    return packaged if (packaged / "config.yaml").is_file() else _PACKAGE.parent / "conf"


CONF_DIR = conf_dir()
GROUPS = ("benchmark", "model", "method", "trainer", "tracking", "experiment")


def choices(group: str, extra_dirs: Iterable[Path] = ()) -> list[str]:
    """The options of one group: the packaged ones and those in the user's config directories."""
    found = {p.stem for d in (CONF_DIR, *extra_dirs) for p in (Path(d) / group).glob("*.yaml")}
    return sorted(found)
