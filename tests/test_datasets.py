"""Data where it lives (issue 16): CSV and Parquet through pyarrow.dataset (folders, Hive
partitions, filters, column projection), pyarrow's and fsspec's file systems, a real local S3
server, and the command line; each compared with the same rows fitted in memory."""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from fedgrain import DivideConquerOrdinal, OrdinalRegression, load
from fedgrain.cli import main
from fedgrain.data import DatasetSource, read_table
from fedgrain.exceptions import DataError


def _frame(n=6_000, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n),
                       "region": rng.choice(["north", "south", "west"], n),
                       "year": rng.choice([2019, 2020, 2021], n),
                       "rate": rng.choice([0.5, 1.5], n)})
    eta = df.x - 0.5 * df.z + (df.region == "north") * 0.8 + (df.year - 2020) * 0.3
    df["grade"] = np.digitize(eta + rng.logistic(size=n), [-0.5, 1])
    return df


def _hive(df: pd.DataFrame, folder, fs=None) -> None:
    pq.write_to_dataset(pa.Table.from_pandas(df, preserve_index=False), str(folder),
                        partition_cols=["region", "year", "rate"], filesystem=fs)


CAT = {"categorical": ["region"]}


def _dc(**kw):
    return DivideConquerOrdinal(n_subsets=2, backend="serial", random_state=0, **kw)


def _in_memory(rows: pd.DataFrame, **kw):
    return _dc(**kw).fit(rows.drop(columns="grade"), rows["grade"])


#: Memory pools of the measurements, alive for the session: buffers read from a pool return
#: to it when they are freed, which may be after a test's last line.
_POOLS: list = []


@contextlib.contextmanager
def _measured():
    """pyarrow's default memory pool replaced by a proxy that counts its peak, meanwhile."""
    before = pa.default_memory_pool()
    _POOLS.append(pa.proxy_memory_pool(before))
    pa.set_memory_pool(_POOLS[-1])
    try:
        yield _POOLS[-1]
    finally:
        pa.set_memory_pool(before)


def _rows_of(source: DatasetSource) -> pd.DataFrame:
    return pd.concat([f for _, f in source.frames()], ignore_index=True)


@pytest.fixture(scope="module")
def hive(tmp_path_factory):
    df = _frame()
    folder = tmp_path_factory.mktemp("hive") / "d"
    _hive(df, folder)
    return df, folder


def test_hive_partitions_are_typed_columns_and_a_filter_skips_files(hive):
    df, folder = hive
    source = DatasetSource(folder)
    assert source.columns == ["x", "z", "grade", "region", "year", "rate"]
    rows = _rows_of(source)
    assert rows["year"].dtype == np.int64 and rows["rate"].dtype == np.float64
    assert sorted(set(rows["region"])) == ["north", "south", "west"]
    assert len(source.files) == 18 and source.n_rows == len(df)
    kept = DatasetSource(folder, filter="year >= 2020 and region in ['north', 'south']")
    assert len(kept.files) == 8  # files of other partitions are never opened
    want = df[(df.year >= 2020) & df.region.isin(["north", "south"])]
    assert kept.n_rows == len(want)
    both = DatasetSource(folder, filter="x > 0 and not rate == 0.5")
    assert both.n_rows == int(((df.x > 0) & (df.rate != 0.5)).sum())
    expr = DatasetSource(folder, filter=pads.field("z") < 0).n_rows
    tuples = DatasetSource(folder, filter=[("z", "<", 0)]).n_rows
    assert expr == tuples == int((df.z < 0).sum())


def test_a_fit_on_a_filtered_hive_folder_equals_the_in_memory_fit_of_those_rows(hive):
    df, folder = hive
    text = "year >= 2020 and x > -2"
    source = DatasetSource(folder, filter=text)
    rows = _rows_of(source)
    assert len(rows) == int(((df.year >= 2020) & (df.x > -2)).sum())
    kw = {"categorical": ["region"]}
    a = _dc(**kw).fit(source, "grade")
    b = _in_memory(rows, **kw)
    assert list(a.feature_names_in_) == ["x", "z", "region", "year", "rate"]
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    c = OrdinalRegression(categorical=["region"]).fit(read_table(folder, filter=text), "grade")
    d = OrdinalRegression(categorical=["region"]).fit(rows.drop(columns="grade"), rows["grade"])
    np.testing.assert_allclose(c.coef_, d.coef_, rtol=0, atol=1e-10)
    e = OrdinalRegression(categorical=["region"]).fit(source, "grade")  # a source read whole
    np.testing.assert_allclose(e.coef_, d.coef_, rtol=0, atol=1e-10)
    w = np.where(rows.x > 0, 2.0, 1.0)  # weights: the source's rows read into memory
    f = _dc(**kw).fit(source, "grade", sample_weight=w)
    g = _dc(**kw).fit(rows.drop(columns="grade"), rows["grade"], sample_weight=w)
    np.testing.assert_allclose(f.coef_, g.coef_, rtol=0, atol=1e-10)


def test_a_folder_of_csv_files_is_streamed_like_parquet(tmp_path):
    """gzipped and plain files of one folder, integers read as floats where a later file holds
    a fraction (pyarrow would fix the type from the first rows), integer labels kept."""
    df = _frame(9_000, 1)[["x", "z", "year", "grade"]]
    folder = tmp_path / "csv"
    folder.mkdir()
    for i, a in enumerate(range(0, len(df), 3_000)):
        part = df.iloc[a : a + 3_000]
        part.to_csv(folder / (f"p{i}.csv" + (".gz" if i % 2 else "")), index=False)
    late = df.assign(year=df.year.astype(float))
    late.loc[8_999, "year"] = 2020.5
    late.iloc[6_000:].to_csv(folder / "p2.csv", index=False)
    (folder / "_SUCCESS").write_text("")
    a = _dc().fit(folder, "grade")
    b = _in_memory(late)
    assert a.levels_.tolist() == [0, 1, 2] and a.levels_.dtype.kind == "i"
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    whole = read_table(folder)  # types unified across files: year float, grade int
    pd.testing.assert_frame_equal(whole, late.reset_index(drop=True))


def test_only_the_columns_needed_are_read(tmp_path):
    """A wide text column left out is not read: the reads' peak memory (pyarrow's pool) is a
    fifth of that of reading it, which holds the column's text."""
    n = 40_000
    df = _frame(n, 2)[["x", "z", "grade"]].assign(note=["a long note " * 20] * n)
    df.to_parquet(tmp_path / "w.parquet", row_group_size=10_000)
    peaks = {}
    for name, columns in (("all", None), ("needed", ["x", "z", "grade"])):
        source = DatasetSource(tmp_path / "w.parquet", 10_000, columns)
        with _measured() as pool:
            for _, frame in source.frames():
                assert list(frame.columns) == source.columns
        peaks[name] = pool.max_memory()
    note_bytes = n * len("a long note " * 20)
    assert peaks["needed"] < peaks["all"] / 5 and peaks["all"] > note_bytes / 2, peaks


@pytest.mark.parametrize("n_files", [4, 64])
def test_memory_does_not_grow_with_the_number_of_files(tmp_path, n_files):
    """The same 2,000-row files, 4 or 64 of them: a full pass holds one file's batch at a time
    (pyarrow's pool peaks under 1 MB either way, 16 times the rows notwithstanding)."""
    folder = tmp_path / "many"
    folder.mkdir()
    df = _frame(2_000, 3)[["x", "z", "year", "grade"]]
    for i in range(n_files):
        df.to_parquet(folder / f"part-{i:03d}.parquet")
    source = DatasetSource(folder)
    with _measured() as pool:
        total = sum(len(f) for _, f in source.frames())
    assert total == 2_000 * n_files
    assert pool.max_memory() < 1 << 20, pool.max_memory()


def test_memory_does_not_grow_with_the_row_groups_either(tmp_path):
    """One row group of 600,000 rows (29 MB of floats), read 10,000 rows at a time, with and
    without a filter: pyarrow's peak is 7.5 MB whatever the group's size (measured at 300,000
    and 1,200,000 rows too), where its dataset scanner decodes whole groups (1.5 times their
    size: 88 MB for 1,200,000 rows)."""
    rng = np.random.default_rng(6)
    df = pd.DataFrame(rng.normal(size=(600_000, 6)), columns=list("abcdef"))
    df.to_parquet(tmp_path / "big.parquet", row_group_size=600_000)
    size = df.to_numpy().nbytes
    for flt in (None, "a > 0"):
        source = DatasetSource(tmp_path / "big.parquet", 10_000, filter=flt)
        with _measured() as pool:
            rows = sum(len(f) for _, f in source.frames())
        assert rows == (600_000 if flt is None else int((df.a > 0).sum()))
        assert pool.max_memory() < size / 3, (flt, pool.max_memory(), size)


def test_bad_data_sets_get_one_line_errors_naming_the_file(tmp_path):
    good = _frame(3_000, 4)[["x", "z", "grade"]]
    d = tmp_path / "d"
    d.mkdir()
    good.to_parquet(d / "a.parquet")
    with pytest.raises(DataError, match=r"'grad' is not in .*did you mean 'grade'"):
        _dc().fit(d, "grad")
    with pytest.raises(DataError, match=r"has no column\(s\) 'zz'; did you mean 'z'"):
        DatasetSource(d, columns=["x", "zz"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("notes")
    with pytest.raises(DataError, match=r"holds no data files .* it holds 'README.md'"):
        _dc().fit(empty, "grade")
    other = tmp_path / "other"
    shutil.copytree(d, other)
    good.rename(columns={"z": "w"}).to_parquet(other / "b.parquet")
    with pytest.raises(DataError, match=r"do not have the same columns: '.*b.parquet' has "):
        DatasetSource(other)
    clash = tmp_path / "clash"
    shutil.copytree(d, clash)
    good.assign(z=good.z.astype(str)).to_parquet(clash / "b.parquet")
    with pytest.raises(DataError, match=r"column 'z' is (large_)?string in '.*b.parquet' but "
                                        r"double in '.*a.parquet'"):
        DatasetSource(clash)
    widened = tmp_path / "widened"
    shutil.copytree(d, widened)
    good.assign(grade=good.grade.astype(float)).to_parquet(widened / "b.parquet")
    assert DatasetSource(widened).n_rows == 6_000  # int and float unify as float
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "b.parquet").write_bytes(b"PAR1 not parquet at all PAR1")
    with pytest.raises(DataError, match=r"^Could not read '.*broken/b.parquet' as Parquet: "
                                        r"[^\n]*\.$"):
        _dc().fit(broken, "grade")
    mixed = tmp_path / "mixed"
    shutil.copytree(d, mixed)
    good.to_csv(mixed / "b.csv", index=False)
    with pytest.raises(DataError, match="mixes kinds of files"):
        DatasetSource(mixed)


def test_a_file_damaged_midway_is_named_when_its_rows_are_read(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    df = _frame(20_000, 5)[["x", "z", "grade"]]
    for i in range(2):
        df.to_parquet(d / f"p{i}.parquet", row_group_size=2_000)
    raw = (d / "p1.parquet").read_bytes()
    (d / "p1.parquet").write_bytes(raw[:4] + b"\0" * 4096 + raw[4100:])
    source = DatasetSource(d, 1_000)
    with pytest.raises(DataError, match=r"^Could not read '.*p1.parquet' as Parquet: [^\n]*$"):
        list(source.frames())


@pytest.mark.parametrize("text, match", [
    ("yeer >= 2020", r"names 'yeer', which is not a column .*did you mean 'year'"),
    ("region == 3", r"does not apply .*compare numbers with numbers"),
    ("year >=", "is not an expression"),
    ("x + 1 > 2", "compare columns with numbers"),
    ("year > 2030", r"No row of .* passes the filter"),
])
def test_bad_filters_are_clear_errors(hive, text, match):
    _, folder = hive
    with pytest.raises(DataError, match=match):
        DatasetSource(folder, filter=text).n_rows  # noqa: B018


def _fits_equal(source_or_path, reference, **kw):
    model = _dc(**kw).fit(source_or_path, "grade")
    np.testing.assert_allclose(model.coef_, reference.coef_, rtol=0, atol=1e-10)


def test_pyarrow_and_fsspec_file_systems(hive, tmp_path):
    """A SubTreeFileSystem over this folder, and fsspec's in-memory file system through
    PyFileSystem(FSSpecHandler(...)): the same rows as the local folder."""
    fsspec = pytest.importorskip("fsspec")
    df, folder = hive
    reference = _in_memory(_rows_of(DatasetSource(folder, filter="year >= 2020")), **CAT)
    sub = pafs.SubTreeFileSystem(str(folder.parent), pafs.LocalFileSystem())
    _fits_equal(DatasetSource("d", filesystem=sub, filter="year >= 2020"), reference, **CAT)
    memory = fsspec.filesystem("memory")
    _hive(df, "/fedgrain-test/d", fs=pafs.PyFileSystem(pafs.FSSpecHandler(memory)))
    try:
        source = DatasetSource("/fedgrain-test/d", filesystem=memory, filter="year >= 2020")
        assert "(on py::fsspec+" in source.shown
        _fits_equal(source, reference, **CAT)
    finally:
        memory.rm("/fedgrain-test", recursive=True)
    with pytest.raises(DataError, match="without the scheme"):
        DatasetSource("s3://bucket/d", filesystem=sub)


# ----------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3(hive):
    """A real S3-compatible server (moto's) on 127.0.0.1, holding the Hive folder and a CSV
    file in the bucket fedgrain-test; stopped after the module."""
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs a local S3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        fs.create_dir("fedgrain-test")
        df, _ = hive
        _hive(df, "fedgrain-test/d", fs=fs)
        with fs.open_output_stream("fedgrain-test/flat.csv") as out:
            out.write(df.drop(columns=["region"]).to_csv(index=False).encode())
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_an_s3_address_is_read_from_a_local_s3_server(hive, s3, monkeypatch):
    df, folder = hive
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    reference = _in_memory(_rows_of(DatasetSource(folder, filter="year >= 2020")), **CAT)
    source = DatasetSource("s3://fedgrain-test/d/", filter="year >= 2020")
    assert source.files[0].startswith("s3://fedgrain-test/d/region=")
    _fits_equal(source, reference, **CAT)
    _fits_equal("s3://fedgrain-test/flat.csv", _in_memory(df.drop(columns=["region"])))
    back = read_table("s3://fedgrain-test/flat.csv", columns=["x", "grade"])
    np.testing.assert_allclose(back["x"], df["x"], rtol=0, atol=1e-15)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    plain = DatasetSource("s3://fedgrain-test/d", storage_options={"endpoint_override": s3},
                          filter="year >= 2020")
    assert plain.n_rows == source.n_rows
    with pytest.raises(DataError, match=r"does not exist"):
        DatasetSource("s3://fedgrain-test/nothing-here",
                      storage_options={"endpoint_override": s3})


def test_the_command_line_reads_folders_filters_and_s3(hive, s3, tmp_path, monkeypatch, capsys):
    df, folder = hive
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    rows = _rows_of(DatasetSource(folder, filter="year >= 2020"))
    reference = _in_memory(rows, **CAT)
    for i, data in enumerate((str(folder), "s3://fedgrain-test/d")):
        code = main(["fit", data, "--target", "grade", "--filter", "year >= 2020",
                     "--categorical", "region",
                     "--backend", "serial", "--n-subsets", "2", "--out", str(tmp_path / f"m{i}")])
        err = capsys.readouterr().err
        assert code == 0 and f"streaming {data} ({len(rows):,} rows)" in err, err
        np.testing.assert_allclose(load(tmp_path / f"m{i}").coef_, reference.coef_, rtol=0,
                                   atol=1e-10)
    code = main(["predict", str(tmp_path / "m0"), "s3://fedgrain-test/d", "--filter",
                 "region == 'north' and year >= 2020", "--keep", "x", "--out",
                 str(tmp_path / "p.csv")])
    assert code == 0, capsys.readouterr().err
    out = pd.read_csv(tmp_path / "p.csv")
    north = rows[rows.region == "north"].drop(columns="grade")
    want = reference.predict_proba(north)
    np.testing.assert_allclose(np.sort(out["x"]), np.sort(north["x"]), rtol=0, atol=1e-12)
    order = np.argsort(out["x"].to_numpy())
    np.testing.assert_allclose(out.filter(like="proba_").to_numpy()[order],
                               want[np.argsort(north["x"].to_numpy())], rtol=0, atol=1e-10)
    code = main(["evaluate", str(tmp_path / "m0"), str(folder), "--target", "grade",
                 "--filter", "yeer > 1"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'year'" in err and err.count("\n") == 1, err
