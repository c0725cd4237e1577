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
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import unquote

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pa_parquet

from fedgrain.exceptions import DataError, DataTypeError

from ._common import did_you_mean, quote

__all__ = ["BATCH_ROWS", "DatasetSource", "is_uri", "parse_filter", "redact"]

#: Rows read at a time (about 10 MB for 20 float columns).
BATCH_ROWS = 65_536

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": None}
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED = (".csv, .tsv, .txt (each also compressed: .gz, .bz2, .lz4, .zstd, e.g. .csv.gz), "
             ".parquet, .pq")

#: The compressions of CSV files read: those pyarrow's datasets detect by the extension
#: (lower case; not ``.zst``, which they read as plain text).
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".lz4": "lz4", ".zstd": "zstd"}
#: Other compressed or archive extensions: a data file in such a folder is refused, not skipped.
_UNREAD = (".br", ".xz", ".lzma", ".zip", ".7z", ".z", ".snappy", ".tar", ".tgz", ".rar",
           ".zst", ".lzo")

#: pyarrow's file systems by URI scheme, for ``storage_options``.
_FILESYSTEMS = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem",
                "abfs": "AzureFileSystem", "hdfs": "HadoopFileSystem"}


def error_reason(exc: Exception) -> str:
    """The first sentence of an exception's message (pyarrow's are long)."""
    # pyarrow's prefixes name the file again (messages name it already) or say nothing
    text = re.sub(r"^(Error creating dataset\.\s*)?(Could not open \w+ input source "
                  r"'[^']*': )?(Invalid: )?", "", str(exc).strip())
    first = (text.splitlines()[0].split(". ")[0] if text else type(exc).__name__).rstrip(".")
    if len(first) > 200:  # at a word boundary: an address or a port is never cut in two
        cut = first[:200].rsplit(" ", 1)[0]
        first = (cut if cut.strip() else first[:200]) + " ..."
    return redact(first)


_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"@?#]*@")
_QUERY = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"?#]*)\?[^\s'\"#]*")


def redact(text: str) -> str:
    """``text`` with the credentials of any address in it hidden, as messages, reports and
    ``--json`` output show it: ``s3://KEY:SECRET@bucket/d?secret_key=...`` becomes
    ``s3://***@bucket/d?***`` (the user part and the query string may hold keys)."""
    text = _USERINFO.sub(r"\1***@", str(text))
    return _QUERY.sub(r"\1?***", text)


def is_uri(path: Any) -> bool:
    """Whether ``path`` is an address with a scheme (``s3://...``) rather than a local path."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def file_format(name: str, shown: str) -> tuple[str, str | None]:
    """``("CSV", delimiter)`` (None: sniffed) or ``("Parquet", None)`` from a file's name."""
    name = name.rsplit("/", 1)[-1]
    codec = _CODECS.get(_suffix(name))  # as pyarrow detects it: in lower case
    name = name.lower()
    stem = name[:-len(_suffix(name))] if codec else name
    suffix = _suffix(stem)
    if suffix in CSV_SUFFIXES:
        if codec and not pa.Codec.is_available(codec):
            raise DataError(f"Cannot read '{shown}': this pyarrow was built without {codec}; "
                            "decompress the file or install a pyarrow that reads it.")
        return "CSV", CSV_SUFFIXES[suffix]
    if suffix in PARQUET_SUFFIXES and not codec:
        return "Parquet", None
    raise DataError(f"Cannot read '{shown}': its extension is not a supported one ({SUPPORTED}).")


def _compressed_data(name: str) -> bool:
    """Whether a file's name is a data file's name compressed in a way fedgrain does not read
    (``a.csv.xz``, ``b.parquet.gz``): in a folder it is refused, not skipped."""
    name = name.rsplit("/", 1)[-1].lower()
    suffix = _suffix(name)
    stem = _suffix(name[:-len(suffix)]) if suffix else ""
    return (suffix in _UNREAD or suffix in _CODECS) and \
        (stem in CSV_SUFFIXES or stem in PARQUET_SUFFIXES)


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
            raise DataError(f"'{redact(text)}' is an address, and filesystem= is given too: "
                            "pass the path on that file system (bucket/key), without the "
                            "scheme.")
        fs = _filesystem_of(filesystem)
        return fs, text.rstrip("/") or text, f"{text} (on {fs.type_name})"
    if not is_uri(text):
        if text.startswith("file://"):
            text = text[len("file://"):]
        shown = os.path.abspath(text)
        return pafs.LocalFileSystem(), shown, shown
    shown = redact(text)
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    options = dict(storage_options or {})
    if scheme in ("s3", "s3a") and "?" not in rest:
        options = _s3_defaults(options)
        user, at, after = rest.partition("@")
        if options and at and "/" not in user:  # s3://KEY:SECRET@bucket/...: the keys
            key, _, secret = user.partition(":")
            options.setdefault("access_key", unquote(key))
            options.setdefault("secret_key", unquote(secret))
            rest = after
    try:
        if options:
            if "?" in rest:
                raise DataError(f"'{shown}' has settings in its query string and "
                                "storage_options are given too; give them in one place.")
            kind = _FILESYSTEMS.get("s3" if scheme == "s3a" else scheme)
            if kind is None:
                raise DataError(f"storage_options apply to {', '.join(sorted(_FILESYSTEMS))}:// "
                                f"addresses, not {scheme}://; pass filesystem= instead.")
            fs = getattr(pafs, kind)(**options)
            return fs, rest.rstrip("/"), shown
        fs, inner = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError, TypeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"Cannot open '{shown}': {error_reason(exc)}. fedgrain reads local paths and the "
            "addresses pyarrow knows (s3://, gs://, hdfs://, abfs://); for another, pass "
            "filesystem= (a pyarrow or fsspec file system) and the path on it.") from None
    return fs, inner, redact(text.split("?", 1)[0])


# ----------------------------------------------------------------------------- filters

_COMPARE = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__",
            ast.Gt: "__gt__", ast.GtE: "__ge__"}


#: What converting a filter's literal may raise (too deep, too large, of no Arrow type).
_LITERAL_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, MemoryError,
                   pa.ArrowException)


def _bad_literal(text: str) -> DataError:
    return DataError(f"filter {text!r}: compare columns with numbers (within 64 bits), 'quoted' "
                     "text, True, False or [lists] of values of one kind.")


def _literal(node: ast.AST, text: str):
    try:
        value = ast.literal_eval(node)
    except _LITERAL_ERRORS:
        raise _bad_literal(text) from None
    kinds = (bool, int, float, str)
    values = value if isinstance(value, (list, tuple, set)) else [value]
    if any(v is None for v in values):
        raise DataError(f"filter {text!r}: None is no value to compare with (a comparison with a "
                        "missing value holds nowhere); test for missing values with "
                        "is_null(column) or is_not_null(column).")
    if not all(isinstance(v, kinds) for v in values):
        raise _bad_literal(text)
    return value


def _scalar(value, text: str) -> pc.Expression:
    try:
        return pc.scalar(value)
    except _LITERAL_ERRORS:
        raise _bad_literal(text) from None


def _operand(node: ast.AST, text: str):
    if isinstance(node, ast.Name):
        return pc.field(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == "field" and len(node.args) == 1 and not node.keywords:
        return pc.field(_literal(node.args[0], text))  # field('a name with spaces')
    return _scalar(_literal(node, text), text)


def _expression(node: ast.AST, text: str) -> pc.Expression:
    if isinstance(node, ast.Name):  # a boolean column, bare: "flagged", "not flagged"
        return pc.field(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id in ("is_null", "is_not_null") and len(node.args) == 1 and \
            not node.keywords and isinstance(node.args[0], (ast.Name, ast.Call)):
        column = _operand(node.args[0], text)
        if not isinstance(column, pc.Expression) or column.equals(pc.scalar(None)):
            raise _bad_literal(text)
        return column.is_null() if node.func.id == "is_null" else column.is_valid()
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
                try:
                    term = _operand(left, text).isin(pa.array(list(values)))
                except _LITERAL_ERRORS:
                    raise _bad_literal(text) from None
                term = ~term if isinstance(op, ast.NotIn) else term
            elif type(op) in _COMPARE:
                term = getattr(_operand(left, text), _COMPARE[type(op)])(_operand(right, text))
            else:
                raise DataError(f"filter {text!r}: use ==, !=, <, <=, >, >=, in and not in.")
            out = term if out is None else out & term
            left = right
        return out
    raise DataError(f"filter {text!r}: write comparisons of columns with values, boolean "
                    "columns, is_null(column) or is_not_null(column), joined by and, or, not "
                    "(e.g. \"year >= 2020 and region in ['north', 'south']\").")


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
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise DataError(f"filter {filter!r} is not an expression; write e.g. \"year >= 2020 "
                        "and region == 'north'\".") from None
    try:
        return _expression(tree.body, filter)
    except RecursionError:
        raise DataError(f"filter {filter!r} is nested too deeply.") from None


# ----------------------------------------------------------------------------- partitions

# Partition values as pyarrow parses them (no ``1_000``, ``nan``, ``inf``, spaces, ``+``).
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _partition_type(values: list) -> pa.DataType:
    """A partition column's type: int64 when every value (null folders,
    ``__HIVE_DEFAULT_PARTITION__``, left out) is a whole number within 64 bits, float64 when
    every one is a decimal number, else text. Numbers lose leading zeros (``zip=007`` reads
    as 7): name such folders with a letter to keep them text."""
    given = [str(v) for v in values if v is not None]
    if not given:
        return pa.string()
    if all(_INT.fullmatch(v) for v in given) and \
            all(-(2 ** 63) <= int(v) < 2 ** 63 for v in given):
        return pa.int64()
    if all(_FLOAT.fullmatch(v) for v in given):
        return pa.float64()
    return pa.string()


# ----------------------------------------------------------------------------- CSV types

#: The types a CSV column widens through as later values need (pyarrow's inference order).
_WIDER = (pa.null(), pa.int64(), pa.float64(), pa.string())


def _widen(column: pa.Array, kind: pa.DataType) -> pa.DataType:
    """The narrowest type from ``kind`` on that reads every value of ``column`` (text)."""
    if kind in _WIDER:
        ladder = _WIDER[_WIDER.index(kind):]
    else:  # booleans, dates, times: as they are, or text
        ladder = (kind, pa.string())
    for candidate in ladder:
        if candidate == pa.null():
            continue
        if candidate == pa.string() or pa.types.is_string(candidate) or \
                pa.types.is_large_string(candidate) or pa.types.is_binary(candidate):
            return candidate
        try:
            pc.cast(column, candidate)
        except (pa.ArrowException, ValueError, TypeError):
            continue
        return candidate
    return pa.string()


# ----------------------------------------------------------------------------- the source


class DatasetSource:
    """CSV or Parquet data, wherever they are, as batches of rows.

    A file, a folder of files (searched recursively, read in name order; names starting with
    ``.`` or ``_`` are skipped) or a Hive-partitioned folder (``region=north/year=2020/...``:
    each ``key=value`` folder becomes a column, typed int, float or text by what all its values
    parse as: strictly, as pyarrow writes numbers, so ``1_000`` or ``nan`` is text; a
    ``__HIVE_DEFAULT_PARTITION__`` folder is a missing value; numbers lose leading zeros),
    on this machine or at an address such as ``s3://bucket/path``. The files must
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
        it). Then CSV columns of whole numbers other than it are read as floats; the target's
        integer labels stay integers. (Every CSV column is typed by all its values, as
        ``pyarrow.csv.read_csv`` types it, streamed or not: see :meth:`read`, :meth:`frames`.)

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
        self._paths, self._folder, self._parts = paths, folder, parts
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
            if not wanted:
                raise DataError(f"columns=[] reads no column of '{self.shown}'; name at least "
                                "one, or leave columns out to read them all.")
            missing = [c for c in wanted if c not in names]
            if missing:
                raise DataError(f"'{self.shown}' has no column(s) {quote(missing)}; "
                                f"{did_you_mean(missing[0], names)}")
            names = wanted
        self.columns: list[str] = names
        try:
            self._fragments = list(self._dataset.get_fragments(filter=self.filter)
                                   if self.filter is not None else
                                   self._dataset.get_fragments())
        except (pa.ArrowException, TypeError):  # CSV typed by their first rows: every file
            self._fragments = list(self._dataset.get_fragments())
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
                file_format(f.path, self._shown_file(f.path))
            except DataError as exc:
                if _compressed_data(f.path):
                    raise DataError(f"{exc} Decompress it, or move it out of the folder "
                                    f"'{self.shown}'.") from None
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
        self._parse_options = pa_csv.ParseOptions(delimiter=delimiter)
        return kind, ds.CsvFileFormat(parse_options=self._parse_options)

    def _sniff(self, path: str) -> str:
        """A ``.txt`` file's delimiter: a tab when its first line holds one, else a comma."""
        try:
            with self._csv_stream(path) as stream:
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
        return self._target_floats(unified), self._partition_schema(keys, names)

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
        return pa.schema([pa.field(k, _partition_type([v[k] for _, v in keys])) for k in order])

    def _unlike(self, keys) -> DataError:
        first, k0 = keys[0]
        shown, k = next((s, k) for s, k in keys if sorted(k) != sorted(k0))
        def under(k):
            return f"under {quote(list(k))}" if k else "under no key=value folder"

        return DataError(f"The files of '{self.shown}' are not partitioned alike: '{shown}' "
                         f"sits {under(k)}, '{first}' {under(k0)}.")

    def _check_filter(self, names: list[str], schema: pa.Schema | None = None) -> None:
        """The filter's columns exist and its comparisons fit their types (for CSV files, the
        types of whole files, known once they are typed: ``schema``)."""
        if self.filter is None:
            return
        try:
            if schema is None:
                self._dataset.scanner(filter=self.filter, columns=[])
            (self._dataset.schema if schema is None else schema).empty_table().filter(
                self.filter)  # a bool, of these types
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            absent = re.search(r"FieldRef\.Name\((.*?)\) in", str(exc))
            if absent:
                raise DataError(
                    f"The filter {self.filter} names {absent.group(1)!r}, which is not a "
                    f"column of '{self.shown}'; {did_you_mean(absent.group(1), names)}") from None
            if self.format == "CSV" and schema is None:
                return  # typed by the first rows only: checked on the files' whole types
            raise DataError(f"The filter {self.filter} does not apply to '{self.shown}': "
                            f"{error_reason(exc)}; compare numbers with numbers and text with "
                            "'quoted' text.") from None

    # ---- reading ------------------------------------------------------------------------------
    def _scanner(self, frag, columns: list[str], schema: pa.Schema | None = None) -> ds.Scanner:
        return ds.Scanner.from_fragment(
            frag, schema=self._dataset.schema if schema is None else schema,
            columns=list(columns), filter=self.filter, batch_size=self.batch_rows,
            batch_readahead=1, use_threads=True)

    def _failed(self, frag, exc: Exception) -> DataError:
        return DataError(f"Could not read '{self._shown_file(frag.path)}' as {self.format}: "
                         f"{error_reason(exc)}.")

    def _filter_columns(self) -> list[str]:
        """The columns the filter names (a superset is harmless: they are read, then dropped)."""
        if self.filter is None:
            return []
        text = str(self.filter)
        return [n for n in self._dataset.schema.names if n in text]

    # ---- CSV: the types of whole files ----------------------------------------------------------
    def _csv_stream(self, path: str):
        return self.filesystem.open_input_stream(path, compression=_CODECS.get(_suffix(
            path.rsplit("/", 1)[-1])))

    def _csv_types(self, frag) -> pa.Schema:
        """A CSV file's column types as ``pyarrow.csv.read_csv`` gives them for the whole file,
        found in one pass that holds a block at a time: pyarrow's streaming reader fixes a
        column's type from the file's first block, so a ``2.5`` or a word deep in a column of
        whole numbers would fail to read. The file is read as text and each column widened
        (null, int64, float64, text) as far as its values need."""
        first = frag.physical_schema
        text = {f.name: pa.string() for f in first}
        options = pa_csv.ConvertOptions(column_types=text, strings_can_be_null=True)
        kinds = {f.name: f.type for f in first}
        with self._csv_stream(frag.path) as stream:
            reader = pa_csv.open_csv(stream, parse_options=self._parse_options,
                                     convert_options=options)
            for rb in reader:
                for name in first.names:
                    column = rb.column(name)
                    if column.null_count < len(column):
                        kinds[name] = _widen(column, kinds[name])
        return pa.schema([pa.field(n, kinds[n]) for n in first.names])

    @cached_property
    def _stream(self) -> tuple[pa.Schema, list]:
        """``(schema, fragments)`` to stream: for Parquet this source's; for CSV with each
        column typed as a whole read (:meth:`read`) types it, so that batch-by-batch reads
        agree with whole ones and never fail on a late value."""
        if self.format != "CSV":
            return self._dataset.schema, self._fragments
        schemas = []
        for frag in self._fragments:
            try:
                schemas.append((self._shown_file(frag.path), self._csv_types(frag)))
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None
        if not schemas:
            return self._dataset.schema, self._fragments
        try:
            unified = pa.unify_schemas([s for _, s in schemas], promote_options="permissive")
        except (pa.ArrowException, TypeError):
            self._type_clash(schemas)
        names = [n for n in self._dataset.schema.names if n not in self._parts.names]
        unified = self._target_floats(pa.schema([unified.field(n) for n in names]))
        fmt = ds.CsvFileFormat(parse_options=self._parse_options,
                               convert_options=pa_csv.ConvertOptions(
                                   column_types={f.name: f.type for f in unified}))
        dataset = self._open(self._paths, fmt, ds.partitioning(self._parts, flavor="hive")
                             if len(self._parts) else None, self._folder,
                             pa.schema([*unified, *self._parts]))
        self._check_filter(dataset.schema.names, dataset.schema)
        fragments = list(dataset.get_fragments(filter=self.filter)
                         if self.filter is not None else dataset.get_fragments())
        return dataset.schema, fragments

    def _target_floats(self, schema: pa.Schema) -> pa.Schema:
        if self.format != "CSV" or self.target is None:  # streamed for a fit: see ``target``
            return schema
        return pa.schema([f.with_type(pa.float64()) if pa.types.is_integer(f.type)
                          and f.name != self.target else f for f in schema])

    def _read_csv(self, frag, columns: list[str]) -> pa.Table:
        """A CSV file read whole with ``pyarrow.csv.read_csv`` (which types each column by all
        its values), its partition columns added and the filter applied."""
        schema = self._dataset.schema
        keys = ds.get_partition_keys(frag.partition_expression)
        need = list(dict.fromkeys([*columns, *self._filter_columns()]))
        read = [c for c in need if c not in keys] or schema.names[:1]
        options = pa_csv.ConvertOptions(include_columns=read)
        try:
            with self._csv_stream(frag.path) as stream:
                table = pa_csv.read_csv(stream, parse_options=self._parse_options,
                                        convert_options=options)
        except (pa.ArrowException, OSError) as exc:
            raise self._failed(frag, exc) from None
        for k in need:
            if k in keys:
                table = table.append_column(schema.field(k), pa.repeat(
                    pa.scalar(keys[k], schema.field(k).type), table.num_rows))
        if self.filter is not None:
            try:
                table = table.filter(self.filter)
            except (pa.ArrowException, TypeError) as exc:
                raise DataError(
                    f"The filter {self.filter} does not apply to "
                    f"'{self._shown_file(frag.path)}': {error_reason(exc)}; compare numbers "
                    "with numbers and text with 'quoted' text.") from None
        return table.select(columns)

    @cached_property
    def rows(self) -> list[int]:
        """The rows each file gives (after the filter). Parquet files count from their
        metadata, or with a filter by reading the filter's columns batch by batch; CSV files
        by reading them once."""
        schema, fragments = self._stream
        out = []
        for frag in fragments:
            try:
                if self.filter is None:
                    out.append(int(self._scanner(frag, [], schema).count_rows()))
                else:  # batch by batch: pyarrow's count decodes whole row groups
                    out.append(sum(t.num_rows for t in self._batches(frag, [], schema)))
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None
        return out

    def file_states(self) -> list[tuple[str, int | None, int | None]]:
        """Each file as it is now, in reading order: ``(name as shown, size in bytes, time of
        last change in ns)`` (None where the file system does not say), without reading rows.
        What ``fedgrain stream`` records of the files it fed, to recognise them later."""
        out = []
        for frag in self._fragments:
            try:
                info = self.filesystem.get_file_info(frag.path)
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None
            mtime = info.mtime_ns
            out.append((self._shown_file(frag.path), None if info.size is None else
                        int(info.size), None if mtime is None else int(mtime)))
        return out

    @property
    def n_rows(self) -> int:
        n = int(sum(self.rows))
        if n == 0:
            if self.filter is not None:
                raise DataError(f"No row of '{self.shown}' passes the filter {self.filter}.")
            raise DataError(f"'{self.shown}' is empty: it has column names but no data rows.")
        return n

    def _batches(self, frag, columns: list[str], schema: pa.Schema):
        """A file's batches (tables) of ``columns`` after the filter."""
        if self.format == "Parquet":
            yield from self._parquet_batches(frag, columns)
            return
        for rb in self._scanner(frag, columns, schema).to_batches():
            yield pa.Table.from_batches([rb])

    def _parquet_batches(self, frag, columns: list[str]):
        """A Parquet file's batches of ``columns``, read through a small buffer: memory holds a
        batch, not a row group (pyarrow's dataset scanner decodes whole row groups, which may
        hold millions of rows). Row groups whose statistics rule the filter out are skipped;
        partition columns are constants of the file; types are those of the whole data set."""
        schema = self._dataset.schema
        keys = ds.get_partition_keys(frag.partition_expression)
        need = list(dict.fromkeys([*columns, *self._filter_columns()]))
        groups = None
        if self.filter is not None:
            groups = [rg.id for rg in frag.subset(filter=self.filter, schema=schema).row_groups]
            if not groups:
                return
        read = [c for c in need if c not in keys]
        local = isinstance(self.filesystem, pafs.LocalFileSystem)
        pf = pa_parquet.ParquetFile(frag.path, filesystem=self.filesystem, pre_buffer=not local,
                                    buffer_size=1 << 20)
        types = pa.schema([schema.field(c) for c in read])
        if not read:  # no column to read: the row counts of the row groups
            meta = pf.metadata
            for g in range(meta.num_row_groups) if groups is None else groups:
                n = meta.row_group(g).num_rows
                yield pa.table({"_": pa.nulls(n)}).select([])
            return
        for rb in pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=read):
            table = pa.Table.from_batches([rb]).select(read).cast(types)
            for k in need:
                if k in keys:
                    table = table.append_column(schema.field(k), pa.repeat(
                        pa.scalar(keys[k], schema.field(k).type), table.num_rows))
            if self.filter is not None:
                table = table.filter(self.filter)
            yield table.select(columns)

    def row_groups(self) -> list[RowGroup]:
        """Every row group of this source's Parquet files, in reading order (file by file), as
        :class:`RowGroup` pieces a worker can read by itself (:class:`RowGroupReader`).

        Only for Parquet files without a row filter (a filter's rows are not known from the
        files' metadata); reads each file's footer once, so memory is a few numbers a row
        group, whatever the number of rows.
        """
        if self.format != "Parquet" or self.filter is not None:
            raise DataError(f"'{self.shown}' is not read by row groups: only Parquet files "
                            "without a filter are; leave out the filter, or divide by rows.")
        out: list[RowGroup] = []
        for frag in self._fragments:
            keys = ds.get_partition_keys(frag.partition_expression)
            try:
                meta = pa_parquet.ParquetFile(frag.path, filesystem=self.filesystem).metadata
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    out.append(RowGroup(frag.path, self._shown_file(frag.path), g, n,
                                        tuple(sorted(keys.items()))))
        return out

    def row_group_reader(self) -> RowGroupReader:
        """What a worker needs to read :meth:`row_groups` pieces itself (picklable)."""
        return RowGroupReader(self.filesystem, self._dataset.schema, self.batch_rows)

    def frames(self, columns: list[str] | None = None, files: Any = None):
        """``(start, DataFrame)`` for every batch, in order: ``batch_rows`` rows each, a file's
        last batch shorter; ``columns`` (default: this source's) are read, nothing else;
        ``files`` (names as in :attr:`files`), only those files' batches (the same batches as
        in the whole read: a batch never spans two files; ``start`` counts their rows only)."""
        columns = self.columns if columns is None else list(columns)
        schema, fragments = self._stream
        if files is not None:
            wanted = set(files)
            fragments = [f for f in fragments if self._shown_file(f.path) in wanted]
        start = 0
        for frag in fragments:
            pending: list = []
            held = 0
            try:
                for part in self._batches(frag, columns, schema):
                    if part.num_rows == 0:
                        continue
                    pending.append(part)
                    held += part.num_rows
                    while held >= self.batch_rows:
                        table = pa.concat_tables(pending)
                        yield start, self._pandas(table.slice(0, self.batch_rows))
                        start += self.batch_rows
                        rest = table.slice(self.batch_rows)
                        pending, held = [rest], rest.num_rows
                if held:
                    yield start, self._pandas(pa.concat_tables(pending))
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
        pandas DataFrame; dictionary-encoded columns become categoricals. CSV files are each
        read with ``pyarrow.csv.read_csv``, which types a column by all its values."""
        columns = self.columns if columns is None else list(columns)
        tables = []
        for frag in self._fragments:
            if self.format == "CSV":
                tables.append(self._read_csv(frag, columns))
                continue
            try:
                tables.append(self._scanner(frag, columns).to_table())
            except (pa.ArrowException, OSError) as exc:
                raise self._failed(frag, exc) from None
        if not tables:
            return self._pandas(self._dataset.schema.empty_table().select(columns))
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowException, TypeError):
            self._type_clash([(self._shown_file(f.path), t.schema)
                              for f, t in zip(self._fragments, tables, strict=True)])
        table = table.cast(self._target_floats(table.schema))
        return self._pandas(table)

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


@dataclass(frozen=True)
class RowGroup:
    """One row group of one Parquet file: where it is, its rows and its file's partition keys."""

    path: str
    shown: str
    index: int
    rows: int
    keys: tuple = ()

    def where(self, start: int, k: int) -> str:
        """For messages: ``k`` rows from ``start`` (counted within this row group)."""
        return (f"(row numbers count within the batch of rows {start:,} to {start + k - 1:,} "
                f"of row group {self.index} of '{self.shown}')")


@dataclass(frozen=True)
class RowGroupReader:
    """Reads :class:`RowGroup` pieces of a :class:`DatasetSource` in batches, on whichever
    process holds it (a worker): the types are the data set's, partition columns constants
    of the file, memory one batch (a 1 MB read buffer, as :meth:`DatasetSource.frames`)."""

    filesystem: Any
    schema: pa.Schema
    batch_rows: int

    def frames(self, piece: RowGroup, columns: list[str]):
        """``(start, DataFrame)`` of ``columns`` for the batches of one row group, ``start``
        counted within it."""
        keys = dict(piece.keys)
        read = [c for c in columns if c not in keys]
        local = isinstance(self.filesystem, pafs.LocalFileSystem)
        try:
            pf = pa_parquet.ParquetFile(piece.path, filesystem=self.filesystem,
                                        pre_buffer=not local, buffer_size=1 << 20)
            types = pa.schema([self.schema.field(c) for c in read])
            start = 0
            for rb in pf.iter_batches(batch_size=self.batch_rows, row_groups=[piece.index],
                                      columns=read):
                table = pa.Table.from_batches([rb]).select(read).cast(types)
                for k in columns:
                    if k in keys:
                        field = self.schema.field(k)
                        table = table.append_column(field, pa.repeat(
                            pa.scalar(keys[k], field.type), table.num_rows))
                yield start, DatasetSource._pandas(table.select(columns))
                start += table.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"Could not read row group {piece.index} of '{piece.shown}' as "
                            f"Parquet: {error_reason(exc)}.") from None
