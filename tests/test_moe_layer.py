"""MoELayer: config errors, exact freezing, expansion, usage statistics, config round trip."""

from __future__ import annotations

import pytest
import torch

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import MoEAux, MoELayer


def test_shapes_and_aux_types() -> None:
    layer = MoELayer(16, 32, 4, 2)
    y, aux = layer(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16)
    assert isinstance(aux, MoEAux)
    assert aux.balance_loss.dtype == torch.float32 and aux.balance_loss.ndim == 0
    assert aux.z_loss.dtype == torch.float32 and aux.z_loss.ndim == 0
    assert aux.tokens_per_expert.dtype == torch.long and aux.tokens_per_expert.shape == (4,)
    assert aux.tokens_per_expert.sum() == 30
    assert aux.dropped.dtype == torch.long and aux.dropped.ndim == 0 and aux.dropped == 0


def test_empty_batch() -> None:
    layer = MoELayer(16, 32, 4, 2, n_frozen=1)
    x = torch.randn(0, 16, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 16) and aux.tokens_per_expert.sum() == 0
    assert aux.balance_loss == 0 and aux.z_loss == 0
    (y.sum() + aux.balance_loss).backward()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"top_k": 5}, "top_k=5"),
        ({"d_model": 0}, "d_model=0"),
        ({"d_hidden": -8}, "d_hidden=-8"),
        ({"n_experts": 0, "top_k": 1}, "n_experts=0"),
        ({"top_k": 0}, "top_k=0"),
        ({"activation": "tanh"}, "activation='tanh'"),
        ({"dispatch": "scatter"}, "dispatch='scatter'"),
        ({"balance_scope": "new"}, "balance_scope='new'"),
        ({"d_model": 12}, "d_model=12"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"router_noise": -1.0}, "router_noise=-1.0"),
        ({"n_frozen": 5}, "n_frozen=5"),
    ],
)
def test_config_errors_are_one_line(kwargs: dict, fragment: str) -> None:
    args = {"d_model": 16, "d_hidden": 32, "n_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(ConfigError) as err:
        MoELayer(**args)
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert "expected" in message


def test_loop_dispatch_accepts_unaligned_sizes_and_bad_expand_args_raise() -> None:
    layer = MoELayer(12, 20, 4, 2, dispatch="loop")
    assert layer(torch.randn(3, 12))[0].shape == (3, 12)
    with pytest.raises(ConfigError, match="init='clone'"):
        layer.expand(1, init="clone")
    with pytest.raises(ConfigError, match="gate_init='ones'"):
        layer.expand(1, gate_init="ones")
    with pytest.raises(ConfigError, match="n_new=0"):
        layer.expand(0)
    with pytest.raises(ConfigError, match="expert_mask"):
        layer(torch.randn(3, 12), expert_mask=torch.ones(3, dtype=torch.bool))


def test_frozen_bank_exact_through_adamw() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2)
    layer.freeze_existing()
    layer.expand(4)
    assert (layer.n_experts, layer.n_frozen, layer.n_trainable) == (8, 4, 4)
    frozen = {
        "w1": layer.experts.w1_frozen.clone(),
        "w2": layer.experts.w2_frozen.clone(),
        "gate": layer.router.weight_frozen.clone(),
    }
    frozen_ids = {id(layer.experts.w1_frozen), id(layer.experts.w2_frozen)}
    frozen_ids.add(id(layer.router.weight_frozen))
    assert not frozen_ids & {id(p) for p in layer.parameters()}
    assert all(not t.requires_grad for t in frozen.values())
    trainable_before = layer.experts.w1.detach().clone()
    opt = torch.optim.AdamW(
        filter(lambda p: p.requires_grad, layer.parameters()), 1e-2, weight_decay=0.1
    )
    for _ in range(50):
        y, aux = layer(torch.randn(32, 16))
        (y.square().mean() + aux.balance_loss + aux.z_loss).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.experts.w1_frozen, frozen["w1"])
    assert torch.equal(layer.experts.w2_frozen, frozen["w2"])
    assert torch.equal(layer.router.weight_frozen, frozen["gate"])
    assert layer.experts.w1_frozen.grad is None and layer.router.weight_frozen.grad is None
    assert not torch.equal(layer.experts.w1, trainable_before)


def test_expand_keeps_old_outputs_when_new_experts_masked() -> None:
    torch.manual_seed(1)
    layer = MoELayer(16, 32, 6, 2, n_frozen=2)
    x = torch.randn(40, 16)
    y_old, aux_old = layer(x)
    layer.freeze_existing()
    layer.expand(3, init="random", gate_init="random")
    mask = torch.tensor([True] * 6 + [False] * 3)
    y_new, aux_new = layer(x, expert_mask=mask)
    torch.testing.assert_close(y_new, y_old, atol=1e-6, rtol=0)  # identical up to rounding
    assert torch.equal(aux_new.tokens_per_expert[:6], aux_old.tokens_per_expert)
    assert aux_new.tokens_per_expert[6:].sum() == 0


def test_expert_usage_counts_training_only_and_copy_most_used() -> None:
    torch.manual_seed(2)
    layer = MoELayer(16, 32, 4, 1)
    with torch.no_grad():  # bias the router towards expert 2
        layer.router.weight[2] = 0.0
        layer.router.weight[[0, 1, 3]] = -1.0
    x = torch.ones(10, 16)
    layer.eval()
    layer(x)
    assert layer.expert_usage.sum() == 0
    layer.train()
    layer(x)
    layer(x)
    assert layer.expert_usage.tolist() == [0.0, 0.0, 20.0, 0.0]
    w1_src = layer.experts.w1[2].detach().clone()
    layer.expand(2, init="copy_most_used", noise_std=0.0)
    assert layer.n_experts == 6 and layer.expert_usage.shape == (6,)
    assert torch.equal(layer.experts.w1[4], w1_src) and torch.equal(layer.experts.w1[5], w1_src)
    layer.expand(1, init="copy_most_used", noise_std=0.01)
    diff = layer.experts.w1[6] - w1_src
    assert 0 < diff.abs().max() < 0.1


def test_copy_most_used_from_frozen_bank() -> None:
    torch.manual_seed(3)
    layer = MoELayer(16, 32, 4, 1, n_frozen=4)
    with torch.no_grad():
        layer.expert_usage.copy_(torch.tensor([1.0, 7.0, 3.0, 0.0]))
    layer.expand(1, init="copy_most_used", gate_init="mean", noise_std=0.0)
    assert torch.equal(layer.experts.w1[0], layer.experts.w1_frozen[1])
    assert torch.equal(layer.experts.w2[0], layer.experts.w2_frozen[1])
    assert torch.equal(layer.router.weight[0], layer.router.weight_frozen.mean(0))


def test_config_and_state_dict_round_trip() -> None:
    torch.manual_seed(4)
    layer = MoELayer(16, 32, 4, 2, activation="silu", capacity_factor=2.0)
    layer(torch.randn(20, 16))  # some usage
    layer.freeze_existing()
    layer.expand(3, init="copy_most_used", gate_init="mean")
    copy = MoELayer.from_config(layer.get_config())
    copy.load_state_dict(layer.state_dict())
    assert (copy.n_frozen, copy.n_trainable) == (4, 3)
    assert torch.equal(copy.expert_usage, layer.expert_usage)
    x = torch.randn(2, 30, 16)
    layer.eval()
    copy.eval()
    y1, aux1 = layer(x)
    y2, aux2 = copy(x)
    assert torch.equal(y1, y2)
    assert torch.equal(aux1.tokens_per_expert, aux2.tokens_per_expert)
    assert torch.equal(aux1.balance_loss, aux2.balance_loss)


def test_compiles_without_graph_breaks() -> None:
    """fullgraph=True turns any graph break in the layer into an error (bf16: grouped_mm's
    meta kernel rejects fp32 under compile)."""
    torch.manual_seed(5)
    layer = MoELayer(32, 64, 8, 2, n_frozen=5, capacity_factor=1.25).bfloat16()
    mask = torch.ones(8, dtype=torch.bool)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        y, aux = layer(x, expert_mask=mask)
        return y.float().square().mean() + 0.01 * aux.balance_loss + 0.001 * aux.z_loss

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 50, 32).bfloat16().requires_grad_(True)
    loss = compiled(x)
    loss.backward()
    usage = layer.expert_usage.clone()
    grad = x.grad.clone()
    x.grad = None
    eager = loss_fn(x)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, x.grad)
    assert 0 < usage.sum() <= 400  # the buffer update ran inside the compiled graph
    torch.testing.assert_close(layer.expert_usage, 2 * usage)


def test_autocast_bf16_runs_grouped_path_with_fp32_master_gradients():
    torch.manual_seed(0)
    layer = MoELayer(64, 64, 4, 2)
    x = torch.randn(32, 64)
    reference, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert layer.experts.w1.grad.dtype == torch.float32 and layer.experts.w1.grad.abs().sum() > 0
