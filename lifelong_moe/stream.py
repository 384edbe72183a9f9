"""The stream the runner iterates: experiences as in-memory tensor datasets.

Benchmarks are built with Avalanche's generators, then materialised once into tensors so that
training and the all-experience evaluation read memory, not per-item transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are not evaluated at run time


@dataclass
class Experience:
    """One step of the stream. Datasets yield ``(x, y, t)``: input, class label, task label."""

    index: int
    train: Dataset
    test: Dataset
    classes: list[int]
    task_id: int = 0


# The scenario of the text benchmarks: next-token windows, the vocabulary is the label space.
LANGUAGE_MODELING = "language_modeling"


@dataclass
class Stream:
    """A continual-learning benchmark as the runner sees it.

    ``scenario`` is ``"class_incremental"`` (new classes per experience, one shared head) or
    ``"domain_incremental"`` (same label space, shifted inputs) or LANGUAGE_MODELING (text
    domains, evaluated by loss and perplexity). ``avalanche`` keeps the
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

    @property
    def language_modeling(self) -> bool:
        return self.scenario == LANGUAGE_MODELING

    @classmethod
    def of_windows(
        cls,
        name: str,
        experiences: list[Experience],
        vocab_size: int,
        context_length: int,
        task_labels: bool,
        **fields: Any,
    ) -> Self:
        """A language-modeling stream of ``context_length`` token windows over ``vocab_size`` ids;
        ``fields`` are the subclass's own (tokenizer, domains, ...)."""
        return cls(
            name=name,
            experiences=experiences,
            n_classes=vocab_size,
            input_shape=(context_length,),
            scenario=LANGUAGE_MODELING,
            task_labels=bool(task_labels),
            **fields,
        )
