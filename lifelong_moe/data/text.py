"""Text domains for lifelong language-model pretraining: one domain per experience, byte tokens.

The paper's own setting is a language model pretrained on a sequence of data distributions.
Here each experience is one text domain, tokenised as raw UTF-8 bytes (vocabulary 256: no
tokenizer to download or to fit, and every domain shares one vocabulary) and cut into windows
of ``context_length`` bytes: ``x`` is a window, ``y`` the same window shifted by one byte.

Built-in domains are read from files that every ``pip install`` of our dependencies ships, so
the stream builds offline. Their content depends on the installed Python, torch and matplotlib;
each domain's ``sha256`` in ``TextStream.domains`` identifies exactly what a run trained on;
the run logs every domain's record (:meth:`TextStream.domain_records`) as an MLflow dataset
input whose digest is that hash (``tracking.report.dataset_inputs``).

=============  ==============================================================  =========
name           what (documents, in this order)                                 size
=============  ==============================================================  =========
english        Python Language Reference prose: ``pydoc_data.topics``, one      466 KB
               document per topic, sorted by topic name (stdlib)
python         stdlib source: the modules in ``PYTHON_MODULES``, in that order   1.42 MB
cpp            C++ headers: every ``*.h`` under ``torch/include/c10``, sorted   1.74 MB
yaml           torchgen's ``native_functions.yaml`` and ``derivatives.yaml``    819 KB
font_metrics   matplotlib's Adobe font metrics (``mpl-data/fonts/**/*.afm``)    1.36 MB
               (not in the default selection)
=============  ==============================================================  =========

Sizes after deduplication with Python 3.11, torch 2.14 and matplotlib 3.11 (1 KB = 1000 bytes).
``DEFAULT_DOMAINS`` = english, python, cpp, yaml: prose first, then code, then structured text.
Every default domain holds at least ``MIN_DOMAIN_BYTES`` before the ``max_bytes_per_domain`` cap.

Your own corpora: ``text_dir=DIR`` with one sub-folder (all files below it, sorted by path) or
one file per domain, domains sorted by name; hidden files are skipped.

Deduplication is exact and by document (a file, a topic): a document whose bytes already
appeared, in this domain or an earlier one, is dropped, so no document is validated on in one
domain and trained on in another. Documents are joined with a blank line, then the cap keeps the
first ``max_bytes_per_domain`` bytes.

Split: each domain's byte stream is cut into windows with stride ``context_length`` (every byte
after the first is a target exactly once), and one contiguous block of ``val_fraction`` of the
windows, at a position drawn from ``seed`` and the domain's index, is its validation set.
Contiguous, because neighbouring windows of text are near-duplicates of each other's topic.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lifelong_moe import checks
from lifelong_moe.data.corpus import find_domains, select_domains
from lifelong_moe.data.tokenizer import BYTES, TRAIN_PREFIX, Tokenizer, load_tokenizer
from lifelong_moe.errors import ConfigError
from lifelong_moe.stream import Experience, Stream

VOCAB_SIZE = 256
SCENARIO = "language_modeling"
MIN_DOMAIN_BYTES = 400_000
SEPARATOR = b"\n\n"
# Stable across Python 3.10-3.13; sorted, so the selection reads as documented.
PYTHON_MODULES = (
    "argparse",
    "ast",
    "configparser",
    "dataclasses",
    "difflib",
    "doctest",
    "enum",
    "functools",
    "inspect",
    "logging",
    "pydoc",
    "shutil",
    "subprocess",
    "tarfile",
    "threading",
    "typing",
    "zipfile",
)

Documents = Iterator[tuple[str, bytes]]  # (where it came from, its bytes)


# ---------------------------------------------------------------- tokens


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes as a long tensor: the byte-level tokens of ``text``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    """Inverse of :func:`encode`; a window cut inside a multi-byte character shows U+FFFD there."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(values).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- built-in domains


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _files(paths: Sequence[Path], root: Path) -> Documents:
    for path in paths:
        if path.is_file():
            yield str(path.relative_to(root)), path.read_bytes()


def _english() -> Documents:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data.topics[{name!r}]", topics[name].encode("utf-8")


def _python() -> Documents:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in PYTHON_MODULES:
        module, package = stdlib / f"{name}.py", stdlib / name / "__init__.py"
        yield from _files([module if module.is_file() else package], stdlib)


def _cpp() -> Documents:
    torch_dir = _package_dir("torch")
    if torch_dir is not None:
        root = torch_dir / "include"
        yield from _files(sorted((root / "c10").rglob("*.h")), root)


def _yaml() -> Documents:
    torchgen = _package_dir("torchgen")
    if torchgen is not None:
        files = ["ATen/native/native_functions.yaml", "autograd/derivatives.yaml"]
        yield from _files([torchgen / "packaged" / f for f in files], torchgen)


def _font_metrics() -> Documents:
    matplotlib = _package_dir("matplotlib")
    if matplotlib is not None:
        root = matplotlib / "mpl-data" / "fonts"
        yield from _files(sorted(root.rglob("*.afm")), root)


@dataclass(frozen=True)
class DomainSource:
    """Where a domain's text lives, and how to list its documents (lazily: a cap stops early)."""

    where: str
    documents: Callable[[], Documents]


SOURCES = {
    "english": DomainSource("pydoc_data.topics (stdlib)", _english),
    "python": DomainSource("stdlib modules " + ", ".join(PYTHON_MODULES), _python),
    "cpp": DomainSource("torch/include/c10/**/*.h", _cpp),
    "yaml": DomainSource("torchgen/packaged/{native_functions,derivatives}.yaml", _yaml),
    "font_metrics": DomainSource("matplotlib/mpl-data/fonts/**/*.afm", _font_metrics),
}
DEFAULT_DOMAINS = ("english", "python", "cpp", "yaml")


def user_sources(text_dir: str | Path) -> dict[str, DomainSource]:
    """One domain per non-hidden entry of ``text_dir``: a sub-folder (its files) or a file."""
    sources: dict[str, DomainSource] = {}
    for domain in find_domains(text_dir):
        root = domain.root if domain.root.is_dir() else domain.root.parent
        sources[domain.name] = DomainSource(
            str(domain.root), lambda files=domain.files, root=root: _files(files, root)
        )
    return sources


# ---------------------------------------------------------------- reading and deduplication


@dataclass
class DomainInfo:
    """What one experience trained on: enough to tell whether two runs saw the same text."""

    name: str
    where: str
    n_documents: int
    n_duplicates: int  # documents dropped because their bytes appeared before
    n_bytes: int  # after deduplication and the cap
    sha256: str  # of those bytes
    n_train: int = 0  # windows
    n_val: int = 0

    def record(self) -> dict[str, Any]:
        """Plain, JSON-ready: what the run logs as this domain's dataset input profile."""
        return {
            "name": self.name,
            "where": self.where,
            "sha256": self.sha256,
            "n_bytes": self.n_bytes,
            "n_documents": self.n_documents,
            "n_duplicates": self.n_duplicates,
            "n_train_windows": self.n_train,
            "n_val_windows": self.n_val,
        }


def read_domain(
    name: str, source: DomainSource, seen: set[str], max_bytes: int | None
) -> tuple[bytes, DomainInfo]:
    """The domain's deduplicated text, capped; ``seen`` (document hashes) is updated in place."""
    parts: list[bytes] = []
    size, n_documents, n_duplicates = 0, 0, 0
    for _, document in source.documents():
        if not document:
            continue
        digest = hashlib.sha256(document).hexdigest()
        if digest in seen:
            n_duplicates += 1
            continue
        seen.add(digest)
        n_documents += 1
        parts.append(document)
        size += len(document) + len(SEPARATOR)
        if max_bytes is not None and size >= max_bytes:
            break
    data = SEPARATOR.join(parts)
    if max_bytes is not None:
        data = data[:max_bytes]
    if not data:
        raise ConfigError(
            f"benchmark domain {name!r} is empty (nothing left to read in {source.where} after "
            "deduplication)"
        )
    info = DomainInfo(
        name, source.where, n_documents, n_duplicates, len(data), hashlib.sha256(data).hexdigest()
    )
    return data, info


# ---------------------------------------------------------------- windows and split


def windows(data: bytes, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, L] and y [N, L] = x shifted by one byte; stride L, so each target appears once."""
    n = (len(data) - 1) // context_length
    tokens = torch.frombuffer(bytearray(data[: n * context_length + 1]), dtype=torch.uint8)
    return token_windows(tokens.long(), context_length)


def token_windows(tokens: torch.Tensor, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`windows` over token ids (long [n]) instead of bytes."""
    n = (len(tokens) - 1) // context_length
    tokens = tokens[: n * context_length + 1]
    x = tokens[:-1].view(n, context_length)
    y = tokens[1:].view(n, context_length)
    return x.clone(), y.clone()


def validation_block(n: int, val_fraction: float, seed: int, index: int) -> tuple[int, int]:
    """[start, stop) of the contiguous validation windows of domain ``index``."""
    n_val = max(1, round(val_fraction * n))
    start = int(np.random.default_rng([seed, index]).integers(0, n - n_val + 1))
    return start, start + n_val


def _check(
    context_length: int, max_bytes: int | None, val_fraction: float, domains: object
) -> None:
    checks.positive_int("benchmark.context_length", context_length)
    checks.optional(checks.positive_int, "benchmark.max_bytes_per_domain", max_bytes)
    checks.number(
        "benchmark.val_fraction", val_fraction, low=0, high=1, low_open=True, high_open=True
    )
    if domains is not None and (isinstance(domains, str) or not isinstance(domains, Sequence)):
        raise ConfigError(f"benchmark.domains={domains!r}: expected null or a list of names")


@dataclass
class TextStream(Stream):
    """A Stream whose experiences are text domains; ``domains`` says what each one holds, and
    ``tokenizer`` what made the ids (None: UTF-8 bytes)."""

    domains: list[DomainInfo] = field(default_factory=list)
    tokenizer: Tokenizer | None = field(default=None, repr=False)

    def domain_records(self) -> list[dict[str, Any]]:
        """One plain record per experience (name, where, sha256, sizes), in stream order."""
        return [d.record() for d in self.domains]


def text_domains(
    domains: Sequence[str] | None = None,
    text_dir: str | None = None,
    context_length: int = 64,
    max_bytes_per_domain: int | None = 262_144,
    val_fraction: float = 0.1,
    seed: int = 0,
    task_labels: bool = False,
    tokenizer: str | None = None,
) -> TextStream:
    """One experience per domain: ``TensorDataset(x [N, L] long, y [N, L] long, t [N] long)``.

    ``tokenizer``: None or ``bytes`` keeps the byte tokens (vocabulary 256); otherwise a spec of
    ``load_tokenizer`` (a local Hugging Face tokenizer directory, e.g. the pretrained model's,
    or ``train:<V>`` trained on these domains' text), whose vocabulary becomes ``n_classes``.
    Each domain's text is then encoded in one piece (no EOS: domains are not documents here).
    """
    _check(context_length, max_bytes_per_domain, val_fraction, domains)
    if text_dir is None:
        sources, default = SOURCES, list(DEFAULT_DOMAINS)
    else:
        sources = user_sources(text_dir)
        default = list(sources)  # sorted by name
    names = select_domains(sorted(sources), default if domains is None else domains)
    seen: set[str] = set()
    read = [read_domain(name, sources[name], seen, max_bytes_per_domain) for name in names]
    tok = None
    if tokenizer not in (None, BYTES):
        texts = [data.decode("utf-8", errors="replace") for data, _ in read]
        tok = load_tokenizer(tokenizer, texts if tokenizer.startswith(TRAIN_PREFIX) else None)
    vocab = VOCAB_SIZE if tok is None else tok.vocab_size
    experiences, infos = [], []
    for index, (name, (data, info)) in enumerate(zip(names, read, strict=True)):
        if tok is None:
            tokens = None
            n = (len(data) - 1) // context_length
        else:
            tokens = torch.tensor(tok.encode(data.decode("utf-8", errors="replace")))
            n = (len(tokens) - 1) // context_length
        n_val = max(1, round(val_fraction * n))
        if n - n_val < 1:
            raise ConfigError(
                f"benchmark domain {name!r} has {len(data)} bytes: too few for one training and "
                f"one validation window of context_length={context_length} "
                f"at val_fraction={val_fraction}"
            )
        x, y = (
            windows(data, context_length)
            if tokens is None
            else token_windows(tokens, context_length)
        )
        start, stop = validation_block(n, val_fraction, seed, index)
        train = torch.cat([torch.arange(0, start), torch.arange(stop, n)])
        task = index if task_labels else 0
        info.n_train, info.n_val = len(train), stop - start
        infos.append(info)
        experiences.append(
            Experience(
                index=index,
                train=TensorDataset(x[train], y[train], torch.full((len(train),), task)),
                test=TensorDataset(x[start:stop], y[start:stop], torch.full((stop - start,), task)),
                classes=list(range(vocab)),
                task_id=task,
            )
        )
    return TextStream(
        name="text_domains",
        experiences=experiences,
        n_classes=vocab,
        input_shape=(context_length,),
        scenario=SCENARIO,
        task_labels=bool(task_labels),
        domains=infos,
        tokenizer=tok,
    )
