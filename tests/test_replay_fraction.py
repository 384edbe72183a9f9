"""method.replay_fraction: a seeded, fixed share of each experience's training set drawn only
from earlier experiences (classification examples and LM text windows alike)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import replay_windows
from lifelong_moe.methods.naive import Naive
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.moe import MoESettings
from lifelong_moe.stream import Experience
from tests.conftest import FAST, run_cli, runs, store_uri


def experiences(n: int = 3, size: int = 40, lm: bool = False) -> list[Experience]:
    """Inputs carry their experience index, so a drawn example says where it came from."""
    out = []
    for i in range(n):
        x = torch.full((size, 4), float(i))
        y = torch.full((size, 6) if lm else (size,), i, dtype=torch.long)  # LM: [N, L] targets
        data = TensorDataset(x, y, torch.zeros(size, dtype=torch.long))
        out.append(Experience(i, data, data, classes=[] if lm else [i]))
    return out


def origins(data) -> list[int]:
    return [int(data[k][0][0]) for k in range(len(data))]


def method(fraction: float) -> Naive:
    return Naive(
        ResidualMLP([4], 3, d_model=8, d_hidden=8, moe=MoESettings(enabled=False)),
        replay_fraction=fraction,
    )


@pytest.mark.parametrize("lm", [False, True])
def test_replayed_share_comes_only_from_earlier_experiences(lm):
    m = method(0.2)
    stream = experiences(lm=lm)
    for exp in stream:
        m.before_experience(exp)
        data = m.train_dataset(exp)
        where = origins(data)
        if exp.index == 0:
            assert data is exp.train  # nothing earlier to replay
            continue
        assert len(data) == 50  # 40 new + 10 replayed: 10 / 50 = 0.2
        assert where.count(exp.index) == 40
        assert all(o < exp.index for o in where[40:])
    # experience 2 draws from both earlier experiences, uniformly over their union
    assert set(where[40:]) <= {0, 1}


def test_sampling_is_seeded_by_seed_and_experience():
    stream = experiences(n=3, size=200)
    earlier = [e.train for e in stream[:2]]
    a = replay_windows(stream[2], earlier, 0.3, seed=7).indices
    assert a == replay_windows(stream[2], earlier, 0.3, seed=7).indices
    assert a != replay_windows(stream[2], earlier, 0.3, seed=8).indices
    assert len(set(a)) == len(a)  # without replacement while the pool is large enough
    assert len(replay_windows(stream[1], earlier[:1], 0.9, seed=7)) == 1800  # with replacement


def test_run_seed_drives_the_draw():
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        m = method(0.25)
        stream = experiences(n=2, size=400)
        for exp in stream:
            m.before_experience(exp)
            data = m.train_dataset(exp)
        draws.append(data.datasets[1].indices)
    assert draws[0] == draws[1] != draws[2]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half", True])
def test_fraction_outside_the_unit_interval_is_a_config_error(bad):
    with pytest.raises(
        ConfigError, match=r"method.replay_fraction=.*: expected a number in \[0, 1\)"
    ):
        method(bad)


def test_combines_with_the_class_balanced_buffer():
    m = Naive(
        ResidualMLP([4], 3, d_model=8, d_hidden=8, moe=MoESettings(enabled=False)),
        replay_fraction=0.2,
        replay_buffer_size=6,
    )
    stream = experiences()
    sizes = []
    for exp in stream:
        m.before_experience(exp)
        data = m.train_dataset(exp)
        sizes.append(len(data))
        m.after_experience(exp)
    # new + replayed share + the buffer (6 samples once experience 0 is done)
    assert sizes == [40, 40 + 10 + 6, 40 + 10 + 6]
    assert origins(data)[:40] == [2] * 40 and set(origins(data)[40:]) <= {0, 1}


def test_cli_run_with_replay_fraction(tmp_path: Path):
    uri = store_uri(tmp_path)
    result = run_cli(
        tmp_path,
        "benchmark.n_experiences=2",
        "method.replay_fraction=0.2",
        *FAST,
        f"tracking.uri={uri}",
    )
    (run,) = runs(uri)
    assert run.data.params["method.replay_fraction"] == "0.2"
    assert run.data.tags["method"] == "naive"
    assert "[2/2]" in result.stdout
    assert 0 <= run.data.metrics["acc/seen"] <= 1
