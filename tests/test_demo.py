"""`fedgrain demo` (what `make demo` runs): the whole pipeline on the RAND HIE data, offline."""

from __future__ import annotations

import pytest

pytest.importorskip("statsmodels")


def test_demo_runs_the_whole_pipeline_and_says_where_the_report_is(tmp_path, capsys):
    from fedgrain import AdaptiveFederatedOrdinal, load
    from fedgrain.cli import main

    assert main(["--quiet", "demo", "--out", str(tmp_path / "d"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    for part in ("== 1. Divide and conquer", "== 2. Adaptive partition", "meta round 1",
                 "Held-out people", "== 3. A stream with a change", "concept drift",
                 "refit", "== 4. Report"):
        assert part in out, part
    report = tmp_path / "d" / "report.html"
    assert f"The report (partition, coefficients, leaves, meta-learning, drift): " \
           f"{report.resolve()}" in out
    page = report.read_text()
    assert '<section id="drift">' in page and "concept drift" in page
    model = load(tmp_path / "d" / "model")
    assert isinstance(model, AdaptiveFederatedOrdinal)
    assert any(e["kind"] == "concept drift" for e in model.events_)
    # the stationary half raised nothing: every event comes after the change, in one leaf
    assert {e["leaf"] for e in model.events_ if e["leaf"] != -1} == {
        next(e["leaf"] for e in model.events_ if e["kind"] == "concept drift")}
    assert min(e["rows_seen"] for e in model.events_) >= 12_000
