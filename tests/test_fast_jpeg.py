"""Opt-in JPEG decoding in the DCT domain (`curator embed --fast-jpeg`, issue 6)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from curator.pipelines.embed import EmbedConfig, run_embed
from curator.readers import ReadOptions, read_image
from curator.workspace import Workspace

FAST = ReadOptions(jpeg_draft_min_side=320)


def _film(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth anatomy-like structure plus mild noise (what DCT scaling is meant for)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 120 + 60 * np.sin(6 * xx) * np.cos(4 * yy) + 40 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.05) + rng.normal(0, 3, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_large_jpeg_is_decoded_reduced_and_close_to_the_block_mean(tmp_path):
    arr = _film(1700, 1400)
    p = tmp_path / "film.jpg"
    Image.fromarray(arr).save(p, quality=95)
    exact = read_image(p)
    fast = read_image(p, FAST)
    assert exact.conversion == "raster" and exact.image.size == (1400, 1700)
    # 1/4 keeps both sides >= 320 (350 x 425); 1/8 would not (175 x 212)
    assert fast.conversion == "raster+dct/4" and fast.image.size == (350, 425)
    assert (fast.meta["columns"], fast.meta["rows"]) == (1400, 1700)
    # independent reference: 4x4 block means of the exact decode
    ref = np.asarray(exact.image, np.float64).reshape(425, 4, 350, 4).mean(axis=(1, 3))
    diff = np.abs(np.asarray(fast.image, np.float64) - ref)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 6, (diff.mean(), np.percentile(diff, 99))


def test_small_jpeg_png_and_default_stay_exact(tmp_path):
    small = tmp_path / "small.jpg"
    Image.fromarray(_film(500, 600)).save(small, quality=90)  # short side < 2 x 320: no reduction
    png = tmp_path / "big.png"
    Image.fromarray(_film(1300, 1300)).save(png)
    for p in (small, png):
        a, b = read_image(p), read_image(p, FAST)
        assert b.conversion == "raster"
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert ReadOptions().jpeg_draft_min_side is None  # exact is the default


def test_embed_with_fast_jpeg_marks_rows_and_keeps_file_size(tmp_path, tiny_checkpoints):
    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(3):
        Image.fromarray(_film(1500 + 100 * i, 1300, seed=i)).save(arc / f"f{i}.jpg", quality=92)
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=0, threads=1)
    run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), **common))
    run_embed(EmbedConfig(workspace=str(tmp_path / "fast"), read_options=FAST, **common))
    cat_e = {r["path"]: r for r in Workspace(tmp_path / "exact").read_table("catalog").to_pylist()}
    cat_f = {r["path"]: r for r in Workspace(tmp_path / "fast").read_table("catalog").to_pylist()}
    assert cat_e.keys() == cat_f.keys() and len(cat_e) == 3
    for path, r in cat_f.items():
        assert r["conversion"] == "raster+dct/4" and cat_e[path]["conversion"] == "raster"
        assert (r["width"], r["height"]) == (cat_e[path]["width"], cat_e[path]["height"]) == (1300, r["height"])
