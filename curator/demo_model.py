"""The bundled demo model: a small CLIP of CheXzero's family trained by `curator train` on a
synthetic archive (see curator/data/demo_model.json for the exact command and its metrics)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

DEMO_CHECKPOINT = "demo_model.pt"
DEMO_CARD = "demo_model.json"


def _data(name: str) -> Path:
    return Path(str(resources.files("curator").joinpath("data", name)))


def demo_checkpoint_path() -> Path:
    path = _data(DEMO_CHECKPOINT)
    if not path.is_file():
        raise FileNotFoundError(f"the bundled demo model is missing ({path}); reinstall curator")
    return path


def demo_card() -> dict:
    """What built the demo model, its validation figures and its per-finding thresholds."""
    path = _data(DEMO_CARD)
    return json.loads(path.read_text()) if path.is_file() else {}


def demo_prompts_path() -> Path:
    return Path(str(resources.files("curator").joinpath("prompts", "demo.toml")))
