"""Typed configuration: every key of every group is checked before anything is built.

A bad value or a misspelt key is refused in one ``ConfigError`` line that names the key, the
value and what was expected, before seeding, data or the MLflow run. Two kinds of schema:

- the plain groups (``trainer``, ``tracking``) and the top-level keys have a table here,
  key -> check from ``lifelong_moe.checks``;
- the ``_target_`` groups (``benchmark``, ``model``, ``method``) are checked against the
  target's signature: a key must be one of its parameters, a value must fit the parameter's
  annotation. The target's constructor keeps the range checks, which need its semantics.

``check_command_line`` runs the same checks on the command line in the CLI, before Hydra: it
turns Hydra's multi-line refusal of a misspelt key into one line, and checks every job of a
``-m`` sweep before any of them runs.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lifelong_moe import checks, compat
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.lr_schedule import SCHEDULES
from lifelong_moe.moe import MoESettings
from lifelong_moe.targets import parameters

Check = Callable[[str, Any], Any]


# -- values against annotations -----------------------------------------------------------------
def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _is_sequence(annotation: Any) -> bool:
    base = typing.get_origin(annotation) or annotation
    return base in (list, tuple, collections.abc.Sequence)


def _is_mapping(annotation: Any) -> bool:
    base = typing.get_origin(annotation) or annotation
    return base in (dict, collections.abc.Mapping)


def fits(annotation: Any, value: Any) -> bool:
    """Whether a config value (plain YAML data) fits a parameter's annotation.

    Annotations that YAML cannot express (``nn.Module``, ``Path``, ...) accept anything: the
    target's constructor judges those.
    """
    if annotation in (Any, inspect.Parameter.empty, object):
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if _is_union(annotation):
        return any(fits(option, value) for option in typing.get_args(annotation))
    if typing.get_origin(annotation) is Literal:
        # true == 1 in Python: a Literal[1] must not take true
        return any(value == v and type(value) is type(v) for v in typing.get_args(annotation))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return checks.is_int(value)
    if annotation is float:
        return checks.is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if _is_sequence(annotation):
        item = (typing.get_args(annotation) or (Any,))[0]
        return isinstance(value, list | tuple) and all(fits(item, v) for v in value)
    if _is_mapping(annotation) or dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    return True


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def describe(annotation: Any) -> str:
    """What an annotation expects, in the words of ``lifelong_moe.checks``."""
    if annotation is None or annotation is type(None):
        return "null"
    if _is_union(annotation):
        options = typing.get_args(annotation)
        words = [describe(o) for o in options if o is not type(None)]
        return " or ".join(words + ["null"] * (type(None) in options))
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(annotation))
    if annotation in _NAMES:
        return _NAMES[annotation]
    if _is_sequence(annotation):
        item = (typing.get_args(annotation) or (Any,))[0]
        return f"a list of {_PLURALS[item]}" if item in _PLURALS else "a list"
    if _is_mapping(annotation) or dataclasses.is_dataclass(annotation):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def check_value(key: str, value: Any, annotation: Any) -> None:
    if not fits(annotation, value):
        raise ConfigError(f"{key}={value!r}: expected {describe(annotation)}")
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        check_keys(key, value, fields_of(annotation))


def typed(annotation: Any) -> Check:
    """A check from an annotation, for the tables below: ``typed(str | None)``."""
    return lambda key, value: check_value(key, value, annotation)


def unknown_key(key: str, valid: Iterable[str]) -> ConfigError:
    """``trainer.max_epoch: unknown key; did you mean trainer.max_epochs?``"""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return ConfigError(f"{key}: unknown key; did you mean {prefix}{close[0]}?")
    if not valid:
        return ConfigError(f"{key}: unknown key")
    return ConfigError(f"{key}: unknown key; valid keys: {', '.join(valid)}")


def check_keys(group: str, node: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Every key of ``node`` is in ``schema`` (name -> annotation) and its value fits."""
    for name, value in node.items():
        if name not in schema:
            raise unknown_key(f"{group}.{name}", schema)
        check_value(f"{group}.{name}", value, schema[name])


def fields_of(settings: type) -> dict[str, Any]:
    """(name -> annotation) of a dataclass's fields, string annotations resolved: the keys a
    builder consumes beside its target's own parameters (see ``EXTRA_FIELDS``)."""
    hints = typing.get_type_hints(settings)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(settings)}


# -- the top level and the plain groups ---------------------------------------------------------
def _precision(key: str, value: Any) -> None:
    """The values Lightning accepts: 32-true, bf16-mixed, ..., and the aliases 32, "bf16"."""

    def flat(annotation: Any) -> list:
        args = typing.get_args(annotation)
        return [v for a in args for v in flat(a)] if _is_union(annotation) else list(args)

    valid = flat(compat.precision_input())
    if not fits(Literal[tuple(valid)], value):
        checks.choice(key, value, dict.fromkeys(str(v) for v in valid))


def _lightning_strategies() -> tuple:
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def _devices(key: str, value: Any) -> None:
    if value != "auto":
        checks.positive_int(key, value)


def _deterministic(key: str, value: Any) -> None:
    if value != "warn":  # Lightning: warn instead of failing on non-deterministic ops
        checks.boolean(key, value)


TOP_LEVEL: dict[str, Check] = {
    "seed": functools.partial(checks.integer, low=0, high=2**32 - 1),
    "resume": typed(str | None),  # an MLflow run id, or "last"
    "resume_force": checks.boolean,
    "resume_trust": checks.boolean,
}
TRAINER: dict[str, Check] = {
    "max_epochs": checks.positive_int,
    # run/budget.py: either replaces max_epochs; both together are refused (check_trainer)
    "max_steps": functools.partial(checks.optional, checks.positive_int),
    "max_tokens": functools.partial(checks.optional, checks.positive_int),
    "accumulate_grad_batches": checks.positive_int,
    "val_check_interval": functools.partial(checks.optional, checks.positive_int),
    "batch_size": checks.positive_int,
    "eval_batch_size": checks.positive_int,
    "num_workers": checks.non_negative_int,
    "accelerator": functools.partial(checks.choice, valid=("cpu", "gpu", "cuda", "mps", "auto")),
    "devices": _devices,
    "num_nodes": checks.positive_int,
    "expert_parallel": checks.positive_int,  # run/distributed.py: a divisor of the world size
    "strategy": lambda key, value: checks.choice(key, value, _lightning_strategies()),
    "precision": _precision,
    "progress_bar": checks.boolean,
    "gradient_clip_val": functools.partial(checks.optional, checks.non_negative),
    "deterministic": _deterministic,
    "compile": checks.boolean,
    # methods/lr_schedule.py checks these again, with the relations between them
    "lr_schedule": functools.partial(checks.choice, valid=SCHEDULES),
    "warmup_steps": checks.non_negative_int,
    "lr_floor": checks.fraction,
    "lr_constant": checks.fraction,
    "cooldown_steps": checks.non_negative_int,
    "anneal_steps": checks.non_negative_int,
    "checkpoint_every_n_steps": checks.non_negative_int,
    "checkpoint_dir": typed(str),
    "checkpoint_keep": checks.positive_int,
    "checkpoint_async": functools.partial(checks.choice, valid=("auto", True, False)),
}
TRACKING: dict[str, Check] = {
    "uri": typed(str),
    "experiment": typed(str),
    "run_name": typed(str | None),
    "sweep_id": typed(str | None),
    "log_checkpoints": checks.boolean,
    "keep_resume_state": checks.boolean,
    "system_metrics": checks.boolean,
    "system_metrics_interval_s": checks.positive,
    "export": lambda key, value: checks.choice(key, value, ("none", "hf")),
    "export_every": checks.positive_int,
    "log_every_n_steps": checks.non_negative_int,  # training curves (run/curves.py); 0: none
}
LM_EVAL: dict[str, Check] = {
    "tasks": typed(list[str]),  # evaluation/downstream.py checks the names against lm-eval
    "include_path": typed(str | None),
    "every": checks.positive_int,
    "limit": functools.partial(checks.optional, checks.positive_int),
    "num_fewshot": functools.partial(checks.optional, checks.non_negative_int),
    "batch_size": checks.positive_int,
    "progress_every": checks.positive_int,  # requests between lm-eval progress lines
}


def _lm_eval(key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r}: expected a mapping of {', '.join(LM_EVAL)}")
    check_table(key, value, LM_EVAL)


EVALUATION: dict[str, Check] = {
    "max_batches": functools.partial(checks.optional, checks.positive_int),
    "lm_eval": _lm_eval,
}
# Keys of a _target_ group that a builder consumes beside the target's own parameters:
# group -> {key: annotation}. The model's flat MoE keys become the backbone's one ``moe``.
EXTRA_FIELDS: dict[str, dict[str, Any]] = {"model": MoESettings.config_annotations()}
# Parameters the runner passes itself (from the benchmark, the built model): not config keys.
SUPPLIED = {"benchmark": (), "model": ("input_shape", "n_classes"), "method": ("model",)}
TARGET_GROUPS = tuple(SUPPLIED)
PLAIN_GROUPS = ("trainer", "tracking")
# Groups that configs stored by older runs (resume) lack: checked when present.
OPTIONAL_GROUPS = ("evaluation",)


def check_table(group: str, node: Mapping[str, Any], table: Mapping[str, Check]) -> None:
    """Only the keys present: configs stored by older runs (resume) may lack newer keys."""
    for name, value in node.items():
        if name not in table:
            raise unknown_key(f"{group}.{name}", table)
        table[name](f"{group}.{name}", value)


def check_trainer(cfg: Mapping[str, Any]) -> None:
    check_table("trainer", cfg, TRAINER)
    check_budget(cfg)
    if cfg.get("num_nodes", 1) > 1 and cfg.get("strategy") != "ddp":
        raise ConfigError(
            f"trainer.strategy={cfg.get('strategy')} with trainer.num_nodes={cfg['num_nodes']}: "
            "several nodes need trainer.strategy=ddp (one process per device, started by "
            "SLURM/torchrun)"
        )


def check_budget(trainer: Mapping[str, Any]) -> None:
    """One budget per experience (run/budget.py): ``max_steps`` and ``max_tokens`` together are
    refused."""
    steps, tokens = trainer.get("max_steps"), trainer.get("max_tokens")
    if steps is not None and tokens is not None:
        raise ConfigError(
            f"trainer.max_steps={steps} with trainer.max_tokens={tokens}: expected one budget "
            "per experience (set the other to null)"
        )


def check_tracking(cfg: Mapping[str, Any]) -> None:
    check_table("tracking", cfg, TRACKING)


# -- the _target_ groups ------------------------------------------------------------------------
def target_schema(group: str, node: Mapping[str, Any]) -> dict[str, Any]:
    """(key -> annotation) of what a ``_target_`` group node may hold; {"**": Any} included
    when the target takes any keyword."""
    target = node.get("_target_")
    if target is None:
        raise ConfigError(f"{group}._target_: missing; expected the class that {group} builds")
    try:
        schema = dict(parameters(str(target)))
    except ConfigError as error:
        raise ConfigError(f"{group}.{error}") from None
    schema.update(EXTRA_FIELDS.get(group, {}))
    for name in SUPPLIED.get(group, ()):
        schema.pop(name, None)
    schema["name"] = str  # which preset this is: tags and plot titles
    return schema


def check_target(group: str, node: Mapping[str, Any]) -> None:
    """The node's keys against its ``_target_``'s signature (and ``EXTRA_FIELDS``), values
    against their annotations."""
    schema = target_schema(group, node)
    open_ended = schema.pop("**", None) is not None
    for name, value in node.items():
        if name.startswith("_") and name.endswith("_"):  # _target_ and Hydra's own keys
            continue
        if name in SUPPLIED.get(group, ()):
            raise ConfigError(f"{group}.{name}: set by the runner, not by the config")
        if name in schema:
            check_value(f"{group}.{name}", value, schema[name])
        elif not open_ended:
            raise unknown_key(f"{group}.{name}", schema)


# -- the whole config ---------------------------------------------------------------------------
def plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data with interpolations resolved; a broken one is a ConfigError."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{key}: {first}") from None


def check_config(cfg: DictConfig) -> None:
    """Every key of the composed config: first thing in ``runner.build`` (and in the CLI)."""
    data = plain(cfg)
    for name, value in data.items():
        if name in TOP_LEVEL:
            TOP_LEVEL[name](name, value)
        elif name not in (*TARGET_GROUPS, *PLAIN_GROUPS, *OPTIONAL_GROUPS):
            raise unknown_key(name, [*TOP_LEVEL, *TARGET_GROUPS, *PLAIN_GROUPS, *OPTIONAL_GROUPS])
    for group in (*TARGET_GROUPS, *PLAIN_GROUPS):
        if not isinstance(data.get(group), dict):
            raise ConfigError(f"{group}: missing; choose one with {group}=<name>")
    for group in TARGET_GROUPS:
        check_target(group, data[group])
    check_trainer(data["trainer"])
    check_tracking(data["tracking"])
    if "evaluation" in data:
        if not isinstance(data["evaluation"], dict):
            raise ConfigError("evaluation: expected a mapping; choose one with evaluation=<name>")
        check_table("evaluation", data["evaluation"], EVALUATION)


# -- the command line, before Hydra -------------------------------------------------------------
def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _one_line(error: Exception) -> str:
    """Hydra's composition messages span lines: keep what names the problem."""
    from hydra.errors import MissingConfigException, OverrideParseException

    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, OverrideParseException):
        return f"{error.override}: {first}"
    if isinstance(error, MissingConfigException) and error.options:
        return f"{first}; choose one of: {', '.join(error.options)}"
    return first


def _compose(
    config_dir: Path, config_name: str, overrides: list[str], extra_dirs: Sequence[Path] = ()
) -> DictConfig:
    """The job's config as Hydra composes it; a key Hydra refuses becomes ``unknown_key``.

    ``extra_dirs`` (the user's ``--config-dir`` and ``hydra.searchpath``) come after conf/ in
    the search path, as Hydra puts them: one ``hydra.searchpath`` override stands for both.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    if extra_dirs:
        searchpath = ",".join(f"'file://{d}'" for d in extra_dirs)
        overrides = [o for o in overrides if _override_key(o) != "hydra.searchpath"]
        overrides = [*overrides, f"hydra.searchpath=[{searchpath}]"]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            return compose(config_name, overrides)
        except Exception as error:  # any refusal of the command line (Hydra's, OmegaConf's)
            key = getattr(error.__cause__, "full_key", None)
            if not isinstance(error, ConfigCompositionException) or not key:
                raise ConfigError(_one_line(error)) from None
            # compose without the refused override to see which keys are there
            rest = [o for o in overrides if _override_key(o) != key]
            try:
                cfg = compose(config_name, rest, return_hydra_config=key.startswith("hydra."))
            except Exception:
                raise ConfigError(_one_line(error)) from None
            raise _refused(key, cfg, overrides) from None


def _refused(key: str, cfg: DictConfig, overrides: list[str]) -> ConfigError:
    """A key Hydra refuses: misspelt, or a parameter of the target that the preset leaves out."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return unknown_key(key, ())
    valid = [k for k in node if not (k.startswith("_") and k.endswith("_"))]
    if parent in TARGET_GROUPS and "_target_" in node:
        schema = target_schema(parent, OmegaConf.to_container(node))
        if name in schema:
            added = next((o for o in overrides if _override_key(o) == key), key)
            return ConfigError(f"{key}: not in this {parent} preset; add it with +{added}")
        valid = [k for k in schema if k != "**"]
    return unknown_key(key, valid)


def jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The overrides of every job: one for a run, the expanded sweep under ``-m``.

    A sweep only another sweeper expands (``interval(0, 1)`` for Optuna) is left out here.
    """
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ConfigError(_one_line(error)) from None
    discrete = [o for o in parsed if not o.is_sweep_override() or o.is_discrete_sweep()]
    return compat.split_sweep(discrete)[0]


def check_command_line(
    args: list[str],
    config_dir: Path,
    config_name: str = "config",
    extra_dirs: Sequence[Path] = (),
) -> None:
    """Compose and check the config of every job the command would run, before Hydra runs any.

    ``extra_dirs`` are the user's config directories (``config.files.user_config_dirs``).
    Skipped for Hydra's informational flags (--help, --cfg, --info, ...) and when the command
    moves the primary config (--config-path): runner.build checks then.
    """
    parsed = compat.hydra_args_parser().parse_args(args)
    informational = parsed.help or parsed.hydra_help or parsed.cfg or parsed.info
    if informational or parsed.shell_completion or parsed.config_path:
        return
    name = parsed.config_name or config_name
    for overrides in jobs(parsed.overrides, parsed.multirun):
        check_config(_compose(config_dir, name, overrides, extra_dirs))
