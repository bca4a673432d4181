"""The Ray engine writes the workspace the local engine writes (issue 6), on a real local Ray cluster."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray
from PIL import Image

from curator.cli import main
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.preprocess import DEFAULT_CFG
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
    # (files named *poison-read* / *poison-device* kill the process reading / decoding them on the device: curator.faults)
    env = {"CURATOR_ABORT_READING": "poison-read", "CURATOR_ABORT_DECODING": "poison-device"}
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
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
    # without --threads, a CPU actor takes half the cluster's CPUs, at most its largest node's
    assert actor_plan({"CPU": 16.0}, None, None, node_cpus=16.0)[2] == pytest.approx(7.99)
    assert actor_plan({"CPU": 64.0}, "cpu", None, node_cpus=8.0)[2] == pytest.approx(3.99)
    assert actor_plan({"CPU": 2.0}, None, None)[2] == pytest.approx(0.99)
    from curator.pipelines.ray_engine import actor_threads

    assert [actor_threads(c) for c in (0.99, 3.99, 7.99)] == [1, 4, 8]


def test_ray_flags_are_checked_before_a_workspace_is_made(tmp_path, tiny_checkpoints, capsys, monkeypatch):
    """--device the Ray engine cannot honour, --workers, an address that does not answer: clear errors,
    quickly (ray.init would wait for ever on a dead address), and no workspace."""
    import socket

    write_raster_archive(tmp_path / "arc", 2)
    base = ["embed", str(tmp_path / "arc"), "--workspace", str(tmp_path / "ws"), "--checkpoint", str(tiny_checkpoints[0]), "--engine", "ray"]
    held = socket.socket()  # a port bound but not listening, through the whole test: connections are refused
    held.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{held.getsockname()[1]}"
    try:
        _check_ray_flags(tmp_path, base, dead, capsys, monkeypatch)
    finally:
        held.close()


def _check_ray_flags(tmp_path, base, dead, capsys, monkeypatch):
    import time

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for extra, says in ((["--device", "cuda:1"], "Ray, not curator, picks the GPUs"), (["--device", "bogus"], "with --engine ray"),
                        (["--workers", "2"], "--workers is for --engine local"), (["--address", dead], "no Ray cluster answers there"),
                        (["--address", "head"], "expected HOST:PORT")):
        t0 = time.perf_counter()
        assert main(base + extra) in (1, 2), extra
        assert says in capsys.readouterr().err, extra
        assert time.perf_counter() - t0 < 30
        assert not (tmp_path / "ws").exists()
    monkeypatch.setenv("RAY_ADDRESS", dead)
    assert main(base) == 1
    assert f"RAY_ADDRESS={dead} (from the environment)" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_a_run_ended_by_system_exit_is_recorded_as_interrupted(tmp_path, tiny_checkpoints, monkeypatch):
    """Ray's SIGTERM handler ends the driver with SystemExit: the run keeps what it committed and
    says it was interrupted, not completed (shown here on the local engine, whose loop is the same)."""
    from curator.pipelines import stages
    from curator.query import run_query

    write_raster_archive(tmp_path / "arc", 6)
    cfg = EmbedConfig(archives=[str(tmp_path / "arc")], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])],
                      device="cpu", workers=0, batch_size=2, flush_rows=2, progress=False)
    add = stages.WorkspaceWriter.add
    calls = []

    def stop_at_the_second_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit(15)
        return add(self, *a, **k)

    monkeypatch.setattr(stages.WorkspaceWriter, "add", stop_at_the_second_batch)
    with pytest.raises(SystemExit):
        run_embed(cfg)
    monkeypatch.setattr(stages.WorkspaceWriter, "add", add)
    w = Workspace(tmp_path / "ws")
    runs = run_query(w, "SELECT status, counts FROM runs")
    assert runs.status.tolist() == ["interrupted"]
    assert run_query(w, "SELECT count(*) AS n FROM catalog").n[0] == 2  # the first batch, committed
    again = run_embed(cfg)
    assert (again.unchanged, again.processed) == (2, 4)


# ---------------------------------------------------------------------------------------------
# --gpu-jpeg on Ray, and files that kill the process reading them
# ---------------------------------------------------------------------------------------------
def _tables(ws):
    w = Workspace(ws)
    cat = {r["path"]: r for r in w.read_table("catalog").to_pylist()}
    ids = {r["image_id"]: p for p, r in cat.items()}
    emb = {ids[r["image_id"]]: np.asarray(r["embedding"], dtype=np.float32) for r in w.read_table("embeddings").to_pylist()}
    skip = ("image_id", "prompt_set", "member")
    preds = {(ids[r["image_id"]], r["member"]): np.array([v for k, v in sorted(r.items()) if k not in skip], dtype=np.float64)
             for r in w.read_table("predictions").to_pylist()}
    errors = {r["path"]: (r["stage"], r["kind"], r["error"]) for r in w.read_table("errors").to_pylist()}
    return w, cat, emb, preds, errors


def _same_images(a, b, conversions_too: bool = True):
    """Two workspaces hold the same rows (every catalog column but the run's own; conversion only
    if asked), the same error kinds, and embeddings / probabilities within 1e-6."""
    _, cat_a, emb_a, pred_a, err_a = _tables(a)
    _, cat_b, emb_b, pred_b, err_b = _tables(b)
    assert cat_a.keys() == cat_b.keys()
    skip = SKIP_COLS | (set() if conversions_too else {"conversion"})
    for p in cat_a:
        assert {k: v for k, v in cat_a[p].items() if k not in skip} == {k: v for k, v in cat_b[p].items() if k not in skip}, p
    assert {p: e[:2] for p, e in err_a.items()} == {p: e[:2] for p, e in err_b.items()}
    assert emb_a.keys() == emb_b.keys() and pred_a.keys() == pred_b.keys()
    for k in emb_a:
        np.testing.assert_allclose(emb_a[k], emb_b[k], atol=1e-6, rtol=0)
    assert max(float(np.abs(pred_a[k] - pred_b[k]).max()) for k in pred_a) <= 1e-6
    return cat_a, cat_b, err_a, err_b


@pytest.mark.parametrize("share,fast", [(0.0, False), (0.5, False), (0.5, True)])
def test_gpu_jpeg_on_ray_decodes_in_the_model_actors_as_the_local_engine_does(tmp_path, tiny_checkpoints, ray_cluster, share, fast):
    import zlib

    from curator.readers import ReadOptions
    from tests.test_device_jpeg import _archive as jpeg_archive

    def grey_in(arc):
        return sorted(str(arc / n) for n in ("g0.jpg", "g1.jpg", "g2.jpg", "sub/gutted.jpg"))

    def drawn(paths):  # the workers' share: a fixed draw from the path
        return {p for p in paths if zlib.crc32(p.encode()) < share * 2**32}

    # a folder name for which a share of 0.5 gives both sides some of the JPEGs
    arc = next(a for a in (tmp_path / f"arc{i}" for i in range(100)) if share == 0 or 0 < len(drawn(grey_in(a))) < 4)
    jpeg_archive(arc)  # 4 grayscale JPEGs (one progressive, one gutted), a colour JPEG, a PNG, a truncated and an empty JPEG
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, threads=1, batch_size=3,
                  read_options=ReadOptions(jpeg_on_device=True, jpeg_draft_min_side=320 if fast else None), worker_jpeg_share=share)
    local = run_embed(EmbedConfig(workspace=str(tmp_path / "local"), workers=0, **common))
    remote = run_embed(EmbedConfig(workspace=str(tmp_path / "ray"), engine="ray", **common))
    # the CPU path alone: for the workers' share (all of them under --fast-jpeg: the device's differ from it there)
    cpu = run_embed(EmbedConfig(**{**common, "read_options": ReadOptions(jpeg_draft_min_side=320 if fast else None), "worker_jpeg_share": None},
                                workspace=str(tmp_path / "cpu"), workers=0))

    assert remote.processed == local.processed == cpu.processed == 6
    assert remote.failed == local.failed == cpu.failed == {"corrupt_image": 1, "empty_file": 1}
    grey = grey_in(arc)
    kept = drawn(grey)
    assert all(os.path.exists(p) for p in grey) and (not kept if share == 0 else 0 < len(kept) < 4)
    assert (remote.device_decoded, remote.worker_decoded, remote.device_rejected) == (len(grey) - len(kept), len(kept), 0)
    assert (local.device_decoded, local.worker_decoded, local.device_rejected) == (len(grey) - len(kept), len(kept), 0)
    cat_l, cat_r, _, _ = _same_images(tmp_path / "local", tmp_path / "ray")  # conversions too
    for p, row in cat_r.items():
        on_cpu = "raster+dct/2" if fast and p in kept else "raster"  # (the colour JPEG and the PNG are too small to reduce)
        assert row["conversion"] == ("raster+cpu-jpeg" if p in grey and p not in kept else on_cpu), p
    if fast:  # the workers' share as a --fast-jpeg run reads it
        cat_c, emb_c, _, _ = _by_path(Workspace(tmp_path / "cpu"))
        _, emb_r, _, _ = _by_path(Workspace(tmp_path / "ray"))
        assert all(cat_c[p]["conversion"] == "raster+dct/2" for p in kept)
        shared = [k for k in emb_r if k[0] in kept]
        assert len(shared) == len(kept)
        for k in shared:
            np.testing.assert_allclose(emb_r[k], emb_c[k], atol=1e-6, rtol=0)
    else:
        _same_images(tmp_path / "cpu", tmp_path / "ray", conversions_too=False)  # on the CPU the decode is the exact one
    w = Workspace(tmp_path / "ray")
    run = w.read_table("runs").to_pylist()[-1]
    options, counts = json.loads(run["options"]), json.loads(run["counts"])
    assert options["engine"] == "ray" and options["gpu_jpeg"] is True and options["worker_jpeg_share"] == share
    assert (counts["device_decoded"], counts["worker_decoded"]) == (len(grey) - len(kept), len(kept))
    assert w.manifest["reading"].get("jpeg_on_device") is True


@pytest.mark.parametrize("gpu_jpeg", [False, True])
def test_gpu_letterbox_on_ray_letterboxes_in_the_model_actors_as_the_local_engine_does(tmp_path, tiny_checkpoints, ray_cluster, gpu_jpeg):
    from curator.readers import ReadOptions
    from tests.test_device_jpeg import _mixed_archive

    arc = tmp_path / "arc"
    _mixed_archive(arc)  # grey and colour JPEGs, 8- and 16-bit PNGs (one tall, one too thin for the canvas), DICOM MONOCHROME1/2
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, threads=1, batch_size=4)
    options = ReadOptions(letterbox_on_device=True, jpeg_on_device=gpu_jpeg)
    local = run_embed(EmbedConfig(workspace=str(tmp_path / "local"), workers=0, read_options=options, **common))
    remote = run_embed(EmbedConfig(workspace=str(tmp_path / "ray"), engine="ray", read_options=options, **common))
    exact = run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), workers=0, **common))

    assert remote.processed == local.processed == exact.processed == 10 and remote.failed == local.failed == exact.failed
    # grey images that fit the canvas: 3 PNGs, 2 DICOMs, and the 4 grey JPEGs unless --gpu-jpeg decodes them
    want = 5 + (0 if gpu_jpeg else 4)
    assert remote.device_letterboxed == local.device_letterboxed == want
    assert any(f"{want} images letterboxed on the device" in line for line in remote.lines())
    assert exact.device_letterboxed == 0 and not any("--gpu-letterbox" in line for line in exact.lines())
    _same_images(tmp_path / "local", tmp_path / "ray")  # conversions too
    _same_images(tmp_path / "exact", tmp_path / "ray", conversions_too=not gpu_jpeg)  # the same canvases as the default path
    run = Workspace(tmp_path / "ray").read_table("runs").to_pylist()[-1]
    assert json.loads(run["options"])["gpu_letterbox"] is True and json.loads(run["counts"])["device_letterboxed"] == want


@pytest.fixture
def deadline():
    """Fail a test whose Ray run does not end within 180 s, as a run retrying a dying task for ever
    would (SIGALRM in the main thread; the per-file time limit of an exact read in this process
    takes the same timer over, so the deadline covers what runs before one)."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("the Ray run did not end within 180 s: retrying a dying task for ever?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(180)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _films(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name in names:
        Image.fromarray((rng.random((240, 200)) * 255).astype(np.uint8)).save(folder / name)
    return [str(folder / n) for n in names]


def test_a_file_that_kills_its_ray_reader_task_is_recorded_and_the_run_goes_on(tmp_path, tiny_checkpoints, ray_cluster, monkeypatch, deadline):
    """Ray runs a task again for ever when its process dies: reading b-poison-read.png aborts the
    process (CURATOR_ABORT_READING, set in the cluster by the fixture), and the crash notes turn the
    second death into an error row instead of a loop."""
    from curator.pipelines import crash_notes

    names = [f"a{i}.png" for i in range(4)] + ["b-poison-read.png"] + [f"c{i}.png" for i in range(3)]
    paths = _films(tmp_path / "arc", names)
    common = dict(archives=[str(tmp_path / "arc")], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, threads=1,
                  batch_size=3)
    remote = run_embed(EmbedConfig(workspace=str(tmp_path / "ray"), engine="ray", **common))
    assert remote.processed == 7 and remote.failed == {"decoder_crashed": 1}
    assert not crash_notes.folder(crash_notes.key(tmp_path / "ray")).exists()  # a completed run's notes go
    monkeypatch.setenv("CURATOR_ABORT_READING", "poison-read")
    local = run_embed(EmbedConfig(workspace=str(tmp_path / "local"), workers=2, **common))  # the local engine's own crash handling
    assert local.failed == {"decoder_crashed": 1}
    cat_l, cat_r, err_l, err_r = _same_images(tmp_path / "local", tmp_path / "ray")
    assert sorted(cat_r) == sorted(p for p in paths if "poison" not in p)
    poison = str(tmp_path / "arc" / "b-poison-read.png")
    assert err_r[poison][:2] == ("read", "decoder_crashed")
    assert err_r[poison][2].startswith("reading this file ended the process reading it 2 times"), err_r[poison]
    again = run_embed(EmbedConfig(workspace=str(tmp_path / "ray"), engine="ray", **common))
    assert again.processed == 0 and again.known_errors == 1 and again.unchanged == 7


def test_a_batch_whose_device_decode_kills_a_ray_actor_is_read_the_exact_way(tmp_path, tiny_checkpoints, ray_cluster, deadline):
    """With --gpu-jpeg an actor that dies decoding a batch (CURATOR_ABORT_DECODING: a path with
    'poison-device' in the batch) is restarted by Ray, which hands it the batch again: the crash
    note has the actor read that batch's JPEGs the exact way, in the same run."""
    from curator.readers import ReadOptions
    from tests.test_device_jpeg import _film, _jpeg

    arc = tmp_path / "arc"
    arc.mkdir()
    # d-...: kills the actor decoding it on the device, then twice more when read the exact way there: an error row
    names = ["a0.jpg", "a1.jpg", "b-poison-device.jpg", "c0.jpg", "c1.jpg", "c2.jpg", "d-poison-device-poison-read.jpg", "e0.jpg"]
    for i, name in enumerate(names):
        (arc / name).write_bytes(_jpeg(_film(500 + 40 * i, 420, seed=i), quality=90))
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, threads=1, batch_size=3)
    remote = run_embed(EmbedConfig(workspace=str(tmp_path / "ray"), engine="ray", read_options=ReadOptions(jpeg_on_device=True), **common))
    exact = run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), workers=0, **common))  # (no crash without reader workers)
    crasher = str(arc / names[6])
    assert exact.processed == 8 and remote.processed == 7 and remote.failed == {"decoder_crashed": 1}
    _, cat_r, _, _, err_r = _tables(tmp_path / "ray")
    assert err_r[crasher][:2] == ("read", "decoder_crashed") and "2 times" in err_r[crasher][2]
    _, cat_e, emb_e, pred_e, _ = _tables(tmp_path / "exact")
    _, _, emb_r, pred_r, _ = _tables(tmp_path / "ray")
    assert sorted(cat_r) == sorted(p for p in cat_e if p != crasher)
    for p in cat_r:
        np.testing.assert_allclose(emb_r[p], emb_e[p], atol=1e-6, rtol=0)  # the CPU decode is the exact one
    assert max(float(np.abs(pred_r[k] - pred_e[k]).max()) for k in pred_r) <= 1e-6
    again = {p for p, r in cat_r.items() if r["conversion"] == "raster"}  # read the exact way by the restarted actor
    assert str(arc / "b-poison-device.jpg") in again
    assert remote.device_rejected == len(again) + 1 and remote.device_decoded == 7 - len(again) > 0  # (+1: the crasher)
    assert all(r["conversion"] == "raster+cpu-jpeg" for p, r in cat_r.items() if p not in again)


def test_crash_notes_count_the_deaths_of_each_file_in_hand(tmp_path):
    from curator.discover import FileEntry
    from curator.pipelines.crash_notes import DEATHS, CrashNote
    from curator.pipelines.ray_engine import read_noted
    from curator.readers import ReadOptions

    batch = ["/a.png", "/b.png"]
    first = CrashNote(tmp_path, "read", batch)
    assert first.crashed(0) == first.crashed(1) == 0
    first.hold(0)
    first.hold(1)  # ... and the process dies holding index 1 (the test closes its file)
    os.close(first._fd)
    second = CrashNote(tmp_path, "read", batch)
    assert (second.crashed(0), second.crashed(1)) == (0, 1)
    assert CrashNote(tmp_path, "device", batch).crashed(1) == 0 and CrashNote(tmp_path, "read", batch[:1]).crashed(1) == 0  # other notes
    second.hold(1)  # dies again
    os.close(second._fd)
    third = CrashNote(tmp_path, "read", batch)
    assert third.crashed(1) == 2 == DEATHS
    third.hold(0)  # (a death at another index adds to that index)
    assert CrashNote(tmp_path, "read", batch).deaths == {0: 1, 1: 2}
    third.done()
    assert CrashNote(tmp_path, "read", batch).deaths == {}
    for junk in ('{"at": 1, "deaths": {"0"', '[1, 2]', '{"at": 1, "deaths": {"x": 1}}', '{"at": 0, "deaths": null}'):
        third.path.write_text(junk)  # not a whole note: as none (the last one: the death it records)
        assert CrashNote(tmp_path, "read", batch).deaths == ({0: 1} if "null" in junk else {}), junk

    # a notes folder that is not a real folder of this user's (here a link) is not used: no notes
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    linked = CrashNote(tmp_path / "link", "read", batch)
    linked.hold(0)
    linked.done()
    assert list(real.iterdir()) == []
    fresh = CrashNote(tmp_path / "made", "read", batch)
    fresh.hold(0)
    assert (tmp_path / "made").stat().st_mode & 0o777 == 0o700 and fresh.path.exists()
    fresh.done()

    # read_noted: a file at DEATHS deaths is an error row without being read; the others are read
    arc = tmp_path / "arc"
    paths = _films(arc, ["x0.png", "x1.png", "x2.png"])
    entries = [FileEntry(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    note = CrashNote(tmp_path / "notes", "read", paths)
    note.deaths = {1: DEATHS, 2: DEATHS - 1}
    items = read_noted(entries, ReadOptions(), DEFAULT_CFG, note)
    assert [it["ok"] for it in items] == [True, False, True]
    assert items[1]["error"]["kind"] == "decoder_crashed" and items[1]["error"]["path"] == paths[1]
    assert json.loads(note.path.read_text())["at"] == 2  # the last file read was in hand


def test_ray_retries_are_bounded_and_a_rerun_goes_on_counting_deaths(tmp_path, tiny_checkpoints, ray_cluster, monkeypatch, deadline):
    """With one retry allowed, the second death of the process reading b-poison-read.png leaves
    Ray no retry: the run fails (instead of looping) and keeps its crash notes; the rerun reads
    them, records the file at once and completes, removing them."""
    from curator.pipelines import crash_notes

    _films(tmp_path / "arc", ["a0.png", "b-poison-read.png", "c0.png"])
    common = dict(archives=[str(tmp_path / "arc")], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                  progress=False, threads=1, batch_size=3, engine="ray")
    notes = crash_notes.folder(crash_notes.key(tmp_path / "ws"))
    monkeypatch.setattr(crash_notes, "RETRIES", 1)
    with pytest.raises(Exception):
        run_embed(EmbedConfig(**common))
    assert [json.loads(p.read_text()) for p in notes.iterdir()] == [{"at": 1, "deaths": {"1": 1}}]  # (two deaths: one counted, one "at")
    runs = Workspace(tmp_path / "ws").read_table("runs").to_pylist()
    assert [r["status"] for r in runs] == ["failed"]
    monkeypatch.setattr(crash_notes, "RETRIES", 0)  # the rerun needs no retry at all
    again = run_embed(EmbedConfig(**common))
    assert again.processed == 2 and again.failed == {"decoder_crashed": 1}
    assert not notes.exists()
