"""Evaluation and metrics: pure functions of what the model did on the test experiences.

- evaluate.py / evaluate_lm.py  one evaluator interface, one ``Evaluation`` result
- rows.py      the metrics logged after each experience and at the end (pure functions)
- metrics.py   the definitions: A_t, forgetting, BWT, FWT, perplexity summaries
- routing.py   routing specialization, drift and max imbalance from routing shares
- plots.py     accuracy matrix, routing shares, curves and bars (matplotlib)
"""
