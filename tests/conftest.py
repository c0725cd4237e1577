"""Shared fixtures: seeded simulated data with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from fedgrain.datasets import make_ordinal


def expand(X, y, K, w=None):
    """The explicitly materialised expanded binary problem (for references only).

    Rows (i, k) with design (x_i, -e_k), label 1{y_i > k}, weight w_i.
    """
    n, p = X.shape
    Z = np.zeros((n * (K - 1), p + K - 1))
    u = np.zeros(n * (K - 1))
    for k in range(K - 1):
        Z[k :: K - 1, :p] = X
        Z[k :: K - 1, p + k] = -1.0
        u[k :: K - 1] = y > k
    ww = None if w is None else np.repeat(w, K - 1)
    return Z, u, ww


@pytest.fixture
def small_data():
    X, y, coef, thr = make_ordinal(2000, 5, 4, random_state=1)
    return X, y, coef, thr


@pytest.fixture(scope="session")
def medium_data():
    return make_ordinal(40_000, 10, 5, random_state=7)
