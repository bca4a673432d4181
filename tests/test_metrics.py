"""curator.metrics against scikit-learn, known answers, and an independent percentile bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from curator import metrics as M


def _cases():
    rng = np.random.default_rng(1)
    out = []
    for n, ties in ((50, False), (200, True), (31, True), (500, False)):
        y = (rng.random(n) < 0.3).astype(int)
        y[:2] = [0, 1]
        s = rng.normal(size=n) + 0.8 * y
        if ties:
            s = np.round(s, 1)  # many tied scores, across classes
        out.append((y, s))
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    out.append((y, np.array([0.5] * 8)))  # everything tied
    out.append((y, np.array([0.1, 0.5, 0.5, 0.9, 0.5, 0.9, 0.2, 0.1])))
    return out


@pytest.mark.parametrize("case", range(6))
def test_auc_and_average_precision_equal_sklearn(case):
    y, s = _cases()[case]
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("case", range(6))
def test_curves_equal_sklearn(case):
    y, s = _cases()[case]
    fpr, tpr, thr = M.roc_curve(y, s)
    sf, st, sthr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sf)
    np.testing.assert_allclose(tpr, st)
    np.testing.assert_allclose(thr[1:], sthr[1:])
    prec, rec, pthr = M.precision_recall_curve(y, s)
    sp, sr, spt = skm.precision_recall_curve(y, s)
    # sklearn: increasing thresholds, stops at full recall, appends (recall 0, precision 1)
    k = len(spt)
    np.testing.assert_allclose(prec[:k][::-1], sp[:-1])
    np.testing.assert_allclose(rec[:k][::-1], sr[:-1])
    np.testing.assert_allclose(pthr[:k][::-1], spt)


@pytest.mark.parametrize("case", range(6))
def test_f1_mcc_and_threshold_metrics_equal_sklearn(case):
    y, s = _cases()[case]
    for t in (np.median(s), np.min(s), np.max(s) + 1, np.quantile(s, 0.8)):
        pred = (s >= t).astype(int)
        assert M.f1_score(y, pred) == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-12)
        assert M.matthews_corrcoef(y, pred) == pytest.approx(skm.matthews_corrcoef(y, pred), abs=1e-12)
        tm = M.threshold_metrics(y, s, t)
        assert tm["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-12)
        assert tm["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred), abs=1e-12)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert (tm["tp"], tm["fp"], tm["tn"], tm["fn"]) == (tp, fp, tn, fn)
        assert tm["sensitivity"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
        if tp + fp:
            assert tm["ppv"] == pytest.approx(skm.precision_score(y, pred))


def test_known_answers():
    y = np.array([0] * 50 + [1] * 50)
    s = np.linspace(0, 1, 100)
    assert M.roc_auc(y, s) == 1.0
    assert M.average_precision(y, s) == 1.0
    assert M.roc_auc(y, -s) == 0.0
    assert M.roc_auc(y, np.zeros(100)) == 0.5
    rng = np.random.default_rng(0)
    yr = rng.integers(0, 2, 20000)
    assert M.roc_auc(yr, rng.random(20000)) == pytest.approx(0.5, abs=0.01)
    assert math.isnan(M.roc_auc(np.ones(5), np.arange(5)))
    tm = M.threshold_metrics(y, s, 0.5)
    assert tm["sensitivity"] == tm["specificity"] == tm["f1"] == tm["mcc"] == 1.0
    with pytest.raises(ValueError):
        M.roc_auc([0, 2, 1], [1, 2, 3])
    with pytest.raises(ValueError):
        M.roc_auc([0, 1], [1, np.nan])


def test_bootstrap_matches_an_independent_percentile_bootstrap():
    rng = np.random.default_rng(7)
    n = 40
    y = (np.arange(n) < 3).astype(int)  # few positives: some resamples hold one class
    s = np.round(rng.normal(size=n) + y, 1)
    res = M.bootstrap(y, s, n_boot=1000, seed=3, rules=("youden",))
    # independent: the documented scheme, sklearn for each resample
    r2 = np.random.default_rng(3)
    aucs, aps, thr = [], [], []
    for _ in range(1000):
        idx = r2.integers(0, n, n)
        yy, ss = y[idx], s[idx]
        if yy.min() == yy.max():
            continue
        aucs.append(skm.roc_auc_score(yy, ss))
        aps.append(skm.average_precision_score(yy, ss))
        fpr, tpr, t = skm.roc_curve(yy, ss, drop_intermediate=False)
        j = (tpr - fpr)[1:]  # observed scores only (t[0] is +inf)
        thr.append(t[1 + int(np.argmax(j))])
    assert res["n_used"] == len(aucs) < 1000
    np.testing.assert_allclose(res["auc_values"], aucs, atol=1e-12)
    np.testing.assert_allclose(res["pr_auc_values"], aps, atol=1e-12)
    assert res["auc"] == pytest.approx(tuple(np.percentile(aucs, [2.5, 97.5])), abs=1e-12)
    assert res["pr_auc"] == pytest.approx(tuple(np.percentile(aps, [2.5, 97.5])), abs=1e-12)
    assert res["thresholds"]["youden"]["ci"] == pytest.approx(tuple(np.percentile(thr, [2.5, 97.5])), abs=1e-12)
    assert M.bootstrap_ci(y, s, "auc", seed=3) == res["auc"]


def test_bootstrap_thresholds_are_those_of_each_resample_for_every_rule():
    """Each resample's threshold is the rule applied to that resample (a score it holds), for
    every rule: the weighted evaluation must never pick a distinct score the resample did not draw."""
    rng = np.random.default_rng(11)
    n = 120
    y = (rng.random(n) < 0.35).astype(int)
    s = np.round(rng.normal(size=n) + 1.2 * y, 2)
    rules = ("youden", "f1", "mcc", "sensitivity=0.9", "specificity=0.9", "ppv=0.6", "npv=0.9")
    res = M.bootstrap(y, s, n_boot=300, seed=5, rules=rules)
    r2 = np.random.default_rng(5)
    per_rule = {r: [] for r in rules}
    for _ in range(300):
        idx = r2.integers(0, n, n)
        yy, ss = y[idx], s[idx]
        if yy.min() == yy.max():
            continue
        for r in rules:
            t = M.choose_threshold(yy, ss, r)
            if t is not None:
                assert t in ss
                per_rule[r].append(t)
    for r in rules:
        got = res["thresholds"][str(M.parse_rule(r))]
        assert got["n"] == len(per_rule[r]), r
        assert got["ci"] == pytest.approx(tuple(np.percentile(per_rule[r], [2.5, 97.5])), abs=1e-12), r
        assert got["std"] == pytest.approx(float(np.std(per_rule[r], ddof=1)), rel=1e-9, abs=1e-12), r


def test_youden_threshold_is_the_analytic_optimum_of_two_gaussians():
    # equal variances and priors: J is maximal where the densities cross, at the midpoint
    rng = np.random.default_rng(11)
    n = 100_000
    s = np.concatenate([rng.normal(0.4, 0.05, n), rng.normal(0.6, 0.05, n)])
    y = np.concatenate([np.zeros(n), np.ones(n)])
    assert M.choose_threshold(y, s, "youden") == pytest.approx(0.5, abs=0.01)
    # target sensitivity 0.9: the positives' 10% quantile, mu1 - 1.2816 sigma
    assert M.choose_threshold(y, s, "sensitivity=0.9") == pytest.approx(0.6 - 1.2815516 * 0.05, abs=0.005)
    assert M.choose_threshold(y, s, "specificity=0.95") == pytest.approx(0.4 + 1.6448536 * 0.05, abs=0.005)


def test_rules_pick_the_documented_end():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert M.choose_threshold(y, s, "sensitivity=0.75") == 0.6  # highest threshold with sens >= 0.75
    assert M.choose_threshold(y, s, "ppv=1") == 0.6  # lowest threshold with PPV 1
    assert M.choose_threshold(y, s, "specificity=0.75") == 0.4
    assert M.choose_threshold(y, s, "npv=1") == 0.4  # negatives below 0.4 are all true negatives
    assert M.choose_threshold(y, s, "mcc") in (0.4, 0.6)
    assert M.choose_threshold(np.ones(4), s[:4], "youden") is None
    with pytest.raises(ValueError):
        M.parse_rule("accuracy")
    assert str(M.parse_rule("Sensitivity >= 95%")) == "sensitivity=0.95"


def _exact_choice(y, s, rule):
    """Brute force in exact rational arithmetic: the highest threshold among equal maxima."""
    from fractions import Fraction

    P, N = int(y.sum()), int((1 - y).sum())
    best = None
    for t in sorted(set(s.tolist()), reverse=True):
        tp, fp = int(((s >= t) & (y == 1)).sum()), int(((s >= t) & (y == 0)).sum())
        fn, tn = P - tp, N - fp
        if rule == "youden":
            v = Fraction(tp, P) + Fraction(tn, N) - 1
        else:  # f1
            v = Fraction(2 * tp, 2 * tp + fp + fn)
        if best is None or v > best[0]:
            best = (v, t)
    return best[1]


def test_equal_maxima_pick_the_highest_threshold_despite_rounding():
    # J is exactly 1/6 at both 0.6 and 0.2; in floating point sens + spec - 1 differs in the last bit
    y = np.array([0, 0, 1, 0, 0, 0, 1, 0])
    s = np.array([0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert M.choose_threshold(y, s, "youden") == 0.6
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(4, 14))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 6, n) / 5  # many ties among the scores too
        for rule in ("youden", "f1"):
            assert M.choose_threshold(y, s, rule) == _exact_choice(y, s, rule), (y.tolist(), s.tolist(), rule)


def test_wilson_interval_and_normal_quantile():
    assert M._normal_quantile(0.975) == pytest.approx(1.959963984540054, abs=1e-9)
    lo, hi = M.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    assert M.wilson_interval(0, 0) != M.wilson_interval(0, 0)  # NaN
