"""Continual-learning metrics as pure functions of the accuracy matrix.

The accuracy matrix is the single source of truth: ``R[i][j]`` is the accuracy on test experience
``j`` after training on experience ``i`` (every ``j``, future ones included), and ``b[j]`` is the
accuracy of the untrained model on ``j``. Everything the runner logs and ``compare`` aggregates is
derived here, so a number in MLflow can always be recomputed from ``accuracy_matrix.json``.

``R`` may be partial (only the rows computed so far); ``t`` indexes a row that exists. Names are
chosen to be unambiguous about which "forgetting" is meant:

- :func:`forgetting` is Chaudhry et al. (2018): drop from the *best* accuracy ever reached.
- :func:`first_last_forgetting` is Avalanche's ``StreamForgetting``: drop from the accuracy
  *right after* training on the experience. It equals ``-bwt``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lifelong_moe import names

ArrayLike = np.ndarray | Sequence[Sequence[float]]


def _matrix(R: ArrayLike, t: int | None = None) -> np.ndarray:
    """R as a float array with at least ``t + 1`` rows and columns; ValueError otherwise."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be 2-D with at least one row, got shape {R.shape}")
    if R.shape[1] < R.shape[0]:
        raise ValueError(f"accuracy matrix needs a column per trained experience, got {R.shape}")
    if t is not None and not 0 <= t < R.shape[0]:
        raise ValueError(f"experience index t={t} outside the matrix rows [0, {R.shape[0] - 1}]")
    return R


def _last(R: np.ndarray, t: int | None) -> int:
    return R.shape[0] - 1 if t is None else t


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1) and count over seeds, ignoring NaN (a metric a run did not log).

    The std of a single seed is reported as 0.0 rather than NaN so tables and error bars stay
    readable; the count says how much to trust it. No values at all gives (nan, nan, 0).
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), 0
    std = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    return float(np.mean(x)), std, int(x.size)


def average_accuracy(R: ArrayLike, t: int) -> float:
    """A_t = mean_{j<=t} R[t][j]: accuracy over the experiences seen so far (``acc/seen``)."""
    R = _matrix(R, t)
    return float(np.mean(R[t, : t + 1]))


def average_incremental_accuracy(R: ArrayLike, t: int | None = None) -> float:
    """mean_{i<=t} A_i (Rebuffi et al. 2017); ``t`` defaults to the last row.

    Unlike the final A_t it rewards methods that are good *throughout* the stream.
    """
    R = _matrix(R, t)
    t = _last(R, t)
    return float(np.mean([average_accuracy(R, i) for i in range(t + 1)]))


def forgetting(R: ArrayLike, t: int) -> float:
    """Chaudhry et al. (2018) forgetting after experience t (max-based).

    mean_{j<t} (max_{l in [j, t-1]} R[l][j] - R[t][j]); 0.0 at t=0. Measuring from the best
    accuracy ever reached on j means that a rise after training on j (backward transfer) that is
    later lost still counts as forgotten; :func:`first_last_forgetting` would not count it.
    """
    R = _matrix(R, t)
    if t == 0:
        return 0.0
    drops = [np.max(R[j:t, j]) - R[t, j] for j in range(t)]
    return float(np.mean(drops))


def first_last_forgetting(R: ArrayLike, t: int) -> float:
    """Avalanche's forgetting after experience t: mean_{j<t} (R[j][j] - R[t][j]); 0.0 at t=0.

    This is what ``avalanche.evaluation.metrics.StreamForgetting`` reports (and what
    ``avalanche.evaluation.functional.forgetting`` gives per cell): accuracy right after training
    on j minus accuracy now. It equals ``-bwt(R, t)`` and is never larger than the max-based
    :func:`forgetting`; the two differ whenever accuracy on an old experience rose after it was
    trained on (e.g. R[j][j]=0.6, R[j+1][j]=0.8, R[t][j]=0.5 gives 0.1 here but 0.3 there).
    """
    return -bwt(R, t)


def bwt(R: ArrayLike, t: int) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): mean_{j<t} (R[t][j] - R[j][j]); 0.0 at t=0.

    Negative values mean forgetting; positive values mean later training helped old experiences.
    """
    R = _matrix(R, t)
    if t == 0:
        return 0.0
    return float(np.mean([R[t, j] - R[j, j] for j in range(t)]))


def fwt(R: ArrayLike, b: Sequence[float] | np.ndarray, t: int | None = None) -> float:
    """Forward transfer (Lopez-Paz & Ranzato 2017): mean_{1<=j<=t} (R[j-1][j] - b[j]).

    How much training on earlier experiences helps an experience before it is trained on,
    relative to the untrained model. ``t`` defaults to the last row; 0.0 when t=0 (no j).
    """
    R = _matrix(R, t)
    t = _last(R, t)
    b = np.asarray(b, dtype=float)
    if b.shape != (R.shape[1],):
        raise ValueError(
            f"baseline b needs one value per test experience ({R.shape[1]}), got {b.shape}"
        )
    if t == 0:
        return 0.0
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, t + 1)]))


def summarize(R: ArrayLike, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """End-of-stream metrics (at the last row of R) under the names logged to MLflow."""
    R = _matrix(R)
    t = R.shape[0] - 1
    return {
        names.ACC_FINAL: average_accuracy(R, t),
        names.ACC_AVG_INCREMENTAL: average_incremental_accuracy(R, t),
        names.ACC_FORGETTING: forgetting(R, t),
        names.ACC_BWT: bwt(R, t),
        names.ACC_FWT: fwt(R, b, t),
    }


def average_perplexity(L: ArrayLike, t: int) -> float:
    """mean_{j<=t} exp(L[t][j]): the perplexity twin of A_t (``ppl/seen``) for a loss matrix."""
    L = _matrix(L, t)
    return float(np.mean(np.exp(L[t, : t + 1])))


def summarize_loss(L: ArrayLike) -> dict[str, float]:
    """End-of-stream metrics for language models from a loss matrix.

    ``L[i][j]`` is the validation loss (nats per token) on domain j after experience i; perplexity
    is ``exp(L)``. With T rows:

    - ``ppl/final`` = mean_{j<T} exp(L[T-1][j]): the mean of per-domain perplexities (not the
      perplexity of the mean loss), so one bad domain is not hidden by a log-average.
    - ``ppl/forgetting`` = mean_{j<T-1} (exp(L[T-1][j]) - min_{l in [j, T-2]} exp(L[l][j])): the
      perplexity increase on earlier domains over the best ever reached (the max-based definition
      of :func:`forgetting`, mirrored because lower is better); 0.0 when T=1.
    - ``loss/bwt`` = mean_{j<T-1} (L[T-1][j] - L[j][j]): positive means forgetting (the sign is
      the opposite of accuracy BWT because lower loss is better); 0.0 when T=1.
    """
    L = _matrix(L)
    t = L.shape[0] - 1
    P = np.exp(L)
    if t == 0:
        ppl_forgetting, loss_bwt = 0.0, 0.0
    else:
        ppl_forgetting = float(np.mean([P[t, j] - np.min(P[j:t, j]) for j in range(t)]))
        loss_bwt = float(np.mean([L[t, j] - L[j, j] for j in range(t)]))
    return {
        names.PPL_FINAL: average_perplexity(L, t),
        names.PPL_FORGETTING: ppl_forgetting,
        names.LOSS_BWT: loss_bwt,
    }
