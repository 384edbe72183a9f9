"""Token shards: each domain tokenized once into a memory-mapped file, cached on disk.

Cache layout (``benchmark.cache_dir``, by default ``$XDG_CACHE_HOME/lifelong_moe/tokens``, that
is ``~/.cache/lifelong_moe/tokens``)::

    <cache_dir>/
      tokenizers/bpe<V>-<sample hash>/tokenizer.json   a BPE trained by train:<V>
      <tokenizer fingerprint[:16]>/<domain>-<key[:16]>/
        tokens.bin       every token of the domain, uint16 (vocab < 65536) or uint32, raw
        documents.npy    int64 [n_documents + 1]: document d is tokens[off[d]:off[d + 1]],
                         its last token is EOS
        meta.json        tokenizer, files (path, size, sha256), counts; written last

The key hashes the tokenizer's fingerprint, ``text_field``, the format version, and every file's
relative path and sha256: change a file or the tokenizer and the domain is tokenized anew; the
old entry stays until you delete it (``rm -r <cache_dir>``, or one tokenizer's folder).

An entry is built in a temporary folder beside it and renamed into place, so a reader never sees
half of one. Under ``torch.distributed`` local rank 0 builds and the other ranks wait at a
barrier; in every case a file lock (``<entry>.lock``) keeps two jobs from building one entry at
once. Tokenization streams: batches of documents are encoded and appended to ``tokens.bin`` as
they come, so memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch.distributed as dist
from filelock import FileLock

from lifelong_moe.data.corpus import Domain, Piece, pieces
from lifelong_moe.data.tokenizer import Tokenizer
from lifelong_moe.errors import ConfigError

FORMAT = 1
BATCH_CHARS = 1 << 22  # text encoded per batch (about 4 MB)
BATCH_PIECES = 1024
PROGRESS_EVERY_S = 10.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lifelong_moe/tokens``, else ``~/.cache/lifelong_moe/tokens``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lifelong_moe" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenShard:
    """A domain's tokens (memory-mapped, opened lazily) and its document offsets.

    Pickles as its folder only: a DataLoader worker reopens the map instead of copying it.
    """

    folder: Path
    meta: dict[str, Any]
    documents: np.ndarray  # int64 [n_documents + 1]
    _tokens: np.memmap | None = None

    @classmethod
    def open(cls, folder: Path) -> TokenShard:
        meta = json.loads((folder / "meta.json").read_text())
        return cls(folder, meta, np.load(folder / "documents.npy"))

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(
                self.folder / "tokens.bin",
                dtype=np.dtype(self.meta["dtype"]),
                mode="r",
                shape=(self.meta["n_tokens"],),
            )
        return self._tokens

    @property
    def n_documents(self) -> int:
        return len(self.documents) - 1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


# ---------------------------------------------------------------- progress


class Progress:
    """``tokenizing <domain>: 120.0/512.3 MB, 14.2 MB/s, 31.0 M tokens``, every 10 s and at the end."""

    def __init__(self, name: str, total_bytes: int, out: TextIO | None = None) -> None:
        self.name, self.total, self.out = name, total_bytes, out or sys.stdout
        self.start = self.last = time.perf_counter()
        self.bytes = self.tokens = 0

    def add(self, n_bytes: int, n_tokens: int) -> None:
        self.bytes += n_bytes
        self.tokens += n_tokens
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(self.line(now), file=self.out, flush=True)

    def line(self, now: float, done: bool = False) -> str:
        seconds = max(now - self.start, 1e-9)
        rate = self.bytes / seconds / 1e6
        head = "tokenized" if done else "tokenizing"
        return (
            f"{head} {self.name}: {self.bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB, "
            f"{rate:.1f} MB/s, {self.tokens / 1e6:.2f} M tokens"
            + (f" in {seconds:.1f} s" if done else "")
        )

    def finish(self) -> None:
        print(self.line(time.perf_counter(), done=True), file=self.out, flush=True)


# ---------------------------------------------------------------- building


def _batches(stream: Iterable[Piece]) -> Iterable[list[Piece]]:
    batch: list[Piece] = []
    chars = 0
    for piece in stream:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_into(
    folder: Path, domain: Domain, tokenizer: Tokenizer, text_field: str, meta: dict[str, Any]
) -> None:
    """Write ``tokens.bin``, ``documents.npy`` and ``meta.json`` of ``domain`` into ``folder``."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    offsets = array("q", [0])
    n_tokens = 0
    progress = Progress(domain.name, domain.n_bytes)
    with (folder / "tokens.bin").open("wb") as out:
        for batch in _batches(pieces(domain, text_field)):
            encoded = tokenizer.encode_batch([p.text for p in batch])
            parts = []
            for piece, ids in zip(batch, encoded, strict=True):
                parts.append(np.asarray(ids, dtype=dtype))
                n_tokens += len(ids)
                if piece.last:
                    parts.append(eos)
                    n_tokens += 1
                    offsets.append(n_tokens)
            chunk = np.concatenate(parts)
            out.write(chunk.tobytes())
            progress.add(sum(p.n_bytes for p in batch), len(chunk))
    if len(offsets) == 1:
        raise ConfigError(
            f"benchmark domain {domain.name!r} is empty: no documents with text in {domain.root}"
        )
    np.save(folder / "documents.npy", np.frombuffer(offsets, dtype=np.int64))
    meta = {**meta, "dtype": dtype.name, "n_tokens": n_tokens, "n_documents": len(offsets) - 1}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    progress.finish()


def entry_key(domain_files: list[dict[str, Any]], tokenizer: Tokenizer, text_field: str) -> str:
    blob = json.dumps(
        {
            "format": FORMAT,
            "tokenizer": tokenizer.fingerprint,
            "text_field": text_field,
            "files": [(f["path"], f["sha256"]) for f in domain_files],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _build(folder: Path, domain: Domain, tokenizer: Tokenizer, text_field: str, meta: dict) -> None:
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():
            return  # another job built it while we waited
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            tokenize_into(staging, domain, tokenizer, text_field, meta)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def token_shard(
    domain: Domain,
    tokenizer: Tokenizer,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
) -> TokenShard:
    """The domain's shard from the cache, tokenizing it first when it is not there."""
    files = domain.file_records()
    if not files:
        raise ConfigError(f"benchmark domain {domain.name!r} is empty: no files in {domain.root}")
    key = entry_key(files, tokenizer, text_field)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / tokenizer.fingerprint[:16] / f"{domain.name}-{key[:16]}"
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "domain": domain.name,
            "key": key,
            "tokenizer": tokenizer.fingerprint,
            "eos_id": tokenizer.eos_id,
            "vocab_size": tokenizer.vocab_size,
            "text_field": text_field,
            "n_bytes": sum(int(f["bytes"]) for f in files),
            "files": files,
        }
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed or _local_rank() == 0:
            _build(folder, domain, tokenizer, text_field, meta)
        if distributed:
            dist.barrier()
    return TokenShard.open(folder)
