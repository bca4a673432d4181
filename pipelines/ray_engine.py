"""Ray engine for the embed job: the same reader and mapper stages, run on Ray Data.

Reader: stateless Ray tasks (one CPU each) that call :func:`stages.read_item` on chunks of files.
Mapper: a pool of actors, one per GPU (or a single CPU actor when the cluster has no GPU), each
holding every checkpoint and the prompt sets' text weights (:class:`stages.Mapper`).
Writer: stays in the driver, the only process that holds the workspace lock, so a Ray run writes
exactly the parts a local run writes and the crash-safety rules do not change.

Files are read by the Ray workers, so the archive (and the checkpoint files) must be visible at
the same paths on every node: a shared file system, or an object store mounted as one.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator

import numpy as np
import torch

from curator.constants import ENSEMBLE_MEMBER
from curator.discover import FileEntry
from curator.model import Checkpoint
from curator.prompts import PromptSet, parse_prompt_set

from .stages import Mapper, read_item

log = logging.getLogger(__name__)

INSTALL_HINT = "the Ray engine needs Ray Data: pip install 'curator-cxr[ray]' (or pip install 'ray[data]')"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"{INSTALL_HINT} ({exc})") from None
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local one); reuse a running connection."""
    ray = _import_ray()
    if ray.is_initialized():
        if address:
            log.info("ray: already connected; --address %s ignored", address)
        return
    if not address:
        # A local cluster's workers do the decoding, as the local engine's worker processes do:
        # give them the same priority (Ray's default renices workers to 15, which starves them on
        # a shared machine). Set RAY_worker_niceness yourself to keep Ray's default.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)


# ---------------------------------------------------------------------------------------------
# reader tasks
# ---------------------------------------------------------------------------------------------
def _read_chunk(batch: dict, options, cfg) -> dict:
    """Ray task: files -> preprocessed tensors plus pickled catalog rows / error rows."""
    torch.set_num_threads(1)
    items = [
        read_item(FileEntry(str(p), int(s), int(m)), options, cfg)
        for p, s, m in zip(batch["path"], batch["size"], batch["mtime_ns"])
    ]
    shape = next((tuple(it["tensor"].shape) for it in items if it["ok"]), (3, cfg.input_size, cfg.input_size))
    tensors = np.zeros((len(items), *shape), dtype=np.float32)
    for i, it in enumerate(items):
        if it["ok"]:
            tensors[i] = it["tensor"].numpy()
    return {
        "ok": np.array([it["ok"] for it in items], dtype=bool),
        "tensor": tensors,
        "record": np.array([pickle.dumps(it["row"] if it["ok"] else it["error"]) for it in items], dtype=object),
    }


# ---------------------------------------------------------------------------------------------
# mapper actors
# ---------------------------------------------------------------------------------------------
class EmbedActor:
    """Ray actor: loads the checkpoints once, then maps tensor batches to embeddings + probabilities."""

    def __init__(self, checkpoint_paths: list[str], sha256s: list[str], prompt_specs: list[dict], device: str | None, threads: int | None):
        from curator.model import load_checkpoints

        if threads:
            torch.set_num_threads(threads)
        cks = load_checkpoints(checkpoint_paths, device)
        got = [c.sha256 for c in cks]
        if got != sha256s:
            raise RuntimeError(f"checkpoint files differ on this node: expected sha256 {sha256s}, found {got}")
        sets = [parse_prompt_set(spec, "prompt set") for spec in prompt_specs]
        self.mapper = Mapper(cks, sets)
        self.sha256s = sha256s
        self.set_ids = [ps.id for ps in sets]

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"], dtype=bool)
        n = len(ok)
        out = {"ok": ok, "record": batch["record"]}
        mapped = self.mapper(torch.from_numpy(np.ascontiguousarray(batch["tensor"][ok]))) if ok.any() else None
        for i, sha in enumerate(self.sha256s):
            d = self.mapper.checkpoints[i].embed_dim
            emb = np.zeros((n, d), dtype=np.float32)
            if mapped is not None:
                emb[ok] = mapped["embeddings"][sha]
            out[f"emb_{i}"] = emb
        for j, ps_id in enumerate(self.set_ids):
            nf = len(self.mapper.prompt_sets[j].findings)
            for k, member in enumerate([*self.sha256s, None]):
                p = np.zeros((n, nf), dtype=np.float32)
                if mapped is not None:
                    members = mapped["probabilities"][ps_id]
                    p[ok] = members[member if member is not None else ENSEMBLE_MEMBER]
                out[f"prob_{j}_{k}"] = p
        return out


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
def actor_plan(resources: dict, device: str | None, threads: int | None) -> tuple[int, int, float, str]:
    """``(model actors, GPUs each, CPUs each, device)`` for a cluster's resources: one actor per GPU
    (each holding one) when the cluster has GPUs and ``device`` is None or CUDA; else a single CPU
    actor with ``threads`` CPUs (leaving at least one to the decode tasks)."""
    gpus = int(resources.get("GPU", 0))
    want_cuda = device is not None and str(device).startswith("cuda")
    if want_cuda and not gpus:
        raise RuntimeError(f"--device {device} was asked for, but the Ray cluster has no GPU")
    if gpus > 0 and (device is None or want_cuda):
        return gpus, 1, 0.0, "cuda"
    # A CPU actor asks for a hair less than whole CPUs: Ray Data fuses consecutive map stages with
    # equal resource requests, which would run every decode inside the single model actor.
    return 1, 0, min(float(threads or 1), max(1.0, float(resources.get("CPU", 1)) - 1)) - 0.01, "cpu"


def mapped_batches(
    todo: list[FileEntry],
    cfg,
    checkpoints: list[Checkpoint],
    prompt_sets: list[PromptSet],
) -> Iterator[tuple[list[dict], dict | None, list[dict]]]:
    """Yield ``(catalog rows, mapped, error rows)`` as :meth:`WorkspaceWriter.add` takes them."""
    ray = _import_ray()
    connect(cfg.ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the embed job draws its own bar
    resources = ray.cluster_resources()
    actors, gpus_each, actor_cpus, device = actor_plan(resources, cfg.device, cfg.threads)
    log.info("ray: %d CPU, %d GPU in the cluster; %d model actor(s) on %s", int(resources.get("CPU", 0)), int(resources.get("GPU", 0)),
             actors, device)

    chunk = max(1, min(4, cfg.batch_size))
    ds = ray.data.from_items(
        [{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns} for e in todo],
        override_num_blocks=max(1, min(len(todo) // chunk + 1, 10_000)),
    )
    ds = ds.map_batches(
        _read_chunk, batch_size=chunk, batch_format="numpy", num_cpus=1,
        fn_kwargs={"options": cfg.read_options, "cfg": cfg.preprocess},
    )
    ds = ds.map_batches(
        EmbedActor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_each, num_cpus=actor_cpus,
        fn_constructor_kwargs={
            "checkpoint_paths": [c.path for c in checkpoints],
            "sha256s": [c.sha256 for c in checkpoints],
            "prompt_specs": [_spec(ps) for ps in prompt_sets],
            "device": device,
            "threads": cfg.threads,
        },
    )
    shas = [c.sha256 for c in checkpoints]
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ok = np.asarray(batch["ok"], dtype=bool)
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


def _spec(ps: PromptSet) -> dict:
    d = ps.to_dict()
    return {"name": d["name"], "positive": d["positive"], "negative": d["negative"], "finding": d["findings"]}
