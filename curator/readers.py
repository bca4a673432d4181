"""Files to 8-bit images: dispatch by content, PNG/JPEG read exactly as CheXzero reads them.

CheXzero reads PNG/JPEG with ``cv2.imread(path)``: 8-bit, three channels in BGR order (a 16-bit
PNG keeps its high byte, ``v >> 8``), then hands the array to PIL as if it were RGB. We read with
PIL and reproduce that: grey files stay single-channel (PIL's Lanczos resize and the luma
conversion at the paste give the same values for three equal channels), colour files have their
channels reversed so that the luma weights fall where CheXzero's did.

DICOM files go to :mod:`curator.dicom`. Anything else raises :class:`ReadError` with a reason.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from curator import constants as C

# A decoded image larger than this is refused before its pixels are allocated.
MAX_PIXELS = 16384 * 16384 // 2

RASTER_CONVERSION = "raster"  # PNG/JPEG read as CheXzero reads them
DICOM_CONVERSIONS = ("mimic", "voi")  # MIMIC-CXR-JPG recipe (default) / VOI LUT or window


def unreadable(exc: OSError) -> "ReadError":
    """The error of a file whose bytes cannot be read (an I/O error, no permission): the machine's
    reason, not the file's, and without its path (messages may be shown where paths are not)."""
    return ReadError("unreadable", f"{type(exc).__name__}: {exc.strerror or 'cannot read the file'}")


class ReadError(Exception):
    """A file that cannot become an image for the model. ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str, stage: str = "read"):
        super().__init__(message)
        self.kind = kind
        self.stage = stage


@dataclass
class ReadOptions:
    """How files become 8-bit images."""

    dicom_conversion: str = "mimic"
    # Modalities accepted from DICOM headers; None accepts any. Files of other modalities are
    # recorded as errors with stage "filter".
    modalities: frozenset[str] | None = C.DEFAULT_MODALITIES
    # Per-file limit on reading + decoding (seconds); a file over it is recorded as an error.
    # Enforced with SIGALRM in the reading process's main thread (a decoder stuck inside C code
    # is interrupted when it returns to Python). None: no limit.
    decode_timeout_s: float | None = 60.0
    # Opt-in fast path for JPEG files and JPEG baseline DICOMs: let libjpeg decode at 1/2, 1/4 or
    # 1/8 scale in the DCT domain (PIL's draft mode); for JPEG 2000 DICOMs, decode only the
    # codestream's lower resolution levels (curator.dicom.reduced_first_frame). Each the largest
    # reduction that still leaves both sides >= this many pixels (the 320 letterbox canvas). Much
    # faster on full-size films; NOT CheXzero-exact (the probabilities move slightly, see
    # benchmarks/README.md). None: exact decode (default).
    jpeg_draft_min_side: int | None = None
    # Opt-in: hand grayscale JPEG files over undecoded, to be decoded and letterboxed on the
    # model's device (curator.device_jpeg; `curator embed --gpu-jpeg`): the local engine's main
    # process, or the Ray engine's model actors.
    jpeg_on_device: bool = False
    # ... except these paths: a run stopped (crashed) while the device decoded them, so the
    # reader workers, whose crashes are recorded per file, read them this time.
    device_skip: frozenset[str] = frozenset()
    # ... and a share of them the reader workers decode themselves (the exact way, or reduced with
    # jpeg_draft_min_side), beside the device: a shared float in [0, 1] (``.value``; pipelines.embed.WorkerShare adapts it during
    # the run, the workers read it per file). None: none.
    device_share: object | None = field(default=None, compare=False, repr=False)
    # Opt-in: the reader workers decode (and convert) as usual but hand grayscale images over
    # before the letterbox, which runs on the model's device with Pillow's arithmetic to the bit
    # (curator.device_jpeg.letterbox_all; `curator embed --gpu-letterbox`): the local engine's
    # main process, or the Ray engine's model actors.
    # decode_timeout_s then covers reading and decoding, not the letterbox.
    letterbox_on_device: bool = False


@dataclass
class ReadResult:
    image: Image.Image  # mode "L" or "RGB", 8 bits per channel
    conversion: str
    file_format: str  # "dicom" | "png" | "jpeg"
    meta: dict = field(default_factory=dict)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff(path: str | Path, head: bytes | None = None) -> str | None:
    """``"dicom"``, ``"png"``, ``"jpeg"`` from the file's first bytes, or None."""
    if head is None:
        with open(path, "rb") as f:
            head = f.read(132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def raster_to_chexzero(im: Image.Image) -> Image.Image:
    """An opened PIL image as the 8-bit image CheXzero's ``cv2.imread`` + ``fromarray`` gives."""
    mode = im.mode
    if mode == "L":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im)
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise ReadError("unsupported_image", f"signed {mode} image with negative values")
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    if mode == "1":
        return im.convert("L")
    if mode == "LA":
        return im.getchannel("L")
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        mode = im.mode
    if mode in ("RGBA", "RGBX", "RGB"):
        arr = np.asarray(im)[..., :3]
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return Image.fromarray(np.ascontiguousarray(arr[..., 0]), mode="L")
        # cv2 hands BGR to PIL, which takes it for RGB.
        return Image.fromarray(np.ascontiguousarray(arr[..., ::-1]), mode="RGB")
    if mode == "CMYK" or mode == "YCbCr":
        return raster_to_chexzero(im.convert("RGB"))
    raise ReadError("unsupported_image", f"unsupported image mode {mode!r}")


# EXIF orientation (tag 274) -> the transpose that shows the image as its camera meant: cv2.imread,
# CheXzero's reader, applies it to JPEG files (OpenCV >= 3.1) and to PNG files with an eXIf chunk
# (OpenCV >= 4.5.2 with libpng >= 1.6.31).
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                   5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1 to 8; 1, upright, when absent, unreadable or out of range)."""
    try:
        value = im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is ignored, as OpenCV ignores it
        return 1
    return value if isinstance(value, int) and value in _EXIF_TRANSPOSE else 1


def read_raster(path: str | Path, file_format: str, data: bytes | None = None, draft_min_side: int | None = None) -> ReadResult:
    conversion = RASTER_CONVERSION
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ReadError("too_large", f"{w}x{h} pixels exceeds the limit of {MAX_PIXELS}")
            if draft_min_side and file_format == "jpeg" and min(w, h) >= 2 * draft_min_side:
                im.draft(im.mode, (draft_min_side, draft_min_side))
                if im.size != (w, h):
                    conversion = f"{RASTER_CONVERSION}+dct/{round(w / im.size[0])}"
            im.load()
            image = raster_to_chexzero(im)
            orientation = exif_orientation(im)
            if orientation != 1:  # (a permutation of the pixels: the same before or after the conversion)
                image = image.transpose(_EXIF_TRANSPOSE[orientation])
    except ReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ReadError("too_large", str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ReadError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    meta = {"rows": h, "columns": w}  # the file's size, also when decoded reduced
    return ReadResult(image=image, conversion=conversion, file_format=file_format, meta=meta)


def read_image(path: str | Path, options: ReadOptions | None = None, data: bytes | None = None) -> ReadResult:
    """Read any supported file as an 8-bit image plus catalog metadata, or raise :class:`ReadError`.

    ``data``, when given, is the file's content already read by the caller (PNG/JPEG are then
    decoded from memory).
    """
    options = options or ReadOptions()
    p = Path(path)
    try:
        if p.is_dir():
            raise ReadError("not_a_file", "is a directory")
        size = len(data) if data is not None else p.stat().st_size
        if size == 0:
            raise ReadError("empty_file", "zero-byte file")
        kind = sniff(p, data[:132] if data is not None else None)
    except FileNotFoundError:
        raise ReadError("vanished", "no such file") from None
    except PermissionError:  # (the message names the problem, not the file: it may be shown where paths are not)
        raise ReadError("unreadable", "permission denied") from None
    except OSError as exc:
        raise unreadable(exc) from None
    if kind == "dicom" or (kind is None and p.suffix.lower() in (".dcm", ".dicom")):
        from curator import dicom

        return dicom.read_dicom(p, options, data=data)
    if kind in ("png", "jpeg"):
        return read_raster(p, kind, data, options.jpeg_draft_min_side)
    raise ReadError("not_an_image", "not a DICOM, PNG or JPEG file (unrecognised content)")


class DecodeTimeout(BaseException):
    """A file over the per-file time limit (a BaseException, so decoders' ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`DecodeTimeout` in the block after ``seconds`` (main thread only; else no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise DecodeTimeout(f"reading took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
