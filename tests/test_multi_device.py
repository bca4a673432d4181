"""One model replica per device with the local engine (issue 6), exercised with CPU replicas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curator.model import load_checkpoint, resolve_devices
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.pipelines.stages import Mapper
from curator.prompts import default_prompt_set
from curator.workspace import Workspace
from tests.conftest import write_raster_archive


def test_replicas_split_each_batch_and_give_the_single_device_result(tiny_checkpoints):
    ck = load_checkpoint(tiny_checkpoints[0], "cpu")
    single = Mapper([ck], [default_prompt_set()])
    multi = Mapper([ck], [default_prompt_set()], resolve_devices("cpu,cpu,cpu"))
    reps = multi.replicas[ck.sha256]
    assert len(reps) == 3 and reps[1].model is not ck.model  # real copies
    x = torch.randn(7, 3, 224, 224)
    a = single(x)
    seen = []
    for r in reps:
        orig = r.encode_images
        r.encode_images = lambda x, orig=orig: (seen.append(len(x)), orig(x))[1]
    b = multi(x)
    assert sorted(seen) == [2, 2, 3]  # 7 images in three shards, one per replica
    np.testing.assert_allclose(b["embeddings"][ck.sha256], a["embeddings"][ck.sha256], atol=1e-6, rtol=0)
    for m, arr in a["probabilities"][default_prompt_set().id].items():
        np.testing.assert_allclose(b["probabilities"][default_prompt_set().id][m], arr, atol=1e-6, rtol=0)


def test_embed_with_several_devices_matches_one(tmp_path, tiny_checkpoints):
    arc = tmp_path / "arc"
    write_raster_archive(arc, 9, seed=2)
    common = dict(archives=[str(arc)], checkpoints=[str(c) for c in tiny_checkpoints[:2]], progress=False, workers=0, batch_size=4, threads=1)
    one = run_embed(EmbedConfig(workspace=str(tmp_path / "one"), device="cpu", **common))
    two = run_embed(EmbedConfig(workspace=str(tmp_path / "two"), device="cpu,cpu", **common))
    assert two.device == "cpu, cpu" and one.device == "cpu"
    assert two.processed == one.processed == 9

    def probs(root):
        ws = Workspace(root)
        ids = {r["image_id"]: r["path"] for r in ws.read_table("catalog", columns=["image_id", "path"]).to_pylist()}
        return {(ids[r.pop("image_id")], r.pop("member"), r.pop("prompt_set")): np.array(list(r.values())) for r in ws.read_table("predictions").to_pylist()}

    pa_, pb = probs(tmp_path / "one"), probs(tmp_path / "two")
    assert pa_.keys() == pb.keys() and len(pa_) == 27
    assert max(float(np.abs(pa_[k] - pb[k]).max()) for k in pa_) <= 1e-6


def test_device_lists_are_checked():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    if not torch.cuda.is_available():
        assert resolve_devices(None) == [torch.device("cpu")]
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_devices("cuda")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_devices("cuda:0,cuda:1")
    else:
        assert resolve_devices("cuda") == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def test_default_decode_workers_use_every_core_when_the_model_is_on_a_gpu(monkeypatch):
    from curator.pipelines import embed

    monkeypatch.setattr(embed.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert embed.default_workers(gpu=True) == 16  # decoding is the limit there
    assert embed.default_workers(gpu=False) == 8  # the CPU model needs cores too
    monkeypatch.setattr(embed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert embed.default_workers(gpu=True) == 2 and embed.default_workers(gpu=False) == 2


# (on a machine with a GPU, also two replicas on it: the sharded stage's streams and copies on CUDA)
@pytest.mark.parametrize("devices,overlap", [("cpu,cpu", False), ("cpu,cpu,cpu", True)]
                         + ([("cuda:0,cuda:0", True)] if torch.cuda.is_available() else []))
def test_device_stage_is_shared_by_every_device(tmp_path, tiny_checkpoints, monkeypatch, devices, overlap):
    """--gpu-jpeg / --gpu-letterbox with several devices: each takes a contiguous share of every
    batch's images and JPEGs; the workspace equals the one-device run's, image ids included, and
    the in-hand note names all of a batch's JPEGs while they are decoded."""
    import io
    import json

    from PIL import Image

    from curator.pipelines import embed as embed_mod
    from curator.readers import ReadOptions

    rng = np.random.default_rng(3)
    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(14):
        film = (rng.random((260 + 20 * i, 240)) * 255).astype(np.uint8)
        if i % 2:
            buf = io.BytesIO()
            Image.fromarray(film).save(buf, format="JPEG", quality=90)
            (arc / f"f{i:02d}.jpg").write_bytes(buf.getvalue())  # decoded beside the model (--gpu-jpeg)
        else:
            Image.fromarray(film).save(arc / f"f{i:02d}.png")  # letterboxed beside the model (--gpu-letterbox)
    (arc / "broken.jpg").write_bytes(buf.getvalue()[:300])
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], progress=False, workers=2, batch_size=6, threads=1,
                  read_options=ReadOptions(jpeg_on_device=True, letterbox_on_device=True), overlap=overlap)
    one = run_embed(EmbedConfig(workspace=str(tmp_path / "one"), device=devices.split(",")[0], **common))
    calls, notes, real_stage, real_decode = [], [], embed_mod._device_stage, embed_mod.device_jpeg.decode

    def stage(part, cfg, device, timing, note=True):
        calls.append((len(part["images"]), len(part["jpegs"]), note))
        return real_stage(part, cfg, device, timing, note)

    def decode(blobs, device):
        notes.append(len(json.loads((tmp_path / "many" / embed_mod.IN_HAND_NOTE).read_text())))
        return real_decode(blobs, device)

    monkeypatch.setattr(embed_mod, "_device_stage", stage)
    monkeypatch.setattr(embed_mod.device_jpeg, "decode", decode)
    many = run_embed(EmbedConfig(workspace=str(tmp_path / "many"), device=devices, **common))
    n = devices.count(",") + 1
    assert many.processed == one.processed == 14 and many.failed == one.failed
    assert (many.device_decoded, many.device_rejected) == (one.device_decoded, one.device_rejected) == (7, 0)
    assert calls and all(not note for *_, note in calls) and max(i + j for i, j, _ in calls) <= -(-6 // n) * 2
    batches = -(-14 // 6)
    assert len(calls) > batches and sum(i for i, _, _ in calls) == 7 and sum(j for _, j, _ in calls) == 7  # batches were shared out
    assert notes and min(notes) >= max(j for _, j, _ in calls)  # the note holds the whole batch's JPEGs, not one share
    ws = {root: Workspace(tmp_path / root) for root in ("one", "many")}
    cat = {r: {row["path"]: row for row in ws[r].read_table("catalog").to_pylist()} for r in ws}
    assert cat["one"].keys() == cat["many"].keys()
    for path, row in cat["one"].items():
        assert {k: v for k, v in row.items() if k not in ("run_id", "added_at")} == {
            k: v for k, v in cat["many"][path].items() if k not in ("run_id", "added_at")}, path  # image ids: the same order
    emb = {r: {row["image_id"]: np.asarray(row["embedding"]) for row in ws[r].read_table("embeddings").to_pylist()} for r in ws}
    assert emb["one"].keys() == emb["many"].keys()
    for k in emb["one"]:
        # (on CUDA the model runs in fp16 autocast, and the replicas batch the films differently)
        np.testing.assert_allclose(emb["many"][k], emb["one"][k], atol=1e-6 if devices.startswith("cpu") else 2e-3, rtol=0)
    assert {r["path"] for r in ws["many"].read_table("errors").to_pylist()} == {str(arc / "broken.jpg")}
