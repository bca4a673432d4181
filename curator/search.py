"""Text-to-image and image-to-image search over a workspace's FAISS index."""

from __future__ import annotations

import datetime as _dt
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from curator import index as faiss_index
from curator.constants import DEFAULT_MODALITIES
from curator.model import Checkpoint
from curator.preprocess import model_input
from curator.query import connect, reads_query_cache
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


def text_query_vector(ck: Checkpoint, text: str, contrast: str | None = None) -> np.ndarray:
    """The search vector for a text: its normalised embedding, or with ``contrast`` (a negative
    template such as CheXzero's ``"no {}"``) the normalised difference between the text's embedding and its
    negation's.

    Ranking images by inner product with the contrast vector is ranking them by the zero-shot
    probability of the text against its negation (CheXzero's method with the query as the
    finding), which cancels what the two texts share; a small model that ranks by wording as much
    as by finding needs it.
    """
    if not text or not text.strip():
        raise ValueError("the search text is empty")
    text = text.strip()
    warn_if_cut(text, ck.context_length)
    if contrast is None:
        return ck.encode_texts([text]).numpy()[0]
    if "{}" not in contrast:
        raise ValueError(f"the contrast template {contrast!r} has no {{}} for the search text")
    pos, neg = ck.encode_texts([text, contrast.format(text)]).double().numpy()
    diff, kept = contrast_vectors(pos[None], neg[None])
    if not kept[0]:
        raise ValueError(f"{text!r} and {contrast.format(text)!r} have the same embedding; nothing to contrast")
    return diff[0]


def warn_if_cut(text: str, context_length: int) -> bool:
    """Warn (and return True) when the model reads only the start of ``text``: CLIP's tokenizer
    keeps ``context_length`` tokens, start and end markers included, and drops the rest."""
    try:
        from open_clip.tokenizer import _tokenizer
    except ImportError:  # (a tokenizer without the module-level instance: nothing to count with)
        return False
    n = len(_tokenizer.encode(text)) + 2
    if n <= context_length:
        return False
    log.warning("the search text is %d tokens long; the model reads only its first %d (the rest changes nothing): "
                "shorten it to what matters", n, context_length)
    return True


def contrast_vectors(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, the normalised difference of the normalised text embeddings ``pos`` and ``neg``
    (float32), and which rows have one (a text whose negation embeds the same has none)."""
    pos = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    neg = neg / np.linalg.norm(neg, axis=1, keepdims=True)
    diff = pos - neg
    norms = np.linalg.norm(diff, axis=1)
    kept = norms > 0
    return (diff[kept] / norms[kept, None]).astype(np.float32), kept


def query_read_options(ws: Workspace) -> ReadOptions:
    """How an example image is read to search ``ws``: the way the workspace's last embed read its
    archive (the DICOM conversion, the reduced JPEG decode), so that a file of the archive finds
    itself first; any modality (a query is not filtered)."""
    from curator import constants as C

    reading = ws.manifest.get("reading") or {}
    return ReadOptions(dicom_conversion=reading.get("dicom_conversion", "mimic"), modalities=None,
                       jpeg_draft_min_side=C.CANVAS_SIZE if reading.get("fast_jpeg") else None)


def query_vector(ck: Checkpoint, text: str | None = None, image: str | Path | None = None, read_options: ReadOptions | None = None,
                 contrast: str | None = None) -> np.ndarray:
    if (text is None) == (image is None):
        raise ValueError("give a text or an image to search with (not both)")
    if text is not None:
        return text_query_vector(ck, text, contrast)
    result = read_image(image, read_options or ReadOptions(modalities=None))
    return ck.encode_images(model_input(result.image).unsqueeze(0)).numpy()[0]


def search(ws: Workspace, vector: np.ndarray, k: int = 20, index_and_info=None, allowed_ids=None, text: bool = False) -> pd.DataFrame:
    """Top-k images for a normalised query vector, with their catalog fields and probabilities.
    ``text``: the vector comes from the text tower (an IVF index probes its ``nprobe_text`` lists).

    ``allowed_ids`` (image ids) restricts the search itself to those images: the top-k among
    them, k of them whenever at least k are allowed and indexed.

    An index that does not hold exactly the workspace's current images (an ``embed`` stopped
    before updating it) is searched all the same, with a warning that says what it lacks and
    what to run (:func:`curator.index.index_staleness`; cheap when the index is current).
    """
    index, info = index_and_info or faiss_index.load_index(ws)
    sims, ids = faiss_index.search_vectors(index, vector, k, allowed_ids=allowed_ids, nprobe=_nprobe(info, text))
    return _with_rows(ws, index, info, *_ranked(ids[0], sims[0]))


def _ranked(ids: np.ndarray, sims: np.ndarray, exclude=frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's hits (-1: none) without ``exclude``, most similar first; equal similarities with the
    smaller id first, as :func:`above` orders them (FAISS's heap leaves ties in no set order)."""
    keep = (ids >= 0) & ~np.isin(ids, np.fromiter(exclude, np.int64, len(exclude)))
    ids, sims = ids[keep], sims[keep]
    order = np.lexsort((ids, -sims))
    return ids[order], sims[order]


def above(ws: Workspace, vector: np.ndarray, threshold: float, index_and_info=None, allowed_ids=None) -> pd.DataFrame:
    """Every image whose similarity to a normalised query vector is above ``threshold``, most
    similar first, with the columns of :func:`search`: a cohort defined by a text (or image)
    query. Exact for every index type (:func:`curator.index.range_search`)."""
    index, info = index_and_info or faiss_index.load_index(ws)
    ids, sims = faiss_index.range_search(index, vector, threshold, allowed_ids)
    return _with_rows(ws, index, info, ids, sims)


def _with_rows(ws: Workspace, index, info, ids: np.ndarray, sims: np.ndarray) -> pd.DataFrame:
    """Hits (in rank order) joined with their ``images`` rows; warns when the index is stale."""
    con = connect(ws)
    try:
        stale = faiss_index.index_staleness(ws, info, index, con)
        if stale:
            log.warning("%s", stale)
        if len(ids) == 0:
            return pd.DataFrame(columns=["rank", "image_id", "similarity", "path"])
        con.register("hits", pd.DataFrame({"rank": np.arange(1, len(ids) + 1, dtype=np.int64), "image_id": np.asarray(ids, np.int64),
                                           "similarity": np.asarray(sims, np.float64)}))
        df = con.execute(
            "SELECT h.rank, h.image_id, h.similarity, i.* EXCLUDE (image_id) FROM hits h "
            "JOIN images i USING (image_id) ORDER BY h.rank"
        ).df()
    finally:
        con.close()
    return df


# ------------------------------------------------------------------------------------------
# Filters: metadata and probability conditions, turned into a SQL predicate over `images`.

class FilterError(ValueError):
    """A filter or condition the user wrote that cannot be used (the message says why)."""


_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op>>=|<=|!=|<>|==|=|>|<)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<paren>[()]))")
_SQL_OP = {">": ">", ">=": ">=", "<": "<", "<=": "<=", "=": "=", "==": "=", "!=": "<>", "<>": "<>"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos, text = [], 0, text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"cannot read the condition at {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse_condition(text: str, columns, default_threshold: float = 0.5) -> str:
    """A probability condition as a SQL predicate over ``images``.

    Grammar: comparisons ``finding OP number`` (OP one of ``> >= < <= = !=``) combined with
    ``and``, ``or``, ``not`` and parentheses; a bare finding means ``finding > default_threshold``.
    ``edema > 0.7 and not cardiomegaly`` becomes
    ``(("edema" > 0.7) AND (NOT ("cardiomegaly" > 0.5)))``. Only the given ``columns`` (the
    workspace's finding columns, plus any numeric column the caller allows) may be named, and
    numbers are re-printed, so the result is safe to put in SQL.
    """
    allowed = {str(c).lower(): str(c) for c in columns}
    toks = _tokens(text)
    if not toks:
        return ""
    pos = 0

    def peek(kind=None, value=None):
        if pos >= len(toks):
            return False
        k, v = toks[pos]
        return (kind is None or k == kind) and (value is None or v.lower() == value)

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def column(name: str) -> str:
        col = allowed.get(name.lower())
        if col is None:
            known = ", ".join(sorted(allowed)) or "(none: label the workspace first)"
            raise FilterError(f"unknown finding {name!r}; known: {known}")
        return '"' + col.replace('"', '""') + '"'

    def number(v: str) -> str:
        x = float(v)
        if not np.isfinite(x):
            raise FilterError(f"not a usable number: {v}")
        return repr(x)

    def expr():
        parts = [term()]
        while peek("name", "or"):
            take()
            parts.append(term())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def term():
        parts = [factor()]
        while peek("name", "and"):
            take()
            parts.append(factor())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def factor():
        if peek("name", "not"):
            take()
            return f"(NOT {factor()})"
        if peek("paren", "("):
            take()
            inner = expr()
            if not peek("paren", ")"):
                raise FilterError("a '(' is not closed")
            take()
            return inner
        if peek("name"):
            name = take()[1]
            if name.lower() in ("and", "or", "not"):
                raise FilterError(f"'{name}' needs a condition before and after it")
            col = column(name)
            if peek("op"):
                op = _SQL_OP[take()[1]]
                if not peek("num"):
                    raise FilterError(f"expected a number after {name} {op}")
                return f"({col} {op} {number(take()[1])})"
            return f"({col} > {number(str(default_threshold))})"
        if peek("num"):
            raise FilterError("write conditions as 'finding > 0.7' (the finding first)")
        raise FilterError("a condition is missing" if pos >= len(toks) else f"unexpected {toks[pos][1]!r}")

    out = expr()
    if pos != len(toks):
        raise FilterError(f"unexpected {toks[pos][1]!r} in the condition")
    return out


def _sql_str(v: str) -> str:
    return "'" + str(v).replace("'", "''") + "'"


@dataclass
class SearchFilter:
    """Metadata and probability conditions on images; empty fields do not restrict.

    ``None`` inside a value list stands for "not recorded" (SQL NULL). Ranges are inclusive.
    """

    view_positions: list = field(default_factory=list)
    modalities: list = field(default_factory=list)
    sexes: list = field(default_factory=list)
    age_min: int | None = None
    age_max: int | None = None
    date_from: _dt.date | None = None
    date_to: _dt.date | None = None
    condition: str = ""  # probability condition, see parse_condition

    def is_empty(self) -> bool:
        return not (self.view_positions or self.modalities or self.sexes or self.age_min is not None
                    or self.age_max is not None or self.date_from or self.date_to or self.condition.strip())

    def to_sql(self, finding_columns=()) -> str:
        """A SQL predicate over ``images`` (``"true"`` when empty); values are quoted, names checked."""
        parts = []
        for col, values in (("view_position", self.view_positions), ("modality", self.modalities), ("patient_sex", self.sexes)):
            if not values:
                continue
            known = [v for v in values if v is not None]
            alts = []
            if known:
                alts.append(f"{col} IN ({', '.join(_sql_str(v) for v in known)})")
            if len(known) < len(values):
                alts.append(f"{col} IS NULL")
            parts.append("(" + " OR ".join(alts) + ")")
        if self.age_min is not None:
            parts.append(f"patient_age >= {int(self.age_min)}")
        if self.age_max is not None:
            parts.append(f"patient_age <= {int(self.age_max)}")
        if self.date_from:
            parts.append(f"study_date >= DATE '{_dt.date.fromisoformat(str(self.date_from)).isoformat()}'")
        if self.date_to:
            parts.append(f"study_date <= DATE '{_dt.date.fromisoformat(str(self.date_to)).isoformat()}'")
        if self.condition.strip():
            parts.append(parse_condition(self.condition, finding_columns))
        return " AND ".join(parts) if parts else "true"


# ------------------------------------------------------------------------------------------
# A search service for long-lived processes (the app, benchmarks): index, model and a compact
# table of the filterable columns are loaded once; every query after that is one text encode,
# one SQL filter and one FAISS search.

SEARCH_COLUMNS = ("view_position", "modality", "patient_sex", "patient_age", "study_date")


def _nprobe(info, text: bool) -> int | None:
    """The lists an IVF index probes for a query: ``nprobe_text`` for text queries where the build
    tuned one (curator.query_sample), else the index's own (None)."""
    return int(info.nprobe_text) if text and info is not None and getattr(info, "nprobe_text", 0) else None


def load_index_checkpoint(ws: Workspace, device: str | None = None, path: str | None = None) -> Checkpoint:
    """Load only the checkpoint the index was built with (checking its sha256)."""
    from curator.model import file_sha256, load_checkpoint

    info = faiss_index.read_index_info(ws)
    if info is None:
        raise WorkspaceError(f"{ws.root}: no index yet; run `curator index --workspace {ws.root}`")
    path = path or ws.manifest.get("checkpoints", {}).get(info.checkpoint, {}).get("path")
    if not path:
        raise WorkspaceError(f"the index's checkpoint {info.checkpoint[:12]} is not recorded in the workspace")
    try:
        actual = file_sha256(path)
    except OSError:
        raise WorkspaceError(f"checkpoint {info.checkpoint[:12]} is no longer at {path}") from None
    if actual != info.checkpoint:
        raise WorkspaceError(f"{path} has changed since the index was built (sha256 {actual[:12]}, expected {info.checkpoint[:12]})")
    return load_checkpoint(path, device)


def image_vector_from_bytes(ck: Checkpoint, data: bytes, read_options: ReadOptions | None = None) -> np.ndarray:
    """The normalised embedding of an uploaded image file's content (DICOM, PNG or JPEG).

    The bytes are written to a private temporary file under a fixed name; no name or path that
    came with the upload is used.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="curator-upload-") as d:
        tmp = Path(d) / "upload"
        tmp.write_bytes(data)
        result = read_image(tmp, read_options or ReadOptions(modalities=None))
        return ck.encode_images(model_input(result.image).unsqueeze(0)).numpy()[0]


def query_modality_note(ws: Workspace, data: bytes, what: str = "the example image") -> str | None:
    """A sentence when an example image (``what``: how the sentence names it) is a DICOM of a
    modality the workspace's embed leaves out (a CT slice as the query of a radiograph archive),
    else None. Reads the header only."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["Modality"])
        modality = str(ds.get("Modality", "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - the reader says what is wrong with a broken file
        return None
    kept = ws.manifest.get("modality_filter", sorted(DEFAULT_MODALITIES))
    if not modality or kept is None or modality in kept:
        return None
    return (f"{what} is a {modality} DICOM; this workspace holds {', '.join(kept)} images only (embed's "
            "modality filter), so its nearest images may mean little")


class Searcher:
    """Index + model + filter table of one workspace state, shared by threads.

    Each thread gets its own DuckDB cursor on one sandboxed connection. ``stale`` (and
    ``stale_reason``, the sentence to show) says the index does not hold exactly the current
    images: searches then miss the ones it lacks until ``curator index`` or ``embed`` updates it.
    """

    def __init__(self, ws: Workspace, device: str | None = None, checkpoint: Checkpoint | None = None,
                 load_model: bool = True, threads: int | None = None):
        self.ws = ws
        self.index, self.info = faiss_index.load_index(ws)
        self.finding_columns = sorted(ws.manifest.get("finding_columns", {}))
        self.checkpoint = checkpoint
        self.model_error: str | None = None
        if checkpoint is None and load_model:
            try:
                self.checkpoint = load_index_checkpoint(ws, device)
            except (WorkspaceError, OSError, ValueError) as exc:
                self.model_error = str(exc)
        self._con = connect(ws, threads=threads)
        cols = ", ".join(["image_id", *SEARCH_COLUMNS, *[f'"{c}"' for c in self.finding_columns]])
        # The filter table: a copy in memory, or, where the query cache holds `images` (large
        # workspaces; already sorted by image_id, on disk), a view of it.
        kind = "VIEW" if reads_query_cache(self._con) else "TABLE"
        order = "" if kind == "VIEW" else " ORDER BY image_id"
        self._con.execute(f"CREATE {kind} search_rows AS SELECT {cols} FROM images{order}")
        self.images = int(self._con.execute("SELECT count(*) FROM search_rows").fetchall()[0][0])
        # None, or what the index lacks and what to run (counts alone miss a changed file: one
        # image added, one superseded)
        self.stale_reason: str | None = faiss_index.index_staleness(ws, self.info, self.index, self._con)
        self.stale = self.stale_reason is not None
        if self.stale_reason:
            log.warning("%s", self.stale_reason)
        self._local = threading.local()
        self._encode_lock = threading.Lock()

    def cursor(self):
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._local.cursor = self._con.cursor()
        return cur

    # -- query vectors --------------------------------------------------------------------
    def _model(self) -> Checkpoint:
        if self.checkpoint is None:
            raise WorkspaceError(self.model_error or "no model loaded")
        return self.checkpoint

    def text_vector(self, text: str, contrast: str | None = None) -> np.ndarray:
        if not text or not text.strip():
            raise ValueError("the search text is empty")
        ck = self._model()
        with self._encode_lock:
            return text_query_vector(ck, text, contrast)

    def image_vector(self, data: bytes) -> np.ndarray:
        ck = self._model()
        with self._encode_lock:
            return image_vector_from_bytes(ck, data, query_read_options(self.ws))

    def vector_of(self, image_id: int) -> np.ndarray:
        """The image's stored embedding (the query of "more like this").

        An index with lossy codes (fp16, sq8, ivf-sq8, ivf-pq) reconstructs only an approximation,
        not of unit length, so the embedding comes from the Parquet parts then; exact indexes give
        it back as stored.
        """
        if self.info.index_type not in ("flat", "ivf-flat"):
            row = self.cursor().execute("SELECT embedding FROM embeddings_raw WHERE image_id = ? AND checkpoint = ? LIMIT 1",
                                        [int(image_id), self.info.checkpoint]).fetchall()
            if row:
                return np.asarray(row[0][0], dtype=np.float32)
        v = faiss_index.reconstruct(self.index, image_id)
        if v is None:
            raise WorkspaceError(f"image {image_id} is not in the index; run `curator index` to update it")
        return v

    # -- filtering and search -------------------------------------------------------------
    def filter_sql(self, flt: SearchFilter | None) -> str:
        return "true" if flt is None else flt.to_sql(self.finding_columns)

    def allowed_ids(self, flt: SearchFilter | None) -> np.ndarray | None:
        """Image ids passing ``flt`` (None when there is no filter)."""
        if flt is None or flt.is_empty():
            return None
        where = self.filter_sql(flt)
        got = self.cursor().execute(f"SELECT image_id FROM search_rows WHERE {where}").fetchnumpy()["image_id"]
        return np.asarray(got, dtype=np.int64)

    def count(self, flt: SearchFilter | None = None) -> int:
        return int(self.cursor().execute(f"SELECT count(*) FROM search_rows WHERE {self.filter_sql(flt)}").fetchall()[0][0])

    def search(self, vector: np.ndarray, k: int = 20, flt: SearchFilter | None = None, exclude=(), text: bool = False) -> pd.DataFrame:
        """Top-k images passing ``flt`` for a normalised query vector (``exclude``: ids to leave out;
        ``text``: the vector comes from the text tower, see :func:`search`).

        Columns: rank, image_id, similarity, the filter columns and every finding's probability.
        """
        allowed = self.allowed_ids(flt)
        exclude = {int(i) for i in exclude}
        extra = 0
        if exclude:
            if allowed is not None:
                allowed = allowed[~np.isin(allowed, list(exclude))]
            else:
                extra = len(exclude)
        sims, ids = faiss_index.search_vectors_filtered(self.index, vector, int(k) + extra, allowed, _nprobe(self.info, text))
        hit_ids, hit_sims = _ranked(ids[0], sims[0], exclude)
        hit_ids, hit_sims = hit_ids[: int(k)], hit_sims[: int(k)]
        cols = ["rank", "image_id", "similarity", *SEARCH_COLUMNS, *self.finding_columns]
        if not len(hit_ids):
            return pd.DataFrame(columns=cols)
        hit_df = pd.DataFrame({"rank": np.arange(1, len(hit_ids) + 1, dtype=np.int32), "image_id": hit_ids.astype(np.int64),
                               "similarity": hit_sims.astype(np.float64)})
        cur = self.cursor()
        cur.register("hit_df", hit_df)
        try:
            df = cur.execute("SELECT h.rank, h.image_id, h.similarity, r.* EXCLUDE (image_id) FROM hit_df h "
                             "JOIN search_rows r USING (image_id) ORDER BY h.rank").df()
        finally:
            cur.unregister("hit_df")
        return df

    def above(self, vector: np.ndarray, threshold: float, flt: SearchFilter | None = None) -> pd.DataFrame:
        """Every image passing ``flt`` whose similarity to ``vector`` is above ``threshold``, most
        similar first: a cohort defined by a text (or image) query. Same columns as :meth:`search`.

        Exact with respect to what the index stores, for every index type: the float16 copies
        where it keeps some (the default for 8-bit and PQ codes), else its vectors or codes (see
        :func:`curator.index.range_search`). Raises ValueError for a threshold that is not finite.
        """
        ids, sims = faiss_index.range_search(self.index, vector, threshold, self.allowed_ids(flt))
        cols = ["rank", "image_id", "similarity", *SEARCH_COLUMNS, *self.finding_columns]
        if len(ids) == 0:
            return pd.DataFrame(columns=cols)
        hit_df = pd.DataFrame({"rank": np.arange(1, len(ids) + 1, dtype=np.int64), "image_id": ids, "similarity": sims.astype(np.float64)})
        cur = self.cursor()
        cur.register("hit_df", hit_df)
        try:
            return cur.execute("SELECT h.rank, h.image_id, h.similarity, r.* EXCLUDE (image_id) FROM hit_df h "
                               "JOIN search_rows r USING (image_id) ORDER BY h.rank").df()
        finally:
            cur.unregister("hit_df")

    def details(self, image_id: int) -> dict | None:
        """All catalog fields and probabilities of one image (None when it is not catalogued)."""
        cur = self.cursor()
        row = cur.execute("SELECT * FROM catalog_raw WHERE image_id = ?", [int(image_id)]).df()
        if row.empty:
            return None
        out = row.iloc[0].to_dict()
        probs = cur.execute("SELECT * FROM search_rows WHERE image_id = ?", [int(image_id)]).df()
        if not probs.empty:
            out.update({c: probs.iloc[0][c] for c in self.finding_columns})
        return out
