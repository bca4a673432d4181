"""Thumbnails of catalogued images, made once and cached in the workspace.

``W/thumbnails/<px>/<image_id // 10000>/<image_id>.jpg`` holds a JPEG whose longer side is
``px`` (256 for grids, 1024 for the detail view). Both sizes are made from one decode of the
source file, the first time either is asked for; after that a view reads a small JPEG and never
decodes the original (a DICOM can be tens of megabytes). The files are written to a temporary
name and renamed, so concurrent viewers never see half a thumbnail.

Only images in the catalog can have a thumbnail: callers pass an ``image_id``, its path comes
from the catalog, and the file must still have the size and mtime the catalog recorded (a file
changed since it was catalogued is not shown as if it were the catalogued image). The image is
the 8-bit picture the pipeline made for the model (DICOM through the conversion recorded for it).
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from curator.readers import DICOM_CONVERSIONS, ReadError, ReadOptions, read_image

log = logging.getLogger(__name__)

THUMB_DIR = "thumbnails"
SIZES = {"small": 256, "large": 1024}
JPEG_QUALITY = 85


class ThumbnailError(Exception):
    pass


@dataclass
class CatalogEntry:
    image_id: int
    path: str
    size: int | None
    mtime_ns: int | None
    conversion: str | None


def thumbnail_path(root: str | Path, image_id: int, size: str = "small") -> Path:
    px = SIZES[size]
    image_id = int(image_id)
    if image_id < 0:
        raise ValueError("image ids are never negative")
    return Path(root) / THUMB_DIR / str(px) / f"{image_id // 10000:05d}" / f"{image_id}.jpg"


def catalog_entries(con, image_ids) -> dict[int, CatalogEntry]:
    """Catalog rows (path, size, mtime, conversion) of ``image_ids``, from a workspace connection."""
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        return {}
    rows = con.execute(
        "SELECT image_id, path, size, mtime_ns, conversion FROM catalog_raw WHERE image_id IN (SELECT unnest(?::BIGINT[]))",
        [ids],
    ).fetchall()
    return {int(r[0]): CatalogEntry(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows}


def _encode(img: Image.Image, px: int) -> bytes:
    im = img.copy()
    im.info = {}  # no metadata of the source (Pillow writes a JPEG's comment again: "DOE^JOHN, MRN 1234")
    im.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def carries_metadata(data: bytes) -> bool:
    """The JPEG has a comment or an APP1-APP15 segment (EXIF, XMP, ...) before its scan: text that
    may name a patient. Thumbnails cached before curator dropped the source's metadata can hold a
    JPEG source's comment; they are made again."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: no metadata segments follow
            return False
        if marker == 0xFE or 0xE1 <= marker <= 0xEF:
            return True
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def render(entry: CatalogEntry) -> dict[str, bytes]:
    """Decode the catalogued file once and return a JPEG of every size."""
    try:
        st = os.stat(entry.path)
    except OSError as exc:
        raise ThumbnailError(f"the file is no longer readable ({type(exc).__name__})") from None
    if (entry.size is not None and st.st_size != entry.size) or (entry.mtime_ns is not None and st.st_mtime_ns != entry.mtime_ns):
        raise ThumbnailError("the file has changed since it was catalogued; run `curator embed` again")
    conversion = entry.conversion if entry.conversion in DICOM_CONVERSIONS else "mimic"
    try:
        result = read_image(entry.path, ReadOptions(dicom_conversion=conversion, modalities=None))
    except ReadError as exc:
        raise ThumbnailError(f"cannot read the file: {exc}") from None
    img = result.image if result.image.mode == "L" else result.image.convert("L")
    return {name: _encode(img, px) for name, px in SIZES.items()}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _make(root: Path, entry: CatalogEntry) -> dict[str, bytes]:
    images = render(entry)
    for name, data in images.items():
        try:
            _write(thumbnail_path(root, entry.image_id, name), data)
        except OSError as exc:  # a read-only workspace still gets its thumbnails, uncached
            log.debug("cannot cache thumbnail of %s: %s", entry.image_id, exc)
    return images


def get_thumbnails(root: str | Path, con, image_ids, size: str = "small", workers: int = 4) -> tuple[dict[int, bytes], dict[int, str]]:
    """JPEG bytes of the ``size`` thumbnail of each image: ``(found, problems)``.

    Cached thumbnails are read from the workspace; missing ones are made (in ``workers``
    threads) from the catalogued files and cached. ``problems`` maps ids that have no thumbnail
    to the reason (not catalogued, file gone or changed, unreadable).
    """
    root = Path(root)
    found: dict[int, bytes] = {}
    problems: dict[int, str] = {}
    missing = []
    for i in dict.fromkeys(int(x) for x in image_ids):
        p = thumbnail_path(root, i, size)
        try:
            data = p.read_bytes()
        except OSError:
            missing.append(i)
            continue
        if carries_metadata(data):
            missing.append(i)
        else:
            found[i] = data
    if not missing:
        return found, problems
    entries = catalog_entries(con, missing)
    for i in missing:
        if i not in entries:
            problems[i] = "not in the catalog"
    todo = [entries[i] for i in missing if i in entries]

    def one(entry):
        try:
            return entry.image_id, _make(root, entry)[size], None
        except ThumbnailError as exc:  # (shown in the app, which shows no source paths: a message naming the file drops it)
            return entry.image_id, None, str(exc).replace(entry.path, "the file")
        except Exception as exc:  # noqa: BLE001 - one bad file must not break a page
            return entry.image_id, None, f"{type(exc).__name__}: {exc}".replace(entry.path, "the file")

    if len(todo) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            results = list(pool.map(one, todo))
    else:
        results = [one(e) for e in todo]
    for i, data, problem in results:
        if data is not None:
            found[i] = data
        else:
            problems[i] = problem
    return found, problems


def make_thumbnails(root: str | Path, con, image_ids=None, workers: int = 4) -> dict:
    """Make the missing thumbnails of ``image_ids`` (default: every current catalog image)."""
    if image_ids is None:
        image_ids = [r[0] for r in con.execute("SELECT image_id FROM catalog ORDER BY image_id").fetchall()]
    made = failed = cached = 0
    ids = list(image_ids)
    for start in range(0, len(ids), 256):
        chunk = ids[start:start + 256]
        before = {i for i in chunk if thumbnail_path(root, i, "small").is_file()}
        found, problems = get_thumbnails(root, con, chunk, "small", workers)
        cached += len(before)
        made += len(found) - len(before & set(found))
        failed += len(problems)
    return {"made": made, "cached": cached, "failed": failed}
