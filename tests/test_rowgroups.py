"""Out-of-core fits divided by Parquet row groups (issue 18): each worker reads, checks, encodes
and writes its own row groups, and the fitting process holds no row. The subsets differ from
the division by rows, so the model is compared with the in-memory fit statistically (within a
small part of a standard error) and with the truth; it is the same on every backend."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from fedgrain import DivideConquerOrdinal
from fedgrain.backends import SerialBackend
from fedgrain.backends.dask import DaskBackend
from fedgrain.core.standardize import Standardizer
from fedgrain.data import DatasetSource
from fedgrain.data.streamed import open_streamed
from fedgrain.datasets import make_ordinal
from fedgrain.exceptions import DataError, ParameterError
from fedgrain.federation import rowgroups


@pytest.fixture
def force_processes(monkeypatch):
    from fedgrain.backends import processes

    monkeypatch.setattr(processes, "MIN_PARALLEL_WORK", 0)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """60,000 x 6 with known coefficients, in 3 files of 4 row groups of 5,000 rows."""
    X, y, coef, thr = make_ordinal(60_000, 6, 4, random_state=11)
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(6)]).assign(grade=y)
    folder = tmp_path_factory.mktemp("rowgroups")
    for i in range(3):
        frame.iloc[i * 20_000 : (i + 1) * 20_000].to_parquet(
            folder / f"part-{i}.parquet", row_group_size=5_000)
    return frame, folder, coef, thr


def _left(backend) -> list[str]:
    """The files left in the backend's folders for subsets (on disk and in RAM)."""
    return [f for attr in ("_spill", "_spill_ram") if getattr(backend, attr, None)
            for f in os.listdir(getattr(backend, attr))]


def _in_memory(frame, **kw):
    return DivideConquerOrdinal(**kw).fit(frame.drop(columns="grade"), frame["grade"])


def test_the_row_group_division_agrees_with_the_in_memory_fit_and_the_truth(truth):
    frame, folder, coef, thr = truth
    kw = dict(n_subsets=3, backend="serial", random_state=5)
    a = DivideConquerOrdinal(division="row_groups", **kw).fit(folder, "grade")
    b = _in_memory(frame, **kw)
    assert a.division_ == "row_groups" and b.division_ == "rows"
    assert a.subset_sizes_.sum() == 60_000
    assert all(n % 5_000 == 0 for n in a.subset_sizes_)  # whole row groups
    assert sorted(a.subset_sizes_) == [20_000, 20_000, 20_000]  # 12 groups dealt evenly
    # the same estimate and standard errors to a small part of a standard error
    assert np.max(np.abs(a.results_.params - b.results_.params) / b.bse_) < 0.05
    np.testing.assert_allclose(a.bse_, b.bse_, rtol=0.02)
    # and the truth within 4 standard errors
    z = (np.r_[a.coef_, a.thresholds_] - np.r_[coef, thr]) / a.bse_
    assert np.all(np.abs(z) < 4), z


@pytest.mark.parametrize("where", ["ram", "disk"])
def test_the_workers_summaries_merge_to_the_global_standardisation(truth, where, tmp_path,
                                                                   force_processes):
    """The subsets' moments, merged, equal the in-memory standardisation to rounding, and each
    subset file holds exactly its row groups' rows, standardised, with their class codes:
    written while checked and standardised in place (in RAM), or in a second pass (on disk,
    here a temp_folder given)."""
    from fedgrain.backends import ProcessesBackend

    frame, folder, *_ = truth
    head = open_streamed(folder, "grade", estimator_name="test")
    groups = head.source.row_groups()
    assert len(groups) == 12 and {g.rows for g in groups} == {5_000}
    dealt = rowgroups.deal(groups, 3, seed=1)
    assert sorted(i for d in dealt for i in d) == list(range(12))
    backend = SerialBackend() if where == "ram" else ProcessesBackend(2, temp_folder=tmp_path)
    with backend:
        refs, sizes, std = rowgroups.build_by_row_groups(backend, head, groups, dealt)
        assert all(Path(r.X).parent == getattr(backend, "_spill_ram" if where == "ram"
                                                else "_spill") for r in refs)
        try:
            X = frame.drop(columns="grade").to_numpy()
            ref = Standardizer.fit(X)
            np.testing.assert_allclose(std.mean, ref.mean, rtol=0, atol=1e-13)
            np.testing.assert_allclose(std.scale, ref.scale, rtol=1e-13)
            for r, d, n in zip(refs, dealt, sizes, strict=True):
                shard = r.load()
                rows = np.concatenate([np.arange(5_000) + 5_000 * i for i in d])
                assert shard.X.shape == (n, 6) and n == rows.size
                np.testing.assert_allclose(shard.X, std.transform(X[rows]), rtol=0,
                                           atol=1e-12)
                np.testing.assert_array_equal(shard.y, frame["grade"].to_numpy()[rows])
        finally:
            backend.release(refs)
        assert not _left(backend)


def test_the_deal_is_seeded_and_balanced():
    from fedgrain.data.dataset import RowGroup

    groups = [RowGroup("f", "f", i, n) for i, n in enumerate([10, 10, 10, 10, 10, 10, 10, 30])]
    a, b = rowgroups.deal(groups, 2, seed=3), rowgroups.deal(groups, 2, seed=3)
    assert a == b
    assert any(rowgroups.deal(groups, 2, seed=s) != a for s in range(4, 10))
    rows = [sum(groups[i].rows for i in d) for d in a]
    assert sorted(rows) == [50, 50]


@pytest.fixture(scope="module")
def dask_backend():
    backend = DaskBackend(n_workers=2)
    yield backend
    backend.close()


def test_processes_and_dask_give_the_same_model(truth, dask_backend, force_processes):
    _, folder, *_ = truth
    kw = dict(n_subsets=4, division="row_groups", random_state=2)
    a = DivideConquerOrdinal(backend=dask_backend, **kw).fit(folder, "grade")
    b = DivideConquerOrdinal(backend="processes", n_jobs=2, **kw).fit(folder, "grade")
    c = DivideConquerOrdinal(backend="serial", **kw).fit(folder, "grade")
    for m in (b, c):
        np.testing.assert_array_equal(a.subset_sizes_, m.subset_sizes_)
        np.testing.assert_array_equal(a.coef_, m.coef_)
        np.testing.assert_array_equal(a.thresholds_, m.thresholds_)
        np.testing.assert_array_equal(a.cov_, m.cov_)
    other = DivideConquerOrdinal(backend="serial", **{**kw, "random_state": 3}).fit(
        folder, "grade")
    assert not np.array_equal(other.subset_estimates_, c.subset_estimates_)


def test_auto_divides_by_rows_where_row_groups_do_not_serve(truth, tmp_path):
    frame, folder, *_ = truth
    kw = dict(n_subsets=2, backend="serial", random_state=0)
    assert DivideConquerOrdinal(**kw).fit(folder, "grade").division_ == "rows"  # small data
    rowgroups_auto = rowgroups.AUTO_MIN_ROWS
    assert rowgroups_auto == 10_000_000
    one = tmp_path / "one.parquet"
    frame.to_parquet(one)  # a single row group
    with pytest.raises(ParameterError, match=r"cannot divide .*one.parquet' by row groups: "
                       r"the data have 1 row group\(s\) for 2 subsets; use division='rows' "
                       r"\(or 'auto'\), or write the files with smaller row groups"):
        DivideConquerOrdinal(division="row_groups", **kw).fit(one, "grade")
    with pytest.raises(ParameterError, match="by row groups: a filter keeps rows"):
        DivideConquerOrdinal(division="row_groups", **kw).fit(
            DatasetSource(folder, filter="x0 > -10"), "grade")
    sub = pafs.SubTreeFileSystem(str(folder.parent), pafs.LocalFileSystem())
    with pytest.raises(ParameterError, match="not on this machine's file system"):
        DivideConquerOrdinal(division="row_groups", **kw).fit(
            DatasetSource(folder.name, filesystem=sub), "grade")
    with pytest.raises(ParameterError, match="'division' .* one of .*'row_groups'.*'groups'"):
        DivideConquerOrdinal(division="groups", **kw).fit(folder, "grade")
    # files with sample weights, or with y as an array, are read into memory: asked for,
    # the division by row groups is an error (it was silently the division by rows)
    with pytest.raises(ParameterError, match=r"cannot divide these files by row groups: "
                       r"sample weights .*; use division='rows'"):
        DivideConquerOrdinal(division="row_groups", **kw).fit(
            folder, "grade", sample_weight=np.ones(len(frame)))
    with pytest.raises(ParameterError, match=r"by row groups: y is given as an array"):
        DivideConquerOrdinal(division="row_groups", **kw).fit(folder, frame["grade"])
    # arrays in memory are always divided by rows
    m = DivideConquerOrdinal(division="row_groups", **kw).fit(
        frame.drop(columns="grade"), frame["grade"])
    assert m.division_ == "rows"


def test_bad_values_in_a_row_group_are_named_and_leave_no_files(tmp_path):
    X, y, *_ = make_ordinal(8_000, 3, 3, random_state=1)
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(grade=y)
    frame.loc[6_123, "b"] = np.nan
    frame.to_parquet(tmp_path / "bad.parquet", row_group_size=2_000)
    with SerialBackend() as backend:  # subsets in RAM: written while they are checked
        with pytest.raises(DataError, match=r"row group 3 of '.*bad.parquet'"):
            DivideConquerOrdinal(n_subsets=2, backend=backend, division="row_groups").fit(
                tmp_path / "bad.parquet", "grade")
        assert backend._spill_ram is not None and not _left(backend)
    frame.loc[6_123, "b"] = 1e200  # too large to square: named where it is, as a NaN is
    frame.to_parquet(tmp_path / "huge.parquet", row_group_size=2_000)
    with SerialBackend() as backend:
        with pytest.raises(DataError, match=r"'b' of X holds values as large as 1e\+200.* "
                           r"row group 3 of '.*huge.parquet'"):
            DivideConquerOrdinal(n_subsets=2, backend=backend, division="row_groups").fit(
                tmp_path / "huge.parquet", "grade")
        assert not _left(backend)
    frame.loc[6_123, "b"] = 1.0
    frame["c"] = 2.5
    frame.to_parquet(tmp_path / "constant.parquet", row_group_size=2_000)
    with pytest.raises(DataError, match=r"'c' .* is constant"):
        DivideConquerOrdinal(n_subsets=2, backend="serial", division="row_groups").fit(
            tmp_path / "constant.parquet", "grade")


def test_hive_partitions_and_categories_are_read_by_the_workers(tmp_path):
    """A partition column (constant within each file) and a categorical column are encoded on
    the workers as the fitting process encodes them: the same model as the division by rows,
    statistically, and the same feature names."""
    rng = np.random.default_rng(4)
    n = 24_000
    region = rng.integers(0, 3, n)
    colour = rng.choice(["red", "green", "blue"], n)
    x = rng.standard_normal(n)
    eta = 0.8 * x + 0.3 * region - 0.5 * (colour == "red")
    grade = np.digitize(eta + rng.logistic(size=n), [-1.0, 0.5, 2.0])
    frame = pd.DataFrame({"x": x, "colour": colour, "region": region, "grade": grade})
    for r in range(3):
        part = tmp_path / f"region={r}"
        part.mkdir()
        frame[frame.region == r].drop(columns="region").to_parquet(
            part / "data.parquet", row_group_size=1_000)
    kw = dict(n_subsets=2, backend="serial", random_state=1, categorical=["colour"])
    a = DivideConquerOrdinal(division="row_groups", **kw).fit(tmp_path, "grade")
    b = DivideConquerOrdinal(division="rows", **kw).fit(tmp_path, "grade")
    assert a.division_ == "row_groups" and a.subset_sizes_.sum() == n
    assert a.feature_names_in_.tolist() == b.feature_names_in_.tolist()
    assert np.max(np.abs(a.results_.params - b.results_.params) / b.bse_) < 0.1
    np.testing.assert_allclose(a.bse_, b.bse_, rtol=0.03)


def test_the_driver_memory_does_not_grow_with_the_rows(tmp_path, force_processes):
    """numpy's allocations in this process while fitting 400,000 and 1,600,000 x 8 divided by
    row groups are the same (a batch of every column, read for the types, one of the target,
    and the levels' stand-in of at most 65,536 values a class), where a byte a row would add
    1.2 MB: the workers read the features and keep the class codes."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1_600_000, 8))
    latent = X @ np.linspace(-1, 1, 8) + rng.logistic(size=X.shape[0])
    y = np.digitize(latent, np.quantile(latent, [0.25, 0.5, 0.75]))  # 400,000 a class
    frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(8)]).assign(y=y)
    del X, latent
    peaks = []
    for n in (400_000, 1_600_000):
        path = tmp_path / f"n{n}.parquet"
        frame.iloc[:: 1_600_000 // n].to_parquet(path, row_group_size=100_000)
        model = DivideConquerOrdinal(n_subsets=2, backend="processes", n_jobs=2,
                                     random_state=0, division="row_groups")
        tracemalloc.start()
        try:
            model.fit(path, "y")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert model.subset_sizes_.sum() == n and model.division_ == "row_groups"
    assert abs(peaks[1] - peaks[0]) < 0.25 * 2**20, [p / 2**20 for p in peaks]
    assert peaks[1] < 16 * 2**20, [p / 2**20 for p in peaks]


def test_files_sorted_by_the_target_are_not_divided_by_row_groups(tmp_path, monkeypatch):
    """Subsets of whole row groups from a file sorted by the target are selected on the target
    (biased slopes: 40 standard errors off here): asked for, a clear error; under "auto", a
    warning and the division by rows, which gives the in-memory model."""
    X, y, *_ = make_ordinal(40_000, 4, 4, random_state=3)
    frame = pd.DataFrame(X, columns=list("abcd")).assign(grade=y).sort_values("grade")
    path = tmp_path / "sorted.parquet"
    frame.to_parquet(path, row_group_size=5_000)
    kw = dict(n_subsets=2, backend="serial", random_state=1)
    with pytest.raises(DataError, match=r"hold the classes unevenly \(sorted or grouped by the "
                       r"target\?\): level .* Divide them by rows \(division='rows'\)"):
        DivideConquerOrdinal(division="row_groups", **kw).fit(path, "grade")
    monkeypatch.setattr(rowgroups, "AUTO_MIN_ROWS", 10_000)
    with pytest.warns(UserWarning, match="unevenly .* Dividing them by rows instead"):
        a = DivideConquerOrdinal(**kw).fit(path, "grade")
    b = _in_memory(frame.reset_index(drop=True), **kw)
    assert a.division_ == "rows"
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    # shuffled across the row groups, "auto" divides them by row groups
    frame.sample(frac=1.0, random_state=0).to_parquet(path, row_group_size=5_000)
    assert DivideConquerOrdinal(**kw).fit(path, "grade").division_ == "row_groups"


def _parts(counts) -> list:
    """Subsets' summaries with these class counts (the rest does not matter to the guard)."""
    z = np.zeros(1)
    return [rowgroups.Scanned(int(c.sum()), z, z, z, z, z, np.asarray(c)) for c in counts]


def test_a_rare_class_of_shuffled_rows_is_not_taken_for_sorted_files(tmp_path):
    """A class of 0.4% of honest (shuffled) rows is 48 rows a subset of 12,000, and its share
    varies by more than 25% between subsets by chance alone: the guard refused such data in 4
    fits out of 10 (seed 0 among them). Differences count only beyond chance."""
    rng = np.random.default_rng(0)
    n = 120_000
    X = rng.standard_normal((n, 3))
    latent = X @ [0.5, -0.3, 0.2] + rng.logistic(size=n)
    y = np.digitize(latent, np.quantile(latent, [0.004, 0.5, 0.8]))
    path = tmp_path / "rare.parquet"
    pd.DataFrame(X, columns=list("abc")).assign(grade=y).to_parquet(path, row_group_size=2_000)
    m = DivideConquerOrdinal(n_subsets=10, backend="serial", random_state=0,
                             division="row_groups").fit(path, "grade")
    assert m.division_ == "row_groups"
    # honest divisions of 100 subsets of 10,000 rows with a class of 0.3%: never refused
    shares = [0.003, 0.297, 0.4, 0.3]
    for seed in range(200):
        counts = np.random.default_rng(seed).multinomial(10_000, shares, size=100)
        if (counts > 0).all():
            rowgroups.uneven_classes(_parts(counts), [0, 1, 2, 3], "f")
    # a class 50% off in subsets of 1,000,000 rows (250 standard deviations), and a class
    # missing from a subset, are refused
    with pytest.raises(rowgroups.UnevenClasses, match=r"level 2 is 30% of subset 0 and 20% of "
                       r"all rows"):
        rowgroups.uneven_classes(_parts(np.array([[400_000, 300_000, 300_000],
                                                  [400_000, 500_000, 100_000]])),
                                 [0, 1, 2], "f")
    with pytest.raises(rowgroups.UnevenClasses, match=r"level 2 is 0% of subset 0"):
        rowgroups.uneven_classes(_parts(np.array([[500, 500, 0], [300, 300, 400]])),
                                 [0, 1, 2], "f")


@pytest.mark.parametrize("where", ["ram", "disk"])
def test_a_full_disk_while_writing_is_a_resource_error_with_no_files_left(truth, where,
                                                                          monkeypatch):
    """Where the file system does not claim a file's blocks up front (no fallocate), the disk
    fills during the writes: the same clear ResourceError as elsewhere, and no file left (it
    was 'Writing a subset failed on a worker: OSError: [Errno 28] ...')."""
    import errno

    from fedgrain.exceptions import ResourceError

    frame, folder, *_ = truth

    def no_fallocate(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    monkeypatch.setattr(os, "pwrite", full)
    if where == "disk":
        monkeypatch.setattr(rowgroups, "SHM_SHARE", 0.0)
    with SerialBackend() as backend:
        with pytest.raises(ResourceError, match=r"No room left for the subsets in .*; free "
                           r"space, or pass another temp_folder"):
            DivideConquerOrdinal(n_subsets=3, backend=backend, division="row_groups").fit(
                folder, "grade")
        assert getattr(backend, "_spill_ram" if where == "ram" else "_spill") is not None
        assert not _left(backend)


def test_subsets_go_to_disk_when_dev_shm_fills_after_it_was_chosen(truth, monkeypatch):
    """/dev/shm chosen (it had room), then full when the workers claim their files (another
    fit writing there meanwhile): the subsets go to disk and the model is the one written
    there from the start, where the fit was a ResourceError."""
    from fedgrain.exceptions import ResourceError

    frame, folder, *_ = truth
    kw = dict(n_subsets=3, backend="serial", random_state=2, division="row_groups")
    monkeypatch.setattr(rowgroups, "SHM_SHARE", 0.0)
    on_disk = DivideConquerOrdinal(**kw).fit(folder, "grade")
    monkeypatch.undo()
    claimed = []

    def full(path, dtype, shape):
        claimed.append(path)
        raise ResourceError(f"No room left for the subsets in {Path(path).parent}")

    monkeypatch.setattr(rowgroups, "_new_npy", full)
    with SerialBackend() as backend:
        model = DivideConquerOrdinal(**{**kw, "backend": backend}).fit(folder, "grade")
        assert claimed and all(p.startswith(str(backend._spill_ram)) for p in claimed)
        assert not _left(backend)
    assert model.division_ == "row_groups"
    np.testing.assert_array_equal(model.coef_, on_disk.coef_)
    np.testing.assert_array_equal(model.bse_, on_disk.bse_)


@pytest.mark.parametrize("version", [2, 1])
def test_dev_shm_is_chosen_within_the_memory_cgroups_limit(tmp_path, monkeypatch, version):
    """In a container the system's MemAvailable is the whole machine's, while /dev/shm pages
    are charged to the container's memory cgroup: subsets of 600 MB went to /dev/shm under a
    1 GB limit (the container killed for memory). Half of what the cgroup leaves counts."""
    from fedgrain.backends import processes

    monkeypatch.setattr(processes, "_free_bytes", lambda path: 1 << 40)
    folder = tmp_path if version == 2 else tmp_path / "memory"
    folder.mkdir(exist_ok=True)
    names = (("memory.max", "memory.current", "inactive_file") if version == 2 else
             ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    (folder / names[0]).write_text(f"{1 << 30}\n")
    (folder / names[1]).write_text(f"{200 << 20}\n")
    (folder / "memory.stat").write_text(f"anon 1\n{names[2]} {100 << 20}\nother 5\n")
    monkeypatch.setattr(rowgroups, "_CGROUP", tmp_path)
    assert rowgroups._available_memory() == (1 << 30) - (100 << 20)
    rows = (600 << 20) // (8 * 9)  # 600 MB of 8 features and the class codes
    with SerialBackend() as backend:
        assert rowgroups.subset_folder(backend, rows, 8)[1] is False
        assert rowgroups.subset_folder(backend, rows // 2, 8)[1] is True  # 300 MB: in RAM
    (folder / names[0]).write_text("max\n" if version == 2 else f"{2**63 - 4096}\n")
    assert rowgroups._cgroup_room() is None


def test_another_dask_clusters_workers_read_only_files_in_its_shared_folder(truth, tmp_path):
    """A Dask cluster started elsewhere sees this machine's shared_folder, not the rest of its
    file system: files outside it are divided by rows (they were dealt to workers that may
    not see them)."""
    from types import SimpleNamespace

    frame, folder, *_ = truth
    source = DatasetSource(folder)
    remote = SimpleNamespace(name="dask", _cluster=None, shared_folder=str(tmp_path),
                             _files_visible=lambda: True)
    assert "not in the Dask cluster's shared_folder" in rowgroups.why_not(source, remote,
                                                                          None, 3)
    inside = SimpleNamespace(**{**vars(remote), "shared_folder": str(folder.parent)})
    assert rowgroups.why_not(source, inside, None, 3) is None
    local = SimpleNamespace(**{**vars(remote), "_cluster": object()})  # fedgrain's own
    assert rowgroups.why_not(source, local, None, 3) is None
