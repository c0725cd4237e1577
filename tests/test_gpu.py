"""The passes on a device (PyTorch): equal to the CPU passes; ``device="cuda"`` where a GPU is
present, and the same tensor code on the CPU where PyTorch is installed without one. Skipped
cleanly where PyTorch is missing."""

from __future__ import annotations

import numpy as np
import pytest

from fedgrain.core.likelihood import composite_pass, exact_pass
from fedgrain.exceptions import ParameterError

torch = pytest.importorskip("torch")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(n=3000, p=4, K=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * [1.0, 3.0, 0.5, 10.0][:p]
    y = rng.integers(0, K, n)
    w = rng.uniform(0.2, 2.0, n)
    beta = 0.2 * rng.standard_normal(p)
    theta = np.sort(rng.standard_normal(K - 1))
    return X, y, w, beta, theta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_device_passes_equal_the_cpu_passes(device, weighted):
    from fedgrain.core.gpu import DeviceRows

    X, y, w, beta, theta = _data()
    w = w if weighted else None
    rows = DeviceRows(X, y, w, device)
    shift = X.mean(axis=0)
    for meat in (False, True):
        a = exact_pass(X, y, w, beta, theta, meat=meat, shift=shift)
        b = rows.exact_pass(beta, theta, meat=meat, shift=shift)
        for f in ("loss", "grad", "hess", "meat"):
            if getattr(a, f) is not None:
                np.testing.assert_allclose(getattr(b, f), getattr(a, f), rtol=1e-10,
                                           atol=1e-9, err_msg=f)
    for meat in (None, "cluster", "row"):
        a = composite_pass(X, y, w, beta, theta, thresholds=[0, 2], meat=meat)
        b = rows.composite_pass(beta, theta, thresholds=[0, 2], meat=meat)
        for f in ("loss", "grad", "hess", "meat"):
            if getattr(a, f) is not None:
                np.testing.assert_allclose(getattr(b, f), getattr(a, f), rtol=1e-10,
                                           atol=1e-9, err_msg=f)


def test_asking_for_a_device_that_is_not_there_is_a_clear_error():
    from fedgrain.core.gpu import torch_device

    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="needs a CUDA GPU, and PyTorch sees none"):
            torch_device("cuda")
    with pytest.raises(ParameterError, match="device must be"):
        torch_device("tpu")


@pytest.mark.parametrize("device", DEVICES)
def test_the_exact_fit_on_a_device_equals_the_cpu_fit(device):
    from fedgrain import OrdinalRegression
    from fedgrain.datasets import load_randhie

    df = load_randhie().sample(5000, random_state=0)
    X, y = df.drop(columns="health"), df["health"]
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    for kw, fit_kw in (({}, {}), ({"alpha": 0.01}, {"sample_weight": w}),
                       ({"variance": "sandwich"}, {})):
        cpu = OrdinalRegression(**kw).fit(X, y, **fit_kw)
        dev = OrdinalRegression(device=device, **kw).fit(X, y, **fit_kw)
        np.testing.assert_allclose(dev.results_.params, cpu.results_.params, rtol=1e-8,
                                   atol=1e-10)
        np.testing.assert_allclose(dev.bse_, cpu.bse_, rtol=1e-8)
        assert dev.loglik_ == pytest.approx(cpu.loglik_, rel=1e-12)


def test_input_on_a_gpu_is_fitted_there_and_other_links_are_refused():
    from fedgrain import OrdinalRegression

    X, y, *_ = _data(n=2000, p=3)
    with pytest.raises(ParameterError, match="runs the logit model's passes"):
        OrdinalRegression(device="cpu", link="probit").fit(X, y)
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: a CUDA tensor cannot be made")
    Xt = torch.as_tensor(X, device="cuda")
    m = OrdinalRegression().fit(Xt, torch.as_tensor(y, device="cuda"))
    ref = OrdinalRegression().fit(X, y)
    np.testing.assert_allclose(m.coef_, ref.coef_, rtol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_divide_and_conquer_on_a_device_equals_the_cpu_fit(device):
    from fedgrain import DivideConquerOrdinal
    from fedgrain.datasets import load_randhie

    df = load_randhie().sample(8000, random_state=1)
    X, y = df.drop(columns="health"), df["health"]
    for kw in ({}, {"alpha": "cv", "refine_rounds": 3}):
        cpu = DivideConquerOrdinal(n_subsets=4, backend="serial", **kw).fit(X, y)
        dev = DivideConquerOrdinal(n_subsets=4, backend="serial", device=device, **kw).fit(X, y)
        np.testing.assert_allclose(dev.results_.params, cpu.results_.params, rtol=1e-8,
                                   atol=1e-10)
        np.testing.assert_allclose(dev.bse_, cpu.bse_, rtol=1e-7)
    with pytest.raises(ParameterError, match="backend='serial'"):
        DivideConquerOrdinal(backend="processes", device=device).fit(X, y)


def test_device_settings_save_and_blocks_shrink_with_the_levels(tmp_path):
    from fedgrain import OrdinalRegression, load
    from fedgrain.core.gpu import DeviceRows

    X, y, *_ = _data(n=2000, p=3)
    m = OrdinalRegression(device=torch.device("cpu")).fit(X, y)
    back = load(m.save(tmp_path / "m"))
    assert back.device == "cpu"
    np.testing.assert_array_equal(back.predict_proba(X), m.predict_proba(X))
    rows = DeviceRows(X, y, None, "cpu")
    assert rows._block(99) * (3 + 4 * 99) <= 1 << 25 and rows._block(3) == 1 << 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_rows_on_a_gpu_pick_it_where_the_model_can_and_the_cpu_otherwise():
    from fedgrain import DivideConquerOrdinal, OrdinalRegression

    X, y, *_ = _data(n=4000, p=3)
    Xt = torch.as_tensor(X, device="cuda")
    probit = OrdinalRegression(link="probit").fit(Xt, y)  # on the CPU: no error
    np.testing.assert_allclose(probit.coef_, OrdinalRegression(link="probit").fit(X, y).coef_)
    dc = DivideConquerOrdinal(n_subsets=2, backend="serial")
    dc.fit(Xt, y)
    assert dc._input_device.startswith("cuda")
    ref = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(X, y)
    np.testing.assert_allclose(dc.results_.params, ref.results_.params, rtol=1e-8, atol=1e-10)
    with pytest.raises(ParameterError, match="GPU\\(s\\) here"):
        OrdinalRegression(device=f"cuda:{torch.cuda.device_count()}").fit(X, y)
