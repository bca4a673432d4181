"""The synthetic archive generator: determinism, ground truth that matches the pixels, valid DICOM.

The image checks measure the rendered pixels with code written here (lung masks from intensity
thresholds, cardiothoracic ratio from lung edges, lung bases, local texture), independent of the
generator's own geometry; the generator's numbers are only used as the labels to compare with.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID

from curator.synth import (
    FINDINGS,
    GROUND_TRUTH_COLUMNS,
    complete_findings,
    generate_archive,
    impression,
    labels_from_findings,
    plan_archive,
    render_study_image,
)

CONTRACT = [
    "path", "cardiomegaly", "pleural_effusion", "edema", "pneumothorax", "consolidation",
    "atelectasis", "lung_lesion", "support_devices", "no_finding",
]
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


# --------------------------------------------------------------------------------------------
# helpers: reading the archive


def read_gt(root: Path) -> list[dict]:
    with open(root / "ground_truth.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_reports(root: Path) -> dict[str, str]:
    with open(root / "reports.csv", newline="", encoding="utf-8") as fh:
        return {r["study_key"]: r["report"] for r in csv.DictReader(fh)}


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def display(ds) -> np.ndarray:
    """A DICOM radiograph as float in [0, 1], dense = bright."""
    a = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = -a
    lo, hi = np.percentile(a, [1, 99.5])
    return np.clip((a - lo) / (hi - lo), 0, 1)


# --------------------------------------------------------------------------------------------
# helpers: measuring images


def box_blur(img: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return img
    p = np.pad(img, k // 2, mode="edge")
    c = np.pad(np.cumsum(np.cumsum(p, 0), 1), ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def lung_runs(img: np.ndarray, blur: int = 1) -> dict:
    """For each row and side (image left, image right), the lung found walking outward from the
    midline: skip a dark trachea, then the bright mediastinum / heart, then take the dark lung
    (ribs and vessels may interrupt it) up to the bright chest wall. ``(medial, lateral)`` columns
    or None."""
    H, W = img.shape
    sm = box_blur(img.astype(float), blur)
    lung_level = np.percentile(sm[int(H * .15):int(H * .7), int(W * .25):int(W * .75)], 5)
    med_level = np.median(sm[int(H * .4):int(H * .65), int(W * .45):int(W * .55)])
    thr = lung_level + 0.5 * (med_level - lung_level)
    wall = lung_level + 0.6 * (med_level - lung_level)
    mid = W // 2
    runs = {}
    for r in range(H):
        row = sm[r]
        sides = []
        for step in (-1, 1):
            c = mid
            while 0 <= c < W and row[c] < thr:
                c += step
            while 0 <= c < W and row[c] >= thr:
                c += step
            start, last = c, None
            while 0 <= c < W and row[c] < wall:
                if row[c] < thr:
                    last = c
                c += step
            ok = last is not None and 0 <= c < W and abs(last - start) >= 2
            sides.append((start, last) if ok else None)
        runs[r] = sides
    return runs


def measure_ctr(img: np.ndarray, blur: int = 1) -> float:
    """Cardiothoracic ratio: widest inner thorax (lateral lung edges) and the heart's extent
    (medial lung edges) measured in the band 45-78 % of the way down the lungs, above the
    diaphragm domes."""
    H, W = img.shape
    mid = W // 2
    runs = lung_runs(img, blur)
    both = [r for r in range(H) if runs[r][0] and runs[r][1]]
    groups, start = [], both[0]
    for a, b in zip(both, both[1:] + [None]):
        if b != a + 1:
            groups.append((start, a))
            start = b
    top, bottom = max(groups, key=lambda g: g[1] - g[0])
    outer = [runs[r][1][1] - runs[r][0][1] for r in range(top, bottom + 1)]
    thoracic = float(np.percentile(outer, 98))
    r0, r1 = top + int(0.45 * (bottom - top)), top + int(0.78 * (bottom - top))
    right_half = max(mid - runs[r][0][0] for r in range(r0, r1 + 1))
    left_half = max(runs[r][1][0] - mid for r in range(r0, r1 + 1))
    return (right_half + left_half) / thoracic


def lung_bases(img: np.ndarray) -> dict:
    """Lowest row of each lung (patient side), following it down from the middle of the lungs."""
    H, _ = img.shape
    runs = lung_runs(img)
    both = [r for r in range(H) if runs[r][0] and runs[r][1]]
    start = both[len(both) // 2]
    out = {}
    for j, name in ((0, "right"), (1, "left")):
        r = start
        while r + 1 < H and runs[r + 1][j]:
            r += 1
        out[name] = r
    return out


def periphery(img: np.ndarray, rows=(0.1, 0.45), outer=0.25, k=4) -> dict:
    """Per patient side: mean brightness and flatness (20th percentile of the std in k x k
    windows) of the outer quarter of the upper lungs."""
    H, _ = img.shape
    runs = lung_runs(img)
    both = [r for r in range(H) if runs[r][0] and runs[r][1]]
    top, bottom = min(both), max(both)
    r0, r1 = top + int(rows[0] * (bottom - top)), top + int(rows[1] * (bottom - top))
    m1 = box_blur(img.astype(float), k)
    sd = np.sqrt(np.clip(box_blur(img.astype(float) ** 2, k) - m1 * m1, 0, None))
    out = {}
    for j, name in ((0, "right"), (1, "left")):
        vals, sds = [], []
        for r in range(r0, r1 + 1):
            if not runs[r][j]:
                continue
            a, b = sorted(runs[r][j])
            m = max(1, int(outer * (b - a + 1)))
            seg = slice(a + 2, a + m) if j == 0 else slice(b + 1 - m, b - 1)
            vals.extend(img[r, seg])
            sds.extend(sd[r, seg])
        out[name] = (float(np.mean(vals)), float(np.percentile(sds, 20)))
    return out


def other(side: str) -> str:
    return "left" if side == "right" else "right"


# --------------------------------------------------------------------------------------------
# archives shared by several tests


@pytest.fixture(scope="module")
def dicom_archive(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "dicom"
    summary = generate_archive(root, studies=60, seed=7, image_size=128, progress=False)
    return root, summary


@pytest.fixture(scope="module")
def ctr_archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "ctr"
    generate_archive(root, studies=150, seed=23, image_size=256, broken=False, progress=False, workers=2)
    return root


# --------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_archive(a, studies=10, seed=3, image_size=96, progress=False)
    generate_archive(b, studies=10, seed=3, image_size=96, progress=False, workers=2)
    generate_archive(c, studies=10, seed=4, image_size=96, progress=False)
    da, db, dc = tree_digest(a), tree_digest(b), tree_digest(c)
    assert da == db  # byte-identical, whatever the number of workers
    assert "ground_truth.csv" in da and "reports.csv" in da and "DICOMDIR" in da
    assert da["ground_truth.csv"] != dc["ground_truth.csv"]
    assert da["reports.csv"] != dc["reports.csv"]
    images_a = {da[r["path"]] for r in read_gt(a)}
    images_c = {dc[r["path"]] for r in read_gt(c)}
    assert images_a.isdisjoint(images_c)


def test_render_is_deterministic_and_in_range():
    f = {"pleural_effusion": True, "support_devices": True}
    img1, info1 = render_study_image(np.random.default_rng(5), f, size=160, view="AP")
    img2, info2 = render_study_image(np.random.default_rng(5), f, size=160, view="AP")
    img3, _ = render_study_image(np.random.default_rng(6), f, size=160, view="AP")
    assert img1.dtype == np.float32 and img1.shape[0] == 160
    assert 0.0 <= img1.min() and img1.max() <= 1.0
    assert np.array_equal(img1, img2) and info1 == info2
    assert not np.array_equal(img1, img3)
    lat, info = render_study_image(np.random.default_rng(1), {}, size=128, view="LL", aspect=1.0)
    assert lat.shape == (128, 128) and info["view"] == "LL"


def test_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_archive(tmp_path, studies=1, seed=0, image_size=64, progress=False)


# --------------------------------------------------------------------------------------------
# ground truth and reports


def test_ground_truth_columns_and_rows(dicom_archive):
    root, summary = dicom_archive
    with open(root / "ground_truth.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[: len(CONTRACT)] == CONTRACT
    assert tuple(header) == GROUND_TRUTH_COLUMNS
    rows = read_gt(root)
    assert len(rows) == summary["images"]
    paths = [r["path"] for r in rows]
    assert len(set(paths)) == len(paths)
    reports = read_reports(root)
    for r in rows:
        assert "\\" not in r["path"] and not r["path"].startswith("/")
        assert (root / r["path"]).is_file()
        assert r["study_key"] in reports
        labels = {k: int(r[k]) for k in CONTRACT[1:]}
        assert set(labels.values()) <= {0, 1}
        pathology = any(labels[k] for k in CONTRACT[1:8])
        assert labels["no_finding"] == int(not pathology)  # devices alone keep no_finding = 1
    assert summary["positives"] == {k: sum(int(r[k]) for r in rows) for k in FINDINGS}
    assert summary["studies"] == 60 and summary["studies"] == len(reports)


def test_prevalence_and_co_occurrence():
    plan = plan_archive(3000, seed=11)
    studies = [s for p in plan["patients"] for s in p["studies"]]
    rows = [labels_from_findings(s["findings"]) for s in studies]
    prev = {k: np.mean([r[k] for r in rows]) for k in FINDINGS}
    for k in FINDINGS[:8]:
        assert 0.06 <= prev[k] <= 0.3, (k, prev[k])
    assert 0.25 <= prev["no_finding"] <= 0.5
    edema = [r for r in rows if r["edema"]]
    no_edema = [r for r in rows if not r["edema"]]
    # heart failure: edema travels with cardiomegaly and effusions
    for k in ("cardiomegaly", "pleural_effusion"):
        assert np.mean([r[k] for r in edema]) > 2 * np.mean([r[k] for r in no_edema])
    # severities are all represented
    sev = {s["findings"]["edema"]["severity"] for s in studies if "edema" in s["findings"]}
    assert sev == {"mild", "moderate", "severe"}


KEYWORDS = {
    "cardiomegaly": r"cardiomegaly|heart is \w+ly enlarged|enlarged cardiac silhouette|enlargement of the cardiac",
    "pleural_effusion": r"effusion",
    "edema": r"edema",
    "pneumothorax": r"pneumothorax",
    "consolidation": r"consolidation",
    "atelectasis": r"atelectasis",
    "lung_lesion": r"nodule|mass",
    "support_devices": r"tube|catheter|line|pacemaker|picc",
}


def _impression(report: str) -> str:
    assert "FINDINGS:" in report and "IMPRESSION:" in report
    return report.split("IMPRESSION:", 1)[1].strip()


def _sentences(text: str) -> list[str]:
    text = re.sub(r"^\d+\.\s*", "", text, flags=re.MULTILINE)
    return [s.strip().lower() for s in re.split(r"(?<=\.)\s+|\n", text) if s.strip()]


def test_reports_state_positives_and_negate_absent_findings():
    plan = plan_archive(400, seed=5)
    negated_some = 0
    severity_ok = 0
    for p in plan["patients"]:
        for s in p["studies"]:
            labels = labels_from_findings(s["findings"])
            sentences = _sentences(_impression(s["report"]))
            text = " ".join(sentences)
            for k, pattern in KEYWORDS.items():
                hits = [x for x in sentences if re.search(pattern, x)]
                if labels[k]:
                    assert hits, (k, s["report"])
                    # a present finding is never denied
                    assert not any(re.match(r"(no|there is no)\b", x) and re.search(pattern, x) for x in hits
                                   if k != "support_devices"), (k, s["report"])
                elif k != "support_devices":
                    # an absent finding is only mentioned to negate it
                    for x in hits:
                        assert re.search(r"\bno\b|without|normal", x), (k, x, s["report"])
            if any(re.match(r"(no|there is no)\b", x) for x in sentences):
                negated_some += 1
            ed = s["findings"].get("edema")
            if ed and ed["severity"] in text:
                severity_ok += 1
            if not any(labels[k] for k in FINDINGS[:7]) and not labels["support_devices"]:
                assert re.search(r"no acute|normal|clear|no radiographic evidence", text), s["report"]
    assert negated_some > 200
    assert severity_ok > 0


def test_impression_examples():
    rng = np.random.default_rng(0)
    f = complete_findings(rng, {"pleural_effusion": {"side": "left", "severity": "small"},
                                "support_devices": {"devices": ["ett"], "ett_cm": 4.0}})
    texts = [impression(np.random.default_rng(i), f) for i in range(30)]
    assert any("left" in t and "effusion" in t.lower() for t in texts)
    assert all("4 cm above the carina" in t for t in texts)
    assert not any(re.search(r"\bno pleural effusion", t.lower()) for t in texts)


# --------------------------------------------------------------------------------------------
# the pixels match the labels


def test_cardiothoracic_ratio_measured_on_clean_renders():
    drawn, measured, labels = [], [], []
    for i in range(40):
        rng = np.random.default_rng(100 + i)
        f = {"cardiomegaly": True} if i % 2 else {}
        img, info = render_study_image(rng, f, size=256, view="PA" if i % 3 else "AP", clean=True)
        drawn.append(info["ctr"])
        measured.append(measure_ctr(img))
        labels.append(labels_from_findings(info["findings"])["cardiomegaly"])
    drawn, measured, labels = map(np.asarray, (drawn, measured, labels))
    assert np.corrcoef(drawn, measured)[0, 1] > 0.9
    assert np.mean((measured > 0.5) == (labels == 1)) >= 0.95
    assert np.median(np.abs(drawn - measured)) < 0.03


def test_cardiothoracic_ratio_measured_on_archive_dicoms(ctr_archive):
    """Noisy archive images read back through pydicom; cardiomegaly label vs measured CTR."""
    others = ["pleural_effusion", "edema", "pneumothorax", "consolidation", "atelectasis", "lung_lesion"]
    labels, measured = [], []
    for r in read_gt(ctr_archive):
        if r["view_position"] == "LL" or any(r[k] == "1" for k in others):
            continue
        img = display(pydicom.dcmread(ctr_archive / r["path"]))
        measured.append(measure_ctr(img, blur=5))
        labels.append(int(r["cardiomegaly"]))
    labels, measured = np.asarray(labels), np.asarray(measured)
    assert len(labels) >= 30 and 5 <= labels.sum() <= len(labels) - 5
    assert np.mean((measured > 0.5) == (labels == 1)) >= 0.85
    assert measured[labels == 1].mean() > measured[labels == 0].mean() + 0.1


def test_effusion_raises_the_lung_base_on_its_side():
    hits, n = 0, 0
    for i in range(30):
        side = "left" if i % 2 else "right"
        spec = {"pleural_effusion": {"side": side, "severity": "large" if i % 4 == 0 else "moderate"}}
        img, _ = render_study_image(np.random.default_rng(300 + i), spec, size=256,
                                    view="PA" if i % 4 else "AP", clean=True)
        bases = lung_bases(img)
        hits += bases[side] < bases[other(side)] - 5
        n += 1
    assert hits / n >= 0.85


def test_effusion_whitens_the_base_of_its_side_same_anatomy():
    for i in range(12):
        side = "left" if i % 2 else "right"
        spec = complete_findings(np.random.default_rng(i), {"pleural_effusion": {"side": side, "severity": "moderate"}})
        base, _ = render_study_image(np.random.default_rng(900 + i), {}, size=192, view="PA", clean=True)
        eff, _ = render_study_image(np.random.default_rng(900 + i), spec, size=192, view="PA", clean=True)
        H, W = base.shape
        diff = np.clip(eff - base, 0, None)
        assert diff.max() > 0.2
        cx = (diff.sum(0) * np.arange(W)).sum() / diff.sum()
        cy = (diff.sum(1) * np.arange(H)).sum() / diff.sum()
        # patient's left is the image's right on a frontal film
        assert (cx > W / 2) == (side == "left")
        assert cy > 0.45 * H


def test_pneumothorax_periphery_is_darker_and_without_markings():
    darker = flatter = flatter_same = 0
    n = 30
    for i in range(n):
        side = "left" if i % 2 else "right"
        spec = complete_findings(np.random.default_rng(i), {"pneumothorax": {"side": side,
                                                                             "severity": ["moderate", "large", "small"][i % 3]}})
        view = "PA" if i % 4 else "AP"
        base, _ = render_study_image(np.random.default_rng(900 + i), {}, size=256, view=view, clean=True)
        img, _ = render_study_image(np.random.default_rng(900 + i), spec, size=256, view=view, clean=True)
        m, m0 = periphery(img), periphery(base)
        darker += m[side][0] < m[other(side)][0]
        flatter += m[side][1] < m[other(side)][1]
        flatter_same += m[side][1] < m0[side][1]
    assert darker / n >= 0.9
    assert flatter / n >= 0.8
    assert flatter_same / n >= 0.85


def test_visible_signatures_of_other_findings():
    """Consolidation, lesions, edema, atelectasis and devices each change the lungs / image."""
    cases = {
        "consolidation": {"consolidation": {"lobe": "RLL"}},
        "lung_lesion": {"lung_lesion": {"lesions": [{"side": "left", "lobe": "LUL", "size_cm": 3.0, "u": 0.5, "t": 0.3}]}},
        "edema": {"edema": {"severity": "moderate"}},
        "atelectasis": {"atelectasis": {"side": "bilateral", "kind": "plate"}},
        "support_devices": {"support_devices": {"devices": ["ett", "ngt", "pacemaker"], "ett_cm": 4.0}},
    }
    for name, f in cases.items():
        spec = complete_findings(np.random.default_rng(0), f)
        base, _ = render_study_image(np.random.default_rng(42), {}, size=192, view="PA", clean=True)
        img, _ = render_study_image(np.random.default_rng(42), spec, size=192, view="PA", clean=True)
        diff = img - base
        assert diff.max() > 0.15, name  # something denser appeared
        assert (diff > 0.05).mean() > 0.002, name
    # edema is bilateral: both halves brighten
    spec = complete_findings(np.random.default_rng(0), {"edema": {"severity": "severe"}})
    base, _ = render_study_image(np.random.default_rng(43), {}, size=192, view="PA", clean=True)
    img, _ = render_study_image(np.random.default_rng(43), spec, size=192, view="PA", clean=True)
    d = img - base
    W = d.shape[1]
    assert d[:, : W // 2].mean() > 0.01 and d[:, W // 2:].mean() > 0.01


# --------------------------------------------------------------------------------------------
# DICOM validity


def test_every_radiograph_is_valid_dicom(dicom_archive):
    root, summary = dicom_archive
    rows = read_gt(root)
    syntaxes, photometrics, bits = set(), set(), set()
    rescaled = 0
    for r in rows:
        path = root / r["path"]
        with open(path, "rb") as fh:
            assert fh.read(132)[128:] == b"DICM"
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
        assert px.shape == (ds.Rows, ds.Columns) and ds.Rows == 128
        assert ds.Modality in ("CR", "DX")
        assert ds.SOPClassUID == (CR if ds.Modality == "CR" else DX)
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == r["sop_uid"]
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert UID(ds[key].value).is_valid
        assert ds.StudyInstanceUID == r["study_uid"]
        assert ds.PatientID == r["patient_id"] and ds.PatientName and ds.PatientSex in ("M", "F")
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate)
        assert re.fullmatch(r"\d{3}Y", ds.PatientAge) and int(ds.PatientAge[:3]) == int(r["age"])
        assert "20120101" <= ds.StudyDate <= "20251231"
        assert ds.ViewPosition == r["view_position"] in ("PA", "AP", "LL")
        assert ds.BodyPartExamined == "CHEST" and ds.Manufacturer
        assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
        assert ds.BitsAllocated in (8, 16) and ds.BitsStored in (8, 12, 14, 16)
        assert int(px.max()) < (1 << ds.BitsStored)
        assert "WindowCenter" in ds and "WindowWidth" in ds
        assert str(ds.file_meta.TransferSyntaxUID) == r["transfer_syntax"]
        syntaxes.add(r["transfer_syntax"])
        photometrics.add(ds.PhotometricInterpretation)
        bits.add(int(ds.BitsStored))
        rescaled += "RescaleSlope" in ds
        if ds.ViewPosition != "LL":
            # orientation survives MONOCHROME1 / rescale: mediastinum brighter than the lungs
            img = display(ds)
            H, W = img.shape
            centre = img[int(H * .35):int(H * .6), int(W * .46):int(W * .54)].mean()
            lungs = np.concatenate([img[int(H * .25):int(H * .5), int(W * .2):int(W * .33)].ravel(),
                                    img[int(H * .25):int(H * .5), int(W * .67):int(W * .8)].ravel()]).mean()
            assert centre > lungs + 0.1, r["path"]
    assert syntaxes == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5",
                        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80"}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert {12, 16, 8} <= bits
    assert rescaled > 0
    assert summary["transfer_syntaxes"] and sum(summary["transfer_syntaxes"].values()) == len(rows)


def test_non_radiographs_and_broken_files(dicom_archive):
    root, summary = dicom_archive
    in_gt = {r["path"] for r in read_gt(root)}
    assert (root / "DICOMDIR").is_file()
    from pydicom.fileset import FileSet

    fs = FileSet(root / "DICOMDIR")
    listed = list(fs)
    assert listed
    for inst in listed:
        ds = inst.load()
        assert ds.SOPInstanceUID == inst.SOPInstanceUID
    modalities = {"CT": 0, "SR": 0}
    zero = truncated = text = 0
    for p in root.rglob("*"):
        if not p.is_file() or p.name in ("ground_truth.csv", "reports.csv", "DICOMDIR"):
            continue
        rel = p.relative_to(root).as_posix()
        data = p.read_bytes()
        if len(data) == 0:
            zero += 1
            assert rel not in in_gt
            continue
        if data[128:132] != b"DICM":
            text += 1
            assert rel not in in_gt and p.suffix == ".dcm"
            continue
        try:
            ds = pydicom.dcmread(p)
            ok = ds.pixel_array is not None if "PixelData" in ds else ds.Modality == "SR"
        except (ValueError, EOFError, OSError, AttributeError, KeyError, RuntimeError):
            ok = False
        if not ok:
            truncated += 1
            assert rel not in in_gt
            continue
        if ds.Modality in modalities:
            modalities[ds.Modality] += 1
            assert rel not in in_gt
            if ds.Modality == "SR":
                assert "PixelData" not in ds and ds.ContentSequence
        else:
            assert rel in in_gt, rel
    assert modalities["CT"] >= 3 and modalities["SR"] == 1
    assert zero >= 1 and truncated >= 1 and text >= 1
    assert summary["broken"] == zero + truncated + text
    assert summary["non_cxr"] == modalities["CT"] + modalities["SR"] + 1
    # PACS-like layout: patient / study / series / instance, some files without extension
    depths = {len(Path(r).parts) for r in in_gt}
    assert depths == {4}
    assert any(Path(r).suffix == "" for r in in_gt) and any(r.endswith(".dcm") for r in in_gt)


def test_png_mode(tmp_path):
    root = tmp_path / "png"
    summary = generate_archive(root, studies=12, seed=2, fmt="png", image_size=128, progress=False)
    rows = read_gt(root)
    assert len(rows) == summary["images"] > 12
    kinds = set()
    for r in rows:
        with Image.open(root / r["path"]) as im:
            assert im.mode == "L" and im.size[1] == 128
            kinds.add(im.format)
    assert kinds <= {"PNG", "JPEG"} and "PNG" in kinds
    assert not list(root.rglob("*.dcm")) and not (root / "DICOMDIR").exists()
    in_gt = {r["path"] for r in rows}
    empties = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size == 0]
    assert empties and all(p.relative_to(root).as_posix() not in in_gt for p in empties)
    assert set(read_reports(root)) == {r["study_key"] for r in rows}
