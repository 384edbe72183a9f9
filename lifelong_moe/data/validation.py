"""Carve a validation stream out of an Avalanche benchmark's training stream.

Avalanche does the split (``benchmark_with_validation_stream`` with the class-balanced strategy);
this module fixes two things around it:

* The class-balanced strategy shuffles with ``torch.randperm`` on torch's global RNG. We seed it
  from the benchmark seed inside a forked RNG, so the split is fixed per seed and the caller's
  RNG is untouched.
* Given a lazy train stream (the classic generators return one), Avalanche runs the strategy
  twice per experience, once for the train part and once for the validation part, with
  different draws: the two then overlap (measured on a 40-image experience at 0.25: 8 of its 10
  validation images were also in the train part). We hand it an eager stream, so each
  experience is split once.

The result is a new benchmark with ``train_stream`` (validation examples removed), ``valid_stream``
and the original ``test_stream``; Avalanche strategies (``method=avalanche``) train on its
``train_stream`` and so never see a validation example.
"""

from __future__ import annotations

from typing import Any

import torch

from lifelong_moe.errors import ConfigError


def with_validation_stream(benchmark: Any, fraction: float, seed: int) -> Any:
    """``benchmark`` with ``fraction`` of each training experience's examples of every class
    moved to a ``valid_stream`` (drawn by ``seed``)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import split_validation_class_balanced
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario, EagerCLStream
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.scenarios.validation_scenario import (
        benchmark_with_validation_stream,
    )

    train = EagerCLStream("train", list(benchmark.train_stream), set_stream_info=False)
    eager = CLScenario([train, benchmark.test_stream])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        split = benchmark_with_validation_stream(
            eager,
            split_strategy=lambda data: split_validation_class_balanced(float(fraction), data),
        )
    for i, exp in enumerate(split.valid_stream):
        if len(exp.dataset) == 0:
            n = len(split.train_stream[i].dataset)
            raise ConfigError(
                f"benchmark.validation_fraction={fraction} leaves experience {i} without a "
                f"validation example ({n} training examples): raise it"
            )
    # the split experiences lose the task label the generator's experiences carried
    streams = [with_task_labels(split.train_stream), with_task_labels(split.valid_stream)]
    return CLScenario([*streams, split.test_stream])
