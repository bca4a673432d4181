"""The label job: probabilities for a prompt set from stored embeddings, never re-reading images.

A new finding or template pair costs one text encoding per checkpoint and a matrix product per
stored embedding part; the parts are streamed one at a time.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curator import query_cache, zeroshot
from curator.constants import ENSEMBLE_MEMBER
from curator.model import Checkpoint, file_sha256, load_checkpoint
from curator.prompts import PromptSet, PromptSetError
from curator.workspace import CATALOG_SCHEMA, Workspace, WorkspaceError, open_workspace

from .embed import register_prompt_set
from .known import superseded_ids
from .stages import predictions_table, run_record, utcnow

log = logging.getLogger(__name__)


@dataclass
class LabelSummary:
    prompt_set: str
    columns: list[str]
    images: int
    seconds: float


def workspace_checkpoints(ws: Workspace, device: str | None = None, overrides: list[str] | None = None) -> list[Checkpoint]:
    """Load the workspace's ensemble checkpoints (from their recorded paths, or ``overrides``)."""
    ensemble = ws.manifest.get("ensemble") or []
    if not ensemble:
        raise WorkspaceError(f"{ws.root}: nothing embedded yet; run `curator embed` first")
    if overrides:
        by_sha = {}
        for p in overrides:
            ck = load_checkpoint(p, device)
            by_sha[ck.sha256] = ck
        missing = [s[:12] for s in ensemble if s not in by_sha]
        if missing:
            raise WorkspaceError(f"the --checkpoint files given do not include the workspace's checkpoint(s) {', '.join(missing)}")
        return [by_sha[s] for s in ensemble]
    out = []
    for sha in ensemble:
        path = ws.manifest["checkpoints"][sha]["path"]
        try:
            actual = file_sha256(path)
        except OSError:
            raise WorkspaceError(f"checkpoint {sha[:12]} is no longer at {path}; pass it with --checkpoint") from None
        if actual != sha:
            raise WorkspaceError(f"{path} has changed since it was used (sha256 {actual[:12]}, expected {sha[:12]}); pass the original with --checkpoint")
        out.append(load_checkpoint(path, device))
    return out


# Columns that searches, cohorts, the labels view and exports put beside the findings' columns
RESERVED_COLUMNS = frozenset({"rank", "similarity", "text_similarity", "cohort_arm", "split", "image_file", "patient_key", "study_key",
                              "series_key", "sop_key", "study_year", "member", "prompt_set", "checkpoint", "embedding"})


def run_label(ws_root: str, prompts: PromptSet, device: str | None = None, checkpoints: list[Checkpoint] | None = None, progress: bool = True) -> LabelSummary:
    t0 = time.perf_counter()
    started = utcnow()
    ws = open_workspace(ws_root)
    clash = [c for c in prompts.columns if c in CATALOG_SCHEMA.names]
    if clash:
        raise PromptSetError(f"finding column(s) {', '.join(clash)} clash with catalog columns; rename the finding(s)")
    taken = [c for c in prompts.columns if c in RESERVED_COLUMNS or c.endswith("_label") or c.startswith("_")]
    if taken:
        raise PromptSetError(f"finding column(s) {', '.join(taken)} would clash with columns curator adds to searches, cohorts "
                             "and exports (rank, similarity, text_similarity, split, cohort_arm, keys, <finding>_label, ...); "
                             "rename the finding(s)")
    with ws.writer():
        cks = checkpoints or workspace_checkpoints(ws, device)
        weights = {ck.sha256: zeroshot.prompt_weights(ck.encode_texts, prompts) for ck in cks}
        old = [e["file"] for e in ws.part_entries("predictions") if e.get("prompt_set") == prompts.id]
        parts = []
        n_images = 0
        from tqdm import tqdm

        entries = ws.part_entries("embeddings")
        gone = superseded_ids(ws)  # rows a changed file replaced or retired: not in the catalog, not labelled
        for entry in tqdm(entries, desc="label", unit="part", disable=not progress, file=sys.stderr):
            table = pq.read_table(ws.root / entry["file"])
            if len(gone):
                import pyarrow.compute as pc

                table = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=pa.array(gone))))
            members, ids = _member_probabilities(table, cks, weights)
            if ids is None:
                continue
            members[ENSEMBLE_MEMBER] = zeroshot.ensemble([members[c.sha256] for c in cks])
            parts.append(ws.write_part("predictions", predictions_table(ids, prompts, members), row_group_size=len(ids), prompt_set=prompts.id))
            n_images += len(ids)
        sets, cols = register_prompt_set(ws.manifest.get("prompt_sets", {}), ws.manifest.get("finding_columns", {}), prompts, started.isoformat())
        run_id = started.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        record = run_record(
            run_id, "label", "completed", started,
            [{"sha256": c.sha256, "path": c.path} for c in cks], [prompts.id],
            {"images": n_images, "findings": len(prompts.findings)}, {"total_s": time.perf_counter() - t0},
            {"prompt_set": prompts.to_dict(), "source": prompts.source},
        )
        parts.append(ws.write_part("runs", record))
        ws.commit(add=parts, remove=old, prompt_sets=sets, finding_columns=cols)
        query_cache.after_write(ws)
    return LabelSummary(prompt_set=prompts.id, columns=prompts.columns, images=n_images, seconds=time.perf_counter() - t0)


def _member_probabilities(table: pa.Table, cks: list[Checkpoint], weights: dict) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    members: dict[str, np.ndarray] = {}
    ids_ref = None
    ck_col = table.column("checkpoint").to_numpy(zero_copy_only=False)
    for ck in cks:
        mask = ck_col == ck.sha256
        if not mask.any():
            return {}, None
        sub = table.filter(pa.array(mask))
        ids = sub.column("image_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        emb_list = sub.column("embedding").combine_chunks()
        d = len(emb_list[0]) if len(emb_list) else 0
        mat = emb_list.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)[order]
        ids = ids[order]
        if ids_ref is None:
            ids_ref = ids
        elif not np.array_equal(ids_ref, ids):
            raise WorkspaceError("embedding parts hold different images for different checkpoints; run `curator verify`")
        pos, neg = weights[ck.sha256]
        members[ck.sha256] = zeroshot.softmax_probabilities(mat, pos, neg)
    return members, ids_ref
