"""Walking an archive: which files are candidates, and which are unchanged since the last run."""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

# Extensions that are never images; skipped by an explicit, logged filter.
IGNORED_SUFFIXES = frozenset(
    {".csv", ".txt", ".json", ".xml", ".html", ".htm", ".md", ".pdf", ".log", ".toml", ".yaml", ".yml",
     ".parquet", ".py", ".sh", ".zip", ".gz", ".tar", ".ini", ".db", ".sqlite", ".xlsx", ".doc", ".docx"}
)


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute
    size: int
    mtime_ns: int


@dataclass
class WalkReport:
    ignored: Counter = field(default_factory=Counter)  # reason -> count
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def walk(roots: Iterable[str | Path], report: WalkReport | None = None, exclude: Iterable[str | Path] = ()) -> Iterator[FileEntry]:
    """Yield candidate files under ``roots`` (files or folders), sorted, each once.

    Symlinked folders are not followed (no loops); symlinked files are read through. Hidden
    files and folders (name starting with '.') and known non-image extensions are skipped and
    counted in ``report.ignored``, as are the ``exclude`` folders (the workspace being written,
    when it lies inside the archive: its thumbnails are JPEGs).
    """
    report = report if report is not None else WalkReport()
    excluded = {str(Path(e).expanduser().resolve()) for e in exclude}
    roots = list(roots)
    # One folder's walk yields each path once; remembering paths (memory that grows with the
    # archive) is only needed when the roots overlap.
    resolved = [Path(r).expanduser().resolve() for r in roots]
    overlap = any(a == b or a in b.parents for i, a in enumerate(resolved) for j, b in enumerate(resolved) if i != j)
    seen: set[str] | None = set() if overlap else None
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists() and not root.is_symlink():
            raise FileNotFoundError(f"{root}: no such file or folder")
        if root.is_file():
            entry = _entry(root.resolve(), report)
            if entry and (seen is None or entry.path not in seen):
                if seen is not None:
                    seen.add(entry.path)
                yield entry
            continue
        top = str(root.resolve())
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False, onerror=lambda e: report.unreadable.append((getattr(e, "filename", "?"), str(e)))):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if excluded:
                for d in [d for d in dirnames if os.path.join(dirpath, d) in excluded]:
                    dirnames.remove(d)
                    report.ignored["the workspace's own folder"] += 1
            if dirpath != top and "cohort.csv" in filenames and "manifest.json" in filenames and _is_cohort_export(dirpath):
                # a cohort export written into the archive: its images are copies (or de-identified
                # renderings) of images the archive holds already (an export given as the archive
                # itself is walked: embedding an export one was handed is a use of its own)
                dirnames[:] = []
                report.ignored["a curator cohort export"] += 1
                continue
            for name in sorted(filenames):
                if name.startswith("."):
                    report.ignored["hidden file"] += 1
                    continue
                if Path(name).suffix.lower() in IGNORED_SUFFIXES:
                    report.ignored[f"{Path(name).suffix.lower()} file"] += 1
                    continue
                entry = _entry(Path(dirpath) / name, report)
                if entry and (seen is None or entry.path not in seen):
                    if seen is not None:
                        seen.add(entry.path)
                    yield entry


def _is_cohort_export(folder: str) -> bool:
    """The folder is one `curator cohort` exported (its manifest.json says so)."""
    import json

    try:
        with open(os.path.join(folder, "manifest.json"), "rb") as f:
            return str(json.loads(f.read(1 << 20)).get("format", "")).startswith("curator-cohort/")
    except (OSError, ValueError, AttributeError):
        return False


def printable(path: str | Path) -> str:
    """A path as valid UTF-8 text (undecodable bytes shown as \\xNN), for logs and error rows."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _entry(path: Path, report: WalkReport) -> FileEntry | None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        report.unreadable.append((printable(path), "file name is not valid UTF-8; rename the file to include it"))
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            report.unreadable.append((str(path), "broken symbolic link"))
        else:
            report.unreadable.append((str(path), "vanished during the walk"))
        return None
    except OSError as exc:
        report.unreadable.append((str(path), f"{type(exc).__name__}: {exc}"))
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device or special file"
        report.unreadable.append((str(path), f"not a regular file ({kind})"))
        return None
    return FileEntry(path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns)
