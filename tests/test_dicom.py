"""curator.dicom: DICOM -> 8-bit image + metadata.

Every expected image here is computed independently in the test (numpy formulas from the DICOM
standard / the MIMIC-CXR-JPG recipe, ``cv2.equalizeHist``), from the pixel values the test wrote,
never from output of the code under test.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import cv2  # test dependency only: the reference for histogram equalisation
import numpy as np
import pydicom
import pytest

from curator import dicom
from curator.readers import MAX_PIXELS, ReadError, ReadOptions, read_image
from tests.dicom_factory import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    make_dataset,
    write_dicom,
    write_dicomdir,
    write_sr,
)

ROWS, COLS = 64, 80
REPO = Path(__file__).resolve().parents[1]
ANY_MODALITY = ReadOptions(modalities=None)
VOI = ReadOptions(dicom_conversion="voi")


# ------------------------------------------------------------------------------------------
# Independent reference computations
# ------------------------------------------------------------------------------------------


def chest_like(rows=ROWS, cols=COLS, *, lo=0, hi=4095, seed=0, dtype=np.uint16) -> np.ndarray:
    """A smooth radiograph-like image (body, two darker lungs, mild noise) in lo..hi."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    yy, xx = (y + 0.5) / rows, (x + 0.5) / cols
    body = np.exp(-((xx - 0.5) ** 2 / 0.08 + (yy - 0.55) ** 2 / 0.2))
    lungs = np.exp(-((xx - 0.32) ** 2 / 0.012 + (yy - 0.45) ** 2 / 0.05)) + np.exp(
        -((xx - 0.68) ** 2 / 0.012 + (yy - 0.45) ** 2 / 0.05)
    )
    img = 0.15 + 0.75 * body - 0.35 * lungs + rng.normal(0, 0.01, (rows, cols))
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(lo + img * (hi - lo)).astype(dtype)


def ref_mimic(values: np.ndarray, *, monochrome1: bool = False) -> np.ndarray:
    """MIMIC-CXR-JPG: min-max to 0..1, *255 truncated, MONOCHROME1 inverted, cv2 equalisation."""
    v = np.asarray(values, dtype=np.float64)
    v = v - v.min()
    if v.max() > 0:
        v = v / v.max()
    u8 = np.trunc(v * 255).astype(np.uint8)
    if monochrome1:
        u8 = 255 - u8
    return cv2.equalizeHist(u8)


def ref_linear_window(values, center, width, *, monochrome1=False) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) written straight onto an output range of 0..255, rounded half up."""
    v = np.asarray(values, dtype=np.float64)
    c, w = float(center), float(width)
    y = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    y = np.where(v <= c - 0.5 - (w - 1) / 2, 0.0, y)
    y = np.where(v > c - 0.5 + (w - 1) / 2, 255.0, y)
    out = np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    return 255 - out if monochrome1 else out


def ref_minmax(values, *, monochrome1=False) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    out = np.floor((v - v.min()) * 255.0 / (v.max() - v.min()) + 0.5).astype(np.uint8)
    return 255 - out if monochrome1 else out


def image_array(result) -> np.ndarray:
    assert result.image.mode == "L"
    return np.asarray(result.image)


# ------------------------------------------------------------------------------------------
# equalize_hist == cv2.equalizeHist, bit for bit
# ------------------------------------------------------------------------------------------


def _equalize_cases():
    rng = np.random.default_rng(1234)
    cases = []
    for _ in range(300):
        h, w = rng.integers(1, 70, 2)
        lo = int(rng.integers(0, 256))
        hi = int(rng.integers(lo, 256))
        cases.append(rng.integers(lo, hi + 1, (h, w)).astype(np.uint8))
    for _ in range(50):  # few distinct values, skewed counts
        values = rng.choice(256, size=int(rng.integers(2, 6)), replace=False)
        p = rng.dirichlet(np.ones(len(values)) * 0.3)
        cases.append(rng.choice(values, size=(37, 53), p=p).astype(np.uint8))
    for v in (0, 1, 77, 254, 255):  # constant images
        cases.append(np.full((13, 17), v, np.uint8))
    for a, b in ((0, 255), (255, 0), (10, 11), (200, 3), (0, 1), (254, 255)):  # one value plus one other
        img = np.full((21, 19), a, np.uint8)
        img[5, 7] = b
        cases.append(img)
    cases.append(np.array([[7]], np.uint8))
    cases.append(np.arange(256, dtype=np.uint8).reshape(16, 16))
    for seed in range(5):  # real-looking radiographs quantised to 8 bits
        cases.append((chest_like(301, 257, seed=seed) >> 4).astype(np.uint8))
    cases.append(np.asarray(chest_like(64, 80, hi=255, seed=9), dtype=np.uint8)[::2, ::3])  # strided view
    return cases


def test_equalize_hist_matches_opencv_exactly():
    for img in _equalize_cases():
        ours = dicom.equalize_hist(img)
        theirs = cv2.equalizeHist(np.ascontiguousarray(img))
        assert ours.dtype == np.uint8 and ours.shape == img.shape
        np.testing.assert_array_equal(ours, theirs)


def test_equalize_hist_constant_gives_that_constant():
    for v in (0, 128, 255):
        np.testing.assert_array_equal(dicom.equalize_hist(np.full((4, 5), v, np.uint8)), np.full((4, 5), v))


def test_equalize_hist_matches_opencv_on_a_large_image():
    # More than 2**24 pixels: running sums past float32's exact integers, int64 counts.
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (4100, 4100), dtype=np.uint8)
    img[:2000] //= 3
    np.testing.assert_array_equal(dicom.equalize_hist(img), cv2.equalizeHist(img))


def test_equalize_hist_rejects_non_uint8():
    with pytest.raises(TypeError):
        dicom.equalize_hist(np.zeros((3, 3), np.uint16))


# ------------------------------------------------------------------------------------------
# mimic_normalize
# ------------------------------------------------------------------------------------------


def test_mimic_normalize_formula():
    arr = np.array([[100, 200], [300, 1123]], np.uint16)
    expected = np.trunc((arr.astype(float) - 100) / 1023 * 255).astype(np.uint8)
    np.testing.assert_array_equal(dicom.mimic_normalize(arr, "MONOCHROME2"), expected)
    np.testing.assert_array_equal(dicom.mimic_normalize(arr, "MONOCHROME1"), 255 - expected)
    assert dicom.mimic_normalize(arr, None)[1, 1] == 255


def test_mimic_normalize_constant_and_full_int16_range():
    np.testing.assert_array_equal(dicom.mimic_normalize(np.full((3, 3), 900, np.uint16), "MONOCHROME2"), 0)
    np.testing.assert_array_equal(dicom.mimic_normalize(np.full((3, 3), -5.0), "MONOCHROME1"), 255)
    arr = np.array([[-32768, 0, 32767]], np.int16)  # arr - arr.min() overflows in int16
    np.testing.assert_array_equal(dicom.mimic_normalize(arr, "MONOCHROME2"), [[0, 127, 255]])


# ------------------------------------------------------------------------------------------
# Reading uncompressed files: the mimic conversion, exactly
# ------------------------------------------------------------------------------------------


MIMIC_CASES = {
    "u16_12bit_mono2": dict(pixels=chest_like(), bits_stored=12),
    "u16_12bit_mono1": dict(pixels=chest_like(seed=1), bits_stored=12, photometric="MONOCHROME1"),
    "u16_16bit": dict(pixels=chest_like(lo=1000, hi=60000, seed=2), bits_stored=16),
    "u8_8bit": dict(pixels=chest_like(lo=3, hi=250, seed=3, dtype=np.uint8)),
    "u8_8bit_mono1": dict(pixels=chest_like(lo=0, hi=255, seed=4, dtype=np.uint8), photometric="MONOCHROME1"),
    "i16_signed_12bit": dict(pixels=chest_like(lo=-2048, hi=2047, seed=5, dtype=np.int16), bits_stored=12),
    "rescale": dict(pixels=chest_like(seed=6), bits_stored=12, rescale_slope=0.37, rescale_intercept=-81.5),
    "negative_slope": dict(
        pixels=chest_like(seed=7), bits_stored=12, rescale_slope=-2.0, rescale_intercept=4095
    ),
    "signed_rescale_mono1": dict(
        pixels=chest_like(lo=-1000, hi=1500, seed=8, dtype=np.int16),
        bits_stored=16,
        rescale_slope=1.5,
        rescale_intercept=20,
        photometric="MONOCHROME1",
    ),
}


@pytest.mark.parametrize("case", sorted(MIMIC_CASES))
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_read_mimic_exact(tmp_path, case, syntax):
    kw = dict(MIMIC_CASES[case])
    pixels = kw.pop("pixels")
    path = write_dicom(tmp_path / "x.dcm", pixels, transfer_syntax=syntax, **kw)
    values = pixels.astype(np.float64)
    if kw.get("rescale_slope") is not None:
        values = values * kw["rescale_slope"] + kw["rescale_intercept"]
    expected = ref_mimic(values, monochrome1=kw.get("photometric") == "MONOCHROME1")

    result = dicom.read_dicom(path, ReadOptions())
    assert result.conversion == "mimic"
    assert result.file_format == "dicom"
    assert result.image.size == (COLS, ROWS)
    np.testing.assert_array_equal(image_array(result), expected)


def test_read_mimic_ignores_bits_above_bits_stored(tmp_path):
    pixels = chest_like(seed=11)
    dirty = pixels | np.where(np.arange(ROWS * COLS).reshape(ROWS, COLS) % 5 == 0, 0xF000, 0).astype(
        np.uint16
    )
    path = write_dicom(tmp_path / "x.dcm", dirty.astype(np.uint16), bits_stored=12)
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, ReadOptions())), ref_mimic(pixels))


def test_read_mimic_modality_lut_sequence(tmp_path):
    pixels = chest_like(hi=1023, seed=12)
    lut = (np.sqrt(np.arange(1024)) * 2000).astype(np.int64)  # 0..63968, 16-bit entries
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=10, modality_lut=(0, 16, lut))
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, ReadOptions())), ref_mimic(lut[pixels]))


TABLE_CASES = {
    "sparse_values": dict(pixels=(chest_like(hi=400, seed=13) * 97).astype(np.uint16), bits_stored=16),
    "uint16_extremes": dict(pixels=np.array([[0, 65535], [65535, 7]], dtype=np.uint16), bits_stored=16),
    "int16_full_range": dict(pixels=np.array([[-32768, 32767], [0, -1]], dtype=np.int16), bits_stored=16),
    "constant": dict(pixels=np.full((40, 30), 777, dtype=np.uint16), bits_stored=12),
    "constant_mono1": dict(pixels=np.full((40, 30), 5, dtype=np.uint8), photometric="MONOCHROME1"),
    "one_odd_pixel": dict(pixels=np.where(np.arange(1200).reshape(40, 30) == 3, 4000, 9).astype(np.uint16), bits_stored=12),
    # Extremes of the LUT over lo..hi fall on (odd) values the image does not hold: min and max
    # must be the held values' (1000 and 1598), not the table's (0 and 60000).
    "lut_not_monotonic": dict(
        pixels=np.tile(np.arange(0, 600, 2, dtype=np.uint16), (6, 1)), bits_stored=12,
        modality_lut=(0, 16, [1000 + i if i % 2 == 0 else (0 if i % 4 == 1 else 60000) for i in range(600)]),
    ),
    "lut_clips_both_ends": dict(pixels=chest_like(hi=1500, seed=14), bits_stored=12, modality_lut=(100, 16, np.arange(1000) * 50)),
    **MIMIC_CASES,
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_mimic_table_path_equals_the_per_pixel_chain(tmp_path, case):
    # mimic_to_uint8 converts integer images through a table over their stored values; the
    # per-pixel chain it replaces and the independent reference must both agree byte for byte.
    kw = dict(TABLE_CASES[case])
    pixels = kw.pop("pixels")
    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", pixels, **kw))
    stored = ds.pixel_array
    photometric = str(ds.PhotometricInterpretation)
    per_pixel = dicom.equalize_hist(dicom.mimic_normalize(dicom.modality_lut(stored, ds), photometric))
    got = dicom.mimic_to_uint8(stored, ds)
    assert got.dtype == np.uint8 and got.shape == stored.shape
    np.testing.assert_array_equal(got, per_pixel)
    # Independent of curator: pydicom's LUT / rescale, then the reference conversion.
    if "modality_lut" in kw:
        first, _, lut = kw["modality_lut"]
        values = np.asarray(lut)[np.clip(stored.astype(np.int64) - first, 0, len(lut) - 1)]
    else:
        values = stored.astype(np.float64) * kw.get("rescale_slope", 1.0) + kw.get("rescale_intercept", 0.0)
    np.testing.assert_array_equal(got, ref_mimic(values, monochrome1=photometric == "MONOCHROME1"))


def _in_memory_ds(photometric="MONOCHROME2", **elements):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    for k, v in elements.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("slope, intercept, values", [
    (1e305, 0.0, np.array([[0, 65535], [7, 9]], np.uint16)),      # finite at 0, inf at 65535
    (float("inf"), 0.0, np.array([[3, 4], [5, 6]], np.uint16)),     # inf everywhere
    (float("inf"), 0.0, np.array([[0, 0], [0, 0]], np.uint16)),     # 0 * inf: nan
    (1e300, -1e300, np.array([[1, 1], [1, 2]], np.uint16)),         # finite: 0 and 1e300
])
def test_mimic_invalid_rescale_raised_by_both_paths_alike(slope, intercept, values):
    ds = _in_memory_ds(RescaleSlope=slope, RescaleIntercept=intercept)
    outcomes = []
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pydicom's own multiply overflows too
        _compare_outcomes(values, ds, outcomes)
        held = values.astype(np.float64) * slope + intercept
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] == "invalid_rescale") == (not np.isfinite(held).all())


def _compare_outcomes(values, ds, outcomes):
    for convert in (dicom.mimic_to_uint8,
                    lambda a, d: dicom.equalize_hist(dicom.mimic_normalize(dicom.modality_lut(a, d), "MONOCHROME2"))):
        try:
            outcomes.append(convert(values, ds).tolist())
        except ReadError as err:
            outcomes.append(err.kind)


def test_mimic_table_never_maps_values_the_image_lacks():
    # A signed image and a Modality LUT whose data is shorter than its descriptor says: values the
    # image does not hold would index past the data (pydicom wraps int16 arithmetic), and must
    # not be looked up at all.
    item = _in_memory_ds(LUTDescriptor=[0, -1000, 16], LUTData=list(range(0, 3000, 2)))
    del item.PhotometricInterpretation
    ds = _in_memory_ds(BitsStored=16, PixelRepresentation=1, ModalityLUTSequence=[item])
    stored = np.array([[0, 32000], [5, 32000]], dtype=np.int16)
    per_pixel = dicom.equalize_hist(dicom.mimic_normalize(dicom.modality_lut(stored, ds), "MONOCHROME2"))
    np.testing.assert_array_equal(dicom.mimic_to_uint8(stored, ds), per_pixel)


@pytest.mark.parametrize("stored", [
    np.array([[127, -128], [0, 5]], dtype=np.int8),
    np.array([[32767, -32768], [0, 5]], dtype=np.int16),
    np.array([[255, 0], [3, 3]], dtype=np.uint8),
    np.array([[65535, 65534], [65535, 1]], dtype=np.uint16),
    np.array([[2**31 - 1, 2**31 - 5], [2**31 - 2, 2**31 - 1]], dtype=np.int32),
    np.array([[2**32 - 1, 2**32 - 3]], dtype=np.uint32),
])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_mimic_and_voi_at_the_ends_of_each_integer_type(stored, photometric):
    ds = _in_memory_ds(photometric)
    mono1 = photometric == "MONOCHROME1"
    np.testing.assert_array_equal(dicom.mimic_to_uint8(stored, ds), ref_mimic(stored, monochrome1=mono1))
    np.testing.assert_array_equal(dicom.voi_to_uint8(stored, ds), ref_minmax(stored, monochrome1=mono1))


@pytest.mark.parametrize("stored", [
    np.array([[-(1 << 20), 0], [5, 1 << 20]], dtype=np.int32),  # too wide for a table
    np.array([[0, 70000], [5, 3]], dtype=np.uint32),
    np.array([[2, 9], [5, 3]], dtype=np.uint64),
    np.array([[-7, 9], [5, -128]], dtype=np.int8),
])
def test_mimic_other_integer_types(stored):
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_array_equal(dicom.mimic_to_uint8(stored, ds), ref_mimic(stored))


def test_deflated_and_preamble_less_files(tmp_path):
    pixels = chest_like(seed=13)
    path = write_dicom(
        tmp_path / "d.dcm", pixels, bits_stored=12, transfer_syntax=DeflatedExplicitVRLittleEndian
    )
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, ReadOptions())), ref_mimic(pixels))

    ds = make_dataset(pixels, bits_stored=12, transfer_syntax=ImplicitVRLittleEndian)
    del ds.file_meta
    raw = tmp_path / "raw.dcm"
    ds.save_as(raw, implicit_vr=True, little_endian=True)  # no preamble, no DICM, no file meta
    assert raw.read_bytes()[128:132] != b"DICM"
    result = read_image(raw)
    np.testing.assert_array_equal(image_array(result), ref_mimic(pixels))
    assert result.meta["transfer_syntax_uid"] == ImplicitVRLittleEndian  # inferred from the encoding


# ------------------------------------------------------------------------------------------
# The voi conversion
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_linear_window(tmp_path, photometric):
    pixels = chest_like(seed=20)
    path = write_dicom(
        tmp_path / "x.dcm",
        pixels,
        bits_stored=12,
        photometric=photometric,
        window_center=1800,
        window_width=1001,
    )
    result = dicom.read_dicom(path, VOI)
    assert result.conversion == "voi"
    expected = ref_linear_window(pixels, 1800, 1001, monochrome1=photometric == "MONOCHROME1")
    np.testing.assert_array_equal(image_array(result), expected)
    assert expected.min() == 0 and expected.max() == 255  # the window really clips both ends


def test_voi_first_of_several_windows(tmp_path):
    pixels = chest_like(seed=21)
    path = write_dicom(
        tmp_path / "x.dcm", pixels, bits_stored=12, window_center=[2100, 900], window_width=[2001, 301]
    )
    np.testing.assert_array_equal(
        image_array(dicom.read_dicom(path, VOI)), ref_linear_window(pixels, 2100, 2001)
    )


def test_voi_window_after_signed_rescale(tmp_path):
    pixels = chest_like(lo=-2048, hi=2047, seed=22, dtype=np.int16)
    path = write_dicom(
        tmp_path / "x.dcm",
        pixels,
        bits_stored=12,
        rescale_slope=2.0,
        rescale_intercept=-100.0,
        window_center=0,
        window_width=2001,
    )
    values = pixels.astype(np.float64) * 2.0 - 100.0
    np.testing.assert_array_equal(
        image_array(dicom.read_dicom(path, VOI)), ref_linear_window(values, 0, 2001)
    )


def test_voi_window_after_negative_rescale_slope(tmp_path):
    pixels = chest_like(seed=28)
    path = write_dicom(
        tmp_path / "x.dcm",
        pixels,
        bits_stored=12,
        rescale_slope=-1.0,
        rescale_intercept=4095.0,
        window_center=2000,
        window_width=1001,
    )
    values = 4095.0 - pixels.astype(np.float64)  # below the window is dark, above it bright
    np.testing.assert_array_equal(
        image_array(dicom.read_dicom(path, VOI)), ref_linear_window(values, 2000, 1001)
    )


def test_voi_sigmoid_window(tmp_path):
    pixels = chest_like(seed=23)
    path = write_dicom(
        tmp_path / "x.dcm",
        pixels,
        bits_stored=12,
        window_center=2000,
        window_width=1500,
        voi_lut_function="SIGMOID",
    )
    # PS3.3 C.11.2.1.3.1 on an output range of 0..255.
    expected = 255.0 / (1 + np.exp(-4 * (pixels.astype(float) - 2000) / 1500))
    got = image_array(dicom.read_dicom(path, VOI)).astype(int)
    assert np.abs(got - np.floor(expected + 0.5)).max() <= 1


def test_voi_lut_sequence_8bit_entries_more_than_256(tmp_path):
    # pydicom 3.0's apply_voi indexes an 8-bit LUT with uint8 indices and wraps past 255.
    pixels = chest_like(hi=1400, seed=24)
    lut = (np.arange(1024) * 255) // 1023
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, voi_lut=(100, 8, lut))
    expected = lut[np.clip(pixels.astype(int) - 100, 0, 1023)].astype(np.uint8)
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, VOI)), expected)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_16bit_takes_precedence_over_window(tmp_path, vr):
    pixels = chest_like(seed=25)
    k = (np.arange(4096) * 7) % 256  # any mapping; entries are k * 257 so 8 bits come out exact
    path = write_dicom(
        tmp_path / "x.dcm",
        pixels,
        bits_stored=12,
        photometric="MONOCHROME1",
        voi_lut=(0, 16, k * 257),
        voi_lut_vr=vr,
        window_center=100,
        window_width=10,
    )
    expected = 255 - k[pixels].astype(np.uint8)
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, VOI)), expected)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_without_window_is_min_max(tmp_path, photometric):
    pixels = chest_like(seed=26)
    assert pixels.min() == 0 and pixels.max() == 4095
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, photometric=photometric)
    expected = ref_minmax(pixels, monochrome1=photometric == "MONOCHROME1")
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, VOI)), expected)


def test_voi_invalid_window_falls_back_to_min_max(tmp_path):
    pixels = chest_like(seed=27)
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, window_center=2000, window_width=0.5)
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, VOI)), ref_minmax(pixels))


VOI_TABLE_CASES = {
    # min-max over an image that holds neither 0 nor the top of its range
    "min_max_inner_range": dict(pixels=chest_like(lo=1000, hi=3000, seed=30), bits_stored=12),
    "min_max_signed_mono1": dict(pixels=chest_like(lo=-700, hi=900, seed=31, dtype=np.int16), bits_stored=16,
                                 photometric="MONOCHROME1"),
    "window_after_rescale": dict(pixels=chest_like(seed=32), bits_stored=12, rescale_slope=0.5, rescale_intercept=-100,
                                 window_center=700, window_width=900),
    "sigmoid_window": dict(pixels=chest_like(seed=33), bits_stored=12, window_center=2000, window_width=1500,
                           voi_lut_function="SIGMOID"),
    "lut": dict(pixels=chest_like(hi=1500, seed=34), bits_stored=12, voi_lut=(200, 16, (np.arange(1000) * 37) % 65536)),
    "lut_after_rescale_mono1": dict(pixels=chest_like(hi=1500, seed=36), bits_stored=12, rescale_slope=0.5, rescale_intercept=100,
                                    voi_lut=(150, 16, (np.arange(800) * 81) % 65536), photometric="MONOCHROME1"),
    "linear_exact_window": dict(pixels=chest_like(seed=37), bits_stored=12, window_center=1800, window_width=1200,
                                voi_lut_function="LINEAR_EXACT"),
    "window_mono1": dict(pixels=chest_like(seed=38), bits_stored=12, window_center=2100, window_width=2500, photometric="MONOCHROME1"),
}


@pytest.mark.parametrize("case", sorted(VOI_TABLE_CASES))
def test_voi_table_path_equals_the_per_value_chain(tmp_path, case):
    kw = dict(VOI_TABLE_CASES[case])
    pixels = kw.pop("pixels")
    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", pixels, **kw))
    stored = ds.pixel_array
    got = dicom.voi_to_uint8(stored, ds)
    assert got.dtype == np.uint8 and got.shape == stored.shape
    np.testing.assert_array_equal(got, dicom._voi_per_value(stored, ds))
    if case.startswith("min_max"):  # independent reference
        np.testing.assert_array_equal(got, ref_minmax(stored, monochrome1=kw.get("photometric") == "MONOCHROME1"))


def test_voi_table_path_signed_image_with_an_unsigned_first_mapped_value():
    # The first mapped value 65036 reads as -500 only because the image holds negative values:
    # the table path must decide that on the image's values, as the per-pixel chain does.
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [1000, 65536 - 500, 16]
    item.LUTData = [int(v) for v in (np.arange(1000) * 60) % 65536]
    ds = Dataset()
    ds.VOILUTSequence = [item]
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = 16, 1
    for lo in (-600, 100):
        stored = chest_like(lo=lo, hi=lo + 1000, seed=35, dtype=np.int16)
        got = dicom.voi_to_uint8(stored, ds)
        np.testing.assert_array_equal(got, dicom._voi_per_value(stored, ds))
        first = -500 if lo < 0 else 65536 - 500
        y = np.asarray(item.LUTData)[np.clip(stored.astype(np.int64) - first, 0, 999)]
        np.testing.assert_array_equal(got, np.clip(np.floor(y / 65535 * 255 + 0.5), 0, 255).astype(np.uint8))


def test_window_output_range_documented_cases():
    ds = make_dataset(np.zeros((2, 2), np.uint16), bits_stored=12)
    assert dicom.window_output_range(ds) == (0, 4095)
    ds = make_dataset(np.zeros((2, 2), np.int16), bits_stored=12, rescale_slope=2, rescale_intercept=-100)
    assert dicom.window_output_range(ds) == (-2048 * 2 - 100, 2047 * 2 - 100)


def test_unknown_conversion_is_a_value_error(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", chest_like(), bits_stored=12)
    with pytest.raises(ValueError):
        dicom.read_dicom(path, ReadOptions(dicom_conversion="bogus"))
    with pytest.raises(ValueError):
        dicom.convert_to_uint8(chest_like(), make_dataset(chest_like(), bits_stored=12), "linear")


# ------------------------------------------------------------------------------------------
# Compressed transfer syntaxes
# ------------------------------------------------------------------------------------------

LOSSLESS = {
    "rle_u16": (RLELossless, chest_like(seed=30), 12),
    "rle_i16": (RLELossless, chest_like(lo=-2048, hi=2047, seed=31, dtype=np.int16), 12),
    "rle_u8": (RLELossless, chest_like(hi=255, seed=32, dtype=np.uint8), 8),
    "jpeg_lossless_sv1_u16": (JPEGLosslessSV1, chest_like(seed=33), 12),
    "jpeg_lossless_sv1_16bit": (JPEGLosslessSV1, chest_like(lo=0, hi=65535, seed=34), 16),
    "jpeg_lossless_sv1_i16": (JPEGLosslessSV1, chest_like(lo=-2048, hi=2047, seed=35, dtype=np.int16), 12),
    "jpeg_lossless_p14_u16": (JPEGLossless, chest_like(seed=36), 12),
    "jpeg_ls_lossless_u16": (JPEGLSLossless, chest_like(seed=37), 12),
    "jpeg_ls_lossless_i16": (JPEGLSLossless, chest_like(lo=-2048, hi=2047, seed=38, dtype=np.int16), 12),
    "j2k_lossless_u16": (JPEG2000Lossless, chest_like(seed=39), 12),
    "j2k_lossless_i16": (JPEG2000Lossless, chest_like(lo=-2048, hi=2047, seed=40, dtype=np.int16), 12),
    "j2k_any_lossless_u16": (JPEG2000, chest_like(seed=41), 12),  # .91 may hold a reversible stream
}


@pytest.mark.parametrize("case", sorted(LOSSLESS))
def test_lossless_syntaxes_decode_exactly(tmp_path, case):
    syntax, pixels, bits = LOSSLESS[case]
    path = write_dicom(
        tmp_path / "x.dcm", pixels, bits_stored=bits, transfer_syntax=syntax, photometric="MONOCHROME1"
    )
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    result = dicom.read_dicom(path, ReadOptions())
    np.testing.assert_array_equal(image_array(result), ref_mimic(pixels, monochrome1=True))
    assert result.meta["transfer_syntax_uid"] == syntax
    result = dicom.read_dicom(path, VOI)
    np.testing.assert_array_equal(image_array(result), ref_minmax(pixels, monochrome1=True))


LOSSY = {
    "jpeg_baseline": (JPEGBaseline8Bit, chest_like(hi=255, seed=50, dtype=np.uint8), dict()),
    "j2k_lossy": (JPEG2000, chest_like(seed=51), dict(bits_stored=12, j2k_psnr=55)),
    "jpeg_ls_near_lossless": (JPEGLSNearLossless, chest_like(seed=52), dict(bits_stored=12, jls_error=3)),
}
# (mean, max) absolute error allowed on the 8-bit output; JPEG baseline at quality 95 on a
# small noisy 8-bit image is the coarsest.
LOSSY_TOLERANCE = {"jpeg_baseline": (2.5, 12), "j2k_lossy": (1.0, 6), "jpeg_ls_near_lossless": (1.0, 2)}


@pytest.mark.parametrize("case", sorted(LOSSY))
def test_lossy_syntaxes_decode_close(tmp_path, case):
    syntax, pixels, kw = LOSSY[case]
    top = 255 if pixels.dtype == np.uint8 else 4095
    path = write_dicom(
        tmp_path / "x.dcm",
        pixels,
        transfer_syntax=syntax,
        window_center=(top + 1) / 2,
        window_width=top + 1,
        **kw,
    )
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    got = image_array(dicom.read_dicom(path, VOI)).astype(int)
    expected = ref_linear_window(pixels, (top + 1) / 2, top + 1).astype(int)
    diff = np.abs(got - expected)
    mean_tol, max_tol = LOSSY_TOLERANCE[case]
    assert diff.mean() < mean_tol and diff.max() <= max_tol, (diff.mean(), diff.max())
    mimic = image_array(dicom.read_dicom(path, ReadOptions())).astype(int)
    assert np.abs(mimic - ref_mimic(pixels).astype(int)).mean() < 4


@pytest.mark.parametrize("shape, quality", [((ROWS, COLS), 95), ((333, 251), 75), ((64, 1000), 50)])
def test_jpeg_baseline_through_pillow_equals_gdcm(tmp_path, shape, quality):
    # Grayscale JPEG baseline frames go to Pillow (libjpeg-turbo) before pydicom's default GDCM:
    # the pixels must be GDCM's, bit for bit.
    pixels = chest_like(*shape, lo=0, hi=255, seed=sum(shape), dtype=np.uint8)
    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", pixels, transfer_syntax=JPEGBaseline8Bit, jpeg_quality=quality))
    via_pillow = dicom._jpeg_baseline_through_pillow(ds)
    assert via_pillow is not None
    gdcm = pydicom.pixels.pixel_array(ds, index=0, decoding_plugin="gdcm")
    np.testing.assert_array_equal(via_pillow, gdcm)
    np.testing.assert_array_equal(dicom.decode_first_frame(ds), gdcm)


def test_default_install_decodes_every_syntax_without_gpl_libjpeg(tmp_path):
    """In a fresh interpreter where pylibjpeg-libjpeg (GPL) cannot be imported, every syntax decodes."""
    cases = dict(LOSSLESS)
    cases.update({k: (v[0], v[1], v[2].get("bits_stored", 8)) for k, v in LOSSY.items()})
    paths = []
    for name, (syntax, pixels, bits) in sorted(cases.items()):
        paths.append(
            str(write_dicom(tmp_path / f"{name}.dcm", pixels, bits_stored=bits, transfer_syntax=syntax))
        )
    script = (
        "import sys, json, hashlib\n"
        "sys.modules['libjpeg'] = None  # as if pylibjpeg-libjpeg were not installed\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import numpy as np\n"
        "from curator.dicom import read_dicom\n"
        "from curator.readers import ReadOptions\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    img = np.asarray(read_dicom(p, ReadOptions()).image)\n"
        "    out[p] = hashlib.sha256(img.tobytes()).hexdigest()\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    digests = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_syntax, pixels, _bits) in sorted(cases.items()):
        if name in LOSSLESS:
            expected = hashlib.sha256(ref_mimic(pixels).tobytes()).hexdigest()
            assert digests[str(tmp_path / f"{name}.dcm")] == expected, name
        else:
            assert str(tmp_path / f"{name}.dcm") in digests


# ------------------------------------------------------------------------------------------
# Multi-frame
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless])
def test_multi_frame_uses_first_frame(tmp_path, syntax):
    frames = np.stack([chest_like(seed=60), chest_like(seed=61)[::-1], chest_like(seed=62) // 2])
    path = write_dicom(tmp_path / "x.dcm", frames, bits_stored=12, transfer_syntax=syntax)
    result = dicom.read_dicom(path, ReadOptions())
    np.testing.assert_array_equal(image_array(result), ref_mimic(frames[0]))
    assert result.meta["number_of_frames"] == 3
    assert result.meta["frame_used"] == 0


# ------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------

HEADER = dict(
    modality="CR",
    patient_id="P-123",
    patient_name="Smith^John^Q",
    patient_birth_date="19500101",
    study_date="20200229",
    study_time="083000",
    patient_age="018M",
    patient_sex="M",
    view_position="AP",
    image_laterality="L",
    laterality="R",
    manufacturer="Vendor Medical",
    manufacturer_model="Model X",
    institution_name="St Elsewhere",
    body_part_examined="CHEST",
    study_instance_uid="1.2.826.0.1.3680043.10.1",
    series_instance_uid="1.2.826.0.1.3680043.10.1.2",
    sop_instance_uid="1.2.826.0.1.3680043.10.1.2.3",
)


def test_metadata_columns(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", chest_like(), bits_stored=12, **HEADER)
    expected = {
        "patient_id": "P-123",
        "study_instance_uid": "1.2.826.0.1.3680043.10.1",
        "series_instance_uid": "1.2.826.0.1.3680043.10.1.2",
        "sop_instance_uid": "1.2.826.0.1.3680043.10.1.2.3",
        "sop_class_uid": CR_IMAGE_STORAGE,
        "modality": "CR",
        "view_position": "AP",
        "laterality": "L",
        "study_date": dt.date(2020, 2, 29),
        "study_time": "083000",
        "patient_age": 1,
        "patient_sex": "M",
        "manufacturer": "Vendor Medical",
        "manufacturer_model": "Model X",
        "institution_name": "St Elsewhere",
        "body_part_examined": "CHEST",
        "rows": ROWS,
        "columns": COLS,
        "bits_allocated": 16,
        "bits_stored": 12,
        "photometric_interpretation": "MONOCHROME2",
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "number_of_frames": 1,
        "frame_used": 0,
    }
    meta = dicom.read_dicom(path, ReadOptions()).meta
    assert meta == expected
    assert list(meta) == list(dicom.META_KEYS)
    assert dicom.read_metadata(path) == expected
    assert read_image(path).meta == expected


def test_metadata_never_holds_patient_name_or_birth_date(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", chest_like(), bits_stored=12, **HEADER)
    for meta in (dicom.read_dicom(path, ReadOptions()).meta, dicom.read_metadata(path)):
        assert not {"patient_name", "patient_birth_date", "PatientName", "PatientBirthDate"} & set(meta)
        text = repr(meta)
        assert "Smith" not in text and "John" not in text and "19500101" not in text and "1950" not in text


@pytest.mark.filterwarnings("ignore")
def test_metadata_missing_and_malformed_values(tmp_path):
    path = write_dicom(
        tmp_path / "x.dcm",
        chest_like(),
        bits_stored=12,
        patient_age="abc",
        study_date="20191345",
        study_time=None,
        patient_sex=None,
        view_position=None,
        image_laterality=None,
        laterality="R",
        manufacturer=None,
        manufacturer_model=None,
        institution_name=None,
        body_part_examined=None,
    )
    meta = dicom.read_dicom(path, ReadOptions()).meta
    assert set(meta) == set(dicom.META_KEYS)
    assert meta["laterality"] == "R"  # (0020,0060) when (0020,0062) is absent
    for key in (
        "patient_age",
        "study_date",
        "study_time",
        "patient_sex",
        "view_position",
        "manufacturer",
        "manufacturer_model",
        "institution_name",
        "body_part_examined",
    ):
        assert meta[key] is None, key
    assert meta["modality"] == "DX" and meta["sop_class_uid"] == DX_FOR_PRESENTATION


@pytest.mark.parametrize(
    "value, years",
    [
        ("065Y", 65),
        ("018M", 1),
        ("011M", 0),
        ("003W", 0),
        ("060W", 1),
        ("010D", 0),
        ("400D", 1),
        ("65", 65),
        ("065y", 65),
        ("", None),
        (None, None),
        ("abc", None),
        ("12X", None),
        ("-5Y", None),
    ],
)
def test_parse_age(value, years):
    assert dicom.parse_age(value) == years


@pytest.mark.parametrize(
    "value, date",
    [
        ("20190317", dt.date(2019, 3, 17)),
        ("2019.03.17", dt.date(2019, 3, 17)),
        (" 20190317 ", dt.date(2019, 3, 17)),
        ("20191345", None),
        ("20190230", None),
        ("2019", None),
        ("", None),
        (None, None),
        ("20190101-20191231", None),
        ("garbage!", None),
    ],
)
def test_parse_da(value, date):
    assert dicom.parse_da(value) == date


# ------------------------------------------------------------------------------------------
# Files that must be refused, each with a reason
# ------------------------------------------------------------------------------------------


def _kind(path, options=ANY_MODALITY, reader=None):
    reader = reader or (lambda p: dicom.read_dicom(p, options))
    with pytest.raises(ReadError) as info:
        reader(path)
    message = str(info.value)
    assert message and "\n" not in message
    return info.value


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless]
)
def test_truncated_file_cut_in_half(tmp_path, syntax):
    path = write_dicom(tmp_path / "x.dcm", chest_like(seed=70), bits_stored=12, transfer_syntax=syntax)
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    err = _kind(cut)
    assert err.kind == "truncated" and err.stage == "read"
    assert _kind(cut, reader=read_image).kind == "truncated"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_truncated_anywhere_never_yields_a_partial_image(tmp_path, syntax):
    pixels = chest_like(seed=71)
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, transfer_syntax=syntax)
    data = path.read_bytes()
    full = ref_mimic(pixels)
    cut = tmp_path / "cut.dcm"
    offsets = sorted(set(np.linspace(133, len(data) - 1, 45).astype(int)) | {len(data) - 1, len(data) - 9})
    for n in offsets:
        cut.write_bytes(data[:n])
        try:
            result = read_image(cut, ANY_MODALITY)
        except ReadError as err:
            assert err.kind in ("truncated", "corrupt_header"), (n, err.kind, str(err))
            continue
        # Only a cut inside the trailing sequence delimiter leaves the image whole.
        np.testing.assert_array_equal(image_array(result), full, err_msg=f"cut at {n}")


def test_zero_byte_and_text_files(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert _kind(empty, reader=read_image).kind == "empty_file"
    text = tmp_path / "x.dcm"
    text.write_text("Patient list\nnot an image at all\n" * 20)
    err = _kind(text, reader=read_image)
    assert err.kind == "not_dicom" and err.stage == "read"


def test_sr_document(tmp_path):
    path = write_sr(tmp_path / "sr.dcm")
    err = _kind(path, ANY_MODALITY)
    assert err.kind == "no_pixel_data" and err.stage == "read"
    assert "(7FE0,0010)" in str(err)
    err = _kind(path, ReadOptions())  # the default filter sees Modality SR first
    assert err.kind == "modality_filtered" and err.stage == "filter"


def test_ct_slice_modality_filter(tmp_path):
    pixels = chest_like(lo=-1024, hi=2000, seed=72, dtype=np.int16)
    path = write_dicom(
        tmp_path / "ct.dcm", pixels, bits_stored=16, modality="CT", rescale_slope=1, rescale_intercept=-1024
    )
    err = _kind(path, ReadOptions())
    assert err.kind == "modality_filtered" and err.stage == "filter"
    assert str(err) == "(0008,0060) Modality is 'CT', not one of CR, DX"
    assert _kind(path, reader=read_image).stage == "filter"
    result = dicom.read_dicom(path, ANY_MODALITY)
    np.testing.assert_array_equal(image_array(result), ref_mimic(pixels.astype(float) - 1024))
    assert result.meta["modality"] == "CT"


def test_modality_filter_accepts_missing_modality(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", chest_like(), bits_stored=12, modality=None)
    np.testing.assert_array_equal(image_array(dicom.read_dicom(path, ReadOptions())), ref_mimic(chest_like()))


def test_dicomdir(tmp_path):
    dicomdir = write_dicomdir(tmp_path / "media")
    assert dicomdir.name == "DICOMDIR"
    assert _kind(dicomdir, reader=read_image).kind == "dicomdir"
    renamed = tmp_path / "index.dcm"  # recognised by its Media Storage SOP Class too
    shutil.copy(dicomdir, renamed)
    assert _kind(renamed, reader=read_image).kind == "dicomdir"


def test_gigapixel_header_is_refused_before_allocating(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint16), bits_stored=12)
    ds.Rows, ds.Columns = 40000, 40000
    assert 40000 * 40000 > MAX_PIXELS
    path = tmp_path / "giga.dcm"
    ds.save_as(path, enforce_file_format=True)
    tracemalloc.start()
    try:
        err = _kind(path, reader=read_image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.kind == "too_large"
    assert "(0028,0010) Rows" in str(err) and "40000" in str(err)
    assert peak < 50 * 2**20


def test_declared_size_larger_than_pixel_data(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint16), bits_stored=12)
    ds.Rows, ds.Columns = 8000, 8000  # allowed size, but only 32 bytes of pixel data
    path = tmp_path / "short.dcm"
    ds.save_as(path, enforce_file_format=True)
    tracemalloc.start()
    try:
        err = _kind(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.kind == "truncated" and "(7FE0,0010)" in str(err)
    assert peak < 50 * 2**20


def test_colour_and_palette_images(tmp_path):
    ds = make_dataset(np.zeros((8, 24), np.uint8))
    ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 8, 3, "RGB", 0
    path = tmp_path / "rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    err = _kind(path)
    assert err.kind == "not_grayscale" and "(0028,0002)" in str(err)

    ds = make_dataset(np.zeros((8, 8), np.uint8))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    path = tmp_path / "palette.dcm"
    ds.save_as(path, enforce_file_format=True)
    err = _kind(path)
    assert err.kind == "unsupported_photometric" and "'PALETTE COLOR'" in str(err)


def test_unknown_transfer_syntax(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", chest_like(), bits_stored=12, transfer_syntax=RLELossless)
    data = path.read_bytes()
    old = b"1.2.840.10008.1.2.5\x00"
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, b"1.2.826.0.1.3680.9\x00\x00"))  # a private syntax, same length
    err = _kind(path)
    assert err.kind == "unsupported_transfer_syntax" and "1.2.826.0.1.3680.9" in str(err)


def test_corrupt_compressed_data_is_decode_failed(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", chest_like(), bits_stored=12, transfer_syntax=JPEG2000Lossless)
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # the J2K codestream: SOC, SIZ
    data[start : start + 4] = b"\x00\x00\x00\x00"
    path.write_bytes(bytes(data))
    assert _kind(path).kind == "decode_failed"


# ------------------------------------------------------------------------------------------
# End to end through curator.readers.read_image
# ------------------------------------------------------------------------------------------


def test_read_image_end_to_end(tmp_path):
    pixels = chest_like(seed=80)
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, window_center=2048, window_width=4096)
    result = read_image(path)
    assert (result.conversion, result.file_format, result.image.mode) == ("mimic", "dicom", "L")
    np.testing.assert_array_equal(image_array(result), ref_mimic(pixels))
    result = read_image(path, ReadOptions(dicom_conversion="voi"))
    assert (result.conversion, result.file_format) == ("voi", "dicom")
    np.testing.assert_array_equal(image_array(result), ref_linear_window(pixels, 2048, 4096))
    no_suffix = tmp_path / "IM0001"  # DICM prefix, no extension
    shutil.copy(path, no_suffix)
    assert read_image(no_suffix).conversion == "mimic"


def test_read_from_bytes_already_in_memory(tmp_path):
    pixels = chest_like(seed=81)
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, transfer_syntax=RLELossless, **HEADER)
    data = path.read_bytes()
    result = dicom.read_dicom(Path("/nonexistent/named.dcm"), ReadOptions(), data=data)
    np.testing.assert_array_equal(image_array(result), ref_mimic(pixels))
    assert result.meta == dicom.read_metadata(path) == dicom.read_metadata("unused", data=data)
    with pytest.raises(ReadError) as info:
        dicom.read_dicom(Path("/nonexistent/named.dcm"), ReadOptions(), data=data[: len(data) // 2])
    assert info.value.kind == "truncated"
