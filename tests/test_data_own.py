"""The user's own data: npz files and image folders, happy paths and every invalid case."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lifelong_moe.data.own import image_folder, npz
from lifelong_moe.errors import ConfigError
from tests.conftest import benchmark_from_yaml

CONF = Path(__file__).resolve().parents[1] / "conf" / "benchmark"


from_yaml = benchmark_from_yaml  # what the runner does with a benchmark config


def blobs(n_per_class: int, labels, shape=(6,), seed=0, dtype=np.float32):
    """Separable class clusters so that labels stay attached to their inputs."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(labels), n_per_class)
    x = rng.normal(size=(len(y), *shape)) + y.reshape(-1, *[1] * len(shape)) * 10.0
    if dtype == np.uint8:
        x = np.clip(x * 2 + 20, 0, 255)
    return x.astype(dtype), y.astype(np.int64)


def save(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ npz happy paths


def test_npz_class_incremental_from_yaml(tmp_path):
    x, y = blobs(10, [3, 7, 12, 20], shape=(2, 4, 4))
    path = save(tmp_path / "d.npz", x=x, y=y)
    stream = from_yaml("npz", seed=1, path=path, n_experiences=2)
    assert stream.name == "npz" and stream.n_classes == 4 and stream.input_shape == (2, 4, 4)
    assert stream.scenario == "class_incremental"
    covered = []
    for exp in stream.experiences:
        assert len(exp.classes) == 2
        xs, ys, ts = exp.train.tensors
        assert set(ys.tolist()) == set(exp.classes) and (ts == 0).all()
        # labels renumbered 3,7,12,20 -> 0..3 and still attached to their cluster
        means = [xs[ys == c].mean().item() for c in exp.classes]
        assert means == sorted(means)
        covered += exp.classes
    assert sorted(covered) == [0, 1, 2, 3]
    total = sum(len(e.train) + len(e.test) for e in stream.experiences)
    assert total == 40
    x_all = torch.cat([e.train.tensors[0] for e in stream.experiences])
    assert abs(x_all.mean().item()) < 1e-4


def test_npz_given_test_set_uint8_classes_per_experience_order_and_task_labels(tmp_path):
    x, y = blobs(8, [0, 1, 2, 3, 4, 5], dtype=np.uint8)
    xt, yt = blobs(3, [0, 1, 2, 3, 4, 5], dtype=np.uint8, seed=1)
    path = save(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    stream = npz(
        path=path,
        classes_per_experience=3,
        class_order=[5, 4, 3, 2, 1, 0],
        task_labels=True,
        normalize=False,
    )
    assert [e.classes for e in stream.experiences] == [[3, 4, 5], [0, 1, 2]]
    assert [e.task_id for e in stream.experiences] == [0, 1]
    assert sum(len(e.test) for e in stream.experiences) == 18
    assert (stream.experiences[1].test.tensors[2] == 1).all()
    x0 = stream.experiences[0].train.tensors[0]
    assert x0.dtype == torch.float32 and x0.min() >= 0.0 and x0.max() <= 1.0


def test_npz_seeded_split_is_deterministic_and_stratified(tmp_path):
    x, y = blobs(20, [0, 1, 2, 3])
    path = save(tmp_path / "d.npz", x=x, y=y)
    a = npz(path=path, n_experiences=1, seed=2, test_fraction=0.25)
    b = npz(path=path, n_experiences=1, seed=2, test_fraction=0.25)
    c = npz(path=path, n_experiences=1, seed=3, test_fraction=0.25)
    ta, tb, tc = (s.experiences[0].test.tensors[0] for s in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)
    counts = np.bincount(a.experiences[0].test.tensors[1].numpy())
    assert counts.tolist() == [5, 5, 5, 5]


def test_npz_domain_incremental(tmp_path):
    paths = []
    for i in range(3):
        x, y = blobs(6, [0, 1, 2], seed=i)
        paths.append(save(tmp_path / f"d{i}.npz", x=x + 100 * i, y=y))
    stream = from_yaml("npz", scenario="domain_incremental", paths=paths, task_labels=True)
    assert stream.scenario == "domain_incremental" and len(stream) == 3 and stream.n_classes == 3
    means = []
    for i, exp in enumerate(stream.experiences):
        assert exp.classes == [0, 1, 2] and exp.task_id == i
        assert sorted(set(exp.test.tensors[1].tolist())) == [0, 1, 2]
        means.append(exp.train.tensors[0].mean().item())
    assert abs(means[0]) < 1e-4 and means[0] < means[1] < means[2]  # first domain's statistics


# ------------------------------------------------------------------ npz invalid cases


def test_npz_missing_and_unreadable_files(tmp_path):
    message = one_line_error(npz, path=str(tmp_path / "nope.npz"), n_experiences=1)
    assert "benchmark.path=" in message and "nope.npz" in message and "no such file" in message
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    message = one_line_error(npz, path=str(junk), n_experiences=1)
    assert "junk.npz" in message and "cannot read" in message
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    assert "single .npy" in one_line_error(npz, path=str(single), n_experiences=1)
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    assert "obj.npz" in one_line_error(npz, path=str(obj), n_experiences=1)


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"x": np.zeros((4, 2), np.float32)}, "no array 'y'"),
        ({"inputs": np.zeros((4, 2)), "y": np.zeros(4, np.int64)}, "no array 'x'"),
        (
            {"x": np.zeros((4, 2), np.float32), "y": np.zeros(3, np.int64)},
            "x has 4 rows but y has 3",
        ),
        ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(4)}, "y has dtype float64"),
        ({"x": np.zeros((4, 2), np.int32), "y": np.zeros(4, np.int64)}, "x has dtype int32"),
        ({"x": np.zeros(4, np.float32), "y": np.zeros(4, np.int64)}, "x has shape (4,)"),
        (
            {"x": np.full((4, 2), np.nan, np.float32), "y": np.zeros(4, np.int64)},
            "NaN",
        ),
        (
            {
                "x": np.zeros((4, 2), np.float32),
                "y": np.arange(4),
                "x_test": np.zeros((4, 2), np.float32),
            },
            "only one of x_test/y_test",
        ),
        (
            {
                "x": np.zeros((4, 2), np.float32),
                "y": np.arange(4),
                "x_test": np.zeros((2, 2), np.float32),
                "y_test": np.array([0, 9]),
            },
            "test labels [9]",
        ),
        (
            {
                "x": np.zeros((4, 2), np.float32),
                "y": np.arange(4),
                "x_test": np.zeros((2, 3), np.float32),
                "y_test": np.array([0, 1]),
            },
            "inputs have shape",
        ),
        (
            {
                "x": np.zeros((4, 2), np.float32),
                "y": np.array([0, 1, 5, 5]),
                "x_test": np.zeros((2, 2), np.float32),
                "y_test": np.array([0, 1]),
            },
            "no test example of classes [5]",
        ),
    ],
)
def test_npz_invalid_contents(tmp_path, arrays, expected):
    path = save(tmp_path / "bad.npz", **arrays)
    message = one_line_error(npz, path=path, n_experiences=1)
    assert f"benchmark.path={path}" in message or "benchmark.path" in message
    assert expected in message


def test_npz_experience_counts(tmp_path):
    x, y = blobs(4, [0, 1, 2])
    path = save(tmp_path / "d.npz", x=x, y=y)
    message = one_line_error(npz, path=path, n_experiences=5)
    assert "benchmark.n_experiences=5" in message and "only 3 classes" in message
    x, y = blobs(4, list(range(10)))
    path = save(tmp_path / "ten.npz", x=x, y=y)
    message = one_line_error(npz, path=path, n_experiences=4)
    assert "benchmark.n_experiences=4" in message and "1, 2, 5, 10" in message
    message = one_line_error(npz, path=path, classes_per_experience=3)
    assert "benchmark.classes_per_experience=3" in message and "valid choices" in message
    assert "set exactly one" in one_line_error(npz, path=path)
    assert "set exactly one" in one_line_error(
        npz, path=path, n_experiences=2, classes_per_experience=5
    )
    message = one_line_error(npz, path=path, n_experiences=2, class_order=[0, 1, 2])
    assert "class_order" in message
    message = one_line_error(npz, path=path, n_experiences=2, class_order=list(range(9)) + [42])
    assert "[42]" in message


def test_npz_split_needs_two_examples_per_class(tmp_path):
    x, y = blobs(3, [0, 1])
    path = save(tmp_path / "d.npz", x=np.concatenate([x, x[:1]]), y=np.append(y, 7))
    message = one_line_error(npz, path=path, n_experiences=1)
    assert "class 7 has 1 example" in message


def test_npz_scenario_and_source_keys(tmp_path):
    x, y = blobs(4, [0, 1])
    path = save(tmp_path / "d.npz", x=x, y=y)
    assert "benchmark.scenario='task'" in one_line_error(npz, path=path, scenario="task")
    assert "benchmark.path=None" in one_line_error(npz, n_experiences=1)
    message = one_line_error(npz, path=path, scenario="domain_incremental")
    assert "benchmark.paths=" in message
    message = one_line_error(npz, paths=[path], scenario="domain_incremental", class_order=[1, 0])
    assert "benchmark.class_order=" in message


def test_npz_domain_sources_must_share_classes_and_shapes(tmp_path):
    x, y = blobs(4, [0, 1, 2])
    a = save(tmp_path / "a.npz", x=x, y=y)
    b = save(tmp_path / "b.npz", x=x[y != 2], y=y[y != 2])
    message = one_line_error(npz, paths=[a, b], scenario="domain_incremental")
    assert f"benchmark.paths[1]={b}" in message and "lacks classes [2]" in message
    c = save(tmp_path / "c.npz", x=np.zeros((12, 3), np.float32), y=y)
    message = one_line_error(npz, paths=[a, c], scenario="domain_incremental")
    assert "c.npz" in message and "shape" in message


# ------------------------------------------------------------------ image folders


def write_images(root: Path, classes, n: int, size=(10, 12), seed=0) -> None:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(40 + 50 * k, 5, size=(*size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("ignored")


def test_image_folder_class_incremental_from_yaml(tmp_path):
    write_images(tmp_path / "imgs", ["cat", "dog", "emu", "fox"], n=5)
    stream = from_yaml(
        "image_folder",
        seed=0,
        root=str(tmp_path / "imgs"),
        classes_per_experience=2,
        image_size=[8, 6],
        class_order=["fox", "emu", "dog", "cat"],
    )
    assert stream.input_shape == (3, 8, 6) and stream.n_classes == 4
    assert [e.classes for e in stream.experiences] == [[2, 3], [0, 1]]
    x = torch.cat([e.train.tensors[0] for e in stream.experiences])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    # brightness grows with the class index: labels follow their folders
    exp = stream.experiences[1]
    xs, ys, _ = exp.train.tensors
    assert xs[ys == 0].mean() < xs[ys == 1].mean()


def test_image_folder_grayscale_test_root_and_domain(tmp_path):
    write_images(tmp_path / "train", ["a", "b"], n=3)
    write_images(tmp_path / "test", ["a", "b"], n=2, seed=1)
    stream = image_folder(
        root=str(tmp_path / "train"),
        test_root=str(tmp_path / "test"),
        channels=1,
        image_size=5,
        n_experiences=2,
    )
    assert stream.input_shape == (1, 5, 5)
    assert sum(len(e.test) for e in stream.experiences) == 4
    write_images(tmp_path / "d2", ["a", "b"], n=3, seed=2)
    domain = image_folder(
        roots=[str(tmp_path / "train"), str(tmp_path / "d2")],
        test_roots=[str(tmp_path / "test"), str(tmp_path / "test")],
        scenario="domain_incremental",
        image_size=4,
    )
    assert len(domain) == 2 and all(e.classes == [0, 1] for e in domain.experiences)
    assert all(len(e.test) == 4 for e in domain.experiences)


def test_image_folder_invalid(tmp_path):
    missing = tmp_path / "missing"
    message = one_line_error(image_folder, root=str(missing), n_experiences=1)
    assert f"benchmark.root={missing}" in message and "no such directory" in message
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    assert "no class sub-folders" in one_line_error(
        image_folder, root=str(tmp_path / "flat"), n_experiences=1
    )
    write_images(tmp_path / "ok", ["a", "b"], n=2)
    (tmp_path / "ok" / "c").mkdir()
    assert "class folder 'c' has no images" in one_line_error(
        image_folder, root=str(tmp_path / "ok"), n_experiences=1
    )
    (tmp_path / "ok" / "c" / "broken.png").write_bytes(b"garbage")
    message = one_line_error(image_folder, root=str(tmp_path / "ok"), n_experiences=1)
    assert "cannot read image" in message and "broken.png" in message
    write_images(tmp_path / "two", ["a", "b"], n=2)
    assert "benchmark.image_size=" in one_line_error(
        image_folder, root=str(tmp_path / "two"), n_experiences=1, image_size=[0, 3]
    )
    assert "benchmark.channels=2" in one_line_error(
        image_folder, root=str(tmp_path / "two"), n_experiences=1, channels=2
    )
    assert "benchmark.n_experiences=3" in one_line_error(
        image_folder, root=str(tmp_path / "two"), n_experiences=3
    )
    assert "['zebra']" in one_line_error(
        image_folder, root=str(tmp_path / "two"), n_experiences=1, class_order=["a", "zebra"]
    )
    assert "benchmark.test_roots=" in one_line_error(
        image_folder,
        roots=[str(tmp_path / "two")],
        test_roots=[],
        scenario="domain_incremental",
    )


# ------------------------------------------------------------------ validation split (issue 24)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def pooled(stream, part: str) -> torch.Tensor:
    return torch.cat([getattr(e, part).tensors[0] for e in stream.experiences])


def test_npz_validation_is_carved_from_train_fixed_by_seed(tmp_path):
    x, y = blobs(20, [0, 1, 2, 3])
    path = save(tmp_path / "d.npz", x=x, y=y)

    def build(seed: int = 2, **keys):
        keys |= dict(path=path, n_experiences=2, test_fraction=0.25, normalize=False)
        return from_yaml("npz", seed=seed, **keys)

    full, test = build(), build(validation_fraction=0.25)
    valid = build(validation_fraction=0.25, split="validation")
    train, held = pooled(valid, "train"), pooled(valid, "test")
    assert torch.equal(train, pooled(test, "train"))  # same training data either way
    assert torch.equal(pooled(test, "test"), pooled(full, "test"))  # test untouched
    assert len(held) == 15 and len(train) == 45 and len(pooled(full, "test")) == 20
    assert not rows(train) & rows(held) and not rows(held) & rows(pooled(full, "test"))
    assert rows(train) | rows(held) == rows(pooled(full, "train"))
    for exp in valid.experiences:  # stratified: each experience's classes in its validation set
        assert set(exp.test.tensors[1].tolist()) == set(exp.classes)
        theirs = valid.avalanche.train_stream[exp.index].dataset
        assert not rows(torch.stack([item[0] for item in theirs])) & rows(held)
    assert torch.equal(pooled(build(validation_fraction=0.25, split="validation"), "test"), held)
    other = build(seed=3, validation_fraction=0.25, split="validation")
    assert rows(pooled(other, "test")) != rows(held)
    message = one_line_error(npz, path=path, n_experiences=1, split="validation")
    assert message.startswith("benchmark.split=validation needs benchmark.validation_fraction > 0")
    message = one_line_error(npz, path=path, n_experiences=1, validation_fraction=0.01)
    assert "benchmark.validation_fraction=0.01" in message


def test_image_folder_validation_split(tmp_path):
    write_images(tmp_path / "imgs", ["a", "b"], n=10)
    keys = dict(root=str(tmp_path / "imgs"), n_experiences=2, image_size=4, normalize=False)
    full = from_yaml("image_folder", **keys)
    valid = from_yaml("image_folder", validation_fraction=0.3, split="validation", **keys)
    train, held = pooled(valid, "train"), pooled(valid, "test")
    assert len(train) == 9 and len(held) == 5  # 14 training images, ceil(30 %) held out
    assert not rows(train) & rows(held)
    assert rows(train) | rows(held) == rows(pooled(full, "train"))
