"""Hostile and broken files: each gets an errors row (or, when valid, a catalog row); none crashes or hangs."""

from __future__ import annotations

import os
import struct
import time
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image

from curator.discover import FileEntry
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.pipelines.stages import read_item
from curator.query import run_query
from curator.readers import ReadOptions
from curator.workspace import Workspace
from tests.dicom_factory import write_dicom


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path, side=60000):
    """A tiny PNG that declares side x side pixels (3.6 gigapixels) of zeros."""
    raw = zlib.compress(b"\0" * (side + 1) * 64, 9)  # only the first rows; the header is the bomb
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")
    path.write_bytes(data)


def _entry(p):
    st = os.stat(p)
    return FileEntry(str(p), st.st_size, st.st_mtime_ns)


@pytest.fixture()
def hostile(tmp_path):
    arc = tmp_path / "arc"
    arc.mkdir()
    good = []
    rng = np.random.default_rng(0)
    for i in range(3):
        p = arc / f"good{i}.png"
        Image.fromarray(rng.integers(0, 255, (120, 100), dtype=np.uint8)).save(p)
        good.append(p)
    bad = {}
    png_bomb(arc / "bomb.png")
    bad["bomb.png"] = "too_large"
    # a JPEG that never ends: the scan runs to the end of the file with no EOI marker
    buf = arc / "noend.jpg"
    Image.fromarray(rng.integers(0, 255, (400, 300), dtype=np.uint8)).save(buf, quality=90)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 3])
    bad["noend.jpg"] = "corrupt_image"
    # DICOM declaring a gigapixel image with a few bytes of pixel data
    g = write_dicom(arc / "giga.dcm", np.zeros((16, 16), np.uint16), bits_stored=12)
    ds = pydicom.dcmread(g)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(g)
    bad["giga.dcm"] = "too_large"
    # pixel data shorter than declared
    s = write_dicom(arc / "short.dcm", np.zeros((64, 64), np.uint16), bits_stored=12)
    ds = pydicom.dcmread(s)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(s)
    bad["short.dcm"] = None  # any reason
    # wrong Bits Allocated for the pixel data
    w = write_dicom(arc / "bits.dcm", np.zeros((64, 64), np.uint16), bits_stored=12)
    ds = pydicom.dcmread(w)
    ds.BitsAllocated = 32
    ds.save_as(w)
    bad["bits.dcm"] = None
    # a file name that is not valid UTF-8
    fd = os.open(os.fsencode(str(arc)) + b"/bad\xff\xfename.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, (arc / "good0.png").read_bytes())
    os.close(fd)
    bad["bad\\xff\\xfename.png"] = "unreadable"
    # a directory named like an image, holding a good image
    (arc / "folder.dcm").mkdir()
    Image.fromarray(np.full((50, 60), 9, np.uint8)).save(arc / "folder.dcm" / "inner.png")
    good.append(arc / "folder.dcm" / "inner.png")
    return arc, good, bad


def test_hostile_archive(tmp_path, hostile, tiny_checkpoints):
    arc, good, bad = hostile
    t0 = time.time()
    summary = run_embed(EmbedConfig(archives=[str(arc)], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                                    workers=2, batch_size=4, progress=False))
    assert time.time() - t0 < 120
    # the file with an undecodable name is no "file found", yet it is accounted for among the failed
    n_files = sum(1 for _, _, fs in os.walk(arc) for _ in fs)
    assert summary.discovered == n_files - 1 and summary.unreadable == 1
    assert "files found, plus 1 unreadable entry (broken links" in summary.lines()[0]
    assert summary.processed + sum(summary.failed.values()) + sum(summary.filtered.values()) == summary.discovered + summary.unreadable
    w = Workspace(tmp_path / "ws")
    assert sorted(run_query(w, "SELECT path FROM catalog").path) == sorted(str(p) for p in good)
    errors = run_query(w, "SELECT path, kind, error FROM errors")
    got = {os.path.basename(p): (k, e) for p, k, e in errors.itertuples(index=False)}
    assert set(got) == set(bad), got
    for name, kind in bad.items():
        if kind is not None:
            assert got[name][0] == kind, (name, got[name])
        assert got[name][1]


def test_file_vanishing_before_read(tmp_path):
    p = tmp_path / "gone.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(p)
    entry = _entry(p)
    p.unlink()
    item = read_item(entry, ReadOptions())
    assert not item["ok"] and item["error"]["kind"] == "vanished"


def test_per_file_time_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (2500, 2000), dtype=np.uint8)).save(p)
    item = read_item(_entry(p), ReadOptions(decode_timeout_s=0.005))
    assert not item["ok"] and item["error"]["kind"] == "timeout" and "longer than" in item["error"]["error"]
    assert read_item(_entry(p), ReadOptions(decode_timeout_s=30))["ok"]


def test_odd_length_element_does_not_crash(tmp_path):
    p = write_dicom(tmp_path / "le.dcm", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096, bits_stored=12)
    raw = p.read_bytes()
    # odd-length value: rewrite PatientID ("PID-0001", 8 bytes) as 7 bytes without padding
    idx = raw.find(b"\x10\x00\x20\x00LO")
    assert idx > 0
    length = struct.unpack("<H", raw[idx + 6 : idx + 8])[0]
    odd = raw[:idx] + b"\x10\x00\x20\x00LO" + struct.pack("<H", length - 1) + raw[idx + 8 : idx + 8 + length - 1] + raw[idx + 8 + length :]
    q = tmp_path / "odd.dcm"
    q.write_bytes(odd)
    item = read_item(_entry(q), ReadOptions())
    assert item["ok"] or item["error"]["kind"]
    if item["ok"]:
        assert item["row"]["patient_id"].startswith("PID-000")


def test_big_endian_explicit_vr_reads_like_little_endian(tmp_path):
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRBigEndian

    from curator.readers import read_image
    from tests.dicom_factory import make_dataset

    px = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7) % 4096
    le = write_dicom(tmp_path / "le.dcm", px, bits_stored=12)
    ds = make_dataset(px, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = px.astype(">u2").tobytes()
    ds.preamble = b"\0" * 128
    dcmwrite(tmp_path / "be.dcm", ds, enforce_file_format=True)
    a, b = read_image(le), read_image(tmp_path / "be.dcm")
    assert b.meta["transfer_syntax_uid"] == str(ExplicitVRBigEndian)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))


def _films(folder, names, size=(96, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for name in names:
        Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(folder / name)
    return [str(folder / n) for n in names]


def test_a_file_that_kills_its_reader_process_is_an_error_and_the_run_goes_on(tmp_path, tiny_checkpoints, monkeypatch):
    # Reading poison*.png aborts the reader process (SIGABRT, as a C decoder's failed assertion
    # does): each gets an errors row, every other file is embedded once, and a rerun skips them all.
    # poison files sort among the others, so files after them must be read too
    names = [f"a{i}.png" for i in range(4)] + ["b-poison1.png", "b-poison2-é.png"] + [f"c{i}.png" for i in range(3)]
    paths = _films(tmp_path / "arc", names)
    monkeypatch.setenv("CURATOR_ABORT_READING", "poison")
    from torch.utils.data._utils import signal_handling

    torch_state = getattr(signal_handling, "_SIGCHLD_handler_set", False)
    cfg = dict(archives=[str(tmp_path / "arc")], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
               workers=2, batch_size=4, progress=False)
    s = run_embed(EmbedConfig(**cfg))
    assert s.processed == 7 and s.failed == {"decoder_crashed": 2}
    w = Workspace(tmp_path / "ws")
    cat = run_query(w, "SELECT path FROM catalog").path.tolist()
    assert sorted(cat) == sorted(p for p in paths if "poison" not in p) and len(set(cat)) == len(cat)
    errors = run_query(w, "SELECT path, stage, kind, error FROM errors")
    assert sorted(errors.path) == sorted(p for p in paths if "poison" in p)
    assert set(errors.stage) == {"read"} and set(errors.kind) == {"decoder_crashed"}
    assert all(e.startswith("reading this file crashed the reader process (killed by SIGABRT)") for e in errors.error), errors.error.tolist()
    again = run_embed(EmbedConfig(**cfg))
    assert again.processed == 0 and again.known_errors == 2 and again.unchanged == 7
    assert getattr(signal_handling, "_SIGCHLD_handler_set", False) == torch_state  # torch's arrangement put back


def test_gdcm_aborting_on_a_malformed_jpeg_dicom_does_not_stop_the_run(tmp_path, tiny_checkpoints):
    # A real case: GDCM throws an uncaught C++ exception (std::terminate -> SIGABRT) on a CMYK
    # JPEG frame in a DICOM that says one sample per pixel, taking its process down.
    import io

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    arc = tmp_path / "arc"
    good = _films(arc, [f"g{i}.png" for i in range(5)])
    cmyk = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 4)) * 255).astype(np.uint8), mode="CMYK").save(cmyk, format="JPEG")
    path = write_dicom(arc / "cmyk.dcm", np.zeros((64, 64), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([cmyk.getvalue() + b"\0" * (len(cmyk.getvalue()) % 2)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    s = run_embed(EmbedConfig(archives=[str(arc)], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                              workers=2, batch_size=4, progress=False))
    w = Workspace(tmp_path / "ws")
    assert sorted(run_query(w, "SELECT path FROM catalog").path) == sorted(good) and s.processed == 5
    errors = run_query(w, "SELECT path, kind FROM errors")
    assert errors.path.tolist() == [str(path)]  # decoder_crashed today; any recorded reason is right
