"""Gated (SwiGLU) experts, shared experts and the family router orders in the MoE core.

Every check compares against an independent reference written here (per-token math or the
per-expert loop), with frozen and trainable banks, input and weight gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import MoELayer, MoESettings
from lifelong_moe.moe.experts import Experts
from lifelong_moe.moe.router import Router


def _per_token_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Each token through its k experts, one at a time: act(x Wg) * (x Wu) @ Wd, softmax gates."""
    h = layer.d_hidden
    logits = x @ layer.router.full_weight().t()
    probs = logits.softmax(-1)
    gates, ids = probs.topk(layer.top_k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(layer.top_k):
            w1, w2 = layer.experts.weights(int(ids[t, s]))
            a = x[t] @ w1
            out[t] += gates[t, s] * ((F.silu(a[:h]) * a[h:]) @ w2)
    return out


def _grads(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor | None]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, _ = layer(x)
    y.backward(grad)
    return [y.detach(), x.grad, *(p.grad for p in layer.parameters())]


def _layer(dispatch: str, n_frozen: int, **kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(16, 24, 6, 2, activation="silu", gated=True, n_frozen=n_frozen,
                    dispatch=dispatch, **kw)  # fmt: skip


def test_gated_bank_layout_is_gate_up_concatenated() -> None:
    experts = Experts(8, 12, 5, n_frozen=2, gated=True)
    assert experts.gated and experts.w1.shape == (3, 8, 24) and experts.w2.shape == (3, 12, 8)
    assert experts.w1_frozen.shape == (2, 8, 24) and not experts.w1_frozen.requires_grad
    w1, w2 = experts.weights(1)
    assert w1.shape == (8, 24) and w2.shape == (12, 8)


def test_gated_layer_equals_per_token_reference() -> None:
    layer = _layer("loop", n_frozen=2)
    x = torch.randn(11, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], _per_token_reference(layer, x))


@pytest.mark.parametrize("n_frozen", [0, 3, 6])
def test_gated_grouped_equals_loop_with_gradients(n_frozen: int) -> None:
    loop, grouped = _layer("loop", n_frozen), _layer("grouped", n_frozen)
    x, grad = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    got, want = _grads(grouped, x, grad), _grads(loop, x, grad)
    assert len(got) == len(want)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
    # the frozen bank is buffers: no gradient anywhere, and the trainable grads have its shape
    assert all(not b.requires_grad for b in (grouped.experts.w1_frozen, grouped.experts.w2_frozen))
    if grouped.n_trainable:
        assert grouped.experts.w1.grad.shape == (6 - n_frozen, 16, 48)
        assert grouped.experts.w1.grad.abs().sum() > 0


def test_growth_keeps_gated_experts_and_masking_reproduces_them() -> None:
    layer = _layer("grouped", 0)
    x = torch.randn(20, 16)
    with torch.no_grad():
        before = layer(x)[0]
        layer.freeze_existing()
        layer.expand(2, init="upcycle", gate_init="zero")
        assert layer.n_frozen == 6 and layer.n_trainable == 2 and layer.experts.w1.shape[-1] == 48
        old = torch.arange(8) < 6
        torch.testing.assert_close(layer(x, expert_mask=old)[0], before, atol=0, rtol=0)


def test_upcycle_copies_the_most_used_experts_with_relative_noise() -> None:
    layer = _layer("grouped", 0)
    layer.expert_usage.copy_(torch.tensor([1.0, 9.0, 3.0, 0.0, 7.0, 2.0]))
    layer.expand(3, init="upcycle", noise_std=0.0)
    for new, src in zip((6, 7, 8), (1, 4, 2), strict=True):
        assert torch.equal(layer.experts.weights(new)[0], layer.experts.weights(src)[0])
    layer.expand(1, init="upcycle", noise_std=0.1)
    w_new, w_src = layer.experts.weights(9)[0], layer.experts.weights(1)[0]
    assert not torch.equal(w_new, w_src)
    assert (w_new - w_src).std() < 0.3 * w_src.std()


def test_shared_expert_with_sigmoid_gate() -> None:
    layer = _layer("grouped", 0, shared_hidden=20, shared_gate=True)
    ref = _layer("grouped", 0)
    ref.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(7, 16)
    s = layer.shared
    want_shared = torch.sigmoid(x @ s.gate.weight.t()) * (
        (F.silu(x @ s.gate_proj.weight.t()) * (x @ s.up_proj.weight.t())) @ s.down_proj.weight.t()
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], ref(x)[0] + want_shared)
    rebuilt = MoELayer.from_config(layer.get_config())
    rebuilt.load_state_dict(layer.state_dict())  # the config round-trips the shared expert


def test_router_orders() -> None:
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    soft = Router(8, 5, 2, normalize_top_k=False)
    top = Router(8, 5, 2, order="topk_softmax")
    top.load_state_dict(soft.state_dict())
    logits = x @ soft.weight.t()
    r_soft, r_top = soft(x), top(x)
    probs = logits.softmax(-1)
    torch.testing.assert_close(r_soft.gates, probs.gather(1, r_soft.expert_ids))
    assert torch.equal(r_top.expert_ids, r_soft.expert_ids)
    torch.testing.assert_close(r_top.gates, logits.gather(1, r_top.expert_ids).softmax(-1))
    assert r_soft.gates.sum(-1).max() < 1 and torch.allclose(r_top.gates.sum(-1), torch.ones(10))


def test_gate_inits_zero_and_domain() -> None:
    layer = _layer("grouped", 0)
    layer.expand(2, gate_init="zero")
    assert torch.equal(layer.router.weight[-2:], torch.zeros(2, 16))
    domain = torch.randn(16)
    layer.expand(2, gate_init="domain", domain=domain, noise_std=0.0)
    assert torch.equal(layer.router.weight[-1], domain)
    with pytest.raises(ConfigError, match="gate_init='domain': expected the mean router input"):
        layer.expand(1, gate_init="domain")


def test_fused_refuses_gated_experts_in_one_line() -> None:
    with pytest.raises(ConfigError, match="dispatch='fused' with gated experts"):
        MoELayer(16, 32, 4, 2, gated=True, dispatch="fused")
    with pytest.raises(ConfigError, match="dispatch='fused' with gated experts"):
        MoESettings(gated=True, dispatch="fused")
    auto = MoELayer(16, 32, 4, 2, gated=True, dispatch="auto")
    assert auto.resolved_dispatch(torch.device("cuda")) == "grouped"


def test_router_input_means_is_the_mean_over_every_token() -> None:
    from lifelong_moe.moe.domain import router_input_means

    torch.manual_seed(0)
    pre = torch.nn.Linear(16, 16)
    model = torch.nn.Sequential(pre, _layer("grouped", 0))
    model.train()
    batches = [torch.randn(3, 5, 16), torch.randn(2, 5, 16)]
    means = router_input_means(model, batches, lambda b: model[1](model[0](b)))
    with torch.no_grad():
        want = torch.cat([pre(b).reshape(-1, 16) for b in batches]).double().mean(0).float()
    torch.testing.assert_close(means["1"], want)
    assert model.training  # the mode is restored
