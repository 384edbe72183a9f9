"""Every rendered number in README.md and results/**/*.md equals its render from the committed
artifacts (experiments/render.py); a hand-edited number fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_render():
    spec = importlib.util.spec_from_file_location("render", REPO / "experiments" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


@pytest.mark.parametrize("path", render.files(), ids=lambda p: str(p.relative_to(REPO)))
def test_committed_text_equals_its_render(path: Path):
    text = path.read_text()
    assert render.render_text(text) == text, (
        f"{path.relative_to(REPO)} differs from its render: run experiments/render.py"
    )


def test_the_headline_files_have_rendered_blocks():
    readme = (REPO / "README.md").read_text()
    assert readme.count("<!-- render:") >= 3
    for study in (REPO / "results").glob("study_*"):
        assert "<!-- render:results " in (study / "README.md").read_text(), study.name


def test_a_hand_edited_number_is_caught_and_a_bad_block_names_what_is_missing():
    block = "<!-- render:value study_digits lifelong_moe permuted_digits acc/forgetting -->"
    right = render.render_text(f"{block}x<!-- /render -->")
    assert right == f"{block}0.167 ± 0.022<!-- /render -->"
    assert render.render_text(right.replace("0.167", "0.176")) == right
    ratio = (
        "<!-- render:ratio study_digits lifelong_moe naive permuted_digits cost/train_total_s -->"
    )
    assert render.render_text(f"{ratio}?<!-- /render -->") == f"{ratio}8.6x<!-- /render -->"
    difference = "<!-- render:difference study_digits naive permuted_digits acc/final -->"
    want = f"{difference}-0.296 [-0.355, -0.238]<!-- /render -->"
    assert render.render_text(f"{difference}?<!-- /render -->") == want
    per_experience = "<!-- render:value study_digits lifelong_moe permuted_digits acc/exp_0 -->"
    want = f"{per_experience}0.861 ± 0.022<!-- /render -->"
    assert render.render_text(f"{per_experience}?<!-- /render -->") == want
    with pytest.raises(render.RenderError, match="no row for method=seed"):
        render.render_text(
            "<!-- render:value study_digits seed split_digits acc/final -->-<!-- /render -->"
        )
