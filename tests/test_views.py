"""Subsets as views: rows in a shared buffer are not copied, and the fit is the same to the bit.

The processes backend runs every task in its worker processes here (``MIN_PARALLEL_WORK`` set
to 0), so the views are read by separately started processes, as in a large fit.
"""

from __future__ import annotations

import os
import pickle
import warnings
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal
from fedgrain.backends import ProcessesBackend, processes, shared_array, shared_rows, views
from fedgrain.backends.views import ViewShardRef, find_shared
from fedgrain.core.likelihood import composite_pass, exact_pass
from fedgrain.core.rowsource import SharedBuffer, SharedRows
from fedgrain.core.standardize import Standardizer, column_moments
from fedgrain.datasets import make_ordinal
from fedgrain.exceptions import DataError, ParameterError

ATTRS = ("coef_", "thresholds_", "cov_", "bse_", "subset_estimates_", "subset_lasso_estimates_")


@pytest.fixture(scope="module")
def backend():
    with ProcessesBackend(n_jobs=2) as be:
        yield be


@pytest.fixture(autouse=True)
def in_workers(monkeypatch):
    """Every task in the worker processes, however small the work."""
    monkeypatch.setattr(processes, "MIN_PARALLEL_WORK", 0.0)


@pytest.fixture
def placed(monkeypatch):
    """What each ``place_views`` call returned (None: the rows were copied), and the size of
    the shard folder's files right after placing."""
    seen: list = []
    real = views.place_views

    def spy(backend, *args):
        refs = real(backend, *args)
        folder = getattr(backend, "_dir", None)
        size = sum(f.stat().st_size for f in Path(folder).iterdir()) if folder else 0
        seen.append((refs, size))
        return refs

    monkeypatch.setattr(views, "place_views", spy)
    return seen


def data(n=6000, p=5, seed=0):
    X, y, *_ = make_ordinal(n, p, 4, random_state=seed)
    w = np.random.default_rng(seed).uniform(0.2, 3.0, n)
    return X, y, w


def same(a, b, attrs=ATTRS):
    for name in attrs:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def on_disk(tmp_path, X, name="X.npy"):
    path = tmp_path / name
    np.save(path, X)
    return np.load(path, mmap_mode="r")


# ---- the row source --------------------------------------------------------------------


def test_shared_rows_match_standardised_array(tmp_path):
    X, _, w = data(20000, 7)
    std = Standardizer.fit(X)
    Xm = on_disk(tmp_path, X)
    buf, why = find_shared(Xm)
    assert buf is not None, why
    index = np.flatnonzero(np.random.default_rng(1).random(X.shape[0]) < 0.6).astype(np.int32)
    rows = SharedRows(buf.open(), index, std.mean, std.scale)
    plain = std.transform(X[index])
    assert rows.shape == plain.shape
    np.testing.assert_array_equal(np.asarray(rows), plain)
    np.testing.assert_array_equal(rows[100:5000], plain[100:5000])
    np.testing.assert_array_equal(rows[3], plain[3])
    np.testing.assert_array_equal(rows[-1], plain[-1])
    keep = np.arange(plain.shape[0]) % 3 > 0
    np.testing.assert_array_equal(np.asarray(rows[keep]), plain[keep])
    cols = np.array([4, 0, 2])
    v = np.linspace(-1, 1, 3)
    np.testing.assert_array_equal(rows[:, cols] @ v, plain[:, cols] @ v)
    beta = np.linspace(-0.5, 0.5, 7)
    np.testing.assert_array_equal(rows @ beta, plain @ beta)
    # the passes over the rows: the same sums to the last bit
    y = np.random.default_rng(2).integers(0, 4, plain.shape[0])
    th = np.array([-1.0, 0.0, 1.0])
    ww = w[index]
    for f in (lambda Z: composite_pass(Z, y, ww, beta, th, meat="cluster", by_class=True),
              lambda Z: exact_pass(Z, y, ww, beta, th, meat=True, shift=Z[0])):
        a, b = f(plain), f(rows)
        for part in ("loss", "grad", "hess", "meat"):
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    for m, s in zip(column_moments(plain, ww), column_moments(rows, ww), strict=True):
        np.testing.assert_array_equal(m, s)


def test_shared_buffer_replaced_file_is_an_error(tmp_path):
    X, _, _ = data(500, 3)
    Xm = on_disk(tmp_path, X)
    buf, _ = find_shared(Xm)
    os.replace(on_disk(tmp_path, X + 1, "other.npy").filename, tmp_path / "X.npy")
    with pytest.raises(RuntimeError, match="replaced"):
        SharedBuffer(buf.path, buf.offset, buf.shape, buf.inode, buf.device).open()


def test_find_shared_says_why_not(tmp_path):
    X, _, _ = data(500, 3)
    assert find_shared(X)[0] is None  # private memory
    Xm = on_disk(tmp_path, X)
    assert find_shared(Xm[:, :2])[0] is None  # not C-ordered
    assert find_shared(np.load(Xm.filename, mmap_mode="c"))[1].startswith(
        "the rows' map of")  # copy-on-write: private
    buf, why = find_shared(Xm[10:20])
    assert buf is not None and buf.shape == (10, 3)
    np.testing.assert_array_equal(buf.open(), X[10:20])


# ---- the estimators ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "shared_memory"])
def test_divide_conquer_views_equal_copies(backend, placed, tmp_path, kind):
    X, y, w = data()
    if kind == "file":
        Xs = on_disk(tmp_path, X)
    else:
        shm = shared_memory.SharedMemory(create=True, size=X.nbytes)
        Xs = np.ndarray(X.shape, dtype=X.dtype, buffer=shm.buf)
        Xs[:] = X
    try:
        copied = DivideConquerOrdinal(n_subsets=3, backend=backend).fit(X, y, sample_weight=w)
        viewed = DivideConquerOrdinal(n_subsets=3, backend=backend).fit(Xs, y, sample_weight=w)
        assert placed[0][0] is None
        refs, size = placed[1]
        assert all(isinstance(r, ViewShardRef) for r in refs)
        # the shard folder holds row numbers, codes and weights: 20 bytes a row, not X's 40
        assert size < X.shape[0] * 21 + 3 * 3 * 256 < X.nbytes
        same(copied, viewed)
    finally:
        if kind == "shared_memory":
            del Xs
            shm.close()
            shm.unlink()


def test_divide_conquer_views_cv_and_rounds(backend, placed, tmp_path):
    X, y, w = data(5000, 4, seed=3)
    Xs = shared_rows(X, folder=tmp_path)
    kw = {"n_subsets": 2, "backend": backend, "alpha": "cv", "refine_rounds": 3,
          "random_state": 5}
    same(DivideConquerOrdinal(**kw).fit(X, y), DivideConquerOrdinal(**kw).fit(Xs, y))
    assert placed[1][0] is not None


def test_categorical_features_are_copied(backend, placed, tmp_path):
    X, y, _ = data(4000, 4)
    X[:, 0] = np.random.default_rng(0).integers(0, 3, X.shape[0])
    Xs = on_disk(tmp_path, X)
    kw = {"n_subsets": 2, "backend": backend, "categorical": [0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an encoded copy is no surprise: no warning
        viewed = DivideConquerOrdinal(**kw).fit(Xs, y)
    same(DivideConquerOrdinal(**kw).fit(X, y), viewed)
    assert placed[0][0] is None  # the encoded matrix is new memory: copied subsets


def test_copy_on_write_map_warns_and_copies(backend, placed, tmp_path):
    X, y, _ = data(4000, 4)
    np.save(tmp_path / "X.npy", X)
    Xc = np.load(tmp_path / "X.npy", mmap_mode="c")
    with pytest.warns(UserWarning, match="copy-on-write"):
        viewed = DivideConquerOrdinal(n_subsets=2, backend=backend).fit(Xc, y)
    assert placed[0][0] is None
    same(DivideConquerOrdinal(n_subsets=2, backend=backend).fit(X, y), viewed)


def test_deleted_file_warns_and_copies(backend, placed, tmp_path):
    X, y, _ = data(4000, 4)
    Xm = on_disk(tmp_path, X)
    os.unlink(Xm.filename)
    with pytest.warns(UserWarning, match="deleted"):
        DivideConquerOrdinal(n_subsets=2, backend=backend).fit(Xm, y)
    assert placed[0][0] is None


def test_serial_backend_copies_as_before(placed, tmp_path):
    X, y, _ = data(3000, 3)
    DivideConquerOrdinal(n_subsets=2, backend="serial").fit(on_disk(tmp_path, X), y)
    assert placed[0][0] is None


def test_adaptive_views_equal_copies(backend, placed, tmp_path):
    X, y, w = data(8000, 4, seed=2)
    Xs = on_disk(tmp_path, X)
    kw = {"backend": backend, "granularity": 0.5, "meta": "reptile", "max_rounds": 3,
          "random_state": 0}
    copied = AdaptiveFederatedOrdinal(**kw).fit(X, y, sample_weight=w)
    viewed = AdaptiveFederatedOrdinal(**kw).fit(Xs, y, sample_weight=w)
    assert placed[0][0] is None and placed[1][0] is not None
    np.testing.assert_array_equal(copied.coef_, viewed.coef_)
    np.testing.assert_array_equal(copied.cov_, viewed.cov_)
    np.testing.assert_array_equal(copied.predict_proba(X), viewed.predict_proba(X))


# ---- the helpers ---------------------------------------------------------------------------


def test_shared_array_and_rows(tmp_path):
    X, _, _ = data(1000, 3)
    Xs = shared_rows(X, folder=tmp_path)
    np.testing.assert_array_equal(Xs, X)
    assert not Xs.flags.writeable
    assert find_shared(np.asarray(Xs))[0] is not None
    where = Path(Xs.filename).parent
    del Xs
    import gc

    gc.collect()
    assert not where.exists()  # removed with the array
    A = shared_array((10, 2), folder=tmp_path)
    A[:] = 1.0
    assert find_shared(A)[0] is not None
    with pytest.raises(DataError, match="shape"):
        shared_array((10,))
    with pytest.raises(DataError, match="2-D"):
        shared_rows(np.zeros(5))
    with pytest.raises(DataError, match="numeric"):
        shared_rows(np.array([["a", "b"]]))
    with pytest.raises(DataError, match="does not exist"):
        shared_array((3, 3), folder=tmp_path / "missing")


def test_dask_local_cluster_views_equal_copies(placed, tmp_path):
    pytest.importorskip("dask.distributed")
    from fedgrain.backends.dask import DaskBackend

    X, y, w = data(5000, 4, seed=4)
    Xs = on_disk(tmp_path, X)
    with DaskBackend(n_workers=2) as be:
        kw = {"n_subsets": 2, "backend": be}
        copied = DivideConquerOrdinal(**kw).fit(X, y, sample_weight=w)
        viewed = DivideConquerOrdinal(**kw).fit(Xs, y, sample_weight=w)
        be.views = False  # the opt-out: copied subsets
        opted = DivideConquerOrdinal(**kw).fit(Xs, y, sample_weight=w)
    assert placed[0][0] is None and placed[1][0] is not None and placed[2][0] is None
    same(copied, viewed)
    same(copied, opted)


# ---- review: defects and checks ------------------------------------------------------------


def test_other_maps_with_names_not_in_the_locale_encoding_do_not_stop_a_fit(backend, placed,
                                                                            tmp_path):
    # /proc/self/maps lists every map of the process: a name that is not UTF-8 (any map, not
    # only X's) made every fit with the processes backend fail with UnicodeDecodeError
    X, y, _ = data(3000, 3)
    odd = os.fsencode(tmp_path) + b"/rows-\xff\xfe.npy"
    with open(odd, "wb") as fh:
        np.save(fh, X)
    Xo = np.load(odd, mmap_mode="r")
    copied = DivideConquerOrdinal(n_subsets=2, backend=backend).fit(X, y)
    viewed = DivideConquerOrdinal(n_subsets=2, backend=backend).fit(Xo, y)
    assert placed[0][0] is None and placed[1][0] is not None
    same(copied, viewed)


@pytest.mark.parametrize("name", ["a\nb.npy", "x (deleted)", "back\\012slash.npy", "sp ace.npy"])
def test_find_shared_file_names_as_the_kernel_writes_them(tmp_path, name):
    # the kernel writes a newline in a name as \012 and marks a removed file " (deleted)":
    # such names were refused (copied, with a warning that the file could not be opened or
    # was deleted)
    X, _, _ = data(200, 3)
    with open(tmp_path / name, "wb") as fh:
        np.save(fh, X)
    buf, why = find_shared(np.load(tmp_path / name, mmap_mode="r"))
    assert buf is not None, why
    assert buf.path == str(tmp_path / name)
    np.testing.assert_array_equal(buf.open(), X)


def test_find_shared_replaced_and_truncated_files(tmp_path):
    X, _, _ = data(500, 3)
    Xm = on_disk(tmp_path, X)
    os.replace(on_disk(tmp_path, X + 1, "other.npy").filename, tmp_path / "X.npy")
    assert find_shared(Xm)[1].endswith("was replaced since it was mapped")  # was: "deleted"
    Xm = on_disk(tmp_path, X, "t.npy")
    buf, _ = find_shared(Xm)
    os.truncate(tmp_path / "t.npy", 1000)  # a worker's map would fail with "mmap length ..."
    with pytest.raises(RuntimeError, match="truncated during the fit"):
        buf.open()


def test_no_proc_maps_copies_with_a_warning(backend, placed, tmp_path, monkeypatch):
    # another system (no /proc): the rows are copied, never a crash
    def gone():
        raise FileNotFoundError(2, "No such file or directory", "/proc/self/maps")
        yield

    monkeypatch.setattr(views, "_maps", gone)
    X, y, _ = data(3000, 3)
    with pytest.warns(UserWarning, match="/proc/self/maps"):
        viewed = DivideConquerOrdinal(n_subsets=2, backend=backend).fit(on_disk(tmp_path, X), y)
    assert placed[0][0] is None
    same(DivideConquerOrdinal(n_subsets=2, backend=backend).fit(X, y), viewed)


def test_views_opt_out(placed, tmp_path):
    X, y, w = data(4000, 4)
    Xm = on_disk(tmp_path, X)
    with ProcessesBackend(n_jobs=2, views=False) as be:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # copied by request: no warning, even for "c"
            copied = DivideConquerOrdinal(n_subsets=2, backend=be).fit(Xm, y, sample_weight=w)
            DivideConquerOrdinal(n_subsets=2, backend=be).fit(
                np.load(Xm.filename, mmap_mode="c"), y)
    assert placed[0][0] is None and placed[1][0] is None
    with ProcessesBackend(n_jobs=2) as be:
        viewed = DivideConquerOrdinal(n_subsets=2, backend=be).fit(Xm, y, sample_weight=w)
    assert placed[2][0] is not None
    same(copied, viewed)
    with pytest.raises(ParameterError, match="views="):
        ProcessesBackend(n_jobs=2, views="no")


def test_a_view_shard_pickles_by_reference(tmp_path):
    # Dask moves a held shard to another worker (or to disk) by pickling it: a view's rows
    # pickled the whole buffer (every row of X), not its subset
    X, _, _ = data(20000, 5)
    std = Standardizer.fit(X)
    Xm = on_disk(tmp_path, X)
    buf, _ = find_shared(Xm)
    index = np.arange(0, X.shape[0], 40, dtype=np.int32)
    paths = [str(tmp_path / f"{k}.npy") for k in ("rows", "y")]
    np.save(paths[0], index)
    np.save(paths[1], np.zeros(index.shape[0], dtype=np.intp))
    shard = ViewShardRef(paths[0], paths[1], None, buffer=buf, mean=std.mean,
                         scale=std.scale).load()
    blob = pickle.dumps(shard)
    assert len(blob) < 4 * index.nbytes + 4096 < X.nbytes
    back = pickle.loads(blob)
    np.testing.assert_array_equal(np.asarray(back.X), std.transform(X[index]))
    cols = pickle.loads(pickle.dumps(shard.X[:, [2, 0]]))
    np.testing.assert_array_equal(np.asarray(cols), std.transform(X[index])[:, [2, 0]])


def test_shared_rows_index_like_numpy(tmp_path):
    X, _, _ = data(3000, 4)
    std = Standardizer.fit(X)
    buf, _ = find_shared(on_disk(tmp_path, X))
    index = np.arange(0, X.shape[0], 3, dtype=np.int32)
    rows = SharedRows(buf.open(), index, std.mean, std.scale)
    plain = std.transform(X[index])
    assert np.asarray(rows[[]]).shape == plain[[]].shape == (0, 4)  # was: an IndexError
    np.testing.assert_array_equal(rows[:, 2], plain[:, 2])  # was: an IndexError
    np.testing.assert_array_equal(rows[5, [3, 1]], plain[5, [3, 1]])  # was: an IndexError
    pick = np.array([7, 7, 0, 999, 3])  # unsorted, repeated
    np.testing.assert_array_equal(np.asarray(rows[pick]), plain[pick])
    np.testing.assert_array_equal(np.asarray(rows[::-2]), plain[::-2])
    np.testing.assert_array_equal(np.asarray(rows[pick][:, [0]]), plain[pick][:, [0]])
    empty = SharedRows(buf.open(), index[:0], std.mean, std.scale)
    assert np.asarray(empty).shape == (0, 4) and (empty @ np.ones(4)).shape == (0,)
