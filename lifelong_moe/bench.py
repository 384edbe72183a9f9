"""lifelong-moe-bench: time the MoE dispatch core against its baselines, in the same run.

Every MoE timing is reported beside a dense FFN with the same active parameters per token
(hidden k*h, the compute limit: ratio 1.0), as scattermoe's benchmarks do. Baselines: the
per-expert loop, GShard-style one-hot einsum dispatch and all experts run densely on all
tokens; plus a training step with a fraction of the experts frozen against none frozen.

Needs torch alone (it also runs on GPU boxes with nothing else installed):
    python -m lifelong_moe.bench dispatch --device cpu --threads 2 --tokens 8192 --experts 16 64

`loop` times the runner's training (Lightning) against a bare PyTorch loop on the same run
config, in one process (see lifelong_moe/loop_bench.py):
    lifelong-moe-bench loop method=moe_finetune benchmark=permuted_digits --threads 2 --epochs 3 15

`hf` times fwd+bwd of a tiny OLMoE-shaped model converted to the toolkit's MoELayer against
transformers' own eager and grouped_mm experts on the same tokens (lifelong_moe/measure/hf_bench.py;
needs the [hf] extra); on a GPU at an OLMoE-1B-7B-like layer shape, with the growth step:
    lifelong-moe-bench hf --threads 1 --repeats 7
    lifelong-moe-bench hf --device cuda --dtype bf16 --layers 4 --d-model 2048 --d-hidden 1024 \
        --experts 64 --top-k 8 --heads 16 --vocab 50304 --batch 4 --seq 1024 --grow 8
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import MoELayer, fused
from lifelong_moe.moe.layer import ACTIVATIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What --cases selects; dense-active always runs (every ratio is against it). frozen-step is the
# pair of training steps (all trainable, --frozen-fraction frozen), for each dispatch that runs.
CASE_KINDS = (
    "dense-active",
    "moe-grouped",
    "moe-fused",
    "moe-loop",
    "frozen-step",
    "gshard-einsum",
    "all-experts-dense",
)
EINSUM_CAPACITY_FACTOR = 1.25


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- baselines


class DenseFFN(torch.nn.Module):
    """The dense twin: one bias-free MLP with hidden k*h, i.e. the active parameters per token."""

    def __init__(self, d: int, h: int, activation: str) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(d, h) / math.sqrt(d))
        self.w2 = torch.nn.Parameter(torch.randn(h, d) / math.sqrt(h))
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.w1) @ self.w2


def _route(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    routing = layer.router(x)
    return routing.expert_ids, routing.gates


class GShardEinsum(torch.nn.Module):
    """GShard-style dispatch: one-hot [T, E, C] dispatch/combine tensors and einsums.

    Capacity C = ceil(1.25 * T * k / E); slot 0 of every token has priority over slot 1, as in
    GShard; overflow is dropped. Shares the router and expert weights of `layer`.
    """

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        n_tokens, n_experts, top_k = x.shape[0], layer.n_experts, layer.top_k
        capacity = math.ceil(EINSUM_CAPACITY_FACTOR * n_tokens * top_k / n_experts)
        ids, gates = _route(layer, x)
        one_hot = torch.nn.functional.one_hot(ids.t().reshape(-1), n_experts)  # slot-major
        position = (one_hot.cumsum(0) - 1).gather(1, ids.t().reshape(-1, 1)).view(top_k, -1).t()
        keep = position < capacity
        flat_slot = ids * capacity + position.clamp_max(capacity - 1)  # [T, k] into E*C
        combine = x.new_zeros(n_tokens, n_experts * capacity, dtype=torch.float32)
        combine = combine.scatter(1, flat_slot, gates * keep)
        combine = combine.view(n_tokens, n_experts, capacity).to(x.dtype)
        dispatch = (combine != 0).to(x.dtype)
        w1, w2 = layer.experts.w1, layer.experts.w2
        expert_in = torch.einsum("tec,td->ecd", dispatch, x)
        hidden = ACTIVATIONS[layer.activation](torch.einsum("ecd,edh->ech", expert_in, w1))
        expert_out = torch.einsum("ech,ehd->ecd", hidden, w2)
        return torch.einsum("tec,ecd->td", combine, expert_out)


class AllExpertsDense(torch.nn.Module):
    """Every expert on every token, then the top-k gates select: the no-sparsity upper bound."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        ids, gates = _route(layer, x)
        dense_gates = torch.zeros(x.shape[0], layer.n_experts, device=x.device)
        dense_gates = dense_gates.scatter(1, ids, gates).to(x.dtype)
        w1, w2 = layer.experts.w1, layer.experts.w2
        hidden = ACTIVATIONS[layer.activation](torch.einsum("td,edh->eth", x, w1))
        return torch.einsum("te,etd->td", dense_gates, torch.einsum("eth,ehd->etd", hidden, w2))


def split_banks(layer: MoELayer, n_frozen: int) -> MoELayer:
    """A copy of a no-frozen layer whose first n_frozen experts and gate rows are frozen."""
    out = MoELayer.from_config({**layer.get_config(), "n_frozen": n_frozen})
    sd = layer.state_dict()
    out.load_state_dict(
        {
            "router.weight_frozen": sd["router.weight"][:n_frozen],
            "router.weight": sd["router.weight"][n_frozen:],
            "experts.w1_frozen": sd["experts.w1"][:n_frozen],
            "experts.w1": sd["experts.w1"][n_frozen:],
            "experts.w2_frozen": sd["experts.w2"][:n_frozen],
            "experts.w2": sd["experts.w2"][n_frozen:],
            "expert_usage": sd["expert_usage"],
        }
    )
    return out


# ----------------------------------------------------------------------------- timing


class Timer:
    """Milliseconds of one call: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@dataclass
class Case:
    name: str
    kind: str  # one of CASE_KINDS
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.nn.Parameter]
    cost: float  # estimated fwd+bwd time relative to dense-active (for the skip rule)
    gib: float  # estimated peak memory of one fwd+bwd
    heavy: bool = False  # a slow baseline, timed in its own block after the others
    train_step: bool = False  # time fwd+bwd+AdamW step instead of fwd and fwd+bwd
    skipped: str | None = None
    fwd_ms: list[float] = field(default_factory=list)
    fwdbwd_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None  # CUDA: peak memory of one fwd+bwd above what was allocated


def _moe_forward(layer: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        y, aux = layer(x)
        return y + 0.0 * aux.balance_loss.to(y.dtype)  # the aux loss is part of every MoE step

    return run


def _fwd(case: Case, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            case.forward(x)

    return run


def _fwd_bwd(case: Case, x: torch.Tensor, grad: torch.Tensor, opt) -> Callable[[], None]:
    def run() -> None:
        y = case.forward(x.detach().requires_grad_(True))
        y.backward(grad)
        if opt is not None:
            opt.step()
        for p in case.params:
            p.grad = None

    return run


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_cases(args: argparse.Namespace, n_experts: int, n_tokens: int, device, dtype) -> list:
    """All cases of one (E, T). The train-step cases own copies of the layer, so their AdamW
    updates never change the routing the forward-only cases see."""
    d, h, k = args.d_model, args.d_hidden, args.top_k
    nbytes = torch.finfo(dtype).bits // 8
    layer = MoELayer(d, h, n_experts, k, activation=args.activation).to(device, dtype)
    loop = MoELayer.from_config({**layer.get_config(), "dispatch": "loop"}).to(device, dtype)
    loop.load_state_dict(layer.state_dict())
    n_frozen = int(n_experts * args.frozen_fraction)  # floor: at least one stays trainable
    step_none = split_banks(layer, 0).to(device, dtype)
    step_frozen = split_banks(layer, n_frozen).to(device, dtype)
    steps = {"": (step_none, step_frozen)}
    dense = DenseFFN(d, k * h, args.activation).to(device, dtype)
    fusable = fused.runs_on(device) and not (d % fused.ALIGN or h % fused.ALIGN)
    fused_layer = None
    if fusable:
        fused_layer = MoELayer.from_config({**layer.get_config(), "dispatch": "fused"})
        fused_layer = fused_layer.to(device, dtype)
        fused_layer.load_state_dict(layer.state_dict())
        steps["fused-"] = tuple(  # the same two steps through the fused kernels
            MoELayer.from_config({**step.get_config(), "dispatch": "fused"}).to(device, dtype)
            for step in steps[""]
        )
        for step, twin in zip(steps[""], steps["fused-"], strict=True):
            twin.load_state_dict(step.state_dict())
    forwards = {
        "dense": dense,
        "grouped": _moe_forward(layer),
        **({"fused": _moe_forward(fused_layer)} if fused_layer is not None else {}),
    }
    for prefix, (none, frozen) in steps.items():
        forwards[f"{prefix}none"] = _moe_forward(none)
        forwards[f"{prefix}frozen"] = _moe_forward(frozen)
    if args.compile:  # fullgraph: a graph break inside the layer is an error, not a slowdown
        forwards = {
            key: torch.compile(fn, fullgraph=True, backend=args.compile_backend)
            for key, fn in forwards.items()
        }
    capacity = math.ceil(EINSUM_CAPACITY_FACTOR * n_tokens * k / n_experts)
    onehot = n_tokens * n_experts * capacity
    # one-hot einsums: ~5 T*E*C*d MACs over fwd+bwd vs 6 T*d*k*h for dense; measured on CPU
    # they run less efficiently, about 1.5 * E*C / (k*h) times dense
    einsum_cost = 1.0 + 1.5 * onehot * d / (n_tokens * d * k * h)
    mem = 8 * n_tokens * k * h * nbytes / 2**30
    fused_case = []
    if fused_layer is not None:
        fused_case = [
            Case("moe-fused", "moe-fused", forwards["fused"], _trainable(fused_layer), 1.2, mem)
        ]
    step_cases = []
    for prefix, (none, frozen) in steps.items():
        for name, module, key in (
            (f"{prefix}step-0-frozen", none, "none"),
            (f"{prefix}step-{n_frozen}/{n_experts}-frozen", frozen, "frozen"),
        ):
            step_cases.append(
                Case(
                    name,
                    "frozen-step",
                    forwards[f"{prefix}{key}"],
                    _trainable(module),
                    1.3,
                    mem,
                    train_step=True,
                )  # fmt: skip
            )
    cases = [
        Case("dense-active", "dense-active", forwards["dense"], _trainable(dense), 1.0, mem),
        Case("moe-grouped", "moe-grouped", forwards["grouped"], _trainable(layer), 1.2, mem),
        *fused_case,
        Case(
            "moe-loop",
            "moe-loop",
            _moe_forward(loop),
            _trainable(loop),
            2.0 + n_experts / 16,
            mem,
        ),
        *step_cases,
        Case(
            "gshard-einsum",
            "gshard-einsum",
            GShardEinsum(layer),
            _trainable(layer),
            einsum_cost,
            5 * onehot * 4 / 2**30,
            heavy=True,
        ),
        Case(
            "all-experts-dense",
            "all-experts-dense",
            AllExpertsDense(layer),
            _trainable(layer),
            n_experts / k,
            3 * n_experts * n_tokens * h * nbytes / 2**30,
            heavy=True,
        ),
    ]
    wanted = set(args.cases) | {"dense-active"}
    return [case for case in cases if case.kind in wanted]


def peak_activation_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def tflops(n_tokens: int, d: int, h: int, k: int, ms: float | None, backward: bool) -> float | None:
    """Achieved TFLOP/s of the expert MLPs: 2 GEMMs of 2*d*h FLOPs per active expert and token,
    x3 with the backward (router, gather and combine not counted: the dense-active baseline
    does the same useful work)."""
    if not ms:
        return None
    flops = 4 * n_tokens * d * h * k * (3 if backward else 1)
    return flops / (ms * 1e-3) / 1e12


def _summary(values: list[float]) -> dict:
    if not values:
        return {"median_ms": None, "min_ms": None}
    return {"median_ms": statistics.median(values), "min_ms": min(values)}


def bench_one(args: argparse.Namespace, n_experts: int, n_tokens: int, device, dtype) -> dict:
    tag = f"[E={n_experts} T={n_tokens}]"
    cases = build_cases(args, n_experts, n_tokens, device, dtype)
    x = torch.randn(n_tokens, args.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    timer = Timer(device)
    runs: dict[str, tuple[Callable, Callable | None]] = {}
    for case in cases:
        opt = torch.optim.AdamW(case.params, lr=1e-4) if case.train_step else None
        runs[case.name] = (_fwd_bwd(case, x, grad, opt), None if case.train_step else _fwd(case, x))
    # Warm up dense first: its best time calibrates the skip rule for the slow baselines.
    dense_ms = None
    for case in cases:
        if dense_ms is not None:
            estimate_s = case.cost * dense_ms * (args.warmup + args.repeats) * 1.4 / 1e3
            if estimate_s > args.max_case_seconds:
                case.skipped = f"skipped: estimated {estimate_s:.0f} s > --max-case-seconds"
            elif case.gib > args.max_gib:
                case.skipped = f"skipped: estimated {case.gib:.1f} GiB > --max-gib"
            if case.skipped:
                log(f"{tag} {case.name}: {case.skipped}")
                continue
        log(f"{tag} warm-up {case.name}")
        fwd_bwd, fwd = runs[case.name]
        times = [timer(fwd_bwd) for _ in range(args.warmup)]
        case.peak_mb = peak_activation_mb(fwd_bwd, device)
        if fwd is not None:
            timer(fwd)
        dense_ms = min(times) if dense_ms is None else dense_ms
    # Repeats interleave the cases, so load from other users hits every case alike. The slow
    # baselines free gigabytes per call, which slows whatever runs next on a CPU host: they
    # get their own block, after the others.
    for block in (False, True):
        active = [c for c in cases if c.heavy == block and not c.skipped]
        for r in range(args.repeats if active else 0):
            for case in active:
                fwd_bwd, fwd = runs[case.name]
                if fwd is not None:
                    case.fwd_ms.append(timer(fwd))
                case.fwdbwd_ms.append(timer(fwd_bwd))
            names = "baselines" if block else "main cases"
            log(f"{tag} {names}: repeat {r + 1}/{args.repeats} done")
    return {
        "n_experts": n_experts,
        "n_tokens": n_tokens,
        "cases": [
            {
                "name": c.name,
                "kind": c.kind,
                "train_step": c.train_step,
                "skipped": c.skipped,
                "fwd_ms": c.fwd_ms,
                "fwdbwd_ms": c.fwdbwd_ms,
                "fwd": _summary(c.fwd_ms),
                "fwdbwd": _summary(c.fwdbwd_ms),
                "peak_mb": c.peak_mb,
            }
            for c in cases
        ],
    }


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def frozen_step_ratio(result: dict, prefix: str = "") -> float | None:
    """Median fwd+bwd+AdamW time of the frozen step over the all-trainable one (prefix: the
    dispatch, "" for grouped, "fused-"), None where either did not run."""
    med = {c["name"]: c["fwdbwd"]["median_ms"] for c in result["cases"]}
    frozen = [n for n in med if n.startswith(f"{prefix}step-") and n != f"{prefix}step-0-frozen"]
    return _ratio(med[frozen[0]], med.get(f"{prefix}step-0-frozen")) if frozen else None


def markdown(results: list[dict], shapes: dict | None = None) -> str:
    d, h, k = (
        (shapes or {}).get("d_model"),
        (shapes or {}).get("d_hidden"),
        (shapes or {}).get("top_k"),
    )
    lines = [
        "| E | T | impl | fwd ms | fwd / dense | fwd+bwd ms | fwd+bwd / dense | fwd+bwd min ms "
        "| fwd+bwd TFLOP/s | peak MB | peak / dense |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        head = f"| {res['n_experts']} | {res['n_tokens']} |"
        dense = res["cases"][0]
        for c in res["cases"]:
            label = c["name"] + (" (fwd+bwd+AdamW)" if c["train_step"] else "")
            if c["skipped"]:
                lines.append(f"{head} {label} | {c['skipped']} |||||||||")
                continue
            f, fb = c["fwd"]["median_ms"], c["fwdbwd"]["median_ms"]
            rf = f / dense["fwd"]["median_ms"] if f is not None else None
            rfb = fb / dense["fwdbwd"]["median_ms"]
            tf = tflops(res["n_tokens"], d, h, k, fb, True) if d else None
            peak, dense_peak = c.get("peak_mb"), dense.get("peak_mb")
            rpeak = peak / dense_peak if peak is not None and dense_peak else None
            lines.append(
                f"{head} {label} | {_fmt(f)} | {_fmt(rf, '{:.2f}')} | {_fmt(fb)} | "
                f"{_fmt(rfb, '{:.2f}')} | {_fmt(c['fwdbwd']['min_ms'])} | "
                f"{_fmt(tf, '{:.2f}')} | {_fmt(peak, '{:.0f}')} | {_fmt(rpeak, '{:.2f}')} |"
            )
    lines += [
        "",
        "| E | T | grouped fwd+bwd: x faster than loop | x faster than einsum | "
        "frozen step / none frozen | fused frozen step / none frozen | fused fwd+bwd / grouped |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        med = {c["name"]: c["fwdbwd"]["median_ms"] for c in res["cases"]}
        grouped = med.get("moe-grouped")
        loop = _ratio(med.get("moe-loop"), grouped)
        einsum = _ratio(med.get("gshard-einsum"), grouped)
        fused_ratio = _ratio(med.get("moe-fused"), grouped)
        lines.append(
            f"| {res['n_experts']} | {res['n_tokens']} | {_fmt(loop, '{:.2f}')} | "
            f"{_fmt(einsum, '{:.2f}')} | {_fmt(frozen_step_ratio(res, ''), '{:.2f}')} | "
            f"{_fmt(frozen_step_ratio(res, 'fused-'), '{:.2f}')} | {_fmt(fused_ratio, '{:.2f}')} |"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lifelong-moe-bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dispatch", help="MoE layer vs dense-active, loop, einsum, all-dense")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192])
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-hidden", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", default="gelu", choices=sorted(ACTIVATIONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--frozen-fraction", type=float, default=0.875)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile dense, grouped and fused MoE"
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (eager: trace without code generation, for dry runs)",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=CASE_KINDS,
        default=list(CASE_KINDS),
        help="which cases to time (dense-active always)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-case-seconds", type=float, default=300.0, help="skip slower baselines")
    p.add_argument("--max-gib", type=float, default=6.0, help="skip baselines needing more memory")
    p.add_argument("--json", default=None, help="write all raw numbers here")
    q = sub.add_parser("loop", help="runner's training time vs a bare PyTorch loop")
    q.add_argument("overrides", nargs="*", help="lifelong-moe config overrides (key=value)")
    q.add_argument("--epochs", type=int, nargs="+", default=[3], help="trainer.max_epochs")
    q.add_argument("--repeats", type=int, default=5)
    q.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    q.add_argument("--json", default=None, help="write all raw numbers here")
    h = sub.add_parser("hf", help="converted HF MoE vs transformers' eager and grouped_mm experts")
    h.add_argument("--layers", type=int, default=4)
    h.add_argument("--d-model", type=int, default=128)
    h.add_argument("--d-hidden", type=int, default=256)
    h.add_argument("--experts", type=int, default=8)
    h.add_argument("--top-k", type=int, default=2)
    h.add_argument("--vocab", type=int, default=1024)
    h.add_argument("--batch", type=int, default=16)
    h.add_argument("--seq", type=int, default=128)
    h.add_argument("--heads", type=int, default=4)
    h.add_argument("--device", default="cpu", help="cpu or cuda")
    h.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    h.add_argument(
        "--grow", type=int, default=0, help="then Lifelong-MoE growth: this many new experts"
    )
    h.add_argument("--grow-steps", type=int, default=3, help="AdamW steps after the growth")
    h.add_argument("--repeats", type=int, default=7)
    h.add_argument("--warmup", type=int, default=2)
    h.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    h.add_argument("--json", default=None, help="write all raw numbers here")
    args = parser.parse_args(argv)
    if args.command == "hf":
        if args.repeats < 5 or args.warmup < 1:
            parser.error("--repeats must be >= 5 and --warmup >= 1")
        if args.grow < 0 or args.grow_steps < 1:
            parser.error("--grow must be >= 0 and --grow-steps >= 1")
        if args.device.split(":")[0] not in ("cpu", "cuda"):
            parser.error(f"--device {args.device!r}: expected cpu or cuda")
        return args
    if args.command == "loop":
        if args.repeats < 1 or min(args.epochs) < 1:
            parser.error("--repeats and --epochs must be >= 1")
        return args
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    if not 0.0 <= args.frozen_fraction < 1.0:
        parser.error("--frozen-fraction must be in [0, 1)")
    return args


def loop_main(args: argparse.Namespace, argv: list[str]) -> int:
    """Runner vs bare loop for each --epochs value; a markdown table on stdout."""
    from lifelong_moe.run.loop_bench import measure

    rows = []
    try:
        for epochs in args.epochs:
            overrides = [
                *args.overrides,
                f"trainer.max_epochs={epochs}",
                "tracking.log_checkpoints=false",
            ]
            log(f"[loop] {' '.join(overrides)}")
            rows.append(measure(overrides, args.repeats, log=log))
    except ConfigError as err:
        print(f"lifelong-moe-bench: {err}", file=sys.stderr)
        return 2
    device = device_name(torch.device("cpu"))
    print(f"device: {device}, torch {torch.__version__}, median of {args.repeats}\n")
    print(
        "| config | runner s | bare loop s | runner / bare (wall) | "
        "runner / bare (process CPU, median) | (process CPU, min) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        config = " ".join(row["overrides"][:-1])
        print(
            f"| {config} | {row['runner_median_s']:.2f} | {row['bare_median_s']:.2f} | "
            f"{row['ratio']:.2f} | {row['ratio_cpu']:.2f} | {row['ratio_cpu_min']:.2f} |"
        )
    if args.json:
        report = {"device": device, "torch": torch.__version__, "argv": argv, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def hf_main(args: argparse.Namespace, argv: list[str]) -> int:
    """The converted HF MoE vs transformers' experts implementations; a markdown table.
    Exit 1 when the logits check or the growth's exactness fails (the numbers still written)."""
    from lifelong_moe.measure import hf_bench

    shape = hf_bench.HFShape(
        args.layers, args.d_model, args.d_hidden, args.experts, args.top_k, args.vocab,
        args.batch, args.seq, args.heads,
    )  # fmt: skip
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"lifelong-moe-bench: --device {args.device}: no CUDA device", file=sys.stderr)
        return 2
    extra = {"device": device_name(device), "argv": argv}

    def write(report: dict) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report | extra, f, indent=2)

    try:
        report = hf_bench.bench_hf(
            shape, args.repeats, args.warmup, device=args.device, dtype=args.dtype,
            grow=args.grow, grow_steps=args.grow_steps, progress=write,
        )  # fmt: skip
    except ConfigError as err:
        print(f"lifelong-moe-bench: {err}", file=sys.stderr)
        return 2
    report |= extra
    write(report)
    print(
        f"device: {report['device']}, torch {report['torch']}, transformers "
        f"{report['transformers']}, {args.dtype}, {shape}, median of {args.repeats}\n"
    )
    print(hf_bench.markdown(report))
    print(f"\nratio toolkit / {report['best_transformers']}: {report['ratio']:.3f}")
    growth = report.get("growth", {})
    ok = report["check"]["ok"] and all(
        growth.get(k, True) for k in ("masked_ok", "frozen_exact", "new_experts_trained")
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "loop":
        return loop_main(args, sys.argv[1:] if argv is None else list(argv))
    if args.command == "hf":
        return hf_main(args, sys.argv[1:] if argv is None else list(argv))
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results = []
    try:
        for n_experts in args.experts:
            for n_tokens in args.tokens:
                results.append(bench_one(args, n_experts, n_tokens, device, dtype))
    except ConfigError as err:
        print(f"lifelong-moe-bench: {err}", file=sys.stderr)
        return 2
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        "compile_backend": args.compile_backend if args.compile else None,
        "cases": args.cases,
        "shapes": {
            "d_model": args.d_model,
            "d_hidden": args.d_hidden,
            "top_k": args.top_k,
            "activation": args.activation,
            "frozen_fraction": args.frozen_fraction,
            "einsum_capacity_factor": EINSUM_CAPACITY_FACTOR,
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "results": results,
    }
    print(
        f"device: {report['device']}, torch {report['torch']}, {args.dtype}, "
        f"d={args.d_model} h={args.d_hidden} k={args.top_k}, median of {args.repeats}\n"
    )
    print(markdown(results, report["shapes"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
