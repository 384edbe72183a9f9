"""Checkpoints of a model whose MoE layers are sharded (2 gloo processes, forked, no launcher).

The gathered state dict is the unsharded model's, exactly; cut back to a rank's shard it is that
rank's state dict; the payload loads into a plain model (one process) and into a freshly built
sharded one (resume, re-shard) with the reference's outputs; the experts' optimizer moments are
dropped from training checkpoints (each rank's cover its own shard).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lifelong_moe.models.build import build_model
from lifelong_moe.models.checkpoint import (
    drop_expert_moments,
    expert_param_names,
    gathered_state_dict,
    model_payload,
    restore_model,
    sharded_state_dict,
)
from lifelong_moe.models.params import count_parameters, moe_layers
from lifelong_moe.moe.expert_parallel import expert_mesh, shard_moe_layers
from tests.gloo_ranks import run_ranks

MODEL = {
    "_target_": "lifelong_moe.models.mlp.ResidualMLP",
    "moe": True,
    "d_model": 16,
    "d_hidden": 16,
    "n_blocks": 2,
    "moe_blocks": [0, 1],
    "n_experts": 4,
    "top_k": 2,
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MODEL, [12], 5)


def grown() -> torch.nn.Module:
    """4 experts per layer frozen, 3 new trainable ones (7: an odd count over 2 ranks)."""
    net = model()
    for layer in moe_layers(net).values():
        layer.freeze_existing()
        layer.expand(3)
    return net.eval()


def worker(rank: int, world: int) -> None:
    mesh = expert_mesh(2)
    ref = grown()
    net = copy.deepcopy(ref)
    shard_moe_layers(net, mesh)
    assert count_parameters(net) == count_parameters(ref)  # the model's, not the shard's
    full = gathered_state_dict(net)
    assert full.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(full[key], value), key
    mine = sharded_state_dict(net, full)
    assert mine.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(mine[key], value), key

    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)[0]
    payload = model_payload(net)
    plain = model()  # one process: a freshly built model at the first size
    restore_model(plain, payload)
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], want, rtol=1e-5, atol=1e-6)
    fresh = model()  # a resume: freshly built, sharded, then restored (re-sharded)
    shard_moe_layers(fresh, mesh)
    restore_model(fresh, payload)
    assert [layer.n_experts for layer in moe_layers(fresh).values()] == [7, 7]
    assert all(layer.experts.n_experts <= 4 for layer in moe_layers(fresh).values())
    with torch.no_grad():
        rows = slice(rank * 5, rank * 5 + 5)
        torch.testing.assert_close(fresh.eval()(x[rows])[0], want[rows], rtol=1e-5, atol=1e-6)


def test_gathered_checkpoints_load_whole_and_reshard(tmp_path: Path) -> None:
    run_ranks(worker, 2, tmp_path)


def test_training_checkpoints_drop_the_experts_optimizer_moments() -> None:
    net = grown()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    states = [{"state": {i: {"step": 1} for i in range(len(trainable))}, "param_groups": []}]
    drop_expert_moments(net, states)
    kept = {trainable[i] for i in states[0]["state"]}
    experts = expert_param_names(net)
    assert experts and experts <= set(trainable)  # the new experts train
    assert kept == set(trainable) - experts
