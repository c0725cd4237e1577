"""Scores for ordinal predictions, from class codes and class probabilities."""

from __future__ import annotations

import numpy as np

from .core.likelihood import row_log_loss


def ordinal_scores(codes: np.ndarray, proba: np.ndarray) -> dict[str, float | int]:
    """Accuracy, mean absolute class error, log-loss and ranked probability score.

    Parameters
    ----------
    codes : ndarray of shape (n,)
        True class codes ``0 .. K-1``.
    proba : ndarray of shape (n, K)
        Predicted class probabilities.

    Returns
    -------
    dict
        ``rows`` (an int), ``accuracy`` (of the most probable class), ``mae`` (mean absolute
        error in levels of the most probable class), ``log_loss`` (mean negative log
        probability of the true class) and ``rps`` (ranked probability score: mean squared
        distance between predicted and observed cumulative distributions, averaged over the
        K - 1 cut points).
    """
    n, K = proba.shape
    pred = np.argmax(proba, axis=1)
    cum = np.cumsum(proba, axis=1)[:, :-1]
    obs = (codes[:, None] <= np.arange(K - 1)[None, :]).astype(float)
    return {
        "rows": n,
        "accuracy": float(np.mean(pred == codes)),
        "mae": float(np.mean(np.abs(pred - codes))),
        "log_loss": float(np.mean(row_log_loss(proba, codes))),
        "rps": float(np.mean(np.sum((cum - obs) ** 2, axis=1) / max(K - 1, 1))),
    }
