"""``lifelong-moe-bench hf``: the converted HF MoE against transformers' own experts, fwd+bwd.

One tiny OLMoE-shaped model (random weights, built from its config class) is saved once and
loaded three ways: transformers with ``experts_implementation="eager"`` (a loop over experts),
with ``"grouped_mm"`` (sorted tokens and ``torch.nn.functional.grouped_mm``), and converted to
the toolkit's MoELayer (``HFMoECausalLM``). Each repeat times one forward + cross-entropy +
backward of each, interleaved (so a load change on a shared machine hits all three alike), on
the same tokens; the table reports medians and ours / the faster of transformers' two.
``batched_mm`` (transformers' default) is left out: it runs every expert on every token.
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

from lifelong_moe.models.hf_moe import HFMoECausalLM, require_transformers

IMPLEMENTATIONS = ("eager", "grouped_mm")


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


def _config(tf: Any, shape: HFShape) -> Any:
    return tf.AutoConfig.for_model(
        "olmoe",
        hidden_size=shape.d_model,
        intermediate_size=shape.d_hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.seq,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def _step(forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, x, y):
    def run() -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = forward(x)
        F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
        return (time.perf_counter() - t0) * 1e3

    return run


def bench_hf(shape: HFShape, repeats: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Median fwd+bwd milliseconds per implementation and the ratio ours / best transformers."""
    tf = require_transformers()
    torch.manual_seed(seed)
    x = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    y = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    with tempfile.TemporaryDirectory() as tmp:
        tf.AutoModelForCausalLM.from_config(_config(tf, shape)).save_pretrained(tmp)
        models = {
            impl: tf.AutoModelForCausalLM.from_pretrained(tmp, experts_implementation=impl)
            for impl in IMPLEMENTATIONS
        }
        ours = HFMoECausalLM([shape.seq], shape.vocab, pretrained=tmp)
    steps = {
        impl: _step(lambda t, m=m: m(input_ids=t, use_cache=False).logits, m, x, y)
        for impl, m in models.items()
    }
    steps["toolkit MoELayer"] = _step(lambda t: ours(t)[0], ours, x, y)
    for m in (*models.values(), ours):
        m.train()
    with torch.no_grad():  # the three compute the same function
        want = models["eager"](input_ids=x, use_cache=False).logits
        torch.testing.assert_close(ours(x)[0], want, rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            ms = step()
            if i >= warmup:
                times[name].append(ms)
    medians = {name: statistics.median(v) for name, v in times.items()}
    best = min(IMPLEMENTATIONS, key=lambda impl: medians[impl])
    return {
        "shape": shape.__dict__,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "ms": times,
        "median_ms": medians,
        "best_transformers": best,
        "ratio": medians["toolkit MoELayer"] / medians[best],
    }


def markdown(report: dict[str, Any]) -> str:
    """The table: median fwd+bwd ms of each implementation, relative to the faster reference."""
    best = report["median_ms"][report["best_transformers"]]
    lines = ["| implementation | fwd+bwd ms (median) | min | max | / best transformers |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, values in report["ms"].items():
        median = report["median_ms"][name]
        lines.append(
            f"| {name} | {median:.1f} | {min(values):.1f} | {max(values):.1f} | "
            f"{median / best:.3f} |"
        )
    return "\n".join(lines)
