"""Opt-in (``curator embed --gpu-jpeg``): decode grayscale JPEG files and letterbox them on the model's device.

On a GPU node the CPU cores decoding full-size films are the limit, not the model. With this
option the reader workers hand over a grayscale JPEG file's bytes instead of its decoded image;
the main process decodes each model batch at once with torchvision's ``decode_jpeg`` on the
device the first checkpoint runs on (nvJPEG on a CUDA device, libjpeg-turbo on the CPU) and
letterboxes every image there.

The letterbox reproduces Pillow's Lanczos resize to the bit: Pillow computes the filter
coefficients of each output pixel in double precision, normalises them, turns them into 22-bit
fixed point, and resizes in two passes (horizontal, then vertical, the order curator's exact
letterbox keeps), each sum rounded and clipped to 8 bits.
:func:`resample_matrix` builds the same integer coefficients as a matrix, and each pass is a
float64 product with it (banded: each block of outputs reads only its span of inputs) whose sums
are integers below 2**53, so exact whatever the summation order. The 320 canvas is therefore
CheXzero's whenever the decoder returns Pillow's pixels: libjpeg-turbo does (tests compare
canvases and probabilities with the exact path); nvJPEG's inverse DCT may differ from libjpeg-turbo's by a grey level at some pixels, which
``benchmarks/gpu_jpeg.py`` measures on a GPU.

Only single-component 8-bit JPEG files take this path (chest films are grey); colour JPEGs,
DICOMs and PNGs are read by the workers as usual, and a file the device decoder rejects is read
again by the exact path, so its error (or image) is the same as without the option.

Limits: the decoding happens in the main process, so a file that crashes the decoder itself (a
segfault in nvJPEG or libjpeg-turbo) ends the run instead of being recorded as
``decoder_crashed`` as the reader workers' crashes are (the run leaves a note of the files in
hand, and the next run has the reader workers read those); the resize runs in float64 (about 0.5
GFLOP per film), fast on data-centre GPUs (A100, H100, H200), slower on cards with slow float64
(most consumer and inference cards); each film needs about twice its size in float64 on the device
while it is resized (the gathered spans), which is why JPEGs go in groups of bounded pixels and
stacks of same-sized films stay under ``STACK_VALUES``. Measured on an H200 (benchmarks/README.md):
nvJPEG decodes ~5 gigapixels/s (~1,000 films of 2000x2500 a second) and is the stage's limit;
the stacked letterbox runs at ~10,000 such films a second.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings

import numpy as np
import torch

from curator import constants as C
from curator.preprocess import DEFAULT_CFG, PreprocessCfg, letterbox_size, normalize, resize_to_input

log = logging.getLogger(__name__)

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2
LANCZOS_SUPPORT = 3.0


def _sinc(x: np.ndarray) -> np.ndarray:
    """sin(pi x) / (pi x) as Pillow computes it: ``x = x * M_PI; sin(x) / x``, 1 at 0."""
    y = x * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(y) / y)


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Pillow's truncated Lanczos-3 kernel (non-zero on [-3, 3))."""
    return np.where((x >= -LANCZOS_SUPPORT) & (x < LANCZOS_SUPPORT), _sinc(x) * _sinc(x / LANCZOS_SUPPORT), 0.0)


def resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's Lanczos coefficients from ``in_size`` to ``out_size`` pixels, as an int64 (out, in) matrix.

    Entry (o, i) is the fixed-point weight (scaled by 2**22) of input pixel i in output pixel o,
    computed as Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` do for a resize of
    the whole image (box = (0, in_size)).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) casts truncate toward zero; the values are clipped to [0, in_size] right after.
    xmin = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    live = taps[None, :] < xmax[:, None]
    w = np.where(live, _lanczos((taps[None, :] + xmin[:, None] - centers[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.cumsum(w, axis=1)[:, -1]  # Pillow's sum runs left to right; cumsum does too (np.sum would not)
    w = np.divide(w, total[:, None], out=w.copy(), where=total[:, None] != 0.0)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    out = np.zeros((out_size, in_size), dtype=np.int64)
    cols = xmin[:, None] + taps[None, :]
    rows = np.broadcast_to(np.arange(out_size)[:, None], cols.shape)
    out[rows[live], cols[live]] = fixed[live]
    return out


BLOCK = 32  # output pixels per block of the banded products


def _place(device: torch.device) -> str:
    """:func:`_banded`'s cache key for ``device``: on CUDA with the current stream, so that a cached
    tensor is used (and, once evicted, freed) only on the stream that made it (pipelines.embed runs
    the device stage on a stream of its own beside the model)."""
    if device.type == "cuda":
        return f"{device}#{torch.cuda.current_stream(device).stream_id}"
    return str(device)


@functools.lru_cache(maxsize=64)
def _banded(in_size: int, out_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resample_matrix` cut into blocks of ``BLOCK`` output pixels, each with the input span it reads.

    Returns ``index`` (blocks, span) of input pixels (clipped to the image; a clipped or unused
    position has weight 0) and ``weights`` (blocks, span, BLOCK), float64. A pass is then one
    batched product over ``span`` inputs per output instead of all ``in_size`` of them: for a
    film to 320 that is ~7x fewer operations than the dense matrix, with the same integer sums.
    """
    m = resample_matrix(in_size, out_size)
    blocks = -(-out_size // BLOCK)
    m = np.vstack([m, np.zeros((blocks * BLOCK - out_size, in_size), np.int64)])  # padded outputs: all weights 0
    used = (m != 0).reshape(blocks, BLOCK, in_size).any(axis=1)  # (blocks, in_size): inputs each block reads
    first = used.argmax(axis=1)
    span = int((in_size - used[:, ::-1].argmax(axis=1) - first).max())
    index = np.minimum(first[:, None] + np.arange(span)[None, :], in_size - 1)
    weights = np.zeros((blocks, span, BLOCK), np.float64)
    for b in range(blocks):
        n = min(span, in_size - first[b])
        weights[b, :n] = m[b * BLOCK : (b + 1) * BLOCK, first[b] : first[b] + n].T
    device = device.split("#")[0]  # (the stream, if any, is part of the cache key only: _place)
    return torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device)


def _clip8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8`` of ``1 << 21`` plus the weighted sums: floor(s / 2**22) clamped to 0..255."""
    return torch.floor((sums + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)).clamp_(0, 255)


def resize_like_pillow(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An (..., H, W) uint8 image (or stack of same-sized images) resized to (..., height, width) as
    Pillow's ``resize(..., LANCZOS)`` on mode L did before version 12.2 (and curator's exact
    letterbox does on any version, see :func:`curator.preprocess.letterbox`): the horizontal pass
    first, each pass rounded to 8 bits."""
    *lead, h, w = image.shape
    dev = _place(image.device)
    x = image.to(torch.float64)
    if width != w:  # Pillow's need_horizontal
        index, weights = _banded(w, width, dev)
        x = _clip8(torch.einsum("...hbs,bso->...hbo", x[..., index], weights).reshape(*lead, h, -1)[..., :width])
    if height != h:
        index, weights = _banded(h, height, dev)
        x = _clip8(torch.einsum("...bsw,bso->...bow", x[..., index, :], weights).reshape(*lead, -1, x.shape[-1])[..., :height, :])
    return x.to(torch.uint8)


def letterbox(image: torch.Tensor, size: int = C.CANVAS_SIZE) -> torch.Tensor:
    """:func:`curator.preprocess.letterbox` for an (H, W) uint8 tensor, or an (N, H, W) stack of
    same-sized images, on the tensor's device."""
    *lead, h, w = image.shape
    nw, nh = letterbox_size(w, h, size)
    resized = image if (nw, nh) == (w, h) else resize_like_pillow(image, nw, nh)
    canvas = torch.zeros((*lead, size, size), dtype=torch.uint8, device=image.device)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[..., top : top + nh, left : left + nw] = resized
    return canvas


STACK_VALUES = 1 << 27  # float64 values the first pass of one stacked resize may gather (1 GiB): ~22 films of 2000x2500


def letterbox_all(images: list[torch.Tensor], size: int = C.CANVAS_SIZE, stack: bool | None = None) -> torch.Tensor:
    """(N, size, size) canvases of (H, W) uint8 images on one device, in order.

    With ``stack`` (default: on a CUDA device) images of one size are letterboxed as stacks, one
    product per pass for many films instead of a dozen small kernels per film (an archive's films
    come in a few sizes), each stack small enough that its gathered float64 spans stay within
    ``STACK_VALUES``. On a CPU film by film is faster (a film's spans stay in cache).
    """
    if not images:
        return torch.zeros((0, size, size), dtype=torch.uint8)
    if not (images[0].device.type == "cuda" if stack is None else stack):
        return torch.stack([letterbox(im, size) for im in images])
    out = torch.empty((len(images), size, size), dtype=torch.uint8, device=images[0].device)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    for (h, w), idx in by_shape.items():
        nw, _ = letterbox_size(w, h, size)
        span = _banded(w, nw, _place(images[idx[0]].device))[0].numel() if nw != w else w
        per_stack = max(1, STACK_VALUES // (h * span))
        for k in range(0, len(idx), per_stack):
            part = idx[k : k + per_stack]
            out[part] = letterbox(torch.stack([images[i] for i in part]), size)
    return out


def letterbox_fits(width: int, height: int, size: int = C.CANVAS_SIZE) -> bool:
    """Whether the letterbox leaves both sides at least one pixel (otherwise the exact path reports the error)."""
    return min(letterbox_size(width, height, size)) >= 1


def deferrable(data: bytes) -> tuple[int, int] | None:
    """(width, height) if this file's content can go to the device decoder, else None.

    Reads the JPEG header only (Pillow opens lazily): an 8-bit single-component JPEG within the
    reader's pixel limit, whose letterbox is not degenerate, ending in an end-of-image marker (a
    truncated file goes to the exact path, which reports it as the exact path always has), without
    an EXIF orientation to apply (nvJPEG ignores it; the exact path turns the image).
    """
    from PIL import Image

    from curator.readers import JPEG_MAGIC, MAX_PIXELS, exif_orientation

    if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            if im.mode != "L" or exif_orientation(im) != 1:
                return None
            w, h = im.size
    except Exception:  # whatever is wrong with it, the exact path reports it
        return None
    if w * h > MAX_PIXELS or not letterbox_fits(w, h):
        return None
    return w, h


_warned: list[bool] = []  # a batch-level decoder failure was reported (once per process)


def decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(H, W) uint8 images on ``device`` from JPEG bytes (1-D uint8 CPU tensors); None where decoding failed.

    The whole list goes to the decoder at once (nvJPEG decodes a batch faster than one by one);
    if that fails, each file is decoded alone to find the bad ones.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(x):
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec); they
            # are what this option is built on while the dependency stays capped at 0.29.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(x, mode=ImageReadMode.GRAY, device=device)

    if not blobs:
        return []
    if device.type == "cuda":  # nvJPEG's batched decode may not wait for work queued before it (pytorch/vision#9606)
        torch.cuda.current_stream(device).synchronize()
    try:
        images = run(list(blobs))
    except Exception as exc:  # (RuntimeError from either decoder; whatever it is, each file gets its own try)
        if not _warned:
            _warned.append(True)
            log.warning("the JPEG decoder on %s failed on a batch (%s: %s); its files are decoded one by one, and those it "
                        "rejects are read on the CPU (said once)", device, type(exc).__name__, str(exc).splitlines()[0][:200])
        images = []
        for b in blobs:
            try:
                images.append(run(b))
            except Exception:
                images.append(None)
    return [None if im is None else im[0] for im in images]


def model_inputs(images: list[torch.Tensor], cfg: PreprocessCfg = DEFAULT_CFG) -> torch.Tensor:
    """The CheXzero transform of decoded (H, W) uint8 images: (N, 3, 224, 224) float32 on their device."""
    canvases = letterbox_all(images, cfg.canvas_size).to(torch.float32)
    return resize_to_input(normalize(canvases.unsqueeze(1).expand(-1, 3, -1, -1), cfg), cfg)
