"""The synthetic archive: patients, studies, images, files and the two CSVs.

:func:`generate_archive` plans every patient / study / image from the seed in the main process
(identifiers, dates, equipment, findings, reports, pixel formats), then renders and writes the
studies, optionally in worker processes. Each study's and image's random draws come from their
own generator seeded by ``(seed, kind, index)``, so the bytes written do not depend on the number
of workers or on the order in which workers finish.

DICOM layout (``fmt="dicom"``), like a PACS export, with one of three naming styles per patient::

    OUT/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm      ("uid")
    OUT/<PatientID>/ST000012/SE000001/IM000001                                       ("im", no extension)
    OUT/<PatientID>/<StudyDate>_<Accession>/<SeriesNumber>_<DESC>/IM-0001-0001.dcm   ("dated")
    OUT/DICOMDIR                      (lists the "im"-style instances, whose paths are valid File IDs)

plus, outside the ground truth: a few axial CT slices (a CT study of one patient), one Basic Text
SR document (a report, no pixels) and, with ``broken=True``, broken files (zero-byte, truncated
DICOM, a text file named ``.dcm``).

PNG layout (``fmt="png"``): ``OUT/p<PatientID>/<study_key>/<dicom_id>.png`` (8-bit; about one image
in five is a JPEG instead), with a zero-byte and a truncated PNG when ``broken=True``.

``OUT/ground_truth.csv``: ``path`` (relative to OUT, POSIX), the nine 0/1 columns of
:data:`curator.synth.findings.FINDINGS`, then descriptive columns (patient, study_key, view,
demographics, equipment, pixel format, severities, sides, devices, drawn CTR).
``OUT/reports.csv``: ``study_key, report``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from curator.forking import parent_objects_frozen
from curator.synth import dicomio
from curator.synth.findings import (
    FINDINGS,
    draw_ctr,
    labels_from_findings,
    sample_findings,
)
from curator.synth.phantom import render_study_image, sample_anatomy
from curator.synth.reports import make_report

EXTRA_COLUMNS = (
    "patient_id", "study_key", "study_uid", "sop_uid", "view_position", "sex", "age", "study_date",
    "setting", "modality", "manufacturer", "photometric", "bits_stored", "transfer_syntax",
    "ctr", "cardiomegaly_severity", "effusion_side", "effusion_severity", "edema_severity",
    "pneumothorax_side", "pneumothorax_severity", "consolidation_lobe", "atelectasis_side",
    "lesion_count", "lesion_max_cm", "devices", "ett_cm",
)
GROUND_TRUTH_COLUMNS = ("path",) + FINDINGS + EXTRA_COLUMNS

_SURNAMES = ("SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ",
             "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE",
             "JACKSON", "MARTIN", "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ", "CLARK", "LEWIS",
             "ROBINSON", "WALKER", "YOUNG", "ALLEN", "KING", "WRIGHT", "SCOTT", "NGUYEN", "HILL", "GREEN",
             "ADAMS", "BAKER", "NELSON", "CARTER", "MITCHELL", "ROBERTS", "MUELLER", "SCHMIDT", "ROSSI", "KIM")
_GIVEN_F = ("MARY", "PATRICIA", "JENNIFER", "LINDA", "ELIZABETH", "BARBARA", "SUSAN", "JESSICA", "SARAH",
            "KAREN", "NANCY", "LISA", "MARIA", "ANNA", "SOFIA", "EMMA", "OLIVIA", "GRACE", "ROSA", "HELEN")
_GIVEN_M = ("JAMES", "ROBERT", "JOHN", "MICHAEL", "DAVID", "WILLIAM", "RICHARD", "JOSEPH", "THOMAS",
            "CHARLES", "DANIEL", "MATTHEW", "ANTHONY", "MARK", "JOSE", "LUIS", "PETER", "PAUL", "ERIC", "HENRY")
_INSTITUTIONS = ("GENERAL HOSPITAL", "ST. ELSEWHERE MEDICAL CENTER", "COUNTY UNIVERSITY HOSPITAL",
                 "RIVERSIDE CLINIC")
_PHYSICIANS = ("HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES", "QUINN^MICHAELA", "", "WELBY^MARCUS")

# (manufacturer, model, modality, MONOCHROME1 probability)
_FIXED_UNITS = (
    ("Agfa", "CR 85-X", "CR", 0.45),
    ("FUJIFILM Corporation", "FCR PROFECT CS", "CR", 0.35),
    ("KONICA MINOLTA", "REGIUS 190", "CR", 0.4),
    ("Carestream Health", "DRX-Evolution", "DX", 0.1),
    ("GE Healthcare", "Discovery XR656", "DX", 0.05),
    ("Philips Medical Systems", "DigitalDiagnost", "DX", 0.1),
    ("SIEMENS", "Ysio Max", "DX", 0.05),
    ("Canon Inc.", "CXDI-710C Wireless", "DX", 0.1),
)
_PORTABLE_UNITS = (
    ("GE Healthcare", "Optima XR220amx", "DX", 0.05),
    ("Carestream Health", "DRX-Revolution", "DX", 0.1),
    ("SIEMENS", "Mobilett Mira Max", "DX", 0.05),
    ("FUJIFILM Corporation", "FCR GO", "CR", 0.4),
    ("Agfa", "DX-D 100", "DX", 0.3),
)
_VIEW_DESC = {"PA": "CHEST PA", "AP": "CHEST AP PORTABLE", "LL": "CHEST LAT"}
_TS_CHOICES = (dicomio.EXPLICIT, dicomio.IMPLICIT, dicomio.RLE, dicomio.J2K_LOSSLESS,
               dicomio.JPEG_LOSSLESS_SV1, dicomio.JPEGLS_LOSSLESS)
_TS_P = (0.66, 0.08, 0.11, 0.03, 0.07, 0.05)

_DATE0 = _dt.date(2012, 1, 1)
_DATE1 = _dt.date(2025, 12, 31)


def _pick(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _age_str(birth: _dt.date, on: _dt.date) -> tuple[int, str]:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return years, f"{years:03d}Y"


# --------------------------------------------------------------------------------------------
# planning


def plan_archive(studies: int, seed: int, image_size: int = 1024, fmt: str = "dicom") -> dict:
    """Decide every patient, study and image (no pixels). Deterministic for the arguments."""
    rng = np.random.default_rng([seed, 0])
    patients = []
    used_ids: set[str] = set()
    used_keys: set[int] = set()
    n_left = studies
    study_index = 0
    while n_left > 0:
        n = min(n_left, int(_pick(rng, (1, 1, 1, 1, 2, 2, 3, 4, 6))))
        n_left -= n
        pi = len(patients)
        while True:
            pid = f"{int(rng.integers(10**7, 10**8)):08d}"
            if pid not in used_ids:
                used_ids.add(pid)
                break
        sex = "F" if rng.random() < 0.48 else "M"
        given = _pick(rng, _GIVEN_F if sex == "F" else _GIVEN_M)
        first_date = _DATE0 + _dt.timedelta(days=int(rng.integers(0, (_DATE1 - _DATE0).days - 200)))
        age0 = int(np.clip(rng.normal(62, 16), 18, 96))
        birth = first_date - _dt.timedelta(days=int(age0 * 365.25 + rng.integers(0, 365)))
        style = "im" if pi == 0 else _pick(rng, ("uid", "im", "dated"), [0.45, 0.3, 0.25])
        patient = {
            "index": pi,
            "PatientID": pid,
            "PatientName": f"{_pick(rng, _SURNAMES)}^{given}" + (f"^{chr(65 + int(rng.integers(26)))}" if rng.random() < 0.3 else ""),
            "PatientSex": sex,
            "birth": birth.strftime("%Y%m%d"),
            "style": style,
            "studies": [],
        }
        date = first_date
        setting = _pick(rng, ("outpatient", "inpatient", "icu"), [0.5, 0.3, 0.2])
        prior = None
        prior_date = None
        for j in range(n):
            if j > 0:
                if setting == "icu" and rng.random() < 0.6:
                    date = date + _dt.timedelta(days=int(rng.integers(1, 4)))
                else:
                    date = date + _dt.timedelta(days=int(rng.integers(20, 900)))
                    setting = _pick(rng, ("outpatient", "inpatient", "icu"), [0.5, 0.3, 0.2])
                date = min(date, _DATE1)
            while True:
                key = int(rng.integers(50_000_000, 60_000_000))
                if key not in used_keys:
                    used_keys.add(key)
                    break
            srng = np.random.default_rng([seed, 1, study_index])
            age, age_s = _age_str(birth, date)
            findings = sample_findings(srng, setting, age, prior)
            ctr = draw_ctr(srng, findings)
            if setting == "outpatient":
                views = ["PA", "LL"] if srng.random() < 0.75 else ["PA"]
            elif setting == "inpatient":
                views = ["AP"] if srng.random() < 0.7 else ["PA", "LL"]
            else:
                views = ["AP"] if srng.random() < 0.9 else ["AP", "AP"]
            units = _PORTABLE_UNITS if views[0] == "AP" else _FIXED_UNITS
            unit = units[int(srng.integers(len(units)))]
            report = make_report(srng, findings, views, setting, prior, prior_date)
            study_uid = dicomio.make_uid(seed, "study", study_index)
            time_s = f"{int(srng.integers(0, 24)):02d}{int(srng.integers(0, 60)):02d}{int(srng.integers(0, 60)):02d}"
            study = {
                "index": study_index,
                "study_key": f"s{key}",
                "AccessionNumber": str(key + 13_000_000),
                "StudyID": str(key % 100000),
                "StudyInstanceUID": study_uid,
                "StudyDate": date.strftime("%Y%m%d"),
                "StudyTime": time_s,
                "StudyDescription": {"PA": "XR CHEST 2 VIEWS" if len(views) > 1 else "XR CHEST 1 VIEW",
                                     "AP": "XR CHEST PORTABLE"}[views[0]],
                "age": age,
                "PatientAge": age_s,
                "setting": setting,
                "findings": findings,
                "ctr": ctr,
                "report": report,
                "Manufacturer": unit[0],
                "ManufacturerModelName": unit[1],
                "Modality": unit[2],
                "InstitutionName": _pick(srng, _INSTITUTIONS),
                "ReferringPhysicianName": _pick(srng, _PHYSICIANS),
                "StationName": f"XR{int(srng.integers(1, 20)):02d}",
                "study_dir_no": j + 1,
                "images": [],
            }
            for k, view in enumerate(views):
                series_no = k + 1 if unit[2] == "DX" or k == 0 else 1000 + k
                series_uid = dicomio.make_uid(seed, "series", study_index, k)
                sop_uid = dicomio.make_uid(seed, "sop", study_index, k)
                bits = int(_pick(srng, (12, 14, 16, 8), [0.45, 0.22, 0.25, 0.08]))
                photometric = "MONOCHROME1" if srng.random() < unit[3] else "MONOCHROME2"
                rescale = None
                if srng.random() < 0.15:
                    rescale = _pick(srng, ((1.0, -1024.0), (0.5, 0.0), (2.0, -100.0)))
                ts = _pick(srng, _TS_CHOICES, list(_TS_P))
                aspect = float(_pick(srng, (1.0, 0.82, 0.86, 0.8) if unit[2] == "DX" else (0.82, 0.8, 0.86)))
                img = {
                    "k": k,
                    "view": view,
                    "SeriesInstanceUID": series_uid,
                    "SOPInstanceUID": sop_uid,
                    "SeriesNumber": series_no,
                    "InstanceNumber": 1,
                    "SeriesTime": time_s,
                    "SeriesDescription": _VIEW_DESC[view],
                    "bits": bits,
                    "photometric": photometric,
                    "rescale": rescale,
                    "ts": ts,
                    "aspect": aspect,
                    "VOILUTFunction": "SIGMOID" if unit[0] == "GE Healthcare" and srng.random() < 0.5 else "",
                    "KVP": int(srng.integers(95, 126)) if view != "AP" else int(srng.integers(80, 100)),
                    "SID": 1800.0 if view != "AP" else 1000.0,
                    "ExposureTime": int(srng.integers(4, 30)),
                    "XRayTubeCurrent": int(srng.integers(100, 500)),
                    "Exposure": int(srng.integers(1, 8)),
                    "PixelSpacing": round(430.0 / image_size, 4),
                    "png_jpeg": srng.random() < 0.2,
                }
                study["images"].append(img)
            patient["studies"].append(study)
            prior, prior_date = findings, study["StudyDate"]
            study_index += 1
        patients.append(patient)
    return {"seed": seed, "image_size": image_size, "fmt": fmt, "patients": patients}


def _rel_path(patient: dict, study: dict, img: dict, fmt: str) -> str:
    pid = patient["PatientID"]
    if fmt == "png":
        h = hashlib.sha1(img["SOPInstanceUID"].encode()).hexdigest()
        dicom_id = "-".join(h[i:i + 8] for i in range(0, 40, 8))
        ext = ".jpg" if img["png_jpeg"] else ".png"
        return f"p{pid}/{study['study_key']}/{dicom_id}{ext}"
    style = patient["style"]
    if style == "uid":
        return f"{pid}/{study['StudyInstanceUID']}/{img['SeriesInstanceUID']}/{img['SOPInstanceUID']}.dcm"
    if style == "im":
        return f"{pid}/ST{study['study_dir_no']:06d}/SE{img['SeriesNumber'] % 1000000:06d}/IM{img['InstanceNumber']:06d}"
    desc = img["SeriesDescription"].replace(" ", "_")
    return (f"{pid}/{study['StudyDate']}_{study['AccessionNumber']}/{img['SeriesNumber']:03d}_{desc}/"
            f"IM-{img['SeriesNumber']:04d}-{img['InstanceNumber']:04d}.dcm")


def _header(patient: dict, study: dict, img: dict) -> dict:
    h = {k: study[k] for k in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                               "StudyDescription", "PatientAge", "Manufacturer", "ManufacturerModelName",
                               "Modality", "InstitutionName", "ReferringPhysicianName", "StationName")}
    h.update({k: patient[k] for k in ("PatientID", "PatientName", "PatientSex")})
    h["PatientBirthDate"] = patient["birth"]
    h.update({k: img[k] for k in ("SeriesInstanceUID", "SOPInstanceUID", "SeriesNumber", "InstanceNumber",
                                  "SeriesTime", "SeriesDescription", "VOILUTFunction", "KVP", "SID",
                                  "ExposureTime", "XRayTubeCurrent", "Exposure", "PixelSpacing")})
    h["ViewPosition"] = img["view"]
    return h


def _gt_row(rel: str, patient: dict, study: dict, img: dict, ts_written: str) -> dict:
    f = study["findings"]
    row = {"path": rel}
    row.update(labels_from_findings(f))
    eff, ptx = f.get("pleural_effusion"), f.get("pneumothorax")
    les = f.get("lung_lesion")
    sd = f.get("support_devices")
    row.update({
        "patient_id": patient["PatientID"],
        "study_key": study["study_key"],
        "study_uid": study["StudyInstanceUID"],
        "sop_uid": img["SOPInstanceUID"],
        "view_position": img["view"],
        "sex": patient["PatientSex"],
        "age": study["age"],
        "study_date": study["StudyDate"],
        "setting": study["setting"],
        "modality": study["Modality"],
        "manufacturer": study["Manufacturer"],
        "photometric": img["photometric"] if ts_written else "MONOCHROME2",
        "bits_stored": img["bits"] if ts_written else 8,
        "transfer_syntax": ts_written,
        "ctr": f"{study['ctr']:.4f}",
        "cardiomegaly_severity": f["cardiomegaly"]["severity"] if f.get("cardiomegaly") else "",
        "effusion_side": eff["side"] if eff else "",
        "effusion_severity": eff["severity"] if eff else "",
        "edema_severity": f["edema"]["severity"] if f.get("edema") else "",
        "pneumothorax_side": ptx["side"] if ptx else "",
        "pneumothorax_severity": ptx["severity"] if ptx else "",
        "consolidation_lobe": f["consolidation"]["lobe"] if f.get("consolidation") else "",
        "atelectasis_side": f["atelectasis"]["side"] if f.get("atelectasis") else "",
        "lesion_count": len(les["lesions"]) if les else 0,
        "lesion_max_cm": max(L["size_cm"] for L in les["lesions"]) if les else "",
        "devices": ";".join(sd["devices"]) if sd else "",
        "ett_cm": sd.get("ett_cm", "") if sd else "",
    })
    return row


# --------------------------------------------------------------------------------------------
# rendering + writing one study (runs in workers)


def _render(seed: int, study: dict, patient: dict, img: dict, size: int):
    rng = np.random.default_rng([seed, 2, study["index"], img["k"]])
    an = sample_anatomy(rng, img["view"], patient["PatientSex"], study["ctr"])
    pixels, info = render_study_image(rng, study["findings"], size, img["view"], aspect=img["aspect"],
                                      sex=patient["PatientSex"], ctr=study["ctr"], anatomy=an)
    return rng, pixels, info


def _write_study(args) -> tuple[list[dict], list[dict]]:
    out, seed, size, fmt, patient, study = args
    out = Path(out)
    rows, instances = [], []
    for img in study["images"]:
        rng, pixels, _info = _render(seed, study, patient, img, size)
        rel = _rel_path(patient, study, img, fmt)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            u8 = (pixels * 255.0 + 0.5).astype(np.uint8)
            im = Image.fromarray(u8, mode="L")
            if img["png_jpeg"]:
                im.save(path, format="JPEG", quality=92)
            else:
                im.save(path, format="PNG", compress_level=1)
            rows.append(_gt_row(rel, patient, study, img, ""))
            continue
        h = _header(patient, study, img)
        stored, attrs = dicomio.quantise(pixels, img["bits"], img["photometric"], img["rescale"], rng)
        ds = dicomio.radiograph_dataset(h, stored, attrs)
        ts = dicomio.write_dataset(ds, path, img["ts"], stored)
        rows.append(_gt_row(rel, patient, study, img, ts))
        inst = dict(h)
        inst.update({"path": rel, "SOPClassUID": str(ds.SOPClassUID), "TransferSyntaxUID": ts})
        instances.append(inst)
    return rows, instances


# --------------------------------------------------------------------------------------------
# junk: CT, SR, DICOMDIR, broken files


def _write_non_cxr(out: Path, plan: dict, instances: list[dict], size: int) -> list[str]:
    seed = plan["seed"]
    written: list[str] = []
    patients = plan["patients"]
    # CT study for the first patient ("im" style, so the DICOMDIR lists it too)
    p0 = patients[0]
    s0 = p0["studies"][0]
    rng = np.random.default_rng([seed, 3])
    ct_date = (_dt.date(int(s0["StudyDate"][:4]), int(s0["StudyDate"][4:6]), int(s0["StudyDate"][6:]))
               + _dt.timedelta(days=2))
    h = {
        "StudyInstanceUID": dicomio.make_uid(seed, "ct-study"),
        "SeriesInstanceUID": dicomio.make_uid(seed, "ct-series"),
        "StudyDate": ct_date.strftime("%Y%m%d"),
        "StudyTime": "101500",
        "AccessionNumber": "CT" + s0["AccessionNumber"][-8:],
        "StudyID": "9" + s0["StudyID"],
        "InstitutionName": s0["InstitutionName"],
        "ReferringPhysicianName": s0["ReferringPhysicianName"],
        "PatientName": p0["PatientName"],
        "PatientID": p0["PatientID"],
        "PatientBirthDate": p0["birth"],
        "PatientSex": p0["PatientSex"],
        "PatientAge": s0["PatientAge"],
    }
    ct_size = min(512, size)
    for i, (ds, stored) in enumerate(dicomio.ct_slices(h, 4, ct_size, rng)):
        rel = f"{p0['PatientID']}/ST{len(p0['studies']) + 1:06d}/SE000002/IM{i + 1:06d}"
        dicomio.write_dataset(ds, out / rel, dicomio.EXPLICIT, stored)
        written.append(rel)
        inst = dict(h)
        inst.update({"path": rel, "Modality": "CT", "SeriesNumber": 2, "InstanceNumber": i + 1,
                     "StudyDescription": "CT CHEST W/O CONTRAST", "SOPClassUID": dicomio.CT_IMAGE_STORAGE,
                     "SOPInstanceUID": str(ds.SOPInstanceUID), "TransferSyntaxUID": dicomio.EXPLICIT})
        instances.append(inst)
    # one SR document with the report of a study, in that study's folder
    pj = patients[min(1, len(patients) - 1)]
    sj = pj["studies"][0]
    img = sj["images"][0]
    hdr = _header(pj, sj, img)
    hdr["SeriesInstanceUID"] = dicomio.make_uid(seed, "sr-series")
    sr = dicomio.sr_dataset(hdr, sj["report"])
    first = Path(_rel_path(pj, sj, img, "dicom"))
    study_dir = first.parent.parent
    name = {"uid": f"{hdr['SeriesInstanceUID']}/{sr.SOPInstanceUID}.dcm", "im": "SE000099/IM000001",
            "dated": "099_REPORT/IM-0099-0001.dcm"}[pj["style"]]
    rel = (study_dir / name).as_posix()
    dicomio.write_dataset(sr, out / rel, dicomio.EXPLICIT)
    written.append(rel)
    return written


def _write_broken(out: Path, plan: dict, rows: list[dict], fmt: str) -> list[str]:
    """Zero-byte files, truncated files and (DICOM mode) text files named .dcm."""
    rng = np.random.default_rng([plan["seed"], 4])
    n = max(1, len(rows) // 300)
    written = []
    dirs = sorted({str(Path(r["path"]).parent) for r in rows})
    for i in range(n):
        d = Path(dirs[int(rng.integers(len(dirs)))])
        src = rows[int(rng.integers(len(rows)))]["path"]
        data = (out / src).read_bytes()
        if fmt == "png":
            items = [(d / f"empty_{i:03d}.png", b""),
                     (d / f"partial_{i:03d}.png", data[: max(64, int(len(data) * 0.4))])]
        else:
            ext = "" if rng.random() < 0.5 else ".dcm"
            items = [
                (d / f"IM{900000 + i:06d}{ext}", b""),
                (d / f"truncated_{i:03d}.dcm", data[: max(200, int(len(data) * (0.3 + 0.4 * rng.random())))]),
                (d / f"export_log_{i:03d}.dcm",
                 ("PACS EXPORT LOG\r\nJob finished with 1 warning(s).\r\n"
                  f"Study {i}: transfer incomplete, see console.\r\n").encode("ascii")),
            ]
        for path, payload in items:
            path = out / path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
            written.append(path.relative_to(out).as_posix())
    return written


# --------------------------------------------------------------------------------------------
# public entry point


def generate_archive(
    out: Path,
    studies: int,
    seed: int,
    fmt: str = "dicom",
    image_size: int = 1024,
    broken: bool = True,
    progress: bool = True,
    workers: int = 1,
    exist_ok: bool = False,
) -> dict:
    """Write a synthetic chest-radiograph archive with known ground truth to ``out``.

    Parameters
    ----------
    out : folder to create (must not exist or be empty unless ``exist_ok``).
    studies : number of CXR studies (each has 1-2 images; patients have 1-6 studies).
    seed : everything written (pixels, UIDs, dates, names, reports) is a function of the seed and
        the other arguments: the same call writes the same bytes.
    fmt : ``"dicom"`` (PACS-like export with CT / SR / DICOMDIR / broken files mixed in) or
        ``"png"`` (8-bit PNG, some JPEG).
    image_size : rows of each radiograph (columns follow the detector's aspect ratio).
    broken : add broken files (never listed in the ground truth).
    progress : show a progress bar on stderr.
    workers : processes rendering studies in parallel (1 = in this process). The output does
        not depend on it.
    exist_ok : allow writing into a non-empty folder.

    Returns a summary dict: ``images``, ``studies``, ``patients``, ``broken`` and ``non_cxr``
    (file counts), ``positives`` (per ground-truth column), ``transfer_syntaxes`` (counts),
    ``out``, ``format``, ``seconds`` and ``images_per_second``.
    """
    if fmt not in ("dicom", "png"):
        raise ValueError("fmt must be 'dicom' or 'png'")
    if studies < 1:
        raise ValueError("studies must be >= 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not exist_ok:
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = plan_archive(studies, seed, image_size, fmt)
    tasks = [(str(out), seed, image_size, fmt, p, s) for p in plan["patients"] for s in p["studies"]]
    n_images = sum(len(s["images"]) for _, _, _, _, _, s in tasks)

    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n_images, unit="img", desc="synth", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None

    rows: list[dict] = []
    instances: list[dict] = []

    def collect(result):
        r, inst = result
        rows.extend(r)
        instances.extend(inst)
        if bar is not None:
            bar.update(len(r))

    if workers and workers > 1:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        with parent_objects_frozen():
            pool = ctx.Pool(workers)
        with pool:
            for result in pool.imap(_write_study, tasks, chunksize=1):
                collect(result)
    else:
        for task in tasks:
            collect(_write_study(task))
    if bar is not None:
        bar.close()

    non_cxr: list[str] = []
    if fmt == "dicom":
        non_cxr = _write_non_cxr(out, plan, instances, image_size)
        dicomio.write_dicomdir(out, instances, f"SYNTH{seed % 100000:05d}", seed)
        non_cxr.append("DICOMDIR")
    broken_files = _write_broken(out, plan, rows, fmt) if broken else []

    with open(out / "ground_truth.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(GROUND_TRUTH_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    with open(out / "reports.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["study_key", "report"])
        for p in plan["patients"]:
            for s in p["studies"]:
                w.writerow([s["study_key"], s["report"]])

    seconds = time.perf_counter() - t0
    positives = {k: int(sum(int(r[k]) for r in rows)) for k in FINDINGS}
    ts_counts: dict[str, int] = {}
    for r in rows:
        ts_counts[r["transfer_syntax"] or fmt] = ts_counts.get(r["transfer_syntax"] or fmt, 0) + 1
    return {
        "out": str(out),
        "format": fmt,
        "images": len(rows),
        "studies": sum(len(p["studies"]) for p in plan["patients"]),
        "patients": len(plan["patients"]),
        "broken": len(broken_files),
        "non_cxr": len(non_cxr),
        "broken_files": broken_files,
        "non_cxr_files": non_cxr,
        "positives": positives,
        "transfer_syntaxes": ts_counts,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None,
    }
