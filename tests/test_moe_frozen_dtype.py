"""Frozen expert banks stored in bf16 / int8 / fp8: round trip, exact dispatch, exact freezing,
state dict round trip, bytes, and the one-line error for fp8 without float8."""

from __future__ import annotations

import pytest
import torch

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import MoELayer, quant

FORMATS = [f for f in quant.FROZEN_DTYPES if f != "fp8" or quant.fp8_supported()]
QUANTIZED = [f for f in FORMATS if f != "fp32"]


def _grown(fmt: str, seed: int = 0) -> MoELayer:
    """A layer with 4 frozen experts stored in `fmt` and 2 trainable ones."""
    torch.manual_seed(seed)
    layer = MoELayer(16, 32, 4, 2, frozen_dtype=fmt)
    layer.freeze_existing()
    layer.expand(2, gate_init="random")
    return layer


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_round_trip_within_the_format_bound(fmt: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 16, 8) * torch.logspace(-3, 1, 8)  # channels of very different scales
    q, scale = quant.quantize(w, fmt)
    assert q.dtype == quant.storage_dtype(fmt)
    assert (scale is None) == (not quant.has_scale(fmt))
    back = quant.dequantize(q, scale, torch.float32)
    err = (back - w).abs()
    bound = quant.error_bound(w, fmt)
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0  # it did round: the bound is what is being tested


def test_int8_scales_are_per_expert_and_output_channel() -> None:
    w = torch.zeros(2, 4, 3)
    w[1, :, 2] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    q, scale = quant.quantize(w, "int8")
    assert scale.shape == (2, 1, 3)
    assert scale[1, 0, 2] == pytest.approx(2.0 / 127) and scale[0, 0, 0] == 1.0  # zero channel
    assert q[1, 1, 2] == -127
    assert quant.dequantize(q, scale, torch.float32)[0].eq(0).all()


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_dispatch_with_stored_bank_equals_dispatch_with_its_dequantized_weights(fmt: str) -> None:
    """Outputs, input gradients and trainable-weight gradients are bit-identical to an fp32
    layer whose frozen bank holds the dequantized weights."""
    stored = _grown(fmt)
    reference = MoELayer.from_config({**stored.get_config(), "frozen_dtype": "fp32"})
    state = stored.state_dict()
    for name in ("w1", "w2"):
        state[f"experts.{name}_frozen"] = stored.experts.frozen_weight(name, torch.float32)
        state.pop(f"experts.{name}_frozen_scale", None)
    reference.load_state_dict(state)
    x = torch.randn(40, 16)
    outs = []
    for layer in (stored, reference):
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        outs.append((y, xi.grad, layer.experts.w1.grad, layer.experts.w2.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    # and the per-expert loop reference agrees with the grouped path within fp32 tolerance
    stored.dispatch = "loop"
    torch.testing.assert_close(stored(x)[0], outs[0][0])


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_frozen_bank_unchanged_by_training(fmt: str) -> None:
    layer = _grown(fmt)
    before = {k: v.clone() for k, v in layer.state_dict().items() if "_frozen" in k}
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        y, aux = layer(torch.randn(32, 16))
        (y.square().mean() + aux.balance_loss).backward()
        opt.step()
        opt.zero_grad()
    after = {k: v for k, v in layer.state_dict().items() if "_frozen" in k}
    assert before.keys() == after.keys() and len(before) >= 2
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_and_state_dict_round_trip(fmt: str) -> None:
    layer = _grown(fmt)
    n = 4 * (16 * 32 + 32 * 16)  # frozen weights
    scales = 4 * 4 * (32 + 16)  # fp32 per expert and output channel
    per = {"fp32": 4 * n, "bf16": 2 * n, "int8": n + scales, "fp8": n + scales}[fmt]
    assert layer.experts.frozen_bytes() == per
    again = MoELayer.from_config(layer.get_config())
    again.load_state_dict(layer.state_dict())
    x = torch.randn(10, 16)
    assert torch.equal(again(x)[0], layer(x)[0])
    # freezing again appends: old experts keep their stored codes, new ones are quantized
    old = layer.experts.w1_frozen.clone()
    layer.freeze_existing()
    assert layer.n_frozen == 6 and torch.equal(layer.experts.w1_frozen[:4], old)


def test_int8_stores_at_most_027x_of_fp32_at_the_preset_widths() -> None:
    """moe_mlp (d 128, h 128) and moe_lm (d 128, h 256): scales included."""
    for d, h in ((128, 128), (128, 256)):
        ratio = [
            MoELayer(d, h, 4, 2, n_frozen=4, frozen_dtype=f).experts.frozen_bytes()
            for f in ("int8", "fp32")
        ]
        assert ratio[0] / ratio[1] <= 0.27


def test_set_frozen_dtype_converts_what_is_frozen() -> None:
    layer = _grown("fp32")
    w = layer.experts.frozen_weight("w2").clone()
    layer.experts.set_frozen_dtype("int8")
    assert layer.experts.w2_frozen.dtype == torch.int8
    err = (layer.experts.frozen_weight("w2") - w).abs()
    assert (err <= quant.error_bound(w, "int8")).all()
    layer.experts.set_frozen_dtype("fp32")
    assert "experts.w2_frozen_scale" not in layer.state_dict()


def test_bad_format_and_fp8_without_float8_are_one_line(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"^method.frozen_dtype='int4': expected one of"):
        quant.check_frozen_dtype("method.frozen_dtype", "int4")
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError) as err:
        quant.check_frozen_dtype("method.frozen_dtype", "fp8")
    assert "fp8" in str(err.value) and "\n" not in str(err.value)


def test_lifelong_moe_stores_what_it_freezes_and_a_saved_model_reloads(tmp_path) -> None:
    from lifelong_moe.models import load_model, moe_layers, save_model
    from tests.test_lifelong_moe import fit, make

    method, stream = make(frozen_dtype="int8")
    first, second = stream.experiences[:2]
    method.before_experience(first)
    fit(method, first)
    method.before_experience(second)
    layers = moe_layers(method.model).values()
    assert all(layer.experts.w1_frozen.dtype == torch.int8 for layer in layers)
    twin = next(iter(moe_layers(method.teacher).values()))  # the teacher shares the stored bank
    assert twin.experts.w1_frozen_scale is next(iter(layers)).experts.w1_frozen_scale
    frozen = {k: v.clone() for k, v in method.model.state_dict().items() if "_frozen" in k}
    fit(method, second)
    for k, v in method.model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    model_cfg = {
        "_target_": "lifelong_moe.models.mlp.ResidualMLP",
        "d_model": 16,
        "d_hidden": 8,
        "moe": True,
        "moe_blocks": [0, 1],
        "n_experts": 4,
    }
    path = tmp_path / "model.pt"
    save_model(method.model, model_cfg, path, input_shape=[1, 4, 4], n_classes=4)
    again = load_model(path).eval()
    x = second.test[0][0].unsqueeze(0)
    assert torch.equal(again(x)[0], method.model.eval()(x)[0])
    assert all(layer.experts.frozen_dtype == "int8" for layer in moe_layers(again).values())


def test_method_rejects_a_bad_frozen_dtype_before_training() -> None:
    from tests.test_lifelong_moe import make

    with pytest.raises(ConfigError, match="method.frozen_dtype='fp16'"):
        make(frozen_dtype="fp16")


@pytest.mark.parametrize("fmt", FORMATS)
def test_freeze_first_moves_experts_back_to_training(fmt: str) -> None:
    """freeze_first(n) below n_frozen thaws: the stored values come back as trainable
    Parameters, ids and outputs unchanged, the kept frozen codes untouched."""
    layer = _grown(fmt)
    x = torch.randn(10, 16)
    before, stored = layer(x)[0], layer.experts.w1_frozen[:1].clone()
    widened = layer.experts.frozen_weight("w1", experts=slice(1, 4))
    rows = layer.router.full_weight().detach().clone()
    layer.freeze_first(1)
    assert (layer.n_frozen, layer.n_trainable) == (1, 5)
    assert torch.equal(layer.experts.w1_frozen, stored)
    assert torch.equal(layer.experts.w1.detach()[:3], widened)
    assert torch.equal(layer.router.full_weight(), rows)
    assert layer.experts.w1.requires_grad and layer.experts.w1.dtype == torch.float32
    assert torch.equal(layer(x)[0], before)
    layer.freeze_first(0)
    assert (layer.n_frozen, layer.router.n_frozen, layer.n_trainable) == (0, 0, 6)
    with pytest.raises(ValueError, match="freeze_first"):
        layer.freeze_first(7)
