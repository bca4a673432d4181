"""Evaluate the zero-shot probabilities against a labelled set: ``curator evaluate``.

The truth CSV
    One row per image (key column ``path`` or ``sop_instance_uid``) or per study (key column
    ``study_instance_uid``); column names are matched by their snake_case form, so CheXpert's
    ``Path`` and ``Pleural Effusion`` work as they are. A relative ``path`` is relative to the
    CSV's own folder (or ``--root``: for CheXpert's ``valid.csv``, whose paths start with
    ``CheXpert-v1.0/``, the folder above that). Finding columns are those whose snake_case name is a finding
    column of the workspace (or the findings asked for); other columns are listed as ignored.

Values and the -1 / blank policy
    ``1`` (also ``1.0``, ``true``, ``yes``, ``positive``) is positive, ``0`` (``false``, ``no``,
    ``negative``) negative, ``-1`` (``uncertain``, ``u``) uncertain, an empty cell blank (not
    mentioned / not assessed). ``--uncertain`` decides what -1 becomes: ``exclude`` (default:
    the image is left out for that finding), ``positive`` (CheXpert's U-Ones) or ``negative``
    (U-Zeros). ``--blank``: ``exclude`` (default) or ``negative`` (CheXpert-labeler output, where
    blank means "not mentioned"). Anything else is an error naming the value.

Study level
    ``--level study``: one unit per study (DICOM StudyInstanceUID; images without one are their
    own study): the score is the ``max`` (default) or ``mean`` of the probabilities of the
    study's labelled images (for a study-keyed CSV: all its images in the workspace), the truth
    is positive when any of them is positive (after the policy), else negative.

Thresholds
    Sensitivity, specificity, PPV, NPV, F1 and MCC are reported at one threshold per finding: the
    fixed ``--threshold``, else the workspace's calibrated threshold (``curator calibrate``),
    else one chosen on the evaluated set itself by ``--threshold-rule`` (Youden's J by default;
    flagged as optimistic in the report).

Confidence intervals: ROC AUC and PR AUC (average precision) by the percentile bootstrap of
:mod:`curator.metrics` (1,000 resamples, seeded); sensitivity, specificity, PPV and NPV by the
Wilson score interval.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from curator.fileutil import file_sha256
from curator.workspace import open_workspace

log = logging.getLogger(__name__)

KEYS = ("path", "sop_instance_uid", "study_instance_uid")
UNCERTAIN_POLICIES = ("exclude", "positive", "negative")
BLANK_POLICIES = ("exclude", "negative")
AGGREGATES = ("max", "mean")

_POS = {"1", "1.0", "+1", "true", "t", "yes", "y", "positive", "pos", "present"}
_NEG = {"0", "0.0", "-0", "false", "f", "no", "n", "negative", "neg", "absent"}
_UNC = {"-1", "-1.0", "uncertain", "u", "unsure", "?"}
_BLANK = {"", "nan", "na", "n/a", "none", "null"}


@dataclass
class TruthPolicy:
    uncertain: str = "exclude"
    blank: str = "exclude"

    def __post_init__(self):
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain policy must be one of {', '.join(UNCERTAIN_POLICIES)}, got {self.uncertain!r}")
        if self.blank not in BLANK_POLICIES:
            raise ValueError(f"blank policy must be one of {', '.join(BLANK_POLICIES)}, got {self.blank!r}")

    def to_dict(self) -> dict:
        return {"uncertain": self.uncertain, "blank": self.blank,
                "meaning": "1 positive, 0 negative, -1 uncertain, blank not mentioned; 'exclude' leaves the image out for that finding"}


@dataclass
class Truth:
    """A truth CSV matched to workspace images.

    ``frame`` is image level: ``image_id``, ``_study`` (the study unit) and one float column per
    finding (1.0 / 0.0 / NaN after the policy). Study-keyed truth is repeated on every image of
    the study.
    """

    source: str
    sha256: str
    key: str
    policy: TruthPolicy
    findings: list[str]
    frame: object  # pandas.DataFrame
    rows: int
    matched_rows: int
    unmatched_rows: int
    ignored_columns: list[str] = field(default_factory=list)
    raw_counts: dict = field(default_factory=dict)

    @property
    def level(self) -> str:
        return "study" if self.key == "study_instance_uid" else "image"

    def describe(self) -> dict:
        return {
            "file": Path(self.source).name,
            "sha256": self.sha256,
            "key": self.key,
            "rows": self.rows,
            "matched_rows": self.matched_rows,
            "unmatched_rows": self.unmatched_rows,
            "images": len(self.frame),
            "findings": self.findings,
            "ignored_columns": self.ignored_columns,
            "values": self.raw_counts,
        }


def parse_values(col: str, values) -> tuple[object, dict]:
    """Raw CSV cells -> float series of 1 / 0 / -1 / NaN (blank), and counts of each."""
    import numpy as np
    import pandas as pd

    s = pd.Series(values, dtype="string").fillna("").str.strip().str.lower()
    out = np.full(len(s), np.nan)
    pos, neg, unc = s.isin(_POS).to_numpy(), s.isin(_NEG).to_numpy(), s.isin(_UNC).to_numpy()
    blank = s.isin(_BLANK).to_numpy()
    out[pos], out[neg], out[unc] = 1.0, 0.0, -1.0
    bad = ~(pos | neg | unc | blank)
    if bad.any():
        examples = sorted(set(s[bad].tolist()))[:3]
        raise ValueError(f"truth column {col!r}: value(s) {', '.join(repr(e) for e in examples)} are not 1, 0, -1 or blank")
    counts = {"1": int(pos.sum()), "0": int(neg.sum()), "-1": int(unc.sum()), "blank": int(blank.sum())}
    return pd.Series(out, index=s.index), counts


def apply_policy(values, policy: TruthPolicy):
    """-1 and NaN (blank) per the policy; the result holds 1.0, 0.0 or NaN (excluded)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64).copy()
    unc = v == -1
    blank = np.isnan(v)
    v[unc] = {"exclude": np.nan, "positive": 1.0, "negative": 0.0}[policy.uncertain]
    v[blank] = {"exclude": np.nan, "negative": 0.0}[policy.blank]
    return v


def load_truth(ws, csv_path: str | Path, policy: TruthPolicy | None = None, key: str | None = None,
               root: str | Path | None = None, findings: list[str] | None = None) -> Truth:
    """Read a truth CSV and match its rows to the workspace's current images."""
    import pandas as pd

    from curator.prompts import snake_case
    from curator.query import connect

    ws = open_workspace(ws)
    policy = policy or TruthPolicy()
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such truth CSV")
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv_path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    names = {}
    for c in raw.columns:
        try:
            sc = snake_case(str(c))
        except ValueError:
            continue
        if sc in names:
            raise ValueError(f"{csv_path}: columns {names[sc]!r} and {c!r} both mean {sc!r}")
        names[sc] = c
    if key is None:
        key = next((k for k in KEYS if k in names), None)
        if key is None:
            raise ValueError(f"{csv_path}: needs a key column: one of {', '.join(KEYS)} (matched by snake_case name)")
    elif key not in KEYS:
        raise ValueError(f"key must be one of {', '.join(KEYS)}")
    elif key not in names:
        raise ValueError(f"{csv_path}: no column {key!r}")
    wanted = findings if findings is not None else sorted(ws.manifest.get("finding_columns", {}))
    wanted = [snake_case(f) for f in wanted]
    fcols = [c for c in wanted if c in names]
    if not fcols:
        raise ValueError(f"{csv_path}: no column matches a finding ({', '.join(wanted[:20])}); "
                         "finding columns are matched by snake_case name, e.g. 'Pleural Effusion' -> pleural_effusion")
    ignored = [names[c] for c in names if c not in fcols and c not in KEYS]
    keys = raw[names[key]].astype(str).str.strip()
    empty = keys == ""
    if empty.any():
        raise ValueError(f"{csv_path}: {int(empty.sum())} row(s) have an empty {key!r} (first at line {int(empty.idxmax()) + 2})")
    values, counts = {}, {}
    for c in fcols:
        values[c], counts[c] = parse_values(c, raw[names[c]])
    t = pd.DataFrame({"_row": range(len(raw))})
    if key == "path":
        base = Path(root).expanduser().resolve() if root else csv_path.parent.resolve()
        k1, k2 = [], []
        for v in keys:
            p = Path(v).expanduser()
            if not p.is_absolute():
                p = base / p
            k1.append(os.path.normpath(str(p)))
            k2.append(os.path.realpath(str(p)))
        t["k1"], t["k2"] = k1, k2
        norm = t["k1"]
    else:
        t["k1"], t["k2"] = keys.to_numpy(), keys.to_numpy()
        norm = t["k1"]
    dup = norm.duplicated(keep=False)
    if dup.any():
        first = int(dup.idxmax())
        others = [int(i) + 2 for i in norm.index[(norm == norm[first]) & dup]]
        raise ValueError(f"{csv_path}: {int(norm.duplicated().sum())} duplicate {key} value(s), e.g. lines {', '.join(map(str, others[:4]))}")
    col = {"path": "path", "sop_instance_uid": "sop_instance_uid", "study_instance_uid": "study_instance_uid"}[key]
    con = connect(ws, sandbox=False)
    try:
        con.register("truth_keys", t)
        m = con.execute(
            f"""
            WITH hits AS (
                SELECT t._row, c.image_id FROM truth_keys AS t JOIN catalog AS c ON c.{col} = t.k1
                UNION
                SELECT t._row, c.image_id FROM truth_keys AS t JOIN catalog AS c ON c.{col} = t.k2
            )
            SELECT h._row, h.image_id,
                   coalesce(c.study_instance_uid, 'image:' || CAST(c.image_id AS VARCHAR)) AS _study
            FROM hits AS h JOIN catalog AS c USING (image_id)
            ORDER BY h._row, h.image_id
            """
        ).df()
    finally:
        con.close()
    if key != "study_instance_uid":
        m = m.drop_duplicates("_row", keep="first")  # the same SOP instance stored twice: the first
    m = m.drop_duplicates("image_id", keep="first")
    frame = m[["image_id", "_study"]].copy().reset_index(drop=True)
    for c in fcols:
        frame[c] = apply_policy(values[c].to_numpy()[m["_row"].to_numpy()], policy)
    matched = int(m["_row"].nunique())
    if matched == 0:
        hint = (f"relative paths were taken from {base}; give --root DIR (e.g. CheXpert's valid.csv: the folder above "
                "CheXpert-v1.0)" if key == "path" else f"no catalogued image has one of these {key} values")
        raise ValueError(f"{csv_path}: none of its {len(raw)} rows matches a workspace image ({hint})")
    return Truth(
        source=str(csv_path.resolve()), sha256=file_sha256(csv_path), key=key, policy=policy, findings=fcols, frame=frame,
        rows=len(raw), matched_rows=matched, unmatched_rows=len(raw) - matched, ignored_columns=ignored, raw_counts=counts,
    )


def truth_scores(ws, truth: Truth, columns: list[str]):
    """``truth.frame`` joined with the images view's probabilities (``<col>__score``)."""
    from curator.query import connect

    ws = open_workspace(ws)
    have = set(ws.manifest.get("finding_columns", {}))
    cols = [c for c in columns if c in have]
    con = connect(ws, sandbox=False)
    try:
        ids = truth.frame[["image_id"]].copy()
        con.register("truth_ids", ids)
        sel = ", ".join(f'i."{c}" AS "{c}__score"' for c in cols)
        scores = con.execute(f"SELECT i.image_id{', ' + sel if sel else ''} FROM images AS i SEMI JOIN truth_ids AS t ON t.image_id = i.image_id").df()
    finally:
        con.close()
    return truth.frame.merge(scores, on="image_id", how="inner")


def units(frame, column: str, score_column: str, level: str = "image", aggregate: str = "max"):
    """(y, s, ids) of the evaluation units of one finding: images, or studies aggregated."""
    import numpy as np

    d = frame[["image_id", "_study", column, score_column]].dropna()
    if level == "image":
        return d[column].to_numpy(np.float64), d[score_column].to_numpy(np.float64), d["image_id"].to_numpy()
    if level != "study":
        raise ValueError("level must be 'image' or 'study'")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}")
    g = d.groupby("_study", sort=True)
    y = g[column].max()
    s = g[score_column].agg(aggregate)
    return y.to_numpy(np.float64), s.to_numpy(np.float64), y.index.to_numpy()


def _clean(obj):
    """NaN -> None, numpy scalars -> Python, for JSON."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def evaluate_finding(y, s, n_boot: int = 1000, seed: int = 0, threshold: float | None = None, threshold_rule: str = "youden",
                     threshold_source: str | None = None, band: tuple[float, float] | None = None) -> dict:
    """Every number of one finding's report entry (see the module docstring)."""
    import numpy as np

    from curator import metrics as M

    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out: dict = {"n": len(y), "n_pos": n_pos, "n_neg": n_neg, "prevalence": n_pos / len(y) if len(y) else None}
    if n_pos == 0 or n_neg == 0:
        out.update(auc=None, auc_ci_low=None, auc_ci_high=None, pr_auc=None, pr_auc_ci_low=None, pr_auc_ci_high=None,
                   note="needs at least one positive and one negative unit")
        return out
    boot = M.bootstrap(y, s, n_boot=n_boot, seed=seed)
    out["auc"] = M.roc_auc(y, s)
    out["auc_ci_low"], out["auc_ci_high"] = boot["auc"]
    out["pr_auc"] = M.average_precision(y, s)
    out["pr_auc_ci_low"], out["pr_auc_ci_high"] = boot["pr_auc"]
    out["bootstrap_resamples_used"] = boot["n_used"]
    if threshold is None:
        threshold = M.choose_threshold(y, s, threshold_rule)
        threshold_source = f"chosen on this set by {M.parse_rule(threshold_rule)} (optimistic)"
    out["threshold_source"] = threshold_source
    tm = M.threshold_metrics(y, s, threshold)
    out.update(tm)
    if band is not None:
        lower, upper = band
        lab = np.where(s >= upper, 1, np.where(s < lower, 0, -1))
        pos, neg = lab == 1, lab == 0
        wl = {"lower": lower, "upper": upper, "positive": int(pos.sum()), "negative": int(neg.sum()), "uncertain": int((lab == -1).sum())}
        wl["ppv"] = float((y[pos] == 1).mean()) if pos.any() else None
        wl["npv"] = float((y[neg] == 0).mean()) if neg.any() else None
        wl["coverage"] = float((lab != -1).mean())
        out["weak_labels"] = wl
    return out


def evaluate(ws, truth: Truth, out_dir: str | Path | None = None, findings: list[str] | None = None, level: str | None = None,
             aggregate: str = "max", threshold: float | None = None, threshold_rule: str = "youden", n_boot: int = 1000,
             seed: int = 0, plots: bool = True) -> dict:
    """Evaluate every matched finding; write report.json, report.md and the plots when ``out_dir``."""
    from curator import __version__
    from curator import metrics as M
    from curator.calibrate import active_calibration

    ws = open_workspace(ws)
    M.parse_rule(threshold_rule)
    level = level or truth.level
    if truth.level == "study" and level == "image":
        raise ValueError("the truth CSV is keyed by study_instance_uid: evaluate with --level study")
    have = ws.manifest.get("finding_columns", {})
    cols = [c for c in (findings or truth.findings) if c in truth.findings]
    missing = [c for c in cols if c not in have]
    if findings:
        unknown = [f for f in findings if f not in truth.findings]
        if unknown:
            raise ValueError(f"finding(s) {', '.join(unknown)} not in the truth CSV (it has {', '.join(truth.findings)})")
    if missing:
        raise ValueError(f"finding(s) {', '.join(missing)} have no probabilities in the workspace; run `curator label` first")
    frame = truth_scores(ws, truth, cols)
    cal = active_calibration(ws)
    report: dict = {"findings": {}}
    out_path = Path(out_dir).expanduser().resolve() if out_dir else None
    if out_path:
        out_path.mkdir(parents=True, exist_ok=True)
    for c in cols:
        y, s, _ = units(frame, c, f"{c}__score", level, aggregate)
        thr, src, band = threshold, ("fixed (--threshold)" if threshold is not None else None), None
        if thr is None and c in cal:
            thr, src = float(cal[c]["threshold"]), f"calibrated ({cal[c].get('rule')}, {cal[c].get('calibrated_at', '')[:19]})"
            if (cal[c].get("truth") or {}).get("sha256") == truth.sha256:
                src += " on this same labelled set: the figures at the threshold are optimistic; evaluate on a held-out set"
                log.warning("%s: the stored threshold was calibrated on this same labelled set (%s): sensitivity, specificity, PPV "
                            "and NPV at it are optimistic; evaluate on a held-out set", c, Path(truth.source).name)
        if c in cal:
            band = (float(cal[c]["lower"]), float(cal[c]["upper"]))
        entry = evaluate_finding(y, s, n_boot=n_boot, seed=seed, threshold=thr, threshold_rule=threshold_rule, threshold_source=src, band=band)
        entry["prompt_set"] = have.get(c)
        if plots and out_path and entry.get("auc") is not None:
            fpr, tpr, _ = M.roc_curve(y, s)
            prec, rec, _ = M.precision_recall_curve(y, s)
            roc_png, pr_png = f"roc_{c}.png", f"pr_{c}.png"
            plot_curve(out_path / roc_png, fpr, tpr, f"{c}: ROC AUC {entry['auc']:.3f}", "1 - specificity", "sensitivity",
                       diagonal=True, point=(1 - entry["specificity"], entry["sensitivity"]))
            plot_curve(out_path / pr_png, [0.0, *rec.tolist()], [1.0, *prec.tolist()], f"{c}: PR AUC {entry['pr_auc']:.3f}", "recall", "precision",
                       step=True, baseline=entry["n_pos"] / entry["n"], point=(entry["sensitivity"], entry["ppv"]))
            entry["roc_png"], entry["pr_png"] = roc_png, pr_png
        report["findings"][c] = entry
    aucs = [e["auc"] for e in report["findings"].values() if e.get("auc") is not None]
    report["summary"] = {"findings": len(report["findings"]), "mean_auc": sum(aucs) / len(aucs) if aucs else None}
    report["level"] = level
    if level == "study":
        report["aggregate"] = aggregate
    report["policy"] = truth.policy.to_dict()
    report["truth"] = truth.describe()
    report["bootstrap"] = {"resamples": n_boot, "seed": seed, "level": 0.95, "scheme": M.BOOTSTRAP_SCHEME}
    report["threshold_rule"] = str(M.parse_rule(threshold_rule)) if threshold is None else None
    report["workspace"] = {"generation": ws.manifest.get("generation"), "ensemble": ws.manifest.get("ensemble", []),
                           "prompt_sets": {ps: ws.manifest.get("prompt_sets", {}).get(ps, {}).get("name") for ps in sorted({have[c] for c in cols})}}
    report["created"] = dt.datetime.now(dt.UTC).isoformat()
    report["tool"] = {"name": "curator", "version": __version__}
    report = _clean(report)
    if out_path:
        (out_path / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (out_path / "report.md").write_text(report_markdown(report))
    return report


def _f(v, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def report_markdown(report: dict) -> str:
    t = report["truth"]
    lines = [
        "# Zero-shot evaluation",
        "",
        f"Truth: `{t['file']}` (sha256 {t['sha256'][:12]}), key `{t['key']}`, {t['rows']} rows, {t['matched_rows']} matched to workspace "
        f"images, {t['unmatched_rows']} not found.",
        f"Level: {report['level']}" + (f" ({report['aggregate']} over a study's images)" if report.get("aggregate") else "") +
        f". Policy: -1 -> {report['policy']['uncertain']}, blank -> {report['policy']['blank']}.",
        f"95% intervals: AUCs by percentile bootstrap ({report['bootstrap']['resamples']} resamples, seed {report['bootstrap']['seed']}); "
        "rates by Wilson score interval.",
        "",
        "| finding | pos | neg | ROC AUC (95% CI) | PR AUC (95% CI) | threshold | sensitivity | specificity | PPV | NPV | F1 | MCC |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, e in report["findings"].items():
        if e.get("auc") is None:
            lines.append(f"| {c} | {e['n_pos']} | {e['n_neg']} | {e.get('note', '–')} | | | | | | | | |")
            continue
        lines.append(
            f"| {c} | {e['n_pos']} | {e['n_neg']} | {_f(e['auc'])} ({_f(e['auc_ci_low'])}–{_f(e['auc_ci_high'])}) | "
            f"{_f(e['pr_auc'])} ({_f(e['pr_auc_ci_low'])}–{_f(e['pr_auc_ci_high'])}) | {_f(e['threshold'], 4)} | {_f(e['sensitivity'])} | "
            f"{_f(e['specificity'])} | {_f(e['ppv'])} | {_f(e['npv'])} | {_f(e['f1'])} | {_f(e['mcc'])} |"
        )
    if report["summary"]["mean_auc"] is not None:
        lines += ["", f"Mean ROC AUC over {report['summary']['findings']} findings: {report['summary']['mean_auc']:.3f}."]
    srcs = sorted({e["threshold_source"] for e in report["findings"].values() if e.get("threshold_source")})
    if srcs:
        lines += ["", "Thresholds: " + "; ".join(srcs) + "."]
    weak = {c: e["weak_labels"] for c, e in report["findings"].items() if e.get("weak_labels")}
    if weak:
        lines += ["", "## Weak labels (two calibrated thresholds)", "",
                  "| finding | lower | upper | positive | negative | uncertain | PPV of 1 | NPV of 0 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c, w in weak.items():
            lines.append(f"| {c} | {_f(w['lower'], 4)} | {_f(w['upper'], 4)} | {w['positive']} | {w['negative']} | {w['uncertain']} | {_f(w['ppv'])} | {_f(w['npv'])} |")
    plots = [(c, e) for c, e in report["findings"].items() if e.get("roc_png")]
    if plots:
        lines += ["", "## Curves", ""]
        for c, e in plots:
            lines += [f"### {c}", "", f"![ROC {c}]({e['roc_png']}) ![PR {c}]({e['pr_png']})", ""]
    lines += ["", f"curator {report['tool']['version']}, {report['created'][:19]} UTC."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# plots (Pillow, no plotting library)
# ----------------------------------------------------------------------------------------------
def plot_curve(path: str | Path, xs, ys, title: str, xlabel: str, ylabel: str, diagonal: bool = False, step: bool = False,
               baseline: float | None = None, point: tuple[float, float] | None = None, size: int = 480) -> None:
    """A unit-square curve plot as PNG: axes with ticks every 0.2, optional chance line and operating point."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    W = H = size
    left, right, top, bottom = 58, 18, 34, 50
    pw, ph = W - left - right, H - top - bottom
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * pw, top + (1 - y) * ph

    for i in range(6):
        v = i / 5
        x0, _ = xy(v, 0)
        _, y0 = xy(0, v)
        d.line([(x0, top), (x0, top + ph)], fill=(232, 232, 232))
        d.line([(left, y0), (left + pw, y0)], fill=(232, 232, 232))
        d.line([(x0, top + ph), (x0, top + ph + 5)], fill="black")
        d.line([(left - 5, y0), (left, y0)], fill="black")
        d.text((x0, top + ph + 8), f"{v:.1f}", fill="black", font=font, anchor="mt")
        d.text((left - 8, y0), f"{v:.1f}", fill="black", font=font, anchor="rm")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    if diagonal:
        _dashed(d, xy(0, 0), xy(1, 1), (150, 150, 150))
    if baseline is not None:
        _dashed(d, xy(0, baseline), xy(1, baseline), (150, 150, 150))
    pts = []
    xs, ys = list(xs), list(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if step and i > 0:  # the PR step: precision p_k holds over (r_{k-1}, r_k], as average precision counts it
            pts.append(xy(xs[i - 1], y))
        pts.append(xy(x, y))
    if len(pts) > 1:
        d.line(pts, fill=(31, 119, 180), width=2)
    if point is not None and all(v is not None and not math.isnan(v) for v in point):
        px, py = xy(*point)
        d.ellipse([px - 5, py - 5, px + 5, py + 5], outline=(214, 39, 40), width=2)
    d.text((W / 2, 10), title, fill="black", font=font, anchor="mt")
    d.text((left + pw / 2, H - 14), xlabel, fill="black", font=font, anchor="mm")
    label = Image.new("RGB", (ph, 18), "white")
    ImageDraw.Draw(label).text((ph / 2, 9), ylabel, fill="black", font=font, anchor="mm")
    im.paste(label.rotate(90, expand=True), (6, top))
    im.save(path, format="PNG")


def _dashed(d, a, b, colour, dash: float = 6.0) -> None:
    (x0, y0), (x1, y1) = a, b
    length = math.hypot(x1 - x0, y1 - y0)
    n = max(1, int(length / dash))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(1.0, (i + 1) / n)
        d.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)], fill=colour, width=1)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_truth_args(p, truth_required: bool = True) -> None:
    """The options every command reading a truth CSV shares (``truth_required=False``: the
    command checks --truth itself, as `calibrate --remove` needs none)."""
    p.add_argument("--workspace", "-w", required=True, metavar="W", help="workspace folder")
    p.add_argument("--truth", required=truth_required, metavar="CSV", help="labelled set: key column path / sop_instance_uid / study_instance_uid, "
                   "finding columns by snake_case name, values 1 / 0 / -1 / blank")
    p.add_argument("--key", choices=KEYS, default=None, help="key column (default: the first of path, sop_instance_uid, study_instance_uid present)")
    p.add_argument("--root", default=None, metavar="DIR", help="folder relative paths in the CSV start from (default: the CSV's folder)")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="exclude", help="what -1 means: leave out (default), positive, negative")
    p.add_argument("--blank", choices=BLANK_POLICIES, default="exclude", help="what a blank cell means: leave out (default), negative")
    p.add_argument("--level", choices=("image", "study"), default=None, help="evaluation unit (default: image; study for a study-keyed CSV)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="max", help="study score from its images' probabilities (default max)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _probability(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability from 0 to 1, got {text!r}") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability from 0 to 1, got {text}")
    return v


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="measure the zero-shot probabilities against a labelled CSV (ROC/PR AUC with CIs, report + plots)",
        description="Per finding: ROC AUC and PR AUC (average precision) with 95% bootstrap intervals, and at one threshold "
        "(--threshold, else the calibrated one, else chosen by --threshold-rule on this set) sensitivity, specificity, PPV, NPV, F1 "
        "and MCC. Writes OUT/report.json, OUT/report.md and ROC / PR curves as PNG.",
    )
    add_truth_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--finding", action="append", default=None, metavar="COL", help="only these finding columns (repeatable)")
    p.add_argument("--threshold", type=_probability, default=None, help="one fixed threshold for every finding (a probability, 0 to 1)")
    p.add_argument("--threshold-rule", default="youden", help="rule for uncalibrated findings: youden, f1, mcc, sensitivity=0.9, ppv=0.9, ... (default youden)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG curves")
    p.add_argument("--json", action="store_true", help="print report.json to standard output")
    p.set_defaults(func=_cli_evaluate)


def truth_from_args(args, findings: list[str] | None = None) -> Truth:
    if args.resamples < 1:
        raise ValueError("--resamples must be >= 1")
    return load_truth(args.workspace, args.truth, TruthPolicy(args.uncertain, args.blank), key=args.key, root=args.root, findings=findings)


def finding_args(values: list[str] | None) -> list[str] | None:
    """``--finding`` values as columns: "Pleural Effusion" -> pleural_effusion."""
    from curator.prompts import snake_case

    return [snake_case(v) for v in values] if values else None


def _cli_evaluate(args) -> int:
    args.finding = finding_args(args.finding)
    truth = truth_from_args(args)
    rep = evaluate(args.workspace, truth, args.out, findings=args.finding, level=args.level, aggregate=args.aggregate,
                   threshold=args.threshold, threshold_rule=args.threshold_rule, n_boot=args.resamples, seed=args.seed,
                   plots=not args.no_plots)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    t = rep["truth"]
    print(f"truth: {t['matched_rows']} of {t['rows']} rows matched ({t['unmatched_rows']} not in the workspace); level {rep['level']}")
    for c, e in rep["findings"].items():
        if e.get("auc") is None:
            print(f"  {c:<28} pos {e['n_pos']:>5} neg {e['n_neg']:>5}  {e.get('note')}")
            continue
        print(f"  {c:<28} pos {e['n_pos']:>5} neg {e['n_neg']:>5}  AUC {e['auc']:.3f} [{e['auc_ci_low']:.3f}, {e['auc_ci_high']:.3f}]"
              f"  PR AUC {e['pr_auc']:.3f}  thr {e['threshold']:.6f} sens {_f(e['sensitivity'])} spec {_f(e['specificity'])} "
              f"F1 {_f(e['f1'])} MCC {_f(e['mcc'])}")
    print(f"report: {Path(args.out).resolve() / 'report.md'}")
    return 0
