# The two commands: `make demo` and `make test`. Everything lives in .venv (pip, no uv/poetry).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_SWEEP := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Naive, joint, MoE fine-tuning and Lifelong-MoE on permuted digits, then the comparison table;
# the last line is the URL of the sweep's parent run, which holds that comparison in the MLflow UI.
demo: $(STAMP)
	$(BIN)/lifelong-moe -m experiment=demo method=naive,joint,moe_finetune,lifelong_moe \
		tracking.sweep_id=$(DEMO_SWEEP)
	$(BIN)/lifelong-moe-compare --experiment demo --filter sweep_id=$(DEMO_SWEEP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	bash experiments/bench_dispatch.sh

clean:
	rm -rf $(VENV) outputs multirun mlruns mlflow.db .pytest_cache
