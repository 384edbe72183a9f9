"""A Hugging Face MoE (tiny random OLMoE: SwiGLU experts) under expert parallelism, 2 gloo
processes against one: the same logits, input-embedding and expert gradients after one step's
forward and backward, and growth with the family's default init (copy_most_used) agrees."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.gloo_ranks import run_ranks

transformers = pytest.importorskip("transformers")

from lifelong_moe.models import moe_layers  # noqa: E402
from lifelong_moe.models.hf_moe import HFMoECausalLM  # noqa: E402
from lifelong_moe.moe.expert_parallel import expert_mesh, shard_moe_layers  # noqa: E402

VOCAB, LENGTH, BATCH = 64, 12, 4
CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_experts_per_tok": 2, "vocab_size": VOCAB,
          "max_position_embeddings": 32, "intermediate_size": 16, "num_experts": 6}  # fmt: skip
TOL = {"rtol": 1e-5, "atol": 1e-6}


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, _ = model(x)
    return logits, torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum"
    )


def worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    ref = HFMoECausalLM([LENGTH], VOCAB, family="olmoe", config=CONFIG)
    for layer in moe_layers(ref).values():  # the most used expert lives on ep rank 1
        layer.expert_usage.copy_(torch.tensor([1e3, 5e3, 2e3, 3e3, 0.0, 4e3]))
    model = copy.deepcopy(ref)
    sharded = shard_moe_layers(model, expert_mesh(world))
    assert len(sharded) == 2 and all(s.experts.n_experts == 3 for s in sharded.values())
    x = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    logits_ref, loss_ref = loss_of(ref.train(), x)
    loss_ref.backward()
    logits, loss = loss_of(model.train(), x[rows])
    loss.backward()
    torch.testing.assert_close(logits, logits_ref[rows], **TOL)
    embed = model.get_input_embeddings().weight.grad.clone()
    dist.all_reduce(embed)  # the data-parallel (DDP) part
    torch.testing.assert_close(embed, ref.get_input_embeddings().weight.grad, **TOL)
    for name, layer in sharded.items():
        full = moe_layers(ref)[name]
        for w in ("w1", "w2"):
            expected = getattr(full.experts, w).grad[layer.owned()]
            torch.testing.assert_close(getattr(layer.experts, w).grad, expected, **TOL)
    # growth with the family's default init: the gathered layers equal one process's
    assert ref.growth_init["expand_init"] == "copy_most_used"
    for m in (ref, model):
        torch.manual_seed(3)
        for layer in moe_layers(m).values():
            layer.freeze_existing()
            layer.expand(2, init="copy_most_used", gate_init=ref.growth_init["gate_init"])
    for name, layer in sharded.items():
        gathered = layer.full_state_dict()
        for k, v in moe_layers(ref)[name].state_dict().items():
            assert torch.equal(gathered[k], v), (name, k)


def test_olmoe_sharded_over_two_processes_matches_one(tmp_path: Path) -> None:
    run_ranks(worker, 2, tmp_path)
