from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.checkpoints import TINY, make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Three tiny checkpoints with CheXzero's key layout (different seeds)."""
    d = tmp_path_factory.mktemp("ckpt")
    return [make_checkpoint(d / f"tiny{i}.pt", seed=i, dims=TINY) for i in range(3)]


def write_raster_archive(folder, n: int, seed: int = 0, start: int = 0):
    """PNG and JPEG files of several sizes and aspect ratios, with some structure to see."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        w, h = int(rng.integers(150, 700)), int(rng.integers(150, 700))
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.1, 0.4) * min(w, h)
        img = 60 + 120 * ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2) + rng.normal(0, 20, (h, w))
        arr = np.clip(img, 0, 255).astype(np.uint8)
        sub = folder / (f"s{i % 3}")
        sub.mkdir(exist_ok=True)
        if i % 2:
            p = sub / f"img{i:03d}.png"
            Image.fromarray(arr).save(p)
        else:
            p = sub / f"img{i:03d}.jpg"
            Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths
