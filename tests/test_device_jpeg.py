"""Opt-in JPEG decoding and letterboxing on the model's device (`curator embed --gpu-jpeg`, issue 6).

CI has no GPU: these tests run the same code with device "cpu" (torchvision's libjpeg-turbo
decoder, the float64 resize on the CPU) and check it against Pillow, which the exact path uses.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from curator import device_jpeg
from curator.cli import main
from curator.info import format_info, workspace_info
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.preprocess import letterbox as pil_letterbox
from curator.preprocess import model_input
from curator.readers import ReadOptions
from curator.workspace import Workspace

ON_DEVICE = ReadOptions(jpeg_on_device=True)
# Where a GPU is present (the device check in benchmarks/device_check.sh) the resize and decode
# tests also run on it; CI has none, so there they run on the CPU alone (nothing is skipped).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _film(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 120 + 60 * np.sin(9 * xx) * np.cos(7 * yy) + 50 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.05) + rng.normal(0, 12, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


# (width, height) -> (width, height): down and up, one pass only, extreme ratios, 1-pixel results
SIZES = [((997, 1311), (243, 320)), ((1311, 997), (320, 243)), ((640, 480), (320, 240)), ((320, 700), (146, 320)),
         ((50, 90), (177, 320)), ((333, 333), (320, 320)), ((320, 1000), (102, 320)), ((512, 400), (512, 320)),
         ((400, 512), (320, 512)), ((3000, 7), (320, 1)), ((17, 19), (5, 3))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_equals_pillows_lanczos_to_the_bit(src, dst, device):
    arr = np.random.default_rng(sum(src)).integers(0, 256, (src[1], src[0]), dtype=np.uint8)  # noise: every rounding matters
    arr[: src[1] // 3] = 255  # and saturated areas, where the negative lobes clip
    # Pillow's passes in CheXzero's order (width, then height: see curator.preprocess.letterbox)
    want = np.asarray(Image.fromarray(arr).resize((dst[0], src[1]), Image.Resampling.LANCZOS).resize(dst, Image.Resampling.LANCZOS))
    got = device_jpeg.resize_like_pillow(torch.from_numpy(arr).to(device), *dst).cpu().numpy()
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} pixels differ"


def _pattern(w: int, h: int) -> np.ndarray:
    """A deterministic busy image (no RNG, so the stored hashes below do not depend on numpy's generators)."""
    i, j = np.mgrid[0:h, 0:w].astype(np.int64)
    return ((i * i * 7 + j * 13 + i * j * 3 + (i // 5) * (j // 3)) % 256).astype(np.uint8)


# sha256 of the 320x320 letterbox canvas of _pattern(w, h) as CheXzero computed it (one `resize(new,
# LANCZOS)` call, paste on a black canvas), made with Pillow 12.0.0 installed apart for the purpose:
# the pass order of Pillow before 12.2. Pillow 13 gives other canvases for the two tall ones.
CHEXZERO_CANVASES = {
    (172, 355): "830ac56b11eb8d12ba8cb70b971a15f6a87011bf21b0740d4bf7a8362afee1db",
    (1773, 3781): "5af600e9cd22ba1cc586afa5f7ce6add19adc140b07b6ba39f78340df05fb8cb",
    (1100, 1400): "59a8677cb7b01a4c09c8b83d47b3a3307fed8222e1ba965d4aad740bbe291a0d",
}


@pytest.mark.parametrize("size", sorted(CHEXZERO_CANVASES))
def test_letterboxes_equal_those_of_chexzeros_pillow(size):
    """Pillow 13 runs a tall image's vertical pass first (python-pillow/Pillow#9549); both letterboxes keep the old order."""
    import hashlib

    arr = _pattern(*size)
    exact = np.asarray(pil_letterbox(Image.fromarray(arr)))
    device = device_jpeg.letterbox(torch.from_numpy(arr)).numpy()
    assert hashlib.sha256(exact.tobytes()).hexdigest() == CHEXZERO_CANVASES[size]
    assert np.array_equal(device, exact)


def test_coefficients_sum_to_one_in_fixed_point_and_stay_in_the_support():
    m = device_jpeg.resample_matrix(2500, 320)
    sums = m.sum(axis=1)
    assert np.all(np.abs(sums - (1 << 22)) <= m.shape[1])  # each weight rounded once
    nz = [np.flatnonzero(r) for r in m]
    centers = (np.arange(320) + 0.5) * 2500 / 320
    interior = slice(5, -5)  # the support is cut at the edges
    assert all(abs(z.mean() + 0.5 - c) < 0.5 for z, c in zip(nz[interior], centers[interior]))  # pixel i's centre is i + 0.5
    assert max(len(z) for z in nz) <= 2 * int(np.ceil(3 * 2500 / 320)) + 1
    with pytest.raises(ValueError):
        device_jpeg.resample_matrix(0, 3)


@pytest.mark.parametrize("n_in,n_out", [(2500, 320), (2000, 256), (50, 177), (7, 1), (333, 320)])
def test_banded_coefficients_are_the_matrix(n_in, n_out):
    index, weights = device_jpeg._banded(n_in, n_out, "cpu")
    dense = np.zeros((weights.shape[0] * device_jpeg.BLOCK, n_in))
    for b in range(weights.shape[0]):
        for s, i in enumerate(index[b].tolist()):
            dense[b * device_jpeg.BLOCK : (b + 1) * device_jpeg.BLOCK, i] += weights[b, s].numpy()
    assert np.array_equal(dense[:n_out], device_jpeg.resample_matrix(n_in, n_out)) and not dense[n_out:].any()


@pytest.mark.parametrize("h,w", [(1500, 1200), (700, 1900), (320, 320), (200, 150), (3781, 1773), (355, 172)])
def test_letterbox_equals_the_exact_path(h, w):
    arr = _film(h, w, seed=h)
    want = np.asarray(pil_letterbox(Image.fromarray(arr)))
    got = device_jpeg.letterbox(torch.from_numpy(arr)).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_letterbox_equals_the_exact_path_film_by_film(device, monkeypatch):
    # films of three sizes, interleaved; stacks forced small so one size spans several of them
    monkeypatch.setattr(device_jpeg, "STACK_VALUES", 3 * 900 * 700)
    shapes = [(900, 700), (500, 800), (900, 700), (320, 320), (900, 700), (500, 800), (900, 700), (900, 700), (900, 700)]
    arrs = [_film(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    want = np.stack([np.asarray(pil_letterbox(Image.fromarray(a))) for a in arrs])
    for stack in (True, False, None):
        got = device_jpeg.letterbox_all([torch.from_numpy(a).to(device) for a in arrs], stack=stack).cpu().numpy()
        assert got.shape == (len(arrs), 320, 320) and np.array_equal(got, want), stack
    assert device_jpeg.letterbox_all([]).shape == (0, 320, 320)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_equals_pillow_and_reports_bad_files(device):
    arrs = [_film(600, 500, 1), _film(480, 640, 2)]
    blobs = [_jpeg(arrs[0], quality=90), _jpeg(arrs[1], quality=95, progressive=True), b"\xff\xd8\xff\xe0 not a jpeg at all \xff\xd9"]
    out = device_jpeg.decode([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], torch.device(device))
    assert out[2] is None
    for b, im in zip(blobs[:2], out[:2]):
        want = np.asarray(Image.open(io.BytesIO(b)))
        got = im.cpu().numpy()
        assert im.dtype == torch.uint8 and im.device.type == device and got.shape == want.shape
        if device == "cpu":  # libjpeg-turbo, as Pillow: the same pixels
            assert np.array_equal(got, want)
        else:  # nvJPEG's inverse DCT may round differently: a grey level here and there
            assert np.abs(got.astype(int) - want).max() <= 2
    assert device_jpeg.decode([], torch.device(device)) == []


def test_model_inputs_equal_the_exact_transform():
    arrs = [_film(900, 700, 3), _film(500, 800, 4)]
    got = device_jpeg.model_inputs([torch.from_numpy(a) for a in arrs])
    want = torch.stack([model_input(Image.fromarray(a)) for a in arrs])
    assert got.shape == (2, 3, 224, 224) and torch.equal(got, want)


def _archive(folder):
    folder.mkdir()
    (folder / "sub").mkdir()
    for i, (h, w) in enumerate([(1400, 1100), (900, 1300), (640, 640)]):
        (folder / f"g{i}.jpg").write_bytes(_jpeg(_film(h, w, seed=10 + i), quality=92, progressive=i == 1))
    colour = np.stack([_film(700, 600, 5), _film(700, 600, 6), _film(700, 600, 7)], axis=-1)
    Image.fromarray(colour).save(folder / "sub" / "colour.jpg", quality=90)  # colour: read by the workers
    Image.fromarray(_film(800, 600, 8)).save(folder / "sub" / "film.png")
    good = _jpeg(_film(1000, 800, 9), quality=90)
    (folder / "sub" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    # valid headers, most entropy-coded data cut out, end marker kept: libjpeg fills it in (a warning), in both paths
    (folder / "sub" / "gutted.jpg").write_bytes(good[:600] + b"\xff\xd9")
    (folder / "empty.jpg").write_bytes(b"")


def _tables(ws):
    w = Workspace(ws)
    cat = {r["path"]: r for r in w.read_table("catalog").to_pylist()}
    ids = {r["image_id"]: r["path"] for r in cat.values()}
    emb = {ids[r["image_id"]]: np.asarray(r["embedding"]) for r in w.read_table("embeddings").to_pylist()}
    errors = {r["path"]: r["kind"] for r in w.read_table("errors").to_pylist()}
    return w, cat, emb, errors


def _probabilities(w, cat):
    """(path, member) -> the probabilities of every finding, from the predictions part files."""
    path = {r["image_id"]: p for p, r in cat.items()}
    skip = ("image_id", "member", "prompt_set")
    return {(path[r["image_id"]], r["member"]): [v for k, v in sorted(r.items()) if k not in skip] for r in w.read_table("predictions").to_pylist()}


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_on_device_equals_the_exact_path(tmp_path, tiny_checkpoints, workers):
    arc = tmp_path / "arc"
    _archive(arc)
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=workers, threads=1,
                  batch_size=4)
    exact = run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), **common))
    dev = run_embed(EmbedConfig(workspace=str(tmp_path / "dev"), read_options=ON_DEVICE, **common))
    assert dev.processed == exact.processed == 6 and dev.failed == exact.failed
    assert (dev.device_decoded, dev.device_rejected) == (4, 0)  # g0-g2 and gutted.jpg; not the colour JPEG
    assert any("4 JPEGs decoded on the device" in line for line in dev.lines())
    assert not any("--gpu-jpeg" in line for line in exact.lines())
    w_e, cat_e, emb_e, err_e = _tables(tmp_path / "exact")
    w_d, cat_d, emb_d, err_d = _tables(tmp_path / "dev")
    assert cat_d.keys() == cat_e.keys() and err_d == err_e
    assert err_d == {str(arc / "sub" / "truncated.jpg"): "corrupt_image", str(arc / "empty.jpg"): "empty_file"}
    for p, row in cat_d.items():
        grey_jpeg = p.endswith(".jpg") and "colour" not in p
        assert row["conversion"] == ("raster+cpu-jpeg" if grey_jpeg else "raster"), p
        for k in row.keys() - {"conversion", "image_id", "run_id", "added_at"}:
            assert row[k] == cat_e[p][k], (p, k)
        np.testing.assert_array_equal(emb_d[p], emb_e[p])  # the same canvas, the same model: the same numbers
    p_e, p_d = _probabilities(w_e, cat_e), _probabilities(w_d, cat_d)
    assert p_d.keys() == p_e.keys() and len(p_d) == 12  # 6 images x (checkpoint, ensemble)
    assert all(p_d[k] == p_e[k] for k in p_e)
    assert w_d.manifest["reading"].get("jpeg_on_device") is True and "jpeg_on_device" not in w_e.manifest["reading"]


def _mixed_archive(folder):
    """Every kind of input the letterbox on the device takes or leaves to the workers."""
    from tests.dicom_factory import write_dicom

    _archive(folder)
    Image.fromarray(_film(1800, 300, 20)).save(folder / "tall.png")  # about 6:1: the pass order matters
    Image.fromarray((_film(900, 700, 21).astype(np.uint16) * 257)).save(folder / "sixteen.png")  # 16-bit PNG -> 8 bits
    Image.fromarray(_film(7, 3000, 22)).save(folder / "sliver.png")  # a 0-pixel side on the canvas: the same error either way
    write_dicom(folder / "film.dcm", (_film(1100, 900, 23).astype(np.uint16) * 16), bits_stored=12)
    write_dicom(folder / "mono1.dcm", (_film(800, 1000, 24).astype(np.uint16) * 16), bits_stored=12, photometric="MONOCHROME1")


@pytest.mark.parametrize("workers,gpu_jpeg,overlap", [(0, False, False), (2, False, False), (2, True, False), (2, True, True)])
def test_letterbox_on_device_equals_the_exact_path(tmp_path, tiny_checkpoints, workers, gpu_jpeg, overlap):
    arc = tmp_path / "arc"
    _mixed_archive(arc)
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=workers, threads=1,
                  batch_size=4)
    exact = run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), **common))
    dev = run_embed(EmbedConfig(workspace=str(tmp_path / "dev"), read_options=ReadOptions(letterbox_on_device=True, jpeg_on_device=gpu_jpeg),
                                overlap=overlap, **common))
    assert dev.processed == exact.processed == 10 and dev.failed == exact.failed
    w_e, cat_e, emb_e, err_e = _tables(tmp_path / "exact")
    w_d, cat_d, emb_d, err_d = _tables(tmp_path / "dev")
    assert cat_d.keys() == cat_e.keys() and err_d == err_e and str(arc / "sliver.png") in err_d
    for p, row in cat_d.items():  # the same rows, conversion included (the same canvas: exact), but the JPEGs --gpu-jpeg took
        for k in row.keys() - {"image_id", "run_id", "added_at"} - ({"conversion"} if gpu_jpeg else set()):
            assert row[k] == cat_e[p][k], (p, k)
        np.testing.assert_array_equal(emb_d[p], emb_e[p])  # the same canvas, the same model: the same numbers
    p_e, p_d = _probabilities(w_e, cat_e), _probabilities(w_d, cat_d)
    assert p_d.keys() == p_e.keys() and all(p_d[k] == p_e[k] for k in p_e)
    assert "letterbox_on_device" not in w_d.manifest["reading"]  # not a way of reading: unchanged files stay unchanged
    runs = w_d.read_table("runs").to_pylist()
    assert json.loads(runs[-1]["options"])["gpu_letterbox"] is True and json.loads(runs[-1]["timings"])["device_letterbox_s"] > 0
    assert json.loads(runs[-1]["options"])["device_overlap"] is overlap  # (off on the CPU unless asked for)
    text = format_info(workspace_info(str(tmp_path / "dev")))
    assert ("(the device stages ran beside the model)" in text) is overlap and ("waiting for the device stages" in text) is overlap


def test_device_stage_runs_beside_the_model(tmp_path, tiny_checkpoints, monkeypatch):
    """With the overlap, batch n+1's device stage runs in its own thread while the model runs on
    batch n; batches still reach the writer in order, each row with its own image."""
    import threading

    from curator.pipelines import embed as embed_mod
    from curator.pipelines.stages import Mapper

    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(12):
        Image.fromarray(_film(300 + 10 * i, 260, seed=40 + i)).save(arc / f"f{i:02d}.png")
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=0, threads=1,
                  batch_size=3, read_options=ReadOptions(letterbox_on_device=True))
    real_stage, real_call = embed_mod._device_stage, Mapper.__call__
    # The device stage of batch n+1 waits (up to 5 s) until the model call on batch n has started,
    # and that model call waits until the stage has seen it: both only happen if they run at once.
    model_started = [threading.Event() for _ in range(8)]
    stage_saw_it = [threading.Event() for _ in range(8)]
    log = {"stages": [], "models": 0, "waits": []}

    def device_stage(batch, *a, **kw):
        n = len(log["stages"])
        log["stages"].append(threading.current_thread().name)
        if n >= 1:
            log["waits"].append(model_started[n - 1].wait(5))
            stage_saw_it[n - 1].set()
        return real_stage(batch, *a, **kw)

    def model(self, tensors):
        n = log["models"]
        log["models"] += 1
        model_started[n].set()
        if n + 1 < 4:  # the last batch has no next stage to meet
            log["waits"].append(stage_saw_it[n].wait(5))
        return real_call(self, tensors)

    monkeypatch.setattr(embed_mod, "_device_stage", device_stage)
    monkeypatch.setattr(Mapper, "__call__", model)
    dev = run_embed(EmbedConfig(workspace=str(tmp_path / "dev"), overlap=True, **common))
    assert dev.processed == 12 and log["models"] == 4 and len(log["stages"]) == 4
    assert set(log["stages"]) == {"curator-device-stage_0"}
    assert log["waits"] == [True] * 6, log  # every meeting happened: stage n+1 ran while model n did
    monkeypatch.setattr(embed_mod, "_device_stage", real_stage)
    monkeypatch.setattr(Mapper, "__call__", real_call)
    exact = run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), **{**common, "read_options": ReadOptions()}))
    assert exact.processed == 12
    _, cat_e, emb_e, _ = _tables(tmp_path / "exact")
    _, cat_d, emb_d, _ = _tables(tmp_path / "dev")
    assert cat_d.keys() == cat_e.keys()
    for p in cat_d:
        np.testing.assert_array_equal(emb_d[p], emb_e[p])
    assert [cat_d[p]["image_id"] for p in sorted(cat_d)] == [cat_e[p]["image_id"] for p in sorted(cat_e)]  # written in the same order
    t = json.loads(Workspace(tmp_path / "dev").read_table("runs").to_pylist()[-1]["timings"])
    assert t["device_letterbox_s"] > 0 and 0 <= t["device_wait_s"] < t["total_s"]


def test_without_the_overlap_the_stages_take_turns(tmp_path, tiny_checkpoints, monkeypatch):
    """The check above, with the overlap off: the stage never sees the model call start (so the
    handshake can fail, and the test above means something)."""
    import threading

    from curator.pipelines import embed as embed_mod
    from curator.pipelines.stages import Mapper

    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(6):
        Image.fromarray(_film(300, 260, seed=50 + i)).save(arc / f"f{i}.png")
    model_started, seen = threading.Event(), []
    real_stage, real_call = embed_mod._device_stage, Mapper.__call__

    def device_stage(batch, *a, **kw):
        seen.append((threading.current_thread().name, model_started.is_set()))
        return real_stage(batch, *a, **kw)

    def model(self, tensors):
        model_started.set()
        out = real_call(self, tensors)
        model_started.clear()
        return out

    monkeypatch.setattr(embed_mod, "_device_stage", device_stage)
    monkeypatch.setattr(Mapper, "__call__", model)
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                          progress=False, workers=0, threads=1, batch_size=2, overlap=False, read_options=ReadOptions(letterbox_on_device=True)))
    assert seen == [(threading.main_thread().name, False)] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_gives_the_same_workspace_on_each_device(tmp_path, tiny_checkpoints, device):
    """The device stage in its thread (on CUDA: on its own stream) against the same stage in turn
    with the model, on the same device: the same rows in the same order, the same numbers."""
    arc = tmp_path / "arc"
    _mixed_archive(arc)
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device=device, progress=False, workers=2, threads=1,
                  batch_size=3, read_options=ReadOptions(letterbox_on_device=True, jpeg_on_device=True), worker_jpeg_share=0.0)
    a = run_embed(EmbedConfig(workspace=str(tmp_path / "a"), overlap=False, **common))
    b = run_embed(EmbedConfig(workspace=str(tmp_path / "b"), overlap=True, **common))
    assert a.processed == b.processed == 10 and a.failed == b.failed and a.device_decoded == b.device_decoded == 4
    _, cat_a, emb_a, err_a = _tables(tmp_path / "a")
    w_b, cat_b, emb_b, err_b = _tables(tmp_path / "b")
    assert err_a == err_b and [cat_a[p]["image_id"] for p in sorted(cat_a)] == [cat_b[p]["image_id"] for p in sorted(cat_b)]
    for p in cat_a:
        assert {k: v for k, v in cat_a[p].items() if k not in ("run_id", "added_at")} == {
            k: v for k, v in cat_b[p].items() if k not in ("run_id", "added_at")}
        np.testing.assert_allclose(emb_b[p], emb_a[p], rtol=0, atol=0 if device == "cpu" else 1e-6)
    assert json.loads(w_b.read_table("runs").to_pylist()[-1]["options"])["device_overlap"] is True


def test_a_writer_that_fails_ends_the_device_stage_thread_at_once(tmp_path, tiny_checkpoints, monkeypatch):
    """The run's loop stops early (here: the writer fails): the device-stage thread ends with the
    run, not when the generator is collected (pytest.raises keeps the frames alive)."""
    import threading

    from curator.pipelines.stages import WorkspaceWriter

    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(8):
        Image.fromarray(_film(300, 260, seed=80 + i)).save(arc / f"f{i}.png")
    real_add = WorkspaceWriter.add

    def add(self, *a, **kw):
        if getattr(self, "_calls", 0) == 1:
            raise OSError("disk full (simulated)")
        self._calls = getattr(self, "_calls", 0) + 1
        return real_add(self, *a, **kw)

    monkeypatch.setattr(WorkspaceWriter, "add", add)
    with pytest.raises(OSError, match="simulated") as failed:  # (held: its traceback keeps run_embed's frame, and so the generator)
        run_embed(EmbedConfig(archives=[str(arc)], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                              progress=False, workers=0, threads=1, batch_size=2, overlap=True,
                              read_options=ReadOptions(letterbox_on_device=True)))
    assert not any(t.name.startswith("curator-device-stage") for t in threading.enumerate())
    assert failed.value.__traceback__ is not None


def test_a_device_stage_that_fails_ends_the_run_and_its_thread(tmp_path, tiny_checkpoints, monkeypatch):
    import threading

    from curator.pipelines import embed as embed_mod

    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(6):
        Image.fromarray(_film(300, 260, seed=60 + i)).save(arc / f"f{i}.png")
    calls = []

    def device_stage(batch, *a, **kw):
        calls.append(len(batch["rows"]))
        if len(calls) == 2:
            raise RuntimeError("device stage failed (simulated)")
        return real(batch, *a, **kw)

    real = embed_mod._device_stage
    monkeypatch.setattr(embed_mod, "_device_stage", device_stage)
    with pytest.raises(RuntimeError, match="simulated"):
        run_embed(EmbedConfig(archives=[str(arc)], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                              progress=False, workers=0, threads=1, batch_size=2, overlap=True, flush_rows=1,
                              read_options=ReadOptions(letterbox_on_device=True)))
    assert not any(t.name.startswith("curator-device-stage") for t in threading.enumerate())
    w = Workspace(tmp_path / "ws")
    assert w.row_count("catalog") == 2  # the first batch was written; nothing after the failure
    assert w.read_table("runs").to_pylist()[-1]["status"] == "failed"


def test_letterbox_on_device_keeps_the_rows_in_order(tmp_path):
    """One batch holding all three kinds (tensors from the workers, images to letterbox, JPEG bytes):
    each row goes with its own image."""
    from curator.discover import FileEntry
    from curator.pipelines.embed import batches, letterbox_on_device, on_device
    from curator.preprocess import DEFAULT_CFG
    from curator.readers import read_image

    arc = tmp_path / "arc"
    arc.mkdir()
    films = {}
    for i, (h, w) in enumerate([(600, 500), (500, 640), (700, 450), (480, 480), (900, 300), (350, 800)]):
        films[i] = _film(h, w, seed=30 + i)
        if i % 3 == 0:  # colour PNG: preprocessed by the workers
            Image.fromarray(np.stack([films[i], 255 - films[i], films[i] // 2], axis=-1)).save(arc / f"f{i}.png")
        elif i % 3 == 1:  # grey PNG: letterboxed beside the model
            Image.fromarray(films[i]).save(arc / f"f{i}.png")
        else:  # grey JPEG: decoded beside the model
            (arc / f"f{i}.jpg").write_bytes(_jpeg(films[i], quality=95))
    entries = [FileEntry(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(arc.iterdir())]
    cfg = EmbedConfig(archives=[str(arc)], workspace=str(tmp_path / "ws"), checkpoints=[], workers=2, batch_size=6,
                      read_options=ReadOptions(letterbox_on_device=True, jpeg_on_device=True))
    (tmp_path / "ws").mkdir()  # (on_device notes the JPEGs in hand there)
    (batch,) = list(batches(entries, cfg))
    assert len(batch["images"]) == 2 and len(batch["jpegs"]) == 2 and batch["tensors"].shape[0] == 2
    batch = {**batch, "tensors": letterbox_on_device(batch, cfg.preprocess, torch.device("cpu"))}
    tensors, rows, errors = on_device(batch, cfg, torch.device("cpu"))
    assert not errors and len(rows) == tensors.shape[0] == 6
    for row, x in zip(rows, tensors):
        i = int(row["path"].rsplit("f", 1)[1].split(".")[0])
        want = model_input(read_image(row["path"], ReadOptions()).image, DEFAULT_CFG)  # the exact path, file by file
        assert torch.equal(x, want), row["path"]
        assert (row["height"], row["width"]) == films[i].shape


def test_letterbox_on_device_groups_and_out_of_memory(monkeypatch):
    """Images go in groups of bounded pixels; a group that runs out of GPU memory is letterboxed by
    Pillow instead, with the same result, in the same place."""
    from curator.pipelines import embed
    from curator.preprocess import DEFAULT_CFG

    arrs = [_film(h, w, seed=40 + i) for i, (h, w) in enumerate([(600, 500), (500, 640), (700, 450), (480, 480), (900, 300)])]
    monkeypatch.setattr(embed, "DEVICE_GROUP_PIXELS", 700 * 500)  # about two films a group
    calls, real = [], device_jpeg.model_inputs

    def model_inputs(images, cfg):
        calls.append(len(images))
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(images, cfg)

    monkeypatch.setattr(device_jpeg, "model_inputs", model_inputs)
    head = torch.stack([model_input(Image.fromarray(_film(320, 320, 49)))])
    batch = {"tensors": head, "images": [torch.from_numpy(a) for a in arrs]}
    cfg = EmbedConfig(archives=[], workspace="", checkpoints=[])
    got = embed.letterbox_on_device(batch, cfg.preprocess, torch.device("cpu"))
    assert len(calls) >= 3  # several groups, the second one failed
    want = torch.cat([head, torch.stack([model_input(Image.fromarray(a), DEFAULT_CFG) for a in arrs])])
    assert got.shape == want.shape and torch.equal(got, want)


def test_letterbox_on_device_checks_the_configured_canvas(tmp_path):
    """A film whose short side vanishes on a smaller canvas gets the default path's error row."""
    from curator.discover import FileEntry
    from curator.pipelines.stages import read_item
    from curator.preprocess import PreprocessCfg

    p = tmp_path / "sliver.png"
    Image.fromarray(_film(40, 3000, 50)).save(p)  # 3000 x 40: fits a 320 canvas (4 px), not a 64 one
    entry = FileEntry(str(p), p.stat().st_size, p.stat().st_mtime_ns)
    small = PreprocessCfg(canvas_size=64)
    default, option = read_item(entry, ReadOptions(), small), read_item(entry, ReadOptions(letterbox_on_device=True), small)
    assert not default["ok"] and not option["ok"] and option["error"] == default["error"]
    assert "image" in read_item(entry, ReadOptions(letterbox_on_device=True))  # on the 320 canvas it goes to the device


def test_cli_flag_and_its_conflicts(tmp_path, tiny_checkpoints, capsys, caplog):
    arc = tmp_path / "arc"
    arc.mkdir()
    (arc / "a.jpg").write_bytes(_jpeg(_film(700, 500), quality=90))
    base = ["-q", "embed", str(arc), "--workspace", str(tmp_path / "ws"), "--checkpoint", str(tiny_checkpoints[0]), "--device", "cpu"]
    assert main([*base, "--gpu-jpeg", "--engine", "ray", "--worker-jpeg-share", "auto"]) == 2
    assert "adapts only with --engine local" in capsys.readouterr().err
    assert main([*base, "--worker-jpeg-share", "0.5"]) == 2  # (a share of nothing)
    assert "add --gpu-jpeg" in capsys.readouterr().err
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(SystemExit):
            main([*base, "--gpu-jpeg", "--worker-jpeg-share", bad])
        assert "expected 'auto' or a number from 0 to 1" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
    with caplog.at_level("WARNING"):
        assert main([*base, "--gpu-jpeg", "--workers", "0"]) == 0
    assert any("on the CPU" in r.getMessage() for r in caplog.records)
    cat = Workspace(tmp_path / "ws").read_table("catalog").to_pylist()
    assert [r["conversion"] for r in cat] == ["raster+cpu-jpeg"]


@pytest.mark.parametrize("overlap", [False, True])
def test_files_the_device_path_rejects_are_read_the_exact_way(tmp_path, tiny_checkpoints, monkeypatch, overlap):
    """The fallbacks of `on_device`: a file the decoder rejects, one it decodes to another size than
    its header, a group that runs out of GPU memory, and a rejected file that is gone by then. They
    are read in the main thread (where the per-file time limit works), also with the overlap."""
    import os
    import threading

    from curator.pipelines import embed as embed_mod

    arc = tmp_path / "arc"
    _archive(arc)
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=2, threads=1, batch_size=8)
    run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), **common))
    by_size = {os.path.getsize(p): p.name for p in arc.rglob("*.jpg")}
    assert len(by_size) == 7  # sizes tell the files apart below
    real_decode, real_inputs = device_jpeg.decode, device_jpeg.model_inputs

    def decode(blobs, device):
        out = real_decode(blobs, device)
        names = [by_size[len(b)] for b in blobs]
        for i, name in enumerate(names):
            if name == "g0.jpg":
                out[i] = None
            elif name == "g1.jpg":
                out[i] = out[i].T.contiguous()  # not the header's size
            elif name == "g2.jpg":
                out[i] = None
                (arc / "g2.jpg").unlink()  # and gone before the exact path reads it
        decode.seen += names
        return out

    def model_inputs(images, cfg):
        if any(tuple(im.shape) == (1000, 800) for im in images):  # gutted.jpg's group
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_inputs(images, cfg)

    decode.seen = []
    monkeypatch.setattr(device_jpeg, "decode", decode)
    monkeypatch.setattr(device_jpeg, "model_inputs", model_inputs)
    monkeypatch.setattr(embed_mod, "DEVICE_GROUP_PIXELS", 1)  # one file per group
    real_read, readers = embed_mod.read_item, []

    def read_item(entry, *a, **kw):
        readers.append(threading.current_thread().name)
        return real_read(entry, *a, **kw)

    monkeypatch.setattr(embed_mod, "read_item", read_item)  # (the exact re-reads: the workers' reads are stages.read_item)
    s = run_embed(EmbedConfig(workspace=str(tmp_path / "dev"), read_options=ON_DEVICE, overlap=overlap, **common))
    assert readers == [threading.main_thread().name] * 4
    assert sorted(decode.seen) == ["g0.jpg", "g1.jpg", "g2.jpg", "gutted.jpg"]  # one call per group, grey JPEGs only
    assert s.processed == 5 and s.failed == {"vanished": 1, "corrupt_image": 1, "empty_file": 1}
    assert (s.device_decoded, s.device_rejected) == (0, 4)
    assert any("4 handed to it but read on the CPU" in line for line in s.lines())
    _, cat_e, emb_e, _ = _tables(tmp_path / "exact")
    _, cat_d, emb_d, err_d = _tables(tmp_path / "dev")
    assert err_d[str(arc / "g2.jpg")] == "vanished"
    assert cat_d.keys() == cat_e.keys() - {str(arc / "g2.jpg")}
    for p, row in cat_d.items():
        assert row["conversion"] == "raster", p  # every grey JPEG here fell back
        np.testing.assert_array_equal(emb_d[p], emb_e[p])


def test_files_in_hand_when_a_run_died_go_to_the_reader_workers_next_time(tmp_path, tiny_checkpoints, monkeypatch, caplog):
    """A decoder crash on the device takes the whole process (no error row); the note it leaves
    makes the next run read those files in the workers, whose crashes are recorded per file."""
    import json

    from curator.pipelines import embed as embed_mod

    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(3):
        (arc / f"f{i}.jpg").write_bytes(_jpeg(_film(600 + 50 * i, 500, seed=i), quality=90))
    ws = tmp_path / "ws"
    common = dict(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=0,
                  threads=1, batch_size=8, read_options=ON_DEVICE)
    real_decode, notes = device_jpeg.decode, []

    def decode(blobs, device):
        notes.append(sorted(json.loads((ws / embed_mod.IN_HAND_NOTE).read_text())))
        return real_decode(blobs, device)

    monkeypatch.setattr(device_jpeg, "decode", decode)
    run_embed(EmbedConfig(**common))
    assert notes == [sorted(str(arc / f"f{i}.jpg") for i in range(3))]  # named while in hand
    assert not (ws / embed_mod.IN_HAND_NOTE).exists()  # and not after
    # a crash while decoding a new file: its note stays behind
    (arc / "new.jpg").write_bytes(_jpeg(_film(700, 640, seed=9), quality=90))
    (ws / embed_mod.IN_HAND_NOTE).write_text(json.dumps([str(arc / "new.jpg")]))
    notes.clear()
    with caplog.at_level("WARNING"):
        s = run_embed(EmbedConfig(**common))
    assert s.processed == 1 and notes == []  # read by the workers' path, not handed to the device
    assert any("stopped while 1 JPEG" in r.getMessage() for r in caplog.records)
    conv = {r["path"]: r["conversion"] for r in Workspace(ws).read_table("catalog").to_pylist()}
    assert conv[str(arc / "new.jpg")] == "raster" and conv[str(arc / "f0.jpg")] == "raster+cpu-jpeg"
    assert not (ws / embed_mod.IN_HAND_NOTE).exists()


def test_worker_share_moves_towards_the_stage_that_waits_and_stays_when_fixed():
    from curator.pipelines.embed import WorkerShare

    auto = WorkerShare()
    assert auto.value == 0.0
    auto.update(reader_wait=0.0, device_wait=0.5)  # waited for the device: the workers take more
    auto.update(reader_wait=0.1, device_wait=0.2)
    assert auto.value == pytest.approx(2 * WorkerShare.STEP)
    auto.update(reader_wait=0.3, device_wait=0.0)  # waited for the readers: they take less
    assert auto.value == pytest.approx(WorkerShare.STEP)
    for _ in range(5):
        auto.update(reader_wait=1.0, device_wait=0.0)
    assert auto.value == 0.0  # not below 0
    for _ in range(100):
        auto.update(reader_wait=0.0, device_wait=1.0)
    assert auto.value == pytest.approx(WorkerShare.MAX)  # nor above MAX: the device keeps some
    auto.update(reader_wait=0.100, device_wait=0.105)  # about equal (the model is the limit): it stays
    assert auto.value == pytest.approx(WorkerShare.MAX)
    turn = WorkerShare()  # in turn with the model: up while the readers keep up, whatever the device stage took
    turn.update(reader_wait=0.0, device_wait=0.01, overlapped=False)
    turn.update(reader_wait=0.0005, device_wait=2.0, overlapped=False)
    assert turn.value == pytest.approx(2 * WorkerShare.STEP)
    turn.update(reader_wait=0.2, device_wait=0.5, overlapped=False)  # this process waited for the readers: less
    assert turn.value == pytest.approx(WorkerShare.STEP)
    fixed = WorkerShare(0.25)
    fixed.update(reader_wait=0.0, device_wait=9.0)
    assert fixed.value == 0.25
    with pytest.raises(ValueError, match="within 0 and 1"):
        WorkerShare(1.5)


def test_kept_by_workers_draws_a_fixed_share_of_paths():
    import multiprocessing
    import zlib

    from curator.pipelines.stages import kept_by_workers

    paths = [f"/archive/p{i:05d}/s{i * 7:06d}/film.jpg" for i in range(2000)]
    share = multiprocessing.RawValue("d", 0.0)
    assert not any(kept_by_workers(p, share) for p in paths) and not kept_by_workers(paths[0], None)
    share.value = 1.0
    assert all(kept_by_workers(p, share) for p in paths)
    share.value = 0.3
    kept = [p for p in paths if kept_by_workers(p, share)]
    assert 0.25 < len(kept) / len(paths) < 0.35
    assert kept == [p for p in paths if zlib.crc32(p.encode()) / 2**32 < 0.3]  # independent draw from the path alone
    share.value = 0.6
    assert set(kept) <= {p for p in paths if kept_by_workers(p, share)}  # a larger share keeps what a smaller one kept


@pytest.mark.parametrize("share,letterbox", [(1.0, False), (0.5, True)])
def test_jpegs_the_workers_keep_as_their_share_end_as_the_exact_path(tmp_path, tiny_checkpoints, share, letterbox):
    """A fixed share: those JPEGs are decoded by the workers (rows 'raster'), the rest on the device;
    every embedding equals the exact path's either way."""
    import multiprocessing

    from curator.pipelines.stages import kept_by_workers

    arc = tmp_path / "arc"
    arc.mkdir()
    drawn = multiprocessing.RawValue("d", share)
    names = [f"f{i}.jpg" for i in range(200)]  # (the draw depends on the whole path: pick names that give both sides some)
    kept_names = [n for n in names if kept_by_workers(str(arc / n), drawn)][: 10 if share == 1.0 else 5]
    names = kept_names + [n for n in names if not kept_by_workers(str(arc / n), drawn)][: 10 - len(kept_names)]
    for i, name in enumerate(names):
        (arc / name).write_bytes(_jpeg(_film(400 + 20 * i, 330, seed=70 + i), quality=90))
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=2, threads=1,
                  batch_size=4)
    run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), **common))
    s = run_embed(EmbedConfig(workspace=str(tmp_path / "dev"), read_options=ReadOptions(jpeg_on_device=True, letterbox_on_device=letterbox),
                              worker_jpeg_share=share, **common))
    want_kept = {str(p) for p in arc.iterdir() if kept_by_workers(str(p), drawn)}
    assert s.processed == 10 and (s.worker_decoded, s.device_decoded) == (len(want_kept), 10 - len(want_kept))
    assert len(want_kept) == (10 if share == 1.0 else 5) and s.worker_share == share
    assert any("by the CPU readers beside it" in line for line in s.lines())
    _, cat_e, emb_e, _ = _tables(tmp_path / "exact")
    w_d, cat_d, emb_d, _ = _tables(tmp_path / "dev")
    assert cat_d.keys() == cat_e.keys()
    for p, row in cat_d.items():
        assert row["conversion"] == ("raster" if p in want_kept else "raster+cpu-jpeg"), p
        np.testing.assert_array_equal(emb_d[p], emb_e[p])
    run = w_d.read_table("runs").to_pylist()[-1]
    assert json.loads(run["options"])["worker_jpeg_share"] == share and json.loads(run["counts"])["worker_decoded"] == len(want_kept)


def test_fast_jpeg_beside_the_device_reduces_what_the_workers_decode_and_nothing_else(tmp_path, tiny_checkpoints, capsys):
    """--gpu-jpeg --fast-jpeg: the workers' share of the grayscale JPEGs is decoded in the DCT domain
    (rows and numbers as a --fast-jpeg run's), the device's JPEGs in full (as a --gpu-jpeg run's);
    the colour JPEG, too small to reduce, and the PNG stay as they are."""
    import zlib

    arc = tmp_path / "arc"
    arc.mkdir()

    def kept_by_draw(name):  # the workers' share: a fixed draw from the path
        return zlib.crc32(str(arc / name).encode()) < 0.5 * 2**32

    pool = [f"f{i}.jpg" for i in range(200)]  # names that give each side five
    names = [n for n in pool if kept_by_draw(n)][:5] + [n for n in pool if not kept_by_draw(n)][:5]
    for i, name in enumerate(names):  # sides >= 640: libjpeg can decode them at 1/2 scale, both sides still >= the 320 canvas
        (arc / name).write_bytes(_jpeg(_film(700 + 40 * i, 660 + 30 * i, seed=80 + i), quality=90))
    colour = np.stack([_film(700, 600, 5), _film(700, 600, 6), _film(700, 600, 7)], axis=-1)
    Image.fromarray(colour).save(arc / "colour.jpg", quality=90)
    Image.fromarray(_film(800, 700, 8)).save(arc / "film.png")
    base = ["-q", "embed", str(arc), "--checkpoint", str(tiny_checkpoints[0]), "--device", "cpu", "--workers", "2", "--threads", "1",
            "--batch-size", "4"]
    assert main([*base, "--workspace", str(tmp_path / "both"), "--gpu-jpeg", "--fast-jpeg", "--worker-jpeg-share", "0.5"]) == 0
    assert main([*base, "--workspace", str(tmp_path / "fast"), "--fast-jpeg"]) == 0
    assert main([*base, "--workspace", str(tmp_path / "dev"), "--gpu-jpeg", "--worker-jpeg-share", "0"]) == 0
    capsys.readouterr()

    grey = {str(arc / n) for n in names}
    kept = {str(arc / n) for n in names if kept_by_draw(n)}
    w_b, cat_b, emb_b, _ = _tables(tmp_path / "both")
    _, cat_f, emb_f, _ = _tables(tmp_path / "fast")
    _, cat_d, emb_d, _ = _tables(tmp_path / "dev")
    assert cat_b.keys() == cat_f.keys() == cat_d.keys() and len(cat_b) == 12
    for p, row in cat_b.items():
        if p in kept:
            want, ref, emb = "raster+dct/2", cat_f[p], emb_f
        elif p in grey:
            want, ref, emb = "raster+cpu-jpeg", cat_d[p], emb_d
        else:
            want, ref, emb = "raster", cat_d[p], emb_d
        assert row["conversion"] == ref["conversion"] == want, p
        assert (row["width"], row["height"], row["content_hash"]) == (ref["width"], ref["height"], ref["content_hash"]), p
        np.testing.assert_array_equal(emb_b[p], emb[p])
    assert len(kept) == 5
    run = w_b.read_table("runs").to_pylist()[-1]
    options, counts = json.loads(run["options"]), json.loads(run["counts"])
    assert options["fast_jpeg"] is True and options["gpu_jpeg"] is True and options["worker_jpeg_share"] == 0.5
    assert (counts["device_decoded"], counts["worker_decoded"]) == (10 - len(kept), len(kept))
    assert w_b.manifest["reading"]["fast_jpeg"] is True and w_b.manifest["reading"]["jpeg_on_device"] is True


def test_auto_share_gives_the_workers_jpegs_when_the_device_is_the_wait(tmp_path, tiny_checkpoints, monkeypatch):
    """'auto': a slow device stage (simulated) makes this process wait for it, not for the readers,
    so the share climbs and the workers decode some of the JPEGs themselves."""
    import time

    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(40):
        (arc / f"f{i:02d}.jpg").write_bytes(_jpeg(_film(300, 260, seed=100 + i), quality=90))
    real_decode = device_jpeg.decode

    def slow_decode(blobs, device):
        # (the share rises when this process waits for the readers less than ~a tenth of this:
        # long enough that a busy machine's scheduling does not decide it)
        time.sleep(0.3)
        return real_decode(blobs, device)

    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=2, threads=1,
                  batch_size=2, read_options=ON_DEVICE)
    off = run_embed(EmbedConfig(workspace=str(tmp_path / "off"), **common))  # on the CPU the default is 0
    assert (off.device_decoded, off.worker_decoded, off.worker_share) == (40, 0, 0.0)
    monkeypatch.setattr(device_jpeg, "decode", slow_decode)
    s = run_embed(EmbedConfig(workspace=str(tmp_path / "auto"), worker_jpeg_share="auto", **common))
    assert s.processed == 40 and s.device_decoded + s.worker_decoded == 40
    assert s.worker_decoded >= 5 and s.worker_share >= 0.3, s.lines()
    conv = Counter(r["conversion"] for r in Workspace(tmp_path / "auto").read_table("catalog").to_pylist())
    assert conv == {"raster": s.worker_decoded, "raster+cpu-jpeg": s.device_decoded}
