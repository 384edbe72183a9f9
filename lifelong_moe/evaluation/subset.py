"""``evaluation.max_batches``: evaluate on a fixed subset of every domain's test set.

The subset is the same at every evaluation (indices spread evenly over the test set, so that a
token stream's subset spans its documents instead of taking the first ones), and depends on
nothing but the test set's size: runs with the same ``max_batches`` score the same examples.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Dataset, Subset

from lifelong_moe import checks
from lifelong_moe.stream import Stream


def fixed_subset(data: Dataset, n: int) -> Dataset:
    """``n`` examples evenly spaced over ``data`` (all of it when it has no more than ``n``)."""
    size = len(data)
    if n >= size:
        return data
    return Subset(data, torch.linspace(0, size - 1, n).round().long().tolist())


def evaluation_view(stream: Stream, max_batches: int | None, batch_size: int) -> Stream:
    """The stream with each test set cut to ``max_batches`` batches of ``batch_size``; the
    stream itself when ``max_batches`` is None."""
    if max_batches is None:
        return stream
    checks.positive_int("evaluation.max_batches", max_batches)
    experiences = [
        dataclasses.replace(exp, test=fixed_subset(exp.test, max_batches * batch_size))
        for exp in stream.experiences
    ]
    return dataclasses.replace(stream, experiences=experiences)
