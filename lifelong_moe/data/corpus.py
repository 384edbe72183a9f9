"""Your corpora on disk: one domain per sub-folder, documents read as a stream of text pieces.

``text_dir/<domain>/`` holds any mix of

- ``*.jsonl``: one document per line, its text in the field ``text_field`` (default ``text``);
- ``*.parquet``: one document per row, its text in the column ``text_field``;
- any other file: one document, read as UTF-8 (undecodable bytes become U+FFFD).

A file directly in ``text_dir`` is a domain of its own (named after its stem). Files are read in
path order, hidden files and folders are skipped. Nothing holds a whole domain or a whole file in
memory: documents come as pieces of at most about ``PIECE_CHARS`` characters (a long text file
is cut after a newline), each piece saying whether it ends its document.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lifelong_moe.errors import ConfigError

PIECE_CHARS = 1 << 20
PARQUET_BATCH = 256


@dataclass(frozen=True)
class Piece:
    """Text of one document, or of a part of it; ``last`` when the document ends with it."""

    text: str
    last: bool = True
    n_bytes: int = 0  # bytes of the file this piece was read from (for progress)


@dataclass(frozen=True)
class Domain:
    """One experience's corpus: its name, folder and files (sorted by relative path)."""

    name: str
    root: Path
    files: tuple[Path, ...]

    def file_records(self) -> list[dict[str, object]]:
        """Relative path, size and sha256 of every file: what decides the domain's tokens."""
        return [
            {"path": _relative(f, self.root), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in self.files
        ]

    @property
    def n_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else path.name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_domains(text_dir: str | Path | None, domains: Sequence[str] | None = None) -> list[Domain]:
    """The domains of ``text_dir`` in name order, or in the order ``domains`` lists them."""
    if text_dir is None:
        raise ConfigError(
            "benchmark.text_dir=null: expected a folder holding one sub-folder per domain"
        )
    root = Path(text_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"benchmark.text_dir={str(text_dir)!r} is not a directory")
    found: dict[str, Domain] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        name = entry.name if entry.is_dir() else entry.stem
        if name in found:
            raise ConfigError(
                f"benchmark.text_dir={str(text_dir)!r}: two entries give the domain name {name!r}"
            )
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if p.is_file() and not _hidden(p, entry))
            found[name] = Domain(name, entry, tuple(files))
        else:
            found[name] = Domain(name, entry, (entry,))
    if not found:
        raise ConfigError(f"benchmark.text_dir={str(text_dir)!r} holds no files or folders")
    if domains is None:
        return list(found.values())
    if isinstance(domains, str):
        raise ConfigError(f"benchmark.domains={domains!r}: expected null or a list of names")
    where = f" of {str(text_dir)!r}"
    return [found[d] for d in select_domains(list(found), domains, where)]


def select_domains(
    available: Sequence[str], requested: Sequence[str], where: str = ""
) -> list[str]:
    """``requested`` in its order, each one of ``available`` and none twice (one-line errors)."""
    names = list(requested)
    if not names:
        raise ConfigError("benchmark.domains=[]: expected at least one domain name")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(
            f"benchmark.domains: {unknown[0]!r} is not a domain{where}; expected names from "
            f"{', '.join(available)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark.domains={names}: a domain is listed twice")
    return names


# ---------------------------------------------------------------- reading


def _text_file(path: Path) -> Iterator[Piece]:
    with path.open("r", encoding="utf-8", errors="replace", newline="") as handle:
        carry = ""
        while True:
            block = handle.read(PIECE_CHARS)
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n") + 1 or len(text)
            carry = text[cut:]
            if text[:cut]:
                yield Piece(text[:cut], last=False, n_bytes=len(text[:cut].encode("utf-8")))
        yield Piece(carry, last=True, n_bytes=len(carry.encode("utf-8")))


def jsonl_records(path: Path) -> Iterator[tuple[int, dict, int]]:
    """(line number, object, bytes of the line) of every non-empty line; a line that is not a
    JSON object is one error naming file:line."""
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: not a JSON object")
            yield number, record, len(line.encode("utf-8"))


def _jsonl(path: Path, field: str) -> Iterator[Piece]:
    for number, record, n_bytes in jsonl_records(path):
        if field not in record:
            raise ConfigError(
                f"{path}:{number}: no {field!r} field; expected one JSON object per line "
                f"with the text in benchmark.text_field={field!r}"
            )
        text = record[field]
        if not isinstance(text, str):
            raise ConfigError(f"{path}:{number}: field {field!r} is not a string")
        yield Piece(text, n_bytes=n_bytes)


def _parquet(path: Path, field: str) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise ConfigError(
            f"{path}: no column {field!r} (benchmark.text_field); columns are "
            f"{', '.join(table.schema_arrow.names)}"
        )
    for batch in table.iter_batches(batch_size=PARQUET_BATCH, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Piece(str(text), n_bytes=len(str(text).encode("utf-8")))


def pieces(domain: Domain, text_field: str = "text") -> Iterator[Piece]:
    """Every document of the domain, in file order, as pieces; empty documents are skipped."""
    for path in domain.files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            stream = _jsonl(path, text_field)
        elif suffix == ".parquet":
            stream = _parquet(path, text_field)
        else:
            stream = _text_file(path)
        started = False
        for piece in stream:
            if piece.text or (piece.last and started):
                started = not piece.last
                yield piece


def sample(domains: Sequence[Domain], max_bytes: int, text_field: str = "text") -> list[str]:
    """The first ``max_bytes / len(domains)`` bytes of each domain's documents (tokenizer training)."""
    per_domain = max(1, max_bytes // max(len(domains), 1))
    texts: list[str] = []
    for domain in domains:
        left = per_domain
        for piece in pieces(domain, text_field):
            size = len(piece.text.encode("utf-8"))
            texts.append(piece.text if size <= left else piece.text[:left])
            left -= size
            if left <= 0:
                break
    return texts
