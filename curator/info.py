"""What a workspace holds: counts, checkpoints, prompt sets, runs, errors, index."""

from __future__ import annotations

import json

from curator import query_cache
from curator.index import index_staleness, read_index_info, recall_note
from curator.query import connect
from curator.workspace import open_workspace


def workspace_info(root: str) -> dict:
    ws = open_workspace(root)
    m = ws.manifest
    con = connect(ws)
    try:
        images = con.execute("SELECT count(*) FROM catalog").fetchone()[0]
        by_format = dict(con.execute("SELECT file_format, count(*) FROM catalog GROUP BY ALL ORDER BY 1").fetchall())
        by_conversion = dict(con.execute("SELECT conversion, count(*) FROM catalog GROUP BY ALL ORDER BY 1").fetchall())
        errors = con.execute("SELECT stage, kind, count(*) FROM errors GROUP BY ALL ORDER BY 3 DESC, 1, 2").fetchall()
        runs = con.execute(
            "SELECT run_id, command, status, started, finished, counts, timings, options FROM runs ORDER BY started DESC LIMIT 10"
        ).fetchall()
    finally:
        con.close()
    idx = read_index_info(ws)
    idx_stale = None
    if idx is not None:
        try:
            idx_stale = index_staleness(ws, idx)
        except Exception as exc:  # noqa: BLE001 - an unreadable index is reported, not raised
            idx_stale = f"the index cannot be read ({type(exc).__name__}: {exc}); run `curator index --workspace {ws.root}`"
    cache = query_cache.status(ws)
    return {
        "workspace": str(ws.root),
        "images": images,
        "by_format": by_format,
        "by_conversion": by_conversion,
        "checkpoints": [
            {"sha256": s, **m["checkpoints"].get(s, {})} for s in m.get("ensemble", [])
        ],
        "prompt_sets": [
            {"id": k, "name": v["name"], "positive": v["positive"], "negative": v["negative"],
             "columns": [c for c in v["columns"] if m["finding_columns"].get(c) == k],
             "labelled_at": v.get("labelled_at")}
            for k, v in m.get("prompt_sets", {}).items()
        ],
        "errors": [{"stage": s, "kind": k, "count": n} for s, k, n in errors],
        "runs": [
            {"run_id": r[0], "command": r[1], "status": r[2], "started": r[3], "finished": r[4], "counts": json.loads(r[5] or "{}"),
             "timings": json.loads(r[6] or "{}"), "options": json.loads(r[7] or "{}")}
            for r in runs
        ],
        "index": None if idx is None else {**idx.__dict__, "stale": idx_stale is not None, "stale_reason": idx_stale,
                                           "note": recall_note(idx, ws.root)},
        "query_cache": {**cache.__dict__, "path": str(cache.path), "describe": query_cache.describe(cache)},
    }


def format_info(info: dict) -> str:
    lines = [f"workspace {info['workspace']}", f"images: {info['images']}"]
    if info["by_format"]:
        lines.append("  by format: " + ", ".join(f"{k} {v}" for k, v in info["by_format"].items()))
        lines.append("  by conversion: " + ", ".join(f"{k} {v}" for k, v in info["by_conversion"].items()))
    lines.append(f"checkpoints ({len(info['checkpoints'])}, ensemble = mean):")
    for c in info["checkpoints"]:
        lines.append(f"  {c['sha256'][:12]}  {c.get('embed_dim', '?')}-d  {c.get('path', '?')}")
    lines.append("prompt sets:")
    for p in info["prompt_sets"]:
        cols = ", ".join(p["columns"]) if p["columns"] else "(no column shown; superseded)"
        lines.append(f"  {p['id']} {p['name']} ({p['positive']!r} / {p['negative']!r}): {cols}")
    total = sum(e["count"] for e in info["errors"])
    lines.append(f"errors and filtered files: {total}")
    for e in info["errors"]:
        lines.append(f"  {e['stage']}/{e['kind']}: {e['count']}")
    idx = info["index"]
    if idx is None:
        lines.append("index: none (run `curator index`)")
    else:
        rerank = ", re-ranked from float16 copies" if idx.get("refine_files") else ""
        lines.append(f"index: {idx['count']} images, {idx['index_type']}{rerank}, checkpoint {idx['checkpoint'][:12]}"
                     + (f" (STALE: {idx['stale_reason']})" if idx["stale"] else ""))
        if idx.get("recall_at_10") is not None:
            lines.append(f"  recall@10 {idx['recall_at_10']:.3f} against exact search, measured at the build on "
                         f"{idx.get('recall_count') or idx['count']:,} images")
        if idx.get("note"):
            lines.append(f"  note: {idx['note']}")
    lines.append(info["query_cache"]["describe"])
    lines.append(f"runs (latest {len(info['runs'])}):")
    for r in info["runs"]:
        c = r["counts"]
        brief = ", ".join(f"{k} {v}" for k, v in c.items() if isinstance(v, int))
        lines.append(f"  {r['run_id']} {r['command']} {r['status']}: {brief}")
        t = r.get("timings") or {}
        if t.get("total_s") is not None and t.get("model_s") is not None and "wait_s" in t:
            # where an embed run's time went: what limits it (the readers: --workers; the device stages; the model)
            stages = [(name, t.get(key) or 0.0) for name, key in (("waiting for the readers", "wait_s"), ("model", "model_s"),
                                                                  ("--gpu-jpeg decode", "device_jpeg_s"),
                                                                  ("--gpu-letterbox", "device_letterbox_s"))]
            beside = (r.get("options") or {}).get("device_overlap")
            if beside:  # the device stages ran in a thread beside the model: what the model waited for them
                stages.append(("waiting for the device stages", t.get("device_wait_s") or 0.0))
            lines.append(f"    {t['total_s']:.1f} s: " + ", ".join(f"{name} {v:.1f} s" for name, v in stages
                                                         if v >= 0.05 or name in ("model", "waiting for the device stages"))
                         + (" (the device stages ran beside the model)" if beside else ""))
    return "\n".join(lines)
