"""Grouped dispatch against the per-expert loop reference, determinism, capacity, no host sync."""

from __future__ import annotations

import random

import pytest
import torch

from lifelong_moe.moe import MoELayer


def random_config(rng: random.Random) -> dict:
    n_experts = rng.choice([1, 2, 3, 5, 8, 16, 33, 64])
    return {
        "d_model": 8 * rng.randint(1, 5),
        "d_hidden": 8 * rng.randint(1, 6),
        "n_experts": n_experts,
        "top_k": rng.randint(1, min(4, n_experts)),
        "n_frozen": rng.choice([0, rng.randint(0, n_experts)]),
        "activation": rng.choice(["gelu", "relu", "silu", "gelu_tanh"]),
        "normalize_top_k": rng.random() < 0.5,
    }


def grads_of(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor, mask=None):
    """Output, aux and gradients w.r.t. x and every trainable parameter."""
    x = x.detach().clone().requires_grad_(True)
    y, aux = layer(x, expert_mask=mask)
    params = [p for p in layer.parameters() if p.requires_grad and p.numel() > 0]
    loss = (y * grad).sum() + aux.balance_loss + 0.1 * aux.z_loss
    inputs = [x, *params]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # loop: idle experts unused
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
    return y, aux, grads


def assert_same_as_loop(layer: MoELayer, x: torch.Tensor, mask=None) -> None:
    grad = torch.randn(*x.shape)
    y, aux, grads = grads_of(layer, x, grad, mask)
    layer.dispatch = "loop"
    y_ref, aux_ref, grads_ref = grads_of(layer, x, grad, mask)
    layer.dispatch = "grouped"
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(aux.tokens_per_expert, aux_ref.tokens_per_expert)
    assert torch.equal(aux.dropped, aux_ref.dropped)


@pytest.mark.parametrize("seed", range(24))
def test_grouped_matches_loop_random_shapes(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfg = random_config(rng)
    layer = MoELayer(**cfg)
    x = torch.randn(rng.randint(1, 3), rng.randint(1, 70), cfg["d_model"])
    mask = None
    if rng.random() < 0.4:
        mask = torch.rand(cfg["n_experts"]) < 0.6
        mask[rng.randrange(cfg["n_experts"])] = True
    assert_same_as_loop(layer, x, mask)


def test_experts_without_tokens_and_all_frozen() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 64, 3, n_frozen=40)
    x = torch.randn(5, 16)  # 15 assignments over 64 experts: most receive nothing
    assert_same_as_loop(layer, x)
    layer.freeze_existing()
    assert layer.n_trainable == 0
    assert_same_as_loop(layer, x)


def test_masked_experts_receive_nothing() -> None:
    torch.manual_seed(1)
    layer = MoELayer(16, 32, 8, 2, n_frozen=3)
    mask = torch.tensor([True, False, True, False, True, True, False, True])
    _, aux = layer(torch.randn(300, 16), expert_mask=mask)
    assert aux.tokens_per_expert[~mask].sum() == 0
    assert aux.tokens_per_expert.sum() == 600


def test_fewer_enabled_experts_than_k_route_nowhere() -> None:
    torch.manual_seed(2)
    layer = MoELayer(16, 32, 6, 3, normalize_top_k=False)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[[1, 4]] = True
    x = torch.randn(40, 16)
    _, aux = layer(x, expert_mask=mask)
    assert aux.tokens_per_expert.tolist() == [0, 40, 0, 0, 40, 0]
    assert aux.dropped == 0
    assert_same_as_loop(layer, x, mask)


def test_two_runs_are_bit_identical() -> None:
    def run() -> tuple:
        torch.manual_seed(3)
        layer = MoELayer(32, 64, 16, 2, n_frozen=5, router_noise=0.5)
        x = torch.randn(4, 50, 32)
        return grads_of(layer, x, torch.ones(4, 50, 32))

    (y1, _, g1), (y2, _, g2) = run(), run()
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def test_token_output_independent_of_batch() -> None:
    torch.manual_seed(4)
    layer = MoELayer(16, 32, 8, 2, n_frozen=2)
    x = torch.randn(64, 16)
    y_all, _ = layer(x)
    for idx in ([0], [5, 17], list(range(10, 30))):
        y_sub, _ = layer(x[idx])
        torch.testing.assert_close(y_sub, y_all[idx], atol=1e-6, rtol=1e-6)
    y_perm, _ = layer(x.flip(0))
    torch.testing.assert_close(y_perm.flip(0), y_all, atol=1e-6, rtol=1e-6)


def test_capacity_drops_are_counted_and_match_loop() -> None:
    torch.manual_seed(5)
    layer = MoELayer(16, 32, 4, 2, capacity_factor=0.5, n_frozen=1)
    with torch.no_grad():  # skew the router so most tokens want expert 2
        layer.router.weight[1] += 3 * torch.ones(16) / 4
    x = torch.randn(100, 16).abs()
    _, aux = layer(x)
    capacity = 25  # ceil(0.5 * 100 * 2 / 4)
    assert aux.tokens_per_expert.max() <= capacity
    assert aux.dropped > 0
    assert aux.tokens_per_expert.sum() + aux.dropped == 200
    assert_same_as_loop(layer, x)


def test_capacity_dropped_assignment_contributes_zero() -> None:
    torch.manual_seed(6)
    layer = MoELayer(8, 16, 2, 1, capacity_factor=0.5)  # capacity 2 of 8 tokens per expert
    x = torch.randn(8, 8)
    y, aux = layer(x)
    assert aux.dropped == 8 - aux.tokens_per_expert.sum()
    kept_ids = layer.router(x).expert_ids[:, 0]
    for e in range(2):  # tokens past the first `capacity` of an expert get output 0
        rows = (kept_ids == e).nonzero().squeeze(1)
        assert torch.all(y[rows[2:]] == 0)
        assert torch.all(y[rows[:2]].abs().sum(-1) > 0)


def test_grouped_path_never_syncs_with_host(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    layer = MoELayer(16, 32, 8, 2, n_frozen=3, capacity_factor=1.0)
    x = torch.randn(64, 16, requires_grad=True)
    mask = torch.ones(8, dtype=torch.bool)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the grouped path")

    for name in ("item", "tolist", "nonzero", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    y, aux = layer(x, expert_mask=mask)
    (y.sum() + aux.balance_loss + aux.z_loss).backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_grouped_matches_loop(dtype: torch.dtype, tol: float) -> None:
    """bf16 takes grouped_mm's fast path and must never sync. (fp32 on CUDA runs a fallback
    inside torch that reads the offsets on the host: correct, but not sync-free.)"""
    torch.manual_seed(8)
    # 7 tokens: most experts get none, so their weight gradient must come back as zeros.
    for n_tokens, n_frozen, capacity in (
        (300, 0, None),
        (300, 11, None),
        (300, 11, 1.0),
        (7, 4, None),
    ):
        layer = MoELayer(64, 128, 16, 2, n_frozen=n_frozen, capacity_factor=capacity)
        layer = layer.to("cuda", dtype)
        x = torch.randn(n_tokens, 64, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        layer(x)  # first call may initialise CUDA libraries
        if dtype == torch.bfloat16:
            torch.cuda.set_sync_debug_mode("error")
        try:
            y, aux = layer(x)
            gx, gw = torch.autograd.grad((y * grad).sum(), [x, layer.experts.w1])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        layer.dispatch = "loop"
        y_ref, aux_ref = layer(x)
        gx_ref, gw_ref = torch.autograd.grad((y_ref * grad).sum(), [x, layer.experts.w1])
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(gw, gw_ref, atol=tol, rtol=tol)
        assert torch.equal(aux.tokens_per_expert, aux_ref.tokens_per_expert)
        assert torch.equal(aux.dropped, aux_ref.dropped)
