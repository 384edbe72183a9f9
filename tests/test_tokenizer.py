"""The tokenizer seam (data/tokenizer.py): bytes, a trained BPE (cached), a local HF directory."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from lifelong_moe.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from lifelong_moe.errors import ConfigError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE = [(STDLIB / f"{name}.py").read_text() for name in ("abc", "bisect", "heapq", "keyword")]
TEXT = "def f(x):\n    return x + 1  # é\n"


def test_bytes_round_trip_and_eos() -> None:
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([*tok.encode(TEXT), tok.eos_id]) == TEXT


def test_trained_bpe_is_deterministic_and_cached(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    first = load_tokenizer("train:300", SAMPLE, tmp_path / "a")
    again = load_tokenizer("train:300", SAMPLE, tmp_path / "b")  # trained anew elsewhere
    assert first.fingerprint == again.fingerprint
    assert (first.vocab_size, first.eos_id) == (300, 0)
    ids = first.encode(TEXT)
    assert len(ids) < len(TEXT.encode()) and max(ids) < 300
    assert first.decode(ids) == TEXT
    assert first.encode_batch([TEXT, "x"]) == [ids, first.encode("x")]
    saved = list((tmp_path / "a" / "tokenizers").iterdir())
    assert len(saved) == 1 and (saved[0] / "tokenizer.json").is_file()
    (saved[0] / "tokenizer.json").write_text((saved[0] / "tokenizer.json").read_text())
    mtime = (saved[0] / "tokenizer.json").stat().st_mtime_ns
    assert load_tokenizer("train:300", SAMPLE, tmp_path / "a").fingerprint == first.fingerprint
    assert (saved[0] / "tokenizer.json").stat().st_mtime_ns == mtime  # read, not trained again
    assert load_tokenizer("train:320", SAMPLE, tmp_path / "a").fingerprint != first.fingerprint


def test_hf_directory_gives_the_same_ids_and_its_chat_template(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    trained = load_tokenizer("train:300", SAMPLE)
    hf = PreTrainedTokenizerFast(tokenizer_object=trained.backend, eos_token="<|endoftext|>")
    hf.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    hf.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.vocab_size, tok.eos_id) == (300, 0)
    assert tok.encode(TEXT) == trained.encode(TEXT)
    assert tok.chat_template == hf.chat_template
    only_json = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    assert only_json.encode(TEXT) == trained.encode(TEXT)
    assert only_json.fingerprint != tok.fingerprint  # different files, different cache key


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("/no/such/tokenizer", "no such file or directory"),
        ("train:100", "at least 257"),
        ("train:lots", "train:<vocab size>"),
        ("", "expected 'bytes'"),
    ],
)
def test_bad_specs_are_one_line(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as error:
        load_tokenizer(spec, SAMPLE)
    assert "\n" not in str(error.value)
