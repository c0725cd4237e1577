"""Fitted models that are parts of another model's fit: pooled models and leaf models.

None of them is fitted on its own (``fit`` refuses); they predict, summarise and save like any
estimator. :class:`PooledModel` holds a :class:`fedgrain.federation.engine.PooledFit`: it is the
fitted state of :class:`fedgrain.DivideConquerOrdinal` and, as :class:`GlobalModel`, the global
model of :class:`fedgrain.AdaptiveFederatedOrdinal`.
"""

from __future__ import annotations

import numpy as np

from ..data import FeatureSchema, TargetEncoding
from ..federation.engine import PooledFit
from ..inference.results import OrdinalResults
from .base import OrdinalModel, register


class PooledModel(OrdinalModel):
    """A model pooled from subsets: its coefficients with inference, and the subsets' own.

    Attributes (besides those of every ordinal model): ``n_subsets_``, ``subset_sizes_``,
    ``subset_estimates_`` (each subset's de-biased estimate on the original scale, NaN where
    not identified), ``subset_lasso_estimates_``, ``subset_alphas_``, ``n_iter_``, the one-shot
    pooling's heterogeneity ``q_``, ``q_df_``, ``q_pvalue_``, ``i2_``, and ``oneshot_results_``
    (the patent's one-shot pooled estimate, before refinement).
    """

    def _set_pooled(self, schema: FeatureSchema, target: TargetEncoding,
                    fit: PooledFit) -> None:
        r = fit.results
        self._set_fitted(schema, target, r.params, r.cov, r)
        self._set_parts(fit)

    def _set_parts(self, fit: PooledFit) -> None:
        self.n_subsets_ = fit.n_subsets
        self.subset_sizes_ = fit.subset_sizes
        self.subset_estimates_ = fit.subset_estimates
        self.subset_lasso_estimates_ = fit.subset_lasso_estimates
        self.subset_alphas_ = fit.subset_alphas
        self.n_iter_ = fit.n_iter
        self.q_, self.q_df_, self.q_pvalue_, self.i2_ = fit.q, fit.q_df, fit.q_pvalue, fit.i2
        self.oneshot_results_ = fit.oneshot

    @property
    def pooled_fit_(self) -> PooledFit:
        """The pooled model and what it was pooled from, as one record."""
        return PooledFit(self.results_, self.oneshot_results_, self.subset_sizes_,
                         self.subset_estimates_, self.subset_lasso_estimates_,
                         self.subset_alphas_, self.n_iter_, self.q_, self.q_df_,
                         self.q_pvalue_, self.i2_)

    def _extra_state(self):
        return self.pooled_fit_.to_state()

    def _restore_extra(self, meta, arrays):
        self._set_parts(PooledFit.from_state(meta, arrays, self.results_))


@register
class GlobalModel(PooledModel):
    """The global model of an adaptive partition: its leaves pooled, with inference
    (made by :class:`fedgrain.AdaptiveFederatedOrdinal`, not fitted alone).

    ``q_`` and ``i2_`` say how much the leaves differ (see :class:`LeafModel` for an
    example).
    """

    def fit(self, X, y, sample_weight=None):
        raise NotImplementedError("The global model is made by AdaptiveFederatedOrdinal.fit.")

    @classmethod
    def of(cls, schema: FeatureSchema, target: TargetEncoding, fit: PooledFit) -> GlobalModel:
        model = cls()
        model._set_pooled(schema, target, fit)
        return model


@register
class LeafModel(OrdinalModel):
    """The fitted model of one leaf (made by :class:`AdaptiveFederatedOrdinal`, not fitted alone).

    Parameters a leaf does not identify are filled in and listed in ``results_.info`` under
    "Not identified in the leaf": the slope of a feature constant in the leaf comes from the
    global model (the leaf's thresholds absorb its effect and are shifted back, so predictions
    for the leaf's own rows are exactly the leaf's, with the leaf's uncertainty); the threshold
    of a class the leaf never saw sits where the leaf's rows would expect half an observation
    beyond it (what zero counts say), and further such thresholds at the global model's gaps
    from it. The standard errors of these thresholds are the global model's, a stand-in: the
    leaf has no information on them. A middle class the leaf never saw (classes on both sides
    occur) would leave its two thresholds equal (probability 0 with the interval [0, 0]); they
    are opened to the width at which the leaf's rows expect half an observation of it, with a
    standard error equal to that width (the class's interval reaches about the exact Poisson
    bound for zero counts), and both are listed.

    Examples
    --------
    >>> from fedgrain import AdaptiveFederatedOrdinal
    >>> from fedgrain.datasets import make_regions
    >>> X, y, *_ = make_regions(6000, n_regions=2, random_state=0)
    >>> af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y)
    >>> leaf = af.local_models_[0]
    >>> leaf.leaf == af.partition_.leaves[0], leaf.coef_.shape
    (True, (5,))
    >>> af.global_model_.n_subsets_ == af.n_leaves_  # the global model pools the leaves
    True
    """

    def __init__(self, leaf=0):
        self.leaf = leaf

    def fit(self, X, y, sample_weight=None):
        raise NotImplementedError("Leaf models are made by AdaptiveFederatedOrdinal.fit.")

    @classmethod
    def of(cls, leaf: int, schema: FeatureSchema, target: TargetEncoding, params: np.ndarray,
           cov: np.ndarray, title: str, info: dict) -> LeafModel:
        """A leaf model with these raw parameters and covariance."""
        results = OrdinalResults(params, cov, schema.output_names, target.classes, title=title,
                                 info=info)
        model = cls(leaf=leaf)
        model._set_fitted(schema, target, params, cov, results)
        return model
