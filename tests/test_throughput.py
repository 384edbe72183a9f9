"""cost/tokens_per_s on every device, cost/mfu only where the device's peak is known."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import TensorDataset

from lifelong_moe.measure import throughput
from lifelong_moe.models import count_parameters
from lifelong_moe.models.lm import CausalLM
from lifelong_moe.moe import MoESettings
from tests.conftest import FAST, run_cli, runs, store_uri

CPU = torch.device("cpu")


def lm_data(n: int = 10, length: int = 32) -> TensorDataset:
    x = torch.randint(0, 256, (n, length))
    return TensorDataset(x, x.roll(-1, dims=1))


def tiny_lm(length: int = 32) -> CausalLM:
    moe = MoESettings(blocks=[1])
    return CausalLM([length], 256, d_model=32, d_hidden=64, n_heads=4, n_blocks=2, moe=moe)


def test_tokens_per_second_counts_every_target_position():
    out = throughput.throughput_metrics(tiny_lm(), lm_data(10, 32), 3, 4.0, CPU, "32-true")
    assert out == {"cost/tokens_per_s": 10 * 3 * 32 / 4.0}  # no MFU: a CPU has no known peak


def test_classifier_counts_one_token_per_sample():
    data = TensorDataset(torch.zeros(50, 64), torch.zeros(50, dtype=torch.long))
    out = throughput.throughput_metrics(tiny_lm(), data, 2, 5.0, CPU, "32-true")
    assert out["cost/tokens_per_s"] == pytest.approx(20.0)


def test_mfu_uses_6n_plus_attention_and_the_device_peak(monkeypatch):
    model = tiny_lm(32)
    monkeypatch.setattr(throughput, "device_label", lambda device: "NVIDIA H100 80GB HBM3")
    out = throughput.throughput_metrics(model, lm_data(8, 32), 1, 2.0, CPU, "bf16-mixed")
    rate = 8 * 32 / 2.0
    flops = 6 * count_parameters(model)["active"] + 12 * 2 * 32 * 32  # 2 attention layers, d=32
    assert out["cost/mfu"] == pytest.approx(rate * flops / 989e12)
    # fp32 uses the non-tensor-core peak; two devices double the peak
    out32 = throughput.throughput_metrics(model, lm_data(8, 32), 1, 2.0, CPU, "32-true", 2)
    assert out32["cost/mfu"] == pytest.approx(rate * flops / (2 * 67e12))


def test_unknown_devices_have_no_peak():
    assert throughput.peak_flops("cpu", "bf16-mixed") is None
    assert throughput.peak_flops("Some Future GPU", "32-true") is None
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB", "16-mixed") == 312e12


@pytest.mark.slow
def test_runner_logs_tokens_per_second_per_experience(workdir):
    uri = store_uri(workdir)
    run_cli(workdir, f"tracking.uri={uri}", "benchmark.n_experiences=2", *FAST)
    (run,) = runs(uri)
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "cost/tokens_per_s")
    assert [m.step for m in history] == [0, 1]
    assert all(m.value > 0 for m in history)
    assert "cost/mfu" not in run.data.metrics  # CPU: peak unknown
