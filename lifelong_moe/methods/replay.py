"""``method=replay``: naive fine-tuning plus the replay buffer (methods/replay_buffer.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lifelong_moe import checks
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod


class Replay(ContinualMethod):
    """Naive fine-tuning on the current experience plus the replay buffer."""

    def __init__(
        self,
        model: nn.Module,
        replay_buffer_size: int = 200,
        **base: Any,
    ) -> None:
        try:
            checks.positive_int("method.replay_buffer_size", replay_buffer_size)
        except ConfigError as error:
            raise ConfigError(f"{error} (method=replay without a buffer is method=naive)") from None
        super().__init__(model, replay_buffer_size=replay_buffer_size, **base)
