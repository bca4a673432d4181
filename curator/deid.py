"""De-identification of exported tables: salted hashes for identifiers, an allow-list of columns.

The salt
    ``W/.deid_salt``: 32 random bytes (``os.urandom``, hex-encoded), created the first time a
    workspace exports a de-identified cohort, readable by its owner only (mode 0600). It never
    leaves the workspace: no export, report or manifest contains it. Every export of one
    workspace uses the same salt, so a patient keeps the same ``patient_key`` across that
    workspace's cohorts (two cohorts can be joined), while nobody without the salt can recompute
    a key from a known patient ID (a plain hash of an ID could be reversed by hashing guesses).
    Deleting the file makes later exports unlinkable to earlier ones.

Keys
    ``key = HMAC-SHA256(salt, kind + ":" + value)``, first 24 hex digits (96 bits), with kind
    ``patient``, ``study``, ``series`` or ``sop``. A missing value stays missing.

What a de-identified table keeps
    Only the columns of :data:`SAFE_COLUMNS`, the finding probability and weak-label columns and
    the cohort's own columns (``split``, ``cohort_arm``, ``image_file``, ...), plus the keys. So
    a column added to the catalog later is left out until someone decides it is safe. In
    particular: no source path, no file content hash or times, no patient / study / series /
    SOP UIDs, no institution, no study date or time (``study_year`` only), and ages above 89
    become 90 (HIPAA Safe Harbor). Names and birth dates are never read from DICOM headers at
    all.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa

SALT_FILE = ".deid_salt"
KEY_HEX_DIGITS = 24
AGE_CAP = 90

# Arrow types of the columns :func:`deidentify_frame` makes or changes (its keys are strings)
DERIVED_TYPES = {"study_year": pa.int32(), "patient_age": pa.int32()}

# raw column -> (key kind, key column in the export)
HASHED: dict[str, tuple[str, str]] = {
    "patient_id": ("patient", "patient_key"),
    "study_instance_uid": ("study", "study_key"),
    "series_instance_uid": ("series", "series_key"),
    "sop_instance_uid": ("sop", "sop_key"),
}

# Catalog columns that carry no identifier (kept as they are, except patient_age: capped).
SAFE_COLUMNS = (
    "image_id",
    "file_format",
    "conversion",
    "width",
    "height",
    "sop_class_uid",  # the kind of object (a standard constant), not an instance
    "modality",
    "view_position",
    "laterality",
    "patient_age",
    "patient_sex",
    "manufacturer",
    "manufacturer_model",
    "body_part_examined",
    "rows",
    "columns",
    "bits_allocated",
    "bits_stored",
    "photometric_interpretation",
    "transfer_syntax_uid",  # a standard constant
    "number_of_frames",
    "frame_used",
)


def salt_path(root: str | Path) -> Path:
    return Path(root) / SALT_FILE


def workspace_salt(root: str | Path, create: bool = True) -> bytes:
    """The workspace's secret salt; created (atomically, mode 0600) when missing and ``create``."""
    path = salt_path(root)
    with contextlib.suppress(FileNotFoundError):
        return _read_salt(path)
    if not create:
        raise FileNotFoundError(f"{path}: no de-identification salt yet")
    tmp = path.with_name(f".{SALT_FILE}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(32).hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if another process made the salt first
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return _read_salt(path)


def _read_salt(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: not a curator salt file (expected hex)") from None
    if len(salt) < 16:
        raise ValueError(f"{path}: salt too short")
    return salt


def pseudonym(salt: bytes, kind: str, value) -> str | None:
    """Keyed hash of one identifier; None for a missing value."""
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return None
    text = str(value).strip()
    if not text:
        return None
    return hmac.new(salt, f"{kind}:{text}".encode(), hashlib.sha256).hexdigest()[:KEY_HEX_DIGITS]


def add_keys(df: pd.DataFrame, salt: bytes, overrides: dict[str, pd.Series] | None = None) -> pd.DataFrame:
    """Add the ``*_key`` columns for whichever raw identifier columns ``df`` has.

    ``overrides`` maps a kind (``"patient"``, ``"study"``) to the values to hash instead of the
    raw column (e.g. a patient key expression of the cohort spec).
    """
    out = df.copy()
    overrides = overrides or {}
    for col, (kind, key_col) in HASHED.items():
        values = overrides.get(kind)
        if values is None:
            if col not in out.columns:
                continue
            values = out[col]
        out[key_col] = [pseudonym(salt, kind, v) for v in values]
    return out


def ages_note(capped: int) -> str:
    """The de-identification report's sentence on ages, for ``capped`` rows whose age was capped."""
    return f"ages above {AGE_CAP - 1} reported as {AGE_CAP} ({capped} rows)"


def deidentify_frame(df: pd.DataFrame, salt: bytes, keep: list[str] | tuple[str, ...] = (), overrides: dict[str, pd.Series] | None = None) -> tuple[pd.DataFrame, dict]:
    """The de-identified copy of a cohort table and a description of what was done.

    Keeps :data:`SAFE_COLUMNS`, the ``keep`` columns (findings, labels, cohort columns) and the
    keys; adds ``study_year``; caps ``patient_age`` at :data:`AGE_CAP`.
    """
    keyed = add_keys(df, salt, overrides)
    key_cols = [k for _, k in HASHED.values() if k in keyed.columns]
    out = pd.DataFrame(index=keyed.index)
    for c in SAFE_COLUMNS:
        if c in keyed.columns:
            out[c] = keyed[c]
    if "study_date" in keyed.columns:
        years = pd.to_datetime(keyed["study_date"], errors="coerce").dt.year
        out["study_year"] = years.astype("Int32")
    capped = 0
    if "patient_age" in out.columns:
        age = pd.to_numeric(out["patient_age"], errors="coerce")
        capped = int((age > AGE_CAP - 1).sum())
        out["patient_age"] = age.where(~(age > AGE_CAP - 1), AGE_CAP).astype("Int32")
    for c in keep:
        if c in keyed.columns and c not in out.columns:
            out[c] = keyed[c]
    for c in key_cols:
        out[c] = keyed[c]
    removed = [c for c in df.columns if c not in out.columns]
    report = {
        "deidentified": True,
        "method": f"HMAC-SHA256 with a per-workspace secret salt (never exported), first {KEY_HEX_DIGITS} hex digits",
        "hashed": {raw: key for raw, (_, key) in HASHED.items() if key in out.columns},
        "removed": removed,
        "dates": "study_date and study_time removed; study_year kept" if "study_date" in df.columns else "none",
        "ages": ages_note(capped),
        "ages_capped": capped,
        "never_read": ["PatientName", "PatientBirthDate"],
        "source_paths": "removed; images are referred to by image_id (and image_file when copied)",
    }
    return out, report
