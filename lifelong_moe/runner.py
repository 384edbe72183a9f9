"""The experience loop: build everything, then per experience fit -> evaluate -> log.

Everything that can be wrong with the user's input is checked while building, before the
MLflow run exists, so a bad command never leaves a run behind.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.connectors import callback_connector as _callback_connector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lifelong_moe import signals
from lifelong_moe.checkpointing import StepCheckpoint, checkpoints, describe, make_loader, remove
from lifelong_moe.config_schema import check_config, instantiate
from lifelong_moe.data.stream import Stream
from lifelong_moe.evaluation import metrics
from lifelong_moe.evaluation.evaluate import Evaluation, evaluate
from lifelong_moe.evaluation.evaluate_lm import evaluate_lm
from lifelong_moe.evaluation.plots import plot_matrix, plot_routing
from lifelong_moe.evaluation.routing import expert_origin, routing_metrics
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.models import count_parameters, moe_layers, save_model
from lifelong_moe.models.checkpoint import model_payload, restore_model
from lifelong_moe.resume import (
    STATE,
    capture_rng,
    check_run,
    find_requeued,
    find_run,
    load_state,
    requeue,
    restore_rng,
    run_config,
    run_tag,
    slurm_job,
)
from lifelong_moe.throughput import throughput_metrics
from lifelong_moe.tracking import names, report
from lifelong_moe.tracking.mlflow_run import (
    RunTracker,
    check_store,
    flatten,
    git_commit,
    library_versions,
    tracker_for_rank,
)

# Lightning's per-fit banners (GPU available, tips) would repeat at every experience.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Known and harmless, silenced by message only: Lightning's pytree helper still uses the LeafSpec
# class that torch 2.14 deprecates; nothing we or the user can change.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)
# MLflow's notes on creating a fresh sqlite store, and its download progress bars (resume reads
# the state back), are not results either.
logging.getLogger("mlflow.store.db.utils").addFilter(
    lambda record: (
        not record.getMessage().startswith(
            ("Creating initial MLflow database tables", "Updating database tables")
        )
    )
)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class Experiment:
    """Everything built from the config, validated, before any training."""

    cfg: DictConfig
    stream: Stream
    model: nn.Module
    method: ContinualMethod


def build(cfg: DictConfig) -> Experiment:
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stream = instantiate(cfg.benchmark, "benchmark")
    model = instantiate(
        cfg.model, "model", input_shape=list(stream.input_shape), n_classes=stream.n_classes
    )
    if cfg.trainer.get("compile", False):
        model.compile()  # in place: parameter names, checkpoints and expand() stay as they are
    method = instantiate(cfg.method, "method", model=model)
    method.set_lr_schedule(LRSchedule.from_trainer(cfg.trainer))
    method.setup_stream(stream)
    check_store(cfg.tracking.uri)
    # A method may wrap the backbone (SEED's expert ensemble): evaluate what it trains.
    return Experiment(cfg, stream, method.model, method)


@dataclass
class History:
    """Everything the loop accumulates; saved after each experience so a run can resume."""

    R: list[list[float]] = field(default_factory=list)
    R_task: list[list[float]] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    b_task: list[float] = field(default_factory=list)
    expert_counts: list[int] = field(default_factory=list)
    routing: list = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)
    # language modelling: L[i][j] = validation loss (nats per byte) on domain j after i
    L: list[list[float]] = field(default_factory=list)
    b_loss: list[float] = field(default_factory=list)


def evaluate_after(
    evaluator: Any, exp: Experiment, cfg: DictConfig, device: torch.device
) -> Evaluation:
    model = exp.model.to(device)
    if evaluator is evaluate:
        mask = exp.method.expert_mask
        return evaluate(model, exp.stream, cfg.trainer.eval_batch_size, device, expert_mask=mask)
    return evaluator(model, exp.stream, cfg.trainer.eval_batch_size, device)


def is_language(stream: Stream) -> bool:
    return stream.scenario == "language_modeling"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


PROGRESS_REFRESH_STEPS = 10


@functools.cache
def _callback_factories(group: str) -> tuple:
    return tuple(entry_points(group=group))


def _external_callbacks(group: str) -> list:
    """Lightning's external-callback discovery with the entry-point scan done once per process.

    Every Trainer scans all installed distributions' entry points (~12 ms of CPU, measured in
    results/loop_cpu.md): a sixth of a 3-epoch experience of split digits. Factories are still
    called per Trainer, so no callback instance is shared between experiences.
    """
    callbacks: list = []
    for factory in _callback_factories(group):
        made = factory.load()()
        callbacks.extend(made if isinstance(made, list) else [made])
    return callbacks


if hasattr(_callback_connector, "_load_external_callbacks"):
    _callback_connector._load_external_callbacks = _external_callbacks


def make_trainer(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """A fresh Trainer for one experience.

    On one machine ``ddp`` becomes ``ddp_fork`` (CPU) or ``ddp_spawn`` (GPU, where CUDA forbids
    fork): plain ``ddp`` re-runs the whole command for every rank at each ``fit``, which cannot
    follow a loop that builds a Trainer per experience. Both train in worker processes and hand
    rank 0's weights back to this process, which alone evaluates and logs. On several nodes every
    process is started by the cluster (SLURM, torchrun), runs the whole loop with plain ``ddp``,
    and only global rank 0 writes to MLflow (see ``tracker_for_rank``).
    """
    t = cfg.trainer
    strategy, plugins = t.strategy, None
    several = t.devices == "auto" or t.devices != 1
    if t.num_nodes == 1 and (strategy == "ddp" or (strategy == "auto" and several)):
        strategy = "ddp_fork" if t.accelerator == "cpu" else "ddp_spawn"
        # Inside a SLURM allocation Lightning would expect SLURM to have started the ranks.
        plugins = [LightningEnvironment()]
    # The bar redraws at every step by default: a tenth of a small CPU step (results/loop_cpu.md).
    bar = [TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS)] if t.progress_bar else []
    return L.Trainer(
        plugins=plugins,
        callbacks=[*bar, *(callbacks or [])],
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        logger=False,
        enable_checkpointing=False,  # ours: checkpointing.StepCheckpoint
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def row_metrics(i: int, family: str, R: list[list[float]]) -> dict[str, float]:
    """Row i of an accuracy matrix and what follows from it (family ``acc`` or ``acc_til``)."""
    Ri = np.array(R)
    out = {names.exp_metric(family, j): v for j, v in enumerate(R[i])}
    out[names.seen(family)] = metrics.average_accuracy(Ri, i)
    out[names.forgetting(family)] = metrics.forgetting(Ri, i)
    out[names.bwt(family)] = metrics.bwt(Ri, i)
    return out


def checkpoint_folder(cfg: DictConfig, run_id: str) -> Path:
    """``<trainer.checkpoint_dir>/<run_id>``, absolute (also recorded as the run's tag)."""
    return (Path(cfg.trainer.get("checkpoint_dir", "checkpoints")) / run_id).resolve()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment end to end; returns the summary that is also logged as summary.json."""
    resume_id = None
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    check_store(uri)
    signals.point("startup")
    if cfg.get("resume"):
        resume_id = find_run(uri, experiment, str(cfg.resume))
    elif slurm_job():
        # A requeued SLURM job runs the same command again: continue its own run.
        resume_id = find_requeued(uri, experiment, slurm_job())
    if resume_id:
        check_run(uri, experiment, resume_id, git_commit(), bool(cfg.get("resume_force")))
        stored = run_config(uri, resume_id)
        with open_dict(stored):
            stored.tracking.uri, stored.resume = uri, resume_id
            stored.resume_force = bool(cfg.get("resume_force"))
            stored.resume_trust = bool(cfg.get("resume_trust"))
        cfg = stored
    exp = build(cfg)
    tracker = tracker_for_rank(uri, experiment)
    state, ckpt = None, None
    if resume_id:
        # Everything is read and checked before the run is touched: a refusal changes nothing.
        state = load_state(uri, resume_id)
        done = state["next"] if state else 0
        exp.method.trust_pickles = is_local(uri) or bool(cfg.get("resume_trust"))
        folder = Path(
            run_tag(uri, resume_id, "checkpoint_dir") or checkpoint_folder(cfg, resume_id)
        )
        found = checkpoints(folder, done)
        where = f"after {done} of {len(exp.stream)} experiences"
        if found and done < len(exp.stream):
            ckpt = found[-1]
            at = describe(ckpt)
            where = f"at experience {at['experience']}, epoch {at['epoch']}, step {at['step']}"
        print(f"resuming run {resume_id} {where}", flush=True)
        with signals.deferred():
            tracker.reopen(resume_id)
    else:
        with signals.deferred():
            start_run(cfg, exp, tracker)
        folder = checkpoint_folder(cfg, tracker.run_id)
    signals.STATE.run_id = tracker.run_id
    if cfg.tracking.get("system_metrics", True):
        interval = float(cfg.tracking.get("system_metrics_interval_s", 2.0))
        tracker.start_system_metrics(interval, resume=bool(resume_id))
    try:
        summary = _loop(cfg, exp, tracker, state, ckpt, folder)
    except (signals.Interrupted, SIGTERMException) as error:
        # SIGTERMException: Lightning's own SIGTERM stop at an epoch end, had ours not come first.
        stop = (
            error if isinstance(error, signals.Interrupted) else signals.Interrupted(signal.SIGTERM)
        )
        # A second signal from here on exits at once (signals._handler).
        tracker.stop_system_metrics()
        tracker.finish("KILLED")
        print(
            f"interrupted: run {tracker.run_id} marked KILLED at {signals.where()}; "
            f"continue with resume={tracker.run_id}",
            file=sys.stderr,
            flush=True,
        )
        if stop.requeue:
            requeue(tracker.run_id)
        raise stop from None
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1)
        tracker.stop_system_metrics()
        tracker.finish("KILLED")
        print(
            f"interrupted: run {tracker.run_id} marked KILLED; continue it with resume={tracker.run_id}",
            file=sys.stderr,
        )
        raise
    except BaseException:
        tracker.stop_system_metrics()
        tracker.finish("FAILED")
        raise
    tracker.stop_system_metrics()
    tracker.finish("FINISHED")
    # After FINISHED, not before: a crash in between leaves a finished run with a spare state,
    # never an unfinished run without one.
    if not cfg.tracking.get("keep_resume_state", False):
        try:
            tracker.delete_artifacts(names.RESUME_FOLDER)
        except Exception as error:  # a store that cannot delete keeps it; the run is done
            first = (str(error).splitlines() or [type(error).__name__])[0][:200]
            print(f"note: could not delete {names.RESUME_FOLDER}/ of the run: {first}", flush=True)
    if tracker.writes:
        remove(folder)
    signals.STATE.deferred = 0
    if tracker.writes:
        print(f"\nSee this run: {tracker.ui_command()}   (run id {tracker.run_id})", flush=True)
    return summary


def start_run(cfg: DictConfig, exp: Experiment, tracker: RunTracker) -> None:
    stream, model = exp.stream, exp.model
    tags = {
        "method": cfg.method.get("name", "method"),
        "benchmark": cfg.benchmark.get("name", stream.name),
        "model": cfg.model.get("name", type(model).__name__),
        "seed": str(cfg.seed),
        "kind": "experiment",
        "matrix": "perplexity" if is_language(stream) else "accuracy",
        "scenario": stream.scenario,
        "git_commit": git_commit(),
        **library_versions(),
    }
    if slurm_job():
        tags["slurm_job"] = slurm_job()
    if cfg.tracking.get("sweep_id"):
        tags["sweep_id"] = str(cfg.tracking.sweep_id)
        # Nests the sweep's runs under one parent run in the MLflow UI.
        parent = tracker.sweep_parent(tags["sweep_id"])
        if parent:
            tags["mlflow.parentRunId"] = parent
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_name = cfg.tracking.run_name or f"{tags['method']}-{tags['benchmark']}-s{cfg.seed}"
    run_id = tracker.start(run_name, tags, flatten(resolved))
    tracker.set_tags({"checkpoint_dir": str(checkpoint_folder(cfg, run_id))})
    tracker.describe(report.running_description(tags, len(stream)))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), names.CONFIG)
    tracker.log_inputs(report.dataset_inputs(resolved["benchmark"], stream))
    print(f"run {run_id} ({run_name}): {len(stream)} experiences of {stream.name}", flush=True)


def is_local(uri: str) -> bool:
    """A store on this machine (sqlite or file): what a resume may trust with pickles."""
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def restore(exp: Experiment, state: dict[str, Any], tracker: RunTracker) -> History:
    """Bring model, method, RNG and history to the end of the last completed experience."""
    restore_model(exp.model, state["model"])
    exp.method.load_method_state(state["method"])
    exp.method.seen = exp.stream.experiences[: state["next"]]
    h = History(**state["history"])
    # A state saved before the metric rename (issue 13) continues under today's names.
    h.logged = [names.modernize(row) for row in h.logged]
    tracker.log_missing_rows(h.logged)
    restore_rng(state["rng"])
    return h


def save_state(exp: Experiment, h: History, tracker: RunTracker, next_index: int) -> None:
    state = {
        "next": next_index,
        "history": asdict(h),
        "model": model_payload(exp.model),
        "method": exp.method.method_state(),
        "rng": capture_rng(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(STATE).name
        torch.save(state, path)
        tracker.log_file(path, str(Path(STATE).parent))


def _loop(
    cfg: DictConfig,
    exp: Experiment,
    tracker: RunTracker,
    state: dict[str, Any] | None,
    ckpt: Path | None = None,
    folder: Path | None = None,
) -> dict[str, Any]:
    stream, model, method = exp.stream, exp.model, exp.method
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    language = is_language(stream)
    evaluator = evaluate_lm if language else evaluate
    if state:
        h = restore(exp, state, tracker)
    else:
        h = History()
        base = evaluator(model.to(device), stream, cfg.trainer.eval_batch_size, device)
        h.b = base.accuracy
        h.b_task = base.accuracy_task or []
        h.b_loss = getattr(base, "loss", [])
    T = len(stream)
    folder = folder or checkpoint_folder(cfg, tracker.run_id)
    for i in range(len(h.R), T):
        experience = stream.experiences[i]
        signals.STATE.experience, signals.STATE.step = i, None
        signals.point("before_experience", i)
        method.before_experience(experience)
        data = method.train_dataset(experience)
        loader = make_loader(
            data, cfg.trainer.batch_size, cfg.trainer.num_workers, seed=cfg.seed * 1_000 + i
        )
        saver = StepCheckpoint(
            folder,
            i,
            every_n_steps=cfg.trainer.get("checkpoint_every_n_steps", 0),
            keep=cfg.trainer.get("checkpoint_keep", 2),
            sampler=loader.sampler,
        )
        start = time.perf_counter()
        trainer = make_trainer(cfg, callbacks=[saver])
        if method.lightning_loop:
            with signals.training():  # a signal stops at the next step boundary
                method.fit_experience(experience, loader, trainer, ckpt_path=ckpt)
        else:
            method.fit_experience(experience, loader, trainer)
        ckpt = None  # only the experience the run was in continues from a checkpoint
        saver.apply_pending_rng()
        h.train_seconds.append(time.perf_counter() - start)
        signals.point("evaluate", i)
        start = time.perf_counter()
        ev: Evaluation = evaluate_after(evaluator, exp, cfg, device)
        eval_seconds = time.perf_counter() - start
        signals.point("after_experience", i)
        method.after_experience(experience, data)

        h.R.append(ev.accuracy)
        h.routing.append(ev.routing)
        layers = moe_layers(model)
        h.expert_counts.append(next(iter(layers.values())).n_experts if layers else 0)
        logged = row_metrics(i, names.ACC, h.R)
        if h.routing[-1]:
            logged |= routing_metrics(h.routing, expert_origin(h.expert_counts), i)
        if ev.accuracy_task is not None:
            h.R_task.append(ev.accuracy_task)
            logged |= row_metrics(i, names.ACC_TIL, h.R_task)
        if language:
            h.L.append(ev.loss)
            logged |= {names.exp_metric(names.LOSS, j): v for j, v in enumerate(ev.loss)}
            logged |= {names.exp_metric(names.PPL, j): v for j, v in enumerate(ev.perplexity)}
            logged[names.PPL_SEEN] = metrics.average_perplexity(np.array(h.L), i)
        params = count_parameters(model)
        logged |= {names.cost_params(k): v for k, v in params.items()}
        logged[names.COST_TRAIN_S] = h.train_seconds[-1]
        logged[names.COST_CHECKPOINT_S] = saver.seconds  # part of cost/train_s
        logged[names.COST_CHECKPOINT_MB] = saver.bytes / 2**20
        logged[names.COST_EVAL_S] = eval_seconds
        logged |= throughput_metrics(
            model, data, cfg.trainer.max_epochs, h.train_seconds[-1], device,
            cfg.trainer.precision, trainer.world_size,
        )  # fmt: skip
        logged[names.COST_PEAK_MB] = peak_memory_mb(device)
        # train/loss and its terms (train/ce, train/kd, ...): means over the last epoch.
        prefix = names.train_term("")
        logged |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        h.logged.append(logged)
        # State first, metrics second: a crash in between re-logs the row on resume,
        # the other order could log a step twice.
        with signals.deferred():
            save_state(exp, h, tracker, i + 1)
            signals.point("log_metrics", i)
            tracker.log_metrics(logged, step=i)
        print(
            f"[{i + 1}/{T}] {method.__class__.__name__} on experience {i}: "
            f"acc {ev.accuracy[i]:.3f}  seen {logged[names.ACC_SEEN]:.3f}  "
            f"forgetting {logged[names.ACC_FORGETTING]:.3f}  bwt {logged[names.ACC_BWT]:+.3f}  "
            + (f"ppl seen {logged[names.PPL_SEEN]:.2f}  " if language else "")
            + f"params {params['total']:,} ({params['active']:,} active)  "
            f"train {h.train_seconds[-1]:.1f}s  eval {eval_seconds:.2f}s",
            flush=True,
        )
        if cfg.tracking.log_checkpoints:
            with signals.deferred(), tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"model_exp_{i}.pt"
                save_model(
                    model,
                    OmegaConf.to_container(cfg.model, resolve=True),
                    path,
                    input_shape=list(stream.input_shape),
                    n_classes=stream.n_classes,
                )
                tracker.log_file(path, names.CHECKPOINTS)
    # Held until run() marks the run FINISHED: a signal now lets the run complete (exit 0).
    signals.STATE.deferred += 1
    return _finish(cfg, stream, h, tracker)


def _finish(cfg: DictConfig, stream: Stream, h: History, tracker: RunTracker) -> dict[str, Any]:
    R, b = np.array(h.R), np.array(h.b)
    final = metrics.summarize(R, b)
    final[names.COST_TRAIN_TOTAL_S] = float(sum(h.train_seconds))
    if h.R_task:
        til = metrics.summarize(np.array(h.R_task), np.array(h.b_task))
        prefix = names.ACC + "/"
        final |= {f"{names.ACC_TIL}/{k.removeprefix(prefix)}": v for k, v in til.items()}
    if h.L:
        final |= metrics.summarize_loss(np.array(h.L), np.array(h.b_loss))
    # forgetting and bwt of the last step are already logged with the row: log each step once.
    tracker.log_metrics({k: v for k, v in final.items() if k not in h.logged[-1]}, len(stream) - 1)
    experiences = [
        {"index": e.index, "classes": e.classes, "task": e.task_id} for e in stream.experiences
    ]
    matrix = {"R": h.R, "b": h.b, "experiences": experiences}
    if h.R_task:
        matrix |= {"R_task": h.R_task, "b_task": h.b_task}
    tracker.log_json(matrix, names.ACCURACY_MATRIX)
    til = {"accuracy_til": h.R_task} if h.R_task else {}
    tracker.log_table(report.matrix_table("accuracy", h.R, **til), names.ACCURACY_TABLE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "accuracy_matrix.png"
        plot_matrix(R, path, title=f"{cfg.method.name} on {stream.name}: accuracy R[i][j]")
        tracker.log_file(path)
        if h.L:
            perplexity = np.exp(np.array(h.L))
            tracker.log_json(
                {
                    "L": h.L,
                    "perplexity": perplexity.tolist(),
                    "b_loss": h.b_loss,
                    "domains": experiences,
                },
                names.PERPLEXITY_MATRIX,
            )
            table = report.matrix_table("perplexity", perplexity.tolist(), loss=h.L)
            tracker.log_table(table, names.PERPLEXITY_TABLE)
            path = Path(tmp) / "perplexity_matrix.png"
            plot_matrix(perplexity, path, title=f"{cfg.method.name} on {stream.name}: perplexity")
            tracker.log_file(path)
        if h.routing and h.routing[-1]:
            routing = routing_record(h)
            tracker.log_json(routing, names.ROUTING_JSON)
            tracker.log_table(report.routing_table(routing), names.ROUTING_TABLE)
            path = Path(tmp) / "routing.png"
            plot_routing(routing, path)
            tracker.log_file(path)
    summary = {
        "run_id": tracker.run_id,
        "method": cfg.method.name,
        "benchmark": cfg.benchmark.name,
        "seed": cfg.seed,
        "metrics": final,
        "R": h.R,
        "b": h.b,
    }
    tracker.log_json(report.rounded(summary), names.SUMMARY)
    run = {
        "method": cfg.method.name,
        "benchmark": cfg.benchmark.name,
        "model": cfg.model.get("name", "model"),
        "seed": str(cfg.seed),
    }
    perplexity_rows = np.exp(np.array(h.L)).tolist() if h.L else None
    tracker.describe(report.description(run, h.R, final, perplexity_rows))
    print_report(summary)
    return summary


def routing_record(h: History) -> dict[str, Any]:
    """Final routing shares plus which experience created each expert (for grouping in the plot)."""
    origin: list[int] = []
    for i, count in enumerate(h.expert_counts):
        origin += [i] * (count - len(origin))
    layers = [f"layer_{k}" for k in range(len(h.routing[-1]))]
    return {
        "layers": dict(zip(layers, h.routing[-1], strict=True)),
        "expert_origin": origin,
        "per_experience": [dict(zip(layers, r, strict=True)) for r in h.routing],
    }


def print_report(summary: dict[str, Any]) -> None:
    R = summary["R"]
    T = len(R)
    print("\nAccuracy matrix R[i][j] (row: after training on i, column: test experience j)")
    print("      " + "".join(f"  exp{j:<3}" for j in range(T)))
    for i, row in enumerate(R):
        print(f"after {i}" + "".join(f"  {v:6.3f}" for v in row))
    print("b     " + "".join(f"  {v:6.3f}" for v in summary["b"]))
    print("\n| metric | value |\n|---|---|")
    for key, value in summary["metrics"].items():
        print(f"| {key} | {value:.4f} |")
