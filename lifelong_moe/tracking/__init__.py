"""The whole MLflow contract; nothing outside this package opens a client or spells a name.

- names.py       every metric, tag and artifact name (and the names used before issue 13)
- store.py       the one MlflowClient factory, the one store check, experiment creation, UI URLs
- queries.py     every read: find a run, its config, state, matrices, metric history, search
- mlflow_run.py  writing one run: RunTracker (rank 0) and SilentTracker (other ranks)
- results.py     the artifacts a finished run leaves: matrices, tables, plots, description
- report.py      the markdown and tables those artifacts hold; dataset inputs
- sweep.py, hydra_callback.py  a sweep's parent run, opened before and closed after its jobs
"""
