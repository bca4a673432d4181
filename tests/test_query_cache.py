"""The query cache (``W/cache/images.duckdb``) answers exactly like the Parquet view, or not at all (issue 6)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from curator import query_cache
from curator.cli import main
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.pipelines.label import run_label
from curator.prompts import load_prompt_set
from curator.query import QueryError, connect, reads_query_cache, run_query
from curator.workspace import Workspace
from tests.conftest import write_raster_archive


def _cfg(arc, ws, cks):
    return EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(c) for c in cks], device="cpu",
                       progress=False, workers=0, batch_size=4, threads=1)


def _images(ws: Workspace, use_cache: bool) -> pd.DataFrame:
    con = connect(ws, sandbox=False, use_cache=use_cache)
    try:
        return con.execute("SELECT * FROM images ORDER BY image_id").df()
    finally:
        con.close()


def _reads_cache(ws: Workspace) -> bool:
    con = connect(ws)
    try:
        return reads_query_cache(con)
    finally:
        con.close()


def _workspace(tmp_path, cks, n=6):
    arc = tmp_path / "arc"
    paths = write_raster_archive(arc, n, seed=4)
    run_embed(_cfg(arc, tmp_path / "ws", cks))
    os.utime(paths[0], ns=(5 * 10**18, 5 * 10**18))  # a changed file: its first row is superseded
    run_embed(_cfg(arc, tmp_path / "ws", cks))
    return arc, Workspace(tmp_path / "ws")


def test_the_cache_holds_the_images_view_row_for_row(tmp_path, tiny_checkpoints, capsys):
    arc, ws = _workspace(tmp_path, tiny_checkpoints[:2])
    assert not query_cache.cache_path(ws).exists()  # small workspace, not asked for: no cache
    assert not _reads_cache(ws)

    assert main(["cache", "--workspace", str(ws.root)]) == 0
    assert "current: queries on `images` read it" in capsys.readouterr().out
    ws.reload()
    assert query_cache.mode(ws) == "on"
    assert _reads_cache(ws)
    cached, parquet = _images(ws, True), _images(ws, False)
    pd.testing.assert_frame_equal(cached, parquet)
    assert list(cached.columns) == list(parquet.columns) and len(cached) == 6

    # independently of DuckDB's views: the newest catalog row per path, with the ensemble's
    # probabilities read from the Parquet parts by pyarrow
    cat = ws.read_table("catalog").to_pandas().sort_values("image_id").groupby("path").tail(1)
    assert sorted(cached["image_id"]) == sorted(cat["image_id"])
    preds = pd.concat([pq.read_table(p).to_pandas() for p in ws.part_paths("predictions")])
    ens = preds[preds["member"] == "ensemble"].set_index("image_id")
    for col in ("edema", "pleural_effusion", "no_finding"):
        np.testing.assert_array_equal(cached[col].to_numpy(), ens.loc[cached["image_id"], col].to_numpy())

    # built in several id ranges (as large workspaces are): the same rows, still in image_id order
    with ws.writer():
        query_cache.refresh(ws, force=True, chunk_ids=2)
    again = _images(ws, True)
    pd.testing.assert_frame_equal(again, parquet)
    con = connect(ws)
    stored = con.execute("SELECT image_id FROM images_cache.images").fetchnumpy()["image_id"]  # storage order
    con.close()
    assert stored.tolist() == sorted(stored.tolist())

    # the sandbox still holds with the cache attached: nothing outside the workspace, no writes to it
    with pytest.raises(QueryError):
        run_query(ws, "SELECT * FROM read_csv('/etc/hostname')")
    with pytest.raises(QueryError):
        run_query(ws, f"CREATE TABLE {query_cache.CACHE_ALIAS}.x AS SELECT 1 AS a")


def test_a_stale_cache_is_never_read(tmp_path, tiny_checkpoints, monkeypatch):
    arc, ws = _workspace(tmp_path, tiny_checkpoints[:1])
    with ws.writer():
        query_cache.refresh(ws)
    assert _reads_cache(ws)
    monkeypatch.setattr(query_cache, "after_write", lambda ws: None)  # writers leave the cache behind

    write_raster_archive(arc, 2, seed=5, start=50)
    run_embed(_cfg(arc, ws.root, tiny_checkpoints[:1]))
    toml = tmp_path / "extra.toml"
    toml.write_text('name = "extra"\npositive = "{}"\nnegative = "no {}"\n[[finding]]\nname = "Pneumoperitoneum"\n')
    run_label(str(ws.root), load_prompt_set(toml), device="cpu", progress=False)
    ws.reload()
    st = query_cache.status(ws)
    assert st.exists and not st.fresh and st.rows == 6
    assert "STALE" in query_cache.describe(st)
    assert not _reads_cache(ws)
    got = run_query(ws, "SELECT count(*) AS n, count(pneumoperitoneum) AS p FROM images")
    assert got.loc[0, "n"] == got.loc[0, "p"] == 8  # the new rows and the new column: Parquet answered

    with ws.writer():
        st = query_cache.refresh(ws)
    assert st.fresh and st.rows == 8 and _reads_cache(ws)
    pd.testing.assert_frame_equal(_images(ws, True), _images(ws, False))


def test_writers_keep_a_wanted_cache_current_and_off_means_off(tmp_path, tiny_checkpoints, monkeypatch, capsys):
    arc = tmp_path / "arc"
    old_files = write_raster_archive(arc, 3, seed=6)
    monkeypatch.setattr(query_cache, "AUTO_ROWS", 3)  # "large" from three images
    run_embed(_cfg(arc, tmp_path / "ws", tiny_checkpoints[:1]))
    ws = Workspace(tmp_path / "ws")
    st = query_cache.status(ws)
    assert st.fresh and st.rows == 3 and st.mode == "auto"  # built by embed without being asked

    write_raster_archive(arc, 2, seed=7, start=10)
    os.utime(old_files[0], ns=(5 * 10**18, 5 * 10**18))  # and one file changes: its old row must leave the cache
    run_embed(_cfg(arc, ws.root, tiny_checkpoints[:1]))
    ws.reload()
    st = query_cache.status(ws)
    assert st.rows == 5 and st.how == "incremental" and _reads_cache(ws)  # embed only added parts: updated in place
    pd.testing.assert_frame_equal(_images(ws, True), _images(ws, False))
    assert len(ws.read_table("superseded")) == 1

    # an update whose row count disagrees with the catalog is thrown away for a full build
    import duckdb

    con = duckdb.connect(str(query_cache.cache_path(ws)))
    con.execute("UPDATE cache_info SET next_image_id = 0")  # would re-insert every row
    con.close()
    write_raster_archive(arc, 1, seed=9, start=30)
    run_embed(_cfg(arc, ws.root, tiny_checkpoints[:1]))
    ws.reload()
    st = query_cache.status(ws)
    assert st.fresh and st.rows == 6 and st.how == "full"
    pd.testing.assert_frame_equal(_images(ws, True), _images(ws, False))
    toml = tmp_path / "extra.toml"
    toml.write_text('name = "extra"\npositive = "{}"\nnegative = "no {}"\n[[finding]]\nname = "Edema"\nphrases = ["interstitial edema"]\n')
    run_label(str(ws.root), load_prompt_set(toml), device="cpu", progress=False)
    ws.reload()
    st = query_cache.status(ws)
    assert st.fresh and st.how == "full" and _reads_cache(ws)  # a relabel replaces parts: built whole
    pd.testing.assert_frame_equal(_images(ws, True), _images(ws, False))  # edema now from the new prompt set

    assert main(["cache", "--workspace", str(ws.root), "--off"]) == 0
    assert "removed" in capsys.readouterr().out
    ws.reload()
    assert not query_cache.cache_path(ws).exists() and query_cache.mode(ws) == "off"
    write_raster_archive(arc, 1, seed=8, start=20)
    run_embed(_cfg(arc, ws.root, tiny_checkpoints[:1]))
    ws.reload()
    assert not query_cache.cache_path(ws).exists()  # off survives the next writer, whatever the size
    assert main(["cache", "--workspace", str(ws.root), "--status"]) == 0
    assert "none (off" in capsys.readouterr().out


def test_a_damaged_cache_or_a_killed_build_loses_nothing(tmp_path, tiny_checkpoints, capsys):
    arc, ws = _workspace(tmp_path, tiny_checkpoints[:1])
    folder = ws.root / query_cache.CACHE_DIR
    folder.mkdir()
    query_cache.cache_path(ws).write_bytes(b"not a duckdb file" * 100)
    assert not _reads_cache(ws)
    assert len(run_query(ws, "SELECT * FROM images")) == 6
    assert main(["info", "--workspace", str(ws.root)]) == 0
    assert "unreadable" in capsys.readouterr().out

    leftover = folder / ".images-0123456789ab.tmp.duckdb"  # a build killed half-way
    leftover.write_bytes(b"x" * 1000)
    (folder / "spill").mkdir()
    (folder / "spill" / "duckdb_temp_block-1.block").write_bytes(b"x")
    assert main(["cache", "--workspace", str(ws.root)]) == 0
    capsys.readouterr()
    assert not leftover.exists() and not (folder / "spill").exists()
    assert query_cache.status(ws).fresh and _reads_cache(ws)
    assert sorted(p.name for p in folder.iterdir()) == [query_cache.CACHE_FILE]

    # a build that fails (here: DuckDB refuses a 1 KB memory limit) says so in one line and keeps the old cache
    assert main(["cache", "--workspace", str(ws.root), "--rebuild", "--memory", "1KB"]) == 2
    assert "query cache not built" in capsys.readouterr().err
    assert query_cache.status(ws).fresh and sorted(p.name for p in folder.iterdir()) == [query_cache.CACHE_FILE]
    with pytest.raises(SystemExit) as exc:  # argparse: a clear error, status 2
        main(["cache", "--workspace", str(ws.root), "--memory", "lots"])
    assert exc.value.code == 2
    assert "expected a size such as 512MB" in capsys.readouterr().err


def test_search_filters_read_the_cache_and_agree_with_the_in_memory_table(tmp_path, tiny_checkpoints):
    from curator.index import build_index
    from curator.search import Searcher, SearchFilter

    arc, ws = _workspace(tmp_path, tiny_checkpoints[:1], n=12)
    with ws.writer():
        build_index(ws)
    med = float(run_query(ws, "SELECT median(edema) AS m FROM images").loc[0, "m"])  # tiny models: all near 0.5
    flt = SearchFilter(condition=f"edema > {med:.9f}", view_positions=[None])
    plain = Searcher(Workspace(ws.root), load_model=False)
    with ws.writer():
        query_cache.refresh(ws)
    cached = Searcher(Workspace(ws.root), load_model=False)
    kinds = {s: s.cursor().execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'search_rows'").fetchone()[0]
             for s in (plain, cached)}
    assert kinds[plain] == "BASE TABLE" and kinds[cached] == "VIEW"  # no in-memory copy with the cache
    ids = sorted(plain.allowed_ids(flt).tolist())
    assert 0 < len(ids) < 12 and sorted(cached.allowed_ids(flt).tolist()) == ids
    assert cached.count(flt) == plain.count(flt) == len(ids)
    v = plain.vector_of(ids[0])
    pd.testing.assert_frame_equal(cached.search(v, k=5, flt=flt), plain.search(v, k=5, flt=flt))
    assert cached.details(ids[0]) == plain.details(ids[0])
