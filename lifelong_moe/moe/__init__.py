"""Sparse mixture-of-experts core in plain torch (no Lightning, no Hydra).

From a backbone to the grouped GEMM:

- layer.py     ``MoESettings`` (the model config's MoE keys; builds each block's FFN),
               ``MoELayer`` (router + experts + dispatch; expand / freeze_existing for
               Lifelong-MoE) and ``DenseMLP`` (the dense twin's FFN)
- router.py    top-k gate with frozen and trainable rows, noise, expert mask, aux losses
- experts.py   stacked expert weights [E, d, h] in a frozen and a trainable bank
- dispatch.py  sort tokens by expert -> ``grouped_mm`` -> unsort -> weighted combine
- fused.py     the same dispatch as Triton kernels (CUDA; ``dispatch: fused``)
- quant.py     storage of frozen banks: fp32 | bf16 | int8 | fp8 (``method.frozen_dtype``)
- expert_parallel.py  experts sharded over the "ep" dim of a (dp, ep) DeviceMesh, all-to-all
- balance.py   transformers' load-balancing loss of the HF families (pooled over layers)
- domain.py    mean router input per layer (gate_init=domain)
"""

from lifelong_moe.moe.layer import AuxList, DenseMLP, MoEAux, MoELayer, MoESettings

__all__ = ["AuxList", "DenseMLP", "MoEAux", "MoELayer", "MoESettings"]
