"""The bank layout that expert weights and gate rows share.

Both stack one row per expert in two tensors: the frozen bank (lowest ids, a buffer that no
optimizer sees) and the trainable bank (a Parameter). Expert id ``e`` is row ``e`` of the
frozen bank when ``e < n_frozen`` and row ``e - n_frozen`` of the trainable one otherwise.
"""

from __future__ import annotations

from typing import Any

import torch


class TwoBanks:
    """Expert counts of a module whose banks are at the attribute paths ``FROZEN`` and
    ``TRAINABLE`` (dotted for a module that holds them in a child, e.g. ``router.weight``)."""

    FROZEN: str
    TRAINABLE: str

    def _bank(self, path: str) -> torch.Tensor:
        bank: Any = self
        for name in path.split("."):
            bank = getattr(bank, name)
        return bank

    @property
    def n_frozen(self) -> int:
        return self._bank(self.FROZEN).shape[0]

    @property
    def n_trainable(self) -> int:
        return self._bank(self.TRAINABLE).shape[0]

    @property
    def n_experts(self) -> int:
        return self.n_frozen + self.n_trainable
