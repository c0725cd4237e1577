"""scikit-learn model selection gives the same answer for labels and codes: ``classes_`` is
sorted (scikit-learn's contract, which its probability scorers assume for the columns of
``predict_proba``) and ``levels_`` keeps the ordinal order; the ordinal scorers read the
levels' order whatever the labels."""

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, cross_val_score

from fedgrain import DivideConquerOrdinal, OrdinalRegression
from fedgrain.datasets import load_randhie
from fedgrain.exceptions import ParameterError
from fedgrain.metrics import SCORERS, ordinal_scores

SCORINGS = ["neg_log_loss", "accuracy", *SCORERS]


@pytest.fixture(scope="module")
def health():
    df = load_randhie().sample(2400, random_state=0)
    cat = df["health"]  # ordered categorical: poor < fair < good < excellent
    X = df.drop(columns="health")
    return X, {"codes": (cat.cat.codes.to_numpy(), {}),
               "strings": (cat.astype(str).to_numpy(), {"levels": list(cat.cat.categories)}),
               "categorical": (cat, {})}


def _scores(make, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {s: cross_val_score(make(), X, y, cv=3,
                                   scoring=SCORERS.get(s, s)) for s in SCORINGS}


@pytest.mark.parametrize("estimator", ["mle", "dc"])
def test_cross_validation_scores_are_the_same_for_labels_and_codes(health, estimator):
    X, ys = health
    out = {}
    for name, (y, kw) in ys.items():
        def make(kw=kw):
            return (OrdinalRegression(**kw) if estimator == "mle" else
                    DivideConquerOrdinal(n_subsets=2, backend="serial", **kw))
        out[name] = _scores(make, X, y)
    for s in SCORINGS:
        np.testing.assert_allclose(out["strings"][s], out["codes"][s], rtol=1e-10)
        np.testing.assert_allclose(out["categorical"][s], out["codes"][s], rtol=1e-10)
    # the ordinal log-loss is scikit-learn's log-loss once the columns are right
    np.testing.assert_allclose(out["strings"]["neg_ordinal_log_loss"],
                               out["strings"]["neg_log_loss"], rtol=1e-10)


def test_grid_search_chooses_the_same_penalty_for_labels_and_codes(health):
    X, ys = health
    chosen = {}
    for name, (y, kw) in ys.items():
        for s in ("neg_log_loss", "neg_ranked_probability_score"):
            g = GridSearchCV(OrdinalRegression(**kw), {"alpha": [0.0, 1.0, 30.0, 300.0]},
                             scoring=SCORERS.get(s, s), cv=3).fit(X, y)
            chosen[name, s] = (g.best_params_["alpha"], round(g.best_score_, 10))
    for s in ("neg_log_loss", "neg_ranked_probability_score"):
        assert chosen["strings", s] == chosen["codes", s] == chosen["categorical", s]


def test_classes_are_sorted_and_levels_keep_the_order(health):
    X, ys = health
    y, kw = ys["strings"]
    m = OrdinalRegression(**kw).fit(X, y)
    assert list(m.levels_) == ["poor", "fair", "good", "excellent"]
    assert list(m.classes_) == sorted(m.levels_)
    by_class = m.predict_proba(X.head(50))
    by_level = m.predict_proba(X.head(50), order="levels")
    for j, c in enumerate(m.classes_):
        np.testing.assert_array_equal(by_class[:, j], by_level[:, list(m.levels_).index(c)])
    # scikit-learn's log-loss with classes_ as labels equals ours on the ordinal columns
    codes = m.target_.encode(y[:50])
    assert log_loss(y[:50], by_class, labels=m.classes_) == pytest.approx(
        ordinal_scores(codes, by_level)["log_loss"], rel=1e-12)
    # predict is the most probable level, intervals follow the chosen order
    assert np.array_equal(m.predict(X.head(50)), m.levels_[by_level.argmax(1)])
    p, lo, hi = m.predict_proba_ci(X.head(5))
    np.testing.assert_allclose(p, by_class[:5])
    p, lo, hi = m.predict_proba_ci(X.head(5), order="levels")
    assert np.all((lo <= p) & (p <= hi))
    np.testing.assert_allclose(p, by_level[:5])
    # the cumulative probabilities are ordinal by nature
    np.testing.assert_allclose(m.predict_cumulative_proba(X.head(5)),
                               np.cumsum(by_level[:5], axis=1)[:, :-1])
    with pytest.raises(ParameterError, match="order must be"):
        m.predict_proba(X.head(2), order="sorted")
    # integer codes: the two orders coincide
    c = OrdinalRegression().fit(X, ys["codes"][0])
    assert list(c.classes_) == list(c.levels_) == [0, 1, 2, 3]


def test_scorers_score_a_foreign_classifier_by_its_classes():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 2))
    y = np.digitize(X[:, 0] + rng.logistic(size=400), [-1, 1])
    clf = LogisticRegression().fit(X, y)
    rps = SCORERS["neg_ranked_probability_score"](clf, X, y)
    assert rps == pytest.approx(-ordinal_scores(y, clf.predict_proba(X))["rps"])
    w = rng.uniform(size=400)
    got = SCORERS["neg_mean_absolute_class_error"](clf, X, y, sample_weight=w)
    assert got == pytest.approx(-np.average(np.abs(clf.predict(X) - y), weights=w))
    with pytest.raises(ValueError, match="label 7"):
        SCORERS["neg_ordinal_log_loss"](clf, X, np.r_[y[:-1], 7])
    assert pd.Series(SCORERS).index.tolist() == ["neg_ranked_probability_score",
                                                 "neg_mean_absolute_class_error",
                                                 "neg_ordinal_log_loss"]


def test_scorers_read_a_pipeline_by_its_models_levels(health):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, ys = health
    y, kw = ys["strings"]
    bare = OrdinalRegression(**kw).fit(X, y)
    pipe = make_pipeline(StandardScaler(), OrdinalRegression(**kw)).fit(X, y)
    for name, scorer in SCORERS.items():
        assert scorer(pipe, X, y) == pytest.approx(scorer(bare, X, y), rel=1e-6), name


def test_lr_test_and_partial_fit_compare_levels_in_their_order(health):
    from fedgrain import AdaptiveFederatedOrdinal
    from fedgrain.exceptions import DataError

    X, ys = health
    y, kw = ys["strings"]
    levels = kw["levels"]
    a = OrdinalRegression(levels=levels).fit(X, y)
    b = OrdinalRegression(levels=[levels[1], levels[0], *levels[2:]]).fit(X[["physlm"]], y)
    with pytest.raises(DataError, match="same rows"):
        a.lr_test(b)
    af = AdaptiveFederatedOrdinal(levels=levels, backend="serial")
    af.partial_fit(X, y, classes=levels)  # the levels' own order is what classes= means
    assert list(af.levels_) == levels
