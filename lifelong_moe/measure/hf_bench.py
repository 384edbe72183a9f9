"""``lifelong-moe-bench hf``: the converted HF MoE against transformers' own experts, fwd+bwd.

One OLMoE-shaped model (random weights, built from its config class) is saved once and loaded
three ways: transformers with ``experts_implementation="eager"`` (a loop over experts), with
``"grouped_mm"`` (sorted tokens and ``torch.nn.functional.grouped_mm``), and converted to the
toolkit's MoELayer (``HFMoECausalLM``, dispatch ``grouped``: OLMoE's experts are gated (SwiGLU)
and the fused Triton kernels refuse gated experts, see ``fused.GATED_REFUSAL``). Each repeat
times one forward + cross-entropy + backward of each, interleaved (so a load change on a shared
machine hits all three alike), on the same tokens; the table reports medians and ours / the
faster of transformers' two. Before timing, the logits of all three are compared with eager's
in the same run (relative error, within ``TOLERANCE`` of the dtype). ``batched_mm``
(transformers' choice for decoding in ``generate``) is left out: it copies the selected
experts' weights for every token.

``grow`` > 0 then runs Lifelong-MoE's growth on the converted model: every layer's experts and
gate rows frozen, ``grow`` new experts per layer, and a few AdamW steps of cross-entropy plus
distillation toward the previous phase (the same model with the new experts masked out, which
is the pre-growth model exactly until the first step); step time, peak memory, and that the
frozen banks stayed bit-identical while the new experts trained.

The same code runs on CPU in fp32 (the committed ``results/hf_bench_cpu.md``) and on CUDA in
bf16 (the GPU session, ``experiments/gpu_session.sh``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lifelong_moe.models import count_parameters
from lifelong_moe.models.hf_moe import HFMoECausalLM, require_transformers
from lifelong_moe.moe import fused

IMPLEMENTATIONS = ("eager", "grouped_mm")
OURS = "toolkit MoELayer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Largest relative error ||logits - eager's|| / ||eager's|| accepted as "the same function".
# fp32: rounding only. bf16: 8-bit mantissas through every layer, and a near-tie in the router can
# send a token to another expert (the toolkit's router computes its logits in fp32, OLMoE's in the
# model's dtype), so the bound is loose; transformers' own grouped_mm is reported beside ours.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
# The learning rate of the growth steps (what is measured is time and memory, not learning).
GROW_LR = 1e-4


@dataclass
class HFShape:
    layers: int = 4
    d_model: int = 128
    d_hidden: int = 256
    experts: int = 8
    top_k: int = 2
    vocab: int = 1024
    batch: int = 16
    seq: int = 128
    heads: int = 4


def _config(tf: Any, shape: HFShape) -> Any:
    return tf.AutoConfig.for_model(
        "olmoe",
        hidden_size=shape.d_model,
        intermediate_size=shape.d_hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.seq,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measured(run: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """Milliseconds of one call, and on CUDA its peak memory above what was allocated before."""
    before = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    peak = None if before is None else (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return ms, peak


def _fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, x, y):
    def run() -> None:
        model.zero_grad(set_to_none=True)
        logits = forward(x)
        F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()

    return run


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp32."""
    want = want.float()
    return ((got.float() - want).norm() / want.norm()).item()


def _load(tf: Any, path: str, shape: HFShape, dtype: str, device: torch.device) -> dict:
    """The three models of the same checkpoint, on the device, in training mode."""
    models: dict[str, torch.nn.Module] = {}
    for impl in IMPLEMENTATIONS:
        m = tf.AutoModelForCausalLM.from_pretrained(
            path,
            experts_implementation=impl,
            dtype=DTYPES[dtype],
            local_files_only=True,
            use_kernels=False,  # transformers' own experts, not Hub kernels (see hf_moe.py)
        )
        used = m.get_experts_implementation().get("")
        if used != impl:  # transformers may fall back silently: then the row would lie
            raise RuntimeError(f"experts_implementation={impl!r} requested, {used!r} in use")
        models[impl] = m.to(device)
    ours = HFMoECausalLM([shape.seq], shape.vocab, pretrained=path, dtype=HF_DTYPES[dtype])
    models[OURS] = ours.to(device)
    for m in models.values():
        m.train()
    return models


def bench_hf(
    shape: HFShape,
    repeats: int,
    warmup: int,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "fp32",
    grow: int = 0,
    grow_steps: int = 3,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Median fwd+bwd ms per implementation, the ratio ours / best transformers, the logits
    check; with ``grow``, the growth step. ``progress`` gets the report as each part finishes
    (a run cut off by a timeout still leaves the timings)."""
    tf = require_transformers()
    dev = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=dev)
    y = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=dev)
    with tempfile.TemporaryDirectory() as tmp:
        with dev:  # random init where the model runs (fast on a GPU), saved once for all three
            hf = tf.AutoModelForCausalLM.from_config(_config(tf, shape), dtype=DTYPES[dtype])
        hf.save_pretrained(tmp)
        del hf
        models = _load(tf, tmp, shape, dtype, dev)
    ours = models[OURS]
    forwards = {
        impl: (lambda t, m=models[impl]: m(input_ids=t, use_cache=False).logits)
        for impl in IMPLEMENTATIONS
    }
    forwards[OURS] = lambda t: ours(t)[0]
    with torch.no_grad():  # the three compute the same function
        logits = {name: forward(x) for name, forward in forwards.items()}
    errors = {name: relative_error(logits[name], logits["eager"]) for name in forwards}
    reference = logits.pop(OURS)
    del logits
    report: dict[str, Any] = {
        "shape": shape.__dict__,
        "device_type": dev.type,
        "dtype": dtype,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "tokens": shape.batch * shape.seq,
        "dispatch": ours.hf.get_submodule(ours.block_specs[0].path).moe.resolved_dispatch(dev),
        "fused": f"not run: {fused.GATED_REFUSAL}",
        "check": {
            "relative_error_vs_eager": errors,
            "tolerance": TOLERANCE[dtype],
            "ok": all(e <= TOLERANCE[dtype] for e in errors.values()),
        },
    }
    steps = {name: _fwd_bwd(forwards[name], models[name], x, y) for name in forwards}
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            ms, peak = _measured(step, dev)
            if i >= warmup:
                times[name].append(ms)
                if peak is not None:
                    peaks[name].append(peak)
    medians = {name: statistics.median(v) for name, v in times.items()}
    best = min(IMPLEMENTATIONS, key=lambda impl: medians[impl])
    report |= {
        "ms": times,
        "median_ms": medians,
        "peak_mb": {name: max(v) for name, v in peaks.items() if v},
        "best_transformers": best,
        "ratio": medians[OURS] / medians[best],
    }
    if progress is not None:
        progress(report)
    if grow:
        for impl in IMPLEMENTATIONS:
            del models[impl]
        del steps, forwards
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        report["growth"] = grow_step(ours, x, y, grow, grow_steps, reference, TOLERANCE[dtype])
        if progress is not None:
            progress(report)
    return report


def grow_step(
    model: HFMoECausalLM,
    x: torch.Tensor,
    y: torch.Tensor,
    n_new: int,
    steps: int,
    before: torch.Tensor,
    tolerance: float,
) -> dict[str, Any]:
    """Lifelong-MoE's growth on a converted model: freeze, expand, ``steps`` AdamW steps of
    CE + KL(teacher || student), the teacher being the model with the new experts masked out.

    ``before`` is the model's logits on ``x`` before growth: the masked model must still give
    them. Reports step ms, peak memory, parameter counts and the exactness of the freezing.
    """
    dev = x.device
    layers = [model.hf.get_submodule(spec.path).moe for spec in model.block_specs]
    n_old = layers[0].n_experts
    t0 = time.perf_counter()
    for layer in layers:
        layer.freeze_existing()
        layer.expand(
            n_new, init=model.growth_init["expand_init"], gate_init=model.growth_init["gate_init"]
        )
    _sync(dev)
    expand_ms = (time.perf_counter() - t0) * 1e3
    mask = torch.arange(n_old + n_new, device=dev) < n_old
    frozen = [(la.experts.w1_frozen.clone(), la.experts.w2_frozen.clone()) for la in layers]
    new = [la.experts.w1.detach().clone() for la in layers]
    with torch.no_grad():
        masked_error = relative_error(model(x, expert_mask=mask)[0], before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=GROW_LR)

    def step() -> None:
        with torch.no_grad():
            teacher = model(x, expert_mask=mask)[0].float().flatten(0, 1)
        student = model(x)[0].float().flatten(0, 1)
        kd = F.kl_div(
            F.log_softmax(student, -1),
            F.log_softmax(teacher, -1),
            log_target=True,
            reduction="batchmean",
        )
        (F.cross_entropy(student, y.flatten()) + kd).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = [_measured(step, dev) for _ in range(steps)]
    peaks = [p for _, p in measured if p is not None]
    return {
        "experts_before": n_old,
        "experts_after": n_old + n_new,
        "expand_ms": expand_ms,
        "step_ms": [ms for ms, _ in measured],
        "peak_mb": max(peaks) if peaks else None,
        "parameters": count_parameters(model),  # total counts the frozen banks (buffers)
        "masked_relative_error": masked_error,
        "masked_ok": masked_error <= tolerance,
        "frozen_exact": all(
            torch.equal(la.experts.w1_frozen, w1) and torch.equal(la.experts.w2_frozen, w2)
            for la, (w1, w2) in zip(layers, frozen, strict=True)
        ),
        "new_experts_trained": all(
            not torch.equal(la.experts.w1.detach(), w) for la, w in zip(layers, new, strict=True)
        ),
    }


def markdown(report: dict[str, Any]) -> str:
    """The table: median fwd+bwd ms of each implementation, relative to the faster reference;
    then the logits check and, if run, the growth step."""
    best = report["median_ms"][report["best_transformers"]]
    peaks = report.get("peak_mb", {})
    tokens = report.get("tokens") or report["shape"]["batch"] * report["shape"]["seq"]
    lines = ["| implementation | fwd+bwd ms (median) | min | max | / best transformers "
             "| tokens/s | peak MB | logits rel. error vs eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    errors = report.get("check", {}).get("relative_error_vs_eager", {})
    for name, values in report["ms"].items():
        median = report["median_ms"][name]
        peak = peaks.get(name)
        error = errors.get(name)
        lines.append(
            f"| {name} | {median:.1f} | {min(values):.1f} | {max(values):.1f} | "
            f"{median / best:.3f} | {tokens / median * 1e3:.0f} | "
            f"{'-' if peak is None else f'{peak:.0f}'} | "
            f"{'-' if error is None else f'{error:.1e}'} |"
        )
    check = report.get("check")
    if check:
        verdict = "ok" if check["ok"] else "**FAILED**"
        lines += ["", f"Logits check (relative error <= {check['tolerance']:g}): {verdict}."]
    if "fused" in report:
        lines += [f"Toolkit dispatch: {report['dispatch']}; fused {report['fused']}."]
    g = report.get("growth")
    if g:
        step_ms = ", ".join(f"{ms:.1f}" for ms in g["step_ms"])
        peak = "-" if g["peak_mb"] is None else f"{g['peak_mb']:.0f}"
        lines += [
            "",
            "| growth | experts | trainable / all params | step ms (each) | peak MB "
            "| masked = before | frozen exact | new experts trained |",
            "|---|---|---:|---|---:|---|---|---|",
            f"| freeze + expand ({g['expand_ms']:.0f} ms) + AdamW | {g['experts_before']} -> "
            f"{g['experts_after']} | {g['parameters']['trainable']:,} / {g['parameters']['total']:,} | "
            f"{step_ms} | "
            f"{peak} | {g['masked_relative_error']:.1e} ({'ok' if g['masked_ok'] else 'NO'}) | "
            f"{g['frozen_exact']} | {g['new_experts_trained']} |",
        ]
    return "\n".join(lines)
