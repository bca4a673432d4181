"""A realistic messy archive: the run completes, good images are catalogued, every bad file has a reason."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pydicom.uid import RLELossless

from curator.pipelines.embed import EmbedConfig, run_embed
from curator.query import run_query
from curator.workspace import Workspace
from tests.conftest import write_raster_archive
from tests.dicom_factory import write_dicom, write_dicomdir, write_sr


def _pixels(seed, h=96, w=80):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4096, (h, w)).astype(np.uint16)


@pytest.fixture()
def messy(tmp_path):
    arc = tmp_path / "archive"
    good = write_raster_archive(arc / "png", 4)
    d = arc / "PAT1" / "STUDY1"
    d.mkdir(parents=True)
    good.append(write_dicom(d / "IM0001", _pixels(1), bits_stored=12, patient_id="PAT1", view_position="PA", study_date="20200102", patient_age="061Y"))
    good.append(write_dicom(d / "IM0002.dcm", _pixels(2), bits_stored=12, photometric="MONOCHROME1", transfer_syntax=RLELossless, view_position="AP"))
    bad = {}
    src = write_dicom(tmp_path / "whole.dcm", _pixels(3, 300, 260), bits_stored=16)
    data = src.read_bytes()
    (d / "truncated.dcm").write_bytes(data[: len(data) // 2])
    bad["truncated.dcm"] = "read"
    (d / "empty.dcm").write_bytes(b"")
    bad["empty.dcm"] = "read"
    (d / "notes.dcm").write_text("this is a text file with a .dcm name\n")
    bad["notes.dcm"] = "read"
    write_sr(d / "report.dcm")
    bad["report.dcm"] = "filter"
    write_dicom(d / "ct.dcm", _pixels(4), bits_stored=12, modality="CT")
    bad["ct.dcm"] = "filter"
    write_dicomdir(arc / "media")  # the DICOMDIR itself is an error; the image it lists is good
    good += [f for f in (arc / "media").rglob("*") if f.is_file() and f.name != "DICOMDIR"]
    bad["DICOMDIR"] = "read"
    os.symlink(tmp_path / "does-not-exist.dcm", d / "broken_link.dcm")
    bad["broken_link.dcm"] = "discover"
    os.mkfifo(d / "pipe.dcm")
    bad["pipe.dcm"] = "discover"
    os.symlink(arc, arc / "PAT1" / "loop")  # a symlinked folder pointing up: must not loop
    (arc / "README.txt").write_text("export notes")
    return arc, good, bad


def test_messy_archive_completes_with_every_bad_file_explained(tmp_path, messy, tiny_checkpoints):
    arc, good, bad = messy
    ws = tmp_path / "ws"
    s = run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=2, batch_size=4, progress=False))
    w = Workspace(ws)
    cat = run_query(w, "SELECT path FROM catalog")
    assert sorted(cat.path) == sorted(str(p.resolve()) for p in good)
    errors = run_query(w, "SELECT path, stage, kind, error FROM errors")
    by_name = {os.path.basename(p): (st, k, e) for p, st, k, e in errors.itertuples(index=False)}
    for name, stage in bad.items():
        assert name in by_name, f"{name} has no errors row: {sorted(by_name)}"
        st, kind, msg = by_name[name]
        assert st == stage, (name, st, kind, msg)
        assert kind and msg and len(msg) > 5
    assert by_name["empty.dcm"][1] == "empty_file"
    assert by_name["ct.dcm"][1] == "modality_filtered" and "CT" in by_name["ct.dcm"][2]
    assert by_name["truncated.dcm"][1] in ("truncated", "decode_failed")
    # nothing broken was scored: predictions only for catalogued images
    n_pred = run_query(w, "SELECT count(*) n FROM predictions p SEMI JOIN catalog c USING (image_id) WHERE member='ensemble'").n[0]
    assert n_pred == len(cat)
    assert sum(s.failed.values()) + sum(s.filtered.values()) == len(bad)
    assert s.ignored.get(".txt file") == 1


def test_rerun_skips_known_bad_files_and_filter_change_retries(tmp_path, messy, tiny_checkpoints):
    arc, good, bad = messy
    ws = tmp_path / "ws"
    cfg = dict(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0, batch_size=4, progress=False)
    run_embed(EmbedConfig(**cfg))
    s2 = run_embed(EmbedConfig(**cfg))
    assert s2.processed == 0 and not s2.failed
    from curator.readers import ReadOptions

    s3 = run_embed(EmbedConfig(**cfg, read_options=ReadOptions(modalities=None)))
    assert s3.processed == 1  # the CT slice, now accepted
    w = Workspace(ws)
    assert "ct.dcm" in " ".join(run_query(w, "SELECT path FROM catalog").path)
    assert "ct.dcm" not in " ".join(run_query(w, "SELECT path FROM errors").path)


def test_narrowing_the_modalities_warns_of_the_catalogued_images_left_outside(tmp_path, messy, tiny_checkpoints, caplog):
    from curator.readers import ReadOptions

    arc, _, _ = messy
    cfg = dict(archives=[str(arc)], workspace=str(tmp_path / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
               batch_size=4, progress=False)
    run_embed(EmbedConfig(**cfg, read_options=ReadOptions(modalities=None)))
    with caplog.at_level("WARNING"):
        run_embed(EmbedConfig(**cfg))  # back to CR, DX: the CT slice stays, and the run says so
    said = [r.getMessage() for r in caplog.records if "modalities this run leaves out" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 image(s)") and "(CT 1)" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_embed(EmbedConfig(**cfg))  # the same filter as the last run: quiet
    assert not any("leaves out" in r.getMessage() for r in caplog.records)


def test_dicom_metadata_fills_the_catalog(tmp_path, messy, tiny_checkpoints):
    arc, good, _ = messy
    ws = tmp_path / "ws"
    run_embed(EmbedConfig(archives=[str(arc / "PAT1")], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0, progress=False))
    df = run_query(Workspace(ws), "SELECT * FROM catalog ORDER BY path").set_index(run_query(Workspace(ws), "SELECT path FROM catalog ORDER BY path").path.map(os.path.basename))
    row = df.loc["IM0001"]
    assert row.patient_id == "PAT1" and row.view_position == "PA" and row.modality == "DX"
    assert str(row.study_date)[:10] == "2020-01-02" and row.patient_age == 61
    assert row.rows == 96 and row.columns == 80 and row.bits_stored == 12 and row.conversion == "mimic"
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1" and row.sop_instance_uid
    row2 = df.loc["IM0002.dcm"]
    assert row2.photometric_interpretation == "MONOCHROME1" and row2.transfer_syntax_uid == str(RLELossless)
    cols = set(df.columns)
    assert not any("name" in c and "patient" in c for c in cols) and "patient_birth_date" not in cols
