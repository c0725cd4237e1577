"""The backend protocol: placement, failures as outcomes, clean-up, identical results."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedgrain.backends import ProcessesBackend, SerialBackend, get_backend
from fedgrain.backends import processes as processes_module


def _square(task):
    return task * task


def _fail_on_two(task):
    if task == 2:
        raise ValueError("two is not allowed")
    return task


def _shard_sum(task):
    shard = task["shard"].load()
    return float(shard.X.sum()), int(shard.y.sum()), os.getpid()


@pytest.fixture(params=["serial", "processes"])
def backend(request, monkeypatch):
    monkeypatch.setattr(processes_module, "MIN_PARALLEL_WORK", 0)
    b = SerialBackend() if request.param == "serial" else ProcessesBackend(2)
    yield b
    b.close()


def test_map_returns_outcomes_in_order(backend):
    out = backend.map(_square, [3, 1, 2, 5])
    assert [o.index for o in out] == [0, 1, 2, 3]
    assert [o.value for o in out] == [9, 1, 4, 25] and all(o.ok for o in out)


def test_failures_are_outcomes_not_exceptions(backend):
    out = backend.map(_fail_on_two, [1, 2, 3])
    assert [o.ok for o in out] == [True, False, True]
    assert out[1].error == "two is not allowed" and out[1].error_type == "ValueError"
    assert "Traceback" in out[1].traceback and out[2].value == 3


def test_shards_are_placed_once_and_read_by_tasks(backend):
    refs = []
    for k in range(3):
        shard = backend.allocate(100, 2, weighted=False)
        shard.X[:] = k
        shard.y[:] = 1
        refs.append(backend.put(shard))
    out = backend.map(_shard_sum, [{"shard": r} for r in refs] * 2)  # two rounds, same refs
    assert [o.value[:2] for o in out] == [(0.0, 100), (200.0, 100), (400.0, 100)] * 2
    if isinstance(backend, ProcessesBackend):
        assert {o.value[2] for o in out} != {os.getpid()}  # ran in worker processes
        paths = [Path(p) for r in refs for p in r.paths()]
        assert all(p.exists() for p in paths)
        backend.release(refs)
        assert not any(p.exists() for p in paths)


def test_processes_backend_leaves_no_files_behind():
    b = ProcessesBackend(2)
    shard = b.allocate(10, 2, weighted=True)
    ref = b.put(shard)
    folder = Path(ref.X).parent
    assert folder.exists()
    b.close()
    assert not folder.exists()


def test_small_work_runs_in_this_process(monkeypatch):
    b = ProcessesBackend(2)
    shard = b.allocate(10, 1, weighted=False)
    shard.X[:] = 1
    shard.y[:] = 0
    ref = b.put(shard)
    out = b.map(_shard_sum, [{"shard": ref}] * 2, work=10.0)
    assert {o.value[2] for o in out} == {os.getpid()}
    b.close()


def test_get_backend_rejects_unknown_names():
    assert isinstance(get_backend("serial", owner="X"), SerialBackend)
    assert get_backend("processes", 3, owner="X").n_workers == 3
    with pytest.raises(ValueError, match="'backend' parameter of Est must be one of"):
        get_backend("ray", owner="Est")


def test_estimator_cleans_up_its_shards(monkeypatch, tmp_path):
    from fedgrain import DivideConquerOrdinal
    from fedgrain.datasets import make_ordinal

    monkeypatch.setattr(processes_module, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(processes_module, "SHM", tmp_path / "no-shm")  # use the temp folder
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    X, y, _, _ = make_ordinal(3000, 3, 3, random_state=0)
    DivideConquerOrdinal(n_subsets=2, backend="processes", n_jobs=2).fit(X, y)
    assert list(tmp_path.iterdir()) == []


# ---- shard files (review of issue 6) -------------------------------------------------------------
def _write_one(backend, spill=True, rows=1000, p=3):
    import numpy as np

    writer = backend.writer([rows // 2, rows - rows // 2], p, weighted=True, spill=spill)
    X = np.arange(rows * p, dtype=float).reshape(rows, p)
    labels = np.arange(rows) % 2
    writer.write(labels, X, np.arange(rows) % 3, np.ones(rows))
    return writer.finish(), X, labels


def test_spilled_shards_go_to_the_backends_temp_folder_and_are_removed(tmp_path):
    import numpy as np

    from fedgrain.backends import ProcessesBackend

    backend = ProcessesBackend(2, temp_folder=str(tmp_path))
    refs, X, labels = _write_one(backend)
    assert all(str(p).startswith(str(tmp_path)) for r in refs for p in r.paths())
    np.testing.assert_array_equal(refs[1].load().X, X[labels == 1])
    backend.close()
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_without_fallocate_gets_sparse_files(tmp_path, monkeypatch):
    import errno
    import os

    import numpy as np

    from fedgrain.backends import ProcessesBackend

    def no_fallocate(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    with ProcessesBackend(2, temp_folder=str(tmp_path)) as backend:
        refs, X, labels = _write_one(backend)
        np.testing.assert_array_equal(refs[0].load().X, X[labels == 0])


def test_a_full_disk_midway_leaves_no_file_and_no_open_descriptor(tmp_path, monkeypatch):
    import errno
    import os

    from fedgrain.backends import ProcessesBackend
    from fedgrain.exceptions import ResourceError

    real = os.posix_fallocate
    calls = {"n": 0}

    def full_on_the_fourth(fd, offset, size):
        calls["n"] += 1
        if calls["n"] == 4:  # the second shard's y file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", full_on_the_fourth)
    fds = len(os.listdir("/proc/self/fd"))
    with ProcessesBackend(2, temp_folder=str(tmp_path)) as backend:
        with pytest.raises(ResourceError, match="No room left"):
            _write_one(backend)
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert len(os.listdir("/proc/self/fd")) == fds


def test_short_writes_are_completed(tmp_path, monkeypatch):
    import os

    import numpy as np

    from fedgrain.backends import ProcessesBackend

    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, pos: real(fd, data[: max(1, len(data)
                                                                                // 3)], pos))
    with ProcessesBackend(2, temp_folder=str(tmp_path)) as backend:
        refs, X, labels = _write_one(backend)
        np.testing.assert_array_equal(refs[1].load().X, X[labels == 1])
        np.testing.assert_array_equal(refs[1].load().y, (np.arange(1000) % 3)[labels == 1])


def test_a_shard_sent_to_a_dask_cluster_gives_the_same_bits_as_here():
    """Shards scattered to workers arrive in Dask's receive buffers at any address; BLAS sums
    the elements before the first aligned one apart, so the last bits of a fit depended on it
    (5.6e-17 in coef, 1.8e-15 in the subsets' estimates). They are now aligned on arrival, as
    this process's shards are: the model is the serial one, bit for bit."""
    import numpy as np

    pytest.importorskip("dask.distributed")
    from dask.distributed import LocalCluster

    from fedgrain import DivideConquerOrdinal
    from fedgrain.backends.base import ALIGNMENT, aligned
    from fedgrain.backends.dask import DaskBackend
    from fedgrain.datasets import make_regions

    raw = np.zeros(1001)
    odd = raw[1:]  # 8 bytes past an allocation: not aligned
    assert odd.ctypes.data % ALIGNMENT != 0 and aligned(odd).ctypes.data % ALIGNMENT == 0
    assert np.array_equal(aligned(odd), odd)
    X, y, *_ = make_regions(20_000, n_regions=2, random_state=0)
    ref = DivideConquerOrdinal(n_subsets=4, backend="serial", random_state=0).fit(X, y)
    import dask

    from fedgrain.backends.dask import TRIM_KEY

    with dask.config.set({TRIM_KEY: None}):  # as fedgrain's clusters (Dask keeps the first)
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None)
    try:  # an address without a shared folder: the shards are scattered from here
        with DaskBackend(scheduler=cluster.scheduler_address) as backend:
            got = DivideConquerOrdinal(n_subsets=4, backend=backend, random_state=0).fit(X, y)
    finally:
        cluster.close()
    assert np.array_equal(got.coef_, ref.coef_) and np.array_equal(got.cov_, ref.cov_)
    assert np.array_equal(got.subset_estimates_, ref.subset_estimates_, equal_nan=True)


def _dies_once(task):
    """Task ``i`` 3 kills its own worker the first time it runs (a marker file says it did)."""
    i, folder = task
    marker = Path(folder) / "killed"
    if i == 3 and not marker.exists():
        marker.touch()
        os._exit(9)
    return i * 10


def _always_dies(task):
    if task == 2:
        os._exit(9)
    return task


def test_tasks_of_a_worker_that_died_run_again_and_a_worker_that_always_dies_is_an_error(
        tmp_path):
    """A worker killed mid-map: the outcomes already given stand, the others run again on
    fresh workers, in order (``resent_`` counts them); a task that kills every worker it
    runs on ends in a ResourceError after ``retries``; a task's own exception is a failed
    outcome, not retried."""
    from fedgrain.exceptions import ParameterError, ResourceError

    with ProcessesBackend(2, retries=2) as backend:
        out = backend.map(_dies_once, [(i, str(tmp_path)) for i in range(8)], work=1e9)
        assert [o.value for o in out] == [10 * i for i in range(8)]
        assert [o.index for o in out] == list(range(8)) and backend.resent_ > 0
        with pytest.raises(ResourceError, match="died 3 times"):
            backend.map(_always_dies, list(range(4)), work=1e9)
        before = backend.resent_
        out = backend.map(_fail_on_two, [1, 2, 3], work=1e9)
        assert [o.ok for o in out] == [True, False, True] and backend.resent_ == before
    with pytest.raises(ParameterError, match="retries"):
        ProcessesBackend(2, retries=-1)
