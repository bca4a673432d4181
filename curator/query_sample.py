"""The text queries an index build tunes nprobe on and measures its recall with.

Searches are mostly by text, and a CLIP text embedding does not lie among the image embeddings
(the "modality gap": text-image similarities are lower and point elsewhere than image-image
ones), so an IVF index tuned on image queries alone can miss text queries' neighbours. A build
of a workspace's index therefore also takes text queries: the findings of the workspace's prompt
sets and common search phrases (``prompts/search_phrases.txt``), each as a plain text vector and
as the contrast vector `curator search --contrast` and the app use (the text against "no" + the
text), embedded with the index's own checkpoint.
"""

from __future__ import annotations

import logging
from importlib import resources

import numpy as np

from curator import constants as C
from curator.workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)


def search_phrases() -> list[str]:
    """The bundled common search phrases."""
    text = resources.files("curator").joinpath("prompts/search_phrases.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def query_texts(ws: Workspace) -> list[str]:
    """The findings of the workspace's prompt sets (their phrases, as their positive template
    words them), then the bundled search phrases; each text once."""
    texts: list[str] = []
    for ps in (ws.manifest.get("prompt_sets") or {}).values():
        template = ps.get("positive") or C.POSITIVE_TEMPLATE
        for f in ps.get("findings") or []:
            for phrase in f.get("phrases") or [f.get("name", "")]:
                if phrase and "{}" in template:
                    texts.append(template.format(phrase).lower())
    texts += search_phrases()
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def vectors(ck, texts: list[str], contrast: str = C.NEGATIVE_TEMPLATE) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, groups)``: float32 unit vectors, each text's embedding, then each text's
    contrast vector (its embedding minus its negation's, normalised), as searches form them (up
    to ``2 * len(texts)``: a text whose negation embeds the same has no contrast vector), and
    the index in ``texts`` each comes from."""
    from curator.search import contrast_vectors

    pos = ck.encode_texts(texts).double().numpy()
    neg = ck.encode_texts([contrast.format(t) for t in texts]).double().numpy()
    diff, kept = contrast_vectors(pos, neg)
    pos /= np.linalg.norm(pos, axis=1, keepdims=True)
    groups = np.concatenate([np.arange(len(texts)), np.flatnonzero(kept)])
    return np.ascontiguousarray(np.concatenate([pos, diff]), dtype=np.float32), groups


def text_queries(ws: Workspace, checkpoint: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The text query vectors for an index of ``checkpoint`` (a sha256 of the workspace), embedded
    on the CPU with that checkpoint, and their groups (:func:`vectors`), or None (with a warning)
    when its file cannot be loaded."""
    from curator.model import file_sha256, load_checkpoint

    path = (ws.manifest.get("checkpoints") or {}).get(checkpoint, {}).get("path")
    try:
        if not path:
            raise WorkspaceError(f"checkpoint {checkpoint[:12]} is not recorded in the workspace")
        if file_sha256(path) != checkpoint:
            raise WorkspaceError(f"{path} is no longer checkpoint {checkpoint[:12]}")
        ck = load_checkpoint(path, "cpu")
    except (OSError, ValueError, WorkspaceError) as exc:
        log.warning("the index's recall on text queries is not measured, nor its nprobe tuned on them: the checkpoint "
                    "cannot be loaded (%s)", exc)
        return None
    return vectors(ck, query_texts(ws))
