"""Forking child processes from a process that holds native objects (DuckDB, pyarrow, FAISS).

A forked child has a copy of every Python object of its parent but only the thread that forked.
If the child's garbage collector finalises one of the parent's objects that waits in a reference
cycle (a DuckDB connection whose database runs worker threads, say), the object's native
destructor runs against threads and locks that do not exist in the child, and the child dies by
SIGSEGV. A decode worker dying that way fails the run: it holds no file to blame (this happened
on CI, in a test process whose earlier tests left such garbage behind).

:func:`parent_objects_frozen` moves every object of the parent out of the collector's reach
(``gc.freeze``) while children are forked, so a child never collects its parent's objects; the
parent gets them back at once; and every forked child freezes what it inherited as it starts
(``os.register_at_fork``), whoever forks it. As a side effect the children no longer write to their parent's
objects' headers when they collect, which keeps more of the parent's memory shared with them.
"""

from __future__ import annotations

import contextlib
import gc
import os

# Every child forked from a process that imported curator (a pool's replacement worker, a
# ProcessPoolExecutor, a user's own DataLoader) freezes what it inherited as it starts: the
# block below covers the moment before this handler runs, for the forks curator makes itself.
os.register_at_fork(after_in_child=gc.freeze)


@contextlib.contextmanager
def parent_objects_frozen():
    """Fork children (a DataLoader's workers, a multiprocessing pool) inside this block.

    When something else in the process froze objects before (``gc.get_freeze_count() > 0``), they
    and those frozen here stay frozen: :func:`gc.unfreeze` cannot tell them apart."""
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()
