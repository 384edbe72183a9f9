"""The experience loop: build everything, then per experience fit -> evaluate -> log.

Everything that can be wrong with the user's input is checked while building, before the
MLflow run exists, so a bad command never leaves a run behind.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from lifelong_moe import names
from lifelong_moe.config.schema import check_config
from lifelong_moe.data.tokenizer import ByteTokenizer
from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation import downstream, rows
from lifelong_moe.evaluation.evaluator import evaluator_for
from lifelong_moe.evaluation.subset import evaluation_view
from lifelong_moe.measure.costs import cost_row
from lifelong_moe.measure.throughput import tokens_per_sample
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.models import hf_export, save_model
from lifelong_moe.models.checkpoint import model_payload, restore_model
from lifelong_moe.moe import MoESettings
from lifelong_moe.run import budget, curves, signals, stop_sync
from lifelong_moe.run.checkpoints import (
    EARLIER_TRAIN_S,
    StepCheckpoint,
    checkpoint_writer,
    checkpoints,
    describe,
    fit_costs,
    make_loader,
    remove,
)
from lifelong_moe.run.console import experience_line, print_report
from lifelong_moe.run.resume import (
    STATE,
    History,
    capture_rng,
    checkpoint_dir,
    load_state,
    requeue,
    restore_rng,
    resume_target,
    slurm_job,
    state,
)
from lifelong_moe.run.stop_sync import StopSync, forwarder
from lifelong_moe.run.trainer import make_trainer
from lifelong_moe.stream import Experience, Stream
from lifelong_moe.targets import instantiate
from lifelong_moe.tracking import report
from lifelong_moe.tracking.mlflow_run import (
    RunTracker,
    flatten,
    git_commit,
    library_versions,
    tracker_for_rank,
)
from lifelong_moe.tracking.results import log_results
from lifelong_moe.tracking.store import check_store, is_local

# Lightning's per-fit banners (GPU available, tips) would repeat at every experience.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Known and harmless, silenced by message only: Lightning's pytree helper still uses the LeafSpec
# class that torch 2.14 deprecates; nothing we or the user can change.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)


@dataclass
class Experiment:
    """Everything built from the config, validated, before any training."""

    cfg: DictConfig
    stream: Stream
    model: nn.Module
    method: ContinualMethod
    tasks: Any = None  # lm-eval's TaskManager when evaluation.lm_eval.tasks names any


def build(cfg: DictConfig) -> Experiment:
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stream = instantiate(cfg.benchmark, "benchmark")
    # The flat MoE keys of the model config travel as one MoESettings (moe/layer.py).
    moe, backbone = MoESettings.split(OmegaConf.to_container(cfg.model, resolve=True))
    model = instantiate(
        backbone, "model", input_shape=list(stream.input_shape), n_classes=stream.n_classes, moe=moe
    )
    if cfg.trainer.get("compile", False):
        model.compile()  # in place: parameter names, checkpoints and expand() stay as they are
    hf_export.check_export(cfg.tracking.get("export", "none"), model)
    method = instantiate(cfg.method, "method", model=model)
    method.after_fit = stop_sync.after_fit
    method.set_lr_schedule(LRSchedule.from_trainer(cfg.trainer))
    method.setup_stream(stream)
    check_store(cfg.tracking.uri)
    tasks = check_downstream(cfg, stream)
    # A method may wrap the backbone (SEED's expert ensemble): evaluate what it trains.
    return Experiment(cfg, stream, method.model, method, tasks)


def check_downstream(cfg: DictConfig, stream: Stream) -> Any:
    """lm-eval's TaskManager for ``evaluation.lm_eval.tasks`` (None without tasks), the names
    checked before any training."""
    lm_eval = cfg.get("evaluation", {}).get("lm_eval", {})
    if not lm_eval.get("tasks"):
        return None
    if stream.scenario != "language_modeling":
        raise ConfigError(
            f"evaluation.lm_eval.tasks={list(lm_eval.tasks)}: expected a language-model stream, "
            f"got benchmark {stream.name} ({stream.scenario})"
        )
    return downstream.check_tasks(list(lm_eval.tasks), lm_eval.get("include_path"))


def run_downstream(exp: Experiment, device: torch.device) -> dict[str, float]:
    """``downstream/<task>/<metric>`` after one experience; training's RNG stays as it was."""
    lm_eval = exp.cfg.evaluation.lm_eval
    start, rng = time.perf_counter(), capture_rng()
    print(f"lm-eval: {', '.join(lm_eval.tasks)} ...", flush=True)
    metrics = downstream.downstream_metrics(
        exp.model.to(device),
        getattr(exp.stream, "tokenizer", None) or ByteTokenizer(),
        exp.stream.input_shape[0],
        device,
        list(lm_eval.tasks),
        exp.tasks,
        limit=lm_eval.get("limit"),
        num_fewshot=lm_eval.get("num_fewshot"),
        batch_size=lm_eval.get("batch_size", 16),
    )
    restore_rng(rng)
    print(f"lm-eval: done in {time.perf_counter() - start:.1f}s", flush=True)
    return metrics


def checkpoint_folder(cfg: DictConfig, run_id: str) -> Path:
    """``<trainer.checkpoint_dir>/<run_id>``, absolute (also recorded as the run's tag)."""
    return (Path(cfg.trainer.get("checkpoint_dir", "checkpoints")) / run_id).resolve()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment end to end; returns the summary that is also logged as summary.json."""
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    check_store(uri)
    signals.point("startup")
    resume_id, cfg = resume_target(cfg, git_commit())
    exp = build(cfg)
    tracker = tracker_for_rank(uri, experiment)
    saved, ckpt = None, None
    if resume_id:
        # Everything is read and checked before the run is touched: a refusal changes nothing.
        saved = load_state(uri, resume_id)
        done = saved["next"] if saved else 0
        exp.method.trust_pickles = is_local(uri) or bool(cfg.get("resume_trust"))
        folder = Path(checkpoint_dir(uri, resume_id) or checkpoint_folder(cfg, resume_id))
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
            start_run(exp, tracker)
        folder = checkpoint_folder(cfg, tracker.run_id)
    signals.STATE.run_id = tracker.run_id
    if cfg.tracking.get("system_metrics", True):
        interval = float(cfg.tracking.get("system_metrics_interval_s", 2.0))
        tracker.start_system_metrics(interval, resume=bool(resume_id))
    try:
        summary = _loop(exp, tracker, saved, ckpt, folder)
    except (signals.Interrupted, SIGTERMException) as error:
        # SIGTERMException: Lightning's own SIGTERM stop at an epoch end, had ours not come first.
        stop = (
            error if isinstance(error, signals.Interrupted) else signals.Interrupted(signal.SIGTERM)
        )
        # A second signal from here on exits at once (signals._handler).
        tracker.stop_system_metrics()
        tracker.finish("KILLED")
        if tracker.writes:  # on several machines, rank 0 speaks for all
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


def run_identity(exp: Experiment) -> dict[str, str]:
    """Method, benchmark, model and seed: the tags that name a run (and head its description)."""
    cfg = exp.cfg
    return {
        names.TAG_METHOD: cfg.method.get("name", "method"),
        names.TAG_BENCHMARK: cfg.benchmark.get("name", exp.stream.name),
        names.TAG_MODEL: cfg.model.get("name", type(exp.model).__name__),
        names.TAG_SEED: str(cfg.seed),
    }


def start_run(exp: Experiment, tracker: RunTracker) -> None:
    cfg, stream = exp.cfg, exp.stream
    language = stream.scenario == "language_modeling"
    tags = {
        **run_identity(exp),
        names.TAG_KIND: names.KIND_EXPERIMENT,
        names.TAG_MATRIX: names.MATRIX_PERPLEXITY if language else names.MATRIX_ACCURACY,
        names.TAG_SCENARIO: stream.scenario,
        names.TAG_GIT_COMMIT: git_commit(),
        **library_versions(),
    }
    if slurm_job():
        tags[names.TAG_SLURM_JOB] = slurm_job()
    if cfg.tracking.get("sweep_id"):
        tags[names.TAG_SWEEP_ID] = str(cfg.tracking.sweep_id)
        # Nests the sweep's runs under one parent run in the MLflow UI.
        parent = tracker.sweep_parent(tags[names.TAG_SWEEP_ID])
        if parent:
            tags[names.TAG_PARENT] = parent
    resolved = OmegaConf.to_container(cfg, resolve=True)
    method, benchmark = tags[names.TAG_METHOD], tags[names.TAG_BENCHMARK]
    run_name = cfg.tracking.run_name or f"{method}-{benchmark}-s{cfg.seed}"
    run_id = tracker.start(run_name, tags, flatten(resolved))
    tracker.set_tags({names.TAG_CHECKPOINT_DIR: str(checkpoint_folder(cfg, run_id))})
    tracker.describe(report.running_description(tags, len(stream)))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), names.CONFIG)
    tracker.log_inputs(report.dataset_inputs(resolved["benchmark"], stream))
    print(f"run {run_id} ({run_name}): {len(stream)} experiences of {stream.name}", flush=True)


def restore(exp: Experiment, saved: dict[str, Any], tracker: RunTracker) -> History:
    """Bring model, method, RNG and history to the end of the last completed experience."""
    restore_model(exp.model, saved["model"])
    exp.method.load_method_state(saved["method"])
    exp.method.seen = exp.stream.experiences[: saved["next"]]
    h = History.from_state(saved["history"])
    tracker.log_missing_rows(h.logged)
    restore_rng(saved["rng"])
    return h


def save_state(exp: Experiment, h: History, tracker: RunTracker, next_index: int) -> None:
    saved = state(h, model_payload(exp.model), exp.method.method_state(), next_index)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(STATE).name
        torch.save(saved, path)
        tracker.log_file(path, str(Path(STATE).parent))


def device_of(cfg: DictConfig) -> torch.device:
    """Where this process evaluates (and trains, on one device)."""
    return torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")


def _loop(
    exp: Experiment,
    tracker: RunTracker,
    saved: dict[str, Any] | None,
    ckpt: Path | None = None,
    folder: Path | None = None,
) -> dict[str, Any]:
    """before -> fit -> evaluate -> after -> record, for every experience not done yet."""
    cfg, stream, method = exp.cfg, exp.stream, exp.method
    device = device_of(cfg)
    evaluator = evaluator_for(stream)
    evaluate = functools.partial(evaluator, batch_size=cfg.trainer.eval_batch_size, device=device)
    max_batches = cfg.get("evaluation", {}).get("max_batches")
    scored = evaluation_view(stream, max_batches, cfg.trainer.eval_batch_size)
    if saved:
        h = restore(exp, saved, tracker)
    else:
        base = evaluate(exp.model.to(device), scored, expert_mask=method.expert_mask)
        h = History(b=base.accuracy, b_task=base.accuracy_task or [], b_loss=base.loss or [])
    folder = folder or checkpoint_folder(cfg, tracker.run_id)
    for i in range(len(h.R), len(stream)):
        experience = stream.experiences[i]
        signals.STATE.experience, signals.STATE.step = i, None
        signals.point("before_experience", i)
        method.before_experience(experience)
        data = method.train_dataset(experience)

        start = time.perf_counter()
        trainer = fit(exp, experience, data, folder, ckpt, h.logged)
        ckpt = None  # only the experience the run was in continues from a checkpoint
        costs = fit_costs(trainer)
        points, totals = curves.take_points(trainer), curves.take_totals(trainer)
        h.train_seconds.append(time.perf_counter() - start + costs.pop(EARLIER_TRAIN_S))

        signals.point("evaluate", i)
        start = time.perf_counter()
        ev = evaluate(exp.model.to(device), scored, expert_mask=method.expert_mask)
        eval_seconds = time.perf_counter() - start

        lm_eval = cfg.get("evaluation", {}).get("lm_eval", {})
        due = exp.tasks is not None and downstream.downstream_due(i, len(stream), lm_eval.every)
        scores = run_downstream(exp, device) if due else {}

        signals.point("after_experience", i)
        method.after_experience(experience)

        h.R.append(ev.accuracy)
        h.routing.append(ev.routing)
        if ev.accuracy_task is not None:
            h.R_task.append(ev.accuracy_task)
        if ev.loss is not None:
            h.L.append(ev.loss)
        row = rows.quality_row(i, h.R, h.R_task, h.L, h.routing, method.expert_origins())
        row |= scores
        row |= cost_row(
            exp.model,
            data,
            epochs=epochs_trained(totals, data, cfg.trainer.max_epochs),
            train_s=h.train_seconds[-1],
            eval_s=eval_seconds,
            checkpoints=costs,
            device=device,
            precision=cfg.trainer.precision,
            n_devices=trainer.world_size,
        )
        # train/loss and its terms (train/ce, train/kd, ...): means over the last epoch; the
        # learning rates the optimizer stepped with (train/lr_mean, train/lr_last; LRTrace).
        prefix = names.train_term("")
        row |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        row |= totals  # train/steps, train/tokens: where the next experience's curves start
        # Replayed examples in the training set (a peer's own loop trains on data we do not see).
        if method.lightning_loop:
            row[names.TRAIN_REPLAYED] = len(data) - len(experience.train)
        record(exp, tracker, h, i, row, points)
        if scores:
            with signals.deferred():
                tracker.log_json(downstream.downstream_table(h.logged), names.DOWNSTREAM_TABLE)
        print(
            experience_line(
                i, len(stream), type(method).__name__, row, h.train_seconds[-1], eval_seconds
            ),
            flush=True,
        )
    # Held until run() marks the run FINISHED: a signal now lets the run complete (exit 0).
    signals.STATE.deferred += 1
    return finish(exp, h, tracker)


def epochs_trained(totals: dict[str, float], data: Dataset, max_epochs: int) -> float:
    """Epochs of ``data`` trained on, from the tokens counted (run/curves.py): a step or token
    budget may end inside an epoch. ``max_epochs`` where nothing was counted (a peer's loop)."""
    tokens = totals.get(names.TRAIN_TOKENS)
    if tokens is None:
        return float(max_epochs)
    return float(tokens) / max(len(data) * tokens_per_sample(data), 1)


def fit(
    exp: Experiment,
    experience: Experience,
    data: Dataset,
    folder: Path,
    ckpt: Path | None,
    logged: list[dict[str, float]] = (),
) -> L.Trainer:
    """Train on one experience with a fresh Trainer, writing training checkpoints as it goes.

    ``logged``: the rows of the experiences before, whose step and token counts place this
    experience's curve points on the stream's step axis (run/curves.py).
    """
    cfg, i = exp.cfg, experience.index
    loader = make_loader(
        data, cfg.trainer.batch_size, cfg.trainer.num_workers, seed=cfg.seed * 1_000 + i
    )
    writer = checkpoint_writer(
        keep=cfg.trainer.get("checkpoint_keep", 2),
        background=cfg.trainer.get("checkpoint_async", "auto"),
        accelerator=cfg.trainer.accelerator,
    )
    saver = StepCheckpoint(
        folder,
        i,
        every_n_steps=cfg.trainer.get("checkpoint_every_n_steps", 0),
        writer=writer,
        sampler=loader.sampler,
    )
    limits = budget.budget(
        cfg.trainer, len(data), tokens_per_sample(data), budget.world_size(cfg.trainer)
    )
    evaluation = cfg.get("evaluation", {})
    curve = curves.TrainingCurves(
        every_n_steps=cfg.tracking.get("log_every_n_steps", 0),
        step_offset=int(sum(r.get(names.TRAIN_STEPS, 0) for r in logged)),
        token_offset=int(sum(r.get(names.TRAIN_TOKENS, 0) for r in logged)),
        val_check_interval=cfg.trainer.get("val_check_interval"),
        validation=curves.validation_sets(
            exp.stream, evaluation.get("max_batches"), cfg.trainer.eval_batch_size
        ),
        eval_batch_size=cfg.trainer.eval_batch_size,
        expert_mask=exp.method.expert_mask,
    )
    # curve before saver: a step's point is taken before that step's checkpoint holds it
    trainer = make_trainer(
        cfg, callbacks=[curve, saver, StopSync()], checkpoint_io=writer, budget=limits
    )
    if exp.method.lightning_loop:
        # A signal stops at the next step boundary, DDP workers included (stop_sync.py).
        with signals.training(forward=forwarder(trainer)):
            exp.method.fit_experience(experience, loader, trainer, ckpt_path=ckpt)
    else:
        exp.method.fit_experience(experience, loader, trainer)
    saver.apply_pending_rng()
    return trainer


def record(
    exp: Experiment,
    tracker: RunTracker,
    h: History,
    i: int,
    row: dict[str, float],
    points: list[curves.Point] = (),
) -> None:
    """Save the resume state, log the experience's row and curve points, and the model when
    asked to."""
    h.logged.append(row)
    # State first, metrics second: a crash in between re-logs the row on resume,
    # the other order could log a step twice.
    with signals.deferred():
        save_state(exp, h, tracker, i + 1)
        signals.point("log_metrics", i)
        tracker.log_metrics(row, step=i)
        tracker.log_points(points)  # a crash before this leaves a gap, never a point twice
    if exp.cfg.tracking.log_checkpoints:
        with signals.deferred(), tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"model_exp_{i}.pt"
            save_model(
                exp.model,
                OmegaConf.to_container(exp.cfg.model, resolve=True),
                path,
                input_shape=list(exp.stream.input_shape),
                n_classes=exp.stream.n_classes,
            )
            tracker.log_file(path, names.CHECKPOINTS)
    track = exp.cfg.tracking
    if track.get("export", "none") == "hf" and hf_export.export_due(
        i, len(exp.stream), track.get("export_every", 1)
    ):
        with signals.deferred(), tempfile.TemporaryDirectory() as tmp:
            out = hf_export.export_hf(
                exp.model, Path(tmp) / f"exp_{i}", exp.method.expert_origins()
            )
            tracker.log_file(out, names.HF_EXPORT)


def finish(exp: Experiment, h: History, tracker: RunTracker) -> dict[str, Any]:
    """End-of-stream metrics and artifacts; returns the summary (also logged as summary.json)."""
    cfg, stream = exp.cfg, exp.stream
    final = rows.final_metrics(h.R, h.b, h.R_task, h.b_task, h.L)
    final[names.COST_TRAIN_TOTAL_S] = float(sum(h.train_seconds))
    # forgetting and bwt of the last step are already logged with the row: log each step once.
    tracker.log_metrics({k: v for k, v in final.items() if k not in h.logged[-1]}, len(stream) - 1)
    run = run_identity(exp)
    log_results(
        tracker,
        run,
        stream,
        final,
        R=h.R,
        b=h.b,
        R_task=h.R_task,
        b_task=h.b_task,
        L=h.L,
        b_loss=h.b_loss,
        routing=h.routing,
        origin=exp.method.expert_origins(),
    )
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
    print_report(summary)
    return summary
