"""``benchmark=token_domains``: lifelong pretraining on your corpora, tokenized once, read from disk.

Each experience is one domain of ``benchmark.text_dir`` (data/corpus.py), tokenized with
``benchmark.tokenizer`` (data/tokenizer.py) into a cached memory-mapped shard (data/shards.py)
with EOS after every document.

Split, by document: :func:`split_documents` draws, from ``seed`` and the domain's index, which
documents are validation (``val_fraction``) and which are test (``test_fraction``), at least one
document each; the rest train. A document is never cut between splits, so no text is both
trained and evaluated on. ``Experience.test`` holds the windows of the held-out split that
``split`` names (what the accuracy and loss matrices report): ``test`` (what studies report) or
``validation`` (what settings are chosen on, without touching test); the validation windows are
also ``TokenStream.validation[i]`` (the curves inside an experience).

Windows: the documents of one split are packed in shard order (EOS between them) and cut with
stride ``context_length``: x = tokens[s : s + L], y = tokens[s + 1 : s + L + 1], so every token
after the first is a target once. A window is a view into the memory-mapped shard (no copy per
domain, nothing but the starts of the split's runs of documents in memory); only a window that
spans a held-out document is stitched from two views. Items are ``(x, y, t)`` int64 tensors,
the shape the byte-level text benchmark (data/text.py) gives, so the LM models and methods work
unchanged, with ``n_classes`` = the tokenizer's vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from lifelong_moe import checks
from lifelong_moe.data.arrays import check_fraction, check_split, held_out_size, seeded_parts
from lifelong_moe.data.corpus import find_domains, sample
from lifelong_moe.data.shards import TokenShard, default_cache_dir, token_shard
from lifelong_moe.data.tokenizer import BYTES, TRAIN_PREFIX, Tokenizer, load_tokenizer
from lifelong_moe.errors import ConfigError
from lifelong_moe.stream import Experience, Stream

if TYPE_CHECKING:
    from typing import Self

SPLITS = ("train", "val", "test")
EVALUATED = {"test": "test", "validation": "val"}  # benchmark.split: what Experience.test holds


def split_documents(
    n_documents: int, val_fraction: float, test_fraction: float, seed: int, index: int
) -> dict[str, np.ndarray]:
    """Sorted document indices of each split (``train``, ``val``, ``test``) of domain ``index``.

    A seeded permutation (``numpy.random.default_rng([seed, index])``): the first
    ``max(1, round(val_fraction * n))`` documents are validation, the next
    ``max(1, round(test_fraction * n))`` test (none when a fraction is 0), the rest train.
    The same seed gives the same split on every machine; the sets are disjoint and cover all.
    """
    n_val = held_out_size(val_fraction, n_documents)
    n_test = held_out_size(test_fraction, n_documents)
    if n_documents - n_val - n_test < 1:
        raise ConfigError(
            f"a domain has {n_documents} documents: too few to hold out {n_val} validation and "
            f"{n_test} test documents and train on the rest; split its text into more files or "
            "jsonl lines"
        )
    return seeded_parts(n_documents, {"val": n_val, "test": n_test}, seed, index)


def document_runs(offsets: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """Token ranges [start, stop) of the maximal runs of consecutive ``documents``: int64 [R, 2]."""
    if len(documents) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(documents) != 1) + 1
    firsts = documents[np.concatenate([[0], breaks])]
    lasts = documents[np.concatenate([breaks - 1, [len(documents) - 1]])]
    return np.stack([offsets[firsts], offsets[lasts + 1]], axis=1).astype(np.int64)


class PackedWindows(Dataset):
    """Windows of ``context_length`` over the packed runs of one split: views into the shard."""

    def __init__(self, shard: TokenShard, runs: np.ndarray, context_length: int, task: int) -> None:
        self.shard = shard
        self.runs = runs
        self.context_length = context_length
        self.task = task
        lengths = runs[:, 1] - runs[:, 0]
        self.ends = np.cumsum(lengths)  # packed position where each run ends
        self.n_tokens = int(self.ends[-1]) if len(lengths) else 0
        self.n = max(self.n_tokens - 1, 0) // context_length

    def __len__(self) -> int:
        return self.n

    def window(self, i: int) -> np.ndarray:
        """The ``context_length + 1`` tokens of window ``i``: a view of the shard when it lies in
        one run of documents, else stitched from the views of the runs it spans."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        tokens = self.shard.tokens
        start, left = i * self.context_length, self.context_length + 1
        run = int(np.searchsorted(self.ends, start, side="right"))
        parts = []
        while left > 0:
            offset = start - (int(self.ends[run - 1]) if run else 0)
            begin = int(self.runs[run, 0]) + offset
            take = min(left, int(self.runs[run, 1]) - begin)
            parts.append(tokens[begin : begin + take])
            start, left, run = start + take, left - take, run + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(self.window(i).astype(np.int64))
        return tokens[:-1], tokens[1:], torch.tensor(self.task)


@dataclass
class TokenDomainInfo:
    """What one experience trained on; ``record()`` is its MLflow dataset-input profile."""

    name: str
    where: str
    sha256: str  # the cache key: tokenizer + every file's hash
    n_bytes: int
    n_documents: int
    n_tokens: int
    tokenizer: str
    n_windows: dict[str, int] = field(default_factory=dict)
    n_split_documents: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        fields = ("name", "where", "sha256", "tokenizer", "n_bytes", "n_documents", "n_tokens")
        return domain_record(self, fields)


def domain_record(info: Any, fields: Sequence[str]) -> dict[str, Any]:
    """A text domain's plain, JSON-ready profile (its MLflow dataset input): ``fields`` of
    ``info`` in that order, then its windows and documents per split, one key each."""
    return {
        **{name: getattr(info, name) for name in fields},
        **{f"n_{s}_windows": n for s, n in info.n_windows.items()},
        **{f"n_{s}_documents": n for s, n in info.n_split_documents.items()},
    }


class DomainProfile(Protocol):
    """What an experience's domain reports: TokenDomainInfo here, text.DomainInfo in memory."""

    n_windows: dict[str, int]  # per split: train, val, test
    n_split_documents: dict[str, int]

    def record(self) -> dict[str, Any]: ...


@dataclass
class DomainWindows:
    """One domain, split by document: its windows and document indices per split (``train``,
    ``val``, ``test``) and its profile."""

    info: DomainProfile
    windows: dict[str, Dataset]
    documents: dict[str, np.ndarray]


@dataclass
class TokenStream(Stream):
    """The text benchmark's Stream, plus the tokenizer, validation windows and domain records."""

    domains: Sequence[DomainProfile] = field(default_factory=list)
    validation: list[Dataset] = field(default_factory=list)
    splits: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    tokenizer: Tokenizer | None = field(default=None, repr=False)

    def domain_records(self) -> list[dict[str, Any]]:
        return [d.record() for d in self.domains]

    @classmethod
    def of_domains(
        cls,
        name: str,
        domains: Sequence[DomainWindows],
        vocab_size: int,
        context_length: int,
        *,
        task_labels: bool,
        split: str,
        tokenizer: Tokenizer | None,
        keep_validation: bool,
    ) -> Self:
        """One experience per domain, trained on its train windows; ``Experience.test`` holds the
        held-out windows that ``split`` names. ``keep_validation``: ``validation[i]`` is domain
        i's validation windows (else the list is empty)."""
        experiences = []
        for index, domain in enumerate(domains):
            domain.info.n_windows = {s: len(w) for s, w in domain.windows.items()}
            domain.info.n_split_documents = {s: len(d) for s, d in domain.documents.items()}
            experiences.append(
                Experience(
                    index=index,
                    train=domain.windows["train"],
                    test=domain.windows[EVALUATED[split]],
                    classes=list(range(vocab_size)),
                    task_id=index if task_labels else 0,
                )
            )
        return cls.of_windows(
            name,
            experiences,
            vocab_size,
            context_length,
            task_labels,
            domains=[d.info for d in domains],
            validation=[d.windows["val"] for d in domains] if keep_validation else [],
            splits=[d.documents for d in domains],
            tokenizer=tokenizer,
        )


def _check(
    context_length: int, val_fraction: float, test_fraction: float, sample_bytes: int, split: str
) -> None:
    checks.positive_int("benchmark.context_length", context_length)
    check_fraction(test_fraction)
    checks.positive_int("benchmark.tokenizer_sample_bytes", sample_bytes)
    check_split(split, val_fraction, key="val_fraction", held_from="each domain's documents")


def token_domains(
    text_dir: str | None = None,
    domains: Sequence[str] | None = None,
    tokenizer: str | None = BYTES,
    text_field: str = "text",
    context_length: int = 64,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    cache_dir: str | None = None,
    tokenizer_sample_bytes: int = 4_000_000,
    seed: int = 0,
    task_labels: bool = False,
    split: str = "test",
) -> TokenStream:
    """One experience per domain of ``text_dir``: windows of the domain's cached token shard;
    ``Experience.test`` holds the held-out split that ``split`` names (test or validation)."""
    _check(context_length, val_fraction, test_fraction, tokenizer_sample_bytes, split)
    tokenizer = BYTES if tokenizer is None else tokenizer  # null: no pretrained model to follow
    found = find_domains(text_dir, domains)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    corpus = None
    if isinstance(tokenizer, str) and tokenizer.startswith(TRAIN_PREFIX):
        corpus = sample(found, tokenizer_sample_bytes, text_field)
    tok = load_tokenizer(tokenizer, corpus, cache)
    del corpus
    split_domains = []
    for index, domain in enumerate(found):
        shard = token_shard(domain, tok, cache, text_field)
        try:
            indices = split_documents(shard.n_documents, val_fraction, test_fraction, seed, index)
        except ConfigError as error:
            raise ConfigError(f"benchmark domain {domain.name!r}: {error}") from None
        task = index if task_labels else 0
        windows = {
            s: PackedWindows(
                shard, document_runs(shard.documents, indices[s]), context_length, task
            )
            for s in SPLITS
        }
        for s in ("train", "test") + (("val",) if val_fraction > 0 else ()):
            if len(windows[s]) == 0:
                raise ConfigError(
                    f"benchmark domain {domain.name!r} is shorter than one window: its {s} "
                    f"documents hold {windows[s].n_tokens} tokens, one window needs "
                    f"context_length + 1 = {context_length + 1}"
                )
        info = TokenDomainInfo(
            name=domain.name,
            where=str(domain.root),
            sha256=shard.meta["key"],
            n_bytes=shard.meta["n_bytes"],
            n_documents=shard.n_documents,
            n_tokens=shard.meta["n_tokens"],
            tokenizer=tok.fingerprint,
        )
        split_domains.append(DomainWindows(info, windows, indices))
    return TokenStream.of_domains(
        "token_domains",
        split_domains,
        tok.vocab_size,
        context_length,
        task_labels=task_labels,
        split=split,
        tokenizer=tok,
        keep_validation=True,
    )
