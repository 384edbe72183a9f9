"""Avalanche's classic vision benchmarks, configured from Hydra and materialised as Streams.

Each builder calls Avalanche's own generator (SplitMNIST, PermutedMNIST, ...) so the class
orders and permutations for a seed are the ones Avalanche users get. Two deliberate changes:

* Training uses Avalanche's default *eval* transform (ToTensor + the dataset's Normalize):
  materialising once would freeze one random crop/flip per image, which is worse than none.
  MNIST and Fashion-MNIST defaults have no augmentation, so for them nothing changes.
* Data must be on disk or downloadable; otherwise one ConfigError line, after at most a
  3-second connection probe (see :mod:`lifelong_moe.data.downloads`).

MNIST-sized and CIFAR-sized streams are read into memory; TinyImageNet and CORe50 stay lazy by
default (``in_memory: false``) because their float32 tensors would need 5 GB and more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lifelong_moe.data.arrays import check_class_order, check_count, check_n_experiences
from lifelong_moe.data.downloads import loading, require, resolve_root
from lifelong_moe.data.materialize import materialize
from lifelong_moe.data.stream import Stream
from lifelong_moe.errors import ConfigError

_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
_MNIST_HINT = "the torchvision {name} files ({name}/raw/*-ubyte, uncompressed)"


def _mnist_root(dataset_root: str | None, download: bool) -> Path:
    root = resolve_root(dataset_root, "mnist")
    require(
        root,
        [f"MNIST/raw/{f}" for f in _MNIST_FILES],
        what="MNIST",
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        download=download,
        hint=_MNIST_HINT.format(name="MNIST"),
    )
    return root


def _build(make: Callable[[], Any], root: Path, what: str) -> Any:
    """Run an Avalanche generator without letting it reseed torch's global RNG."""
    with torch.random.fork_rng(devices=[]), loading(root, what):
        return make()


def split_mnist(
    n_experiences: int = 5,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
) -> Stream:
    """Class-incremental MNIST (Avalanche's SplitMNIST), inputs (1, 28, 28)."""
    from avalanche.benchmarks.classic import SplitMNIST

    check_n_experiences(n_experiences, 10)
    order = check_class_order(fixed_class_order, 10)
    root = _mnist_root(dataset_root, download)
    benchmark = _build(
        lambda: SplitMNIST(
            n_experiences,
            return_task_id=bool(task_labels),
            seed=seed,
            fixed_class_order=order,
            dataset_root=root,
        ),
        root,
        "MNIST",
    )
    return materialize(
        benchmark,
        name="split_mnist",
        scenario="class_incremental",
        n_classes=10,
        task_labels=bool(task_labels),
        in_memory=in_memory,
    )


def permuted_mnist(
    n_experiences: int = 5,
    seed: int = 0,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
) -> Stream:
    """Domain-incremental MNIST: a seeded pixel permutation per experience, the first included
    (Avalanche's PermutedMNIST has no identity experience). ~220 MB per experience in memory."""
    from avalanche.benchmarks.classic import PermutedMNIST

    check_count(n_experiences)
    root = _mnist_root(dataset_root, download)
    benchmark = _build(
        lambda: PermutedMNIST(
            n_experiences, return_task_id=bool(task_labels), seed=seed, dataset_root=root
        ),
        root,
        "MNIST",
    )
    return materialize(
        benchmark,
        name="permuted_mnist",
        scenario="domain_incremental",
        n_classes=10,
        task_labels=bool(task_labels),
        in_memory=in_memory,
    )


def rotated_mnist(
    n_experiences: int = 5,
    seed: int = 0,
    rotations: Sequence[int] | None = None,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
) -> Stream:
    """Domain-incremental MNIST: one fixed rotation per experience, seeded in [-180, 180] degrees
    unless ``rotations`` lists them."""
    from avalanche.benchmarks.classic import RotatedMNIST

    check_count(n_experiences)
    if rotations is not None:
        rotations = [int(r) for r in rotations]
        if len(rotations) != n_experiences or any(not -180 <= r <= 180 for r in rotations):
            raise ConfigError(
                f"benchmark.rotations={rotations}: expected {n_experiences} angles "
                "(one per experience) in [-180, 180]"
            )
    root = _mnist_root(dataset_root, download)
    benchmark = _build(
        lambda: RotatedMNIST(
            n_experiences,
            return_task_id=bool(task_labels),
            seed=seed,
            rotations_list=rotations,
            dataset_root=root,
        ),
        root,
        "MNIST",
    )
    return materialize(
        benchmark,
        name="rotated_mnist",
        scenario="domain_incremental",
        n_classes=10,
        task_labels=bool(task_labels),
        in_memory=in_memory,
    )


def split_fmnist(
    n_experiences: int = 5,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
) -> Stream:
    """Class-incremental Fashion-MNIST (Avalanche's SplitFMNIST), inputs (1, 28, 28)."""
    from avalanche.benchmarks.classic import SplitFMNIST

    check_n_experiences(n_experiences, 10)
    order = check_class_order(fixed_class_order, 10)
    root = resolve_root(dataset_root, "fashionmnist")
    require(
        root,
        [f"FashionMNIST/raw/{f}" for f in _MNIST_FILES],
        what="FashionMNIST",
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        download=download,
        hint=_MNIST_HINT.format(name="FashionMNIST"),
    )
    benchmark = _build(
        lambda: SplitFMNIST(
            n_experiences,
            return_task_id=bool(task_labels),
            seed=seed,
            fixed_class_order=order,
            dataset_root=root,
        ),
        root,
        "FashionMNIST",
    )
    return materialize(
        benchmark,
        name="split_fmnist",
        scenario="class_incremental",
        n_classes=10,
        task_labels=bool(task_labels),
        in_memory=in_memory,
    )


def _split_cifar(
    which: int,
    n_experiences: int,
    seed: int,
    fixed_class_order: Sequence[int] | None,
    task_labels: bool,
    dataset_root: str | None,
    download: bool,
    in_memory: bool,
) -> Stream:
    from avalanche.benchmarks.classic import SplitCIFAR10, SplitCIFAR100
    from avalanche.benchmarks.classic.ccifar10 import _default_cifar10_eval_transform
    from avalanche.benchmarks.classic.ccifar100 import _default_cifar100_eval_transform

    check_n_experiences(n_experiences, which)
    order = check_class_order(fixed_class_order, which)
    root = resolve_root(dataset_root, f"cifar{which}")
    if which == 10:
        generator, transform = SplitCIFAR10, _default_cifar10_eval_transform
        files = ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/data_batch_5"]
    else:
        generator, transform = SplitCIFAR100, _default_cifar100_eval_transform
        files = ["cifar-100-python/train", "cifar-100-python/test"]
    require(
        root,
        files,
        what=f"CIFAR-{which}",
        url="https://www.cs.toronto.edu/~kriz/",
        download=download,
        hint=f"the extracted torchvision CIFAR-{which} python archive",
    )
    benchmark = _build(
        lambda: generator(
            n_experiences,
            return_task_id=bool(task_labels),
            seed=seed,
            fixed_class_order=order,
            train_transform=transform,
            eval_transform=transform,
            dataset_root=root,
        ),
        root,
        f"CIFAR-{which}",
    )
    return materialize(
        benchmark,
        name=f"split_cifar{which}",
        scenario="class_incremental",
        n_classes=which,
        task_labels=bool(task_labels),
        in_memory=in_memory,
    )


def split_cifar10(
    n_experiences: int = 5,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
) -> Stream:
    """Class-incremental CIFAR-10 (Avalanche's SplitCIFAR10), inputs (3, 32, 32), ~740 MB."""
    return _split_cifar(
        10, n_experiences, seed, fixed_class_order, task_labels, dataset_root, download, in_memory
    )


def split_cifar100(
    n_experiences: int = 10,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
) -> Stream:
    """Class-incremental CIFAR-100 (Avalanche's SplitCIFAR100), inputs (3, 32, 32), ~740 MB."""
    return _split_cifar(
        100, n_experiences, seed, fixed_class_order, task_labels, dataset_root, download, in_memory
    )


def split_tinyimagenet(
    n_experiences: int = 10,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = False,
) -> Stream:
    """Class-incremental TinyImageNet (200 classes, inputs (3, 64, 64)); lazy by default."""
    from avalanche.benchmarks.classic import SplitTinyImageNet
    from avalanche.benchmarks.classic.ctiny_imagenet import _default_eval_transform

    check_n_experiences(n_experiences, 200)
    order = check_class_order(fixed_class_order, 200)
    root = resolve_root(dataset_root, "tinyimagenet")
    folder = "tiny-imagenet-200"
    require(
        root,
        [f"{folder}/wnids.txt", f"{folder}/train", f"{folder}/val/val_annotations.txt"],
        what="TinyImageNet",
        url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        download=download,
        hint="the extracted tiny-imagenet-200 folder",
    )
    benchmark = _build(
        lambda: SplitTinyImageNet(
            n_experiences,
            return_task_id=bool(task_labels),
            seed=seed,
            fixed_class_order=order,
            train_transform=_default_eval_transform,
            eval_transform=_default_eval_transform,
            dataset_root=root,
        ),
        root,
        "TinyImageNet",
    )
    return materialize(
        benchmark,
        name="split_tinyimagenet",
        scenario="class_incremental",
        n_classes=200,
        task_labels=bool(task_labels),
        in_memory=in_memory,
    )


CORE50_SCENARIOS = ("ni", "nc", "nic", "nicv2_79", "nicv2_196", "nicv2_391")


def core50(
    scenario: str = "ni",
    run: int = 0,
    mini: bool = True,
    object_level: bool = True,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = False,
) -> Stream:
    """CORe50 with Avalanche's predefined runs; lazy by default.

    CORe50 has one test set. For ``nc`` each experience is tested on its own classes; for the
    other scenarios every experience is tested on the whole test set, as CORe50 reports it.
    ``ni`` (same 50 objects, new sessions) is domain-incremental, the rest class-incremental.
    CORe50's file lists fix the task label at 0, so there is no ``task_labels`` knob.
    """
    from avalanche.benchmarks.classic import CORe50
    from avalanche.benchmarks.classic.core50 import _default_eval_transform

    if scenario not in CORE50_SCENARIOS:
        raise ConfigError(
            f"benchmark.scenario={scenario!r}: expected one of {', '.join(CORE50_SCENARIOS)}"
        )
    if isinstance(run, bool) or not isinstance(run, int) or not 0 <= run <= 9:
        raise ConfigError(f"benchmark.run={run!r}: CORe50 has predefined runs 0..9")
    root = resolve_root(dataset_root, "core50")
    images = "core50_32x32" if mini else "core50_128x128"
    lists = "batches_filelists" if scenario in ("ni", "nc", "nic") else f"NIC_v2_{scenario[6:]}"
    require(
        root,
        [images, lists, "paths.pkl", "labels.pkl", "LUP.pkl", "labels2names.pkl"],
        what="CORe50",
        url="https://vlomonaco.github.io/core50/data/paths.pkl",
        download=download,
        hint="the CORe50 image folder, file lists and .pkl metadata",
    )
    benchmark = _build(
        lambda: CORe50(
            scenario=scenario,
            run=run,
            object_lvl=bool(object_level),
            mini=bool(mini),
            train_transform=_default_eval_transform,
            eval_transform=_default_eval_transform,
            dataset_root=root,
        ),
        root,
        "CORe50",
    )
    return materialize(
        benchmark,
        name="core50",
        scenario="domain_incremental" if scenario == "ni" else "class_incremental",
        n_classes=50 if object_level else 10,
        task_labels=False,
        in_memory=in_memory,
        shared_test="by_class" if scenario == "nc" else "all",
    )
