"""Rows in blocks: the block size of the likelihood passes and iteration over an array or over
rows streamed from disk, with progress."""

from __future__ import annotations

import numpy as np

from .. import progress

#: Elements per block of rows: about 1.5 MB, so a block stays in cache between the elementwise
#: work and the products that read it (measured best: 8192 rows at p = 20, 2048 at p = 100).
BLOCK_ELEMENTS = 200_000


def block_rows(p: int) -> int:
    """Rows per block for ``p`` features: a power of two between 1024 and 16384."""
    return int(2 ** np.clip(np.round(np.log2(BLOCK_ELEMENTS / max(p, 1))), 10, 14))


def row_blocks(X, block: int | None = None):
    """``(start, rows)`` blocks of the encoded rows ``X``: an array, or rows streamed from disk
    (any object with a ``blocks()`` method, such as :class:`fedgrain.data.streamed.StreamedRows`).
    """
    if hasattr(X, "blocks"):
        for a, Xb in X.blocks():
            yield a, Xb
            progress.advance(Xb.shape[0])
        return
    block = block or block_rows(X.shape[1])
    for a in range(0, X.shape[0], block):
        yield a, X[a : a + block]
        progress.advance(min(block, X.shape[0] - a))


def is_streamed(X) -> bool:
    """Whether ``X`` stands for rows read from disk on every pass (not an array)."""
    return hasattr(X, "blocks")


def take_rows(X, index: np.ndarray) -> np.ndarray:
    """The rows at ``index`` (sorted) of an array or of streamed rows."""
    if is_streamed(X):
        with progress.step("sampling rows", X.shape[0], "rows"):
            return X.take(index)
    return X[index]
