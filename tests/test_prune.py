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


def test_prune_keeps_files_the_walk_could_not_meet(embedded, tiny_checkpoints, tmp_path, monkeypatch):
    """A folder it could not list, a folder moved behind a symlink, a hidden folder embedded on its own."""
    from curator.pipelines.embed import run_embed

    arc, other, ws, files, others = embedded
    hidden = arc / ".incoming"
    hidden_files = write_raster_archive(hidden, 2, seed=9, start=40)
    run_embed(_cfg([hidden], ws, tiny_checkpoints[0]))
    moved = tmp_path / "elsewhere"
    shutil.move(str(arc / "s1"), moved)
    os.symlink(moved, arc / "s1")  # the walk does not follow it; the files are still there
    real_scandir = os.scandir
    blocked = str((arc / "s2").resolve())

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # s2 cannot be listed (an NFS or permission problem)
    before = _current_paths(ws)
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))
    assert s.pruned == 0 and _current_paths(ws) == before
    assert {str(p) for p in hidden_files} <= before
    # while a file really deleted in the same run is retired
    files[0].unlink()
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))
    assert s.pruned == 1 and _current_paths(ws) == before - {str(files[0])}


def test_an_emptied_subfolder_is_left_alone_the_rest_pruned(tmp_path, tiny_checkpoints, monkeypatch):
    from curator.pipelines import prune
    from curator.pipelines.embed import run_embed

    monkeypatch.setattr(prune, "SUBFOLDER_MIN_FILES", 5)  # (6 files a share here)

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    shares = {name: write_raster_archive(arc / name, 6, seed=k, start=10 * k) for k, name in enumerate(["p10", "p11", "p12"])}
    run_embed(_cfg([arc], ws, tiny_checkpoints[0]))
    shutil.rmtree(arc / "p11")
    (arc / "p11").mkdir()  # an unmounted share: an empty mount point (a third of the archive)
    shares["p12"][0].unlink()  # and one file really deleted elsewhere
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))
    assert s.pruned == 1 and s.prune_refused == [(str((arc / "p11").resolve()), 6, 6)]
    assert _current_paths(ws) == {str(p) for ps in shares.values() for p in ps} - {str(shares["p12"][0])}
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True, prune_force=True))
    assert s.pruned == 6 and s.prune_refused == []


def test_a_pruned_file_restored_from_a_backup_comes_back(tmp_path, tiny_checkpoints):
    """Its older version (v1) is in the catalog's history: the file restored as v1 must not match it."""
    from curator.pipelines.embed import run_embed

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    files = write_raster_archive(arc, 4)
    p = files[1]
    v1 = (p.read_bytes(), os.stat(p).st_mtime_ns)
    run_embed(_cfg([arc], ws, tiny_checkpoints[0]))
    write_raster_archive(tmp_path / "v2", 2, seed=3)  # other content for the same name
    shutil.copy((tmp_path / "v2" / "s1" / "img001.png"), p)
    assert run_embed(_cfg([arc], ws, tiny_checkpoints[0])).processed == 1  # v2 replaces v1
    p.unlink()
    assert run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True)).pruned == 1
    p.write_bytes(v1[0])
    os.utime(p, ns=(v1[1], v1[1]))  # as rsync -a / cp -p restore it
    s = run_embed(_cfg([arc], ws, tiny_checkpoints[0]))
    assert s.processed == 1 and str(p) in _current_paths(ws)


def test_nested_roots_retire_once_and_old_workspaces_are_refused(embedded, tiny_checkpoints):
    from curator.pipelines.embed import run_embed
    from curator.workspace import WorkspaceError

    arc, other, ws, files, others = embedded
    inner = files[0].parent
    files[0].unlink()
    s = run_embed(_cfg([arc, inner], ws, tiny_checkpoints[0], prune=True))
    assert s.pruned == 1
    import duckdb

    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{ws}/superseded/*.parquet')").fetchall()[0][0] == 1
    m = json.loads((ws / "manifest.json").read_text())
    del m["catalog_versions"]  # a workspace from before retired rows existed
    (ws / "manifest.json").write_text(json.dumps(m))
    files[2].unlink()
    with pytest.raises(WorkspaceError, match="predates retired catalog rows"):
        run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))


def test_files_not_met_are_counted_and_errors_that_no_longer_hold_are_closed(tmp_path, tiny_checkpoints):
    from curator.pipelines.embed import run_embed
    from curator.pipelines.known import KnownFiles

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    files = write_raster_archive(arc, 6)
    (arc / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (arc / "dangling.png").symlink_to(arc / "nowhere.png")  # the walk records it (stage discover)
    first = run_embed(_cfg([arc], ws, tiny_checkpoints[0]))
    assert first.processed == 6 and first.not_found == 0

    def errors():
        return dict(run_query(Workspace(ws), "SELECT path, stage FROM errors").itertuples(index=False))

    assert errors() == {str(arc / "broken.png"): "read", str(arc / "dangling.png"): "discover"}
    os.remove(files[0])
    shutil.move(files[1], arc / "moved-away.png")
    (arc / "dangling.png").unlink()
    again = run_embed(_cfg([arc], ws, tiny_checkpoints[0]))
    assert (again.processed, again.not_found, again.settled) == (1, 2, 1)  # the moved file is new under its new name
    assert any("2 catalogued files under the archive were not met" in line and "--prune" in line for line in again.lines())
    assert errors() == {str(arc / "broken.png"): "read"}  # the link's error closed: the walk no longer meets it
    os.remove(arc / "broken.png")
    kept = run_embed(_cfg([arc], ws, tiny_checkpoints[0]))  # without --prune, a deleted file's rows stay, error too
    assert kept.settled == 0 and errors() == {str(arc / "broken.png"): "read"}
    pruned = run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True))
    assert (pruned.pruned, pruned.settled, pruned.not_found) == (2, 1, 2)
    assert errors() == {}
    assert _current_paths(ws) == {str(p) for p in files[2:]} | {str(arc / "moved-away.png")}
    # the closing rows are in errors_raw, not counted as failures, and match no file
    raw = run_query(Workspace(ws), "SELECT stage, kind FROM errors_raw WHERE stage = 'resolved' ORDER BY kind")
    assert raw.kind.tolist() == ["cleared", "gone"]
    (arc / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (arc / "dangling.png").symlink_to(arc / "nowhere.png")
    known = KnownFiles(Workspace(ws))
    st = os.stat(arc / "broken.png")
    assert not known.classify([str(arc / "broken.png")], [st.st_size], [st.st_mtime_ns])[1][0]
    assert not known.unreadable_before(str(arc / "dangling.png"))
    back = run_embed(_cfg([arc], ws, tiny_checkpoints[0]))
    assert sum(back.failed.values()) == 2 and back.not_found == 0  # both recorded afresh
    assert errors() == {str(arc / "broken.png"): "read", str(arc / "dangling.png"): "discover"}


def test_files_back_after_prune_or_restored_are_no_duplicates_for_verify_but_real_duplicates_are(embedded, tiny_checkpoints, tmp_path):
    """A retired row (pruned) or a row replaced by another version is history: the file coming
    back as it was is embedded anew and is not "catalogued more than once"; the same version
    twice among current rows (or replaced by itself) still is."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from curator.pipelines.embed import run_embed
    from curator.workspace import SUPERSEDED_SCHEMA

    arc, other, ws, files, others = embedded
    away = tmp_path / "away"
    away.mkdir()
    for p in (files[1], files[6]):  # moved away (the mtime travels with them), pruned, moved back
        shutil.move(p, away / p.name)
    assert run_embed(_cfg([arc], ws, tiny_checkpoints[0], prune=True)).pruned == 2
    for p in (files[1], files[6]):
        shutil.move(away / p.name, p)
    assert run_embed(_cfg([arc], ws, tiny_checkpoints[0])).processed == 2
    rep = verify(str(ws))
    assert rep.ok, rep.lines()
    # v1 -> v2 -> v1 again (restored with its old mtime, as cp -p does): v1's first row is history
    p = files[2]
    v1 = (p.read_bytes(), os.stat(p).st_mtime_ns)
    shutil.copy(files[3], p)
    assert run_embed(_cfg([arc], ws, tiny_checkpoints[0])).processed == 1
    p.write_bytes(v1[0])
    os.utime(p, ns=(v1[1], v1[1]))
    assert run_embed(_cfg([arc], ws, tiny_checkpoints[0])).processed == 1
    rep = verify(str(ws))
    assert rep.ok, rep.lines()
    # a real duplicate: a current row's version catalogued again under a new id ...
    w = Workspace(ws)
    with w.writer():
        cur = run_query(w, f"SELECT image_id FROM catalog WHERE path = '{files[0]}'").image_id[0]
        cat = w.read_table("catalog")
        row = cat.filter(pc.equal(cat["image_id"], int(cur)))
        new_id = int(w.manifest["next_image_id"])
        row = row.set_column(0, "image_id", pa.array([new_id], pa.int64()))
        w.commit(add=[w.write_part("catalog", row)], next_image_id=new_id + 1)
    assert any("1 file version(s) catalogued more than once" in x for x in verify(str(ws)).problems)
    # ... also when the new row is recorded as replacing the old one (an unchanged file embedded again)
    with w.writer():
        sup = pa.table({"image_id": [int(cur)], "path": [str(files[0])], "superseded_by": [new_id], "run_id": ["t"]}, schema=SUPERSEDED_SCHEMA)
        w.commit(add=[w.write_part("superseded", sup)])
    problems = verify(str(ws)).problems
    assert any("1 file version(s) catalogued more than once" in x for x in problems), problems
    assert not any("more than one current catalog row" in x for x in problems), problems
