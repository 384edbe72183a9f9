"""The stream the runner iterates: experiences as in-memory tensor datasets.

Benchmarks are built with Avalanche's generators, then materialised once into tensors so that
training and the all-experience evaluation read memory, not per-item transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset


@dataclass
class Experience:
    """One step of the stream. Datasets yield ``(x, y, t)``: input, class label, task label."""

    index: int
    train: Dataset
    test: Dataset
    classes: list[int]
    task_id: int = 0


@dataclass
class Stream:
    """A continual-learning benchmark as the runner sees it.

    ``scenario`` is ``"class_incremental"`` (new classes per experience, one shared head) or
    ``"domain_incremental"`` (same label space, shifted inputs). ``avalanche`` keeps the
    Avalanche benchmark object so that Avalanche strategies can run on the very same data.
    """

    name: str
    experiences: list[Experience]
    n_classes: int
    input_shape: tuple[int, ...]
    scenario: str
    task_labels: bool = False
    avalanche: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.experiences)
