"""Hugging Face MoE families on the toolkit's MoELayer: conversion, growth, freezing, export.

Every model is a tiny random one built from the family's config class (nothing is downloaded).
The references are transformers' own models with the eager experts implementation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lifelong_moe.data.tokenizer import (  # noqa: E402
    SAVED_AUTO,
    SAVED_BYTES,
    ByteTokenizer,
    TransformersTokenizer,
    load_tokenizer,
    save_for_transformers,
)
from lifelong_moe.errors import ConfigError  # noqa: E402
from lifelong_moe.models import moe_layers  # noqa: E402
from lifelong_moe.models.hf_export import export_hf  # noqa: E402
from lifelong_moe.models.hf_moe import EXPERTS_JSON, HFMoECausalLM, check_vocab  # noqa: E402
from lifelong_moe.moe.dispatch import grouped_experts, loop_experts  # noqa: E402
from lifelong_moe.moe.experts import ACTIVATIONS, glu  # noqa: E402

VOCAB, LENGTH = 64, 12
_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_experts_per_tok": 2, "vocab_size": VOCAB,
          "max_position_embeddings": 32}  # fmt: skip
FAMILIES = {
    "olmoe": {**_SHAPE, "intermediate_size": 16, "num_experts": 6},
    "qwen2_moe": {
        **_SHAPE,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "num_experts": 6,
        "norm_topk_prob": False,
    },  # fmt: skip
    "mixtral": {**_SHAPE, "intermediate_size": 16, "num_local_experts": 6},
}
family = pytest.mark.parametrize("fam", list(FAMILIES))


def _saved_reference(fam: str, directory) -> torch.nn.Module:
    """A random transformers model of the family, saved to `directory`, in eval mode."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(fam, **FAMILIES[fam])
    ref = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    ref.save_pretrained(directory)
    return ref.eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(seed))


def _grow(model: torch.nn.Module, n_new: int = 2, **kw) -> None:
    for layer in moe_layers(model).values():
        layer.freeze_existing()
        layer.expand(n_new, **kw)


@family
def test_logits_equal_after_conversion(fam, tmp_path):
    ref = _saved_reference(fam, tmp_path)
    model = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(tmp_path)).eval()
    x = _tokens()
    with torch.no_grad():
        logits, aux = model(x)
        want = ref(input_ids=x).logits
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert model.family == fam and len(aux) == len(moe_layers(model)) == 2
    layer = next(iter(moe_layers(model).values()))
    assert layer.experts.gated and (layer.shared is not None) == (fam == "qwen2_moe")
    assert layer.router.order == ("topk_softmax" if fam == "mixtral" else "softmax_topk")


@family
def test_gated_grouped_equals_loop_with_frozen_bank_and_gradients(fam):
    torch.manual_seed(0)
    model = HFMoECausalLM([LENGTH], VOCAB, family=fam, config=FAMILIES[fam])
    _grow(model)
    layer = next(iter(moe_layers(model).values()))
    x = torch.randn(20, 32)
    routing = layer.router(x)
    act = glu(ACTIVATIONS[layer.activation])
    outs = []
    for impl in (loop_experts, grouped_experts):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y, counts, _ = impl(
            xi, routing.expert_ids, routing.gates.detach(), None, layer.experts, act
        )
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), counts, xi.grad, layer.experts.w1.grad, layer.experts.w2.grad))
    for u, v in zip(*outs, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    assert layer.experts.w1_frozen.grad is None and not layer.experts.w1_frozen.requires_grad


@family
def test_old_experts_and_gate_rows_bit_identical_after_adamw(fam):
    torch.manual_seed(0)
    model = HFMoECausalLM([LENGTH], VOCAB, family=fam, config=FAMILIES[fam])
    _grow(model, init="upcycle", gate_init="zero")
    frozen = {n: b.clone() for n, b in model.named_buffers() if "frozen" in n}
    assert frozen and all("frozen" not in n for n, _ in model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    new_before = next(iter(moe_layers(model).values())).experts.w1.detach().clone()
    for step in range(3):
        logits, aux = model(_tokens(step))
        loss = logits.logsumexp(-1).mean() + sum(a.balance_loss for a in aux)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_buffers())[name], before), name
    assert not torch.equal(next(iter(moe_layers(model).values())).experts.w1, new_before)


@family
def test_masking_the_new_experts_reproduces_the_previous_phase(fam):
    torch.manual_seed(0)
    model = HFMoECausalLM([LENGTH], VOCAB, family=fam, config=FAMILIES[fam]).eval()
    x = _tokens()
    with torch.no_grad():
        before, _ = model(x)
        _grow(model, n_new=3, init="copy_most_used", gate_init="random")
        grown, _ = model(x)
        previous, aux = model(x, expert_mask=torch.arange(9) < 6)
    assert torch.equal(previous, before)
    assert not torch.equal(grown, before)  # the new experts do take tokens
    assert all(int(a.tokens_per_expert[6:].sum()) == 0 for a in aux)


_RELOAD = """
import sys, torch, transformers
text = sys.stdin.read()
for directory in sys.argv[1:]:
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    m = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.save(m(input_ids=ids).logits, directory + "/y.pt")
    c = m.config
    print(c.num_local_experts if hasattr(c, "num_local_experts") else c.num_experts)
    print(",".join(map(str, ids[0].tolist())))
assert "lifelong_moe" not in sys.modules
"""
# Encoded by each export's own tokenizer in the plain-transformers process.
TEXT = "Sparse is better than dense."


def _word_bpe(directory: Path) -> Path:
    """A whitespace BPE of VOCAB ids (the byte-level one needs 257), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [Path(json.__file__).read_text()]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<unk>"], limit_alphabet=40,
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    assert backend.get_vocab_size() == VOCAB
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each family grown by 2 experts and exported with a tokenizer (olmoe: a tokenizers
    tokenizer.json, the others: the transformers tokenizer it reloads as); one plain-transformers
    process (which never imports lifelong_moe) loads each export's tokenizer and model, encodes
    TEXT and runs it: {family: (dir, our ids, our logits, its ids, its logits, its count)}."""
    root = tmp_path_factory.mktemp("exports")
    fast = load_tokenizer(str(_word_bpe(root / "bpe")))
    saved = save_for_transformers(fast, root / "auto")
    auto = load_tokenizer(str(root / "auto"))
    assert saved == SAVED_AUTO and isinstance(auto, TransformersTokenizer)
    done = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        model = HFMoECausalLM([32], VOCAB, family=fam, config=FAMILIES[fam]).eval()
        _grow(model, n_new=2, init="upcycle", gate_init="random")
        tok = fast if fam == "olmoe" else auto
        ids = tok.encode(TEXT)
        with torch.no_grad():
            want, _ = model(torch.tensor([ids]))
        saved = save_for_transformers(tok, root / fam)
        out = export_hf(model, root / fam, expert_origin=[0] * 6 + [1] * 2, tokenizer=saved)
        done[fam] = (out, ids, want)
    dirs = [str(out) for out, _, _ in done.values()]
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, *dirs],
        input=TEXT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    return {
        fam: (out, ids, want, [int(i) for i in lines[2 * k + 1].split(",")],
              torch.load(out / "y.pt"), lines[2 * k])
        for k, (fam, (out, ids, want)) in enumerate(done.items())
    }  # fmt: skip


@family
def test_export_reloads_in_plain_transformers_with_equal_logits(fam, exports):
    out, ids, want, their_ids, reloaded, count = exports[fam]
    assert count == "8"
    assert their_ids == ids and len(ids) > 10  # the exported tokenizer encodes as ours did
    torch.testing.assert_close(reloaded, want, rtol=1e-5, atol=1e-5)
    assert list(out.glob("*.safetensors"))
    record = json.loads((out / EXPERTS_JSON).read_text())
    assert record["family"] == fam and record["expert_origin"] == [0] * 6 + [1] * 2
    assert record["tokenizer"] == SAVED_AUTO
    assert all(v == {"n_experts": 8, "n_frozen": 6} for v in record["layers"].values())


def test_byte_tokens_are_recorded_not_saved(tmp_path):
    """Byte ids have no tokenizer files: the export's JSON says so (benchmark.tokenizer=bytes)."""
    assert save_for_transformers(None, tmp_path) == SAVED_BYTES
    assert save_for_transformers(ByteTokenizer(), tmp_path) == SAVED_BYTES
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained='.*nowhere': expected a local dir"):
        HFMoECausalLM([LENGTH], VOCAB, pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="expected a config.json in it"):
        HFMoECausalLM([LENGTH], VOCAB, pretrained=str(tmp_path))
    with pytest.raises(ConfigError, match="model.family='no_such'.*olmoe, qwen2_moe, mixtral"):
        HFMoECausalLM([LENGTH], VOCAB, family="no_such")
    dense = {k: v for k, v in _SHAPE.items() if k != "num_experts_per_tok"}
    with pytest.raises(ConfigError, match="'llama' has no sparse MoE block: a dense model"):
        HFMoECausalLM([LENGTH], VOCAB, family="llama", config={**dense, "intermediate_size": 16})
    _saved_reference("olmoe", tmp_path)
    with pytest.raises(ConfigError, match="tokenizer vocabulary of 65 ids: expected at most .* 64"):
        HFMoECausalLM([LENGTH], VOCAB + 1, pretrained=str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "olmoe_v9"}))
    with pytest.raises(
        ConfigError, match="model_type='olmoe_v9', not a transformers .* model type"
    ):
        HFMoECausalLM([LENGTH], VOCAB, pretrained=str(tmp_path))


def test_check_vocab_accepts_padded_embeddings():
    model = HFMoECausalLM([LENGTH], VOCAB, family="olmoe", config=FAMILIES["olmoe"])
    check_vocab(VOCAB - 10, model)  # more rows than ids: fine
    with pytest.raises(ConfigError, match="tokenizer vocabulary of 100 ids"):
        check_vocab(100, model)


def test_unsupported_block_structure_names_what_was_found():
    """A block whose experts are a ModuleList of Linear MLPs (older layouts) is refused."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("olmoe", **FAMILIES["olmoe"])
    ref = transformers.AutoModelForCausalLM.from_config(config)
    block = ref.model.layers[0].mlp
    block.experts = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(2))
    from lifelong_moe.models.hf_moe import find_blocks

    with pytest.raises(ConfigError, match=r"unsupported MoE block structure: model.layers.0.mlp"):
        find_blocks(ref)


TINY_HF_RUN = [
    "model=olmoe",
    "method=lifelong_moe",
    "method.experts_per_experience=2",
    "method.expand_init=upcycle",
    "method.gate_init=domain",
    "benchmark=text_domains",
    "benchmark.domains=[yaml,python]",
    "benchmark.max_bytes_per_domain=6144",
    "benchmark.context_length=16",
    "benchmark.tokenizer=train:300",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=16",
    "trainer.max_epochs=1",
    "trainer.batch_size=32",
    "trainer.progress_bar=false",
    "tracking.log_checkpoints=false",
    "tracking.system_metrics=false",
    "tracking.export=hf",
    "tracking.export_every=2",
]


def test_cli_grows_olmoe_and_exports_the_last_experience(workdir):
    """One tiny CLI run: 2 domains, a BPE trained on them, growth with upcycled experts and
    domain gate rows; with export_every=2 only the last experience is exported, with its
    tokenizer, and MLflow holds it."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_cli, runs, store_uri

    uri = store_uri(workdir)
    run_cli(workdir, *TINY_HF_RUN, f"tracking.uri={uri}")
    (run,) = runs(uri, experiment="lifelong-moe")
    client = MlflowClient(uri)
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "hf_export")}
    assert exported == {"hf_export/exp_1"}
    files = {
        a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "hf_export/exp_1")
    }
    assert {"config.json", "model.safetensors", EXPERTS_JSON} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    local = client.download_artifacts(run.info.run_id, f"hf_export/exp_1/{EXPERTS_JSON}")
    record = json.loads(Path(local).read_text())
    assert record["tokenizer"] == SAVED_AUTO
    assert record["expert_origin"] == [0] * 8 + [1] * 2
    assert all(v == {"n_experts": 10, "n_frozen": 8} for v in record["layers"].values())
    metrics = client.get_metric_history(run.info.run_id, "cost/params_active")
    assert len({m.value for m in metrics}) == 1  # top-k fixed: active parameters constant


def test_cli_export_needs_an_hf_model(workdir):
    from tests.conftest import run_cli, store_uri

    result = run_cli(
        workdir, "model=moe_lm", "benchmark=text_domains", "tracking.export=hf",
        f"tracking.uri={store_uri(workdir)}", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "tracking.export=hf with model CausalLM: expected model=hf_moe" in result.stderr
    assert not (workdir / "mlflow.db").exists()
