"""How the bundled demo model is made, end to end, and its model card.

1. Training archives: ``curator synth TRAIN --studies 2500 --seed 101`` for the first stage,
   ``curator synth TRAIN2 --studies 8000 --seed 102 --no-broken`` for the second and
   ``curator synth TRAIN3 --studies 8000 --seed 103 --no-broken`` for the third.
2. Training, in stages (the card's ``training`` list, oldest first, each with its exact
   ``curator train`` command): from scratch on TRAIN, then fine-tuned (``--init``) on TRAIN2, then
   on TRAIN3 with ``--sentence-sampling`` (3,600 steps at peak lr 3e-4, then 1,500 more from that
   result at 1e-4 with another sampling seed, then 1,200 more at 1e-4 adding ``--query-style 0.5``
   so that searches typed without full stops find what the report sentences do).
3. Storage: the trained fp32 state dict with every floating-point matrix stored as float16 (as
   OpenAI's and GPU-trained CheXzero checkpoints are), to keep the repository small; it loads
   through the same path as published checkpoints, which casts back to float32.
4. Phrasing (``--choose-phrases``): on a separate archive (``curator synth THR --studies 600 --seed
   303``), embedded once, each finding's candidate phrasings (:data:`CANDIDATE_PHRASES`) are scored
   from the stored embeddings, alone and the best two or three averaged; the best goes into the
   demo prompt set.
5. Thresholds: on the same archive, labelled with the demo prompt set, the threshold per finding
   that maximises F1 (curator.metrics).

    python -m curator.pipelines.demo_model --trained demo3.pt --threshold-archive THR --out curator/data \
        --train-archive "curator synth TRAIN3 --studies 8000 --seed 103 --no-broken" \
        --previous-card curator/data/demo_model.json \
        --choose-phrases curator/prompts/demo.toml   # --previous-card carries the earlier stages over
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from curator import constants as C

FINDINGS = ["cardiomegaly", "pleural_effusion", "edema", "pneumothorax", "consolidation", "atelectasis", "lung_lesion", "support_devices"]

# Phrasings tried for each finding of the demo prompt set (--choose-phrases), in the wording of
# the synthetic reports and CheXpert's own names.
CANDIDATE_PHRASES = {
    "Cardiomegaly": ["cardiomegaly", "moderate cardiomegaly", "severe cardiomegaly", "enlarged heart", "the heart is enlarged"],
    "Pleural Effusion": ["pleural effusion", "small pleural effusion", "moderate pleural effusion", "bilateral pleural effusions",
                         "left pleural effusion", "right pleural effusion"],
    "Edema": ["edema", "pulmonary edema", "interstitial edema", "mild pulmonary edema", "moderate pulmonary edema",
              "pulmonary vascular congestion"],
    "Pneumothorax": ["pneumothorax", "small pneumothorax", "large pneumothorax", "right pneumothorax", "left pneumothorax"],
    "Consolidation": ["consolidation", "focal consolidation", "airspace consolidation", "pneumonia", "right lower lobe consolidation",
                      "left lower lobe consolidation"],
    "Atelectasis": ["atelectasis", "plate-like atelectasis", "linear atelectasis", "basilar atelectasis", "bibasilar atelectasis",
                    "subsegmental atelectasis"],
    "Lung Lesion": ["lung lesion", "pulmonary nodule", "lung nodule", "multiple pulmonary nodules", "lung mass", "pulmonary mass"],
    "Support Devices": ["support devices", "endotracheal tube", "lines and tubes", "central venous catheter", "pacemaker", "enteric tube"],
}


def store_half(trained: Path, out: Path) -> Path:
    """The trained checkpoint with its floating-point matrices (ndim >= 2) stored as float16."""
    sd = torch.load(trained, map_location="cpu", weights_only=True)
    small = {k: (v.half() if v.is_floating_point() and v.ndim >= 2 else v) for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(small, out)
    return out


def choose_phrases(workspace: Path, truth_csv: Path, candidates: dict[str, list[str]] = CANDIDATE_PHRASES,
                   resamples: int = 200) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Per finding, the phrasing with the highest ROC AUC on an embedded, labelled archive.

    Tried: each candidate alone, then the three best averaged (curator's multi-phrase prompts:
    normalised text vectors averaged and renormalised), and the two best averaged. Scores come
    from the stored embeddings (``curator prompts compare``); no image is read.
    """
    from curator.evaluate import load_truth
    from curator.prompt_compare import compare_prompts
    from curator.prompts import snake_case

    truth = load_truth(workspace, truth_csv, findings=[snake_case(f) for f in candidates])
    chosen, auc = {}, {}
    for finding, phrases in candidates.items():
        def scored(ph):
            # The workspace's current phrasing comes back too: kept when it is one of the tried
            # phrasings (it may be the best), dropped otherwise.
            res = compare_prompts(workspace, truth, finding, phrases=list(ph), combined=len(ph) > 1, n_boot=resamples)
            return [(a["auc"], a["phrases"]) for a in res["alternatives"]
                    if a["auc"] is not None and set(a["phrases"]) <= set(ph) and (a["positive"], a["negative"]) == (C.POSITIVE_TEMPLATE, C.NEGATIVE_TEMPLATE)]
        singles = sorted(scored(phrases), key=lambda a: -a[0])
        singles = [a for a in singles if len(a[1]) == 1]
        top = [a[1][0] for a in singles[:3]]
        alts = singles + [a for a in scored(top) + scored(top[:2]) if len(a[1]) > 1]
        best = max(alts, key=lambda a: a[0])
        chosen[finding], auc[finding] = list(best[1]), float(best[0])
    return chosen, auc


def prompt_set_toml(chosen: dict[str, list[str]], header: str) -> str:
    """The demo prompt set file for the chosen phrasings (("{}", "no {}") templates)."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    lines += ['name = "demo"', 'positive = "{}"', 'negative = "no {}"']
    for finding, phrases in chosen.items():
        lines += ["", "[[finding]]", f"name = {json.dumps(finding)}", f"phrases = [{', '.join(json.dumps(p) for p in phrases)}]"]
    return "\n".join(lines) + "\n"


def score_archive(checkpoint: Path, archive: Path, workspace: Path, prompts: Path | None = None):
    """Embed an archive, label it with the demo prompt set; return (truth, probabilities) frames joined on path."""
    import pandas as pd

    from curator.demo_model import demo_prompts_path
    from curator.pipelines.embed import EmbedConfig, run_embed
    from curator.pipelines.label import run_label
    from curator.prompts import load_prompt_set
    from curator.query import run_query
    from curator.workspace import Workspace

    run_embed(EmbedConfig(archives=[str(archive)], workspace=str(workspace), checkpoints=[str(checkpoint)], progress=False))
    run_label(str(workspace), load_prompt_set(prompts or demo_prompts_path()), progress=False)
    probs = run_query(Workspace(workspace), f"SELECT path, {', '.join(FINDINGS)} FROM images")
    truth = pd.read_csv(archive / "ground_truth.csv")
    truth["path"] = [str((archive / p).resolve()) for p in truth.path]
    merged = truth[["path", *FINDINGS]].merge(probs, on="path", suffixes=("_truth", ""))
    return merged


def thresholds_and_auc(merged) -> tuple[dict, dict]:
    from curator.metrics import choose_threshold, roc_auc

    thr, auc = {}, {}
    for f in FINDINGS:
        y, s = merged[f + "_truth"].to_numpy(), merged[f].to_numpy()
        thr[f] = choose_threshold(y, s, "f1")
        auc[f] = roc_auc(y, s)
    return thr, auc


def stages_of(card: dict) -> list[dict]:
    """A card's training stages, oldest first (cards from before stages were recorded: one stage)."""
    if "training" in card:
        return list(card["training"])
    return [{
        "archive": card.get("train_archive"),
        "command": card.get("train_command"),
        "steps": card.get("train_steps"),
        "seconds": card.get("train_seconds"),
        "final_loss": card.get("train_final_loss"),
        "validation_auc": card.get("train_validation_auc"),
        "validation_history": card.get("train_validation_history"),
        "note": card.get("train_note"),
        "architecture": card.get("architecture"),
    }]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", required=True, type=Path, help="fp32 checkpoint written by curator train")
    ap.add_argument("--threshold-archive", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="folder for demo_model.pt and demo_model.json")
    ap.add_argument("--train-archive", default="curator synth TRAIN --studies 2500 --seed 101",
                    help="the `curator synth` command that made this stage's training archive")
    ap.add_argument("--threshold-synth", default="curator synth THR --studies 600 --seed 303",
                    help="the `curator synth` command that made the threshold archive (for the card)")
    ap.add_argument("--choose-phrases", type=Path, default=None, metavar="TOML",
                    help="first choose each finding's phrasing on the threshold archive and write the prompt set here "
                         "(e.g. curator/prompts/demo.toml); thresholds then use it")
    ap.add_argument("--previous-card", type=Path, default=None,
                    help="card of the checkpoint this stage fine-tuned (--init): its stages are kept in the lineage")
    args = ap.parse_args(argv)
    from curator.model import file_sha256

    earlier = stages_of(json.loads(args.previous_card.read_text())) if args.previous_card else []
    ck = store_half(args.trained, args.out / "demo_model.pt")
    phrase_auc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.choose_phrases:
            ws = Path(tmp) / "ws"
            score_archive(ck, args.threshold_archive, ws)
            chosen, phrase_auc = choose_phrases(ws, args.threshold_archive / "ground_truth.csv")
            header = ("The synthetic archive's eight findings with the phrasing that scored best for the demo model\n"
                      "(sha256 " + file_sha256(ck)[:12] + "), chosen by `python -m curator.pipelines.demo_model --choose-phrases`\n"
                      "on the threshold archive (seed 303, not the benchmark's held-out archive): each candidate of\n"
                      "CANDIDATE_PHRASES alone, then the best three and best two averaged. `curator demo` labels the demo\n"
                      "workspace with this set after the default CheXpert set, which shows how a prompt set replaces\n"
                      "columns without re-reading any image.")
            args.choose_phrases.write_text(prompt_set_toml(chosen, header))
            print(json.dumps({"phrases": chosen, "auc": phrase_auc}, indent=1))
        merged = score_archive(ck, args.threshold_archive, Path(tmp) / "ws", args.choose_phrases)
    thr, auc = thresholds_and_auc(merged)
    train_card = json.loads(Path(str(args.trained) + ".json").read_text()) if Path(str(args.trained) + ".json").is_file() else {}
    stage = {
        "archive": args.train_archive,
        "command": train_card.get("command"),
        "steps": train_card.get("step"),
        "seconds": train_card.get("train_seconds"),
        "final_loss": train_card.get("final_loss"),
        "validation_auc": train_card.get("val_auc"),
        "validation_history": train_card.get("val_history"),
    }
    card = {
        "sha256": file_sha256(ck),
        "architecture": train_card.get("model") or (earlier[0].get("architecture") if earlier else None),
        "training": [*earlier, stage],
        "storage": "float16 matrices, float32 vectors (pipelines/demo_model.py store_half)",
        "prompt_set": "curator/prompts/demo.toml",
        "threshold_archive": f"{args.threshold_synth} ({len(merged)} images)",
        "threshold_rule": "maximise F1",
        "thresholds": thr,
        "threshold_archive_auc": auc,
    }
    (args.out / "demo_model.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    print(json.dumps({"thresholds": thr, "auc": auc}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
