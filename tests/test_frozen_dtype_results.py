"""results/frozen_dtype/README.md is the render of the committed results.json (no hand edits)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "frozen_dtype"


def test_committed_readme_is_the_render_of_results_json() -> None:
    if not (RESULTS / "results.json").exists():
        pytest.skip("no committed results yet")
    spec = importlib.util.spec_from_file_location(
        "frozen_dtype", REPO / "experiments/frozen_dtype.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = json.loads((RESULTS / "results.json").read_text())
    assert (RESULTS / "README.md").read_text() == module.render(data)
