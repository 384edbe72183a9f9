"""The experience loop: build everything, then per experience fit -> evaluate -> log.

Everything that can be wrong with the user's input is checked while building, before the
MLflow run exists, so a bad command never leaves a run behind.
"""

from __future__ import annotations

import functools
import logging
import signal
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
from lifelong_moe.config.aliases import migrate
from lifelong_moe.config.groups import CheckpointPolicy
from lifelong_moe.config.schema import check_config
from lifelong_moe.data.tokenizer import ByteTokenizer, save_for_transformers
from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation import downstream, rows
from lifelong_moe.evaluation.evaluator import evaluator_for
from lifelong_moe.evaluation.subset import evaluation_view
from lifelong_moe.log import LOGGER
from lifelong_moe.measure.costs import cost_row
from lifelong_moe.measure.throughput import tokens_per_sample
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.models import build_model, hf_export, moe_layers, save_model
from lifelong_moe.models.checkpoint import model_payload, restore_model
from lifelong_moe.run import curves, distributed, expert_parallel, signals, stop_sync
from lifelong_moe.run.checkpoints import (
    EARLIER_TRAIN_S,
    checkpoints,
    describe,
    fit_costs,
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
from lifelong_moe.run.trainer import fit
from lifelong_moe.stream import Stream
from lifelong_moe.targets import instantiate
from lifelong_moe.tracking.mlflow_run import (
    RunTracker,
    git_commit,
    tracker_for_rank,
)
from lifelong_moe.tracking.recorder import RunRecorder, run_tags
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
    migrate(cfg, "the config")  # old keys in a preset or config file (config/aliases.py)
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stream = instantiate(cfg.benchmark, "benchmark")
    model = build_model(cfg.model, stream.input_shape, stream.n_classes)
    if cfg.trainer.get("compile", False):
        model.compile()  # in place: parameter names, checkpoints and expand() stay as they are
    hf_export.check_export(cfg.tracking.get("export", "none"), model)
    method = instantiate(cfg.method, "method", model=model)
    expert_parallel.check_method(cfg, method)  # sharded once the process group is open
    method.after_fit = stop_sync.after_fit
    method.set_lr_schedule(LRSchedule(**cfg.get("schedule", {})))
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
    if not stream.language_modeling:
        raise ConfigError(
            f"evaluation.lm_eval.tasks={list(lm_eval.tasks)}: expected a language-model stream, "
            f"got benchmark {stream.name} ({stream.scenario})"
        )
    return downstream.check_tasks(list(lm_eval.tasks), lm_eval.get("include_path"))


def run_downstream(exp: Experiment, device: torch.device) -> dict[str, float]:
    """``downstream/<task>/<metric>`` after one experience; training's RNG stays as it was."""
    lm_eval = exp.cfg.evaluation.lm_eval
    start, rng = time.perf_counter(), capture_rng()
    LOGGER.info(f"lm-eval: {', '.join(lm_eval.tasks)} ...")
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
        progress_every=lm_eval.get("progress_every", downstream.PROGRESS_EVERY),
    )
    restore_rng(rng)
    LOGGER.info(f"lm-eval: done in {time.perf_counter() - start:.1f}s")
    return metrics


def checkpoint_root(cfg: DictConfig) -> Path:
    return Path(CheckpointPolicy(**cfg.get("checkpoint", {})).dir)


def checkpoint_folder(cfg: DictConfig, run_id: str) -> Path:
    """``<checkpoint.dir>/<run_id>``, absolute (also recorded as the run's tag)."""
    return (checkpoint_root(cfg) / run_id).resolve()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment end to end; returns the summary that is also logged as summary.json."""
    check_store(cfg.tracking.uri)
    signals.point("startup")
    resume_id, cfg = resume_target(cfg, git_commit())
    distributed.check_launch(cfg)
    exp = build(cfg)
    distributed.init(cfg)  # before the first (sharded) evaluation; after Avalanche's import
    # trainer.expert_parallel: every MoE layer sharded over the ranks, before any training.
    expert_parallel.shard(cfg, exp.method, device_of(cfg).type)
    recorder = RunRecorder(tracker_for_rank(cfg.tracking.uri, cfg.tracking.experiment), cfg)
    saved, ckpt, folder = open_run(exp, recorder, resume_id)
    signals.STATE.run_id = recorder.run_id
    writes = recorder.tracker.writes  # on several machines, rank 0 speaks for all
    try:
        with recorder:
            try:
                summary = _loop(exp, recorder, saved, ckpt, folder)
            except SIGTERMException:  # Lightning's own SIGTERM stop, had ours not come first
                raise signals.Interrupted(signal.SIGTERM) from None
    except signals.Interrupted as stop:  # a second signal from here on exits at once
        if writes:
            LOGGER.warning(
                f"interrupted: run {recorder.run_id} marked KILLED at {signals.where()}; "
                f"continue with resume={recorder.run_id}"
            )
        if stop.requeue:
            requeue(recorder.run_id)
        raise
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1)
        LOGGER.warning(
            f"interrupted: run {recorder.run_id} marked KILLED; "
            f"continue it with resume={recorder.run_id}"
        )
        raise
    signals.STATE.deferred = 0
    if writes:
        remove(folder)
        LOGGER.info(f"\nSee this run: {recorder.tracker.ui_command()}   (run id {recorder.run_id})")
    return summary


def open_run(
    exp: Experiment, recorder: RunRecorder, resume_id: str | None
) -> tuple[dict[str, Any] | None, Path | None, Path]:
    """Start the run, or reopen it: (resume state, step checkpoint to continue, checkpoints folder).

    On a resume everything is read and checked before the run is touched: a refusal changes
    nothing."""
    cfg, uri = exp.cfg, exp.cfg.tracking.uri
    if not resume_id:
        tags = run_tags(cfg, exp.stream, run_identity(exp), slurm_job())
        with signals.deferred():
            run_id = recorder.start(exp.stream, tags, checkpoint_root(cfg))
        return None, None, checkpoint_folder(cfg, run_id)
    saved = load_state(uri, resume_id)
    done = saved["next"] if saved else 0
    if saved:
        check_expert_counts(exp, saved["model"], done, resume_id)
    exp.method.trust_pickles = is_local(uri) or bool(cfg.get("resume_trust"))
    folder = Path(checkpoint_dir(uri, resume_id) or checkpoint_folder(cfg, resume_id))
    found, ckpt = checkpoints(folder, done), None
    where = f"after {done} of {len(exp.stream)} experiences"
    if found and done < len(exp.stream):
        ckpt = found[-1]
        at = describe(ckpt)
        where = f"at experience {at['experience']}, epoch {at['epoch']}, step {at['step']}"
    LOGGER.info(f"resuming run {resume_id} {where}")
    with signals.deferred():
        recorder.reopen(resume_id)
    return saved, ckpt, folder


def check_expert_counts(exp: Experiment, payload: dict[str, Any], done: int, run_id: str) -> None:
    """The checkpoint's MoE layers must have the experts the config grows to after ``done``
    experiences (model.n_experts, the method's growth): else one line, before training."""
    built = {name: layer.n_experts for name, layer in moe_layers(exp.model).items()}
    for name, layer_cfg in payload.get("moe", {}).items():
        expected = exp.method.experts_after(done, built.get(name, 0))
        if layer_cfg["n_experts"] != expected:
            raise ConfigError(
                f"resume={run_id}: MoE layer {name} of the checkpoint has "
                f"{layer_cfg['n_experts']} experts, expected {expected} from the config after "
                f"{done} experience(s)"
            )


def run_identity(exp: Experiment) -> dict[str, str]:
    """Method, benchmark, model and seed: the tags that name a run (and head its description)."""
    cfg = exp.cfg
    return {
        names.TAG_METHOD: cfg.method.get("name", "method"),
        names.TAG_BENCHMARK: cfg.benchmark.get("name", exp.stream.name),
        names.TAG_MODEL: cfg.model.get("name", type(exp.model).__name__),
        names.TAG_SEED: str(cfg.seed),
    }


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
    recorder: RunRecorder,
    saved: dict[str, Any] | None,
    ckpt: Path | None,
    folder: Path,
) -> dict[str, Any]:
    """before -> fit -> evaluate -> after -> record, for every experience not done yet."""
    cfg, stream, method, tracker = exp.cfg, exp.stream, exp.method, recorder.tracker
    device = device_of(cfg)
    evaluator = evaluator_for(stream)
    evaluate = functools.partial(evaluator, batch_size=cfg.trainer.eval_batch_size, device=device)
    scored = evaluation_view(
        stream, cfg.get("evaluation", {}).get("max_batches"), cfg.trainer.eval_batch_size
    )
    if saved:
        h = restore(exp, saved, tracker)
    else:
        base = evaluate(exp.model.to(device), scored, expert_mask=method.expert_mask)
        h = History(b=base.accuracy, b_task=base.accuracy_task or [], b_loss=base.loss or [])
    for i in range(len(h.R), len(stream)):
        experience = stream.experiences[i]
        signals.STATE.experience, signals.STATE.step = i, None
        signals.point("before_experience", i)
        method.before_experience(experience)
        data = method.train_dataset(experience)

        start = time.perf_counter()
        curve = curves.for_experience(cfg, stream, method.expert_mask, h.logged)
        trainer = fit(cfg, method, experience, data, folder, ckpt, curve)
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
        h.routing_stats.append(ev.routing_stats)
        if ev.accuracy_task is not None:
            h.R_task.append(ev.accuracy_task)
        if ev.loss is not None:
            h.L.append(ev.loss)
        row = rows.quality_row(
            i, h.R, h.R_task, h.L, h.routing, method.expert_origins(), h.routing_stats
        )
        row |= method.evaluation_metrics(i) | scores
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
        if moe_layers(exp.model):  # the fullest rank's expert weights (trainer.expert_parallel)
            row[names.COST_EXPERT_PARAMS_PER_RANK] = expert_parallel.expert_params_per_rank(
                exp.model
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
        LOGGER.info(
            experience_line(
                i, len(stream), type(method).__name__, row, h.train_seconds[-1], eval_seconds
            )
        )
    # Held until run() marks the run FINISHED: a signal now lets the run complete (exit 0).
    signals.STATE.deferred += 1
    return finish(exp, h, recorder)


def epochs_trained(totals: dict[str, float], data: Dataset, max_epochs: int) -> float:
    """Epochs of ``data`` trained on, from the tokens counted (run/curves.py): a step or token
    budget may end inside an epoch. ``max_epochs`` where nothing was counted (a peer's loop)."""
    tokens = totals.get(names.TRAIN_TOKENS)
    if tokens is None:
        return float(max_epochs)
    return float(tokens) / max(len(data) * tokens_per_sample(data), 1)


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
            # The stream's tokenizer beside the model, so the export loads on its own.
            saved = save_for_transformers(
                getattr(exp.stream, "tokenizer", None), Path(tmp) / f"exp_{i}"
            )
            out = hf_export.export_hf(
                exp.model, Path(tmp) / f"exp_{i}", exp.method.expert_origins(), tokenizer=saved
            )
            tracker.log_file(out, names.HF_EXPORT)


def finish(exp: Experiment, h: History, recorder: RunRecorder) -> dict[str, Any]:
    """End-of-stream metrics and artifacts; returns the summary (also logged as summary.json)."""
    cfg, stream, tracker = exp.cfg, exp.stream, recorder.tracker
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
    recorder.summary(summary)
    print_report(summary)
    return summary
