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
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"has {n} CUDA device"):
            resolve_devices(f"cuda:{n}")
        with pytest.raises(ValueError, match="named twice"):
            resolve_devices("cuda:0,cuda:0")
    for bad in ("", ",", " , "):
        with pytest.raises(ValueError, match="names no device"):
            resolve_devices(bad)
    for bad in ("bogus", "meta", "cuda:x"):
        with pytest.raises(ValueError, match="not a device curator can run on"):
            resolve_devices(bad)


def test_a_wrong_device_is_a_clear_error_before_a_workspace_is_made(tmp_path, tiny_checkpoints, capsys):
    from curator.cli import main

    (tmp_path / "arc").mkdir()
    for bad, says in (("", "names no device"), ("meta", "not a device curator can run on")):
        assert main(["embed", str(tmp_path / "arc"), "-w", str(tmp_path / "ws"), "-c", str(tiny_checkpoints[0]), "--device", bad]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "ws").exists()


def test_default_decode_workers_use_every_core_when_the_model_is_on_a_gpu(monkeypatch):
    from curator.pipelines import embed

    monkeypatch.setattr(embed.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert embed.default_workers(gpu=True) == 16  # decoding is the limit there
    assert embed.default_workers(gpu=False) == 8  # the CPU model needs cores too
    monkeypatch.setattr(embed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert embed.default_workers(gpu=True) == 2 and embed.default_workers(gpu=False) == 2
