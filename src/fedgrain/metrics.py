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


def baseline_scores(codes: np.ndarray, n_levels: int) -> dict[str, float | int]:
    """:func:`ordinal_scores` of the null model on these rows: every row gets the levels'
    shares in them (the best prediction without features)."""
    codes = np.asarray(codes)
    shares = np.bincount(codes, minlength=n_levels) / max(codes.shape[0], 1)
    return ordinal_scores(codes, np.tile(shares, (codes.shape[0], 1)))


def skill_scores(scores: dict, baseline: dict) -> dict[str, float | None]:
    """``1 - model / baseline`` for the losses (log-loss, rps, mae): the share of the null
    model's loss that the model removes (None where the baseline's is zero)."""
    return {k: (None if baseline[k] == 0 else 1.0 - scores[k] / baseline[k])
            for k in ("log_loss", "rps", "mae")}


class OrdinalScorer:
    """A scikit-learn scorer (``scoring=`` of ``cross_val_score``, ``GridSearchCV``, ...) from
    one of :func:`ordinal_scores`' figures, negated so that greater is better.

    It reads the probabilities in the levels' ordinal order (``predict_proba(X,
    order="levels")`` of a fedgrain model; for another classifier, its ``classes_`` order,
    which must then be the ordinal one, as for integer codes) and codes the true labels by the
    model's own levels, so string labels, ordered categoricals and integer codes give the same
    score. Called as ``scorer(estimator, X, y, sample_weight=None)``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import cross_val_score
    >>> from fedgrain import OrdinalRegression
    >>> from fedgrain.metrics import ranked_probability_scorer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((300, 2))
    >>> y = np.array(["low", "mid", "high"])[np.digitize(X[:, 0] + rng.logistic(size=300),
    ...                                                  [-1, 1])]
    >>> model = OrdinalRegression(levels=["low", "mid", "high"])
    >>> bool(cross_val_score(model, X, y, scoring=ranked_probability_scorer).mean() < 0)
    True
    """

    def __init__(self, key: str, name: str):
        self.key = key
        self.name = name

    def __repr__(self) -> str:
        return f"OrdinalScorer({self.name!r})"

    def __call__(self, estimator, X, y, sample_weight=None) -> float:
        model = _final(estimator)  # a Pipeline's (or search's) fitted fedgrain model
        if hasattr(model, "levels_"):
            # columns of classes_ (what every wrapper passes on) put in the levels' order
            proba = estimator.predict_proba(X)
            where = {c: j for j, c in enumerate(np.asarray(estimator.classes_).tolist())}
            proba = proba[:, [where[v] for v in model.levels_.tolist()]]
            codes = model.target_.encode(y, what="y")
        else:
            proba = estimator.predict_proba(X)
            levels = list(estimator.classes_)
            where = {c: i for i, c in enumerate(levels)}
            try:
                codes = np.array([where[v] for v in np.asarray(y).tolist()], dtype=np.intp)
            except KeyError as exc:
                raise ValueError(f"y holds the label {exc.args[0]!r}, which the model's "
                                 f"classes_ {levels} do not.") from None
        if sample_weight is None:
            return -float(ordinal_scores(codes, proba)[self.key])
        w = np.asarray(sample_weight, dtype=float)
        per_row = _row_scores(codes, proba)[self.key]
        return -float(np.sum(w * per_row) / np.sum(w))


def _final(estimator):
    """The fitted model at the end of a Pipeline or inside a fitted search, else itself."""
    for _ in range(10):
        inner = getattr(estimator, "_final_estimator", None)
        if inner is None:
            inner = getattr(estimator, "best_estimator_", None)
        if inner is None or inner is estimator:
            return estimator
        estimator = inner
    return estimator


def _row_scores(codes: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`ordinal_scores`' figures row by row (for weighted means)."""
    n, K = proba.shape
    pred = np.argmax(proba, axis=1)
    cum = np.cumsum(proba, axis=1)[:, :-1]
    obs = (codes[:, None] <= np.arange(K - 1)[None, :]).astype(float)
    return {"mae": np.abs(pred - codes).astype(float), "log_loss": row_log_loss(proba, codes),
            "rps": np.sum((cum - obs) ** 2, axis=1) / max(K - 1, 1)}


#: Ranked probability score (negated): ``scoring=ranked_probability_scorer``.
ranked_probability_scorer = OrdinalScorer("rps", "neg_ranked_probability_score")
#: Mean absolute error in levels of the most probable level (negated).
mean_absolute_class_error_scorer = OrdinalScorer("mae", "neg_mean_absolute_class_error")
#: Log-loss of the true level, read in the ordinal order whatever the labels (negated).
ordinal_log_loss_scorer = OrdinalScorer("log_loss", "neg_ordinal_log_loss")
#: The scorers by name, for ``scoring=SCORERS["neg_ranked_probability_score"]`` or a dict of
#: several in ``cross_validate(scoring=SCORERS)``.
SCORERS = {s.name: s for s in (ranked_probability_scorer, mean_absolute_class_error_scorer,
                               ordinal_log_loss_scorer)}
