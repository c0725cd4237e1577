"""Model formulas: the design against statsmodels' OrderedModel.from_formula on real data, the
transformation kept for prediction and in saved models, and formulas that must not run."""

import numpy as np
import pandas as pd
import pytest
from statsmodels.miscmodels.ordinal_model import OrderedModel

from fedgrain import DivideConquerOrdinal, MixedOrdinalRegression, OrdinalRegression, load
from fedgrain.data.formula import FormulaError
from fedgrain.datasets import load_randhie
from fedgrain.exceptions import ModelFileError


@pytest.fixture(scope="module")
def hie():
    df = load_randhie().sample(3000, random_state=6).reset_index(drop=True)
    df["plan"] = np.where(df["idp"] > 0, "deductible", "none")
    return df


FORMULA = "health ~ physlm + disea + C(plan) + np.log1p(mdvis) + I(lpi ** 2)"


def test_a_formula_fit_equals_statsmodels_from_formula(hie):
    m = OrdinalRegression.from_formula(FORMULA, hie)
    ref = OrderedModel.from_formula(FORMULA, hie,
                                    distr="logit").fit(method="bfgs", disp=False,
                                                       maxiter=5000, gtol=1e-9)
    p = m.coef_.size
    assert m.results_.feature_names == ["physlm", "disea", "C(plan)[T.none]",
                                        "np.log1p(mdvis)", "I(lpi ** 2)"]
    names = m.results_.feature_names  # statsmodels (patsy) puts the categorical first
    np.testing.assert_allclose(m.coef_, ref.params[names].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(m.bse_[:p], ref.bse[names].to_numpy(), rtol=1e-4)
    # the same as fitting the design built by hand
    X = pd.DataFrame({"physlm": hie["physlm"], "disea": hie["disea"],
                      "plan": (hie["plan"] == "none").astype(float),
                      "mdvis": np.log1p(hie["mdvis"]), "lpi2": hie["lpi"] ** 2})
    by_hand = OrdinalRegression().fit(X, hie["health"])
    np.testing.assert_allclose(m.coef_, by_hand.coef_, atol=1e-10)


def test_new_rows_are_transformed_as_the_training_rows(hie, tmp_path):
    m = OrdinalRegression.from_formula("health ~ center(disea) + C(plan) + physlm", hie)
    new = hie.drop(columns="health").iloc[:5].copy()
    new["plan"] = ["none"] * 5  # one level only: still encoded against both
    P = m.predict_proba(new)
    manual = OrdinalRegression().fit(pd.DataFrame({
        "d": hie["disea"] - hie["disea"].mean(), "plan": (hie["plan"] == "none").astype(float),
        "physlm": hie["physlm"]}), hie["health"])
    Xn = pd.DataFrame({"d": new["disea"] - hie["disea"].mean(), "plan": 1.0,
                       "physlm": new["physlm"]})
    np.testing.assert_allclose(P, manual.predict_proba(Xn), atol=1e-10)
    back = load(m.save(tmp_path / "m"))
    np.testing.assert_array_equal(back.predict_proba(new), P)
    assert back.formula_.formula == m.formula_.formula
    # every estimator, and the groups of a mixed model by column name
    dc = DivideConquerOrdinal.from_formula("health ~ physlm + disea", hie, n_subsets=2,
                                           backend="serial")
    assert dc.predict_proba(new).shape == (5, 4)
    with pytest.warns(UserWarning, match="poorly determined"):  # two groups only
        mm = MixedOrdinalRegression.from_formula("health ~ physlm + disea", hie,
                                                 groups="plan", random="intercept")
    assert mm.n_groups_ == 2


def test_formulas_that_must_not_run_and_damaged_saved_formulas(hie, tmp_path):
    from fedgrain.persist import read_model_dir, write_model_dir

    for bad in ("health ~ __import__('os').system('echo hi')", "health ~ os.system(1)",
                "health ~ eval(physlm)", "health ~ physlm[0]", "health ~ np.random.rand(1)",
                "health ~ {physlm}", "health + disea ~ physlm", "physlm + disea",
                "health ~ nope", "missing ~ physlm",
                # calls hidden in parentheses, strings built from numbers, lambdas
                "health ~ I((eval)((chr)(49)))", "health ~ I(physlm + (len)((dir)()))",
                "health ~ (open)(1)", "health ~ I((lambda: 1)())", "health ~ np.log.__call__(1)",
                "health ~ C(physlm, contr=(print))", "health ~ I(physlm if 1 else 2)",
                "health ~ .", "health ~ physlm - 1", "health ~ 0 + physlm"):
        with pytest.raises(FormulaError):
            OrdinalRegression.from_formula(bad, hie)
    with pytest.raises(FormulaError, match="at or below zero"):
        OrdinalRegression.from_formula("health ~ np.log(physlm - 5)", hie)
    gaps = hie.copy()
    gaps.loc[3, "disea"] = np.nan
    with pytest.raises(FormulaError, match="null values"):
        OrdinalRegression.from_formula("health ~ disea", gaps)
    m = OrdinalRegression.from_formula("health ~ physlm + C(plan)", hie)
    with pytest.raises(FormulaError, match="DataFrame"):
        m.predict(hie[["physlm"]].to_numpy())
    path = m.save(tmp_path / "m")
    meta, arrays = read_model_dir(path)
    for i, text in enumerate(("health ~ __import__('os').getcwd()",
                              "health ~ I(physlm + 0*(len)((str)((exec)((chr)(49)))))")):
        meta["formula"]["formula"] = text
        write_model_dir(tmp_path / f"bad{i}", meta, arrays)  # valid checksums
        with pytest.raises(ModelFileError, match="incomplete or inconsistent"):
            load(tmp_path / f"bad{i}")


def test_the_command_line_fits_and_predicts_with_a_formula(hie, tmp_path, capsys):
    from fedgrain.cli import main

    data = tmp_path / "d.csv"
    hie.to_csv(data, index=False)
    levels = ["poor", "fair", "good", "excellent"]  # a CSV file does not keep their order
    assert main(["--quiet", "fit", str(data), "--estimator", "mle", "--formula",
                 "health ~ physlm + C(plan) + np.log1p(mdvis)", "--levels", ",".join(levels),
                 "--out", str(tmp_path / "m")]) == 0
    assert "C(plan)[T.none]" in capsys.readouterr().out
    model = load(tmp_path / "m")
    ref = OrdinalRegression.from_formula("health ~ physlm + C(plan) + np.log1p(mdvis)",
                                         pd.read_csv(data), levels=levels)
    np.testing.assert_allclose(model.coef_, ref.coef_, atol=1e-10)
    assert main(["--quiet", "predict", str(tmp_path / "m"), str(data), "--out",
                 str(tmp_path / "p.csv")]) == 0
    pred = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(pred.filter(like="proba_").to_numpy(),
                               ref.predict_proba(pd.read_csv(data), order="levels"), atol=1e-9)
    for bad, msg in ((["--formula", "health ~ eval(physlm)"], "'eval(physlm)' is not allowed"),
                     (["--formula", "health ~ physlm", "--drop", "idp"], "do not combine"),
                     (["--formula", "health ~ physlm", "--target", "idp"], "differ")):
        code = main(["--quiet", "fit", str(data), "--estimator", "mle", *bad, "--out",
                     str(tmp_path / "x")])
        assert code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
