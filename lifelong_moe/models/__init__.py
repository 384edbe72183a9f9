"""Backbones: every model maps inputs to ``(logits, aux)``, aux being one MoEAux per MoE layer.

Layout, from a model config to the grouped GEMM:

- build.py: ``build_model`` turns the flat ``model`` config into a backbone: the MoE keys
  (``moe``, ``moe_blocks``, ``n_experts``, ``top_k``, ``router_noise``, ``capacity_factor``,
  ``dispatch``) become one ``MoESettings``, the rest are the ``_target_`` class's arguments.
- mlp.py (ResidualMLP), vit.py (PatchTransformer), lm.py (CausalLM): the backbones; each
  builds its FFNs with ``MoESettings.ffns`` (moe/layer.py): a MoELayer, whose forward runs
  moe/dispatch.py's grouped GEMMs, or the dense twin's DenseMLP.
- transformer.py: the pre-norm block stack shared by vit.py and lm.py; it receives the FFNs.
- checkpoint.py: save and reload a grown model; params.py: total / trainable / active counts.
- seed_ensemble.py, experience_heads.py: predictors a method builds around a backbone (SEED's
  ensemble; one output head per experience for ``method=dense_heads``).
"""

from __future__ import annotations

from lifelong_moe.models.build import build_model
from lifelong_moe.models.checkpoint import load_model, save_model
from lifelong_moe.models.params import count_parameters, moe_layers

__all__ = ["build_model", "count_parameters", "load_model", "moe_layers", "save_model"]
