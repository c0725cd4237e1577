"""Model formulas (``"rating ~ age + C(region) + np.log(income)"``) through formulaic.

The right-hand side is built into a design matrix by `formulaic
<https://matthewwardrop.github.io/formulaic/>`_ with an intercept, and the intercept column is
then dropped: the thresholds are the intercepts of an ordinal model, so a categorical feature
keeps its reference level (treatment contrasts) exactly as in R's ``clm`` and statsmodels'
``OrderedModel.from_formula``. The formula's state (categorical levels, the centre of
``center(x)``, the coefficients of ``poly(x, 2)``) is kept, so new rows are transformed as the
training rows were.

A formula is Python code evaluated on the data, so it is checked before anything runs: only
column names, numbers, the formula operators and the functions in :data:`FUNCTIONS` (and
``np.<f>`` for the numpy functions in :data:`NUMPY`) are accepted. Saved with a model, the
formula and its state are plain JSON, checked again when the model is loaded: a model file
cannot make fedgrain run anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..exceptions import DataError

#: Functions a formula may call: formulaic's categorical, identity and stateful transforms.
FUNCTIONS = frozenset({"C", "I", "center", "scale", "poly", "bs", "log", "exp"})
#: numpy functions a formula may call as ``np.f`` or ``numpy.f``.
NUMPY = frozenset({"log", "log1p", "log2", "log10", "exp", "expm1", "sqrt", "abs", "square"})
_ALLOWED = (f"column names, numbers, + - * / ** : ( ) and the functions {sorted(FUNCTIONS)} "
            f"and np.{{{', '.join(sorted(NUMPY))}}}")


class FormulaError(DataError):
    """A formula that cannot be used (syntax, an unknown function, a missing column)."""


def check_formula(formula: str) -> tuple[str, str]:
    """``(target, right-hand side)`` of ``"target ~ rhs"``, after checking the right-hand side
    as a Python expression tree: names, numbers, arithmetic, and calls whose function is a
    name in :data:`FUNCTIONS` or ``np.f`` for ``f`` in :data:`NUMPY`; nothing else (no other
    attribute, subscript, string, lambda or call), so no formula can reach other code."""
    if not isinstance(formula, str) or formula.count("~") != 1:
        raise FormulaError(f"A formula is 'target ~ feature + feature ...' with one '~'; got "
                           f"{formula!r}.")
    lhs, rhs = (part.strip() for part in formula.split("~"))
    if not lhs or not rhs:
        raise FormulaError(f"{formula!r} needs a target left of '~' and features right of it.")
    if not re.fullmatch(r"`[^`]+`|[A-Za-z_][A-Za-z0-9_.]*", lhs):
        raise FormulaError(f"The target of {formula!r} must be one column name (quote a name "
                           "with spaces in backticks); transform the target before the fit.")
    _check_tree(rhs, formula)
    return lhs.strip("`"), rhs


def _check_tree(rhs: str, formula: str) -> None:
    import ast

    # backquoted column names are names; ':' (interaction) is a product for this check
    code = re.sub(r"`[^`]*`", "col", rhs).replace(":", "*")
    if re.search(r"(^|[\s+\-*(~])\.($|[\s+\-*)])", code):
        raise FormulaError(f"{formula!r}: '.' (every other column) is not supported; list the "
                           "features.")
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        raise FormulaError(f"{formula!r} is not a formula fedgrain can read: it may hold "
                           f"{_ALLOWED}.") from None

    bad = []

    def ok(node) -> bool:
        good = _node_ok(node)
        if not good and not bad:
            bad.append(ast.get_source_segment(code, node) or type(node).__name__)
        return good

    def _node_ok(node) -> bool:
        if isinstance(node, ast.Expression):
            return ok(node.body)
        if isinstance(node, ast.Name):
            return "__" not in node.id
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
        if isinstance(node, ast.BinOp):
            return isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)) and \
                ok(node.left) and ok(node.right)
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, (ast.USub, ast.UAdd)) and ok(node.operand)
        if isinstance(node, ast.Call):
            f = node.func
            named = isinstance(f, ast.Name) and f.id in FUNCTIONS
            numpy = (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                     and f.value.id in ("np", "numpy") and f.attr in NUMPY)
            return (named or numpy) and all(ok(a) for a in node.args) and \
                all(k.arg is not None and "__" not in k.arg and ok(k.value)
                    for k in node.keywords)
        return False

    if not ok(tree):
        what = bad[-1] if bad else "?"
        raise FormulaError(f"{formula!r}: {what!r} is not allowed in a formula here; a formula "
                           f"may hold {_ALLOWED} only.")


@dataclass
class FormulaDesign:
    """A formula's right-hand side with its state: ``design(frame)`` gives the features."""

    formula: str
    spec: object  # formulaic.ModelSpec

    @classmethod
    def fit(cls, formula: str, data: pd.DataFrame) -> tuple[FormulaDesign, pd.DataFrame, str]:
        """The design of ``formula`` learnt on ``data``: ``(design, features, target)``."""
        from formulaic import model_matrix

        target, rhs = check_formula(formula)
        if not isinstance(data, pd.DataFrame):
            raise FormulaError("A formula needs the data as a pandas DataFrame with the "
                               "columns it names.")
        if target not in data.columns:
            raise FormulaError(f"The target {target!r} of {formula!r} is not a column; the "
                               f"columns are {list(map(str, data.columns))[:20]}.")
        with np.errstate(all="ignore"):  # a log of a negative value: reported below
            mm = _build(lambda: model_matrix(rhs, data, na_action="raise"), formula)
        if "Intercept" not in mm.columns:
            raise FormulaError(f"{formula!r} removes the intercept ('- 1' or '+ 0'): the "
                               "thresholds are the intercepts of an ordinal model, so write "
                               "the formula without it.")
        design = cls(formula, mm.model_spec)
        return design, _drop_intercept(mm), target

    def design(self, data) -> pd.DataFrame:
        """The features for new rows, transformed as the training rows were."""
        if not isinstance(data, pd.DataFrame):
            raise FormulaError("This model was fitted from a formula: give new rows as a "
                               "pandas DataFrame with the columns the formula names.")
        check_formula(self.formula)  # again, whatever set it
        return _drop_intercept(_build(lambda: self.spec.get_model_matrix(data), self.formula))

    # ---- persistence: plain JSON, rebuilt only into the types below ---------------------------
    def to_dict(self) -> dict:
        s = self.spec
        return {"formula": self.formula, "ensure_full_rank": bool(s.ensure_full_rank),
                "transform_state": _encode(s.transform_state),
                "encoder_state": _encode(s.encoder_state)}

    @classmethod
    def from_dict(cls, d: dict) -> FormulaDesign:
        from formulaic import ModelSpec

        _, rhs = check_formula(d["formula"])  # a tampered formula stops here
        try:
            spec = ModelSpec(formula=rhs, materializer="pandas",
                             ensure_full_rank=bool(d["ensure_full_rank"]), na_action="raise",
                             output="pandas", transform_state=_decode(d["transform_state"]),
                             encoder_state=_decode(d["encoder_state"]))
        except Exception as exc:  # formulaic's parse errors: a damaged description
            raise ValueError(f"the saved formula cannot be rebuilt ({exc})") from None
        return cls(str(d["formula"]), spec)


def _build(make, formula: str):
    try:
        return make()
    except DataError:
        raise
    except Exception as exc:  # formulaic's own errors: name, what went wrong
        msg = str(exc).split("\n")[0]
        if "null values" in msg and ("log(" in formula or "sqrt(" in formula):
            raise FormulaError(f"{formula!r}: {msg} A log or a square root of a value at or "
                               "below zero gives no number: shift or drop those rows.") \
                from None
        if "null values" in msg:
            raise FormulaError(f"{formula!r}: {msg} Drop or fill the missing values first.") \
                from None
        raise FormulaError(f"{formula!r} could not be applied to the data: {msg}") from None


def _drop_intercept(mm) -> pd.DataFrame:
    frame = pd.DataFrame(mm)
    return frame.drop(columns=[c for c in frame.columns if c == "Intercept"])


def _encode(obj):
    """Plain JSON for the state formulaic keeps (numbers, arrays, dicts with any keys, its
    kinds of factor and treatment contrasts); anything else cannot be saved."""
    from formulaic.parser.types import Factor
    from formulaic.transforms.contrasts import ContrastsState, TreatmentContrasts

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return {"__float__": repr(float(obj))}
    if isinstance(obj, np.ndarray):
        return {"__nd__": _encode(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, (list, tuple)):
        return {"__seq__": [_encode(v) for v in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, dict):
        return {"__map__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, Factor.Kind):
        return {"__kind__": obj.value}
    if isinstance(obj, ContrastsState):
        c = obj.contrasts
        if not isinstance(c, TreatmentContrasts):
            raise FormulaError("A model whose formula uses contrasts other than treatment "
                               "contrasts cannot be saved.")
        base = None if repr(c.base) == "UNSET" else _encode(c.base)
        return {"__treatment__": {"base": base, "unset": repr(c.base) == "UNSET",
                                  "levels": _encode(list(obj.levels))}}
    raise FormulaError(f"The formula's state holds a {type(obj).__name__}, which cannot be "
                       "saved as plain data.")


def _decode(obj):
    from formulaic.parser.types import Factor
    from formulaic.transforms.contrasts import ContrastsState, TreatmentContrasts

    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if not isinstance(obj, dict) or len(obj) > 2:
        raise ValueError("not a saved formula state")
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__nd__" in obj:
        dtype = str(obj["dtype"])
        if dtype not in ("float64", "int64", "float32", "int32", "bool"):
            raise ValueError("unexpected array type in a formula state")
        return np.asarray(_decode(obj["__nd__"]), dtype=dtype)
    if "__seq__" in obj:
        items = [_decode(v) for v in obj["__seq__"]]
        return tuple(items) if obj.get("tuple") else items
    if "__map__" in obj:
        return {_hashable(_decode(k)): _decode(v) for k, v in obj["__map__"]}
    if "__kind__" in obj:
        return Factor.Kind(str(obj["__kind__"]))
    if "__treatment__" in obj:
        t = obj["__treatment__"]
        contrasts = TreatmentContrasts() if t["unset"] else TreatmentContrasts(
            base=_decode(t["base"]))
        return ContrastsState(contrasts=contrasts, levels=list(_decode(t["levels"])))
    raise ValueError("not a saved formula state")


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v
