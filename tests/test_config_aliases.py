"""Keys renamed by issue 21 keep working: on the command line, in a stored run config (resume).

Compare's grouping of runs recorded under old param names: tests/test_compare.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from lifelong_moe import names
from lifelong_moe.config import aliases, schema
from lifelong_moe.config.files import CONF_DIR
from lifelong_moe.config.groups import (
    CheckpointPolicy,
    EvaluationConfig,
    TrackingConfig,
    TrainerConfig,
)
from lifelong_moe.config.schema import STRUCTURED, check_command_line, check_config, jobs
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.run.loop_bench import compose
from lifelong_moe.run.resume import run_config


def test_old_keys_on_the_command_line_are_rewritten_with_a_note(capsys):
    args = [
        "-m",
        "--config-dir",
        "my_configs",
        "trainer.lr_schedule=cosine_rewarm,infinite",  # a sweep
        "+trainer.checkpoint_keep=3",
        "++method.balance_scope=trainable",
        "~trainer.warmup_steps",
        "trainer.max_epochs=1",  # not renamed
        "schedule.lr_floor=0.2",  # already today's
    ]
    assert aliases.modernize_overrides(args) == [
        "-m",
        "--config-dir",
        "my_configs",
        "schedule.name=cosine_rewarm,infinite",
        "+checkpoint.keep=3",
        "++model.balance_scope=trainable",
        "~schedule.warmup_steps",
        "trainer.max_epochs=1",
        "schedule.lr_floor=0.2",
    ]
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 4
    assert notes[0] == (
        "note: trainer.lr_schedule is now schedule.name; read "
        "trainer.lr_schedule=cosine_rewarm,infinite as schedule.name=cosine_rewarm,infinite"
    )
    assert notes[3].startswith("note: trainer.warmup_steps is now schedule.warmup_steps;")


def test_old_keys_compose_to_the_same_config_as_today_s():
    old = compose(
        [
            "method=lifelong_moe",
            "trainer.lr_schedule=infinite",
            "trainer.cooldown_steps=7",
            "trainer.checkpoint_async=false",
            "method.balance_scope=trainable",
        ]
    )
    new = compose(
        [
            "method=lifelong_moe",
            "schedule.name=infinite",
            "schedule.cooldown_steps=7",
            "checkpoint.background=false",
            "model.balance_scope=trainable",
        ]
    )
    assert old == new
    check_config(old)
    # every job of a sweep over an old key, checked before any runs (as the CLI does)
    args = aliases.modernize_overrides(["-m", "trainer.lr_schedule=constant,cosine_rewarm"])
    assert jobs(args[1:], multirun=True) == [
        ["schedule.name=constant"],
        ["schedule.name=cosine_rewarm"],
    ]
    check_command_line(args, CONF_DIR)
    bad = aliases.modernize_overrides(["-m", "trainer.lr_schedule=constant,linear"])
    with pytest.raises(ConfigError, match=r"^schedule.name='linear': expected one of constant,"):
        check_command_line(bad, CONF_DIR)


def old_form(cfg) -> dict:
    """Today's config as a run before issue 21 stored it: schedule and checkpoint keys under
    trainer, the balance scope under method."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for old, new in names.RENAMED_KEYS.items():
        group, _, key = new.partition(".")
        value = data[group].pop(key)
        old_group, _, old_key = old.partition(".")
        data[old_group][old_key] = value
    assert data.pop("schedule") == {} and data.pop("checkpoint") == {}
    return data


def test_a_stored_config_with_old_keys_is_migrated_when_a_resume_loads_it(tmp_path: Path, capsys):
    today = compose(["method=lifelong_moe", "schedule.name=cosine_rewarm", "checkpoint.keep=3"])
    stored = old_form(today)
    assert stored["trainer"]["lr_schedule"] == "cosine_rewarm"
    assert stored["method"]["balance_scope"] == "all"
    with pytest.raises(ConfigError, match="^method.balance_scope: unknown key"):
        check_config(OmegaConf.create(stored))
    # the run's config.yaml artifact in a store, read back as resume reads it
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    eid = client.create_experiment("lifelong-moe", artifact_location=str(tmp_path / "a"))
    run_id = client.create_run(eid).info.run_id
    client.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(stored)), names.CONFIG)
    capsys.readouterr()
    migrated = run_config(uri, run_id)
    assert OmegaConf.to_container(migrated) == OmegaConf.to_container(today, resolve=True)
    check_config(migrated)
    note = capsys.readouterr().out.strip().splitlines()
    assert note == [
        f"note: resume={run_id}: read the old keys {', '.join(names.RENAMED_KEYS)} under "
        "today's names"
    ]


def test_an_old_key_wins_over_the_default_its_new_one_holds():
    cfg = OmegaConf.create(
        {"trainer": {"lr_schedule": "infinite"}, "schedule": {"name": "constant"}}
    )
    assert aliases.migrate(cfg, "test") == ["trainer.lr_schedule"]
    assert OmegaConf.to_container(cfg) == {"trainer": {}, "schedule": {"name": "infinite"}}


@pytest.mark.parametrize(
    ("option", "settings"),
    [
        ("trainer/default", TrainerConfig),
        ("schedule/default", LRSchedule),
        ("checkpoint/default", CheckpointPolicy),
        ("tracking/mlflow", TrackingConfig),
        ("evaluation/default", EvaluationConfig),
    ],
)
def test_each_group_s_dataclass_defaults_equal_its_packaged_option(option, settings):
    """The dataclass fills in keys an older stored config lacks: the same values as conf/."""
    assert STRUCTURED[option.partition("/")[0]] is settings
    packaged = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{option}.yaml"))
    assert packaged == dataclasses.asdict(settings())


def test_a_preset_of_your_own_with_old_keys_is_read_under_today_s(tmp_path: Path, capsys):
    """A config file written before issue 21 (here an experiment preset in --config-dir)."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "old.yaml").write_text(
        "# @package _global_\n"
        "trainer:\n  lr_schedule: cosine_rewarm\n  checkpoint_keep: 3\n"
        "method:\n  balance_scope: trainable\n"
    )
    check_command_line(["experiment=old"], CONF_DIR, extra_dirs=[tmp_path])  # the CLI's check
    assert capsys.readouterr().out == ""  # silent there: the run itself says it
    cfg = schema._compose(CONF_DIR, "config", ["experiment=old"], [tmp_path])
    with pytest.raises(ConfigError, match="^method.balance_scope: unknown key"):
        check_config(cfg)
    build_view = cfg.copy()
    assert aliases.migrate(build_view, "the config") == [
        "trainer.lr_schedule",
        "trainer.checkpoint_keep",
        "method.balance_scope",
    ]
    check_config(build_view)
    assert build_view.schedule.name == "cosine_rewarm" and build_view.checkpoint.keep == 3
    assert build_view.model.balance_scope == "trainable"
    assert capsys.readouterr().out.startswith("note: the config: read the old keys ")
