"""A PyTorch ``Dataset`` over an exported cohort (``curator cohort --out DIR``).

Each item is ``(image, target)``: ``image`` the CheXzero model input (3 x 224 x 224 float32, the
same transform the workspace was embedded with: :func:`curator.readers.read_image` then
:func:`curator.preprocess.model_input`), ``target`` a float32 vector with one entry per target
column. Images come from the export's ``images/`` folder (``copy_images = "copy"`` or
``"symlink"``), or, for an identified export without copies, from the source paths. A
de-identified export without copies has no images to read.

Targets: the weak labels (``<finding>_label``: 1 positive, 0 negative, -1 uncertain) when the
cohort has them, else the probabilities; or the columns named in ``targets``. ``uncertain``
replaces -1 (e.g. ``float("nan")`` to mask uncertain labels in the loss, or 0 / 1 for the
U-Zeros / U-Ones conventions). Missing values are NaN.

    ds = CohortDataset("cohorts/edema", split="train")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=4)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class CohortDataset(Dataset):
    def __init__(self, cohort_dir: str | Path, split: str | None = None, targets: str | list[str] = "auto",
                 uncertain: float = -1.0, transform=None, return_id: bool = False):
        import pandas as pd

        self.root = Path(cohort_dir).expanduser().resolve()
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.root}: not a cohort export (no manifest.json)")
        self.manifest = json.loads(manifest_path.read_text())
        frame = pd.read_parquet(self.root / "cohort.parquet")
        if split is not None:
            if "split" not in frame.columns:
                raise ValueError(f"{self.root}: this cohort has no split")
            frame = frame[frame["split"] == split]
        self.frame = frame.reset_index(drop=True)
        cols = self.manifest.get("columns", {})
        if targets == "auto":
            targets = cols.get("labels") or cols.get("findings") or []
        elif targets == "labels":
            targets = cols.get("labels") or []
        elif targets == "probabilities":
            targets = cols.get("findings") or []
        elif isinstance(targets, str):
            targets = [targets]
        missing = [t for t in targets if t not in self.frame.columns]
        if missing:
            raise ValueError(f"{self.root}: no column(s) {', '.join(missing)} in the cohort")
        self.target_columns = list(targets)
        self.uncertain = uncertain
        self.transform = transform
        self.return_id = return_id
        if "image_file" in self.frame.columns:
            self._files = [str(self.root / f) if isinstance(f, str) and f else None for f in self.frame["image_file"]]
        elif not self.manifest.get("deidentified", True) and "path" in self.frame.columns:
            self._files = self.frame["path"].tolist()
        else:
            raise ValueError(f"{self.root}: a de-identified cohort exported without images; export again with copy_images = \"copy\"")
        conv = self.frame["conversion"] if "conversion" in self.frame.columns else None
        copied_png = self.manifest.get("deidentified", True)  # de-identified copies are PNGs of the converted image
        self._conversions = [("mimic" if copied_png or conv is None or conv[i] not in ("mimic", "voi") else conv[i]) for i in range(len(self.frame))]
        y = self.frame[self.target_columns].to_numpy(dtype=np.float32, na_value=np.nan) if self.target_columns else np.zeros((len(self.frame), 0), np.float32)
        if self.target_columns and cols.get("labels") and uncertain != -1.0:
            lab = [i for i, t in enumerate(self.target_columns) if t in cols["labels"]]
            sub = y[:, lab]
            sub[sub == -1] = uncertain
            y[:, lab] = sub
        self.targets = torch.from_numpy(np.array(y, dtype=np.float32, copy=True))

    def __len__(self) -> int:
        return len(self.frame)

    def image_path(self, i: int) -> str:
        p = self._files[i]
        if p is None:
            raise FileNotFoundError(f"cohort row {i} (image_id {int(self.frame['image_id'][i])}) has no image file (its copy failed at export)")
        return p

    def __getitem__(self, i: int):
        from curator.preprocess import model_input
        from curator.readers import ReadOptions, read_image

        res = read_image(self.image_path(i), ReadOptions(dicom_conversion=self._conversions[i], modalities=None))
        x = model_input(res.image)
        if self.transform is not None:
            x = self.transform(x)
        if self.return_id:
            return x, self.targets[i], int(self.frame["image_id"][i])
        return x, self.targets[i]
