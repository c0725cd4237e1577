"""Dividing the original rows into subsets.

The patent's static division: random subsets of whole original rows (never of expanded rows),
stratified by class so that every subset sees every class when the class is common enough.
"""

from __future__ import annotations

import numpy as np


def stratified_split(
    codes: np.ndarray, n_subsets: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split row indices into ``n_subsets`` random, class-stratified subsets.

    Rows are shuffled within each class and the classes laid end to end, then dealt out in
    turn, so each class is spread as evenly as possible and subset sizes differ by at most one.
    Each subset's indices are returned sorted (reading the rows in order is faster).

    Parameters
    ----------
    codes : ndarray of shape (n,)
        Class codes.
    n_subsets : int
    rng : numpy Generator

    Returns
    -------
    list of ndarray
    """
    order = np.concatenate(
        [rng.permutation(np.flatnonzero(codes == c)) for c in np.unique(codes)]
    )
    start = int(rng.integers(n_subsets))
    slot = (np.arange(order.shape[0]) + start) % n_subsets
    return [np.sort(order[slot == m]) for m in range(n_subsets)]
