"""Fault injection for the crash-safety tests and benchmarks/faults.py.

``CURATOR_CRASH_AT="point:n"`` makes the process SIGKILL itself the n-th time it reaches
``point`` (n counts from 1). Points: ``batch`` (a batch arrived from the readers), ``mapped``
(after the model), ``part`` (a part file was written, not yet committed), ``manifest-tmp`` (the
new manifest is on disk under its temporary name, not yet renamed), ``commit`` (just after a
commit). ``CURATOR_PAUSE_AT="point:seconds"`` makes it sleep there instead, each time (a slow
writer, for tests that watch it from outside). Unset, :func:`reached` costs two dict lookups.
Never set them outside tests.
"""

from __future__ import annotations

import os
import signal
import time

_ENV = "CURATOR_CRASH_AT"
_PAUSE_ENV = "CURATOR_PAUSE_AT"
_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(_ENV)
    if not spec:
        return None
    point, _, n = spec.partition(":")
    return point, int(n or 1)


def reached(point: str) -> None:
    pause = os.environ.get(_PAUSE_ENV)
    if pause and pause.partition(":")[0] == point:
        time.sleep(float(pause.partition(":")[2]))
    target = _target()
    if target is None or target[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= target[1]:
        os.kill(os.getpid(), signal.SIGKILL)


_READ_ENV = "CURATOR_ABORT_READING"


def reached_reading(path: str) -> None:
    """``CURATOR_ABORT_READING=text``: a reader process aborts (SIGABRT, as a C library's failed
    assertion does) once it has read and decoded a file whose path contains ``text`` (not when it
    only handed the file's bytes over for --gpu-jpeg). Tests only."""
    text = os.environ.get(_READ_ENV)
    if text and text in path:
        os.abort()


_DECODE_ENV = "CURATOR_ABORT_DECODING"


def reached_decoding(paths: list[str]) -> None:
    """``CURATOR_ABORT_DECODING=text``: a process aborts as it starts decoding a batch of JPEGs on
    its device (--gpu-jpeg) when one of their paths contains ``text`` (as a GPU decoder that
    faults on a file would take it down). Tests only."""
    text = os.environ.get(_DECODE_ENV)
    if text and any(text in p for p in paths):
        os.abort()
