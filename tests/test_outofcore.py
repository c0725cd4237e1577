"""Fitting from Parquet without loading it (issue 6): the same model as in memory, on every
backend; memory bounded by a batch; bad files get clear errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, load
from fedgrain.core.standardize import Standardizer
from fedgrain.data.streamed import ParquetSource, prepare_streamed
from fedgrain.datasets import make_ordinal, make_regions
from fedgrain.exceptions import DataError
from fedgrain.partition.tree import PartitionTree


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    X, y, *_ = make_regions(30_000, n_regions=3, random_state=1)
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(X.shape[1])]).assign(grade=y)
    folder = tmp_path_factory.mktemp("ooc")
    frame.to_parquet(folder / "all.parquet", row_group_size=7_000)
    parts = folder / "parts"
    parts.mkdir()
    for i, a in enumerate(range(0, len(frame), 11_000)):  # files read in name order
        frame.iloc[a : a + 11_000].to_parquet(parts / f"part-{i:03d}.parquet")
    return frame, folder


@pytest.fixture
def force_processes(monkeypatch):
    from fedgrain.backends import processes

    monkeypatch.setattr(processes, "MIN_PARALLEL_WORK", 0)


def _pair(make, frame, path):
    features = frame.drop(columns="grade")
    return make().fit(path, "grade"), make().fit(features, frame["grade"])


@pytest.mark.parametrize("backend", ["serial", "processes"])
@pytest.mark.parametrize("source", ["all.parquet", "parts"])
def test_divide_and_conquer_from_parquet_equals_the_in_memory_fit(regions, backend, source,
                                                                  force_processes):
    frame, folder = regions
    a, b = _pair(lambda: DivideConquerOrdinal(n_subsets=3, backend=backend, n_jobs=2,
                                              random_state=4), frame, folder / source)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.thresholds_, b.thresholds_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.cov_, b.cov_, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(a.subset_sizes_, b.subset_sizes_)
    assert a.feature_names_in_.tolist() == b.feature_names_in_.tolist()


@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_adaptive_with_meta_learner_from_parquet_equals_the_in_memory_fit(regions, backend,
                                                                          force_processes):
    frame, folder = regions
    a, b = _pair(lambda: AdaptiveFederatedOrdinal(granularity=0.5, meta="fomaml", max_rounds=3,
                                                  backend=backend, n_jobs=2, random_state=4),
                 frame, folder / "parts")
    assert a.partition_.describe() == b.partition_.describe()
    np.testing.assert_array_equal(a.partition_.sizes, b.partition_.sizes)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    for ma, mb in zip(a.local_models_, b.local_models_, strict=True):
        np.testing.assert_allclose(ma.coef_, mb.coef_, rtol=0, atol=1e-10)
    X = frame.drop(columns="grade")
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=0, atol=1e-10)


def test_streamed_routing_equals_in_memory_routing():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5_000, 3))
    codes = rng.integers(0, 3, 5_000)
    tree = PartitionTree(3, 3, Standardizer.fit(X), seed=5)
    left, right = tree.split(tree.root, np.array([1.0, -0.5, 0.0]), 0.1, {})
    tree.split_random(left, 3)
    tree.split(right, np.array([0.0, 0.0, 1.0]), -0.2, {})
    blocks = [(a, X[a : a + 777]) for a in range(0, 5_000, 777)]
    np.testing.assert_array_equal(tree.route_blocks(iter(blocks), 5_000, codes),
                                  tree.route(X, codes))
    np.testing.assert_array_equal(tree.route_blocks(iter(blocks), 5_000), tree.route(X))


def test_the_driver_holds_a_batch_not_the_data(tmp_path, force_processes):
    """numpy's allocations in this process while fitting 1,000,000 x 20 (160 MB of features)
    from Parquet stay at a few batches (about 30 MB): rows go to shard files as they are read."""
    X, y, *_ = make_ordinal(1_000_000, 20, 4, random_state=2)
    frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(20)]).assign(y=y)
    frame.to_parquet(tmp_path / "big.parquet", row_group_size=100_000)
    del X, frame
    model = DivideConquerOrdinal(n_subsets=2, backend="processes", n_jobs=2, random_state=0)
    tracemalloc.start()
    try:
        model.fit(tmp_path / "big.parquet", "y")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data = 1_000_000 * 20 * 8
    assert peak < 0.3 * data, f"peak {peak / 2**20:.0f} MB for {data / 2**20:.0f} MB of data"
    assert model.subset_sizes_.sum() == 1_000_000


def test_categorical_features_and_string_levels_from_parquet(tmp_path):
    rng = np.random.default_rng(3)
    n = 12_000
    colour = rng.choice(["red", "green", "blue"], n)
    x = rng.standard_normal(n)
    eta = x + (colour == "red") * 1.0
    grade = np.array(["low", "mid", "high"])[np.digitize(eta + rng.logistic(size=n), [-0.5, 1])]
    frame = pd.DataFrame({"x": x, "colour": colour, "grade": grade})
    frame.to_parquet(tmp_path / "c.parquet", row_group_size=2_000)
    kw = {"n_subsets": 2, "backend": "serial", "levels": ["low", "mid", "high"],
          "categorical": ["colour"]}
    a = DivideConquerOrdinal(**kw).fit(tmp_path / "c.parquet", "grade")
    b = DivideConquerOrdinal(**kw).fit(frame[["x", "colour"]], frame["grade"])
    assert list(a.results_.feature_names) == list(b.results_.feature_names)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)


def _write(path, frame):
    frame.to_parquet(path, row_group_size=1_000)
    return path


def _frame(n=3_000, seed=0):
    X, y, *_ = make_ordinal(n, 3, 3, random_state=seed)
    return pd.DataFrame(X, columns=["a", "b", "c"]).assign(grade=y)


@pytest.mark.parametrize("change, match", [
    (lambda f: f.assign(a=f["a"].where(f.index != 2_345)), r"Column 'a' of X has NaN.*row 2345"
                                                           r".*batch of rows 0 to 2,999 of"),
    (lambda f: f.assign(grade=f["grade"].astype(float).where(f.index != 1_200)),
     r"target column 'grade'.*missing.*row 1200.*batch of rows 0 to 2,999"),
    (lambda f: f.assign(b=1.0), "'b'.* is constant"),
    (lambda f: f.assign(grade=1), "only one class"),
])
def test_bad_values_in_a_parquet_file_are_named_with_their_place(tmp_path, change, match):
    path = _write(tmp_path / "bad.parquet", change(_frame()))
    with pytest.raises(DataError, match=match):
        DivideConquerOrdinal(n_subsets=2, backend="serial").fit(path, "grade")


def test_bad_parquet_sources_get_clear_errors(tmp_path):
    good = _write(tmp_path / "good.parquet", _frame())
    dc = DivideConquerOrdinal(n_subsets=2, backend="serial")
    with pytest.raises(DataError, match=r"'grad' is not in .*did you mean 'grade'"):
        dc.fit(good, "grad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        dc.fit(tmp_path / "empty", "grade")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="Could not read .*broken.parquet' as Parquet"):
        dc.fit(tmp_path / "broken.parquet", "grade")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed / "1.parquet", _frame())
    _write(mixed / "2.parquet", _frame().rename(columns={"c": "d"}))
    with pytest.raises(DataError, match="do not have the same columns"):
        dc.fit(mixed, "grade")
    pq.write_table(pa.table({"a": pa.array([], pa.float64()), "grade": pa.array([], pa.int64())}),
                   tmp_path / "norows.parquet")
    with pytest.raises(DataError, match="no data rows"):
        dc.fit(tmp_path / "norows.parquet", "grade")
    with pytest.raises(DataError, match="does not exist"):
        dc.fit(tmp_path / "missing.parquet", "grade")
    assert not hasattr(dc, "coef_")


def test_a_truncated_file_midway_is_a_clear_error_and_no_shard_files_remain(tmp_path):
    import os

    path = _write(tmp_path / "t.parquet", _frame(20_000))
    source = ParquetSource(path, batch_rows=1_000)
    before = set(os.listdir(tmp_path))
    data = prepare_streamed(path, "grade", estimator_name="test")
    assert data.X.shape == (20_000, 3) and data.codes.dtype == np.int8
    raw = path.read_bytes()
    path.write_bytes(raw[:4] + b"\0" * 4096 + raw[4100:])  # data pages destroyed, footer kept
    with pytest.raises(DataError, match=r"Could not read .*t.parquet' as Parquet"):
        list(source.frames())
    assert set(os.listdir(tmp_path)) == before


def test_cli_fit_streams_a_parquet_folder(regions, tmp_path, capsys):
    from fedgrain.cli import main

    frame, folder = regions
    code = main(["fit", str(folder / "parts"), "--target", "grade", "--backend", "serial",
                 "--n-subsets", "3", "--out", str(tmp_path / "m")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "streaming" in captured.err and "30,000 rows" in captured.err
    model = load(tmp_path / "m")
    ref = DivideConquerOrdinal(n_subsets=3, backend="serial").fit(frame.drop(columns="grade"),
                                                                  frame["grade"])
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=0, atol=1e-10)


def _colour_frame(n, seed, sort=False):
    rng = np.random.default_rng(seed)
    colour = rng.choice(["red", "green", "blue"], n)
    x = rng.standard_normal(n)
    eta = x + (colour == "red") * 1.0 - (colour == "blue") * 0.5
    grade = np.digitize(eta + rng.logistic(size=n), [-0.5, 1])
    frame = pd.DataFrame({"x": x, "colour": colour, "grade": grade})
    if sort:
        frame = frame.sort_values("colour", kind="stable").reset_index(drop=True)
    return frame


def test_a_categorical_columns_own_order_is_kept_as_in_memory(tmp_path):
    frame = _colour_frame(9_000, 5)
    frame["colour"] = pd.Categorical(frame["colour"], categories=["red", "green", "blue"])
    frame.to_parquet(tmp_path / "c.parquet")
    a = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(tmp_path / "c.parquet", "grade")
    b = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(frame[["x", "colour"]],
                                                                frame["grade"])
    assert list(a.results_.feature_names) == list(b.results_.feature_names) == [
        "x", "colour[green]", "colour[blue]"]
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)


def test_levels_come_from_the_whole_file_not_its_first_batch(tmp_path):
    """Sorted by colour, the first 65,536 rows hold one colour only."""
    frame = _colour_frame(140_000, 6, sort=True)
    frame.to_parquet(tmp_path / "s.parquet")
    kw = {"n_subsets": 2, "backend": "serial", "categorical": ["colour"]}
    a = DivideConquerOrdinal(**kw).fit(tmp_path / "s.parquet", "grade")
    b = DivideConquerOrdinal(**kw).fit(frame[["x", "colour"]], frame["grade"])
    assert list(a.results_.feature_names) == list(b.results_.feature_names)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)


def test_an_ordered_target_whose_files_hold_different_levels(tmp_path):
    frame = _colour_frame(6_000, 7)
    names = np.array(["low", "mid", "high"])
    parts = tmp_path / "parts"
    parts.mkdir()
    low = frame[frame.grade < 2]  # the first file never sees "high"
    rest = frame[frame.grade == 2]
    for i, part in enumerate((low, rest)):
        cats = ["low", "mid"] if i == 0 else ["low", "mid", "high"]
        part.assign(grade=pd.Categorical(names[part.grade], categories=cats, ordered=True)) \
            .to_parquet(parts / f"p{i}.parquet")
    both = pd.concat([low, rest])
    a = DivideConquerOrdinal(n_subsets=2, backend="serial", categorical=["colour"]).fit(
        parts, "grade")
    b = DivideConquerOrdinal(n_subsets=2, backend="serial", categorical=["colour"],
                             levels=["low", "mid", "high"]).fit(
        both[["x", "colour"]], names[both.grade])
    assert list(a.levels_) == ["low", "mid", "high"]
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)


def test_unknown_labels_and_missing_categories_name_the_files_rows(tmp_path):
    frame = _colour_frame(3_000, 8)
    bad = frame.assign(grade=frame.grade.where(frame.index != 2_900, 7))
    _write(tmp_path / "l.parquet", bad)
    with pytest.raises(DataError, match=r"not among the levels.*row 2900.*batch of rows 0 to "
                                        r"2,999"):
        DivideConquerOrdinal(n_subsets=2, backend="serial", levels=[0, 1, 2],
                             categorical=["colour"]).fit(tmp_path / "l.parquet", "grade")
    missing = frame.assign(colour=frame.colour.where(frame.index != 2_500))
    _write(tmp_path / "m.parquet", missing)
    with pytest.raises(DataError, match=r"'colour' of X has missing values in .*row 2500"):
        DivideConquerOrdinal(n_subsets=2, backend="serial", categorical=["colour"]).fit(
            tmp_path / "m.parquet", "grade")


def test_an_array_target_or_weights_read_the_parquet_file_into_memory(tmp_path):
    frame = _frame()
    path = _write(tmp_path / "w.parquet", frame)
    X = frame.drop(columns="grade")
    w = np.r_[np.ones(1_500), 2 * np.ones(1_500)]
    a = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(path, "grade", sample_weight=w)
    b = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(X, frame["grade"],
                                                                sample_weight=w)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-12)


def test_a_source_with_chosen_columns_and_the_cli_options_that_choose_them(regions, tmp_path,
                                                                           capsys):
    from fedgrain.cli import main

    frame, folder = regions
    ids = frame.assign(id=np.arange(len(frame)), note="x")
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, a in enumerate(range(0, len(ids), 10_000)):
        ids.iloc[a : a + 10_000].to_parquet(parts / f"p{i}.parquet", index=False)
    features = [c for c in frame.columns if c != "grade"]
    ref = DivideConquerOrdinal(n_subsets=3, backend="serial").fit(frame[features],
                                                                  frame["grade"])
    source = ParquetSource(parts, columns=[*features, "grade"])
    model = DivideConquerOrdinal(n_subsets=3, backend="serial").fit(source, "grade")
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=0, atol=1e-10)
    code = main(["fit", str(parts), "--target", "grade", "--drop", "id,note", "--backend",
                 "serial", "--n-subsets", "3", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 0 and "streaming" in err, err
    np.testing.assert_allclose(load(tmp_path / "m").coef_, ref.coef_, rtol=0, atol=1e-10)
    code = main(["fit", str(parts), "--target", "grade", "--features", "x0,x1,nope",
                 "--out", str(tmp_path / "m2")])
    assert code == 2 and "--features: ['nope'] not among" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"has no column\(s\) 'nopee'"):
        ParquetSource(parts, columns=["x0", "nopee"])


def test_hive_partition_folders_become_columns(tmp_path):
    """A folder written with partition columns (Spark, pyarrow.parquet.write_to_dataset) keeps
    them: `region=north/year=2020/...` gives each row region 'north' and year 2020."""
    rng = np.random.default_rng(9)
    n = 9_000
    df = pd.DataFrame({"x": rng.normal(size=n),
                       "region": rng.choice(["north", "south", "west"], n),
                       "year": rng.choice([2019, 2020], n)})
    eta = df.x + (df.region == "north") * 0.8 + (df.year == 2020) * 0.5
    df["grade"] = np.digitize(eta + rng.logistic(size=n), [-0.5, 1])
    pq.write_to_dataset(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "d",
                        partition_cols=["region", "year"])
    source = ParquetSource(tmp_path / "d")
    assert source.columns == ["x", "grade", "region", "year"]
    rows = pd.concat([f for _, f in source.frames()], ignore_index=True)
    assert rows["year"].dtype.kind == "i" and set(rows["region"]) == {"north", "south", "west"}
    kw = {"n_subsets": 2, "backend": "serial", "categorical": ["region"]}
    a = DivideConquerOrdinal(**kw).fit(tmp_path / "d", "grade")
    b = DivideConquerOrdinal(**kw).fit(rows.drop(columns="grade"), rows["grade"])
    assert list(a.results_.feature_names) == ["x", "region[south]", "region[west]", "year"]
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    assert 0.5 < a.coef_[0] < 1.5  # the slope of x, the true one being 1
