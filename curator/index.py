"""FAISS inner-product index over one checkpoint's normalised image embeddings.

Ids are the catalog's ``image_id``; on normalised vectors the inner product is the cosine.
Exact search (``IndexFlatIP`` in an ``IndexIDMap2``) is right below a few million images.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curator.workspace import Workspace, WorkspaceError, atomic_write_bytes

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_META = "index.json"


def _faiss():
    import faiss

    return faiss


def use_gpu() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def current_embeddings(ws: Workspace, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the current catalog rows for one checkpoint, via DuckDB."""
    from curator.query import connect

    con = connect(ws, sandbox=False)
    try:
        tbl = con.sql(
            "SELECT image_id, embedding FROM embeddings WHERE checkpoint = $ck ORDER BY image_id", params={"ck": checkpoint}
        ).to_arrow_table()
    finally:
        con.close()
    ids = tbl.column("image_id").to_numpy().astype(np.int64)
    if len(ids) == 0:
        return ids, np.zeros((0, 0), np.float32)
    flat = tbl.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ids, np.ascontiguousarray(flat.reshape(len(ids), -1), dtype=np.float32)


@dataclass
class IndexInfo:
    checkpoint: str
    count: int
    dim: int
    index_type: str
    built_at: str
    generation: int
    file: str


def build_index(ws: Workspace, checkpoint: str | None = None) -> IndexInfo:
    faiss = _faiss()
    ensemble = ws.manifest.get("ensemble") or []
    if not ensemble:
        raise WorkspaceError(f"{ws.root}: nothing embedded yet; run `curator embed` first")
    checkpoint = checkpoint or ensemble[0]
    matches = [s for s in ensemble if s.startswith(checkpoint)]
    if len(matches) != 1:
        raise WorkspaceError(f"checkpoint {checkpoint!r} is not one of the workspace's: {', '.join(s[:12] for s in ensemble)}")
    checkpoint = matches[0]
    ids, vecs = current_embeddings(ws, checkpoint)
    if len(ids) == 0:
        raise WorkspaceError(f"{ws.root}: no embeddings to index yet")
    dim = vecs.shape[1]
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(vecs, ids)
    folder = ws.root / INDEX_DIR
    folder.mkdir(exist_ok=True)
    name = f"{checkpoint[:12]}.flat.faiss"
    tmp = folder / f".{name}.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(folder / name)
    info = IndexInfo(
        checkpoint=checkpoint, count=int(index.ntotal), dim=dim, index_type="IDMap2,FlatIP",
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(), generation=int(ws.manifest.get("generation", 0)),
        file=f"{INDEX_DIR}/{name}",
    )
    atomic_write_bytes(folder / INDEX_META, json.dumps(info.__dict__, indent=1).encode())
    return info


def read_index_info(ws: Workspace) -> IndexInfo | None:
    path = ws.root / INDEX_DIR / INDEX_META
    if not path.is_file():
        return None
    return IndexInfo(**json.loads(path.read_text()))


def load_index(ws: Workspace):
    info = read_index_info(ws)
    if info is None:
        raise WorkspaceError(f"{ws.root}: no index yet; run `curator index --workspace {ws.root}`")
    index = _faiss().read_index(str(ws.root / info.file))
    return index, info


def search_vectors(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the k nearest; ids of -1 (fewer hits than k) are dropped by callers."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(int(k), int(index.ntotal)))
    return index.search(q, k)
