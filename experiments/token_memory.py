"""Peak memory of building token_domains does not grow with the corpus.

Builds two domains of text found on this machine (``python``: the standard library's .py
sources; ``packages``: the .py/.txt/.md files of the installed site-packages), each written as
jsonl documents until it reaches the target size (the sources are cycled if they run out), at
about 10 MB and at about 100 MB per domain. For each size a fresh process builds the stream
with ``benchmark.tokenizer=train:<vocab>`` into an empty cache (so the BPE is trained on the
capped sample, then both domains are tokenized into shards), reads every training window once,
and reports its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The
criterion: peak at 100 MB per domain <= 1.2 x peak at 10 MB. Writes results/token_memory.md
and .json.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/token_memory.py
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES_MB = (10, 100)
VOCAB = 4096
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python experiments/token_memory.py"


def sources() -> dict[str, list[Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    packages = Path(sysconfig.get_paths()["purelib"])
    python = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    other = sorted(
        p for ext in ("*.py", "*.txt", "*.md") for p in packages.rglob(ext) if p.is_file()
    )
    return {"python": python, "packages": other}


def write_domain(folder: Path, files: list[Path], target: int) -> tuple[int, int]:
    """jsonl documents (one per source file) until ``target`` bytes; returns (bytes, documents)."""
    folder.mkdir(parents=True)
    size = n = 0
    with (folder / "documents.jsonl").open("w") as out:
        while size < target:
            for path in files:
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                size, n = size + len(line.encode()), n + 1
                if size >= target:
                    break
    return size, n


def measure(text_dir: str, cache_dir: str) -> dict:
    """In this (fresh) process: build the stream, read every training window, peak RSS."""
    import torch

    from lifelong_moe.data.tokens import token_domains

    torch.set_num_threads(1)
    start = time.perf_counter()
    stream = token_domains(text_dir, tokenizer=f"train:{VOCAB}", cache_dir=cache_dir)
    built = time.perf_counter() - start
    n_windows = 0
    for exp in stream.experiences:
        loader = torch.utils.data.DataLoader(exp.train, batch_size=256)
        for x, _, _ in loader:
            n_windows += len(x)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_rss_mb": peak_kib / 1024,
        "build_s": built,
        "read_s": time.perf_counter() - start - built,
        "n_windows_read": n_windows,
        # "where" is a temporary folder: no absolute paths in committed results
        "domains": [{k: v for k, v in r.items() if k != "where"} for r in stream.domain_records()],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", nargs=2, metavar=("TEXT_DIR", "CACHE_DIR"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    found = sources()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in SIZES_MB:
            text = Path(tmp) / f"text{mb}"
            written = {
                name: write_domain(text / name, files, mb * 1_000_000)
                for name, files in found.items()
            }
            done = subprocess.run(
                [sys.executable, __file__, "--measure", str(text), str(Path(tmp) / f"cache{mb}")],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            )
            result = json.loads(done.stdout.splitlines()[-1])
            result["mb_per_domain"] = mb
            result["written"] = {k: {"bytes": b, "documents": n} for k, (b, n) in written.items()}
            rows.append(result)
            print(f"{mb} MB/domain: peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    small, large = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    ratio = large / small
    out = {
        "command": COMMAND,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "tokenizer": f"train:{VOCAB}",
        "ratio": ratio,
        "rows": rows,
    }
    (REPO / "results" / "token_memory.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Peak memory of token_domains against corpus size",
        "",
        f"Command: `{COMMAND}` ({out['machine']}). Two domains (stdlib .py sources; site-packages",
        ".py/.txt/.md files) as jsonl, each at the size below; one fresh process per size builds the",
        f"stream with `benchmark.tokenizer=train:{VOCAB}` into an empty cache (BPE trained on the",
        "capped 4 MB sample, both domains tokenized to shards), reads every training window once,",
        "and reports its peak resident memory (`ru_maxrss`; torch and the toolkit imported).",
        "",
        "| MB per domain | tokens (both domains) | build s | read s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tokens = sum(d["n_tokens"] for d in r["domains"])
        lines.append(
            f"| {r['mb_per_domain']} | {tokens:,} | {r['build_s']:.0f} | {r['read_s']:.0f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    verdict = "meets" if ratio <= 1.2 else "misses"
    lines += [
        "",
        f"Ratio {SIZES_MB[-1]} MB / {SIZES_MB[0]} MB: **{ratio:.3f}** ({verdict} <= 1.2).",
    ]
    (REPO / "results" / "token_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
