"""Lifelong-MoE continual-learning toolkit.

Layout, one idea per module (the README's Layout section has the same map):

- ``cli.py`` (``lifelong-moe``): the Hydra app; prints user errors as one line.
- ``runner.py``: build the experiment, then per experience before -> fit -> evaluate -> after ->
  record; ``trainer.py`` makes the Lightning Trainer of one experience, ``checkpointing.py``
  its step checkpoints, ``signals.py`` Ctrl-C / SIGTERM / SLURM, ``resume.py`` the saved state.
- ``config_schema.py`` and ``checks.py``: what a valid config is, and the one-line errors.
- ``data/``: streams of experiences; ``models/``: backbones; ``moe/``: the MoE core (plain
  torch, down to the grouped GEMM); ``methods/``: one Lightning module per method.
- ``evaluation/``: evaluators (one result type), metric rows and definitions, routing metrics,
  plots; ``costs.py`` / ``throughput.py``: the ``cost/*`` row; ``console.py``: what is printed.
- ``tracking/``: the whole MLflow contract (names, store, queries, the run tracker, results,
  reports, the sweep's parent run); ``compare.py`` (``lifelong-moe-compare``) reads it.
"""
