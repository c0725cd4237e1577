"""Group labels (federated sites): checked, and taken from a DataFrame column when named.

A group label is anything with a text form (numbers, strings); labels are compared as text, so
``1``, ``1.0`` and ``"1"`` are one group. Missing labels are refused: a row must belong to a site.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedgrain.exceptions import DataError

from .files import _as_frame


def split_groups_column(X, groups):
    """``(X, groups)``: when ``groups`` names a column of the frame ``X``, that column as the
    labels and ``X`` without it; otherwise both as given."""
    if isinstance(groups, str):
        frame = _as_frame(X)
        if frame is None:
            raise DataError(f"groups={groups!r} names a column, but X has no columns (an "
                            "array or a file path); pass one group label per row instead, or "
                            "a DataFrame holding that column.")
        names = [str(c) for c in frame.columns]
        if groups not in names:
            raise DataError(f"groups={groups!r} is not a column of X; the columns are "
                            f"{names[:20]}.")
        label = frame.columns[names.index(groups)]
        return frame.drop(columns=[label]), frame[label].to_numpy()
    return X, groups


def check_groups(groups, n_rows: int) -> np.ndarray:
    """The labels as text, one per row; a :class:`DataError` for a wrong count or a missing
    label (naming the first such row)."""
    try:
        raw = np.asarray(groups, dtype=object).reshape(-1)
    except Exception as exc:  # pragma: no cover - exotic containers
        raise DataError(f"groups could not be read as one label per row: {exc}") from None
    if raw.shape[0] != n_rows:
        raise DataError(f"groups has {raw.shape[0]:,} labels for {n_rows:,} rows; give one "
                        "group label per row.")
    missing = np.asarray(pd.isna(raw), dtype=bool)
    if missing.any():
        raise DataError(f"groups has a missing label at row {int(np.flatnonzero(missing)[0])} "
                        f"({int(missing.sum()):,} in all); every row needs its group.")
    return np.array([_text(v) for v in raw], dtype=object).astype(str)


def _text(v) -> str:
    """A label's text; a whole-valued float reads as the integer (``1.0`` is group ``"1"``), so
    labels read as floats (a CSV column with gaps, say) find the groups fitted as integers."""
    if isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def kept_groups(groups, sample_weight) -> object:
    """The labels of the rows a fit keeps: frequency weights of zero drop their rows (as
    :func:`fedgrain.data.prepare_fit` does), and with them their labels. Anything that does
    not line up with the weights is returned as given, for :func:`check_groups` to judge."""
    if sample_weight is None or groups is None:
        return groups
    raw = np.asarray(groups, dtype=object).reshape(-1)
    try:
        keep = np.asarray(sample_weight, dtype=float).reshape(-1) > 0
    except (TypeError, ValueError):
        return groups
    return raw[keep] if keep.shape == raw.shape else groups
