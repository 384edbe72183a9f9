"""The names a run is recorded under in MLflow: metrics, tags and artifact paths, in one place.

The runner writes them, resume and compare read them; keeping them here means a rename is one
edit. Metric prefixes follow what the MLflow UI groups by the part before the first ``/``:
continual-learning metrics sit under the matrix they come from (``acc/``, ``acc_til/``, ``ppl/``,
``loss/``), costs under ``cost/`` (``params/`` would read like MLflow's own Parameters), training
loss terms under ``train/``, routing statistics under ``routing/``.

Stores written before issue 13 used unprefixed ``forgetting``/``bwt``/``fwt`` and
``params/``, ``time/``, ``memory/`` costs: :data:`LEGACY` maps those to today's names, and
:func:`modernize` lets readers (compare) treat old and new runs alike.
"""

from __future__ import annotations

from collections.abc import Mapping

# --- metric families: the matrix a metric is computed from --------------------------------------

ACC = "acc"  # accuracy matrix R (class- or domain-incremental view)
ACC_TIL = "acc_til"  # the same with task labels at test time (task-incremental view)
PPL = "ppl"  # perplexity exp(L) of the language-model loss matrix
LOSS = "loss"  # the loss matrix L itself (nats per byte)


def exp_metric(family: str, j: int) -> str:
    """``acc/exp_3``: the row entry for test experience j (step = trained experience)."""
    return f"{family}/exp_{j}"


SUMMARIES = ("seen", "final", "avg_incremental", "forgetting", "bwt", "fwt")


def summary(family: str, statistic: str) -> str:
    """``acc/forgetting``: one of SUMMARIES over the family's matrix, e.g. ``acc/seen`` (A_t, the
    mean over experiences seen so far)."""
    if statistic not in SUMMARIES:
        raise ValueError(f"unknown summary statistic {statistic!r}; expected one of {SUMMARIES}")
    return f"{family}/{statistic}"


ACC_SEEN = summary(ACC, "seen")
ACC_FINAL = summary(ACC, "final")
ACC_AVG_INCREMENTAL = summary(ACC, "avg_incremental")
ACC_FORGETTING = summary(ACC, "forgetting")
ACC_BWT = summary(ACC, "bwt")
ACC_FWT = summary(ACC, "fwt")
PPL_SEEN = summary(PPL, "seen")
PPL_FINAL = summary(PPL, "final")
PPL_FORGETTING = summary(PPL, "forgetting")
LOSS_BWT = summary(LOSS, "bwt")

# --- costs --------------------------------------------------------------------------------------

COST = "cost"


def cost_params(kind: str) -> str:
    """``cost/params_total`` for kind ``total`` (also ``trainable``, ``active``)."""
    return f"{COST}/params_{kind}"


COST_PARAMS_TOTAL = cost_params("total")
COST_PARAMS_TRAINABLE = cost_params("trainable")
COST_PARAMS_ACTIVE = cost_params("active")
COST_TRAIN_S = f"{COST}/train_s"  # wall time of one experience's fit
COST_EVAL_S = f"{COST}/eval_s"  # wall time of evaluating on every test experience
COST_PEAK_MB = f"{COST}/peak_mb"  # peak memory (CUDA allocator, or process max RSS on CPU)
COST_FROZEN_BYTES = f"{COST}/frozen_bytes"  # frozen expert banks as stored, scales included
# expert weights held by one rank under expert parallelism (all MoE layers, frozen + trainable)
COST_EXPERT_PARAMS_PER_RANK = f"{COST}/expert_params_per_rank"
COST_TRAIN_TOTAL_S = f"{COST}/train_total_s"  # sum of cost/train_s over the stream
COST_CHECKPOINT_S = f"{COST}/checkpoint_s"  # training waited for checkpoints, part of train_s
# serialising and writing checkpoints in the background writer thread (overlaps training)
COST_CHECKPOINT_WRITE_S = f"{COST}/checkpoint_write_s"
COST_CHECKPOINT_MB = f"{COST}/checkpoint_mb"  # size of one training checkpoint
COST_TOKENS_PER_S = f"{COST}/tokens_per_s"  # training throughput (samples x tokens per sample)
COST_MFU = f"{COST}/mfu"  # model FLOPs utilisation, where the device's peak is known

# --- training loss and its terms ----------------------------------------------------------------

TRAIN = "train"
TRAIN_LOSS = f"{TRAIN}/loss"  # the total that is minimised
TRAIN_CE = f"{TRAIN}/ce"  # the task loss (cross-entropy)


def train_term(key: str) -> str:
    """``train/kd`` for the key ``kd`` of the dict a method's ``extra_loss`` returns."""
    return f"{TRAIN}/{key}"


# What the LR schedule (the schedule group) and replay did in one experience (Lightning-trained).
TRAIN_LR_MEAN = f"{TRAIN}/lr_mean"  # mean learning rate over the experience's optimizer steps
TRAIN_LR_LAST = f"{TRAIN}/lr_last"  # the learning rate of its last step
TRAIN_REPLAYED = f"{TRAIN}/replayed"  # training examples (LM: windows) from earlier experiences
TRAIN_STEPS = f"{TRAIN}/steps"  # optimizer steps of the experience (the curves' step offsets)
TRAIN_TOKENS = f"{TRAIN}/tokens"  # target tokens trained on in the experience, all ranks

# --- training curves (run/curves.py): step = optimizer steps since the stream began -------------

CURVE = "curve"
CURVE_LOSS = f"{CURVE}/loss"  # the total minimised, mean over the logged step's micro-batches
CURVE_LR = f"{CURVE}/lr"  # the learning rate of the logged step
CURVE_GRAD_NORM = f"{CURVE}/grad_norm"  # global L2 norm of the gradients, before clipping
CURVE_TOKENS = f"{CURVE}/tokens"  # target tokens trained on since the stream began, all ranks
CURVE_TOKENS_PER_S = f"{CURVE}/tokens_per_s"  # since the previous point


def curve_term(key: str) -> str:
    """``curve/kd`` for the loss term ``kd`` (``train/kd`` is its per-experience mean)."""
    return f"{CURVE}/{key}"


def curve_val_loss(domain: str) -> str:
    """``curve/val_loss/<domain>``: validation loss inside an experience (val_check_interval)."""
    return f"{CURVE}/val_loss/{domain}"


# --- downstream tasks (evaluation/downstream.py, lm-evaluation-harness): step = experience ------

DOWNSTREAM = "downstream"
DOWNSTREAM_TABLE = "downstream.json"  # every experience's downstream metrics, one row each


def downstream_metric(task: str, metric: str) -> str:
    """``downstream/<task>/<metric>``; lm-eval's ``acc,none`` becomes ``acc`` (MLflow keys
    allow no comma), another filter ``acc_<filter>``."""
    name, _, filter_name = metric.partition(",")
    if filter_name and filter_name != "none":
        name = f"{name}_{filter_name}"
    return f"{DOWNSTREAM}/{task}/{name}"


# --- routing (mean over MoE layers, and per layer) ----------------------------------------------

ROUTING = "routing"
ROUTING_SPECIALIZATION = f"{ROUTING}/specialization"
ROUTING_DRIFT = f"{ROUTING}/drift"
# Definitions: lifelong_moe/evaluation/routing.py. A changed definition gets a new name.
ROUTING_SPECIALIZATION_CORRECTED = f"{ROUTING}/specialization_corrected"  # against chance
ROUTING_SPECIALIZATION_SKIPPED = f"{ROUTING}/specialization_skipped"  # terms with chance == 1
ROUTING_MRI_MAX = f"{ROUTING}/mri_max"  # Maximum Routing Imbalance per distribution, max over j
ROUTING_MRI_MEAN = f"{ROUTING}/mri_mean"  # the same, mean over j
ROUTING_TOKEN_DRIFT = f"{ROUTING}/token_drift"  # tokens whose top-k set changed since learned
ROUTING_TOKEN_CHANGE = f"{ROUTING}/token_change"  # ... since the previous evaluation
ROUTING_INFERENCE_ACC = f"{ROUTING}/inference_acc"  # inferred routing: experience named right
# Before issue 24: MRI pooled over experiences, per (token, slot) (at most 1/k). Not logged any
# more; kept so that old stores stay readable under their own meaning.
ROUTING_MAX_IMBALANCE = f"{ROUTING}/max_imbalance"


def routing_layer(metric: str, layer: int) -> str:
    """``routing/drift/layer_2`` for the metric ``drift`` (or its full name) of MoE layer 2."""
    return f"{ROUTING}/{metric.removeprefix(ROUTING + '/')}/layer_{layer}"


# --- a sweep's parent run: per method (mean over seeds) ---------------------------------------

SWEEP = "sweep"  # sweep/<metric>/<method>, e.g. sweep/acc/final/naive (see tracking/sweep.py)

# --- names used before issue 13 -----------------------------------------------------------------

LEGACY: dict[str, str] = {
    "forgetting": ACC_FORGETTING,
    "bwt": ACC_BWT,
    "fwt": ACC_FWT,
    "params/total": COST_PARAMS_TOTAL,
    "params/trainable": COST_PARAMS_TRAINABLE,
    "params/active": COST_PARAMS_ACTIVE,
    "time/train_s": COST_TRAIN_S,
    "time/eval_s": COST_EVAL_S,
    "memory/peak_mb": COST_PEAK_MB,
    "time/train_total_s": COST_TRAIN_TOTAL_S,
}
# acc_til/ already carried its prefix; only the unprefixed accuracy trio moved.
_BY_NEW = {new: old for old, new in LEGACY.items()}


def legacy_name(name: str) -> str | None:
    """The name a metric had before issue 13, or None when it did not change."""
    return _BY_NEW.get(name)


def modernize(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics under today's names; an old name yields to a new one logged beside it."""
    out = {LEGACY.get(k, k): v for k, v in metrics.items() if k in LEGACY}
    out |= {k: v for k, v in metrics.items() if k not in LEGACY}
    return out


# --- tags ---------------------------------------------------------------------------------------

TAG_DESCRIPTION = "mlflow.note.content"  # the run's markdown description in the MLflow UI
TAG_PARENT = "mlflow.parentRunId"  # nests a sweep's runs under its parent run in the UI
TAG_KIND = "kind"  # what a run is: KIND_EXPERIMENT, KIND_SWEEP or KIND_COMPARISON
KIND_EXPERIMENT = "experiment"  # one (method, benchmark, seed): what compare aggregates
KIND_SWEEP = "sweep"  # a sweep's parent run
KIND_COMPARISON = "comparison"  # a run written by lifelong-moe-compare --log
TAG_MATRIX = "matrix"  # the matrix a run's metrics come from: MATRIX_ACCURACY or MATRIX_PERPLEXITY
MATRIX_ACCURACY = "accuracy"
MATRIX_PERPLEXITY = "perplexity"
TAG_METHOD = "method"
TAG_BENCHMARK = "benchmark"
TAG_MODEL = "model"
TAG_SEED = "seed"
TAG_SCENARIO = "scenario"
TAG_SPLIT = "split"  # the held-out set evaluated: test (reported) or validation (for choosing)
TAG_GIT_COMMIT = "git_commit"
TAG_SWEEP_ID = "sweep_id"
TAG_SLURM_JOB = "slurm_job"  # a requeued SLURM job finds its own run by it
TAG_CHECKPOINT_DIR = "checkpoint_dir"  # where the run's training checkpoints are on local disk
TAG_GROUP_BY = "group_by"  # a comparison run's grouping
TAG_RUN_COLOR = "mlflow.runColor"  # a run's colour in the UI's charts (what its picker writes)
# A sweep's parent run: how many jobs it expects and how they ended.
TAG_SWEEP_RUNS_EXPECTED = "sweep.runs_expected"
TAG_SWEEP_RUNS_FINISHED = "sweep.runs_finished"  # "3/4"
TAG_SWEEP_RUNS_FAILED = "sweep.runs_failed"
TAG_SWEEP_RUNS_KILLED = "sweep.runs_killed"


def tag_version(library: str) -> str:
    """``version.torch``: the installed version of a library the run used."""
    return f"version.{library}"


# MLflow 3 opens an experiment in its GenAI view (traces) unless this experiment tag says otherwise.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"

# --- artifacts ----------------------------------------------------------------------------------

CONFIG = "config.yaml"
ACCURACY_MATRIX = "accuracy_matrix.json"
PERPLEXITY_MATRIX = "perplexity_matrix.json"
ROUTING_JSON = "routing.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
# tracking.export=hf: the grown model in its family's format, one folder per exported experience.
HF_EXPORT = "hf_export"
PLOTS = "plots"  # a comparison's figures
ACCURACY_PLOT = "accuracy_matrix.png"
PERPLEXITY_PLOT = "perplexity_matrix.png"
ROUTING_PLOT = "routing.png"


def comparison(fmt: str) -> str:
    """``comparison.md`` (also csv, json): a comparison's table as text."""
    return f"comparison.{fmt}"


COMPARISON_TABLE = "comparison_table.json"  # the same as an MLflow table
# Long-form tables (one row per cell) for the UI's evaluation view; must end in .json.
ACCURACY_TABLE = "tables/accuracy.json"
PERPLEXITY_TABLE = "tables/perplexity.json"
ROUTING_TABLE = "tables/routing.json"
# What resume needs, not a result: the UI lists folders first, then by name, so the folder is
# named to sort after every result folder ('~' follows all letters) and to read as scratch.
# It is deleted when the run FINISHED unless tracking.keep_resume_state=true.
RESUME_FOLDER = "~resume"
RESUME_STATE = f"{RESUME_FOLDER}/state.pt"
LEGACY_RESUME_STATE = "resume/state.pt"  # runs started before issue 13


# --- config keys (MLflow params) renamed by issue 21 --------------------------------------------

# Old dotted config key -> today's. The one table behind every old key that keeps working: on the
# command line (config/aliases.py rewrites it, with a note), in a stored run config (resume
# migrates it) and among a stored run's params (compare groups and labels under today's names).
RENAMED_KEYS: dict[str, str] = {
    # trainer -> schedule (methods/lr_schedule.py's LRSchedule is the node)
    "trainer.lr_schedule": "schedule.name",
    "trainer.warmup_steps": "schedule.warmup_steps",
    "trainer.lr_floor": "schedule.lr_floor",
    "trainer.lr_constant": "schedule.lr_constant",
    "trainer.cooldown_steps": "schedule.cooldown_steps",
    "trainer.anneal_steps": "schedule.anneal_steps",
    # trainer -> checkpoint (the step-checkpoint policy, run/checkpoints.py)
    "trainer.checkpoint_every_n_steps": "checkpoint.every_n_steps",
    "trainer.checkpoint_dir": "checkpoint.dir",
    "trainer.checkpoint_keep": "checkpoint.keep",
    "trainer.checkpoint_async": "checkpoint.background",
    # an MoE setting that lived under method
    "method.balance_scope": "model.balance_scope",
}


def modern_key(key: str) -> str:
    """Today's name of a config key (or MLflow param); a key that did not change is itself."""
    return RENAMED_KEYS.get(key, key)


def modernize_params(params: Mapping[str, str]) -> dict[str, str]:
    """A run's params under today's names; an old name yields to a new one logged beside it."""
    out = {RENAMED_KEYS[k]: v for k, v in params.items() if k in RENAMED_KEYS}
    out |= {k: v for k, v in params.items() if k not in RENAMED_KEYS}
    return out
