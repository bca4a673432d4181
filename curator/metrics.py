"""Binary classification metrics in numpy: ROC / PR curves, AUCs, threshold metrics, bootstrap.

Everything here is a pure function of a 0/1 truth vector ``y`` and a score vector ``s`` (higher
= more likely positive); the tests check each against scikit-learn on the same arrays.

Conventions (the same as scikit-learn's):

* A threshold ``t`` predicts positive when ``s >= t``. Curves have one point per distinct score.
* ROC AUC counts a tied positive / negative pair as one half (the trapezoidal area); it is NaN
  when ``y`` holds one class only.
* Average precision (reported as the PR AUC) is ``sum_k (R_k - R_{k-1}) * P_k`` over the distinct
  thresholds in decreasing order: the step-wise area under the precision-recall curve, no
  interpolation (``sklearn.metrics.average_precision_score``).
* F1 and MCC are 0 where their denominator is 0.

Bootstrap (:func:`bootstrap`): resample ``i`` draws ``idx = rng.integers(0, n, n)`` from
``rng = numpy.random.default_rng(seed)``, one call per resample, in order; a resample holding one
class only is skipped (not replaced), so fewer than ``n_boot`` statistics may remain (the count is
returned). The interval is the percentile interval ``numpy.percentile(stats, [2.5, 97.5])``
(linear interpolation) for a 95% level. Each resample is evaluated exactly as the metric on
``y[idx], s[idx]`` would be, through integer weights on the distinct scores, without re-sorting.

Threshold rules (:func:`parse_rule`, :func:`choose_threshold`):

* ``youden`` / ``f1`` / ``mcc``: the threshold that maximises Youden's J (sensitivity +
  specificity - 1), F1 or MCC; among equal maxima the highest threshold.
* ``sensitivity=0.95``: the highest threshold whose sensitivity is at least 0.95.
* ``specificity=0.9``: the lowest threshold whose specificity is at least 0.9.
* ``ppv=0.9``: the lowest threshold whose PPV (precision) is at least 0.9.
* ``npv=0.95``: the highest threshold whose NPV is at least 0.95 (for "negative below").

Candidate thresholds are the observed scores, so a chosen threshold is itself a score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAXIMISE = ("youden", "f1", "mcc")
TARGETS = ("sensitivity", "specificity", "ppv", "npv")


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def as_binary(y, s=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``y`` as int8 0/1 and ``s`` as float64; raise ValueError on anything else."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError("truth must be one-dimensional")
    if y.dtype == bool:
        yb = y.astype(np.int8)
    else:
        yf = y.astype(np.float64)
        if not np.isin(yf, (0.0, 1.0)).all():
            raise ValueError("truth must hold only 0 and 1")
        yb = yf.astype(np.int8)
    if s is None:
        return yb, None
    s = np.asarray(s, dtype=np.float64)
    if s.shape != yb.shape:
        raise ValueError(f"truth ({yb.shape[0]}) and scores ({s.shape[0] if s.ndim else 0}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or infinity)")
    return yb, s


# ----------------------------------------------------------------------------------------------
# the sorted structure every metric is computed from
# ----------------------------------------------------------------------------------------------
@dataclass
class Ranked:
    """Scores sorted once, in decreasing order, grouped by distinct value.

    ``thresholds[g]`` is the g-th distinct score (decreasing); ``group`` maps each original item to
    its group. With per-item weights ``w`` (1 for the plain arrays, resample counts in the
    bootstrap) :meth:`counts` gives the per-group positive and negative weights.
    """

    y: np.ndarray
    group: np.ndarray  # (n,) group index of each item
    thresholds: np.ndarray  # (G,) distinct scores, decreasing

    @classmethod
    def build(cls, y, s) -> Ranked:
        y, s = as_binary(y, s)
        uniq, inverse = np.unique(-s, return_inverse=True)  # ascending in -s = descending in s
        return cls(y=y, group=inverse.reshape(-1), thresholds=-uniq)

    def counts(self, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        g = len(self.thresholds)
        if w is None:
            pos = np.bincount(self.group, weights=self.y.astype(np.float64), minlength=g)
            neg = np.bincount(self.group, weights=(1 - self.y).astype(np.float64), minlength=g)
        else:
            pos = np.bincount(self.group, weights=w * self.y, minlength=g)
            neg = np.bincount(self.group, weights=w * (1 - self.y), minlength=g)
        return pos, neg


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    P, N = pos.sum(), neg.sum()
    if P <= 0 or N <= 0:
        return float("nan")
    fp_before = np.concatenate(([0.0], np.cumsum(neg)[:-1]))  # negatives scoring strictly higher
    # each positive beats the negatives scoring lower and ties with its own group's negatives
    return float(np.sum(pos * (N - fp_before - 0.5 * neg)) / (P * N))


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    P = pos.sum()
    if P <= 0:
        return float("nan")
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    denom = tp + fp
    prec = np.divide(tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(np.sum(pos * prec) / P)


# ----------------------------------------------------------------------------------------------
# threshold-free metrics and curves
# ----------------------------------------------------------------------------------------------
def roc_auc(y, s) -> float:
    """Area under the ROC curve (ties count one half); NaN with one class."""
    r = Ranked.build(y, s)
    return _auc_from_counts(*r.counts())


def average_precision(y, s) -> float:
    """Average precision, the step-wise PR AUC (scikit-learn's definition); NaN without positives."""
    r = Ranked.build(y, s)
    return _ap_from_counts(*r.counts())


pr_auc = average_precision


def roc_curve(y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, one point per distinct score plus the origin (threshold +inf)."""
    r = Ranked.build(y, s)
    pos, neg = r.counts()
    P, N = pos.sum(), neg.sum()
    tp = np.concatenate(([0.0], np.cumsum(pos)))
    fp = np.concatenate(([0.0], np.cumsum(neg)))
    tpr = tp / P if P > 0 else np.full_like(tp, np.nan)
    fpr = fp / N if N > 0 else np.full_like(fp, np.nan)
    return fpr, tpr, np.concatenate(([np.inf], r.thresholds))


def precision_recall_curve(y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` in decreasing threshold order (recall increasing)."""
    r = Ranked.build(y, s)
    pos, neg = r.counts()
    P = pos.sum()
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    prec = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    rec = tp / P if P > 0 else np.full_like(tp, np.nan)
    return prec, rec, r.thresholds


# ----------------------------------------------------------------------------------------------
# metrics at a threshold
# ----------------------------------------------------------------------------------------------
def _div(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def confusion(y, pred) -> dict[str, int]:
    """``tp, fp, tn, fn`` of 0/1 predictions."""
    y, _ = as_binary(y)
    p, _ = as_binary(pred)
    if p.shape != y.shape:
        raise ValueError("truth and predictions differ in length")
    tp = int(np.sum((p == 1) & (y == 1)))
    fp = int(np.sum((p == 1) & (y == 0)))
    tn = int(np.sum((p == 0) & (y == 0)))
    fn = int(np.sum((p == 0) & (y == 1)))
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    d = 2 * tp + fp + fn
    return float(2 * tp / d) if d > 0 else 0.0


def mcc_from_counts(tp: float, fp: float, tn: float, fn: float) -> float:
    d = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return float((tp * tn - fp * fn) / math.sqrt(d)) if d > 0 else 0.0


def f1_score(y, pred) -> float:
    c = confusion(y, pred)
    return f1_from_counts(c["tp"], c["fp"], c["fn"])


def matthews_corrcoef(y, pred) -> float:
    c = confusion(y, pred)
    return mcc_from_counts(c["tp"], c["fp"], c["tn"], c["fn"])


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (NaN, NaN when ``n == 0``)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = _normal_quantile(0.5 + level / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9 after refinement)."""
    if not 0 < q < 1:
        raise ValueError("quantile must be in (0, 1)")
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    lo = 0.02425
    if q < lo:
        t = math.sqrt(-2 * math.log(q))
        x = (((((c[0] * t + c[1]) * t + c[2]) * t + c[3]) * t + c[4]) * t + c[5]) / ((((d[0] * t + d[1]) * t + d[2]) * t + d[3]) * t + 1)
    elif q > 1 - lo:
        t = math.sqrt(-2 * math.log(1 - q))
        x = -(((((c[0] * t + c[1]) * t + c[2]) * t + c[3]) * t + c[4]) * t + c[5]) / ((((d[0] * t + d[1]) * t + d[2]) * t + d[3]) * t + 1)
    else:
        t = q - 0.5
        r = t * t
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * t / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    # one Newton step on the exact CDF
    e = 0.5 * math.erfc(-x / math.sqrt(2)) - q
    u = e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)
    return x - u / (1 + x * u / 2)


def threshold_metrics(y, s, threshold: float, level: float = 0.95) -> dict:
    """Confusion counts and rates when ``s >= threshold`` predicts positive.

    Sensitivity, specificity, PPV and NPV come with Wilson intervals (``*_ci_low``/``*_ci_high``).
    """
    y, s = as_binary(y, s)
    pred = (s >= threshold).astype(np.int8)
    c = confusion(y, pred)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    out: dict = {"threshold": float(threshold), **c}
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        out[name] = _div(k, n)
        lo, hi = wilson_interval(k, n, level)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    out["f1"] = f1_from_counts(tp, fp, fn)
    out["mcc"] = mcc_from_counts(tp, fp, tn, fn)
    out["accuracy"] = _div(tp + tn, tp + fp + tn + fn)
    out["youden"] = out["sensitivity"] + out["specificity"] - 1 if not (math.isnan(out["sensitivity"]) or math.isnan(out["specificity"])) else float("nan")
    return out


# ----------------------------------------------------------------------------------------------
# threshold rules
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """How a threshold is chosen: ``kind`` in MAXIMISE (``target`` None) or TARGETS (``target`` in (0, 1])."""

    kind: str
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


_ALIASES = {"j": "youden", "youden_j": "youden", "recall": "sensitivity", "sens": "sensitivity", "tpr": "sensitivity",
            "spec": "specificity", "tnr": "specificity", "precision": "ppv"}


def parse_rule(text: str | Rule) -> Rule:
    """``"youden"``, ``"f1"``, ``"mcc"``, ``"sensitivity=0.95"``, ``"specificity=0.9"``, ``"ppv=0.9"``, ``"npv=0.95"``."""
    if isinstance(text, Rule):
        return text
    raw = str(text).strip().lower().replace(" ", "")
    if "=" in raw or ">=" in raw:
        name, _, value = raw.replace(">=", "=").partition("=")
        name = _ALIASES.get(name, name)
        if name not in TARGETS:
            raise ValueError(f"threshold rule {text!r}: a target must be one of {', '.join(TARGETS)} (e.g. sensitivity=0.95)")
        try:
            target = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            raise ValueError(f"threshold rule {text!r}: {value!r} is not a number") from None
        if not 0 < target <= 1:
            raise ValueError(f"threshold rule {text!r}: the target must be in (0, 1]")
        return Rule(name, target)
    name = _ALIASES.get(raw, raw)
    if name not in MAXIMISE:
        raise ValueError(f"threshold rule {text!r}: use one of {', '.join(MAXIMISE)} or a target such as sensitivity=0.95, ppv=0.9")
    return Rule(name)


def _criteria(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    """Per candidate threshold (distinct score, decreasing): every rate a rule may look at."""
    P, N = pos.sum(), neg.sum()
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    fn, tn = P - tp, N - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = tp / P if P > 0 else np.full_like(tp, np.nan)
        spec = tn / N if N > 0 else np.full_like(tn, np.nan)
        ppv = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        npv = np.where(tn + fn > 0, tn / (tn + fn), np.nan)
        f1d = 2 * tp + fp + fn
        f1 = np.where(f1d > 0, 2 * tp / f1d, 0.0)
        md = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
        mcc = np.where(md > 0, (tp * tn - fp * fn) / np.sqrt(np.where(md > 0, md, 1.0)), 0.0)
    return {"sensitivity": sens, "specificity": spec, "ppv": ppv, "npv": npv, "f1": f1, "mcc": mcc, "youden": sens + spec - 1}


def _choose_index(pos: np.ndarray, neg: np.ndarray, rule: Rule) -> int | None:
    """Index of the chosen distinct score, or None when the rule cannot be met."""
    if pos.sum() <= 0 or neg.sum() <= 0 or len(pos) == 0:
        return None
    crit = _criteria(pos, neg)
    # Candidates are the scores present: a bootstrap resample weighs the distinct scores of the
    # whole sample, and one it did not draw (weight 0) is no threshold of the resample's own.
    present = (pos + neg) > 0
    if rule.target is None:
        v = np.where(present, crit[rule.kind], np.nan)
        if np.all(np.isnan(v)):
            return None
        # The highest threshold among equal maxima. Equal in exact arithmetic is not always equal
        # in floating point (sens + spec - 1 of two thresholds with the same Youden index can differ
        # in the last bit), so maxima within 1e-12 count as equal: distinct values of these rates
        # differ by at least 1 / (P * N), far more.
        return int(np.flatnonzero(v >= np.nanmax(v) - 1e-12)[0])
    v = crit[rule.kind]
    with np.errstate(invalid="ignore"):
        ok = np.nonzero((v >= rule.target - 1e-12) & present)[0]
    if ok.size == 0:
        return None
    if rule.kind in ("sensitivity", "npv"):
        return int(ok[0])  # highest threshold meeting the target
    return int(ok[-1])  # lowest threshold meeting the target (specificity, ppv)


def choose_threshold(y, s, rule: str | Rule) -> float | None:
    """The threshold ``rule`` picks on ``(y, s)``; None when it cannot be met (or one class only)."""
    rule = parse_rule(rule)
    r = Ranked.build(y, s)
    k = _choose_index(*r.counts(), rule)
    return None if k is None else float(r.thresholds[k])


# ----------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------
def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0):
    """The resampling scheme: yields ``idx = rng.integers(0, n, n)`` ``n_boot`` times, ``rng = default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n, n)


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap(y, s, n_boot: int = 1000, seed: int = 0, level: float = 0.95, rules: tuple = ()) -> dict:
    """Percentile bootstrap of ROC AUC, average precision and the thresholds of ``rules``.

    Returns ``{"n_boot": asked, "n_used": kept (resamples with both classes), "auc": (lo, hi),
    "pr_auc": (lo, hi), "thresholds": {str(rule): {"ci": (lo, hi), "std": ..., "n": ...}},
    "auc_values": array, "pr_auc_values": array}``.
    """
    r = Ranked.build(y, s)
    n = len(r.y)
    rules = tuple(parse_rule(x) for x in rules)
    aucs, aps = [], []
    thr: dict[str, list[float]] = {str(x): [] for x in rules}
    if n > 0:
        for idx in bootstrap_indices(n, n_boot, seed):
            w = np.bincount(idx, minlength=n).astype(np.float64)
            pos, neg = r.counts(w)
            if pos.sum() <= 0 or neg.sum() <= 0:
                continue
            aucs.append(_auc_from_counts(pos, neg))
            aps.append(_ap_from_counts(pos, neg))
            for rule in rules:
                k = _choose_index(pos, neg, rule)
                if k is not None:
                    thr[str(rule)].append(float(r.thresholds[k]))
    out = {
        "n_boot": int(n_boot),
        "n_used": len(aucs),
        "seed": int(seed),
        "level": level,
        "auc": percentile_interval(aucs, level),
        "pr_auc": percentile_interval(aps, level),
        "auc_values": np.asarray(aucs),
        "pr_auc_values": np.asarray(aps),
        "thresholds": {},
    }
    for name, vals in thr.items():
        arr = np.asarray(vals)
        out["thresholds"][name] = {
            "ci": percentile_interval(arr, level),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else float("nan"),
            "n": int(arr.size),
        }
    return out


def bootstrap_ci(y, s, statistic: str = "auc", n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """95% percentile interval of ``"auc"`` or ``"pr_auc"`` (see the module's scheme)."""
    if statistic not in ("auc", "pr_auc"):
        raise ValueError("statistic must be 'auc' or 'pr_auc'")
    return bootstrap(y, s, n_boot=n_boot, seed=seed, level=level)[statistic]


BOOTSTRAP_SCHEME = (
    "percentile bootstrap: rng = numpy.random.default_rng(seed); for each of n_boot resamples "
    "idx = rng.integers(0, n, n) (one call per resample, in order); resamples with one class only "
    "are skipped; interval = numpy.percentile(values, [2.5, 97.5])"
)
