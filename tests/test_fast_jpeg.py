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


# ---- compressed DICOMs: JPEG 2000 at a lower resolution level, JPEG baseline in the DCT domain ----


def _dicom(tmp_path, name, pixels, syntax, **kw):
    from tests.dicom_factory import write_dicom

    return write_dicom(tmp_path / name, pixels, transfer_syntax=syntax, **kw)


def _stored_film(h, w, bits=12, seed=0):
    return (_film(h, w, seed).astype(np.uint32) * ((1 << bits) - 1) // 255).astype(np.uint16)


def test_jpeg2000_dicom_decoded_at_a_lower_resolution_level(tmp_path):
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from curator import dicom

    stored = _stored_film(700, 820, bits=12)
    path = _dicom(tmp_path, "j2k.dcm", stored, JPEG2000Lossless, bits_stored=12)
    ds = pydicom.dcmread(path)
    frame, how = dicom.reduced_first_frame(ds, 320)
    # one level down keeps both sides >= 320 (350 x 410); two would not (175 x 205)
    assert how == "j2k/2" and frame.shape == (350, 410)
    # the reversible wavelet's low-pass image: close to 2x2 block means of the stored values, in
    # the stored range (Pillow's widening to 16 bits undone)
    ref = stored.astype(np.float64).reshape(350, 2, 410, 2).mean(axis=(1, 3))
    diff = np.abs(frame.astype(np.float64) - ref)
    assert frame.max() <= 4095 and diff.mean() < 0.01 * 4095 and np.percentile(diff, 99) < 0.04 * 4095, diff.mean()

    exact, fast = read_image(path), read_image(path, FAST)
    assert exact.conversion == "mimic" and fast.conversion == "mimic+j2k/2"
    assert fast.image.size == (410, 350) and (fast.meta["rows"], fast.meta["columns"]) == (700, 820)
    # after the MIMIC conversion (equalisation is non-linear, so averaging before and after differ):
    # 2.8 levels mean, 10.8 at the 99th percentile here
    ref8 = np.asarray(exact.image, np.float64).reshape(350, 2, 410, 2).mean(axis=(1, 3))
    diff8 = np.abs(np.asarray(fast.image, np.float64) - ref8)
    assert diff8.mean() < 4 and np.percentile(diff8, 99) < 16, (diff8.mean(), np.percentile(diff8, 99))


def test_jpeg_baseline_dicom_decoded_in_the_dct_domain(tmp_path):
    from pydicom.uid import JPEGBaseline8Bit

    pixels = _film(1400, 1300)
    path = _dicom(tmp_path, "jpeg.dcm", pixels, JPEGBaseline8Bit, jpeg_quality=95)
    exact, fast = read_image(path), read_image(path, FAST)
    assert fast.conversion == "mimic+dct/4" and fast.image.size == (325, 350)
    ref8 = np.asarray(exact.image, np.float64).reshape(350, 4, 325, 4).mean(axis=(1, 3))
    diff8 = np.abs(np.asarray(fast.image, np.float64) - ref8)
    assert diff8.mean() < 3 and np.percentile(diff8, 99) < 12, (diff8.mean(), np.percentile(diff8, 99))


def test_dicoms_the_fast_path_leaves_exact(tmp_path):
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    cases = {
        "small_j2k": (_stored_film(600, 700), JPEG2000Lossless, dict(bits_stored=12)),  # short side < 640
        "signed_j2k": (_stored_film(700, 700).astype(np.int16) - 2048, JPEG2000Lossless, dict(bits_stored=12)),
        "rle": (_stored_film(700, 700), RLELossless, dict(bits_stored=12)),
        "jpeg_ls": (_stored_film(700, 700), JPEGLSLossless, dict(bits_stored=12)),
    }
    for name, (pixels, syntax, kw) in cases.items():
        path = _dicom(tmp_path, name + ".dcm", pixels, syntax, **kw)
        a, b = read_image(path), read_image(path, FAST)
        assert a.conversion == b.conversion == "mimic", name
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image)), name


def test_embed_with_fast_path_on_jpeg2000_dicoms_keeps_their_size(tmp_path, tiny_checkpoints):
    from pydicom.uid import JPEG2000Lossless

    arc = tmp_path / "arc"
    arc.mkdir()
    for i in range(2):
        _dicom(arc, f"f{i}.dcm", _stored_film(700 + 20 * i, 800, seed=i), JPEG2000Lossless, bits_stored=12)
    common = dict(archives=[str(arc)], checkpoints=[str(tiny_checkpoints[0])], device="cpu", progress=False, workers=0, threads=1)
    run_embed(EmbedConfig(workspace=str(tmp_path / "exact"), **common))
    run_embed(EmbedConfig(workspace=str(tmp_path / "fast"), read_options=FAST, **common))
    cat_e = {r["path"]: r for r in Workspace(tmp_path / "exact").read_table("catalog").to_pylist()}
    cat_f = {r["path"]: r for r in Workspace(tmp_path / "fast").read_table("catalog").to_pylist()}
    assert cat_e.keys() == cat_f.keys() and len(cat_f) == 2
    for path, r in cat_f.items():
        assert r["conversion"] == "mimic+j2k/2" and cat_e[path]["conversion"] == "mimic"
        assert (r["width"], r["height"]) == (cat_e[path]["width"], cat_e[path]["height"]) == (800, r["height"])


def test_truncated_compressed_dicoms_fail_on_the_fast_paths_too(tmp_path):
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    from curator.readers import ReadError

    fast = ReadOptions(jpeg_draft_min_side=320, modalities=None)
    exact = ReadOptions(modalities=None)  # JPEG baseline: Pillow first, then GDCM
    cases = [(_stored_film(700, 820), JPEG2000Lossless, dict(bits_stored=12), fast), (_film(1400, 1300), JPEGBaseline8Bit, {}, fast),
             (_film(700, 650), JPEGBaseline8Bit, {}, exact)]
    for i, (pixels, syntax, kw, opts) in enumerate(cases):
        path = _dicom(tmp_path, f"x{i}.dcm", pixels, syntax, **kw)
        whole = read_image(path, opts)
        assert ("+" in whole.conversion) == (opts is fast)
        data = path.read_bytes()
        cut = tmp_path / f"cut{i}.dcm"
        for n in sorted(set(np.linspace(400, len(data) - 1, 25).astype(int)) | {len(data) - 1, len(data) - 9}):
            cut.write_bytes(data[:n])
            try:
                result = read_image(cut, opts)
            except ReadError as err:
                assert err.kind in ("truncated", "corrupt_header"), (syntax, n, err.kind, str(err))
                continue
            # only a cut inside the trailing sequence delimiter leaves the image whole
            assert np.array_equal(np.asarray(result.image), np.asarray(whole.image)), (syntax, n)


def _encapsulated(tmp_path, name, stream: bytes, rows: int, cols: int, syntax, bits_allocated=16, bits_stored=12):
    """A DICOM whose one frame is ``stream`` as given, with the header's own Rows/Columns/bits."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian

    from tests.dicom_factory import write_dicom

    path = write_dicom(tmp_path / name, np.zeros((8, 8), np.uint16), bits_stored=12, transfer_syntax=ExplicitVRLittleEndian)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([stream + b"\0" * (len(stream) % 2)])
    ds["PixelData"].VR = "OB"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, bits_allocated, bits_stored, bits_stored - 1
    ds.save_as(path, enforce_file_format=True)
    return path


def _j2k_stream(pixels: np.ndarray, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG2000", no_jp2=True, irreversible=False, **kw)
    return buf.getvalue()


def test_jpeg2000_reduction_stays_where_openjpeg_and_pillow_agree_on_the_size(tmp_path):
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from curator import dicom

    # 1285 = 4 * 321 + 1: two levels down OpenJPEG makes 322 rows, Pillow expects 321 and refuses;
    # one level down (643, 650) both agree
    stored = _stored_film(1285, 1300, bits=12)
    ds = pydicom.dcmread(_dicom(tmp_path, "odd.dcm", stored, JPEG2000Lossless, bits_stored=12))
    frame, how = dicom.reduced_first_frame(ds, 320)
    assert how == "j2k/2" and frame.shape == (643, 650) and frame.max() <= 4095
    assert dicom._j2k_levels_down(1284, 1300, 320, 5) == 2 and dicom._j2k_levels_down(1285, 1300, 320, 5) == 1


def test_jpeg2000_codestream_that_disagrees_with_the_header_is_decoded_exactly(tmp_path):
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from curator import dicom

    film = (_film(700, 1006).astype(np.uint16) * 16)
    cases = {
        # an image offset: Pillow's reduced canvas is a column wider than what OpenJPEG fills
        "offset": (_j2k_stream(film, num_resolutions=6, offset=(1, 0), tile_size=(4096, 4096), tile_offset=(0, 0)), 700, 1006),
        "rows_columns_differ": (_j2k_stream(film, num_resolutions=6), 700, 1000),
        "transposed": (_j2k_stream(film, num_resolutions=6), 1006, 700),
    }
    for name, (stream, rows, cols) in cases.items():
        path = _encapsulated(tmp_path, name + ".dcm", stream, rows, cols, JPEG2000Lossless, bits_stored=16)
        assert dicom.reduced_first_frame(pydicom.dcmread(path), 160) is None, name
        opts = dict(modalities=None)
        for kw in (opts, dict(opts, jpeg_draft_min_side=160)):
            try:
                r = read_image(path, ReadOptions(**kw))
                assert r.conversion == "mimic", name
            except Exception as err:  # the exact path's verdict, whatever it is, on both
                assert type(err).__name__ == "ReadError", (name, err)
    # the same codestream with a matching header and no offset is reduced
    ok = _encapsulated(tmp_path, "ok.dcm", _j2k_stream(film, num_resolutions=6), 700, 1006, JPEG2000Lossless, bits_stored=16)
    assert dicom.reduced_first_frame(pydicom.dcmread(ok), 160)[1] == "j2k/4"


def test_jpeg2000_below_eight_bits_keeps_its_range_under_voi(tmp_path):
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from curator import dicom

    stored = (_film(700, 800).astype(np.uint16) >> 1).astype(np.uint8)  # 7 bits: 0..127
    # a window over the 7-bit range: values left widened to 8 bits would come out saturated
    path = _dicom(tmp_path, "seven.dcm", stored, JPEG2000Lossless, bits_stored=7, window_center=64, window_width=128)
    frame, how = dicom.reduced_first_frame(pydicom.dcmread(path), 320)
    assert how == "j2k/2" and frame.max() <= 127
    ref = stored.astype(np.float64).reshape(350, 2, 400, 2).mean(axis=(1, 3))
    assert np.abs(frame - ref).mean() < 1.5
    voi = dict(modalities=None, dicom_conversion="voi")
    exact, fast = read_image(path, ReadOptions(**voi)), read_image(path, ReadOptions(jpeg_draft_min_side=320, **voi))
    assert fast.conversion == "voi+j2k/2"
    ref8 = np.asarray(exact.image, np.float64).reshape(350, 2, 400, 2).mean(axis=(1, 3))
    assert np.abs(np.asarray(fast.image, np.float64) - ref8).mean() < 5  # 7-bit steps are 2 output levels


def test_jpeg_dicom_fast_and_pillow_paths_only_for_plain_8_bit_baseline(tmp_path):
    import io

    import pydicom
    from pydicom.uid import JPEGBaseline8Bit

    from curator import dicom

    film = _film(1400, 1300)
    plain, progressive = io.BytesIO(), io.BytesIO()
    Image.fromarray(film).save(plain, format="JPEG", quality=90)
    Image.fromarray(film).save(progressive, format="JPEG", quality=90, progressive=True)
    good = pydicom.dcmread(_encapsulated(tmp_path, "good.dcm", plain.getvalue(), 1400, 1300, JPEGBaseline8Bit, 8, 8))
    assert dicom.reduced_first_frame(good, 320)[1] == "dct/4" and dicom._jpeg_baseline_through_pillow(good) is not None
    cases = {
        "bits_allocated_16": _encapsulated(tmp_path, "b16.dcm", plain.getvalue(), 1400, 1300, JPEGBaseline8Bit, 16, 8),
        "rows_columns_differ": _encapsulated(tmp_path, "rc.dcm", plain.getvalue(), 1000, 1000, JPEGBaseline8Bit, 8, 8),
        "progressive": _encapsulated(tmp_path, "prog.dcm", progressive.getvalue(), 1400, 1300, JPEGBaseline8Bit, 8, 8),
    }
    for name, path in cases.items():
        ds = pydicom.dcmread(path)
        assert dicom.reduced_first_frame(ds, 320) is None, name
    assert dicom._jpeg_baseline_through_pillow(pydicom.dcmread(cases["progressive"])) is None
