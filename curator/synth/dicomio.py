"""Writing the synthetic archive's DICOM files: radiographs, CT slices, an SR, a DICOMDIR, junk.

Radiographs are CR Image Storage or Digital X-Ray Image Storage - For Presentation instances with
a realistic header. Pixel values are the phantom's float image quantised to the stored bit depth
(12, 14 or 16 bits in 16-bit words, or 8-bit), inverted for MONOCHROME1, optionally stored
through a Modality LUT (Rescale Slope / Intercept) with a window in the rescaled units.

Transfer syntaxes: Explicit / Implicit VR Little Endian; RLE Lossless (pydicom's encoder, through
pylibjpeg-rle when installed); JPEG 2000 Lossless (pydicom + pylibjpeg-openjpeg); JPEG Lossless
SV1 and JPEG-LS Lossless (an uncompressed file transcoded by python-gdcm's
``ImageChangeTransferSyntax``). A codec that is missing falls back to Explicit VR Little Endian, and
the header tells the truth about what was written.

UIDs are ``pydicom.uid.generate_uid`` under pydicom's UID root with the archive seed and the
instance's identity as entropy sources: valid (<= 64 characters, numeric components) and the
same for the same seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom import uid as _uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# Root of every UID the generator makes (pydicom's root, used by generate_uid).
UID_ROOT = _uid.PYDICOM_ROOT_UID

EXPLICIT = str(_uid.ExplicitVRLittleEndian)
IMPLICIT = str(_uid.ImplicitVRLittleEndian)
RLE = str(_uid.RLELossless)
J2K_LOSSLESS = str(_uid.JPEG2000Lossless)
JPEG_LOSSLESS_SV1 = str(_uid.JPEGLosslessSV1)
JPEGLS_LOSSLESS = str(_uid.JPEGLSLossless)
TRANSFER_SYNTAXES = (EXPLICIT, IMPLICIT, RLE, J2K_LOSSLESS, JPEG_LOSSLESS_SV1, JPEGLS_LOSSLESS)

_GDCM_NAMES = {JPEG_LOSSLESS_SV1: "JPEGLosslessProcess14_1", JPEGLS_LOSSLESS: "JPEGLSLossless"}


def make_uid(*parts) -> str:
    """A deterministic UID under :data:`UID_ROOT` from the given identity parts."""
    return str(_uid.generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts]))


def _codec_available(ts: str) -> bool:
    if ts in (EXPLICIT, IMPLICIT):
        return True
    if ts in _GDCM_NAMES:
        try:
            import gdcm  # noqa: F401
        except ImportError:
            return False
        return True
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder, RLELosslessEncoder

    enc = {RLE: RLELosslessEncoder, J2K_LOSSLESS: JPEG2000LosslessEncoder}[ts]
    return bool(enc.is_available)


def quantise(img: np.ndarray, bits: int, photometric: str, rescale: tuple[float, float] | None,
             rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Float image in [0, 1] (dense = bright) -> stored pixel values and pixel-module attributes.

    The values use most but not all of the stored range (like a detector's raw output).
    MONOCHROME1 stores ``maxval - v``. With ``rescale = (slope, intercept)`` the window is given in
    rescaled (modality) units.
    """
    maxv = (1 << bits) - 1
    lo = float(maxv) * (0.01 + 0.06 * rng.random())
    hi = float(maxv) * (0.90 + 0.09 * rng.random())
    v = img * np.float32(hi - lo)
    v += np.float32(lo + 0.5)
    dtype = np.uint8 if bits <= 8 else np.uint16
    stored = v.astype(dtype)
    if photometric == "MONOCHROME1":
        np.subtract(dtype(maxv), stored, out=stored)
    attrs = {
        "BitsAllocated": 8 if bits <= 8 else 16,
        "BitsStored": bits,
        "HighBit": bits - 1,
        "PixelRepresentation": 0,
        "PhotometricInterpretation": photometric,
        "SamplesPerPixel": 1,
        "Rows": int(img.shape[0]),
        "Columns": int(img.shape[1]),
    }
    slope, intercept = rescale if rescale else (1.0, 0.0)
    # window over the used range, in modality units
    a, b = lo * slope + intercept, hi * slope + intercept
    if photometric == "MONOCHROME1":
        a, b = (maxv - hi) * slope + intercept, (maxv - lo) * slope + intercept
    center = round((a + b) / 2.0, 1)
    width = round((b - a) * (0.85 + 0.1 * rng.random()), 1)
    attrs["WindowCenter"] = center
    attrs["WindowWidth"] = max(width, 1.0)
    if rescale:
        attrs["RescaleSlope"] = slope
        attrs["RescaleIntercept"] = intercept
        attrs["RescaleType"] = "US"
    return stored, attrs


def _file_meta(sop_class: str, sop_instance: str, ts: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = _uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CURATOR_SYNTH"
    return meta


def radiograph_dataset(h: dict, pixels: np.ndarray, pix_attrs: dict) -> Dataset:
    """A CR / DX dataset from the header dict ``h`` (see :mod:`curator.synth.archive`)."""
    dx = h["Modality"] == "DX"
    sop_class = DX_PRESENTATION_STORAGE if dx else CR_IMAGE_STORAGE
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if dx else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = h["SOPInstanceUID"]
    ds.StudyDate = h["StudyDate"]
    ds.SeriesDate = h["StudyDate"]
    ds.AcquisitionDate = h["StudyDate"]
    ds.ContentDate = h["StudyDate"]
    ds.StudyTime = h["StudyTime"]
    ds.SeriesTime = h["SeriesTime"]
    ds.AcquisitionTime = h["SeriesTime"]
    ds.ContentTime = h["SeriesTime"]
    ds.AccessionNumber = h["AccessionNumber"]
    ds.Modality = h["Modality"]
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = h["Manufacturer"]
    ds.InstitutionName = h["InstitutionName"]
    ds.ReferringPhysicianName = h["ReferringPhysicianName"]
    ds.StationName = h["StationName"]
    ds.StudyDescription = h["StudyDescription"]
    ds.SeriesDescription = h["SeriesDescription"]
    ds.ManufacturerModelName = h["ManufacturerModelName"]
    ds.PatientName = h["PatientName"]
    ds.PatientID = h["PatientID"]
    ds.PatientBirthDate = h["PatientBirthDate"]
    ds.PatientSex = h["PatientSex"]
    ds.PatientAge = h["PatientAge"]
    ds.BodyPartExamined = "CHEST"
    ds.KVP = h["KVP"]
    ds.DistanceSourceToDetector = h["SID"]
    ds.ExposureTime = h["ExposureTime"]
    ds.XRayTubeCurrent = h["XRayTubeCurrent"]
    ds.Exposure = h["Exposure"]
    ds.ImagerPixelSpacing = [h["PixelSpacing"], h["PixelSpacing"]]
    if dx:
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelSpacing = [h["PixelSpacing"], h["PixelSpacing"]]
    ds.ViewPosition = h["ViewPosition"]
    ds.PatientOrientation = ["P", "F"] if h["ViewPosition"] == "LL" else ["L", "F"]
    ds.StudyInstanceUID = h["StudyInstanceUID"]
    ds.SeriesInstanceUID = h["SeriesInstanceUID"]
    ds.StudyID = h["StudyID"]
    ds.SeriesNumber = h["SeriesNumber"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = h["InstanceNumber"]
    ds.ImageLaterality = h.get("ImageLaterality", "U")
    ds.BurnedInAnnotation = "NO"
    for k, v in pix_attrs.items():
        setattr(ds, k, v)
    if dx:
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if pix_attrs["PhotometricInterpretation"] == "MONOCHROME2" else 1
    if h.get("VOILUTFunction"):
        ds.VOILUTFunction = h["VOILUTFunction"]
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if pix_attrs["BitsAllocated"] == 8 else "OW"
    ds.file_meta = _file_meta(sop_class, h["SOPInstanceUID"], EXPLICIT)
    return ds


def write_dataset(ds: Dataset, path: Path, ts: str, pixels: np.ndarray | None = None) -> str:
    """Write ``ds`` to ``path`` in transfer syntax ``ts`` (falls back to Explicit VR LE when the
    codec is missing). Returns the transfer syntax actually written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _codec_available(ts):
        ts = EXPLICIT
    if ts in (EXPLICIT, IMPLICIT):
        ds.file_meta.TransferSyntaxUID = ts
        dcmwrite(path, ds, enforce_file_format=True, implicit_vr=(ts == IMPLICIT), little_endian=True)
        return ts
    if ts in (RLE, J2K_LOSSLESS):
        plugin = ""
        if ts == RLE:
            from pydicom.pixels.encoders import RLELosslessEncoder

            if "pylibjpeg" in RLELosslessEncoder._available:
                plugin = "pylibjpeg"
        ds.compress(ts, pixels, encoding_plugin=plugin, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = ts
        dcmwrite(path, ds, enforce_file_format=True)
        return ts
    # gdcm transcoding: write uncompressed next to the target, transcode, remove the temporary
    import gdcm

    tmp = path.with_name(path.name + ".tmp")
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    dcmwrite(tmp, ds, enforce_file_format=True)
    try:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(tmp))
        if not reader.Read():
            raise RuntimeError(f"gdcm could not read {tmp}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, _GDCM_NAMES[ts])))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm could not transcode to {ts}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"gdcm could not write {path}")
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return ts


# --------------------------------------------------------------------------------------------
# non-radiograph content


def ct_slices(h: dict, n: int, size: int, rng: np.random.Generator) -> list[tuple[Dataset, np.ndarray]]:
    """A few axial chest CT slices (CT Image Storage, signed HU through a rescale)."""
    out = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy = (yy + 0.5) / size - 0.5
    xx = (xx + 0.5) / size - 0.5
    body = ((xx / 0.42) ** 2 + ((yy + 0.02) / 0.3) ** 2) < 1
    for i in range(n):
        z = i / max(n - 1, 1)
        hu = np.full((size, size), -1000.0, np.float32)
        hu[body] = 40.0
        for sx in (-0.17, 0.17):
            lung = (((xx - sx) / (0.15 - 0.02 * z)) ** 2 + ((yy + 0.02) / (0.2 - 0.03 * z)) ** 2) < 1
            hu[lung] = -850.0
        heart = (((xx - 0.04) / (0.1 + 0.05 * z)) ** 2 + ((yy + 0.06) / (0.09 + 0.03 * z)) ** 2) < 1
        hu[heart] = 45.0
        spine = ((xx / 0.045) ** 2 + ((yy - 0.19) / 0.045) ** 2) < 1
        hu[spine] = 700.0
        table = (yy > 0.36) & (yy < 0.38) & (np.abs(xx) < 0.45)
        hu[table] = 300.0
        hu += rng.normal(0, 12, hu.shape).astype(np.float32)
        stored = np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = make_uid(h["SeriesInstanceUID"], "ct", i)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = h["StudyDate"]
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = h["StudyTime"]
        ds.AccessionNumber = h["AccessionNumber"]
        ds.Modality = "CT"
        ds.Manufacturer = "SIEMENS"
        ds.ManufacturerModelName = "SOMATOM Definition AS"
        ds.InstitutionName = h["InstitutionName"]
        ds.ReferringPhysicianName = h["ReferringPhysicianName"]
        ds.StudyDescription = "CT CHEST W/O CONTRAST"
        ds.SeriesDescription = "AXIAL 5MM"
        ds.PatientName = h["PatientName"]
        ds.PatientID = h["PatientID"]
        ds.PatientBirthDate = h["PatientBirthDate"]
        ds.PatientSex = h["PatientSex"]
        ds.PatientAge = h["PatientAge"]
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = 5.0
        ds.KVP = 120
        ds.StudyInstanceUID = h["StudyInstanceUID"]
        ds.SeriesInstanceUID = h["SeriesInstanceUID"]
        ds.StudyID = h["StudyID"]
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-175.0, -175.0, -100.0 - 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = make_uid(h["StudyInstanceUID"], "for")
        ds.SliceLocation = -100.0 - 5.0 * i
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [350.0 / size, 350.0 / size]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta = _file_meta(CT_IMAGE_STORAGE, ds.SOPInstanceUID, EXPLICIT)
        out.append((ds, stored))
    return out


def sr_dataset(h: dict, report: str) -> Dataset:
    """A Basic Text SR document holding a report (no pixel data)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = make_uid(h["StudyInstanceUID"], "sr")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = h["StudyDate"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = h["StudyTime"]
    ds.AccessionNumber = h["AccessionNumber"]
    ds.Modality = "SR"
    ds.Manufacturer = "curator synthetic RIS"
    ds.InstitutionName = h["InstitutionName"]
    ds.ReferringPhysicianName = h["ReferringPhysicianName"]
    ds.StudyDescription = h["StudyDescription"]
    ds.SeriesDescription = "Radiology report"
    ds.PatientName = h["PatientName"]
    ds.PatientID = h["PatientID"]
    ds.PatientBirthDate = h["PatientBirthDate"]
    ds.PatientSex = h["PatientSex"]
    ds.StudyInstanceUID = h["StudyInstanceUID"]
    ds.SeriesInstanceUID = h["SeriesInstanceUID"]
    ds.StudyID = h["StudyID"]
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"

    def code(value, scheme, meaning):
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return Sequence([c])

    ds.ConceptNameCodeSequence = code("18748-4", "LN", "Diagnostic Imaging Report")
    items = []
    sections = {"FINDINGS": "121071", "IMPRESSION": "121073"}
    text = report
    for name, cv in sections.items():
        start = text.find(name + ":")
        if start < 0:
            continue
        end = len(text)
        for other in sections:
            j = text.find(other + ":", start + 1)
            if other != name and j > start:
                end = min(end, j)
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = code(cv, "DCM", name.title())
        item.TextValue = text[start + len(name) + 1:end].strip()[:1024]
        items.append(item)
    ds.ContentSequence = Sequence(items)
    ds.file_meta = _file_meta(BASIC_TEXT_SR, ds.SOPInstanceUID, EXPLICIT)
    return ds


def _fileset_component_ok(part: str) -> bool:
    return 1 <= len(part) <= 8 and all(c.isdigit() or ("A" <= c <= "Z") or c == "_" for c in part)


def write_dicomdir(root: Path, instances: list[dict], fileset_id: str, seed: int) -> int:
    """Write ``root/DICOMDIR`` listing the given instances (dicts with the relative ``path`` and the
    header keys), skipping any whose path is not a valid File ID. Returns the number listed.

    The directory records are PATIENT -> STUDY -> SERIES -> IMAGE; record offsets are found by
    writing once, reading the item positions back, and writing again (offsets are fixed-size).
    """
    usable = []
    for inst in instances:
        parts = Path(inst["path"]).parts
        if 1 <= len(parts) <= 8 and all(_fileset_component_ok(p) for p in parts):
            usable.append(inst)
    tree: dict = {}
    for inst in usable:
        p = tree.setdefault(inst["PatientID"], {"inst": inst, "studies": {}})
        s = p["studies"].setdefault(inst["StudyInstanceUID"], {"inst": inst, "series": {}})
        se = s["series"].setdefault(inst["SeriesInstanceUID"], {"inst": inst, "images": []})
        se["images"].append(inst)

    records: list[Dataset] = []  # in depth-first order, as they are written

    def rec(rtype: str) -> Dataset:
        r = Dataset()
        r.OffsetOfTheNextDirectoryRecord = 0
        r.RecordInUseFlag = 0xFFFF
        r.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        r.DirectoryRecordType = rtype
        return r

    def add(r: Dataset) -> int:
        records.append(r)
        return len(records) - 1

    def build_patient(p):
        inst = p["inst"]
        r = rec("PATIENT")
        r.SpecificCharacterSet = "ISO_IR 100"
        r.PatientName = inst["PatientName"]
        r.PatientID = inst["PatientID"]
        return r

    def build_study(s):
        inst = s["inst"]
        r = rec("STUDY")
        r.SpecificCharacterSet = "ISO_IR 100"
        r.StudyDate = inst["StudyDate"]
        r.StudyTime = inst["StudyTime"]
        r.StudyDescription = inst.get("StudyDescription", "")
        r.StudyInstanceUID = inst["StudyInstanceUID"]
        r.StudyID = inst["StudyID"]
        r.AccessionNumber = inst["AccessionNumber"]
        return r

    def build_series(se):
        inst = se["inst"]
        r = rec("SERIES")
        r.Modality = inst["Modality"]
        r.SeriesInstanceUID = inst["SeriesInstanceUID"]
        r.SeriesNumber = inst["SeriesNumber"]
        return r

    def build_image(inst):
        r = rec("IMAGE")
        r.ReferencedFileID = list(Path(inst["path"]).parts)
        r.ReferencedSOPClassUIDInFile = inst["SOPClassUID"]
        r.ReferencedSOPInstanceUIDInFile = inst["SOPInstanceUID"]
        r.ReferencedTransferSyntaxUIDInFile = inst["TransferSyntaxUID"]
        r.InstanceNumber = inst["InstanceNumber"]
        return r

    def walk(nodes, builder, child_fn):
        out = []
        for node in nodes:
            i = add(builder(node))
            out.append((i, child_fn(node)))
        return out

    structure = walk(
        tree.values(), build_patient,
        lambda p: walk(p["studies"].values(), build_study,
                       lambda s: walk(s["series"].values(), build_series,
                                      lambda se: walk(se["images"], build_image, lambda _i: []))))

    ds = Dataset()
    ds.FileSetID = fileset_id[:16]
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = Sequence(records)
    sop = make_uid("dicomdir", seed, fileset_id)
    ds.file_meta = _file_meta(MEDIA_STORAGE_DIRECTORY, sop, EXPLICIT)
    path = root / "DICOMDIR"
    dcmwrite(path, ds, enforce_file_format=True)
    back = dcmread(path)
    offs = [item.seq_item_tell for item in back.DirectoryRecordSequence]

    def link(level_nodes):
        for j, (i, kids) in enumerate(level_nodes):
            nxt = level_nodes[j + 1][0] if j + 1 < len(level_nodes) else None
            records[i].OffsetOfTheNextDirectoryRecord = offs[nxt] if nxt is not None else 0
            records[i].OffsetOfReferencedLowerLevelDirectoryEntity = offs[kids[0][0]] if kids else 0
            link(kids)

    link(structure)
    if structure:
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = offs[structure[0][0]]
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = offs[structure[-1][0]]
    dcmwrite(path, ds, enforce_file_format=True)
    return len(usable)
