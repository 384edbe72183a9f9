"""Routing metrics: pure functions of the routing shares, logged per experience like accuracy.

``shares[j][e]`` is the share of test experience j's (token, slot) assignments that expert e
received in one MoE layer (each row sums to 1); the runner collects one such matrix per layer
after every experience (``History.routing[i][layer]``). ``origin[e]`` is the experience that
created expert e (0 for the initial experts). Expert ids never change when experts are grown,
so a row taken before growth is a prefix of the same experts' row after it.

- specialization: mean over seen experiences j of the share of j's assignments that go to the
  experts created for j (1.0 = every experience uses only its own experts). For a MoE that does
  not grow, every expert belongs to experience 0, so it reduces to 1/(t+1): no expert is
  dedicated to a later experience (read drift and max_imbalance for such methods).
- drift: mean over earlier experiences j < t of the total-variation distance between j's routing
  right after experience j and now (0 = old data is routed exactly as when it was learned,
  1 = to entirely different experts).
- max_imbalance: Maximum Routing Imbalance (Thérien et al., TMLR 2025): the largest share any
  single expert receives of the seen experiences' test assignments (experiences weighted
  equally). 1/E for perfectly balanced routing; with top-k routing at most 1/k (every token
  fills k distinct experts), reached when one expert is in every token's top k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lifelong_moe import names

Shares = Sequence[Sequence[float]]  # [test experience j][expert e]


def specialization(shares: Shares, origin: Sequence[int], t: int) -> float:
    """Mean over j <= t of sum_{e: origin[e] == j} shares[j][e]."""
    own = np.asarray(origin)
    values = []
    for j in range(t + 1):
        row = np.asarray(shares[j], dtype=float)
        values.append(float(row[own[: len(row)] == j].sum()))
    return float(np.mean(values))


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


def max_imbalance(shares: Shares, t: int) -> float:
    """max_e mean_{j <= t} shares[j][e]."""
    return float(np.asarray(shares[: t + 1], dtype=float).mean(axis=0).max())


def routing_metrics(
    history: Sequence[Sequence[Shares]], origin: Sequence[int], t: int
) -> dict[str, float]:
    """``routing/<metric>/layer_<k>`` for every MoE layer and ``routing/<metric>`` (their mean).

    ``history[i][k]`` is layer k's shares matrix after experience i; drift is left out at t = 0.
    """
    layers = range(len(history[t]))
    per_layer = {
        "specialization": [specialization(history[t][k], origin, t) for k in layers],
        "max_imbalance": [max_imbalance(history[t][k], t) for k in layers],
    }
    if t > 0:
        per_layer["drift"] = [drift([h[k] for h in history], t) for k in layers]
    out: dict[str, float] = {}
    for name, values in per_layer.items():
        if not values:
            continue
        out[f"{names.ROUTING}/{name}"] = float(np.mean(values))
        out |= {names.routing_layer(name, k): v for k, v in enumerate(values)}
    return out
