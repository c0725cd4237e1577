"""Tests of fedgrain.persist: round trips, corruption on disk, overwrite rules and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedgrain import __version__
from fedgrain.exceptions import ModelFileError
from fedgrain.persist import FORMAT, FORMAT_VERSION, read_model_dir, write_model_dir

META = {
    "n_features": 3,
    "levels": ["bas", "moyen", "élevé"],
    "settings": {"alpha": 0.05, "note": "naïve — 日本語 🙂", "big": 2**70, "none": None},
    "flags": [True, False],
}


def _arrays() -> dict[str, np.ndarray]:
    return {
        "coef": np.array([0.1, -0.0, 1 / 3, 5e-324, np.inf, -np.inf, np.nan, 1e308]),
        "float32": np.array([1.5, -2.25], dtype=np.float32),
        "big_endian": np.array([1.0, 2.0], dtype=">f8"),
        "ints": np.array([-(2**62), 0, 7], dtype=np.int64),
        "small_ints": np.array([[1, 2], [3, 4]], dtype=np.int8),
        "unsigned": np.array([65535], dtype=np.uint16),
        "mask": np.array([True, False, True]),
        "complex": np.array([1 + 2j]),
        "scalar": np.array(2.5),
        "int_scalar": np.array(4, dtype=np.int32),
        "empty": np.zeros(0),
        "empty_2d": np.zeros((0, 3)),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "labels": np.array(["low", "médium", "高"]),
        "raw": np.array([b"a", b"bc"]),
        "dates": np.array(["2024-01-01", "2024-02-29"], dtype="datetime64[D]"),
    }


def _assert_arrays_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].dtype.str == array.dtype.str, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes(order="C") == array.tobytes(order="C"), name


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model", META, _arrays())


def _header(model: Path) -> dict:
    return json.loads((model / "model.json").read_text(encoding="utf-8"))


def _forge(model: Path, edit) -> None:
    """Edit model.json like a determined attacker: apply ``edit``, then fix every checksum."""
    header = _header(model)
    edit(header)
    canonical = json.dumps(header["meta"], sort_keys=True, separators=(",", ":")).encode()
    header["checksums"]["meta_sha256"] = hashlib.sha256(canonical).hexdigest()
    npz = (model / "arrays.npz").read_bytes()
    header["checksums"]["arrays_npz_sha256"] = hashlib.sha256(npz).hexdigest()
    (model / "model.json").write_text(json.dumps(header, indent=2), encoding="utf-8")


class _Trap:
    """Unpickling an instance creates the marker file: proof that code was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------- round trips and layout


def test_round_trip_preserves_meta_and_arrays_exactly(model: Path) -> None:
    meta, arrays = read_model_dir(model)
    assert meta == META
    assert meta["settings"]["note"] == "naïve — 日本語 🙂"
    _assert_arrays_identical(arrays, _arrays())
    assert arrays["scalar"].ndim == 0
    assert np.signbit(arrays["coef"][1])


def test_round_trip_without_arrays(tmp_path: Path) -> None:
    assert read_model_dir(write_model_dir(tmp_path / "m", {}, {})) == ({}, {})


def test_model_json_layout(model: Path) -> None:
    text = (model / "model.json").read_text(encoding="utf-8")
    assert text.startswith('{\n  "format": "fedgrain-model",\n')
    assert "日本語" in text
    header = json.loads(text)
    assert list(header) == [
        "format",
        "format_version",
        "fedgrain_version",
        "created",
        "meta",
        "arrays",
        "checksums",
    ]
    assert header["format"] == FORMAT == "fedgrain-model"
    assert header["format_version"] == FORMAT_VERSION == 1
    assert header["fedgrain_version"] == __version__
    assert datetime.fromisoformat(header["created"]).utcoffset() == timedelta(0)
    assert header["meta"] == META
    coef = _arrays()["coef"]
    assert header["arrays"]["coef"] == {
        "dtype": "<f8",
        "shape": [8],
        "sha256": hashlib.sha256(coef.tobytes()).hexdigest(),
    }
    assert header["arrays"]["scalar"]["shape"] == []
    assert header["arrays"]["empty_2d"]["shape"] == [0, 3]
    canonical = json.dumps(META, sort_keys=True, separators=(",", ":")).encode()
    npz = (model / "arrays.npz").read_bytes()
    assert header["checksums"] == {
        "meta_sha256": hashlib.sha256(canonical).hexdigest(),
        "arrays_npz_sha256": hashlib.sha256(npz).hexdigest(),
    }
    assert sorted(os.listdir(model)) == ["arrays.npz", "model.json"]


def test_relative_path_with_missing_parents_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    returned = write_model_dir(Path("a") / "b" / "model", {"k": 1}, {})
    assert returned == tmp_path / "a" / "b" / "model"
    assert read_model_dir("a/b/model") == ({"k": 1}, {})


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,8}", fullmatch=True),
        hnp.arrays(
            np.float64,
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
            elements=st.floats(allow_nan=True, allow_infinity=True),
        ),
        max_size=5,
    )
)
def test_round_trip_property(arrays: dict[str, np.ndarray]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        meta, loaded = read_model_dir(
            write_model_dir(Path(folder) / "m", {"n": len(arrays)}, arrays)
        )
    assert meta == {"n": len(arrays)}
    _assert_arrays_identical(loaded, arrays)


# ---------------------------------------------------------------- what write refuses


@pytest.mark.parametrize(
    ("meta", "error", "match"),
    [
        ({"a": np.float64(1.0)}, TypeError, r"meta\['a'\] is of type numpy\.float64"),
        ({"a": {"b": [1, np.int64(2)]}}, TypeError, r"meta\['a'\]\['b'\]\[1\] is of type numpy"),
        ({"a": np.zeros(2)}, TypeError, r"meta\['a'\] is of type numpy\.ndarray"),
        ({"a": (1, 2)}, TypeError, r"meta\['a'\] is of type builtins\.tuple"),
        ({"a": {1, 2}}, TypeError, r"meta\['a'\] is of type builtins\.set"),
        ({"a": {1: "x"}}, TypeError, r"meta\['a'\] has the key 1 of type int"),
        ({"a": [float("nan")]}, ValueError, r"meta\['a'\]\[0\] is nan"),
        ({"a": float("inf")}, ValueError, r"meta\['a'\] is inf"),
        ([1, 2], TypeError, r"meta must be a dict\. Got list"),
    ],
)
def test_write_refuses_meta_json_cannot_hold(tmp_path: Path, meta, error, match) -> None:
    with pytest.raises(error, match=match):
        write_model_dir(tmp_path / "m", meta, {})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("arrays", "error", "match"),
    [
        ({"labels": np.array(["a", 1], dtype=object)}, TypeError, r"arrays\['labels'\].*object"),
        ({"rec": np.zeros(2, dtype=[("a", "f8")])}, TypeError, r"arrays\['rec'\].*pickle"),
        ({"coef": [1.0, 2.0]}, TypeError, r"arrays\['coef'\] must be a numpy array"),
        ({"a/b": np.zeros(1)}, ValueError, r"array name 'a/b' is not allowed"),
        ({"": np.zeros(1)}, ValueError, r"array name '' is not allowed"),
        ({3: np.zeros(1)}, TypeError, r"Array names must be str"),
        ([np.zeros(1)], TypeError, r"arrays must be a dict"),
    ],
)
def test_write_refuses_arrays_needing_pickle_or_bad_names(
    tmp_path: Path, arrays, error, match
) -> None:
    with pytest.raises(error, match=match):
        write_model_dir(tmp_path / "m", {}, arrays)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- corruption on disk


def _truncate_npz(model: Path) -> None:
    data = (model / "arrays.npz").read_bytes()
    (model / "arrays.npz").write_bytes(data[: len(data) // 2])


def _flip_npz_byte(model: Path) -> None:
    data = bytearray((model / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (model / "arrays.npz").write_bytes(bytes(data))


def _edit_meta_number(model: Path) -> None:
    text = (model / "model.json").read_text(encoding="utf-8")
    assert '"n_features": 3' in text
    (model / "model.json").write_text(text.replace('"n_features": 3', '"n_features": 4'))


def _set_json(value: str):
    return lambda model: (model / "model.json").write_text(value, encoding="utf-8")


def _truncate_json(model: Path) -> None:
    text = (model / "model.json").read_text(encoding="utf-8")
    (model / "model.json").write_text(text[: len(text) // 2], encoding="utf-8")


def _edit_header(key: str, value):
    def edit(model: Path) -> None:
        header = _header(model)
        header[key] = value
        (model / "model.json").write_text(json.dumps(header), encoding="utf-8")

    return edit


def _drop_header_key(key: str):
    def edit(model: Path) -> None:
        header = _header(model)
        del header[key]
        (model / "model.json").write_text(json.dumps(header), encoding="utf-8")

    return edit


def _forged(edit):
    return lambda model: _forge(model, edit)


def _set_entry(name: str, key: str, value):
    return _forged(lambda header: header["arrays"][name].__setitem__(key, value))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_truncate_npz, r"arrays\.npz was modified or truncated after saving"),
        (_flip_npz_byte, r"arrays\.npz was modified or truncated after saving"),
        (_edit_meta_number, r"meta section of .*model\.json was edited after saving"),
        (lambda model: (model / "model.json").unlink(), r"has no model\.json"),
        (lambda model: (model / "arrays.npz").unlink(), r"arrays\.npz is missing"),
        (_set_json(""), r"model\.json is empty"),
        (_truncate_json, r"model\.json is not valid JSON"),
        (_set_json("{not json"), r"model\.json is not valid JSON"),
        (_set_json('{"format": "fedgrain-model", "x": NaN}'), r"is not valid JSON"),
        (lambda m: (m / "model.json").write_bytes(b"\xff\xfe{}"), r"is not valid JSON"),
        (_set_json("[1, 2]"), r"is not a fedgrain model"),
        (_edit_header("format", "sklearn-model"), r"is not a fedgrain model"),
        (_drop_header_key("format"), r"is not a fedgrain model"),
        (_edit_header("format_version", 2), r"newer fedgrain \(format 2.*upgrade fedgrain"),
        (_edit_header("format_version", 0), r"unknown format_version 0"),
        (_edit_header("format_version", "1"), r"unknown format_version '1'"),
        (_edit_header("format_version", True), r"unknown format_version True"),
        (_drop_header_key("format_version"), r"unknown format_version None"),
        (_edit_header("meta", [1]), r"malformed \('meta' is not an object\)"),
        (_drop_header_key("checksums"), r"malformed \('checksums' lacks"),
        (_forged(lambda h: h.__setitem__("arrays", [])), r"'arrays' is not an object"),
        (_set_entry("coef", "shape", [-1]), r"malformed \(the entry of array 'coef'"),
        (_set_entry("coef", "dtype", "not-a-dtype"), r"unknown dtype 'not-a-dtype'"),
        (
            _forged(lambda h: h["arrays"].__setitem__("ghost", h["arrays"]["coef"])),
            r"missing: \['ghost\.npy'\], unexpected: \[\]",
        ),
        (
            _forged(lambda h: h["arrays"].pop("coef")),
            r"missing: \[\], unexpected: \['coef\.npy'\]",
        ),
        (_set_entry("coef", "dtype", "<f4"), r"'coef' .* does not match its dtype"),
        (_set_entry("coef", "shape", [2, 4]), r"'coef' .* does not match its dtype, shape"),
        (_set_entry("coef", "sha256", "0" * 64), r"'coef' .* does not match .* checksum"),
    ],
)
def test_read_refuses_damaged_model(model: Path, damage, match) -> None:
    damage(model)
    with pytest.raises(ModelFileError, match=match):
        read_model_dir(model)


def test_read_refuses_missing_path_and_plain_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"the path does not exist"):
        read_model_dir(tmp_path / "nowhere")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ModelFileError, match=r"is not a directory"):
        read_model_dir(tmp_path / "file.json")


def test_trap_payload_runs_code_when_unpickled(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Trap(control)))
    assert control.exists()


def _npz_with_pickled_object(model: Path, marker: Path) -> None:
    with zipfile.ZipFile(model / "arrays.npz", "w") as archive:
        with archive.open("coef.npy", "w") as member:
            trap = np.array([_Trap(marker)], dtype=object)
            np.lib.format.write_array(member, trap, allow_pickle=True)


@pytest.mark.parametrize(
    ("declared", "match"),
    [
        ("|O", r"declares array 'coef' with object dtype"),
        # refused from its header, before numpy is asked to read it
        ("<f8", r"Array 'coef' in .* does not match its dtype, shape or size"),
    ],
)
def test_read_refuses_object_array_without_unpickling(
    model: Path, tmp_path: Path, declared: str, match: str
) -> None:
    marker = tmp_path / "unpickled"
    _npz_with_pickled_object(model, marker)

    def declare_only_coef(header: dict) -> None:
        header["arrays"] = {"coef": {"dtype": declared, "shape": [1], "sha256": "0" * 64}}

    _forge(model, declare_only_coef)
    with pytest.raises(ModelFileError, match=match):
        read_model_dir(model)
    assert not marker.exists()


def test_read_refuses_raw_pickle_as_npz_without_unpickling(model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (model / "arrays.npz").write_bytes(pickle.dumps(_Trap(marker)))
    _forge(model, lambda header: None)
    with pytest.raises(ModelFileError, match=r"arrays\.npz is not a valid npz archive"):
        read_model_dir(model)
    assert not marker.exists()


def test_read_refuses_raw_pickle_member_without_unpickling(model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    with zipfile.ZipFile(model / "arrays.npz", "w") as archive:
        archive.writestr("coef.npy", pickle.dumps(_Trap(marker)))
    _forge(model, lambda header: header.__setitem__("arrays", {"coef": header["arrays"]["coef"]}))
    with pytest.raises(ModelFileError, match=r"Array 'coef' in .* cannot be read safely"):
        read_model_dir(model)
    assert not marker.exists()


# ---------------------------------------------------------------- overwrite rules


def test_existing_model_is_kept_without_overwrite(model: Path) -> None:
    with pytest.raises(FileExistsError, match=r"pass overwrite=True \(command line: --force\)"):
        write_model_dir(model, {"new": True}, {})
    assert read_model_dir(model)[0] == META


def test_overwrite_replaces_model_and_leaves_nothing_behind(model: Path) -> None:
    write_model_dir(model, {"new": True}, {"x": np.ones(2)}, overwrite=True)
    meta, arrays = read_model_dir(model)
    assert meta == {"new": True}
    assert list(arrays) == ["x"]
    assert os.listdir(model.parent) == ["model"]


def test_overwrite_fills_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        write_model_dir(tmp_path / "m", {"k": 1}, {})
    write_model_dir(tmp_path / "m", {"k": 1}, {}, overwrite=True)
    assert read_model_dir(tmp_path / "m") == ({"k": 1}, {})


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"thesis.tex": "precious"}, r"not a fedgrain model directory"),
        ({"model.json": '{"format": "other"}', "data.csv": "1,2"}, r"not a fedgrain model"),
        ({"model.json": "{trunc", "arrays.npz": ""}, r"not a fedgrain model directory"),
    ],
)
def test_overwrite_never_deletes_a_foreign_directory(tmp_path: Path, files, match) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(content)
    with pytest.raises(ModelFileError, match=match):
        write_model_dir(folder, {}, {}, overwrite=True)
    assert {name: (folder / name).read_text() for name in files} == files
    assert os.listdir(tmp_path) == ["project"]


def test_overwrite_refuses_model_holding_foreign_files(model: Path) -> None:
    (model / "notes.txt").write_text("mine")
    with pytest.raises(ModelFileError, match=r"also holds \['notes\.txt'\]"):
        write_model_dir(model, {}, {}, overwrite=True)
    assert (model / "notes.txt").read_text() == "mine"
    assert read_model_dir(model)[0] == META


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_file_or_link_is_never_overwritten(tmp_path: Path, overwrite: bool) -> None:
    file = tmp_path / "model"
    file.write_text("not a model")
    with pytest.raises(FileExistsError, match=r"exists and is not a directory"):
        write_model_dir(file, {}, {}, overwrite=overwrite)
    assert file.read_text() == "not a model"
    link = tmp_path / "link"
    link.symlink_to(write_model_dir(tmp_path / "real", {}, {}), target_is_directory=True)
    with pytest.raises(FileExistsError, match=r"exists and is not a directory"):
        write_model_dir(link, {}, {}, overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == ["link", "model", "real"]


# ---------------------------------------------------------------- atomic writes


def _failing_rename(monkeypatch: pytest.MonkeyPatch, fails) -> None:
    """Make ``os.rename`` raise whenever ``fails(source, destination)`` is true."""
    real = os.rename

    def rename(source, destination):
        if fails(Path(source), Path(destination)):
            raise OSError("simulated crash")
        real(source, destination)

    monkeypatch.setattr(os, "rename", rename)


def _final_move(source: Path, destination: Path) -> bool:
    return ".tmp-" in source.name


@pytest.mark.parametrize(
    "fails",
    [_final_move, lambda source, destination: source.name == "model"],
    ids=["moving-new-in", "moving-old-aside"],
)
def test_crash_while_replacing_keeps_old_model(
    model: Path, monkeypatch: pytest.MonkeyPatch, fails
) -> None:
    import fedgrain.persist as persist

    monkeypatch.setattr(persist, "_exchange", lambda a, b: False)  # the two-rename path
    _failing_rename(monkeypatch, fails)
    with pytest.raises(OSError, match="simulated crash"):
        write_model_dir(model, {"new": True}, {}, overwrite=True)
    meta, arrays = read_model_dir(model)
    assert meta == META
    _assert_arrays_identical(arrays, _arrays())
    assert os.listdir(model.parent) == ["model"]


def test_crash_on_first_save_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_rename(monkeypatch, _final_move)
    with pytest.raises(OSError, match="simulated crash"):
        write_model_dir(tmp_path / "model", META, _arrays())
    assert os.listdir(tmp_path) == []


def test_crash_while_writing_files_keeps_old_model(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="disk full"):
        write_model_dir(model, {"new": True}, {"x": np.ones(3)}, overwrite=True)
    monkeypatch.undo()
    assert read_model_dir(model)[0] == META
    assert os.listdir(model.parent) == ["model"]


def test_failed_restore_says_where_the_old_model_is(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedgrain.persist as persist

    monkeypatch.setattr(persist, "_exchange", lambda a, b: False)  # the two-rename path
    _failing_rename(monkeypatch, lambda source, destination: destination.name == "model")
    with pytest.raises(ModelFileError, match=r"it is intact in .*\.model\.old-"):
        write_model_dir(model, {"new": True}, {}, overwrite=True)
    [old] = os.listdir(model.parent)
    assert old.startswith(".model.old-")
    assert read_model_dir(model.parent / old)[0] == META


def test_undeletable_old_model_only_warns(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedgrain.persist as persist

    monkeypatch.setattr(persist, "_exchange", lambda a, b: False)  # the two-rename path
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".old-" in Path(path).name:
            raise PermissionError("read-only")
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.warns(UserWarning, match=r"previous one could not be deleted"):
        write_model_dir(model, {"new": True}, {}, overwrite=True)
    assert read_model_dir(model)[0] == {"new": True}


def _huge_header(model: Path) -> None:
    """Rewrite coef.npy with a header that declares 1e12 elements over the same few bytes,
    and forge every checksum: the reader must refuse it before allocating anything."""
    import io
    import zipfile

    src = zipfile.ZipFile(model / "arrays.npz")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "coef.npy":
                head = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    head, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
                data = head.getvalue() + data[len(head.getvalue()):]
            dst.writestr(info, data)
    (model / "arrays.npz").write_bytes(out.getvalue())
    _forge(model, lambda h: h["arrays"]["coef"].__setitem__("shape", [10**12]))


def _deep_json(model: Path) -> None:
    (model / "model.json").write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")


@pytest.mark.parametrize(("damage", "match"), [
    (_huge_header, r"'coef' .* does not match its dtype, shape or size"),
    (_deep_json, r"nests its values deeper than Python can read"),
])
def test_load_has_bounded_time_and_memory_whatever_the_file_holds(model, damage, match):
    damage(model)
    with pytest.raises(ModelFileError, match=match):
        read_model_dir(model)


def test_an_oversized_description_is_refused_unread(model, monkeypatch):
    import fedgrain.persist as persist

    monkeypatch.setattr(persist, "MAX_JSON_BYTES", 100)
    with pytest.raises(ModelFileError, match="more than a model description can be"):
        read_model_dir(model)


def test_a_failed_exchange_keeps_the_old_model_and_leaves_nothing(model, monkeypatch):
    import fedgrain.persist as persist

    def broken(a, b):
        raise OSError("simulated crash")

    monkeypatch.setattr(persist, "_exchange", broken)
    with pytest.raises(OSError, match="simulated crash"):
        write_model_dir(model, {"new": True}, {}, overwrite=True)
    assert read_model_dir(model)[0] == META
    assert os.listdir(model.parent) == ["model"]


def test_leftovers_of_killed_saves_are_cleaned_by_the_next_save(model, tmp_path):
    """A staging folder of a dead process of this machine goes (once older than a save can
    take); a live process's stays, and so do young ones, other machines' and names that only
    look alike; an old version left by a replace killed between its two renames goes back into
    place when no model is there."""
    import subprocess
    import sys
    import time

    from fedgrain._process import host_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host, hexes = host_tag(), "0123456789abcdef"
    past = time.time() - 3 * 3600

    def leftover(name, old=True):
        path = tmp_path / name
        path.mkdir()
        (path / "arrays.npz").write_bytes(b"partial")
        if old:
            os.utime(path, (past, past))
        return path

    stale = leftover(f".model.tmp-{host}-{dead}-{hexes}")
    keep = [leftover(f".model.tmp-{host}-{os.getpid()}-{hexes}"),  # a live process
            leftover(f".model.tmp-{host}-{dead}-{hexes[::-1]}", old=False),  # young
            leftover(f".model.tmp-abcdef-{dead}-{hexes}"),  # another machine's
            leftover(".model.old-2024-06"),  # a user's backup that looks alike
            leftover(f".model.tmp-{host}-99999999999999999999-{hexes}")]  # no such pid
    write_model_dir(model, {"new": True}, {}, overwrite=True)
    assert not stale.exists() and all(k.exists() for k in keep)
    for k in keep:
        shutil.rmtree(k)
    # a replace killed after moving the old model aside: only the old copy is left
    aside = tmp_path / f".model.old-{host}-{dead}-{hexes}"
    os.rename(model, aside)
    os.utime(aside, (past, past))
    write_model_dir(tmp_path / "other", META, _arrays())  # another path: not touched
    assert not model.exists()
    with pytest.raises(FileExistsError):  # the next save to it finds the model restored
        write_model_dir(model, META, _arrays())
    assert read_model_dir(model)[0] == {"new": True}
    assert sorted(os.listdir(tmp_path)) == ["model", "other"]


def test_loads_never_fail_while_another_process_replaces_the_model(model, tmp_path):
    """A process saving the same path again and again with overwrite=True: every load in
    this process meanwhile gets one complete version, never an error."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import numpy as np, time
        from fedgrain.persist import write_model_dir
        end = time.time() + 4.0
        i = 0
        while time.time() < end:
            write_model_dir({str(model)!r}, {{"version": i}}, {{"coef": np.full(500, i * 1.0)}},
                            overwrite=True)
            i += 1
        print(i)
    """)
    saver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    loads, seen = 0, set()
    try:
        while saver.poll() is None:
            meta, arrays = read_model_dir(model)
            if "version" in meta:
                assert np.all(arrays["coef"] == meta["version"])
                seen.add(meta["version"])
            loads += 1
    finally:
        saves = int(saver.communicate()[0])
    assert loads > 200 and saves > 20 and len(seen) > 5


def test_a_signing_key_refuses_any_model_not_signed_with_it(model, tmp_path, monkeypatch):
    signed = write_model_dir(tmp_path / "signed", META, _arrays(), key="s3cret")
    meta, arrays = read_model_dir(signed, key="s3cret")
    assert meta == META
    _assert_arrays_identical(arrays, _arrays())
    with pytest.raises(ModelFileError, match="was not signed with this key"):
        read_model_dir(signed, key="other")
    with pytest.raises(ModelFileError, match="no valid signature .* signing key was given"):
        read_model_dir(model, key="s3cret")  # an unsigned model
    read_model_dir(signed)  # without a key: the checksums only
    # a determined edit with every checksum recomputed: refused with the key
    _forge(signed, lambda h: h["meta"].__setitem__("n_features", 42))
    assert read_model_dir(signed)[0]["n_features"] == 42  # what checksums cannot tell
    with pytest.raises(ModelFileError, match="changed after signing"):
        read_model_dir(signed, key="s3cret")
    # the key from the environment, for saving and loading alike
    monkeypatch.setenv("FEDGRAIN_MODEL_KEY", "from-env")
    write_model_dir(tmp_path / "env", META, _arrays())
    assert read_model_dir(tmp_path / "env")[0] == META
    with pytest.raises(ModelFileError, match="no valid signature"):
        read_model_dir(model)
    monkeypatch.delenv("FEDGRAIN_MODEL_KEY")
    with pytest.raises(ModelFileError, match="was not signed with this key"):
        read_model_dir(tmp_path / "env", key="s3cret")
    # a signature that is not hexadecimal (crafted) is refused as unsigned, not a TypeError
    _forge(tmp_path / "env", lambda h: h.__setitem__(
        "signature", {"algorithm": "HMAC-SHA256", "value": "\u00e9" * 64}))
    with pytest.raises(ModelFileError, match="no valid signature"):
        read_model_dir(tmp_path / "env", key="from-env")


def test_a_model_signed_by_an_earlier_fedgrain_is_refused_with_the_way_to_sign_it_again(
        tmp_path):
    """Signatures were first over the parsed header; they now cover the file's bytes under
    another name. A model with the old name is refused as what it is, not as an edit."""
    from fedgrain import DivideConquerOrdinal, load
    from fedgrain.datasets import make_ordinal

    X, y, *_ = make_ordinal(600, 2, 3, random_state=0)
    model = DivideConquerOrdinal(n_subsets=1, backend="serial").fit(X, y)
    model.save(tmp_path / "m", key="k")
    path = tmp_path / "m" / "model.json"
    text = path.read_text()
    assert '"algorithm": "HMAC-SHA256-BYTES"' in text
    path.write_text(text.replace("HMAC-SHA256-BYTES", "HMAC-SHA256"))
    with pytest.raises(ModelFileError, match="signed by an earlier fedgrain.*save it again"):
        load(tmp_path / "m", key="k")
    load(tmp_path / "m")  # without a key: its checksums still hold


@pytest.mark.parametrize("edit", ["narrow", "edges", "centres", "ids"])
def test_a_saved_profile_that_does_not_fit_its_leaves_is_a_bad_model_file(tmp_path, edit):
    """The leaves' profiles are stacked arrays: shapes, counts within them and the leaf ids
    are checked on load (rewritten with valid checksums, as a determined editor would)."""
    from fedgrain import AdaptiveFederatedOrdinal, load
    from fedgrain.datasets import make_regions
    from fedgrain.persist import read_model_dir, write_model_dir

    X, y, *_ = make_regions(3_000, n_regions=2, random_state=0)
    AdaptiveFederatedOrdinal(backend="serial", random_state=0).fit(X, y).save(tmp_path / "m")
    meta, arrays = read_model_dir(tmp_path / "m")
    change = {"narrow": ("profile_low", lambda a: a[:, :-1]),
              "edges": ("profile_n_edges", lambda a: a + 100),
              "centres": ("profile_n_centres", lambda a: a + 5),
              "ids": ("profile_ids", lambda a: a + 1000)}[edit]
    arrays[change[0]] = change[1](arrays[change[0]])
    write_model_dir(tmp_path / "bad", meta, arrays)
    with pytest.raises(ModelFileError, match="profile"):
        load(tmp_path / "bad")


def test_loading_holds_the_arrays_not_the_file_beside_them(tmp_path):
    # The checksum of arrays.npz is taken in blocks and each array is read straight into its
    # own memory: loading needs about the arrays' size, not the file's bytes as well.
    import tracemalloc

    big = np.random.default_rng(0).standard_normal(5_000_000)  # 40 MB
    write_model_dir(tmp_path / "m", {"a": 1}, {"big": big, "small": np.arange(3)})
    size = big.nbytes
    tracemalloc.start()
    try:
        meta, arrays = read_model_dir(tmp_path / "m")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(arrays["big"], big)
    assert peak < 1.2 * size, f"loading a {size / 1e6:.0f} MB model peaked at {peak / 1e6:.0f} MB"


def test_a_file_changed_after_its_checksum_was_taken_is_still_refused(tmp_path, monkeypatch):
    # The arrays are read after the file's checksum was taken; each array's own checksum (in
    # the manifest, which a key signs) is taken again as it is read, so bytes swapped in
    # between are refused.
    import fedgrain.persist as persist

    a = np.arange(1000.0)
    write_model_dir(tmp_path / "m", {}, {"a": a})
    npz = tmp_path / "m" / "arrays.npz"
    real = persist._sha256_stream

    def then_tamper(stream):
        digest = real(stream)
        data = bytearray(npz.read_bytes())
        at = data.rfind(a.tobytes()[-16:])
        data[at] ^= 1
        with open(npz, "r+b") as fh:  # in place: the open file sees it
            fh.write(data)
        return digest

    monkeypatch.setattr(persist, "_sha256_stream", then_tamper)
    with pytest.raises(ModelFileError, match="checksum|cannot be read safely"):
        read_model_dir(tmp_path / "m")


def test_a_full_disk_is_an_error_naming_the_path_and_nothing_is_left(tmp_path, monkeypatch):
    # errno 28 alone names neither the path nor the fix (measured on a 64 kB tmpfs: the
    # command line said "[Errno 28] No space left on device"); the save's staging folder goes
    import errno

    import fedgrain.persist as persist
    from fedgrain.exceptions import ResourceError

    write_model_dir(tmp_path / "m", {"v": 1}, {"a": np.arange(3.0)})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persist, "_write_npz", full)
    with pytest.raises(ResourceError, match=r"No room to write the model .* to .*m: its disk is "
                                            r"full; the model at that path is unchanged"):
        write_model_dir(tmp_path / "m", {"v": 2}, {"a": np.arange(4.0)}, overwrite=True)
    with pytest.raises(ResourceError, match="nothing was written"):
        write_model_dir(tmp_path / "new", {"v": 2}, {"a": np.arange(4.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert read_model_dir(tmp_path / "m")[0] == {"v": 1}


def test_a_full_disk_on_a_command_line_output_exits_with_one_line(tmp_path, capsys):
    import errno

    from fedgrain.cli import _run, _write_atomic, build_parser

    out = tmp_path / "pred.csv"

    def full(tmp):
        Path(tmp).write_text("partial")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    args = build_parser().parse_args(["--quiet", "demo"])
    args.func = lambda a: _write_atomic(out, full)
    assert _run(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"No room to write the output to {out}" in err
    assert "quota" in err and list(tmp_path.iterdir()) == []
