"""`curator demo --no-app` end to end on a small synthetic archive, its printed figures re-derived."""

from __future__ import annotations

import re
import subprocess
import sys

import duckdb
import pandas as pd
import pytest

from curator.demo_model import demo_card, demo_checkpoint_path


@pytest.mark.slow
def test_demo_runs_and_its_edema_figures_are_true(tmp_path):
    ws, arc = tmp_path / "ws", tmp_path / "archive"
    r = subprocess.run([sys.executable, "-m", "curator.cli", "-q", "demo", "--no-app", "--studies", "60", "--image-size", "512",
                        "--workspace", str(ws), "--archive", str(arc), "--seed", "11"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    m = re.search(r"all edema cases \(edema >= ([0-9.]+)\): (\d+) images", out)
    assert m, out
    count = int(m.group(2))
    # the SQL it prints carries the exact threshold (a rounded one could move images across it)
    m = re.search(r"the same in SQL: .*WHERE edema >= ([0-9.e-]+) ORDER BY", out)
    assert m, out
    threshold = float(m.group(1))
    assert threshold == demo_card()["thresholds"]["edema"]
    m = re.search(r"precision ([0-9.na]+) \((\d+) of (\d+) have edema.*recall ([0-9.na]+) \((\d+) of (\d+) edema", out)
    assert m, out
    precision, tp, n_found, recall, tp2, positives = m.groups()
    # independent: the workspace's Parquet with plain DuckDB, the generator's ground-truth CSV with pandas
    con = duckdb.connect()
    # the demo prompt set's rows: they have an edema column but no fracture column (CheXpert's set has both)
    probs = con.execute(
        f"SELECT c.path, p.edema FROM read_parquet('{ws}/catalog/*.parquet') c "
        f"JOIN read_parquet('{ws}/predictions/*.parquet', union_by_name=true) p USING (image_id) "
        "WHERE p.member = 'ensemble' AND p.edema IS NOT NULL AND p.fracture IS NULL"
    ).df()
    truth = pd.read_csv(arc / "ground_truth.csv")
    truth["path"] = [str((arc / p).resolve()) for p in truth.path]
    merged = probs.merge(truth[["path", "edema"]].rename(columns={"edema": "truth"}), on="path")
    assert len(merged) == len(truth)
    found = merged[merged.edema >= threshold]
    assert count == int(n_found) == len(found)
    assert int(tp) == int(tp2) == int(found.truth.sum())
    assert int(positives) == int(truth.edema.sum())
    if len(found):
        assert float(precision) == pytest.approx(found.truth.sum() / len(found), abs=1e-3)
    assert float(recall) == pytest.approx(found.truth.sum() / truth.edema.sum(), abs=1e-3)
    assert "text search 'moderate pulmonary edema', top 10 by CLIP similarity" in out
    # each listed hit's truth mark is the generator's, and similarities come in descending order
    hits = re.findall(r"^ +\d+\. ([-0-9.]+)  (\S+)  \(truth: (edema|no edema)\)$", out, flags=re.M)
    assert len(hits) == 10
    by_rel = pd.read_csv(arc / "ground_truth.csv").set_index("path")["edema"]
    assert [m == "edema" for _, _, m in hits] == [bool(by_rel[rel]) for _, rel, _ in hits]
    sims = [float(v) for v, _, _ in hits]
    assert sims == sorted(sims, reverse=True)
    # a second run reuses the archive and embeds nothing
    r2 = subprocess.run([sys.executable, "-m", "curator.cli", "-q", "demo", "--no-app", "--studies", "60", "--image-size", "512",
                         "--workspace", str(ws), "--archive", str(arc), "--seed", "11"], capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0 and "reusing the synthetic archive" in r2.stdout and "embedded:            0" in r2.stdout


def test_demo_checkpoint_loads_like_a_published_one():
    from curator.model import load_checkpoint

    ck = load_checkpoint(demo_checkpoint_path(), "cpu")
    assert ck.context_length == 77 and ck.image_size == 224
    card = demo_card()
    assert card["sha256"] == ck.sha256
    assert set(card["thresholds"]) >= {"edema", "cardiomegaly", "pleural_effusion", "pneumothorax"}


def test_chosen_phrases_make_a_loadable_prompt_set(tmp_path):
    from curator.pipelines.demo_model import CANDIDATE_PHRASES, prompt_set_toml
    from curator.prompts import load_prompt_set

    chosen = {"Edema": ["interstitial edema", "edema"], "Lung Lesion": ['nodule "1 cm"'], "Support Devices": ["endotracheal tube"]}
    path = tmp_path / "demo.toml"
    path.write_text(prompt_set_toml(chosen, "chosen on seed 303\n\nsecond paragraph"))
    ps = load_prompt_set(path)
    assert [(f.name, list(f.phrases)) for f in ps.findings] == list(chosen.items())
    assert (ps.positive, ps.negative) == ("{}", "no {}")
    assert path.read_text().startswith("# chosen on seed 303\n#\n# second paragraph\n")
    # every finding of the synthetic ground truth has candidates, CheXpert's own name among them
    assert [f.lower().replace(" ", "_") for f in CANDIDATE_PHRASES] == ["cardiomegaly", "pleural_effusion", "edema", "pneumothorax",
                                                                      "consolidation", "atelectasis", "lung_lesion", "support_devices"]
    assert all(f.lower() in phrases for f, phrases in CANDIDATE_PHRASES.items())
