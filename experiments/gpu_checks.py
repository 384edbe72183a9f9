"""GPU checks for the MoE layer (issues 9, 26): no host sync, no graph break, sm_90 kernels.

For grouped and fused dispatch: fwd+bwd under torch.cuda.set_sync_debug_mode("error") with 0 and
56 of 64 experts frozen; torch._dynamo.explain counts graph breaks and torch.compile(fullgraph=True)
runs fwd+bwd and matches eager; then the Triton kernels the run compiled are read back from
TRITON_CACHE_DIR to show which architecture they were built for (sm_90 on an H100/H200).

    python experiments/gpu_checks.py [--json FILE]                 # on a CUDA machine
    python experiments/gpu_checks.py --dry --json FILE             # CPU, tiny, TRITON_INTERPRET=1

--dry: tiny shapes on CPU (the fused kernels under the Triton interpreter), the compile check with
the eager backend; the sync check needs CUDA and is reported as skipped. Prints one JSON line
per check; exit 1 when a check that ran failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lifelong_moe.moe import MoELayer, fused


def layer_and_input(
    dispatch: str, n_experts: int, n_frozen: int, shape: dict, device: str, dtype: torch.dtype
) -> tuple[MoELayer, torch.Tensor]:
    torch.manual_seed(0)
    d, h, k, tokens = shape["d"], shape["h"], shape["k"], shape["tokens"]
    layer = MoELayer(d, h, n_frozen or n_experts, k, dispatch=dispatch)
    if n_frozen:
        layer.freeze_existing()
        layer.expand(n_experts - n_frozen)
    layer = layer.to(device, dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    return layer, x


def check_no_sync(dispatch: str, n_frozen: int, shape: dict, device: str, dtype) -> dict:
    name = f"no host sync in fwd+bwd ({dispatch}, 64 experts, {n_frozen} frozen)"
    if device != "cuda":
        return {"check": name, "ok": None, "skipped": "needs CUDA"}
    layer, x = layer_and_input(dispatch, 64, n_frozen, shape, device, dtype)
    for _ in range(2):  # warm-up: allocator, kernel compilation
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
    return {"check": name, "ok": ok, "error": error}


def check_compile(dispatch: str, shape: dict, device: str, dtype, backend: str) -> list[dict]:
    layer, x = layer_and_input(dispatch, 64, 56, shape, device, dtype)
    explanation = torch._dynamo.explain(layer)(x)
    out = [
        {
            "check": f"torch._dynamo.explain(MoELayer {dispatch}): graph breaks",
            "ok": explanation.graph_break_count == 0,
            "graph_breaks": explanation.graph_break_count,
            "graphs": explanation.graph_count,
            "reasons": [str(r.reason) for r in explanation.break_reasons][:5],
        }
    ]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y_eager, _ = layer(x)
    start = time.perf_counter()
    y_comp, aux = compiled(x)
    (y_comp.float().sum() + aux.balance_loss).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    diff = (y_eager.float() - y_comp.float()).abs().max().item()
    out.append(
        {
            "check": f"torch.compile(fullgraph=True, backend={backend}) fwd+bwd ({dispatch}) "
            "runs and matches eager",
            "ok": diff < 5e-2,
            "max_abs_diff": diff,
            "compile_seconds": time.perf_counter() - start,
        }
    )
    torch._dynamo.reset()
    return out


def kernel_targets(cache_dir: Path) -> dict:
    """The targets of the Triton kernels compiled into cache_dir (metadata JSON and PTX)."""
    archs, ptx_targets, kernels = set(), set(), set()
    for meta in cache_dir.rglob("*.json"):
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        target = data.get("target") if isinstance(data, dict) else None
        if isinstance(target, dict) and "arch" in target:
            archs.add(str(target["arch"]))
            kernels.add(str(data.get("name", meta.stem)))
    for ptx in cache_dir.rglob("*.ptx"):
        for line in ptx.read_text(errors="replace").splitlines():
            if line.startswith(".target"):
                ptx_targets.add(line.split()[1].rstrip(","))
    return {"archs": sorted(archs), "ptx_targets": sorted(ptx_targets), "kernels": sorted(kernels)}


def check_sm90(device: str) -> dict:
    name = "Triton kernels compiled for the device's architecture (sm_90 on H100/H200)"
    cache = os.environ.get("TRITON_CACHE_DIR")
    if device != "cuda" or not cache:
        why = "needs CUDA" if device != "cuda" else "TRITON_CACHE_DIR not set"
        return {"check": name, "ok": None, "skipped": why}
    major, minor = torch.cuda.get_device_capability()
    found = kernel_targets(Path(cache))
    want = f"{major}{minor}"
    ok = bool(found["archs"]) and all(a == want for a in found["archs"])
    fused_names = {"_rows_kernel", "_weight_grad_kernel"}
    return {
        "check": name,
        "ok": ok and fused_names <= set(found["kernels"]),
        "capability": want,
        **found,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes, eager backend")
    args = parser.parse_args()
    device = "cpu" if args.dry else "cuda"
    dtype = (
        torch.bfloat16
    )  # also on CPU: grouped_mm's fake (meta) kernel refuses fp32 under compile
    backend = "eager" if args.dry else "inductor"
    shape = (
        {"d": 16, "h": 32, "k": 2, "tokens": 64}
        if args.dry
        else {"d": 1024, "h": 4096, "k": 2, "tokens": 8192}
    )
    head = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton_interpret": fused.interpreting(),
        "shape": shape,
    }
    results = [head]
    dispatches = ["grouped"] + (["fused"] if fused.runs_on(torch.device(device)) else [])
    for dispatch in dispatches:
        for n_frozen in (0, 56):
            results.append(check_no_sync(dispatch, n_frozen, shape, device, dtype))
        try:
            results += check_compile(dispatch, shape, device, dtype, backend)
        except Exception as exc:  # report, do not hide: the table says what failed
            results.append(
                {"check": f"torch.compile ({dispatch})", "ok": False, "error": repr(exc)[:500]}
            )
    results.append(check_sm90(device))
    for r in results:
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r.get("ok") is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
