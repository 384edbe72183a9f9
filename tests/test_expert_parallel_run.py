"""``trainer.expert_parallel=2`` in a run: torchrun with 2 CPU processes (gloo) against one.

A Lifelong-MoE run on split digits (5 experiences, 1 epoch, ``lambda_aux=0``: the balance loss
is not linear in the batch; new experts copy the most used one, wherever it is held) at the same global batch (one process: 128; two: 64 each) and seed.
The sharded run is stopped before its fourth experience (after two growths under expert
parallelism) and resumed under torchrun with ``expert_parallel=1`` (the same global batch),
which rebuilds every layer whole from the gathered resume state. Its accuracy matrix must be one process's within 0.01, its
logged ``cost/expert_params_per_rank`` at most ceil(E/2) experts per layer, and the gathered
checkpoint of an experience trained sharded must load in one process (``load_model``) and
predict as one process's model does.
"""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.models import moe_layers
from lifelong_moe.models.checkpoint import load_model
from lifelong_moe.run.signals import TEST_HOOK
from tests.conftest import TINY_RUN, artifact_json, benchmark_from_yaml, run_cli, runs, store_uri
from tests.test_torchrun import torchrun

pytestmark = pytest.mark.slow
N_EXPERIENCES = 5
ARGS = [
    *TINY_RUN,
    f"benchmark.n_experiences={N_EXPERIENCES}",
    "method=lifelong_moe",
    "method.lambda_aux=0",
    "method.expand_init=copy_most_used",  # sources on either rank, usage summed over ranks
    "tracking.log_checkpoints=true",
]
SHARDED_UNTIL = 3  # experiences 0-2 train sharded, 3-4 after the resume


def checkpoint(uri: str, run_id: str, i: int) -> torch.nn.Module:
    path = MlflowClient(uri).download_artifacts(run_id, f"checkpoints/model_exp_{i}.pt")
    return load_model(path).eval()


def predictions(model: torch.nn.Module) -> torch.Tensor:
    stream = benchmark_from_yaml("split_digits", n_experiences=N_EXPERIENCES)
    with torch.no_grad():
        return torch.cat([model(exp.test[:][0])[0].argmax(-1) for exp in stream.experiences])


def metric(uri: str, run_id: str, key: str) -> list[float]:
    history = MlflowClient(uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_sharded_run_matches_one_process_and_resumes_unsharded(workdir):
    one_dir, two_dir = workdir / "one", workdir / "two"
    one_dir.mkdir(), two_dir.mkdir()
    one_uri, two_uri = store_uri(one_dir), store_uri(two_dir)
    run_cli(one_dir, f"tracking.uri={one_uri}", *ARGS, "trainer.batch_size=128")
    (one,) = runs(one_uri)

    stop = {TEST_HOOK: f"before_experience:{SHARDED_UNTIL}@0=parent:SIGTERM"}
    sharded = [f"tracking.uri={two_uri}", *ARGS, "trainer.batch_size=64"]
    done = torchrun(two_dir, 2, *sharded, "trainer.expert_parallel=2", env=stop)
    assert done.returncode == 1, done.stderr[-3000:]  # torchrun's status for stopped workers
    (two,) = runs(two_uri)
    assert two.info.status == "KILLED"
    run_id = two.info.run_id
    # the same global batch (2 x 64) with unsharded layers: expert_parallel=1 by default
    done = torchrun(two_dir, 2, f"tracking.uri={two_uri}", f"resume={run_id}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert runs(two_uri)[0].info.status == "FINISHED"

    R_one = artifact_json(one_uri, one.info.run_id, "accuracy_matrix.json")
    R_two = artifact_json(two_uri, run_id, "accuracy_matrix.json")
    assert R_two["b"] == R_one["b"]  # the untrained model, sharded: evaluation is exact
    for row_two, row_one in zip(R_two["R"], R_one["R"], strict=True):
        assert row_two == pytest.approx(row_one, abs=0.01)

    # the last experience trained sharded, gathered: loads in one process, predicts alike
    last = SHARDED_UNTIL - 1
    model_two = checkpoint(two_uri, run_id, last)
    pred_one = predictions(checkpoint(one_uri, one.info.run_id, last))
    pred_two = predictions(model_two)
    differ = int((pred_two != pred_one).sum())
    print(f"test predictions that differ after experience {last}: {differ} of {len(pred_one)}")
    assert differ <= 0.01 * len(pred_one)

    # memory: the fullest rank held at most ceil(E/2) experts of each layer while sharded
    per_rank = metric(two_uri, run_id, names.COST_EXPERT_PARAMS_PER_RANK)
    whole = metric(one_uri, one.info.run_id, names.COST_EXPERT_PARAMS_PER_RANK)
    print(f"expert parameters per rank, ep=2 then ep=1: {per_rank}; one process: {whole}")
    layers = moe_layers(model_two).values()
    for i in range(SHARDED_UNTIL):
        bound = 0
        for layer in layers:
            n_experts = layer.n_experts - (last - i) * 2  # experts_per_experience=2
            weights = (layer.experts.w1_width + layer.d_hidden) * layer.d_model
            bound += math.ceil(n_experts / 2) * weights
        assert per_rank[i] <= bound < whole[i]
    assert per_rank[SHARDED_UNTIL:] == whole[SHARDED_UNTIL:]  # resumed with expert_parallel=1


def refused(workdir, *args: str, env: dict[str, str] | None = None) -> str:
    """The one line a bad command prints (exit 2, no run recorded)."""
    uri = store_uri(workdir)
    done = run_cli(workdir, f"tracking.uri={uri}", *TINY_RUN, *args, check=False, extra_env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert runs(uri) == []
    return line


def test_bad_expert_parallel_is_one_line_before_any_run(workdir):
    line = refused(workdir, "method=lifelong_moe", "trainer.expert_parallel=2")
    assert line.startswith("error: trainer.expert_parallel=2 shards experts over processes")
    assert "run: torchrun --nproc-per-node 2 -m lifelong_moe.cli " in line
    # as torchrun would start rank 0 of 3 (refused before the process group opens)
    three = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}
    line = refused(workdir, "method=lifelong_moe", "trainer.expert_parallel=2", env=three)
    assert line == (
        "error: trainer.expert_parallel=2: expected a positive divisor of the world size 3"
    )
    two = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    line = refused(
        workdir,
        "method=lifelong_moe",
        "trainer.gradient_clip_val=1.0",
        "trainer.expert_parallel=2",
        env=two,
    )
    assert line.startswith("error: trainer.gradient_clip_val=1.0 with trainer.expert_parallel=2")


def test_a_resume_state_with_another_expert_count_is_refused():
    from types import SimpleNamespace

    from lifelong_moe.errors import ConfigError
    from lifelong_moe.moe import MoELayer
    from lifelong_moe.run.loop import check_expert_counts

    model = torch.nn.Sequential(MoELayer(8, 8, 4, 2))
    growth = SimpleNamespace(experts_after=lambda done, built: built + 2 * max(done - 1, 0))
    exp = SimpleNamespace(model=model, method=growth)
    grown = {"moe": {"0": {**model[0].get_config(), "n_experts": 6}}}
    check_expert_counts(exp, grown, 2, "abc")  # 4 + 2 after two experiences: as the config says
    with pytest.raises(ConfigError) as error:
        check_expert_counts(exp, grown, 3, "abc")
    assert str(error.value) == (
        "resume=abc: MoE layer 0 of the checkpoint has 6 experts, expected 8 from the config "
        "after 3 experience(s)"
    )
