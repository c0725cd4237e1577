"""The building of subsets ("shards") from the user's rows, and routing rows to them.

Shards hold rows standardised with the global :class:`fedgrain.core.standardize.Standardizer`.
They are written in row blocks straight into the arrays the backend allocated, so the data are
copied exactly once.
"""

from __future__ import annotations

import numpy as np

from .. import progress
from ..backends import Backend, ShardRef
from ..core.blocks import is_streamed, row_blocks
from ..core.standardize import Standardizer


def route_rows(tree, X, codes: np.ndarray | None = None) -> np.ndarray:
    """``tree.route`` for an array, or for streamed rows (one pass)."""
    if is_streamed(X):
        if codes is not None and all(nd.kind != "hyperplane" for nd in tree.nodes.values()):
            # no hyperplane (the static division): where a row goes does not depend on its
            # values, so the rows are not read again (a whole pass over the files saved)
            return tree.route_blocks([(0, np.empty((X.shape[0], 0)))], X.shape[0], codes)
        with progress.step("routing rows", X.shape[0], "rows"):
            return tree.route_blocks(row_blocks(X), X.shape[0], codes)
    return tree.route(X, codes)


def leaf_ranges(X, leaf: np.ndarray, n_leaves: int) -> tuple[np.ndarray, np.ndarray]:
    """Each leaf position's smallest and largest value of every column, ``(n_leaves, p)``
    each (``inf`` and ``-inf`` for a leaf without rows), in one pass over ``X``'s blocks."""
    p = X.shape[1]
    lo, hi = np.full((n_leaves, p), np.inf), np.full((n_leaves, p), -np.inf)
    for a, Xb in row_blocks(X):
        if Xb.shape[0] == 0:
            continue
        lb = np.asarray(leaf[a : a + Xb.shape[0]])
        order = np.argsort(lb, kind="stable")
        ls = lb[order]
        starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])
        Xs = Xb[order]
        mins = np.minimum.reduceat(Xs, starts, axis=0)
        maxs = np.maximum.reduceat(Xs, starts, axis=0)
        lo[ls[starts]] = np.minimum(lo[ls[starts]], mins)
        hi[ls[starts]] = np.maximum(hi[ls[starts]], maxs)
    return lo, hi


def build_shards(
    backend: Backend,
    X,
    codes: np.ndarray,
    weights: np.ndarray | None,
    labels: np.ndarray,
    n_subsets: int,
    standardizer: Standardizer,
) -> list[ShardRef]:
    """Copy each subset's rows, standardised, into a shard placed by ``backend``.

    ``labels`` gives each row's subset (see :func:`fedgrain.partition.tree.stratified_split`). One
    pass over the rows in blocks fills every shard through the backend's
    :class:`~fedgrain.backends.base.ShardWriter`, so the only memory beyond the shards is a
    block; rows streamed from disk (``X`` with ``blocks()``) are spilled to shard files, so
    nothing but a block is ever held. On failure nothing stays placed.

    With the processes backend, rows that already lie in a buffer other processes can map
    (a memory-mapped file, shared memory) are not copied: each subset is placed as a view of
    them (:func:`fedgrain.backends.views.place_views`), and its worker standardises its rows
    block by block as it reads them.
    """
    # Hook (backends/views.py): rows already in a buffer the workers can map are not copied;
    # each subset is placed as a view of them.
    from ..backends.views import place_views

    views = None if is_streamed(X) else \
        place_views(backend, X, codes, weights, labels, n_subsets, standardizer)
    if views is not None:
        return views
    sizes = np.bincount(labels, minlength=n_subsets)
    streamed = is_streamed(X)
    writer = backend.writer(sizes, X.shape[1], weights is not None, spill=streamed)
    try:
        with progress.step("placing subsets", X.shape[0], "rows"):
            for a, Xb in row_blocks(X):
                b = a + Xb.shape[0]
                writer.write(labels[a:b], standardizer.transform(Xb), codes[a:b],
                             None if weights is None else weights[a:b])
            return writer.finish()
    except BaseException:
        writer.abort()
        raise
