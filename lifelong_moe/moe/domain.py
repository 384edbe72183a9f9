"""Domain embeddings: the mean router input of every MoE layer over a batch of new-domain data.

Nexus and FlexOlmo initialise the router rows of experts added for a new domain from the mean
hidden state that reaches the router on that domain's tokens: new experts then score highest
on exactly the tokens they were added for. ``MoELayer.expand(gate_init="domain", domain=...)``
takes one such vector per layer. A layer sharded over ranks (expert_parallel.py) gets the
mean over every rank's tokens (sums and counts all-reduced), so its replicated gate rows agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from lifelong_moe.moe.expert_parallel import ExpertParallelMoE
from lifelong_moe.moe.layer import MoELayer


@torch.no_grad()
def router_input_means(
    model: nn.Module, batches: Iterable[object], forward: Callable[[object], object]
) -> dict[str, torch.Tensor]:
    """{MoE layer name: fp32 [d] mean of its input over every token of ``batches``}.

    ``forward(batch)`` runs the model (any wrapper, any inputs); a forward pre-hook on each
    MoELayer sums what reaches it. The model is put in eval mode for the pass and restored.
    With sharded layers it is collective over every rank (each one's forward is already).
    """
    kinds = (MoELayer, ExpertParallelMoE)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    sums = {n: torch.zeros(m.d_model, dtype=torch.float64) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str) -> Callable[..., None]:
        def add(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, module.d_model)
            sums[name] += x.double().sum(dim=0).cpu()
            counts[name] += x.shape[0]

        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward(batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, layer in layers.items():
        if isinstance(layer, ExpertParallelMoE):
            count = torch.tensor([float(counts[name])], dtype=torch.float64)
            total = torch.cat([sums[name], count]).to(layer.placement.device)
            dist.all_reduce(total)  # nccl needs it on the device
            sums[name], counts[name] = total[:-1].cpu(), int(total[-1])
    return {n: (sums[n] / max(counts[n], 1)).float() for n in layers}
