"""Ray engine for the embed job: the same reader and mapper stages, run on Ray Data.

Reader: stateless Ray tasks (one CPU each) that call :func:`stages.read_item` on chunks of files.
Mapper: a pool of actors, one per GPU (or a single CPU actor when the cluster has no GPU), each
holding every checkpoint and the prompt sets' text weights (:class:`stages.Mapper`). With
--gpu-jpeg the reader tasks hand grayscale JPEGs over undecoded and each actor decodes them on its
own GPU (one nvJPEG decoder per process, so on a multi-GPU node every GPU decodes).
Writer: stays in the driver, the only process that holds the workspace lock, so a Ray run writes
exactly the parts a local run writes and the crash-safety rules do not change.

A file whose decoder kills the process reading it (a task, or an actor decoding on its device)
is recorded as an error row after two such deaths instead of being retried for ever
(pipelines/crash_notes.py).

Files are read by the Ray workers, so the archive (and the checkpoint files) must be visible at
the same paths on every node: a shared file system, or an object store mounted as one.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from curator import faults
from curator.constants import ENSEMBLE_MEMBER
from curator.discover import FileEntry
from curator.model import Checkpoint
from curator.preprocess import DEFAULT_CFG, PreprocessCfg
from curator.prompts import PromptSet, parse_prompt_set
from curator.readers import ReadOptions

from . import crash_notes
from .crash_notes import CrashNote
from .stages import Mapper, _error_item, read_item

log = logging.getLogger(__name__)

INSTALL_HINT = "the Ray engine needs Ray Data: pip install 'curator-cxr[ray]' (or pip install 'ray[data]')"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"{INSTALL_HINT} ({exc})") from None
    return ray


# seconds to wait for a Ray cluster's address to answer before giving up (ray.init itself retries
# for ever, printing a line every 30 s)
REACH_TIMEOUT_S = 10.0

# --device values the Ray engine takes: the model actors get whole GPUs from Ray's scheduler
RAY_DEVICES = (None, "auto", "cuda", "cpu")


def check_device(device: str | None) -> None:
    """The Ray engine places its model actors itself (one per GPU the cluster offers): ``--device``
    can ask for GPUs (``cuda``) or the CPU, not for particular GPUs."""
    if device not in RAY_DEVICES:
        raise ValueError(f"--device {device!r} with --engine ray: give cuda (one model actor on each GPU of the cluster) or cpu "
                         "(one model actor on the CPU); Ray, not curator, picks the GPUs (limit them with ray start --num-gpus)")


def check_reachable(address: str | None, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fail fast when the cluster address (``--address``, else ``RAY_ADDRESS``) does not answer:
    ``ray.init`` would wait for ever. ``auto`` / ``local`` and no address are left to Ray."""
    import socket

    given = address or os.environ.get("RAY_ADDRESS")
    if not given or given in ("auto", "local"):
        return
    where = given.split("://", 1)[1] if "://" in given else given
    host, sep, port = where.rpartition(":")
    what = f"--address {given}" if address else f"RAY_ADDRESS={given} (from the environment)"
    if not sep or not port.isdigit():
        raise ValueError(f"{what}: expected HOST:PORT (the head node's GCS port, 6379 by default), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RuntimeError(f"{what}: no Ray cluster answers there ({exc}); is `ray start --head` running on that machine and "
                           "the port open from here?") from None


def connect(address: str | None, quiet: bool = False) -> None:
    """Join the cluster at ``address`` (or start a local one); reuse a running connection.
    ``quiet`` (curator -q): Ray's own Python logging and its workers' output are kept to errors."""
    ray = _import_ray()
    if ray.is_initialized():
        if address:
            log.info("ray: already connected; --address %s ignored", address)
        return
    check_reachable(address)
    if not address and not os.environ.get("RAY_ADDRESS"):
        # A local cluster's workers do the decoding, as the local engine's worker processes do:
        # give them the same priority (Ray's default renices workers to 15, which starves them on
        # a shared machine). Set RAY_worker_niceness yourself to keep Ray's default.
        os.environ.setdefault("RAY_worker_niceness", "0")
    level = logging.ERROR if quiet else logging.WARNING
    ray.init(address=address, include_dashboard=False, logging_level=level, log_to_driver=not quiet)
    if quiet:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# reader tasks
# ---------------------------------------------------------------------------------------------
# How each row of a model batch was read (the "how" column): by a reader task (exact path); decoded
# on the actor's device (--gpu-jpeg); handed to the device but read the exact way by the actor
# (rejected by its decoder, or in a batch whose device decode killed an actor before); decoded by a
# reader task as its share beside the device (--worker-jpeg-share).
BY_READER, ON_DEVICE, DEVICE_REJECTED, READER_SHARE = 0, 1, 2, 3


def read_noted(entries: list[FileEntry], options: ReadOptions, cfg: PreprocessCfg, note: CrashNote, keys: list[int] | None = None) -> list[dict]:
    """:func:`stages.read_item` for each file, noting the one in hand (``note``, under index
    ``keys[i]``, default its position); a file in hand at ``crash_notes.DEATHS`` deaths of the
    reading process is not read again but becomes an error row (``decoder_crashed``)."""
    items = []
    for key, entry in zip(keys if keys is not None else range(len(entries)), entries):
        deaths = note.crashed(key)
        if deaths >= crash_notes.DEATHS:
            log.warning("%s: the process reading it died %d times (Ray engine); recorded as an error, the run goes on", entry.path, deaths)
            items.append(_error_item(entry, "read", "decoder_crashed",
                                     f"reading this file ended the process reading it {deaths} times (a decoder crash, or killed, e.g. "
                                     "out of memory); it is skipped until it changes (touch it to try again)", "WorkerDied"))
            continue
        note.hold(key)
        items.append(read_item(entry, options, cfg))
        if "jpeg" not in items[-1]:  # (a JPEG handed to the device as bytes was not decoded here)
            faults.reached_reading(entry.path)
    return items


def _read_chunk(batch: dict, options: ReadOptions, cfg: PreprocessCfg, notes: str) -> dict:
    """Ray task: files -> preprocessed tensors plus pickled catalog rows / error rows. With
    --gpu-jpeg, grayscale JPEGs go as their bytes ("jpeg"); with --gpu-letterbox, grayscale images
    go decoded but not letterboxed ("image" bytes, "image_h", "image_w"); with either, the tensors
    go as bytes too ("tensor_bytes"), so that no row carries a tensor it does not have."""
    torch.set_num_threads(1)
    entries = [FileEntry(str(p), int(s), int(m)) for p, s, m in zip(batch["path"], batch["size"], batch["mtime_ns"])]
    note = CrashNote(crash_notes.folder(notes), "read", [e.path for e in entries])
    try:
        items = read_noted(entries, options, cfg, note)
    finally:
        note.done()
    out = {
        "ok": np.array([it["ok"] for it in items], dtype=bool),
        "record": np.array([pickle.dumps(it["row"] if it["ok"] else it["error"]) for it in items], dtype=object),
        "jpeg": np.array([it["jpeg"].tobytes() if "jpeg" in it else b"" for it in items], dtype=object),
        "how": np.array([READER_SHARE if it.get("kept") else BY_READER for it in items], dtype=np.int8),
    }
    if options.jpeg_on_device or options.letterbox_on_device:
        out["tensor_bytes"] = np.array([it["tensor"].numpy().tobytes() if "tensor" in it else b"" for it in items], dtype=object)
        if options.letterbox_on_device:
            out["image"] = np.array([it["image"].tobytes() if "image" in it else b"" for it in items], dtype=object)
            out["image_h"] = np.array([it["image"].shape[0] if "image" in it else 0 for it in items], dtype=np.int32)
            out["image_w"] = np.array([it["image"].shape[1] if "image" in it else 0 for it in items], dtype=np.int32)
        return out
    shape = next((tuple(it["tensor"].shape) for it in items if "tensor" in it), (3, cfg.input_size, cfg.input_size))
    out["tensor"] = np.zeros((len(items), *shape), dtype=np.float32)
    for i, it in enumerate(items):
        if "tensor" in it:
            out["tensor"][i] = it["tensor"].numpy()
    return out


# ---------------------------------------------------------------------------------------------
# mapper actors
# ---------------------------------------------------------------------------------------------
class EmbedActor:
    """Ray actor: loads the checkpoints once, then maps batches from the reader tasks to embeddings
    + probabilities. With --gpu-jpeg it first decodes the batch's grayscale JPEGs on its device."""

    def __init__(self, checkpoint_paths: list[str], sha256s: list[str], prompt_specs: list[dict], device: str | None, threads: int | None,
                 read_options: ReadOptions | None = None, preprocess: PreprocessCfg = DEFAULT_CFG, notes: str = "notes",
                 amp: bool = False):
        from curator.model import load_checkpoints

        if threads:
            torch.set_num_threads(threads)
        cks = load_checkpoints(checkpoint_paths, device, amp)
        got = [c.sha256 for c in cks]
        if got != sha256s:
            raise RuntimeError(f"checkpoint files differ on this node: expected sha256 {sha256s}, found {got}")
        sets = [parse_prompt_set(spec, "prompt set") for spec in prompt_specs]
        self.mapper = Mapper(cks, sets)
        self.sha256s = sha256s
        self.set_ids = [ps.id for ps in sets]
        self.device = cks[0].device
        # for --gpu-jpeg: how the files the device does not decode are read (the CPU path: exact, or --fast-jpeg;
        # letterboxed here, as before --gpu-letterbox)
        self.exact = replace(read_options or ReadOptions(), jpeg_on_device=False, letterbox_on_device=False, device_share=None)
        self.preprocess = preprocess
        self.notes = notes

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"], dtype=bool)
        records = [pickle.loads(r) for r in batch["record"]]
        jpeg, how_in = batch["jpeg"], np.asarray(batch["how"])
        image = batch["image"] if "image" in batch else [b""] * len(ok)
        # rows in the local engine's order: preprocessed tensors, images to letterbox, JPEG bytes
        plain = [i for i in range(len(ok)) if ok[i] and not len(jpeg[i]) and not len(image[i])]
        imaged = [i for i in range(len(ok)) if ok[i] and len(image[i])]
        deferred = [i for i in range(len(ok)) if ok[i] and len(jpeg[i])]
        rows, how = [records[i] for i in plain + imaged], [int(how_in[i]) for i in plain + imaged]
        errors = [records[i] for i in range(len(ok)) if not ok[i]]
        error_how = [BY_READER] * len(errors)
        parts = []
        if plain and "tensor" in batch:
            parts.append(torch.from_numpy(np.ascontiguousarray(batch["tensor"][plain])))
        elif plain:  # (--gpu-jpeg, --gpu-letterbox: as bytes)
            size = self.preprocess.input_size
            parts.append(torch.from_numpy(np.stack([np.frombuffer(batch["tensor_bytes"][i], dtype=np.float32).reshape(-1, size, size)
                                                    for i in plain])))
        if imaged:  # --gpu-letterbox: letterboxed (and transformed) on this actor's device
            from .embed import letterbox_on_device

            h, w = np.asarray(batch["image_h"]), np.asarray(batch["image_w"])
            images = [torch.frombuffer(bytearray(image[i]), dtype=torch.uint8).view(int(h[i]), int(w[i])) for i in imaged]
            parts.append(letterbox_on_device({"tensors": None, "images": images}, self.preprocess, self.device))
        if deferred:
            self._on_device([records[i] for i in deferred], [jpeg[i] for i in deferred], parts, rows, how, errors, error_how)
        n = len(rows) + len(errors)
        out = {"ok": np.array([True] * len(rows) + [False] * len(errors), dtype=bool),
               "record": np.array([pickle.dumps(r) for r in rows + errors], dtype=object),
               "how": np.array(how + error_how, dtype=np.int8),
               "letterboxed": np.zeros(n, dtype=np.int32)}  # --gpu-letterbox: the batch's count, in its first row
        if imaged:
            out["letterboxed"][0] = len(imaged)
        mapped = self.mapper(torch.cat([t.to(self.device) for t in parts])) if parts else None
        for i, sha in enumerate(self.sha256s):
            emb = np.zeros((n, self.mapper.checkpoints[i].embed_dim), dtype=np.float32)
            if mapped is not None:
                emb[: len(rows)] = mapped["embeddings"][sha]
            out[f"emb_{i}"] = emb
        for j, ps_id in enumerate(self.set_ids):
            nf = len(self.mapper.prompt_sets[j].findings)
            for k, member in enumerate([*self.sha256s, None]):
                p = np.zeros((n, nf), dtype=np.float32)
                if mapped is not None:
                    p[: len(rows)] = mapped["probabilities"][ps_id][member if member is not None else ENSEMBLE_MEMBER]
                out[f"prob_{j}_{k}"] = p
        return out

    def _on_device(self, jpeg_rows: list[dict], jpegs: list[bytes], parts: list, rows: list, how: list, errors: list,
                   error_how: list) -> None:
        """--gpu-jpeg: decode the batch's grayscale JPEGs on this actor's device; the ones it refuses,
        and all of them in a batch whose device decode killed an actor before, read the exact way
        here, each noted (a file whose exact read kills the actor twice becomes an error row).
        Appends to the batch's model inputs, rows, errors and their "how"."""
        from .embed import decode_jpegs

        note = CrashNote(crash_notes.folder(self.notes), "device", [r["path"] for r in jpeg_rows])
        try:
            if note.crashed(crash_notes.DEVICE):
                log.warning("an actor died decoding a batch of %d JPEGs on its device (first: %s); they are read on the CPU instead",
                            len(jpeg_rows), jpeg_rows[0]["path"])
                refused = list(range(len(jpeg_rows)))
            else:
                note.hold(crash_notes.DEVICE)
                tensors = [torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()) for b in jpegs]
                faults.reached_decoding([r["path"] for r in jpeg_rows])
                decoded, decoded_rows, refused = decode_jpegs(tensors, jpeg_rows, self.preprocess, self.device)
                parts += decoded
                rows += decoded_rows
                how += [ON_DEVICE] * len(decoded_rows)
            if refused:
                entries = [FileEntry(jpeg_rows[i]["path"], jpeg_rows[i]["size"], jpeg_rows[i]["mtime_ns"]) for i in refused]
                for item in read_noted(entries, self.exact, self.preprocess, note, keys=refused):
                    if item["ok"]:
                        parts.append(item["tensor"].unsqueeze(0))
                        rows.append(item["row"])
                        how.append(DEVICE_REJECTED)
                    else:
                        errors.append(item["error"])
                        error_how.append(DEVICE_REJECTED)
        finally:
            note.done()


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
def actor_plan(resources: dict, device: str | None, threads: int | None, node_cpus: float | None = None) -> tuple[int, int, float, str]:
    """``(model actors, GPUs each, CPUs each, device)`` for a cluster's resources: one actor per GPU
    (each holding one) when the cluster has GPUs and ``device`` is None or CUDA; else a single CPU
    actor with ``threads`` CPUs (default: half the CPUs of the cluster, at most those of its
    largest node, ``node_cpus``), leaving at least one to the decode tasks. (Ray sets a task's
    OpenMP threads to its CPUs: the actor's torch threads follow :func:`actor_threads`.)"""
    gpus = int(resources.get("GPU", 0))
    want_cuda = device is not None and str(device).startswith("cuda")
    if want_cuda and not gpus:
        raise RuntimeError(f"--device {device} was asked for, but the Ray cluster has no GPU")
    if gpus > 0 and (device is None or device == "auto" or want_cuda):
        return gpus, 1, 0.0, "cuda"
    total = float(resources.get("CPU", 1))
    want = float(threads) if threads else max(1.0, math.floor(min(total, node_cpus or total) / 2))
    # A CPU actor asks for a hair less than whole CPUs: Ray Data fuses consecutive map stages with
    # equal resource requests, which would run every decode inside the single model actor.
    return 1, 0, min(want, max(1.0, total - 1)) - 0.01, "cpu"


def actor_threads(cpus: float) -> int:
    """The torch threads of a CPU model actor holding ``cpus`` (as :func:`actor_plan` asks)."""
    return max(1, int(round(cpus)))


def mapped_batches(
    todo: list[FileEntry],
    cfg,
    checkpoints: list[Checkpoint],
    prompt_sets: list[PromptSet],
    counts: dict | None = None,
) -> Iterator[tuple[list[dict], dict | None, list[dict]]]:
    """Yield ``(catalog rows, mapped, error rows)`` as :meth:`WorkspaceWriter.add` takes them.
    ``counts`` gets --gpu-jpeg's ``device_decoded``, ``device_rejected`` and ``worker_decoded``
    added to. The crash notes (pipelines/crash_notes.py) are named by ``cfg.workspace``."""
    ray = _import_ray()
    connect(cfg.ray_address, quiet=not cfg.progress)
    notes = crash_notes.key(cfg.workspace)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the embed job draws its own bar
    resources = ray.cluster_resources()
    node_cpus = max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=None) or None
    actors, gpus_each, actor_cpus, device = actor_plan(resources, cfg.device, cfg.threads, node_cpus)
    log.info("ray: %d CPU, %d GPU in the cluster; %d model actor(s) on %s", int(resources.get("CPU", 0)), int(resources.get("GPU", 0)),
             actors, device)
    if cfg.read_options.jpeg_on_device and device == "cpu":
        log.warning("--gpu-jpeg on a Ray cluster without GPUs: the model actor decodes the grayscale JPEGs on its CPU, beside the "
                    "model, instead of the decode tasks; it is meant for GPU actors")
    if cfg.read_options.letterbox_on_device and device == "cpu":
        log.warning("--gpu-letterbox on a Ray cluster without GPUs: the model actor letterboxes the grayscale images on its CPU, "
                    "beside the model, instead of the decode tasks; it is meant for GPU actors")

    chunk = max(1, min(4, cfg.batch_size))
    ds = ray.data.from_items(
        [{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns} for e in todo],
        override_num_blocks=max(1, min(len(todo) // chunk + 1, 10_000)),
    )
    ds = _map_batches(
        ds, {"max_retries": crash_notes.RETRIES},  # (Ray Data's default: without end)
        _read_chunk, batch_size=chunk, batch_format="numpy", num_cpus=1,
        fn_kwargs={"options": cfg.read_options, "cfg": cfg.preprocess, "notes": notes},
    )
    ds = _map_batches(
        ds, {"max_task_retries": crash_notes.RETRIES},
        EmbedActor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_each, num_cpus=actor_cpus,
        fn_constructor_kwargs={
            "checkpoint_paths": [c.path for c in checkpoints],
            "sha256s": [c.sha256 for c in checkpoints],
            "prompt_specs": [_spec(ps) for ps in prompt_sets],
            "device": device,
            "threads": cfg.threads or (actor_threads(actor_cpus) if device == "cpu" else None),
            "read_options": cfg.read_options,
            "preprocess": cfg.preprocess,
            "notes": notes,
            "amp": cfg.amp,
        },
    )
    shas = [c.sha256 for c in checkpoints]
    counts = {} if counts is None else counts
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ok = np.asarray(batch["ok"], dtype=bool)
        how = np.asarray(batch["how"])
        for key, code in (("device_decoded", ON_DEVICE), ("device_rejected", DEVICE_REJECTED), ("worker_decoded", READER_SHARE)):
            counts[key] = counts.get(key, 0) + int((how == code).sum())
        counts["device_letterboxed"] = counts.get("device_letterboxed", 0) + int(np.asarray(batch["letterboxed"]).sum())
        records = [pickle.loads(r) for r in batch["record"]]
        rows = [r for r, good in zip(records, ok) if good]
        errors = [r for r, good in zip(records, ok) if not good]
        mapped = None
        if rows:
            mapped = {
                "embeddings": {sha: np.asarray(batch[f"emb_{i}"])[ok] for i, sha in enumerate(shas)},
                "probabilities": {
                    ps.id: {
                        (shas[k] if k < len(shas) else ENSEMBLE_MEMBER): np.asarray(batch[f"prob_{j}_{k}"])[ok]
                        for k in range(len(shas) + 1)
                    }
                    for j, ps in enumerate(prompt_sets)
                },
            }
        yield rows, mapped, errors
    # Every batch is done: this node's notes left are those of retries that ran elsewhere. (Kept
    # when the run fails, so that the next run goes on counting.)
    shutil.rmtree(crash_notes.folder(notes), ignore_errors=True)


def _map_batches(ds, retries: dict, *args, **kwargs):
    """``ds.map_batches(*args, **kwargs)`` with Ray's retry bounds ``retries``, which Ray Data takes
    only among its ``ray_remote_args`` (deprecated since Ray 2.60, to be removed in 2.64: where
    refused, without them, and a task whose process dies is retried as Ray sees fit)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        try:
            return ds.map_batches(*args, **kwargs, **retries)
        except TypeError as exc:
            log.warning("this Ray does not take %s (%s): retries after a worker died are not bounded", ", ".join(retries), exc)
            return ds.map_batches(*args, **kwargs)


def _spec(ps: PromptSet) -> dict:
    d = ps.to_dict()
    return {"name": d["name"], "positive": d["positive"], "negative": d["negative"], "finding": d["findings"]}
