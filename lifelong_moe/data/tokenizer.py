"""The model's tokenizer, whatever it is: raw bytes, a Hugging Face tokenizer, or a BPE trained here.

Everything that turns text into token ids goes through :class:`Tokenizer`: token shards
(data/tokens.py), instruction experiences, and the Hugging Face backbones, which size their
embedding with ``vocab_size``. ``fingerprint`` is the cache key of everything tokenized with it:
the sha256 of the tokenizer's own files, so that two tokenizers that would give different ids
never share a cache entry.

``load_tokenizer(spec)`` takes

- ``bytes``: UTF-8 bytes, ids 0-255, and EOS = 256 (vocabulary 257). Needs nothing installed.
- a local directory holding a Hugging Face tokenizer (``tokenizer_config.json``: loaded with
  ``transformers.AutoTokenizer``, so its chat template comes along; only ``tokenizer.json``:
  ``tokenizers.Tokenizer.from_file``), or a ``tokenizer.json`` file. Never downloads.
- ``train:<vocab size>``: a byte-level BPE trained with ``tokenizers`` on ``corpus_sample`` (a
  capped sample of the corpora), saved under ``<cache_dir>/tokenizers/<sample hash>/`` so it is
  trained once per sample and vocabulary size.

``save_for_transformers(tokenizer, dir)`` writes it where ``AutoTokenizer.from_pretrained(dir)``
finds it, beside a model export (models/hf_export.py), so that the export is usable on its own.

Documents are encoded without special tokens (no BOS); the token streams put ``eos_id`` after
every document themselves. ``tokenizers`` and ``transformers`` are the optional extra ``[hf]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lifelong_moe.errors import ConfigError

BYTES = "bytes"
TRAIN_PREFIX = "train:"
BYTE_EOS = 256
# Special tokens a tokenizers-only file may use to end a document, in order of preference.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
TRAINED_EOS = "<|endoftext|>"
# Files that decide what a Hugging Face tokenizer does (weights in the same folder are not read).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
HF_EXTRA = "pip install 'lifelong-moe[hf]'"


@runtime_checkable
class Tokenizer(Protocol):
    """What the toolkit needs of a tokenizer."""

    vocab_size: int  # every id is < vocab_size, EOS included
    eos_id: int
    fingerprint: str  # stable cache key: sha256 of the tokenizer's files
    chat_template: str | None  # a Jinja chat template, when the tokenizer has one

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, EOS = 256: the tokenizer of the byte-level ``moe_lm``."""

    vocab_size = 257
    eos_id = BYTE_EOS
    fingerprint = "bytes-utf8-eos256"
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; EOS and ids past 255 are dropped, broken UTF-8 shows U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` (from a ``tokenizer.json``), without transformers."""

    def __init__(self, backend: Any, fingerprint: str, where: str) -> None:
        self.backend = backend
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        eos = next(
            (backend.token_to_id(t) for t in EOS_TOKENS if backend.token_to_id(t) is not None), None
        )
        if eos is None:
            raise ConfigError(
                f"benchmark.tokenizer={where!r} has no end-of-text token; expected one of "
                f"{', '.join(EOS_TOKENS)}"
            )
        self.eos_id = int(eos)
        self.fingerprint = fingerprint
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


class TransformersTokenizer:
    """A ``transformers`` tokenizer loaded from a local directory (chat template included)."""

    def __init__(self, hf: Any, fingerprint: str, where: str) -> None:
        if hf.eos_token_id is None:
            raise ConfigError(
                f"benchmark.tokenizer={where!r} has no eos_token; expected a tokenizer that "
                "ends documents with one"
            )
        self.hf = hf
        self.vocab_size = len(hf)
        self.eos_id = int(hf.eos_token_id)
        self.fingerprint = fingerprint
        self.chat_template = getattr(hf, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


# ---------------------------------------------------------------- loading


def files_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of the given files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _require_hf(what: str) -> None:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"benchmark.tokenizer={what!r} needs the tokenizers package: {HF_EXTRA}"
        ) from None


def _from_path(spec: str) -> Tokenizer:
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"benchmark.tokenizer={spec!r}: no such file or directory; expected 'bytes', "
            "'train:<vocab size>', or a local Hugging Face tokenizer directory"
        )
    _require_hf(spec)
    import tokenizers

    if path.is_file():
        return FastTokenizer(
            tokenizers.Tokenizer.from_file(str(path)), files_fingerprint([path]), spec
        )
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise ConfigError(
            f"benchmark.tokenizer={spec!r} holds no tokenizer files; expected tokenizer.json or "
            "tokenizer_config.json (a directory saved with save_pretrained); with "
            "model.pretrained it defaults to the model's directory: set benchmark.tokenizer=bytes "
            "for byte tokens"
        )
    if (path / "tokenizer_config.json").is_file():
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(
                f"benchmark.tokenizer={spec!r} needs the transformers package: {HF_EXTRA}"
            ) from None
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return TransformersTokenizer(hf, files_fingerprint(files), spec)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"benchmark.tokenizer={spec!r} has no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    return FastTokenizer(backend, files_fingerprint(files), spec)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style: every byte is in the alphabet, nothing is unknown)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend


def _trained(spec: str, corpus_sample: Sequence[str] | None, cache_dir: Path | None) -> Tokenizer:
    size = spec[len(TRAIN_PREFIX) :]
    if not size.isdigit() or int(size) < 257:
        raise ConfigError(
            f"benchmark.tokenizer={spec!r}: expected train:<vocab size> with a vocabulary of at "
            "least 257 (256 bytes and the end-of-text token)"
        )
    if not corpus_sample:
        raise ConfigError(
            f"benchmark.tokenizer={spec!r} needs text to train on; the corpora gave none"
        )
    _require_hf(spec)
    import tokenizers

    digest = hashlib.sha256(f"bpe-bytelevel {size} tokenizers {tokenizers.__version__}\0".encode())
    for text in corpus_sample:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    key = digest.hexdigest()[:24]
    folder = None if cache_dir is None else Path(cache_dir) / "tokenizers" / f"bpe{size}-{key}"
    if folder is not None and (folder / "tokenizer.json").is_file():
        return _from_path(str(folder / "tokenizer.json"))
    backend = train_bpe(corpus_sample, int(size))
    if folder is None:
        return FastTokenizer(backend, hashlib.sha256(backend.to_str().encode()).hexdigest(), spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    backend.save(str(staging / "tokenizer.json"))
    (staging / "sample.json").write_text(
        json.dumps({"vocab_size": int(size), "documents": len(corpus_sample), "key": key})
    )
    try:
        os.replace(staging, folder)  # atomic; another process that got there first wins
    except OSError:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return _from_path(str(folder / "tokenizer.json"))


def load_tokenizer(
    spec: str,
    corpus_sample: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> Tokenizer:
    """``bytes``, a local Hugging Face tokenizer path, or ``train:<vocab size>`` (see module doc).

    ``corpus_sample`` (texts) is what ``train:`` trains on; ``cache_dir`` is where it keeps the
    result (not kept when None). A bad spec is one ConfigError line.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"benchmark.tokenizer={spec!r}: expected 'bytes', 'train:<vocab size>' or a path"
        )
    if spec == BYTES:
        return ByteTokenizer()
    if spec.startswith(TRAIN_PREFIX):
        return _trained(spec, corpus_sample, None if cache_dir is None else Path(cache_dir))
    return _from_path(spec)


# ---------------------------------------------------------------- saving

# What save_for_transformers wrote, as recorded beside an export (lifelong_moe_experts.json).
SAVED_AUTO = "AutoTokenizer"  # tokenizer files: AutoTokenizer.from_pretrained(dir) loads them
SAVED_BYTES = "bytes"  # nothing: the ids are UTF-8 bytes (continue with benchmark.tokenizer=bytes)


def save_for_transformers(tokenizer: Tokenizer | None, directory: str | Path) -> str:
    """Write ``tokenizer`` so that plain ``AutoTokenizer.from_pretrained(directory)`` loads it.

    A transformers tokenizer saves itself; a ``tokenizers`` one (a tokenizer.json, or the BPE of
    ``train:<V>``) is wrapped in transformers' fast tokenizer with its end-of-text token; byte ids
    (``None`` or bytes) have no tokenizer files to write. Returns SAVED_AUTO or SAVED_BYTES.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
        return SAVED_BYTES
    if isinstance(tokenizer, TransformersTokenizer):
        tokenizer.hf.save_pretrained(str(directory))
        return SAVED_AUTO
    if isinstance(tokenizer, FastTokenizer):
        from tokenizers import Tokenizer as Backend
        from transformers import PreTrainedTokenizerFast

        eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
        copy = Backend.from_str(tokenizer.backend.to_str())  # the wrapper may set options on it
        wrapped = PreTrainedTokenizerFast(tokenizer_object=copy, eos_token=eos)
        wrapped.save_pretrained(str(directory))
        return SAVED_AUTO
    raise TypeError(f"save_for_transformers: unknown tokenizer {type(tokenizer).__name__}")
