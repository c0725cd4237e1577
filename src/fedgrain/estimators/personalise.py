"""Personalisation by the federated meta-learner, for the adaptive estimator (design.md 7).

A mixin of :class:`fedgrain.estimators.AdaptiveFederatedOrdinal`: the meta-learning rounds over
the placed leaves (the loop itself is :mod:`fedgrain.federation.meta`), and ``adapt`` to a new
subset.
"""

from __future__ import annotations

import numpy as np

from ..core.likelihood import composite_pass
from ..core.linalg import solve_psd
from ..exceptions import DataError, SubsetError
from ..federation import meta
from ..inference import local
from ..partition.growth import leaf_seeds
from .leaves import LeafModel, leaf_view

#: The meta-learner's FedProx pull by default, in pseudo-rows per parameter.
DEFAULT_PULL_PER_PARAM = 10.0


class Personalisation:
    """Meta-learning rounds and ``adapt`` (needs the adaptive estimator's fitted state)."""

    def _meta_rounds(self, backend, refs, sched, run, tree, p: int, seed: int):
        """Run the meta-learner over the placed leaves: ``(theta, rho, adapt_rho, P, personal)``.

        ``personal`` holds each leaf's ``(params, cov)`` in standardised coordinates, or is
        None when each leaf keeps its own local fit (``meta="none"``). ``adapt_rho`` is the
        pull ``adapt`` uses: the empirical-Bayes pull of the leaves' spread around ``theta``.
        """
        d = run.estimate.shape[0]
        N = float(tree.sizes.sum())
        K = d - p + 1
        P = run.pooled.information / N
        self.history_, self.events_ = [], []
        views = [leaf_view(f, run.estimate, run.cov, p) for f in run.fits]
        fits, covs = [v[0] for v in views], [v[1] for v in views]
        if self.meta == "none":
            pull = meta.empirical_pull(fits, covs, run.estimate, P)
            return run.estimate, np.inf, pull, P, None
        region_of = tree.region_of()
        if np.unique(region_of).shape[0] == 1:
            # one region (maybe dealt out into identical pieces): nothing to learn across
            # leaves; every leaf keeps the pooled (refined) model
            return run.estimate, np.inf, meta.RHO_MAX, P, [(run.estimate, run.cov)] * \
                tree.n_leaves
        settings = meta.MetaSettings(self.meta, p, K, int(self.inner_steps),
                                     float(self.validation_fraction))
        seeds = leaf_seeds(tree, seed, tag=1)  # the validation splits: a stream of their own
        work = N * d * d * self.inner_steps * (len(meta.RHO_STEPS) + 2)
        mu = DEFAULT_PULL_PER_PARAM * d if self.fedprox_mu is None else float(self.fedprox_mu)
        res = meta.run(backend, refs, sched.bundles(), settings, run.estimate, P, seeds,
                       tree.leaves, rho0=meta.empirical_pull(fits, covs, run.estimate, P),
                       max_rounds=int(self.max_rounds), tol=float(self.meta_tol),
                       fedprox_rho=mu, work=work)
        self.history_, self.events_ = res.history, res.events
        adapt_rho = meta.empirical_pull(fits, covs, res.theta, P)
        if not np.isfinite(res.rho):  # no adaptation pays: every leaf uses the global model
            return res.theta, res.rho, adapt_rho, P, [(res.theta, run.cov)] * tree.n_leaves
        outcomes = meta.personalise(backend, refs, sched.bundles(), settings, res, P, run.cov,
                                    work)
        if not any(o.ok for o in outcomes):
            o = outcomes[0]
            raise SubsetError(f"Personalising every leaf failed: {o.error_type}: {o.error}",
                              o.traceback)
        got = {}
        for o in outcomes:
            if o.ok:
                got[o.index] = o.value
            else:
                self.events_.append({"round": len(res.history) + 1,
                                     "leaf": int(tree.leaves[o.index]),
                                     "kind": "personalisation failed; the leaf uses the global "
                                             "model", "error": f"{o.error_type}: {o.error}"})
        personal = []
        for pos in range(tree.n_leaves):
            # pieces of one region share one model: their personalised fits, pooled by
            # information (exact for the information-weighted mean of the pieces)
            members = [i for i in np.flatnonzero(region_of == region_of[pos]) if i in got]
            if not members:
                personal.append((res.theta, run.cov))
                continue
            Hs = [got[i][2] for i in members]
            if len(members) == 1:
                personal.append(got[members[0]][:2])
                continue
            Hsum = sum(Hs) + 1e-8 * np.eye(d)
            W = solve_psd(Hsum, np.eye(d))
            est = W @ sum(H @ got[i][0] for H, i in zip(Hs, members, strict=True))
            cov = W @ sum(H @ got[i][1] @ H for H, i in zip(Hs, members, strict=True)) @ W
            personal.append((est, 0.5 * (cov + cov.T)))
        return res.theta, res.rho, adapt_rho, P, personal


    def adapt(self, X, y, sample_weight=None) -> LeafModel:
        """A model personalised to a new subset from a few labelled rows.

        Newton steps, to convergence, from the meta-learned global parameters (``meta_model_``)
        on these rows, pulled toward them with the empirical-Bayes pull of the training leaves'
        spread (``adapt_pull_``, pseudo-rows: what the leaves' differences say a new region's
        model may differ by). So a handful of rows moves the model a little and many rows move
        it far; on data where the leaves do not differ the pull is huge and the result is the
        global model. Parameters the rows do not identify (an absent class, a constant
        feature) stay at the global value. Returns a :class:`LeafModel` whose covariance is
        the sandwich of the rows plus the global model's uncertainty carried by the pull.
        """
        Xe = self._encode(X)
        codes = self.target_.encode(y, what="y")
        if codes.shape[0] != Xe.shape[0]:
            raise DataError(f"adapt got {Xe.shape[0]:,} rows of X and {codes.shape[0]:,} "
                            "labels; give one label per row.")
        if Xe.shape[0] < 1:
            raise DataError("adapt needs at least one labelled row.")
        w = None
        if sample_weight is not None:
            w = np.asarray(sample_weight, dtype=float).reshape(-1)
            if w.shape[0] != Xe.shape[0] or not np.all(np.isfinite(w)) or np.any(w < 0) \
                    or not w.sum() > 0:
                raise DataError("sample_weight must hold one finite, non-negative weight per "
                                "row, not all zero.")
        std = self.partition_.standardizer
        p = Xe.shape[1]
        st = self._meta_state
        d = st["theta"].shape[0]
        rho = st["adapt_rho"]
        Xs = np.ascontiguousarray(std.transform(Xe))
        with local.one_blas_thread():
            free = meta.free_coordinates(Xs, codes, w, d - p + 1)
            est, H = meta.adapt_params(Xs, codes, w, st["theta"], rho, st["P"],
                                       meta.PERSONAL_STEPS, p, free)
            J = composite_pass(Xs, codes, w, est[:p], est[p:], loss=False, order=0,
                               meat="cluster").meat
        Vg = self._pooled_cov_std()
        idx = np.flatnonzero(free)
        prior = rho * st["P"][np.ix_(idx, idx)]
        A = solve_psd(H[np.ix_(idx, idx)] + prior, np.eye(idx.size))
        cov = Vg.copy()
        cov[np.ix_(idx, ~free)] = 0.0
        cov[np.ix_(~free, idx)] = 0.0
        cov[np.ix_(idx, idx)] = A @ (J[np.ix_(idx, idx)] + prior @ Vg[np.ix_(idx, idx)] @
                                     prior) @ A.T
        params, cov = std.to_raw_model(est, 0.5 * (cov + cov.T))
        return self._leaf_model(-1, params, cov, "Model adapted to new rows",
                                {"Rows": f"{Xe.shape[0]:,}", "Pull (pseudo-rows)": f"{rho:.4g}"})

    @property
    def adapt_pull_(self) -> float:
        """The pull (pseudo-rows) ``adapt`` uses toward the meta-learned global model."""
        return float(self._meta_state["adapt_rho"])

    def _pooled_cov_std(self) -> np.ndarray:
        """The global model's covariance in the standardised coordinates."""
        p = self.schema_.n_features
        T = self.partition_.standardizer.jacobian(self.cov_.shape[0] - p)
        Tinv = np.linalg.inv(T)
        return Tinv @ self.cov_ @ Tinv.T
