"""Where the fused kernels' time goes (issue 26: a profile wherever a target is missed).

    python experiments/gpu_profile.py OUTDIR            # on the GPU: E=64, T=32768, bf16
    python experiments/gpu_profile.py OUTDIR --dry      # here: tiny shapes on CPU

One MoELayer per dispatch (fused, grouped) with the same weights; 3 warm-up rounds, then
torch.profiler over 3 fwd+bwd rounds. Writes OUTDIR/profile_<dispatch>.txt: the operators and
kernels sorted by device time (self), the table that says which kernel a missed target is in.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lifelong_moe.moe import MoELayer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--dry", action="store_true")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.dry:
        device, dtype, (T, d, h, E, k) = "cpu", torch.float32, (64, 16, 32, 8, 2)
        dispatches = (
            ["grouped", "fused"] if os.environ.get("TRITON_INTERPRET") == "1" else ["grouped"]
        )
    else:
        device, dtype, (T, d, h, E, k) = "cuda", torch.bfloat16, (32768, 1024, 4096, 64, 2)
        dispatches = ["fused", "grouped"]
    torch.manual_seed(0)
    reference = MoELayer(d, h, E, k, dispatch="grouped")
    x = torch.randn(T, d, device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for dispatch in dispatches:
        layer = MoELayer.from_config({**reference.get_config(), "dispatch": dispatch})
        layer.load_state_dict(reference.state_dict())
        layer = layer.to(device, dtype)

        def step(layer: MoELayer = layer) -> None:
            y, _ = layer(x)
            y.float().square().mean().backward()

        for _ in range(3):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
        header = f"dispatch={dispatch} E={E} T={T} d={d} h={h} k={k} {dtype} {device}, 3 fwd+bwd\n"
        (args.outdir / f"profile_{dispatch}.txt").write_text(header + table)
        print(header + table, flush=True)


if __name__ == "__main__":
    main()
