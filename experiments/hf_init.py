"""Which initialisation of grown experts and gate rows: measured on the tiny OLMoE-shaped model.

Per seed: a tiny OLMoE (model=olmoe's preset: 2 layers, d 64, 8 SwiGLU experts top-2) is trained
on text domain ``english`` (byte tokens), then for every (expand_init, gate_init) pair a copy is
grown by method=lifelong_moe's own ``before_experience`` (2 new experts per layer, old ones
frozen) and trained on ``python`` with the method's loss (CE + balance + KD to the previous
phase, lambda_kd 1, T 2). Reported: validation perplexity of both domains after growth (the
validation documents of text_domains, split=validation; test is not read), mean and spread
over seeds. The choice is the pair with the lowest mean log-perplexity over both domains.
Writes results/hf_init.md and .json.

    OMP_NUM_THREADS=1 python experiments/hf_init.py --seeds 0 1 2 --pretrain-steps 200 --grow-steps 60
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lifelong_moe.data.text import text_domains
from lifelong_moe.methods.lifelong_moe import LifelongMoE
from lifelong_moe.models.hf_moe import HFMoECausalLM
from lifelong_moe.moe import MoESettings
from lifelong_moe.moe.experts import EXPERT_INITS
from lifelong_moe.moe.router import GATE_INITS

REPO = Path(__file__).resolve().parent.parent
COMMAND = "OMP_NUM_THREADS=1 python experiments/hf_init.py --seeds 0 1 2 --pretrain-steps 200 --grow-steps 60"
CONFIG = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8,
          "num_experts_per_tok": 2, "norm_topk_prob": False}  # fmt: skip
GATES = tuple(g for g in GATE_INITS)
EXPANDS = tuple(e for e in EXPERT_INITS)
OLD_DEFAULT = "random/mean"


def train(model, loss_fn, data, steps: int, seed: int, lr: float = 3e-3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loader = DataLoader(
        data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    batches = itertools.islice(itertools.cycle(loader), steps)
    model.train()
    for x, y, _ in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        opt.step()


@torch.no_grad()
def perplexity(model, data) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y, _ in DataLoader(data, batch_size=128):
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def run_seed(seed: int, args) -> dict:
    stream = text_domains(["english", "python"], max_bytes_per_domain=args.bytes,
                          context_length=64, seed=seed, split="validation")  # fmt: skip
    first, second = stream.experiences
    torch.manual_seed(seed)
    base = HFMoECausalLM([64], 256, family="olmoe", config=CONFIG, moe=MoESettings())
    train(base, lambda x, y: F.cross_entropy(base(x)[0].flatten(0, 1), y.flatten()),
          first.train, args.pretrain_steps, seed)  # fmt: skip
    rows = {}
    for expand, gate in itertools.product(EXPANDS, GATES):
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        method = LifelongMoE(model, experts_per_experience=2, expand_init=expand, gate_init=gate)
        method.before_experience(first)
        method.before_experience(second)  # grows: freeze, new experts, teacher

        def loss(x, y, model=model, method=method):
            logits, aux = model(x)
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            return ce + sum(method.extra_loss(x, y, logits, aux).values())

        train(model, loss, second.train, args.grow_steps, seed)
        rows[f"{expand}/{gate}"] = {
            "english": perplexity(model, first.test),
            "python": perplexity(model, second.test),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bytes", type=int, default=65536)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--grow-steps", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "results" / "hf_init"))
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if args.render:
        out = Path(args.out)
        render(json.loads(out.with_suffix(".json").read_text()), out)
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    per_seed = {seed: run_seed(seed, args) for seed in args.seeds}
    pairs = list(per_seed[args.seeds[0]])
    table = []
    for pair in pairs:
        logs = [0.5 * (math.log(r[pair]["english"]) + math.log(r[pair]["python"]))
                for r in per_seed.values()]  # fmt: skip
        row = {"pair": pair, "mean_log_ppl": statistics.mean(logs),
               "sd_log_ppl": statistics.stdev(logs) if len(logs) > 1 else 0.0}  # fmt: skip
        for domain in ("english", "python"):
            row[domain] = statistics.mean(r[pair][domain] for r in per_seed.values())
        table.append(row)
    table.sort(key=lambda r: r["mean_log_ppl"])
    seconds = time.perf_counter() - start
    report = {"command": COMMAND, "seeds": args.seeds, "bytes": args.bytes,
              "pretrain_steps": args.pretrain_steps, "grow_steps": args.grow_steps,
              "config": CONFIG, "per_seed": per_seed, "table": table, "seconds": seconds}  # fmt: skip
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    render(report, out)


def _log_ppl(row: dict) -> float:
    return 0.5 * (math.log(row["english"]) + math.log(row["python"]))


def render(report: dict, out: Path) -> None:
    """results/hf_init.md from the JSON: means, and per-seed differences to the old default."""
    per_seed, table = report["per_seed"], report["table"]
    lines = [
        "# Initialisation of grown experts and gate rows (tiny OLMoE, CPU)", "",
        __doc__.split("\n\n")[1].replace("\n", " "), "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s on the shared 2-core box). "
        f"Seeds {report['seeds']}; {report['bytes']} bytes per domain; "
        f"{report['pretrain_steps']} steps on english, then {report['grow_steps']} steps on "
        "python after growth (batch 32 x 64 bytes, AdamW lr 3e-3). The last column is the "
        f"paired difference in mean log-perplexity to `{OLD_DEFAULT}` (the former default), "
        "one number per seed.", "",
        "| expand_init/gate_init | mean log-ppl (both) | english ppl | python ppl | "
        f"vs {OLD_DEFAULT}, per seed |",
        "|---|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in table:
        diffs = [_log_ppl(s[r["pair"]]) - _log_ppl(s[OLD_DEFAULT]) for s in per_seed.values()]
        lines.append(f"| {r['pair']} | {r['mean_log_ppl']:.4f} | {r['english']:.3f} | "
                     f"{r['python']:.3f} | {' '.join(f'{d:+.4f}' for d in diffs)} |")  # fmt: skip
    lines += ["", f"Lowest mean: **{table[0]['pair']}**."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
