"""Bad input: one clear line naming the value and what was expected, exit 2, no run recorded."""

from __future__ import annotations

import dataclasses

import pytest

from lifelong_moe.cli import CONF_DIR, choices
from lifelong_moe.config import schema as config_schema
from lifelong_moe.config.schema import check_command_line, check_config, check_target
from lifelong_moe.errors import ConfigError
from lifelong_moe.run.loop import build
from lifelong_moe.run.loop_bench import compose
from tests.conftest import FAST, run_cli, runs, store_uri

CASES = {
    "unknown method": (["method=nope"], ["method 'nope'", "naive", "lifelong_moe"]),
    "unknown benchmark": (["benchmark=nope"], ["benchmark 'nope'", "split_digits"]),
    "unknown model": (["model=nope"], ["model 'nope'", "moe_mlp"]),
    "classes do not divide": (["benchmark.n_experiences=3"], ["n_experiences=3"]),
    "zero epochs": (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "positive"]),
    "negative lr": (["method.lr=-0.1"], ["method.lr=-0.1", "> 0"]),
    "top_k above n_experts": (["model=moe_mlp", "model.top_k=5"], ["top_k", "5", "n_experts"]),
    "negative growth": (
        ["method=lifelong_moe", "method.experts_per_experience=-1"],
        ["experts_per_experience=-1"],
    ),
    "lifelong_moe on a dense model": (["method=lifelong_moe", "model=mlp"], ["MoE"]),
    "offline classic benchmark": (
        ["benchmark=split_mnist", "benchmark.dataset_root=/nonexistent/mnist"],
        ["/nonexistent/mnist"],
    ),
    "unreachable tracking server": (
        ["tracking.uri=http://127.0.0.1:9"],
        ["127.0.0.1:9", "reachable"],
    ),
    "unwritable store": (
        ["tracking.uri=sqlite:////sys/mlflow.db"],
        ["/sys/mlflow.db", "not writable"],
    ),
    "multi-node without ddp": (["trainer.num_nodes=2"], ["trainer.num_nodes=2", "strategy=ddp"]),
    "store folder missing": (
        ["tracking.uri=sqlite:////nonexistent/dir/mlflow.db"],
        ["/nonexistent/dir"],
    ),
    "system metrics interval not positive": (
        ["tracking.system_metrics_interval_s=0"],
        ["tracking.system_metrics_interval_s=0", "> 0"],
    ),
    "misspelt key (Hydra refuses it)": (
        ["trainer.max_epoch=3"],
        ["trainer.max_epoch: unknown key; did you mean trainer.max_epochs?"],
    ),
    "value of the wrong type": (["method.lr=abc"], ["method.lr='abc': expected a number"]),
    "file store": (
        ["tracking.uri=file:./mlruns"],
        ["tracking.uri=file:./mlruns", "sqlite:///", "MLFLOW_ALLOW_FILE_STORE=true"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(workdir, case):
    overrides, expected = CASES[case]
    uri = store_uri(workdir)
    own_store = any(o.startswith("tracking.uri=") for o in overrides)
    args = [*([] if own_store else [f"tracking.uri={uri}"]), *FAST, *overrides]
    result = run_cli(workdir, *args, check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stderr
    assert not [r for r in runs(uri) if r.info.status == "FINISHED"]


# -- the typed configuration, in process: what `lifelong-moe experiment=demo <override>` says ----
SCHEMA_CASES = {
    "method.lr=abc": "method.lr='abc': expected a number",
    "model.d_model=abc": "model.d_model='abc': expected an integer",
    "model.n_experts=abc": "model.n_experts='abc': expected an integer",
    "benchmark.n_experiences=x": "benchmark.n_experiences='x': expected an integer",
    "seed=-1": "seed=-1: expected an integer in [0, 4294967295]",
    "trainer.precision=fp7": "trainer.precision='fp7': expected one of ",
    "trainer.accelerator=tpu": "trainer.accelerator='tpu': expected one of cpu, gpu, cuda, mps, auto",
    "trainer.batch_size=0": "trainer.batch_size=0: expected a positive integer",
    "schedule.name=linear": "schedule.name='linear': expected one of constant,",
    "schedule.warmup_steps=abc": "schedule.warmup_steps='abc': expected an integer",
    "checkpoint.keep=0": "checkpoint.keep=0: expected a positive integer",
    "checkpoint.background=maybe": "checkpoint.background='maybe': expected true or false or "
    "one of auto",
    "checkpoint.every_n=3": "checkpoint.every_n: unknown key; did you mean "
    "checkpoint.every_n_steps?",
    "evaluation.lm_eval.every=0": "evaluation.lm_eval.every=0: expected a positive integer",
    "tracking.system_metrics=maybe": "tracking.system_metrics='maybe': expected true or false",
    "trainer.max_epoch=3": "trainer.max_epoch: unknown key; did you mean trainer.max_epochs?",
    "model.d_modle=3": "model.d_modle: unknown key; did you mean model.d_model?",
    "method=lifelong_moe method.lamda_kd=1": "method.lamda_kd: unknown key; did you mean "
    "method.lambda_kd?",
    # the same typo added with + passes Hydra: the target's signature refuses it
    "method=lifelong_moe +method.lamda_kd=1": "method.lamda_kd: unknown key; did you mean "
    "method.lambda_kd?",
    "method.lambda_kd=-1": "method.lambda_kd: unknown key; valid keys: lr, name, "
    "replay_buffer_size, replay_fraction, weight_decay",  # method=naive has no distillation
    "+method.foo=1": "method.foo: unknown key; valid keys: lr, name,",
    "+model.n_classes=3": "model.n_classes: set by the runner, not by the config",
    "model=mlp model.dispatch=grouped": "model.dispatch: not in this model preset; add it with "
    "+model.dispatch=grouped",
    "model=moe_vit model.capacity_factor=big": "model.capacity_factor='big': expected a number or null",
    "method._target_=nope.Method": "method._target_='nope.Method': expected an importable class",
    "+trainer.max_epochs=3": "Could not append to config. An item is already at 'trainer.max_epochs'.",
    "-m seed=0,1 method.lr=0.1,abc": "method.lr='abc': expected a number",
}


@pytest.mark.parametrize("overrides", list(SCHEMA_CASES))
def test_a_bad_key_or_value_is_refused_in_one_line_before_anything_runs(overrides):
    with pytest.raises(ConfigError) as error:
        words = overrides.split()  # flags first, as argparse (and Hydra) want them
        flags = [w for w in words if w.startswith("-")]
        check_command_line(
            [*flags, "experiment=demo", *(w for w in words if w not in flags)], CONF_DIR
        )
    message = str(error.value)
    assert message.startswith(SCHEMA_CASES[overrides]), message
    assert "\n" not in message


def test_every_shipped_preset_passes_the_schema():
    for group in ("benchmark", "model", "method", "experiment"):
        for option in choices(group):
            check_config(compose([f"{group}={option}"]))
    check_command_line(
        ["-m", "method=naive,lifelong_moe", "seed=0,1", "trainer.devices=auto"], CONF_DIR
    )
    check_command_line(["trainer.precision=bf16-mixed", "trainer.precision=16"], CONF_DIR)


def test_constructors_keep_their_range_checks_and_build_checks_the_schema_first():
    with pytest.raises(ConfigError, match=r"^method.lambda_kd=-1: expected a number >= 0$"):
        build(compose(["method=lifelong_moe", "method.lambda_kd=-1"]))
    # build() checks before seeding and building: a stored config (resume) gets the same checks
    with pytest.raises(ConfigError, match=r"^seed=-1: expected an integer in"):
        build(compose(["seed=-1"]))


def tiny_backbone(input_shape: list[int], n_classes: int, d_model: int = 8) -> None:
    """A test-only model target whose MoE keys a settings dataclass consumes."""


@dataclasses.dataclass
class MoESettings:
    n_experts: int = 4
    capacity_factor: float | None = None


def test_keys_a_builder_consumes_beside_the_signature(monkeypatch):
    # The real model group takes the flat MoE keys beside the backbone's own arguments.
    assert config_schema.EXTRA_FIELDS["model"]["n_experts"] is int
    assert config_schema.EXTRA_FIELDS["model"]["moe"] is bool
    monkeypatch.setitem(config_schema.EXTRA_FIELDS, "model", {})
    node = {"_target_": f"{__name__}.tiny_backbone", "d_model": 8, "n_experts": 2}
    with pytest.raises(ConfigError, match="model.n_experts: unknown key"):
        check_target("model", node)
    fields = config_schema.fields_of(MoESettings)
    assert fields == {"n_experts": int, "capacity_factor": float | None}
    monkeypatch.setitem(config_schema.EXTRA_FIELDS, "model", fields)
    check_target("model", node)
    with pytest.raises(ConfigError, match=r"^model.n_experts='2': expected an integer$"):
        check_target("model", {**node, "n_experts": "2"})
    with pytest.raises(
        ConfigError, match=r"model.n_expert: unknown key; did you mean model.n_experts"
    ):
        check_target("model", {"_target_": node["_target_"], "n_expert": 2})


def test_a_bad_value_in_a_sweep_fails_before_any_job_runs(workdir):
    uri = store_uri(workdir)
    result = run_cli(
        workdir, "-m", "method.lr=0.001,abc", f"tracking.uri={uri}", *FAST, check=False, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines == ["error: method.lr='abc': expected a number"], result.stderr
    assert "Launching" not in result.stdout + result.stderr
    assert not runs(uri) and not runs(uri, kind="sweep")  # not even the sweep's parent run
