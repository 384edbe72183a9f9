"""Text-domain stream: builds offline, documented sizes, dedup, byte round-trip, determinism,
train / validation / test disjoint by document."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lifelong_moe.data.text import (
    DEFAULT_DOMAINS,
    MIN_DOMAIN_BYTES,
    SEPARATOR,
    SOURCES,
    VOCAB_SIZE,
    decode,
    encode,
    python_entries,
    read_domain,
    text_domains,
    windows,
    yaml_entries,
)
from lifelong_moe.errors import ConfigError
from lifelong_moe.tracking import report
from tests.conftest import benchmark_from_yaml

# Enough whole documents in every default domain for 1 validation + 1 test + 1 train document.
SMALL = {"context_length": 16, "max_bytes_per_domain": 32768}


def test_default_stream_builds_offline_with_the_documented_shape():
    stream = text_domains(**SMALL)
    assert [d.name for d in stream.domains] == list(DEFAULT_DOMAINS)
    assert len(stream) == 4 and stream.scenario == "language_modeling"
    assert stream.n_classes == VOCAB_SIZE and stream.input_shape == (16,)
    for exp, info in zip(stream.experiences, stream.domains, strict=True):
        x, y, t = exp.train.tensors
        assert x.dtype == y.dtype == t.dtype == torch.long
        assert x.shape == y.shape and x.shape[1] == 16
        assert len(exp.test) == info.n_windows["test"] >= 1
        assert len(exp.train) == info.n_windows["train"] >= 1
        assert len(stream.validation[exp.index]) == info.n_windows["val"] >= 1
        assert info.n_bytes <= 32768 and sum(info.n_split_documents.values()) == info.n_documents
        # y is x shifted by one byte: within a window, and across neighbouring windows.
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert int(x.min()) >= 0 and int(x.max()) < VOCAB_SIZE


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_built_in_domain_holds_at_least_the_documented_size(name):
    documents, info = read_domain(name, SOURCES[name], set(), None)
    assert info.n_bytes == len(SEPARATOR.join(documents)) >= MIN_DOMAIN_BYTES, (name, info.n_bytes)
    assert info.n_documents == len(documents) >= 3


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


def test_same_seed_same_stream_other_seed_other_split():
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


def joined(data) -> bytes:
    """The bytes a split's windows cover: x's rows, then the last target."""
    x, y, _ = data.tensors
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # one contiguous byte stream
    return bytes(x.flatten().tolist() + y.flatten()[-1:].tolist()) if len(x) else b""


@pytest.mark.parametrize("split", ["test", "validation"])
def test_built_in_splits_are_disjoint_by_document_and_split_picks_the_evaluated_one(split):
    stream = text_domains(**SMALL, seed=4, split=split)
    seen: set[str] = set()
    for index, name in enumerate(DEFAULT_DOMAINS):
        documents, info = read_domain(name, SOURCES[name], seen, SMALL["max_bytes_per_domain"])
        indices = stream.splits[index]
        parts = [set(indices[s].tolist()) for s in ("train", "val", "test")]
        assert sum(map(len, parts)) == len(documents) == info.n_documents
        assert set().union(*parts) == set(range(len(documents)))  # disjoint, and cover all
        assert all(parts)  # at least one document each
        exp = stream.experiences[index]
        held_out = stream.validation[index] if split == "validation" else None
        for s, data in (("train", exp.train), ("val", stream.validation[index])):
            text = SEPARATOR.join(documents[i] for i in indices[s])
            assert text.startswith(joined(data)) and len(text) - len(joined(data)) < 16
        evaluated = "val" if split == "validation" else "test"
        text = SEPARATOR.join(documents[i] for i in indices[evaluated])
        assert text.startswith(joined(exp.test)) and len(text) - len(joined(exp.test)) < 16
        if held_out is not None:
            assert exp.test is held_out
    other = text_domains(**SMALL, seed=4, split="test" if split == "validation" else "validation")
    for a, b in zip(stream.experiences, other.experiences, strict=True):
        assert torch.equal(a.train.tensors[0], b.train.tensors[0])  # the same training data


def test_source_files_cut_at_top_level_entries_give_the_file_back():
    source = b"import os\n\n# about f\n@dec\ndef f():\n    pass\n\nclass A:\n    x = 1\n"
    assert python_entries(source) == [
        b"import os\n\n",
        b"# about f\n@dec\ndef f():\n    pass\n\n",
        b"class A:\n    x = 1\n",
    ]
    source = b"# header\n- func: a\n  x: 1\n\n# b's note\n- func: b\n"
    assert yaml_entries(source) == [b"# header\n- func: a\n  x: 1\n\n", b"# b's note\n- func: b\n"]
    for name in ("python", "yaml"):
        documents = [d for _, d in SOURCES[name].documents()]
        assert len(documents) > 100 and min(map(len, documents)) > 0


def test_the_cap_keeps_whole_documents_in_order(tmp_path):
    (tmp_path / "d").mkdir()
    for i, size in enumerate([100, 200, 50, 400, 10]):
        (tmp_path / "d" / f"{i}.txt").write_bytes(bytes([97 + i]) * size)
    stream = text_domains(text_dir=str(tmp_path), context_length=4, max_bytes_per_domain=360)
    # 100 + 2 + 200 + 2 + 50 = 354 fits; the 400-byte document would pass 360: reading stops.
    assert stream.domains[0].n_documents == 3 and stream.domains[0].n_bytes == 354


def test_text_dir_domains_sorted_by_name_and_deduplicated(tmp_path):
    prose = "the quick brown fox jumps over the lazy dog. " * 20
    code = "def f(x):\n    return x + 1\n" * 30
    for domain in ("a_prose", "b_code", "c_mixed"):
        (tmp_path / domain).mkdir()
        for i in range(2):  # two documents of its own, so that every domain can be split
            (tmp_path / domain / f"z{i}.txt").write_text(f"{domain} extra {i}. " * 10)
    (tmp_path / "b_code" / "one.py").write_text(code)
    (tmp_path / "b_code" / "copy.py").write_text(code)  # duplicate inside the domain
    (tmp_path / "b_code" / ".hidden").write_text("never read " * 100)
    (tmp_path / "a_prose" / "prose.txt").write_text(prose)
    (tmp_path / "c_mixed" / "again.txt").write_text(prose)  # duplicate of an earlier domain
    (tmp_path / "c_mixed" / "new.txt").write_text("fresh text, " * 50)
    stream = text_domains(text_dir=str(tmp_path), context_length=8)
    names = [d.name for d in stream.domains]
    assert names == ["a_prose", "b_code", "c_mixed"]
    by_name = {d.name: d for d in stream.domains}
    assert (by_name["b_code"].n_documents, by_name["b_code"].n_duplicates) == (3, 1)
    assert (by_name["c_mixed"].n_documents, by_name["c_mixed"].n_duplicates) == (3, 1)
    extras = [f"c_mixed extra {i}. " * 10 for i in range(2)]
    assert by_name["c_mixed"].n_bytes == len("\n\n".join(["fresh text, " * 50, *extras]))
    picked = text_domains(text_dir=str(tmp_path), domains=["c_mixed", "b_code"], context_length=8)
    assert [d.name for d in picked.domains] == ["c_mixed", "b_code"]
    # Without a_prose before it, c_mixed keeps its copy of the prose.
    assert (picked.domains[0].n_documents, picked.domains[0].n_duplicates) == (4, 0)
    (tmp_path / "d_copy").mkdir()
    (tmp_path / "d_copy" / "same.txt").write_text(prose)
    with pytest.raises(ConfigError, match="domain 'd_copy' is empty"):
        text_domains(text_dir=str(tmp_path), domains=["a_prose", "d_copy"], context_length=8)
    with pytest.raises(ConfigError, match="domain 'a_prose' has 2 document.*too few") as error:
        text_domains(text_dir=str(tmp_path), domains=["c_mixed", "a_prose"], context_length=8)
    assert "\n" not in str(error.value)


def test_decode_of_a_stream_window_gives_back_the_source_text(tmp_path):
    texts = [f"héllo wörld {i}, " * 40 for i in range(3)]
    for i, text in enumerate(texts):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"{i}.txt").write_text(text, encoding="utf-8")
    stream = text_domains(text_dir=str(tmp_path), context_length=13, seed=0)
    exp, (indices,) = stream.experiences[0], stream.splits
    for data, split in ((exp.train, "train"), (exp.test, "test"), (stream.validation[0], "val")):
        raw = b"\n\n".join(texts[i].encode("utf-8") for i in indices[split])
        assert [bytes(r.tolist()) for r in data.tensors[0]] == [
            raw[i : i + 13] for i in range(0, 13 * len(data), 13)
        ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domains": ["english", "klingon"]}, "'klingon' is not a domain"),
        ({"domains": ["english", "english"]}, "listed twice"),
        ({"domains": []}, "at least one domain"),
        ({"context_length": 0}, "context_length=0"),
        ({"max_bytes_per_domain": -5}, "max_bytes_per_domain=-5"),
        ({"validation_fraction": 1.0}, "validation_fraction=1.0"),
        ({"test_fraction": 0}, "test_fraction=0"),
        ({"split": "train"}, "split='train'"),
        ({"split": "validation", "validation_fraction": 0}, "needs benchmark.validation_fraction"),
        ({"text_dir": "/nonexistent/corpora"}, "is not a directory"),
        ({"max_bytes_per_domain": 20, "context_length": 16}, "is empty"),
        ({"max_bytes_per_domain": 4096, "domains": ["english"]}, "'english' has 1 document"),
        ({"domains": ["yaml"], "max_bytes_per_domain": 4096, "context_length": 512}, "one window"),
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


def test_logged_dataset_inputs_carry_the_sha256_of_the_documents(tmp_path):
    """What start_run logs (report.dataset_inputs) names each domain by the hash of its text:
    its documents joined by the separator, every split included."""
    L, seed = 8, 5
    generator = torch.Generator().manual_seed(0)
    corpora = {}
    for name in "ab":
        (tmp_path / name).mkdir()
        corpora[name] = []
        for i in range(4):
            data = bytes(torch.randint(0, 256, (L * 10 + i,), generator=generator).tolist())
            (tmp_path / name / f"{i}.bin").write_bytes(data)
            corpora[name].append(data)
    stream = text_domains(text_dir=str(tmp_path), context_length=L, seed=seed)
    inputs = report.dataset_inputs({"name": "text_domains", "context_length": L}, stream)
    assert [i["name"] for i in inputs] == ["text_domains/a", "text_domains/b"]
    for index, (entry, name) in enumerate(zip(inputs, "ab", strict=True)):
        text = SEPARATOR.join(corpora[name])
        profile = json.loads(entry["profile"])
        assert profile == stream.domain_records()[index]
        assert profile["sha256"] == hashlib.sha256(text).hexdigest()
        assert entry["digest"] == profile["sha256"][:36]
        assert profile["n_bytes"] == len(text) and profile["where"].endswith(name)
        assert profile["n_documents"] == 4
        assert [profile[f"n_{s}_documents"] for s in ("train", "val", "test")] == [2, 1, 1]
        for s, data in (("train", stream.experiences[index].train), ("val", None)):
            data = data if data is not None else stream.validation[index]
            part = SEPARATOR.join(corpora[name][i] for i in stream.splits[index][s])
            assert profile[f"n_{s}_windows"] == len(data) == (len(part) - 1) // L
        assert entry["context"] == f"experience_{index}"
    json.dumps(stream.domain_records())  # plain, JSON-ready


def test_conf_split_validation_builds_the_validation_windows():
    stream = benchmark_from_yaml(
        "text_domains", domains=["yaml"], max_bytes_per_domain=4096, split="validation"
    )
    (exp,) = stream.experiences
    assert exp.test is stream.validation[0]
    assert len(exp.test) == stream.domains[0].n_windows["val"] >= 1
