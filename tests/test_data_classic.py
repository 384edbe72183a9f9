"""Avalanche classics from config: prepared roots (real MNIST test images, generated files in
torchvision's formats) and the one-line failure when data is absent and cannot be downloaded."""

import gzip
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lifelong_moe.data import downloads
from lifelong_moe.data.classic import permuted_mnist, rotated_mnist, split_mnist
from lifelong_moe.data.materialize import TripleView, read_tensors
from lifelong_moe.errors import ConfigError
from tests.conftest import benchmark_from_yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "benchmark"
MNIST_T10K = REPO.parent / "shared" / "data" / "mnist-t10k"
CLASSICS = [
    "split_mnist",
    "permuted_mnist",
    "rotated_mnist",
    "split_fmnist",
    "split_cifar10",
    "split_cifar100",
    "split_tinyimagenet",
    "core50",
]


from_yaml = benchmark_from_yaml  # what the runner does with a benchmark config


def write_idx(path: Path, array: np.ndarray) -> None:
    """torchvision's raw MNIST format: magic (0, 0, 8=uint8, ndim), big-endian dims, bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def read_idx_gz(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_mnist_root(root: Path, folder: str, images, labels, n_train: int) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train:])


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    """1,000 train and 500 test images cut from the real MNIST test set."""
    if not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST test set not found at {MNIST_T10K}")
    images = read_idx_gz(MNIST_T10K / "t10k-images-idx3-ubyte.gz")[:1500]
    labels = read_idx_gz(MNIST_T10K / "t10k-labels-idx1-ubyte.gz")[:1500]
    root = tmp_path_factory.mktemp("mnist")
    write_mnist_root(root, "MNIST", images, labels, n_train=1000)
    return root


def test_split_mnist_from_prepared_root(mnist_root):
    stream = from_yaml("split_mnist", seed=1, dataset_root=str(mnist_root), task_labels=True)
    assert stream.name == "split_mnist" and stream.input_shape == (1, 28, 28)
    assert stream.n_classes == 10 and len(stream) == 5 and stream.task_labels
    assert sum(len(e.train) for e in stream.experiences) == 1000
    assert sum(len(e.test) for e in stream.experiences) == 500
    seen = []
    for i, exp in enumerate(stream.experiences):
        x, y, t = exp.train.tensors
        assert set(y.tolist()) == set(exp.classes) and (t == i).all() and exp.task_id == i
        assert set(exp.test.tensors[1].tolist()) <= set(exp.classes)
        seen += exp.classes
    assert sorted(seen) == list(range(10))
    # Avalanche's normalisation, (x - 0.1307) / 0.3081: background pixels sit at the minimum
    x = stream.experiences[0].train.tensors[0]
    assert torch.isclose(x.min(), torch.tensor(-0.1307 / 0.3081), atol=1e-4)
    # the Avalanche peer reads the same tensors
    theirs = read_tensors(stream.avalanche.train_stream[2].dataset)
    for a, b in zip(stream.experiences[2].train.tensors, theirs.tensors, strict=True):
        assert torch.equal(a, b)
    # same seed, same order; the order is Avalanche's SplitMNIST order for that seed
    again = split_mnist(seed=1, dataset_root=str(mnist_root))
    assert [e.classes for e in again.experiences] == [e.classes for e in stream.experiences]
    other = split_mnist(seed=2, dataset_root=str(mnist_root))
    assert [e.classes for e in other.experiences] != [e.classes for e in stream.experiences]


def test_permuted_and_rotated_mnist_keep_labels(mnist_root):
    perm = permuted_mnist(n_experiences=2, seed=0, dataset_root=str(mnist_root))
    assert perm.scenario == "domain_incremental" and perm.n_classes == 10
    base = perm.experiences[0].test.tensors[1].sort().values
    for exp in perm.experiences:
        assert exp.classes == list(range(10))
        assert torch.equal(exp.test.tensors[1].sort().values, base)  # labels 0..9, not 10..19
    assert not torch.equal(perm.experiences[0].test.tensors[0], perm.experiences[1].test.tensors[0])
    rot = rotated_mnist(n_experiences=2, rotations=[0, 90], dataset_root=str(mnist_root))
    x0, x1 = (e.test.tensors[0] for e in rot.experiences)
    assert torch.allclose(torch.rot90(x0, 1, dims=(2, 3)), x1, atol=1e-5)
    with pytest.raises(ConfigError, match=r"benchmark.rotations=\[0\]"):
        rotated_mnist(n_experiences=2, rotations=[0], dataset_root=str(mnist_root))


def test_split_fmnist_from_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 6).astype(np.uint8)
    images = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8)
    write_mnist_root(tmp_path, "FashionMNIST", images, labels, n_train=40)
    stream = from_yaml("split_fmnist", dataset_root=str(tmp_path), n_experiences=2)
    assert stream.input_shape == (1, 28, 28) and len(stream) == 2
    assert sum(len(e.train) for e in stream.experiences) == 40


def test_split_cifar10_from_generated_pickles(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # torchvision checks the real archive's md5 sums; generated pickles cannot match them
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(name: str, n: int) -> None:
        entry = {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))

    for i in range(1, 6):
        batch(f"data_batch_{i}", 10)
    batch("test_batch", 20)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    stream = from_yaml("split_cifar10", seed=0, dataset_root=str(tmp_path))
    assert stream.input_shape == (3, 32, 32) and stream.n_classes == 10 and len(stream) == 5
    assert sum(len(e.train) for e in stream.experiences) == 50
    # train uses the eval transform (no random crop/flip): reading twice gives the same tensors
    theirs = read_tensors(stream.avalanche.train_stream[0].dataset)
    assert torch.equal(theirs.tensors[0], stream.experiences[0].train.tensors[0])


def test_split_tinyimagenet_lazy_from_generated_folder(tmp_path):
    data = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (data / "val" / "images").mkdir(parents=True)
    (data / "wnids.txt").write_text("\n".join(wnids) + "\n")
    pixels = np.full((64, 64, 3), 128, np.uint8)
    annotations = []
    for i, wnid in enumerate(wnids):
        images = data / "train" / wnid / "images"
        images.mkdir(parents=True)
        Image.fromarray(pixels).save(images / f"{wnid}_0.JPEG")
        Image.fromarray(pixels).save(data / "val" / "images" / f"val_{i}.JPEG")
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (data / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    stream = from_yaml("split_tinyimagenet", dataset_root=str(tmp_path), n_experiences=10)
    assert stream.n_classes == 200 and len(stream) == 10 and stream.input_shape == (3, 64, 64)
    exp = stream.experiences[3]
    assert isinstance(exp.train, TripleView) and len(exp.train) == 20
    x, y, t = exp.train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and t.dtype == torch.int64
    assert int(y) in exp.classes and len(exp.classes) == 20


@pytest.mark.parametrize("name", CLASSICS)
def test_missing_data_offline_is_one_fast_config_error(name, tmp_path, monkeypatch):
    probes = []
    monkeypatch.setattr(downloads, "reachable", lambda url, timeout=3.0: probes.append(url))
    empty = tmp_path / "empty"
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        from_yaml(name, dataset_root=str(empty))
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert "\n" not in message and f"benchmark.dataset_root={empty}" in message
    assert "could not be downloaded" in message and "offline?" in message and "put " in message
    assert probes and elapsed < 2.0
    assert not empty.exists()  # nothing was created or downloaded


def test_download_false_never_probes(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "reachable", lambda *a, **k: pytest.fail("probed"))
    message = str(
        pytest.raises(ConfigError, split_mnist, dataset_root=str(tmp_path), download=False).value
    )
    assert "MNIST/raw/train-images-idx3-ubyte missing" in message
    assert "benchmark.download=false" in message


def test_reachability_probe_is_bounded():
    start = time.perf_counter()
    assert not downloads.reachable("http://127.0.0.1:9/", timeout=1.0)
    assert not downloads.reachable("https://host.invalid/x", timeout=1.0)
    assert time.perf_counter() - start < 2.5


def test_bad_knobs_fail_before_touching_data(tmp_path):
    cases = [
        ("split_mnist", {"n_experiences": 3}, "benchmark.n_experiences=3"),
        ("split_cifar100", {"n_experiences": 7}, "benchmark.n_experiences=7"),
        ("split_fmnist", {"fixed_class_order": [0, 1]}, "benchmark.fixed_class_order"),
        ("permuted_mnist", {"n_experiences": 0}, "benchmark.n_experiences=0"),
        ("core50", {"scenario": "xx"}, "benchmark.scenario='xx'"),
        ("core50", {"run": 12}, "benchmark.run=12"),
    ]
    for name, overrides, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            from_yaml(name, dataset_root=str(tmp_path / "none"), download=False, **overrides)


def test_loading_turns_library_errors_into_one_line(tmp_path):
    with pytest.raises(ConfigError) as err, downloads.loading(tmp_path, "MNIST"):
        raise RuntimeError("Dataset not found.\nYou can use download=True")
    assert str(err.value) == (
        f"benchmark.dataset_root={tmp_path}: could not load or download MNIST "
        "(RuntimeError: Dataset not found.)"
    )


# ---------------------------------------------------------------- validation split (issue 24)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    """80 train images (8 per class) and 40 test images, random pixels: no two alike."""
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 12).astype(np.uint8)
    images = rng.integers(0, 256, size=(120, 28, 28), dtype=np.uint8)
    root = tmp_path_factory.mktemp("fmnist")
    write_mnist_root(root, "FashionMNIST", images, labels, n_train=80)
    return root


def test_classic_validation_is_carved_from_train_fixed_by_seed(fmnist_root):
    def build(seed: int = 0, **keys):
        return from_yaml(
            "split_fmnist", seed=seed, dataset_root=str(fmnist_root), n_experiences=2, **keys
        )

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    full = build()
    test = build(validation_fraction=0.25)
    valid = build(validation_fraction=0.25, split="validation")
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG is untouched
    for i, exp in enumerate(valid.experiences):
        train, held = exp.train.tensors, exp.test.tensors
        # the training data is the same whichever set is evaluated; test is the untouched test
        assert torch.equal(train[0], test.experiences[i].train.tensors[0])
        assert torch.equal(test.experiences[i].test.tensors[0], full.experiences[i].test.tensors[0])
        # validation and train are disjoint and together are the original training part
        assert not rows(train[0]) & rows(held[0])
        assert rows(train[0]) | rows(held[0]) == rows(full.experiences[i].train.tensors[0])
        assert len(train[0]) + len(held[0]) == len(full.experiences[i].train) == 40
        assert not rows(held[0]) & rows(full.experiences[i].test.tensors[0])
        # class-balanced: 2 of each of the experience's 5 classes (8 training images each)
        assert sorted(held[1].tolist()) == sorted(exp.classes * 2)
        # Avalanche strategies (method=avalanche) train on exactly our training tensors
        theirs = read_tensors(valid.avalanche.train_stream[i].dataset).tensors
        assert torch.equal(theirs[0], train[0]) and not rows(theirs[0]) & rows(held[0])
    # same seed, same split; another seed draws other validation images
    again = build(validation_fraction=0.25, split="validation")
    other = build(seed=1, validation_fraction=0.25, split="validation")
    for a, b in zip(again.experiences, valid.experiences, strict=True):
        assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    pooled = [rows(torch.cat([e.test.tensors[0] for e in s.experiences])) for s in (valid, other)]
    assert pooled[0] != pooled[1]


def test_shared_test_sets_pool_the_validation_parts():
    """CORe50's path: one shared held-out set, served whole ("all") or by class ("by_class")."""
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    from lifelong_moe.data.materialize import materialize
    from lifelong_moe.data.validation import with_validation_stream

    x, y = torch.randn(40, 3), torch.arange(4).repeat(10)
    with torch.random.fork_rng(devices=[]):
        benchmark = nc_benchmark(
            TensorDataset(x, y), TensorDataset(x[:8], y[:8]), 2, task_labels=False, seed=0
        )
    split = with_validation_stream(benchmark, 0.2, seed=0)
    parts = [rows(read_tensors(e.dataset).tensors[0]) for e in split.valid_stream]
    assert [len(p) for p in parts] == [4, 4]
    args = dict(name="toy", scenario="class_incremental", n_classes=4, task_labels=False)
    every = materialize(split, shared_test="all", split="validation", **args)
    by_class = materialize(split, shared_test="by_class", split="validation", **args)
    for i in range(2):
        assert rows(every.experiences[i].test.tensors[0]) == parts[0] | parts[1]
        assert rows(by_class.experiences[i].test.tensors[0]) == parts[i]
        assert not rows(by_class.experiences[i].train.tensors[0]) & (parts[0] | parts[1])


def test_validation_split_needs_a_fraction(tmp_path):
    for name in CLASSICS:
        with pytest.raises(ConfigError) as err:
            from_yaml(name, dataset_root=str(tmp_path / "none"), download=False, split="validation")
        assert str(err.value) == (
            "benchmark.split=validation needs benchmark.validation_fraction > 0 (the share of "
            "the training part held out for validation), got 0"
        )
    with pytest.raises(ConfigError, match="benchmark.validation_fraction=1.0"):
        from_yaml("core50", dataset_root=str(tmp_path), download=False, validation_fraction=1.0)


def test_avalanche_strategies_train_on_the_split_stream(fmnist_root):
    """method=avalanche on a split classic: Avalanche's EWC runs on the split experiences, which
    carry the task label and experience index its plugins read."""
    from lifelong_moe.methods.avalanche_peer import AvalanchePeer
    from lifelong_moe.models.mlp import ResidualMLP
    from lifelong_moe.moe import MoESettings

    stream = from_yaml(
        "split_fmnist",
        dataset_root=str(fmnist_root),
        n_experiences=2,
        validation_fraction=0.25,
        split="validation",
    )
    torch.manual_seed(0)
    model = ResidualMLP([1, 28, 28], 10, d_model=8, d_hidden=8, moe=MoESettings(blocks=[0]))
    method = AvalanchePeer(
        model, strategy="EWC", strategy_args={"ewc_lambda": 0.4}, train_epochs=1, seed=0
    )
    method.setup_stream(stream)
    for exp in stream.experiences:
        before = [p.detach().clone() for p in model.parameters()]
        method.before_experience(exp)
        method.fit_experience(exp, None, None)
        method.after_experience(exp)
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    ewc = next(p for p in method.strategy.plugins if hasattr(p, "saved_params"))
    assert sorted(ewc.saved_params) == [0, 1]  # one entry per experience
