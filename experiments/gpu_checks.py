"""GPU checks for the MoE layer (issue 9): bf16 grouped_mm path, no host sync, no graph breaks.

Run on a CUDA machine: python experiments/gpu_checks.py [--json FILE]. Prints one line per check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lifelong_moe.moe import MoELayer


def layer_and_input(
    n_experts: int, n_frozen: int, tokens: int, d: int = 1024, h: int = 4096, k: int = 2
) -> tuple[MoELayer, torch.Tensor]:
    torch.manual_seed(0)
    layer = MoELayer(d, h, n_frozen or n_experts, k)
    if n_frozen:
        layer.freeze_existing()
        layer.expand(n_experts - n_frozen)
    layer = layer.cuda().to(torch.bfloat16)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return layer, x


def check_no_sync(n_frozen: int) -> dict:
    layer, x = layer_and_input(64, n_frozen, 8192)
    for _ in range(2):  # warm-up: allocator and kernels
        y, aux = layer(x)
        y.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
        (y.float().sum() + aux.balance_loss).backward()
        ok, error = True, ""
    except RuntimeError as exc:
        ok, error = False, str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {
        "check": f"no host sync in fwd+bwd (64 experts, {n_frozen} frozen)",
        "ok": ok,
        "error": error,
    }


def check_compile() -> list[dict]:
    layer, x = layer_and_input(64, 56, 8192)
    explanation = torch._dynamo.explain(layer)(x)
    out = [
        {
            "check": "torch._dynamo.explain(MoELayer): graph breaks",
            "ok": explanation.graph_break_count == 0,
            "graph_breaks": explanation.graph_break_count,
            "graphs": explanation.graph_count,
            "reasons": [str(r.reason) for r in explanation.break_reasons][:5],
        }
    ]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y_eager, _ = layer(x)
    start = time.perf_counter()
    y_comp, aux = compiled(x)
    (y_comp.float().sum() + aux.balance_loss).backward()
    torch.cuda.synchronize()
    diff = (y_eager.float() - y_comp.float()).abs().max().item()
    out.append(
        {
            "check": "torch.compile(fullgraph=True) fwd+bwd runs and matches eager",
            "ok": diff < 5e-2,
            "max_abs_diff_bf16": diff,
            "compile_seconds": time.perf_counter() - start,
        }
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = [
        {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "grouped_mm": "torch.nn.functional.grouped_mm"
            if hasattr(torch.nn.functional, "grouped_mm")
            else "torch._grouped_mm",
        }
    ]
    results += [check_no_sync(0), check_no_sync(56)]
    try:
        results += check_compile()
    except Exception as exc:  # report, do not hide: the table says what failed
        results.append({"check": "torch.compile", "ok": False, "error": repr(exc)[:500]})
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r.get("ok", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
