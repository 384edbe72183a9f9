"""Naive fine-tuning: train on each experience in turn, nothing protects the past (lower bound)."""

from lifelong_moe.methods.base import ContinualMethod


class Naive(ContinualMethod):
    """The base method unchanged: cross-entropy on the current experience only."""
