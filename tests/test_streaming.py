"""Embed streams the archive in chunks and keeps what it knows compactly (issue 6)."""

from __future__ import annotations

import os

import numpy as np

from curator.discover import walk
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.pipelines.known import KnownFiles
from curator.workspace import Workspace
from tests.conftest import write_raster_archive


def _cfg(arc, ws, cks, **kw):
    return EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(c) for c in cks], device="cpu",
                       progress=False, workers=0, batch_size=4, threads=1, **kw)


def _probs(ws_root):
    ws = Workspace(ws_root)
    cat = ws.read_table("catalog", columns=["image_id", "path"]).to_pylist()
    ids = {r["image_id"]: r["path"] for r in cat}
    out = {}
    for r in ws.read_table("predictions").to_pylist():
        vals = [v for k, v in r.items() if k not in ("image_id", "prompt_set", "member")]
        out[(ids[r["image_id"]], r["member"])] = np.array(vals)
    return out


def test_chunked_discovery_gives_the_same_workspace(tmp_path, tiny_checkpoints):
    arc = tmp_path / "arc"
    write_raster_archive(arc, 11, seed=3)
    (arc / "empty.png").write_bytes(b"")
    (arc / "junk.dcm").write_text("junk")
    one = run_embed(_cfg(arc, tmp_path / "one", tiny_checkpoints[:1]))
    small = run_embed(_cfg(arc, tmp_path / "small", tiny_checkpoints[:1], chunk_files=3))  # 5 chunks
    assert small.discovered == one.discovered == 13
    assert small.processed == one.processed == 11 and small.failed == one.failed
    pa_, pb = _probs(tmp_path / "one"), _probs(tmp_path / "small")
    assert pa_.keys() == pb.keys() and len(pa_) == 22
    assert max(float(np.abs(pa_[k] - pb[k]).max()) for k in pa_) <= 1e-6

    # incremental over chunks: 2 new files, the rest unchanged or known bad
    write_raster_archive(arc, 2, seed=4, start=11)
    again = run_embed(_cfg(arc, tmp_path / "small", tiny_checkpoints[:1], chunk_files=3))
    assert (again.processed, again.unchanged, again.known_errors) == (2, 11, 2)
    # --limit counts over all chunks
    limited = run_embed(_cfg(arc, tmp_path / "limited", tiny_checkpoints[:1], chunk_files=2, limit=5))
    assert limited.processed + sum(limited.failed.values()) == 5


def test_known_files_agree_with_the_catalog_and_errors_tables(tmp_path, tiny_checkpoints):
    arc = tmp_path / "arc"
    paths = write_raster_archive(arc, 6, seed=8)
    (arc / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:1]))
    # change one file's content and mtime, and re-embed it: the newer catalog row must win
    changed = paths[2]
    data = changed.read_bytes()
    changed.write_bytes(data)
    os.utime(changed, ns=(10**18, 10**18))
    run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:1]))
    os.utime(paths[4], ns=(2 * 10**18, 2 * 10**18))  # changed, not yet re-embedded

    ws = Workspace(tmp_path / "ws")
    cat = ws.read_table("catalog", columns=["path", "size", "mtime_ns"]).to_pylist()
    err = ws.read_table("errors", columns=["path", "size", "mtime_ns"]).to_pylist()
    seen = {r["path"]: (r["size"], r["mtime_ns"]) for r in cat}  # later rows overwrite earlier ones
    bad = {r["path"]: (r["size"], r["mtime_ns"]) for r in err}
    entries = list(walk([str(arc)]))
    unchanged, known_bad = KnownFiles(ws).classify([e.path for e in entries], [e.size for e in entries], [e.mtime_ns for e in entries])
    expect_unchanged = [seen.get(e.path) == (e.size, e.mtime_ns) for e in entries]
    expect_bad = [not u and bad.get(e.path) == (e.size, e.mtime_ns) for e, u in zip(entries, expect_unchanged)]
    assert unchanged.tolist() == expect_unchanged
    assert known_bad.tolist() == expect_bad
    by_path = dict(zip([e.path for e in entries], unchanged.tolist()))
    assert by_path[str(changed)] is True and by_path[str(paths[4])] is False
    assert sum(known_bad) == 1 and sum(unchanged) == 5


def test_overlapping_roots_yield_each_file_once(tmp_path):
    arc = tmp_path / "arc"
    write_raster_archive(arc, 6, seed=1)
    sub = next(p for p in arc.iterdir() if p.is_dir())
    single = [e.path for e in walk([arc])]
    both = [e.path for e in walk([arc, sub, arc / "s0" / "img000.jpg"])]
    assert sorted(both) == sorted(single) and len(set(single)) == len(single) == 6
    apart = [e.path for e in walk([arc / "s0", arc / "s1"])]
    assert len(apart) == len(set(apart)) == sum(1 for e in single if "/s0/" in e or "/s1/" in e)
