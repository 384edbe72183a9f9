"""Console entry point ``lifelong-moe``: a Hydra app over conf/ that runs one experiment per job."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from lifelong_moe.run import signals

signals.install()  # before the heavy imports: a Ctrl-C during startup prints one line too

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import CompactHydraException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from lifelong_moe import log, names  # noqa: E402
from lifelong_moe.config.aliases import modernize_overrides  # noqa: E402
from lifelong_moe.config.files import (  # noqa: E402
    CONF_DIR,
    GROUPS,
    choices,
    importable,
    user_config_dirs,
)
from lifelong_moe.errors import ConfigError, NonFiniteLossError  # noqa: E402


def check_choices(args: list[str], extra_dirs: Sequence[Path] = ()) -> None:
    """Reject ``group=unknown`` in one line, before Hydra composes (its message spans many lines).

    The options are the packaged ones and those in the user's config directories.
    """
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        for option in value.split(","):
            known = choices(key, extra_dirs)
            if option and option != "null" and option not in known:
                raise ConfigError(f"unknown {key} '{option}'; choose one of: {', '.join(known)}")


def sweep_id() -> str | None:
    """Under ``-m`` every job of one sweep shares the sweep directory: use it as the sweep id."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    from lifelong_moe.tracking.sweep import sweep_id_from_dir  # the parent run uses it too

    return sweep_id_from_dir(hydra_cfg.sweep.dir)


class JobFailed(CompactHydraException):
    """A sweep's job failed and said why in its own line: Hydra records it and runs the others.

    Hydra's launchers go on after an ``Exception`` from a job (not after ``SystemExit``), and
    print a ``CompactHydraException`` as its message alone (after the failed job's overrides)
    once the sweep has ended; the process then exits with status 1.
    """


def fail(message: str, exit_code: int) -> NoReturn:
    """One line on stderr; then end the process, or under ``-m`` only this job."""
    print(message, file=sys.stderr, flush=True)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(message)
    sys.exit(exit_code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> float | None:
    from lifelong_moe.run.loop import run

    with open_dict(cfg):
        if cfg.tracking.get("sweep_id") is None:
            cfg.tracking.sweep_id = sweep_id()
    signals.install()  # again: a launcher (submitit) may run this job in a process of its own
    log.to_job_log()  # what the console shows goes to this job's log under outputs/ too
    sources = HydraConfig.get().runtime.config_sources  # the user's --config-dir, searchpath
    importable(Path(s.path) for s in sources if s.schema == "file" and s.provider != "main")
    try:
        summary = run(cfg)
    except signals.Interrupted as stop:  # Ctrl-C stops a whole sweep: SystemExit, not a failure
        if signals.STATE.run_id is None:
            print(
                f"interrupted ({stop}) before the run started: nothing was recorded",
                file=sys.stderr,
            )
        sys.exit(stop.exit_code)
    except ConfigError as error:
        fail(f"error: {error}", 2)
    except NonFiniteLossError as error:
        fail(f"error: {error}; the run is marked FAILED", 1)
    return summary["metrics"].get(names.ACC_FINAL)


def main() -> None:
    from lifelong_moe.config.schema import check_command_line
    from lifelong_moe.tracking.hydra_callback import close_open_parents

    try:
        # An old key (trainer.lr_schedule) is read as today's (schedule.name), with a note;
        # Hydra's app reads sys.argv itself.
        args = sys.argv[1:] = modernize_overrides(sys.argv[1:])
        user_dirs = user_config_dirs(args)
        importable(user_dirs)  # _target_: my_method.MyMethod beside the user's configs
        check_choices(args, user_dirs)
        # Every job's config, composed and checked before Hydra runs any: a misspelt key or a
        # bad value is one line here, not Hydra's multi-line refusal or a failed sweep.
        check_command_line(args, CONF_DIR, extra_dirs=user_dirs)
        app()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except signals.Interrupted as stop:  # outside the job: while Hydra composes the config
        print(f"interrupted ({stop}) before the run started: nothing was recorded", file=sys.stderr)
        sys.exit(stop.exit_code)
    finally:  # a sweep whose job failed: finish its parent run with what did finish
        close_open_parents()


if __name__ == "__main__":
    main()
