"""Check (and repair what can be repaired in) a workspace's invariants.

Invariants: every part the manifest lists exists with its row count; no unlisted part or
temporary file is left; image ids are unique and below the manifest's counter; every catalogued
image has exactly one embedding per ensemble checkpoint and exactly one prediction row per
member (checkpoints and ensemble) of every active prompt set; no embedding or prediction belongs
to an unknown image; no file version is catalogued twice; the index (if built) holds exactly the
current images (the same test searches use when the workspace state recorded in index.json is
not the manifest's: :func:`curator.index.index_staleness`). ``repair`` deletes orphans and
rebuilds a stale index; anything else is reported.

While a live run holds the writer lock (``Workspace.writer_active``), the files it has not
committed yet, and an index behind its commits, are noted, not counted as problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.parquet as pq

from curator.constants import ENSEMBLE_MEMBER
from curator.workspace import DATASETS, Workspace, open_workspace


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said, not failing: a run in progress
    writer_active: bool = False  # a live run held the writer lock while verify looked

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"{k}: {v}" for k, v in self.stats.items()]
        out += [f"note: {n}" for n in self.notes]
        out += [f"repaired: {r}" for r in self.repaired]
        out += [f"PROBLEM: {p}" for p in self.problems]
        out.append("OK: all invariants hold" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return out


def verify(root: str, repair: bool = False) -> VerifyReport:
    ws = open_workspace(root)
    rep = VerifyReport()
    if repair:
        orphans = ws.orphans()
        with ws.writer():  # takes the lock, which also removes orphans
            n = len([p for p in orphans if not p.exists()])
            if n:
                rep.repaired.append(f"removed {n} orphan or temporary file(s): {', '.join(p.name for p in orphans[:5])}{' ...' if n > 5 else ''}")
            _check(ws, rep, repair=True)
    else:
        orphans = ws.orphans()
        busy = ws.writer_active()
        if orphans and not busy:  # (a run that committed them and ended since the manifest was read listed them)
            ws.reload()
            orphans = ws.orphans()
            busy = ws.writer_active()  # (or one that started since)
        rep.writer_active = busy
        if busy:  # a live run's parts and temporary files, not committed yet: not a problem
            rep.notes.append("a curator run is writing this workspace: these checks are of the state committed when verify started"
                             + (f"; the {len(orphans)} file(s) the run has not committed yet are not counted" if orphans else ""))
        elif orphans:
            rep.problems.append(f"{len(orphans)} file(s) not listed in the manifest (left by a killed run; `--repair` removes them): "
                                + ", ".join(str(p.relative_to(ws.root)) for p in orphans[:5]))
        _check(ws, rep, repair=False)
    return rep


def _check(ws: Workspace, rep: VerifyReport, repair: bool) -> None:
    n_before = len(rep.problems)
    for d in DATASETS:
        for e in ws.part_entries(d):
            path = ws.root / e["file"]
            if not path.is_file():
                rep.problems.append(f"{e['file']} is listed in the manifest but missing")
                continue
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as exc:  # unreadable parquet
                rep.problems.append(f"{e['file']} is not readable Parquet ({type(exc).__name__})")
                continue
            if rows != e["rows"]:
                rep.problems.append(f"{e['file']} has {rows} rows, the manifest says {e['rows']}")
    if len(rep.problems) > n_before:
        return  # the SQL checks below need readable parts
    from curator.query import connect

    con = connect(ws, sandbox=False)
    try:
        q = lambda sql, *p: con.execute(sql, list(p)).fetchall()  # noqa: E731
        n_raw, n_ids, max_id = q("SELECT count(*), count(DISTINCT image_id), max(image_id) FROM catalog_raw")[0]
        n_current = q("SELECT count(*) FROM catalog")[0][0]
        rep.stats.update(images=n_current, catalog_rows=n_raw)
        if n_raw != n_ids:
            rep.problems.append(f"catalog has {n_raw - n_ids} duplicate image_id(s)")
        if max_id is not None and max_id >= ws.manifest["next_image_id"]:
            if repair:  # the next run would give new images ids already taken
                was = ws.manifest["next_image_id"]
                ws.commit(next_image_id=int(max_id) + 1)
                rep.repaired.append(f"raised the manifest's next_image_id from {was} to {int(max_id) + 1} (above every image_id)")
            else:
                rep.problems.append(f"image_id {max_id} is not below the manifest's next_image_id {ws.manifest['next_image_id']} "
                                    "(`--repair` raises it; an embed before that would reuse ids)")
        if ws.manifest.get("catalog_versions") == "superseded":
            twice = q("SELECT count(*) - count(DISTINCT path) FROM catalog")[0][0]
            if twice:
                rep.problems.append(f"{twice} file(s) with more than one current catalog row (a replaced row missing from superseded)")
            dangling = q("SELECT count(*) FROM superseded_raw s ANTI JOIN catalog_raw c USING (image_id)")[0][0]
            if dangling:
                rep.problems.append(f"{dangling} superseded row(s) naming images not in the catalog")
        # The same file version twice, among the rows that still stand for it: current rows and
        # rows replaced by a row of the same version (an unchanged file embedded again). Rows
        # retired (superseded_by null: the file left, or changed and failed) or replaced by
        # another version are history: a file that comes back as it was (restored, moved back
        # after --prune) is rightly embedded anew.
        dup_versions = q("WITH history AS (SELECT s.image_id FROM superseded_raw AS s JOIN catalog_raw AS o ON o.image_id = s.image_id "
                         "LEFT JOIN catalog_raw AS n ON n.image_id = s.superseded_by WHERE s.superseded_by IS NULL "
                         "OR n.size IS DISTINCT FROM o.size OR n.mtime_ns IS DISTINCT FROM o.mtime_ns) "
                         "SELECT count(*) FROM (SELECT path, size, mtime_ns FROM catalog_raw AS c ANTI JOIN history AS h ON h.image_id = c.image_id "
                         "GROUP BY ALL HAVING count(*) > 1)")[0][0]
        if dup_versions:
            rep.problems.append(f"{dup_versions} file version(s) catalogued more than once")
        for sha in ws.manifest.get("ensemble", []):
            missing = q("SELECT count(*) FROM catalog_raw c WHERE NOT EXISTS (SELECT 1 FROM embeddings_raw e WHERE e.image_id = c.image_id AND e.checkpoint = ?)", sha)[0][0]
            dups = q("SELECT count(*) FROM (SELECT image_id FROM embeddings_raw WHERE checkpoint = ? GROUP BY image_id HAVING count(*) > 1)", sha)[0][0]
            if missing:
                rep.problems.append(f"{missing} image(s) without an embedding for checkpoint {sha[:12]}")
            if dups:
                rep.problems.append(f"{dups} image(s) with more than one embedding for checkpoint {sha[:12]}")
        stray = q("SELECT count(*) FROM embeddings_raw e ANTI JOIN catalog_raw c USING (image_id)")[0][0]
        if stray:
            rep.problems.append(f"{stray} embedding row(s) of images not in the catalog")
        members = [*ws.manifest.get("ensemble", []), ENSEMBLE_MEMBER]
        active = sorted(set(ws.manifest.get("finding_columns", {}).values()))
        for ps in active:
            rel = f"predictions_{ps}"
            for m in members:  # (current images: `curator label` scores no replaced or retired row)
                missing = q(f"SELECT count(*) FROM catalog c WHERE NOT EXISTS (SELECT 1 FROM {rel} p WHERE p.image_id = c.image_id AND p.member = ?)", m)[0][0]
                if missing:
                    rep.problems.append(f"{missing} image(s) without predictions of prompt set {ps} for member {m[:12]}")
            dups = q(f"SELECT count(*) FROM (SELECT image_id, member FROM {rel} GROUP BY ALL HAVING count(*) > 1)")[0][0]
            if dups:
                rep.problems.append(f"{dups} duplicate prediction row(s) in prompt set {ps}")
            stray = q(f"SELECT count(*) FROM {rel} p ANTI JOIN catalog_raw c USING (image_id)")[0][0]
            if stray:
                rep.problems.append(f"{stray} prediction row(s) of images not in the catalog (prompt set {ps})")
        _check_index(ws, rep, repair, con)
    finally:
        con.close()


def _check_index(ws: Workspace, rep: VerifyReport, repair: bool, con) -> None:
    import numpy as np

    from curator import index as faiss_index

    info = faiss_index.read_index_info(ws)
    if info is None:
        rep.stats["index"] = "none"
        return
    try:
        index, info = faiss_index.load_index(ws)
        ids = np.sort(faiss_index.index_ids(index))
    except Exception as exc:
        problem = f"index {info.file} is unreadable ({type(exc).__name__})"
        ids = None
    else:
        got = con.execute("SELECT image_id FROM embeddings WHERE checkpoint = ?", [info.checkpoint]).fetchnumpy()["image_id"]
        want = np.unique(np.asarray(got, dtype=np.int64))
        problem = None
        if not np.array_equal(ids, want):
            missing = len(np.setdiff1d(want, ids))
            extra = len(np.setdiff1d(ids, want))
            dups = len(ids) - len(np.unique(ids))
            problem = f"index is stale: {missing} image(s) missing, {extra} not in the catalog" + (f", {dups} held twice" if dups else "")
            if rep.writer_active and not dups and not repair:  # behind the commits of a run in progress (embed updates it as it ends)
                rep.stats["index"] = "stale"
                rep.notes.append(f"{problem}: behind the run in progress (an embed brings it up to date as it ends; else `curator index`)")
                del index
                return
        elif int(index.ntotal) != info.count:
            problem = f"index holds {int(index.ntotal)} vectors but index.json says {info.count}"
        else:
            store = faiss_index.refine_of(index)
            if store is not None and not np.array_equal(np.sort(np.concatenate([s.ids for s in store.segments])), ids):
                problem = "the index's float16 copies (re-ranking) are not of the images it holds"
        del index
    rep.stats["index"] = f"{info.count} vectors" if problem is None else "stale"
    if problem is None:
        if repair and info.source_key != faiss_index.index_source_key(ws):
            # current, but index.json does not record this workspace state (an index from before
            # keys were kept, or a run killed between writing the index and its description):
            # record it, so searches know the index is current without comparing ids
            faiss_index.sync_index(ws)
            rep.repaired.append("recorded the workspace state the index holds in index.json")
        return
    if repair:
        try:
            new = faiss_index.rebuild_index(ws, info)
        except ValueError as exc:  # (its --budget-gb holds no index at this size)
            rep.problems.append(f"{problem}; it cannot be rebuilt as it was asked for: {exc}")
            return
        rep.repaired.append(f"rebuilt the index ({new.count} vectors)")
    else:
        rep.problems.append(problem + " (`curator index` or `curator verify --repair` rebuilds it)")
