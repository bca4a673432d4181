"""embed / label / index / search / sql over a real workspace (real Parquet, DuckDB, FAISS)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from curator.model import file_sha256
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.pipelines.label import run_label
from curator.prompts import load_prompt_set
from curator.query import QueryError, run_query
from curator.workspace import Workspace
from tests import reference as ref
from tests.checkpoints import TINY
from tests.conftest import write_raster_archive


def embed(arc, ws, cks, **kw):
    cfg = EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(c) for c in cks], device="cpu", workers=kw.pop("workers", 0), batch_size=4, progress=False, **kw)
    return run_embed(cfg)


@pytest.fixture()
def built(tmp_path, tiny_checkpoints):
    arc, ws = tmp_path / "arc", tmp_path / "ws"
    paths = write_raster_archive(arc, 12)
    s = embed(arc, ws, tiny_checkpoints[:2])
    return arc, ws, paths, s


def test_first_run_catalogues_every_image(built):
    arc, ws, paths, s = built
    assert s.processed == 12 and not s.failed
    df = run_query(Workspace(ws), "SELECT path, image_id FROM catalog ORDER BY path")
    assert sorted(df.path) == sorted(str(p.resolve()) for p in paths)
    assert df.image_id.is_unique
    n = run_query(Workspace(ws), "SELECT count(*) AS n FROM predictions WHERE member = 'ensemble'").n[0]
    assert n == 12


def test_rerun_embeds_nothing_and_adding_five_embeds_five(built, tiny_checkpoints):
    arc, ws, paths, _ = built
    s2 = embed(arc, ws, tiny_checkpoints[:2])
    assert s2.processed == 0 and s2.unchanged == 12
    write_raster_archive(arc, 5, seed=99, start=100)
    s3 = embed(arc, ws, tiny_checkpoints[:2])
    assert s3.processed == 5 and s3.unchanged == 12
    w = Workspace(ws)
    counts = run_query(w, "SELECT (SELECT count(*) FROM catalog) c, (SELECT count(*) FROM images) i, "
                          "(SELECT count(DISTINCT image_id) FROM embeddings) e, (SELECT count(*) FROM embeddings) e2")
    assert counts.iloc[0].tolist() == [17, 17, 17, 34]


def test_changed_file_is_re_embedded_once(built, tiny_checkpoints):
    arc, ws, paths, _ = built
    import os
    from PIL import Image

    p = paths[0]
    Image.fromarray(np.full((200, 300), 77, np.uint8)).save(p)
    os.utime(p, ns=(1, 10**18))
    s = embed(arc, ws, tiny_checkpoints[:2])
    assert s.processed == 1
    df = run_query(Workspace(ws), "SELECT count(*) n, count(DISTINCT path) d FROM images")
    assert df.n[0] == df.d[0] == 12


def _counts(ws) -> dict:
    """Rows per view, and the ids of `images`, straight from DuckDB."""
    w = Workspace(ws)
    df = run_query(w, "SELECT (SELECT count(*) FROM catalog) c, (SELECT count(*) FROM images) i, (SELECT count(*) FROM embeddings) e, "
                      "(SELECT count(DISTINCT image_id) FROM predictions WHERE member = 'ensemble') p, (SELECT count(*) FROM errors) err")
    return {k: int(df[k][0]) for k in df.columns}


def test_changed_file_that_now_fails_leaves_the_catalog_and_returns_when_fixed(built, tiny_checkpoints, tmp_path):
    import os

    from PIL import Image

    from curator.index import build_index, index_ids, load_index

    arc, ws, paths, _ = built
    w = Workspace(ws)
    with w.writer():
        build_index(w)
    p = paths[0]
    old_id = int(run_query(w, f"SELECT image_id FROM catalog WHERE path = '{p.resolve()}'").image_id[0])
    p.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # the file changed, and can no longer be read
    s = embed(arc, ws, tiny_checkpoints[:2])
    assert s.processed == 0 and sum(s.failed.values()) == 1 and s.retired == 1
    # the old row described content that no longer exists: gone from every view and the index
    assert _counts(ws) == {"c": 11, "i": 11, "e": 22, "p": 11, "err": 1}
    w.reload()
    assert old_id not in set(index_ids(load_index(w)[0]).tolist())
    assert run_query(w, f"SELECT count(*) n FROM images WHERE path = '{p.resolve()}'").n[0] == 0
    prompts = tmp_path / "p.toml"
    prompts.write_text('[[finding]]\nname = "Pneumoperitoneum"\n')
    assert run_label(str(ws), load_prompt_set(prompts), progress=False).images == 11
    s = embed(arc, ws, tiny_checkpoints[:2])  # still broken: skipped as known bad
    assert s.processed == 0 and s.known_errors == 1 and _counts(ws)["i"] == 11
    Image.fromarray(np.full((200, 300), 77, np.uint8)).save(p)  # fixed
    os.utime(p, ns=(1, 10**18))
    s = embed(arc, ws, tiny_checkpoints[:2])
    assert s.processed == 1 and s.retired == 0
    assert _counts(ws) == {"c": 12, "i": 12, "e": 24, "p": 12, "err": 0}
    w.reload()
    assert sorted(index_ids(load_index(w)[0]).tolist()) == sorted(run_query(w, "SELECT image_id FROM catalog").image_id.tolist())


def test_a_failed_version_restored_over_a_catalogued_file_is_read_again_and_retires_its_row(built, tiny_checkpoints):
    """bad (error row) -> good (catalogued) -> the bad bytes back with their old mtime (cp -p from a
    backup): not skipped as known bad behind the stale row; the row is retired and the error shown."""
    import os

    from curator.verify import verify

    arc, ws, paths, _ = built
    p = paths[0]
    good = (p.read_bytes(), os.stat(p).st_mtime_ns)
    bad = b"\x89PNG\r\n\x1a\n truncated"
    bad_mtime = 10**18
    p.write_bytes(bad)
    os.utime(p, ns=(bad_mtime, bad_mtime))
    s = embed(arc, ws, tiny_checkpoints[:2])
    assert sum(s.failed.values()) == 1 and s.retired == 1
    p.write_bytes(good[0])  # fixed
    os.utime(p, ns=(good[1] + 1, good[1] + 1))
    s = embed(arc, ws, tiny_checkpoints[:2])
    assert s.processed == 1 and _counts(ws)["c"] == 12 and _counts(ws)["err"] == 0
    p.write_bytes(bad)  # the failed version again, as it was
    os.utime(p, ns=(bad_mtime, bad_mtime))
    s = embed(arc, ws, tiny_checkpoints[:2])
    assert (s.known_errors, sum(s.failed.values()), s.retired, s.processed) == (0, 1, 1, 0)
    w = Workspace(ws)
    assert _counts(ws) == {"c": 11, "i": 11, "e": 22, "p": 11, "err": 1}
    assert run_query(w, "SELECT path FROM errors").path.tolist() == [str(p.resolve())]
    rep = verify(str(ws))
    assert rep.ok, rep.lines()
    raw = run_query(w, "SELECT (SELECT count(*) FROM errors_raw) e, (SELECT count(*) FROM superseded_raw) s, (SELECT count(*) FROM catalog_raw) c")
    s = embed(arc, ws, tiny_checkpoints[:2])  # still the failed version: now skipped as known bad, nothing written
    assert (s.known_errors, sum(s.failed.values()), s.retired, s.processed) == (1, 0, 0, 0)
    assert run_query(w, "SELECT (SELECT count(*) FROM errors_raw) e, (SELECT count(*) FROM superseded_raw) s, "
                        "(SELECT count(*) FROM catalog_raw) c").iloc[0].tolist() == raw.iloc[0].tolist()
    assert _counts(ws)["err"] == 1 and verify(str(ws)).ok


def test_predictions_view_holds_current_rows_only(built, tiny_checkpoints):
    import os

    from PIL import Image

    arc, ws, paths, _ = built
    Image.fromarray(np.full((200, 300), 50, np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 10**18))
    embed(arc, ws, tiny_checkpoints[:2])
    assert _counts(ws)["p"] == 12  # 13 images have ensemble rows stored, one of them a replaced row


def test_rerun_with_another_reading_warns_that_catalogued_files_keep_theirs(built, tiny_checkpoints, caplog):
    from curator.readers import ReadOptions

    arc, ws, _, _ = built
    with caplog.at_level("WARNING"):
        s = embed(arc, ws, tiny_checkpoints[:2], read_options=ReadOptions(dicom_conversion="voi"))
    assert s.processed == 0 and s.unchanged == 12
    assert any("dicom_conversion mimic -> voi" in r.getMessage() and "new workspace" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        embed(arc, ws, tiny_checkpoints[:2], read_options=ReadOptions(dicom_conversion="voi"))  # same as the last run: quiet
    assert not any("reads images differently" in r.getMessage() for r in caplog.records)


def test_an_example_image_is_read_the_way_the_workspace_read_its_archive(tmp_path, tiny_checkpoints):
    """A DICOM of a workspace embedded with the VOI conversion finds itself first, similarity 1,
    from the CLI and from the app's upload path: the query is read with the workspace's
    conversion, not the default one (which gives another image here)."""
    from curator.readers import ReadOptions, read_image
    from curator.search import Searcher
    from tests.dicom_factory import write_dicom

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    arc.mkdir()
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:96, 0:80]
    files = []
    for i in range(4):
        px = (600 + 1500 * (((xx - 20 - 8 * i) ** 2 + (yy - 48) ** 2) < 400) + rng.normal(0, 200, (96, 80))).clip(0, 4095)
        files.append(write_dicom(arc / f"f{i}.dcm", px.astype(np.uint16), bits_stored=12, window_center=900, window_width=700,
                                 patient_id=f"P{i}", sop_instance_uid=f"1.2.3.{i}"))
    # the two readings differ for these files (else the test would prove nothing)
    assert not np.array_equal(read_image(files[0], ReadOptions(dicom_conversion="voi")).image,
                              read_image(files[0], ReadOptions(dicom_conversion="mimic")).image)
    embed(arc, ws, tiny_checkpoints[:1], read_options=ReadOptions(dicom_conversion="voi"))
    _cli("index", "--workspace", ws)
    for f in files:
        res = json.loads(_cli("search", "--workspace", ws, "--image", f, "-k", "1", "--json").stdout)["results"]
        assert res[0]["path"] == str(f.resolve()) and res[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    s = Searcher(Workspace(ws), device="cpu")
    stored = run_query(Workspace(ws), "SELECT e.embedding FROM embeddings e JOIN catalog c USING (image_id) "
                                      f"WHERE c.path = '{files[2].resolve()}'").embedding[0]
    got = s.image_vector(files[2].read_bytes())
    assert float(np.dot(got, np.asarray(stored, np.float64))) == pytest.approx(1.0, abs=1e-5)


def test_a_model_of_another_input_size_is_refused_before_anything_is_written(tmp_path):
    """A checkpoint trained at 256 px cannot take the 224 px input CheXzero's preprocessing makes:
    one clear error, and no workspace rows."""
    from curator.workspace import WorkspaceError
    from tests.checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "t256.pt", seed=0, dims={**TINY, "image_size": 256})
    arc = tmp_path / "arc"
    write_raster_archive(arc, 3)
    with pytest.raises(WorkspaceError, match=r"takes 256x256 px inputs; curator embeds at 224x224"):
        embed(arc, tmp_path / "ws", [ck])
    assert not list((tmp_path / "ws").glob("catalog/*.parquet"))


def test_a_cohort_exported_into_the_archive_is_not_embedded(built, tiny_checkpoints):
    """Its images are copies of the archive's (de-identified PNGs or the files themselves): the
    next embed passes the export's folder by, and says so."""
    from curator.cohort import CohortSpec, export_cohort

    arc, ws, _, _ = built
    export_cohort(ws, CohortSpec(name="c", where="edema >= 0", copy_images="copy"), arc / "exports" / "c1")
    assert len(list((arc / "exports" / "c1" / "images").iterdir())) == 12
    (arc / "exports" / "notes").mkdir()
    (arc / "exports" / "notes" / "manifest.json").write_text('{"format": "other"}')  # not an export: walked as usual
    (arc / "exports" / "notes" / "cohort.csv").write_text("x\n")
    s = embed(arc, ws, tiny_checkpoints[:2])
    assert s.processed == 0 and s.unchanged == 12 and s.ignored.get("a curator cohort export") == 1
    # an export given as the archive itself is embedded (one may be handed an export to work on)
    s2 = embed(arc / "exports" / "c1", arc.parent / "ws_export", tiny_checkpoints[:1])
    assert s2.processed == 12 and not s2.ignored.get("a curator cohort export")


def test_a_workspace_embedded_before_exif_orientation_is_told_its_files_keep_their_reading(built, tiny_checkpoints, caplog):
    arc, ws, _, _ = built
    w = Workspace(ws)
    assert w.manifest["reading"]["orientation"] == "exif"
    with w.writer():  # as a workspace of an earlier version recorded it
        w.commit(reading={k: v for k, v in w.manifest["reading"].items() if k != "orientation"})
    with caplog.at_level("WARNING"):
        embed(arc, ws, tiny_checkpoints[:2])
    assert any("orientation None -> exif" in r.getMessage() and "new workspace" in r.getMessage() for r in caplog.records)


def test_workspace_inside_the_archive_is_not_walked_and_the_archive_itself_is_refused(tmp_path, tiny_checkpoints):
    from curator.workspace import WorkspaceError

    arc = tmp_path / "arc"
    write_raster_archive(arc, 4)
    ws = arc / "ws"
    assert embed(arc, ws, tiny_checkpoints[:1]).processed == 4
    (ws / "thumbnails" / "256").mkdir(parents=True)  # as the app makes them: JPEGs inside the workspace
    write_raster_archive(ws / "thumbnails" / "256", 2, seed=5)
    s = embed(arc, ws, tiny_checkpoints[:1])
    assert s.processed == 0 and s.unchanged == 4 and not s.failed
    assert s.ignored["the workspace's own folder"] == 1
    assert not run_query(Workspace(ws), "SELECT path FROM catalog WHERE contains(path, '/ws/')").shape[0]
    fresh = tmp_path / "arc2"
    write_raster_archive(fresh, 2)
    with pytest.raises(WorkspaceError, match="is the workspace folder itself"):
        embed(fresh, fresh, tiny_checkpoints[:1])
    assert not (fresh / "manifest.json").exists()  # nothing was written into the archive


def test_more_like_this_queries_with_the_stored_embedding_not_the_lossy_code(built):
    from curator.index import build_index, read_index_info
    from curator.search import Searcher

    _, ws, _, _ = built
    w = Workspace(ws)
    with w.writer():
        build_index(w, kind="sq8")
    info = read_index_info(w)
    row = duckdb.connect().execute(f"SELECT image_id, embedding FROM read_parquet('{ws}/embeddings/*.parquet') "
                                   "WHERE checkpoint = ? ORDER BY image_id LIMIT 1", [info.checkpoint]).fetchone()
    v = Searcher(Workspace(ws), load_model=False).vector_of(row[0])
    np.testing.assert_array_equal(v, np.asarray(row[1], np.float32))  # the 8-bit code would differ
    assert abs(float(np.linalg.norm(v)) - 1) < 1e-5


def test_different_checkpoint_set_is_refused(built, tiny_checkpoints):
    arc, ws, _, _ = built
    from curator.workspace import WorkspaceError

    with pytest.raises(WorkspaceError, match="different set of checkpoints"):
        embed(arc, ws, tiny_checkpoints[2:])


def test_the_same_checkpoint_twice_is_refused_before_anything_is_written(tmp_path, tiny_checkpoints):
    from curator.cli import main

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_raster_archive(arc, 2)
    copy = tmp_path / "copy.pt"
    shutil.copyfile(tiny_checkpoints[0], copy)
    for second, says in ((tiny_checkpoints[0], "is given twice"), (copy, f"has the same content as {tiny_checkpoints[0]}")):
        with pytest.raises(ValueError, match=says):
            embed(arc, ws, [tiny_checkpoints[0], second])
        assert not (ws / "manifest.json").exists()
    assert main(["-q", "embed", str(arc), "-w", str(ws), "-c", str(tiny_checkpoints[0]), "-c", str(copy), "--device", "cpu",
                 "--workers", "0"]) == 2
    embed(arc, ws, [tiny_checkpoints[0]])  # the workspace is usable with the checkpoint once
    assert run_query(Workspace(ws), "SELECT count(*) AS n FROM catalog").n[0] == 2


def test_relabel_adds_a_finding_without_opening_images(built, tmp_path, tiny_checkpoints):
    arc, ws, paths, _ = built
    before = run_query(Workspace(ws), "SELECT image_id, edema FROM images ORDER BY image_id")
    moved = tmp_path / "moved_away"
    shutil.move(str(arc), str(moved))  # no image can be opened now
    toml = tmp_path / "extra.toml"
    toml.write_text('positive = "{}"\nnegative = "no {}"\n[[finding]]\nname = "Pneumoperitoneum"\n'
                    'phrases = ["pneumoperitoneum", "free air under the diaphragm"]\n')
    s = run_label(str(ws), load_prompt_set(toml), device="cpu", progress=False)
    assert s.images == 12 and s.columns == ["pneumoperitoneum"]
    w = Workspace(ws)
    after = run_query(w, "SELECT image_id, edema, pneumoperitoneum FROM images ORDER BY image_id")
    pd.testing.assert_series_equal(before.edema, after.edema)  # the other columns stay
    assert after.pneumoperitoneum.between(0, 1).all()
    # independent: stored embeddings (read with pyarrow) x reference text weights, mean over members
    emb = pd.concat([pq.read_table(p).to_pandas() for p in (ws / "embeddings").glob("*.parquet")])
    probs = []
    for cp in tiny_checkpoints[:2]:
        model = ref.reference_model(torch.load(cp, weights_only=True), TINY)
        phrases = [["pneumoperitoneum", "free air under the diaphragm"]]
        e = emb[emb.checkpoint == file_sha256(cp)].set_index("image_id").loc[after.image_id, "embedding"]
        x = np.stack(e.to_numpy()).astype(np.float64)
        probs.append(ref.softmax_probs(x, ref.class_weights(model, phrases, "{}"), ref.class_weights(model, phrases, "no {}"))[:, 0])
    np.testing.assert_allclose(after.pneumoperitoneum.to_numpy(), np.mean(probs, axis=0), atol=1e-5)


def test_verify_holds_after_a_changed_file_and_a_new_prompt_set(built, tmp_path, tiny_checkpoints):
    """`curator label` scores current images only; verify asks predictions of those, not of the
    catalog row a changed file left behind (it found a healthy workspace broken)."""
    import os

    from PIL import Image

    from curator.verify import verify

    arc, ws, paths, _ = built
    Image.fromarray(np.full((200, 300), 77, np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))
    assert embed(arc, ws, tiny_checkpoints[:2]).processed == 1
    toml = tmp_path / "extra.toml"
    toml.write_text('positive = "{}"\nnegative = "no {}"\n[[finding]]\nname = "Pneumoperitoneum"\nphrases = ["free air"]\n')
    assert run_label(str(ws), load_prompt_set(toml), device="cpu", progress=False).images == 12
    rep = verify(str(ws))
    assert rep.ok, rep.problems
    # a current image without the new prompt set's predictions is still a problem
    ps = Workspace(ws).manifest["finding_columns"]["pneumoperitoneum"]
    newest = int(run_query(Workspace(ws), "SELECT max(image_id) AS i FROM catalog").i[0])
    parts = [p for p in (ws / "predictions").glob("*.parquet") if ps in pq.read_table(p, columns=["prompt_set"]).column(0).to_pylist()]
    assert parts
    manifest = json.loads((ws / "manifest.json").read_text())
    entries = {e["file"]: e for e in manifest["parts"]["predictions"]}
    for part in parts:
        table = pq.read_table(part)
        kept = table.filter(pc.not_equal(table["image_id"], newest))
        pq.write_table(kept, part)
        entries[f"predictions/{part.name}"]["rows"] = kept.num_rows  # (a part's row count is checked first)
    (ws / "manifest.json").write_text(json.dumps(manifest))
    assert any(f"without predictions of prompt set {ps}" in p for p in verify(str(ws)).problems)


def test_relabel_replaces_a_column_of_the_same_name(built, tmp_path):
    _, ws, _, _ = built
    toml = tmp_path / "edema.toml"
    toml.write_text('negative = "no signs of {}"\n[[finding]]\nname = "Edema"\nphrases = ["pulmonary edema"]\n')
    before = run_query(Workspace(ws), "SELECT edema, cardiomegaly FROM images ORDER BY image_id")
    run_label(str(ws), load_prompt_set(toml), device="cpu", progress=False)
    after = run_query(Workspace(ws), "SELECT edema, cardiomegaly FROM images ORDER BY image_id")
    assert not np.allclose(before.edema, after.edema)
    np.testing.assert_array_equal(before.cardiomegaly, after.cardiomegaly)
    # relabelling the same prompt set twice leaves no duplicate prediction rows
    run_label(str(ws), load_prompt_set(toml), device="cpu", progress=False)
    df = run_query(Workspace(ws), "SELECT count(*) n FROM images")
    assert df.n[0] == 12


def test_new_images_get_every_labelled_finding(built, tmp_path, tiny_checkpoints):
    arc, ws, _, _ = built
    toml = tmp_path / "p.toml"
    toml.write_text('[[finding]]\nname = "Pneumoperitoneum"\n')
    run_label(str(ws), load_prompt_set(toml), device="cpu", progress=False)
    write_raster_archive(arc, 3, seed=5, start=200)
    embed(arc, ws, tiny_checkpoints[:2])
    df = run_query(Workspace(ws), "SELECT count(*) n, count(pneumoperitoneum) p, count(edema) e FROM images")
    assert df.iloc[0].tolist() == [15, 15, 15]


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "curator.cli", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_search_image_finds_itself_and_text_ranking_is_brute_force(built, tiny_checkpoints):
    arc, ws, paths, _ = built
    _cli("index", "--workspace", ws)
    target = paths[3]
    r = _cli("search", "--workspace", ws, "--image", target, "-k", "3", "--json")
    res = json.loads(r.stdout)["results"]
    assert res[0]["path"] == str(target.resolve()) and res[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    r = _cli("search", "--workspace", ws, "small left pleural effusion", "-k", "12", "--json")
    got = [x["image_id"] for x in json.loads(r.stdout)["results"]]
    # brute force with the reference model over the stored vectors of the index's checkpoint
    model = ref.reference_model(torch.load(tiny_checkpoints[0], weights_only=True), TINY)
    q = ref.text_features(model, ["small left pleural effusion"])[0]
    emb = pd.concat([pq.read_table(p).to_pandas() for p in (ws / "embeddings").glob("*.parquet")])
    e = emb[emb.checkpoint == file_sha256(tiny_checkpoints[0])]
    sims = np.stack(e.embedding.to_numpy()).astype(np.float64) @ q
    expected = e.image_id.to_numpy()[np.argsort(-sims, kind="stable")]
    assert got == expected.tolist()
    # --contrast: ranked by the text against its negation, i.e. by the reference model's zero-shot margin
    r = _cli("search", "--workspace", ws, "small left pleural effusion", "-k", "12", "--json", "--contrast")
    out = json.loads(r.stdout)
    pos, neg = ref.text_features(model, ["small left pleural effusion", "no small left pleural effusion"])
    direction = (pos - neg) / np.linalg.norm(pos - neg)
    margin = np.stack(e.embedding.to_numpy()).astype(np.float64) @ direction
    order = np.argsort(-margin, kind="stable")
    assert out["contrast"] == "no {}" and [x["image_id"] for x in out["results"]] == e.image_id.to_numpy()[order].tolist()
    assert [x["similarity"] for x in out["results"]] == pytest.approx(margin[order].tolist(), abs=1e-5)
    r = _cli("search", "--workspace", ws, "--image", target, "--contrast", check=False)
    assert r.returncode != 0 and "--contrast applies to a text search" in r.stderr


def test_sql_formats_views_and_cohort_file(built):
    _, ws, _, _ = built
    r = _cli("sql", "--workspace", ws, "SELECT path, edema FROM images ORDER BY edema DESC LIMIT 10", "--format", "csv")
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "path,edema" and len(lines) == 11
    r = _cli("sql", "--workspace", ws, "SELECT count(*) AS n FROM images", "--format", "json")
    assert json.loads(r.stdout) == [{"n": 12}]
    from curator.query import sql_text

    df = run_query(Workspace(ws), sql_text("cohorts/edema.sql"), {"threshold": 0.0})
    assert len(df) == 12 and df.edema.is_monotonic_decreasing
    df = run_query(Workspace(ws), sql_text("cohorts/edema.sql"), {"threshold": 2.0})
    assert len(df) == 0
    cols = run_query(Workspace(ws), "DESCRIBE images").column_name.tolist()
    for c in ("image_id", "path", "pleural_effusion", "edema", "enlarged_cardiomediastinum", "no_finding"):
        assert c in cols


def test_plain_duckdb_reads_the_parquet(built):
    _, ws, _, _ = built
    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{ws}/catalog/*.parquet')").fetchone()[0]
    m = con.execute(f"SELECT count(*) FROM read_parquet('{ws}/predictions/*.parquet', union_by_name=true) WHERE member='ensemble'").fetchone()[0]
    assert n == m == 12


def test_sql_sandbox_refuses_files_outside_workspace(built, tmp_path):
    _, ws, _, _ = built
    with pytest.raises(QueryError):
        run_query(Workspace(ws), "SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(QueryError):
        run_query(Workspace(ws), f"COPY (SELECT 1) TO '{tmp_path}/out.csv'")
    assert not (tmp_path / "out.csv").exists()
    r = _cli("sql", "--workspace", ws, "SELECT * FROM read_csv('/etc/passwd')", check=False)
    assert r.returncode == 2 and "error" in r.stderr and "root:" not in r.stdout


def test_info_reports_counts(built):
    _, ws, _, _ = built
    r = _cli("info", "--workspace", ws, "--json")
    info = json.loads(r.stdout)
    assert info["images"] == 12 and len(info["checkpoints"]) == 2
    assert info["prompt_sets"][0]["columns"][0] == "atelectasis"
    assert info["runs"][0]["counts"]["processed"] == 12
    t = info["runs"][0]["timings"]  # where the embed run's time went, and that the parts fit in the whole
    assert t["model_s"] > 0 and t["wait_s"] >= 0 and t["model_s"] + t["wait_s"] <= t["total_s"]
    text = _cli("info", "--workspace", ws).stdout
    assert f"{t['total_s']:.1f} s: " in text and "model" in text


def test_decoding_in_worker_processes_gives_the_same_rows(tmp_path, tiny_checkpoints):
    arc = tmp_path / "arc"
    write_raster_archive(arc, 9)
    embed(arc, tmp_path / "w0", tiny_checkpoints[:1], workers=0)
    embed(arc, tmp_path / "w2", tiny_checkpoints[:1], workers=2)
    q = "SELECT path, edema, atelectasis FROM images ORDER BY path"
    a, b = run_query(Workspace(tmp_path / "w0"), q), run_query(Workspace(tmp_path / "w2"), q)
    pd.testing.assert_frame_equal(a, b)


def test_label_refuses_findings_named_like_the_columns_curator_adds(built, tmp_path):
    _, ws, _, _ = built
    from curator.prompts import PromptSetError

    for name, column in (("Rank", "rank"), ("Text Similarity", "text_similarity"), ("Edema label", "edema_label"), ("Split", "split")):
        p = tmp_path / f"{column}.toml"
        p.write_text(f'[[finding]]\nname = "{name}"\n')
        with pytest.raises(PromptSetError, match=f"{column} would clash"):
            run_label(str(ws), load_prompt_set(p), device="cpu", progress=False)


def test_threads_hold_for_the_run_only(tmp_path, tiny_checkpoints, monkeypatch):
    """`run_embed(threads=N)` runs with N torch threads and leaves the caller's count as it was,
    after a run and after a failed one (a notebook user keeps their own setting)."""
    import curator.pipelines.embed as embed_mod

    arc = tmp_path / "arc"
    write_raster_archive(arc, 3, seed=2)
    seen = []
    real = embed_mod._run_embed
    monkeypatch.setattr(embed_mod, "_run_embed", lambda cfg, cks: (seen.append(torch.get_num_threads()), real(cfg, cks))[1])
    before = torch.get_num_threads()
    mine = 3 if before != 3 else 2
    torch.set_num_threads(mine)
    try:
        s = embed(arc, tmp_path / "ws", tiny_checkpoints[:1], threads=1)
        assert s.processed == 3 and seen == [1]
        assert torch.get_num_threads() == mine
        with pytest.raises(FileNotFoundError):
            embed(tmp_path / "no-such-archive", tmp_path / "ws2", tiny_checkpoints[:1], threads=1)
        assert seen == [1, 1] and torch.get_num_threads() == mine
        embed(arc, tmp_path / "ws", tiny_checkpoints[:1])  # no threads given: the caller's count, untouched
        assert seen == [1, 1, mine] and torch.get_num_threads() == mine
    finally:
        torch.set_num_threads(before)
