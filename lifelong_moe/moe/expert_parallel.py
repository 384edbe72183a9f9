"""Expert parallelism: a MoE layer's experts sharded over the "ep" dimension of a DeviceMesh.

The idea is torchtitan's (torchtitan/distributed/expert_parallel.py), built from torch's own
pieces: a DeviceMesh with a data-parallel and an expert-parallel dimension, the counts per
expert exchanged with one all-to-all, the tokens sent to their experts' ranks and the results
sent back with the autograd-aware ``all_to_all_single_autograd`` (functional collectives).

One forward on every rank of an ep group:

1. the router (replicated: every rank holds all gate rows) picks top-k experts per token;
2. assignments are sorted by (owner rank, index of the expert on its owner), the counts per
   (rank, local expert) are computed on the device and exchanged with an all-to-all of counts;
   the split sizes then come to the host once (the all-to-all needs them as lists, as in
   torchtitan);
3. the token rows travel to the owners; each rank runs the ordinary grouped dispatch
   (dispatch.grouped_experts) over its local ``Experts`` (frozen bank first, stored in any
   ``frozen_dtype``), and the rows travel back, are unsorted and gate-combined.

Placement. ``placement[e]`` is the ep rank that holds expert e. Each rank keeps its experts in
global id order, so its frozen experts (lowest ids) still come first. Growth gives every new
expert to a rank holding the fewest (ties: lowest rank), so a rank holds at most ceil(E / N)
experts of a layer. ``placement`` is a buffer, so it is in the state dict; ``full_state_dict``
gathers the shards into the state dict of a plain ``MoELayer`` (loadable in one process), and
``ExpertParallelMoE.from_layer`` shards such a layer again, at any ep degree.

Usage counts. ``expert_usage`` of a sharded layer is this rank's share of the layer's count:
rank 0 starts from the full layer's counts, the others from zero, and each adds the tokens it
routed; ``full_state_dict`` sums them over the ranks (so a data-parallel run must not also sum
these buffers after a fit, as it does for plain layers).

Gradients. The router's gradient is complete on every rank only after a sum over all ranks
(data parallel over dp x ep: DDP's job); an expert's gradient already holds the contributions of
every rank of its ep group (they arrive through the all-to-all's backward), so it is summed over
the dp dimension only: ``reduce_expert_grads``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# The one private torch API here, checked on torch 2.14.1: the autograd-aware all-to-all with
# variable split sizes (torch.distributed.nn.functional.all_to_all_single, its public twin, warns
# that it is deprecated in favour of this one).
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lifelong_moe import checks, compat
from lifelong_moe.errors import ConfigError
from lifelong_moe.moe.banks import TwoBanks
from lifelong_moe.moe.dispatch import combine, grouped_experts
from lifelong_moe.moe.experts import EXPERT_INITS, Experts, glu
from lifelong_moe.moe.layer import ACTIVATIONS, MoEAux, MoELayer
from lifelong_moe.moe.router import GATE_INITS

BANKS = ("w1", "w2")


def check_expert_parallel(expert_parallel: int, world_size: int) -> int:
    """``trainer.expert_parallel`` must be a positive divisor of the world size."""
    if (
        not (isinstance(expert_parallel, int) and expert_parallel > 0)
        or world_size % expert_parallel
    ):
        raise ConfigError(
            f"trainer.expert_parallel={expert_parallel!r}: expected a positive divisor of the "
            f"world size {world_size}"
        )
    return expert_parallel


def expert_mesh(expert_parallel: int, device_type: str = "cpu") -> DeviceMesh:
    """A (dp, ep) mesh over the initialised default process group."""
    world = dist.get_world_size()
    check_expert_parallel(expert_parallel, world)
    return init_device_mesh(
        device_type, (world // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep")
    )


def place(placement: list[int], n_new: int, n_ranks: int) -> list[int]:
    """``placement`` extended by n_new experts, each on a rank holding the fewest (lowest first)."""
    held = [placement.count(r) for r in range(n_ranks)]
    out = list(placement)
    for _ in range(n_new):
        rank = min(range(n_ranks), key=lambda r: (held[r], r))
        out.append(rank)
        held[rank] += 1
    return out


def _local_experts(layer: MoELayer, owned: torch.Tensor) -> Experts:
    """An Experts module holding the experts `owned` (sorted global ids) of a full layer."""
    full = layer.experts
    frozen = owned[owned < full.n_frozen]
    trainable = owned[owned >= full.n_frozen] - full.n_frozen
    local = Experts(
        full.d_model, full.d_hidden, 0, gated=full.gated, frozen_dtype=full.frozen_dtype
    ).to(full.w1.device)
    with torch.no_grad():
        for name in BANKS:
            setattr(local, f"{name}_frozen", getattr(full, f"{name}_frozen")[frozen].clone())
            scale = getattr(full, f"{name}_frozen_scale")
            setattr(local, f"{name}_frozen_scale", None if scale is None else scale[frozen].clone())
            setattr(local, name, nn.Parameter(getattr(full, name).detach()[trainable].clone()))
    return local


class _Groups:
    """The mesh and its process groups, shared by reference when a model is deep-copied (a
    process group cannot be copied; a teacher snapshot talks over the same groups)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.ep = mesh.get_group("ep")
        self.dp = mesh.get_group("dp")

    def __deepcopy__(self, memo: dict) -> _Groups:
        return self


class ExpertParallelMoE(TwoBanks, nn.Module):
    """A MoELayer whose experts are spread over the ep group of `mesh`; same forward contract."""

    # Counted on the router, which holds every expert's gate row on every rank.
    FROZEN, TRAINABLE = "router.weight_frozen", "router.weight"

    def __init__(self, layer: MoELayer, mesh: DeviceMesh, placement: list[int] | None = None):
        super().__init__()
        if layer.capacity_factor is not None:
            raise ConfigError(
                f"capacity_factor={layer.capacity_factor}: expert parallelism is dropless; "
                "expected null"
            )
        if layer.shared is not None:
            raise ConfigError(
                "a shared expert: expert parallelism shards routed experts only; expected "
                "a MoE layer without one"
            )
        self.groups = _Groups(mesh)
        self.ep_size = mesh.size(mesh.mesh_dim_names.index("ep"))
        self.ep_rank = mesh.get_local_rank("ep")
        self.config = layer.get_config()
        self.top_k = layer.top_k
        # gated (SwiGLU) experts hold [gate | up] in w1: the activation is its gated form
        activation = ACTIVATIONS[layer.activation]
        self.activation = glu(activation) if layer.experts.gated else activation
        self.router = layer.router
        if placement is None:
            placement = place([], layer.n_experts, self.ep_size)
        self.register_buffer("placement", torch.tensor(placement, dtype=torch.long))
        # The layer's usage is the sum over ranks of this buffer (each rank counts its own
        # tokens), so rank 0 starts from the full layer's counts and the others from zero.
        usage = layer.expert_usage.clone()
        self.register_buffer("expert_usage", usage if dist.get_rank() == 0 else usage.zero_())
        self.experts = _local_experts(layer, self.owned())

    @property
    def mesh(self) -> DeviceMesh:
        return self.groups.mesh

    @property
    def ep_group(self) -> Any:
        return self.groups.ep

    @property
    def dp_group(self) -> Any:
        return self.groups.dp

    @classmethod
    def from_layer(cls, layer: MoELayer, mesh: DeviceMesh) -> ExpertParallelMoE:
        """Shard a full layer (e.g. loaded from a gathered checkpoint) at this mesh's ep degree."""
        return cls(layer, mesh)

    @property
    def d_model(self) -> int:
        return self.config["d_model"]

    def owned(self, rank: int | None = None) -> torch.Tensor:
        """Global ids of the experts held by ep rank `rank` (default: this one), ascending."""
        rank = self.ep_rank if rank is None else rank
        return (self.placement == rank).nonzero().squeeze(1)

    def max_local(self) -> int:
        return int(torch.bincount(self.placement, minlength=self.ep_size).max())

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat, expert_mask)
        y, counts = self._exchange(flat, routing.expert_ids, routing.valid)
        y = combine(y, routing.gates)
        if self.training:
            self.expert_usage.add_(counts.to(self.expert_usage.dtype))
        dropped = torch.zeros((), dtype=torch.long, device=x.device)
        return y.view(x.shape), MoEAux.of(routing, counts, dropped)

    def _exchange(
        self, x: torch.Tensor, expert_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [T*k, d] of expert outputs in (token, slot) order, and counts per expert [E]."""
        n_tokens, top_k = expert_ids.shape
        ep, width = self.ep_size, self.max_local()
        e = expert_ids.reshape(-1)
        # index of each expert on its owner: its rank among the experts of the same owner
        onehot = nn.functional.one_hot(self.placement, ep)
        local_index = (onehot.cumsum(0) * onehot).sum(1) - 1
        key = self.placement[e] * width + local_index[e]
        order = torch.sort(key, stable=True).indices
        send_counts = torch.bincount(key, minlength=ep * width)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send_splits = send_counts.view(ep, width).sum(1).tolist()  # the one host sync
        recv_counts = recv_counts.view(ep, width)
        recv_splits = recv_counts.sum(1).tolist()
        sent = x.index_select(0, order // top_k)
        received = compat.all_to_all_single_autograd(sent, recv_splits, send_splits, self.ep_group)
        local_ids = torch.repeat_interleave(
            torch.arange(width, device=x.device).repeat(ep), recv_counts.reshape(-1)
        )
        out = self._local_compute(received, local_ids)
        back = compat.all_to_all_single_autograd(out, send_splits, recv_splits, self.ep_group)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(e.numel(), device=e.device)
        )
        y = back.index_select(0, inverse)
        if valid is not None:
            y = y * valid.reshape(-1, 1).to(y.dtype)
        counts = torch.bincount(
            e if valid is None else e[valid.reshape(-1)], minlength=self.n_experts
        )
        return y, counts

    def _local_compute(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 0 or self.experts.n_experts == 0:
            # still touch the weights so that every rank's backward reaches the same collectives
            return rows + 0.0 * sum(p.sum() for p in self.experts.parameters())
        ones = rows.new_ones(rows.shape[0], 1)
        y, _, _ = grouped_experts(
            rows, local_ids.unsqueeze(1), ones, None, self.experts, self.activation
        )
        return y

    # -- growth ----------------------------------------------------------------------------------
    @torch.no_grad()
    def expand(
        self,
        n_new: int,
        init: str = "random",
        gate_init: str = "mean",
        noise_std: float = 0.01,
        domain: torch.Tensor | None = None,
    ) -> None:
        """Append n_new experts on the ranks holding the fewest, as MoELayer.expand would.

        Collective over every rank. Every rank builds all n_new experts with the same RNG draws
        as MoELayer.expand and keeps the ones placed on it, so ranks seeded alike agree with one
        process. "copy_most_used"/"upcycle" pick their sources from the layer's usage (the sum
        of every rank's counter) and take the sources' weights from their owners by broadcast
        over the ep group. ``domain`` (gate_init="domain") must be the same on every rank:
        moe/domain.py's router_input_means all-reduces it for sharded layers.
        """
        checks.positive_int("n_new", n_new)
        checks.choice("init", init, EXPERT_INITS)
        checks.choice("gate_init", gate_init, GATE_INITS)
        donor = self._donor(init, n_new)
        n_donor, start = donor.n_experts, self.n_experts
        donor.expand(n_new, init, noise_std)  # sources in donor order: no usage needed
        self.router.expand(n_new, gate_init, noise_std, domain=domain)
        placement = place(self.placement.tolist(), n_new, self.ep_size)
        self.placement = torch.tensor(placement, dtype=torch.long, device=self.placement.device)
        mine = (self.placement[start:] == self.ep_rank).nonzero().squeeze(1)
        for name in BANKS:
            new = getattr(donor, name).detach()[n_donor:][mine]
            grown = torch.cat([getattr(self.experts, name).detach(), new])
            setattr(self.experts, name, nn.Parameter(grown))
        self.expert_usage = torch.cat([self.expert_usage, self.expert_usage.new_zeros(n_new)])

    def _donor(self, init: str, n_new: int) -> Experts:
        """An fp32 Experts bank holding, in order, the experts Experts.expand(init) copies from
        (the most used for "copy_most_used", the n_new most used for "upcycle"; none for
        "random"), so that expanding it draws exactly what the full layer's expand draws."""
        local = self.experts
        donor = Experts(local.d_model, local.d_hidden, 0, gated=local.gated)
        donor = donor.to(device=self.placement.device, dtype=local.w1.dtype)
        if init == "random" or self.n_experts == 0:
            return donor
        usage = self.expert_usage.clone()
        dist.all_reduce(usage)  # the layer's usage: every rank counted its own tokens
        if init == "copy_most_used":
            sources = [int(torch.argmax(usage).item())]
        else:
            ranked = sorted(range(self.n_experts), key=lambda e: (-float(usage[e]), e))
            sources = ranked[:n_new]
        w1, w2 = zip(*(self._fetch(e) for e in sources), strict=True)
        donor.w1 = nn.Parameter(torch.stack(w1))
        donor.w2 = nn.Parameter(torch.stack(w2))
        return donor

    def _fetch(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) of global expert `expert` (dequantized if frozen), broadcast by its owner
        over the ep group; collective over the ep group."""
        owner = int(self.placement[expert])
        like = self.experts.w1
        w1 = like.new_empty(self.experts.d_model, self.experts.w1_width)
        w2 = like.new_empty(self.experts.d_hidden, self.experts.d_model)
        if owner == self.ep_rank:
            local = int((self.owned() == expert).nonzero())
            held = self.experts.weights(local)
            w1.copy_(held[0]), w2.copy_(held[1])
        for w in (w1, w2):
            dist.broadcast(w, group=self.ep_group, group_src=owner)
        return w1, w2

    @torch.no_grad()
    def freeze_existing(self) -> None:
        self.experts.freeze_existing()
        self.router.freeze_existing()

    # -- gradients and state -----------------------------------------------------------------------
    def reduce_expert_grads(self) -> None:
        """Sum each local expert gradient over the replicas of this shard (the dp dimension)."""
        if dist.get_world_size(self.dp_group) == 1:
            return
        for p in self.experts.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.dp_group)

    def expert_params_per_rank(self) -> int:
        """Expert weights this rank holds (frozen and trainable): ``cost/expert_params_per_rank``."""
        return sum(
            getattr(self.experts, f"{n}{bank}").numel() for n in BANKS for bank in ("", "_frozen")
        )

    def full_state_dict(self) -> dict[str, Any]:
        """The state dict of the equivalent plain MoELayer, gathered from every ep rank.

        Collective over every rank (usage is summed over all of them); tensors come back on CPU.
        """
        local = {k: v.detach().cpu() for k, v in self.experts.state_dict().items()}
        shards: list[Any] = [None] * self.ep_size
        dist.all_gather_object(shards, local, group=self.ep_group)
        n_frozen = self.router.n_frozen
        state = {f"router.{k}": v.detach().cpu() for k, v in self.router.state_dict().items()}
        usage = self.expert_usage.clone()
        dist.all_reduce(usage)  # each rank counted its own tokens: the layer's usage is the sum
        state["expert_usage"] = usage.cpu()
        for key in shards[0]:
            parts, ids = [], []
            for rank, shard in enumerate(shards):
                owned = self.owned(rank).cpu()
                frozen = "_frozen" in key
                ids.append(owned[owned < n_frozen] if frozen else owned[owned >= n_frozen])
                parts.append(shard[key])
            order = torch.cat(ids).argsort()
            state[f"experts.{key}"] = torch.cat(parts)[order]
        return state

    def local_state_dict(self, full: dict[str, Any]) -> dict[str, Any]:
        """This rank's shard of a gathered state dict (``full_state_dict``'s inverse): the
        experts it holds under the current placement, at any ep degree."""
        n_frozen = self.router.n_frozen
        owned = self.owned().cpu()
        frozen, trainable = owned[owned < n_frozen], owned[owned >= n_frozen] - n_frozen
        state = {k: v for k, v in full.items() if k.startswith("router.")}
        usage = full["expert_usage"]
        state["expert_usage"] = usage if dist.get_rank() == 0 else torch.zeros_like(usage)
        state["placement"] = self.placement
        for key in self.experts.state_dict():
            ids = frozen if "_frozen" in key else trainable
            state[f"experts.{key}"] = full[f"experts.{key}"][ids]
        return state

    def full_config(self) -> dict[str, Any]:
        """MoELayer.get_config() of the gathered layer (its current size)."""
        return {**self.config, "n_experts": self.n_experts, "n_frozen": self.router.n_frozen}

    def gather(self) -> MoELayer:
        """The plain MoELayer this shard is part of (collective over the ep group)."""
        layer = MoELayer.from_config(self.full_config())
        layer.load_state_dict(self.full_state_dict())
        return layer


def shard_moe_layers(model: nn.Module, mesh: DeviceMesh) -> dict[str, ExpertParallelMoE]:
    """Replace every MoELayer of `model` by its expert-parallel shard, in place."""
    out = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        out[name] = ExpertParallelMoE.from_layer(layer, mesh)
        setattr(parent, child, out[name])
    return out


def expert_params_per_rank(model: nn.Module) -> int:
    """Expert weights (all layers, frozen and trainable) held by this rank:
    ``cost/expert_params_per_rank``, at most ceil(E / N) experts' worth per layer."""
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    return sum(m.expert_params_per_rank() for m in layers)


def max_experts_per_rank(n_experts: int, expert_parallel: int) -> int:
    """The bound placement keeps: ceil(E / N)."""
    return math.ceil(n_experts / expert_parallel)
