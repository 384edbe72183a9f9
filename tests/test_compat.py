"""Tripwires for lifelong_moe/compat.py: each private attribute we touch still exists.

An upgrade of Lightning, Hydra or MLflow that removes one fails here, naming it, instead of as
a silent change in behaviour (a dropped loader position, a second SIGTERM handler).
"""

from __future__ import annotations

import importlib

import lightning as L
import pytest
import torch

from lifelong_moe import compat

TOUCHED = [
    ("hydra._internal.utils", "_locate"),
    ("hydra._internal.utils", "get_args_parser"),
    ("hydra._internal.core_plugins.basic_sweeper", "BasicSweeper.split_arguments"),
    ("lightning.fabric.plugins.precision.precision", "_PRECISION_INPUT"),
    ("lightning.pytorch.trainer.connectors.callback_connector", "_load_external_callbacks"),
    (
        "lightning.pytorch.trainer.connectors.signal_connector",
        "_SignalConnector.register_signal_handlers",
    ),
    ("lightning.pytorch.utilities.combined_loader", "CombinedLoader._load_state_dicts"),
    ("mlflow.system_metrics.system_metrics_monitor", "SystemMetricsMonitor"),
    ("torch.distributed._functional_collectives", "all_to_all_single_autograd"),
    ("torch.distributed", compat.DDP_BUFFER_BROADCAST),
    ("torch.nn.parallel.distributed", "DistributedDataParallel._distributed_broadcast_coalesced"),
    (
        "torch.nn.parallel.distributed",
        "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
    ),
]


@pytest.mark.parametrize(("module", "attribute"), TOUCHED)
def test_private_attribute_exists(module: str, attribute: str) -> None:
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        assert hasattr(obj, part), f"compat.py: {module}.{attribute} is gone; update compat.py"
        obj = getattr(obj, part)


def test_trainer_and_fit_loop_attributes() -> None:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert hasattr(trainer, "_signal_connector"), "compat.py: Trainer._signal_connector is gone"
    for name in ("_combined_loader_states_to_load", "_combined_loader", "_data_fetcher"):
        assert hasattr(trainer.fit_loop, name), f"compat.py: _FitLoop.{name} is gone"


def test_lightning_still_sets_current_fx_name() -> None:
    class Probe(L.LightningModule):
        seen: set[str] = set()

        def __setattr__(self, name: str, value: object) -> None:
            Probe.seen.add(name)
            super().__setattr__(name, value)

        def training_step(self, batch, idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    probe.layer = torch.nn.Linear(2, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 2)))
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(probe, data)
    assert compat.CURRENT_FX_NAME in Probe.seen, "compat.py: Lightning no longer sets it"


def test_system_metrics_monitor_counts_what_it_published() -> None:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor("run-id", sampling_interval=1)
    assert compat.monitor_has_published(monitor) is False
