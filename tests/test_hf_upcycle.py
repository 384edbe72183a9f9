"""Sparse upcycling of a dense Hugging Face LM: every SwiGLU MLP becomes E copies behind a new
router; with renormalised top-k weights the logits equal transformers' dense model at step 0."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch.utils.data import TensorDataset  # noqa: E402

from lifelong_moe.errors import ConfigError  # noqa: E402
from lifelong_moe.methods.lifelong_moe import LifelongMoE  # noqa: E402
from lifelong_moe.models import moe_layers  # noqa: E402
from lifelong_moe.models.hf_export import check_export  # noqa: E402
from lifelong_moe.models.hf_moe import HFMoECausalLM  # noqa: E402
from lifelong_moe.stream import Experience  # noqa: E402

VOCAB, LENGTH = 64, 12
LLAMA = {"hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
         "max_position_embeddings": 32, "bos_token_id": None, "eos_token_id": None,
         "pad_token_id": None}  # fmt: skip


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny random Llama saved with save_pretrained, and the reference in eval mode."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA)
    ref = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("llama")
    ref.save_pretrained(directory)
    return str(directory), ref


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("experts", "top_k"), [(4, 2), (3, 3), (4, 1)])
def test_upcycled_logits_equal_the_dense_model(dense, experts, top_k):
    directory, ref = dense
    torch.manual_seed(5)
    model = HFMoECausalLM(
        [LENGTH], VOCAB, pretrained=directory, upcycle_experts=experts, upcycle_top_k=top_k
    ).eval()
    layers = moe_layers(model)
    assert len(layers) == LLAMA["num_hidden_layers"] and model.upcycled_from == "llama"
    for path, layer in layers.items():
        assert (layer.n_experts, layer.top_k, layer.n_frozen) == (experts, top_k, 0)
        mlp = ref.get_submodule(path.removeprefix("hf.").removesuffix(".moe"))
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t()
        assert all(torch.equal(w, gate_up) for w in layer.experts.w1.detach())
        assert all(torch.equal(w, mlp.down_proj.weight.t()) for w in layer.experts.w2.detach())
    x = _tokens()
    with torch.no_grad():
        ours, aux = model(x)
        want = ref(input_ids=x).logits
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    # the random router does spread tokens over the copies (top_k < E)
    used = sum(a.tokens_per_expert for a in aux if a.tokens_per_expert is not None)
    assert top_k == experts or int((used > 0).sum()) > top_k


def test_noise_perturbs_each_copy_and_the_model_trains_and_grows(dense):
    directory, ref = dense
    torch.manual_seed(0)
    model = HFMoECausalLM(
        [LENGTH], VOCAB, pretrained=directory, upcycle_experts=4, upcycle_noise=0.01
    )
    layer = next(iter(moe_layers(model).values()))
    w1 = layer.experts.w1.detach()
    assert not torch.equal(w1[0], w1[1])
    spread = (w1 - w1.mean(0)).std() / w1.std()
    assert 0.002 < float(spread) < 0.05  # ~ noise x each weight's std
    x = _tokens()
    logits, _ = model.train()(x)
    logits.logsumexp(-1).mean().backward()
    assert layer.experts.w1.grad is not None and layer.router.weight.grad.abs().sum() > 0
    data = TensorDataset(x, x.roll(-1, 1), torch.zeros(len(x), dtype=torch.long))
    method = LifelongMoE(model, experts_per_experience=2)
    for index in (0, 1):
        method.before_experience(Experience(index, data, data, list(range(VOCAB))))
    assert all((m.n_experts, m.n_frozen) == (6, 4) for m in moe_layers(model).values())


def test_bad_upcycling_input_is_one_line(dense, tmp_path):
    directory, _ = dense
    cases = [
        ({"upcycle_experts": 0}, r"model.upcycle_experts=0: expected an integer >= 1"),
        (
            {"upcycle_experts": 2, "upcycle_top_k": 3},
            r"model.upcycle_top_k=3: expected an integer in \[1, model.upcycle_experts=2\]",
        ),
        ({"upcycle_experts": 2, "upcycle_noise": -1.0}, r"upcycle_noise=-1.0: expected"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            HFMoECausalLM([LENGTH], VOCAB, pretrained=directory, **kwargs)
    olmoe = {"hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2}  # fmt: skip
    with pytest.raises(ConfigError, match="'olmoe' is already an MoE; expected a dense model"):
        HFMoECausalLM([LENGTH], VOCAB, family="olmoe", config=olmoe, upcycle_experts=4)
    gpt2 = {"n_embd": 32, "n_layer": 1, "n_head": 4}
    with pytest.raises(ConfigError, match="'gpt2' has no dense gated MLP; expected Linear"):
        HFMoECausalLM([LENGTH], VOCAB, family="gpt2", config=gpt2, upcycle_experts=4)
    model = HFMoECausalLM([LENGTH], VOCAB, pretrained=directory, upcycle_experts=2)
    with pytest.raises(ConfigError, match="upcycled from dense 'llama'.*tracking.export=none"):
        check_export("hf", model)
