"""Backbones: every model maps inputs to ``(logits, aux)``, aux being one MoEAux per MoE layer."""

from lifelong_moe.models.checkpoint import load_model, moe_layers, save_model
from lifelong_moe.models.params import count_parameters

__all__ = ["count_parameters", "load_model", "moe_layers", "save_model"]
