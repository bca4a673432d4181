"""Crash notes for the Ray engine: which file a Ray task or actor had in hand when its process died.

The local engine learns which file crashed a reader process from the dead process's exit signal
and the note it kept (pipelines/embed.py). A Ray worker that dies is not reported that way: Ray
runs the task again, on the same input, as often as it takes (Ray Data's default), so a file
that crashes its decoder would be read, and crash, for ever. Here every task keeps a note per
batch, on its node, of the file in hand and of how many processes died holding each file; the
retry reads that note, and a file in hand at ``DEATHS`` deaths is recorded as an error row
(``decoder_crashed``) instead of being read again. Two deaths, not one, so that a process ended
for another reason (a node going away, a kill) does not mark the file it happened to hold.

Notes live in a folder per run in the node's temporary directory (:func:`folder`); a note goes
when its batch is done. A retry that Ray places on another node does not see the note there and
reads the file again: on a multi-node cluster a crashing file can cost a few more retries (at
most two per node it crashes on) before it is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

DEATHS = 2  # deaths of a process holding the same file before the file is recorded as crashing it
DEVICE = -1  # "index" of a batch's decode on the device (an actor under --gpu-jpeg), as a whole


def folder(run_id: str) -> Path:
    """This node's folder for the notes of run ``run_id``."""
    return Path(tempfile.gettempdir()) / f"curator-ray-{run_id}"


class CrashNote:
    """The note of one batch of files (``paths``) at one ``stage`` ("read", "device").

    On construction it reads what an earlier attempt at the same batch left: ``deaths`` (index ->
    processes that died holding it; :data:`DEVICE` for the device decode as a whole).
    :meth:`hold` notes the index in hand before the work on it, :meth:`done` removes the note.
    """

    def __init__(self, where: Path, stage: str, paths: list[str]):
        key = hashlib.blake2b("\0".join([stage, *paths]).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
        self.where = where
        self.path = where / key
        self.deaths: dict[int, int] = {}
        try:
            previous = json.loads(self.path.read_text())
            self.deaths = {int(k): int(v) for k, v in (previous.get("deaths") or {}).items()}
            at = previous.get("at")
        except (OSError, ValueError, TypeError, AttributeError):  # none (the usual case), or not a note of ours
            at = None
        if isinstance(at, int):  # the process that wrote this note died holding `at`
            self.deaths[at] = self.deaths.get(at, 0) + 1
        self._fd: int | None = None
        self._written = 0

    def crashed(self, i: int) -> int:
        """How many processes died holding index ``i`` (0 usually)."""
        return self.deaths.get(i, 0)

    def hold(self, i: int) -> None:
        """Note index ``i`` as in hand (before working on it): one small write at the start of a file
        opened once (a few microseconds), padded with spaces over what was there before."""
        if self._fd is None:
            self.where.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        data = json.dumps({"at": i, "deaths": self.deaths}).encode()
        os.pwrite(self._fd, data.ljust(self._written), 0)  # (JSON allows trailing spaces)
        self._written = max(self._written, len(data))

    def done(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
