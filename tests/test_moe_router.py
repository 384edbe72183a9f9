"""Router: fp32 logits, top-k and masks, aux losses against hand computations, gate banks."""

from __future__ import annotations

import torch

from lifelong_moe.moe.router import Router


def make_router(n_experts: int = 6, top_k: int = 2, n_frozen: int = 0, **kw) -> Router:
    torch.manual_seed(0)
    return Router(8, n_experts, top_k, n_frozen=n_frozen, **kw)


def test_logits_and_gates_are_fp32_and_topk_of_softmax() -> None:
    router = make_router(normalize_top_k=False)
    x = torch.randn(10, 8)
    out = router(x.bfloat16())
    assert out.gates.dtype == torch.float32
    logits = x.bfloat16().float() @ router.weight.float().t()
    probs = torch.softmax(logits, -1)
    top, ids = probs.topk(2, dim=-1)
    assert torch.equal(out.expert_ids, ids)
    torch.testing.assert_close(out.gates, top)


def test_normalized_gates_sum_to_one() -> None:
    out = make_router(top_k=3)(torch.randn(20, 8))
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(20))


def test_mask_excludes_experts_and_renormalizes() -> None:
    router = make_router(normalize_top_k=False)
    mask = torch.tensor([True, False, True, True, False, True])
    x = torch.randn(50, 8)
    out = router(x, mask)
    assert not torch.isin(out.expert_ids, torch.tensor([1, 4])).any()
    assert out.valid.all()
    logits = (x @ router.weight.t())[:, mask]
    expected = torch.softmax(logits, -1).topk(2, -1).values
    torch.testing.assert_close(out.gates, expected)


def test_z_loss_by_hand() -> None:
    router = make_router()
    x = torch.randn(7, 8)
    logits = x @ router.weight.t()
    expected = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    torch.testing.assert_close(router(x).z_loss, expected)


def balance_by_hand(logits: torch.Tensor, scope: list[int], top_k: int) -> torch.Tensor:
    """n_S * sum_i f_i * P_i with f over assignments into S and P renormalised over S."""
    ids = torch.softmax(logits, -1).topk(top_k, -1).indices
    counts = torch.tensor([float((ids == i).sum()) for i in scope])
    f = counts / counts.sum()
    p = torch.softmax(logits[:, scope], -1).mean(0)
    return len(scope) * (f * p).sum()


def test_balance_loss_all_scope_by_hand() -> None:
    router = make_router(n_experts=5, top_k=2)
    x = torch.randn(40, 8)
    logits = x @ router.weight.t()
    expected = balance_by_hand(logits, [0, 1, 2, 3, 4], 2)
    torch.testing.assert_close(router(x).balance_loss, expected)
    # Switch's classic form for k=1: E * sum_i (tokens_i / T) * mean prob_i
    router1 = make_router(n_experts=5, top_k=1)
    probs = torch.softmax(x @ router1.weight.t(), -1)
    f = torch.bincount(probs.argmax(-1), minlength=5).float() / 40
    torch.testing.assert_close(router1(x).balance_loss, 5 * (f * probs.mean(0)).sum())


def test_balance_loss_trainable_scope_by_hand() -> None:
    router = make_router(n_experts=6, top_k=2, n_frozen=4, balance_scope="trainable")
    x = torch.randn(64, 8)
    logits = x @ router.full_weight().t()
    expected = balance_by_hand(logits, [4, 5], 2)
    torch.testing.assert_close(router(x).balance_loss, expected)


def test_balance_loss_is_one_for_uniform_router() -> None:
    router = make_router(n_experts=4, top_k=1)
    with torch.no_grad():
        router.weight.zero_()
    # all logits tie: whatever the picks, P is uniform 1/4 -> 4 * sum_i f_i / 4 = 1
    torch.testing.assert_close(router(torch.randn(16, 8)).balance_loss, torch.tensor(1.0))


def test_balance_loss_with_mask_by_hand() -> None:
    router = make_router(n_experts=6, top_k=2)
    mask = torch.tensor([True, True, False, True, True, True])
    x = torch.randn(30, 8)
    logits = (x @ router.weight.t()).masked_fill(~mask, float("-inf"))
    expected = balance_by_hand(logits, [0, 1, 3, 4, 5], 2)
    torch.testing.assert_close(router(x, mask).balance_loss, expected)


def test_noise_only_in_training() -> None:
    router = make_router(noise_std=5.0)
    x = torch.randn(100, 8)
    router.eval()
    assert torch.equal(router(x).expert_ids, router(x).expert_ids)
    router.train()
    assert not torch.equal(router(x).expert_ids, router(x).expert_ids)


def test_gate_banks_frozen_rows_are_buffers() -> None:
    router = make_router(n_experts=5, n_frozen=3)
    assert router.n_frozen == 3 and router.n_trainable == 2
    names = {n for n, _ in router.named_parameters()}
    assert names == {"weight"}
    assert "weight_frozen" in router.state_dict()
    before = router.full_weight().detach().clone()
    router.freeze_existing()
    assert router.n_frozen == 5 and router.n_trainable == 0
    assert torch.equal(router.full_weight(), before)
    router.expand(2, init="mean", noise_std=0.0)
    assert torch.equal(router.weight[0], before.mean(0))
    assert torch.equal(router.weight[1], before.mean(0))
