"""curator evaluate (and prompts compare) end to end on small real workspaces."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from curator.cli import main
from curator.evaluate import TruthPolicy, evaluate, load_truth
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.query import run_query
from curator.workspace import Workspace
from tests.conftest import write_raster_archive
from tests.test_cohort import write_dicom_archive


def _embed(arc, ws, cks):
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(c) for c in cks], device="cpu", workers=0,
                          batch_size=16, progress=False))


@pytest.fixture(scope="module")
def png_ws(tmp_path_factory, tiny_checkpoints):
    d = tmp_path_factory.mktemp("evalpng")
    arc, ws = d / "arc", d / "ws"
    write_raster_archive(arc, 20, seed=3)
    _embed(arc, ws, tiny_checkpoints[:2])
    return d, arc, ws


def _truth_from_scores(ws, rng, flip=0.2):
    """Truth correlated with the probabilities: informative but imperfect, with -1 and blanks."""
    df = run_query(Workspace(ws), "SELECT image_id, path, sop_instance_uid, study_instance_uid, edema, cardiomegaly FROM images ORDER BY image_id")
    out = df.copy()
    for c in ("edema", "cardiomegaly"):
        y = (df[c] > df[c].median()).astype(int).to_numpy().copy()
        f = rng.random(len(y)) < flip
        y[f] = 1 - y[f]
        out[c + "_truth"] = y.astype(object)
    return out


def test_evaluate_png_workspace_keyed_by_relative_path(png_ws, tmp_path):
    _, _, ws = png_ws
    rng = np.random.default_rng(0)
    df = _truth_from_scores(ws, rng)
    labels = df["edema_truth"].copy()
    labels[[0, 1, 2]] = "-1"
    labels[[3, 4]] = ""
    (tmp_path / "labels").mkdir()
    csv = tmp_path / "labels" / "truth.csv"
    rel = [_relpath(p, csv.parent) for p in df.path]
    pd.DataFrame({"Path": rel, "Edema": labels, "Cardiomegaly": df["cardiomegaly_truth"], "Reader": "dr x"}).to_csv(csv, index=False)
    out = tmp_path / "report"
    assert main(["evaluate", "--workspace", str(ws), "--truth", str(csv), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    e = rep["findings"]["edema"]
    # independent: sklearn on the rows kept by the default policy (-1 and blank excluded)
    keep = ~labels.isin(["-1", ""])
    y = labels[keep].astype(int).to_numpy()
    s = df.edema[keep].to_numpy(np.float64)
    assert (e["n_pos"], e["n_neg"]) == (int(y.sum()), int((1 - y).sum()))
    assert e["auc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert e["pr_auc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    r = np.random.default_rng(0)
    boot = []
    for _ in range(1000):
        idx = r.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            boot.append(skm.roc_auc_score(y[idx], s[idx]))
    assert (e["auc_ci_low"], e["auc_ci_high"]) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-12)
    pred = (s >= e["threshold"]).astype(int)
    assert e["f1"] == pytest.approx(skm.f1_score(y, pred)) and e["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert e["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert "optimistic" in e["threshold_source"]
    for k in ("auc", "auc_ci_low", "auc_ci_high", "n_pos", "n_neg", "pr_auc", "specificity", "ppv", "npv"):
        assert k in e
    assert set(rep["findings"]) == {"edema", "cardiomegaly"}
    assert rep["truth"]["ignored_columns"] == ["Reader"] and rep["truth"]["unmatched_rows"] == 0
    assert rep["truth"]["values"]["edema"]["-1"] == 3 and rep["truth"]["values"]["edema"]["blank"] == 2
    for f in ("report.md", "roc_edema.png", "pr_edema.png", "roc_cardiomegaly.png"):
        assert (out / f).is_file()
    with Image.open(out / "roc_edema.png") as im:
        assert im.format == "PNG" and im.size == (480, 480)
    md = (out / "report.md").read_text()
    assert "| edema |" in md and "roc_edema.png" in md
    # the policy is selectable: -1 -> positive, blank -> negative
    t = load_truth(ws, csv, TruthPolicy("positive", "negative"))
    rep2 = evaluate(ws, t, None, findings=["edema"], n_boot=50)
    assert rep2["findings"]["edema"]["n_pos"] == e["n_pos"] + 3
    assert rep2["findings"]["edema"]["n_neg"] == e["n_neg"] + 2


def _relpath(p, start):
    import os

    return os.path.relpath(p, start)


def test_truth_csv_problems_are_one_line_errors(png_ws, tmp_path, capsys):
    _, _, ws = png_ws
    paths = run_query(Workspace(ws), "SELECT path FROM images ORDER BY image_id").path.tolist()
    cases = {
        "bad_value.csv": pd.DataFrame({"path": paths[:3], "edema": ["1", "maybe", "0"]}),
        "no_key.csv": pd.DataFrame({"file": paths[:3], "edema": ["1", "0", "0"]}),
        "dupes.csv": pd.DataFrame({"path": [paths[0], paths[0]], "edema": ["1", "0"]}),
        "no_finding.csv": pd.DataFrame({"path": paths[:3], "foo": ["1", "0", "0"]}),
        "no_match.csv": pd.DataFrame({"path": ["a/b.png", "c.png"], "edema": ["1", "0"]}),
    }
    for name, frame in cases.items():
        frame.to_csv(tmp_path / name, index=False)
        assert main(["evaluate", "--workspace", str(ws), "--truth", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err, err
    # absolute paths; a row that is not in the workspace is counted, not fatal
    pd.DataFrame({"path": [*paths[:6], "/nowhere/x.png"], "edema": ["1", "0", "1", "0", "1", "0", "1"]}).to_csv(tmp_path / "abs.csv", index=False)
    t = load_truth(ws, tmp_path / "abs.csv")
    assert (t.matched_rows, t.unmatched_rows) == (6, 1)


@pytest.fixture(scope="module")
def dicom_ws(tmp_path_factory, tiny_checkpoints):
    d = tmp_path_factory.mktemp("evaldcm")
    arc, ws = d / "arc", d / "ws"
    write_dicom_archive(arc, range(1, 13), seed=4)
    _embed(arc, ws, tiny_checkpoints[:1])
    return arc, ws


def test_evaluate_by_sop_instance_uid_at_image_and_study_level(dicom_ws, tmp_path):
    _, ws = dicom_ws
    df = _truth_from_scores(ws, np.random.default_rng(1), flip=0.25)
    csv = tmp_path / "sop.csv"
    pd.DataFrame({"sop_instance_uid": df.sop_instance_uid, "Edema": df.edema_truth}).to_csv(csv, index=False)
    t = load_truth(ws, csv)
    assert t.key == "sop_instance_uid" and t.matched_rows == len(df)
    img = evaluate(ws, t, tmp_path / "img", n_boot=200)["findings"]["edema"]
    y = df.edema_truth.astype(int).to_numpy()
    assert img["auc"] == pytest.approx(skm.roc_auc_score(y, df.edema), abs=1e-12)
    for agg in ("max", "mean"):
        st = evaluate(ws, t, tmp_path / f"study_{agg}", level="study", aggregate=agg, n_boot=200)
        g = df.assign(y=y).groupby("study_instance_uid").agg(y=("y", "max"), s=("edema", agg))
        e = st["findings"]["edema"]
        assert st["level"] == "study" and e["n"] == len(g) < len(df)
        assert e["auc"] == pytest.approx(skm.roc_auc_score(g.y, g.s), abs=1e-12)
    # truth keyed by study UID: study level by construction
    sdf = df.assign(y=y).groupby("study_instance_uid", as_index=False).y.max()
    pd.DataFrame({"study_instance_uid": sdf.study_instance_uid, "edema": sdf.y}).to_csv(tmp_path / "study.csv", index=False)
    ts = load_truth(ws, tmp_path / "study.csv")
    rep = evaluate(ws, ts, None, n_boot=100)
    assert rep["level"] == "study" and rep["findings"]["edema"]["n"] == len(sdf)
    g = df.assign(y=y).groupby("study_instance_uid").agg(y=("y", "max"), s=("edema", "max"))
    assert rep["findings"]["edema"]["auc"] == pytest.approx(skm.roc_auc_score(g.y, g.s), abs=1e-12)
    with pytest.raises(ValueError, match="level study"):
        evaluate(ws, ts, None, level="image")


def test_prompts_compare_scores_alternatives_from_stored_embeddings(png_ws, tmp_path, capsys):
    d, arc, ws = png_ws
    df = _truth_from_scores(ws, np.random.default_rng(2), flip=0.1)
    csv = tmp_path / "t.csv"
    pd.DataFrame({"path": df.path, "Edema": df.edema_truth, "Pneumoperitoneum": df.cardiomegaly_truth}).to_csv(csv, index=False)
    moved = d / "arc_moved"
    arc.rename(moved)  # no image can be opened
    try:
        out = tmp_path / "cmp.json"
        best = tmp_path / "best.toml"
        assert main(["prompts", "compare", "--workspace", str(ws), "--truth", str(csv), "--finding", "Edema", "--phrases", "edema",
                     "pulmonary edema", "--templates", "{}|no {}", "there is {}|there is no {}", "--out", str(out),
                     "--write-best", str(best), "--resamples", "100"]) == 0
        res = json.loads(out.read_text())
        # 4 phrase sets (2 alone, combined, the current ["Edema"]) x 2 pairs (the current pair is one of them)
        assert len(res["alternatives"]) == 8
        aucs = [a["auc"] for a in res["alternatives"]]
        assert aucs == sorted(aucs, reverse=True)
        cur = [a for a in res["alternatives"] if a["current"]]
        assert len(cur) == 1 and cur[0]["phrases"] == ["Edema"]
        # the current alternative reproduces the stored probabilities' AUC
        y = df.edema_truth.astype(int).to_numpy()
        assert cur[0]["auc"] == pytest.approx(skm.roc_auc_score(y, df.edema), abs=1e-9)
        # ... and its interval is evaluate's, for a CSV in any row order (the same units resampled the same way)
        shuffled = tmp_path / "shuffled.csv"
        pd.read_csv(csv).sample(frac=1.0, random_state=4).to_csv(shuffled, index=False)
        assert main(["prompts", "compare", "--workspace", str(ws), "--truth", str(shuffled), "--finding", "Edema", "--out", str(out),
                     "--resamples", "100"]) == 0
        mine = [a for a in json.loads(out.read_text())["alternatives"] if a["current"]][0]
        assert main(["evaluate", "--workspace", str(ws), "--truth", str(shuffled), "--finding", "edema", "--out", str(tmp_path / "ev"),
                     "--resamples", "100", "--no-plots"]) == 0
        ev = json.loads((tmp_path / "ev" / "report.json").read_text())["findings"]["edema"]
        assert (mine["auc_ci_low"], mine["auc_ci_high"]) == pytest.approx((ev["auc_ci_low"], ev["auc_ci_high"]), abs=1e-12)
        from curator.prompts import load_prompt_set

        ps = load_prompt_set(best)
        assert ps.columns == ["edema"] and list(ps.findings[0].phrases) == res["alternatives"][0]["phrases"]
        # a finding the workspace has never scored
        capsys.readouterr()
        assert main(["prompts", "compare", "--workspace", str(ws), "--truth", str(csv), "--finding", "Pneumoperitoneum",
                     "--resamples", "50", "--json"]) == 0
        res2 = json.loads(capsys.readouterr().out)
        assert res2["column"] == "pneumoperitoneum" and len(res2["alternatives"]) == 1 and res2["alternatives"][0]["auc"] is not None
        assert main(["prompts", "compare", "--workspace", str(ws), "--truth", str(csv), "--finding", "Edema", "--phrases", "edema", " ",
                     "--resamples", "50"]) == 2
        assert "an empty phrase" in capsys.readouterr().err
    finally:
        moved.rename(arc)


def test_choose_phrases_can_keep_the_phrasing_already_in_use(tmp_path, tiny_checkpoints):
    """The demo pipeline's phrase choice: the best candidate wins even when it is the workspace's current phrasing."""
    from curator.pipelines.demo_model import choose_phrases
    from curator.pipelines.label import run_label
    from curator.prompts import load_prompt_set

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_raster_archive(arc, 24, seed=5)
    _embed(arc, ws, tiny_checkpoints[:1])
    toml = tmp_path / "p.toml"
    toml.write_text('[[finding]]\nname = "Edema"\nphrases = ["pulmonary edema"]\n')
    run_label(str(ws), load_prompt_set(toml), progress=False)
    df = run_query(Workspace(ws), "SELECT path, edema FROM images")
    # truth that "pulmonary edema" ranks perfectly, and no other candidate is likely to
    csv = tmp_path / "t.csv"
    pd.DataFrame({"path": df.path, "Edema": (df.edema > df.edema.median()).astype(int)}).to_csv(csv, index=False)
    chosen, auc = choose_phrases(ws, csv, {"Edema": ["edema", "pulmonary edema", "fluid overload"]}, resamples=10)
    assert chosen == {"Edema": ["pulmonary edema"]} and auc["Edema"] == pytest.approx(1.0)
