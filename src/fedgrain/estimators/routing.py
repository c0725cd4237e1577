"""Prediction on an adaptive partition: each row to its leaf's model (design.md 3, 7).

A mixin of :class:`fedgrain.estimators.AdaptiveFederatedOrdinal`: it routes rows through
``partition_``, checks that the partition is still the fitted one, and (with a meta-learner)
sends rows of regions no leaf has seen to the meta-learned global model.
"""

from __future__ import annotations

import numpy as np

from ..core.likelihood import class_proba, cumulative_proba

#: A row outside its leaf's range of a feature by more than this share of the range is unseen.
UNSEEN_MARGIN = 0.25
UNSEEN_BLOCK = 65_536


class RoutedPrediction:
    """Predictions routed to the leaves' models (needs ``partition_``, ``local_models_``,
    ``meta_model_``, ``profile_`` and the tables set by ``_set_leaf_models``)."""

    def apply(self, X) -> np.ndarray:
        """The leaf (position in ``partition_.leaves`` and ``local_models_``) of each row.

        Rows of a region dealt out into random pieces go to a piece by a fixed pseudo-random
        function of the row, not by the class-stratified deal of the training rows (use
        ``partition_.route(X_encoded, class_codes)`` for that); the pieces share one model, so
        predictions do not depend on which.
        """
        return self._route(self._encode(X))

    def _route(self, Xe: np.ndarray) -> np.ndarray:
        if self.partition_.leaves != self._leaf_ids:
            raise ValueError(
                "partition_ was changed (split or merged) after fitting, so its leaves no longer "
                "match local_models_; fit again, or fit(X, y, partition=...) with the new tree.")
        return self.partition_.route(Xe)

    def unseen(self, X) -> np.ndarray:
        """Which rows lie outside the region their leaf was trained on (predicted by the
        global model instead).

        A row is unseen when some feature lies outside its leaf's range (``profile_``: the 0.1%
        to 99.9% quantiles of the leaf's rows) by more than ``UNSEEN_MARGIN`` times that range:
        the leaf's model would be extrapolated there.
        """
        Xe = self._encode(X)
        return self._unseen(Xe, self._route(Xe))

    def _falls_back(self, Xe: np.ndarray, leaf: np.ndarray) -> np.ndarray:
        """Rows the meta-learned global model predicts: unseen ones, with a meta-learner (with
        ``meta="none"`` every row keeps its leaf's fit, as the partition alone decides)."""
        if self.meta == "none":
            return np.zeros(Xe.shape[0], dtype=bool)
        return self._unseen(Xe, leaf)

    def _unseen(self, Xe: np.ndarray, leaf: np.ndarray) -> np.ndarray:
        lps = [self.profile_[nid] for nid in self.partition_.leaves]
        if any(lp.low is None for lp in lps):
            return np.zeros(Xe.shape[0], dtype=bool)
        low = np.array([lp.low for lp in lps])
        high = np.array([lp.high for lp in lps])
        pad = UNSEEN_MARGIN * (high - low)
        lo, hi = low - pad, high + pad
        out = np.zeros(Xe.shape[0], dtype=bool)
        for a in range(0, Xe.shape[0], UNSEEN_BLOCK):
            rows = slice(a, a + UNSEEN_BLOCK)
            Xb, lb = Xe[rows], leaf[rows]
            out[rows] = ((Xb < lo[lb]) | (Xb > hi[lb])).any(axis=1)
        return out

    def _routed(self, X):
        """Each row's linear predictor and thresholds: its leaf's model, or for rows of an
        unseen region the (meta-learned) global model."""
        Xe = self._encode(X)
        return self._routed_encoded(Xe, self._route(Xe))

    def _routed_encoded(self, Xe: np.ndarray, leaf: np.ndarray):
        fallback = self.n_leaves_  # one row past the leaves in the tables below
        which = np.where(self._falls_back(Xe, leaf), fallback, leaf)
        coef = np.vstack([self._leaf_coef, self.meta_model_.coef_])
        thresholds = np.vstack([self._leaf_thresholds, self.meta_model_.thresholds_])
        eta = np.einsum("ij,ij->i", Xe, coef[which]) if Xe.shape[0] else np.zeros(0)
        return eta, thresholds[which]

    def predict_linear(self, X) -> np.ndarray:
        """``x @ coef`` with each row's leaf coefficients (the global model's for unseen rows
        when there is a meta-learner)."""
        return self._routed(X)[0]

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities from each row's leaf model, shape ``(n, K)``."""
        return class_proba(*self._routed(X))

    def predict_cumulative_proba(self, X) -> np.ndarray:
        return cumulative_proba(*self._routed(X))

    def predict_proba_ci(self, X, alpha: float = 0.05):
        """Class probabilities with delta-method intervals, each row from its leaf model (the
        global model for unseen rows when there is a meta-learner)."""
        Xe = self._encode(X)
        leaf = self._route(Xe)
        which = np.where(self._falls_back(Xe, leaf), -1, leaf)
        K = self.classes_.shape[0]
        out = [np.empty((Xe.shape[0], K)) for _ in range(3)]
        for pos in np.unique(which):
            rows = which == pos
            model = self.meta_model_ if pos < 0 else self.local_models_[pos]
            for o, v in zip(out, model.results_.predict_proba_ci(Xe[rows], alpha), strict=True):
                o[rows] = v
        return tuple(out)
