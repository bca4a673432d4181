"""Re-ranking from float16 copies (curator.refine): the store, searches through it, the workspace files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from curator import index as ci
from curator import refine as rf
from curator.bench import SyntheticVectors
from curator.workspace import Workspace, WorkspaceError
from tests.test_index import CK, _add_images, _one_faiss_thread, _retire, brute_top  # noqa: F401 - the autouse fixture applies here too

N, D = 12_000, 48


# vectors sharing one direction in tight clusters: neighbours ~1e-4 apart in similarity, closer
# than 8-bit codes can tell (the case the store exists for)
_SRC = SyntheticVectors(N + 300, D, seed=2, common=0.9)
_ALL = np.concatenate([v for _, v in _SRC.chunks()])
X, Q = _ALL[:N], _SRC.fresh(200, 3)
IDS = (np.random.default_rng(5).permutation(N) * 3 + 7).astype(np.int64)  # sparse, unordered
X16 = X.astype(np.float16).astype(np.float32)  # what the store holds, computed here independently


def top_by(vecs, q, k, allowed=None):
    return brute_top(vecs, IDS, q, k, allowed)


@pytest.fixture(scope="module")
def pairs():
    """Each kind with codes, built with and without the store (in memory)."""
    out = {}
    for kind in ci.REFINE_KINDS:
        for refine in (False, True):
            plan = ci.choose_index(N, D, 1.0, kind, refine=refine)
            assert plan.refine == refine and ("float16" in plan.reason) == refine
            out[kind, refine] = ci.build_from_source(ci.ArrayVectors(IDS, X, chunk_rows=2500), plan, recall_sample=400, seed=0)
    return out


def test_store_round_trip_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    w = rf.SegmentWriter(N, D, tmp_path, "ck.refine")
    for s in range(0, N, 1000):  # chunks of ids in no order
        w(IDS[s:s + 1000], X[s:s + 1000])
    seg = w.finish()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"{seg.stem}{s}" for s in rf.SUFFIXES) and seg.stem.startswith("ck.refine-")
    # plain numpy reads the files
    vecs, ids, rows = (np.load(tmp_path / f"{seg.stem}{s}") for s in rf.SUFFIXES)
    assert vecs.dtype == np.float16 and vecs.shape == (N, D) and np.array_equal(ids, np.sort(IDS))
    np.testing.assert_array_equal(vecs[rows].astype(np.float32), X16[np.argsort(IDS)])
    store = rf.RefineStore.open(tmp_path, [seg.stem], error=0.25)
    assert store.count == N and store.error == 0.25 and store.segments[0]._fd is not None  # read from the file
    pick = rng.choice(N, 300, replace=False)
    asked = np.concatenate([IDS[pick], [0, 1, 10**12]])  # three ids no image has
    got, found = store.lookup(asked)
    assert found.tolist() == [True] * 300 + [False] * 3
    np.testing.assert_array_equal(got[:300], X16[pick])
    assert not got[300:].any()


def test_writer_refuses_bad_input_and_leaves_nothing(tmp_path):
    w = rf.SegmentWriter(4, D, tmp_path)
    w(np.array([5, 6]), X[:2])
    with pytest.raises(RuntimeError, match="2 vectors written.*4 announced"):
        w.finish()
    w = rf.SegmentWriter(3, D, tmp_path)
    w(np.array([5, 6, 5]), X[:3])
    with pytest.raises(ValueError, match="came twice"):
        w.finish()
    w = rf.SegmentWriter(2, D, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        w(np.array([1, 2]), X[:2, :10])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_rescore_against_numpy():
    w = rf.SegmentWriter(N, D)
    w(IDS, X)
    store = rf.RefineStore([w.finish()])
    rng = np.random.default_rng(1)
    cand = np.stack([rng.choice(IDS, 40, replace=False) for _ in range(5)])
    cand[0, 30:] = -1  # fewer candidates than slots
    sims = np.zeros(cand.shape, np.float32)
    got_s, got_i = store.rescore(Q[:5], cand, sims, 10)
    pos = {int(i): j for j, i in enumerate(IDS)}
    for r in range(5):
        c = cand[r][cand[r] >= 0]
        exact = np.array([X16[pos[int(i)]] @ Q[r] for i in c])
        order = np.lexsort((c, -exact))[:10]
        assert got_i[r].tolist() == c[order].tolist()
        np.testing.assert_allclose(got_s[r], exact[order], rtol=0, atol=1e-6)
    # a query with no candidates at all
    s, i = store.rescore(Q[:1], np.full((1, 40), -1), np.zeros((1, 40), np.float32), 10)
    assert (i == -1).all() and np.isneginf(s).all()


def test_store_lifts_recall_and_scores_with_float16(pairs):
    truth = top_by(X, Q, 10)
    for kind in ci.REFINE_KINDS:
        base_idx, base_rep = pairs[kind, False]
        idx, rep = pairs[kind, True]
        assert ci.refine_of(base_idx) is None and ci.refine_of(idx) is rep.refine and rep.refine.count == N
        # the same codes (same seed) probed alike, without and with re-ranking
        nprobe = getattr(idx, "nprobe", None)
        base = ci.recall_at_k(ci._search_ids(base_idx, Q, 10, nprobe), truth)
        sims, ids = ci.search_vectors(idx, Q, 10)
        refined = ci.recall_at_k(ids, truth)
        assert refined >= 0.97 and refined > base + 0.02, (kind, base, refined)
        assert rep.recall_at_10 >= 0.95  # measured (and nprobe tuned) on the re-ranked results
        # the similarities returned are the float16 vectors' (computed here), not the codes'
        pos = {int(i): j for j, i in enumerate(IDS)}
        expect = np.array([[X16[pos[int(i)]] @ Q[r] for i in ids[r]] for r in range(len(Q))])
        np.testing.assert_allclose(sims, expect, rtol=0, atol=1e-5)
        assert np.all(np.diff(sims, axis=1) <= 0)
        # the store's recorded error bounds the codes' error (checked on every vector)
        codes = np.asarray(idx.reconstruct_batch(IDS), np.float32)
        err = float(np.linalg.norm(codes - X16, axis=1).max())  # against the copies range search scores
        assert err <= rep.refine.error + 1e-6 and rep.refine.error <= err + 1e-6, kind
        v = ci.reconstruct(idx, IDS[7])
        np.testing.assert_array_equal(v, X16[7])


@pytest.mark.parametrize("share", [0.005, 0.05])
def test_refined_filtered_search(pairs, share, monkeypatch):
    allowed = np.sort(np.random.default_rng(3).choice(IDS, int(N * share), replace=False))
    truth16 = top_by(X16, Q, 10, allowed)
    for exact_max in (ci.EXACT_FILTER_MAX, 0):  # small sets scored from the store / searched in the lists
        monkeypatch.setattr(ci, "EXACT_FILTER_MAX", exact_max)
        for kind in ci.REFINE_KINDS:
            idx, _ = pairs[kind, True]
            sims, got = ci.search_vectors_filtered(idx, Q, 10, allowed)
            assert got.shape == (len(Q), 10) and np.isin(got, allowed).all()
            r = ci.recall_at_k(got, truth16)
            if kind == "sq8" or (exact_max and share == 0.005):  # exhaustive: exactly the float16 top-10
                assert np.array_equal(got, truth16), (kind, share, exact_max)
            else:
                assert r >= 0.95, (kind, share, exact_max, r)


def test_refined_range_search_is_exact_on_float16(pairs):
    allowed = np.sort(IDS[::5])
    for kind in ci.REFINE_KINDS:
        idx, _ = pairs[kind, True]
        for qi in range(3):
            s = X16 @ Q[qi]
            srt = np.sort(s)[::-1]
            j = int(np.argmax(srt[100:200] - srt[101:201])) + 100  # ~150 results, cut in a gap
            thr = float((srt[j] + srt[j + 1]) / 2)
            ids, sims = ci.range_search(idx, Q[qi], thr)
            assert set(ids.tolist()) == set(IDS[s > thr].tolist()), kind
            assert np.all(sims > thr) and np.all(np.diff(sims) <= 0)
            ids_f, _ = ci.range_search(idx, Q[qi], thr, allowed_ids=allowed)
            assert set(ids_f.tolist()) == set(IDS[(s > thr) & np.isin(IDS, allowed)].tolist()), kind


# ------------------------------------------------------------------------------------------------
# In a workspace: files, index.json, mmap, append, rebuild, --no-refine, damage


def _ws(path, n):
    ws = Workspace(path)
    with ws.writer():
        for s in range(0, n, 1000):
            _add_images(ws, IDS[s:min(n, s + 1000)], X[s:min(n, s + 1000)])
    return ws


def _index_files(ws):
    return sorted(p.name for p in (ws.root / "index").iterdir() if p.name != "index.json")


@pytest.mark.parametrize("kind", ["ivf-sq8", "sq8"])
def test_workspace_store_built_appended_rebuilt(tmp_path, kind):
    ws = _ws(tmp_path / "ws", 4000)
    with ws.writer():
        info = ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=200)
    meta = json.loads((ws.root / "index" / "index.json").read_text())
    assert meta["refine"] is True and len(meta["refine_files"]) == 1 and meta["refine_error"] > 0
    first = meta["refine_files"][0]
    assert sorted(_index_files(ws)) == sorted(p.split("/")[-1] for p in ci._files_of(info))
    index, _ = ci.load_index(ws, mmap=True)
    store = ci.refine_of(index)
    assert store is not None and store.count == 4000 and store.segments[0]._fd is not None
    truth16 = brute_top(X16[:4000], IDS[:4000], Q, 10)
    assert ci.recall_at_k(ci.search_vectors(index, Q, 10)[1], truth16) >= 0.97
    errs0 = store.list_errors  # kept with the radii (IVF), read back
    assert (errs0 is not None and len(errs0) == index.nlist) if kind == "ivf-sq8" else errs0 is None
    # append: the new images get a segment of their own; the old one is kept as it is
    with ws.writer():
        _add_images(ws, IDS[4000:4600], X[4000:4600])
        info = ci.sync_index(ws)
    assert info.appended_at and len(info.refine_files) == 2 and info.refine_files[0] == first
    index, _ = ci.load_index(ws)
    assert ci.refine_of(index).count == 4600
    if kind == "ivf-sq8":  # raised where the new images' codes err more, never lowered
        errs1 = ci.refine_of(index).list_errors
        assert np.all(errs1 >= errs0) and np.any(errs1 > errs0)
    new = IDS[4000:4600]
    sims, got = ci.search_vectors(index, X[4000:4010], 1)
    assert got[:, 0].tolist() == new[:10].tolist()
    np.testing.assert_allclose(sims[:, 0], np.einsum("ij,ij->i", X16[4000:4010], X[4000:4010]), atol=1e-6)
    assert sorted(_index_files(ws)) == sorted(p.split("/")[-1] for p in ci._files_of(info))
    # a rebuild writes one segment and deletes the earlier ones
    with ws.writer():
        info = ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=200)
    assert len(info.refine_files) == 1 and first not in info.refine_files
    assert sorted(_index_files(ws)) == sorted(p.split("/")[-1] for p in ci._files_of(info))
    # without the store: no copies on disk, codes only
    with ws.writer():
        info = ci.build_index(ws, kind=kind, budget_gb=1, recall_sample=200, refine=False)
    assert info.refine_files is None and not any(n.endswith(".npy") for n in _index_files(ws))
    assert ci.refine_of(ci.load_index(ws)[0]) is None
    with ws.writer():  # a later rebuild (the size changed, say) keeps what was asked
        assert ci.rebuild_index(ws, info).refine_files is None


def test_missing_or_short_store_is_a_clear_error(tmp_path):
    ws = _ws(tmp_path / "ws", 3000)
    with ws.writer():
        info = ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    vec_file = ws.root / f"{info.refine_files[0]}.vectors.npy"
    vec_file.rename(vec_file.with_suffix(".bak"))
    with pytest.raises(WorkspaceError, match="float16 copies cannot be read.*curator index"):
        ci.load_index(ws)
    vec_file.with_suffix(".bak").rename(vec_file)
    meta = json.loads((ws.root / "index" / "index.json").read_text())
    meta["refine_files"] = []
    (ws.root / "index" / "index.json").write_text(json.dumps(meta))
    assert ci.refine_of(ci.load_index(ws)[0]) is None  # an index without a store is fine
    meta["refine_files"] = [info.refine_files[0]] * 2
    (ws.root / "index" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(WorkspaceError, match="holds 3000 vectors but its float16 copies 6000"):
        ci.load_index(ws)


def test_a_save_that_dies_before_index_json_leaves_the_old_index_whole(tmp_path, monkeypatch):
    ws = _ws(tmp_path / "ws", 3000)
    with ws.writer():
        ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    before = _index_files(ws)
    _, want = ci.search_vectors(ci.load_index(ws)[0], Q, 10)

    def dies(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ci, "_write_info", dies)
    with ws.writer():
        _add_images(ws, IDS[3000:3500], X[3000:3500])
        with pytest.raises(OSError):
            ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    monkeypatch.undo()
    assert set(before) <= set(_index_files(ws))  # nothing of the old index was replaced or removed
    index, info = ci.load_index(ws)
    assert info.count == 3000
    np.testing.assert_array_equal(ci.search_vectors(index, Q, 10)[1], want)
    with ws.writer():  # the next save clears what the failed one left
        info = ci.sync_index(ws)
    assert info.count == 3500 and sorted(_index_files(ws)) == sorted(p.split("/")[-1] for p in ci._files_of(info))


def _check_store(ws, live):
    """The store holds exactly the float16 copies of ``live``, and the re-ranked search finds them."""
    index, _ = ci.load_index(ws)
    store = ci.refine_of(index)
    vecs, found = store.lookup(IDS)
    want = np.isin(IDS, live)
    assert np.array_equal(found, want) and store.count == len(live)
    np.testing.assert_array_equal(vecs[want], X16[want])
    mask = np.isin(IDS[:len(X)], live)
    truth16 = brute_top(X16[mask], IDS[mask], Q, 10)
    index.nprobe = index.nlist  # every list probed: only the codes' ranking and the copies' re-ranking count
    assert ci.recall_at_k(ci.search_vectors(index, Q, 10)[1], truth16) >= 0.99
    return store


def test_removals_relink_the_copies_and_rewrite_a_mostly_dead_segment(tmp_path, monkeypatch):
    from curator.verify import verify

    ws = _ws(tmp_path / "ws", 3000)
    with ws.writer():
        info = ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    first = info.refine_files[0]
    vec0 = ws.root / f"{first}.vectors.npy"
    inode = os.stat(vec0).st_ino
    # a removal writes the segment's ids and rows under a new stem; its vectors file is the same file
    with ws.writer():
        _retire(ws, IDS[:600])
        info = ci.sync_index(ws)
    assert len(info.refine_files) == 1 and info.refine_files[0] != first and not vec0.exists()
    assert os.stat(ws.root / f"{info.refine_files[0]}.vectors.npy").st_ino == inode
    store = _check_store(ws, IDS[600:3000])
    assert store.segments[0].nrows == 3000 and len(store.segments[0]) == 2400
    assert verify(str(ws.root)).ok
    # where links are not supported, the file is copied
    monkeypatch.setattr(rf.os, "link", lambda *a: (_ for _ in ()).throw(OSError("links not supported")))
    with ws.writer():
        _retire(ws, IDS[600:700])
        _add_images(ws, IDS[3000:3300], X[3000:3300])
        info = ci.sync_index(ws)
    monkeypatch.undo()
    assert len(info.refine_files) == 2 and os.stat(ws.root / f"{info.refine_files[0]}.vectors.npy").st_ino != inode
    store = _check_store(ws, IDS[700:3300])
    assert store.segments[0].nrows == 3000 and len(store.segments[0]) == 2300
    # fewer than half the file's rows left live: the next update writes those again, alone
    with ws.writer():
        _retire(ws, IDS[700:1600])
        info = ci.sync_index(ws)
    store = _check_store(ws, IDS[1600:3300])
    assert sorted((s.nrows, len(s)) for s in store.segments) == [(300, 300), (1400, 1400)]
    assert sorted(_index_files(ws)) == sorted(p.split("/")[-1] for p in ci._files_of(info))
    assert verify(str(ws.root)).ok
    # a rows file pointing past its vectors is refused on load, not read out of bounds
    rows_file = ws.root / f"{info.refine_files[0]}.rows.npy"
    rows = np.load(rows_file)
    rows[0] = 10**6
    np.save(rows_file, rows)
    with pytest.raises(WorkspaceError, match="float16 copies cannot be read"):
        ci.load_index(ws)


def test_verify_finds_copies_of_other_images_and_repair_rebuilds(tmp_path):
    from curator.verify import verify

    ws = _ws(tmp_path / "ws", 3000)
    with ws.writer():
        info = ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    assert verify(str(ws.root)).ok
    ids_file = ws.root / f"{info.refine_files[0]}.ids.npy"
    ids = np.load(ids_file)
    ids[-1] += 1  # the copies of another image than the index holds (same count)
    np.save(ids_file, ids)
    rep = verify(str(ws.root))
    assert not rep.ok and any("float16 copies" in p for p in rep.problems), rep.problems
    rep = verify(str(ws.root), repair=True)
    assert any("rebuilt the index" in r for r in rep.repaired)
    assert verify(str(ws.root)).ok


def test_a_killed_builds_copies_are_removed_by_the_next_build(tmp_path, monkeypatch):
    ws = _ws(tmp_path / "ws", 3000)
    with ws.writer():
        ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    before = _index_files(ws)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ci, "_tune_nprobe", killed)  # after the segment is complete, before the save
    with ws.writer(), pytest.raises(KeyboardInterrupt):
        ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    monkeypatch.undo()
    left = set(_index_files(ws)) - set(before)
    assert len(left) == 3 and all(".refine-" in n for n in left)  # a whole segment, named by no index.json
    assert ci.load_index(ws)[1].count == 3000  # the old index is untouched
    with ws.writer():
        info = ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    assert sorted(_index_files(ws)) == sorted(p.split("/")[-1] for p in ci._files_of(info))


def test_cli_says_it_re_ranks_and_no_refine_turns_it_off(tmp_path):
    import subprocess
    import sys

    ws = _ws(tmp_path / "ws", 2000)

    def index(*extra):
        r = subprocess.run([sys.executable, "-m", "curator.cli", "index", "--workspace", str(ws.root), "--type", "sq8",
                            "--recall-sample", "100", *extra], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = index()
    assert "re-ranked from float16 copies of the vectors on disk (~1 MB)" in out and "held-out image queries, re-ranked from float16 copies" in out
    assert any(n.endswith(".vectors.npy") for n in _index_files(ws))
    out = index("--no-refine")
    assert "float16" not in out and not any(n.endswith(".npy") for n in _index_files(ws))
    assert json.loads((ws.root / "index" / "index.json").read_text())["refine"] is False


def test_tuner_keeps_a_margin_above_the_target_when_it_can(monkeypatch):
    class Fake:
        nlist = 64

    curve = {}
    monkeypatch.setattr(ci, "_search_ids", lambda index, q, k, p: p)
    # 500 queries that agree (every recall the same): the margin is the fixed 0.01
    monkeypatch.setattr(ci, "query_recalls", lambda found, truth, k=10, self_ids=None: np.full(500, curve[found]))
    curve.update({1: 0.951, 2: 0.957, 4: 0.962, 8: 0.97})
    assert ci._tune_nprobe(Fake(), None, None, None, 0.95)[0] == 4  # 0.962 >= 0.95 + 0.01
    curve.update({1: 0.951, 2: 0.955, 4: 0.9555, 8: 0.9556, 16: 0.9557, 32: 0.9557, 64: 0.9557})
    assert ci._tune_nprobe(Fake(), None, None, None, 0.95)[0] == 1  # the margin is out of reach
    curve.update({1: 0.90, 2: 0.93, 4: 0.94, 8: 0.941, 16: 0.9411, 32: 0.9412, 64: 0.9412})
    assert ci._tune_nprobe(Fake(), None, None, None, 0.95)[0] == 4  # never reached: within 0.002 of the best


def test_tuner_wants_a_wider_margin_from_a_few_queries_that_disagree(monkeypatch):
    """64 text queries at 10M vectors cleared 0.95 + 0.01 at nprobe 128 (0.969) while held-out text
    queries got 0.922 there: the margin grows to two standard errors of the sample's mean."""
    class Fake:
        nlist = 4096

    # recall 1.0 for 15 queries in 16, 0.4 for the rest: mean 0.9625, sd 0.147
    spread = np.array([1.0] * 15 + [0.4] * 1 + [1.0] * 15 + [0.4] * 1 + [1.0] * 30 + [0.4] * 2)
    by_nprobe = {64: spread - 0.05, 128: spread, 256: np.ones(64)}
    monkeypatch.setattr(ci, "_search_ids", lambda index, q, k, p: p)
    rising = lambda p: np.full(64, 0.5 + 0.05 * np.log2(p))  # noqa: E731 - below 64 lists (no plateau)
    monkeypatch.setattr(ci, "query_recalls", lambda found, truth, k=10, self_ids=None: by_nprobe.get(found, rising(found)))
    se = spread.std(ddof=1) / np.sqrt(len(spread))  # independent: 0.147 / 8 = 0.018
    margin = min(ci.TUNE_MARGIN_MAX, 2 * se)  # (capped: 0.03)
    assert ci.tune_margin(spread) == pytest.approx(margin) and margin > 0.01
    assert spread.mean() >= 0.95 + 0.01 and spread.mean() < 0.95 + margin
    p, curve = ci._tune_nprobe(Fake(), None, None, None, 0.95)
    assert p == 256 and [c[0] for c in curve] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert curve[-2][2] == pytest.approx(margin, abs=1e-4)
    # the same mean from 64 queries that agree clears the fixed margin at 128
    by_nprobe[128] = np.full(64, spread.mean())
    assert ci._tune_nprobe(Fake(), None, None, None, 0.95)[0] == 128

    # 32 phrases, each searched plain and contrasted with the same outcome: 28 at recall 1.0, 4 at
    # 0.78 (mean 0.9725). As 64 independent queries the mean clears 0.95 + 2 se; as 32 phrases it
    # does not (the pair adds no information: the standard error is the phrases')
    per_phrase = np.array([1.0] * 28 + [0.78] * 4)
    pairs, groups = np.repeat(per_phrase, 2), np.repeat(np.arange(32), 2)
    se_queries = pairs.std(ddof=1) / np.sqrt(64)
    se_phrases = per_phrase.std(ddof=1) / np.sqrt(32)
    assert ci.tune_margin(pairs) == pytest.approx(2 * se_queries) and ci.tune_margin(pairs, groups) == pytest.approx(2 * se_phrases)
    assert 0.95 + 2 * se_queries <= pairs.mean() < 0.95 + 2 * se_phrases
    by_nprobe[128] = pairs
    assert ci._tune_nprobe(Fake(), None, None, None, 0.95)[0] == 128
    assert ci._tune_nprobe(Fake(), None, None, None, 0.95, groups)[0] == 256
    # two phrases that disagree (two standard errors: 0.1) do not demand every list: capped
    assert ci.tune_margin(np.array([1.0, 0.9])) == pytest.approx(ci.TUNE_MARGIN_MAX) and ci.TUNE_MARGIN_MAX < 0.1
    with pytest.raises(ValueError, match="3 groups for 2 recalls"):
        ci.tune_margin(np.array([1.0, 0.9]), np.array([0, 1, 2]))


def test_a_candidate_missing_from_the_store_keeps_its_code_score(caplog):
    w = rf.SegmentWriter(100, D)
    w(IDS[:100], X[:100])
    store = rf.RefineStore([w.finish()])
    cand = np.array([[IDS[0], IDS[1], 999_999_999, -1]])  # an id the store lacks
    code = np.array([[0.1, 0.2, 5.0, 0.0]], np.float32)
    with caplog.at_level("WARNING", logger="curator.refine"):
        s, i = store.rescore(Q[:1], cand, code, 3)
    assert i[0].tolist() == [999_999_999] + sorted(IDS[:2].tolist(), key=lambda j: -float(X16[list(IDS).index(j)] @ Q[0]))
    assert s[0, 0] == 5.0 and "lacks 1" in caplog.text and "curator index" in caplog.text


def test_ties_go_to_the_smaller_id():
    w = rf.SegmentWriter(3, D)
    w(np.array([30, 10, 20]), np.stack([X[0], X[0], X[1]]))  # ids 30 and 10: the same vector
    store = rf.RefineStore([w.finish()])
    _, i = store.rescore(X[:1], np.array([[30, 20, 10]]), np.zeros((1, 3), np.float32), 3)
    assert i[0, :2].tolist() == [10, 30]


def test_many_appends_are_merged_into_few_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(rf, "MAX_SEGMENTS", 3)
    ws = _ws(tmp_path / "ws", 2000)
    with ws.writer():
        ci.build_index(ws, kind="sq8", budget_gb=1, recall_sample=100)
    counts = []
    for s in range(2000, 2600, 100):  # six appends of 100
        with ws.writer():
            _add_images(ws, IDS[s:s + 100], X[s:s + 100])
            info = ci.sync_index(ws)
        counts.append(len(info.refine_files))
    assert counts == [2, 3, 2, 3, 2, 3]  # a fourth segment: all but the largest merged into one
    assert sorted(_index_files(ws)) == sorted(p.split("/")[-1] for p in ci._files_of(info))
    index, _ = ci.load_index(ws)
    store = ci.refine_of(index)
    assert store.count == 2600 and sorted(len(s) for s in store.segments)[-1] == 2000
    got, found = store.lookup(IDS[:2600])
    assert found.all()
    np.testing.assert_array_equal(got, X16[:2600])  # the merged rows hold their own images' copies


def test_a_load_racing_a_save_loads_the_new_index(tmp_path, monkeypatch):
    ws = _ws(tmp_path / "ws", 2000)
    with ws.writer():
        ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    stale = ci.read_index_info(ws)  # a reader read index.json ...
    with ws.writer():  # ... then a writer appended (new names; the old files deleted)
        _add_images(ws, IDS[2000:2100], X[2000:2100])
        ci.sync_index(ws)
    assert not (ws.root / stale.file).exists()
    real, calls = ci.read_index_info, []

    def first_stale(w):
        calls.append(1)
        return stale if len(calls) == 1 else real(w)

    monkeypatch.setattr(ci, "read_index_info", first_stale)
    index, info = ci.load_index(ws)
    assert info.count == 2100 and index.ntotal == 2100 and len(calls) == 2


def test_a_malformed_index_json_does_not_stop_a_build(tmp_path):
    ws = _ws(tmp_path / "ws", 2000)
    (ws.root / "index").mkdir(exist_ok=True)
    for bad in ('{"checkpoint": "x"}', "[1, 2]", "null", "{not json"):
        (ws.root / "index" / "index.json").write_text(bad)
        with ws.writer():
            assert ci.build_index(ws, kind="sq8", budget_gb=1, recall_sample=50).count == 2000


def test_range_search_over_coarse_pq_codes_scores_the_copies_and_stays_exact(pairs, monkeypatch, caplog):
    """PQ codes too coarse to cut by (a margin over RANGE_MARGIN_MAX): the members of such lists
    are scored from the float16 copies instead, in blocks (here every list: every copy), and the
    answer is the brute-force one over the copies."""
    idx, _ = pairs["ivf-pq", True]
    store = ci.refine_of(idx)
    read = []
    take = rf.Segment.take
    monkeypatch.setattr(rf.Segment, "take", lambda self, rows: (read.append(len(rows)), take(self, rows))[1])
    monkeypatch.setattr(rf, "LOOKUP_BLOCK", 128)
    monkeypatch.setattr(store, "error", 5.0)  # as coarse as codes get
    monkeypatch.setattr(store, "range_warned", False, raising=False)  # (said once per index, as a warning)
    monkeypatch.setattr(store, "list_errors", np.full(idx.nlist, 5.0, np.float32))
    allowed = np.sort(IDS[::5])
    for qi in range(3):
        s = X16 @ Q[qi]
        srt = np.sort(s)[::-1]
        j = int(np.argmax(srt[40:80] - srt[41:81])) + 40  # a threshold in a clear gap, ~50 in the cohort
        thr = float((srt[j] + srt[j + 1]) / 2)
        read.clear()
        with caplog.at_level("WARNING"):
            ids, sims = ci.range_search(idx, Q[qi], thr)
        assert set(ids.tolist()) == set(IDS[s > thr].tolist())  # every one, none extra
        pos = {int(i): k for k, i in enumerate(IDS)}
        assert np.all(np.diff(sims) <= 0) and np.allclose(sims, s[[pos[int(i)] for i in ids]], atol=1e-5)
        assert sum(read) == N and max(read) <= 128  # every copy, in blocks
        ids_f, _ = ci.range_search(idx, Q[qi], thr, allowed_ids=allowed)
        assert set(ids_f.tolist()) == set(IDS[(s > thr) & np.isin(IDS, allowed)].tolist())
    assert any("scored from the float16 copies" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="finite"):
        ci.range_search(idx, Q[0], float("nan"))


@pytest.mark.parametrize("kind", ["sq8", "ivf-sq8"])
def test_range_search_keeps_every_hit_of_a_large_cohort(pairs, kind, monkeypatch):
    idx, _ = pairs[kind, True]
    store = ci.refine_of(idx)
    looked = []
    lookup = store.lookup
    monkeypatch.setattr(store, "lookup", lambda ids: (looked.append(len(ids)), lookup(ids))[1])
    monkeypatch.setattr(rf, "RESCORE_ALL_MAX", 20)  # beyond: only hits the codes do not settle are read
    monkeypatch.setattr(rf, "RANGE_MARGIN_MAX", 0.0)  # applies to PQ only: 8-bit codes keep their whole margin
    for qi in range(3):
        s = X16 @ Q[qi]
        srt = np.sort(s)[::-1]
        j = int(np.argmax(srt[2000:3000] - srt[2001:3001])) + 2000  # ~2,500 in the cohort
        thr = float((srt[j] + srt[j + 1]) / 2)
        looked.clear()
        ids, sims = ci.range_search(idx, Q[qi], thr)
        assert set(ids.tolist()) == set(IDS[s > thr].tolist()), kind  # every one, none extra
        assert 0 < sum(looked) < len(ids) / 2  # the certain ones were not read again
        assert np.all(sims > thr)


def test_no_room_for_the_copies_is_a_clear_error_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    ws = _ws(tmp_path / "ws", 2000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(rf.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with ws.writer(), pytest.raises(OSError, match="need ~0.00 GB.*--no-refine"):
        ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=50)
    assert not any(n.endswith(".npy") or n.endswith(".tmp") for n in _index_files(ws))
    monkeypatch.setattr(rf.shutil, "disk_usage", shutil.disk_usage)
    with ws.writer():
        assert ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=50, refine=False).refine_files is None


def test_searches_read_rows_without_mapping_the_file(tmp_path):
    ws = _ws(tmp_path / "ws", 3000)
    with ws.writer():
        info = ci.build_index(ws, kind="ivf-sq8", budget_gb=1, recall_sample=100)
    index, _ = ci.load_index(ws)
    ci.search_vectors(index, Q, 10)
    ci.range_search(index, Q[0], 0.5)
    vec_file = str((ws.root / f"{info.refine_files[0]}.vectors.npy").resolve())
    with open("/proc/self/maps") as f:
        assert vec_file not in f.read()  # memory does not grow with the rows searches touch
    # a truncated vectors file is caught when the index is opened
    with open(vec_file, "r+b") as f:
        f.truncate(os.path.getsize(vec_file) - 100)
    with pytest.raises(WorkspaceError, match="truncated"):
        ci.load_index(ws)


def test_ivf_keeps_each_lists_largest_code_error(pairs, monkeypatch):
    import faiss

    for kind in ("ivf-sq8", "ivf-pq"):
        idx, rep = pairs[kind, True]
        errs = rep.refine.list_errors
        assert errs is not None and len(errs) == idx.nlist and rep.refine.error == pytest.approx(float(errs.max()))
        pos = {int(i): j for j, i in enumerate(IDS)}
        il = idx.invlists
        for lst in range(idx.nlist):  # independently: decode each list's codes, compare with the copies
            n = il.list_size(lst)
            if n == 0:
                assert errs[lst] == 0
                continue
            ids = faiss.rev_swig_ptr(il.get_ids(lst), n).copy()
            dec = np.asarray(idx.reconstruct_batch(ids), np.float32)
            want = np.linalg.norm(dec - X16[[pos[int(i)] for i in ids]], axis=1).max()
            assert errs[lst] == pytest.approx(want, abs=1e-6), (kind, lst)
        assert np.median(errs) < 0.5 * errs.max()  # why per list: most lists' are far below the largest
        # range search widened per list passes fewer candidates than by the largest error, same answer
        store = rep.refine
        s = X16 @ Q[0]
        thr = float(np.sort(s)[-60])
        seen = [0]  # copies scored, per search
        score = store.score

        def counting(q, ids, fb):
            seen[-1] += len(ids)
            return score(q, ids, fb)

        monkeypatch.setattr(store, "score", counting)
        a = ci.range_search(idx, Q[0], thr)[0]
        seen.append(0)
        monkeypatch.setattr(store, "list_errors", None)
        b = ci.range_search(idx, Q[0], thr)[0]
        monkeypatch.undo()
        assert np.array_equal(a, b) and set(a.tolist()) == set(IDS[s > thr].tolist())
        assert seen[0] < seen[1], (kind, seen)
