"""A pretrained Hugging Face MoE brings its tokenizer: the text benchmarks tokenize with it, and a
tokenizer whose ids outrun the model's embedding rows is refused before anything is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lifelong_moe.data.text import text_domains  # noqa: E402
from lifelong_moe.data.tokenizer import train_bpe  # noqa: E402
from lifelong_moe.run.loop import build  # noqa: E402
from lifelong_moe.run.loop_bench import compose  # noqa: E402
from tests.conftest import run_cli, store_uri  # noqa: E402

SMALL = ["benchmark=text_domains", "benchmark.domains=[yaml,python]",
         "benchmark.max_bytes_per_domain=6144", "benchmark.context_length=16"]  # fmt: skip


def _pretrained(directory: Path, vocab_rows: int, tokenizer_vocab: int) -> Path:
    """A tiny random OLMoE saved with a byte-level BPE tokenizer of ``tokenizer_vocab`` ids."""
    texts = [Path(transformers.__file__).read_text()[:50_000]]
    bpe = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, tokenizer_vocab), eos_token="<|endoftext|>"
    )
    assert len(bpe) == tokenizer_vocab
    bpe.save_pretrained(directory)
    config = transformers.AutoConfig.for_model(
        "olmoe", hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, vocab_size=vocab_rows,
        max_position_embeddings=32, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_text_domains_tokenize_with_a_directory_tokenizer(tmp_path: Path) -> None:
    directory = _pretrained(tmp_path, 320, 300)
    stream = text_domains(["yaml"], max_bytes_per_domain=4096, context_length=16,
                          tokenizer=str(directory))  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    x, y, _ = stream.experiences[0].train[0:3]
    assert stream.n_classes == 300
    assert x.max() < 300 and torch.equal(x[:, 1:], y[:, :-1])
    # Windows are consecutive pieces of the domain's encoding; the byte stream is unchanged.
    assert text_domains(["yaml"], max_bytes_per_domain=4096).n_classes == 256
    assert tok.decode(x[0]) in tok.decode(torch.cat([x[0], x[1]]))


def test_the_benchmark_follows_model_pretrained_unless_set(tmp_path: Path) -> None:
    directory = _pretrained(tmp_path, 320, 300)
    cfg = compose(["model=olmoe", f"model.pretrained={directory}", "model.config={}", *SMALL])
    assert cfg.benchmark.tokenizer == str(directory)
    exp = build(cfg)
    assert exp.stream.n_classes == 300
    assert exp.model.get_input_embeddings().num_embeddings == 320  # padded rows are fine
    cfg = compose(["model=olmoe", f"model.pretrained={directory}", "model.config={}", *SMALL,
                   "benchmark.tokenizer=bytes"])  # fmt: skip
    assert build(cfg).stream.n_classes == 256
    assert compose(["model=olmoe", *SMALL]).benchmark.tokenizer is None


def test_a_tokenizer_beyond_the_embedding_rows_is_one_line_and_nothing_recorded(
    tmp_path: Path,
) -> None:
    directory = _pretrained(tmp_path / "model", 280, 300)
    result = run_cli(
        tmp_path, "model=olmoe", f"model.pretrained={directory}", "model.config={}", *SMALL,
        f"tracking.uri={store_uri(tmp_path)}", check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        "error: tokenizer vocabulary of 300 ids: expected at most the model's 280 embedding rows"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
