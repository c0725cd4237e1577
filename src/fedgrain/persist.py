"""Save and load fitted models as a directory of JSON and ``.npz`` files, without pickle.

A saved model is a directory holding two files:

``model.json``
    A header for humans and machines: the file format and its version, the fedgrain version
    and UTC time that wrote it, the caller's metadata, a manifest of the arrays (dtype, shape
    and SHA-256 of each) and the SHA-256 checksums of ``arrays.npz`` and of the metadata.
``arrays.npz``
    The arrays, one ``.npy`` member each, written and read with pickling disabled, so loading
    a model never executes code.

Writing is atomic: the files are written and flushed to disk in a hidden sibling directory,
which is then renamed into place, so the model directory appears complete or not at all.
Loading verifies the format, its version and every checksum, and raises
:class:`~fedgrain.exceptions.ModelFileError` saying what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import zipfile
import zlib
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ._process import left_by_dead, leftovers, owner_tag
from ._version import __version__
from ._warnings import warn
from .exceptions import ModelFileError

__all__ = ["FORMAT", "FORMAT_VERSION", "read_model_dir", "write_model_dir"]

FORMAT = "fedgrain-model"
FORMAT_VERSION = 1

MODEL_JSON = "model.json"
ARRAYS_NPZ = "arrays.npz"

# Array names become zip member names; keep them to characters that are safe everywhere.
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# bool, integers, floats, complex, fixed-width strings, datetimes: never objects or records.
_ARRAY_KINDS = frozenset("biufcSUmM")
# A fixed timestamp for the zip members, so equal arrays give byte-identical files.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
#: model.json holds the description and small parameters; the arrays live in arrays.npz.
MAX_JSON_BYTES = 64 * 1024 * 1024
# What zipfile and numpy raise on a damaged or crafted archive.
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    ValueError,
    OSError,
    EOFError,
    RuntimeError,
    NotImplementedError,
)



def public_mode() -> int:
    """The mode a new file gets from the umask, ``0o666 & ~umask``: for files written under a
    private temporary name (``mkstemp`` makes them 0600) before they are renamed into place.
    The umask is read from ``/proc`` where it can be (setting it to read it would change it
    for every thread of the process for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask

def write_model_dir(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    overwrite: bool = False,
    key: str | bytes | None = None,
) -> Path:
    """Write a model directory holding ``model.json`` and ``arrays.npz``, atomically.

    Parameters
    ----------
    path : str or path-like
        The model directory to create. A missing parent directory is created.
    meta : dict
        JSON metadata made of plain Python values only: ``dict`` with ``str`` keys, ``list``,
        ``str``, ``int``, finite ``float``, ``bool`` and ``None``. Tuples and numpy scalars are
        refused, so that ``read_model_dir`` returns exactly what was written.
    arrays : mapping of str to numpy.ndarray
        The arrays to store. Names use letters, digits, ``_``, ``.`` and ``-``. Dtypes must be
        bool, numeric, fixed-width string or datetime; object arrays are refused.
    overwrite : bool, default=False
        Replace ``path`` if it is an existing fedgrain model directory or an empty directory.
        Any other directory is never replaced.
    key : str or bytes, optional
        Sign the model with this secret (HMAC-SHA256 over every byte of ``model.json``, whose
        checksums cover every byte of the arrays); by default the environment variable
        ``FEDGRAIN_MODEL_KEY`` when it is set. :func:`read_model_dir` with the same key then
        refuses any model that was not signed with it.

    Returns
    -------
    pathlib.Path
        The absolute path of the model directory.

    Raises
    ------
    TypeError
        If ``meta`` holds a value JSON cannot represent exactly, or an array is not a numpy
        array or has an object or structured dtype; the message names the key or array.
    ValueError
        If ``meta`` holds a NaN or infinite float, or an array name has other characters.
    FileExistsError
        If ``path`` exists and ``overwrite`` is false, or ``path`` is not a directory.
    ModelFileError
        If ``overwrite`` is true but ``path`` is a directory fedgrain did not write.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp()) / "model"
    >>> _ = write_model_dir(folder, {"n_features": 2}, {"coef": np.array([0.5, -1.0])})
    >>> read_model_dir(folder)[1]["coef"]
    array([ 0.5, -1. ])
    """
    target = Path(os.path.abspath(path))
    _check_contents(meta, arrays)
    _sweep(target)  # first: a killed replace's only copy goes back before target is judged
    _check_target(target, overwrite)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{owner_tag()}-{secrets.token_hex(8)}"
    try:  # made inside: an exit (SIGTERM) just after the mkdir still removes it
        staging.mkdir()
        _write_files(staging, meta, arrays, _key(key))
        _move_into_place(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        full = disk_full(exc, target, f"the model ({_size_of(arrays)})",
                         "the model at that path is unchanged" if target.exists() else
                         "nothing was written")
        if full is not None:
            raise full from None
        raise
    return target


def _size_of(arrays: Mapping[str, np.ndarray]) -> str:
    mb = sum(np.asarray(a).nbytes for a in arrays.values()) / 1e6
    return f"about {mb:,.1f} MB" if mb >= 0.1 else "under 0.1 MB"


def disk_full(exc: BaseException, out: Path, what: str, kept: str) -> BaseException | None:
    """A :class:`~fedgrain.exceptions.ResourceError` naming ``out`` when ``exc`` is a full
    disk or an exhausted quota (None otherwise): errno 28 alone names neither the path nor the
    fix."""
    import errno

    from .exceptions import ResourceError

    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    reason = "its disk is full" if exc.errno == errno.ENOSPC else "the disk quota is used up"
    return ResourceError(f"No room to write {what} to {out}: {reason}; {kept}. Free space there "
                         "or write to another disk.")


#: The signature of a signed model: HMAC-SHA256 of the bytes of its ``model.json`` (the
#: signature's own value blanked), the header's last member.
SIGNATURE = "HMAC-SHA256-BYTES"
#: The name of the signatures of fedgrain before 0.1.0 was released (over the parsed header):
#: refused with the way to sign the model again, not as an edit.
OLD_SIGNATURE = "HMAC-SHA256"
KEY_VARIABLE = "FEDGRAIN_MODEL_KEY"


def _key(key: str | bytes | None) -> bytes | None:
    """The signing key: the one given, else ``$FEDGRAIN_MODEL_KEY``, else None."""
    if key is None:
        key = os.environ.get(KEY_VARIABLE) or None
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes) or not key:
        raise TypeError("key must be a non-empty str or bytes.")
    return key


#: How a signature ends ``model.json`` (``json.dumps(indent=2)`` of the header, whose last
#: member it is): found in the raw bytes, so it is checked before anything is parsed.
_SIGNED_TAIL = re.compile(
    rb'\n  "signature": \{\n    "algorithm": "HMAC-SHA256-BYTES",\n'
    rb'    "value": "([0-9a-f]{64})"\n  \}\n\}\s*\Z')
_BLANK = b"0" * 64


def _signature(raw: bytes, key: bytes) -> tuple[re.Match | None, str]:
    """The signature found at the end of the raw ``model.json`` (None: none), and the one
    ``key`` gives: HMAC-SHA256 of the file's bytes with the signature's value blanked."""
    import hmac

    m = _SIGNED_TAIL.search(raw)
    blank = raw if m is None else raw[: m.start(1)] + _BLANK + raw[m.end(1):]
    return m, hmac.new(key, blank, hashlib.sha256).hexdigest()


def _sign(raw: bytes, key: bytes) -> bytes:
    """``model.json``'s bytes, written with a blank signature, with its value filled in."""
    m, value = _signature(raw, key)
    return raw[: m.start(1)] + value.encode("ascii") + raw[m.end(1):]


def _check_signature(root: Path, raw: bytes, key: bytes) -> None:
    """Refuse ``model.json`` unless its bytes carry the signature ``key`` gives; runs on the
    raw bytes, before any parser sees them (and the arrays are then checked against the
    signed checksums before they are parsed), so with a key no hostile file reaches the JSON
    or npz readers."""
    import hmac

    m, expected = _signature(raw, key)
    if m is None and f'"algorithm": "{OLD_SIGNATURE}"'.encode("ascii") in raw[-400:]:
        raise ModelFileError(
            f"{root} was signed by an earlier fedgrain, whose signatures covered the parsed "
            "header rather than the file's bytes: this version does not accept them. Load "
            "it without the key, check it, and save it again with the key.")
    if m is None:
        raise ModelFileError(
            f"{root} has no valid signature at the end of its model.json (it is unsigned, or "
            f"was changed after signing), and a signing key was given (key= or "
            f"${KEY_VARIABLE}): only models saved with that key are loaded. Save the model "
            "again with the key."
        )
    if not hmac.compare_digest(m[1], expected.encode("ascii")):
        raise ModelFileError(
            f"{root} was not signed with this key, or was changed after signing: refusing to "
            "load it. Check the key, or save the model again with it."
        )


def read_model_dir(path: str | os.PathLike[str], *,
                   key: str | bytes | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify a model directory written by :func:`write_model_dir`.

    Parameters
    ----------
    path : str or path-like
        The model directory.
    key : str or bytes, optional
        Refuse the model unless it was signed with this secret (by default
        ``$FEDGRAIN_MODEL_KEY`` when set); see :func:`write_model_dir`. Without a key, the
        checksums detect damage but not a deliberate edit whose author recomputed them.

    Returns
    -------
    meta : dict
        The metadata passed to :func:`write_model_dir`.
    arrays : dict of str to numpy.ndarray
        The arrays, with their dtypes and shapes.

    Raises
    ------
    ModelFileError
        If the directory or one of its files is missing, truncated, modified after saving, not
        a fedgrain model or written in a newer format. Nothing in the files is ever unpickled.
    """
    root = Path(path)
    raw_json, npz = _snapshot(root)
    try:
        secret = _key(key)
        if secret is not None and raw_json is not None:
            _check_signature(root, raw_json, secret)
        header = _read_header(root, raw_json)
        meta, manifest, checksums = _check_header(root / MODEL_JSON, header)
        if hashlib.sha256(_canonical_json(meta)).hexdigest() != checksums["meta_sha256"]:
            raise ModelFileError(
                f"The meta section of {root / MODEL_JSON} was edited after saving (its checksum "
                f"does not match); undo the edit or save the model again."
            )
        npz_file = root / ARRAYS_NPZ
        if npz is None:
            raise ModelFileError(
                f"{npz_file} is missing, so the model is incomplete; restore the file or save "
                f"the model again."
            )
        if _sha256_stream(npz) != checksums["arrays_npz_sha256"]:
            raise ModelFileError(
                f"{npz_file} was modified or truncated after saving (its checksum does not "
                f"match {MODEL_JSON}); restore the original file or save the model again."
            )
        npz.seek(0)
        return meta, _read_npz(npz_file, npz, manifest)
    finally:
        if npz is not None:
            npz.close()


def _check_contents(meta: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise unless ``meta`` is a dict of plain JSON values and ``arrays`` can be saved."""
    if type(meta) is not dict:
        raise TypeError(f"meta must be a dict. Got {type(meta).__name__} instead.")
    _check_json_value(meta, "meta")
    _check_arrays(arrays)


def _check_json_value(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of plain JSON values that load back equal."""
    if value is None or type(value) in (bool, int, str):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(
                f"{where} is {value!r}, which JSON cannot represent; store None instead, or put "
                f"the value in an array."
            )
        return
    if type(value) is list:
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"{where} has the key {key!r} of type {type(key).__name__}, but JSON keys "
                    f"must be str; convert the key to str."
                )
            _check_json_value(item, f"{where}[{key!r}]")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(
        f"{where} is of type {kind}, which cannot be saved as JSON exactly; convert it to a "
        f"plain Python bool, int, float, str, None, list or dict (numpy values: .tolist())."
    )


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise unless every array has a safe name and a dtype that loads without pickle."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a dict of numpy arrays. Got {type(arrays).__name__}.")
    for name, array in arrays.items():
        if type(name) is not str:
            raise TypeError(f"Array names must be str. Got {name!r} of type {type(name).__name__}.")
        if not _ARRAY_NAME.fullmatch(name):
            raise ValueError(
                f"The array name {name!r} is not allowed; use letters, digits, '_', '.' and '-', "
                f"not starting with '.' or '-'."
            )
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"arrays[{name!r}] must be a numpy array. Got {type(array).__name__}; "
                f"convert it with numpy.asarray."
            )
        if array.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(
                f"arrays[{name!r}] has dtype {array.dtype}, which cannot be saved without pickle; "
                f"convert it to a bool, numeric, fixed-width string (.astype(str)) or datetime "
                f"dtype."
            )


def _check_target(target: Path, overwrite: bool) -> None:
    """Raise unless ``target`` is free, or may be replaced because ``overwrite`` is true."""
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(
            f"{target} exists and is not a directory, so a model cannot be saved there; choose "
            f"another path."
        )
    if not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True (command line: --force) to replace it."
        )
    contents = sorted(os.listdir(target))
    if not contents:
        return
    if not _is_model_dir(target):
        raise ModelFileError(
            f"Refusing to replace {target}: it is not empty and not a fedgrain model directory "
            f"(no {MODEL_JSON} with format {FORMAT!r}), so replacing it could destroy other "
            f"files; choose another path."
        )
    foreign = [name for name in contents if name not in (MODEL_JSON, ARRAYS_NPZ)]
    if foreign:
        raise ModelFileError(
            f"Refusing to replace the model at {target}: it also holds {foreign}, which "
            f"fedgrain did not write; move them out or choose another path."
        )


def _is_model_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a ``model.json`` that declares our format."""
    try:
        header = json.loads((directory / MODEL_JSON).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the complete ``staging`` directory to ``target``, replacing any old model.

    An old model is replaced by an atomic exchange of the two directories where the system
    offers one (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader always finds a complete
    model at ``target``; elsewhere by two renames, between which ``target`` is briefly absent
    (readers wait for it, :func:`_snapshot`).
    """
    if not os.path.lexists(target):
        os.rename(staging, target)
        _fsync_dir(target.parent)
        return
    if _exchange(staging, target):  # staging now holds the old model
        _fsync_dir(target.parent)
        _remove_old(staging, target)
        return
    old = target.parent / f".{target.name}.old-{owner_tag()}-{secrets.token_hex(8)}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        try:
            os.rename(old, target)
        except OSError as exc:
            raise ModelFileError(
                f"Saving to {target} failed and the previous model could not be moved back; it "
                f"is intact in {old}, so rename that directory to {target}."
            ) from exc
        raise
    _fsync_dir(target.parent)
    _remove_old(old, target)


def _remove_old(old: Path, target: Path) -> None:
    try:
        shutil.rmtree(old)
    except OSError as exc:
        warn(
            f"The model was saved to {target}, but the previous one could not be deleted from "
            f"{old} ({exc}); delete that directory by hand."
        )


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None  # resolved on first use; False where the C library has none


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False
    where the system or the file system does not offer it."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if os.name == "posix":
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (OSError, AttributeError):
                pass
    if not _renameat2:
        return False
    import ctypes
    import errno

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # not offered here: two renames instead
    raise OSError(code, os.strerror(code), str(b))


_LEFTOVER = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-)?[0-9a-f]{16}")
#: A leftover is touched only when older than this: a save under way elsewhere (another
#: process namespace on this machine) is never disturbed; a staging folder of an older
#: fedgrain (no owner in its name) waits an hour.
STALE_SECONDS = 600.0
STALE_UNOWNED_SECONDS = 3600.0


def _sweep(target: Path) -> None:
    """Clean what saves to ``target`` that were killed left behind: staging directories of
    dead processes are removed; an old version left by a killed replace is removed when a
    complete model is at ``target``, and moved back to ``target`` when none is (it is then the
    only copy)."""
    for path, m, age in leftovers(target.parent, _LEFTOVER):
        if m["name"] != target.name:
            continue
        if path.is_symlink() or not path.is_dir():
            continue
        if m["pid"] is None:
            if not (m["kind"] == "tmp" and age > STALE_UNOWNED_SECONDS):
                continue
        elif age < STALE_SECONDS or not left_by_dead(m["host"], m["pid"]):
            continue
        if m["kind"] == "old" and not _is_model_dir(target):
            try:
                os.rename(path, target)  # the killed replace's only copy goes back
            except OSError:
                pass
            continue
        shutil.rmtree(path, ignore_errors=True)



def _write_files(staging: Path, meta: dict[str, Any], arrays: Mapping[str, np.ndarray],
                 key: bytes | None = None) -> None:
    """Write ``arrays.npz`` and then ``model.json`` into ``staging``, both flushed to disk."""
    npz_file = staging / ARRAYS_NPZ
    with open(npz_file, "wb") as stream:
        _write_npz(stream, arrays)
        stream.flush()
        os.fsync(stream.fileno())
    header = _header(meta, arrays, npz_file)
    if key is not None:  # last: the signature ends the file (_SIGNED_TAIL)
        header["signature"] = {"algorithm": SIGNATURE, "value": _BLANK.decode("ascii")}
    raw = (json.dumps(header, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    _write_synced(staging / MODEL_JSON, raw if key is None else _sign(raw, key))
    _fsync_dir(staging)


def _header(meta: dict[str, Any], arrays: Mapping[str, np.ndarray], npz_file: Path) -> dict:
    """The content of ``model.json``: format, versions, time, metadata, manifest, checksums."""

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fedgrain_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta": meta,
        "arrays": {name: _describe(array) for name, array in arrays.items()},
        "checksums": {
            "meta_sha256": hashlib.sha256(_canonical_json(meta)).hexdigest(),
            "arrays_npz_sha256": _sha256_file(npz_file),
        },
    }


def _write_npz(stream: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` archive, one ``.npy`` member each.

    An interruption (a signal's exception) while a member is being closed leaves zipfile's
    writing handle open, so that closing the archive would raise its own ValueError instead:
    on any failure the archive is abandoned unfinished (the caller discards the staged file)
    and the failure itself is raised."""
    archive = zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
    try:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    except BaseException:
        archive.fp = None  # abandoned: nothing to finalise, and nothing to complain about
        raise
    archive.close()


#: How often a read starts again when the directory is replaced under it (a save with
#: overwrite=True by another process), and how long it waits between tries.
READ_ATTEMPTS = 50
READ_PAUSE = 0.02


def _snapshot(root: Path) -> tuple[bytes | None, BinaryIO | None]:
    """The bytes of ``model.json`` and an open file of ``arrays.npz`` (None: absent) of one
    version of the model directory; the caller closes the file.

    Both files are opened through one descriptor of the directory, so a save that replaces
    the directory meanwhile (an atomic exchange) cannot give one file of each version (the
    open file keeps its version's content after a save removed it). The arrays file is not
    read here: its checksum is taken and its arrays are read in blocks, so loading holds the
    arrays, not the file's bytes beside them. If the
    directory was replaced while files were missing from the one read (the saver removes the
    old version), or the path is briefly absent while a save without an atomic exchange moves
    versions, the read starts again, up to :data:`READ_ATTEMPTS` times.
    """
    import time

    for _ in range(READ_ATTEMPTS):
        try:
            got = _snapshot_once(root)
        except FileNotFoundError:
            got = None
        if got is not None:
            raw_json, npz, ident = got
            if (raw_json is not None and npz is not None) or _identity(root) == ident:
                return raw_json, npz
            if npz is not None:
                npz.close()
        elif not _being_replaced(root):
            break
        time.sleep(READ_PAUSE)
    if not os.path.lexists(root):
        raise ModelFileError(f"No saved model at {root}: the path does not exist; check the path.")
    if not root.is_dir():
        raise ModelFileError(
            f"{root} is not a directory; pass the model directory, which holds "
            f"{MODEL_JSON} and {ARRAYS_NPZ}."
        )
    raise ModelFileError(f"{root} was replaced {READ_ATTEMPTS} times while being read; try again.")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _snapshot_once(root: Path):
    if not root.is_dir():
        return None
    if os.open not in os.supports_dir_fd:  # no descriptor-relative opens: plain paths
        raw_json = _read_limited(lambda: os.open(root / MODEL_JSON, os.O_RDONLY), MODEL_JSON)
        npz = _open_file(lambda: os.open(root / ARRAYS_NPZ, os.O_RDONLY))
        return raw_json, npz, _identity(root)
    dfd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        st = os.fstat(dfd)
        raw_json = _read_limited(lambda: os.open(MODEL_JSON, os.O_RDONLY, dir_fd=dfd),
                                 MODEL_JSON, root)
        npz = _open_file(lambda: os.open(ARRAYS_NPZ, os.O_RDONLY, dir_fd=dfd))
    finally:
        os.close(dfd)
    return raw_json, npz, (st.st_dev, st.st_ino)


def _open_file(opener) -> BinaryIO | None:
    """The regular file ``opener()`` opens, as a binary file object, or None when it is absent
    (or not a regular file)."""
    try:
        fd = opener()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    stream = os.fdopen(fd, "rb")
    if not _stat_is_file(os.fstat(stream.fileno())):
        stream.close()
        return None
    return stream


def _read_limited(opener, name: str, root: Path | None = None) -> bytes | None:
    """A file's bytes, or None when it is absent (or a folder); ``model.json`` no larger than
    :data:`MAX_JSON_BYTES`."""
    try:
        fd = opener()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as stream:
        st = os.fstat(stream.fileno())
        if not _stat_is_file(st):
            return None
        if name == MODEL_JSON and st.st_size > MAX_JSON_BYTES:
            where = name if root is None else root / name
            raise ModelFileError(
                f"{where} is {st.st_size:,} bytes, more than a model description can be "
                f"({MAX_JSON_BYTES:,}); it is not a file fedgrain wrote: restore it or save the "
                "model again."
            )
        return stream.read()


def _stat_is_file(st) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


def _being_replaced(root: Path) -> bool:
    """Whether a save to ``root`` is under way (its staging or old-version sibling exists)."""
    try:
        names = os.listdir(root.parent)
    except OSError:
        return False
    prefix = (f".{root.name}.tmp-", f".{root.name}.old-")
    return any(n.startswith(prefix) for n in names)


def _read_header(root: Path, raw: bytes | None) -> Any:
    """Parse ``model.json``, raising ModelFileError unless it is a JSON object of our format."""
    file = root / MODEL_JSON
    if raw is None:
        raise ModelFileError(
            f"{root} is not a fedgrain model: it has no {MODEL_JSON}; pass the directory that "
            f"was written by save()."
        )
    if not raw.strip():
        raise ModelFileError(
            f"{file} is empty, so saving was interrupted or the file was truncated; save the "
            f"model again."
        )
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise ModelFileError(
            f"{file} nests its values deeper than Python can read, so it is not a file fedgrain "
            "wrote; restore it or save the model again."
        ) from None
    except ValueError as exc:
        raise ModelFileError(
            f"{file} is not valid JSON ({exc}), so it was truncated or edited by hand; restore "
            f"it or save the model again."
        ) from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(
            f"{root} is not a fedgrain model: {MODEL_JSON} does not declare format {FORMAT!r}; "
            f"pass a directory written by fedgrain."
        )
    version = header.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:

        raise ModelFileError(
            f"{root} was written by a newer fedgrain (format {version}; fedgrain {__version__} "
            f"reads format {FORMAT_VERSION}); upgrade fedgrain to load it."
        )
    if type(version) is not int or version < 1:
        raise ModelFileError(
            f"{file} has an unknown format_version {version!r}, so it is damaged or was edited "
            f"by hand; restore it or save the model again."
        )
    return header


def _refuse_constant(name: str) -> None:
    """Reject the NaN and Infinity literals, which are not JSON and which we never write."""
    raise ValueError(f"{name} is not a valid JSON value")


def _check_header(
    file: Path, header: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
    """Return the meta, manifest and checksums of ``header``, checking their structure."""

    def malformed(problem: str) -> ModelFileError:
        return ModelFileError(
            f"{file} is malformed ({problem}), so it was edited by hand or damaged; restore it "
            f"or save the model again."
        )

    meta = header.get("meta")
    manifest = header.get("arrays")
    checksums = header.get("checksums")
    if type(meta) is not dict:
        raise malformed("'meta' is not an object")
    if type(manifest) is not dict:
        raise malformed("'arrays' is not an object")
    if type(checksums) is not dict or not all(
        type(checksums.get(key)) is str for key in ("meta_sha256", "arrays_npz_sha256")
    ):
        raise malformed("'checksums' lacks 'meta_sha256' or 'arrays_npz_sha256'")
    for name, entry in manifest.items():
        if (
            type(entry) is not dict
            or type(entry.get("dtype")) is not str
            or type(entry.get("sha256")) is not str
            or type(entry.get("shape")) is not list
            or not all(type(size) is int and size >= 0 for size in entry["shape"])
        ):
            raise malformed(f"the entry of array {name!r} needs a dtype, a shape and a sha256")
        try:
            dtype = np.dtype(entry["dtype"])
        except (TypeError, ValueError):
            raise malformed(f"array {name!r} has the unknown dtype {entry['dtype']!r}") from None
        if dtype.hasobject:
            raise ModelFileError(
                f"{file} declares array {name!r} with object dtype, which would need pickle to "
                f"load and which fedgrain never writes; do not load this model, save it again."
            )
    return meta, manifest, checksums


def _read_npz(
    npz_file: Path, stream: BinaryIO, manifest: dict[str, dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Read the arrays of ``manifest`` from the open ``.npz`` file, with pickling disabled.

    Each array is read straight into its own memory, after its header was checked against the
    manifest, and its checksum is taken again: so what the reader returns is what the (signed)
    manifest describes even if the file changed after its checksum was taken."""
    try:
        archive = zipfile.ZipFile(stream)
    except _ARCHIVE_ERRORS as exc:
        raise ModelFileError(
            f"{npz_file} is not a valid npz archive ({exc}); restore the original file or save "
            f"the model again."
        ) from exc
    with archive:
        members = archive.namelist()
        expected = {f"{name}.npy" for name in manifest}
        missing = sorted(expected.difference(members))
        extra = sorted(set(members).difference(expected))
        if missing or extra or len(members) != len(set(members)):
            raise ModelFileError(
                f"{npz_file} does not hold the arrays listed in {MODEL_JSON} (missing: "
                f"{missing}, unexpected: {extra}); restore the original files or save the model "
                f"again."
            )
        arrays = {}
        for name, entry in manifest.items():
            try:
                _check_member(archive.getinfo(f"{name}.npy"), archive, name, entry, npz_file)
                with archive.open(f"{name}.npy") as member:
                    array = np.lib.format.read_array(member, allow_pickle=False)
            except ModelFileError:
                raise
            except _ARCHIVE_ERRORS as exc:
                raise ModelFileError(
                    f"Array {name!r} in {npz_file} cannot be read safely ({exc}); restore the "
                    f"original file or save the model again."
                ) from exc
            if (
                array.dtype.str != entry["dtype"]
                or list(array.shape) != entry["shape"]
                or _array_sha256(array) != entry["sha256"]
            ):
                raise ModelFileError(
                    f"Array {name!r} in {npz_file} does not match its dtype, shape or checksum "
                    f"in {MODEL_JSON}, so a file was modified after saving; restore the original "
                    f"files or save the model again."
                )
            arrays[name] = array
    return arrays


def _check_member(info: zipfile.ZipInfo, archive: zipfile.ZipFile, name: str,
                  entry: dict[str, Any], npz_file: Path) -> None:
    """Before an array is read: its member is stored uncompressed (as fedgrain writes them)
    and its header declares the dtype and shape of the manifest, in exactly the member's bytes.
    So no header can make the reader allocate more than the file holds."""
    bad = info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size
    if not bad:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                    np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(member, max_header_size=10_000)
            start = member.tell()
        count = int(np.prod(shape, dtype=object)) if shape else 1
        bad = (dtype.hasobject or dtype.str != entry["dtype"] or list(shape) != entry["shape"]
               or start + count * dtype.itemsize != info.file_size)
    if bad:
        raise ModelFileError(
            f"Array {name!r} in {npz_file} does not match its dtype, shape or size in "
            f"{MODEL_JSON}, so a file was modified after saving; restore the original files or "
            "save the model again."
        )


def _describe(array: np.ndarray) -> dict[str, Any]:
    """The manifest entry of an array: dtype string, shape and SHA-256 of its bytes."""
    return {"dtype": array.dtype.str, "shape": list(array.shape), "sha256": _array_sha256(array)}


def _array_sha256(array: np.ndarray) -> str:
    """SHA-256 of the array's bytes in C order, without copying a C-contiguous array."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _canonical_json(meta: dict[str, Any]) -> bytes:
    """The canonical JSON of ``meta`` whose SHA-256 is stored in ``model.json``."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _sha256_stream(stream: BinaryIO) -> str:
    """SHA-256 of an open file from its start, read in blocks."""
    digest = hashlib.sha256()
    stream.seek(0)
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _sha256_file(file: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    with open(file, "rb") as stream:
        return _sha256_stream(stream)


def _write_synced(file: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to disk."""
    with open(file, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_dir(directory: Path) -> None:
    """Flush a directory's entries to disk, so renames in it survive a power cut."""
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals renames itself.
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
