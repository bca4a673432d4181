"""Zero-shot quality of the bundled demo model on a held-out synthetic archive.

Generates an archive with a seed used neither for training (101) nor for the thresholds (303),
embeds it with the demo model, labels it with the demo prompt set (("{}", "no {}") templates),
and prints per-finding ROC AUC against the synthetic ground truth, the mean over the eight
findings, and the precision@20 of the text search "moderate pulmonary edema", by plain CLIP
similarity and ranked against "no moderate pulmonary edema" (``curator search --contrast``).
Targets (issue 3): mean AUC >= 0.90, edema >= 0.95, precision@20 >= 0.9.

    python benchmarks/demo_model_quality.py --studies 600 --seed 404
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

QUERY = "moderate pulmonary edema"
# Further text searches, one per finding, typed the way a user would (no full stop); reported, no target.
MORE_QUERIES = {
    "cardiomegaly": "enlarged heart",
    "pleural_effusion": "large left pleural effusion",
    "edema": "pulmonary edema",
    "pneumothorax": "large right pneumothorax",
    "consolidation": "right lower lobe consolidation",
    "atelectasis": "bibasilar atelectasis",
    "lung_lesion": "pulmonary nodule",
    "support_devices": "endotracheal tube",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=600)
    ap.add_argument("--seed", type=int, default=404)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--archive", type=Path, default=None, help="reuse/generate the archive here (default: a temporary folder)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a candidate checkpoint instead of the bundled demo model")
    ap.add_argument("--prompts", type=Path, default=None, help="prompt set for the labels (default: the demo prompt set)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from curator.demo_model import demo_checkpoint_path
    from curator.index import build_index
    from curator.pipelines.demo_model import FINDINGS, score_archive, thresholds_and_auc
    from curator.constants import NEGATIVE_TEMPLATE
    from curator.search import index_checkpoint, query_vector, search
    from curator.synth import generate_archive
    from curator.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive or Path(tmp) / "archive"
        if not (archive / "ground_truth.csv").is_file():
            generate_archive(archive, studies=args.studies, seed=args.seed, image_size=args.image_size, progress=False, workers=2, exist_ok=True)
        ws_root = Path(tmp) / "ws"
        merged = score_archive(args.checkpoint or demo_checkpoint_path(), archive, ws_root, args.prompts)
        _, auc = thresholds_and_auc(merged)
        ws = Workspace(ws_root)
        with ws.writer():
            build_index(ws)
        ck = index_checkpoint(ws)
        truth = merged.set_index("path")
        p20, p20c = (float(truth.loc[search(ws, query_vector(ck, text=QUERY, contrast=c), k=20).path, "edema_truth"].mean())
                     for c in (None, NEGATIVE_TEMPLATE))
        more = {q: float(truth.loc[search(ws, query_vector(ck, text=q), k=20).path, f + "_truth"].mean()) for f, q in MORE_QUERIES.items()}
    mean_auc = sum(auc.values()) / len(auc)
    result = {"images": len(merged), "seed": args.seed, "auc": auc, "mean_auc": mean_auc, "precision_at_20_moderate_pulmonary_edema": p20,
              "precision_at_20_moderate_pulmonary_edema_contrast": p20c, "precision_at_20_more_queries": more}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"held-out synthetic archive: seed {args.seed}, {len(merged)} images")
        for f in FINDINGS:
            print(f"  {f:18s} AUC {auc[f]:.3f}")
        print(f"  mean AUC (8 findings)      {mean_auc:.3f}   (target >= 0.90)")
        print(f"  edema AUC                  {auc['edema']:.3f}   (target >= 0.95)")
        print(f"  precision@20 'moderate pulmonary edema'  {p20:.2f} plain similarity, {p20c:.2f} against 'no ...' (--contrast)"
              "   (target >= 0.9)")
        for f, q in MORE_QUERIES.items():
            print(f"  precision@20 {q!r:34s} {more[q]:.2f} (truth: {f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
