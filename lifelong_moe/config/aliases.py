"""Old config keys keep working: on the command line and in a config stored by an older run.

The table is ``names.RENAMED_KEYS`` (old dotted key -> today's), at the bottom of the package so
that tracking/ (compare's grouping of old runs' params) reads the same one. Here:

- :func:`modernize_overrides` rewrites a command line's old keys before Hydra composes it (also
  under ``+``/``++``/``~`` and inside sweeps, whose values it leaves alone), with one note per key
  naming the new one;
- :func:`migrate` moves the values of a config's old keys to today's: a config stored by an
  older run (resume), and a composed one whose preset or config file still names old keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from lifelong_moe.log import LOGGER
from lifelong_moe.names import RENAMED_KEYS

_PREFIXES = ("++", "+", "~")


def _split(override: str) -> tuple[str, str, str]:
    """``+trainer.lr_schedule=a,b`` -> (``+``, ``trainer.lr_schedule``, ``=a,b``)."""
    prefix = next((p for p in _PREFIXES if override.startswith(p)), "")
    key, sep, value = override[len(prefix) :].partition("=")
    return prefix, key, sep + value


def modernize_overrides(args: Sequence[str]) -> list[str]:
    """The command line with every old key renamed; one note on the console per old key.

    Flags (``-m``, ``--config-dir DIR``) and their values pass unchanged: no flag value is an old
    key followed by ``=``.
    """
    out = []
    for arg in args:
        prefix, key, rest = _split(arg)
        new = RENAMED_KEYS.get(key)
        if new is None or arg.startswith("-"):
            out.append(arg)
            continue
        LOGGER.info(f"note: {key} is now {new}; read {prefix}{key}{rest} as {prefix}{new}{rest}")
        out.append(f"{prefix}{new}{rest}")
    return out


_ABSENT = object()


def migrate(cfg: DictConfig, where: str | None) -> list[str]:
    """Move the values of ``cfg``'s old keys to today's, in place; returns the old keys found.

    The old key's value wins over the new key's: in a composed config the new key always holds
    at least the packaged default, and the old one was written on purpose. ``where`` names the
    config in the note (``resume=<run_id>``); None: no note (the CLI's check before Hydra, whose
    run notes it again).
    """
    moved = []
    with open_dict(cfg):
        for old, new in RENAMED_KEYS.items():
            value = OmegaConf.select(cfg, old, default=_ABSENT)
            if value is _ABSENT:
                continue
            parent, _, name = old.rpartition(".")
            OmegaConf.select(cfg, parent).pop(name)
            OmegaConf.update(cfg, new, value, force_add=True)
            moved.append(old)
    if moved and where is not None:
        LOGGER.info(f"note: {where}: read the old keys {', '.join(moved)} under today's names")
    return moved
