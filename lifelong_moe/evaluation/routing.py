"""Routing metrics: pure functions of what the routers decided on each test experience.

Two inputs, both collected by the evaluators for every MoE layer after every experience:

- ``shares[j][e]``: the share of test experience j's (token, slot) assignments that expert e
  received (each row sums to 1); ``History.routing[i][layer]``.
- ``stats[j]``: a :data:`RoutingStats` dict for test experience j: ``tokens`` (how many),
  ``counts[e]`` (tokens whose top-k set contains e: a token counts once per expert of its set),
  ``expected[e]`` (the same count expected under uniform routing over the experts reachable for
  each token) and ``topk`` (the sorted top-k sets of a fixed subset of j's test tokens, the first
  :data:`TOPK_SUBSET` in evaluation order; -1 marks a slot no reachable expert filled);
  ``History.routing_stats[i][layer]``.

``origin[e]`` is the experience that created expert e (0 for the initial experts). Expert ids
never change when experts are grown, so a row taken before growth is a prefix of the same
experts' row after it.

Metrics after experience t (j runs over the seen experiences j <= t, or the earlier ones j < t):

- specialization: mean_j of the share of j's assignments that go to the experts created for j.
- specialization_corrected: mean_j of (observed - expected) / (1 - expected), where expected is
  that share under uniform routing over the experts reachable for each token (with a restrict
  mask: only the experts that existed at the inferred experience). 0 = chance, 1 = perfect.
  Terms with expected == 1 (only j's own experts reachable, e.g. j = 0 under a restrict mask)
  carry no information and are left out; ``specialization_skipped`` counts them.
- mri_max / mri_mean: Maximum Routing Imbalance (Thérien et al., TMLR 2025) measured on one
  distribution at a time: MRI_j = max_e counts[e] / tokens, the largest fraction of j's tokens
  whose top-k set contains one expert (k/E for uniform routing, 1 when one expert is in every
  token's set); the max and the mean over j <= t.
- drift: mean_{j<t} of the total-variation distance between j's shares right after experience j
  and now (marginals only: a lower bound on how many tokens changed experts).
- token_drift: mean_{j<t} of the share of j's fixed test tokens whose top-k set now differs from
  the one right after experience j (the per-token counterpart of drift).
- token_change: the same against the previous evaluation (after experience t-1).

Names before issue 24: ``routing/max_imbalance`` was max_e mean_j shares[j][e], pooled over the
seen experiences and normalised per (token, slot), at most 1/k. It is no longer logged; old
stores keep it under that name, so it is never compared with MRI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lifelong_moe import names

Shares = Sequence[Sequence[float]]  # [test experience j][expert e]
RoutingStats = dict[str, Any]  # {"tokens": int, "counts": [..], "expected": [..], "topk": [[..]]}
TOPK_SUBSET = 256  # test tokens per experience whose top-k sets are kept for token drift


# --- collecting the statistics (one test experience, one layer) ---------------------------------


def new_stats(n_experts: int) -> RoutingStats:
    return {"tokens": 0, "counts": [0] * n_experts, "expected": [0.0] * n_experts, "topk": []}


@torch.no_grad()
def add_batch(
    stats: RoutingStats,
    expert_ids: torch.Tensor,
    valid: torch.Tensor | None,
    reachable: torch.Tensor | None,
) -> None:
    """Add one batch's routing: ids [T, k], valid bool [T, k] (None = all), reachable bool [E] or
    [T, E] (None = all experts)."""
    n_experts = len(stats["counts"])
    ids = expert_ids.long()
    if valid is not None:
        ids = ids.masked_fill(~valid, -1)
    kept = ids[ids >= 0]
    counts = torch.bincount(kept.reshape(-1).cpu(), minlength=n_experts)
    k = ids.shape[1]
    if reachable is None:
        reach = torch.ones(1, n_experts, dtype=torch.float64)
    else:
        reach = reachable.reshape(-1, n_experts).double().cpu()
    n_reach = reach.sum(dim=1, keepdim=True)
    # Uniform top-k over the reachable set: each token fills min(k, |R|) slots, each reachable
    # expert being in its set with probability min(k, |R|) / |R|.
    per_token = reach * (n_reach.clamp(max=k) / n_reach.clamp_min(1))
    expected = (per_token.sum(0) * (ids.shape[0] if reach.shape[0] == 1 else 1)).tolist()
    stats["tokens"] += ids.shape[0]
    stats["counts"] = [a + int(b) for a, b in zip(stats["counts"], counts.tolist(), strict=True)]
    stats["expected"] = [a + float(b) for a, b in zip(stats["expected"], expected, strict=True)]
    room = TOPK_SUBSET - len(stats["topk"])
    if room > 0:
        stats["topk"] += ids[:room].sort(dim=1).values.cpu().tolist()


def merge_shards(shards: Sequence[RoutingStats], block: int) -> RoutingStats:
    """One experience's statistics from the evaluation shards of w ranks (evaluation/shard.py:
    rank r holds examples r, r + w, ...): sums, and the top-k sets back in one process's token
    order, taking ``block`` tokens (one example's) from each rank in turn."""
    merged = new_stats(len(shards[0]["counts"]))
    for stats in shards:
        merged["tokens"] += stats["tokens"]
        merged["counts"] = [a + b for a, b in zip(merged["counts"], stats["counts"], strict=True)]
        merged["expected"] = [
            a + b for a, b in zip(merged["expected"], stats["expected"], strict=True)
        ]
    topk, start = [], 0
    while len(topk) < TOPK_SUBSET and any(start < len(s["topk"]) for s in shards):
        for stats in shards:
            topk += stats["topk"][start : start + block]
        start += block
    merged["topk"] = topk[:TOPK_SUBSET]
    return merged


# --- metrics --------------------------------------------------------------------------------------


def specialization(shares: Shares, origin: Sequence[int], t: int) -> float:
    """Mean over j <= t of sum_{e: origin[e] == j} shares[j][e]."""
    own = np.asarray(origin)
    values = []
    for j in range(t + 1):
        row = np.asarray(shares[j], dtype=float)
        values.append(float(row[own[: len(row)] == j].sum()))
    return float(np.mean(values))


def specialization_corrected(
    stats: Sequence[RoutingStats], origin: Sequence[int], t: int
) -> tuple[float, int]:
    """(mean over j <= t of (observed - expected) / (1 - expected), terms left out because
    expected == 1); NaN when every term was left out."""
    own = np.asarray(origin)
    values, skipped = [], 0
    for j in range(t + 1):
        counts = np.asarray(stats[j]["counts"], dtype=float)
        expected = np.asarray(stats[j]["expected"], dtype=float)
        mine = own[: len(counts)] == j
        chance = expected[mine].sum() / max(expected.sum(), 1e-300)
        if np.isclose(chance, 1.0) or counts.sum() == 0:
            skipped += 1
            continue
        observed = counts[mine].sum() / counts.sum()
        values.append((observed - chance) / (1.0 - chance))
    return (float(np.mean(values)) if values else float("nan")), skipped


def routing_imbalance(stats: RoutingStats) -> float:
    """MRI of one distribution: max_e (tokens whose top-k set contains e) / tokens."""
    return max(stats["counts"]) / max(stats["tokens"], 1)


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """0.5 * sum |p - q|, the shorter vector padded with zeros (experts that did not exist)."""
    n = max(len(p), len(q))
    a = np.zeros(n)
    b = np.zeros(n)
    a[: len(p)] = p
    b[: len(q)] = q
    return float(0.5 * np.abs(a - b).sum())


def drift(history: Sequence[Shares], t: int) -> float:
    """Mean over j < t of TV(history[j][j], history[t][j]); NaN at t = 0 (nothing earlier).

    ``history[i]`` is the layer's shares matrix after experience i.
    """
    if t == 0:
        return float("nan")
    return float(np.mean([total_variation(history[j][j], history[t][j]) for j in range(t)]))


def changed_share(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> float:
    """Share of tokens whose (sorted) top-k set differs; both lists cover the same tokens."""
    if len(before) != len(after):
        raise ValueError(
            f"top-k sets of {len(before)} and {len(after)} tokens: not the same tokens"
        )
    if not before:
        return float("nan")
    return float(np.mean([list(a) != list(b) for a, b in zip(before, after, strict=True)]))


def token_drift(history: Sequence[Sequence[RoutingStats]], t: int) -> float:
    """Mean over j < t of the share of j's tokens whose top-k set changed since right after j.

    ``history[i][j]`` is the layer's statistics of test experience j after experience i."""
    if t == 0:
        return float("nan")
    return float(
        np.mean([changed_share(history[j][j]["topk"], history[t][j]["topk"]) for j in range(t)])
    )


def token_change(history: Sequence[Sequence[RoutingStats]], t: int) -> float:
    """Mean over j < t of the share of j's tokens whose top-k set changed since the previous
    evaluation (after experience t - 1)."""
    if t == 0:
        return float("nan")
    prev, now = history[t - 1], history[t]
    return float(np.mean([changed_share(prev[j]["topk"], now[j]["topk"]) for j in range(t)]))


def routing_metrics(
    history: Sequence[Sequence[Shares]],
    origin: Sequence[int],
    t: int,
    stats: Sequence[Sequence[Sequence[RoutingStats]]] = (),
) -> dict[str, float]:
    """``routing/<metric>/layer_<k>`` for every MoE layer and ``routing/<metric>`` (their mean).

    ``history[i][k]`` is layer k's shares matrix after experience i, ``stats[i][k][j]`` its
    statistics of test experience j (runs recorded before issue 24 have none: the metrics
    that need them are left out); the drifts are left out at t = 0.
    """
    layers = range(len(history[t]))
    per_layer: dict[str, list[float]] = {
        "specialization": [specialization(history[t][k], origin, t) for k in layers],
    }
    if t > 0:
        per_layer["drift"] = [drift([h[k] for h in history], t) for k in layers]
    if len(stats) > t and stats[t]:
        corrected = [specialization_corrected(stats[t][k], origin, t) for k in layers]
        per_layer["specialization_corrected"] = [value for value, _ in corrected]
        per_layer["specialization_skipped"] = [float(n) for _, n in corrected]
        mri = [[routing_imbalance(stats[t][k][j]) for j in range(t + 1)] for k in layers]
        per_layer["mri_max"] = [max(values) for values in mri]
        per_layer["mri_mean"] = [float(np.mean(values)) for values in mri]
        if t > 0 and all(stats[i] for i in range(t)):
            per_layer["token_drift"] = [token_drift([s[k] for s in stats], t) for k in layers]
            per_layer["token_change"] = [token_change([s[k] for s in stats], t) for k in layers]
    out: dict[str, float] = {}
    for name, values in per_layer.items():
        if not values:
            continue
        out[f"{names.ROUTING}/{name}"] = float(np.mean(values))
        out |= {names.routing_layer(name, k): v for k, v in enumerate(values)}
    return out
