"""Config nodes with a ``_target_``: which classes they may name, and building them.

Shared by the config schema (checks a node against its target's signature) and the builders
(models, the run loop); it imports nothing of ours but the error type, so anyone may use it.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Mapping
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lifelong_moe import compat
from lifelong_moe.errors import ConfigError


@functools.cache
def parameters(target: str) -> dict[str, Any]:
    """(name -> annotation) of the target's keyword parameters; {"**": Any} if it takes **kwargs.

    A class whose ``__init__`` passes ``**kwargs`` on to its base (a method's common arguments:
    ``def __init__(self, model, strength=1.0, **base)``) has its bases' parameters too, so the
    config is checked against everything the class really accepts."""
    try:
        obj = compat.hydra_locate(target)
    except Exception as error:
        why = error.__cause__ or (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"_target_={target!r}: expected an importable class ({why})") from None
    if not inspect.isclass(obj):
        return _signature(obj)
    found: dict[str, Any] = {}
    for cls in obj.__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        own = _signature(cls.__init__)
        found.update({k: v for k, v in own.items() if k not in found and k != "**"})
        if "**" not in own:  # this one takes no **kwargs: the chain ends here
            return found
    return {**found, "**": Any}


def _signature(function: Any) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that does not resolve: check the names only
        hints = {}
    found: dict[str, Any] = {}
    for name, p in inspect.signature(function).parameters.items():
        if name == "self":
            continue
        if p.kind is p.VAR_KEYWORD:
            found["**"] = Any
        elif p.kind is not p.VAR_POSITIONAL:
            found[name] = hints.get(name, Any)
    return found


OWN_PACKAGE = "lifelong_moe."


def check_own_targets(node: Any, where: str, hint: str, path: str = "") -> None:
    """A config read from where others can write (a tracking server's run, a model file) builds
    only the toolkit's own classes: a ``_target_`` is called with its node's keys, so
    ``_target_: os.system`` would run a command on whoever resumes or loads it."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(OWN_PACKAGE):
            key = f"{path}._target_" if path else "_target_"
            raise ConfigError(
                f"{where}: {key}={target!r} is not one of lifelong_moe's classes; {hint}"
            )
        for key, value in node.items():
            check_own_targets(value, where, hint, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            check_own_targets(value, where, hint, f"{path}[{k}]")


def instantiate(node: DictConfig | Mapping[str, Any], group: str, **supplied: Any) -> Any:
    """Build a config group node's ``_target_`` with ``supplied`` objects (the model, the
    input shape), surfacing the user's ConfigError as itself.

    Hydra builds a partial from the config only: objects the runner supplies are passed as
    they are (Hydra would turn a dataclass such as MoESettings into a dict).
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    cfg = {k: v for k, v in node.items() if k != "name"}
    target = cfg.get("_target_")
    if target is None:
        raise ConfigError(f"{group}._target_: missing; expected the class that {group} builds")
    try:
        parameters(str(target))  # an unimportable _target_: one line naming it
    except ConfigError as error:
        raise ConfigError(f"{group}.{error}") from None
    try:
        factory = hydra.utils.instantiate(
            {**cfg, "_partial_": True}, _convert_="all", _recursive_=False
        )
    except InstantiationException as error:
        cause = error.__cause__ or error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigError(f"{group}: {first}") from None
    try:
        return factory(**supplied)
    except TypeError as error:  # an argument the target does not take
        raise ConfigError(f"{group}: {error}") from None
