"""Checkpoints with CheXzero's key layout, made by the tests (the real ones cannot ship)."""

from __future__ import annotations

from pathlib import Path

import torch

from curator.model import new_clip

TINY = dict(embed_dim=32, vision_width=64, vision_layers=2, patch_size=32, image_size=224, text_width=64, text_layers=2)
VIT_B_32 = dict(embed_dim=512, vision_width=768, vision_layers=12, patch_size=32, image_size=224, text_width=512, text_layers=12)


def make_state_dict(seed: int, dims: dict = TINY, mixed_fp16: bool = False) -> dict[str, torch.Tensor]:
    """A randomly initialised CLIP state dict, perturbed so that no output is degenerate.

    Layer-norm gains and biases, the class and positional embeddings all get noise, so that a
    loader that drops or mis-assigns any tensor changes the outputs. ``mixed_fp16`` stores the
    weight matrices in float16, as checkpoints saved from mixed-precision GPU training do.
    """
    torch.manual_seed(seed)
    model = new_clip(**dims)
    sd = {}
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if v.is_floating_point():
            v = v + 0.02 * torch.randn(v.shape, generator=g)
            if mixed_fp16 and v.ndim >= 2:
                v = v.half()
        sd[k] = v
    return sd


def make_checkpoint(path: str | Path, seed: int = 0, dims: dict = TINY, mixed_fp16: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_state_dict(seed, dims, mixed_fp16), path)
    return path
