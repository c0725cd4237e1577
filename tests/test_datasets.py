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


def _expected(df: pd.DataFrame, mask=None) -> pd.DataFrame:
    """The rows a reader of the Hive folder of ``df`` should give, from pandas alone: those
    ``mask`` keeps, file by file in name order (region, year, rate; rows in their order
    within a file), partition columns last."""
    rows = df if mask is None else df[mask]
    rows = rows.sort_values(["region", "year", "rate"], kind="stable")
    return rows[["x", "z", "grade", "region", "year", "rate"]].reset_index(drop=True)


def _same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got.astype({"region": want["region"].dtype}), want,
                                  check_exact=True)


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
    _same_rows(rows, _expected(df))
    assert rows["year"].dtype == np.int64 and rows["rate"].dtype == np.float64
    assert sorted(set(rows["region"])) == ["north", "south", "west"]
    assert len(source.files) == 18 and source.n_rows == len(df)
    kept = DatasetSource(folder, filter="year >= 2020 and region in ['north', 'south']")
    assert len(kept.files) == 8  # files of other partitions are never opened
    want = _expected(df, (df.year >= 2020) & df.region.isin(["north", "south"]))
    assert kept.n_rows == len(want)
    _same_rows(_rows_of(kept), want)
    _same_rows(kept.read(), want)
    both = DatasetSource(folder, filter="x > 0 and not rate == 0.5")
    assert both.n_rows == int(((df.x > 0) & (df.rate != 0.5)).sum())
    expr = DatasetSource(folder, filter=pads.field("z") < 0).n_rows
    tuples = DatasetSource(folder, filter=[("z", "<", 0)]).n_rows
    assert expr == tuples == int((df.z < 0).sum())


def test_a_fit_on_a_filtered_hive_folder_equals_the_in_memory_fit_of_those_rows(hive):
    df, folder = hive
    text = "year >= 2020 and x > -2"
    source = DatasetSource(folder, filter=text)
    rows = _expected(df, (df.year >= 2020) & (df.x > -2))  # from pandas, not the reader
    _same_rows(_rows_of(source), rows)
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
    rows = _expected(df, df.year >= 2020)
    reference = _in_memory(rows, **CAT)
    sub = pafs.SubTreeFileSystem(str(folder.parent), pafs.LocalFileSystem())
    subtree = DatasetSource("d", filesystem=sub, filter="year >= 2020")
    _same_rows(_rows_of(subtree), rows)
    _fits_equal(subtree, reference, **CAT)
    memory = fsspec.filesystem("memory")
    _hive(df, "/fedgrain-test/d", fs=pafs.PyFileSystem(pafs.FSSpecHandler(memory)))
    try:
        source = DatasetSource("/fedgrain-test/d", filesystem=memory, filter="year >= 2020")
        assert "(on py::fsspec+" in source.shown
        _same_rows(_rows_of(source), rows)
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
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)  # it comes first: one set outside must not
    rows = _expected(df, df.year >= 2020)
    reference = _in_memory(rows, **CAT)
    source = DatasetSource("s3://fedgrain-test/d/", filter="year >= 2020")
    assert source.files[0].startswith("s3://fedgrain-test/d/region=")
    _same_rows(_rows_of(source), rows)
    _fits_equal(source, reference, **CAT)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the S3 one alone
    assert DatasetSource("s3://fedgrain-test/d/", filter="year >= 2020").n_rows == len(rows)
    keyed = DatasetSource("s3://testing:testing@fedgrain-test/d", filter="year >= 2020")
    assert keyed.shown == "s3://***@fedgrain-test/d" and keyed.n_rows == len(rows)
    _fits_equal("s3://fedgrain-test/flat.csv", _in_memory(df.drop(columns=["region"])))
    back = read_table("s3://fedgrain-test/flat.csv", columns=["x", "grade"])
    np.testing.assert_allclose(back["x"], df["x"], rtol=0, atol=1e-15)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    plain = DatasetSource("s3://fedgrain-test/d", storage_options={"endpoint_override": s3},
                          filter="year >= 2020")
    assert plain.n_rows == source.n_rows
    with pytest.raises(DataError, match=r"does not exist"):
        DatasetSource("s3://fedgrain-test/nothing-here",
                      storage_options={"endpoint_override": s3})


def test_the_command_line_reads_folders_filters_and_s3(hive, s3, tmp_path, monkeypatch, capsys):
    df, folder = hive
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    rows = _expected(df, df.year >= 2020)
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
    keyed = "s3://testing:SECRETKEY@fedgrain-test/d"  # moto takes any secret
    code = main(["evaluate", str(tmp_path / "m0"), keyed, "--target", "grade", "--filter",
                 "year >= 2020", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and "SECRETKEY" not in out + err, err
    assert '"s3://***@fedgrain-test/d"' in out
    code = main(["report", str(tmp_path / "m0"), "--data", keyed, "--target", "grade",
                 "--filter", "year >= 2020", "--out", str(tmp_path / "r.html")])
    out, err = capsys.readouterr()
    assert code == 0 and "SECRETKEY" not in out + err, err
    assert "SECRETKEY" not in (tmp_path / "r.html").read_text()
    code = main(["fit", keyed + "?bogus=1", "--target", "grade", "--out", str(tmp_path / "m9")])
    err = capsys.readouterr().err
    assert code == 2 and "SECRETKEY" not in err and "***" in err, err


# ----------------------------------------------------------------------------- review fixes


def test_a_csv_column_whose_type_changes_late_reads_as_a_whole_read(tmp_path):
    """pyarrow's streaming CSV reader fixes a column's type from the first block: an integer
    column with 2.5 in its last row, text after numbers, a column empty at first. Read whole
    (pyarrow.csv.read_csv, as before the reader) and streamed, the types agree and no read
    fails."""
    import pyarrow.csv as pa_csv

    n = 120_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.integers(0, 100, n).astype(object), "b": rng.normal(size=n),
                       "c": ["1"] * n, "d": [""] * n, "grade": rng.integers(0, 3, n)})
    df.loc[n - 1, "a"], df.loc[n - 1, "c"], df.loc[n - 1, "d"] = 2.5, "x", "late"
    folder = tmp_path / "f"
    folder.mkdir()
    path = folder / "late.csv"
    df.to_csv(path, index=False)
    old = pa_csv.read_csv(path).to_pandas()
    whole = read_table(path)
    pd.testing.assert_frame_equal(whole, old)
    assert whole["a"].dtype == np.float64 and whole["a"].iloc[-1] == 2.5
    assert whole["c"].iloc[-1] == "x" and whole["d"].iloc[-1] == "late"
    streamed = _rows_of(DatasetSource(path, batch_rows=50_000))
    pd.testing.assert_frame_equal(streamed, old)
    late = "c == 'x' and d == 'late'"  # on columns typed as text by their last row only
    assert read_table(path, filter=late)["a"].tolist() == [2.5]
    assert _rows_of(DatasetSource(path, filter=late))["a"].tolist() == [2.5]
    with pytest.raises(DataError, match="does not apply"):
        DatasetSource(path, filter="b == 'x'").n_rows  # noqa: B018
    with pytest.raises(DataError, match="does not apply"):
        read_table(path, filter="b == 'x'")
    fit = DatasetSource(folder, batch_rows=50_000, columns=["a", "b", "grade"], target="grade")
    rows = _rows_of(fit)
    assert fit.n_rows == n and rows["a"].iloc[-1] == 2.5 and rows["grade"].dtype == np.int64


def _hive_values(tmp_path, name, values):
    df = pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]})
    root = tmp_path / name
    for v in values:
        (root / f"k={v}").mkdir(parents=True)
        df.to_parquet(root / f"k={v}" / "p.parquet")
    return root


def test_partition_values_are_typed_strictly_and_null_folders_stay_null(tmp_path):
    root = _hive_values(tmp_path, "num", ["2020", "2021", "__HIVE_DEFAULT_PARTITION__"])
    k = read_table(root)["k"]
    assert k.dtype == np.float64 and k.isna().sum() == 2  # numbers with missing values
    assert sorted(k.dropna().tolist()) == [2020, 2020, 2021, 2021]
    assert read_table(root, filter="k >= 2021")["k"].tolist() == [2021, 2021]
    assert _rows_of(DatasetSource(root))["k"].isna().sum() == 2
    for values in (["1_000", "2"], ["nan", "1"], ["inf", "1"], [" 1", "2"], ["+1", "2"]):
        k = read_table(_hive_values(tmp_path, f"t{abs(hash(tuple(values)))}", values))["k"]
        assert k.map(type).eq(str).all(), values  # pyarrow parses none of these as numbers
    assert read_table(_hive_values(tmp_path, "zeros", ["007", "010"]))["k"].tolist() == \
        [7, 7, 10, 10]
    assert read_table(_hive_values(tmp_path, "f", ["1", "2.5e1"]))["k"].tolist() == \
        [1.0, 1.0, 25.0, 25.0]
    big = read_table(_hive_values(tmp_path, "big", ["99999999999999999999", "1"]))["k"]
    assert big.dtype == np.float64  # beyond 64 bits: a decimal number


def test_credentials_in_an_address_are_never_shown():
    from fedgrain.data.dataset import redact

    assert redact("s3://AKU:SECRETU@bucket/d?secret_key=SECRETQ&x=1") == "s3://***@bucket/d?***"
    assert redact("/local/a?b.csv") == "/local/a?b.csv"
    for address in ("s3://AKU:SECRETU@bucket/d?bogus=1",
                    "s3://bucket/d?access_key=AKQ&secret_key=SECRETQ&bogus=1"):
        with pytest.raises(DataError) as err:
            DatasetSource(address)
        assert "SECRET" not in str(err.value) and "***" in str(err.value), str(err.value)


@pytest.mark.parametrize("text", [
    "x == 99999999999999999999999", "x == 10**100", "x in [1, 'a']", "x == 1j",
    "x == {1: 2}", "x == b'a'", "x in [[1], [2]]", "x == " + "[" * 5000 + "]" * 5000,
    "x == None",
])
def test_filter_literals_of_no_arrow_type_are_clear_errors(hive, text):
    _, folder = hive
    with pytest.raises(DataError, match="filter"):
        DatasetSource(folder, filter=text).n_rows  # noqa: B018


def test_boolean_columns_and_null_tests_in_filters(tmp_path):
    df = pd.DataFrame({"x": [1.0, np.nan, 3.0, 4.0], "b": [True, False, None, True],
                       "grade": [0, 1, 2, 1]})
    path = tmp_path / "f.parquet"
    df.to_parquet(path)
    assert read_table(path, filter="b")["x"].tolist() == [1.0, 4.0]
    assert read_table(path, filter="not b")["x"].isna().tolist() == [True]  # null b: dropped
    assert read_table(path, filter="is_null(x)")["grade"].tolist() == [1]
    assert read_table(path, filter="is_not_null(x) and x != 3")["x"].tolist() == [1.0, 4.0]
    assert read_table(path, filter="x != 3")["x"].tolist() == [1.0, 4.0]  # null x: dropped
    with pytest.raises(DataError, match="does not apply"):
        read_table(path, filter="grade")  # not a boolean column
    with pytest.raises(DataError, match=r"is_null\(column\)"):
        read_table(path, filter="x == None")


@pytest.mark.parametrize("suffix, codec", [(".bz2", "bz2"), (".zstd", "zstd"), (".lz4", "lz4")])
def test_compressed_csv_files_are_read_or_refused_never_skipped(tmp_path, suffix, codec):
    if not pa.Codec.is_available(codec):
        pytest.skip(f"pyarrow without {codec}")
    df = pd.DataFrame({"x": [1.0, 2.0], "grade": [0, 1]})
    folder = tmp_path / "f"
    folder.mkdir()
    df.to_csv(folder / "a.csv", index=False)
    with pa.CompressedOutputStream(str(folder / f"b.csv{suffix}"), codec) as out:
        out.write(df.to_csv(index=False).encode())
    assert read_table(folder)["x"].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert DatasetSource(folder).n_rows == 4
    (folder / "README.md").write_text("not data")  # not data: skipped
    assert DatasetSource(folder).n_rows == 4
    for name in ("c.csv.xz", "c.csv.zst", "c.csv.GZ"):  # pyarrow would read them as text
        (folder / name).write_bytes(b"not read")
        with pytest.raises(DataError, match=rf"{name}.*not a supported one.*Decompress"):
            DatasetSource(folder)
        (folder / name).unlink()


def test_counting_filtered_rows_holds_a_batch_not_a_row_group(tmp_path):
    rng = np.random.default_rng(6)
    n = 400_000
    df = pd.DataFrame(rng.normal(size=(n, 4)), columns=list("abcd"))
    path = tmp_path / "big.parquet"
    df.to_parquet(path, row_group_size=n)
    with _measured() as pool:
        count = DatasetSource(path, 10_000, filter="a > 0 and d < 1").n_rows
    assert count == int(((df.a > 0) & (df.d < 1)).sum())
    assert pool.max_memory() < n * 8, pool.max_memory()  # not the two columns whole


def test_small_messages(tmp_path):
    from fedgrain.data.dataset import error_reason

    df = pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]})
    path = tmp_path / "a.parquet"
    df.to_parquet(path)
    with pytest.raises(DataError, match=r"columns=\[\] reads no column"):
        DatasetSource(path, columns=[])
    root = _hive_values(tmp_path, "uneven", ["1"])
    df.to_parquet(root / "top.parquet")
    with pytest.raises(DataError, match="top.parquet' sits under no key=value folder"):
        DatasetSource(root)
    long = "could not connect " + "word " * 50 + "to http://127.0.0.1:9000 now"
    reason = error_reason(ValueError(long))
    assert reason.endswith("word ...") and len(reason) <= 204


def test_lazy_predictions_of_nominal_and_mixed_models():
    dd = pytest.importorskip("dask.dataframe")
    import dask

    from fedgrain import AdaptiveFederatedOrdinal, MixedOrdinalRegression

    rng = np.random.default_rng(0)
    n = 1_500
    df = pd.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n)})
    g = rng.choice(["a", "b", "c", "d"], n)
    y = np.digitize(df.x - df.z + rng.logistic(size=n), [-0.5, 1])
    with dask.config.set(scheduler="synchronous"):
        nominal = OrdinalRegression(nominal=["z"]).fit(df, y)
        lazy = nominal.predict_cumulative_proba(dd.from_pandas(df, npartitions=3))
        np.testing.assert_array_equal(lazy.compute(), nominal.predict_cumulative_proba(df))
        mixed = MixedOrdinalRegression(random="intercept").fit(df, y, groups=g)
        both = df.assign(g=g)
        lazy_frame = dd.from_pandas(both, npartitions=3)
        for name in ("predict_proba", "predict_linear", "predict_cumulative_proba", "predict"):
            np.testing.assert_array_equal(getattr(mixed, name)(lazy_frame, groups="g").compute(),
                                          getattr(mixed, name)(both, groups="g"))
            np.testing.assert_array_equal(
                getattr(mixed, name)(dd.from_pandas(df, npartitions=2)).compute(),
                getattr(mixed, name)(df))
        site = df.assign(site=np.where(df.x > 0, "s1", "s2"))
        adaptive = AdaptiveFederatedOrdinal(backend="serial", random_state=0).fit(
            site, y, groups="site")
        lazy_unseen = adaptive.unseen(dd.from_pandas(site, npartitions=3), groups="site")
        np.testing.assert_array_equal(lazy_unseen.compute(),
                                      adaptive.unseen(site, groups="site"))


def test_report_filter_without_data_is_an_error(tmp_path, capsys):
    df = _frame(800)
    model = OrdinalRegression(categorical=["region"]).fit(df.drop(columns="grade"), df["grade"])
    model.save(tmp_path / "m")
    code = main(["report", str(tmp_path / "m"), "--filter", "x > 0",
                 "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "--filter applies with --data" in err and err.count("\n") == 1, err
