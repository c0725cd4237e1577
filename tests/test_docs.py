"""The examples in the docstrings run and give what they show; every public class has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

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
    "fedgrain.data.streamed.ParquetSource", "fedgrain.partition.tree.PartitionTree",
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
