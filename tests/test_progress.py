"""Progress reports (issue 7): logging, the callback, the terminal bar, and the command line."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pandas as pd
import pytest

from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, load
from fedgrain.datasets import make_ordinal, make_regions
from fedgrain.progress import ProgressBar, ProgressEvent


def test_the_callback_sees_every_step_start_advance_and_end():
    X, y, *_ = make_regions(12_000, n_regions=2, random_state=0)
    events: list[ProgressEvent] = []
    model = AdaptiveFederatedOrdinal(meta="reptile", max_rounds=3, backend="serial",
                                     callback=events.append).fit(X, y)
    stages = [e.stage for e in events if e.finished]
    assert stages[:2] == ["checking data", "profiling and partitioning"]
    assert {"placing subsets", "fitting leaves", "refinement rounds",
            "meta-learning (reptile)"} <= set(stages)
    fit = [e for e in events if e.stage == "fitting leaves"]
    done = [e.done for e in fit]  # advanced as each worker's bundle of leaves comes back
    assert done[0] == 0 and done == sorted(done) and done[-1] == model.n_leaves_
    assert fit[-1].finished and fit[-1].total == model.n_leaves_
    rounds = [e for e in events if e.stage.startswith("meta") and e.finished][0]
    assert rounds.done == len(model.history_) and rounds.unit == "rounds"
    placing = [e for e in events if e.stage == "placing subsets"]
    assert placing[-1].done == 12_000 and placing[-1].total == 12_000


def test_steps_are_logged_and_a_saved_model_drops_the_callback(tmp_path, caplog):
    X, y, *_ = make_ordinal(6_000, 3, 3, random_state=1)
    with caplog.at_level(logging.INFO, logger="fedgrain"):
        model = DivideConquerOrdinal(n_subsets=3, backend="serial",
                                     callback=lambda e: None).fit(X, y)
    assert "fitting subsets: 3/3 subsets in" in caplog.text
    assert "refinement rounds: 1/1 rounds in" in caplog.text
    assert load(model.save(tmp_path / "m")).callback is None


def test_a_callback_must_be_callable():
    X, y, *_ = make_ordinal(2_000, 2, 3, random_state=2)
    with pytest.raises(TypeError, match="callback must be callable"):
        DivideConquerOrdinal(n_subsets=2, backend="serial", callback="print").fit(X, y)


def test_streamed_reading_reports_rows(tmp_path):
    X, y, *_ = make_ordinal(150_000, 3, 3, random_state=3)
    pd.DataFrame(X, columns=list("abc")).assign(g=y).to_parquet(tmp_path / "d.parquet")
    events: list[ProgressEvent] = []
    DivideConquerOrdinal(n_subsets=2, backend="serial",
                         callback=events.append).fit(tmp_path / "d.parquet", "g")
    checks = [e for e in events if e.stage == "checking values"]
    assert [e.done for e in checks[1:-1]] == [65_536, 131_072, 150_000]
    assert checks[-1].finished


def test_progress_bar_draws_and_ends_each_step_with_a_newline():
    out = io.StringIO()
    bar = ProgressBar(out, width=10, min_interval=0.0)
    bar(ProgressEvent("fitting leaves", 0, 4, "leaves", 0.0))
    bar(ProgressEvent("fitting leaves", 2, 4, "leaves", 0.5))
    bar(ProgressEvent("fitting leaves", 4, 4, "leaves", 1.0, finished=True))
    text = out.getvalue()
    assert "|#####     | 2/4 leaves" in text and "|##########| 4/4 leaves" in text
    assert "<" in text.split("2/4 leaves")[1].split("\r")[0]  # elapsed<remaining: an ETA
    assert text.endswith("\n") and text.count("\n") == 1


def test_a_step_stopped_early_ends_its_bar_full_and_nested_bars_go_away():
    out = io.StringIO()
    bar = ProgressBar(out, width=10, min_interval=0.0)
    bar(ProgressEvent("meta-learning", 0, 20, "rounds", 0.0))
    bar(ProgressEvent("fitting leaves", 0, 4, "leaves", 0.0, depth=1))
    bar(ProgressEvent("fitting leaves", 4, 4, "leaves", 0.2, finished=True, depth=1))
    assert 1 not in bar._bars  # the nested bar is gone, its parent stays
    bar(ProgressEvent("meta-learning", 2, 20, "rounds", 0.3))
    bar(ProgressEvent("meta-learning", 2, 20, "rounds", 0.4, finished=True))
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert "|##########| 2/2 rounds" in last and "stopped early" in last
    assert not bar._bars


def test_events_are_written_above_an_open_bar(capsys):
    import sys

    bar = ProgressBar(sys.stderr, min_interval=0.0)
    bar(ProgressEvent("streaming", 10, None, "rows", 0.1))
    bar.write("row 10: leaf 3: drift")
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "row 10: leaf 3: drift\n"
    assert "streaming" in captured.err and "10 rows" in captured.err


def test_cli_bars_only_on_a_terminal_and_never_with_quiet(tmp_path, capsys, monkeypatch):
    from fedgrain.cli import main

    X, y, *_ = make_ordinal(4_000, 3, 3, random_state=4)
    pd.DataFrame(X, columns=list("abc")).assign(g=y).to_csv(tmp_path / "d.csv", index=False)
    args = ["fit", str(tmp_path / "d.csv"), "--target", "g", "--backend", "serial",
            "--n-subsets", "2", "--force", "--out", str(tmp_path / "m")]
    assert main(args) == 0
    assert "[#" not in capsys.readouterr().err  # captured stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "fitting subsets" in err and "2/2 subsets" in err
    assert main(["--quiet", *args]) == 0
    assert capsys.readouterr().err == ""
    ref = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(X, y)
    np.testing.assert_allclose(load(tmp_path / "m").coef_, ref.coef_)
