"""Avalanche's classic vision benchmarks, configured from Hydra and materialised as Streams.

One table, ``CLASSICS``, says what differs between the datasets (Avalanche generator, download
folder and host, the files that prove the data is there, classes, scenario, transform); one
builder, :func:`build`, turns an entry and the user's knobs into a Stream. Each
``conf/benchmark/<name>.yaml`` targets the function of the same name below.

Each stream comes from Avalanche's own generator (SplitMNIST, PermutedMNIST, ...) so the class
orders and permutations for a seed are the ones Avalanche users get. Two deliberate changes:

* Training uses Avalanche's default *eval* transform (ToTensor + the dataset's Normalize):
  materialising once would freeze one random crop/flip per image, which is worse than none.
  MNIST and Fashion-MNIST defaults have no augmentation, so for them nothing changes.
* Data must be on disk or downloadable; otherwise one ConfigError line, after at most a
  3-second connection probe (see :mod:`lifelong_moe.data.downloads`).

``validation_fraction`` > 0 moves that share of each training experience's examples of every
class into a validation set, drawn by the seed and never trained on (Avalanche's own split, see
:mod:`lifelong_moe.data.validation`); ``split`` says which held-out set ``Experience.test``
holds: ``test`` (what studies report) or ``validation`` (what settings are chosen on). The
training data is the same either way, and ``Stream.avalanche`` is the split benchmark, so
``method=avalanche`` never trains on a validation example either.

MNIST-sized and CIFAR-sized streams are read into memory; TinyImageNet and CORe50 stay lazy by
default (``in_memory: false``) because their float32 tensors would need 5 GB and more.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lifelong_moe import checks
from lifelong_moe.data.arrays import (
    check_class_order,
    check_count,
    check_n_experiences,
    check_split,
)
from lifelong_moe.data.downloads import loading, require, resolve_root
from lifelong_moe.data.materialize import materialize
from lifelong_moe.data.validation import with_validation_stream
from lifelong_moe.errors import ConfigError
from lifelong_moe.stream import Stream


@dataclass(frozen=True)
class Classic:
    """What one Avalanche classic needs besides the user's knobs."""

    name: str  # stream name, the builder function and conf/benchmark/<name>.yaml
    generator: str  # its generator in avalanche.benchmarks.classic
    what: str  # the dataset, as messages name it
    folder: str  # Avalanche's default root: ~/.avalanche/data/<folder>
    files: tuple[str, ...]  # relative to the root; all present: no download needed
    url: str  # the host torchvision/Avalanche download from (probed before they start)
    hint: str  # what to put in the root by hand
    n_classes: int
    input_shape: tuple[int, ...]  # what materialize reads back (documentation)
    scenario: str = "class_incremental"
    n_experiences: int = 5  # default of the builder's n_experiences
    in_memory: bool = True  # default of the builder's in_memory
    # "module:attribute" under avalanche.benchmarks.classic of the eval transform that train
    # uses too; None keeps the generator's defaults (ToTensor + Normalize, no augmentation).
    eval_transform: str | None = None
    return_task_id: bool = True  # the generator takes task_labels as return_task_id


def _torchvision_idx(folder: str, url: str) -> dict[str, Any]:
    """MNIST and Fashion-MNIST: torchvision's raw idx files, 10 classes of (1, 28, 28)."""
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    files += ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    return dict(
        what=folder,
        folder=folder.lower(),
        files=tuple(f"{folder}/raw/{f}" for f in files),
        url=url,
        hint=f"the torchvision {folder} files ({folder}/raw/*-ubyte, uncompressed)",
        n_classes=10,
        input_shape=(1, 28, 28),
    )


def _cifar(n: int, files: tuple[str, str]) -> dict[str, Any]:
    return dict(
        what=f"CIFAR-{n}",
        folder=f"cifar{n}",
        files=files,
        url="https://www.cs.toronto.edu/~kriz/",
        hint=f"the extracted torchvision CIFAR-{n} python archive",
        n_classes=n,
        input_shape=(3, 32, 32),
        eval_transform=f"ccifar{n}:_default_cifar{n}_eval_transform",
    )


MNIST = _torchvision_idx("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/")
FMNIST = _torchvision_idx(
    "FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
)
TINY = "tiny-imagenet-200"
CLASSICS = {
    spec.name: spec
    for spec in [
        Classic("split_mnist", "SplitMNIST", **MNIST),
        Classic("permuted_mnist", "PermutedMNIST", **MNIST, scenario="domain_incremental"),
        Classic("rotated_mnist", "RotatedMNIST", **MNIST, scenario="domain_incremental"),
        Classic("split_fmnist", "SplitFMNIST", **FMNIST),
        Classic(
            "split_cifar10",
            "SplitCIFAR10",
            **_cifar(10, ("cifar-10-batches-py/test_batch", "cifar-10-batches-py/data_batch_5")),
        ),
        Classic(
            "split_cifar100",
            "SplitCIFAR100",
            **_cifar(100, ("cifar-100-python/train", "cifar-100-python/test")),
            n_experiences=10,
        ),
        Classic(
            "split_tinyimagenet",
            "SplitTinyImageNet",
            what="TinyImageNet",
            folder="tinyimagenet",
            files=(f"{TINY}/wnids.txt", f"{TINY}/train", f"{TINY}/val/val_annotations.txt"),
            url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            hint="the extracted tiny-imagenet-200 folder",
            n_classes=200,
            input_shape=(3, 64, 64),
            n_experiences=10,
            in_memory=False,
            eval_transform="ctiny_imagenet:_default_eval_transform",
        ),
        # CORe50's image folder and file lists depend on its knobs: core50() adds them.
        Classic(
            "core50",
            "CORe50",
            what="CORe50",
            folder="core50",
            files=("paths.pkl", "labels.pkl", "LUP.pkl", "labels2names.pkl"),
            url="https://vlomonaco.github.io/core50/data/paths.pkl",
            hint="the CORe50 image folder, file lists and .pkl metadata",
            n_classes=50,  # objects; 10 categories with object_level=false
            input_shape=(3, 32, 32),  # mini; (3, 128, 128) with mini=false
            scenario="domain_incremental",  # ni; the other CORe50 scenarios add classes
            in_memory=False,
            eval_transform="core50:_default_eval_transform",
            return_task_id=False,  # its file lists fix the task label at 0
        ),
    ]
}


def build(
    spec: Classic,
    avalanche_args: dict[str, Any],
    *,
    dataset_root: str | None,
    download: bool,
    in_memory: bool,
    seed: int,
    validation_fraction: float = 0.0,
    split: str = "test",
    task_labels: bool = False,
    extra_files: Sequence[str] = (),
    scenario: str | None = None,
    n_classes: int | None = None,
    shared_test: str | None = None,
) -> Stream:
    """Check the data is there (or downloadable), run the generator, split off validation,
    materialise the Stream.

    ``avalanche_args`` go to Avalanche's generator, with ``return_task_id`` and the transforms
    added as the spec says; ``extra_files`` are required before the spec's files; ``scenario``
    and ``n_classes`` override the spec's. ``seed`` draws the validation split.
    """
    validation_fraction = check_split(split, validation_fraction)
    root = resolve_root(dataset_root, spec.folder)
    files = [*extra_files, *spec.files]
    require(root, files, what=spec.what, url=spec.url, download=download, hint=spec.hint)
    classic = importlib.import_module("avalanche.benchmarks.classic")
    generator = getattr(classic, spec.generator)
    args = dict(avalanche_args, dataset_root=root)
    if spec.return_task_id:
        args["return_task_id"] = bool(task_labels)
    if spec.eval_transform is not None:
        module, attribute = spec.eval_transform.split(":")
        transform = getattr(importlib.import_module(f"{classic.__name__}.{module}"), attribute)
        args["train_transform"] = args["eval_transform"] = transform
    # Avalanche's generators reseed torch's global RNG: keep that out of the caller.
    with torch.random.fork_rng(devices=[]), loading(root, spec.what):
        benchmark = generator(**args)
    if validation_fraction:
        benchmark = with_validation_stream(benchmark, validation_fraction, seed)
    return materialize(
        benchmark,
        name=spec.name,
        scenario=scenario or spec.scenario,
        n_classes=n_classes or spec.n_classes,
        task_labels=bool(task_labels),
        in_memory=in_memory,
        shared_test=shared_test,
        split=split,
    )


def _class_split(spec: Classic) -> Callable[..., Stream]:
    """The builder of a class-incremental classic: classes split evenly, seeded order."""

    def split(
        n_experiences: int = spec.n_experiences,
        seed: int = 0,
        fixed_class_order: Sequence[int] | None = None,
        task_labels: bool = False,
        dataset_root: str | None = None,
        download: bool = True,
        in_memory: bool = spec.in_memory,
        validation_fraction: float = 0.0,
        split: str = "test",
    ) -> Stream:
        check_n_experiences(n_experiences, spec.n_classes)
        order = check_class_order(fixed_class_order, spec.n_classes)
        return build(
            spec,
            dict(n_experiences=n_experiences, seed=seed, fixed_class_order=order),
            dataset_root=dataset_root,
            download=download,
            in_memory=in_memory,
            seed=seed,
            validation_fraction=validation_fraction,
            split=split,
            task_labels=task_labels,
        )

    split.__name__ = split.__qualname__ = spec.name
    split.__doc__ = (
        f"Class-incremental {spec.what} (Avalanche's {spec.generator}), inputs "
        f"{spec.input_shape}{'; lazy by default' if not spec.in_memory else ''}."
    )
    return split


split_mnist = _class_split(CLASSICS["split_mnist"])
split_fmnist = _class_split(CLASSICS["split_fmnist"])
split_cifar10 = _class_split(CLASSICS["split_cifar10"])  # ~740 MB in memory
split_cifar100 = _class_split(CLASSICS["split_cifar100"])  # ~740 MB in memory
split_tinyimagenet = _class_split(CLASSICS["split_tinyimagenet"])  # ~5 GB in memory


def permuted_mnist(
    n_experiences: int = 5,
    seed: int = 0,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
    validation_fraction: float = 0.0,
    split: str = "test",
) -> Stream:
    """Domain-incremental MNIST: a seeded pixel permutation per experience, the first included
    (Avalanche's PermutedMNIST has no identity experience). ~220 MB per experience in memory."""
    check_count(n_experiences)
    return build(
        CLASSICS["permuted_mnist"],
        dict(n_experiences=n_experiences, seed=seed),
        dataset_root=dataset_root,
        download=download,
        in_memory=in_memory,
        seed=seed,
        validation_fraction=validation_fraction,
        split=split,
        task_labels=task_labels,
    )


def rotated_mnist(
    n_experiences: int = 5,
    seed: int = 0,
    rotations: Sequence[int] | None = None,
    task_labels: bool = False,
    dataset_root: str | None = None,
    download: bool = True,
    in_memory: bool = True,
    validation_fraction: float = 0.0,
    split: str = "test",
) -> Stream:
    """Domain-incremental MNIST: one fixed rotation per experience, seeded in [-180, 180] degrees
    unless ``rotations`` lists them."""
    check_count(n_experiences)
    if rotations is not None:
        rotations = [int(r) for r in rotations]
        if len(rotations) != n_experiences or any(not -180 <= r <= 180 for r in rotations):
            raise ConfigError(
                f"benchmark.rotations={rotations}: expected {n_experiences} angles "
                "(one per experience) in [-180, 180]"
            )
    return build(
        CLASSICS["rotated_mnist"],
        dict(n_experiences=n_experiences, seed=seed, rotations_list=rotations),
        dataset_root=dataset_root,
        download=download,
        in_memory=in_memory,
        seed=seed,
        validation_fraction=validation_fraction,
        split=split,
        task_labels=task_labels,
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
    seed: int = 0,
    validation_fraction: float = 0.0,
    split: str = "test",
) -> Stream:
    """CORe50 with Avalanche's predefined runs; lazy by default.

    CORe50 has one test set. For ``nc`` each experience is tested on its own classes; for the
    other scenarios every experience is tested on the whole test set, as CORe50 reports it.
    The validation set is drawn (by ``seed``; the run fixes the order) from each training
    experience and pooled into one shared set that is served the same way.
    ``ni`` (same 50 objects, new sessions) is domain-incremental, the rest class-incremental.
    CORe50's file lists fix the task label at 0, so there is no ``task_labels`` knob.
    """
    checks.choice("benchmark.scenario", scenario, CORE50_SCENARIOS)
    checks.integer("benchmark.run", run, low=0, high=9)
    lists = "batches_filelists" if scenario in ("ni", "nc", "nic") else f"NIC_v2_{scenario[6:]}"
    return build(
        CLASSICS["core50"],
        dict(scenario=scenario, run=run, object_lvl=bool(object_level), mini=bool(mini)),
        dataset_root=dataset_root,
        download=download,
        in_memory=in_memory,
        seed=seed,
        validation_fraction=validation_fraction,
        split=split,
        extra_files=["core50_32x32" if mini else "core50_128x128", lists],
        scenario="domain_incremental" if scenario == "ni" else "class_incremental",
        n_classes=50 if object_level else 10,
        shared_test="by_class" if scenario == "nc" else "all",
    )
