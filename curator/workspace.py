"""The workspace: a folder of immutable Parquet parts and an atomically replaced manifest.

Layout::

    W/manifest.json        what is committed: parts per dataset, checkpoints, prompt sets
    W/catalog/*.parquet    one row per image (version of a file)
    W/embeddings/*.parquet image_id, checkpoint, normalised vector
    W/predictions/*.parquet image_id, prompt_set, member, one float column per finding
    W/errors/*.parquet     files that could not be used, with the reason
    W/runs/*.parquet       one row per run
    W/index/               FAISS index files and what built them
    W/cache/images.duckdb  optional: the ``images`` view materialised (curator.query_cache)

A part is written to a temporary name, flushed and renamed; it becomes visible only when the
manifest that lists it replaces the old one (``os.replace``), so a reader sees the old or the new
state and never half a write. Parts that no manifest lists (left by a killed run) are removed by
the next writer. One writer at a time holds ``W/.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curator import faults

FORMAT_VERSION = 1
DATASETS = ("catalog", "embeddings", "predictions", "errors", "runs", "superseded")
MANIFEST = "manifest.json"
TRASH = ".trash"

# Writer-lock descriptors this process holds. A forked child (a DataLoader decode worker) shares the
# lock's open file description, so a worker orphaned by a killed run would keep the workspace
# locked until it noticed; children close their copies at once, and the lock dies with the writer.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)

# Catalog columns filled from DICOM headers (None for PNG/JPEG).
DICOM_COLUMNS: dict[str, pa.DataType] = {
    "patient_id": pa.string(),
    "study_instance_uid": pa.string(),
    "series_instance_uid": pa.string(),
    "sop_instance_uid": pa.string(),
    "sop_class_uid": pa.string(),
    "modality": pa.string(),
    "view_position": pa.string(),
    "laterality": pa.string(),
    "study_date": pa.date32(),
    "study_time": pa.string(),
    "patient_age": pa.int32(),
    "patient_sex": pa.string(),
    "manufacturer": pa.string(),
    "manufacturer_model": pa.string(),
    "institution_name": pa.string(),
    "body_part_examined": pa.string(),
    "rows": pa.int32(),
    "columns": pa.int32(),
    "bits_allocated": pa.int32(),
    "bits_stored": pa.int32(),
    "photometric_interpretation": pa.string(),
    "transfer_syntax_uid": pa.string(),
    "number_of_frames": pa.int32(),
    "frame_used": pa.int32(),
}

CATALOG_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("path", pa.string()),
        ("file_format", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("content_hash", pa.string()),
        ("conversion", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("run_id", pa.string()),
        ("added_at", pa.timestamp("us", tz="UTC")),
        ("thumbnail", pa.string()),
        *DICOM_COLUMNS.items(),
    ]
)

EMBEDDINGS_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("checkpoint", pa.string()), ("embedding", pa.list_(pa.float32()))]
)

ERRORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),
        ("kind", pa.string()),
        ("error", pa.string()),
        ("exception", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("run_id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("command", pa.string()),
        ("status", pa.string()),
        ("started", pa.timestamp("us", tz="UTC")),
        ("finished", pa.timestamp("us", tz="UTC")),
        ("code_version", pa.string()),
        ("checkpoints", pa.string()),  # JSON list of {"sha256", "path"}
        ("prompt_sets", pa.string()),  # JSON list of prompt-set ids
        ("counts", pa.string()),  # JSON object
        ("timings", pa.string()),  # JSON object
        ("options", pa.string()),  # JSON object
    ]
)

# Catalog rows replaced by a newer version of the same file (the file changed and was embedded
# again): the `catalog` view leaves them out with a cheap anti-join instead of ranking every row.
SUPERSEDED_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("path", pa.string()), ("superseded_by", pa.int64()), ("run_id", pa.string())]
)

PREDICTION_KEY_SCHEMA = pa.schema([("image_id", pa.int64()), ("prompt_set", pa.string()), ("member", pa.string())])


def predictions_schema(columns: list[str]) -> pa.Schema:
    return pa.schema([*PREDICTION_KEY_SCHEMA, *[(c, pa.float32()) for c in columns]])


SCHEMAS = {"catalog": CATALOG_SCHEMA, "embeddings": EMBEDDINGS_SCHEMA, "errors": ERRORS_SCHEMA, "runs": RUNS_SCHEMA, "superseded": SUPERSEDED_SCHEMA}


class WorkspaceError(RuntimeError):
    pass


def _empty_manifest() -> dict:
    return {
        "format": FORMAT_VERSION,
        "next_image_id": 1,
        "parts": {d: [] for d in DATASETS},
        "checkpoints": {},  # sha256 -> {"path", "embed_dim", "added"}
        "ensemble": [],  # sha256 of the checkpoints every image is embedded with, in order
        "prompt_sets": {},  # id -> prompt set dict + {"columns", "labelled_at"}
        "finding_columns": {},  # column -> prompt-set id whose probabilities the images view shows
        # how the current version of each file is found: "superseded" = every replaced catalog row
        # is listed in the superseded dataset (workspaces from before have no key: newest per path)
        "catalog_versions": "superseded",
        "generation": 0,
    }


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    atomic_write(path, lambda f: f.write(data), fault="manifest-tmp")


def atomic_write(path: Path, write: Callable[[BinaryIO], object], fault: str | None = None) -> None:
    """Call ``write`` on a temporary file beside ``path``, sync it and rename it into place (the
    temporary file is removed when anything fails): readers see the old file or the whole new one.
    ``fault``: a :mod:`curator.faults` point reached before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            faults.reached(fault)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@dataclass
class Part:
    dataset: str
    file: str  # relative to the workspace root
    rows: int
    extra: dict

    def entry(self) -> dict:
        return {"file": self.file, "rows": self.rows, **self.extra}


class Workspace:
    """A workspace folder. Reading needs nothing; writing needs :meth:`writer` (the lock)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.manifest = self._read_manifest()

    # -- reading -----------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.root / MANIFEST).is_file()

    def _read_manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            return _empty_manifest()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WorkspaceError(f"{path}: unreadable manifest ({exc})") from None
        if data.get("format") != FORMAT_VERSION:
            raise WorkspaceError(f"{path}: workspace format {data.get('format')!r}, this curator reads {FORMAT_VERSION}")
        for d in DATASETS:  # datasets added since the workspace was made start empty
            data.setdefault("parts", {}).setdefault(d, [])
        return data

    def reload(self) -> None:
        self.manifest = self._read_manifest()

    def part_entries(self, dataset: str) -> list[dict]:
        return list(self.manifest["parts"][dataset])

    def part_paths(self, dataset: str, **match) -> list[Path]:
        out = []
        for e in self.manifest["parts"][dataset]:
            if all(e.get(k) == v for k, v in match.items()):
                out.append(self.root / e["file"])
        return out

    def row_count(self, dataset: str) -> int:
        return sum(e["rows"] for e in self.manifest["parts"][dataset])

    def read_table(self, dataset: str, columns: list[str] | None = None, **match) -> pa.Table:
        paths = self.part_paths(dataset, **match)
        if not paths:
            schema = SCHEMAS.get(dataset)
            if schema is None:
                return pa.table({})
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        tables = [pq.read_table(p, columns=columns) for p in paths]
        return pa.concat_tables(tables, promote_options="default")

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self) -> Iterator["Workspace"]:
        """Hold the workspace's writer lock; create the folder layout; clean orphans."""
        # A new workspace is private to its owner (0700): its catalog names patients' files and
        # folders. Share it deliberately (chmod g+rx) with who may see them.
        try:
            self.root.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            if not self.root.is_dir():  # (a file of that name: "exists and is not a folder")
                raise
        lock_path = self.root / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceError(f"{self.root}: another curator run is writing this workspace") from None
            _HELD_LOCK_FDS.add(fd)
            for d in (*DATASETS, "index"):
                (self.root / d).mkdir(exist_ok=True)
            self.reload()
            # No empty manifest is published here: a workspace appears with its first real
            # commit (embed's records its checkpoints and prompt set), so a reader never sees a
            # workspace without the columns of its default prompt set.
            self.remove_orphans()
            yield self
        finally:
            _HELD_LOCK_FDS.discard(fd)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def writer_active(self) -> bool:
        """Whether a writer (a live curator run, in this process or another) holds ``W/.lock`` now.

        Tested the lock's own way: a shared ``flock`` asked for without waiting, released at once
        (a run starting in that instant is refused as if another run were writing). The lock
        file is not created (a reader may not be allowed to); without it, or unreadable, no
        writer is known."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                return False
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def orphans(self) -> list[Path]:
        """Files in the dataset folders that no committed manifest lists (temporary or killed runs)."""
        listed = {e["file"] for d in DATASETS for e in self.manifest["parts"][d]}
        out = []
        for d in DATASETS:
            folder = self.root / d
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                rel = f"{d}/{p.name}"
                if p.is_file() and rel not in listed:
                    out.append(p)
        for p in self.root.glob(".*.tmp"):
            out.append(p)
        index_dir = self.root / "index"
        if index_dir.is_dir():
            out += [p for p in index_dir.glob(".*.tmp")]
        cache_dir = self.root / "cache"  # curator.query_cache: a killed build's file and spill
        if cache_dir.is_dir():
            out += [p for p in cache_dir.glob(".*.tmp*") if p.is_file()]
            out += [p for p in cache_dir.glob("spill/*") if p.is_file()]
        return out

    def remove_orphans(self, trash_age_s: float = 600.0) -> int:
        """Delete unlisted part files and temporary files, and trash older than ``trash_age_s``."""
        n = 0
        for p in self.orphans():
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        trash = self.root / TRASH
        if trash.is_dir():
            now = time.time()
            for p in trash.iterdir():
                with contextlib.suppress(OSError, ValueError):
                    if now - int(p.name.split("-", 1)[0]) > trash_age_s:
                        p.unlink()
        return n

    def write_part(self, dataset: str, table: pa.Table, row_group_size: int | None = None, **extra) -> Part:
        """Write ``table`` as a new part file (not yet committed).

        ``row_group_size``: rows per Parquet row group (predictions use one per ensemble member,
        so a query for one member skips the others' row groups by their statistics).
        """
        if dataset not in DATASETS:
            raise ValueError(dataset)
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
        folder = self.root / dataset
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / name
        tmp = folder / f".{name}.tmp"
        try:
            pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size or None)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            faults.reached("part")
        except BaseException as exc:
            # (interrupted, even after the rename: the caller never learns the part's name, so
            # neither file is left behind; the name is new, nothing else can be at it)
            for p in (tmp, final):
                with contextlib.suppress(OSError):
                    p.unlink()
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise WorkspaceError(
                    f"{self.root}: disk full while writing a {dataset} part; nothing half-written was kept. "
                    "Free some space and rerun: the run resumes where its last commit ended."
                ) from None
            raise
        return Part(dataset=dataset, file=f"{dataset}/{name}", rows=table.num_rows, extra=extra)

    def commit(self, add: list[Part] = (), remove: list[str] = (), **updates) -> None:
        """Atomically publish ``add`` parts (and drop ``remove`` files) with manifest ``updates``."""
        m = json.loads(json.dumps(self.manifest))
        gone = set(remove)
        for d in DATASETS:
            m["parts"][d] = [e for e in m["parts"][d] if e["file"] not in gone]
        for part in add:
            m["parts"][part.dataset].append(part.entry())
        for k, v in updates.items():
            m[k] = v
        m["generation"] = int(m.get("generation", 0)) + 1
        # The parts' renames reach the disk before the manifest that lists them (after a power
        # loss a manifest must not name a part whose directory entry was lost).
        for folder in sorted({part.dataset for part in add}):
            _fsync_dir(self.root / folder)
        try:
            atomic_write_bytes(self.root / MANIFEST, json.dumps(m, indent=1, sort_keys=True).encode())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise WorkspaceError(
                    f"{self.root}: disk full while committing; the workspace keeps its previous state. "
                    "Free some space and rerun."
                ) from None
            raise
        self.manifest = m
        faults.reached("commit")
        # Replaced parts may still be read by someone holding the previous manifest: they go to
        # the trash and are deleted by a later writer once they are old.
        for rel in gone:
            src = self.root / rel
            with contextlib.suppress(OSError):
                trash = self.root / TRASH
                trash.mkdir(exist_ok=True)
                os.replace(src, trash / f"{int(time.time())}-{src.name}")


def open_workspace(ws: "Workspace | str | Path") -> Workspace:
    """An existing workspace (a :class:`Workspace` or its folder), or a one-line WorkspaceError."""
    if not isinstance(ws, Workspace):
        ws = Workspace(ws)
    if not ws.exists:
        raise WorkspaceError(f"{ws.root}: not a curator workspace (no manifest.json); run `curator embed ... --workspace {ws.root}` first")
    return ws
