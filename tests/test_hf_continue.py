"""A run from an export (model.pretrained=<export dir>) continues growing: the frozen banks and
the expert origins come back from lifelong_moe_experts.json, and the next experience grows;
a method that does not freeze experts (moe_finetune, naive, ...) trains the restored ones too."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("transformers")

from lifelong_moe.errors import ConfigError  # noqa: E402
from lifelong_moe.methods.lifelong_moe import LifelongMoE  # noqa: E402
from lifelong_moe.methods.naive import Naive  # noqa: E402
from lifelong_moe.models import moe_layers  # noqa: E402
from lifelong_moe.models.hf_export import export_hf  # noqa: E402
from lifelong_moe.models.hf_moe import EXPERTS_JSON, HFMoECausalLM  # noqa: E402
from lifelong_moe.stream import Experience  # noqa: E402

VOCAB, LENGTH = 64, 8
SHAPE = {"hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
         "num_experts_per_tok": 2, "vocab_size": VOCAB, "max_position_embeddings": 16}  # fmt: skip


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny OLMoE grown once (4 frozen + 2 trainable experts per layer), exported."""
    torch.manual_seed(0)
    model = HFMoECausalLM([LENGTH], VOCAB, family="olmoe", config=SHAPE)
    for layer in moe_layers(model).values():
        layer.freeze_existing()
        layer.expand(2, init="upcycle", gate_init="random")
    directory = tmp_path_factory.mktemp("export")
    export_hf(model, directory, expert_origin=[0] * 4 + [1] * 2)
    return directory, model.eval()


def _experience(index: int) -> Experience:
    x = torch.randint(0, VOCAB, (8, LENGTH), generator=torch.Generator().manual_seed(index))
    data = TensorDataset(x, x.roll(-1, 1), torch.zeros(8, dtype=torch.long))
    return Experience(index, data, data, list(range(VOCAB)))


def test_banks_and_origins_come_back(export):
    directory, grown = export
    model = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(directory))
    assert model.expert_origin == [-2] * 4 + [-1] * 2  # relative to this run: all earlier
    for name, layer in moe_layers(model).items():
        before = moe_layers(grown)[name]
        assert (layer.n_experts, layer.n_frozen) == (6, 4)
        assert torch.equal(layer.experts.w1_frozen, before.experts.w1_frozen)
        assert torch.equal(layer.router.weight_frozen, before.router.weight_frozen)
        assert torch.equal(layer.experts.w1, before.experts.w1.detach())
        frozen = {id(t) for t in (layer.experts.w1_frozen, layer.router.weight_frozen)}
        assert not frozen & {id(p) for p in model.parameters()}  # buffers, never optimised
    x = _experience(0).train.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], grown(x)[0], rtol=1e-5, atol=1e-5)


def test_the_first_experience_of_the_continued_run_grows(export):
    directory, _ = export
    model = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(directory))
    method = LifelongMoE(model, experts_per_experience=2, lambda_kd=1.0)
    method.before_experience(_experience(0))
    for layer in moe_layers(model).values():
        assert (layer.n_experts, layer.n_frozen) == (8, 6)
    assert method.expert_origins() == [-2] * 4 + [-1] * 2 + [0] * 2
    assert method.teacher is not None  # distils toward the exported model
    method.before_experience(_experience(1))
    assert method.expert_origins()[-2:] == [1, 1]
    # A model without a record starts as before: no growth at experience 0.
    fresh = HFMoECausalLM([LENGTH], VOCAB, family="olmoe", config=SHAPE)
    LifelongMoE(fresh, experts_per_experience=2).before_experience(_experience(0))
    assert all(layer.n_experts == 4 for layer in moe_layers(fresh).values())


def test_a_record_that_does_not_match_is_one_line(export, tmp_path):
    directory, _ = export
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    record = json.loads((directory / EXPERTS_JSON).read_text())
    (tmp_path / EXPERTS_JSON).write_text(json.dumps({**record, "expert_origin": [0, 1]}))
    with pytest.raises(ConfigError, match=f"{EXPERTS_JSON} does not match the model"):
        HFMoECausalLM([LENGTH], VOCAB, pretrained=str(tmp_path))


def _adamw_step(model: torch.nn.Module, exp: Experience) -> None:
    """One AdamW step with weight decay on the next-token loss of ``exp``'s windows."""
    x, y, _ = exp.train.tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    logits, _ = model.train()(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    optimizer.step()


def _full_w1(layer) -> torch.Tensor:
    e = layer.experts
    return torch.cat([e.frozen_weight("w1"), e.w1.detach()]).clone()


def test_moe_finetune_trains_the_restored_frozen_experts_lifelong_moe_keeps_them(export):
    """moe_finetune trains every expert (conf/method/moe_finetune.yaml: no growth, no freezing,
    no KD), so the export's frozen banks become trainable before its first experience, with the
    same values; lifelong_moe keeps them frozen, bit-identical through AdamW with weight decay."""
    directory, grown = export
    x = _experience(0).train.tensors[0]
    finetuned = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(directory))
    before = {name: _full_w1(layer) for name, layer in moe_layers(finetuned).items()}
    method = LifelongMoE(finetuned, experts_per_experience=0, freeze_old=False, lambda_kd=0.0)
    method.before_experience(_experience(0))
    trainable = {id(p) for p in finetuned.parameters()}
    for name, layer in moe_layers(finetuned).items():
        assert (layer.n_experts, layer.n_frozen) == (6, 0)
        assert torch.equal(layer.experts.w1.detach(), before[name])
        assert id(layer.experts.w1) in trainable and id(layer.router.weight) in trainable
    with torch.no_grad():
        torch.testing.assert_close(finetuned.eval()(x)[0], grown(x)[0], rtol=1e-5, atol=1e-5)
    _adamw_step(finetuned, _experience(0))
    for name, layer in moe_layers(finetuned).items():
        assert not torch.equal(layer.experts.w1.detach()[:4], before[name][:4])

    kept = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(directory))
    LifelongMoE(kept, experts_per_experience=2).before_experience(_experience(0))
    _adamw_step(kept, _experience(0))
    for name, layer in moe_layers(kept).items():
        assert layer.n_frozen == 6
        assert torch.equal(layer.experts.w1_frozen, _full_w1(moe_layers(grown)[name])[:6])


def test_every_method_that_does_not_freeze_trains_all_experts(export):
    """The rule lives in ContinualMethod: naive (and ewc, lwf, replay, joint) thaw too."""
    directory, _ = export
    model = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(directory))
    Naive(model).before_experience(_experience(0))
    assert all(layer.n_frozen == 0 for layer in moe_layers(model).values())
