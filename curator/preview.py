"""Write what the model sees: the converted 8-bit image and the 224x224 model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from curator.preprocess import DEFAULT_CFG, PreprocessCfg, model_input
from curator.readers import ReadOptions, read_image


def denormalize(x, cfg: PreprocessCfg = DEFAULT_CFG) -> np.ndarray:
    """A normalised (3, H, W) model input back to 0..255 uint8 (channel 0; all three are equal)."""
    arr = np.asarray(x[0], dtype=np.float32) * cfg.std + cfg.mean
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def write_preview(file: str | Path, out: str | Path, model_input_out: str | Path | None = None, options: ReadOptions | None = None) -> dict:
    """Write ``file`` as the pipeline converts it to ``out`` (and the model input to ``model_input_out``).

    Both are written as PNG, which keeps every value; a file name with another suffix (``.jpg``
    would be lossy, and PNG bytes under that name would mislead) is a ValueError.
    """
    for target in (out, model_input_out):
        if target is not None and Path(target).suffix.lower() != ".png":
            raise ValueError(f"{target}: previews are written as PNG (lossless, every value kept); give a file name ending in .png")
    result = read_image(file, options or ReadOptions(modalities=None))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out, format="PNG")
    if model_input_out:
        Path(model_input_out).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(denormalize(model_input(result.image).numpy()), mode="L").save(model_input_out, format="PNG")
    w, h = result.image.size
    return {"width": w, "height": h, "conversion": result.conversion, "mode": result.image.mode}
