"""Rows that stay where they are: a subset's standardised rows, gathered block by block.

A subset ("shard") normally holds a copy of its rows, standardised with the global
:class:`~fedgrain.core.standardize.Standardizer`. When the caller's rows already lie in a buffer
that other processes can map (a ``numpy.memmap`` of a file, an array over a
``multiprocessing.shared_memory.SharedMemory``), a worker process can read them itself:
:class:`SharedRows` stands for the subset's standardised rows without holding them. Slicing a
range of rows gathers those rows from the buffer and standardises them, with the same arithmetic
as the copied shard (``(x - mean) / scale``, element by element), into a fresh block aligned as
the copied shard's blocks are; so every pass over the rows in blocks gives the same numbers, to
the last bit, as on the copied shard.

What a pass does with ``X`` is all :class:`SharedRows` offers: ``shape``, a range of rows
(``X[a:b]``, one block at a time), one row (``X[i]``), a selection of rows (``X[mask]``,
``X[index]``: another :class:`SharedRows`, no copy), a selection of columns (``X[:, cols]``,
likewise; ``X[:, j]`` gathers the one column), the products ``X @ v`` (block by block) and, for
code that needs a real array, ``numpy.asarray(X)`` (gathers every row: a copy of the subset).
Pickled, it travels as the buffer's description and its row numbers, and maps the buffer again
where it arrives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from .blocks import block_rows

#: The alignment of gathered blocks: that of the copied shards' blocks
#: (:data:`fedgrain.backends.base.ALIGNMENT`), so BLAS sums their rows in the same order.
ALIGNMENT = 64


def _empty_aligned(shape) -> np.ndarray:
    nbytes = int(np.prod(shape)) * 8
    buf = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-buf.ctypes.data) % ALIGNMENT
    return buf[start : start + nbytes].view(np.float64).reshape(shape)


@dataclass(frozen=True)
class SharedBuffer:
    """Where a caller's C-ordered float64 ``(n, p)`` rows lie: a file (``path``, in
    ``/dev/shm`` or on disk) from byte ``offset``; ``inode`` and ``device`` identify the file,
    so a file replaced since is an error, not other rows."""

    path: str
    offset: int
    shape: tuple[int, int]
    inode: int
    device: int

    def open(self) -> np.ndarray:
        """The rows, mapped read-only. Mapped afresh by every task, as copied shards are (no
        cache: a worker that kept the map would keep a removed file's memory)."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise FileNotFoundError(
                f"The shared rows' file {self.path} cannot be opened here ({exc.strerror}):"
                " was it removed during the fit?") from None
        if (st.st_ino, st.st_dev) != (self.inode, self.device):
            raise RuntimeError(f"The shared rows' file {self.path} was replaced during the "
                               "fit; keep it in place until the fit returns.")
        if st.st_size < self.offset + self.shape[0] * self.shape[1] * 8:
            raise RuntimeError(f"The shared rows' file {self.path} was truncated during the "
                               "fit; keep it as it is until the fit returns.")
        return np.memmap(self.path, dtype=np.float64, mode="r", offset=self.offset,
                         shape=self.shape)


class SharedRows:
    """The standardised rows ``(source[index] - mean) / scale`` (columns ``columns``), read
    from the shared buffer block by block (see the module docstring).

    Parameters
    ----------
    source : ndarray of shape (N, p)
        The caller's rows (a read-only map of the shared buffer).
    index : ndarray of int, shape (n,)
        The subset's rows of ``source``, in the subset's order.
    mean, scale : ndarray of shape (p,)
        The global standardisation.
    columns : ndarray of int or None
        A selection of the standardised columns (all when None).
    """

    ndim = 2
    dtype = np.dtype(np.float64)
    #: Gathered blocks are C-ordered: what passes that flatten a block check for.
    flags = SimpleNamespace(c_contiguous=True, f_contiguous=False, writeable=False)

    def __init__(self, source: np.ndarray, index: np.ndarray, mean: np.ndarray,
                 scale: np.ndarray, columns: np.ndarray | None = None,
                 buffer: SharedBuffer | None = None):
        #: Where ``source`` lies (None: an array given as it is). Pickling sends this, not the
        #: rows (Dask moves a shard to another worker, or to disk, by pickling it).
        self.buffer = buffer
        # plain views of the maps: numpy.memmap's bookkeeping on every slice costs time
        self.source = source.view(np.ndarray) if isinstance(source, np.memmap) else source
        self.index = index.view(np.ndarray) if isinstance(index, np.memmap) else index
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.columns = columns
        p = source.shape[1] if columns is None else columns.shape[0]
        self.shape = (int(index.shape[0]), int(p))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.size * 8

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The standardised rows ``rows`` (positions in ``source``) as a fresh aligned
        array: the copied shard's ``Standardizer.transform``, element by element."""
        out = _empty_aligned((rows.shape[0], self.source.shape[1]))
        np.take(self.source, rows, axis=0, out=out, mode="clip")  # rows checked: no buffer
        np.subtract(out, self.mean, out=out)
        out /= self.scale
        if self.columns is not None:
            sel = _empty_aligned((rows.shape[0], self.columns.shape[0]))
            np.take(out, self.columns, axis=1, out=sel, mode="clip")
            out = sel
        return out

    def _with(self, index=None, columns=None) -> SharedRows:
        return SharedRows(self.source, self.index if index is None else index, self.mean,
                          self.scale, self.columns if columns is None else columns,
                          self.buffer)

    def __reduce__(self):
        # by reference: the buffer's description and the row numbers, not the whole buffer
        # (pickling the map would copy every row of the buffer, not only the subset's)
        if self.buffer is None:
            return (SharedRows, (self.source, self.index, self.mean, self.scale, self.columns))
        return (_reopen, (self.buffer, np.asarray(self.index), self.mean, self.scale,
                          self.columns))

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) == 1:
                return self[key[0]]
            if len(key) != 2:
                raise IndexError("too many indices for a 2-D array of rows")
            rows, cols = key
            if isinstance(cols, slice) and cols == slice(None):
                return self[rows]
            if isinstance(rows, slice) and rows == slice(None):
                return self._columns(cols)
            if isinstance(rows, (int, np.integer)):
                return self[rows][cols]
            return np.asarray(self[rows])[:, cols]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {key} is out of bounds for {self.shape[0]} rows")
            return self._gather(self.index[i : i + 1])[0]
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            if step == 1:
                return self._gather(self.index[a:max(a, b)])
            return self._with(index=self.index[key])
        key = np.asarray(key)
        if key.size == 0 and key.dtype != bool:  # X[[]]: no rows (an empty list is float)
            key = key.astype(np.intp)
        if key.dtype == bool and key.shape != (self.shape[0],):
            raise IndexError(f"a row mask of shape {key.shape} for {self.shape[0]} rows")
        if key.dtype != bool and key.dtype.kind not in "iu":
            raise IndexError(f"rows cannot be chosen by an array of dtype {key.dtype}")
        return self._with(index=self.index[key])

    def _columns(self, cols) -> SharedRows | np.ndarray:
        p = self.shape[1]
        chosen = np.arange(p)[cols]
        if chosen.ndim == 0:  # X[:, j]: one column, gathered
            return np.asarray(self._columns(chosen[None]))[:, 0]
        if chosen.ndim != 1:
            raise IndexError("columns are chosen by a slice, a mask or an index array")
        base = chosen if self.columns is None else self.columns[chosen]
        return self._with(columns=np.ascontiguousarray(base, dtype=np.intp))

    def row_blocks(self, block: int | None = None):
        """``(start, rows)``: the standardised rows in blocks of ``block`` rows (the passes'
        block size by default)."""
        block = block or block_rows(self.shape[1])
        for a in range(0, self.shape[0], block):
            yield a, self[a : a + block]

    def __matmul__(self, other):
        other = np.asarray(other)
        if other.ndim == 0 or other.shape[0] != self.shape[1]:
            raise ValueError(f"matmul: {self.shape} rows against an operand of shape "
                             f"{other.shape}")
        out = np.empty((self.shape[0],) + other.shape[1:])
        for a, Xb in self.row_blocks():
            out[a : a + Xb.shape[0]] = Xb @ other
        return out

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("shared rows are gathered: numpy.asarray(rows) copies them")
        out = _empty_aligned(self.shape)
        for a, Xb in self.row_blocks():
            out[a : a + Xb.shape[0]] = Xb
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return (f"SharedRows({self.shape[0]} x {self.shape[1]} standardised rows of "
                f"{getattr(self.source, 'filename', None) or 'a shared buffer'})")


def _reopen(buffer: SharedBuffer, index, mean, scale, columns) -> SharedRows:
    """A pickled :class:`SharedRows` on its new process: the buffer mapped there."""
    return SharedRows(buffer.open(), index, mean, scale, columns, buffer)


def materialise(X):
    """``X`` as an array: shared rows gathered into one (a copy of the subset), an array as
    it is."""
    return np.asarray(X) if isinstance(X, SharedRows) else X
