"""benchmark=token_domains: shards, EOS, windows as views, split by document, cache, bad input."""

from __future__ import annotations

import json
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lifelong_moe.data import corpus, shards
from lifelong_moe.data.tokenizer import ByteTokenizer
from lifelong_moe.data.tokens import PackedWindows, split_documents, token_domains
from lifelong_moe.errors import ConfigError
from tests.conftest import artifact_json, benchmark_from_yaml, run_cli, runs, store_uri

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["abc", "bisect", "heapq", "keyword", "glob", "fnmatch", "colorsys", "shlex", "sched"]


def corpora(root: Path, chars: int | None = None) -> Path:
    """Domain ``code``: 9 stdlib modules as .txt files; ``mail``: the email package as jsonl
    (each document cut to its first ``chars`` characters when given)."""
    (root / "code").mkdir(parents=True)
    for name in MODULES:
        (root / "code" / f"{name}.txt").write_text((STDLIB / f"{name}.py").read_text()[:chars])
    (root / "mail").mkdir()
    with (root / "mail" / "docs.jsonl").open("w") as out:
        for path in sorted((STDLIB / "email").glob("*.py"))[:12]:
            out.write(json.dumps({"text": path.read_text()[:chars], "id": path.name}) + "\n")
    return root


def documents(root: Path, domain: str) -> list[str]:
    if domain == "code":
        return [(STDLIB / f"{n}.py").read_text() for n in sorted(MODULES)]
    lines = (root / "mail" / "docs.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


def build(root: Path, **kwargs):
    defaults = {"text_dir": str(root / "text"), "cache_dir": str(root / "cache")}
    return token_domains(**{**defaults, "context_length": 16, **kwargs})


@pytest.fixture
def text(tmp_path: Path) -> Path:
    corpora(tmp_path / "text")
    return tmp_path


def test_shard_is_every_document_then_eos_in_file_order(text: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "PIECE_CHARS", 1000)  # long files come in pieces: one document
    stream = build(text)
    tok = ByteTokenizer()
    assert stream.n_classes == 257 and [d.name for d in stream.domains] == ["code", "mail"]
    for exp, domain in zip(stream.experiences, ("code", "mail"), strict=True):
        shard = exp.train.shard
        docs = documents(text / "text", domain)
        expected = np.concatenate([[*tok.encode(d), tok.eos_id] for d in docs])
        assert shard.tokens.dtype == np.uint16
        np.testing.assert_array_equal(shard.tokens, expected)
        ends = np.cumsum([len(d.encode()) + 1 for d in docs])
        np.testing.assert_array_equal(shard.documents, np.concatenate([[0], ends]))
        assert (shard.tokens[shard.documents[1:] - 1] == tok.eos_id).all()
        assert (shard.tokens == tok.eos_id).sum() == len(docs)


def test_tokenization_is_deterministic(text: Path) -> None:
    a = build(text, tokenizer="train:300", cache_dir=str(text / "a"))
    b = build(text, tokenizer="train:300", cache_dir=str(text / "b"))
    for x, y in zip(a.experiences, b.experiences, strict=True):
        assert x.train.shard.folder.name == y.train.shard.folder.name
        np.testing.assert_array_equal(x.train.shard.tokens, y.train.shard.tokens)
    assert a.n_classes == 300 and max(int(e.train.shard.tokens.max()) for e in a.experiences) < 300


def test_windows_are_views_of_the_packed_split(text: Path) -> None:
    stream = build(text)
    exp = stream.experiences[0]
    shard, split = exp.train.shard, stream.splits[0]
    packed = np.concatenate(
        [shard.tokens[shard.documents[d] : shard.documents[d + 1]] for d in split["train"]]
    )
    assert len(exp.train) == (len(packed) - 1) // 16
    views = 0
    for i in range(len(exp.train)):
        window = exp.train.window(i)
        np.testing.assert_array_equal(window, packed[i * 16 : i * 16 + 17])
        views += np.shares_memory(window, shard.tokens)
    assert views >= len(exp.train) - len(split["val"]) - len(split["test"])  # stitched: rare
    x, y, t = exp.train[5]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16,) and int(t) == 0
    torch.testing.assert_close(
        torch.cat([x, y[-1:]]), torch.from_numpy(packed[80:97].astype(np.int64))
    )
    assert len(pickle.dumps(exp.train)) < 10_000  # a worker reopens the map, never a copy


def test_split_is_by_document_disjoint_and_fixed_by_seed(text: Path) -> None:
    split = split_documents(100, 0.1, 0.2, seed=4, index=1)
    sets = [set(split[s].tolist()) for s in ("train", "val", "test")]
    assert [len(s) for s in sets] == [70, 10, 20]
    assert set().union(*sets) == set(range(100)) and sum(map(len, sets)) == 100
    again = split_documents(100, 0.1, 0.2, seed=4, index=1)
    assert all((again[s] == split[s]).all() for s in split)
    assert not (split_documents(100, 0.1, 0.2, seed=5, index=1)["val"] == split["val"]).all()
    assert not (split_documents(100, 0.1, 0.2, seed=4, index=2)["val"] == split["val"]).all()
    # every test/validation window holds tokens of its own split's documents only
    stream = build(text, seed=2)
    for exp, val, split in zip(stream.experiences, stream.validation, stream.splits, strict=True):
        shard = exp.train.shard
        owner = np.searchsorted(shard.documents, np.arange(len(shard.tokens)), side="right") - 1
        for data, name in ((exp.test, "test"), (val, "val"), (exp.train, "train")):
            held = np.zeros(shard.n_documents, dtype=bool)
            held[split[name]] = True
            for run in data.runs:
                assert held[owner[run[0] : run[1]]].all()
            assert data.n_tokens == held[owner].sum()


def test_second_run_reads_the_cache(text: Path, monkeypatch, capsys) -> None:
    first = build(text, tokenizer="train:300")
    assert "tokenized code" in capsys.readouterr().out  # progress: bytes, MB/s, tokens

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(shards, "tokenize_into", refuse)
    monkeypatch.setattr("lifelong_moe.data.tokenizer.train_bpe", refuse)
    second = build(text, tokenizer="train:300")
    assert capsys.readouterr().out == ""
    assert [d.record() for d in second.domains] == [d.record() for d in first.domains]


def test_xdg_cache_home_is_the_default(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert shards.default_cache_dir() == tmp_path / "lifelong_moe" / "tokens"


def test_parquet_documents(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [(STDLIB / f"{n}.py").read_text() for n in MODULES]
    (tmp_path / "text" / "p").mkdir(parents=True)
    pq.write_table(pa.table({"body": texts}), tmp_path / "text" / "p" / "a.parquet")
    stream = build(tmp_path, text_field="body")
    assert stream.domains[0].n_documents == len(texts)
    assert stream.domains[0].n_tokens == sum(len(t.encode()) + 1 for t in texts)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: (d / "empty").mkdir(), "'empty' is empty: no files"),
        (
            lambda d: (d / "blank").mkdir() or (d / "blank" / "a.txt").write_text(""),
            "'blank' is empty",
        ),
        (
            lambda d: (
                (d / "j").mkdir()
                or (d / "j" / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
            ),
            r"x.jsonl:2: no 'text' field",
        ),
        (
            lambda d: (
                (d / "short").mkdir()
                or [(d / "short" / f"{i}.txt").write_text("tiny") for i in range(5)]
            ),
            "'short' is shorter than one window",
        ),
    ],
)
def test_bad_domains_are_one_line(tmp_path: Path, make, words: str) -> None:
    (tmp_path / "text").mkdir()
    make(tmp_path / "text")
    with pytest.raises(ConfigError, match=words) as error:
        build(tmp_path)
    assert "\n" not in str(error.value)
    staging = [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]
    assert not staging  # nothing half-built is left behind


def test_missing_tokenizer_path_is_one_line(text: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or directory"):
        build(text, tokenizer=str(text / "no-tokenizer"))


def test_conf_builds_the_stream(text: Path) -> None:
    stream = benchmark_from_yaml(
        "token_domains",
        text_dir=str(text / "text"),
        cache_dir=str(text / "cache"),
        domains=["mail", "code"],
    )
    assert [d.name for d in stream.domains] == ["mail", "code"]
    assert isinstance(stream.experiences[0].train, PackedWindows)


@pytest.mark.slow
def test_cli_run_is_recorded_and_resumes_mid_experience_bit_identical(tmp_path: Path) -> None:
    """A trained-BPE moe_lm run on two domains, read back from MLflow; the same run killed at step
    7 of experience 1 and resumed (from its step-6 checkpoint) ends with the same matrices and
    losses, bit for bit."""
    from mlflow.tracking import MlflowClient

    from tests.test_checkpoints import metric_steps, run_until, train_losses

    corpora(tmp_path / "text", chars=3000)
    args = [
        "benchmark=token_domains",
        f"benchmark.text_dir={tmp_path / 'text'}",
        f"benchmark.cache_dir={tmp_path / 'cache'}",
        "benchmark.tokenizer=train:300",
        "benchmark.context_length=32",
        "model=moe_lm",
        "model.d_model=32",
        "model.d_hidden=32",
        "model.n_blocks=2",
        "model.moe_blocks=[1]",
        "method=lifelong_moe",
        "trainer.max_epochs=1",
        "trainer.batch_size=16",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.progress_bar=false",
        "tracking.log_checkpoints=false",
    ]
    results = {}
    for name in ("reference", "killed"):
        (tmp_path / name).mkdir()
        uri = store_uri(tmp_path / name)
        if name == "killed":
            run_until(tmp_path / name, [f"tracking.uri={uri}", *args], "train_step:1:7")
            resumed = run_cli(tmp_path / name, f"tracking.uri={uri}", "resume=last")
            assert "at experience 1, epoch 0, step 6" in resumed.stdout.splitlines()[0]
        else:
            run_cli(tmp_path / name, f"tracking.uri={uri}", *args)
        (run,) = runs(uri)
        assert run.info.status == "FINISHED"
        client = MlflowClient(uri)
        results[name] = {
            "matrix": artifact_json(uri, run.info.run_id, "accuracy_matrix.json"),
            "steps": metric_steps(uri, run.info.run_id),
            "train": train_losses(uri, run.info.run_id),
            "params": run.data.params,
            "inputs": [
                d.dataset.name for d in client.get_run(run.info.run_id).inputs.dataset_inputs
            ],
        }
    reference, resumed = results["reference"], results["killed"]
    assert reference["params"]["benchmark.tokenizer"] == "train:300"
    assert reference["inputs"] == ["token_domains/code", "token_domains/mail"]
    assert len(reference["matrix"]["R"]) == 2
    for key in ("matrix", "steps", "train"):
        assert resumed[key] == reference[key], key


def test_split_validation_evaluates_the_validation_documents(text: Path) -> None:
    """benchmark.split=validation: Experience.test is the validation windows, training is the
    same as with split=test; it needs val_fraction > 0."""
    test = build(text, seed=3)
    valid = build(text, seed=3, split="validation")
    for a, b, val in zip(test.experiences, valid.experiences, valid.validation, strict=True):
        assert (a.train.runs == b.train.runs).all()
        assert (b.test.runs == val.runs).all() and not np.array_equal(a.test.runs, b.test.runs)
    via_conf = benchmark_from_yaml(
        "token_domains",
        text_dir=str(text / "text"),
        cache_dir=str(text / "cache"),
        split="validation",
    )
    assert (via_conf.experiences[0].test.runs == via_conf.validation[0].runs).all()
    with pytest.raises(ConfigError, match="needs benchmark.val_fraction > 0"):
        build(text, split="validation", val_fraction=0)
    with pytest.raises(ConfigError, match="benchmark.split"):
        build(text, split="train")
