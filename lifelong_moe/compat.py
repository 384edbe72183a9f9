"""Every touch of a dependency's private API, in one place, each with the versions it was checked on.

Lightning, Hydra and MLflow offer no public way to do what these few lines do. Each touch is a
small function (or a name) here and nowhere else; tests/test_compat.py fails loudly, naming the
attribute, when an upgrade removes one. pyproject.toml caps those packages below the next minor
version for the same reason.

Checked on: Lightning 2.6.6, Hydra 1.3.8, MLflow 3.17.2, torch 2.14.1. Each dependency is
imported where it is used, so that the MoE core (plain torch) and the light commands (compare)
do not pay for importing Lightning or Hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L
    import torch

CHECKED = {"lightning": "2.6", "hydra-core": "1.3", "mlflow": "3.17", "torch": "2.14"}

# -- Hydra 1.3 --------------------------------------------------------------------------------


def hydra_locate(path: str) -> Any:
    """The object a dotted path names (``hydra.utils.get_object`` without its error log)."""
    from hydra._internal.utils import _locate

    return _locate(path)


def hydra_args_parser() -> Any:
    """Hydra's own command-line parser, so we read argv exactly as the app will."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def split_sweep(overrides: list) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of parsed overrides, in one batch."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(overrides, None)


# -- Lightning 2.6 ----------------------------------------------------------------------------


def precision_input() -> Any:
    """The ``Literal`` union of precision values the Trainer accepts."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    return _PRECISION_INPUT


# The attribute Lightning sets around every hook (~45 times a step): methods/base.py lets it
# bypass nn.Module.__setattr__ (measured in results/loop_cpu.md).
CURRENT_FX_NAME = "_current_fx_name"


def replace_external_callback_discovery(discover: Callable[[str], list]) -> None:
    """Lightning scans every installed distribution's entry points at each Trainer's start;
    run/trainer.py hands a cached scan instead."""
    from lightning.pytorch.trainer.connectors import callback_connector as _callback_connector

    _callback_connector._load_external_callbacks = discover


def keep_signal_handlers(trainer: L.Trainer, register: Callable[[], None]) -> None:
    """Stop Lightning from installing its SIGTERM handler on this trainer's ranks."""
    trainer._signal_connector.register_signal_handlers = register


def restore_loader_position(trainer: L.Trainer) -> None:
    """Load a restored checkpoint's loader position that Lightning 2.6 drops when
    ``configure_optimizers`` read ``estimated_stepping_batches`` first (Lightning #20550),
    and restart the iterator as Lightning's own path does; a no-op when Lightning did it."""
    loop = trainer.fit_loop
    pending = getattr(loop, "_combined_loader_states_to_load", None)
    if not loop.restarting:  # a finished epoch: the next one starts a fresh iterator
        return
    if pending and loop._combined_loader is not None and loop._data_fetcher is not None:
        loop._combined_loader._load_state_dicts(pending)
        loop._combined_loader_states_to_load = []
        iter(loop._data_fetcher)


# -- MLflow 3 ---------------------------------------------------------------------------------


def monitor_has_published(monitor: Any) -> bool:
    """Whether MLflow's system-metrics monitor has published a sample yet."""
    return monitor._logging_step > 0


# -- torch 2.14 -------------------------------------------------------------------------------


def all_to_all_single_autograd(
    tensor: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group: Any
) -> torch.Tensor:
    """The autograd-aware all-to-all with variable splits (torch.distributed's functional
    collectives; the public ``torch.distributed.nn.functional.all_to_all_single`` is deprecated)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd as a2a

    return a2a(tensor, output_split_sizes, input_split_sizes, group)


# The torch.distributed function DDP broadcasts buffers with, before every forward unless
# ``forward_sync_buffers=False`` (DistributedDataParallel._distributed_broadcast_coalesced):
# tests/comm_bytes.py wraps it to count the bytes a training step sends.
DDP_BUFFER_BROADCAST = "_broadcast_coalesced"


def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """Parameters and buffers (by name) that DDP neither broadcasts nor reduces: torch's
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` (private; torch
    2.14 has no public way), set before the module is wrapped."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
