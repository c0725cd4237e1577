"""``fedgrain demo``: the whole workflow on real data, offline, in a few seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .datasets import load_randhie
from .estimators import DivideConquerOrdinal, OrdinalRegression, load
from .metrics import ordinal_scores


def run_demo(out: Path, n_jobs: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Fit the RAND HIE health data both ways, compare, save, reload and predict.

    Writes ``out/randhie.csv`` (the data, so the command-line steps can be tried next),
    ``out/model/`` (the saved model) and ``out/predictions.csv``. Returns the model path.
    """
    frame = load_randhie()
    X, y = frame.drop(columns="health"), frame["health"]
    print(f"RAND Health Insurance Experiment: {len(frame):,} people, self-rated health "
          f"({' < '.join(y.cat.categories)}), {X.shape[1]} features.\n")

    t0 = time.perf_counter()
    dc = DivideConquerOrdinal(n_subsets=4, backend="processes", n_jobs=n_jobs).fit(X, y)
    t_dc = time.perf_counter() - t0
    t0 = time.perf_counter()
    mle = OrdinalRegression().fit(X, y)
    t_mle = time.perf_counter() - t0

    print(dc.summary())
    a, b = dc.results_, mle.results_
    side = pd.DataFrame(
        {"divide&conquer": a.params, "se (cluster)": a.bse, "centralized MLE": b.params,
         "se (model)": b.bse, "difference / se": (a.params - b.params) / b.bse},
        index=pd.Index(a.param_names, name="parameter"),
    )
    print("\nSide by side with the centralized exact fit (OrdinalRegression):")
    print(side.to_string(float_format=lambda v: f"{v:10.4f}"))
    print("The two estimate the same parameters when the proportional-odds model holds, but"
          " weigh the cut\npoints differently (composite vs exact likelihood): differences of"
          " about one standard error are\nexpected; much larger ones suggest the odds are not"
          " proportional for that feature.")
    print(f"\nDivideConquerOrdinal ({dc.n_subsets_} subsets): {t_dc:.2f} s; "
          f"OrdinalRegression: {t_mle:.2f} s.")
    test = dc.results_.wald_test(["lncoins", "idp", "lpi", "fmde"])
    print(f"Do the insurance-plan variables matter jointly? {test}")

    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "randhie.csv", index=False)
    model_dir = dc.save(out / "model", overwrite=True)
    again = load(model_dir)
    proba = again.predict_proba(X)
    assert np.array_equal(proba, dc.predict_proba(X))
    pred = pd.DataFrame(proba, columns=[f"proba_{c}" for c in again.classes_])
    pred.insert(0, "predicted", again.predict(X))
    pred.to_csv(out / "predictions.csv", index=False)
    scores = ordinal_scores(again.target_.encode(y), proba)
    print(f"\nSaved the model to {model_dir}, loaded it back and predicted all rows: "
          f"accuracy {scores['accuracy']:.3f}, mean absolute error {scores['mae']:.3f} levels, "
          f"log-loss {scores['log_loss']:.4f}. Predictions: {out / 'predictions.csv'}.")
    print("\nTry the command line next:\n"
          f"  fedgrain summary {model_dir}\n"
          f"  fedgrain predict {model_dir} {out / 'randhie.csv'} --out {out / 'pred.parquet'}\n"
          f"  fedgrain evaluate {model_dir} {out / 'randhie.csv'} --target health\n"
          f"  fedgrain fit {out / 'randhie.csv'} --target health "
          f"--levels {','.join(y.cat.categories)} --out {out / 'model2'}")
    log("demo finished")
    return model_dir
