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
python         stdlib source: the modules in ``PYTHON_MODULES``, in that order, 1.42 MB
               one document per top-level class or function (the module's
               header is one more)
cpp            C++ headers: every ``*.h`` under ``torch/include/c10``, sorted   1.74 MB
yaml           torchgen's ``native_functions.yaml`` and ``derivatives.yaml``,   819 KB
               one document per top-level list entry (an operator)
font_metrics   matplotlib's Adobe font metrics (``mpl-data/fonts/**/*.afm``)    1.36 MB
               (not in the default selection)
=============  ==============================================================  =========

Sizes after deduplication with Python 3.11, torch 2.14 and matplotlib 3.11 (1 KB = 1000 bytes).
``DEFAULT_DOMAINS`` = english, python, cpp, yaml: prose first, then code, then structured text.
Every default domain holds at least ``MIN_DOMAIN_BYTES`` before the ``max_bytes_per_domain`` cap.
A source file is cut into documents at its top-level entries (comment lines just above an entry
go with it), so that a capped domain still holds enough documents to split; the pieces of a file
joined give the file back.

Your own corpora: ``text_dir=DIR`` with one sub-folder (all files below it, sorted by path) or
one file per domain, domains sorted by name; hidden files are skipped. Each file is a document.

Deduplication is exact and by document (a file, a topic, a top-level entry): a document whose
bytes already appeared, in this domain or an earlier one, is dropped, so no document is
evaluated on in one domain and trained on in another. The cap keeps whole documents, in order:
reading stops at the first document that would take the domain (documents joined by a blank
line) past ``max_bytes_per_domain`` bytes.

Split, by document, as ``benchmark=token_domains`` does (:func:`split_documents`): from ``seed``
and the domain's index, ``validation_fraction`` of the domain's documents are validation and
``test_fraction`` test (at least one each), the rest train. Each split's documents are joined (in
reading order, a blank line between them) and cut into windows with stride ``context_length``
(every byte after the first is a target exactly once). ``split`` says which held-out split
``Experience.test`` holds, i.e. what the loss and perplexity matrices report: ``test`` (what
studies report) or ``validation`` (what settings are chosen on); the training windows are the
same either way, and ``TextStream.validation[i]`` always holds the validation windows.
"""

from __future__ import annotations

import ast
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
from lifelong_moe.data.arrays import check_fraction, check_split
from lifelong_moe.data.corpus import find_domains, select_domains
from lifelong_moe.data.tokenizer import BYTES, TRAIN_PREFIX, load_tokenizer
from lifelong_moe.data.tokens import DomainWindows, TokenStream, domain_record, split_documents
from lifelong_moe.errors import ConfigError

VOCAB_SIZE = 256
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


def cut_at_lines(data: bytes, starts: Sequence[int]) -> list[bytes]:
    """``data`` cut before each 0-based line of ``starts``, each cut moved up over the comment
    lines (``#``) just above it; the pieces joined give ``data`` back."""
    lines = data.splitlines(keepends=True)
    cuts = set()
    for start in starts:
        while start > 0 and lines[start - 1].lstrip().startswith(b"#"):
            start -= 1
        cuts.add(start)
    bounds = sorted(cuts | {0, len(lines)})
    return [b"".join(lines[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if a < b]


def python_entries(source: bytes) -> list[bytes]:
    """A module cut before each top-level class or function (its decorators included)."""
    starts = [
        min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    return cut_at_lines(source, starts)


def yaml_entries(source: bytes) -> list[bytes]:
    """A YAML list cut before each top-level entry (a line starting with ``- ``)."""
    lines = source.splitlines(keepends=True)
    return cut_at_lines(source, [i for i, line in enumerate(lines) if line.startswith(b"- ")])


def _entries(documents: Documents, cut: Callable[[bytes], list[bytes]]) -> Documents:
    for where, data in documents:
        for i, piece in enumerate(cut(data)):
            yield f"{where}#{i}", piece


def _english() -> Documents:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data.topics[{name!r}]", topics[name].encode("utf-8")


def _python() -> Documents:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in PYTHON_MODULES:
        module, package = stdlib / f"{name}.py", stdlib / name / "__init__.py"
        yield from _entries(
            _files([module if module.is_file() else package], stdlib), python_entries
        )


def _cpp() -> Documents:
    torch_dir = _package_dir("torch")
    if torch_dir is not None:
        root = torch_dir / "include"
        yield from _files(sorted((root / "c10").rglob("*.h")), root)


def _yaml() -> Documents:
    torchgen = _package_dir("torchgen")
    if torchgen is not None:
        files = ["ATen/native/native_functions.yaml", "autograd/derivatives.yaml"]
        yield from _entries(
            _files([torchgen / "packaged" / f for f in files], torchgen), yaml_entries
        )


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
    n_bytes: int  # after deduplication and the cap: the documents joined by SEPARATOR
    sha256: str  # of those bytes
    n_windows: dict[str, int] = field(default_factory=dict)  # per split: train, val, test
    n_split_documents: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Plain, JSON-ready: what the run logs as this domain's dataset input profile."""
        fields = ("name", "where", "sha256", "n_bytes", "n_documents", "n_duplicates")
        return domain_record(self, fields)


def read_domain(
    name: str, source: DomainSource, seen: set[str], max_bytes: int | None
) -> tuple[list[bytes], DomainInfo]:
    """The domain's deduplicated documents, whole, until the next would pass ``max_bytes``
    (counting SEPARATOR between documents); ``seen`` (document hashes) is updated in place."""
    documents: list[bytes] = []
    size, n_duplicates = -len(SEPARATOR), 0
    for _, document in source.documents():
        if not document:
            continue
        digest = hashlib.sha256(document).hexdigest()
        if digest in seen:
            n_duplicates += 1
            continue
        if max_bytes is not None and size + len(SEPARATOR) + len(document) > max_bytes:
            break
        seen.add(digest)
        documents.append(document)
        size += len(SEPARATOR) + len(document)
    if not documents:
        raise ConfigError(
            f"benchmark domain {name!r} is empty (nothing left to read in {source.where} after "
            f"deduplication, or its first document is longer than max_bytes_per_domain={max_bytes})"
        )
    data = SEPARATOR.join(documents)
    info = DomainInfo(
        name,
        source.where,
        len(documents),
        n_duplicates,
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    return documents, info


# ---------------------------------------------------------------- windows and split


def windows(data: bytes, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, L] and y [N, L] = x shifted by one byte; stride L, so each target appears once."""
    return token_windows(
        torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64)), context_length
    )


def token_windows(tokens: torch.Tensor, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`windows` over token ids (long [n]) instead of bytes."""
    n = max(len(tokens) - 1, 0) // context_length
    tokens = tokens[: n * context_length + 1]
    x = tokens[:-1].view(n, context_length)
    y = tokens[1:].view(n, context_length)
    return x.clone(), y.clone()


def _check(
    context_length: int,
    max_bytes: int | None,
    validation_fraction: float,
    test_fraction: float,
    split: str,
    domains: object,
) -> None:
    checks.positive_int("benchmark.context_length", context_length)
    checks.optional(checks.positive_int, "benchmark.max_bytes_per_domain", max_bytes)
    check_fraction(test_fraction)
    check_split(split, validation_fraction, held_from="each domain's documents")
    if domains is not None and (isinstance(domains, str) or not isinstance(domains, Sequence)):
        raise ConfigError(f"benchmark.domains={domains!r}: expected null or a list of names")


@dataclass
class TextStream(TokenStream):
    """A Stream whose experiences are text domains; ``domains`` says what each one holds,
    ``validation[i]`` domain i's validation windows (none at validation_fraction 0),
    ``splits[i]`` its document indices per split (``train``, ``val``, ``test``), and
    ``tokenizer`` what made the ids (None: UTF-8 bytes). Held in memory; the fields are
    TokenStream's, whose windows are memory-mapped shards instead."""


def text_domains(
    domains: Sequence[str] | None = None,
    text_dir: str | None = None,
    context_length: int = 64,
    max_bytes_per_domain: int | None = 262_144,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split: str = "test",
    seed: int = 0,
    task_labels: bool = False,
    tokenizer: str | None = None,
) -> TextStream:
    """One experience per domain: ``TensorDataset(x [N, L] long, y [N, L] long, t [N] long)``;
    ``Experience.test`` holds the windows of the held-out documents that ``split`` names.

    ``tokenizer``: None or ``bytes`` keeps the byte tokens (vocabulary 256); otherwise a spec of
    ``load_tokenizer`` (a local Hugging Face tokenizer directory, e.g. the pretrained model's,
    or ``train:<V>`` trained on these domains' training documents), whose vocabulary becomes
    ``n_classes``. Each split's text is then encoded in one piece (no EOS between documents).
    """
    _check(context_length, max_bytes_per_domain, validation_fraction, test_fraction, split, domains)
    if text_dir is None:
        sources, default = SOURCES, list(DEFAULT_DOMAINS)
    else:
        sources = user_sources(text_dir)
        default = list(sources)  # sorted by name
    names = select_domains(sorted(sources), default if domains is None else domains)
    seen: set[str] = set()
    read = [read_domain(name, sources[name], seen, max_bytes_per_domain) for name in names]
    parts = []  # per domain: {split: its documents joined}
    for index, (name, (documents, _)) in enumerate(zip(names, read, strict=True)):
        try:
            indices = split_documents(
                len(documents), validation_fraction, test_fraction, seed, index
            )
        except ConfigError:
            raise ConfigError(
                f"benchmark domain {name!r} has {len(documents)} document(s) within "
                f"max_bytes_per_domain={max_bytes_per_domain}: too few to hold out validation "
                f"({validation_fraction}) and test ({test_fraction}) documents and train on the "
                "rest; raise the cap or split its text into more files"
            ) from None
        parts.append(
            (indices, {s: SEPARATOR.join(documents[i] for i in d) for s, d in indices.items()})
        )
    tok = None
    if tokenizer not in (None, BYTES):
        texts = [text["train"].decode("utf-8", errors="replace") for _, text in parts]
        tok = load_tokenizer(tokenizer, texts if tokenizer.startswith(TRAIN_PREFIX) else None)
    vocab = VOCAB_SIZE if tok is None else tok.vocab_size
    split_domains = []
    for index, (name, (_, info), (indices, text)) in enumerate(
        zip(names, read, parts, strict=True)
    ):
        task = index if task_labels else 0
        sets = {}
        for s, data in text.items():
            if tok is None:
                x, y = windows(data, context_length)
            else:
                tokens = torch.tensor(tok.encode(data.decode("utf-8", errors="replace")))
                x, y = token_windows(tokens, context_length)
            if len(x) == 0 and (s != "val" or validation_fraction > 0):
                raise ConfigError(
                    f"benchmark domain {name!r}: its {len(indices[s])} {s} document(s) hold "
                    f"{len(data)} bytes, too few for one window of context_length={context_length}"
                )
            sets[s] = TensorDataset(x, y, torch.full((len(x),), task))
        split_domains.append(DomainWindows(info, sets, indices))
    return TextStream.of_domains(
        "text_domains",
        split_domains,
        vocab,
        context_length,
        task_labels=task_labels,
        split=split,
        tokenizer=tok,
        keep_validation=validation_fraction > 0,
    )
