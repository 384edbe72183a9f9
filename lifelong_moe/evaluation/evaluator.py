"""Which evaluator a stream needs: classification accuracy or language-model perplexity."""

from __future__ import annotations

from lifelong_moe.evaluation.evaluate import Evaluator, evaluate
from lifelong_moe.evaluation.evaluate_lm import evaluate_lm
from lifelong_moe.stream import Stream


def evaluator_for(stream: Stream) -> Evaluator:
    """The evaluator of the stream's scenario; both return one ``Evaluation``."""
    return evaluate_lm if stream.language_modeling else evaluate
