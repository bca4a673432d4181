"""`curator embed --prune`: rows of files gone from the archive leave the catalog, the views and the index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from curator import index as ci
from curator.query import run_query
from curator.verify import verify
from curator.workspace import Workspace
from tests.conftest import write_raster_archive


def _cfg(arcs, ws, ck, **kw):
    from curator.pipelines.embed import EmbedConfig

    return EmbedConfig(**{"archives": [str(a) for a in arcs], "workspace": str(ws), "checkpoints": [str(ck)], "device": "cpu", "workers": 0,
                          "batch_size": 4, "progress": False, **kw})


def _current_paths(ws_dir) -> set[str]:
    return set(run_query(Workspace(ws_dir), "SELECT path FROM catalog").path)


@pytest.fixture
def embedded(tmp_path, tiny_checkpoints):
    from curator.pipelines.embed import run_embed

    arc, other, ws = tmp_path / "arc", tmp_path / "other", tmp_path / "ws"
    files = write_raster_archive(arc, 8)
    others = write_raster_archive(other, 2, seed=5, start=20)
    run_embed(_cfg([arc, other], ws, tiny_checkpoints[0]))
    with Workspace(ws).writer() as w:
        ci.build_index(w, recall_sample=0)
    return arc, other, ws, files, others


def test_prune_retires_the_rows_of_deleted_files_and_they_come_back(embedded, tiny_checkpoints, tmp_path):
    from curator.pipelines.embed import run_embed

    arc, other, ws, files, others = embedded
    gone = [files[1], files[6]]
    keep_bytes = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in gone}
    for p in gone:
        p.unlink()
    # without --prune nothing changes (curator deletes nothing it recorded)
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0]))
    assert s.pruned == 0 and _current_paths(ws) == {str(p) for p in files + others}
    # with it: only the deleted files' rows leave; the other archive's rows are not under ARCHIVE
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))
    assert s.pruned == 2 and s.processed == 0 and "pruned (gone from the archive): 2" in "\n".join(s.lines())
    assert _current_paths(ws) == {str(p) for p in files + others if p not in gone}
    w = Workspace(ws)
    rows = run_query(w, "SELECT count(*) AS n FROM catalog").n[0]
    assert rows == 8
    images = run_query(w, "SELECT path FROM images")
    assert set(images.path) == _current_paths(ws)  # the views follow
    runs = run_query(w, "SELECT counts FROM runs ORDER BY started DESC LIMIT 1")
    assert json.loads(runs.counts[0])["pruned"] == 2
    # retired, not deleted: the rows stay in the parts, with no successor
    import duckdb

    sup = duckdb.sql(f"SELECT path FROM read_parquet('{ws}/superseded/*.parquet') WHERE superseded_by IS NULL").fetchall()
    assert sorted(r[0] for r in sup) == sorted(str(p) for p in gone)
    # the index follows the catalog (the embed's index update), and verify agrees
    index, _ = ci.load_index(w)
    ids = run_query(w, "SELECT image_id FROM catalog").image_id.to_numpy().astype(np.int64)
    assert np.array_equal(np.sort(ci.index_ids(index)), np.sort(ids))
    assert verify(str(ws)).ok
    # a second --prune has nothing left to do
    assert run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True)).pruned == 0
    # a pruned file that comes back (same bytes, same mtime) is embedded again
    p = gone[0]
    p.write_bytes(keep_bytes[p][0])
    os.utime(p, ns=(keep_bytes[p][1], keep_bytes[p][1]))
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))
    assert s.processed == 1 and s.pruned == 0 and str(p) in _current_paths(ws)
    assert len(_current_paths(ws)) == 9


def test_prune_leaves_a_folder_that_looks_unmounted_unless_forced(embedded, tiny_checkpoints):
    from curator.pipelines.embed import run_embed

    arc, other, ws, files, others = embedded
    for p in files[:6]:  # 6 of 8 gone: more than half
        p.unlink()
    s = run_embed(_cfg([arc, other], ws, tiny_checkpoints[0], prune=True))
    assert s.pruned == 0 and s.prune_refused == [(str(arc.resolve()), 6, 8)]
    assert "not pruned" in "\n".join(s.lines()) and "--prune-force" in "\n".join(s.lines())
    assert len(_current_paths(ws)) == 10
    # the whole folder gone (an unmounted share shows as an empty mount point)
    shutil.rmtree(other)
    other.mkdir()
    s = run_embed(_cfg([arc, other], ws, tiny_checkpoints[0], prune=True))
    assert s.pruned == 0 and len(s.prune_refused) == 2
    s = run_embed(_cfg([arc, other], ws, tiny_checkpoints[0], prune=True, prune_force=True))
    assert s.pruned == 8 and _current_paths(ws) == {str(p) for p in files[6:]}


def test_prune_keeps_files_that_are_there_but_unreadable(embedded, tiny_checkpoints):
    from curator.pipelines.embed import run_embed

    arc, other, ws, files, others = embedded
    link_target = files[2]
    moved = link_target.with_name("moved-away.bin")
    link_target.rename(moved)
    os.symlink(moved.with_name("nowhere.png"), link_target)  # the catalogued path is now a broken link
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))
    assert s.unreadable == 1 and s.pruned == 0 and str(link_target) in _current_paths(ws)


def test_cli_prune_flags(embedded, tiny_checkpoints):
    arc, other, ws, files, others = embedded
    files[0].unlink()
    r = subprocess.run([sys.executable, "-m", "curator.cli", "-q", "embed", str(arc), "--workspace", str(ws), "--checkpoint",
                        str(tiny_checkpoints[0]), "--workers", "0", "--prune"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "pruned (gone from the archive): 1" in r.stdout + r.stderr
    assert str(files[0]) not in _current_paths(ws)
    r = subprocess.run([sys.executable, "-m", "curator.cli", "embed", "--help"], capture_output=True, text=True, check=True)
    assert "--prune-force" in r.stdout and "Nothing is deleted" in r.stdout.replace("\n", " ").replace("  ", " ")
