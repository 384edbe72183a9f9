"""Streams from the user's own data: ``.npz`` arrays or folders of images, one folder per class.

Both become labelled arrays and then follow the same path as the built-in digits. Labels are
renumbered 0..C-1 in sorted order of their original values (npz integers, folder names), so a
file labelled {3, 7, 12} gives a 3-class head. ``class_order`` is written in original values.

Scenarios:

* ``class_incremental``: one source; classes split evenly over ``n_experiences`` (or
  ``classes_per_experience``) in a seeded or given order.
* ``domain_incremental``: one source per experience (``paths`` / ``roots``), one label space;
  each source must contain every class (it is the same task on shifted inputs).

Without a test set, each source is split with a seeded stratified split (``test_fraction``).
``validation_fraction`` > 0 then carves a stratified, seeded validation set out of each source's
training part (never trained on), and ``split`` says which held-out set ``Experience.test``
holds: ``test`` (what studies report) or ``validation`` (what settings are chosen on), as for
the digits.
Inputs are standardised with the training statistics of the first experience's source, so the
later domains' shift in scale stays visible.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lifelong_moe import checks
from lifelong_moe.data.arrays import (
    Arrays,
    check_class_order,
    check_fraction,
    check_n_experiences,
    check_split,
    class_incremental,
    divisors,
    domain_incremental,
    standardize,
    stratified_split,
)
from lifelong_moe.errors import ConfigError
from lifelong_moe.stream import Stream

SCENARIOS = ("class_incremental", "domain_incremental")


@dataclass
class LabelledSource:
    """One labelled dataset as read from disk; labels keep their original values for now."""

    where: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


# ---------------------------------------------------------------- shared: sources -> stream


def _count_experiences(
    n_experiences: int | None, classes_per_experience: int | None, n_classes: int
) -> int:
    if (n_experiences is None) == (classes_per_experience is None):
        raise ConfigError(
            f"benchmark.n_experiences={n_experiences} and benchmark.classes_per_experience="
            f"{classes_per_experience}: set exactly one of them for a class-incremental stream"
        )
    if classes_per_experience is None:
        return check_n_experiences(n_experiences, n_classes)
    per = checks.positive_int("benchmark.classes_per_experience", classes_per_experience)
    if n_classes % per:
        choices = ", ".join(map(str, divisors(n_classes)))
        raise ConfigError(
            f"benchmark.classes_per_experience={per!r} does not divide the {n_classes} classes: "
            f"valid choices: {choices}"
        )
    return n_classes // per


def _floats(x: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(x))
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _check_covers(
    source: LabelledSource, codes: dict, y: torch.Tensor, held: torch.Tensor, what: str, fix: str
) -> None:
    """Avalanche's generators fail on a class without held-out examples: say which and why."""
    absent = sorted(set(y.tolist()) - set(held.tolist()))
    if absent:
        names = [list(codes)[c] for c in absent[:5]]
        raise ConfigError(f"{source.where}: no {what} example of classes {names}: {fix}")


def _to_tensors(source: LabelledSource, codes: dict, spec: StreamSpec) -> Arrays:
    """Encode labels 0..C-1, split off test (when there is no test set) and validation, check
    each held-out set covers every class; the returned "test" arrays are the set ``split``
    names."""
    encode = np.vectorize(codes.__getitem__, otypes=[np.int64])
    x, y = _floats(source.x), torch.from_numpy(encode(source.y))
    names = list(codes)
    if source.x_test is None:
        x, y, x_te, y_te = stratified_split(
            x, y, spec.test_fraction, spec.seed, source.where, names
        )
        fix = "raise benchmark.test_fraction"
    else:
        x_te, y_te = _floats(source.x_test), torch.from_numpy(encode(source.y_test))
        fix = "add test examples"
    _check_covers(source, codes, y, y_te, "test", fix)
    if spec.validation_fraction:
        key = "validation_fraction"
        x, y, x_va, y_va = stratified_split(
            x, y, spec.validation_fraction, spec.seed, source.where, names, key
        )
        _check_covers(source, codes, y, y_va, "validation", f"raise benchmark.{key}")
        if spec.split == "validation":
            x_te, y_te = x_va, y_va
    return x, y, x_te, y_te


def _check_sources(sources: list[LabelledSource]) -> None:
    shape = sources[0].x.shape[1:]
    for s in sources:
        if s.x.shape[1:] != shape:
            raise ConfigError(f"{s.where}: inputs have shape {s.x.shape[1:]}, the first {shape}")
        if s.y_test is None:
            continue
        unknown = sorted(set(s.y_test.tolist()) - set(s.y.tolist()))
        if unknown:
            raise ConfigError(
                f"{s.where}: test labels {unknown[:5]} never appear in the training data"
            )


@dataclass(frozen=True)
class StreamSpec:
    """How labelled sources become a stream: the benchmark's keys, read once by every step."""

    name: str
    scenario: str
    n_experiences: int | None
    classes_per_experience: int | None
    class_order: Sequence | None
    order_type: type  # what a class_order entry is: int (npz labels) or str (folder names)
    seed: int
    test_fraction: float
    validation_fraction: float  # 0: no validation set
    split: str  # which held-out set Experience.test holds: test or validation
    task_labels: bool
    normalize: bool
    channel_axis: int | None  # standardise per channel along this axis; None: one scalar


def _domain_stream(sources: list[LabelledSource], codes: dict, spec: StreamSpec) -> Stream:
    unused = {
        "n_experiences": spec.n_experiences,
        "classes_per_experience": spec.classes_per_experience,
        "class_order": spec.class_order,
    }
    for key, value in unused.items():
        if value is not None and not (key == "n_experiences" and value == len(sources)):
            raise ConfigError(
                f"benchmark.{key}={value}: a domain-incremental stream has one experience "
                f"per source ({len(sources)} given); leave it unset"
            )
    for s in sources:
        missing = sorted(set(codes) - set(np.unique(s.y).tolist()))
        if missing:
            raise ConfigError(
                f"{s.where} lacks classes {missing[:5]}: in a domain-incremental stream "
                f"every source holds all {len(codes)} classes"
            )
    parts = [_to_tensors(s, codes, spec) for s in sources]
    if spec.normalize:
        first, normed = parts[0][0], []
        for x_tr, y_tr, x_te, y_te in parts:
            _, x_tr, x_te = standardize(first, x_tr, x_te, channel_axis=spec.channel_axis)
            normed.append((x_tr, y_tr, x_te, y_te))
        parts = normed
    return domain_incremental(spec.name, parts, task_labels=spec.task_labels, n_classes=len(codes))


def _class_stream(source: LabelledSource, codes: dict, spec: StreamSpec) -> Stream:
    n_classes = len(codes)
    count = _count_experiences(spec.n_experiences, spec.classes_per_experience, n_classes)
    order = None
    if spec.class_order is not None:
        try:
            values = [spec.order_type(c) for c in spec.class_order]
        except (TypeError, ValueError):
            values = list(spec.class_order)
        unknown = [v for v in values if v not in codes]
        if unknown:
            raise ConfigError(
                f"benchmark.class_order={list(spec.class_order)}: {unknown[:3]} not among the "
                f"classes {list(codes)[:20]}"
            )
        order = check_class_order([codes[v] for v in values], n_classes, "class_order")
    x_tr, y_tr, x_te, y_te = _to_tensors(source, codes, spec)
    if spec.normalize:
        x_tr, x_te = standardize(x_tr, x_te, channel_axis=spec.channel_axis)
    return class_incremental(
        spec.name,
        (x_tr, y_tr, x_te, y_te),
        n_experiences=count,
        seed=spec.seed,
        class_order=order,
        task_labels=spec.task_labels,
        n_classes=n_classes,
    )


def _stream(sources: list[LabelledSource], spec: StreamSpec) -> Stream:
    """Labelled sources -> Stream; labels are renumbered in sorted order of their values."""
    check_fraction(spec.test_fraction)
    _check_sources(sources)
    labels = sorted(set().union(*(np.unique(s.y).tolist() for s in sources)))
    codes = {value: i for i, value in enumerate(labels)}
    if spec.scenario == "domain_incremental":
        return _domain_stream(sources, codes, spec)
    return _class_stream(sources[0], codes, spec)


def _sources(
    scenario: str, one: str | None, many: Sequence[str] | None, key: str, example: str
) -> list[tuple[str, str]]:
    """``[(config key, path)]`` for the scenario: ``key`` for one source, ``key + 's'`` for many."""
    checks.choice("benchmark.scenario", scenario, SCENARIOS)
    if scenario == "class_incremental":
        if one is None or many is not None:
            raise ConfigError(
                f"benchmark.{key}={one} benchmark.{key}s={many}: a class_incremental stream "
                f"reads one source, give benchmark.{key}={example}"
            )
        return [(key, str(one))]
    if many is None or one is not None or isinstance(many, str) or len(many) == 0:
        raise ConfigError(
            f"benchmark.{key}={one} benchmark.{key}s={many}: a domain_incremental stream reads "
            f"one source per experience, give benchmark.{key}s=[{example},...]"
        )
    return [(f"{key}s[{i}]", str(p)) for i, p in enumerate(many)]


# ---------------------------------------------------------------- npz


def _read_npz(key: str, path: str) -> LabelledSource:
    where = f"benchmark.{key}={path}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        data = np.load(file, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        first = (str(err).splitlines() or [""])[0]
        raise ConfigError(f"{where}: cannot read it as .npz ({first})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConfigError(f"{where} is a single .npy array: expected an .npz with x and y")

    found = ", ".join(sorted(arrays)) or "nothing"
    for name in ("x", "y"):
        if name not in arrays:
            raise ConfigError(
                f"{where} has no array '{name}' (found: {found}): expected x (N, ...) and y (N,)"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError(f"{where} has only one of x_test/y_test (found: {found}): give both")
    source = LabelledSource(
        where, arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")
    )
    for x_name, y_name in (("x", "y"), ("x_test", "y_test")):
        if x_name in arrays:
            _check_pair(where, x_name, arrays[x_name], y_name, arrays[y_name])
    if source.x_test is not None and source.x_test.shape[1:] != source.x.shape[1:]:
        raise ConfigError(
            f"{where}: x_test inputs have shape {source.x_test.shape[1:]}, "
            f"x inputs {source.x.shape[1:]}"
        )
    return source


def _check_pair(where: str, x_name: str, x: np.ndarray, y_name: str, y: np.ndarray) -> None:
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{where}: {x_name} has dtype {x.dtype}: expected float or uint8")
    if x.ndim < 2:
        raise ConfigError(f"{where}: {x_name} has shape {x.shape}: expected (N, features...)")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ConfigError(f"{where}: {x_name} contains NaN or infinite values")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"{where}: {y_name} has dtype {y.dtype} and shape {y.shape}: "
            "expected integer class labels of shape (N,)"
        )
    if len(x) != len(y):
        raise ConfigError(f"{where}: {x_name} has {len(x)} rows but {y_name} has {len(y)}")
    if len(x) == 0:
        raise ConfigError(f"{where}: {x_name} is empty")


def npz(
    path: str | None = None,
    paths: Sequence[str] | None = None,
    scenario: str = "class_incremental",
    n_experiences: int | None = None,
    classes_per_experience: int | None = None,
    class_order: Sequence[int] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    task_labels: bool = False,
    normalize: bool = True,
    validation_fraction: float = 0.0,
    split: str = "test",
) -> Stream:
    """A stream from ``.npz`` files with ``x`` (N, ...) float or uint8, ``y`` (N,) integers and
    optional ``x_test``/``y_test``. uint8 inputs are scaled to [0, 1]; ``normalize`` then
    standardises with one scalar mean/std, which is right for any array layout."""
    validation_fraction = check_split(split, validation_fraction)
    entries = _sources(scenario, path, paths, "path", "FILE.npz")
    sources = [_read_npz(key, p) for key, p in entries]
    spec = StreamSpec(
        "npz",
        scenario,
        n_experiences,
        classes_per_experience,
        class_order,
        order_type=int,
        seed=seed,
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        split=split,
        task_labels=bool(task_labels),
        normalize=bool(normalize),
        channel_axis=None,
    )
    return _stream(sources, spec)


# ---------------------------------------------------------------- image folders


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    many = isinstance(image_size, Sequence) and not isinstance(image_size, str)
    size = list(image_size) if many else [image_size]
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(checks.is_int(s) and s >= 1 for s in size):
        raise ConfigError(
            f"benchmark.image_size={image_size!r}: expected a positive integer or [height, width]"
        )
    return size[0], size[1]


def _read_images(
    where: str, root: Path, size: tuple[int, int], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise ConfigError(f"{where}: no such directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"{where} has no class sub-folders: expected {root}/CLASS/IMAGE.png")
    images, labels = [], []
    for name in classes:
        files = sorted(
            f
            for f in (root / name).rglob("*")
            if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
        )
        if not files:
            raise ConfigError(
                f"{where}: class folder '{name}' has no images ({', '.join(IMG_EXTENSIONS)})"
            )
        for file in files:
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
                    images.append(np.asarray(img, dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as err:
                raise ConfigError(f"{where}: cannot read image {file} ({err})") from None
            labels.append(name)
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x, np.asarray(labels)


def image_folder(
    root: str | None = None,
    roots: Sequence[str] | None = None,
    test_root: str | None = None,
    test_roots: Sequence[str] | None = None,
    scenario: str = "class_incremental",
    image_size: int | Sequence[int] = 32,
    channels: int = 3,
    n_experiences: int | None = None,
    classes_per_experience: int | None = None,
    class_order: Sequence[str] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    task_labels: bool = False,
    normalize: bool = True,
    validation_fraction: float = 0.0,
    split: str = "test",
) -> Stream:
    """A stream from ``ROOT/CLASS/*.png`` folders (class = sub-folder name, as torchvision's
    ImageFolder). Images are resized to ``image_size`` and read as (channels, H, W) in [0, 1];
    ``normalize`` standardises per channel. Test images come from ``test_root``/``test_roots``
    (same layout) or a seeded stratified split."""
    if channels not in (1, 3):
        raise ConfigError(f"benchmark.channels={channels!r}: expected 1 (grayscale) or 3 (RGB)")
    validation_fraction = check_split(split, validation_fraction)
    size = _image_size(image_size)
    mode = "L" if channels == 1 else "RGB"
    entries = _sources(scenario, root, roots, "root", "DIR")
    if scenario == "class_incremental":
        tests = [None if test_root is None else ("test_root", test_root)]
    elif test_roots is None:
        tests = [None] * len(entries)
    elif isinstance(test_roots, str) or len(test_roots) != len(entries):
        raise ConfigError(
            f"benchmark.test_roots={test_roots}: expected one folder per entry of benchmark.roots"
        )
    else:
        tests = [(f"test_roots[{i}]", t) for i, t in enumerate(test_roots)]

    sources = []
    for (key, folder), test in zip(entries, tests, strict=True):
        where = f"benchmark.{key}={folder}"
        x, y = _read_images(where, Path(folder).expanduser(), size, mode)
        source = LabelledSource(where, x, y)
        if test is not None:
            test_where = f"benchmark.{test[0]}={test[1]}"
            source.x_test, source.y_test = _read_images(
                test_where, Path(test[1]).expanduser(), size, mode
            )
        sources.append(source)
    spec = StreamSpec(
        "image_folder",
        scenario,
        n_experiences,
        classes_per_experience,
        class_order,
        order_type=str,
        seed=seed,
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        split=split,
        task_labels=bool(task_labels),
        normalize=bool(normalize),
        channel_axis=1,
    )
    return _stream(sources, spec)
