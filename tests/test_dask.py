"""The Dask backend (issue 6, first part): a real LocalCluster on 127.0.0.1, started and stopped
by the tests; the same numbers as the other backends."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal
from fedgrain.backends.dask import DaskBackend
from fedgrain.datasets import make_ordinal, make_regions
from fedgrain.exceptions import FedgrainError


@pytest.fixture(scope="module")
def dask_backend():
    backend = DaskBackend(n_workers=2)
    yield backend
    backend.close()


@pytest.fixture
def force_processes(monkeypatch):
    from fedgrain.backends import processes

    monkeypatch.setattr(processes, "MIN_PARALLEL_WORK", 0)


def test_divide_and_conquer_on_dask_equals_processes(dask_backend, force_processes):
    X, y, *_ = make_ordinal(20_000, 6, 4, random_state=1)
    a = DivideConquerOrdinal(n_subsets=4, backend=dask_backend, random_state=3).fit(X, y)
    b = DivideConquerOrdinal(n_subsets=4, backend="processes", n_jobs=2, random_state=3).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.cov_, b.cov_, rtol=0, atol=1e-10)
    assert dask_backend.client is not None  # a backend passed in is left open


def test_adaptive_meta_learner_on_dask_equals_processes(dask_backend, force_processes):
    X, y, *_ = make_regions(24_000, n_regions=3, random_state=2)
    kw = {"meta": "fomaml", "max_rounds": 3, "random_state": 3}
    a = AdaptiveFederatedOrdinal(backend=dask_backend, **kw).fit(X, y)
    b = AdaptiveFederatedOrdinal(backend="processes", n_jobs=2, **kw).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    assert [h["val_loss"] for h in a.history_] == [h["val_loss"] for h in b.history_]
    assert [h["bytes"] for h in a.history_] == [h["bytes"] for h in b.history_]
    for ma, mb in zip(a.local_models_, b.local_models_, strict=True):
        np.testing.assert_allclose(ma.coef_, mb.coef_, rtol=0, atol=1e-10)


def test_backend_dask_by_name_starts_and_stops_its_own_cluster():
    X, y, *_ = make_ordinal(6_000, 4, 3, random_state=4)
    model = DivideConquerOrdinal(n_subsets=2, backend="dask", n_jobs=2).fit(X, y)
    ref = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(X, y)
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=0, atol=1e-10)


def test_an_existing_cluster_is_used_and_left_running():
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None)
    try:
        X, y, *_ = make_ordinal(6_000, 4, 3, random_state=5)
        with DaskBackend(scheduler=cluster.scheduler_address) as backend:
            assert backend.n_workers == 2
            DivideConquerOrdinal(n_subsets=2, backend=backend).fit(X, y)
        with Client(cluster.scheduler_address, timeout=10) as client:  # still there
            assert len(client.scheduler_info()["workers"]) == 2
    finally:
        cluster.close()


def test_an_unreachable_scheduler_is_a_clear_error_not_a_hang():
    with pytest.raises(FedgrainError, match="Could not reach the Dask scheduler at "
                                            "tcp://127.0.0.1:9"):
        DaskBackend(scheduler="tcp://127.0.0.1:9", timeout=2)


def test_a_server_that_is_not_a_scheduler_is_refused_quickly_not_hung_on():
    """An HTTP server (which waits for a request) and a server that answers at once with
    other bytes (read by a Dask client as an exabyte frame length): both a clear error."""
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from fedgrain.exceptions import DataError

    web = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    chatty = socket.socket()
    chatty.bind(("127.0.0.1", 0))
    chatty.listen()

    def answer():
        conn, _ = chatty.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        time.sleep(1)
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(DataError, match="sent nothing within 2 s"):
            DaskBackend(scheduler=f"tcp://127.0.0.1:{web.server_port}", timeout=2)
        assert time.monotonic() - t0 < 10
        with pytest.raises(DataError, match=r"does not answer as a Dask scheduler \(it sent "
                                            r"'HTTP/1.1'\)"):
            DaskBackend(scheduler=f"127.0.0.1:{chatty.getsockname()[1]}", timeout=2)
    finally:
        web.shutdown()
        chatty.close()


def test_missing_extra_names_it(monkeypatch):
    import builtins

    from fedgrain.backends import dask as dask_module

    real = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name.startswith("dask"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(FedgrainError, match=r"pip install 'fedgrain\[dask\]'"):
        dask_module._distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fit_through_a_scheduler_and_two_workers_started_as_processes(tmp_path, capsys):
    """The operations guide's set-up: `dask scheduler`, two `dask worker`s, then
    `fedgrain fit --backend dask --scheduler ...`; all on 127.0.0.1."""
    import subprocess
    import sys

    import pandas as pd
    from dask.distributed import Client

    from fedgrain import load
    from fedgrain.cli import main

    dask_cli = [sys.executable, "-m", "dask"]
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen(dask_cli + ["scheduler", "--host", "127.0.0.1", "--port",
                                          str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(
                dask_cli + ["worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                            "--no-dashboard"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        X, y, *_ = make_ordinal(8_000, 3, 4, random_state=6)
        frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(grade=y)
        frame.to_csv(tmp_path / "d.csv", index=False)
        code = main(["--quiet", "fit", str(tmp_path / "d.csv"), "--target", "grade",
                     "--backend", "dask", "--scheduler", address, "--n-subsets", "2",
                     "--out", str(tmp_path / "m")])
        assert code == 0, capsys.readouterr().err
        ref = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(frame[["a", "b", "c"]],
                                                                       frame["grade"])
        np.testing.assert_allclose(load(tmp_path / "m").coef_, ref.coef_, rtol=0, atol=1e-10)
        with Client(address, timeout=10) as client:  # the cluster keeps running
            assert len(client.scheduler_info()["workers"]) == 2
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


from distributed import WorkerPlugin  # noqa: E402


class _KillFirstBundle(WorkerPlugin):
    """A worker plugin that kills its worker process (SIGKILL) when the first bundle of fit
    tasks starts executing anywhere in the cluster (a flag file makes it once only)."""

    name = "fedgrain-kill-first-bundle"

    def __init__(self, flag: str):
        self.flag = flag

    def transition(self, key, start, finish, **kwargs):
        import os
        import signal

        if finish == "executing" and "run_bundle" in str(key):
            try:
                fd = os.open(self.flag, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("estimator", ["dc", "meta"])
@pytest.mark.parametrize("placement", ["files", "scattered"])
def test_a_worker_killed_during_the_fit_does_not_change_the_model(tmp_path, estimator,
                                                                  placement):
    """Shards in files (a cluster that sees this machine's files): Dask loads the dead worker's
    shards again elsewhere and reruns its tasks. Scattered shards (a cluster started elsewhere):
    fedgrain sends them again from its copy and resends the tasks."""
    import sys

    import cloudpickle
    from dask.distributed import LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    X, y, *_ = make_regions(16_000, n_regions=2, random_state=6)
    make = ((lambda b: DivideConquerOrdinal(n_subsets=4, backend=b, random_state=1))
            if estimator == "dc" else
            (lambda b: AdaptiveFederatedOrdinal(meta="reptile", max_rounds=3, backend=b,
                                                random_state=1)))
    reference = make("serial").fit(X, y)
    cluster = None
    if placement == "files":
        backend = DaskBackend(n_workers=2)
    else:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None)
        backend = DaskBackend(scheduler=cluster.scheduler_address)
    try:
        backend.client.register_plugin(_KillFirstBundle(str(tmp_path / "killed")))
        model = make(backend).fit(X, y)
        assert (tmp_path / "killed").exists()  # a worker really died during the fit
        if placement == "scattered":
            assert backend.resent_ >= 1
    finally:
        backend.close()
        if cluster is not None:
            cluster.close()
    np.testing.assert_allclose(model.coef_, reference.coef_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.cov_, reference.cov_, rtol=0, atol=1e-10)


def _scheduler_and_worker():
    """A `dask scheduler` and one `dask worker` as separate processes on 127.0.0.1."""
    import subprocess
    import sys

    port = _free_port()
    sched = subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--no-dashboard"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "dask", "worker",
                               f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard",
                               "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"tcp://127.0.0.1:{port}", sched, worker


def _long_meta_fit(backend, rounds):
    X, y, *_ = make_regions(12_000, n_regions=2, random_state=7)
    model = AdaptiveFederatedOrdinal(meta="fomaml", max_rounds=rounds, meta_tol=0.0,
                                     backend=backend, random_state=0)
    return model, X, y


# 0.3 s: while shards are placed; 1.5 s: during the rounds.
@pytest.mark.parametrize("after", [0.3, 1.5])
def test_a_lost_scheduler_is_a_clear_error_not_a_hang(after):
    import threading
    import time

    address, sched, worker = _scheduler_and_worker()
    try:
        backend = DaskBackend(scheduler=address, timeout=20)
        backend.client.wait_for_workers(1, timeout=20)
        model, X, y = _long_meta_fit(backend, 50)
        threading.Timer(after, sched.kill).start()
        start = time.monotonic()
        with pytest.raises(FedgrainError, match="Lost the Dask scheduler at tcp://127.0.0.1"):
            model.fit(X, y)
        assert time.monotonic() - start < after + 10  # noticed at once, not at the timeout
        backend.close()
    finally:
        for proc in (worker, sched):
            proc.kill()
            proc.wait(timeout=10)


def test_out_of_core_on_dask_loads_shards_on_the_workers(tmp_path, dask_backend,
                                                         force_processes):
    import pandas as pd

    X, y, *_ = make_regions(20_000, n_regions=2, random_state=8)
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(X.shape[1])]).assign(grade=y)
    frame.to_parquet(tmp_path / "d.parquet", row_group_size=3_000)
    kw = {"meta": "fomaml", "max_rounds": 3, "random_state": 2}
    a = AdaptiveFederatedOrdinal(backend=dask_backend, **kw).fit(tmp_path / "d.parquet", "grade")
    b = AdaptiveFederatedOrdinal(backend="processes", n_jobs=2, **kw).fit(
        frame.drop(columns="grade"), frame["grade"])
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10)
    assert [h["bytes"] for h in a.history_] == [h["bytes"] for h in b.history_]
    assert not any(dask_backend.spill_folder().iterdir())  # shard files removed after the fit


def test_a_worker_killed_during_an_out_of_core_fit_does_not_change_the_model(tmp_path):
    import sys

    import cloudpickle
    import pandas as pd

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    X, y, *_ = make_ordinal(20_000, 5, 4, random_state=9)
    frame = pd.DataFrame(X, columns=list("abcde")).assign(grade=y)
    frame.to_parquet(tmp_path / "d.parquet")
    reference = DivideConquerOrdinal(n_subsets=4, backend="serial").fit(
        frame.drop(columns="grade"), frame["grade"])
    with DaskBackend(n_workers=2) as backend:
        backend.client.register_plugin(_KillFirstBundle(str(tmp_path / "killed")))
        model = DivideConquerOrdinal(n_subsets=4, backend=backend).fit(tmp_path / "d.parquet",
                                                                       "grade")
        assert (tmp_path / "killed").exists()
    np.testing.assert_allclose(model.coef_, reference.coef_, rtol=0, atol=1e-10)


def test_the_local_cluster_keeps_the_allocators_default(dask_backend):
    """Dask's nanny would set MALLOC_TRIM_THRESHOLD_=65536 in workers, which made fits 1.45x
    slower than on local processes (docs/benchmarks.md); fedgrain's cluster leaves it unset."""
    import os

    values = dask_backend.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert set(values.values()) == {None}


def test_a_fit_refused_early_still_stops_the_cluster_it_started():
    import time

    import psutil

    X, y, *_ = make_ordinal(2_000, 3, 3, random_state=10)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="n_subsets=500 would give subsets"):
        DivideConquerOrdinal(n_subsets=500, backend="dask", n_jobs=2).fit(X, y)
    def ours():  # multiprocessing's resource tracker stays for the process's life
        return {p.pid for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())}

    for _ in range(50):  # the nannies take a moment to go
        left = ours() - before
        if not left:
            break
        time.sleep(0.2)
    assert not left


@pytest.mark.parametrize("after", [0.3, 1.5])
def test_a_scheduler_that_stops_answering_is_a_clear_error_not_a_hang(monkeypatch, after):
    """SIGSTOP keeps the scheduler's connections open but silent, as a network cut would
    (0.3 s: while shards are placed; 1.5 s: during the rounds)."""
    import signal
    import threading
    import time

    from fedgrain.backends import dask as dask_module

    monkeypatch.setattr(dask_module, "PING_SECONDS", 1.0)
    address, sched, worker = _scheduler_and_worker()
    try:
        backend = DaskBackend(scheduler=address, timeout=4)
        backend.client.wait_for_workers(1, timeout=20)
        model, X, y = _long_meta_fit(backend, 200)
        threading.Timer(after, lambda: sched.send_signal(signal.SIGSTOP)).start()
        start = time.monotonic()
        with pytest.raises(FedgrainError, match="does not answer") as info:
            model.fit(X, y)
        assert time.monotonic() - start < 40, str(info.value)
    finally:
        sched.send_signal(signal.SIGCONT)
        for proc in (worker, sched):
            proc.kill()
            proc.wait(timeout=10)
    backend.close()


def test_a_dask_dataframe_is_read_one_partition_at_a_time_never_collected(dask_backend,
                                                                         monkeypatch):
    """On the LocalCluster of the fixture (its client is the default one): the dask frame's
    partitions are computed one at a time, the whole frame never, and the model equals the
    one fitted on the same rows in memory; estimators that hold rows in memory refuse it."""
    import dask.dataframe as dd
    import pandas as pd

    from fedgrain import OrdinalRegression
    from fedgrain.exceptions import DataError

    X, y, *_ = make_regions(12_000, n_regions=2, random_state=3)
    df = pd.DataFrame(X, columns=[f"x{j}" for j in range(X.shape[1])]).assign(grade=y)
    ddf = dd.from_pandas(df, npartitions=6)
    computed = []
    real = type(ddf).compute

    def spy(self, *args, **kwargs):
        computed.append(self.npartitions)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(ddf), "compute", spy)
    a = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(ddf, "grade")
    assert computed and set(computed) == {1}  # partitions only, never the whole frame
    b = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(df, "grade")
    np.testing.assert_allclose(a.results_.params, b.results_.params, atol=1e-10)
    c = AdaptiveFederatedOrdinal(backend="serial").fit(ddf, "grade")
    d = AdaptiveFederatedOrdinal(backend="serial").fit(df, "grade")
    np.testing.assert_allclose(c.global_model_.results_.params,
                               d.global_model_.results_.params, atol=1e-10)
    with pytest.raises(DataError, match="does not collect by itself"):
        OrdinalRegression().fit(ddf, "grade")


def test_predictions_on_a_dask_dataframe_are_lazy_and_equal_the_in_memory_ones(dask_backend,
                                                                              monkeypatch):
    """predict, predict_proba, predict_linear, predict_cumulative_proba and apply on a dask
    DataFrame return dask arrays, one block a partition, computed by the LocalCluster of the
    fixture: nothing is computed when they are called, and computed they equal the predictions
    on the same rows in memory."""
    import dask.array as da
    import dask.dataframe as dd
    import pandas as pd

    from fedgrain.exceptions import DataError

    X, y, *_ = make_regions(9_000, n_regions=2, random_state=5)
    df = pd.DataFrame(X, columns=[f"x{j}" for j in range(X.shape[1])])
    labels = np.array(["low", "mid", "high"])[np.minimum(y, 2)]
    ddf = dd.from_pandas(df, npartitions=4)
    dc = DivideConquerOrdinal(n_subsets=2, backend=dask_backend, levels=["low", "mid", "high"],
                              random_state=0).fit(df, labels)
    ad = AdaptiveFederatedOrdinal(backend="serial", levels=["low", "mid", "high"],
                                  random_state=0).fit(df, labels)
    computed = []
    for cls in {type(ddf), type(dd.from_pandas(df, npartitions=1)["x0"])}:
        real = cls.compute

        def spy(self, *args, _real=real, **kwargs):
            computed.append(type(self).__name__)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "compute", spy)
    lazy = {(type(m).__name__, name): getattr(m, name)(ddf)
            for m in (dc, ad) for name in ("predict", "predict_proba", "predict_linear",
                                           "predict_cumulative_proba")}
    lazy["AdaptiveFederatedOrdinal", "apply"] = ad.apply(ddf)
    assert computed == []  # nothing read, let alone collected
    assert all(isinstance(v, da.Array) and v.numblocks[0] == 4 for v in lazy.values())
    for (owner, name), value in lazy.items():
        model = dc if owner == "DivideConquerOrdinal" else ad
        want = getattr(model, name)(df)
        got = value.compute()  # on the cluster: its client is the default one
        if want.dtype.kind in "OU":
            assert got.tolist() == want.tolist(), (owner, name)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"{owner} {name}")
    assert lazy["DivideConquerOrdinal", "predict_proba"].shape[1] == 3
    with pytest.raises(DataError, match="feature names should match"):
        dc.predict_proba(ddf.rename(columns={"x0": "z"}))
    with pytest.raises(DataError, match="groups= must name a column"):
        ad.predict(ddf, groups=np.zeros(9_000))
