"""Text-to-image and image-to-image search over a workspace's FAISS index."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from curator import index as faiss_index
from curator.model import Checkpoint
from curator.preprocess import model_input
from curator.query import connect
from curator.readers import ReadOptions, read_image
from curator.workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)


def index_checkpoint(ws: Workspace, device: str | None = None, override: list[str] | None = None) -> Checkpoint:
    """The checkpoint the index was built with, loaded (its text and image encoders)."""
    from curator.pipelines.label import workspace_checkpoints

    info = faiss_index.read_index_info(ws)
    if info is None:
        raise WorkspaceError(f"{ws.root}: no index yet; run `curator index --workspace {ws.root}`")
    for ck in workspace_checkpoints(ws, device, override):
        if ck.sha256 == info.checkpoint:
            return ck
    raise WorkspaceError(f"the index was built with checkpoint {info.checkpoint[:12]}, which the workspace no longer lists; rebuild it")


def query_vector(ck: Checkpoint, text: str | None = None, image: str | Path | None = None, read_options: ReadOptions | None = None) -> np.ndarray:
    if (text is None) == (image is None):
        raise ValueError("give a text or an image to search with (not both)")
    if text is not None:
        if not text.strip():
            raise ValueError("the search text is empty")
        return ck.encode_texts([text]).numpy()[0]
    result = read_image(image, read_options or ReadOptions(modalities=None))
    return ck.encode_images(model_input(result.image).unsqueeze(0)).numpy()[0]


def search(ws: Workspace, vector: np.ndarray, k: int = 20, index_and_info=None) -> pd.DataFrame:
    """Top-k images for a normalised query vector, with their catalog fields and probabilities."""
    index, info = index_and_info or faiss_index.load_index(ws)
    sims, ids = faiss_index.search_vectors(index, vector, k)
    hits = [(int(i), float(s)) for i, s in zip(ids[0], sims[0]) if i >= 0]
    con = connect(ws)
    try:
        n_current = con.execute("SELECT count(*) FROM embeddings WHERE checkpoint = ?", [info.checkpoint]).fetchone()[0]
        if n_current != info.count:
            log.warning("the index holds %d images but the workspace has %d; run `curator index` to update it", info.count, n_current)
        if not hits:
            return pd.DataFrame(columns=["rank", "image_id", "similarity", "path"])
        con.execute("CREATE TEMP TABLE hits(rank INTEGER, image_id BIGINT, similarity DOUBLE)")
        con.executemany("INSERT INTO hits VALUES (?, ?, ?)", [(r + 1, i, s) for r, (i, s) in enumerate(hits)])
        df = con.execute(
            "SELECT h.rank, h.image_id, h.similarity, i.* EXCLUDE (image_id) FROM hits h "
            "JOIN images i USING (image_id) ORDER BY h.rank"
        ).df()
    finally:
        con.close()
    return df
