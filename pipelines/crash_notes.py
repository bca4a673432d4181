"""Crash notes for the Ray engine: which file a Ray task or actor had in hand when its process died.

The local engine learns which file crashed a reader process from the dead process's exit signal
and the note it kept (pipelines/embed.py). A Ray worker that dies is not reported that way: Ray
runs the task again, on the same input (Ray Data's default: without end), so a file that crashes
its decoder would be read, and crash, for ever. Here every task keeps a note per batch, on its
node, of the file in hand and of how many processes died holding each file; the retry reads that
note, and a file in hand at ``DEATHS`` deaths is recorded as an error row (``decoder_crashed``)
instead of being read again. Two deaths, not one, so that a process ended for another reason (a
node going away, a kill) does not mark the file it happened to hold. (A batch whose decode on the
device killed an actor is read the exact way after one death: nothing is lost by that, the exact
path being the reference.)

The Ray engine also bounds the retries (``RETRIES`` per task or model batch), so that a death the
notes do not explain (say, a fault in the model) fails the run instead of repeating for ever.
Notes outlive a run (they are named by the workspace, not the run), so the next run goes on
counting where a failed one stopped; the driver removes its node's notes when a run completes.

Notes live in a folder of the node's temporary directory, owned by the user and private to them
(:func:`folder`; one whose owner or kind is wrong is not used: the run goes on without notes);
a note goes when its batch is done, leaving the empty folder. A retry that Ray places on another
node does not see the note there and reads the file again: on a multi-node cluster a crashing
file costs up to two deaths per node it crashes on before it is recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEATHS = 2  # deaths of a process holding the same file before the file is recorded as crashing it
DEVICE = -1  # "index" of a batch's decode on the device (an actor under --gpu-jpeg), as a whole
RETRIES = 20  # Ray retries of one reader task, or of one model batch, after its process died


def key(workspace: str | Path) -> str:
    """The notes' name for a workspace (its resolved path, hashed)."""
    return hashlib.blake2b(str(Path(workspace).expanduser().resolve()).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def folder(name: str) -> Path:
    """This node's folder for the notes named ``name`` (:func:`key`), per user."""
    return Path(tempfile.gettempdir()) / f"curator-ray-{os.getuid()}-{name}"


def _usable(where: Path, make: bool) -> bool:
    """Whether ``where`` is a real folder of this user's (made, private, if ``make``)."""
    try:
        if make:
            where.mkdir(mode=0o700, parents=False, exist_ok=True)
        st = os.lstat(where)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        return True
    log.warning("%s is not a folder of this user's: no crash notes (a file that crashes its reader is retried until Ray gives up)", where)
    return False


class CrashNote:
    """The note of one batch of files (``paths``) at one ``stage`` ("read", "device").

    On construction it reads what an earlier attempt at the same batch left: ``deaths`` (index ->
    processes that died holding it; :data:`DEVICE` for the device decode as a whole).
    :meth:`hold` notes the index in hand before the work on it, :meth:`done` removes the note.
    """

    def __init__(self, where: Path, stage: str, paths: list[str]):
        digest = hashlib.blake2b("\0".join([stage, *paths]).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
        self.where = where
        self.path = where / digest
        self.deaths: dict[int, int] = {}
        at = None
        if self.path.exists() and _usable(where, make=False):
            try:
                previous = json.loads(self.path.read_text())
                self.deaths = {int(k): int(v) for k, v in (previous.get("deaths") or {}).items()}
                at = previous.get("at")
            except (OSError, ValueError, TypeError, AttributeError):  # not a whole note of ours
                self.deaths, at = {}, None
        if isinstance(at, int):  # the process that wrote this note died holding `at`
            self.deaths[at] = self.deaths.get(at, 0) + 1
        self._fd: int | None = None
        self._written = 0
        self._off = False  # no usable folder: no notes

    def crashed(self, i: int) -> int:
        """How many processes died holding index ``i`` (0 usually)."""
        return self.deaths.get(i, 0)

    def hold(self, i: int) -> None:
        """Note index ``i`` as in hand (before working on it): one small write at the start of a file
        opened once (a few microseconds), padded with spaces over what was there before."""
        if self._fd is None:
            if self._off:
                return
            if not _usable(self.where, make=True):
                self._off = True
                return
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        data = json.dumps({"at": i, "deaths": self.deaths}).encode()
        os.pwrite(self._fd, data.ljust(self._written), 0)  # (JSON allows trailing spaces)
        self._written = max(self._written, len(data))

    def done(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._off:
            self.path.unlink(missing_ok=True)
