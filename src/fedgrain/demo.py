"""``fedgrain demo``: the whole pipeline on real data, offline, in well under two minutes.

On the RAND Health Insurance Experiment (20,190 people, self-rated health in four levels):

1. the patent's static division (``DivideConquerOrdinal``) beside the exact centralized fit;
2. ``AdaptiveFederatedOrdinal``: profile, partition at granularity 0.5, schedule, local fits,
   pooling with inference, FO-MAML meta-learning, held-out scores against the other two;
3. a simulated stream: held-out people drawn again in batches, with a change half way (in one
   leaf the answers turn around), watched by the monitor;
4. the HTML report, the saved model, a reload and predictions, and the commands to try next.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .datasets import load_randhie
from .estimators import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression, load
from .metrics import ordinal_scores

#: People for training, held-out scoring, and the stream's pool.
N_TRAIN, N_TEST = 12_000, 4_000
STREAM_ROWS, STREAM_BATCH = 24_000, 1_000


def _scores_table(rows: dict[str, dict]) -> str:
    frame = pd.DataFrame(rows).T[["log_loss", "rps", "accuracy", "mae"]]
    frame.columns = ["log-loss", "RPS", "accuracy", "mean abs. class error"]
    return frame.to_string(float_format=lambda v: f"{v:8.4f}")


def run_demo(out: Path, n_jobs: int | None = None, log: Callable[[str], None] = print,
             callback=None) -> Path:
    """Run the demo, writing into ``out``; returns the saved model's path.

    Writes ``out/randhie.csv`` (the data, for the command-line steps), ``out/model/`` (the
    adaptive model after the stream), ``out/report.html`` and ``out/predictions.csv``.
    ``callback`` receives the progress events of the fits (see :mod:`fedgrain.progress`).
    """
    t_start = time.perf_counter()
    frame = load_randhie()
    X, y = frame.drop(columns="health"), frame["health"]
    levels = list(y.cat.categories)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(frame))
    tr, te, pool = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_TEST], order[N_TRAIN + N_TEST:]
    Xtr, ytr, Xte, yte = X.iloc[tr], y.iloc[tr], X.iloc[te], y.iloc[te]
    print(f"RAND Health Insurance Experiment: {len(frame):,} people, self-rated health "
          f"({' < '.join(levels)}), {X.shape[1]} features. {N_TRAIN:,} people train the "
          f"models, {N_TEST:,} are held out, the other {len(pool):,} feed a stream.\n")
    dc, mle = _static_division(Xtr, ytr, n_jobs, callback)
    af = _adaptive_partition(Xtr, ytr, n_jobs, callback)
    codes = af.target_.encode(yte)
    print("\nHeld-out people:")
    print(_scores_table({
        "centralized (exact)": ordinal_scores(codes, mle.predict_proba(Xte, order="levels")),
        "divide and conquer": ordinal_scores(codes, dc.predict_proba(Xte, order="levels")),
        "adaptive + FO-MAML": ordinal_scores(codes, af.predict_proba(Xte, order="levels")),
    }))
    turned = _stream_with_a_change(af, X.iloc[pool], y.iloc[pool], levels, rng)
    # the held-out people of the changed leaf now answer the other way round too: the report
    # scores the model on the world as the stream left it
    turn = turned(Xte)
    yte_now = pd.Series(np.where(turn, _reversed(yte, levels), yte), index=yte.index,
                        dtype=yte.dtype)
    model_dir = _report_save_reload(af, frame, Xte, yte_now, levels, out,
                                    source=f"the {N_TEST:,} held-out people, those of the "
                                           f"changed leaf ({int(turn.sum()):,}) answering the "
                                           "other way round as the stream does now")
    log(f"demo finished in {time.perf_counter() - t_start:.0f} s")
    return model_dir


def _static_division(Xtr: pd.DataFrame, ytr: pd.Series, n_jobs: int | None,
                     callback) -> tuple[DivideConquerOrdinal, OrdinalRegression]:
    """Part 1: the patent's static division beside the exact centralized fit."""
    print("== 1. Divide and conquer (the patent's static division) and the exact fit ==\n")
    t0 = time.perf_counter()
    dc = DivideConquerOrdinal(n_subsets=4, n_jobs=n_jobs, callback=callback).fit(Xtr, ytr)
    t_dc = time.perf_counter() - t0
    t0 = time.perf_counter()
    mle = OrdinalRegression().fit(Xtr, ytr)
    t_mle = time.perf_counter() - t0
    a, b = dc.results_, mle.results_
    side = pd.DataFrame(
        {"divide&conquer": a.params, "se (cluster)": a.bse, "centralized MLE": b.params,
         "se (model)": b.bse, "difference / se": (a.params - b.params) / b.bse},
        index=pd.Index(a.param_names, name="parameter"),
    )
    print(side.to_string(float_format=lambda v: f"{v:10.4f}"))
    print(f"\nDivideConquerOrdinal ({dc.n_subsets_} random subsets, pooled with de-biasing and "
          f"inverse-variance weights): {t_dc:.2f} s; OrdinalRegression: {t_mle:.2f} s.")
    print(f"Do the insurance-plan variables matter jointly? "
          f"{dc.results_.wald_test(['lncoins', 'idp', 'lpi', 'fmde'])}")
    return dc, mle


def _adaptive_partition(Xtr: pd.DataFrame, ytr: pd.Series, n_jobs: int | None,
                        callback) -> AdaptiveFederatedOrdinal:
    """Part 2: the adaptive partition and the meta-learner, described leaf by leaf."""
    print("\n== 2. Adaptive partition and federated meta-learning ==\n")
    t0 = time.perf_counter()
    af = AdaptiveFederatedOrdinal(granularity=0.5, meta="fomaml", n_jobs=n_jobs,
                                  callback=callback).fit(Xtr, ytr)
    t_af = time.perf_counter() - t0
    tree = af.partition_
    print(f"Profiled and split into {af.n_leaves_} leaves (granularity 0.5), scheduled on "
          f"{af.schedule_.n_workers} worker(s), load imbalance {af.schedule_.imbalance:.3f}; "
          f"fitted in {t_af:.2f} s:")
    print("\n".join("  " + line for line in tree.describe()))
    t0 = time.perf_counter()
    stab = af.stability(Xtr, ytr)  # kept with the tree: the report shows it
    print(f"Stability ({time.perf_counter() - t0:.1f} s): {stab.describe()}.")
    gm = af.global_model_
    print(f"Heterogeneity between the leaves: Q = {gm.q_:.1f} on {gm.q_df_} df "
          f"(p = {gm.q_pvalue_:.3g}), I^2 = {gm.i2_:.2f}.")
    names = list(af.profile_.feature_names) if hasattr(af.profile_, "feature_names") else []
    for pos, nid in enumerate(tree.leaves):
        lp = af.profile_.leaves.get(nid)
        top = (f"; most important: {names[int(np.argmax(lp.importance))]}"
               if lp is not None and names else "")
        print(f"  leaf {nid}: {int(tree.sizes[pos]):,} people{top}")
    for h in af.history_:
        pull = "none" if h["rho"] is None else f"{h['rho']:.3g} pseudo-rows"
        print(f"  meta round {h['round']}: validation log-loss {h['val_loss']:.4f} "
              f"(global model as it is: {h['no_adaptation_loss']:.4f}), pull {pull}, "
              f"{h['bytes']:,} bytes moved")
    return af


def _reversed(y: pd.Series, levels: list) -> pd.Categorical:
    """The answers the other way round (the first level for the last, and so on)."""
    return pd.Categorical.from_codes(len(levels) - 1 - y.cat.codes.to_numpy(),
                                     categories=levels, ordered=True)


def _stream_with_a_change(af: AdaptiveFederatedOrdinal, Xp: pd.DataFrame, yp: pd.Series,
                          levels: list, rng: np.random.Generator):
    """Part 3: rows drawn from the pool in batches; half way, one leaf's answers turn around.
    Returns the rule that says which rows turned (the changed leaf of the model before)."""
    print("\n== 3. A stream with a change ==\n")
    draw = rng.integers(0, len(Xp), STREAM_ROWS)
    Xs = Xp.iloc[draw].reset_index(drop=True)
    ys = yp.iloc[draw].reset_index(drop=True)
    leaf_of = af.apply(Xs)  # leaf ids
    ids, counts = np.unique(leaf_of, return_counts=True)
    changed_leaf = int(ids[counts.argmax()])
    half = STREAM_ROWS // 2
    turn = (np.arange(STREAM_ROWS) >= half) & (leaf_of == changed_leaf)
    ys = pd.Series(np.where(turn, _reversed(ys, levels), ys), dtype=ys.dtype)
    print(f"{STREAM_ROWS:,} rows drawn from the stream pool, in batches of {STREAM_BATCH:,}; "
          f"from row {half:,} on, the people of leaf {changed_leaf} answer "
          "the other way round (excellent <-> poor, good <-> fair).")
    before = copy.deepcopy(af)
    seen = len(af.events_)
    t0 = time.perf_counter()
    for s in range(0, STREAM_ROWS, STREAM_BATCH):
        af.partial_fit(Xs.iloc[s:s + STREAM_BATCH], ys.iloc[s:s + STREAM_BATCH])
        for e in af.events_[seen:]:
            print(f"  row {e['rows_seen']:,}: leaf {e['leaf']}: {e['kind']} ({e['detail']})")
        seen = len(af.events_)
    refitted = sorted({e["leaf"] for e in af.events_ if e["kind"] == "refit"})
    print(f"Streamed in {time.perf_counter() - t0:.2f} s: every batch updated the leaves' "
          f"models (each with the forgetting rate that predicted best); refitted after drift: "
          f"leaf {', '.join(str(n) for n in refitted) or 'none'}.")
    last = np.flatnonzero(turn)[-2_000:]
    lc = af.target_.encode(ys.iloc[last])
    was = ordinal_scores(lc, before.predict_proba(Xs.iloc[last], order="levels"))["log_loss"]
    now = ordinal_scores(lc, af.predict_proba(Xs.iloc[last], order="levels"))["log_loss"]
    print(f"Log-loss on the changed leaf's last 2,000 rows: {was:.3f} for the model before "
          f"the stream, {now:.3f} after it adapted.")
    return lambda X: before.apply(X) == changed_leaf


def _report_save_reload(af: AdaptiveFederatedOrdinal, frame: pd.DataFrame, Xte: pd.DataFrame,
                        yte: pd.Series, levels: list, out: Path, source: str) -> Path:
    """Part 4: the report, the saved model, a reload and predictions, and what to try next."""
    print("\n== 4. Report, save, reload, predict ==\n")
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "randhie.csv", index=False)
    report = af.report(out / "report.html", Xte, yte, source=source)
    model_dir = af.save(out / "model", overwrite=True)
    again = load(model_dir)
    proba = again.predict_proba(Xte, order="levels")
    assert np.array_equal(proba, af.predict_proba(Xte, order="levels"))
    pred = pd.DataFrame(proba, columns=[f"proba_{c}" for c in again.levels_])
    pred.insert(0, "predicted", again.predict(Xte))
    pred.to_csv(out / "predictions.csv", index=False)
    print(f"Saved the adaptive model to {model_dir}, loaded it back and predicted the held-out "
          f"people: {out / 'predictions.csv'}.")
    print(f"\nThe report (partition, coefficients, leaves, meta-learning, drift): "
          f"{report.resolve()}")
    print("\nTry the command line next:\n"
          f"  fedgrain summary {model_dir}\n"
          f"  fedgrain evaluate {model_dir} {out / 'randhie.csv'} --target health\n"
          f"  fedgrain report {model_dir} --out {out / 'report2.html'}\n"
          f"  fedgrain fit {out / 'randhie.csv'} --target health --levels {','.join(levels)} "
          f"--granularity 0.5 --meta fomaml --out {out / 'model2'}")
    return model_dir
