"""Render a GPU session's OUTDIR (experiments/gpu_session.sh) into the two results pages.

    python experiments/gpu_report.py OUTDIR [--results results]
      -> results/dispatch_h200.md (device, versions, commands, CUDA checks, dispatch tables,
         the issue's targets), results/lm_gpu_h200.md (tokens/s and cost/mfu per experience)
         and results/hf_bench_h200.md (the OLMoE-shaped model: transformers' experts vs the
         toolkit's MoELayer, the logits check, the Lifelong-MoE growth step)

Every number is read from OUTDIR; a step that did not run shows as not measured. A dry run's
OUTDIR renders too, under a banner saying it is no measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from lifelong_moe import names
from lifelong_moe.bench import frozen_step_ratio, tflops
from lifelong_moe.measure.hf_bench import markdown as hf_markdown

# (label, target, "<=" or ">=") of issue 26
TARGETS = {
    "fused_e64_t32768": ("fused fwd+bwd / dense-active, E=64 T=32768 (eager)", 1.15, "<="),
    "fused_e64_t8192": ("fused fwd+bwd / dense-active, E=64 T=8192 (eager)", 1.5, "<="),
    "fused_fine_tflops": ("fused fwd+bwd TFLOP/s, E=128 d=2048 h=768 k=8 T=32768", 413.0, ">="),
    "fused_memory": ("fused peak activation memory / dense-active, E=64 T=32768", 1.2, "<="),
    "frozen_step": ("7/8-frozen step / all-trainable step (fused), E=64 T=32768", 0.6, "<="),
    "lm_mfu": ("lm_gpu cost/mfu, best configuration, last experience", 0.35, ">="),
}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: float | None, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def header(out: Path, title: str) -> list[str]:
    pre = read_json(out / "preflight.json") or {}
    versions = pre.get("versions", {})
    device = next((c for c in pre.get("checks", []) if c.get("check") == "CUDA device"), {})
    lines = [f"# {title}", ""]
    if not device.get("ok"):
        lines += [
            "> **Dry run on CPU (tiny shapes, Triton interpreter): not a measurement.** "
            "Rendered from `experiments/gpu_session.sh OUTDIR --dry`.",
            "",
        ]
    name = device.get("name", "cpu")
    cap = device.get("capability", "-")
    lines += [
        f"Device: {name} (compute capability {cap}). "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        "",
        "Rendered by `python experiments/gpu_report.py OUTDIR` from the files that "
        "`experiments/gpu_session.sh OUTDIR` wrote.",
        "",
    ]
    return lines


def commands(out: Path, prefix: str) -> list[str]:
    lines = ["## Commands", "", "| step | rc | s | command |", "|---|---:|---:|---|"]
    for s in read_jsonl(out / "steps.jsonl"):
        if not s["step"].startswith(prefix):
            continue
        rc = s.get("rc", s.get("skipped", "-"))
        lines.append(f"| {s['step']} | {rc} | {s.get('seconds', '-')} | `{s.get('command', '')}` |")
    return lines + [""]


def checks_table(out: Path) -> list[str]:
    lines = ["## CUDA tests and checks", "", "| check | result |", "|---|---|"]
    xml = out / "cuda_tests.xml"
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = f"{tag}: {(node.get('message') or '').splitlines()[0][:120]}"
            lines.append(f"| pytest {case.get('name')} | {outcome} |")
    for c in read_json(out / "gpu_checks.json") or []:
        if "check" not in c:
            continue
        ok = {True: "ok", False: "FAILED", None: c.get("skipped", "skipped")}[c.get("ok")]
        extra = c.get("error") or ", ".join(
            f"{k} {v}" for k, v in c.items() if k in ("graph_breaks", "archs", "ptx_targets")
        )
        lines.append(f"| {c['check']} | {ok}{': ' + str(extra) if extra else ''} |")
    return lines + [""]


def dispatch_rows(report: dict) -> list[str]:
    shapes = report["shapes"]
    d, h, k = shapes["d_model"], shapes["d_hidden"], shapes["top_k"]
    mode = "compiled" if report.get("compile") else "eager"
    lines = []
    for res in report["results"]:
        cases = {c["name"]: c for c in res["cases"]}
        dense = cases["dense-active"]
        for c in res["cases"]:
            if c["skipped"]:
                lines.append(f"| {res['n_experts']} | {res['n_tokens']} | {d}/{h}/{k} | {mode} | "
                             f"{c['name']} | {c['skipped']} |||||||")  # fmt: skip
                continue
            f, fb = c["fwd"]["median_ms"], c["fwdbwd"]["median_ms"]
            dense_fb = dense["fwdbwd"]["median_ms"]
            peak, dense_peak = c.get("peak_mb"), dense.get("peak_mb")
            lines.append(
                f"| {res['n_experts']} | {res['n_tokens']} | {d}/{h}/{k} | {mode} | {c['name']} | "
                f"{fmt(f, '{:.3f}')} | {fmt(fb, '{:.3f}')} | "
                f"{fmt(fb / dense_fb if fb and dense_fb else None)} | "
                f"{fmt(tflops(res['n_tokens'], d, h, k, f, False), '{:.1f}')} | "
                f"{fmt(tflops(res['n_tokens'], d, h, k, fb, True), '{:.1f}')} | "
                f"{fmt(peak, '{:.0f}')} | "
                f"{fmt(peak / dense_peak if peak is not None and dense_peak else None)} |"
            )
    return lines


def find(reports: list[dict], step: str, index: int) -> dict | None:
    """The index-th (E, T) result of a step (the session orders T=32768 first, then 8192)."""
    for r in reports:
        if r.get("step") == step and len(r["results"]) > index:
            return r["results"][index] | {"shapes": r["shapes"]}
    return None


def measured(reports: list[dict], lm_rows: list[dict]) -> dict[str, float | None]:
    """The value behind each target, None where its step did not run."""

    def ratio(res: dict | None, name: str, key: str = "fwdbwd") -> float | None:
        if res is None:
            return None
        cases = {c["name"]: c for c in res["cases"]}
        if name not in cases or cases[name]["skipped"]:
            return None
        if key == "peak_mb":
            a, b = cases[name].get("peak_mb"), cases["dense-active"].get("peak_mb")
        else:
            a, b = cases[name][key]["median_ms"], cases["dense-active"][key]["median_ms"]
        return a / b if a is not None and b else None

    big = find(reports, "dispatch-e64-eager", 0)
    small = find(reports, "dispatch-e64-eager", 1)
    fine = find(reports, "dispatch-fine-eager", 0)
    fine_tflops = None
    if fine is not None:
        c = {c["name"]: c for c in fine["cases"]}.get("moe-fused")
        s = fine["shapes"]
        if c and not c["skipped"]:
            fine_tflops = tflops(fine["n_tokens"], s["d_model"], s["d_hidden"], s["top_k"],
                                 c["fwdbwd"]["median_ms"], True)  # fmt: skip
    mfus = [row["experiences"][-1].get(names.COST_MFU) for row in lm_rows if row.get("experiences")]
    mfus = [m for m in mfus if m is not None]
    return {
        "fused_e64_t32768": ratio(big, "moe-fused"),
        "fused_e64_t8192": ratio(small, "moe-fused"),
        "fused_fine_tflops": fine_tflops,
        "fused_memory": ratio(big, "moe-fused", "peak_mb"),
        "frozen_step": frozen_step_ratio(big, "fused-") if big else None,
        "lm_mfu": max(mfus) if mfus else None,
    }


def targets_table(values: dict[str, float | None]) -> list[str]:
    lines = [
        "## Targets (issue 26)",
        "",
        "| target | wanted | measured | met |",
        "|---|---:|---:|---|",
    ]
    for key, (label, want, op) in TARGETS.items():
        value = values.get(key)
        met = "not measured" if value is None else (
            "yes" if (value <= want if op == "<=" else value >= want) else "**no**"
        )  # fmt: skip
        lines.append(f"| {label} | {op} {want} | {fmt(value, '{:.3f}')} | {met} |")
    return lines + [""]


def dispatch_page(out: Path) -> str:
    reports = read_jsonl(out / "dispatch.jsonl")
    lm_rows = read_jsonl(out / "lm_gpu.jsonl")
    lines = header(
        out, "MoE dispatch on an H200: fused Triton kernels vs grouped_mm vs dense-active"
    )
    lines += targets_table(measured(reports, lm_rows))
    lines += checks_table(out)
    lines += [
        "## Dispatch benchmark (bf16, median ms; ratio and memory against dense-active)",
        "",
        "TFLOP/s count the expert MLPs only (4·T·d·h·k per forward, x3 with the backward). Peak "
        "MB: CUDA allocator peak of one fwd+bwd above what was allocated before it.",
        "",
        "| E | T | d/h/k | mode | case | fwd ms | fwd+bwd ms | fwd+bwd / dense | fwd TFLOP/s "
        "| fwd+bwd TFLOP/s | peak MB | peak / dense |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for report in reports:
        lines += dispatch_rows(report)
    lines += ["", *commands(out, "")]
    return "\n".join(lines) + "\n"


def lm_page(out: Path) -> str:
    lines = header(out, "lm_gpu on an H200: tokens/s and MFU, grouped vs fused dispatch")
    lines += [
        "`experiment=lm_gpu`, 2 experiences (english, python), 1 epoch each; MFU as "
        "lifelong_moe/measure/throughput.py defines it: student FLOPs only (6 x active parameters + "
        "attention), the teacher's forward inside the time, the device's dense bf16 peak.",
        "",
        "| dispatch | batch | compile | experience | tokens/s | cost/mfu | train s | peak MB "
        "| checkpoint s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in read_jsonl(out / "lm_gpu.jsonl"):
        cfg = row["config"]
        head = f"| {cfg.get('dispatch')} | {cfg.get('batch_size')} | {cfg.get('compile')} |"
        if "error" in row:
            lines.append(f"{head} - | {row['error']} |||||")
            continue
        for e in row["experiences"]:
            lines.append(
                f"{head} {e['experience']} | {fmt(e.get(names.COST_TOKENS_PER_S), '{:.0f}')} | "
                f"{fmt(e.get(names.COST_MFU), '{:.3f}')} | {fmt(e.get(names.COST_TRAIN_S))} | "
                f"{fmt(e.get(names.COST_PEAK_MB), '{:.0f}')} | "
                f"{fmt(e.get(names.COST_CHECKPOINT_S))} |"
            )
    lines += ["", *commands(out, "lm-")]
    return "\n".join(lines) + "\n"


def hf_page(out: Path) -> str:
    lines = header(
        out, "Hugging Face OLMoE on an H200: transformers' experts vs the toolkit's MoELayer"
    )
    lines += [
        "`lifelong-moe-bench hf`: one OLMoE model (random weights from its config class) saved "
        "once and loaded three ways: transformers with `experts_implementation` eager and "
        "grouped_mm, and converted to the toolkit's MoELayer. Forward + cross-entropy + backward "
        "on the same tokens, repeats interleaved, CUDA-synchronised; peak MB: allocator peak of "
        "one fwd+bwd above what was allocated before it. The logits of all three are compared "
        "with eager's in the same run, before timing. Then Lifelong-MoE's growth on the "
        "converted model: old experts and gate rows frozen, new experts appended, AdamW steps of "
        "cross-entropy + KL toward the model with the new experts masked out.",
        "",
    ]
    reports = read_jsonl(out / "hf_bench.jsonl")
    if not reports:
        lines += ["Not measured: the hf step did not run or wrote nothing (see Commands).", ""]
    for r in reports:
        s = r["shape"]
        lines += [
            f"## {r['step']}: {s['layers']} layers, d {s['d_model']}, {s['experts']} experts of "
            f"{s['d_hidden']} top-{s['top_k']}, {s['heads']} heads, vocabulary {s['vocab']}, "
            f"{s['batch']} x {s['seq']} tokens, {r['dtype']}",
            "",
            f"{r.get('device', '-')}, torch {r['torch']}, transformers {r['transformers']}, "
            f"median of {r['repeats']} after {r['warmup']} warm-up rounds.",
            "",
            hf_markdown(r),
            "",
        ]
    lines += commands(out, "hf-")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    if not (args.outdir / "steps.jsonl").is_file():
        print(f"{args.outdir}: no steps.jsonl; expected a gpu_session.sh OUTDIR", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "dispatch_h200.md").write_text(dispatch_page(args.outdir))
    (args.results / "lm_gpu_h200.md").write_text(lm_page(args.outdir))
    (args.results / "hf_bench_h200.md").write_text(hf_page(args.outdir))
    print(f"wrote dispatch_h200.md, lm_gpu_h200.md and hf_bench_h200.md in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
