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


def sync_index(ws: Workspace) -> IndexInfo | None:
    """Bring an existing index up to date with the catalog: append new images (no rebuild), or
    rebuild when images left it. Returns None when the workspace has no index. Needs the lock."""
    info = read_index_info(ws)
    if info is None:
        return None
    try:
        index, info = load_index(ws)
        have = index_ids(index)
    except Exception:
        return build_index(ws, info.checkpoint)
    ids, vecs = current_embeddings(ws, info.checkpoint)
    have_set = set(have.tolist())
    if not have_set.issubset(set(ids.tolist())):
        return build_index(ws, info.checkpoint)
    new = np.array([i not in have_set for i in ids.tolist()], dtype=bool)
    if not new.any():
        return info
    index.add_with_ids(vecs[new], ids[new])
    return _save(ws, index, info.checkpoint, vecs.shape[1], info.index_type)


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
    return _save(ws, index, checkpoint, dim, "IDMap2,FlatIP")


def _save(ws: Workspace, index, checkpoint: str, dim: int, index_type: str) -> IndexInfo:
    """Write the index file, then its JSON description, each atomically."""
    faiss = _faiss()
    folder = ws.root / INDEX_DIR
    folder.mkdir(exist_ok=True)
    name = f"{checkpoint[:12]}.flat.faiss"
    tmp = folder / f".{name}.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(folder / name)
    info = IndexInfo(
        checkpoint=checkpoint, count=int(index.ntotal), dim=dim, index_type=index_type,
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


def search_vectors(index, queries: np.ndarray, k: int, allowed_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the k nearest; ids of -1 (fewer hits than k) are dropped by callers.

    ``allowed_ids`` restricts the search to those image ids (see :func:`search_vectors_filtered`).
    """
    if allowed_ids is not None:
        return search_vectors_filtered(index, queries, k, allowed_ids)
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(int(k), int(index.ntotal)))
    return index.search(q, k)


# -- filtered search ----------------------------------------------------------------------------
# Below this many allowed ids a hash set (IDSelectorBatch) is built; above it a bitmap over the
# id range (IDSelectorBitmap), which is faster to make for large sets.
_BATCH_SELECTOR_MAX = 65536


def id_selector(allowed_ids):
    """A FAISS ID selector admitting exactly ``allowed_ids`` (catalog ``image_id`` values).

    Returns ``(selector, keepalive)``: FAISS's bitmap selector points into a numpy array that
    must outlive the search, so callers keep ``keepalive`` referenced until then.
    """
    faiss = _faiss()
    ids = np.unique(np.asarray(allowed_ids, dtype=np.int64))
    if len(ids) and ids[0] < 0:
        raise ValueError("image ids are never negative")
    if len(ids) <= _BATCH_SELECTOR_MAX:
        return faiss.IDSelectorBatch(ids), ids
    mask = np.zeros(int(ids[-1]) + 1, dtype=bool)
    mask[ids] = True
    bitmap = np.packbits(mask, bitorder="little")
    # n counts bytes: FAISS admits id i when i >> 3 < n and bit (i & 7) of byte i >> 3 is set.
    return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap


def search_vectors_filtered(index, queries: np.ndarray, k: int, allowed_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`search_vectors`, restricted to ``allowed_ids`` (None = every image).

    The restriction is applied inside the search (FAISS ``SearchParameters(sel=...)`` on the CPU
    index), so the exact top-k among the allowed images comes back, k of them whenever at least k
    are allowed and indexed. Without a filter an all-pass selector is used: on a flat index FAISS
    then spreads one query over all its threads, which its plain path does not.
    """
    faiss = _faiss()
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if allowed_ids is None:
        selector, keep = faiss.IDSelectorAll(), None
        k = max(1, min(int(k), int(index.ntotal)))
    else:
        allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64))
        if len(allowed) == 0 or index.ntotal == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        selector, keep = id_selector(allowed)
        k = max(1, min(int(k), int(index.ntotal), len(allowed)))
    sims, ids = index.search(q, k, params=faiss.SearchParameters(sel=selector))
    del keep  # the selector may point into it: keep it alive until here
    return sims, ids


def reconstruct(index, image_id: int) -> np.ndarray | None:
    """The stored vector of ``image_id`` (None when the index does not hold it)."""
    try:
        return np.asarray(index.reconstruct(int(image_id)), dtype=np.float32)
    except RuntimeError:
        return None


def index_ids(index) -> np.ndarray:
    """The ids an IndexIDMap / IndexIDMap2 holds."""
    faiss = _faiss()
    return faiss.vector_to_array(index.id_map).astype(np.int64)
