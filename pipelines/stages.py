"""The stages of the embed job: reader, mapper, writer. Engine-agnostic."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from curator import device_jpeg, preprocess, zeroshot
from curator.constants import ENSEMBLE_MEMBER
from curator.discover import FileEntry
from curator.model import Checkpoint
from curator.prompts import PromptSet
from curator.readers import DecodeTimeout, ReadError, ReadOptions, read_image, time_limit, unreadable
from curator.workspace import CATALOG_SCHEMA, DICOM_COLUMNS, EMBEDDINGS_SCHEMA, ERRORS_SCHEMA, SUPERSEDED_SCHEMA, Part, Workspace, predictions_schema

from .known import RESOLVED_STAGE

log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---------------------------------------------------------------------------------------------
# reader: one file -> a preprocessed tensor and its catalog row, or an error row
# ---------------------------------------------------------------------------------------------
def read_item(entry: FileEntry, options: ReadOptions, cfg: preprocess.PreprocessCfg = preprocess.DEFAULT_CFG) -> dict:
    """Read, convert and preprocess one file. Never raises: failures come back as error items."""
    t0 = time.perf_counter()
    try:
        with time_limit(options.decode_timeout_s):
            try:
                with open(entry.path, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, IsADirectoryError):
                raise
            except OSError as exc:  # no permission, an I/O error: the machine's, not the file's
                raise unreadable(exc) from None
            content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
            kept = False  # a JPEG --gpu-jpeg could take, decoded here as its share of the reader workers
            if options.jpeg_on_device and entry.path not in options.device_skip and (size := device_jpeg.deferrable(data)) is not None:
                if not kept_by_workers(entry.path, options.device_share):
                    return _deferred_item(entry, data, content_hash, *size, t0)
                kept = True
            result = read_image(entry.path, options, data=data)
            if options.letterbox_on_device and result.image.mode == "L" and device_jpeg.letterbox_fits(*result.image.size, cfg.canvas_size):
                tensor = None  # letterboxed beside the model (collate joins the pixels)
            else:
                tensor = preprocess.model_input(result.image, cfg)
        w, h = result.image.size
        if "+dct/" in result.conversion or "+j2k/" in result.conversion:  # decoded reduced: record the file's own size
            w, h = result.meta["columns"], result.meta["rows"]
        row = {
            "path": entry.path,
            "file_format": result.file_format,
            "size": entry.size,
            "mtime_ns": entry.mtime_ns,
            "content_hash": content_hash,
            "conversion": result.conversion,
            "width": w,
            "height": h,
            **{k: result.meta.get(k) for k in DICOM_COLUMNS},
        }
        if tensor is None:
            return {"ok": True, "image": np.asarray(result.image), "row": row, "seconds": time.perf_counter() - t0, "kept": kept}
        return {"ok": True, "tensor": tensor, "row": row, "seconds": time.perf_counter() - t0, "kept": kept}
    except ReadError as exc:
        return _error_item(entry, exc.stage, exc.kind, str(exc), "ReadError")
    except DecodeTimeout as exc:
        return _error_item(entry, "read", "timeout", str(exc), "DecodeTimeout")
    except MemoryError:
        return _error_item(entry, "read", "out_of_memory", "ran out of memory decoding this file", "MemoryError")
    except FileNotFoundError:
        return _error_item(entry, "read", "vanished", "file disappeared before it could be read", "FileNotFoundError")
    except IsADirectoryError:
        return _error_item(entry, "read", "not_a_file", "is a directory", "IsADirectoryError")
    except Exception as exc:  # a decoder bug must not take the run down
        log.debug("unexpected error reading %s:\n%s", entry.path, traceback.format_exc())
        return _error_item(entry, "read", "unexpected", f"{type(exc).__name__}: {exc}", type(exc).__name__)


def kept_by_workers(path: str, share) -> bool:
    """Whether the reader workers decode this grayscale JPEG themselves instead of handing it to the
    device: a fixed pseudo-random draw from the path (CRC-32), below the current ``share.value``."""
    if share is None or share.value <= 0:
        return False
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) < share.value * 2**32


@dataclass(frozen=True)
class FixedShare:
    """A fixed workers' share of --gpu-jpeg's JPEGs (``.value``, as :func:`kept_by_workers` reads
    it), for processes a shared float cannot reach (the Ray engine's reader tasks)."""

    value: float


def _deferred_item(entry: FileEntry, data: bytes, content_hash: str, width: int, height: int, t0: float) -> dict:
    """A grayscale JPEG handed over undecoded (``jpeg_on_device``): its bytes (a read-only view,
    copied once, by :func:`collate`, into the tensor that goes to the main process)."""
    row = {"path": entry.path, "file_format": "jpeg", "size": entry.size, "mtime_ns": entry.mtime_ns, "content_hash": content_hash,
           "conversion": None, "width": width, "height": height, **{k: None for k in DICOM_COLUMNS}, "rows": height, "columns": width}
    return {"ok": True, "jpeg": np.frombuffer(data, np.uint8), "row": row, "seconds": time.perf_counter() - t0}


def _error_item(entry: FileEntry, stage: str, kind: str, message: str, exception: str) -> dict:
    return {
        "ok": False,
        "error": {
            "path": entry.path,
            "stage": stage,
            "kind": kind,
            "error": message.splitlines()[0][:500] if message else kind,
            "exception": exception,
            "size": entry.size,
            "mtime_ns": entry.mtime_ns,
        },
    }


def collate(items: list[dict]) -> dict:
    """Batch reader items: stack the good tensors, keep rows and errors as lists.

    ``rows`` holds the rows of ``tensors`` first; then those of the grayscale images handed over
    before their letterbox (``letterbox_on_device``), whose pixels are joined in ``image_pixels``
    and cut by ``image_shapes``; then those of the files handed over undecoded
    (``jpeg_on_device``), whose contents are joined in ``jpeg_bytes`` and cut by ``jpeg_sizes``
    (one shared-memory transfer from a worker each, not one per file).
    """
    good = [it for it in items if it["ok"] and "tensor" in it]
    images = [it for it in items if it["ok"] and "image" in it]
    deferred = [it for it in items if it["ok"] and "jpeg" in it]
    return {
        "tensors": torch.stack([it["tensor"] for it in good]) if good else None,
        "rows": [it["row"] for it in good] + [it["row"] for it in images] + [it["row"] for it in deferred],
        "image_pixels": torch.from_numpy(np.concatenate([it["image"].ravel() for it in images])) if images else None,
        "image_shapes": [it["image"].shape for it in images],
        "jpeg_bytes": torch.from_numpy(np.concatenate([it["jpeg"] for it in deferred])) if deferred else None,
        "jpeg_sizes": [len(it["jpeg"]) for it in deferred],
        "errors": [it["error"] for it in items if not it["ok"]],
        "kept": sum(1 for it in items if it.get("kept")),  # JPEGs decoded here as the workers' share (kept_by_workers)
    }


# ---------------------------------------------------------------------------------------------
# mapper: a batch of tensors -> embeddings per checkpoint and probabilities per prompt set
# ---------------------------------------------------------------------------------------------
class Mapper:
    """Holds the checkpoints and the text weights of every prompt set to score.

    With ``devices`` (more than one), each checkpoint gets a replica per device and every batch is
    split into one shard per replica, run concurrently (PyTorch releases the GIL in its kernels);
    shards come back in order, so the output equals the single-device one.
    """

    def __init__(self, checkpoints: list[Checkpoint], prompt_sets: list[PromptSet], devices: list[torch.device] | None = None):
        self.checkpoints = checkpoints
        self.prompt_sets = prompt_sets
        self.weights = {
            (ck.sha256, ps.id): zeroshot.prompt_weights(ck.encode_texts, ps) for ck in checkpoints for ps in prompt_sets
        }
        extra = list(devices or [])[1:]
        self.replicas = {ck.sha256: [ck, *(ck.replicate(d) for d in extra)] for ck in checkpoints}
        self._pool = None
        if extra:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=len(extra) + 1, thread_name_prefix="replica")
            log.info("model replicas on %s", ", ".join(str(c.device) for c in self.replicas[checkpoints[0].sha256]))

    def encode(self, ck: Checkpoint, tensors: torch.Tensor) -> np.ndarray:
        """Embeddings of a batch, sharded over the checkpoint's replicas."""
        reps = self.replicas.get(ck.sha256, [ck])
        if len(reps) == 1 or len(tensors) < 2:
            return self._encode_one(ck, tensors)
        shards = [s for s in torch.tensor_split(tensors, min(len(reps), len(tensors))) if len(s)]
        return np.concatenate(list(self._pool.map(self._encode_one, reps[: len(shards)], shards)))

    def _encode_one(self, ck: Checkpoint, tensors: torch.Tensor) -> np.ndarray:
        """Embeddings of a batch; on GPU out-of-memory the batch is split in halves and retried."""
        try:
            return ck.encode_images(tensors).numpy()
        except torch.cuda.OutOfMemoryError:
            if len(tensors) <= 1:
                raise
            if ck.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(tensors) // 2
            log.warning("out of GPU memory on a batch of %d images; splitting it into %d + %d (lower --batch-size)", len(tensors), half, len(tensors) - half)
            return np.concatenate([self._encode_one(ck, tensors[:half]), self._encode_one(ck, tensors[half:])])

    def __call__(self, tensors: torch.Tensor) -> dict:
        embeddings = {ck.sha256: self.encode(ck, tensors) for ck in self.checkpoints}
        probs: dict[str, dict[str, np.ndarray]] = {}
        for ps in self.prompt_sets:
            members = {}
            for ck in self.checkpoints:
                pos, neg = self.weights[(ck.sha256, ps.id)]
                members[ck.sha256] = zeroshot.softmax_probabilities(embeddings[ck.sha256], pos, neg)
            members[ENSEMBLE_MEMBER] = zeroshot.ensemble(list(members.values()))
            probs[ps.id] = members
        return {"embeddings": embeddings, "probabilities": probs}


# ---------------------------------------------------------------------------------------------
# writer: rows -> parts -> one atomic commit per flush
# ---------------------------------------------------------------------------------------------
@dataclass
class WriterStats:
    processed: int = 0
    failed: Counter = field(default_factory=Counter)  # kind -> count
    filtered: Counter = field(default_factory=Counter)
    parts: int = 0
    retired: int = 0  # catalog rows of changed files that now fail: no successor


class WorkspaceWriter:
    """Accumulates catalog, embedding, prediction and error rows; commits them together.

    Image ids are assigned at commit time from the manifest's counter, so ids are unique and a
    killed run (whose uncommitted rows are lost) leaves no gap that a rerun could collide with.
    """

    def __init__(self, ws: Workspace, run_id: str, prompt_sets: list[PromptSet], checkpoints: list[str], flush_rows: int = 4096):
        self.ws = ws
        self.run_id = run_id
        self.prompt_sets = prompt_sets
        self.checkpoints = checkpoints
        self.flush_rows = flush_rows
        self.stats = WriterStats()
        self._rows: list[dict] = []
        self._emb: dict[str, list[np.ndarray]] = {c: [] for c in checkpoints}
        self._probs: dict[str, dict[str, list[np.ndarray]]] = {
            ps.id: {m: [] for m in [*checkpoints, ENSEMBLE_MEMBER]} for ps in prompt_sets
        }
        self._errors: list[dict] = []
        # path -> image_id of the catalog row a changed file's new row replaces (set by the caller)
        self.previous: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._rows) + len(self._errors)

    def add(self, rows: list[dict], mapped: dict | None, errors: list[dict]) -> None:
        with _signals_deferred():  # (Ctrl-C / SIGTERM between these appends would leave rows without their vectors)
            if rows:
                self._rows.extend(rows)
                for c in self.checkpoints:
                    self._emb[c].append(mapped["embeddings"][c])
                for ps in self.prompt_sets:
                    for m, arr in mapped["probabilities"][ps.id].items():
                        self._probs[ps.id][m].append(arr)
            self._errors.extend(errors)
        for e in errors:
            if e["stage"] == "filter":
                self.stats.filtered[e["kind"]] += 1
            elif e["stage"] != RESOLVED_STAGE:  # (pipelines.prune.settled_errors: closes an earlier error)
                self.stats.failed[e["kind"]] += 1
        if self.pending >= self.flush_rows:
            self.flush()

    def _take(self) -> tuple:
        """The buffered rows, taken out of the writer (which is left empty)."""
        taken = (self._rows, self._errors, self._emb, self._probs)
        self._rows, self._errors = [], []
        self._emb = {c: [] for c in self.checkpoints}
        self._probs = {ps.id: {m: [] for m in [*self.checkpoints, ENSEMBLE_MEMBER]} for ps in self.prompt_sets}
        return taken

    def _put_back(self, taken: tuple, popped: dict[str, int]) -> None:
        """Rows taken by a flush whose commit did not land: buffered again, ahead of any added since."""
        rows, errors, emb, probs = taken
        self._rows[:0] = rows
        self._errors[:0] = errors
        for c in self.checkpoints:
            self._emb[c][:0] = emb[c]
        for ps in self.prompt_sets:
            for m, v in probs[ps.id].items():
                self._probs[ps.id][m][:0] = v
        self.previous.update(popped)

    def _landed(self, parts: list[Part]) -> bool | None:
        """Whether the manifest on disk lists ``parts`` (a commit interrupted after its manifest was
        renamed into place landed, whether or not the workspace object saw it); the workspace
        object is brought up to it. None: the manifest cannot be read now, so it is not known."""
        try:
            on_disk = self.ws._read_manifest()
        except Exception:  # noqa: BLE001 - unknown: the caller neither deletes nor puts back
            return None
        self.ws.manifest = on_disk
        listed = {e["file"] for d in on_disk["parts"].values() for e in d}
        return bool(parts) and all(p.file in listed for p in parts)

    def flush(self) -> None:
        """Commit the buffered rows as one set of parts. Safe to call again after it was
        interrupted (Ctrl-C, SIGTERM) or failed anywhere: the rows are taken out of the buffers
        before anything is written, and put back only if the commit did not land (its manifest
        does not list the parts), so a second flush never commits them twice nor loses them."""
        if not self.pending:
            return
        with _signals_deferred():
            taken = self._take()
        rows, errors, emb, probs = taken
        popped: dict[str, int] = {}  # entries of self.previous this flush used
        parts: list[Part] = []  # written so far
        retired: list[str] = []  # paths whose catalog rows this flush retires
        try:
            self._write(rows, errors, emb, probs, popped, parts, retired)
        except BaseException:
            landed = self._landed(parts)
            if landed is False:
                with _signals_deferred():
                    self._put_back(taken, popped)
                # the parts it wrote, also one renamed into place just before the interrupt (not
                # in ``parts`` yet): files no manifest lists, removed as a writer's start removes
                # them (this run holds the lock: nobody else writes or reads them)
                with contextlib.suppress(OSError):
                    self.ws.remove_orphans()
            elif landed:
                self._count(len(rows), len(parts), len(retired))  # (interrupted after its manifest was in place)
            raise
        self._count(len(rows), len(parts), len(retired))

    def _count(self, n: int, parts: int, retired: int) -> None:
        self.stats.processed += n
        self.stats.parts += parts
        self.stats.retired += retired

    def _write(self, rows: list[dict], errors: list[dict], emb: dict, probs: dict, popped: dict[str, int], parts: list[Part],
               retired_paths: list[str]) -> None:
        """Write the parts of these rows and commit them: ``parts`` gets each part written,
        ``popped`` the entries of ``self.previous`` used, ``retired_paths`` the paths of the
        catalog rows retired."""
        now = utcnow()
        next_id = int(self.ws.manifest["next_image_id"])
        n = len(rows)
        if n:
            ids = np.arange(next_id, next_id + n, dtype=np.int64)
            cols = {name: [r.get(name) for r in rows] for name in CATALOG_SCHEMA.names if name not in ("image_id", "run_id", "added_at", "thumbnail")}
            cols.update(image_id=ids, run_id=[self.run_id] * n, added_at=[now] * n, thumbnail=[None] * n)
            catalog = pa.table({name: cols[name] for name in CATALOG_SCHEMA.names}, schema=CATALOG_SCHEMA)
            parts.append(self.ws.write_part("catalog", catalog))
            emb_tables = []
            for c in self.checkpoints:
                mat = np.concatenate(emb[c]).astype(np.float32)
                emb_tables.append(embeddings_table(ids, c, mat))
            parts.append(self.ws.write_part("embeddings", pa.concat_tables(emb_tables)))
            for ps in self.prompt_sets:
                members = {m: np.concatenate(v) for m, v in probs[ps.id].items()}
                parts.append(self.ws.write_part("predictions", predictions_table(ids, ps, members), row_group_size=n, prompt_set=ps.id))

        def pop(path: str) -> int:
            popped[path] = self.previous.pop(path)
            return popped[path]

        replaced = [(pop(r["path"]), r["path"], int(i)) for r, i in zip(rows, ids) if r["path"] in self.previous] if n else []
        # A catalogued file that changed and now fails (or is filtered out): its old row describes
        # content that no longer exists, so it is retired too, with no successor (superseded_by null).
        retired = [(pop(e["path"]), e["path"], None) for e in errors if e["path"] in self.previous]
        retired_paths += [p for _, p, _ in retired]
        if replaced or retired:
            old, paths, new = zip(*(replaced + retired))
            table = pa.table({"image_id": list(old), "path": list(paths), "superseded_by": list(new), "run_id": [self.run_id] * len(old)},
                             schema=SUPERSEDED_SCHEMA)
            parts.append(self.ws.write_part("superseded", table))
        if errors:
            errs = [{**e, "run_id": self.run_id, "time": now} for e in errors]
            table = pa.Table.from_pylist(errs, schema=ERRORS_SCHEMA)
            parts.append(self.ws.write_part("errors", table))
        self.ws.commit(add=parts, next_image_id=next_id + n)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM that arrive during the block take effect as it ends: for the few steps
    that must happen together. Their handlers are swapped for one that notes them (blocking the
    signals would not do: another thread may take one, and Python runs the handler in the main
    thread all the same). Main thread only (handlers are set there); elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(noted):
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)


def embeddings_table(ids: np.ndarray, checkpoint: str, mat: np.ndarray) -> pa.Table:
    n, d = mat.shape
    values = pa.array(mat.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, values)
    return pa.table({"image_id": pa.array(ids, pa.int64()), "checkpoint": pa.array([checkpoint] * n, pa.string()), "embedding": lists}, schema=EMBEDDINGS_SCHEMA)


def predictions_table(ids: np.ndarray, ps: PromptSet, members: dict[str, np.ndarray]) -> pa.Table:
    """Long over members, wide over findings: one row per (image, member)."""
    n = len(ids)
    cols: dict[str, list] = {"image_id": [], "prompt_set": [], "member": []}
    mats = []
    for m, arr in members.items():
        cols["image_id"].append(ids)
        cols["member"].append(np.array([m] * n, dtype=object))
        mats.append(np.asarray(arr, dtype=np.float32).reshape(n, len(ps.findings)))
    mat = np.concatenate(mats) if mats else np.zeros((0, len(ps.findings)), np.float32)
    data = {
        "image_id": np.concatenate(cols["image_id"]),
        "prompt_set": [ps.id] * len(mat),
        "member": np.concatenate(cols["member"]).tolist(),
    }
    for j, c in enumerate(ps.columns):
        data[c] = mat[:, j]
    return pa.table(data, schema=predictions_schema(ps.columns))


def run_record(run_id: str, command: str, status: str, started: dt.datetime, checkpoints: list[dict], prompt_sets: list[str], counts: dict, timings: dict, options: dict) -> pa.Table:
    from curator import __version__
    from curator.workspace import RUNS_SCHEMA

    row = {
        "run_id": run_id,
        "command": command,
        "status": status,
        "started": started,
        "finished": utcnow(),
        "code_version": __version__,
        "checkpoints": json.dumps(checkpoints),
        "prompt_sets": json.dumps(prompt_sets),
        "counts": json.dumps(counts),
        "timings": json.dumps(timings),
        "options": json.dumps(options, default=str),
    }
    return pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
