"""Lifelong-MoE continual-learning toolkit."""
