"""The FAISS index at any size: choice by budget, recall, ids, append, filters, range, mmap, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from curator import index as ci
from curator.workspace import CATALOG_SCHEMA, EMBEDDINGS_SCHEMA, SUPERSEDED_SCHEMA, Workspace

D = 48
CK = "c" * 64


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """Small indexes gain nothing from threads, and OpenMP waits badly on a busy machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int = D, seed: int = 0, clusters: int = 60) -> np.ndarray:
    """Unit vectors from a mixture of Gaussians on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    a = rng.integers(0, clusters, n)
    x = centres[a] + rng.uniform(0.3, 0.6, clusters)[a, None] * rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


N = 12_000
X = clustered(N + 200)
X, Q = X[:N], X[N:]  # Q: held-out queries from the same mixture
IDS = (np.random.default_rng(1).permutation(N) * 5 + 11).astype(np.int64)  # image ids: sparse, unordered


def brute_top(vecs, ids, q, k, allowed=None):
    m = np.ones(len(ids), bool) if allowed is None else np.isin(ids, allowed)
    s = q @ vecs[m].T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids[m][order]


@pytest.fixture(scope="module")
def built():
    """Every index type over the same vectors, built once."""
    out = {}
    for kind in ci.KINDS:
        plan = ci.choose_index(N, D, 1.0, kind, refine=False)  # the codes alone (refine: test_refine.py)
        out[kind] = ci.build_from_source(ci.ArrayVectors(IDS, X, chunk_rows=2500), plan, recall_sample=400, seed=0)
    return out


def test_choice_by_size_and_budget():
    c = ci.choose_index
    assert c(500_000, 512, 8).kind == "flat"
    assert c(500_000, 512, 1.3).kind == "fp16"
    assert c(500_000, 512, 1.0).kind == "sq8"
    big = c(3_000_000, 512, 100)
    assert big.kind == "ivf-flat" and big.nlist == round(4 * np.sqrt(3e6)) and "IVF" in big.describe()
    assert c(3_000_000, 512, 4).kind == "ivf-sq8"
    p = c(10_000_000, 512, 8)
    assert (p.kind, p.nlist) == ("ivf-sq8", 12649) and p.est_bytes < 8 * 2**30
    pq = c(10_000_000, 512, 3)
    assert pq.kind == "ivf-pq" and 512 % pq.pq_m == 0 and pq.est_bytes < 3 * 2**30 and pq.pq_m >= 64
    with pytest.raises(ValueError, match=r"no index fits a 0.2 GB memory budget for 10,000,000 vectors.*needs ~1.\d+ GB.*--budget-gb"):
        c(10_000_000, 512, 0.2)  # not even 1-byte PQ codes: an error, not an index both worse and over the budget
    assert "of the 0.07 GB budget" in c(100, 512, 0.07).reason  # (three significant digits, not "0.1 GB")
    assert c(1_000, 512, 8, kind="ivf-pq").kind == "ivf-pq"
    assert "over" in c(3_000_000, 512, 1, kind="flat").reason
    assert c(2000, 512, 8, exact_max=1000).kind == "ivf-flat"
    with pytest.raises(ValueError):
        c(10, 8, 1, kind="hnsw")


def test_recall_at_10_against_exact_search(built):
    truth = brute_top(X, IDS, Q, 10)
    for kind, (index, rep) in built.items():
        found = ci.search_vectors(index, Q, 10)[1]
        independent = ci.recall_at_k(found, truth, 10)
        assert rep.recall_queries > 0 and rep.recall_at_10 is not None
        if kind == "flat":
            assert rep.recall_at_10 == 1.0 and independent == 1.0
        elif kind == "ivf-pq":  # PQ codes limit recall; it is measured and reported, not promised
            assert independent > 0.5 and abs(independent - rep.recall_at_10) < 0.15
        else:
            assert rep.recall_at_10 >= 0.95 and independent >= 0.95, (kind, rep.recall_at_10, independent, rep.tune_curve)
        if kind in ci.IVF_KINDS:
            assert index.nlist == ci.ivf_nlist(N) and 1 <= rep.nprobe <= index.nlist and index.nprobe == rep.nprobe


def test_ids_are_image_ids(built):
    for kind, (index, _) in built.items():
        got = ci.index_ids(index)
        assert len(got) == N and np.array_equal(np.sort(got), np.sort(IDS)), kind
        tol = {"flat": 0, "ivf-flat": 0, "fp16": 1e-3, "sq8": 0.05, "ivf-sq8": 0.05, "ivf-pq": 0.6}[kind]
        for i in (0, 17, N - 1):
            v = ci.reconstruct(index, IDS[i])
            assert v is not None and np.abs(v - X[i]).max() <= tol, kind
        assert ci.reconstruct(index, 3) is None  # not an image id
        _, top = ci.search_vectors(index, X[:20], 1)
        assert (top[:, 0] == IDS[:20]).mean() >= (0.9 if kind == "ivf-pq" else 1.0), kind


@pytest.mark.parametrize("share", [0.01, 0.1])
def test_filtered_search_returns_k_that_pass_for_every_type(built, share, monkeypatch):
    allowed = np.sort(np.random.default_rng(2).choice(IDS, int(N * share), replace=False))
    truth = brute_top(X, IDS, Q, 10, allowed)
    for exact_max in (ci.EXACT_FILTER_MAX, 0):  # 0: IVF never scores the allowed set exactly
        monkeypatch.setattr(ci, "EXACT_FILTER_MAX", exact_max)
        for kind, (index, _) in built.items():
            sims, got = ci.search_vectors_filtered(index, Q, 10, allowed)
            assert got.shape == (len(Q), 10) and np.isin(got, allowed).all(), (kind, share, exact_max)
            assert np.all(np.diff(sims, axis=1) <= 1e-6)
            if kind == "flat":
                assert np.array_equal(got, truth)
            else:
                assert ci.recall_at_k(got, truth) >= (0.6 if kind == "ivf-pq" else 0.9), (kind, share)
    # an allowed set smaller than k: all of it comes back
    few = IDS[[3, 99, 1234]]
    for kind, (index, _) in built.items():
        _, got = ci.search_vectors_filtered(index, Q[:2], 10, few)
        assert sorted(got[0][got[0] >= 0].tolist()) == sorted(few.tolist()), kind


def test_range_search_equals_brute_force(built):
    allowed = np.sort(IDS[::7])
    for kind, (index, _) in built.items():
        stored = np.asarray(index.reconstruct_batch(IDS), np.float32)  # what the codes stand for
        for qi in range(3):
            q = Q[qi]
            s = stored @ q
            srt = np.sort(s)[::-1]
            # a threshold in a clear gap between two stored similarities, ~50 results in
            j = int(np.argmax(srt[40:80] - srt[41:81])) + 40
            thr = float((srt[j] + srt[j + 1]) / 2)
            ids, sims = ci.range_search(index, q, thr)
            assert set(ids.tolist()) == set(IDS[s > thr].tolist()), kind
            assert np.all(np.diff(sims) <= 0) and np.all(sims > thr)
            ids_f, _ = ci.range_search(index, q, thr, allowed_ids=allowed)
            assert set(ids_f.tolist()) == set(IDS[(s > thr) & np.isin(IDS, allowed)].tolist()), kind
        assert len(ci.range_search(index, Q[0], 1.5)[0]) == 0


def _texty(n: int, seed: int) -> np.ndarray:
    """Queries that lie apart from the vectors, as CLIP text embeddings lie apart from the images
    (the "modality gap"): a random direction plus a little of one vector."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, D))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    t = 0.4 * X[rng.integers(0, N, n)] + g
    return (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)


def test_text_queries_tune_their_own_nprobe():
    """Two thirds of the text queries tune nprobe_text, the last third measures recall_at_10_text; held-out
    text-like queries (checked here by brute force) need it: the image queries' nprobe misses
    more of their neighbours."""
    plan = ci.choose_index(N, D, 1.0, "ivf-flat", refine=False)
    index, rep = ci.build_from_source(ci.ArrayVectors(IDS, X, chunk_rows=2500), plan, recall_sample=400, seed=0,
                                      text_queries=_texty(80, 7), text_groups=np.arange(80) // 2)  # (pairs stay in one half)
    assert rep.recall_queries_text == 2 * (40 - 2 * 40 // 3) and rep.recall_at_10_text >= 0.9 and rep.tune_curve_text
    assert rep.nprobe_text > rep.nprobe and index.nprobe == rep.nprobe  # image searches keep theirs
    held_out = _texty(40, 8)
    truth = brute_top(X, IDS, held_out, 10)
    at_image = ci.recall_at_k(ci.search_vectors(index, held_out, 10)[1], truth)
    at_text = ci.recall_at_k(ci.search_vectors(index, held_out, 10, nprobe=rep.nprobe_text)[1], truth)
    assert at_text >= 0.9 and at_text > at_image + 0.03, (at_image, at_text)
    # an exact index has nothing to tune, and measures them all
    plan = ci.choose_index(N, D, 1.0, "flat", refine=False)
    _, rep = ci.build_from_source(ci.ArrayVectors(IDS, X, chunk_rows=2500), plan, recall_sample=50, text_queries=_texty(30, 9))
    assert (rep.nprobe_text, rep.recall_queries_text, rep.recall_at_10_text) == (0, 30, 1.0)


@pytest.mark.parametrize("needs_more", [0, 1])
def test_two_parts_of_the_phrases_tune_the_larger_nprobe_is_kept_and_a_third_measures(monkeypatch, needs_more):
    """At 10M vectors one half of the text queries cleared the target with 128 lists where the
    other half got 0.925: two parts of the phrases tune, the larger nprobe is kept (whichever part
    needs it), and the recall reported is measured, at that nprobe, on a third part that tuned
    nothing."""
    calls = []
    tune = ci._tune_nprobe

    def recorded(index, queries, truth, self_ids, target, groups=None):
        p, curve = tune(index, queries, truth, self_ids, target, groups)
        if groups is not None and len(calls) - 1 == needs_more:  # this part of the phrases needs more lists
            p, curve = min(index.nlist, 4 * p), curve + [("more", needs_more)]
        calls.append((queries, groups, p, curve))
        return p, curve

    monkeypatch.setattr(ci, "_tune_nprobe", recorded)
    plan = ci.choose_index(N, D, 1.0, "ivf-flat", refine=False)
    texts = _texty(70, 7)
    index, rep = ci.build_from_source(ci.ArrayVectors(IDS, X, chunk_rows=2500), plan, recall_sample=400, seed=0,
                                      text_queries=texts, text_groups=np.arange(70) // 2)
    assert len(calls) == 3 and calls[0][1] is None  # image queries, then two parts of the phrases
    (q1, g1, p1, _), (q2, g2, p2, _) = calls[1], calls[2]
    assert not set(g1.tolist()) & set(g2.tolist()) and (len(q1), len(q2)) == (2 * (35 // 3), 2 * (2 * 35 // 3 - 35 // 3))
    assert [p1, p2][needs_more] > [p1, p2][1 - needs_more]
    assert rep.nprobe_text == max(p1, p2, calls[0][2]) and rep.tune_curve_text[-1] == ("more", needs_more)
    # the third part: the text queries neither tuning part saw
    seen = {tuple(np.round(v, 6)) for v in np.concatenate([q1, q2])}
    third = np.array([t for t in texts if tuple(np.round(t, 6)) not in seen])
    assert len(third) == 70 - len(q1) - len(q2) == rep.recall_queries_text
    independent = ci.recall_at_k(ci.search_vectors(index, third, 10, nprobe=rep.nprobe_text)[1], brute_top(X, IDS, third, 10))
    assert rep.recall_at_10_text == pytest.approx(independent)


# ------------------------------------------------------------------------------------------------
# Workspace-level: build, append, mmap, CLI


def _add_images(ws: Workspace, ids: np.ndarray, vecs: np.ndarray) -> None:
    m = len(ids)
    cols = {f.name: pa.nulls(m, f.type) for f in CATALOG_SCHEMA}
    cols["image_id"] = pa.array(ids, pa.int64())
    cols["path"] = pa.array([f"/archive/{i}.png" for i in ids])
    catalog = pa.table(cols, schema=CATALOG_SCHEMA)
    offsets = pa.array(np.arange(0, (m + 1) * vecs.shape[1], vecs.shape[1], dtype=np.int32))
    emb = pa.ListArray.from_arrays(offsets, pa.array(vecs.reshape(-1), pa.float32()))
    embeddings = pa.table({"image_id": pa.array(ids, pa.int64()), "checkpoint": pa.array([CK] * m), "embedding": emb}, schema=EMBEDDINGS_SCHEMA)
    parts = [ws.write_part("catalog", catalog), ws.write_part("embeddings", embeddings)]
    ws.commit(add=parts, next_image_id=int(max(ids.max() + 1, ws.manifest.get("next_image_id", 1))),
              checkpoints={CK: {"path": "/nowhere/ck.pt", "embed_dim": vecs.shape[1]}}, ensemble=[CK])


def _workspace(path, n):
    ws = Workspace(path)
    with ws.writer():
        for s in range(0, n, 1000):  # several parts
            _add_images(ws, IDS[s:min(n, s + 1000)], X[s:min(n, s + 1000)])
    return ws


def _count_streamed(monkeypatch) -> list[int]:
    """The sizes of the chunks index updates read from the workspace, appended as they are read."""
    streamed = []
    chunks = ci.WorkspaceVectors.chunks

    def counting(self):
        for ids, v in chunks(self):
            streamed.append(len(ids))
            yield ids, v

    monkeypatch.setattr(ci.WorkspaceVectors, "chunks", counting)
    return streamed


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_equal_similarities_rank_the_smaller_id_first_in_top_k_as_in_above(tmp_path, kind):
    """Three copies of one vector (ids 40, 22, 33 written in that order): top-k and `above` list
    them in the same order, the smaller image id first."""
    from curator.search import above, search

    ws = Workspace(tmp_path / "ws")
    vecs = X[:1200].copy()
    ids = IDS[:1200].copy()
    ids[[5, 6, 7]] = [40, 22, 33]  # (IDS are 1 mod 5: no clash)
    vecs[[5, 6, 7]] = vecs[5]
    with ws.writer():
        _add_images(ws, ids, vecs)
        ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=100)
    top = search(ws, vecs[5], k=3)
    assert top.image_id.tolist() == [22, 33, 40]
    from curator.search import Searcher

    app_top = Searcher(ws, checkpoint=None, device="cpu").search(vecs[5], k=3)  # the app's path
    assert app_top.image_id.tolist() == [22, 33, 40]
    assert Searcher(ws, checkpoint=None, device="cpu").search(vecs[5], k=2, exclude=[22]).image_id.tolist() == [33, 40]
    assert above(ws, vecs[5], 0.999).image_id.tolist()[:3] == [22, 33, 40]


def test_info_notes_an_ivf_index_grown_well_past_its_training(tmp_path):
    """Appended images were never part of the recall measurement: `curator info` says so once
    they are more than a quarter of what the lists were trained on (not before; not for flat)."""
    from curator.info import format_info, workspace_info

    ws = _workspace(tmp_path / "ws", 2000)
    with ws.writer():
        ci.build_index(ws, kind="ivf-flat", budget_gb=1, recall_sample=200)
        _add_images(ws, IDS[2000:2400], X[2000:2400])  # +20%: no note
        ci.sync_index(ws)
    text = format_info(workspace_info(str(ws.root)))
    assert "recall@10 " in text and "measured at the build on 2,000 images" in text and "note:" not in text
    with ws.writer():
        _add_images(ws, IDS[2400:2600], X[2400:2600])  # +30%
        info = ci.sync_index(ws)
    assert info.count == 2600 and info.built_count == 2000
    text = format_info(workspace_info(str(ws.root)))
    assert "note: 600 of its 2,600 images were appended after its lists were trained on 2,000" in text
    assert ci.recall_note(ci.IndexInfo(**{**info.__dict__, "index_type": "flat"})) is None


@pytest.mark.parametrize("kind", ["flat", "sq8", "ivf-sq8", "ivf-pq"])
def test_append_adds_only_new_images_without_rebuild(tmp_path, kind, monkeypatch):
    n0, n1 = 3000, 3600
    ws = _workspace(tmp_path / "ws", n0)
    with ws.writer():
        info0 = ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=200)
        old, _ = ci.load_index(ws, mmap=False)
        before = old.reconstruct_batch(IDS[:50])
        _add_images(ws, IDS[n0:n1], X[n0:n1])
        streamed = _count_streamed(monkeypatch)
        info = ci.sync_index(ws)
    assert sum(streamed) == n1 - n0  # only the new vectors were read and encoded
    assert info.count == n1 and info.trained_at == info0.trained_at and info.appended_at and info.index_type == kind
    assert info.built_at != info0.built_at  # the file changed (the app reloads on it)
    index, info = ci.load_index(ws)
    got = ci.index_ids(index)
    assert len(got) == n1 and np.array_equal(np.sort(got), np.sort(IDS[:n1]))
    np.testing.assert_array_equal(index.reconstruct_batch(IDS[:50]), before)  # old codes copied, not re-encoded
    if kind in ci.IVF_KINDS:
        np.testing.assert_array_equal(ci._centroids(index), ci._centroids(old))  # not retrained
        assert index.nprobe == info0.nprobe
    # same results as a fresh build of all the images
    with ws.writer():
        fresh_info = ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=200)
    fresh, _ = ci.load_index(ws)
    _, a = ci.search_vectors(index, Q, 10)
    _, b = ci.search_vectors(fresh, Q, 10)
    if kind == "flat":
        assert np.array_equal(a, b)
    else:
        truth = brute_top(X[:n1], IDS[:n1], Q, 10)
        floor = 0.6 if kind == "ivf-pq" else 0.93
        assert ci.recall_at_k(a, truth) >= floor and ci.recall_at_k(b, truth) >= floor
        assert ci.recall_at_k(a, b) >= (0.4 if kind == "ivf-pq" else 0.9)
    assert fresh_info.trained_at != info0.trained_at


def _retire(ws: Workspace, ids: np.ndarray) -> None:
    """Retire catalog rows as `embed --prune` does (a superseded row with no successor)."""
    m = len(ids)
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "path": pa.array([f"/archive/{i}.png" for i in ids]),
                      "superseded_by": pa.nulls(m, pa.int64()), "run_id": pa.array(["test"] * m)}, schema=SUPERSEDED_SCHEMA)
    ws.commit(add=[ws.write_part("superseded", table)])


def _lists(index) -> dict[int, tuple[list, bytes]]:
    """Each IVF list's (ids, codes), read through FAISS."""
    import faiss

    ivf = ci._ivf_of(index)
    out = {}
    for lst in range(ivf.nlist):
        n = ivf.invlists.list_size(lst)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).tolist() if n else []
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(lst), n * ivf.code_size).tobytes() if n else b""
        out[lst] = (ids, codes)
    return out


@pytest.mark.parametrize("kind", ci.KINDS)
def test_images_that_leave_are_removed_in_place(tmp_path, kind, monkeypatch):
    """Changed files and `embed --prune` take images out of the catalog: the index update drops
    them and appends the new ones in one pass, without retraining or re-encoding the rest."""
    n0, n1 = 3000, 3200
    gone = IDS[100:400]
    monkeypatch.setattr(ci, "FILL_ROWS", 97)  # the old codes are copied in many blocks
    ws = _workspace(tmp_path / "ws", n0)
    with ws.writer():
        info0 = ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=200)
        old, _ = ci.load_index(ws, mmap=False)
        old_lists = _lists(old) if kind in ci.IVF_KINDS else None
        _retire(ws, gone)
        _add_images(ws, IDS[n0:n1], X[n0:n1])
        streamed = _count_streamed(monkeypatch)
        monkeypatch.setattr(ci, "rebuild_index", lambda *a: pytest.fail("rebuilt instead of updated"))
        info = ci.sync_index(ws)
    assert sum(streamed) == n1 - n0  # only the new images were read
    left = np.setdiff1d(IDS[:n1], gone)
    assert info.count == len(left) and info.trained_at == info0.trained_at and info.appended_at
    for mmap in (False, True):
        index, _ = ci.load_index(ws, mmap=mmap)
        assert np.array_equal(np.sort(ci.index_ids(index)), left)
    kept = np.setdiff1d(IDS[:n0], gone)
    np.testing.assert_array_equal(index.reconstruct_batch(kept), old.reconstruct_batch(kept))  # codes copied as they were
    if kind in ci.IVF_KINDS:  # each list: its old entries less the removed ones, in order, then the new ones
        new_lists, dropped = _lists(index), set(gone.tolist())
        for lst, (ids, codes) in old_lists.items():
            cs = len(codes) // max(1, len(ids))
            keep = [j for j, i in enumerate(ids) if i not in dropped]
            got_ids, got_codes = new_lists[lst]
            assert got_ids[:len(keep)] == [ids[j] for j in keep]
            assert got_codes[:len(keep) * cs] == b"".join(codes[j * cs:(j + 1) * cs] for j in keep)
            assert set(got_ids[len(keep):]) <= set(IDS[n0:n1].tolist())
    # no search path returns a removed image; results as good as before
    _, top = ci.search_vectors(index, X[100:400:10], 10)
    assert not np.isin(top, gone).any()
    truth = brute_top(X[:n1][np.isin(IDS[:n1], left)], IDS[:n1][np.isin(IDS[:n1], left)], Q, 10)
    _, a = ci.search_vectors(index, Q, 10)
    floor = 0.6 if kind == "ivf-pq" else 0.93
    assert ci.recall_at_k(a, truth) >= floor
    if kind == "flat":
        assert np.array_equal(a, truth)
    allowed = np.concatenate([gone[:50], left[::40]])
    _, f = ci.search_vectors_filtered(index, Q, 10, allowed)
    assert not np.isin(f, gone).any() and (f >= 0).all()
    hits, _ = ci.range_search(index, X[150], 0.3)
    assert len(hits) and not np.isin(hits, gone).any()
    assert ci.reconstruct(index, int(gone[0])) is None and ci.reconstruct(index, int(left[0])) is not None
    store = ci.refine_of(index)
    if store is not None:
        assert store.count == len(left)
        _, found = store.lookup(np.concatenate([gone, left]))
        assert not found[:len(gone)].any() and found[len(gone):].all()
    # every file the index.json names exists, and nothing else is left in the folder
    names = sorted(p.split("/")[-1] for p in ci._files_of(info))
    assert sorted(p.name for p in (ws.root / "index").iterdir() if p.name != "index.json") == names


def test_reads_skip_row_groups_whose_id_range_holds_none_wanted(tmp_path):
    import pyarrow.parquet as pq

    t = pa.table({"image_id": pa.array(np.arange(1000, dtype=np.int64) * 3), "x": pa.array(np.zeros(1000))})
    pq.write_table(t, tmp_path / "s.parquet", row_group_size=250)  # ids 0..747, 750..1497, 1500..2247, 2250..2997
    pf = pq.ParquetFile(tmp_path / "s.parquet")
    assert ci._row_groups_holding(pf, np.array([5, 3000])) == [0]  # 5 lies in group 0's range (not an id there)
    assert ci._row_groups_holding(pf, np.array([748, 749])) == []  # between two groups' ranges
    assert ci._row_groups_holding(pf, np.array([-1, 1500, 2997])) == [2, 3]
    assert ci._row_groups_holding(pf, np.array([], np.int64)) == []
    pq.write_table(t, tmp_path / "n.parquet", row_group_size=250, write_statistics=False)
    assert ci._row_groups_holding(pq.ParquetFile(tmp_path / "n.parquet"), np.array([748])) == [0, 1, 2, 3]  # no statistics: read
    # through a workspace: the vectors of ids spread over parts and groups, nothing else
    ws = _workspace(tmp_path / "ws", 4000)
    want = np.sort(IDS[[5, 999, 1000, 2500, 3999]])
    got_ids, got = ci.WorkspaceVectors(ws, CK, want).take(want)
    assert np.array_equal(got_ids, want)
    np.testing.assert_array_equal(got, X[[int(np.flatnonzero(IDS == i)[0]) for i in want]])


@pytest.mark.parametrize("where", ["fill", "copies", "save"])
def test_an_update_that_fails_leaves_the_old_index_and_no_files(tmp_path, monkeypatch, where):
    from curator import refine as rf

    ws = _workspace(tmp_path / "ws", 3000)
    with ws.writer():
        ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
        _add_images(ws, IDS[3000:3300], X[3000:3300])
        ci.sync_index(ws)  # a second segment of copies
    before = sorted(p.name for p in (ws.root / "index").iterdir())
    _, want = ci.search_vectors(ci.load_index(ws)[0], Q, 10)
    calls = []

    def dies(*a, **k):
        raise OSError("disk full")

    if where == "fill":  # after the copies' removal and the new segment were written
        monkeypatch.setattr(ci, "_fill_ivf", dies)
    elif where == "copies":  # the second segment's new ids file: the first segment's new files are written
        save_npy = rf._save_npy

        def second_dies(*a):
            calls.append(a)
            if len(calls) == 3:
                raise OSError("disk full")
            return save_npy(*a)

        monkeypatch.setattr(rf, "_save_npy", second_dies)
    else:  # the index file and radii written, index.json not
        monkeypatch.setattr(ci, "_write_info", dies)
    gone = np.concatenate([IDS[:1000:7], IDS[3000:3300:7]])
    with ws.writer():
        _retire(ws, gone)
        _add_images(ws, IDS[3300:3400], X[3300:3400])
        with pytest.raises(OSError, match="disk full"):
            ci.sync_index(ws)
    monkeypatch.undo()
    assert where != "copies" or len(calls) == 3
    assert sorted(p.name for p in (ws.root / "index").iterdir() if not p.name.endswith(".tmp")) == before  # nothing left, nothing lost
    np.testing.assert_array_equal(ci.search_vectors(ci.load_index(ws)[0], Q, 10)[1], want)
    with ws.writer():
        info = ci.sync_index(ws)
    assert info.appended_at and info.count == 3400 - len(gone)
    assert np.array_equal(np.sort(ci.index_ids(ci.load_index(ws)[0])), np.setdiff1d(IDS[:3400], gone))


def test_an_index_holding_an_image_twice_is_rebuilt_not_updated(tmp_path):
    ws = _workspace(tmp_path / "ws", 2000)
    with ws.writer():
        ci.build_index(ws, kind="flat", budget_gb=1)
        index, info = ci.load_index(ws, mmap=False)
        index.add_with_ids(X[:1], IDS[:1])  # a damaged index: one id twice
        ci._save(ws, index, info)
        _add_images(ws, IDS[2000:2010], X[2000:2010])
        info = ci.sync_index(ws)
    assert info.appended_at is None and info.count == 2010
    got = ci.index_ids(ci.load_index(ws)[0])
    assert len(got) == 2010 and np.array_equal(np.sort(got), np.sort(IDS[:2010]))


def test_most_of_the_index_leaving_rebuilds_it(tmp_path):
    ws = _workspace(tmp_path / "ws", 3000)
    with ws.writer():
        info0 = ci.build_index(ws, kind="ivf-flat", budget_gb=1, recall_sample=200)
        _retire(ws, IDS[:1600])  # more than half: the lists would describe vectors no longer there
        info = ci.sync_index(ws)
    assert info.appended_at is None and info.trained_at != info0.trained_at and info.count == 1400
    index, _ = ci.load_index(ws)
    assert np.array_equal(np.sort(ci.index_ids(index)), np.sort(IDS[1600:3000]))


def test_sync_rebuilds_when_the_size_changes_the_choice(tmp_path, monkeypatch):
    ws = _workspace(tmp_path / "ws", 2000)
    monkeypatch.setattr(ci, "EXACT_MAX", 2200)
    with ws.writer():
        assert ci.build_index(ws, budget_gb=1).index_type == "flat"
        _add_images(ws, IDS[2000:2500], X[2000:2500])
        info = ci.sync_index(ws)
    assert info.index_type == "ivf-flat" and info.count == 2500 and info.appended_at is None
    assert [p.name for p in (ws.root / "index").glob("*.faiss")] == [os.path.basename(info.file)]
    assert os.path.basename(info.file).startswith(f"{CK[:12]}.ivf-flat.")


@pytest.mark.parametrize("kind", ["flat", "sq8", "ivf-flat", "ivf-sq8"])
def test_memory_mapped_loading_gives_the_same_results(tmp_path, kind):
    ws = _workspace(tmp_path / "ws", 4000)
    with ws.writer():
        ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=200)
    mem, _ = ci.load_index(ws, mmap=False)
    mapped, _ = ci.load_index(ws, mmap=True)
    assert mapped._curator_mmapped and not mem._curator_mmapped
    allowed = IDS[:4000:50]
    np.testing.assert_array_equal(ci.search_vectors(mem, Q, 10)[1], ci.search_vectors(mapped, Q, 10)[1])
    np.testing.assert_array_equal(ci.search_vectors_filtered(mem, Q, 10, allowed)[1], ci.search_vectors_filtered(mapped, Q, 10, allowed)[1])
    np.testing.assert_array_equal(ci.range_search(mem, Q[0], 0.5)[0], ci.range_search(mapped, Q[0], 0.5)[0])
    np.testing.assert_array_equal(ci.reconstruct(mem, IDS[5]), ci.reconstruct(mapped, IDS[5]))
    assert np.array_equal(np.sort(ci.index_ids(mapped)), np.sort(IDS[:4000]))
    meta = json.loads((ws.root / "index" / "index.json").read_text())
    for key in ("index_type", "nlist", "nprobe", "recall_at_10", "built_at", "count", "description"):
        assert key in meta
    assert meta["index_type"] == kind and (meta["nlist"] > 0) == (kind in ci.IVF_KINDS)


def _cli(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "curator.cli", *map(str, args)], capture_output=True, text=True, env=env, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_cli_index_with_budget_end_to_end(tmp_path, tiny_checkpoints):
    from curator.pipelines.embed import EmbedConfig, run_embed

    from tests.conftest import write_raster_archive

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_raster_archive(arc, 12)

    def embed():
        run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                              workers=0, batch_size=4, progress=False))

    embed()
    r = _cli("index", "--workspace", ws, "--budget-gb", "1")
    assert "chose flat (IDMap2,Flat" in r.stdout and "recall@10 1.000 against exact search on 12 held-out image queries" in r.stdout
    assert "indexed 12 images" in r.stdout
    # text queries: each of the prompt set's findings and of the bundled phrases, plain and contrasted, embedded by its model
    from curator.query_sample import query_texts

    texts = query_texts(Workspace(ws))
    assert "cardiomegaly" in texts and "small apical pneumothorax" in texts and len(texts) == len(set(texts)) > 40
    assert f"recall@10 1.000 on {2 * len(texts)} held-out text queries" in r.stdout
    r = _cli("index", "--workspace", ws, "--budget-gb", "0.5", "--type", "ivf-flat", "--recall-sample", "12")
    assert "chose ivf-flat (IVF1,Flat" in r.stdout and "recall@10" in r.stdout and "nprobe 1 of 1 lists" in r.stdout
    meta = json.loads((ws / "index" / "index.json").read_text())
    assert meta["index_type"] == "ivf-flat" and meta["recall_at_10"] == 1.0 and meta["budget_gb"] == 0.5
    # (two thirds of the phrases tune, the last third's plain and contrast vectors measure)
    assert meta["recall_queries_text"] == 2 * (len(texts) - 2 * len(texts) // 3) and meta["nprobe_text"] == 1
    assert "held-out text queries" in r.stdout
    assert "OK: all invariants hold" in _cli("verify", "--workspace", ws).stdout
    write_raster_archive(arc, 3, seed=9, start=40)
    embed()  # appends to the IVF index
    meta = json.loads((ws / "index" / "index.json").read_text())
    assert meta["count"] == 15 and meta["appended_at"] and meta["index_type"] == "ivf-flat"
    assert "index: 15 vectors" in _cli("verify", "--workspace", ws).stdout
    r = _cli("search", "--workspace", ws, "--image", arc / "s0" / "img000.jpg", "-k", "3", "--json")
    assert json.loads(r.stdout)["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    # --above: every image above a similarity, against brute force over the stored embeddings
    top = json.loads(r.stdout)["results"][0]
    w = Workspace(ws)
    emb = {row["image_id"]: np.asarray(row["embedding"], np.float32) for row in w.read_table("embeddings").to_pylist()}
    sims = {i: float(v @ emb[top["image_id"]]) for i, v in emb.items()}
    srt = sorted(sims.values(), reverse=True)
    j = int(np.argmax([srt[i] - srt[i + 1] for i in range(3, 10)])) + 3  # a clear gap, 4-10 images above
    thr = (srt[j] + srt[j + 1]) / 2
    r = _cli("search", "--workspace", ws, "--image", arc / "s0" / "img000.jpg", "--above", f"{thr:.6f}", "--json")
    got = json.loads(r.stdout)
    assert got["above"] == pytest.approx(thr, abs=1e-6) and "k" not in got
    assert [h["image_id"] for h in got["results"]] == sorted((i for i in sims if sims[i] > thr), key=lambda i: (-sims[i], i))
    r = _cli("search", "--workspace", ws, "--image", arc / "s0" / "img000.jpg", "--above", "1.5", check=False)
    assert r.returncode == 2 and "from -1 to 1" in r.stderr
    # a text longer than the model reads is said to be cut; long paths keep their file names
    long = "opacity " * 80 + "large right pneumothorax"
    r = _cli("search", "--workspace", ws, long, "-k", "2")
    assert "the model reads only its first" in r.stderr
    assert all(line.rstrip().split()[2].endswith((".png", ".jpg")) for line in r.stdout.splitlines()[1:] if line.strip())
    from curator.cli import shown_path

    # an example image of a modality the workspace leaves out is searched, with a warning
    from tests.dicom_factory import write_dicom

    for modality, warned in (("CT", True), ("DX", False)):
        write_dicom(tmp_path / f"{modality}.dcm", np.full((64, 64), 900, np.uint16) + np.arange(64, dtype=np.uint16), bits_stored=12,
                    modality=modality)
        r = _cli("search", "--workspace", ws, "--image", tmp_path / f"{modality}.dcm", "-k", "2")
        assert ("the example image is a CT DICOM" in r.stderr) == warned and len(r.stdout.splitlines()) == 3
        from curator.search import query_modality_note

        note = query_modality_note(Workspace(ws), (tmp_path / f"{modality}.dcm").read_bytes(), "the uploaded file")
        assert (note or "").startswith("the uploaded file is a CT DICOM") == warned and (note is None) != warned
    deep = "/archive/" + "/".join(f"folder{i:02d}" for i in range(12)) + "/patient/img-0042.dcm"
    assert len(deep) > 80 and shown_path(deep) == "..." + deep[-77:] and len(shown_path(deep)) == 80 and shown_path("/a/b.png") == "/a/b.png"
    r = _cli("index", "--workspace", ws, "--budget-gb", "-1", check=False)
    assert r.returncode == 2
    # too few images for PQ codes: one clear line (not FAISS's C++ error), and the index in place stays
    before = (ws / "index" / "index.json").read_bytes()
    r = _cli("index", "--workspace", ws, "--type", "ivf-pq", check=False)
    assert r.returncode == 2 and "ivf-pq needs at least 16 vectors" in r.stderr and "faiss::" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (ws / "index" / "index.json").read_bytes() == before
    r = _cli("index", "--workspace", ws, "--budget-gb", "0.01", check=False)
    assert r.returncode == 2 and "no index fits a 0.01 GB memory budget" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((ws / "index" / "index.json").read_text())["index_type"] == "ivf-flat"  # the index in place stays


def test_text_searches_probe_the_lists_tuned_for_text(tmp_path, caplog, monkeypatch):
    """Without the checkpoint's file no text queries are measured (a warning says so); where an IVF
    index has a text nprobe, searches by text use it and searches by image keep the index's."""
    from curator import search as cs

    ws = _workspace(tmp_path / "ws", 3000)
    with ws.writer(), caplog.at_level("WARNING"):
        info = ci.build_index(ws, kind="ivf-flat", budget_gb=1, recall_sample=100)
    assert info.recall_at_10_text is None and info.nprobe_text == 0
    assert any("recall on text queries is not measured" in r.getMessage() and "/nowhere/ck.pt" in r.getMessage() for r in caplog.records)
    meta = json.loads((ws.root / "index" / "index.json").read_text())
    meta["nprobe_text"] = info.nprobe + 7
    (ws.root / "index" / "index.json").write_text(json.dumps(meta))
    seen = []
    real = ci._ivf_search
    monkeypatch.setattr(ci, "_ivf_search", lambda index, ivf, q, k, allowed, nprobe, enough=None: (
        seen.append(nprobe), real(index, ivf, q, k, allowed, nprobe, enough))[1])
    searcher = cs.Searcher(ws, load_model=False)
    a = searcher.search(Q[0], 5, text=True)
    b = searcher.search(Q[0], 5)
    c = cs.search(ws, Q[0], 5, text=True)
    assert seen == [info.nprobe + 7, None, info.nprobe + 7] and len(a) == len(b) == len(c) == 5


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_an_index_whose_budget_no_longer_fits_is_kept_and_appended_to(tmp_path, caplog, kind):
    """The archive grew past the --budget-gb the index was built with: updates warn and append in
    place (the index keeps its type; an IVF index grown past 4x its training would be rebuilt, but
    cannot be) instead of failing the embed or leaving the index stale; `verify --repair` of a
    stale index says it cannot rebuild it."""
    from curator.verify import verify

    def need(k, n):  # what choose_index counts, the smallest codes for PQ
        nlist = ci.ivf_nlist(n) if k in ci.IVF_KINDS else 0
        return ci.estimate_bytes(k, n, D, nlist, 1) + ci._build_transient_bytes(k, n, D, nlist)

    n0, n1 = 1000, 4500  # (more than 4x: the IVF lists' training is outgrown too)
    smallest_at_n1 = min(need(k, n1) for k in ci.KINDS)
    assert need(kind, n0) < smallest_at_n1
    budget = (need(kind, n0) + smallest_at_n1) / 2 / 2**30
    ws = _workspace(tmp_path / "ws", n0)
    with ws.writer():
        assert ci.build_index(ws, budget_gb=budget, recall_sample=50, exact_max=0 if kind == "ivf-flat" else None).index_type == kind
        _add_images(ws, IDS[n0:3000], X[n0:3000])
    rep = verify(str(ws.root), repair=True)  # stale: a rebuild is asked for, and cannot be made
    assert not rep.ok and any("cannot be rebuilt as it was asked for" in p and "no index fits" in p for p in rep.problems), rep.lines()
    with ws.writer():
        _add_images(ws, IDS[3000:n1], X[3000:n1])
        with caplog.at_level("WARNING"):
            info = ci.sync_index(ws)
    assert info.count == n1 and info.index_type == kind and info.budget_gb == budget
    assert any("no index fits" in r.getMessage() for r in caplog.records)
    index, _ = ci.load_index(ws)
    assert np.array_equal(np.sort(ci.index_ids(index)), np.sort(IDS[:n1]))
    assert verify(str(ws.root)).ok


def test_bench_index_contract(capsys):
    from curator.cli import main

    assert main(["bench", "index", "--n", "3000", "--dim", "32", "--json", "--queries", "20", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("index_type", "build_s", "p50_ms", "p95_ms", "recall_at_10", "filtered_k_returned_fraction", "peak_rss_mb", "filtered_p50_ms"):
        assert key in out, key
    assert out["index_type"] == "flat" and out["recall_at_10"] == 1.0 and out["filtered_k_returned_fraction"] == 1.0
    assert main(["bench", "index", "--n", "3000", "--dim", "32", "--json", "--queries", "20", "--type", "ivf-sq8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["index_type"] == "ivf-sq8" and out["nlist"] > 1 and out["filtered_k_returned_fraction"] == 1.0
    # fewer images than k (every one comes back), k other than 10 (recall_at_10 stays recall@10), the budget in force
    assert main(["bench", "index", "--n", "6", "--dim", "16", "--json", "--queries", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["filtered_k_returned_fraction"] == 1.0 and out["budget_default"] is True and out["budget_gb"] > 0
    assert main(["bench", "index", "--n", "3000", "--dim", "32", "--json", "--queries", "10", "-k", "3", "--type", "ivf-pq"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 3 and 0 < out["recall_at_10"] <= 1 and 0 < out["recall_at_k"] <= 1
    for bad, says in ((["--n", "abc"], "invalid int value: 'abc'"), (["--n", "10", "--selectivity", "2"], "expected a share in (0, 1]")):
        with pytest.raises(SystemExit):
            main(["bench", "index", *bad])
        assert says in capsys.readouterr().err
    assert main(["bench", "index", "--n", "20000", "--dim", "512", "--budget-gb", "0.05"]) == 2
    assert "no index fits a 0.05 GB memory budget" in capsys.readouterr().err


def test_synthetic_vectors_do_not_depend_on_threads():
    from curator.bench import SyntheticVectors

    a = np.concatenate([v for _, v in SyntheticVectors(5000, 16, seed=4, chunk_rows=1000).chunks()])
    b = np.concatenate([v for _, v in SyntheticVectors(5000, 16, seed=4, chunk_rows=1000, threads=3).chunks()])
    np.testing.assert_array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)


def test_searcher_cohort_above_a_similarity(tmp_path):
    from curator.search import Searcher

    ws = _workspace(tmp_path / "ws", 3000)
    with ws.writer():
        ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    s = Searcher(Workspace(ws.root), load_model=False)
    index, _ = ci.load_index(ws)
    assert ci.refine_of(index) is not None  # scored with float16 copies of the vectors
    stored = X[:3000].astype(np.float16).astype(np.float32) @ Q[0]
    srt = np.sort(stored)[::-1]
    thr = float((srt[29] + srt[30]) / 2)
    df = s.above(Q[0], thr)
    assert sorted(df.image_id.tolist()) == sorted(IDS[:3000][stored > thr].tolist())
    assert df.similarity.is_monotonic_decreasing and list(df["rank"]) == list(range(1, len(df) + 1))
    assert s.above(Q[0], 1.5).empty
    top = s.search(Q[0], k=5)
    assert top.image_id.tolist() == df.image_id.tolist()[:5]


def test_torch_backend_assigns_like_numpy(monkeypatch):
    """The GPU path through torch (used when FAISS is the CPU build), run on the CPU here."""
    pytest.importorskip("torch")
    monkeypatch.setattr(ci, "_TORCH_DEVICE", "cpu")
    c = ci.spherical_kmeans(X[:3000], 50, seed=1)
    np.testing.assert_array_equal(ci._Assigner(c, "torch")(X), ci._Assigner(c)(X))
    plan = ci.choose_index(N, D, 1.0, "ivf-sq8")
    _, rep = ci.build_from_source(ci.ArrayVectors(IDS, X), plan, recall_sample=400, gpu="torch")
    assert rep.gpu == "torch" and rep.recall_at_10 >= 0.95
    assert ci.gpu_backend(False) is None and ci.gpu_backend("torch") == "torch"
    if not ci.use_gpu() and not ci._torch_cuda():
        assert ci.gpu_backend() is None


# ------------------------------------------------------------------------------------------------
# Quantised IVF codes on embeddings that share a direction (as CLIP image embeddings do)


def test_ivf_codes_learn_from_residuals_on_embeddings_sharing_a_direction():
    """IVF-SQ8 / IVF-PQ encode x - centroid, so their encoder must be trained on those residuals.
    Trained on the raw vectors (mean norm ~0.9 here) the ranges / codebooks are far too coarse:
    recall@10 was ~0.2 for both."""
    n, d = 6000, D
    rng = np.random.default_rng(5)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    z = clustered(n + 200, d=d, seed=3)
    x = 0.9 * u + np.sqrt(1 - 0.9**2) * z
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    x, q = x[:n], x[n:]
    assert np.linalg.norm(x.mean(axis=0)) > 0.85
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    truth = brute_top(x, ids, q, 10)
    for kind, floor in (("ivf-sq8", 0.9), ("ivf-pq", 0.5)):
        plan = ci.choose_index(n, d, 1.0, kind)
        index, rep = ci.build_from_source(ci.ArrayVectors(ids, x), plan, recall_sample=400, seed=0)
        independent = ci.recall_at_k(ci.search_vectors(index, q, 10)[1], truth)
        assert independent >= floor and rep.recall_at_10 >= floor, (kind, independent, rep.recall_at_10, rep.tune_curve)
        assert abs(independent - rep.recall_at_10) < 0.1, (kind, independent, rep.recall_at_10)


def test_bench_vectors_share_a_direction():
    from curator.bench import SyntheticVectors

    x = np.concatenate([v for _, v in SyntheticVectors(4000, 32, seed=2).chunks()])
    assert np.linalg.norm(x.mean(axis=0)) > 0.85 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    z = np.concatenate([v for _, v in SyntheticVectors(4000, 32, seed=2, common=0).chunks()])
    assert np.linalg.norm(z.mean(axis=0)) < 0.5


# ------------------------------------------------------------------------------------------------
# Staleness: index.json records the workspace state it holds (index_source_key)


def test_index_records_the_workspace_state_it_holds(tmp_path, monkeypatch):
    ws = _workspace(tmp_path / "ws", 2000)
    monkeypatch.setattr(ci, "EXACT_MAX", 2200)
    with ws.writer():
        info = ci.build_index(ws, budget_gb=1, recall_sample=50)
        assert info.source_key == ci.index_source_key(ws) and ci.index_staleness(ws, info) is None
        with monkeypatch.context() as m:  # current: neither sync nor the staleness check reads ids
            m.setattr(ci, "index_ids", lambda index: pytest.fail("ids read"))
            assert ci.sync_index(ws).source_key == info.source_key
            assert ci.index_staleness(ws, ci.read_index_info(ws)) is None
        # an index.json from before keys were kept: decided by the ids, and the key recorded by a sync
        meta = json.loads((ws.root / "index" / "index.json").read_text())
        del meta["source_key"]
        (ws.root / "index" / "index.json").write_text(json.dumps(meta))
        assert ci.read_index_info(ws).source_key is None and ci.index_staleness(ws, ci.read_index_info(ws)) is None
        assert ci.sync_index(ws).source_key == ci.index_source_key(ws)
        # 500 more images change the auto choice (flat -> ivf-flat): a rebuild, which max_rebuild can defer
        _add_images(ws, IDS[2000:2500], X[2000:2500])
        assert ci.index_source_key(ws) != info.source_key
        stale = ci.sync_index(ws, max_rebuild=1000)
        assert stale.count == 2000 and stale.index_type == "flat"
        why = ci.index_staleness(ws, ci.read_index_info(ws))
        assert why and "lacks 500 of the workspace's 2,500 images" in why and "curator index" in why
        # a failed sync is not retried by the stopped run's handler
        with monkeypatch.context() as m:
            m.setattr(ci, "rebuild_index", lambda ws, info: (_ for _ in ()).throw(RuntimeError("no space")))
            with pytest.raises(RuntimeError):
                ci.sync_index(ws)
            try:
                ci.sync_index(ws)
            except RuntimeError:
                assert ci.sync_index_after_stop(ws) is None
        assert ci.read_index_info(ws).count == 2000
        done = ci.sync_index_after_stop(ws)  # not handling an exception from sync_index: it syncs
        assert done.index_type == "ivf-flat" and done.count == 2500 and ci.index_staleness(ws, done) is None


def _change_file(path, seed: int) -> None:
    """New content and mtime for an archive file (same name and format)."""
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (200, 260), dtype=np.uint8)
    Image.fromarray(arr).save(path, **({} if str(path).endswith(".png") else {"quality": 90}))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9 * (seed + 1)))


def _embed_cfg(arc, ws, ck, **kw):
    from curator.pipelines.embed import EmbedConfig

    return EmbedConfig(**{"archives": [str(arc)], "workspace": str(ws), "checkpoints": [str(ck)], "device": "cpu", "workers": 0,
                          "batch_size": 4, "progress": False, **kw})


def _catalog_ids(ws: Workspace) -> np.ndarray:
    from curator.query import run_query

    return np.sort(run_query(ws, "SELECT image_id FROM catalog").image_id.to_numpy().astype(np.int64))


def test_embed_killed_before_the_index_update_with_changed_files(tmp_path, tiny_checkpoints, caplog):
    """A changed file adds one image and supersedes one: the counts match, the ids do not. A run
    killed between its commit and the index update leaves such an index; searches must say so,
    and the next embed repairs it."""
    from curator.pipelines.embed import run_embed
    from curator.search import Searcher, search
    from curator.verify import verify

    from tests.conftest import write_raster_archive

    arc, ws_dir, ck = tmp_path / "arc", tmp_path / "ws", tiny_checkpoints[0]
    paths = sorted(write_raster_archive(arc, 10))
    run_embed(_embed_cfg(arc, ws_dir, ck))
    with Workspace(ws_dir).writer() as w:
        ci.build_index(w, kind="flat", budget_gb=1, recall_sample=10)
    for i, p in enumerate(paths[:3]):
        _change_file(p, 400 + i)
    cmd = [sys.executable, "-m", "curator.cli", "-q", "embed", str(arc), "--workspace", str(ws_dir), "--checkpoint", str(ck),
           "--device", "cpu", "--batch-size", "4", "--workers", "0"]
    # commit 1 records the checkpoints; commit 2 adds the three new rows and supersedes the old ones
    r = subprocess.run(cmd, env=dict(os.environ, CURATOR_CRASH_AT="commit:2", OMP_NUM_THREADS="1"), capture_output=True, check=False)
    assert r.returncode == -9, r.stderr[-2000:]
    ws = Workspace(ws_dir)
    index, info = ci.load_index(ws)
    current = _catalog_ids(ws)
    assert info.count == len(current) == 10 and len(np.setdiff1d(current, ci.index_ids(index))) == 3  # counts alone miss it
    q = ci.reconstruct(index, int(np.setdiff1d(ci.index_ids(index), current)[0]))
    with caplog.at_level("WARNING", logger="curator.search"):
        df = search(ws, q, k=10)
    assert len(df) == 7 and "lacks 3 of the workspace's 10 images" in caplog.text and "curator index" in caplog.text
    s = Searcher(ws, load_model=False)
    assert s.stale and "lacks 3" in s.stale_reason and "holds 3 that are no longer current" in s.stale_reason
    rep = verify(str(ws_dir))
    assert any("index is stale: 3 image(s) missing, 3 not in the catalog" in p for p in rep.problems), rep.lines()
    # the next embed (nothing left to embed) brings the index up to date
    run_embed(_embed_cfg(arc, ws_dir, ck))
    ws = Workspace(ws_dir)
    index, info = ci.load_index(ws)
    assert np.array_equal(np.sort(ci.index_ids(index)), _catalog_ids(ws)) and info.source_key == ci.index_source_key(ws)
    s = Searcher(ws, load_model=False)
    assert not s.stale and s.stale_reason is None and len(s.search(q, 10)) == 10
    assert verify(str(ws_dir)).ok


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_stopped_embed_updates_the_index_with_what_it_committed(tmp_path, tiny_checkpoints, monkeypatch, stop):
    from curator import faults
    from curator.pipelines.embed import run_embed
    from curator.search import Searcher

    from tests.conftest import write_raster_archive

    arc, ws_dir, ck = tmp_path / "arc", tmp_path / "ws", tiny_checkpoints[0]
    paths = sorted(write_raster_archive(arc, 8))
    run_embed(_embed_cfg(arc, ws_dir, ck))
    with Workspace(ws_dir).writer() as w:
        ci.build_index(w, kind="flat", budget_gb=1, recall_sample=10)
    before = ci.read_index_info(Workspace(ws_dir))
    for i, p in enumerate(paths[:2]):  # the first two files walked: the first batch, committed
        _change_file(p, 500 + i)
    write_raster_archive(arc, 4, seed=3, start=50)
    real, batches = faults.reached, []

    def stop_at_second_batch(point):
        if point == "batch":
            batches.append(1)
            if len(batches) == 2:
                raise stop("stopped")
        real(point)

    monkeypatch.setattr(faults, "reached", stop_at_second_batch)
    with pytest.raises(stop):
        run_embed(_embed_cfg(arc, ws_dir, ck, batch_size=2, flush_rows=2))
    ws = Workspace(ws_dir)
    current = _catalog_ids(ws)
    assert len(current) == 8 and ws.row_count("superseded") == 2  # the changed files were committed, nothing new yet
    index, info = ci.load_index(ws)
    assert np.array_equal(np.sort(ci.index_ids(index)), current) and info.built_at != before.built_at
    assert not Searcher(ws, load_model=False).stale
