"""Write small, valid test DICOM files with pydicom (and python-gdcm / Pillow for some codecs).

``write_dicom(path, pixels, ...)`` writes a radiograph-like file with a realistic header
(patient id, name and birth date, study / series / SOP UIDs, view position, study date, age,
sex, manufacturer...). The pixel array decides the pixel module:

* ``uint8``  -> (0028,0100) Bits Allocated 8, (0028,0103) Pixel Representation 0
* ``uint16`` -> Bits Allocated 16, Pixel Representation 0
* ``int16``  -> Bits Allocated 16, Pixel Representation 1 (signed)
* 2-D arrays are one frame; 3-D arrays ``(frames, rows, columns)`` set (0028,0008) Number of
  Frames.

``transfer_syntax`` may be any uncompressed syntax, Deflated Explicit VR Little Endian, or one of
the compressed syntaxes below; compressed files are made as follows:

* RLE Lossless (1.2.840.10008.1.2.5): pydicom's own RLE encoder.
* JPEG 2000 Lossless (.4.90) and JPEG 2000 (.4.91): pydicom + pylibjpeg-openjpeg
  (``j2k_psnr`` makes .91 genuinely lossy).
* JPEG Baseline 8-bit (.4.50): Pillow's JPEG encoder, then ``pydicom.encaps.encapsulate``.
* JPEG Lossless (.4.57), JPEG Lossless SV1 (.4.70), JPEG-LS Lossless (.4.80) and near-lossless
  (.4.81): an uncompressed file written by pydicom, transcoded by python-gdcm's
  ``ImageChangeTransferSyntax``.

Other tests import this module: ``from tests.dicom_factory import write_dicom``.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import uid as _uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

ExplicitVRLittleEndian = _uid.ExplicitVRLittleEndian
ImplicitVRLittleEndian = _uid.ImplicitVRLittleEndian
DeflatedExplicitVRLittleEndian = _uid.DeflatedExplicitVRLittleEndian
RLELossless = _uid.RLELossless
JPEGBaseline8Bit = _uid.JPEGBaseline8Bit
JPEGLossless = _uid.JPEGLossless
JPEGLosslessSV1 = _uid.JPEGLosslessSV1
JPEGLSLossless = _uid.JPEGLSLossless
JPEGLSNearLossless = _uid.JPEGLSNearLossless
JPEG2000Lossless = _uid.JPEG2000Lossless
JPEG2000 = _uid.JPEG2000

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

_GDCM_SYNTAXES = {
    JPEGLossless: "JPEGLosslessProcess14",
    JPEGLosslessSV1: "JPEGLosslessProcess14_1",
    JPEGLSLossless: "JPEGLSLossless",
    JPEGLSNearLossless: "JPEGLSNearLossless",
}
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = _uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def base_dataset(
    *,
    modality: str = "DX",
    sop_class_uid: str | None = None,
    patient_id: str = "PID-0001",
    patient_name: str = "Doe^Jane",
    patient_birth_date: str = "19600102",
    patient_age: str | None = "059Y",
    patient_sex: str | None = "F",
    study_date: str | None = "20190317",
    study_time: str | None = "101530.25",
    view_position: str | None = "PA",
    image_laterality: str | None = None,
    laterality: str | None = None,
    manufacturer: str | None = "ACME Imaging",
    manufacturer_model: str | None = "XR-1000",
    institution_name: str | None = "General Hospital",
    body_part_examined: str | None = "CHEST",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A dataset with patient / study / series / equipment modules filled in, no pixel module."""
    if sop_class_uid is None:
        sop_class_uid = {"DX": DX_FOR_PRESENTATION, "CR": CR_IMAGE_STORAGE, "CT": CT_IMAGE_STORAGE}.get(
            modality, DX_FOR_PRESENTATION
        )
    sop_instance_uid = sop_instance_uid or _uid.generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, sop_instance_uid, transfer_syntax)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_instance_uid or _uid.generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or _uid.generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = patient_birth_date
    optional = {
        "PatientAge": patient_age,
        "PatientSex": patient_sex,
        "StudyDate": study_date,
        "StudyTime": study_time,
        "Modality": modality,
        "ViewPosition": view_position,
        "ImageLaterality": image_laterality,
        "Laterality": laterality,
        "Manufacturer": manufacturer,
        "ManufacturerModelName": manufacturer_model,
        "InstitutionName": institution_name,
        "BodyPartExamined": body_part_examined,
    }
    for keyword, value in optional.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.AccessionNumber = "ACC123"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def _lut_item(first_mapped: int, bits: int, data: Sequence[int], vr: str) -> Dataset:
    data = np.asarray(data)
    n = len(data)
    item = Dataset()
    item.LUTDescriptor = [0 if n == 65536 else n, int(first_mapped) & 0xFFFF, int(bits)]
    if vr == "OW":
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())
    else:
        item.add_new(0x00283006, "US", [int(v) for v in data])
    return item


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    rescale_type: str | None = None,
    window_center: float | Sequence[float] | None = None,
    window_width: float | Sequence[float] | None = None,
    voi_lut_function: str | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    voi_lut_vr: str = "US",
    modality_lut: tuple[int, int, Sequence[int]] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **header: Any,
) -> Dataset:
    """A complete uncompressed dataset holding ``pixels`` (see :func:`write_dicom`)."""
    pixels = np.asarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16, np.int16):
        raise TypeError(f"pixels must be uint8, uint16 or int16, not {pixels.dtype}")
    if pixels.ndim not in (2, 3):
        raise ValueError("pixels must be (rows, columns) or (frames, rows, columns)")
    ds = base_dataset(transfer_syntax=transfer_syntax, **header)
    bits_allocated = pixels.dtype.itemsize * 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleSlope = 1.0 if rescale_slope is None else rescale_slope
        ds.RescaleIntercept = 0.0 if rescale_intercept is None else rescale_intercept
        if rescale_type:
            ds.RescaleType = rescale_type
    if modality_lut is not None:
        ds.ModalityLUTSequence = [_lut_item(*modality_lut, vr="US")]
        ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    if window_center is not None:
        ds.WindowCenter = window_center
    if window_width is not None:
        ds.WindowWidth = window_width
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        ds.VOILUTSequence = [_lut_item(*voi_lut, vr=voi_lut_vr)]
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    window_center: float | Sequence[float] | None = None,
    window_width: float | Sequence[float] | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "DX",
    j2k_psnr: float | None = None,
    jpeg_quality: int = 95,
    jls_error: int = 2,
    **kwargs: Any,
) -> Path:
    """Write ``pixels`` as a DICOM file at ``path`` and return the path.

    ``voi_lut`` is ``(first_mapped, bits_per_entry, data)`` for a (0028,3010) VOI LUT Sequence
    item (``voi_lut_vr="OW"`` stores the data as OW bytes instead of US values);
    ``modality_lut`` likewise for (0028,3000) Modality LUT Sequence. Header keywords of
    :func:`base_dataset` (``patient_id=``, ``view_position=``, ``study_date=``...) and
    ``voi_lut_function=``, ``rescale_type=`` pass through. Pass ``None`` to leave an optional
    header element out.
    """
    path = Path(path)
    ts = _uid.UID(transfer_syntax)
    uncompressed_ts = ts if ts in _UNCOMPRESSED else ExplicitVRLittleEndian
    ds = make_dataset(
        pixels,
        photometric=photometric,
        bits_stored=bits_stored,
        rescale_slope=rescale_slope,
        rescale_intercept=rescale_intercept,
        window_center=window_center,
        window_width=window_width,
        voi_lut=voi_lut,
        transfer_syntax=uncompressed_ts,
        modality=modality,
        **kwargs,
    )
    if ts in _UNCOMPRESSED:
        ds.save_as(path, enforce_file_format=True)
    elif ts == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    elif ts == JPEG2000 and j2k_psnr:
        ds.compress(JPEG2000, encoding_plugin="pylibjpeg", generate_instance_uid=False, j2k_psnr=[j2k_psnr])
        ds.save_as(path, enforce_file_format=True)
    elif ts in (JPEG2000Lossless, JPEG2000):
        # Without j2k_psnr, .91 holds a reversible codestream (allowed: .91 is "any" J2K).
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(path, enforce_file_format=True)
    elif ts == JPEGBaseline8Bit:
        _compress_jpeg_baseline(ds, np.asarray(pixels), jpeg_quality)
        ds.save_as(path, enforce_file_format=True)
    elif ts in _GDCM_SYNTAXES:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "uncompressed.dcm"
            ds.save_as(src, enforce_file_format=True)
            _gdcm_transcode(src, path, _GDCM_SYNTAXES[ts], jls_error=jls_error)
    else:
        raise ValueError(f"write_dicom cannot produce transfer syntax {ts} ({ts.name})")
    return path


def _compress_jpeg_baseline(ds: Dataset, pixels: np.ndarray, quality: int) -> None:
    if pixels.dtype != np.uint8:
        raise ValueError("JPEG Baseline 8-bit needs uint8 pixels")
    frames = pixels if pixels.ndim == 3 else pixels[None]
    encoded = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame), mode="L").save(
            buf, format="JPEG", quality=quality, subsampling=0
        )
        encoded.append(buf.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _gdcm_transcode(src: Path, dst: Path, syntax_name: str, *, jls_error: int = 2) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"gdcm could not read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax_name)))
    if syntax_name == "JPEGLSNearLossless":
        codec = gdcm.JPEGLSCodec()
        codec.SetLossless(False)
        codec.SetLossyError(jls_error)
        change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm could not transcode to {syntax_name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm could not write {dst}")


def write_sr(path: str | Path, **header: Any) -> Path:
    """A Basic Text SR document: a valid DICOM file without (7FE0,0010) Pixel Data."""
    header.setdefault("modality", "SR")
    header.setdefault("view_position", None)
    header.setdefault("body_part_examined", None)
    ds = base_dataset(sop_class_uid=BASIC_TEXT_SR, **header)
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.TextValue = "No acute cardiopulmonary process."
    ds.ContentSequence = [text]
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicomdir(folder: str | Path, image_path: str | Path | None = None) -> Path:
    """A DICOMDIR (Media Storage Directory) in ``folder``, made with pydicom's FileSet.

    ``image_path`` is an existing DICOM file to reference; when None a small one is made.
    """
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if image_path is None:
            image_path = write_dicom(Path(tmp) / "img.dcm", np.zeros((8, 8), np.uint16), bits_stored=12)
        fs = FileSet()
        fs.add(dcmread(image_path))
        fs.write(folder)
    return folder / "DICOMDIR"
