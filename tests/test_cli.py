"""The command line on real CSV and Parquet files: each command, and each bad input.

Bad input must give one line on stderr (``fedgrain: error: ...``), exit status 1, and leave
nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedgrain import load
from fedgrain.cli import main
from fedgrain.datasets import make_ordinal

LEVELS = ["low", "mid", "high", "top"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    X, y, _, _ = make_ordinal(2000, 3, 4, random_state=0)
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df["grade"] = np.array(LEVELS)[y]
    df["id"] = np.arange(len(df))
    df.to_csv(d / "train.csv", index=False)
    df.to_parquet(d / "train.parquet")
    return d, df


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def fit(capsys, d, out="model", *extra):
    return run(capsys, "--quiet", "fit", str(d / "train.csv"), "--target", "grade",
               "--levels", ",".join(LEVELS), "--drop", "id", "--backend", "serial",
               "--out", str(d / out), *extra)


def test_fit_summary_predict_evaluate(files, capsys):
    d, df = files
    code, out, _ = fit(capsys, d, "m_ok")
    assert code == 0 and "Model saved to" in out and "low|mid" in out
    model = load(d / "m_ok")
    assert list(model.schema_.input_columns) == ["a", "b", "c"]

    code, out, _ = run(capsys, "summary", str(d / "m_ok"), "--html", str(d / "s.html"))
    assert code == 0 and "std err" in out
    assert "<table" in (d / "s.html").read_text()

    code, out, _ = run(capsys, "predict", str(d / "m_ok"), str(d / "train.parquet"),
                       "--out", str(d / "pred.parquet"), "--keep", "id")
    assert code == 0
    pred = pd.read_parquet(d / "pred.parquet")
    assert list(pred.columns) == ["id", "predicted"] + [f"proba_{v}" for v in LEVELS]
    np.testing.assert_allclose(pred.filter(like="proba_").sum(axis=1), 1.0)
    expected = model.predict_proba(df[["a", "b", "c"]], order="levels")
    np.testing.assert_allclose(pred.filter(like="proba_").to_numpy(), expected)

    code, out, _ = run(capsys, "evaluate", str(d / "m_ok"), str(d / "train.csv"),
                       "--target", "grade")
    assert code == 0 and "accuracy" in out and "rps" in out


def test_options_work_after_the_command(files, capsys):
    d, _ = files
    code, _, err = run(capsys, "fit", str(d / "train.csv"), "--target", "grade", "--levels",
                       ",".join(LEVELS), "--estimator", "mle", "--out", str(d / "m_mle"),
                       "--quiet")
    assert code == 0 and err == ""
    assert type(load(d / "m_mle")).__name__ == "OrdinalRegression"


def _bad_csv(d, name, change):
    X, y, _, _ = make_ordinal(400, 2, 3, random_state=1)
    df = pd.DataFrame(X, columns=["a", "b"])
    df["grade"] = y
    df = change(df)
    path = d / name
    if isinstance(df, str):
        path.write_text(df)
    else:
        df.to_csv(path, index=False)
    return path


BAD_FIT = [
    ("nan.csv", lambda df: df.assign(a=df.a.where(df.index != 3)), [],
     r"Column 'a' of X has NaN"),
    ("inf.csv", lambda df: df.assign(b=df.b.where(df.index != 7, np.inf)), [], r"inf"),
    ("text.csv", lambda df: df.assign(city=np.where(df.index % 2, "x", "y")), [],
     r"Column 'city' .* is not numeric; declare it categorical"),
    ("one.csv", lambda df: df.assign(grade=1), [], r"only one class"),
    ("labels.csv", lambda df: df.assign(grade=np.array(["p", "q", "r"])[df.grade]), [],
     r"no known order; pass --levels"),
    ("unknown.csv", lambda df: df, ["--levels", "0,1"], r"not among the levels"),
    ("empty.csv", lambda df: "", [], r"is empty"),
    ("header.csv", lambda df: "a,b,grade\n", [], r"is empty|0 rows|no rows"),
    ("subsets.csv", lambda df: df, ["--n-subsets", "50"], r"n_subsets=50 would give subsets"),
]


@pytest.mark.parametrize(("name", "change", "extra", "message"), BAD_FIT,
                         ids=[b[0] for b in BAD_FIT])
def test_bad_fit_input_is_one_line_and_writes_nothing(tmp_path, capsys, name, change, extra,
                                                     message):
    path = _bad_csv(tmp_path, name, change)
    code, out, err = run(capsys, "fit", str(path), "--target", "grade", "--backend", "serial",
                         "--out", str(tmp_path / "model"), *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("fedgrain: error: ")
    assert re.search(message, lines[-1]), lines[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_missing_file_and_wrong_target(tmp_path, capsys, files):
    d, _ = files
    code, _, err = run(capsys, "fit", str(tmp_path / "nope.csv"), "--target", "y",
                       "--out", str(tmp_path / "m"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "fit", str(d / "train.csv"), "--target", "grad",
                       "--out", str(tmp_path / "m"))
    assert code == 2 and "did you mean 'grade'" in err
    assert not (tmp_path / "m").exists()


def test_existing_model_needs_force(files, capsys):
    d, _ = files
    assert fit(capsys, d, "m_force")[0] == 0
    code, _, err = fit(capsys, d, "m_force")
    assert code == 2 and "--force" in err
    assert fit(capsys, d, "m_force", "--force")[0] == 0


def test_predict_with_missing_columns_writes_nothing(files, tmp_path, capsys):
    d, df = files
    assert fit(capsys, d, "m_cols")[0] == 0
    df.drop(columns=["b"]).to_csv(tmp_path / "x.csv", index=False)
    code, _, err = run(capsys, "predict", str(d / "m_cols"), str(tmp_path / "x.csv"),
                       "--out", str(tmp_path / "p.csv"))
    assert code == 2 and "lacks the column(s) ['b']" in err
    assert not (tmp_path / "p.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]


def test_tampered_or_truncated_model_is_one_line(files, tmp_path, capsys):
    d, _ = files
    assert fit(capsys, d, "m_bad")[0] == 0
    (d / "m_bad" / "model.json").write_text("{")
    code, _, err = run(capsys, "summary", str(d / "m_bad"))
    assert code == 2 and err.count("\n") == 1 and "model.json" in err
    code, _, err = run(capsys, "predict", str(tmp_path / "none"), str(d / "train.csv"),
                       "--out", str(tmp_path / "p.csv"))
    assert code == 2 and not (tmp_path / "p.csv").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "--debug", "summary", str(tmp_path / "none"))
    assert code == 2 and "Traceback" in err


def test_usage_errors_exit_2():
    proc = subprocess.run([sys.executable, "-m", "fedgrain.cli", "fit"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "required" in proc.stderr


def test_cli_messages_speak_in_options(tmp_path, capsys):
    path = _bad_csv(tmp_path, "t.csv", lambda df: df.assign(city=np.where(df.index % 2, "x", "y")))
    code, _, err = run(capsys, "fit", str(path), "--target", "grade", "--out", str(tmp_path / "m"))
    assert code == 2 and "--categorical city" in err and "categorical=[" not in err
    path = _bad_csv(tmp_path, "s.csv",
                    lambda df: df.assign(grade=np.array(["p", "q", "r"])[df.grade]))
    code, _, err = run(capsys, "fit", str(path), "--target", "grade", "--out", str(tmp_path / "m"))
    assert code == 2 and "--levels" in err


def test_options_of_the_other_estimator_are_refused(files, capsys, tmp_path):
    d, _ = files
    code, _, err = run(capsys, "fit", str(d / "train.csv"), "--target", "grade", "--levels",
                       ",".join(LEVELS), "--estimator", "mle", "--n-subsets", "4",
                       "--out", str(tmp_path / "m"))
    assert code == 2 and "--n-subsets apply to --estimator dc or adaptive only" in err
    assert not (tmp_path / "m").exists()
    proc = subprocess.run([sys.executable, "-m", "fedgrain.cli", "summary", "x", "--ci-alpha",
                           "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "between 0 and 1" in proc.stderr


def test_keep_columns_in_order_and_html_into_a_new_folder(files, capsys, tmp_path):
    d, df = files
    assert fit(capsys, d, "m_keep")[0] == 0
    df.assign(extra=1).to_csv(tmp_path / "x.csv", index=False)
    code, _, _ = run(capsys, "predict", str(d / "m_keep"), str(tmp_path / "x.csv"), "--out",
                     str(tmp_path / "p.csv"), "--keep", "id,extra")
    assert code == 0
    assert list(pd.read_csv(tmp_path / "p.csv").columns[:3]) == ["id", "extra", "predicted"]
    code, _, _ = run(capsys, "summary", str(d / "m_keep"), "--html",
                     str(tmp_path / "new" / "s.html"))
    assert code == 0 and (tmp_path / "new" / "s.html").exists()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["s.html"]


def test_fit_with_granularity_uses_the_adaptive_estimator(files, capsys, tmp_path):
    from fedgrain import AdaptiveFederatedOrdinal
    from fedgrain.datasets import make_regions

    X, y, *_ = make_regions(6000, n_features=3, n_classes=4, n_regions=2, random_state=1)
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(grade=np.array(LEVELS)[y])
    df.to_csv(tmp_path / "regions.csv", index=False)
    code, out, _ = run(capsys, "--quiet", "fit", str(tmp_path / "regions.csv"), "--target",
                       "grade", "--levels", ",".join(LEVELS), "--granularity", "0.5",
                       "--backend", "serial", "--out", str(tmp_path / "af"))
    assert code == 0 and "Partition: 2 leaves on 1 worker(s)" in out
    code, out, _ = run(capsys, "--quiet", "fit", str(tmp_path / "regions.csv"), "--target",
                       "grade", "--levels", ",".join(LEVELS), "--meta", "fomaml",
                       "--backend", "serial", "--out", str(tmp_path / "af_meta"))
    assert code == 0 and "meta round 1: validation log-loss" in out and "bytes moved" in out
    assert load(tmp_path / "af_meta").meta == "fomaml"
    assert "[0]" in out and "rows" in out  # the tree, one line per node
    model = load(tmp_path / "af")
    assert isinstance(model, AdaptiveFederatedOrdinal) and model.granularity == 0.5
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "af"), str(tmp_path / "regions.csv"),
                       "--target", "grade")
    assert code == 0 and "log_loss" in out
    code, _, _ = run(capsys, "predict", str(tmp_path / "af"), str(tmp_path / "regions.csv"),
                     "--out", str(tmp_path / "p.csv"))
    assert code == 0 and len(pd.read_csv(tmp_path / "p.csv")) == 6000
    # one leaf's table by the node id that evaluate, describe() and the report show
    leaves = [int(n) for n in model.partition_.leaves]
    code, out, _ = run(capsys, "summary", str(tmp_path / "af"), "--leaf", str(leaves[-1]))
    assert code == 0 and out.strip() == str(model.local_models_[-1].summary()).strip()
    code, _, err = run(capsys, "summary", str(tmp_path / "af"), "--leaf", "999")
    assert code == 2 and f"no such leaf; the leaves are {leaves}" in err
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "af"), str(tmp_path / "regions.csv"),
                       "--target", "grade", "--json")
    doc = json.loads(out)
    assert [r["leaf"] for r in doc["per_leaf"]] == leaves
    assert sum(r["rows"] for r in doc["per_leaf"]) == doc["scores"]["rows"] == 6000


@pytest.mark.parametrize("extra, message", [
    (("--estimator", "dc", "--granularity", "0.5"),
     "--granularity applies to --estimator adaptive"),
    (("--estimator", "mle", "--min-subset-size", "100"), "--min-subset-size applies to"),
    (("--estimator", "dc", "--meta", "fomaml", "--stability", "3"),
     "--meta, --stability apply to --estimator adaptive"),
    (("--granularity", "0.5", "--n-subsets", "3"), "--n-subsets applies to --estimator dc"),
    (("--estimator", "adaptive", "--min-subset-size", "5000"), "min_subset_size=5,000 is larger"),
    (("--estimator", "dc", "--meta", "fomaml"), "--meta applies to --estimator adaptive"),
])
def test_adaptive_options_are_checked(files, capsys, tmp_path, extra, message):
    d, _ = files
    code, _, err = fit(capsys, d, "m_refused", *extra)
    assert code == 2 and message in err, err
    assert not (d / "m_refused").exists()


def test_fit_measures_the_stability_of_the_partition_on_request(files, capsys, tmp_path):
    d, _ = files
    code, out, _ = fit(capsys, d, "m_stable", "--granularity", "0.5", "--stability", "3")
    assert code == 0 and "Stability: adjusted Rand index between partitions grown on 3" in out
    assert load(d / "m_stable").partition_.stability_.n_resamples == 3
    code = main(["fit", str(d / "train.parquet"), "--target", "grade", "--drop", "id",
                 "--granularity", "0.5", "--stability", "3", "--out", str(tmp_path / "m_pq")])
    assert code == 2 and "needs them in memory" in capsys.readouterr().err
    assert not (tmp_path / "m_pq").exists()


def test_granularity_outside_the_unit_interval_is_a_usage_error(files, tmp_path):
    d, _ = files
    proc = subprocess.run([sys.executable, "-m", "fedgrain.cli", "fit", str(d / "train.csv"),
                           "--target", "grade", "--granularity", "1.5", "--out",
                           str(tmp_path / "m")], capture_output=True, text=True)
    assert proc.returncode == 2 and "must be a number in [0, 1]; got '1.5'" in proc.stderr


def test_a_bug_exits_1_and_an_open_progress_bar_is_ended_first(capsys, monkeypatch):
    import fedgrain.cli as cli
    from fedgrain.progress import ProgressBar, ProgressEvent

    def broken(args):
        bar = ProgressBar(sys.stderr)
        cli._BARS.append(bar)
        bar(ProgressEvent("fitting leaves", 1, 4, "leaves", 0.1))
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(cli, "_cmd_summary", broken)
    code = cli.main(["summary", "whatever"])
    err = capsys.readouterr().err
    assert code == 1
    assert "\nfedgrain: error: an internal inconsistency" in err


def test_divide_and_conquer_with_another_link_is_fitted_saved_and_refused_for_adaptive(
        files, capsys, tmp_path):
    d, df = files
    code, out, _ = fit(capsys, d, "m_probit", "--estimator", "dc", "--link", "probit")
    assert code == 0
    m = load(d / "m_probit")
    assert m.link == "probit" and m.results_.link == "probit"
    assert "cumulative probit" in m.summary().as_text()
    X = df[["a", "b", "c"]]
    F = m._link().cdf(m.thresholds_[None, :] - (X.to_numpy() @ m.coef_)[:, None])
    np.testing.assert_allclose(m.predict_proba(X, order="levels"),
                               np.diff(F, prepend=0, append=1), atol=1e-12)
    code, _, err = run(capsys, "fit", str(d / "train.csv"), "--target", "grade", "--levels",
                       ",".join(LEVELS), "--granularity", "0.5", "--link", "probit",
                       "--out", str(tmp_path / "m"))
    assert code == 2 and "--link applies to --estimator mle and dc" in err
    assert not (tmp_path / "m").exists()


def test_version_bare_command_and_a_help_that_loads_nothing_heavy(capsys):
    from fedgrain import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fedgrain {__version__}"
    code, out, _ = run(capsys)
    assert code == 0 and "usage: fedgrain" in out and "COMMAND" in out
    # --help answers without importing numpy's heavy users (what made it take seconds)
    probe = ("import sys; from fedgrain.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('sklearn', 'scipy', 'pandas', 'fedgrain.estimators') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_outputs_follow_the_umask_and_gz_is_compressed(files, capsys, tmp_path):
    d, _ = files
    code, _, _ = fit(capsys, d, "m_mask")
    assert code == 0
    old = os.umask(0o027)
    try:
        for name in ("p.csv.gz", "p.parquet"):
            code, _, _ = run(capsys, "predict", str(d / "m_mask"), str(d / "train.csv"),
                             "--out", str(tmp_path / name))
            assert code == 0 and (tmp_path / name).stat().st_mode & 0o777 == 0o640
        code, _, _ = run(capsys, "summary", str(d / "m_mask"), "--html", str(tmp_path / "s.html"))
        assert code == 0 and (tmp_path / "s.html").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert (tmp_path / "p.csv.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the name says
    assert len(pd.read_csv(tmp_path / "p.csv.gz")) == 2000


def test_evaluate_json_has_the_null_model_baseline(files, capsys):
    d, df = files
    code, _, _ = fit(capsys, d, "m_eval")
    assert code == 0
    code, out, _ = run(capsys, "evaluate", str(d / "m_eval"), str(d / "train.csv"),
                       "--target", "grade", "--json")
    doc = json.loads(out)
    shares = df["grade"].value_counts(normalize=True)
    entropy = -float(np.sum(shares * np.log(shares)))
    assert doc["baseline"]["log_loss"] == pytest.approx(entropy, rel=1e-12)
    assert doc["baseline"]["accuracy"] == pytest.approx(shares.max())
    assert doc["skill"]["log_loss"] == pytest.approx(
        1 - doc["scores"]["log_loss"] / doc["baseline"]["log_loss"])
    assert doc["scores"]["log_loss"] < doc["baseline"]["log_loss"] and doc["per_leaf"] is None
    code, out, _ = run(capsys, "evaluate", str(d / "m_eval"), str(d / "train.csv"),
                       "--target", "grade")
    assert code == 0 and "baseline" in out and "a model with no features" in out


@pytest.mark.parametrize("make, option", [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.symlink_to(p.parent / "elsewhere.csv"), "is a symbolic link"),
])
def test_output_paths_are_checked_before_any_work(files, capsys, tmp_path, make, option):
    d, _ = files
    if not (d / "m_paths").exists():
        assert fit(capsys, d, "m_paths")[0] == 0
    target = tmp_path / "pred.csv"
    make(target)
    code, _, err = run(capsys, "predict", str(d / "m_paths"), str(d / "train.csv"), "--out",
                       str(target))
    assert code == 2 and f"--out {target} {option}" in err and ".tmp" not in err
    code, _, err = run(capsys, "summary", str(d / "m_paths"), "--html", str(target))
    assert code == 2 and f"--html {target} {option}" in err
    code, _, err = run(capsys, "predict", str(d / "m_paths"), str(d / "train.csv"), "--out",
                       str(tmp_path / "pred.xlsx"))
    assert code == 2 and "use a .csv, .csv.gz, .tsv or .parquet file name" in err
    # a model folder where a file is: refused before the fit
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "fit", str(d / "train.csv"), "--target", "grade", "--levels",
                       ",".join(LEVELS), "--out", str(tmp_path / "file"), "--force")
    assert code == 2 and "is a file; a model is saved as a folder" in err


def test_main_called_from_python_leaves_the_applications_signal_handling_alone(capsys):
    import signal

    seen = []
    mine = signal.signal(signal.SIGTERM, lambda *a: seen.append(a))
    try:
        def probe(args):
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            assert signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"
            return 0

        import fedgrain.cli as cli

        real = cli._cmd_summary
        cli._cmd_summary = probe
        try:
            assert cli.main(["summary", "whatever"]) == 0
        finally:
            cli._cmd_summary = real
    finally:
        signal.signal(signal.SIGTERM, mine)
