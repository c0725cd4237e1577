"""Tables where they live: CSV and Parquet files, folders of them and Hive-partitioned data sets,
on this machine or on a file system pyarrow reaches (S3, GCS, HDFS, Azure, or any fsspec one).

One reader serves every path fedgrain takes: :class:`DatasetSource`, built on
``pyarrow.dataset``. It finds the files, checks that they hold one table (the same columns, types
that unify), turns ``key=value`` folders into typed columns, reads only the columns asked for and
only the rows a filter keeps, and reads file by file in batches, so that memory holds one batch
whatever the number or size of the files. :func:`fedgrain.data.read_table` reads a source whole;
the estimators that divide the data stream it (:mod:`fedgrain.data.streamed`).
"""

from __future__ import annotations

import ast
import os
import re
from functools import cached_property
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pa_parquet

from fedgrain.exceptions import DataError, DataTypeError

from ._common import did_you_mean, quote

__all__ = ["BATCH_ROWS", "DatasetSource", "is_uri", "parse_filter"]

#: Rows read at a time (about 10 MB for 20 float columns).
BATCH_ROWS = 65_536

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": None}
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED = ".csv, .tsv, .txt (each also gzipped, e.g. .csv.gz), .parquet, .pq"

#: pyarrow's file systems by URI scheme, for ``storage_options``.
_FILESYSTEMS = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem",
                "abfs": "AzureFileSystem", "hdfs": "HadoopFileSystem"}


def error_reason(exc: Exception) -> str:
    """The first sentence of an exception's message (pyarrow's are long)."""
    # pyarrow's prefixes name the file again (messages name it already) or say nothing
    text = re.sub(r"^(Error creating dataset\.\s*)?(Could not open \w+ input source "
                  r"'[^']*': )?(Invalid: )?", "", str(exc).strip())
    first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    return first[:200].rstrip(".")


def is_uri(path: Any) -> bool:
    """Whether ``path`` is an address with a scheme (``s3://...``) rather than a local path."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def file_format(name: str, shown: str) -> tuple[str, str | None]:
    """``("CSV", delimiter)`` (None: sniffed) or ``("Parquet", None)`` from a file's name."""
    name = name.rsplit("/", 1)[-1].lower()
    gzipped = name.endswith(".gz")
    stem = name[:-3] if gzipped else name
    suffix = "." + stem.rsplit(".", 1)[-1] if "." in stem else ""
    if suffix in CSV_SUFFIXES:
        return "CSV", CSV_SUFFIXES[suffix]
    if suffix in PARQUET_SUFFIXES and not gzipped:
        return "Parquet", None
    raise DataError(f"Cannot read '{shown}': its extension is not a supported one ({SUPPORTED}).")


# ----------------------------------------------------------------------------- locations


def _filesystem_of(filesystem: Any) -> pafs.FileSystem:
    """A pyarrow file system, or an fsspec one wrapped for pyarrow."""
    if isinstance(filesystem, pafs.FileSystem):
        return filesystem
    if type(filesystem).__module__.startswith("fsspec") or hasattr(filesystem, "protocol"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
    raise DataTypeError(f"filesystem must be a pyarrow.fs.FileSystem or an fsspec file system, "
                        f"not {type(filesystem).__name__}.")


def _s3_defaults(options: dict) -> dict:
    """S3 settings the AWS tools read from the environment and pyarrow does not: the endpoint
    (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, for S3-compatible stores such as MinIO)
    and the region (``AWS_REGION`` or ``AWS_DEFAULT_REGION``)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    out = dict(options)
    if endpoint and "endpoint_override" not in out:
        out["endpoint_override"] = endpoint
    if region and "region" not in out:
        out["region"] = region
    return out


def resolve_location(path: Any, filesystem: Any = None,
                     storage_options: dict | None = None) -> tuple[pafs.FileSystem, str, str]:
    """``(file system, path on it, the path as messages show it)``.

    A local path becomes absolute; an address (``s3://bucket/key``) is opened with
    ``pyarrow.fs.FileSystem.from_uri`` (settings in its query string,
    ``?endpoint_override=...``), or with ``storage_options`` as the keyword arguments of the
    scheme's pyarrow file system; ``filesystem`` reads ``path`` on that file system.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DataTypeError(f"path must be a str or a path, not {type(path).__name__}.")
    text = os.fspath(path)
    if filesystem is not None:
        if is_uri(text):
            raise DataError(f"'{text}' is an address, and filesystem= is given too: pass the "
                            "path on that file system (bucket/key), without the scheme.")
        fs = _filesystem_of(filesystem)
        return fs, text.rstrip("/") or text, f"{text} (on {fs.type_name})"
    if not is_uri(text):
        if text.startswith("file://"):
            text = text[len("file://"):]
        shown = os.path.abspath(text)
        return pafs.LocalFileSystem(), shown, shown
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    options = dict(storage_options or {})
    if scheme in ("s3", "s3a") and "?" not in rest:
        options = _s3_defaults(options)
    try:
        if options:
            if "?" in rest:
                raise DataError(f"'{text}' has settings in its query string and "
                                "storage_options are given too; give them in one place.")
            kind = _FILESYSTEMS.get("s3" if scheme == "s3a" else scheme)
            if kind is None:
                raise DataError(f"storage_options apply to {', '.join(sorted(_FILESYSTEMS))}:// "
                                f"addresses, not {scheme}://; pass filesystem= instead.")
            fs = getattr(pafs, kind)(**options)
            return fs, rest.rstrip("/"), text
        fs, inner = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError, TypeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"Cannot open '{text}': {error_reason(exc)}. fedgrain reads local paths and the "
            "addresses pyarrow knows (s3://, gs://, hdfs://, abfs://); for another, pass "
            "filesystem= (a pyarrow or fsspec file system) and the path on it.") from None
    return fs, inner, text.split("?", 1)[0]


# ----------------------------------------------------------------------------- filters

_COMPARE = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__",
            ast.Gt: "__gt__", ast.GtE: "__ge__"}


def _literal(node: ast.AST, text: str):
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise DataError(f"filter {text!r}: compare columns with numbers, 'quoted' text, True, "
                        "False or [lists] of them.") from None
    return value


def _operand(node: ast.AST, text: str):
    if isinstance(node, ast.Name):
        return pc.field(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == "field" and len(node.args) == 1 and not node.keywords:
        return pc.field(_literal(node.args[0], text))  # field('a name with spaces')
    return pc.scalar(_literal(node, text))


def _expression(node: ast.AST, text: str) -> pc.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [_expression(v, text) for v in node.values]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(node.op, ast.And) else (out | p)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_expression(node.operand, text)
    if isinstance(node, ast.Compare):
        out = None
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, (ast.In, ast.NotIn)):
                values = _literal(right, text)
                if not isinstance(values, (list, tuple, set)):
                    raise DataError(f"filter {text!r}: 'in' takes a [list] of values.")
                term = _operand(left, text).isin(list(values))
                term = ~term if isinstance(op, ast.NotIn) else term
            elif type(op) in _COMPARE:
                term = getattr(_operand(left, text), _COMPARE[type(op)])(_operand(right, text))
            else:
                raise DataError(f"filter {text!r}: use ==, !=, <, <=, >, >=, in and not in.")
            out = term if out is None else out & term
            left = right
        return out
    raise DataError(f"filter {text!r}: write comparisons of columns with values joined by "
                    "and, or, not (e.g. \"year >= 2020 and region in ['north', 'south']\").")


def parse_filter(filter: Any) -> pc.Expression | None:
    """A row filter as a pyarrow expression.

    ``filter`` is a ``pyarrow.compute.Expression`` (``pc.field("year") >= 2020``), a list of
    ``(column, op, value)`` tuples as ``pyarrow.parquet`` takes them (a list of such lists
    for "or"), or text: comparisons of columns with values joined by ``and``, ``or`` and
    ``not``, such as ``"year >= 2020 and region in ['north', 'south']"`` (``field('a b')``
    names a column whose name is not a Python name).
    """
    if filter is None or isinstance(filter, pc.Expression):
        return filter
    if isinstance(filter, (list, tuple)):
        try:
            return pa_parquet.filters_to_expression(filter)
        except (TypeError, ValueError) as exc:
            raise DataError(f"filter {filter!r}: {error_reason(exc)}; give (column, op, value) "
                            "tuples.") from None
    if not isinstance(filter, str):
        raise DataTypeError(f"filter must be text, a pyarrow expression or a list of (column, "
                            f"op, value) tuples, not {type(filter).__name__}.")
    try:
        tree = ast.parse(filter.strip(), mode="eval")
    except SyntaxError:
        raise DataError(f"filter {filter!r} is not an expression; write e.g. \"year >= 2020 "
                        "and region == 'north'\".") from None
    return _expression(tree.body, filter)


# ----------------------------------------------------------------------------- the source


class DatasetSource:
    """CSV or Parquet data, wherever they are, as batches of rows.

    A file, a folder of files (searched recursively, read in name order; names starting with
    ``.`` or ``_`` are skipped) or a Hive-partitioned folder (``region=north/year=2020/...``:
    each ``key=value`` folder becomes a column, typed int, float or text by what all its values
    parse as), on this machine or at an address such as ``s3://bucket/path``. The files must
    hold one table: the same columns, with types that unify (an integer column in one file and
    a float column in another are read as floats).

    Parameters
    ----------
    path : str or path-like
        A local path, an address (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, read with
        ``pyarrow.fs.FileSystem.from_uri``; for S3, the credentials, ``AWS_REGION`` and the
        endpoint ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` come from the environment as for
        the AWS tools), or, with ``filesystem``, the path on that file system.
    batch_rows : int
        Rows per batch (a file's last batch may be shorter).
    columns : list of str, optional
        Read only these columns (the features and the target); the others are never read.
    filter : str, pyarrow expression or list of tuples, optional
        Keep only the rows where it holds (:func:`parse_filter`): ``"year >= 2020"``. Filters on
        partition columns skip whole files unread.
    filesystem : pyarrow.fs.FileSystem or fsspec file system, optional
        Read ``path`` on it (``pyarrow.fs.SubTreeFileSystem``, an ``S3FileSystem`` with its own
        settings, ``fsspec.filesystem("memory")``, ...).
    storage_options : dict, optional
        Keyword arguments of the pyarrow file system of the address's scheme
        (``{"endpoint_override": "http://127.0.0.1:9000", "access_key": ...}`` for S3).
    target : str, optional
        The target column, given when the rows are streamed for a fit (the estimators give
        it). Then CSV columns of whole numbers other than it are read as floats: a ``2.5``
        deep in a file would otherwise fail, since pyarrow fixes a CSV column's type from its
        first rows. The target's integer labels stay integers.

    Examples
    --------
    >>> import os, tempfile
    >>> import pandas as pd
    >>> folder = tempfile.mkdtemp()
    >>> for i in range(3):
    ...     pd.DataFrame({"x": [1.0 * i] * 4, "y": [0, 1, 2, 1]}).to_parquet(
    ...         os.path.join(folder, f"part-{i}.parquet"))
    >>> source = DatasetSource(folder, batch_rows=3)
    >>> source.n_rows, source.columns
    (12, ['x', 'y'])
    >>> [(start, len(frame)) for start, frame in source.frames()]
    [(0, 3), (3, 1), (4, 3), (7, 1), (8, 3), (11, 1)]
    >>> DatasetSource(folder, filter="x >= 1").n_rows
    8
    """

    def __init__(self, path: str | os.PathLike, batch_rows: int = BATCH_ROWS,
                 columns: list[str] | None = None, *, filter: Any = None,
                 filesystem: Any = None, storage_options: dict | None = None,
                 target: str | None = None):
        self._given = {"path": path, "batch_rows": batch_rows, "columns": columns,
                       "filter": filter, "filesystem": filesystem,
                       "storage_options": storage_options}
        self.path = path
        self.batch_rows = int(batch_rows)
        if self.batch_rows < 1:
            raise DataError(f"batch_rows must be at least 1; got {batch_rows}.")
        self.target = target
        fs, where, self.shown = resolve_location(path, filesystem, storage_options)
        self.filesystem = fs
        self._prefix = (self.shown.split("://", 1)[0] + "://") if is_uri(self.shown) else ""
        folder, paths = self._find_files(where)
        self.format, fmt = self._file_format(paths)
        partitioning = ds.HivePartitioning.discover(infer_dictionary=False) if folder else None
        base = self._open(paths, fmt, partitioning, folder, None)
        self._partition_order = base.partitioning.schema.names if folder else []
        schema, parts = self._schema(base)
        self._dataset = self._open(paths, fmt, ds.partitioning(parts, flavor="hive")
                                   if len(parts) else None, folder,
                                   pa.schema([*schema, *parts]))
        names = list(self._dataset.schema.names)
        self.partition_columns = list(parts.names)
        self.filter = parse_filter(filter)
        self._check_filter(names)
        if columns is not None:
            wanted = list(dict.fromkeys([columns] if isinstance(columns, str) else columns))
            if not all(isinstance(c, str) for c in wanted):
                raise DataTypeError(f"columns must be a list of column names; got {columns!r}.")
            missing = [c for c in wanted if c not in names]
            if missing:
                raise DataError(f"'{self.shown}' has no column(s) {quote(missing)}; "
                                f"{did_you_mean(missing[0], names)}")
            names = wanted
        self.columns: list[str] = names
        self._fragments = list(self._dataset.get_fragments(filter=self.filter)
                               if self.filter is not None else self._dataset.get_fragments())
        self.files = [self._shown_file(f.path) for f in self._fragments]

    # ---- finding and checking the files -----------------------------------------------------
    def _shown_file(self, path: str) -> str:
        return f"{self._prefix}{path}" if self._prefix else path

    def _find_files(self, where: str) -> tuple[str | None, list[str]]:
        """``(the folder or None, the data files in name order)``."""
        try:
            info = self.filesystem.get_file_info(where)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"Could not reach '{self.shown}': {error_reason(exc)}.") from None
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"The file '{self.shown}' does not exist; check the path.")
        if info.type != pafs.FileType.Directory:
            file_format(info.path, self.shown)  # a known extension, or the error
            if info.size == 0:
                raise DataError(f"The file '{self.shown}' is empty.")
            return None, [info.path]
        selector = pafs.FileSelector(where, recursive=True)
        found = []
        for f in self.filesystem.get_file_info(selector):
            relative = f.path[len(where):].lstrip("/").split("/")
            if f.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in relative):
                continue
            found.append(f)
        data = []
        for f in found:
            try:
                file_format(f.path, f.path)
            except DataError:
                continue
            if f.size == 0:
                raise DataError(f"The file '{self._shown_file(f.path)}' is empty.")
            data.append(f.path)
        if not data:
            held = f"; it holds {quote([f.base_name for f in found][:3])}" if found else ""
            raise DataError(f"The folder '{self.shown}' holds no data files ({SUPPORTED}){held}; "
                            "check the path.")
        return where, sorted(data)

    def _file_format(self, paths: list[str]) -> tuple[str, ds.FileFormat]:
        kinds = {file_format(p, p) for p in paths}
        if len(kinds) > 1:
            raise DataError(f"'{self.shown}' mixes kinds of files (Parquet, CSV with commas, "
                            "CSV with tabs: by their extensions); give a folder of one kind.")
        kind, delimiter = kinds.pop()
        if kind == "Parquet":
            # no pre-buffering of whole row groups on this machine: pages are read through a
            # small buffer, so memory does not grow with the files' row-group size
            local = isinstance(self.filesystem, pafs.LocalFileSystem)
            options = ds.ParquetFragmentScanOptions(pre_buffer=not local,
                                                    use_buffered_stream=local,
                                                    buffer_size=1 << 20)
            return kind, ds.ParquetFileFormat(default_fragment_scan_options=options)
        if delimiter is None:
            delimiter = self._sniff(paths[0])
        return kind, ds.CsvFileFormat(parse_options=pa_csv.ParseOptions(delimiter=delimiter))

    def _sniff(self, path: str) -> str:
        """A ``.txt`` file's delimiter: a tab when its first line holds one, else a comma."""
        try:
            with self.filesystem.open_input_stream(path, compression="detect") as stream:
                head = stream.read(65536).decode("utf-8", errors="replace")
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"Could not read '{self._shown_file(path)}' as CSV: "
                            f"{error_reason(exc)}.") from None
        return "\t" if "\t" in head.partition("\n")[0] else ","

    def _open(self, paths, fmt, partitioning, folder, schema) -> ds.FileSystemDataset:
        try:
            return ds.dataset(paths, schema=schema, format=fmt, filesystem=self.filesystem,
                              partitioning=partitioning, partition_base_dir=folder)
        except (pa.ArrowException, OSError) as exc:
            failed, reason = self.shown, error_reason(exc)
            for p in paths:  # the file pyarrow could not inspect, by name
                try:
                    fmt.inspect(p, filesystem=self.filesystem)
                except (pa.ArrowException, OSError) as inner:
                    failed, reason = self._shown_file(p), error_reason(inner)
                    break
            raise DataError(f"Could not read '{failed}' as {self.format}: {reason}.") from None

    def _schema(self, base: ds.FileSystemDataset) -> tuple[pa.Schema, pa.Schema]:
        """The files' unified schema (a pandas index saved with a frame left out) and the
        partition columns' schema, both checked."""
        schemas, keys = [], []
        names = None
        for frag in base.get_fragments():
            shown = self._shown_file(frag.path)
            try:
                schema = frag.physical_schema
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"Could not read '{shown}' as {self.format}: "
                                f"{error_reason(exc)}.") from None
            index = {i for i in (schema.pandas_metadata or {}).get("index_columns", [])
                     if isinstance(i, str)}
            schema = pa.schema([f for f in schema if f.name not in index])
            these = schema.names
            if names is None:
                names, first = these, shown
            elif sorted(these) != sorted(names):
                raise DataError(
                    f"The files of '{self.shown}' do not have the same columns: '{shown}' has "
                    f"{quote(these)}, '{first}' {quote(names)}; give files of one table.")
            schemas.append((shown, schema))
            keys.append((shown, ds.get_partition_keys(frag.partition_expression)))
        try:
            unified = pa.unify_schemas([s for _, s in schemas], promote_options="permissive")
        except (pa.ArrowException, TypeError):
            unified = None
        if unified is None:
            self._type_clash(schemas)
        unified = pa.schema([unified.field(n) for n in names]).remove_metadata()
        if self.format == "CSV" and self.target is not None:  # streamed: see ``target``
            unified = pa.schema([f.with_type(pa.float64()) if pa.types.is_integer(f.type)
                                 and f.name != self.target else f for f in unified])
        return unified, self._partition_schema(keys, names)

    def _type_clash(self, schemas) -> None:
        first_shown, first = schemas[0]
        for shown, schema in schemas[1:]:
            for f in schema:
                other = first.field(f.name).type
                try:
                    pa.unify_schemas([pa.schema([first.field(f.name)]), pa.schema([f])],
                                     promote_options="permissive")
                except (pa.ArrowException, TypeError):
                    raise DataError(
                        f"The column {f.name!r} is {f.type} in '{shown}' but {other} in "
                        f"'{first_shown}'; give the files one type per column.") from None
        raise DataError(f"The files of '{self.shown}' have types that do not unify.")

    def _partition_schema(self, keys: list, names: list[str]) -> pa.Schema:
        if not keys or not keys[0][1]:
            if any(k for _, k in keys):
                raise self._unlike(keys)
            return pa.schema([])
        order = [k for k in self._partition_order if k in keys[0][1]]
        if any(sorted(k) != sorted(order) for _, k in keys):
            raise self._unlike(keys)
        clash = [k for k in order if k in names]
        if clash:
            raise DataError(f"The partition folder name {clash[0]!r} in '{self.shown}' is also "
                            "a column of its files; rename one of them.")
        fields = []
        for k in order:
            values = [str(v[k]) for _, v in keys]
            for kind, cast in ((pa.int64(), int), (pa.float64(), float), (pa.string(), str)):
                try:
                    [cast(v) for v in values]
                except ValueError:
                    continue
                fields.append(pa.field(k, kind))
                break
        return pa.schema(fields)

    def _unlike(self, keys) -> DataError:
        first, k0 = keys[0]
        shown, k = next((s, k) for s, k in keys if sorted(k) != sorted(k0))
        return DataError(f"The files of '{self.shown}' are not partitioned alike: '{shown}' "
                         f"sits under {quote(list(k))}, '{first}' under {quote(list(k0))}.")

    def _check_filter(self, names: list[str]) -> None:
        if self.filter is None:
            return
        try:
            self._dataset.scanner(filter=self.filter, columns=[])
        except (pa.ArrowException, TypeError) as exc:
            absent = re.search(r"FieldRef\.Name\((.*?)\) in", str(exc))
            if absent:
                raise DataError(
                    f"The filter {self.filter} names {absent.group(1)!r}, which is not a "
                    f"column of '{self.shown}'; {did_you_mean(absent.group(1), names)}") from None
            raise DataError(f"The filter {self.filter} does not apply to '{self.shown}': "
                            f"{error_reason(exc)}; compare numbers with numbers and text with "
                            "'quoted' text.") from None

    # ---- reading ------------------------------------------------------------------------------
    def _scanner(self, frag, columns: list[str]) -> ds.Scanner:
        return ds.Scanner.from_fragment(
            frag, schema=self._dataset.schema, columns=list(columns), filter=self.filter,
            batch_size=self.batch_rows, batch_readahead=1, use_threads=True)

    def _failed(self, frag, exc: Exception) -> DataError:
        return DataError(f"Could not read '{self._shown_file(frag.path)}' as {self.format}: "
                         f"{error_reason(exc)}.")

    @cached_property
    def rows(self) -> list[int]:
        """The rows each file gives (after the filter); Parquet files count from their
        metadata, CSV files by reading them once."""
        out = []
        for frag in self._fragments:
            try:
                out.append(int(self._scanner(frag, []).count_rows()))
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None
        return out

    @property
    def n_rows(self) -> int:
        n = int(sum(self.rows))
        if n == 0:
            if self.filter is not None:
                raise DataError(f"No row of '{self.shown}' passes the filter {self.filter}.")
            raise DataError(f"'{self.shown}' is empty: it has column names but no data rows.")
        return n

    def _parquet_batches(self, frag, columns: list[str]):
        """A Parquet file's batches of ``columns``, read through a small buffer: memory holds a
        batch, not a row group (pyarrow's dataset scanner decodes whole row groups, which may
        hold millions of rows). Row groups whose statistics rule the filter out are skipped;
        partition columns are constants of the file; types are those of the whole data set."""
        schema = self._dataset.schema
        keys = ds.get_partition_keys(frag.partition_expression)
        need = list(columns)
        groups = None
        if self.filter is not None:
            text = str(self.filter)  # its columns are read too (a superset is harmless)
            need += [n for n in schema.names if n in text and n not in need]
            groups = [rg.id for rg in frag.subset(filter=self.filter, schema=schema).row_groups]
            if not groups:
                return
        read = [c for c in need if c not in keys]
        local = isinstance(self.filesystem, pafs.LocalFileSystem)
        pf = pa_parquet.ParquetFile(frag.path, filesystem=self.filesystem, pre_buffer=not local,
                                    buffer_size=1 << 20)
        types = pa.schema([schema.field(c) for c in read])
        for rb in pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=read):
            table = pa.Table.from_batches([rb]).select(read).cast(types)
            for k in need:
                if k in keys:
                    table = table.append_column(schema.field(k), pa.repeat(
                        pa.scalar(keys[k], schema.field(k).type), table.num_rows))
            if self.filter is not None:
                table = table.filter(self.filter)
            yield from table.select(columns).to_batches()

    def frames(self, columns: list[str] | None = None):
        """``(start, DataFrame)`` for every batch, in order: ``batch_rows`` rows each, a file's
        last batch shorter; ``columns`` (default: this source's) are read, nothing else."""
        columns = self.columns if columns is None else list(columns)
        start = 0
        for frag in self._fragments:
            pending: list = []
            held = 0
            batches = (self._parquet_batches(frag, columns) if self.format == "Parquet" else
                       self._scanner(frag, columns).to_batches())
            try:
                for rb in batches:
                    pending.append(rb)
                    held += rb.num_rows
                    while held >= self.batch_rows:
                        table = pa.Table.from_batches(pending)
                        yield start, self._pandas(table.slice(0, self.batch_rows))
                        start += self.batch_rows
                        rest = table.slice(self.batch_rows)
                        pending, held = rest.to_batches(), rest.num_rows
                if held:
                    yield start, self._pandas(pa.Table.from_batches(pending))
                    start += held
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None

    @staticmethod
    def _pandas(table: pa.Table) -> pd.DataFrame:
        frame = table.to_pandas(split_blocks=True)
        if len(frame) != table.num_rows:  # no column asked for
            frame = pd.DataFrame(index=pd.RangeIndex(table.num_rows))
        return frame

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The whole table (the rows the filter keeps, ``columns`` or this source's) as one
        pandas DataFrame; dictionary-encoded columns become categoricals."""
        columns = self.columns if columns is None else list(columns)
        tables = []
        for frag in self._fragments:
            try:
                tables.append(self._scanner(frag, columns).to_table())
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None
        if not tables:
            return self._pandas(self._dataset.schema.empty_table().select(columns))
        return pa.concat_tables(tables, promote_options="permissive").to_pandas(
            split_blocks=True)

    def with_target(self, target: str) -> DatasetSource:
        """This source with ``target`` read with its own type (see ``target``)."""
        if self.format != "CSV" or self.target == target:
            return self
        return type(self)(**self._given, target=target)

    def where(self, start: int, k: int) -> str:
        """For messages: the batch of ``k`` rows from row ``start``, by file and row."""
        kept = ", counting its rows that pass the filter" if self.filter is not None else ""
        for f, n in zip(self.files, self.rows, strict=True):
            if start < n:
                return (f"(row numbers count within the batch of rows {start:,} to "
                        f"{start + k - 1:,} of '{f}'{kept})")
            start -= n
        return f"(in '{self.shown}')"
