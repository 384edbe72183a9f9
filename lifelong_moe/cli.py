"""Console entry point ``lifelong-moe``: a Hydra app over conf/ that runs one experiment per job."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from lifelong_moe.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("benchmark", "model", "method", "trainer", "tracking", "experiment")


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_choices(args: list[str]) -> None:
    """Reject ``group=unknown`` in one line, before Hydra composes (its message spans many lines)."""
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        for option in value.split(","):
            if option and option != "null" and option not in choices(key):
                raise ConfigError(
                    f"unknown {key} '{option}'; choose one of: {', '.join(choices(key))}"
                )


def sweep_id() -> str | None:
    """Under ``-m`` every job of one sweep shares the sweep directory: use it as the sweep id."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    from lifelong_moe.tracking.sweep import sweep_id_from_dir  # the parent run uses it too

    return sweep_id_from_dir(hydra_cfg.sweep.dir)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> float | None:
    from lifelong_moe.methods.base import NonFiniteLossError
    from lifelong_moe.runner import run

    with open_dict(cfg):
        if cfg.tracking.get("sweep_id") is None:
            cfg.tracking.sweep_id = sweep_id()
    try:
        summary = run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:
        print(f"error: {error}; the run is marked FAILED", file=sys.stderr)
        sys.exit(1)
    return summary["metrics"].get("acc/final")


def main() -> None:
    try:
        check_choices(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from lifelong_moe.tracking.hydra_callback import close_open_parents

    try:
        app()
    finally:  # a sweep whose job failed: finish its parent run with what did finish
        close_open_parents()


if __name__ == "__main__":
    main()
