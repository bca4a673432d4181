"""An independent CheXzero computation for the fidelity tests.

Written from CheXzero's published code path -- cv2.imread, PIL preprocess(320), torchvision
Normalize + Resize(224, bicubic, no antialias), an open_clip CLIP built from explicit dimensions,
open_clip's tokenizer -- without calling any of curator's code.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision.transforms as T
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import tokenize
from PIL import Image

MEAN, STD = 101.48761, 83.43944


def reference_input(path) -> torch.Tensor:
    img = cv2.imread(str(path))  # BGR, 8-bit, as CheXzero's img_to_hdf5
    assert img is not None, path
    pil = Image.fromarray(img)
    old = pil.size
    ratio = float(320) / max(old)
    new = tuple(int(x * ratio) for x in old)
    # CheXzero's `pil.resize(new, Image.LANCZOS)` ran on a Pillow (< 12.2) that resamples the width,
    # rounds to 8 bits, then resamples the height; later versions run the height first for tall
    # images (python-pillow/Pillow#9524, #9549). Two single-axis calls are those two passes on any version.
    pil = pil.resize((new[0], old[1]), Image.LANCZOS).resize(new, Image.LANCZOS)
    canvas = Image.new("L", (320, 320))
    canvas.paste(pil, ((320 - new[0]) // 2, (320 - new[1]) // 2))
    arr = np.expand_dims(np.asarray(canvas, dtype=np.float32), 0)
    t = torch.from_numpy(np.repeat(arr, 3, axis=0))
    tf = T.Compose([
        T.Normalize((MEAN, MEAN, MEAN), (STD, STD, STD)),
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=False),
    ])
    return tf(t)


def reference_model(state_dict: dict, dims: dict) -> CLIP:
    model = CLIP(
        dims["embed_dim"],
        vision_cfg=CLIPVisionCfg(layers=dims["vision_layers"], width=dims["vision_width"], patch_size=dims["patch_size"], image_size=dims["image_size"]),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=dims["text_width"], heads=dims["text_width"] // 64, layers=dims["text_layers"]),
        quick_gelu=True,
    )
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


@torch.no_grad()
def image_features(model: CLIP, batch: torch.Tensor) -> np.ndarray:
    f = model.encode_image(batch).double()
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


@torch.no_grad()
def text_features(model: CLIP, texts: list[str]) -> np.ndarray:
    f = model.encode_text(tokenize(texts)).double()
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def class_weights(model: CLIP, findings: list[list[str]], template: str) -> np.ndarray:
    cols = []
    for phrases in findings:
        t = text_features(model, [template.format(p) for p in phrases])
        m = t.mean(axis=0)
        cols.append(m / np.linalg.norm(m))
    return np.stack(cols, axis=1)


def softmax_probs(img: np.ndarray, pos_w: np.ndarray, neg_w: np.ndarray) -> np.ndarray:
    pos, neg = img @ pos_w, img @ neg_w
    return np.exp(pos) / (np.exp(pos) + np.exp(neg))
