"""Digits streams: splits, seeds, permutations, task labels, and agreement with Avalanche."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lifelong_moe.data.digits import permuted_digits, pixel_permutations, split_digits
from lifelong_moe.data.materialize import read_tensors
from lifelong_moe.errors import ConfigError
from tests.conftest import benchmark_from_yaml

CONF = Path(__file__).resolve().parents[1] / "conf" / "benchmark"


from_yaml = benchmark_from_yaml  # what the runner does with a benchmark config


def labels(dataset) -> torch.Tensor:
    return dataset.tensors[1]


def test_split_digits_shapes_labels_and_disjoint_covering_classes():
    stream = from_yaml("split_digits", seed=3)
    assert stream.name == "split_digits" and len(stream) == 5
    assert stream.input_shape == (1, 8, 8) and stream.n_classes == 10
    assert stream.scenario == "class_incremental" and not stream.task_labels
    seen = []
    for i, exp in enumerate(stream.experiences):
        assert exp.index == i and exp.task_id == 0 and len(exp.classes) == 2
        for data in (exp.train, exp.test):
            x, y, t = data.tensors
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
            assert y.dtype == torch.int64 and t.dtype == torch.int64
            assert set(y.tolist()) == set(exp.classes)
            assert (t == 0).all()
        seen += exp.classes
    assert sorted(seen) == list(range(10))
    n_train = sum(len(e.train) for e in stream.experiences)
    n_test = sum(len(e.test) for e in stream.experiences)
    assert n_train + n_test == 1797
    assert abs(n_test / 1797 - 0.3) < 0.01


def test_inputs_are_standardised_on_the_training_split():
    stream = split_digits(seed=0)
    x = torch.cat([e.train.tensors[0] for e in stream.experiences])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_seed_determinism_and_other_seed_other_order():
    a, b, c = split_digits(seed=5), split_digits(seed=5), split_digits(seed=6)
    assert [e.classes for e in a.experiences] == [e.classes for e in b.experiences]
    for ea, eb in zip(a.experiences, b.experiences, strict=True):
        assert torch.equal(ea.train.tensors[0], eb.train.tensors[0])
        assert torch.equal(ea.test.tensors[1], eb.test.tensors[1])
    assert [e.classes for e in a.experiences] != [e.classes for e in c.experiences]


def test_split_is_stratified():
    stream = split_digits(n_experiences=1, seed=1, test_fraction=0.3)
    exp = stream.experiences[0]
    train = np.bincount(labels(exp.train).numpy(), minlength=10)
    test = np.bincount(labels(exp.test).numpy(), minlength=10)
    share = test / (train + test)
    assert np.all(np.abs(share - 0.3) < 0.02)


def test_fixed_class_order_and_task_labels():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    stream = from_yaml("split_digits", fixed_class_order=order, task_labels=True, n_experiences=2)
    assert [e.classes for e in stream.experiences] == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    assert stream.task_labels
    for i, exp in enumerate(stream.experiences):
        assert exp.task_id == i
        assert (exp.train.tensors[2] == i).all() and (exp.test.tensors[2] == i).all()


@pytest.mark.parametrize("bad", [3, 4, 0, 11])
def test_n_experiences_must_divide_ten(bad):
    with pytest.raises(ConfigError) as err:
        split_digits(n_experiences=bad)
    message = str(err.value)
    assert f"benchmark.n_experiences={bad}" in message and "1, 2, 5, 10" in message
    assert "\n" not in message


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8], ["a"] * 10])
def test_bad_fixed_class_order(order):
    with pytest.raises(ConfigError, match="fixed_class_order"):
        split_digits(fixed_class_order=order)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2])
def test_bad_test_fraction(fraction):
    with pytest.raises(ConfigError, match="test_fraction"):
        split_digits(test_fraction=fraction)


def test_permuted_digits_matches_avalanche_permutations():
    stream = from_yaml("permuted_digits", seed=2, n_experiences=3)
    assert stream.scenario == "domain_incremental" and stream.n_classes == 10
    perms = pixel_permutations(3, 64, seed=2)
    # Avalanche's PermutedMNIST: RandomState(seed).permutation per experience, the first too.
    rng = np.random.RandomState(2)
    for perm in perms:
        assert np.array_equal(perm.numpy(), rng.permutation(64))
    assert not torch.equal(perms[0], torch.arange(64))
    base = split_digits(n_experiences=1, seed=2).experiences[0]
    order = torch.argsort(perms[0])
    for i, exp in enumerate(stream.experiences):
        assert exp.classes == list(range(10)) and exp.task_id == 0
        for data in (exp.train, exp.test):
            assert sorted(set(labels(data).tolist())) == list(range(10))
        # undoing this experience's permutation gives back the unpermuted images
        x = exp.test.tensors[0].flatten(1)[:, torch.argsort(perms[i])]
        x0 = stream.experiences[0].test.tensors[0].flatten(1)[:, order]
        assert torch.allclose(x, x0)
    unpermuted = stream.experiences[0].train.tensors[0].flatten(1)[:, order]
    assert torch.allclose(
        unpermuted.sort(0).values, base.train.tensors[0].flatten(1).sort(0).values
    )


def test_permuted_digits_fixed_per_seed_and_task_labels():
    a = permuted_digits(n_experiences=2, seed=4, task_labels=True)
    b = permuted_digits(n_experiences=2, seed=4, task_labels=True)
    c = permuted_digits(n_experiences=2, seed=5)
    for ea, eb in zip(a.experiences, b.experiences, strict=True):
        assert torch.equal(ea.train.tensors[0], eb.train.tensors[0])
    assert not torch.equal(a.experiences[1].test.tensors[0], c.experiences[1].test.tensors[0])
    assert [e.task_id for e in a.experiences] == [0, 1]
    assert (a.experiences[1].train.tensors[2] == 1).all()


def test_avalanche_benchmark_yields_the_same_tensors():
    for stream in (split_digits(seed=0, task_labels=True), permuted_digits(n_experiences=2)):
        bench = stream.avalanche
        for exp, train, test in zip(
            stream.experiences, bench.train_stream, bench.test_stream, strict=True
        ):
            for ours, theirs in ((exp.train, train.dataset), (exp.test, test.dataset)):
                again = read_tensors(theirs)
                for a, b in zip(ours.tensors, again.tensors, strict=True):
                    assert torch.equal(a, b)
                x, y, t = theirs[0]
                assert torch.equal(x, ours.tensors[0][0]) and int(y) == int(ours.tensors[1][0])


def test_building_does_not_touch_the_global_torch_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    split_digits(seed=9)
    assert torch.equal(torch.rand(3), expected)
