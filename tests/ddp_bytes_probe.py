"""Run under torchrun: grow a tiny Lifelong-MoE, train one experience with the run's Trainer,
and write the bytes each step handed to collectives (tests/comm_bytes.py).

    torchrun --nproc-per-node 2 tests/ddp_bytes_probe.py OUT.json

Cases: 1 and 3 grown experiences as the run trains them, and 3 with DDP's per-forward buffer
broadcast turned back on (its default), which shows that the counter sees it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L

from lifelong_moe.models.params import count_parameters
from lifelong_moe.run import distributed
from lifelong_moe.run.checkpoints import make_loader
from lifelong_moe.run.loop import build
from lifelong_moe.run.loop_bench import compose
from lifelong_moe.run.trainer import make_trainer
from tests.comm_bytes import CommBytes
from tests.conftest import TINY_RUN


class SyncBuffers(L.Callback):
    """DDP's default: broadcast every buffer from rank 0 before each forward."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.model.forward_sync_buffers = True


def fit_grown(grown: int, sync: bool) -> dict:
    """Grow ``grown`` times, train the next experience; what each step sent, and the model."""
    overrides = [*TINY_RUN, "method=lifelong_moe", "benchmark.n_experiences=5"]
    cfg = compose([*overrides, "tracking.uri=sqlite:///unused.db"])
    exp = build(cfg)
    distributed.init(cfg)
    for experience in exp.stream.experiences[:grown]:
        exp.method.before_experience(experience)  # grows and freezes from experience 1 on
    last = exp.stream.experiences[grown]
    exp.method.before_experience(last)
    data = exp.method.train_dataset(last)
    shard = (distributed.global_rank(), distributed.world_size())
    loader = make_loader(data, cfg.trainer.batch_size, 0, seed=0, shard=shard)
    counter = CommBytes()
    trainer = make_trainer(cfg, callbacks=[counter, *([SyncBuffers()] if sync else [])])
    with counter:
        exp.method.fit_experience(last, loader, trainer)
    buffers = sum(b.numel() * b.element_size() for b in exp.model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in exp.model.parameters() if p.requires_grad)
    return {
        "per_step": counter.per_step,
        "by_kind": counter.by_kind,
        "buffer_bytes": buffers,
        "trainable_bytes": trainable,
        "params": count_parameters(exp.model),
    }


def main(out: Path) -> None:
    cases = {"1": (1, False), "3": (3, False), "3 sync": (3, True)}
    report = {name: fit_grown(grown, sync) for name, (grown, sync) in cases.items()}
    if distributed.global_rank() == 0:
        out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
