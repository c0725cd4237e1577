"""The ``fedgrain`` command line: fit, predict, evaluate, summary, stream, report, demo.

Every error prints one line, ``fedgrain: error: <what, where, how to fix>``; ``--debug`` shows
the traceback. Exit status: 0 done, 2 a usage or data error (a malformed command line, bad
data, a missing file, a corrupted model), 1 anything else. Outputs are written atomically, so a
failure never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from ._version import __version__
from .exceptions import DataError, DataTypeError, FedgrainError, ModelFileError, ParameterError

if TYPE_CHECKING:  # numpy, pandas and the estimators are imported where a command needs them,
    import pandas as pd  # so that --help and --version answer at once


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _bar(args):
    """A progress-bar callback on stderr, or None with --quiet or when stderr is not a
    terminal (a log file, a pipe)."""
    from .progress import ProgressBar

    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None
    bar = ProgressBar(sys.stderr)
    _BARS.append(bar)
    return bar


#: The bars drawn by this command (ended before an error is printed).
_BARS: list = []


def _end_bars() -> None:
    for bar in _BARS:
        bar.close()
    _BARS.clear()


def _csv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise DataError(f"expected a comma-separated list, got {text!r}")
    return items


def _typed_levels(tokens: list[str] | None, column: pd.Series):
    """Give ``--levels`` tokens the type of the target column (1,2,3 are ints for an int column)."""
    if tokens is None:
        return None
    kind = column.dtype.kind
    try:
        if kind in "iu":
            return [int(t) for t in tokens]
        if kind == "f":
            return [float(t) for t in tokens]
    except ValueError:
        raise DataError(
            f"--levels {','.join(tokens)}: the target column is numeric ({column.dtype}), so the "
            "levels must be numbers too."
        ) from None
    if kind == "b":
        return [t.lower() in ("1", "true", "yes") for t in tokens]
    return tokens


def _alpha(text: str):
    if text in ("rate", "cv", "bic"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--alpha must be rate, cv, bic or a number; got {text!r}"
        ) from None


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1]; got {text!r}")
    return value


def _at_least_two(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 2; got {text!r}")
    return value


def _write_atomic(out: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``out``, then rename it into place.

    The folder is created if needed; on any failure the temporary file is removed and ``out``
    is left as it was.
    """
    from ._process import owner_tag

    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{owner_tag()}-", suffix=".tmp",
                               dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        from .persist import public_mode

        os.chmod(tmp, public_mode())  # mkstemp's file is private; an output follows the umask
        os.replace(tmp, out)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        from .persist import disk_full

        full = disk_full(exc, out, "the output", f"{out} is unchanged" if out.exists() else
                         "nothing was written")
        if full is not None:
            raise full from None
        raise


def _sweep_temporaries(out: Path) -> None:
    """Remove the temporary files that writes of ``out`` by processes now dead left beside it
    (a SIGKILL gives no chance to clean up); those of live processes stay."""
    from ._process import left_by_dead, leftovers

    pattern = re.compile(re.escape(f".{out.name}.")
                         + r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[^/]*\.tmp")
    for path, m, _ in leftovers(out.parent, pattern):
        if left_by_dead(m["host"], m["pid"]):
            with contextlib.suppress(OSError):
                path.unlink()


def _write_table_atomic(frame: pd.DataFrame, out: Path) -> None:
    """Write CSV (gzip-compressed for ``.gz``) or Parquet, chosen by the file name's
    extension (the temporary file's name does not say, so the compression is explicit)."""
    check_table_path(out)
    suffix = "".join(out.suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        _write_atomic(out, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        sep = "\t" if ".tsv" in suffix else ","
        gz = "gzip" if suffix.endswith(".gz") else None
        _write_atomic(out, lambda tmp: frame.to_csv(tmp, index=False, sep=sep,
                                                    compression=gz))


TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")


def check_table_path(out: Path) -> None:
    """An output table's name and place, checked before any work: a known extension, not a
    folder, not a link."""
    suffix = "".join(out.suffixes[-2:]).lower()
    if not suffix.endswith(TABLE_SUFFIXES):
        raise DataError(f"--out {out}: use a .csv, .csv.gz, .tsv or .parquet file name")
    check_output_path(out, "--out")


def check_model_path(out: Path, option: str) -> None:
    """A model folder's path, checked before any work: not a symbolic link, not a file, and
    its parent writable."""
    if out.is_symlink():
        raise DataError(f"{option} {out} is a symbolic link; give the path of a folder "
                        "(fedgrain replaces the folder it saves).")
    if out.exists() and not out.is_dir():
        raise DataError(f"{option} {out} is a file; a model is saved as a folder: give a new "
                        "name.")
    _check_parent(out, option)


def _check_parent(out: Path, option: str) -> None:
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{option} {out}: {parent} is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {out}: cannot write in {parent}.")


def check_output_path(out: Path, option: str) -> None:
    """An output file's path, checked before any work: not a folder and not a symbolic link
    (replacing either would surprise), and its folder writable if it exists."""
    if out.is_symlink():
        raise DataError(f"{option} {out} is a symbolic link; give the path of a regular file "
                        "(fedgrain replaces the file it writes).")
    if out.is_dir():
        raise DataError(f"{option} {out} is a folder; give a file name.")
    _check_parent(out, option)


def _features_for(model, frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Select the model's input columns from a file's columns by name (others are ignored);
    a model fitted from a formula takes the frame as it is (the formula picks its columns)."""
    if getattr(model, "formula_", None) is not None:
        return frame
    cols = list(model.schema_.input_columns)
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source} lacks the column(s) {missing} the model was fitted on; its columns are "
            f"{list(frame.columns)}."
        )
    return frame.loc[:, cols]


def _check_fit_options(args) -> None:
    """Refuse options that do not apply to the chosen estimator, before any work is done.

    ``--granularity`` (or ``--min-subset-size``) without ``--estimator`` chooses the adaptive
    estimator; otherwise the default is dc.
    """
    adaptive_only = [f"--{n.replace('_', '-')}" for n in ("granularity", "min_subset_size",
                                                          "meta", "stability", "groups")
                     if getattr(args, n) is not None]
    if args.estimator is None:
        args.estimator = "adaptive" if adaptive_only else "dc"
    if args.link is not None and args.estimator not in ("mle", "dc"):
        raise DataError("--link applies to --estimator mle and dc (the adaptive estimator's "
                        "meta-learner and stream updates are those of the logit model).")
    mle_only = [f"--{n.replace('_', '-')}" for n in ("cov_groups", "weights_type", "nominal")
                if getattr(args, n) is not None]
    if mle_only and args.estimator != "mle":
        raise DataError(f"{', '.join(mle_only)} apply to --estimator mle only.")
    if args.nominal is not None and args.po_test is not None:
        raise DataError("--po-test tests the proportional-odds model; with --nominal compare "
                        "the two fits with lr_test in Python instead.")
    if args.weights_type is not None and not args.weights:
        raise DataError("--weights-type describes --weights COLUMN, and none was given.")
    mixed_only = [f"--{n}" for n in ("random", "covariance") if getattr(args, n) is not None]
    if args.estimator != "mixed" and mixed_only:
        raise DataError(f"{', '.join(mixed_only)} apply to --estimator mixed only.")
    if args.estimator == "mixed":
        if args.groups is None:
            raise DataError("--estimator mixed needs --groups COLUMN: the column naming each "
                            "row's group (site), whose random effects it estimates.")
        adaptive_only.remove("--groups")
        given = adaptive_only + [f"--{n.replace('_', '-')}" for n in (
            "n_subsets", "refine_rounds", "backend", "scheduler", "alpha", "variance")
            if getattr(args, n) is not None]
        if given:
            verb = "do" if len(given) > 1 else "does"
            raise DataError(f"{', '.join(given)} {verb} not apply to --estimator mixed (one "
                            "central fit by Laplace-approximate REML).")
        return
    if args.estimator != "adaptive" and adaptive_only:
        verb = "apply" if len(adaptive_only) > 1 else "applies"
        raise DataError(f"{', '.join(adaptive_only)} {verb} to --estimator adaptive only.")
    if args.estimator == "adaptive" and args.n_subsets is not None:
        raise DataError("--n-subsets applies to --estimator dc; the adaptive estimator's leaves "
                        "come from --granularity and --min-subset-size.")
    if args.estimator == "mle":
        given = [f"--{n.replace('_', '-')}"
                 for n in ("n_subsets", "refine_rounds", "backend", "scheduler")
                 if getattr(args, n) is not None]
        if args.variance == "cluster":
            given.append("--variance cluster")
        if given:
            raise DataError(f"{', '.join(given)} apply to --estimator dc or adaptive only.")


def _read(args) -> pd.DataFrame:
    """``args.data`` read whole through the shared reader, with ``--filter``."""
    from .data import read_table

    return read_table(args.data, filter=getattr(args, "filter", None))


def _cmd_fit(args) -> int:
    from .data.streamed import is_streamed

    _check_fit_options(args)
    out = Path(args.out)
    check_model_path(out, "--out")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it.")
    if args.formula is not None:
        return _fit_formula(args, out)
    if args.target is None:
        raise DataError("fit needs --target COLUMN (or --formula 'target ~ features').")
    streamed = is_streamed(args.data) and args.estimator != "mle" and not args.weights \
        and not args.groups
    if args.groups and args.stability is not None:
        raise DataError("--stability grows the partition again, and with --groups the "
                        "partition is the groups (not grown); drop one of the two.")
    if streamed and args.stability is not None:
        raise DataError("--stability grows the partition again on parts of the rows, so it "
                        "needs them in memory, and Parquet files, folders and addresses are "
                        "streamed batch by batch. Fit from a CSV file, or measure it on a "
                        "sample in Python (AdaptiveFederatedOrdinal.stability).")
    if streamed and args.po_test is not None:
        raise DataError("--po-test needs the rows in memory, and Parquet files, folders and "
                        "addresses are streamed batch by batch. Fit from a CSV file, or run "
                        "proportional_odds_test in Python on a sample.")
    if streamed:  # the estimator reads it batch by batch, never whole
        X, y, size = _parquet_source(args)
        weights = None
    else:
        X, y, weights = _read_frame(args)
        size = X.shape
    fit_kw = _label_columns(args, X, pop=True)
    if fit_kw:
        size = X.shape
    levels = _typed_levels(_csv_list(args.levels), y)
    model, what = _estimator(args, levels, _csv_list(args.categorical))
    _log(args, f"fitting {size[0]:,} rows x {size[1]} columns ({what}) ...")
    _timed_fit(args, model, lambda: model.fit(X, args.target if streamed else y,
                                              sample_weight=weights, **fit_kw))
    if args.po_test is not None:
        model.proportional_odds_test(X, y, method=args.po_test, sample_weight=weights)
    if args.stability is not None:
        _log(args, f"growing the partition on {args.stability} random parts of the rows ...")
        model.stability(X, y, weights, n_resamples=args.stability)
    return _print_and_save(args, model, out)


def _label_columns(args, frame: pd.DataFrame, pop: bool) -> dict:
    """The fit's label columns by option (``--groups``: the sites; ``--cov-groups``: the
    clusters of the standard errors), as keyword arguments of ``fit``: labels, not features
    (taken out of ``frame`` with ``pop``)."""
    out = {}
    for option in ("groups", "cov_groups"):
        col = getattr(args, option, None)
        if col:
            name = _columns(frame, [col], f"--{option.replace('_', '-')}", _shown(args))[0]
            out[option] = (frame.pop(name) if pop else frame[name]).to_numpy()
    return out


def _timed_fit(args, model, fit) -> None:
    """Run ``fit()``, logging its time; a Dask client made for ``--scheduler`` is closed after
    (the client only: the cluster keeps running)."""
    t0 = time.perf_counter()
    try:
        fit()
    finally:
        if args.scheduler is not None:
            model.backend.close()
    _log(args, f"fitted in {time.perf_counter() - t0:.2f} s")


def _print_and_save(args, model, out: Path) -> int:
    _print_fit(args, model)
    path = model.save(out, overwrite=args.force)
    print(f"\nModel saved to {path}")
    return 0


def _fit_formula(args, out: Path) -> int:
    """``fit --formula``: the formula names the target and builds the features."""
    from .data.formula import check_formula

    target, _ = check_formula(args.formula)
    if args.target is not None and args.target != target:
        raise DataError(f"--target {args.target} and the formula's target {target!r} differ; "
                        "give one of them.")
    given = [f"--{n}" for n in ("features", "drop", "categorical", "stability")
             if getattr(args, n)]
    if given:
        raise DataError(f"{', '.join(given)} do not combine with --formula: the formula names "
                        "the features (C(x) for a categorical one).")
    _log(args, f"reading {_shown(args)} ...")
    frame = _read(args)
    weights = None
    if args.weights:
        weights = frame[_columns(frame, [args.weights], "--weights", _shown(args))[0]].to_numpy()
    fit_kw = _label_columns(args, frame, pop=False)
    y = frame[target] if target in frame.columns else None
    levels = _typed_levels(_csv_list(args.levels), y) if y is not None else None
    args.target = target
    model, what = _estimator(args, levels, None)
    _log(args, f"fitting {args.formula!r} on {frame.shape[0]:,} rows ({what}) ...")
    _timed_fit(args, model, lambda: model.fit_formula(args.formula, frame,
                                                      sample_weight=weights, **fit_kw))
    if args.po_test is not None:
        model.proportional_odds_test(frame, frame[target], method=args.po_test,
                                     sample_weight=weights)
    return _print_and_save(args, model, out)


def _parquet_source(args):
    """The data to stream (a Parquet file, a folder, an address): its source of the chosen
    columns and rows (``--filter``), the first batch's target (which gives ``--levels`` their
    type) and the (rows, features) size."""
    import pandas as pd

    from .data import DatasetSource, split_target

    source = DatasetSource(args.data, filter=args.filter, target=args.target)
    if args.target not in source.columns:
        split_target(pd.DataFrame(columns=source.columns), args.target)  # the message
    keep = [c for c in source.columns if c != args.target]
    if args.drop:
        keep = [c for c in keep if c not in _columns(
            pd.DataFrame(columns=keep), _csv_list(args.drop), "--drop", _shown(args))]
    if args.features:
        keep = _columns(pd.DataFrame(columns=keep), _csv_list(args.features), "--features",
                        _shown(args))
    source.columns = [*keep, args.target]  # the files are listed and checked once
    _log(args, f"streaming {_shown(args)} ({source.n_rows:,} rows) ...")
    first = next(source.frames([args.target]))[1]
    return source, first[args.target], (source.n_rows, len(keep))


def _read_frame(args):
    """The data read whole: features, target and ``--weights`` (or None)."""
    from .data import split_target

    _log(args, f"reading {_shown(args)} ...")
    frame = _read(args)
    X, y = split_target(frame, args.target)
    weights = None
    if args.weights:
        weights = X.pop(_columns(X, [args.weights], "--weights", _shown(args))[0]).to_numpy()
    if args.drop:
        X = X.drop(columns=_columns(X, _csv_list(args.drop), "--drop", _shown(args)))
    if args.features:
        X = X.loc[:, _columns(X, _csv_list(args.features), "--features", _shown(args))]
    return X, y, weights


def _estimator(args, levels, categorical):
    """The estimator the options choose, and the words that describe it."""
    from .estimators import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression

    if args.estimator == "mixed":
        from .estimators import MixedOrdinalRegression

        random = args.random or "slopes"
        if random not in ("slopes", "intercept"):
            random = _csv_list(random)
        model = MixedOrdinalRegression(random=random, covariance=args.covariance or "full",
                                       levels=levels, categorical=categorical)
        what = ("random intercepts" if random == "intercept" else
                "random intercepts and slopes") + " by group, Laplace-approximate REML"
        return model, what
    if args.estimator == "mle":
        ridge = 0.0 if args.alpha is None else args.alpha
        if isinstance(ridge, str):
            raise DataError(f"--alpha {ridge} applies to --estimator dc; with --estimator mle "
                            "--alpha is a ridge penalty (a number).")
        model = OrdinalRegression(alpha=ridge, levels=levels, categorical=categorical,
                                  link=args.link or "logit", nominal=_csv_list(args.nominal),
                                  weights=args.weights_type or "frequency",
                                  **({} if args.variance is None else {"variance": args.variance}))
        return model, f"exact maximum likelihood, {args.link or 'logit'} link"
    options = {k: v for k, v in (("alpha", args.alpha), ("variance", args.variance),
                                 ("refine_rounds", args.refine_rounds)) if v is not None}
    backend = args.backend or "processes"
    if args.scheduler is not None:
        if backend != "dask":
            raise DataError("--scheduler applies to --backend dask.")
        from .backends.dask import DaskBackend

        backend = DaskBackend(scheduler=args.scheduler)
    common = {"backend": backend, "n_jobs": args.workers,
              "random_state": args.random_state, "levels": levels,
              "categorical": categorical, "callback": _bar(args), **options}
    if args.estimator == "adaptive":
        g = 0.5 if args.granularity is None else args.granularity
        model = AdaptiveFederatedOrdinal(granularity=g, meta=args.meta or "none",
                                         min_subset_size=args.min_subset_size, **common)
        return model, (f"adaptive partition, granularity {g}, meta-learner "
                       f"{args.meta or 'none'}, backend {args.backend or 'processes'}")
    model = DivideConquerOrdinal(n_subsets=args.n_subsets, link=args.link or "logit", **common)
    return model, (f"divide and conquer, {args.link or 'logit'} link, backend "
                   f"{args.backend or 'processes'}")


def _print_fit(args, model) -> None:
    """The coefficient table; for an adaptive model also its partition, rounds and events."""
    print(model.summary(args.ci_alpha))
    if args.estimator != "adaptive":
        return
    print(f"\nPartition: {model.n_leaves_} leaves on {model.schedule_.n_workers} worker(s), "
          f"load imbalance {model.schedule_.imbalance:.3f}")
    print("\n".join(model.partition_.describe()))
    if model.partition_.stability_ is not None:
        print(f"Stability: {model.partition_.stability_.describe()}")
    for h in model.history_:
        pull = "none (global model)" if h["rho"] is None else f"{h['rho']:.3g} pseudo-rows"
        print(f"meta round {h['round']}: validation log-loss {h['val_loss']:.4f}, pull "
              f"{pull}, {h['bytes']:,} bytes moved")
    for e in model.events_:
        print(f"event: round {e['round']}, leaf {e['leaf']}: {e['kind']} ({e['error']})")


def _shown(args) -> str:
    """``--data`` as messages, ``--json`` output and reports show it: the credentials an
    address may hold (``s3://KEY:SECRET@...``, ``?secret_key=...``) hidden."""
    from .data.dataset import redact

    return redact(str(args.data))


def _columns(X: pd.DataFrame, names: list[str], option: str, source: str) -> list[str]:
    """Check that the columns an option names exist (the target is not among them)."""
    missing = [n for n in names if n not in X.columns]
    if missing:
        raise DataError(f"{option}: {missing} not among the feature columns of {source}: "
                        f"{list(X.columns)}.")
    return names


def _group_labels(model, frame: pd.DataFrame, args):
    """``{"groups": labels}`` from ``--groups COLUMN`` (nothing without it)."""
    if not getattr(args, "groups", None):
        return {}
    if getattr(model, "groups_", None) is None:
        raise DataError(f"--groups: the model in {args.model} was fitted without groups.")
    if args.groups not in frame.columns:
        raise DataError(f"--groups {args.groups}: no such column in {_shown(args)}; the columns "
                        f"are {list(frame.columns)}.")
    return {"groups": frame[args.groups].to_numpy()}


def _cmd_predict(args) -> int:
    import numpy as np
    import pandas as pd

    from .estimators import load

    check_table_path(Path(args.out))
    model = load(args.model)
    frame = _read(args)
    X = _features_for(model, frame, _shown(args))
    proba = model.predict_proba(X, order="levels", **_group_labels(model, frame, args))
    classes = list(model.target_.classes)
    out = pd.DataFrame({"predicted": [classes[i] for i in np.argmax(proba, axis=1)]})
    for k, c in enumerate(classes):
        out[f"proba_{c}"] = proba[:, k]
    for i, col in enumerate(_csv_list(args.keep) or []):
        if col not in frame.columns:
            raise DataError(f"--keep {col}: no such column in {_shown(args)}.")
        out.insert(i, col, frame[col].to_numpy())
    _write_table_atomic(out, Path(args.out))
    print(f"Wrote {len(out):,} predictions to {args.out}")
    return 0


def _cmd_evaluate(args) -> int:
    import pandas as pd

    from .data import split_target
    from .estimators import load
    from .metrics import baseline_scores, ordinal_scores, skill_scores

    model = load(args.model)
    frame = _read(args)
    X, y = split_target(frame, args.target)
    codes = model.target_.encode(y, what=f"column '{args.target}'")
    by_group = _group_labels(model, frame, args)
    proba = model.predict_proba(_features_for(model, X, _shown(args)), order="levels", **by_group)
    scores = ordinal_scores(codes, proba)
    base = baseline_scores(codes, len(model.levels_))
    table = None
    if hasattr(model, "partition_"):  # adaptive: the same scores leaf by leaf
        leaf = model.apply(_features_for(model, X, _shown(args)), **by_group)
        rows = []
        for nid in model.leaf_ids_.tolist():
            m = leaf == nid
            if m.any():
                sc = ordinal_scores(codes[m], proba[m])
                rows.append([nid, sc["rows"], sc["log_loss"], sc["rps"], sc["accuracy"],
                             sc["mae"]])
        table = pd.DataFrame(rows, columns=["leaf", "rows", "log_loss", "rps", "accuracy",
                                            "mae"])
    if args.json:
        import json

        doc = {"model": str(args.model), "data": _shown(args), "scores": scores,
               "baseline": base, "skill": skill_scores(scores, base),
               "per_leaf": None if table is None else table.to_dict(orient="records")}
        print(json.dumps(doc, indent=2))
        return 0
    width = max(len(k) for k in scores)
    print(f"{'':<{width}}  {'model':>8}  {'baseline':>8}")
    for k, v in scores.items():
        if isinstance(v, int):
            print(f"{k:<{width}}  {v:>8,}")
        else:
            print(f"{k:<{width}}  {v:>8.4f}  {base[k]:>8.4f}")
    print("baseline: the levels' shares in these rows, for every row (a model with no "
          "features);\nlower log_loss, rps and mae and higher accuracy are better.")
    if table is not None:
        print("\nPer leaf:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print("(leaf: the leaf's id, as apply(), the report, describe() and summary --leaf "
              "give it)")
    return 0


def _cmd_report(args) -> int:
    from .data import split_target
    from .estimators import load

    check_output_path(Path(args.out), "--out")
    model = load(args.model)
    X = y = None
    by_group = {}
    if args.data:
        frame = _read(args)
        by_group = _group_labels(model, frame, args)
        if args.target:
            X, y = split_target(frame, args.target)
        else:
            X = frame
        X = _features_for(model, X, _shown(args))
    elif args.target or args.groups or getattr(args, "filter", None):
        option = "--target" if args.target else "--groups" if args.groups else "--filter"
        raise DataError(f"{option} applies with --data (labelled rows to score the leaves on).")
    _log(args, f"writing the report of {args.model} ...")
    path = model.report(args.out, X, y, alpha=args.ci_alpha, source=_shown(args), **by_group)
    print(f"Report written to {path}")
    return 0


def _cmd_summary(args) -> int:
    from .estimators import load

    if args.html:
        check_output_path(Path(args.html), "--html")
    model = load(args.model)
    summary = (model.summary(args.ci_alpha) if args.leaf is None else
               _leaf_model(model, args.leaf).summary(args.ci_alpha))
    print(summary)
    if args.html:
        html = summary.as_html()
        _write_atomic(Path(args.html), lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
        print(f"HTML written to {args.html}")
    return 0


def _leaf_model(model, leaf: int):
    """The model of the leaf with node id ``leaf`` of an adaptive model."""
    if not hasattr(model, "partition_"):
        raise DataError(f"--leaf: the model is a {type(model).__name__}, which has no leaves "
                        "(fit with --granularity for an adaptive model).")
    leaves = model.leaf_ids_.tolist()
    if leaf not in leaves:
        raise DataError(f"--leaf {leaf}: no such leaf; the leaves are {leaves}.")
    return model.leaf_model(leaf)


def _cmd_stream(args) -> int:
    from datetime import datetime, timezone

    from .data import split_target
    from .data.dataset import DatasetSource
    from .estimators import AdaptiveFederatedOrdinal, load
    from .monitor.stream import DriftMonitor

    model = load(args.model)
    if not isinstance(model, AdaptiveFederatedOrdinal):
        raise DataError(f"{args.model} holds a {type(model).__name__}; fedgrain stream needs a "
                        "model fitted with --granularity (AdaptiveFederatedOrdinal).")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1; got {args.batch_size}.")
    out = Path(args.out or args.model)
    events_path = Path(args.events or f"{out}.events.jsonl")
    check_model_path(out, "--out")
    check_output_path(events_path, "--events")  # before any row changes the model
    from . import progress

    source = DatasetSource(args.data, args.batch_size, filter=args.filter, target=args.target)
    flt = None if source.filter is None else str(source.filter)
    files, skipped = _files_to_feed(model, source, flt, args)
    if not files:
        # the model already took every file (a run whose event log was not written, or a
        # second run by mistake): finish that run's work instead of feeding the rows twice
        rows_held = sum(r["rows"] for _, r in skipped)
        print(f"{args.model} already holds the {rows_held:,} rows of {source.shown} "
              f"({len(skipped)} file{'s' if len(skipped) != 1 else ''}, last streamed "
              f"{max(r['at'] for _, r in skipped)}); not feeding them again (pass --again to "
              "feed them once more).")
        if out != Path(args.model):
            model.save(out, overwrite=True)
        _write_events(events_path, model.events_)
        print(f"Model at {out}; {len(model.events_)} events in {events_path}")
        return 0
    if skipped:
        print(f"Skipping {len(skipped)} file{'s' if len(skipped) != 1 else ''} of "
              f"{source.shown} the model already took ({sum(r['rows'] for _, r in skipped):,} "
              "rows); feeding the new ones.")
    seen = len(model.events_)
    t0 = time.perf_counter()
    bar = _bar(args)
    say = print if bar is None else bar.write  # event lines above the bar, not through it
    fed = []
    with progress.reporting(bar), progress.step("streaming", None, "rows"):
        for name, size, mtime in files:
            before, in_file = (0 if model.stream_ is None else model.stream_.rows_seen), 0
            for _, batch in source.frames(files=[name]):
                X, y = split_target(batch, args.target)
                model.partial_fit(X, y)
                in_file += len(batch)
                progress.advance(len(batch))
                for e in model.events_[seen:]:
                    say(f"row {e['rows_seen']:,}: leaf {e['leaf']}: {e['kind']} "
                        f"({e['detail']})")
                seen = len(model.events_)
            fed.append((name, size, mtime, in_file, before))
    _log(args, f"streamed {sum(f[3] for f in fed):,} rows in {time.perf_counter() - t0:.2f} s")
    if model.stream_ is None:  # no rows at all: a state that records the files
        model.stream_ = DriftMonitor.new_state(model)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name, size, mtime, in_file, before in fed:
        model.stream_.add_input(name, size, mtime, flt, args.target, in_file, before, at)
    # the model and the record of its files are saved in one atomic step; the event log is
    # derived from the model, so a run stopped between the two writes is finished by running
    # it again (its files are recognised and only the log is written)
    path = model.save(out, overwrite=True)
    _write_events(events_path, model.events_)
    print(f"Model saved to {path}; {len(model.events_)} events in {events_path}")
    return 0


def _files_to_feed(model, source, flt: str | None, args) -> tuple[list, list]:
    """The files of ``source`` to feed (in reading order) and those skipped with their
    records: a file the model took before, unchanged and read the same way, is skipped; one
    changed since it was taken is refused (feeding it whole would feed its earlier rows
    twice); ``--again`` feeds them all."""
    states = source.file_states()
    if not states:
        raise DataError(f"No file of '{source.shown}' "
                        f"{'passes the filter ' + flt if flt else 'holds rows'}: nothing to "
                        "stream; check the path and the filter.")
    if args.again or model.stream_ is None:
        return states, []
    fed = model.stream_.files_fed(flt, args.target)
    feed, skipped, changed = [], [], []
    for state in states:
        record = fed.get(state[0])
        if record is None:
            feed.append(state)
        elif (record["size"], record["mtime_ns"]) == state[1:]:
            skipped.append((state, record))
        else:
            changed.append((state[0], record))
    if changed:
        name, record = changed[0]
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise DataError(
            f"'{name}'{more} changed since the model took {record['rows']:,} rows from it "
            f"({record['at']}); feeding it whole would feed those rows twice. Put new rows in "
            "new files, or pass --again to feed the changed files whole once more.")
    return feed, skipped


def _write_events(path: Path, events: list) -> None:
    import json

    text = "".join(json.dumps(e) + "\n" for e in events)
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), n_jobs=args.workers, log=lambda m: _log(args, m),
             callback=_bar(args))
    return 0


EXAMPLES = {
    "fit": """examples:
  fedgrain fit ratings.csv --target stars --levels 1,2,3,4,5 --out model/
  fedgrain fit ratings.parquet --target stars --granularity 0.5 --meta fomaml --out model/
  fedgrain fit big/ --target stars --backend dask --scheduler tcp://10.0.0.1:8786 --out model/
  fedgrain fit survey.csv --target grade --estimator mle --categorical region --out exact/
  fedgrain fit by_region/ --target stars --filter "year >= 2020" --out model/
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 fedgrain fit s3://bucket/ratings/ --target stars \
      --out model/

A Parquet file, a folder (CSV or Parquet, Hive partitions as columns) or an address is streamed
batch by batch (data larger than memory) by dc and adaptive; mle and mixed read it whole.""",
    "predict": """examples:
  fedgrain predict model/ new.csv --out predictions.csv
  fedgrain predict model/ new.parquet --out predictions.parquet --keep id
  fedgrain predict model/ s3://bucket/new/ --filter "region == 'north'" --out north.csv""",
    "evaluate": """examples:
  fedgrain evaluate model/ test.csv --target stars

Prints rows, accuracy, mean absolute class error (mae), log-loss and ranked probability score
(rps); for an adaptive model also leaf by leaf.""",
    "summary": """examples:
  fedgrain summary model/
  fedgrain summary model/ --ci-alpha 0.01 --html table.html""",
    "stream": """examples:
  fedgrain stream model/ new_ratings.parquet --target stars --batch-size 10000
  fedgrain stream model/ march.csv --target stars --out model_march/ --events march.jsonl""",
    "report": """examples:
  fedgrain report model/ --out report.html
  fedgrain report model/ --out report.html --data test.csv --target stars""",
    "demo": """examples:
  fedgrain demo
  fedgrain demo --out /tmp/fedgrain_demo --workers 2""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedgrain",
        description="Ordinal regression on large, heterogeneous or distributed data: "
                    "divide-and-conquer fits with valid inference, adaptive partitions, "
                    "federated meta-learning and drift monitoring.",
        epilog="Run 'fedgrain COMMAND --help' for a command's options and examples. Exit "
               "status: 0 done, 2 usage or data error, 1 otherwise.",
    )
    parser.add_argument("--version", action="version", version=f"fedgrain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    # The same options after the command name; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text,
                              description=help_text[0].upper() + help_text[1:] + ".",
                              parents=[common], epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    for add in (_add_fit, _add_stream, _add_predict, _add_evaluate, _add_report, _add_summary,
                _add_demo):
        add(command)
    return parser


def _add_fit(command) -> None:
    p = command("fit", "fit a model on CSV or Parquet data and save it")
    _add_data(p, "CSV or Parquet data")
    p.add_argument("--target", default=None, help="the ordinal target column")
    p.add_argument("--formula", default=None,
                   help="a model formula instead of --target and the feature options: "
                        "'rating ~ age + C(region) + np.log(income)'")
    p.add_argument("--levels", help="ordered levels, lowest first: a,b,c")
    p.add_argument("--categorical", help="feature columns to one-hot encode: c1,c2")
    p.add_argument("--features", help="use only these feature columns: f1,f2")
    p.add_argument("--drop", help="columns that are not features (ids, dates): c1,c2")
    p.add_argument("--weights", help="column of frequency weights")
    p.add_argument("--estimator", choices=("dc", "mle", "adaptive", "mixed"), default=None,
                   help="dc: DivideConquerOrdinal (default); mle: exact OrdinalRegression; "
                        "adaptive: AdaptiveFederatedOrdinal (the default with --granularity "
                        "or --groups); mixed: MixedOrdinalRegression, random intercepts and "
                        "slopes by --groups, fitted centrally")
    p.add_argument("--granularity", type=_unit_interval, default=None,
                   help="adaptive: how far the data are split, 0 (static random subsets) to 1 "
                        "(as fine as the data support); default 0.5")
    p.add_argument("--min-subset-size", type=int, default=None,
                   help="adaptive: fewest rows in a leaf (default 20 x parameters)")
    p.add_argument("--meta", choices=("none", "fomaml", "reptile", "fedavg", "fedprox", "ditto"),
                   default=None, help="adaptive: personalise the leaves with a federated "
                                      "meta-learner (default none: each leaf keeps its fit)")
    p.add_argument("--groups", default=None, metavar="COLUMN",
                   help="adaptive: the column naming each row's site; every site is a client "
                        "with a leaf of its own, its rows never mixed with another's; mixed: "
                        "the groups of the random effects")
    p.add_argument("--link", choices=("logit", "probit", "cloglog", "loglog", "cauchit"),
                   default=None, help="mle, dc: the link function (default logit)")
    p.add_argument("--nominal", default=None, metavar="FEATURES",
                   help="mle: features whose slope may differ at every cut (partial "
                        "proportional odds): f1,f2")
    p.add_argument("--po-test", choices=("brant", "score"), default=None,
                   help="test the proportional-odds assumption on the fitted rows (shown "
                        "below the coefficients, saved with the model, in its report)")
    p.add_argument("--weights-type", choices=("frequency", "probability"), default=None,
                   help="mle: --weights are frequency weights (default) or survey / "
                        "inverse-probability weights (robust standard errors)")
    p.add_argument("--cov-groups", default=None, metavar="COLUMN",
                   help="mle: cluster-robust standard errors by this column (a respondent "
                        "answering several times, a school); not a feature")
    p.add_argument("--random", default=None, metavar="EFFECTS",
                   help="mixed: the random effects by group: slopes (an intercept and every "
                        "feature's slope; default), intercept, or the features with random "
                        "slopes: f1,f2")
    p.add_argument("--covariance", choices=("full", "diagonal"), default=None,
                   help="mixed: correlated random effects (full, default) or independent ones")
    p.add_argument("--stability", type=_at_least_two, default=None, metavar="N",
                   help="adaptive: grow the partition again on N random parts of the rows and "
                        "report how alike the regions are (adjusted Rand index; saved with "
                        "the model and shown in its report)")
    p.add_argument("--n-subsets", type=int, default=None, help="dc only (default: workers)")
    p.add_argument("--alpha", type=_alpha, default=None,
                   help="dc: rate (default), cv, bic or a number; mle: a ridge penalty (0)")
    p.add_argument("--variance", choices=("cluster", "sandwich", "model"), default=None,
                   help="dc: cluster (default), sandwich or model; mle: model (default) or "
                        "sandwich")
    p.add_argument("--refine-rounds", type=int, default=None,
                   help="dc (default 1) and adaptive (default 20, a maximum: rounds stop "
                        "once the global model moves less than 0.01 SE)")
    p.add_argument("--backend", choices=("processes", "serial", "dask"), default=None,
                   help="dc and adaptive (default processes; dask: a local Dask cluster, or "
                        "the one at --scheduler)")
    p.add_argument("--scheduler", default=None,
                   help="address of a running Dask scheduler, tcp://host:8786 (with "
                        "--backend dask)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs)")
    p.add_argument("--random-state", type=int, default=0)
    _add_ci_alpha(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=_cmd_fit)


def _add_stream(command) -> None:
    p = command("stream", "update an adaptive model batch by batch, watching for drift")
    p.add_argument("model", help="model directory (fitted with --granularity)")
    _add_data(p, "CSV or Parquet data of new labelled rows, in stream order")
    p.add_argument("--target", required=True, help="the ordinal target column")
    p.add_argument("--batch-size", type=int, default=10_000, help="rows per update")
    p.add_argument("--out", help="model directory to write (default: update MODEL in place)")
    p.add_argument("--events", help="event log to write, JSON lines (default OUT.events.jsonl)")
    p.add_argument("--again", action="store_true",
                   help="feed every file, even those the model already took (unchanged, with "
                        "the same filter and target), which are otherwise skipped, and those "
                        "changed since, which are otherwise refused")
    p.set_defaults(func=_cmd_stream)


def _add_predict(command) -> None:
    p = command("predict", "predict classes and class probabilities")
    p.add_argument("model", help="model directory")
    _add_data(p, "CSV or Parquet data with the model's feature columns")
    p.add_argument("--out", required=True, help="output .csv or .parquet")
    p.add_argument("--keep", help="input columns to copy into the output (an id, say): c1,c2")
    p.add_argument("--groups", metavar="COLUMN",
                   help="the column naming each row's site (a model fitted with --groups): "
                        "each row by its site's model, the global one for a new site")
    p.set_defaults(func=_cmd_predict)


def _add_evaluate(command) -> None:
    p = command("evaluate", "ordinal scores of a model on labelled data")
    p.add_argument("model")
    _add_data(p, "labelled CSV or Parquet data")
    p.add_argument("--target", required=True)
    p.add_argument("--groups", metavar="COLUMN",
                   help="the column naming each row's site (a model fitted with --groups)")
    p.add_argument("--json", action="store_true",
                   help="print the scores, the baseline and the per-leaf scores as JSON")
    p.set_defaults(func=_cmd_evaluate)


def _add_report(command) -> None:
    p = command("report", "write the HTML report of a model: partition, coefficients, "
                          "leaves, meta-learning, drift")
    p.add_argument("model", help="model directory")
    p.add_argument("--out", required=True, help="the .html file to write")
    p.add_argument("--data", help="labelled rows (CSV or Parquet: a file, a folder or an "
                                  "address) to score each leaf on and to draw in the "
                                  "partition plot")
    _add_filter(p)
    p.add_argument("--target", help="the target column of --data")
    p.add_argument("--groups", metavar="COLUMN",
                   help="the column of --data naming each row's site (a model fitted with "
                        "--groups)")
    _add_ci_alpha(p)
    p.set_defaults(func=_cmd_report)


def _add_summary(command) -> None:
    p = command("summary", "coefficient table with confidence intervals")
    p.add_argument("model")
    _add_ci_alpha(p)
    p.add_argument("--html", help="also write the table as HTML to this file")
    p.add_argument("--leaf", type=int, metavar="ID",
                   help="an adaptive model: the table of this leaf's model (its id, as "
                        "apply(), evaluate, the report and describe() show it)")
    p.set_defaults(func=_cmd_summary)


def _add_demo(command) -> None:
    p = command("demo", "the whole pipeline on the RAND health insurance data (offline): "
                        "fits, partition, meta-learning, a stream with a change, the report")
    p.add_argument("--out", default="fedgrain_demo", help="folder for the demo's files")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cmd_demo)


def _add_data(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("data", help=f"{what}: a file (.csv, .tsv, .txt, .parquet, .pq; .csv.gz), a "
                                "folder of them (key=value folders become columns), or an "
                                "address such as s3://bucket/path (endpoint and credentials "
                                "from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    _add_filter(p)


def _add_filter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", metavar="EXPR",
                   help="read only the rows where EXPR holds: comparisons, boolean columns, "
                        "is_null(col), joined by and, or, not: \"year >= 2020 and region in "
                        "['north', 'south']\" (rows where a compared value is missing are "
                        "dropped; on partition columns, whole files are skipped)")


def _add_ci_alpha(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ci-alpha", type=_probability, default=0.05,
                   help="1 - confidence level of the intervals (default 0.05)")


#: Python-API wording in messages, and the command-line options that say the same.
_CLI_WORDING = [
    (re.compile(r"categorical=\[([^\]]*)\]"),
     lambda m: "--categorical " + m.group(1).replace("'", "").replace(" ", "")),
    (re.compile(r"levels=\[([^\]]*)\]"),
     lambda m: "--levels " + (m.group(1).replace("'", "").replace(" ", "") or "a,b,c")),
]


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    for pattern, repl in _CLI_WORDING:
        msg = pattern.sub(repl, msg)
    return msg


#: Exit statuses: 0 done, 2 a usage or data error (the user can fix the input), 1 otherwise.
USAGE_OR_DATA = (DataError, DataTypeError, ModelFileError, ParameterError, FileNotFoundError,
                 FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def exit_code(exc: BaseException) -> int:
    """2 for a usage or data error (bad input, option values, paths, model files), 1
    otherwise (resources, lost workers or scheduler, bugs)."""
    if isinstance(exc, USAGE_OR_DATA):
        return 2
    return 1


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"fedgrain: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare ``fedgrain``: what it can do
        parser.print_help()
        return 0
    # as the program (argv from the command line): SIGTERM cleans up before exiting, and one
    # that comes once the command is done lets the exit finish its clean-up; called from Python
    # with its own argv, the application's signal handling is left alone
    restore = _exit_cleanly_on_sigterm() if argv is None else (lambda: None)
    saved = warnings.formatwarning
    if not args.debug:  # warnings as one line each, like errors (with --debug: Python's own)
        warnings.formatwarning = _one_line_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = saved
        _end_bars()
        restore()


def _exit_cleanly_on_sigterm():
    """SIGTERM (``kill``, a job scheduler's stop) ends the command as an exception would: the
    fit's clean-up runs (worker processes, temporary and shared-memory folders) before the exit
    with status 143. Python's default would stop at once and leave them behind. The function
    returned is called when the command is done: a SIGTERM while the program then exits lets
    the exit's clean-up finish (the command's status stands)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None  # a handler of the application's own stays in charge

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops at once
        # an object the exit interrupts half-made (a zip file being opened) complains from
        # its __del__ with a traceback; the exit is on purpose, so such reports are dropped
        sys.unraisablehook = lambda unraisable: None
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # When the command is done and the program exits, SIGTERM is ignored: the exit's clean-up
    # (worker processes, temporary folders) finishes and the command's status stands (SIGKILL
    # still stops it). The default action killed the exit half-way (exit -15), and a Python
    # handler would not do: the interpreter puts the default back late in its exit; it leaves
    # an ignored signal ignored.
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run(args) -> int:
    try:
        return args.func(args)
    except (FedgrainError, ValueError, TypeError, OSError) as exc:
        _end_bars()
        if args.debug:
            traceback.print_exc()
            print(getattr(exc, "worker_traceback", ""), file=sys.stderr, end="")
        print(f"fedgrain: error: {_one_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        _end_bars()
        print("fedgrain: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line unless --debug
        _end_bars()
        if args.debug:
            traceback.print_exc()
            print(getattr(exc, "worker_traceback", ""), file=sys.stderr)
        print(f"fedgrain: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with "
              "--debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
