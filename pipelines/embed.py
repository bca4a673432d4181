"""The embed job: archive -> catalog, embeddings, predictions, errors, run record.

Local engine: a torch DataLoader whose worker processes read and preprocess files (the usual
bottleneck), feeding batches to the checkpoints in the main process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from curator import device_jpeg, faults, query_cache
from curator.discover import FileEntry, WalkReport, walk
from curator.forking import parent_objects_frozen
from curator.model import Checkpoint, load_checkpoints, resolve_devices
from curator.preprocess import DEFAULT_CFG, PreprocessCfg, model_input
from curator.prompts import PromptSet, default_prompt_set
from curator.readers import RASTER_CONVERSION, ReadOptions
from curator.workspace import Workspace, WorkspaceError

from .known import KnownFiles, path_keys
from .prune import catalogued_outside_modalities, catalogued_under, prune, settled_errors
from .stages import FixedShare, Mapper, WorkspaceWriter, _error_item, collate, read_item, run_record, utcnow

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    archives: list[str]
    workspace: str
    checkpoints: list[str]
    device: str | None = None
    batch_size: int = 32
    workers: int | None = None  # None: one per core, at most 8
    threads: int | None = None  # torch threads in the main process; None: torch's default
    read_options: ReadOptions = field(default_factory=ReadOptions)
    preprocess: PreprocessCfg = DEFAULT_CFG
    flush_rows: int = 4096
    progress: bool = True
    limit: int | None = None  # process at most this many new files (for trials)
    chunk_files: int | None = None  # files discovered per chunk; None: 100k (local), 1M (ray)
    engine: str = "local"  # "local" (DataLoader workers) or "ray" (Ray Data)
    ray_address: str | None = None  # Ray cluster to join; None: the running one or a new local one
    prune: bool = False  # retire the rows of catalogued files the walk no longer finds (pipelines/prune.py)
    prune_force: bool = False  # ... even where more than half of a folder's files are gone
    retry_errors: bool = False  # read again the files that failed before (else: only TRANSIENT_KINDS' failures)
    # --gpu-jpeg / --gpu-letterbox: run batch n+1's device stage beside batch n's model and writes
    # (local_mapped_batches); None: on when the model is on a CUDA device (on the CPU both compete
    # for the same cores). Results are the same either way.
    overlap: bool | None = None
    # --gpu-jpeg: share of the grayscale JPEGs the reader workers decode themselves (the exact
    # path, or in the DCT domain with --fast-jpeg) beside the device: a number in [0, 1] (fixed),
    # "auto" (adapted during the run: WorkerShare), or None: "auto" when the model is on a CUDA
    # device, 0 otherwise. With "auto", which files each side decodes depends on timing, so two
    # runs can differ where nvJPEG's pixels differ from libjpeg-turbo's (a grey level at most,
    # seen on none of the H200's test films), and, with --fast-jpeg, wherever a file goes to the
    # other side (reduced or full decode).
    worker_jpeg_share: float | str | None = None
    # --amp: the model in fp16 autocast on CUDA (faster; probabilities move by up to ~5e-5, not
    # CheXzero-exact). Off (default): float32, TF32 off, as on the CPU.
    amp: bool = False


@dataclass
class EmbedSummary:
    run_id: str
    discovered: int = 0
    unreadable: int = 0  # entries the walk could not take as files (broken links, undecodable names, ...)
    unchanged: int = 0
    known_errors: int = 0
    processed: int = 0
    failed: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)
    retired: int = 0  # catalogued files that changed and now fail: their old rows left the catalog
    pruned: int = 0  # catalogued files gone from the archive (--prune): their rows left the catalog
    not_found: int = 0  # catalogued files under the archives that the walk did not meet (deleted, moved, unlisted)
    settled: int = 0  # earlier errors closed: paths the walk met again without an error, failed files gone (--prune)
    prune_refused: list = field(default_factory=list)  # (folder, gone, catalogued) not pruned
    prune_ran: bool = False  # --prune was given (and the walk completed)
    device_decoded: int = 0  # --gpu-jpeg: JPEGs decoded on the model's device
    device_rejected: int = 0  # ... handed to it but read on the CPU (decoder rejected, wrong size, out of memory)
    worker_decoded: int = 0  # ... decoded by the reader workers instead, as their share beside the device
    worker_share: float | None = None  # that share at the end of the run
    device_letterboxed: int = 0  # --gpu-letterbox: images letterboxed on the model's device
    seconds: float = 0.0
    device: str = ""

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"run {self.run_id} on {self.device}: {self.discovered} files found"
            + (f", plus {self.unreadable} unreadable {'entry' if self.unreadable == 1 else 'entries'} (broken links, undecodable "
               f"names, special files; under failed or known bad)" if self.unreadable else ""),
            f"  embedded:            {self.processed} ({self.images_per_second:.1f} images/s)",
            f"  skipped (unchanged): {self.unchanged}",
            f"  skipped (known bad): {self.known_errors}",
            f"  failed:              {sum(self.failed.values())}",
        ]
        out += [f"    {k}: {v}" for k, v in sorted(self.failed.items())]
        out.append(f"  filtered out:        {sum(self.filtered.values())}")
        out += [f"    {k}: {v}" for k, v in sorted(self.filtered.items())]
        if self.retired:
            out.append(f"  of the failed or filtered, {self.retired} were catalogued before and changed: their old rows left the catalog")
        if self.pruned or self.prune_refused:
            out.append(f"  pruned (gone from the archive): {self.pruned}")
            out += [f"    not pruned: {folder}: {gone} of {total} catalogued files gone (is it fully mounted? --prune-force prunes anyway)"
                    for folder, gone, total in self.prune_refused]
        if self.not_found > self.pruned:
            out.append(f"  not found:           {self.not_found - self.pruned} catalogued files under the archive were not met by this "
                       "walk (deleted, moved, or in a folder it could not list): their rows stay"
                       + ("" if self.prune_ran else "; `--prune` retires those that are gone"))
        if self.settled:
            out.append(f"  errors closed:       {self.settled} (paths met again without an error, or failed files gone with --prune)")
        if self.device_decoded or self.device_rejected or self.worker_decoded:
            out.append(f"  --gpu-jpeg:          {self.device_decoded} JPEGs decoded on the device"
                       + (f", {self.worker_decoded} by the CPU readers beside it (their share at the end: "
                          f"{self.worker_share:.2f})" if self.worker_decoded else "")
                       + (f", {self.device_rejected} handed to it but read on the CPU (rejected by its decoder, or out of GPU "
                          f"memory; see the log)" if self.device_rejected else ""))
        if self.device_letterboxed:
            out.append(f"  --gpu-letterbox:     {self.device_letterboxed} images letterboxed on the device")
        if self.ignored:
            out.append(f"  ignored by name:     {sum(self.ignored.values())}")
            out += [f"    {k}: {v}" for k, v in sorted(self.ignored.items())]
        return out


class FileDataset(Dataset):
    """Reader stage as a map-style dataset: index -> read_item(entry)."""

    def __init__(self, entries: list[FileEntry], options: ReadOptions, cfg: PreprocessCfg, inflight: str | None = None):
        self.entries = entries
        self.options = options
        self.cfg = cfg
        # Folder where each reader process notes the file in hand (a file named by its pid).
        self.inflight = inflight

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        if self.inflight is None:
            return read_item(entry, self.options, self.cfg)
        fd = self._note()
        path = entry.path.encode("utf-8", "surrogateescape")
        os.pwrite(fd, struct.pack("<I", len(path)) + path, 0)  # a few microseconds, no open/close
        item = read_item(entry, self.options, self.cfg)
        if "jpeg" not in item:  # (a JPEG handed to the device as bytes was not decoded here)
            faults.reached_reading(entry.path)
        os.pwrite(fd, b"\0\0\0\0", 0)  # nothing in hand between files
        return item

    def _note(self) -> int:
        """This reader process's note: a file named by its pid, opened once."""
        pid = os.getpid()
        if getattr(self, "_note_pid", None) != pid:
            self._note_fd = os.open(os.path.join(self.inflight, str(pid)), os.O_RDWR | os.O_CREAT, 0o600)
            self._note_pid = pid
        return self._note_fd


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def active_prompt_sets(ws: Workspace) -> list[PromptSet]:
    """Prompt sets whose columns the images view shows (new images are scored with all of them)."""
    from curator.prompts import parse_prompt_set

    active = set(ws.manifest.get("finding_columns", {}).values())
    out = []
    for ps_id, spec in ws.manifest.get("prompt_sets", {}).items():
        if ps_id in active:
            data = {"name": spec["name"], "positive": spec["positive"], "negative": spec["negative"], "finding": spec["findings"]}
            out.append(parse_prompt_set(data, f"workspace prompt set {ps_id}"))
    return out


def register_prompt_set(manifest_sets: dict, finding_columns: dict, ps: PromptSet, when: str) -> tuple[dict, dict]:
    sets = dict(manifest_sets)
    sets[ps.id] = {**ps.to_dict(), "columns": ps.columns, "labelled_at": when}
    cols = dict(finding_columns)
    for c in ps.columns:
        cols[c] = ps.id
    # A prompt set none of whose columns is shown any more stays recorded but inactive.
    return sets, cols


@dataclass
class CheckpointRef:
    """A checkpoint's identity without its model (what the manifest and the Ray driver need)."""

    path: str
    sha256: str
    embed_dim: int | None  # None: not known to the workspace yet (the file must be loaded)


def checkpoint_refs(paths: list[str], recorded: dict) -> list[CheckpointRef]:
    """Identify checkpoint files, reusing the workspace's record of a file with the same path,
    size and mtime instead of hashing it again (hundreds of MB each for CheXzero's ensemble)."""
    from curator.model import file_sha256, read_state_dict

    by_path = {m.get("path"): (sha, m) for sha, m in recorded.items()}
    out = []
    for p in paths:
        path = str(Path(p).expanduser().resolve())
        if not os.path.isfile(path):
            read_state_dict(path)  # raises the one-line "no such checkpoint file" error
        st = os.stat(path)
        sha, m = by_path.get(path, (None, {}))
        if sha and m.get("size") == st.st_size and m.get("mtime_ns") == st.st_mtime_ns and m.get("embed_dim"):
            out.append(CheckpointRef(path, sha, int(m["embed_dim"])))
        else:
            out.append(CheckpointRef(path, file_sha256(path), None))
    return out


def check_input_size(checkpoints, preprocess: PreprocessCfg) -> None:
    """The loaded checkpoints take the model input the preprocessing makes (224 px, CheXzero's)."""
    for c in checkpoints:
        size = getattr(c, "image_size", None)  # (a CheckpointRef, identified without loading, has none: it passed before)
        if size is not None and size != preprocess.input_size:
            raise WorkspaceError(f"{c.path}: this model takes {size}x{size} px inputs; curator embeds at "
                                 f"{preprocess.input_size}x{preprocess.input_size} (CheXzero's preprocessing)")


def check_ensemble(ws: Workspace, checkpoints) -> None:
    """The checkpoints differ from each other and are the workspace's ensemble (if it has one)."""
    have = ws.manifest.get("ensemble") or []
    want = [c.sha256 for c in checkpoints]
    first: dict[str, str] = {}
    for c in checkpoints:
        if c.sha256 in first:
            same = "is given twice" if os.path.realpath(first[c.sha256]) == os.path.realpath(c.path) else f"has the same content as {first[c.sha256]}"
            raise ValueError(f"--checkpoint {c.path} {same}: an ensemble's members must be different checkpoints")
        first[c.sha256] = c.path
    if have and sorted(have) != sorted(want):
        known = ", ".join(f"{ws.manifest['checkpoints'][s]['path']} ({s[:12]})" for s in have)
        raise WorkspaceError(
            f"{ws.root} was embedded with a different set of checkpoints: {known}. "
            "Use the same --checkpoint files, or a new --workspace."
        )


def run_embed(cfg: EmbedConfig, checkpoints: list[Checkpoint] | None = None) -> EmbedSummary:
    """Embed the archives into the workspace (see :class:`EmbedConfig`). ``cfg.threads`` sets torch's
    thread count for the run only: the caller's count is back when it returns or fails."""
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    restore = _stop_on_sigterm() if cfg.engine == "local" else None  # (under Ray, ray.init installs its own: the same exit)
    try:
        return _run_embed(cfg, checkpoints)
    finally:
        if restore:
            restore()
        if cfg.threads and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _stop_on_sigterm():
    """Have SIGTERM (`timeout`, Slurm, Kubernetes, systemd) stop the run as Ctrl-C does: the handler
    raises ``SystemExit(SIGTERM)`` in the main thread, as Ray's handler does for ``--engine ray``,
    so the run commits what it holds, records itself interrupted and brings the index up to date
    (the CLI then exits 143). A second SIGTERM while it does so is not let cut that short; a
    forked reader process (which inherits the handler) still ends as SIGTERM ends it. Returns a
    function that puts the previous handler back (None off the main thread, where handlers
    cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    pid = os.getpid()
    previous = signal.getsignal(signal.SIGTERM)
    stopping = []

    def handler(signum, frame):
        if os.getpid() != pid:  # a forked reader worker
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stopping:
            # (`timeout` and some schedulers signal the process and then its group: one stop, two signals)
            log.debug("SIGTERM again: the run is already stopping (committing what it holds, recording itself)")
            return
        stopping.append(signum)
        raise SystemExit(int(signal.SIGTERM))

    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore


def _run_embed(cfg: EmbedConfig, checkpoints: list[Checkpoint] | None) -> EmbedSummary:
    t_start = time.perf_counter()
    started = utcnow()
    run_id = started.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if cfg.engine not in ("local", "ray"):
        raise ValueError(f"unknown engine {cfg.engine!r}; expected 'local' or 'ray'")
    if cfg.read_options.jpeg_on_device and cfg.engine == "ray" and cfg.worker_jpeg_share == "auto":
        raise ValueError("the workers' share of --gpu-jpeg adapts only with --engine local; with --engine ray give a number from 0 to 1")
    if cfg.engine == "ray":  # what can be checked before a workspace is made and the archive walked
        from .ray_engine import _import_ray, check_device, check_reachable

        check_device(cfg.device)
        _import_ray()
        check_reachable(cfg.ray_address)
    devices = [torch.device("cpu")] if cfg.engine == "ray" else resolve_devices(cfg.device)
    if checkpoints is not None:
        if not checkpoints:
            raise ValueError("at least one --checkpoint is needed")
        if len(devices) > 1 and any(ck.device != devices[0] for ck in checkpoints):
            devices = [checkpoints[0].device]  # checkpoints handed in already placed: no replicas
    elif not cfg.checkpoints:
        raise ValueError("at least one --checkpoint is needed")
    on_cuda = (checkpoints[0].device if checkpoints else devices[0]).type == "cuda"
    # (batch n+1's device stage beside batch n's model: local_mapped_batches)
    overlapped = cfg.engine == "local" and (cfg.read_options.jpeg_on_device or cfg.read_options.letterbox_on_device) and (
        cfg.overlap if cfg.overlap is not None else on_cuda)
    if cfg.read_options.jpeg_on_device and not on_cuda and cfg.engine == "local":
        log.warning("--gpu-jpeg on the CPU: grayscale JPEGs are decoded in the main process, beside the model, not by the reader "
                    "workers; it is meant for a GPU (on the CPU, --fast-jpeg is the fast path)")
    if cfg.read_options.letterbox_on_device and not on_cuda and cfg.engine == "local":
        log.warning("--gpu-letterbox on the CPU: images are letterboxed in the main process, beside the model, not by the reader "
                    "workers; it is meant for a GPU")
    share = None
    if cfg.read_options.jpeg_on_device and cfg.engine == "ray":  # a fixed share (0 unless given), read by the reader tasks
        share = WorkerShare(float(cfg.worker_jpeg_share or 0.0))
        cfg = replace(cfg, read_options=replace(cfg.read_options, device_share=FixedShare(share.value)))
    elif cfg.read_options.jpeg_on_device:  # the workers' share of the grayscale JPEGs, read by them per file
        wanted = cfg.worker_jpeg_share if cfg.worker_jpeg_share is not None else ("auto" if on_cuda else 0.0)
        share = WorkerShare(None if wanted == "auto" else float(wanted))
        cfg = replace(cfg, read_options=replace(cfg.read_options, device_share=share.shared))
    summary = EmbedSummary(run_id=run_id, device="ray cluster" if cfg.engine == "ray" else ", ".join(str(d) for d in devices))
    ws = Workspace(cfg.workspace)
    for root in cfg.archives:  # fail before any work (and before a workspace appears) on a mistyped folder
        if not os.path.lexists(os.path.expanduser(root)):
            raise FileNotFoundError(f"{root}: no such file or folder")
        where = Path(root).expanduser().resolve()
        if where == ws.root.resolve():
            raise WorkspaceError(f"{root}: is the workspace folder itself; keep the workspace beside the archive "
                                 f"(e.g. --workspace {where.parent / (where.name + '-ws')})")
    with ws.writer():
        refs = checkpoints
        if refs is None:
            # Checkpoints this workspace recorded before (same path, size and mtime) are identified
            # without reading them, and loaded only once there is something to embed; a new one is
            # loaded (and so validated) before anything is written.
            refs = checkpoint_refs(cfg.checkpoints, ws.manifest.get("checkpoints", {}))
            if any(r.embed_dim is None for r in refs):  # (with Ray, devices[0] is the driver's CPU)
                checkpoints = refs = load_checkpoints(cfg.checkpoints, devices[0], cfg.amp)
        check_ensemble(ws, refs)
        check_input_size(refs, cfg.preprocess)
        # Checkpoints and default prompt set are recorded first, so `label` can find them.
        ck_meta = dict(ws.manifest.get("checkpoints", {}))
        for ck in refs:
            st = os.stat(ck.path)
            ck_meta.setdefault(ck.sha256, {"path": ck.path, "embed_dim": ck.embed_dim, "added": started.isoformat()})
            ck_meta[ck.sha256].update(path=ck.path, size=st.st_size, mtime_ns=st.st_mtime_ns)
        sets, cols = ws.manifest.get("prompt_sets", {}), ws.manifest.get("finding_columns", {})
        if not cols:
            sets, cols = register_prompt_set(sets, cols, default_prompt_set(), started.isoformat())
        modalities = sorted(cfg.read_options.modalities) if cfg.read_options.modalities is not None else None
        retry_filtered = ws.manifest.get("modality_filter", "unset") != modalities
        if retry_filtered and modalities is not None and (outside := catalogued_outside_modalities(ws, cfg.archives, modalities)):
            log.warning("%d image(s) in the catalog are of modalities this run leaves out (%s): unchanged, they stay in the "
                        "workspace (its views, index and cohorts); a changed one is read again and left out. To leave them "
                        "all out, embed the archive into a new workspace (or select by modality in cohorts).",
                        sum(outside.values()), ", ".join(f"{m} {n}" for m, n in outside.items()))
        # ("orientation": JPEG/PNG EXIF orientation applied, as cv2.imread applies it; workspaces
        # embedded before it was are told, on their next run, that their catalogued files keep theirs)
        reading = {"dicom_conversion": cfg.read_options.dicom_conversion, "fast_jpeg": cfg.read_options.jpeg_draft_min_side is not None,
                   "orientation": "exif"}
        if cfg.read_options.jpeg_on_device:  # (absent otherwise, so workspaces from before the option compare equal)
            reading["jpeg_on_device"] = True
        before = ws.manifest.get("reading")
        if before and before != reading and ws.row_count("catalog"):
            was, now = {"jpeg_on_device": False, **before}, {"jpeg_on_device": False, **reading}  # (absent: off)
            changed = ", ".join(f"{k} {was.get(k)} -> {now.get(k)}" for k in {**was, **now} if was.get(k) != now.get(k))
            log.warning("this run reads images differently from the last one (%s): files already in the catalog and unchanged "
                        "keep the images and probabilities of the earlier reading; only new and changed files are read the "
                        "new way. To have the whole archive read the new way, embed it into a new workspace.", changed)
        ws.commit(checkpoints=ck_meta, ensemble=[c.sha256 for c in refs], prompt_sets=sets, finding_columns=cols, modality_filter=modalities,
                  reading=reading)
        in_hand = ws.root / IN_HAND_NOTE
        suspects = frozenset(_read_in_hand(in_hand)) if cfg.read_options.jpeg_on_device and in_hand.exists() else frozenset()
        if suspects:
            log.warning("the last run stopped while %d JPEG(s) were being decoded on the device (first: %s); the reader "
                        "workers read them this time, recording any that crash the decoder", len(suspects), min(suspects, default="?"))
            cfg = replace(cfg, read_options=replace(cfg.read_options, device_skip=cfg.read_options.device_skip | suspects))
        prompt_sets = active_prompt_sets(ws)

        known = KnownFiles(ws, retry_filtered, cfg.retry_errors)
        catalogued = catalogued_under(ws, cfg.archives)  # before this run's rows, as `known` is
        met = 0  # walked files that are in that catalog
        writer = WorkspaceWriter(ws, run_id, prompt_sets, [c.sha256 for c in refs], flush_rows=cfg.flush_rows)
        report = WalkReport()
        status = "completed"
        timing = dict.fromkeys(STAGE_TIMES, 0.0)  # the local engine's seconds per stage (and --gpu-jpeg's counts)
        state: dict = {"share": share}  # engine state kept across chunks (the local engine's mapper, --gpu-jpeg's share)
        try:
            # Discover and embed chunk by chunk, so memory does not grow with the archive.
            bar = _progress(None, cfg.progress)
            left = cfg.limit
            chunk_files = cfg.chunk_files or (1_000_000 if cfg.engine == "ray" else 100_000)
            seen = [] if cfg.prune else None  # digests of every path met, for --prune
            for chunk in _chunked(walk(cfg.archives, report, exclude=[ws.root]), chunk_files):
                summary.discovered += len(chunk)
                paths = [e.path for e in chunk]
                keys = path_keys(paths)
                if seen is not None:
                    seen.append(keys)
                unchanged, bad, previous = known.classify(paths, [e.size for e in chunk], [e.mtime_ns for e in chunk], keys)
                met += int((previous >= 0).sum())
                summary.unchanged += int(unchanged.sum())
                summary.known_errors += int(bad.sum())
                todo = [e for e, skip in zip(chunk, unchanged | bad) if not skip]
                for e, prev, skip in zip(chunk, previous.tolist(), unchanged | bad):
                    if prev >= 0 and not skip:  # a changed file: its new row will replace this one
                        writer.previous[e.path] = prev
                if left is not None:
                    todo, left = todo[:left], max(0, left - len(todo))
                log.info("%d files found so far: %d to embed in this chunk, %d unchanged, %d known bad",
                         summary.discovered, len(todo), summary.unchanged, summary.known_errors)
                if not todo:
                    continue
                bar.total = (bar.total or 0) + len(todo)
                bar.refresh()
                if cfg.engine == "ray":
                    from .ray_engine import mapped_batches

                    source = mapped_batches(todo, cfg, refs, prompt_sets, timing)
                else:
                    if checkpoints is None:
                        checkpoints = load_checkpoints(cfg.checkpoints, devices[0], cfg.amp)
                        if [c.sha256 for c in checkpoints] != [r.sha256 for r in refs]:
                            raise WorkspaceError("a checkpoint file changed while this run started; rerun")
                    source = local_mapped_batches(todo, cfg, checkpoints, prompt_sets, timing, state, devices)
                with contextlib.closing(source):  # stopped early (an error, Ctrl-C): its device-stage thread ends now, not at GC
                    for rows, mapped, errors in source:
                        writer.add(rows, mapped, errors)
                        bar.update(len(rows) + len(errors))
            bar.close()
            summary.ignored = report.ignored
            summary.unreadable = len(report.unreadable)
            unreadable = []
            for p, reason in report.unreadable:
                if known.unreadable_before(p):  # recorded by an earlier run, still unreadable
                    summary.known_errors += 1
                    continue
                unreadable.append({"path": p, "stage": "discover", "kind": "unreadable", "error": reason, "exception": "OSError", "size": None, "mtime_ns": None})
            if unreadable:
                writer.add([], None, unreadable)
            writer.flush()
            # The walk is complete: what it did not meet left the archive (or could not be listed).
            summary.not_found = max(0, catalogued - met)
            if seen is not None:
                seen.append(path_keys([p for p, _ in report.unreadable]))  # there, if unreadable: kept
                seen = np.unique(np.concatenate(seen))
                pr = prune(ws, cfg.archives, seen, run_id, force=cfg.prune_force)
                summary.pruned, summary.prune_refused, summary.prune_ran = pr.retired, pr.refused, True
            settled = settled_errors(ws, cfg.archives, {p for p, _ in report.unreadable}, seen, summary.prune_refused)
            if settled:
                writer.add([], None, settled)
                writer.flush()
                summary.settled = len(settled)
            from curator.index import sync_index

            synced = sync_index(ws)
            if synced is not None:
                log.info("index updated: %d images", synced.count)
            in_hand.unlink(missing_ok=True)  # the files a crash left in it were read by the workers this time
        except (KeyboardInterrupt, SystemExit):  # (SystemExit: SIGTERM, under Ray, whose handler exits)
            status = "interrupted"
            writer.flush()
            from curator.index import sync_index_after_stop

            sync_index_after_stop(ws)  # the committed images into the index (quick cases only; never raises)
            raise
        except Exception:
            status = "failed"
            from curator.index import sync_index_after_stop

            sync_index_after_stop(ws)  # what earlier flushes committed into the index (quick cases only; never raises)
            raise
        finally:
            summary.processed = writer.stats.processed
            summary.failed = writer.stats.failed
            summary.filtered = writer.stats.filtered
            summary.retired = writer.stats.retired
            summary.device_decoded, summary.device_rejected = timing.get("device_decoded", 0), timing.get("device_rejected", 0)
            summary.worker_decoded = timing.get("worker_decoded", 0)
            summary.device_letterboxed = timing.get("device_letterboxed", 0)
            summary.worker_share = share.value if share is not None else None
            summary.seconds = time.perf_counter() - t_start
            counts = {
                "discovered": summary.discovered,
                "unchanged": summary.unchanged,
                "known_errors": summary.known_errors,
                "processed": summary.processed,
                "failed": dict(summary.failed),
                "filtered": dict(summary.filtered),
                "ignored": dict(summary.ignored),
                "retired": summary.retired,
                "pruned": summary.pruned,
                "not_found": summary.not_found,
                "settled_errors": summary.settled,
                **({"device_decoded": summary.device_decoded, "device_rejected": summary.device_rejected,
                    "worker_decoded": summary.worker_decoded} if cfg.read_options.jpeg_on_device else {}),
                **({"device_letterboxed": summary.device_letterboxed} if cfg.read_options.letterbox_on_device else {}),
            }
            record = run_record(
                run_id, "embed", status, started,
                [{"sha256": c.sha256, "path": c.path} for c in refs],
                [p.id for p in prompt_sets], counts,
                {"total_s": summary.seconds, **({k: timing[k] for k in STAGE_TIMES} if cfg.engine == "local" else {"model_s": None})},
                {"archives": cfg.archives, "device": summary.device, "batch_size": cfg.batch_size, "engine": cfg.engine,
                 "dicom_conversion": cfg.read_options.dicom_conversion, "fast_jpeg": cfg.read_options.jpeg_draft_min_side is not None,
                 "gpu_jpeg": cfg.read_options.jpeg_on_device, "gpu_letterbox": cfg.read_options.letterbox_on_device, "device_overlap": overlapped,
                 "amp": cfg.amp and "cpu" not in summary.device,  # (as it took effect: CUDA only)
                 "worker_jpeg_share": None if share is None else ("auto" if share.fixed is None else share.fixed),
                 "modalities": sorted(cfg.read_options.modalities) if cfg.read_options.modalities else None},
            )
            ws.commit(add=[ws.write_part("runs", record)])
        query_cache.after_write(ws)  # only reached when the run completed
    return summary


def local_mapped_batches(todo: list[FileEntry], cfg: EmbedConfig, checkpoints: list[Checkpoint], prompt_sets: list[PromptSet],
                         timing: dict, state: dict | None = None, devices: list[torch.device] | None = None):
    """Local engine: ``(catalog rows, mapped, error rows)`` per model batch.

    The mapper (and its text encoding) is made once the decode workers have started, so text
    encoding overlaps the first reads; it is kept in ``state`` for the next chunk of files.

    With the device stages on (--gpu-jpeg, --gpu-letterbox) and ``cfg.overlap`` (default: on a
    CUDA device), batch n+1's device decode and letterbox run in a thread, on their own CUDA
    stream, while this thread runs the model on batch n and the caller writes it: the device
    stage, the reader workers and the writer then work at the same time instead of in turn.
    Batches keep their order; one device stage runs at a time (the in-hand note names its files).
    """
    state = {} if state is None else state
    device = checkpoints[0].device
    device_work = cfg.read_options.jpeg_on_device or cfg.read_options.letterbox_on_device
    overlap = device_work and (cfg.overlap if cfg.overlap is not None else device.type == "cuda")
    source = batches(todo, cfg, gpu=device.type == "cuda")
    pool = None
    if overlap:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curator-device-stage")
    pending = None  # batch n's device stage (a future), while batch n+1 is read
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(source, None)
            reader_wait = time.perf_counter() - t0
            timing["wait_s"] += reader_wait
            if batch is not None:
                faults.reached("batch")
                timing["worker_decoded"] = timing.get("worker_decoded", 0) + batch["kept"]
            ready = None
            t0 = time.perf_counter()
            if pool is None:
                ready = _device_stage(batch, cfg, device, timing) if batch is not None else None
            else:
                ahead = pool.submit(_device_stage_on_stream, batch, cfg, device, timing, state) if batch is not None else None
                if pending is not None:
                    ready = pending.result()
                    timing["device_wait_s"] += time.perf_counter() - t0
                pending = ahead
            if state.get("share") is not None and batch is not None and (batch["jpegs"] or batch["kept"]):
                state["share"].update(reader_wait, time.perf_counter() - t0, overlapped=pool is not None)
            if ready is not None:
                yield _model_stage(ready, cfg, checkpoints, prompt_sets, devices, timing, state)
            if batch is None:
                break
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # (a stage under way finishes: it holds the GPU and the in-hand note)


def _device_stage(batch: dict, cfg: EmbedConfig, device: torch.device, timing: dict) -> tuple:
    """A batch's model inputs on ``device`` with their rows, its error rows, and the rows of the
    JPEGs the device rejected (read on the CPU by :func:`_model_stage`, in the main thread,
    where the per-file time limit works): the letterbox of --gpu-letterbox's images, the decode
    of --gpu-jpeg's JPEGs (nothing to do without them)."""
    if batch["images"]:  # letterboxed here; their rows already follow the tensors' (_batch)
        t0 = time.perf_counter()
        batch = {**batch, "tensors": letterbox_on_device(batch, cfg.preprocess, device)}
        timing["device_letterbox_s"] += time.perf_counter() - t0
        timing["device_letterboxed"] = timing.get("device_letterboxed", 0) + len(batch["images"])
    if batch["jpegs"]:
        t0 = time.perf_counter()
        rejected: list[dict] = []
        out = on_device(batch, cfg, device, timing, rejected=rejected)
        timing["device_jpeg_s"] += time.perf_counter() - t0
        return (*out, rejected)
    return batch["tensors"], batch["rows"], batch["errors"], []


def _device_stage_on_stream(batch: dict, cfg: EmbedConfig, device: torch.device, timing: dict, state: dict):
    """:func:`_device_stage` in the overlap thread: on a CUDA device, on a stream of its own,
    synchronised before the model (on the default stream) reads the result."""
    if device.type != "cuda":
        return _device_stage(batch, cfg, device, timing)
    stream = state.get("device_stream")
    if stream is None:
        stream = state["device_stream"] = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        out = _device_stage(batch, cfg, device, timing)
    stream.synchronize()
    return out


def _model_stage(ready: tuple, cfg: EmbedConfig, checkpoints: list[Checkpoint], prompt_sets: list[PromptSet],
                 devices: list[torch.device] | None, timing: dict, state: dict) -> tuple[list[dict], dict | None, list[dict]]:
    tensors, rows, errors, rejected = ready
    if tensors is not None and tensors.is_cuda:  # made on the device stage's stream: not reused before this stream is done with it
        tensors.record_stream(torch.cuda.current_stream(tensors.device))
    if rejected:  # read the exact way, after the rows of the device's tensors (as on_device would); (untimed: rare, and
        # device_jpeg_s belongs to the device-stage thread, whose updates this thread must not race)
        tensors, rows, errors = read_exactly(rejected, cfg, checkpoints[0].device, tensors, rows, errors)
    mapped = None
    if tensors is not None:
        t0 = time.perf_counter()
        if "mapper" not in state:
            state["mapper"] = Mapper(checkpoints, prompt_sets, devices)
        mapped = state["mapper"](tensors)
        timing["model_s"] += time.perf_counter() - t0
        faults.reached("mapped")
    return rows, mapped, errors


def letterbox_on_device(batch: dict, pcfg: PreprocessCfg, device: torch.device) -> torch.Tensor:
    """The batch's model inputs on ``device``: its preprocessed tensors, then its grayscale images
    letterboxed and transformed there (on a CUDA device; on the CPU in this process otherwise),
    with Pillow's arithmetic to the bit (curator.device_jpeg), in the order of its rows.

    The images go in groups of at most ``DEVICE_GROUP_PIXELS`` pixels; a group that runs the GPU
    out of memory is letterboxed by Pillow here instead, as the reader workers would have.
    """
    where = device if device.type == "cuda" else torch.device("cpu")
    images = batch["images"]
    parts = [batch["tensors"].to(device)] if batch["tensors"] is not None else []
    for group in _pixel_groups([{"width": im.shape[1], "height": im.shape[0]} for im in images], DEVICE_GROUP_PIXELS):
        try:
            on = [images[i].to(where, non_blocking=True) for i in group]  # (pinned by the loader on a GPU)
            parts.append(device_jpeg.model_inputs(on, pcfg).to(device))
        except torch.cuda.OutOfMemoryError:
            on = None
            torch.cuda.empty_cache()
            log.warning("out of GPU memory letterboxing %d images on %s; Pillow letterboxes them here (lower --batch-size)", len(group), where)
            parts.append(torch.stack([model_input(Image.fromarray(images[i].numpy()), pcfg) for i in group]).to(device))
    return torch.cat(parts)


def on_device(batch: dict, cfg: EmbedConfig, device: torch.device, counts: dict | None = None,
              rejected: list[dict] | None = None) -> tuple[torch.Tensor | None, list[dict], list[dict]]:
    """Decode and preprocess a batch's undecoded JPEGs on ``device`` (curator.device_jpeg).

    Returns the batch's model inputs on ``device`` with their rows, in one order, and its error
    rows. A file the device decoder rejects (or decodes to another size than its header says) is
    read again by the CPU path here (exact, or reduced with --fast-jpeg), so it ends as it would
    without the option: an image (rows
    say 'raster') or an error row. Decoding happens on CUDA devices; for any other the CPU decodes.
    The JPEGs go in groups of at most ``DEVICE_GROUP_PIXELS`` decoded pixels; a group that runs
    the GPU out of memory is read on the CPU too. ``counts`` gets ``device_decoded`` and
    ``device_rejected`` added to. With ``rejected`` (a list), the rejected files' rows go there
    instead, for the caller to read (:func:`read_exactly`).
    """
    jpegs = batch["jpegs"]
    ahead = len(batch["rows"]) - len(jpegs)
    rows, jpeg_rows, errors = list(batch["rows"][:ahead]), batch["rows"][ahead:], list(batch["errors"])
    parts = [batch["tensors"].to(device)] if batch["tensors"] is not None else []
    where = device if device.type == "cuda" else torch.device("cpu")
    in_hand = Path(cfg.workspace).expanduser().resolve() / IN_HAND_NOTE  # (as Workspace resolves it)
    before = sorted(cfg.read_options.device_skip)
    # A decoder crash below ends the process with no error row; the note lets the next run hand
    # these files to the reader workers instead (run_embed reads it).
    _write_in_hand(in_hand, before + [r["path"] for r in jpeg_rows])
    try:
        faults.reached_decoding([r["path"] for r in jpeg_rows])
        decoded, decoded_rows, refused = decode_jpegs(jpegs, jpeg_rows, cfg.preprocess, device)
    finally:
        _write_in_hand(in_hand, before)
    parts += decoded
    rows += decoded_rows
    if counts is not None:
        counts["device_decoded"] = counts.get("device_decoded", 0) + len(jpegs) - len(refused)
        counts["device_rejected"] = counts.get("device_rejected", 0) + len(refused)
    if refused:
        log.info("%d JPEG(s) of this batch not decoded on %s, read on the CPU instead (first: %s)", len(refused), where, jpeg_rows[refused[0]]["path"])
    tensors = torch.cat(parts) if parts else None
    if rejected is not None:
        rejected += [jpeg_rows[i] for i in refused]
        return tensors, rows, errors
    return read_exactly([jpeg_rows[i] for i in refused], cfg, device, tensors, rows, errors)


def decode_jpegs(jpegs: list[torch.Tensor], jpeg_rows: list[dict], cfg: PreprocessCfg, device: torch.device
                 ) -> tuple[list[torch.Tensor], list[dict], list[int]]:
    """Decode grayscale JPEGs (their bytes, with their reader rows) and make their model inputs on
    ``device`` (curator.device_jpeg): ``(input tensors, rows of those inputs in order, indices the
    decoder refused)``. Refused: rejected by the decoder, decoded to another size than the header
    says, or in a group of ``DEVICE_GROUP_PIXELS`` decoded pixels that ran the GPU out of memory.
    Decoding happens on CUDA devices; for any other the CPU decodes."""
    where = device if device.type == "cuda" else torch.device("cpu")
    parts: list[torch.Tensor] = []
    rows: list[dict] = []
    refused: list[int] = []
    for group in _pixel_groups(jpeg_rows, DEVICE_GROUP_PIXELS):
        ok: list[tuple[int, torch.Tensor]] = []
        try:
            images = device_jpeg.decode([jpegs[i] for i in group], where)
            # (a decoded size other than the header's: not what the row says; the exact path decides)
            ok = [(i, im) for i, im in zip(group, images) if im is not None and tuple(im.shape) == (jpeg_rows[i]["height"], jpeg_rows[i]["width"])]
            images = None  # the full-size images that failed go now; those in ok after their letterbox
            if ok:
                parts.append(device_jpeg.model_inputs([im for _, im in ok], cfg).to(device))
                rows += [{**jpeg_rows[i], "conversion": f"{RASTER_CONVERSION}+{where.type}-jpeg"} for i, _ in ok]
        except torch.cuda.OutOfMemoryError:
            ok = images = None
            torch.cuda.empty_cache()
            log.warning("out of GPU memory decoding %d JPEGs on %s; they are read on the CPU instead (lower --batch-size)", len(group), where)
        done = {i for i, _ in ok or ()}
        refused += [i for i in group if i not in done]
    return parts, rows, refused


def read_exactly(jpeg_rows: list[dict], cfg: EmbedConfig, device: torch.device, tensors: torch.Tensor | None, rows: list[dict],
                 errors: list[dict]) -> tuple[torch.Tensor | None, list[dict], list[dict]]:
    """The files of ``jpeg_rows`` (handed to the device, which rejected them) read by the CPU path
    (exact, or reduced with --fast-jpeg), appended to a batch's model inputs, rows and error rows; call it in the main thread (the
    per-file time limit is a signal)."""
    exact = replace(cfg.read_options, jpeg_on_device=False, letterbox_on_device=False)
    parts = [tensors] if tensors is not None else []
    rows, errors = list(rows), list(errors)
    for r in jpeg_rows:
        item = read_item(FileEntry(r["path"], r["size"], r["mtime_ns"]), exact, cfg.preprocess)
        if item["ok"]:
            parts.append(item["tensor"].unsqueeze(0).to(device))
            rows.append(item["row"])
        else:
            errors.append(item["error"])
    return (torch.cat(parts) if parts else None), rows, errors


# A run record's stage times (local engine): the model, waiting for the reader workers, --gpu-jpeg's
# decode + letterbox, --gpu-letterbox's letterbox, and (with the overlap, where those two run
# beside the model) waiting for them (`curator info` shows them).
STAGE_TIMES = ("model_s", "wait_s", "device_jpeg_s", "device_letterbox_s", "device_wait_s")

IN_HAND_NOTE = "gpu-jpeg-in-hand.json"  # in the workspace: the paths being decoded on the device


def _write_in_hand(note: Path, paths: list[str]) -> None:
    if paths:
        note.write_text(json.dumps(paths))
    else:
        note.unlink(missing_ok=True)


def _read_in_hand(note: Path) -> list[str]:
    try:
        paths = json.loads(note.read_text())
        return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []
    except (OSError, ValueError):  # a note cut short by the crash: whatever it held is lost, not the run
        return []


DEVICE_GROUP_PIXELS = 1 << 30  # decoded pixels (bytes) per group of JPEGs on the device: ~128 films of 8 MP


def _pixel_groups(rows: list[dict], limit: int) -> list[list[int]]:
    """Indices of ``rows`` in consecutive groups whose width x height add up to at most ``limit`` (at least one each)."""
    groups: list[list[int]] = []
    total = limit + 1
    for i, r in enumerate(rows):
        n = r["width"] * r["height"]
        if total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


class WorkerShare:
    """The share of grayscale JPEGs the reader workers decode themselves under --gpu-jpeg, beside
    the device's decoder, so that neither waits for the other (on a GPU node nvJPEG decodes ~1,000
    full-size films/s and leaves the workers, which then only read and hash, mostly idle).

    ``shared`` is a float in shared memory that the worker processes read per file
    (stages.kept_by_workers). With ``fixed`` None it adapts after every model batch by ``STEP``
    (within ``[0, MAX]``), towards whichever side keeps up: with the device stage beside the
    model (overlap), up when this process waited longer for the device stage than for the
    readers, down when the other way round; in turn with the model, up while the readers keep up
    (this process hardly waits for them: the device stage's work moves to idle workers), down when
    it waits for them. Waits within ``BAND`` of each other (a share of the larger, plus 1 ms)
    leave it: the model is then the limit. A number fixes it.
    """

    STEP = 0.05
    MAX = 0.95  # the device keeps some: its rate is measured only while it works
    BAND = 0.1

    def __init__(self, fixed: float | None = None):
        import multiprocessing

        if fixed is not None and not 0.0 <= fixed <= 1.0:
            raise ValueError(f"the workers' share of the JPEGs must be within 0 and 1, not {fixed}")
        self.fixed = fixed
        self.shared = multiprocessing.RawValue("d", 0.0 if fixed is None else float(fixed))

    @property
    def value(self) -> float:
        return self.shared.value

    def update(self, reader_wait: float, device_wait: float, overlapped: bool = True) -> None:
        """One model batch's seconds: waiting for the reader workers, and waiting for the device
        stage (``overlapped``: it ran beside the model) or running it (in turn with the model)."""
        if self.fixed is not None:
            return
        band = self.BAND * max(reader_wait, device_wait) + 0.001
        if overlapped:
            more = device_wait > reader_wait + band
            less = reader_wait > device_wait + band
        else:  # the readers keep up when this process hardly waits for them
            more = reader_wait <= band
            less = not more
        if more:
            self.shared.value = min(self.MAX, self.shared.value + self.STEP)
        elif less:
            self.shared.value = max(0.0, self.shared.value - self.STEP)


def default_workers(gpu: bool) -> int:
    """Decode workers when --workers is not given: one per CPU core this process may use, at most
    8 when the model runs on the CPU (it needs cores too); all of them when it runs on a GPU, where
    decoding is the limit (an H200 node's 16 cores decode ~130 full-size films/s against the
    model's ~15,000/s: benchmarks/README.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores if gpu else min(8, cores))


def batches(todo: list[FileEntry], cfg: EmbedConfig, gpu: bool = False):
    """Model batches of ``cfg.batch_size`` good images (plus the errors met on the way).

    Worker processes read small chunks, so every worker is busy even when the archive is
    smaller than a few model batches; the main process assembles the model batches.

    A file whose decoder crashes the worker reading it (a C library that aborts or faults on it,
    as GDCM does on some malformed JPEG frames: the worker dies by SIGABRT, SIGSEGV, SIGBUS,
    SIGFPE or SIGILL) is found from the note each worker keeps of the file in hand; it gets an
    errors row (``decoder_crashed``) and the files not yet read go to fresh workers, so one such
    file neither stops the run nor every rerun. Each costs a few seconds (torch's 5-second worker
    check). A worker ended any other way (killed, out of memory) still fails the run. With
    ``workers=0`` the reading happens in this process, which such a file takes down.
    """
    workers = cfg.workers if cfg.workers is not None else default_workers(gpu)
    chunk = max(1, min(8, cfg.batch_size // max(1, workers))) if workers else cfg.batch_size
    inflight = tempfile.mkdtemp(prefix="curator-reading-") if workers else None
    restore = _no_async_worker_errors() if workers else None
    try:
        remaining = list(todo)
        tensors, rows, image_rows, images, jpeg_rows, jpegs, errors = [], [], [], [], [], [], []
        kept = 0  # JPEGs of the batch the workers decoded as their share beside the device
        while remaining:
            loader = DataLoader(
                FileDataset(remaining, cfg.read_options, cfg.preprocess, inflight),
                batch_size=chunk,
                num_workers=workers,
                collate_fn=collate,
                worker_init_fn=_worker_init if workers else None,
                pin_memory=gpu,
                prefetch_factor=max(2, 2 * cfg.batch_size // chunk // max(1, workers)) if workers else None,
            )
            with parent_objects_frozen():  # the workers are forked here
                it = iter(loader)
            done = 0  # items of `remaining` whose results arrived (the loader keeps their order)
            crashed: list[tuple[FileEntry, str]] = []
            while True:
                try:
                    part = next(it)
                except StopIteration:
                    break
                except Exception:
                    # A dying worker shows up as torch's "exited unexpectedly" RuntimeError, or as
                    # a broken connection while fetching a result it had queued: ask the workers.
                    crashed = _crashed_reads(it, inflight, remaining[done:])
                    if not crashed:
                        raise
                    break
                done += len(part["rows"]) + len(part["errors"])
                if part["tensors"] is not None:
                    tensors.append(part["tensors"])
                # rows of tensors first, then of the images before their letterbox, then of the JPEG bytes (collate)
                decoded = 0 if part["tensors"] is None else len(part["tensors"])
                shapes = part["image_shapes"]
                rows += part["rows"][:decoded]
                image_rows += part["rows"][decoded : decoded + len(shapes)]
                jpeg_rows += part["rows"][decoded + len(shapes) :]
                if part["image_pixels"] is not None:  # views, one per image
                    images += [v.view(h, w) for v, (h, w) in zip(torch.split(part["image_pixels"], [h * w for h, w in shapes]), shapes)]
                if part["jpeg_bytes"] is not None:
                    jpegs += torch.split(part["jpeg_bytes"], part["jpeg_sizes"])  # views, one per file
                errors += part["errors"]
                kept += part["kept"]
                if len(rows) + len(images) + len(jpegs) >= cfg.batch_size:
                    yield _batch(tensors, rows, image_rows, images, jpeg_rows, jpegs, errors, kept)
                    tensors, rows, image_rows, images, jpeg_rows, jpegs, errors = [], [], [], [], [], [], []
                    kept = 0
            del it, loader  # shuts the workers down
            if not crashed:
                break
            for entry, how in crashed:
                log.warning("%s: reading it crashed the reader process (%s); recorded as an error, the run goes on", entry.path, how)
                errors.append(_error_item(entry, "read", "decoder_crashed",
                                          f"reading this file crashed the reader process ({how}); it is skipped until it changes "
                                          "(touch it to try again)", "WorkerDied")["error"])
            lost = {e.path for e, _ in crashed}
            remaining = [e for e in remaining[done:] if e.path not in lost]
        if rows or images or jpegs or errors:
            yield _batch(tensors, rows, image_rows, images, jpeg_rows, jpegs, errors, kept)
    finally:
        if inflight:
            shutil.rmtree(inflight, ignore_errors=True)
        if restore:
            restore()


def _batch(tensors: list[torch.Tensor], rows: list[dict], image_rows: list[dict], images: list[torch.Tensor], jpeg_rows: list[dict],
           jpegs: list[torch.Tensor], errors: list[dict], kept: int = 0) -> dict:
    """A model batch: ``rows`` are those of ``tensors`` (decoded and preprocessed by the readers),
    then those of ``images`` (grayscale 8-bit images to letterbox on the device,
    ``ReadOptions.letterbox_on_device``), then those of ``jpegs`` (grayscale JPEG bytes left for
    the device, ``ReadOptions.jpeg_on_device``)."""
    return {"tensors": torch.cat(tensors) if tensors else None, "rows": rows + image_rows + jpeg_rows, "images": images, "jpegs": jpegs,
            "errors": errors, "kept": kept}


def _no_async_worker_errors():
    """Have a dead reader process reported by the loader's own ``next()``, not asynchronously;
    returns a function that puts torch's arrangement back (None off the main thread).

    torch installs a SIGCHLD handler (once per process) that raises its "worker is killed"
    RuntimeError in the main thread wherever that thread happens to be: inside the model, or
    halfway through writing a workspace part, where nothing could recover from it. Without the
    handler the loader notices the dead worker itself, within its 5-second status check, and
    raises from ``next()``, where :func:`batches` records the file and goes on. Only the main
    thread can change signal handlers.
    """
    import signal
    import threading

    from torch.utils.data._utils import signal_handling

    if threading.current_thread() is not threading.main_thread():
        return None
    was_set = getattr(signal_handling, "_SIGCHLD_handler_set", False)
    previous = signal.getsignal(signal.SIGCHLD)
    signal_handling._SIGCHLD_handler_set = True  # torch's flag: "already installed", so it is not
    if getattr(previous, "__module__", "") == signal_handling.__name__:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # installed by an earlier loader in this process

    def restore() -> None:
        signal_handling._SIGCHLD_handler_set = was_set
        if signal.getsignal(signal.SIGCHLD) != previous and previous is not None:
            signal.signal(signal.SIGCHLD, previous)

    return restore


# Signals by which a reader process dies of the file it decodes (a failed assertion or a fault).
_CRASH_SIGNALS = {"SIGABRT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL"}


def _crashed_reads(it, inflight: str | None, pending: list[FileEntry], wait_s: float = 3.0) -> list[tuple[FileEntry, str]]:
    """``(file, how)`` for each reader process of loader iterator ``it`` that died of a crash
    signal while its note named one of ``pending``; waits up to ``wait_s`` for a dying worker."""
    import signal

    workers = list(getattr(it, "_workers", []) or [])
    if not inflight or not workers:
        return []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and all(w.exitcode is None for w in workers):
        time.sleep(0.05)  # a worker can still be exiting when its broken connection is noticed
    by_path = {e.path: e for e in pending}
    out = []
    for w in workers:
        code = w.exitcode
        if code is None or code >= 0:
            continue
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name not in _CRASH_SIGNALS:
            continue
        try:
            note = Path(inflight, str(w.pid)).read_bytes()
        except OSError:
            continue
        size = struct.unpack("<I", note[:4])[0] if len(note) >= 4 else 0
        path = note[4 : 4 + size].decode("utf-8", "surrogateescape")
        if size and path in by_path:
            out.append((by_path[path], f"killed by {name}"))
    return out


def _chunked(entries, n: int):
    chunk = []
    for e in entries:
        chunk.append(e)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="embed", disable=not enabled, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
