"""DICOM files to 8-bit images for CheXzero, plus the header metadata the catalog keeps.

Two conversions from stored pixel values to 8 bits, chosen by ``ReadOptions.dicom_conversion``:

``"mimic"`` (default)
    Reproduces how MIMIC-CXR-JPG, the data CheXzero was trained on, was made from the MIMIC-CXR
    DICOMs (Johnson et al. 2019): modality LUT; shift to a minimum of 0, divide by the new
    maximum, multiply by 255 and truncate to 8 bits; invert MONOCHROME1; histogram equalisation
    with OpenCV's ``cv2.equalizeHist`` (re-implemented bit-exactly in numpy here, see
    :func:`equalize_hist`).

``"voi"``
    The standard display pipeline: modality LUT, then the VOI LUT or window, mapped to 0..255,
    MONOCHROME1 inverted (see :func:`voi_to_uint8`).

Reading order, so that files we will refuse cost as little as possible:

1. header only (:func:`read_header`, ``stop_before_pixels=True``): DICOMDIR, modality filter,
   samples per pixel, photometric interpretation, image size and decoder availability are
   checked before the pixel data is read or allocated;
2. the whole file, then checks that the pixel data is there and complete (pydicom does not
   raise on a truncated file: it warns, or silently returns a short value, or drops an
   encapsulated *Pixel Data* element whose delimiter is missing);
3. the first frame only is decoded (``pydicom.pixels.pixel_array(ds, index=0)``).

Decoders: pydicom 3 picks a plugin by transfer syntax. In the default install python-gdcm decodes
JPEG Lossless and JPEG-LS (pylibjpeg-libjpeg, GPL, is not needed), pydicom itself RLE and
deflate, pylibjpeg-openjpeg / gdcm / Pillow JPEG 2000, gdcm / Pillow JPEG baseline; no hint is
needed, pydicom tries the available plugins in turn.

Warnings raised by pydicom while reading are captured with :func:`warnings.catch_warnings`, which
changes process-wide state: read DICOM files from worker processes (as the loader does) rather
than from several threads of one process.
"""

from __future__ import annotations

import datetime as _dt
import io
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels import pixel_array as _pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from curator.readers import DICOM_CONVERSIONS, MAX_PIXELS, ReadError, ReadOptions, ReadResult

__all__ = [
    "META_KEYS",
    "MEDIA_STORAGE_DIRECTORY_STORAGE",
    "read_dicom",
    "read_header",
    "read_metadata",
    "metadata_from_dataset",
    "parse_da",
    "parse_age",
    "decode_first_frame",
    "modality_lut",
    "mimic_normalize",
    "equalize_hist",
    "mimic_to_uint8",
    "voi_lut_table",
    "apply_voi_lut_table",
    "window_output_range",
    "voi_to_uint8",
    "convert_to_uint8",
]

# (0002,0002) Media Storage SOP Class UID of a DICOMDIR.
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"

# The catalog's DICOM columns, in order. PatientName and PatientBirthDate are never read into it.
META_KEYS = (
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "modality",
    "view_position",
    "laterality",
    "study_date",
    "study_time",
    "patient_age",
    "patient_sex",
    "manufacturer",
    "manufacturer_model",
    "institution_name",
    "body_part_examined",
    "rows",
    "columns",
    "bits_allocated",
    "bits_stored",
    "photometric_interpretation",
    "transfer_syntax_uid",
    "number_of_frames",
    "frame_used",
)

# meta key -> DICOM keyword, for the plain string columns.
_STRING_KEYWORDS = {
    "patient_id": "PatientID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "modality": "Modality",
    "view_position": "ViewPosition",
    "study_time": "StudyTime",
    "patient_sex": "PatientSex",
    "manufacturer": "Manufacturer",
    "manufacturer_model": "ManufacturerModelName",
    "institution_name": "InstitutionName",
    "body_part_examined": "BodyPartExamined",
    "photometric_interpretation": "PhotometricInterpretation",
}
_INT_KEYWORDS = {
    "rows": "Rows",
    "columns": "Columns",
    "bits_allocated": "BitsAllocated",
    "bits_stored": "BitsStored",
}

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

# Messages of pydicom warnings / exceptions that mean the file ended too early.
_TRUNCATION_PATTERNS = (
    "end of file",
    "truncated",
    "unpack requires a buffer",
    "less than expected",
    "no tag to read",
)


# --------------------------------------------------------------------------------------------
# Header and metadata
# --------------------------------------------------------------------------------------------


def _looks_truncated(text: str) -> bool:
    text = text.lower()
    return any(p in text for p in _TRUNCATION_PATTERNS)


def _source(path: Path, data: bytes | None) -> Path | io.BytesIO:
    """What to hand to ``dcmread``: the path, or the caller's bytes of the file."""
    return path if data is None else io.BytesIO(data)


def _file_size(path: Path, data: bytes | None) -> int:
    return path.stat().st_size if data is None else len(data)


def _is_raw_dataset_start(path: Path, data: bytes | None = None) -> bool:
    """True when the file starts like a DICOM data set without preamble (an ACR-NEMA style
    or "raw" dataset): a little-endian group 0x0002 or 0x0008 tag."""
    if data is None:
        with open(path, "rb") as f:
            head = f.read(8)
    else:
        head = data[:8]
    return len(head) == 8 and head[1] == 0 and head[0] in (0x02, 0x08) and head[3] == 0


def _dcmread(path: Path, *, stop_before_pixels: bool, data: bytes | None = None) -> tuple[Dataset, list[str]]:
    """``dcmread`` with pydicom's warnings captured and its exceptions turned into ReadError.

    Files without the 128-byte preamble and ``DICM`` prefix are read with ``force=True`` only
    when their first bytes look like a data set (see :func:`_is_raw_dataset_start`); anything
    else is ``not_dicom``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = dcmread(_source(path, data), stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                if not _is_raw_dataset_start(path, data):
                    raise
                ds = dcmread(_source(path, data), stop_before_pixels=stop_before_pixels, force=True)
                _set_transfer_syntax_from_encoding(ds)
        except InvalidDicomError as exc:
            raise ReadError("not_dicom", f"not a DICOM file: {_one_line(exc)}") from None
        except (EOFError, struct.error, zlib.error) as exc:
            raise ReadError(
                "truncated", f"file is truncated: {type(exc).__name__}: {_one_line(exc)}"
            ) from None
        except Exception as exc:  # pydicom raises many kinds (BytesLengthException, ValueError...)
            if isinstance(exc, OSError) and exc.errno is not None:  # a real I/O error
                raise ReadError("unreadable", f"{type(exc).__name__}: {exc}") from None
            kind = "truncated" if _looks_truncated(str(exc)) else "corrupt_header"
            raise ReadError(
                kind, f"cannot parse the DICOM data set: {type(exc).__name__}: {_one_line(exc)}"
            ) from None
    return ds, [str(w.message) for w in caught]


def _set_transfer_syntax_from_encoding(ds: Dataset) -> None:
    """Give a preamble-less data set the (0002,0010) Transfer Syntax UID its encoding implies."""
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif little:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def read_header(path: str | Path, data: bytes | None = None) -> Dataset:
    """The data set up to, not including, (7FE0,0010) *Pixel Data* (``stop_before_pixels=True``).

    ``data``, when given, is the file's content already read by the caller. Raises
    :class:`~curator.readers.ReadError` (``not_dicom``, ``truncated``, ``corrupt_header``).
    """
    path = Path(path)
    ds, warned = _dcmread(path, stop_before_pixels=True, data=data)
    truncated = [w for w in warned if _looks_truncated(w)]
    if truncated:
        raise ReadError("truncated", f"file is truncated: {_one_line(truncated[0])}")
    if not len(ds):
        raise ReadError("truncated", "file is truncated: no data set after the file meta information")
    ts = _transfer_syntax(ds)
    if not _is_deflated(ts):
        file_size = _file_size(path, data)
        end, short = _last_element_end(ds, file_size)
        if short:
            raise ReadError("truncated", f"file is truncated: {short}")
        # pydicom stops quietly when fewer than 8 bytes are left for an element header; a
        # following (7FE0,0010) element would have left at least 8.
        if end is not None and 0 < file_size - end < 8:
            raise ReadError(
                "truncated", f"file is truncated: it ends {file_size - end} bytes into a data element header"
            )
    return ds


def read_metadata(path: str | Path, data: bytes | None = None) -> dict:
    """The catalog's DICOM columns (:data:`META_KEYS`) from the header only.

    See :func:`metadata_from_dataset`. Raises :class:`~curator.readers.ReadError` for files
    whose header cannot be read.
    """
    return metadata_from_dataset(read_header(path, data))


def _element_value(ds: Dataset, keyword: str) -> Any:
    try:
        elem = ds.data_element(keyword)
        if elem is None:
            return None
        return elem.value
    except Exception:  # bad VR / charset / value in a header element: treat as absent
        return None


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
        if value is None:
            return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _as_int(value: Any) -> int | None:
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(str(value).strip()))
        except (TypeError, ValueError):
            return None


_DA_RE = re.compile(r"^\s*(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})\s*$")


def parse_da(value: Any) -> _dt.date | None:
    """A (VR DA) date such as (0008,0020) *Study Date* as :class:`datetime.date`, or None.

    Accepts ``YYYYMMDD`` (the standard form) and the ACR-NEMA ``YYYY.MM.DD`` form (also ``-`` or
    ``/`` as separators); anything else, including impossible dates, empty values and date
    ranges, gives None.
    """
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    text = _as_str(value)
    if not text:
        return None
    m = _DA_RE.match(text)
    if not m:
        return None
    try:
        return _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


_AS_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMYdwmy]?)\s*$")


def parse_age(value: Any) -> int | None:
    """(0010,1010) *Patient's Age* (VR AS, ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``) in whole
    years, or None.

    Days, weeks and months are converted and rounded down (``"018M"`` -> 1, ``"003W"`` -> 0,
    ``"400D"`` -> 1). A bare number is taken as years. Malformed values give None.
    """
    text = _as_str(value)
    if not text:
        return None
    m = _AS_RE.match(text)
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).upper() or "Y"
    if unit == "Y":
        return n
    if unit == "M":
        return n // 12
    if unit == "W":
        return (n * 7) // 365
    return n // 365  # "D"


def _number_of_frames(ds: Dataset) -> int:
    """(0028,0008) *Number of Frames*, 1 when absent or empty; ReadError when invalid."""
    if "NumberOfFrames" not in ds:
        return 1
    raw = _element_value(ds, "NumberOfFrames")
    if raw is None or raw == "":
        return 1
    n = _as_int(raw)
    if n is None or n < 1:
        raise ReadError(
            "multi_frame_invalid", f"(0028,0008) Number of Frames is {raw!r}, not a positive integer"
        )
    return n


def metadata_from_dataset(ds: Dataset) -> dict:
    """The catalog's DICOM columns from a data set: exactly the keys of :data:`META_KEYS`.

    Strings are stripped (first value when multi-valued), absent or empty values are None.
    ``laterality`` is (0020,0062) *Image Laterality*, else (0020,0060) *Laterality*;
    ``study_date`` is a :class:`datetime.date` (:func:`parse_da`); ``patient_age`` whole years
    (:func:`parse_age`); ``transfer_syntax_uid`` comes from the file meta (0002,0010) (for a file without
    preamble and file meta, the syntax its encoding implies);
    ``number_of_frames`` is 1 when (0028,0008) is absent and ``frame_used`` is the frame read
    (always 0). (0010,0010) *Patient's Name* and (0010,0030) *Patient's Birth Date* are never
    read.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid header values become None, quietly
        return _metadata(ds)


def _metadata(ds: Dataset) -> dict:
    meta: dict[str, Any] = dict.fromkeys(META_KEYS)
    for key, keyword in _STRING_KEYWORDS.items():
        meta[key] = _as_str(_element_value(ds, keyword))
    for key, keyword in _INT_KEYWORDS.items():
        meta[key] = _as_int(_element_value(ds, keyword))
    if meta["modality"]:
        meta["modality"] = meta["modality"].upper()
    if meta["photometric_interpretation"]:
        meta["photometric_interpretation"] = meta["photometric_interpretation"].upper()
    meta["laterality"] = _as_str(_element_value(ds, "ImageLaterality")) or _as_str(
        _element_value(ds, "Laterality")
    )
    meta["study_date"] = parse_da(_element_value(ds, "StudyDate"))
    meta["patient_age"] = parse_age(_element_value(ds, "PatientAge"))
    file_meta = getattr(ds, "file_meta", None)
    meta["transfer_syntax_uid"] = (
        _as_str(_element_value(file_meta, "TransferSyntaxUID")) if file_meta else None
    )
    try:
        meta["number_of_frames"] = _number_of_frames(ds)
    except ReadError:
        meta["number_of_frames"] = None
    meta["frame_used"] = 0
    return meta


# --------------------------------------------------------------------------------------------
# Checks before and after reading the pixel data
# --------------------------------------------------------------------------------------------


def _is_dicomdir(path: Path, ds: Dataset | None) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    if ds is None:
        return False
    file_meta = getattr(ds, "file_meta", None)
    sop_class = _as_str(_element_value(file_meta, "MediaStorageSOPClassUID")) if file_meta else None
    return sop_class == MEDIA_STORAGE_DIRECTORY_STORAGE or "DirectoryRecordSequence" in ds


def _dicomdir_error() -> ReadError:
    return ReadError(
        "dicomdir",
        "DICOMDIR (Media Storage Directory, SOP Class 1.2.840.10008.1.3.10): an index of other "
        "files, not an image",
    )


def _check_header(path: Path, ds: Dataset, options: ReadOptions) -> None:
    """Refuse, from the header alone, files that are not single grayscale radiograph images."""
    if _is_dicomdir(path, ds):
        raise _dicomdir_error()
    modality = _as_str(_element_value(ds, "Modality"))
    accepted = None if options.modalities is None else {str(m).strip().upper() for m in options.modalities}
    if accepted is not None and modality and modality.upper() not in accepted:
        allowed = ", ".join(sorted(accepted))
        raise ReadError(
            "modality_filtered", f"(0008,0060) Modality is {modality!r}, not one of {allowed}", stage="filter"
        )
    spp = _as_int(_element_value(ds, "SamplesPerPixel"))
    if spp is not None and spp != 1:
        raise ReadError(
            "not_grayscale", f"(0028,0002) Samples per Pixel is {spp}, not 1: not a grayscale radiograph"
        )
    photometric = _as_str(_element_value(ds, "PhotometricInterpretation"))
    if photometric is not None and photometric.upper() not in _MONOCHROME:
        raise ReadError(
            "unsupported_photometric",
            f"(0028,0004) Photometric Interpretation is {photometric!r}, not MONOCHROME1 or MONOCHROME2",
        )
    rows = _as_int(_element_value(ds, "Rows"))
    cols = _as_int(_element_value(ds, "Columns"))
    if rows is not None and cols is not None:
        if rows <= 0 or cols <= 0:
            raise ReadError("empty_image", f"(0028,0010) Rows x (0028,0011) Columns is {rows} x {cols}")
        if rows * cols > MAX_PIXELS:
            raise ReadError(
                "too_large",
                f"(0028,0010) Rows x (0028,0011) Columns is {rows} x {cols} = {rows * cols} pixels, "
                f"over the limit of {MAX_PIXELS}",
            )
    _number_of_frames(ds)
    ts = _transfer_syntax(ds)
    if ts is not None:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise ReadError(
                "unsupported_transfer_syntax",
                f"(0002,0010) Transfer Syntax UID {_ts_label(ts)} has no pixel data decoder",
            ) from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "no plugin available"
            raise ReadError(
                "unsupported_transfer_syntax",
                f"(0002,0010) Transfer Syntax UID {_ts_label(ts)}: no decoder installed "
                f"({_one_line(missing)})",
            )


def _transfer_syntax(ds: Dataset) -> UID | None:
    file_meta = getattr(ds, "file_meta", None)
    value = _as_str(_element_value(file_meta, "TransferSyntaxUID")) if file_meta else None
    return UID(value) if value else None


def _ts_label(ts: UID) -> str:
    """``"1.2.840.10008.1.2.4.90 (JPEG 2000 Image Compression (Lossless Only))"`` or the bare UID."""
    return f"{ts} ({ts.name})" if ts.name != str(ts) else str(ts)


def _is_deflated(ts: UID | None) -> bool:
    try:
        return ts is not None and ts.is_deflated
    except ValueError:  # not a transfer syntax pydicom knows
        return False


def _is_compressed(ts: UID | None) -> bool:
    try:
        return ts is not None and ts.is_compressed
    except ValueError:
        return True


def _last_element_end(ds: Dataset, file_size: int) -> tuple[int | None, str | None]:
    """Where the last top-level element ends, and a message if it runs past the end of the file.

    pydicom reads a defined-length value with ``fp.read(length)`` and keeps whatever it got,
    and stops without a word when fewer than 8 bytes are left for the next element's tag and
    length, so a file cut inside a value or an element header parses without error. Returns
    ``(None, None)`` when the last element has no usable position (undefined length, already
    converted sequence).
    """
    if not len(ds):
        return None, None
    tag = max(ds.keys())
    raw = ds.get_item(tag)
    length = getattr(raw, "length", None)
    value_tell = getattr(raw, "value_tell", None)
    if length is None or value_tell is None or length == 0xFFFFFFFF:
        return None, None
    end = value_tell + length
    if end > file_size:
        name = keyword_for_tag(tag) or "element"
        return (
            end,
            f"{tag} {name} declares {length} bytes but the file ends after {max(0, file_size - value_tell)}",
        )
    return end, None


def _expected_frame_bytes(ds: Dataset) -> int:
    rows = int(ds.Rows)
    cols = int(ds.Columns)
    bits = int(ds.BitsAllocated)
    return (rows * cols * bits + 7) // 8


def _check_pixel_data(ds: Dataset, warned: list[str], file_size: int) -> None:
    """Raise unless (7FE0,0010) *Pixel Data* is present and (for native data) long enough."""
    truncated = [w for w in warned if _looks_truncated(w)]
    if truncated:
        raise ReadError("truncated", f"file is truncated: {_one_line(truncated[0])}")
    ts = _transfer_syntax(ds)
    # Positions in a deflated data set are in the inflated stream, not the file.
    positions_in_file = not _is_deflated(ts)
    end, short = _last_element_end(ds, file_size) if positions_in_file else (None, None)
    if short:
        raise ReadError("truncated", f"file is truncated: {short}")
    if "PixelData" not in ds:
        if end is not None and 0 < file_size - end < 8:
            raise ReadError(
                "truncated",
                f"file is truncated: it ends {file_size - end} bytes into a data element header "
                "and has no (7FE0,0010) Pixel Data",
            )
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ReadError(
                "unsupported_pixel_data", "(7FE0,0008/0009) Float / Double Float Pixel Data, not a radiograph"
            )
        sop = _as_str(_element_value(ds, "SOPClassUID"))
        if sop is None:
            file_meta = getattr(ds, "file_meta", None)
            sop = _as_str(_element_value(file_meta, "MediaStorageSOPClassUID")) if file_meta else None
        sop_name = UID(sop).name if sop else ""
        what = f" (SOP Class {sop}{f' {sop_name}' if sop_name != sop else ''})" if sop else ""
        if ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_name:
            raise ReadError(
                "truncated",
                f"image object{what} without (7FE0,0010) Pixel Data: the file is probably truncated",
            )
        raise ReadError("no_pixel_data", f"no (7FE0,0010) Pixel Data element{what}: not an image")
    for keyword, tag in (
        ("Rows", "(0028,0010)"),
        ("Columns", "(0028,0011)"),
        ("BitsAllocated", "(0028,0100)"),
    ):
        if _as_int(_element_value(ds, keyword)) is None:
            raise ReadError("corrupt_header", f"{tag} {keyword} is missing or invalid")
    elem = ds["PixelData"]
    compressed = _is_compressed(ts)
    if not compressed and not getattr(elem, "is_undefined_length", False):
        value = ds.PixelData
        expected = _expected_frame_bytes(ds)
        got = len(value) if value is not None else 0
        if got < expected:
            raise ReadError(
                "truncated",
                f"(7FE0,0010) Pixel Data holds {got} bytes, the first frame needs {expected}: "
                "the file is truncated",
            )


def _jpeg_baseline_through_pillow(ds: Dataset) -> np.ndarray | None:
    """The first frame of a grayscale JPEG baseline image decoded by pydicom's Pillow plugin, or None.

    pydicom tries GDCM first; Pillow's libjpeg-turbo gives the same pixels for a valid baseline
    (SOF0) or extended sequential (SOF1) stream (its integer inverse DCT is IJG libjpeg's, bit for
    bit; grayscale has no upsampling), about four times faster. Progressive streams (not allowed
    under this transfer syntax) and anything Pillow cannot decode go to pydicom's default choice,
    as before. (On a corrupt scan both decoders return garbage without an error, and not the same
    garbage: the SIMD inverse DCT saturates out-of-range coefficients its own way.)
    """
    if str(_transfer_syntax(ds) or "") != _JPEG_BASELINE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    try:
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=_number_of_frames(ds)))
        if _jpeg_frame_type(frame) not in (0xC0, 0xC1):
            return None
        return _pixel_array(ds, index=0, decoding_plugin="pillow")
    except Exception:  # noqa: BLE001 - not available or not decodable by Pillow: the default path
        return None


def _jpeg_frame_type(stream: bytes) -> int | None:
    """The second byte of a JPEG stream's start-of-frame marker (0xC0 baseline, 0xC1 extended,
    0xC2 progressive...), found by walking the marker segments before it; None if there is none."""
    if stream[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        pos += 2 + struct.unpack(">H", stream[pos + 2 : pos + 4])[0]
    return None


def decode_first_frame(ds: Dataset) -> np.ndarray:
    """The first frame of (7FE0,0010) *Pixel Data* as stored values, shape (Rows, Columns).

    Uses ``pydicom.pixels.pixel_array(ds, index=0)``, which decodes one frame only, so a
    multi-frame file costs one frame. Raises :class:`~curator.readers.ReadError`
    (``decode_failed`` or ``truncated``).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arr = _jpeg_baseline_through_pillow(ds)
            if arr is None:
                arr = _pixel_array(ds, index=0)
        except MemoryError:
            raise ReadError("too_large", "not enough memory to decode the pixel data") from None
        except Exception as exc:  # decoders raise RuntimeError, ValueError, their own errors...
            kind = "truncated" if _looks_truncated(str(exc)) else "decode_failed"
            ts = _transfer_syntax(ds)
            where = f" ({_ts_label(ts)})" if ts else ""
            raise ReadError(
                kind, f"cannot decode (7FE0,0010) Pixel Data{where}: {type(exc).__name__}: {_one_line(exc)}"
            ) from None
    bad = [str(w.message) for w in caught if _looks_truncated(str(w.message))]
    if bad:
        raise ReadError("truncated", f"pixel data is incomplete: {_one_line(bad[0])}")
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    expected = (int(ds.Rows), int(ds.Columns))
    if arr.shape != expected:
        raise ReadError(
            "decode_failed",
            f"decoded frame has shape {arr.shape}, (0028,0010) Rows x (0028,0011) Columns is {expected}",
        )
    return arr


# --------------------------------------------------------------------------------------------
# Stored values -> 8 bits
# --------------------------------------------------------------------------------------------


def modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT module with ``pydicom.pixels.apply_modality_lut``.

    (0028,3000) *Modality LUT Sequence* when present, else (0028,1053) *Rescale Slope* and
    (0028,1052) *Rescale Intercept* (float64 output), else ``arr`` unchanged. Raises
    :class:`~curator.readers.ReadError` (``invalid_rescale``) if the result is not finite.
    """
    try:
        out = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise ReadError(
            "invalid_modality_lut", f"cannot apply the modality LUT / rescale: {_one_line(exc)}"
        ) from None
    out = np.asarray(out)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise ReadError(
            "invalid_rescale",
            f"(0028,1053) Rescale Slope {ds.get('RescaleSlope')!r} / (0028,1052) Rescale Intercept "
            f"{ds.get('RescaleIntercept')!r} give non-finite values",
        )
    return out


def mimic_normalize(arr: np.ndarray, photometric: str | None) -> np.ndarray:
    """MIMIC-CXR-JPG's 8-bit normalisation of modality values (before equalisation).

    ``x = arr - arr.min()``; ``x = x / x.max()`` (an all-equal image stays all 0);
    ``x = trunc(x * 255)`` as uint8; then, when (0028,0004) *Photometric Interpretation* is
    ``MONOCHROME1`` (low values bright), ``x = 255 - x``. Computed in float64, so signed or
    16-bit input cannot overflow.
    """
    x = np.asarray(arr, dtype=np.float64)
    x = x - x.min()
    peak = x.max()
    if peak > 0:
        x = x / peak
    x = np.trunc(x * 255.0).astype(np.uint8)
    if photometric is not None and str(photometric).strip().upper() == "MONOCHROME1":
        x = 255 - x
    return x


def equalize_hist(img: np.ndarray) -> np.ndarray:
    """Histogram equalisation of an 8-bit image with exactly ``cv2.equalizeHist``'s arithmetic.

    OpenCV (modules/imgproc/src/histogram.cpp): a 256-bin histogram; ``i`` = the first non-empty
    bin; if ``hist[i]`` holds every pixel the output is the constant ``i``. Otherwise
    ``scale = 255.f / (total - hist[i])`` in float32, ``lut[i] = 0`` and for ``j > i`` a running
    sum ``s_j = hist[i+1] + ... + hist[j]`` gives ``lut[j] = saturate_cast<uchar>(s_j * scale)``:
    a float32 product rounded to nearest, ties to even (``cvRound``), clamped to 0..255.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"equalize_hist needs uint8 input, not {img.dtype}")
    if img.size == 0:
        return img.copy()
    return _equalize_table(np.bincount(img.ravel(), minlength=256).astype(np.int64))[img]


def _equalize_table(hist: np.ndarray) -> np.ndarray:
    """:func:`equalize_hist`'s 256-entry lookup table for a 256-bin histogram with pixels in it."""
    total = int(hist.sum())
    first = int(np.flatnonzero(hist)[0])
    if hist[first] == total:
        return np.full(256, first, dtype=np.uint8)  # every pixel is ``first``
    scale = np.float32(255.0) / np.float32(total - hist[first])
    running = np.cumsum(hist) - hist[first]  # s_j for j >= first
    lut = np.rint(running.astype(np.float32) * scale)
    lut[: first + 1] = 0
    return np.clip(lut, 0, 255).astype(np.uint8)


# Widest range of stored integer values (max - min + 1) converted through a table.
_TABLE_MAX_SPAN = 1 << 17


def mimic_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """The ``"mimic"`` conversion of stored values: :func:`modality_lut`, :func:`mimic_normalize`
    (with MONOCHROME1 inversion), :func:`equalize_hist`.

    Every step maps a pixel's stored value to its output on its own, given the image's minimum,
    maximum and histogram, so an integer image (all of them, in practice) is converted through a
    table over its range of stored values: the same float64 arithmetic per distinct value instead
    of per pixel, the same bytes out (tested against the per-pixel chain).
    """
    photometric = _as_str(_element_value(ds, "PhotometricInterpretation"))
    table = _value_table(arr)
    if table is None:
        return equalize_hist(mimic_normalize(modality_lut(arr, ds), photometric))
    return _mimic_through_table(np.asarray(arr), *table, ds, photometric)


def _value_table(arr: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(index, base)`` for converting an integer image through a table whose row ``i`` is the
    stored value ``base + i`` (``index = arr.ravel() - base``, non-negative); None when the image
    is not integer or its values span too wide a range for a table."""
    arr = np.asarray(arr)
    if not arr.size:
        return None
    if arr.dtype in (np.uint8, np.uint16):
        return arr.ravel(), 0  # indexes the table directly: no min/max passes, no copy
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 4:
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < _TABLE_MAX_SPAN:
            return np.subtract(arr.ravel(), lo, dtype=np.int64), lo
    return None


def _held_values(arr: np.ndarray, index: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(counts, present, held)`` for a table over stored values ``base + i``: pixels per value,
    which values the image holds, and those values in the image's own dtype."""
    counts = np.bincount(index)
    present = counts > 0
    return counts, present, np.arange(base, base + len(counts), dtype=arr.dtype)[present]


def _mimic_through_table(arr: np.ndarray, index: np.ndarray, base: int, ds: Dataset, photometric: str | None) -> np.ndarray:
    """The mimic conversion of ``arr`` through a table whose row ``i`` is stored value ``base + i``;
    ``index`` is ``arr.ravel() - base`` (non-negative)."""
    counts, present, held = _held_values(arr, index, base)
    # The values the image holds through the same per-pixel functions: pydicom's modality LUT is
    # element-wise, and mimic_normalize's minimum and maximum are those of the held values.
    held_out = mimic_normalize(modality_lut(held, ds), photometric)
    table = np.zeros(len(counts), dtype=np.uint8)
    table[present] = held_out
    hist = np.bincount(held_out, weights=counts[present], minlength=256).astype(np.int64)
    return _equalize_table(hist)[table][index].reshape(arr.shape)


def voi_lut_table(ds: Dataset, index: int = 0) -> tuple[int, int, np.ndarray] | None:
    """``(first_mapped, bits, data)`` of item ``index`` of (0028,3010) *VOI LUT Sequence*.

    From (0028,3002) *LUT Descriptor* (number of entries, 0 meaning 65536; first stored value
    mapped; bits per entry) and (0028,3006) *LUT Data* (US values, or OW bytes in the data
    set's byte order; 8-bit entries packed one per byte are accepted too). None when the
    sequence, the descriptor or the data is missing.
    """
    seq = _element_value(ds, "VOILUTSequence")
    if not seq or len(seq) <= index:
        return None
    item = seq[index]
    descriptor = _element_value(item, "LUTDescriptor")
    if descriptor is None or "LUTData" not in item:
        return None
    descriptor = list(descriptor) if isinstance(descriptor, (MultiValue, list, tuple)) else [descriptor]
    if len(descriptor) != 3:
        return None
    n = int(descriptor[0]) or 65536
    first = int(descriptor[1])
    bits = int(descriptor[2])
    value = item["LUTData"].value
    if isinstance(value, (bytes, bytearray)):
        if bits <= 8 and len(value) == n:
            data = np.frombuffer(value, dtype=np.uint8)
        else:
            little = True
            file_meta = getattr(ds, "file_meta", None)
            ts = _transfer_syntax(ds)
            if ts is not None and file_meta is not None:
                little = ts != ExplicitVRBigEndian
            elif getattr(ds, "original_encoding", None):
                little = bool(ds.original_encoding[1])
            data = np.frombuffer(value, dtype="<u2" if little else ">u2")
    elif isinstance(value, (MultiValue, list, tuple)):
        data = np.asarray([int(v) for v in value], dtype=np.int64)
    elif value is None:
        return None
    else:
        data = np.asarray([int(value)], dtype=np.int64)
    if data.size < n:
        if data.size == 0:
            return None
        n = data.size  # tolerate a LUT shorter than its descriptor says
    return first, bits, data[:n].astype(np.int64)


def apply_voi_lut_table(values: np.ndarray, first_mapped: int, data: np.ndarray) -> np.ndarray:
    """Map modality values through a VOI LUT: ``data[clip(v - first_mapped, 0, len(data)-1)]``.

    Values below the first mapped value take the first entry, values past the end the last
    (PS3.3 C.11.2.1.1). Non-integer input (after a rescale) is rounded half up first.
    A first-mapped value read as unsigned 16-bit (>= 32768) is taken as signed when the input
    has negative values. (We do this ourselves: pydicom 3.0's ``apply_voi`` builds its index
    array in the LUT's own dtype, so an 8-bit LUT with more than 256 entries wraps around.)
    """
    v = np.asarray(values)
    if v.dtype.kind == "f":
        v = np.floor(v + 0.5)
    v = v.astype(np.int64)
    if first_mapped >= 32768 and v.size and v.min() < 0:
        first_mapped -= 65536
    idx = np.clip(v - first_mapped, 0, len(data) - 1)
    return np.asarray(data)[idx]


def window_output_range(ds: Dataset) -> tuple[float, float]:
    """The output range ``(y_min, y_max)`` pydicom's ``apply_windowing`` maps a window onto.

    The stored-value range: 0 .. 2**(bits of the Modality LUT entries) - 1 when (0028,3000)
    *Modality LUT Sequence* is present; else by (0028,0101) *Bits Stored* and (0028,0103)
    *Pixel Representation*: 0 .. 2**BitsStored - 1 unsigned, -2**(BitsStored-1) ..
    2**(BitsStored-1) - 1 signed; then, when (0028,1053) *Rescale Slope* and (0028,1052)
    *Rescale Intercept* are present, both ends rescaled. Windowed values below the window are
    ``y_min``, above it ``y_max``.
    """
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        bits_stored = int(ds.BitsStored)
        if int(ds.get("PixelRepresentation", 0) or 0) == 0:
            y_min, y_max = 0.0, float(2**bits_stored - 1)
        else:
            y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            y_min = y_min * float(slope) + float(intercept)
            y_max = y_max * float(slope) + float(intercept)
    return y_min, y_max


def _scale_to_uint8(y: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of ``lo..hi`` onto 0..255 (``lo`` -> 0, also when ``hi < lo``), rounded half
    up, clamped; all 0 when lo == hi."""
    y = np.asarray(y, dtype=np.float64)
    if hi == lo:
        return np.zeros(y.shape, dtype=np.uint8)
    out = np.floor((y - lo) / (hi - lo) * 255.0 + 0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def _has_window(ds: Dataset) -> bool:
    center = _element_value(ds, "WindowCenter")
    width = _element_value(ds, "WindowWidth")
    return center not in (None, "") and width not in (None, "")


def voi_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """The ``"voi"`` conversion of stored values (the standard display pipeline) to uint8.

    1. :func:`modality_lut`.
    2. VOI, first item / first value: (0028,3010) *VOI LUT Sequence* if present (it takes
       precedence, as in ``pydicom.pixels.apply_voi_lut``), mapped with
       :func:`apply_voi_lut_table`; its output range is 0 .. 2**bits - 1 with ``bits`` the third
       (0028,3002) *LUT Descriptor* value (widened to the bit length of the largest entry when an
       entry exceeds it). Else (0028,1050) *Window Center* / (0028,1051) *Window Width* (with
       (0028,1056) *VOI LUT Function*) through ``pydicom.pixels.apply_voi_lut``, output range
       :func:`window_output_range`; a window pydicom refuses (e.g. width < 1 for LINEAR) is
       ignored. Else min-max over the image.
    3. The output range mapped linearly onto 0..255, rounded half up (``floor(v + 0.5)``).
    4. (0028,0004) *Photometric Interpretation* MONOCHROME1: ``255 - x`` (pydicom's LUT
       functions do not invert).

    Each step maps a stored value on its own given the image's extremes, so an integer image is
    converted as the 1-D array of its distinct values, then one table lookup per pixel.
    """
    table = _value_table(arr)
    if table is None:
        return _voi_per_value(arr, ds)
    _, present, held = _held_values(np.asarray(arr), *table)
    out = np.zeros(len(present), dtype=np.uint8)
    out[present] = _voi_per_value(held, ds)
    return out[table[0]].reshape(np.shape(arr))


def _voi_per_value(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """:func:`voi_to_uint8` computed element by element (any shape)."""
    values = modality_lut(arr, ds)
    out: np.ndarray | None = None
    table = voi_lut_table(ds)
    if table is not None:
        first, bits, data = table
        y = apply_voi_lut_table(values, first, data)
        top = 2**bits - 1
        peak = int(data.max()) if data.size else 0
        if peak > top:
            top = 2 ** peak.bit_length() - 1
        out = _scale_to_uint8(y, 0.0, float(top))
    elif _has_window(ds):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = apply_voi_lut(values, ds, index=0, prefer_lut=False)
            # Below the window pydicom gives y_min, above it y_max, so (y - y_min) / (y_max -
            # y_min) runs 0..1 across the window even when a negative rescale slope makes
            # y_max < y_min.
            y_min, y_max = window_output_range(ds)
            out = _scale_to_uint8(y, y_min, y_max)
        except (ValueError, TypeError, AttributeError, IndexError):
            out = None
    if out is None:
        v = np.asarray(values, dtype=np.float64)
        out = _scale_to_uint8(v, float(v.min()), float(v.max()))
    photometric = _as_str(_element_value(ds, "PhotometricInterpretation"))
    if photometric is not None and photometric.upper() == "MONOCHROME1":
        out = 255 - out
    return out


def convert_to_uint8(arr: np.ndarray, ds: Dataset, conversion: str = "mimic") -> np.ndarray:
    """Stored pixel values to 8 bits by ``conversion`` (``"mimic"`` or ``"voi"``)."""
    if conversion == "mimic":
        return mimic_to_uint8(arr, ds)
    if conversion == "voi":
        return voi_to_uint8(arr, ds)
    raise ValueError(
        f"unknown DICOM conversion {conversion!r}; expected one of {', '.join(DICOM_CONVERSIONS)}"
    )


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


def read_dicom(path: str | Path, options: ReadOptions | None = None, data: bytes | None = None) -> ReadResult:
    """Read a DICOM radiograph as an 8-bit grayscale PIL image plus catalog metadata.

    Returns ``ReadResult(image=<mode "L">, conversion=options.dicom_conversion,
    file_format="dicom", meta=<META_KEYS dict>)`` or raises
    :class:`~curator.readers.ReadError`: ``not_dicom``, ``corrupt_header``, ``truncated``,
    ``dicomdir``, ``modality_filtered`` (stage ``"filter"``), ``not_grayscale``,
    ``unsupported_photometric``, ``empty_image``, ``too_large``, ``multi_frame_invalid``,
    ``unsupported_transfer_syntax``, ``no_pixel_data``, ``unsupported_pixel_data``,
    ``decode_failed``, ``invalid_rescale``... An unknown ``options.dicom_conversion`` raises
    ValueError. Only the first frame of a multi-frame image is used. ``data``, when given, is
    the file's content already read by the caller (``path`` then only names it).
    """
    options = options or ReadOptions()
    conversion = options.dicom_conversion
    if conversion not in DICOM_CONVERSIONS:
        raise ValueError(
            f"unknown DICOM conversion {conversion!r}; expected one of {', '.join(DICOM_CONVERSIONS)}"
        )
    path = Path(path)
    if path.name.upper() == "DICOMDIR":
        raise _dicomdir_error()
    header = read_header(path, data)
    _check_header(path, header, options)
    meta = metadata_from_dataset(header)

    ds, warned = _dcmread(path, stop_before_pixels=False, data=data)
    _check_pixel_data(ds, warned, _file_size(path, data))
    reduced = reduced_first_frame(ds, options.jpeg_draft_min_side) if options.jpeg_draft_min_side else None
    if reduced is not None:
        frame, how = reduced
        label = f"{conversion}+{how}"
    else:
        frame, label = decode_first_frame(ds), conversion
    pixels = convert_to_uint8(frame, ds, conversion)
    image = Image.fromarray(np.ascontiguousarray(pixels))  # uint8 2-D -> mode "L"
    meta["number_of_frames"] = _number_of_frames(ds)
    meta["frame_used"] = 0
    return ReadResult(image=image, conversion=label, file_format="dicom", meta=meta)


# --------------------------------------------------------------------------------------------
# Opt-in reduced decoding (ReadOptions.jpeg_draft_min_side, `curator embed --fast-jpeg`)
# --------------------------------------------------------------------------------------------

_J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})  # JPEG 2000 lossless / lossy
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _j2k_main_header(codestream: bytes) -> dict | None:
    """The fields of a JPEG 2000 codestream's SIZ and COD markers that the reduced decode needs
    (ISO/IEC 15444-1 A.5.1, A.6.1), or None when it is not a bare codestream or they are missing."""
    if codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 45:
        return None
    width, height, x0, y0 = struct.unpack(">IIII", codestream[8:24])
    siz = {
        "width": width - x0, "height": height - y0, "offset": (x0, y0),
        "components": struct.unpack(">H", codestream[40:42])[0],
        "signed": bool(codestream[42] & 0x80), "precision": (codestream[42] & 0x7F) + 1,
        "subsampling": (codestream[43], codestream[44]),
    }
    pos = 4 + struct.unpack(">H", codestream[4:6])[0]  # past SIZ
    while pos + 4 <= len(codestream) and codestream[pos] == 0xFF:
        marker = codestream[pos + 1]
        length = struct.unpack(">H", codestream[pos + 2 : pos + 4])[0]
        if marker == 0x52:  # COD: Lcod, Scod, SGcod (4 bytes), then the number of decomposition levels
            return {**siz, "levels": codestream[pos + 9]} if pos + 9 < len(codestream) else None
        if marker == 0x90:  # first tile-part: no COD in the main header
            return None
        pos += 2 + length
    return None


def _j2k_levels_down(rows: int, cols: int, min_side: int, levels: int) -> int:
    """How many resolution levels to drop: the most that keep both sides >= ``min_side`` and on
    which OpenJPEG's reduced size (``ceil(n / 2**r)``) and Pillow's (``n / 2**r`` rounded half up)
    agree; where they differ Pillow refuses the image, and a level less still helps."""
    best = 0
    for r in range(1, levels + 1):
        sides = [(n + (1 << r) - 1) >> r for n in (rows, cols)]
        if min(sides) < min_side:
            break
        if all(c == (n + (1 << (r - 1))) >> r for c, n in zip(sides, (rows, cols))):
            best = r
    return best


def reduced_first_frame(ds: Dataset, min_side: int) -> tuple[np.ndarray, str] | None:
    """The first frame decoded at a reduced size, for a JPEG 2000 or JPEG baseline compressed
    grayscale image whose shorter side is at least ``2 * min_side``; else None (decode exactly).

    JPEG 2000: the codestream's lower resolution levels only (its wavelet low-pass image at
    1/2**r), with the largest ``r`` that keeps both sides >= ``min_side``; JPEG baseline: the
    DCT-domain scaling of ``--fast-jpeg`` files. Both through Pillow (OpenJPEG, libjpeg). The
    stored values keep their range, so the modality LUT and the 8-bit conversion apply as usual.
    Not CheXzero-exact. The codestream must agree with the header (size, one unsigned component,
    no image offset or subsampling; 8 bits for JPEG) and the decoded frame must have exactly the
    reduced size; anything else (signed or colour data, a JP2 wrapper, a decoder error) gives None
    and the exact path, which reports what is wrong with the file.
    """
    try:
        ts = str(_transfer_syntax(ds) or "")
        if ts not in _J2K_SYNTAXES and ts != _JPEG_BASELINE:
            return None
        rows, cols = int(ds.Rows), int(ds.Columns)
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0) or 0) != 0:
            return None
        if min(rows, cols) < 2 * min_side:
            return None
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=_number_of_frames(ds)))
        if ts in _J2K_SYNTAXES:
            h = _j2k_main_header(frame)
            if (h is None or h["components"] != 1 or h["signed"] or h["precision"] > 16 or (h["width"], h["height"]) != (cols, rows)
                    or h["offset"] != (0, 0) or h["subsampling"] != (1, 1)):
                return None
            r = _j2k_levels_down(rows, cols, min_side, h["levels"])
            if r == 0:
                return None
            with Image.open(io.BytesIO(frame)) as im:
                im.reduce = r
                im.load()
                arr = np.asarray(im)
            # Pillow widens samples to its mode's bits (16 for "I;16", 8 for "L"); back to the stored range.
            bits = 16 if arr.dtype == np.uint16 else 8
            if h["precision"] < bits:
                arr = arr >> (bits - h["precision"])
            how, expected = f"j2k/{1 << r}", tuple((n + (1 << r) - 1) >> r for n in (rows, cols))
        else:
            if int(ds.get("BitsAllocated", 8) or 8) != 8 or int(ds.get("BitsStored", 8) or 8) != 8:
                return None
            with Image.open(io.BytesIO(frame)) as im:
                if im.mode != "L" or im.size != (cols, rows) or im.format != "JPEG" or im.info.get("progressive"):
                    return None
                im.draft("L", (min_side, min_side))
                im.load()
                arr = np.asarray(im)
            scale = next((f for f in (2, 4, 8) if arr.shape == ((rows + f - 1) // f, (cols + f - 1) // f)), None)
            if scale is None:
                return None
            how, expected = f"dct/{scale}", arr.shape
        if arr.ndim != 2 or arr.shape != expected or min(arr.shape) < min_side:
            return None
        return arr, how
    except Exception:  # noqa: BLE001 - any surprise: the exact path decodes (and reports errors)
        return None
