"""Cross-entropy under gradient accumulation: normalised by the target tokens of the whole step.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` and sums the
gradients, so an optimizer step minimises the mean of the micro-batches' mean losses: with
instruction examples (targets -100 outside the response, data/instructions.py) a micro-batch of
few response tokens weighs as much as one of many, and the epoch's last, smaller group of
micro-batches weighs less. The step that one larger batch would take divides the sum of token
losses by the step's target tokens instead.

``StepTokens`` gives that divisor up front, without looking ahead in the loader: the loader's own
sampler fixes which examples each micro-batch of the epoch holds (Lightning groups batch ``b``
into step ``b // accumulate``, and steps at the end of each epoch), and each example's scored
target count is known from the dataset. Under DDP the counts of all ranks are summed (one
all-reduce per optimizer step), since DDP then averages the ranks' gradients.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lifelong_moe.data.instructions import IGNORE


def target_counts(data: Dataset) -> torch.Tensor:
    """Scored targets (not ``IGNORE``) of every example of ``data``, int64 ``[len(data)]``.

    Tensor datasets (instruction examples, the replay buffer) are counted from their targets;
    every example of any other dataset (token windows, labelled images) holds the same number.
    """
    if isinstance(data, TensorDataset):
        y = data.tensors[1]
        return (y != IGNORE).reshape(len(y), -1).sum(1)
    if isinstance(data, ConcatDataset):
        return torch.cat([target_counts(part) for part in data.datasets])
    if isinstance(data, Subset):
        return target_counts(data.dataset)[torch.as_tensor(data.indices, dtype=torch.long)]
    per_example = torch.as_tensor(data[0][1]).numel() if len(data) else 0
    return torch.full((len(data),), per_example, dtype=torch.long)


class StepTokens:
    """The scale that turns a micro-batch's summed token loss into its share of the step's loss.

    Returned to Lightning as ``loss_sum * scale``, which divides by ``accumulate_grad_batches``
    (N) and DDP averages over the world size (W): ``scale = N * W / tokens of the step, all
    ranks``. Cached per fit (loader), epoch (the sampler's order) and step.
    """

    def __init__(self) -> None:
        self.loader: object | None = None
        self.counts = torch.zeros(0, dtype=torch.long)
        self.epoch: int | None = None
        self.order = torch.zeros(0, dtype=torch.long)
        self.step: int | None = None
        self.scale_value = torch.ones(())

    def scale(self, trainer: L.Trainer, batch_idx: int, device: torch.device) -> torch.Tensor:
        loader = trainer.train_dataloader
        if loader is not self.loader:
            self.loader, self.counts, self.epoch = loader, target_counts(loader.dataset), None
        if trainer.current_epoch != self.epoch:
            # Lightning has called set_epoch: this is the order the loader draws this epoch.
            self.order = torch.as_tensor(list(loader.sampler), dtype=torch.long)
            self.epoch, self.step = trainer.current_epoch, None
        accumulate = trainer.accumulate_grad_batches
        step = batch_idx // accumulate
        if step != self.step:
            per_step = accumulate * loader.batch_size
            local = self.counts[self.order[step * per_step : (step + 1) * per_step]].sum()
            total = trainer.strategy.reduce(local.to(device), reduce_op="sum")
            self.scale_value = accumulate * trainer.world_size / total.clamp(min=1).float()
            self.step = step
        return self.scale_value
