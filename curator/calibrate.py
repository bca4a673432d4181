"""Thresholds per finding from a labelled set, stored in the workspace: ``curator calibrate``.

For every finding of the truth CSV that the workspace has probabilities for:

* ``threshold``: chosen by ``--rule`` (maximise ``youden``, ``f1`` or ``mcc``, or meet a target:
  ``sensitivity=0.95``, ``specificity=0.9``, ``ppv=0.9``, ``npv=0.95``; see
  :mod:`curator.metrics`), with its own bootstrap uncertainty (percentile interval and standard
  deviation of the threshold the same rule picks on each of the 1,000 seeded resamples).
* ``upper`` / ``lower``: the two thresholds of the weak labels. ``--positive RULE`` picks
  ``upper`` (e.g. ``ppv=0.9``: images at or above it are labelled 1), ``--negative RULE``
  picks ``lower`` (e.g. ``npv=0.98`` or ``sensitivity=0.95``: images below it are labelled 0);
  both default to ``threshold`` (no uncertain band). A rule that cannot be met on the labelled
  set falls back to ``threshold`` (recorded in ``notes``); ``lower`` is never above ``upper``.

Weak labels: the ``labels`` view (:func:`labels_view_sql`, created by :mod:`curator.query`
whenever calibration exists) has ``image_id`` and one ``<finding>_label`` column per calibrated
finding: ``1`` when the probability >= upper, ``0`` when < lower, ``-1`` (uncertain) between,
NULL without a probability.

Storage: ``manifest["calibration"][prompt_set_id][column] = {...}``, committed atomically under
the writer lock. A calibration belongs to the prompt set whose probabilities it was computed
from; it is active while that prompt set provides the column (relabelling the finding with other
prompts deactivates it). The labelled set itself (image_id and the truth after the -1/blank
policy, no identifiers) is kept as ``W/truth/truth-<digest>.parquet`` so that cohort exports
can estimate their precision (:func:`curator.cohort.cohort_estimates`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

TRUTH_DIR = "truth"


def active_calibration(ws) -> dict:
    """``{column: entry}`` of the calibrations whose prompt set still provides the column."""
    m = ws if isinstance(ws, dict) else ws.manifest
    fc = m.get("finding_columns", {})
    out = {}
    for ps_id, cols in sorted((m.get("calibration") or {}).items()):
        for col, entry in cols.items():
            if fc.get(col) == ps_id:
                out[col] = entry
    return out


def _num(v: float) -> str:
    return f"CAST('{float(v)!r}' AS DOUBLE)"


def labels_view_sql(ws) -> str | None:
    """``CREATE VIEW labels`` for the active calibrations; None when nothing is calibrated."""
    cal = active_calibration(ws)
    if not cal:
        return None
    cols = []
    for col, e in sorted(cal.items()):
        q = '"' + col.replace('"', '""') + '"'
        ql = '"' + (col + "_label").replace('"', '""') + '"'
        cols.append(
            f"CAST(CASE WHEN {q} IS NULL THEN NULL WHEN {q} >= {_num(e['upper'])} THEN 1 "
            f"WHEN {q} < {_num(e['lower'])} THEN 0 ELSE -1 END AS TINYINT) AS {ql}"
        )
    return "CREATE OR REPLACE VIEW labels AS SELECT image_id, " + ", ".join(cols) + " FROM images"


def calibrate_arrays(y, s, rule: str = "youden", positive: str | None = None, negative: str | None = None,
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """Thresholds of one finding from truth ``y`` (0/1) and scores ``s``: the calibration entry's numbers.

    Raises ValueError when ``y`` holds one class only or ``rule`` cannot be met.
    """
    from curator import metrics as M

    rule_ = M.parse_rule(rule)
    pos_rule = M.parse_rule(positive) if positive else None
    neg_rule = M.parse_rule(negative) if negative else None
    y, s = M.as_binary(y, s)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"needs positives and negatives (has {n_pos} positive, {n_neg} negative)")
    thr = M.choose_threshold(y, s, rule_)
    if thr is None:
        raise ValueError(f"rule {rule_} cannot be met on the labelled set")
    rules = [rule_] + [r for r in (pos_rule, neg_rule) if r is not None]
    boot = M.bootstrap(y, s, n_boot=n_boot, seed=seed, rules=tuple(dict.fromkeys(rules)))
    notes = []
    upper = lower = thr
    if pos_rule is not None:
        u = M.choose_threshold(y, s, pos_rule)
        if u is None:
            notes.append(f"positive rule {pos_rule} not reachable on the labelled set; upper = threshold")
        else:
            upper = u
    if neg_rule is not None:
        lo = M.choose_threshold(y, s, neg_rule)
        if lo is None:
            notes.append(f"negative rule {neg_rule} not reachable on the labelled set; lower = threshold")
        else:
            lower = lo
    if lower > upper:
        notes.append(f"lower ({lower:.6g}) was above upper ({upper:.6g}); lower = upper (no uncertain band)")
        lower = upper
    tb = boot["thresholds"][str(rule_)]
    entry = {
        "rule": str(rule_),
        "threshold": thr,
        "threshold_ci_low": tb["ci"][0],
        "threshold_ci_high": tb["ci"][1],
        "threshold_std": tb["std"],
        "upper": upper,
        "upper_rule": str(pos_rule) if pos_rule else str(rule_),
        "lower": lower,
        "lower_rule": str(neg_rule) if neg_rule else str(rule_),
        "auc": M.roc_auc(y, s),
        "auc_ci_low": boot["auc"][0],
        "auc_ci_high": boot["auc"][1],
        "n_pos": n_pos,
        "n_neg": n_neg,
        "metrics": M.threshold_metrics(y, s, thr),
        "bootstrap": {"resamples": n_boot, "used": boot["n_used"], "seed": seed, "scheme": M.BOOTSTRAP_SCHEME},
        "notes": notes,
    }
    for name, r in (("upper", pos_rule), ("lower", neg_rule)):
        if r is not None:
            b = boot["thresholds"][str(r)]
            entry[f"{name}_ci_low"], entry[f"{name}_ci_high"] = b["ci"]
    return entry


def calibrate(ws, truth, rule: str = "youden", positive: str | None = None, negative: str | None = None,
              findings: list[str] | None = None, level: str | None = None, aggregate: str = "max",
              n_boot: int = 1000, seed: int = 0) -> tuple[dict, dict]:
    """Choose the thresholds; returns ``({column: entry}, {column: reason skipped})`` (nothing stored)."""
    from curator import metrics as M
    from curator.evaluate import _clean, truth_scores, units
    from curator.workspace import open_workspace

    ws = open_workspace(ws)
    for r in (rule, positive, negative):
        if r:
            M.parse_rule(r)
    level = level or truth.level
    if truth.level == "study" and level == "image":
        raise ValueError("the truth CSV is keyed by study_instance_uid: calibrate with --level study")
    have = ws.manifest.get("finding_columns", {})
    cols = list(findings or truth.findings)
    unknown = [c for c in cols if c not in truth.findings]
    if unknown:
        raise ValueError(f"finding(s) {', '.join(unknown)} not in the truth CSV (it has {', '.join(truth.findings)})")
    skipped = {c: "no probabilities in the workspace (run `curator label`)" for c in cols if c not in have}
    cols = [c for c in cols if c in have]
    frame = truth_scores(ws, truth, cols)
    now = dt.datetime.now(dt.UTC).isoformat()
    entries = {}
    for c in cols:
        y, s, _ = units(frame, c, f"{c}__score", level, aggregate)
        try:
            e = calibrate_arrays(y, s, rule, positive, negative, n_boot=n_boot, seed=seed)
        except ValueError as exc:
            skipped[c] = str(exc)
            continue
        entries[c] = _clean({
            "column": c,
            "prompt_set": have[c],
            **e,
            "level": level,
            "aggregate": aggregate if level == "study" else None,
            "policy": {"uncertain": truth.policy.uncertain, "blank": truth.policy.blank},
            "truth": {"file": Path(truth.source).name, "sha256": truth.sha256, "key": truth.key, "rows": truth.rows,
                      "matched_rows": truth.matched_rows},
            "calibrated_at": now,
        })
    return entries, skipped


def _truth_file(ws, truth) -> str:
    """Write the labelled set (image_id + truth columns, no identifiers) into W/truth/; return its relative name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curator.workspace import atomic_write_bytes

    table = pa.Table.from_pandas(truth.frame[["image_id", *truth.findings]].astype({c: "float32" for c in truth.findings}),
                                 preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(None), sink)
    data = sink.getvalue().to_pybytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    rel = f"{TRUTH_DIR}/truth-{digest}.parquet"
    path = ws.root / rel
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, data)
    return rel


def store_calibration(ws, truth, entries: dict) -> None:
    """Merge ``entries`` into ``manifest["calibration"]`` (atomic commit under the writer lock)."""
    from curator.workspace import open_workspace

    ws = open_workspace(ws)
    if not entries:
        return
    with ws.writer():
        for leftover in (ws.root / TRUTH_DIR).glob(".*.tmp"):  # from a killed run
            leftover.unlink(missing_ok=True)
        rel = _truth_file(ws, truth)
        cal = json.loads(json.dumps(ws.manifest.get("calibration") or {}))
        for col, e in entries.items():
            cal.setdefault(e["prompt_set"], {})[col] = {**e, "truth_file": rel}
        ws.commit(calibration=cal)


def remove_calibration(ws, columns: list[str] | None = None) -> int:
    """Drop the active calibration of ``columns`` (all when None); returns how many were removed."""
    from curator.workspace import open_workspace

    ws = open_workspace(ws)
    with ws.writer():
        cal = json.loads(json.dumps(ws.manifest.get("calibration") or {}))
        active = active_calibration(ws)
        n = 0
        for col, e in active.items():
            if columns is None or col in columns:
                cal.get(e["prompt_set"], {}).pop(col, None)
                n += 1
        cal = {k: v for k, v in cal.items() if v}
        ws.commit(calibration=cal)
    return n


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    from curator.evaluate import add_truth_args

    p = subparsers.add_parser(
        "calibrate",
        help="choose thresholds per finding on a labelled CSV and store them (weak labels 1/0/-1)",
        description="Choose a threshold per finding (maximise youden / f1 / mcc, or meet sensitivity=X, specificity=X, ppv=X, "
        "npv=X), with its bootstrap interval, and the two thresholds of the weak labels (--positive / --negative rules). "
        "Stored in the workspace with the prompt set; the `labels` view then gives <finding>_label = 1 / 0 / -1.",
    )
    add_truth_args(p, truth_required=False)
    p.add_argument("--rule", "--method", dest="rule", default="youden", help="threshold rule (default youden)")
    p.add_argument("--positive", default=None, metavar="RULE", help="rule for the upper threshold (label 1), e.g. ppv=0.9 (default: --rule)")
    p.add_argument("--negative", default=None, metavar="RULE", help="rule for the lower threshold (label 0), e.g. npv=0.98 or sensitivity=0.95 (default: --rule)")
    p.add_argument("--finding", action="append", default=None, metavar="COL", help="only these finding columns (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the thresholds, store nothing")
    p.add_argument("--remove", action="store_true", help="remove the stored calibration (of --finding, or all) and stop (needs no --truth)")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(func=_cli_calibrate)


def _cli_calibrate(args) -> int:
    from curator.evaluate import finding_args, truth_from_args

    args.finding = finding_args(args.finding)
    if args.remove:
        n = remove_calibration(args.workspace, args.finding)
        print(f"removed {n} calibration(s)")
        return 0
    if not args.truth:
        raise ValueError("--truth CSV is required (the labelled set to calibrate on)")
    truth = truth_from_args(args)
    entries, skipped = calibrate(args.workspace, truth, rule=args.rule, positive=args.positive, negative=args.negative,
                                 findings=args.finding, level=args.level, aggregate=args.aggregate, n_boot=args.resamples, seed=args.seed)
    if not args.dry_run:
        store_calibration(args.workspace, truth, entries)
    if args.json:
        print(json.dumps({"calibration": entries, "skipped": skipped, "stored": not args.dry_run}, indent=1))
        return 0
    print(f"truth: {truth.matched_rows} of {truth.rows} rows matched; rule {entries[next(iter(entries))]['rule'] if entries else args.rule}")
    for c, e in entries.items():
        m = e["metrics"]
        # the labels view's cutoffs, whenever they are not the threshold itself (a band, or one
        # cutoff both rules settled on; the view labels by these, not by the threshold)
        band = ("" if e["lower"] == e["upper"] == e["threshold"] else f"  labels: 1 >= {e['upper']:.6f}, 0 < {e['lower']:.6f}")
        print(f"  {c:<28} pos {e['n_pos']:>5} neg {e['n_neg']:>5}  AUC {e['auc']:.3f}  threshold {e['threshold']:.6f} "
              f"[{_f(e['threshold_ci_low'])}, {_f(e['threshold_ci_high'])}]  sens {_f(m['sensitivity'], 3)} spec {_f(m['specificity'], 3)} "
              f"PPV {_f(m['ppv'], 3)}{band}")
        for n in e.get("notes", []):
            print(f"    note: {n}")
    for c, why in skipped.items():
        print(f"  {c:<28} skipped: {why}")
    print("dry run: nothing stored" if args.dry_run else f"stored in {Path(args.workspace).resolve() / 'manifest.json'} (view: labels)")
    return 0


def _f(v, nd: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"
