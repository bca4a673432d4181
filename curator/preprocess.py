"""CheXzero's image preprocessing, step by step.

The published model saw images prepared by CheXzero's ``preprocess`` (letterbox onto a 320x320
canvas) followed by its dataset transform (normalise, then resize to 224 without antialiasing).
Each step is a small function so it can be checked on its own; :func:`model_input` composes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from curator import constants as C


@dataclass(frozen=True)
class PreprocessCfg:
    """Settings of the CheXzero transform (the defaults are the published model's)."""

    canvas_size: int = C.CANVAS_SIZE
    input_size: int = C.MODEL_INPUT_SIZE
    mean: float = C.PIXEL_MEAN
    std: float = C.PIXEL_STD


DEFAULT_CFG = PreprocessCfg()


def letterbox_size(w: int, h: int, size: int = C.CANVAS_SIZE) -> tuple[int, int]:
    """CheXzero's resized (width, height) on the ``size`` canvas: ``s = size / max(w, h)``, truncated."""
    ratio = float(size) / max(w, h)
    return int(w * ratio), int(h * ratio)


def letterbox(image: Image.Image, size: int = C.CANVAS_SIZE) -> Image.Image:
    """Resize the longer side to ``size`` (Lanczos) and paste centred on a black square.

    As CheXzero: ``s = size / max(w, h)``, new size ``(int(w*s), int(h*s))`` (truncation), PIL
    Lanczos resize in the image's own mode, paste onto a black ``L`` canvas at
    ``((size - w') // 2, (size - h') // 2)``. Pasting an RGB image converts it to grey with
    ITU-R 601 luma, after the resize, exactly as PIL does for CheXzero.

    The resize is done as two single-axis resizes, width then height: exactly the two passes,
    each rounded to 8 bits, that one ``resize`` call made in the Pillow CheXzero used (any version
    before 12.2). Later versions run the vertical pass first in some cases: 12.2 for images over
    100 times taller than wide (python-pillow/Pillow#9524), 13 whenever both sides shrink and the
    height loses more than twice the pixels the width does (#9549), i.e. for tall images (about
    twice as tall as wide), which moves grey levels; two calls keep CheXzero's order on any version.
    """
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"letterbox expects an 8-bit L or RGB image, got mode {image.mode!r}")
    w, h = image.size
    new_size = letterbox_size(w, h, size)
    resized = image
    if new_size[0] != w:
        resized = resized.resize((new_size[0], h), Image.Resampling.LANCZOS)
    if new_size[1] != h:
        resized = resized.resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def canvas_to_tensor(canvas: Image.Image | np.ndarray) -> torch.Tensor:
    """The 320x320 canvas as float32 0..255, repeated to 3 channels: shape (3, H, W)."""
    arr = np.asarray(canvas, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a single-channel canvas, got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.unsqueeze(0).repeat(3, 1, 1)


def normalize(x: torch.Tensor, cfg: PreprocessCfg = DEFAULT_CFG) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in float32, as torchvision's ``Normalize``."""
    mean = torch.as_tensor(cfg.mean, dtype=torch.float32)
    std = torch.as_tensor(cfg.std, dtype=torch.float32)
    return (x - mean) / std


def resize_to_input(x: torch.Tensor, cfg: PreprocessCfg = DEFAULT_CFG) -> torch.Tensor:
    """Bicubic resize to the model's input side, without antialiasing (torchvision 0.11's).

    Accepts (C, H, W) or (N, C, H, W).
    """
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    h, w = x.shape[-2:]
    # torchvision's Resize(int) keeps the aspect ratio by the shorter side; the canvas is square.
    if h <= w:
        size = (cfg.input_size, int(cfg.input_size * w / h))
    else:
        size = (int(cfg.input_size * h / w), cfg.input_size)
    out = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
    return out.squeeze(0) if squeeze else out


def model_input(image: Image.Image, cfg: PreprocessCfg = DEFAULT_CFG) -> torch.Tensor:
    """The whole CheXzero transform: 8-bit image -> normalised (3, 224, 224) float32 tensor."""
    canvas = letterbox(image, cfg.canvas_size)
    return resize_to_input(normalize(canvas_to_tensor(canvas), cfg), cfg)
