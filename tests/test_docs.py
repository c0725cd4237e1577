"""The examples in the docstrings run and give what they show; every public class has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import fedgrain

MODULES = sorted(m.name for m in pkgutil.walk_packages(fedgrain.__path__, "fedgrain."))

#: The classes users meet: the estimators and results, the backends, the detectors, the
#: progress reports, the streamed data source, the partition and the profile.
PUBLIC = [
    "fedgrain.AdaptiveFederatedOrdinal", "fedgrain.DivideConquerOrdinal",
    "fedgrain.OrdinalRegression", "fedgrain.OrdinalResults", "fedgrain.MixedOrdinalRegression",
    "fedgrain.inference.results.Summary", "fedgrain.inference.results.WaldTest",
    "fedgrain.inference.results.LRTest", "fedgrain.inference.results.LabelledResults",
    "fedgrain.inference.po_tests.ProportionalOddsTest",
    "fedgrain.estimators.models.LeafModel",
    "fedgrain.backends.base.Backend", "fedgrain.backends.SerialBackend",
    "fedgrain.backends.ProcessesBackend", "fedgrain.backends.dask.DaskBackend",
    "fedgrain.monitor.base.Detector", "fedgrain.monitor.ADWIN", "fedgrain.monitor.PageHinkley",
    "fedgrain.progress.ProgressEvent", "fedgrain.progress.ProgressBar",
    "fedgrain.data.DatasetSource", "fedgrain.partition.tree.PartitionTree",
    "fedgrain.partition.profile.DataProfile", "fedgrain.data.FeatureSchema",
    "fedgrain.data.TargetEncoding",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} example(s) failed in {name}"


@pytest.mark.parametrize("path", PUBLIC)
def test_public_classes_have_examples(path):
    module, _, name = path.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    assert inspect.isclass(obj)
    assert ">>>" in (obj.__doc__ or ""), f"{path} has no example in its docstring"


def test_speed_figures_in_readme_and_guide_are_those_of_the_benchmark_page():
    """Every speed ratio quoted in the README or the guide ("108 times", "4.5x"), and every
    four-decimal figure in a paragraph that cites the benchmark page, appears on
    docs/benchmarks.md, where the command that measured it is given."""
    import re

    root = Path(__file__).resolve().parents[1]
    bench = (root / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    ratio = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(?:x\b|\s*times\b)")
    quoted = [(name, m.group(1)) for name in ("README.md", "docs/guide.md")
              for m in ratio.finditer((root / name).read_text(encoding="utf-8"))]
    assert quoted  # the README quotes at least the speed against statsmodels
    missing = [(name, f) for name, f in quoted if f"{f}x" not in bench]
    # and every figure given to four decimals in a paragraph that cites the benchmark page
    for name in ("README.md", "docs/guide.md"):
        for para in re.split(r"\n\s*\n", (root / name).read_text(encoding="utf-8")):
            if "benchmarks.md" in para:
                missing += [(name, f) for f in re.findall(r"(?<![\w.])\d+\.\d{4}(?!\d)", para)
                            if f not in bench]
    assert not missing, f"figures not on docs/benchmarks.md: {missing}"
