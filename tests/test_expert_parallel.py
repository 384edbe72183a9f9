"""Expert parallelism on CPU with gloo, 2 and 4 processes, against one process.

Every worker builds the same seeded MoELayer and computes the one-process reference itself;
the sharded layer then sees the rank's slice of the batch. Forward outputs, input gradients,
router gradients (summed over all ranks) and expert gradients (summed over dp only) must equal
the reference within fp32 tolerance; growth must agree with MoELayer.expand exactly; the
gathered state dict must load into a plain MoELayer; 2 -> 4 re-shards a saved checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import MoELayer
from lifelong_moe.moe.domain import router_input_means
from lifelong_moe.moe.expert_parallel import (
    ExpertParallelMoE,
    check_expert_parallel,
    expert_mesh,
    expert_params_per_rank,
    max_experts_per_rank,
    place,
)
from tests.gloo_ranks import run_ranks

D, H, T = 16, 32, 24
TOL = {"rtol": 1e-5, "atol": 1e-6}


def reference(frozen_dtype: str = "fp32") -> MoELayer:
    """6 experts, the first 2 frozen (stored in frozen_dtype), top-2."""
    torch.manual_seed(0)
    layer = MoELayer(D, H, 4, 2, frozen_dtype=frozen_dtype)
    layer.freeze_existing()
    layer.expand(2, gate_init="random")
    layer.train()
    return layer


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)


def step(layer, x: torch.Tensor, c: torch.Tensor):
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    (y * c).sum().backward()
    return y.detach(), x.grad, aux


def check_against_one_process(mesh, frozen_dtype: str) -> ExpertParallelMoE:
    world, rank = dist.get_world_size(), dist.get_rank()
    ref = reference(frozen_dtype)
    ep = ExpertParallelMoE(copy.deepcopy(ref), mesh)
    x, c = batch()
    y_ref, gx_ref, aux_ref = step(ref, x, c)
    rows = slice(rank * T // world, (rank + 1) * T // world)
    y, gx, aux = step(ep, x[rows], c[rows])
    torch.testing.assert_close(y, y_ref[rows], **TOL)
    torch.testing.assert_close(gx, gx_ref[rows], **TOL)
    counts = aux.tokens_per_expert.clone()
    dist.all_reduce(counts)
    assert torch.equal(counts, aux_ref.tokens_per_expert)
    ep.reduce_expert_grads()
    for p in ep.router.parameters():
        dist.all_reduce(p.grad)  # the data-parallel (DDP) part: router over every rank
    torch.testing.assert_close(ep.router.weight.grad, ref.router.weight.grad, **TOL)
    trainable = ep.owned()[ep.owned() >= ref.n_frozen] - ref.n_frozen
    for name in ("w1", "w2"):
        torch.testing.assert_close(
            getattr(ep.experts, name).grad, getattr(ref.experts, name).grad[trainable], **TOL
        )
    per_rank = torch.bincount(ep.placement, minlength=ep.ep_size)
    assert per_rank.max() <= max_experts_per_rank(ref.n_experts, ep.ep_size)
    assert expert_params_per_rank(ep) == int(per_rank[ep.ep_rank]) * 2 * D * H
    # the shards gather into the reference layer's state dict, exactly
    full = ep.full_state_dict()
    assert full.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(full[k], v.cpu()), k
    return ep


def check_growth(ep: ExpertParallelMoE, frozen_dtype: str) -> MoELayer:
    """Freeze + expand on every rank agrees with one process doing the same (same seed)."""
    ref = ep.gather()
    for layer in (ref, ep):
        torch.manual_seed(5)
        layer.freeze_existing()
        layer.expand(3, gate_init="random")
    held = torch.bincount(ep.placement, minlength=ep.ep_size)
    assert held.max() - held.min() <= 1  # new experts went to the ranks holding the fewest
    gathered = ep.gather()
    for k, v in ref.state_dict().items():
        assert torch.equal(gathered.state_dict()[k], v), k
    assert gathered.experts.frozen_dtype == frozen_dtype
    x, c = batch()
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = slice(rank * T // world, (rank + 1) * T // world)
    y_ref, _, _ = step(ref, x, c)
    y, _, _ = step(ep, x[rows], c[rows])
    torch.testing.assert_close(y, y_ref[rows], **TOL)
    return gathered


USAGE = torch.tensor([3.0, 9.0, 1.0, 9.0, 4.0, 2.0])  # a tie (1, 3): the lowest id wins


def sharded_with_usage(ref: MoELayer, mesh) -> ExpertParallelMoE:
    """ref sharded, its usage counts spread over every rank (each rank's counter is a share)."""
    ref.expert_usage.copy_(USAGE)
    ep = ExpertParallelMoE(copy.deepcopy(ref), mesh)
    world, rank = dist.get_world_size(), dist.get_rank()
    ep.expert_usage.copy_(USAGE * (torch.arange(USAGE.numel()) % world == rank))
    return ep


def check_growth_inits(mesh) -> None:
    """copy_most_used / upcycle (sources on both ep ranks, one frozen in int8, n_new past E)
    and gate_init=domain grow the shards into exactly what one process's expand grows."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = slice(rank * T // world, (rank + 1) * T // world)
    x, _ = batch()
    cases = [("copy_most_used", "mean", 3), ("upcycle", "random", 3), ("upcycle", "domain", 8)]
    for init, gate_init, n_new in cases:
        ref = reference("int8")
        ep = sharded_with_usage(ref, mesh)
        domain = None
        if gate_init == "domain":  # each rank sees its slice; the mean is over all of them
            domain = router_input_means(ep, [x[rows]], ep)[""]
            torch.testing.assert_close(domain, router_input_means(ref, [x], ref)[""], **TOL)
        for layer in (ref, ep):
            torch.manual_seed(7)
            layer.expand(n_new, init=init, gate_init=gate_init, domain=domain)
        gathered = ep.full_state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(gathered[k], v), (init, k)


def worker(rank: int, world: int, out: str, job: str) -> None:
    if job == "two":
        mesh = expert_mesh(2)
        check_against_one_process(mesh, "int8")
        ep = check_against_one_process(mesh, "fp32")
        grown = check_growth(ep, "fp32")
        check_growth_inits(mesh)
        if rank == 0:
            torch.save({"config": grown.get_config(), "state": grown.state_dict()}, out)
    else:  # four processes: dp 2 x ep 2, then re-shard the 2-process checkpoint over ep 4
        check_against_one_process(expert_mesh(2), "fp32")
        check_growth_inits(expert_mesh(2))  # usage spread over dp replicas too
        saved = torch.load(out, weights_only=True)
        full = MoELayer.from_config(saved["config"])
        full.load_state_dict(saved["state"])
        ep = ExpertParallelMoE.from_layer(copy.deepcopy(full), expert_mesh(4))
        assert ep.experts.n_experts <= max_experts_per_rank(full.n_experts, 4)
        x, c = batch()
        rows = slice(rank * T // world, (rank + 1) * T // world)
        y_ref, _, _ = step(full, x, c)
        y, _, _ = step(ep, x[rows], c[rows])
        torch.testing.assert_close(y, y_ref[rows], **TOL)


def spawn(world: int, tmp: Path, job: str) -> None:
    run_ranks(worker, world, tmp / job, str(tmp / "grown.pt"), job)


def test_two_then_four_processes_match_one_and_reshard(tmp_path: Path) -> None:
    spawn(2, tmp_path, "two")
    spawn(4, tmp_path, "four")


def test_placement_fills_the_emptiest_ranks_first() -> None:
    assert place([], 5, 2) == [0, 1, 0, 1, 0]
    assert place([0, 1, 0, 1, 0], 3, 4) == [0, 1, 0, 1, 0, 2, 3, 2]


def test_expert_parallel_must_divide_the_world_size() -> None:
    assert check_expert_parallel(2, 4) == 2
    for bad in (3, 0, "2"):
        with pytest.raises(
            ConfigError, match=r"trainer.expert_parallel=.*divisor of the world size 4"
        ):
            check_expert_parallel(bad, 4)
