"""The Ray engine writes the workspace the local engine writes (issue 6), on a real local Ray cluster."""

from __future__ import annotations

import json
import numpy as np
import pytest
import ray
from PIL import Image

from curator.cli import main
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.workspace import Workspace
from tests.conftest import write_raster_archive

SKIP_COLS = {"image_id", "run_id", "added_at"}


def _archive(root):
    write_raster_archive(root, 14, seed=5)
    # a 16-bit PNG, a zero-byte DICOM and a text file posing as one: errors must match too
    arr = (np.random.default_rng(1).random((300, 260)) * 60000).astype(np.uint16)
    Image.fromarray(arr).save(root / "deep16.png")
    (root / "empty.dcm").write_bytes(b"")
    (root / "notes.dcm").write_text("not a dicom file\n")
    return root


def _by_path(ws: Workspace):
    cat = ws.read_table("catalog").to_pylist()
    ids = {r["image_id"]: r["path"] for r in cat}
    catalog = {r["path"]: {k: v for k, v in r.items() if k not in SKIP_COLS} for r in cat}
    emb = {}
    for r in ws.read_table("embeddings").to_pylist():
        emb[(ids[r["image_id"]], r["checkpoint"])] = np.asarray(r["embedding"], dtype=np.float32)
    preds = {}
    for r in ws.read_table("predictions").to_pylist():
        key = (ids[r["image_id"]], r["prompt_set"], r["member"])
        preds[key] = np.array([v for k, v in r.items() if k not in ("image_id", "prompt_set", "member")], dtype=np.float64)
    errors = {r["path"]: (r["stage"], r["kind"], r["error"]) for r in ws.read_table("errors").to_pylist()}
    return catalog, emb, preds, errors


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_engine_equals_local_engine(tmp_path, tiny_checkpoints, ray_cluster):
    archive = _archive(tmp_path / "archive")
    cks = [str(p) for p in tiny_checkpoints[:2]]  # an ensemble: per-member and ensemble rows
    common = dict(archives=[str(archive)], checkpoints=cks, device="cpu", progress=False, threads=1)
    local = run_embed(EmbedConfig(workspace=str(tmp_path / "local"), workers=0, batch_size=5, **common))
    remote = run_embed(EmbedConfig(workspace=str(tmp_path / "ray"), batch_size=4, engine="ray", **common))

    assert remote.processed == local.processed == 15
    assert remote.failed == local.failed and sum(local.failed.values()) == 2
    cat_l, emb_l, pred_l, err_l = _by_path(Workspace(tmp_path / "local"))
    cat_r, emb_r, pred_r, err_r = _by_path(Workspace(tmp_path / "ray"))
    assert cat_r == cat_l  # same rows, every column (size, hash, conversion, dims...)
    assert err_r == err_l
    assert emb_r.keys() == emb_l.keys() and len(emb_l) == 2 * 15
    for k in emb_l:
        np.testing.assert_allclose(emb_r[k], emb_l[k], atol=1e-6, rtol=0)
    assert pred_r.keys() == pred_l.keys() and len(pred_l) == 3 * 15  # 2 members + ensemble
    worst = max(float(np.abs(pred_r[k] - pred_l[k]).max()) for k in pred_l)
    assert worst <= 1e-6, worst
    # image ids are unique and contiguous in both, whatever order Ray delivered rows in
    ids = sorted(Workspace(tmp_path / "ray").read_table("catalog")["image_id"].to_pylist())
    assert ids == list(range(ids[0], ids[0] + 15))
    runs = Workspace(tmp_path / "ray").read_table("runs").to_pylist()
    assert json.loads(runs[-1]["options"])["engine"] == "ray"

    # a rerun with the Ray engine finds nothing new: the skip logic is the engine-independent one
    again = run_embed(EmbedConfig(workspace=str(tmp_path / "ray"), batch_size=4, engine="ray", **common))
    assert again.processed == 0 and again.unchanged == 15 and again.known_errors == 2


def test_address_without_ray_engine_is_refused(tmp_path, tiny_checkpoints, capsys):
    rc = main(["embed", str(tmp_path), "--workspace", str(tmp_path / "ws"),
               "--checkpoint", str(tiny_checkpoints[0]), "--address", "auto"])
    assert rc == 2
    assert "--address is for --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_actor_plan_puts_one_model_actor_on_each_gpu():
    """The model actors for a cluster's resources (a pure function: a GPU cluster cannot be started here)."""
    from curator.pipelines.ray_engine import actor_plan

    assert actor_plan({"CPU": 64.0, "GPU": 8.0}, None, None) == (8, 1, 0.0, "cuda")  # one per GPU, no CPU taken from the decoders
    assert actor_plan({"CPU": 64.0, "GPU": 8.0}, "cuda", 4) == (8, 1, 0.0, "cuda")
    n, gpus, cpus, device = actor_plan({"CPU": 64.0, "GPU": 8.0}, "cpu", 4)  # asked for the CPU on a GPU cluster
    assert (n, gpus, device) == (1, 0, "cpu") and cpus == pytest.approx(3.99)
    n, gpus, cpus, device = actor_plan({"CPU": 2.0}, None, 8)  # CPU cluster: one actor, leaving a CPU to the decode tasks
    assert (n, gpus, device) == (1, 0, "cpu") and cpus == pytest.approx(0.99)
    with pytest.raises(RuntimeError, match="has no GPU"):
        actor_plan({"CPU": 16.0}, "cuda:0", None)
