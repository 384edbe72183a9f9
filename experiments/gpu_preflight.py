"""First step of the GPU session: versions, and the torch/Triton APIs the session relies on.

The GPU machine has torch 2.11, Triton 3.6 and transformers 5.17; the code is developed on torch
2.14 here, so a dry run here cannot see API skew. This lists every ``torch.*``, ``F.*``, ``tl.*``
and ``triton.*`` name that the MoE core, the benchmark and the checks use and resolves each on the
installed versions, then exercises the few whose behaviour (not only presence) matters: a custom
op with a fake kernel and an autograd formula (the fused dispatch), grouped_mm in bf16 (on CUDA),
the sync debug mode, and the transformers API of the hf step (a tiny ``lifelong-moe-bench hf``).
Exit 1 when something required is missing; the session goes on regardless.

    python experiments/gpu_preflight.py --json OUT/preflight.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SCANNED = [
    *sorted((REPO / "lifelong_moe" / "moe").glob("*.py")),
    REPO / "lifelong_moe" / "bench.py",
    REPO / "lifelong_moe" / "measure" / "throughput.py",
    REPO / "lifelong_moe" / "measure" / "hf_bench.py",
    REPO / "experiments" / "gpu_checks.py",
]
DISTRIBUTIONS = [
    "torch",
    "triton",
    "lightning",
    "pytorch-lightning",
    "torchmetrics",
    "transformers",
    "tokenizers",
    "safetensors",
    "hydra-core",
    "omegaconf",
    "mlflow-skinny",
    "mlflow",
    "sqlalchemy",
    "numpy",
    "pytest",
]
# Names read with a fallback in the code (dispatch.py: F.grouped_mm or torch._grouped_mm).
OPTIONAL = {"torch.nn.functional.grouped_mm", "torch._grouped_mm"}
ALIASES = {"F": "torch.nn.functional", "tl": "triton.language"}


def used_names(files: list[Path]) -> list[str]:
    """Dotted torch/triton names the files use, aliases expanded (F. -> torch.nn.functional.)."""
    pattern = re.compile(r"(?<![\w.])(torch|F|tl|triton)((?:\.[A-Za-z_]\w*)+)")
    names = set()
    for path in files:
        for root, rest in pattern.findall(path.read_text()):
            names.add(ALIASES.get(root, root) + rest)
    return sorted(names)


def resolve(name: str) -> bool:
    """Whether the dotted name resolves (module attributes, then submodule imports)."""
    parts = name.split(".")
    try:
        obj = __import__(parts[0])
    except ImportError:
        return False
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = __import__(".".join(parts[: i + 1]), fromlist=["_"])
        except ImportError:
            return False
    return True


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["torch.version.cuda"] = torch.version.cuda
    return out


def check_custom_op() -> dict:
    """A custom op with register_fake and register_autograd, compiled with fullgraph."""
    try:

        @torch.library.custom_op("gpu_preflight::scale", mutates_args=())
        def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
            return x * factor

        @scale.register_fake
        def _(x, factor):
            return torch.empty_like(x)

        def setup(ctx, inputs, output):
            ctx.factor = inputs[1]

        scale.register_autograd(lambda ctx, g: (g * ctx.factor, None), setup_context=setup)
        x = torch.randn(4, requires_grad=True)
        y = torch.compile(lambda t: scale(t, 3.0), fullgraph=True, backend="eager")(x)
        y.sum().backward()
        ok = torch.equal(x.grad, torch.full_like(x, 3.0))
        return {"check": "torch.library.custom_op + register_fake + register_autograd", "ok": ok}
    except Exception as exc:  # report what broke, never hide it
        return {"check": "torch.library.custom_op", "ok": False, "error": repr(exc)[:300]}


def check_autocast_signatures() -> dict:
    """dispatch/layer call is_autocast_enabled(device_type) and get_autocast_dtype(device_type)."""
    try:
        ok = isinstance(torch.is_autocast_enabled("cpu"), bool) and torch.get_autocast_dtype(
            "cpu"
        ) in (torch.bfloat16, torch.float16)
        return {"check": "torch.is_autocast_enabled/get_autocast_dtype(device_type)", "ok": ok}
    except Exception as exc:
        return {"check": "autocast by device type", "ok": False, "error": repr(exc)[:300]}


def check_transformers() -> dict:
    """The hf step's transformers API on the installed version (5.17 on the GPU machine, newer
    here): a one-layer OLMoE built from its config, saved, loaded with each
    ``experts_implementation`` (checked in use), converted to MoELayer, fwd+bwd in bf16, logits
    compared, then grown; the whole ``lifelong-moe-bench hf`` path at the smallest shape."""
    name = "transformers API of the hf step (tiny lifelong-moe-bench hf, bf16, with growth)"
    try:
        from lifelong_moe.measure import hf_bench

        shape = hf_bench.HFShape(layers=1, d_model=64, d_hidden=32, experts=4, top_k=2,
                                 vocab=128, batch=1, seq=16, heads=2)  # fmt: skip
        device = "cuda" if torch.cuda.is_available() else "cpu"
        report = hf_bench.bench_hf(shape, 5, 1, device=device, dtype="bf16", grow=2, grow_steps=1)
        growth = report["growth"]
        ok = report["check"]["ok"] and growth["frozen_exact"] and growth["masked_ok"]
        return {
            "check": name,
            "ok": ok,
            "transformers": report["transformers"],
            "relative_error_vs_eager": report["check"]["relative_error_vs_eager"],
            "frozen_exact": growth["frozen_exact"],
        }
    except Exception as exc:  # report what broke, never hide it
        return {"check": name, "ok": False, "error": repr(exc)[:300]}


def check_cuda() -> list[dict]:
    if not torch.cuda.is_available():
        return [{"check": "CUDA device", "ok": None, "skipped": "no CUDA device (dry run)"}]
    major, minor = torch.cuda.get_device_capability()
    out = [
        {
            "check": "CUDA device",
            "ok": True,
            "name": torch.cuda.get_device_name(),
            "capability": f"{major}.{minor}",
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "set_sync_debug_mode": hasattr(torch.cuda, "set_sync_debug_mode"),
        }
    ]
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(
        torch, "_grouped_mm", None
    )
    try:
        x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2, 32, 16, device="cuda", dtype=torch.bfloat16)
        offs = torch.tensor([32, 64], device="cuda", dtype=torch.int32)
        y = grouped(x, w, offs=offs)
        ref = torch.cat([x[:32] @ w[0], x[32:] @ w[1]])
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        out.append({"check": "grouped_mm bf16 on CUDA vs matmul", "ok": err < 1e-2, "rel": err})
    except Exception as exc:
        out.append({"check": "grouped_mm bf16 on CUDA", "ok": False, "error": repr(exc)[:300]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = used_names(SCANNED)
    missing = [n for n in names if not resolve(n)]
    required_missing = [n for n in missing if n not in OPTIONAL]
    grouped_ok = any(resolve(n) for n in OPTIONAL)
    checks = [
        {
            "check": f"{len(names)} torch/triton names used by the MoE core, bench and checks",
            "ok": not required_missing,
            "missing": missing,
        },
        {"check": "grouped_mm (F.grouped_mm or torch._grouped_mm)", "ok": grouped_ok},
        check_custom_op(),
        check_autocast_signatures(),
        {
            "check": "torch._dynamo.explain and torch.compile",
            "ok": resolve("torch._dynamo.explain") and hasattr(torch, "compile"),
        },
        check_transformers(),
        *check_cuda(),
    ]
    report = {
        "versions": versions(),
        "argv": sys.argv[1:],
        "names_used": names,
        "checks": checks,
        "ok": all(c.get("ok") is not False for c in checks),
    }
    for key, value in report["versions"].items():
        print(f"{key}: {value}")
    for c in checks:
        print(json.dumps(c))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
