"""Sparse mixture-of-experts core in plain torch: router, expert banks, grouped dispatch."""

from lifelong_moe.moe.layer import MoEAux, MoELayer

__all__ = ["MoEAux", "MoELayer"]
