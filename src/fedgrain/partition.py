"""Dividing the original rows into subsets.

The patent's static division: random subsets of whole original rows (never of expanded rows),
stratified by class so that every subset sees every class when the class is common enough.
"""

from __future__ import annotations

import numpy as np


def stratified_split(codes: np.ndarray, n_subsets: int, rng: np.random.Generator) -> np.ndarray:
    """Assign rows to ``n_subsets`` random, class-stratified subsets.

    The rows of each class are shuffled and dealt out in turn, continuing the rotation from one
    class to the next, so each class is spread as evenly as possible and subset sizes differ by
    at most one.

    Parameters
    ----------
    codes : ndarray of shape (n,)
        Class codes.
    n_subsets : int
    rng : numpy Generator

    Returns
    -------
    ndarray of shape (n,)
        The subset of each row (a compact integer type: 2 bytes a row for up to 32,767 subsets).
        ``np.flatnonzero(labels == m)`` lists subset ``m``'s rows in their original order.
    """
    dtype = np.int16 if n_subsets <= np.iinfo(np.int16).max else np.int32
    labels = np.empty(codes.shape[0], dtype=dtype)
    offset = int(rng.integers(n_subsets))
    for c in np.unique(codes):
        rows = np.flatnonzero(codes == c)
        turn = (np.arange(rows.shape[0]) + offset) % n_subsets
        labels[rows[rng.permutation(rows.shape[0])]] = turn
        offset = (offset + rows.shape[0]) % n_subsets
    return labels
