"""Any Avalanche strategy (Naive, EWC, LwF, GEM, Replay, ...) as a peer of our methods.

``method=avalanche method.strategy=EWC method.strategy_args={ewc_lambda: 0.4}`` trains with
Avalanche's own loop (``strategy.train`` on ``stream.avalanche.train_stream[i]``, the very
benchmark our tensors were read from) while everything else stays ours: the backbone, the
optimizer (AdamW with ``lr`` and ``weight_decay``, moments reset at each experience as in
``ContinualMethod``), the epochs and batch size of ``trainer``, the device, the seed, and the
evaluation, so R, metrics and artifacts have exactly our layout.

What differs: Avalanche shuffles with torch's global RNG (reseeded here per experience), so
batch order differs from our runner's; the MoE auxiliary losses are not trained (Avalanche
sees logits only); ``trainer.precision`` and ``gradient_clip_val`` do not apply. Avalanche's
evaluator runs without metrics or loggers, and it never evaluates during training.

Resume: the strategy's plugins (its memory) are pickled into the run state after every
experience; unpickling runs whatever the pickle says, so a resume reads them only from a local
store (sqlite or file), or from a remote one with ``resume_trust=true``. Avalanche's loop has no
step checkpoints: an interrupted peer resumes from the start of its experience. A plugin holding a subset of an Avalanche dataset pickles the whole dataset
underneath (Replay on split_digits: 0.3 MB, on a large benchmark its training set); AGEM's
live iterator cannot be pickled at all, so an interrupted AGEM run cannot resume and says so.
"""

from __future__ import annotations

import pickle
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.stream import Experience, Stream


class LogitsOnly(nn.Module):
    """Our models return ``(logits, aux)``; Avalanche's criterion wants the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def strategy_classes() -> dict[str, type]:
    """Every strategy class ``avalanche.training`` exports."""
    import avalanche.training
    from avalanche.training.templates import BaseTemplate

    found = {}
    for name in dir(avalanche.training):
        obj = getattr(avalanche.training, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseTemplate)
            and obj.__module__.startswith("avalanche.training.supervised")
        ):
            found[name] = obj
    return found


def torch_device(accelerator: str) -> torch.device:
    """The runner's rule: ``gpu``/``cuda`` train on CUDA, anything else on the CPU."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


class AvalanchePeer(ContinualMethod):
    lightning_loop = False
    # Set by the runner on resume: whether the store may hand us pickles (local or trusted).
    trust_pickles = False

    def __init__(
        self,
        model: nn.Module,
        strategy: str = "Naive",
        strategy_args: dict[str, Any] | None = None,
        train_epochs: int = 1,
        train_mb_size: int = 64,
        accelerator: str = "cpu",
        seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(model, **base)  # lr, weight_decay: ContinualMethod's
        for key in ("replay_buffer_size", "replay_fraction"):
            if base.get(key):
                raise ConfigError(
                    f"method.{key}={base[key]} does not apply to method=avalanche: "
                    "use method.strategy=Replay with method.strategy_args={mem_size: N}"
                )
        classes = strategy_classes()
        if strategy not in classes:
            examples = "Naive, EWC, LwF, SynapticIntelligence, GEM, AGEM, Replay, GDumb"
            raise ConfigError(
                f"method.strategy={strategy} is not a strategy in avalanche.training; "
                f"e.g. {examples} ({len(classes)} in all)"
            )
        self.strategy_name = strategy
        self.seed = seed
        self.net = LogitsOnly(model)
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        from avalanche.training.plugins import EvaluationPlugin

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No loggers specified": we want none
            evaluator = EvaluationPlugin(loggers=[])
        try:
            self.strategy = classes[strategy](
                model=self.net,
                optimizer=optimizer,
                criterion=nn.CrossEntropyLoss(),
                train_mb_size=train_mb_size,
                train_epochs=train_epochs,
                eval_mb_size=train_mb_size,
                device=torch_device(accelerator),
                evaluator=evaluator,
                **(strategy_args or {}),
            )
        except TypeError as error:
            raise ConfigError(f"method.strategy_args for {strategy}: {error}") from None

    def set_lr_schedule(self, schedule: LRSchedule) -> None:
        """Avalanche's loop builds its own optimizer steps: only a constant LR applies."""
        if not schedule.is_constant:
            raise ConfigError(
                f"schedule.name={schedule.name} (schedule.warmup_steps={schedule.warmup_steps}) does "
                "not apply to method=avalanche: Avalanche trains with its own loop at a constant LR"
            )
        super().set_lr_schedule(schedule)

    def setup_stream(self, stream: Stream) -> None:
        super().setup_stream(stream)
        if stream.avalanche is None:
            raise ConfigError(
                f"method=avalanche needs an Avalanche benchmark; benchmark {stream.name} has none"
            )

    def fit_experience(self, exp: Experience, loader: DataLoader, trainer: L.Trainer) -> None:
        """Avalanche's loop on the same experience; ``loader`` and ``trainer`` are unused."""
        seed = self.seed * 1_000 + exp.index
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        # record=True swallows Avalanche's deprecation notices, which reset the filters to "once"
        with warnings.catch_warnings(record=True):
            self.strategy.train(
                self.stream.avalanche.train_stream[exp.index],
                eval_streams=[],
                reset_optimizer_state=True,
            )

    # -- resume: the strategy's plugins hold its memory (EWC importances, replay buffer, ...)
    def method_state(self) -> dict[str, Any]:
        """Each plugin pickled on its own; one that cannot be (AGEM keeps a live data iterator)
        is stored as the reason, and resuming such a run then stops with that reason."""
        from avalanche.training.plugins import EvaluationPlugin

        plugins = []
        for plugin in self.strategy.plugins:
            if isinstance(plugin, EvaluationPlugin):
                continue
            try:
                plugins.append(pickle.dumps(plugin))
            except (TypeError, AttributeError, pickle.PicklingError) as error:
                plugins.append(f"{type(plugin).__name__}: {error}")
        return {"strategy": self.strategy_name, "plugins": plugins}

    def load_method_state(self, state: dict[str, Any]) -> None:
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.plugins.clock import Clock

        if not self.trust_pickles:
            raise ConfigError(
                "resume: method=avalanche keeps its plugins as pickles, which run code when "
                "loaded; the tracking store is not local: add resume_trust=true if you trust it"
            )
        lost = [p for p in state["plugins"] if isinstance(p, str)]
        if lost:
            raise ConfigError(
                f"resume: method.strategy={self.strategy_name} cannot resume, its state was not "
                f"saved ({'; '.join(lost)}); start a new run"
            )
        restored = iter(pickle.loads(p) for p in state["plugins"])
        self.strategy.plugins = [
            p if isinstance(p, EvaluationPlugin) else next(restored) for p in self.strategy.plugins
        ]
        self.strategy.clock = next(p for p in self.strategy.plugins if isinstance(p, Clock))
