"""curator calibrate: thresholds with uncertainty, storage in the manifest, the labels view, estimates."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from curator.calibrate import active_calibration, calibrate, calibrate_arrays, store_calibration
from curator.cli import main
from curator.cohort import CohortSpec, SampleSpec, cohort_estimates, export_cohort
from curator.evaluate import evaluate, load_truth
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.pipelines.label import run_label
from curator.prompts import load_prompt_set
from curator.query import QueryError, run_query
from curator.workspace import Workspace, WorkspaceError
from tests.conftest import write_raster_archive


def _phi_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_thresholds_match_the_analytic_optimum_of_two_gaussians():
    rng = np.random.default_rng(5)
    n, mu0, mu1, sd = 20_000, 0.45, 0.6, 0.05
    s = np.concatenate([rng.normal(mu0, sd, n), rng.normal(mu1, sd, n)])
    y = np.concatenate([np.zeros(n), np.ones(n)])
    e = calibrate_arrays(y, s, "youden", positive="ppv=0.95", negative="npv=0.95", n_boot=200, seed=1)
    # equal variances and priors: Youden's J is maximal at the midpoint
    assert e["threshold"] == pytest.approx((mu0 + mu1) / 2, abs=0.01)
    assert e["threshold_ci_low"] <= (mu0 + mu1) / 2 <= e["threshold_ci_high"]
    assert 0 < e["threshold_std"] < 0.02
    # PPV(t) = S1 / (S1 + S0) with equal priors; solve PPV = 0.95 by bisection (and NPV symmetrically)
    def ppv(t):
        a, b = _phi_sf((t - mu1) / sd), _phi_sf((t - mu0) / sd)
        return a / (a + b)

    lo, hi = 0.4, 0.8
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ppv(mid) < 0.95 else (lo, mid)
    assert e["upper"] == pytest.approx(lo, abs=0.01)
    assert e["lower"] == pytest.approx(mu0 + mu1 - lo, abs=0.01)  # NPV = 0.95 by symmetry
    assert e["lower"] < e["threshold"] < e["upper"]
    assert e["upper_ci_low"] <= e["upper"] <= e["upper_ci_high"]
    for rule, t in (("f1", (mu0 + mu1) / 2), ("mcc", (mu0 + mu1) / 2), ("sensitivity=0.9", mu1 - 1.2815516 * sd)):
        assert calibrate_arrays(y, s, rule, n_boot=20)["threshold"] == pytest.approx(t, abs=0.01)
    with pytest.raises(ValueError, match="positives and negatives"):
        calibrate_arrays(np.ones(5), np.arange(5.0))


@pytest.fixture(scope="module")
def cal_ws(tmp_path_factory, tiny_checkpoints):
    d = tmp_path_factory.mktemp("cal")
    arc, ws = d / "arc", d / "ws"
    write_raster_archive(arc, 32, seed=8)
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
                          batch_size=20, progress=False))
    df = run_query(Workspace(ws), "SELECT image_id, path, edema, cardiomegaly FROM images ORDER BY image_id")
    rng = np.random.default_rng(3)
    truth = {}
    for c in ("edema", "cardiomegaly"):
        y = (df[c] > df[c].median()).astype(int).to_numpy().copy()
        flip = rng.random(len(y)) < 0.2
        y[flip] = 1 - y[flip]
        truth[c] = y
    labelled = df.iloc[:26]  # 26 of the 32 images are labelled
    csv = d / "truth.csv"
    pd.DataFrame({"path": labelled.path, "Edema": truth["edema"][:26], "Cardiomegaly": truth["cardiomegaly"][:26]}).to_csv(csv, index=False)
    return d, ws, csv, df, truth


def test_calibrate_stores_thresholds_and_the_labels_view_follows_them(cal_ws, tmp_path, capsys):
    _, ws, csv, df, truth = cal_ws
    w = Workspace(ws)
    with pytest.raises(QueryError):
        run_query(w, "SELECT * FROM labels")  # nothing calibrated yet: no view
    assert main(["calibrate", "--workspace", str(ws), "--truth", str(csv), "--dry-run", "--resamples", "50"]) == 0
    assert "calibration" not in Workspace(ws).manifest or not Workspace(ws).manifest["calibration"]
    assert main(["calibrate", "--workspace", str(ws), "--truth", str(csv), "--rule", "youden", "--positive", "ppv=0.8",
                 "--negative", "npv=0.8", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "edema" in out and "stored" in out
    w = Workspace(ws)
    ps = w.manifest["finding_columns"]["edema"]
    e = w.manifest["calibration"][ps]["edema"]
    y, s = truth["edema"][:26], df.edema.to_numpy()[:26].astype(np.float64)
    ref = calibrate_arrays(y, s, "youden", "ppv=0.8", "npv=0.8", n_boot=200, seed=0)
    for k in ("threshold", "upper", "lower", "threshold_ci_low", "threshold_ci_high", "auc"):
        assert e[k] == pytest.approx(ref[k], abs=1e-12), k
    assert e["lower"] <= e["upper"]
    assert (w.root / e["truth_file"]).is_file() and e["truth"]["sha256"]
    # the labels view: 1 at or above upper, 0 below lower, -1 between
    lab = run_query(w, "SELECT i.image_id, i.edema, l.edema_label, l.cardiomegaly_label FROM images i JOIN labels l USING (image_id) ORDER BY image_id")
    want = np.where(lab.edema >= e["upper"], 1, np.where(lab.edema < e["lower"], 0, -1))
    np.testing.assert_array_equal(lab.edema_label.to_numpy(), want)
    assert set(lab.cardiomegaly_label) <= {1, 0, -1}
    # estimated precision of a cohort of weak positives = the fraction truly positive among labelled ones
    spec = CohortSpec(name="pos", where="edema_label = 1")
    est = cohort_estimates(w, spec)["edema"]
    sel = s >= e["upper"]
    assert est["n_labelled_selected"] == int(sel.sum())
    assert est["precision"] == pytest.approx(y[sel].mean())
    assert est["recall"] == pytest.approx(y[sel].sum() / y.sum())
    assert est["precision_ci_low"] <= est["precision"] <= est["precision_ci_high"]
    arms = cohort_estimates(w, CohortSpec(name="arms", sample=SampleSpec(n_positive=2, positive_where="edema_label = 1  -- weak positives",
                                                                        n_negative=2, negative_where="edema_label = 0")))["edema"]
    assert arms["positive_arm"]["precision"] == pytest.approx(y[sel].mean())
    neg = s < e["lower"]
    assert arms["negative_arm"]["n_labelled_selected"] == int(neg.sum())
    if neg.any():
        assert arms["negative_arm"]["npv"] == pytest.approx((y[neg] == 0).mean())
    m = export_cohort(w, spec, tmp_path / "c")
    assert m["estimates"]["edema"]["precision"] == est["precision"]
    assert m["thresholds"]["edema"]["upper"] == e["upper"] and m["columns"]["labels"] == ["cardiomegaly_label", "edema_label"]
    assert sum(m["counts"]["labels"]["edema_label"].values()) == m["counts"]["rows"] == int(sel.sum())
    # a cohort no image matches is an empty export (header only), its label counts empty
    m0 = export_cohort(w, CohortSpec(name="none", where="edema > 2"), tmp_path / "none")
    assert m0["counts"]["rows"] == 0 and m0["counts"]["labels"] == {"cardiomegaly_label": {}, "edema_label": {}}
    assert pd.read_csv(tmp_path / "none" / "cohort.csv").columns.tolist()[-2:] == ["cardiomegaly_label", "edema_label"]
    # evaluation now reports at the calibrated threshold, with the weak-label band
    rep = evaluate(w, load_truth(w, csv), None, n_boot=50)
    assert rep["findings"]["edema"]["threshold"] == e["threshold"]
    assert rep["findings"]["edema"]["threshold_source"].startswith("calibrated")
    assert "on this same labelled set" in rep["findings"]["edema"]["threshold_source"]  # (calibrated on csv, evaluated on csv)
    held_out = tmp_path / "held_out.csv"
    held_out.write_text(csv.read_text() + "\n")  # same rows, another file
    rep2 = evaluate(w, load_truth(w, held_out), None, n_boot=50)
    assert "same labelled set" not in rep2["findings"]["edema"]["threshold_source"]
    wl = rep["findings"]["edema"]["weak_labels"]
    assert wl["positive"] == int(sel.sum()) and wl["positive"] + wl["negative"] + wl["uncertain"] == 26


def test_dataset_targets_are_the_weak_labels(cal_ws, tmp_path):
    from curator.cohort_dataset import CohortDataset

    _, ws, csv, _, _ = cal_ws
    w = Workspace(ws)
    if not active_calibration(w):
        entries, _ = calibrate(w, load_truth(w, csv), n_boot=20)
        store_calibration(w, load_truth(w, csv), entries)
    export_cohort(w, CohortSpec(name="all", limit=6, copy_images="copy"), tmp_path / "c")
    ds = CohortDataset(tmp_path / "c")
    assert ds.target_columns == ["cardiomegaly_label", "edema_label"]
    lab = pd.read_parquet(tmp_path / "c" / "cohort.parquet")[ds.target_columns].to_numpy(np.float32)
    np.testing.assert_array_equal(ds.targets.numpy(), lab)
    masked = CohortDataset(tmp_path / "c", uncertain=float("nan"))
    assert np.isnan(masked.targets.numpy()).sum() == (lab == -1).sum()
    probs = CohortDataset(tmp_path / "c", targets="probabilities")
    assert "edema" in probs.target_columns


def test_relabelling_deactivates_and_remove_clears(cal_ws, tmp_path):
    _, ws, csv, _, _ = cal_ws
    w = Workspace(ws)
    entries, skipped = calibrate(w, load_truth(w, csv), n_boot=20)
    assert set(entries) == {"edema", "cardiomegaly"} and not skipped
    store_calibration(w, load_truth(w, csv), entries)
    with Workspace(ws).writer(), pytest.raises(WorkspaceError, match="another curator run"):  # another writer holds the lock
        store_calibration(Workspace(ws), load_truth(w, csv), entries)
    toml = tmp_path / "edema.toml"
    toml.write_text('negative = "no signs of {}"\n[[finding]]\nname = "Edema"\n')
    run_label(str(ws), load_prompt_set(toml), device="cpu", progress=False)
    w = Workspace(ws)
    assert set(active_calibration(w)) == {"cardiomegaly"}  # the edema calibration belongs to the old prompts
    cols = run_query(w, "DESCRIBE labels").column_name.tolist()
    assert cols == ["image_id", "cardiomegaly_label"]
    assert main(["calibrate", "--workspace", str(ws), "--truth", str(csv), "--finding", "edema", "--json", "--resamples", "20"]) == 0
    w = Workspace(ws)
    assert set(active_calibration(w)) == {"cardiomegaly", "edema"}
    assert main(["calibrate", "--workspace", str(ws), "--remove"]) == 0  # (no --truth needed)
    assert active_calibration(Workspace(ws)) == {}
    assert main(["calibrate", "--workspace", str(ws)]) == 2  # calibrating does need it
    for bad in ("nan", "2", "-0.1", "x"):
        with pytest.raises(SystemExit):
            main(["evaluate", "--workspace", str(ws), "--truth", str(csv), "--out", str(tmp_path / "r"), "--threshold", bad])
    assert not (tmp_path / "r").exists()
    # the original prompt set's stored entry is kept, inactive, for the record
    assert json.loads((ws / "manifest.json").read_text())["calibration"]
