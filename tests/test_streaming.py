"""Embed streams the archive in chunks and keeps what it knows compactly (issue 6)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from curator.discover import walk
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.pipelines.known import KnownFiles
from curator.workspace import Workspace, WorkspaceError
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
    unchanged, known_bad, _ = KnownFiles(ws).classify([e.path for e in entries], [e.size for e in entries], [e.mtime_ns for e in entries])
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


def test_changed_files_supersede_their_old_rows(tmp_path, tiny_checkpoints):
    import json

    import pyarrow.parquet as pq

    from curator.query import run_query
    from curator.verify import verify

    arc = tmp_path / "arc"
    paths = write_raster_archive(arc, 5, seed=9)
    run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:2]))
    for p in paths[:2]:  # two files change
        os.utime(p, ns=(5 * 10**18, 5 * 10**18))
    run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:2]))
    os.utime(paths[0], ns=(6 * 10**18, 6 * 10**18))  # one of them changes again
    run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:2]))

    ws = Workspace(tmp_path / "ws")
    assert ws.manifest["catalog_versions"] == "superseded"
    raw = ws.read_table("catalog").to_pandas()
    assert len(raw) == 8  # 5 + 2 + 1 versions
    newest = raw.sort_values("image_id").groupby("path").tail(1)  # independent: newest row per path
    got = run_query(ws, "SELECT image_id, path FROM catalog ORDER BY image_id")
    assert got["image_id"].tolist() == sorted(newest["image_id"].tolist())
    sup = ws.read_table("superseded").to_pandas()
    assert len(sup) == 3 and set(sup["path"]) == {str(paths[0]), str(paths[1])}
    assert set(sup["image_id"]) == set(raw["image_id"]) - set(newest["image_id"])
    images = run_query(ws, "SELECT count(*) AS n, count(DISTINCT path) AS d FROM images")
    assert images.loc[0, "n"] == images.loc[0, "d"] == 5
    assert verify(str(tmp_path / "ws")).ok

    # predictions: one row group per ensemble member, so a member filter skips the others
    part = ws.part_paths("predictions")[0]
    meta = pq.ParquetFile(part).metadata
    assert meta.num_row_groups == 3  # two checkpoints + the ensemble

    # a workspace from before superseded tracking keeps the ranking view and the same answer
    m = json.loads((ws.root / "manifest.json").read_text())
    del m["catalog_versions"]
    (ws.root / "manifest.json").write_text(json.dumps(m))
    old = run_query(Workspace(tmp_path / "ws"), "SELECT image_id FROM catalog ORDER BY image_id")
    assert old["image_id"].tolist() == got["image_id"].tolist()


def test_unchanged_rerun_does_not_load_known_checkpoints(tmp_path, tiny_checkpoints, monkeypatch):
    import shutil

    from curator.pipelines import embed as embed_mod

    arc = tmp_path / "arc"
    write_raster_archive(arc, 3, seed=6)
    ck = tmp_path / "ck.pt"
    shutil.copy(tiny_checkpoints[0], ck)
    first = run_embed(_cfg(arc, tmp_path / "ws", [ck]))
    assert first.processed == 3
    meta = next(iter(Workspace(tmp_path / "ws").manifest["checkpoints"].values()))
    assert meta["size"] == ck.stat().st_size and meta["mtime_ns"] == ck.stat().st_mtime_ns

    loads = []
    real = embed_mod.load_checkpoints
    monkeypatch.setattr(embed_mod, "load_checkpoints", lambda *a, **k: loads.append(a) or real(*a, **k))
    again = run_embed(_cfg(arc, tmp_path / "ws", [ck]))
    assert again.unchanged == 3 and again.processed == 0 and loads == []  # identified from the record, never loaded
    write_raster_archive(arc, 1, seed=7, start=3)
    more = run_embed(_cfg(arc, tmp_path / "ws", [ck]))
    assert more.processed == 1 and len(loads) == 1  # loaded once there was something to embed

    # a checkpoint file replaced in place (new mtime) is hashed again: a different file is refused
    shutil.copy(tiny_checkpoints[1], ck)
    with pytest.raises(WorkspaceError, match="different set of checkpoints"):
        run_embed(_cfg(arc, tmp_path / "ws", [ck]))


def test_known_files_digests_agree_for_non_ascii_paths(tmp_path, tiny_checkpoints):
    """The workspace side is hashed by DuckDB, discovered paths by hashlib: the two must agree."""
    import hashlib
    import shutil

    import duckdb

    from curator.pipelines.known import path_keys

    names = ["Müller_Ünal", "日本語 フォルダ", "naïve façade", "plain"]
    arc = tmp_path / "arc"
    for i, name in enumerate(names):
        src = write_raster_archive(tmp_path / f"src{i}", 1, seed=20 + i)[0]
        (arc / name).mkdir(parents=True)
        shutil.copy(src, arc / name / f"é{i}{src.suffix}")
    first = run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:1]))
    assert first.processed == 4
    again = run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:1]))
    assert again.unchanged == 4 and again.processed == 0  # found by digest, so nothing is embedded twice

    paths = [e.path for e in walk([str(arc)])]
    ours = path_keys(paths)
    con = duckdb.connect()
    theirs = [bytes(con.execute("SELECT unhex(md5(?))", [p]).fetchone()[0]) for p in paths]
    independent = [hashlib.md5(p.encode("utf-8")).digest() for p in paths]
    # (an element of an S16 array drops trailing NUL bytes; its 16 stored bytes are the digest)
    assert [ours[i:i + 1].tobytes() for i in range(len(ours))] == theirs == independent
    known = KnownFiles(Workspace(tmp_path / "ws"))
    stored = known.catalog.keys
    assert sorted(stored[i:i + 1].tobytes() for i in range(len(stored))) == sorted(independent)
