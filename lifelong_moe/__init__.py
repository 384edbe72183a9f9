"""Lifelong-MoE continual-learning toolkit.

The folders are the architecture (README "Layout"; tests/test_architecture.py keeps imports
pointing down this list):

- ``cli.py``, ``compare.py``, ``bench.py``: the console entry points.
- ``run/``: the experience loop (``loop.py``), the Trainer of one experience and its budget,
  step checkpoints, resume, signals, the stop decision DDP ranks share, training curves,
  torchrun and expert parallelism in a run.
- ``config/``: what a valid config is, and where conf/ and your own config directories are.
- ``methods/``, ``tracking/`` (the whole MLflow contract), ``measure/`` (the ``cost/*`` row).
- ``data/`` (streams: Avalanche, your own data, text, token shards, instructions) and
  ``evaluation/`` (evaluators, metric definitions, routing metrics, downstream tasks, plots).
- ``models/``: backbones, Hugging Face MoE families, build, save/load, export.
- ``moe/``: the MoE core, plain torch, down to the grouped GEMM and expert parallelism.
- shared nouns: ``names``, ``checks``, ``errors``, ``stream``, ``targets``, ``log``, ``compat``.
"""
