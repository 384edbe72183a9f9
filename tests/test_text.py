"""Text-domain stream: builds offline, documented sizes, dedup, byte round-trip, determinism."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lifelong_moe.data.text import (
    DEFAULT_DOMAINS,
    MIN_DOMAIN_BYTES,
    SOURCES,
    VOCAB_SIZE,
    decode,
    encode,
    read_domain,
    text_domains,
    validation_block,
    windows,
)
from lifelong_moe.errors import ConfigError
from lifelong_moe.tracking import report

SMALL = {"context_length": 16, "max_bytes_per_domain": 4096}


def test_default_stream_builds_offline_with_the_documented_shape():
    stream = text_domains(**SMALL)
    assert [d.name for d in stream.domains] == list(DEFAULT_DOMAINS)
    assert len(stream) == 4 and stream.scenario == "language_modeling"
    assert stream.n_classes == VOCAB_SIZE and stream.input_shape == (16,)
    for exp, info in zip(stream.experiences, stream.domains, strict=True):
        x, y, t = exp.train.tensors
        assert x.dtype == y.dtype == t.dtype == torch.long
        assert x.shape == y.shape and x.shape[1] == 16
        assert len(exp.test) == info.n_val >= 1 and len(exp.train) == info.n_train
        assert info.n_bytes == 4096
        # y is x shifted by one byte: within a window, and across neighbouring windows.
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert int(x.min()) >= 0 and int(x.max()) < VOCAB_SIZE


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_built_in_domain_holds_at_least_the_documented_size(name):
    data, info = read_domain(name, SOURCES[name], set(), None)
    assert len(data) >= MIN_DOMAIN_BYTES, (name, len(data))
    assert info.n_documents >= 1


def test_tokens_round_trip_utf8():
    text = "Grüße, 世界! 🙂 tabs\tand\nnewlines ∑x²"
    tokens = encode(text)
    assert tokens.dtype == torch.long and len(tokens) == len(text.encode("utf-8"))
    assert decode(tokens) == text
    assert decode(tokens.tolist()) == text


def test_windows_target_every_byte_after_the_first_exactly_once():
    data = bytes(range(33))
    x, y = windows(data, 8)
    assert x.shape == (4, 8)
    assert y.flatten().tolist() == list(range(1, 33))


def test_same_seed_same_stream_other_seed_other_validation_block():
    a = text_domains(seed=1, **SMALL)
    b = text_domains(seed=1, **SMALL)
    c = text_domains(seed=2, **SMALL)
    for ea, eb in zip(a.experiences, b.experiences, strict=True):
        assert torch.equal(ea.train.tensors[0], eb.train.tensors[0])
        assert torch.equal(ea.test.tensors[0], eb.test.tensors[0])
    assert [d.sha256 for d in a.domains] == [d.sha256 for d in c.domains]  # same text
    assert any(
        not torch.equal(ea.test.tensors[0], ec.test.tensors[0])
        for ea, ec in zip(a.experiences, c.experiences, strict=True)
    )


def test_validation_is_one_contiguous_block_disjoint_from_training(tmp_path):
    data = torch.randint(0, 256, (1024,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "a.txt").write_bytes(bytes(data.tolist()))
    stream = text_domains(text_dir=str(tmp_path), context_length=8, val_fraction=0.25, seed=3)
    exp = stream.experiences[0]
    starts = exp.test.tensors[0][:, 0].tolist()
    assert len(starts) == round(0.25 * ((1024 - 1) // 8))
    train = {tuple(r) for r in exp.train.tensors[0].tolist()}
    test = {tuple(r) for r in exp.test.tensors[0].tolist()}
    assert not train & test
    all_x = torch.cat([exp.train.tensors[0], exp.test.tensors[0]])
    assert len(all_x) == (1024 - 1) // 8


def test_text_dir_domains_sorted_by_name_and_deduplicated(tmp_path):
    prose = "the quick brown fox jumps over the lazy dog. " * 20
    code = "def f(x):\n    return x + 1\n" * 30
    (tmp_path / "b_code").mkdir()
    (tmp_path / "b_code" / "one.py").write_text(code)
    (tmp_path / "b_code" / "copy.py").write_text(code)  # duplicate inside the domain
    (tmp_path / "b_code" / ".hidden").write_text("never read " * 100)
    (tmp_path / "a_prose.txt").write_text(prose)
    (tmp_path / "c_mixed").mkdir()
    (tmp_path / "c_mixed" / "again.txt").write_text(prose)  # duplicate of an earlier domain
    (tmp_path / "c_mixed" / "new.txt").write_text("fresh text, " * 50)
    stream = text_domains(text_dir=str(tmp_path), context_length=8)
    names = [d.name for d in stream.domains]
    assert names == ["a_prose", "b_code", "c_mixed"]
    by_name = {d.name: d for d in stream.domains}
    assert (by_name["b_code"].n_documents, by_name["b_code"].n_duplicates) == (1, 1)
    assert (by_name["c_mixed"].n_documents, by_name["c_mixed"].n_duplicates) == (1, 1)
    assert by_name["b_code"].n_bytes == len(code)
    assert by_name["c_mixed"].n_bytes == len("fresh text, " * 50)
    picked = text_domains(text_dir=str(tmp_path), domains=["c_mixed", "b_code"], context_length=8)
    assert [d.name for d in picked.domains] == ["c_mixed", "b_code"]
    # Without a_prose before it, c_mixed keeps its copy of the prose.
    assert (picked.domains[0].n_documents, picked.domains[0].n_duplicates) == (2, 0)
    with pytest.raises(ConfigError, match="domain 'a_prose' is empty"):
        text_domains(text_dir=str(tmp_path), domains=["c_mixed", "a_prose"], context_length=8)


def test_decode_of_a_stream_window_gives_back_the_source_text(tmp_path):
    text = "héllo wörld, " * 40
    (tmp_path / "d.txt").write_text(text, encoding="utf-8")
    stream = text_domains(text_dir=str(tmp_path), context_length=13, val_fraction=0.5, seed=0)
    exp = stream.experiences[0]
    x = torch.cat([exp.train.tensors[0], exp.test.tensors[0]])
    raw = text.encode("utf-8")
    assert sorted(bytes(r.tolist()) for r in x) == sorted(
        raw[i : i + 13] for i in range(0, 13 * len(x), 13)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domains": ["english", "klingon"]}, "'klingon' is not a domain"),
        ({"domains": ["english", "english"]}, "listed twice"),
        ({"domains": []}, "at least one domain"),
        ({"context_length": 0}, "context_length=0"),
        ({"max_bytes_per_domain": -5}, "max_bytes_per_domain=-5"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"text_dir": "/nonexistent/corpora"}, "is not a directory"),
        ({"max_bytes_per_domain": 20, "context_length": 16}, "too few"),
    ],
)
def test_bad_values_raise_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        text_domains(**kwargs)
    assert "\n" not in str(error.value)


def test_empty_domain_raises_config_error(tmp_path):
    (tmp_path / "full.txt").write_text("some text " * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "nothing.txt").write_text("")
    with pytest.raises(ConfigError, match="domain 'empty' is empty"):
        text_domains(text_dir=str(tmp_path), context_length=8)


def trained_bytes(exp, seed: int, index: int, val_fraction: float) -> bytes:
    """The bytes an experience's windows cover, rebuilt from its train and validation sets."""
    x_tr, y_tr, _ = exp.train.tensors
    x_val, y_val, _ = exp.test.tensors
    n = len(x_tr) + len(x_val)
    start, _ = validation_block(n, val_fraction, seed, index)
    x = torch.cat([x_tr[:start], x_val, x_tr[start:]])
    y = torch.cat([y_tr[:start], y_val, y_tr[start:]])
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # one contiguous byte stream
    return bytes([int(x[0, 0])] + y.flatten().tolist())


def test_logged_dataset_inputs_carry_the_sha256_of_the_trained_bytes(tmp_path):
    """What start_run logs (report.dataset_inputs) names each domain by the hash of its text."""
    L, seed, val_fraction = 8, 5, 0.2
    generator = torch.Generator().manual_seed(0)
    exact = bytes(torch.randint(0, 256, (L * 60 + 1,), generator=generator).tolist())
    tail = bytes(torch.randint(0, 256, (L * 40 + 5,), generator=generator).tolist())
    (tmp_path / "a.bin").write_bytes(exact)  # every byte is in a window
    (tmp_path / "b.bin").write_bytes(tail)  # the last 4 bytes fill no window
    stream = text_domains(
        text_dir=str(tmp_path), context_length=L, val_fraction=val_fraction, seed=seed
    )
    inputs = report.dataset_inputs({"name": "text_domains", "context_length": L}, stream)
    assert [i["name"] for i in inputs] == ["text_domains/a", "text_domains/b"]
    for index, (entry, data) in enumerate(zip(inputs, [exact, tail], strict=True)):
        exp = stream.experiences[index]
        seen = trained_bytes(exp, seed, index, val_fraction)
        assert seen == data[: len(seen)] and len(data) - len(seen) == (len(data) - 1) % L
        profile = json.loads(entry["profile"])
        assert profile == stream.domain_records()[index]
        assert profile["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["digest"] == profile["sha256"][:36]
        assert profile["n_bytes"] == len(data) and profile["where"].endswith(f"{'ab'[index]}.bin")
        assert profile["n_train_windows"] + profile["n_val_windows"] == (len(data) - 1) // L
        assert entry["context"] == f"experience_{index}"
    assert (
        json.loads(inputs[0]["profile"])["sha256"]
        == hashlib.sha256(trained_bytes(stream.experiences[0], seed, 0, val_fraction)).hexdigest()
    )
    json.dumps(stream.domain_records())  # plain, JSON-ready
