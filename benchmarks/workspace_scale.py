"""Workspace at scale: a cohort query and `curator label` over a synthetic workspace of N images.

Builds a workspace of N images through the real Workspace API (`write_part` + `commit`, parts of
--part-rows rows, one commit every --commit-every parts, as `curator embed` commits every few
thousand files), with:

  catalog      MIMIC-like rows: /archive/p10/p10000032/s50414267/<n>.dcm paths, patients with
               several studies, studies with 1-4 images (PA or AP first, then mostly LATERAL),
               patient_sex, patient_age 18-95, study_date 2008-2024, modality CR/DX, DICOM sizes,
               mtimes, UIDs, rows/columns/bits
  embeddings   one checkpoint's --dim float32 L2-normalised vectors: a mixture of clusters (one
               cluster per study, Dirichlet cluster weights) plus one direction per positive
               finding, plus per-image noise (not uniform noise)
  predictions  the default prompt set (CheXpert's 14) for the checkpoint member and the ensemble
               member (equal, as with a one-checkpoint ensemble): positives/negatives drawn per
               study from per-cluster prevalences around CheXpert-like prevalences, per-image
               probabilities from Beta(6,3) / Beta(1.5,6)

The checkpoint is a real file (a tiny CLIP from `new_clip`, saved with torch.save) registered in
the manifest as `curator embed` registers it (sha256, path, embed_dim; ensemble; default prompt
set; finding_columns), so `curator label` loads and verifies it.

Then measures (a) twice: first on the Parquet parts (no query cache: the workspace was not made
by `curator embed`, which would build one at this size), then after `curator cache` (timed as a
subprocess: wall and peak RSS) with `images` read from W/cache/images.duckdb; (b) then rebuilds
the cache too, as `curator label` does for a workspace that has one.


  a. cohort query through `curator.query.run_query` on the `images` view (3 probability
     conditions, 2 metadata filters, one image per study): median and p95 wall time over
     --repeats runs after one warm-up; the row count is checked against numpy on the generated
     arrays and against plain DuckDB on the Parquet parts (no curator views).
     Target (issue 6): < 1 s at 10M images.
  b. `python -m curator.cli -q label` with a 14-finding prompt TOML (other phrasings than the
     default, so a new prompt set) over all N stored embeddings, as a subprocess under
     /usr/bin/time -v: wall time and peak RSS; a few images' new probabilities are checked
     against numpy (CheXzero's exp(pos)/(exp(pos)+exp(neg)) on cosines, text vectors from the
     in-memory model that was saved as the checkpoint). The same label run on a second workspace
     of --flat-check-n images (default N/10) shows whether memory grows with N.
     Target (issue 6): < 5 min at 10M, memory flat.

The workspace is deleted at the end unless --keep DIR (then it is built in DIR).

    nice -n 19 python benchmarks/workspace_scale.py --n 1000000
    nice -n 19 python benchmarks/workspace_scale.py --n 10000000 --json
    nice -n 19 python benchmarks/workspace_scale.py --n 100000 --repeats 3 --keep /tmp/ws100k
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VIEWS = np.array(["PA", "AP", "LATERAL"])
# CheXpert-like prevalences (fraction of studies positive), by finding name.
PREVALENCE = {
    "Atelectasis": 0.15, "Cardiomegaly": 0.12, "Consolidation": 0.05, "Edema": 0.12, "Enlarged Cardiomediastinum": 0.05,
    "Fracture": 0.04, "Lung Lesion": 0.04, "Lung Opacity": 0.22, "No Finding": 0.25, "Pleural Effusion": 0.20,
    "Pleural Other": 0.02, "Pneumonia": 0.05, "Pneumothorax": 0.04, "Support Devices": 0.25,
}

COHORT_SQL = """
SELECT path, study_instance_uid, edema, pleural_effusion, cardiomegaly
FROM (
    SELECT path, study_instance_uid, edema, pleural_effusion, cardiomegaly,
           row_number() OVER (PARTITION BY study_instance_uid ORDER BY edema DESC) AS rn
    FROM images
    WHERE edema > 0.6 AND pleural_effusion > 0.5 AND cardiomegaly > 0.3
      AND view_position IN ('PA', 'AP') AND patient_age BETWEEN 50 AND 80
)
WHERE rn = 1
"""

# 14 findings, the CheXpert names (same columns) with other phrasings than the default prompt set.
LABEL_TOML = """\
name = "bench-rephrased"
positive = "{}"
negative = "no {}"

[[finding]]
name = "Atelectasis"
phrases = ["atelectasis", "subsegmental atelectasis"]
[[finding]]
name = "Cardiomegaly"
phrases = ["cardiomegaly", "enlarged heart"]
[[finding]]
name = "Consolidation"
phrases = ["consolidation", "airspace consolidation"]
[[finding]]
name = "Edema"
phrases = ["pulmonary edema", "interstitial edema"]
[[finding]]
name = "Enlarged Cardiomediastinum"
phrases = ["widened mediastinum", "enlarged cardiomediastinal silhouette"]
[[finding]]
name = "Fracture"
phrases = ["rib fracture", "fracture"]
[[finding]]
name = "Lung Lesion"
phrases = ["pulmonary nodule", "lung mass"]
[[finding]]
name = "Lung Opacity"
phrases = ["lung opacity", "airspace opacity"]
[[finding]]
name = "No Finding"
phrases = ["normal chest radiograph", "no acute cardiopulmonary process"]
[[finding]]
name = "Pleural Effusion"
phrases = ["pleural effusion", "small pleural effusion"]
[[finding]]
name = "Pleural Other"
phrases = ["pleural thickening", "pleural plaque"]
[[finding]]
name = "Pneumonia"
phrases = ["pneumonia", "infectious process"]
[[finding]]
name = "Pneumothorax"
phrases = ["pneumothorax", "apical pneumothorax"]
[[finding]]
name = "Support Devices"
phrases = ["endotracheal tube", "central venous catheter"]
"""


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def make_checkpoint(path: Path, dim: int, seed: int):
    """A tiny CheXzero-layout CLIP saved as a state dict; returns (sha256, the in-memory model)."""
    import torch

    from curator.model import file_sha256, new_clip

    torch.manual_seed(seed)
    model = new_clip(embed_dim=dim, vision_width=64, vision_layers=1, patch_size=32, image_size=224, text_width=64, text_layers=1)
    model.eval()
    torch.save(model.state_dict(), path)
    return file_sha256(path), model


def _str(a) -> "pa.Array":
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(pa.array(a), pa.string())


def _hex_strings(rng: np.random.Generator, m: int, nbytes: int = 16):
    """m random lowercase hex strings of 2*nbytes characters, built from one buffer."""
    import pyarrow as pa

    w = 2 * nbytes
    data = rng.bytes(nbytes * m).hex().encode()
    offsets = np.arange(0, w * (m + 1), w, dtype=np.int32)
    return pa.StringArray.from_buffers(m, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))


def _decode(codes: np.ndarray, values: list[str]):
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int8)), pa.array(values, pa.string())).dictionary_decode()


class Generator:
    """Synthetic images chunk by chunk: studies do not span chunks; ids, studies, patients run on."""

    def __init__(self, n: int, dim: int, columns: list[str], names: list[str], seed: int):
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.dim = dim
        self.columns = columns
        self.k = int(min(2000, max(16, n // 5000)))  # clusters
        c = rng.standard_normal((self.k, dim)).astype(np.float32)
        self.centers = c / np.linalg.norm(c, axis=1, keepdims=True)
        f = rng.standard_normal((len(columns), dim)).astype(np.float32)
        self.finding_dirs = 0.35 * f / np.linalg.norm(f, axis=1, keepdims=True)
        self.cluster_w = rng.dirichlet(np.full(self.k, 2.0))
        prev = np.array([PREVALENCE.get(nm, 0.1) for nm in names])
        conc = 4.0  # per-cluster prevalence ~ Beta(prev*conc, (1-prev)*conc): findings cluster
        self.cluster_prev = rng.beta(prev * conc, (1 - prev) * conc, size=(self.k, len(columns)))
        self.next_study = 50_000_000
        self.next_patient = 10_000_000
        self.noise = 0.05  # per-coordinate sd: |noise| ~ 1.1, cosine to the cluster centre ~0.6

    def chunk(self, first_id: int, m: int, now: dt.datetime, run_id: str) -> dict:
        import pyarrow as pa
        import pyarrow.compute as pc

        from curator.workspace import CATALOG_SCHEMA

        rng = self.rng
        # studies of 1-4 images; patients of geometric numbers of studies
        sizes = rng.choice([1, 2, 3, 4], size=m + 4, p=[0.35, 0.45, 0.15, 0.05])
        ends = np.cumsum(sizes)
        ns = int(np.searchsorted(ends, m) + 1)
        sizes = sizes[:ns].copy()
        sizes[-1] -= int(ends[ns - 1] - m)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        study_no = self.next_study + np.arange(ns, dtype=np.int64)
        self.next_study += ns
        psz = rng.geometric(0.4, size=ns)
        pends = np.cumsum(psz)
        npat = int(np.searchsorted(pends, ns) + 1)
        study_patient = np.repeat(np.arange(npat), psz[:npat])[:ns]
        patient_no = self.next_patient + np.arange(npat, dtype=np.int64)
        self.next_patient += npat
        patient_age0 = np.clip(rng.normal(60, 17, npat), 18, 90).astype(np.int32)
        patient_sex = rng.integers(0, 2, npat)
        # per study
        s_patient = patient_no[study_patient]
        s_age = np.clip(patient_age0[study_patient] + rng.integers(0, 6, ns), 18, 95).astype(np.int32)
        s_days = (dt.date(2008, 1, 1) - dt.date(1970, 1, 1)).days + rng.integers(0, 17 * 365, ns)
        s_secs = rng.integers(6 * 3600, 22 * 3600, ns)
        s_mod = (rng.random(ns) < 0.6).astype(np.int8)  # 1 = DX
        s_first = (rng.random(ns) < 0.4).astype(np.int8)  # 0 = PA, 1 = AP (portable)
        s_cluster = rng.choice(self.k, size=ns, p=self.cluster_w)
        s_pos = rng.random((ns, len(self.columns))) < self.cluster_prev[s_cluster]
        # per image
        rep = lambda a: np.repeat(a, sizes, axis=0)  # noqa: E731
        ids = np.arange(first_id, first_id + m, dtype=np.int64)
        in_study = np.arange(m) - rep(starts)
        first = rep(s_first)
        view = np.where(in_study == 0, first, np.where(rng.random(m) < 0.85, 2, first)).astype(np.int8)
        study = rep(study_no)
        patient = rep(s_patient)
        age = rep(s_age)
        days = rep(s_days)
        mod = rep(s_mod)
        pos = rep(s_pos)
        size = rng.integers(4_000_000, 30_000_000, m)
        mtime = (days.astype(np.int64) * 86400 + rep(s_secs) + rng.integers(60, 7200, m)) * 1_000_000_000
        rows = rng.choice([2048, 2544, 3056], m).astype(np.int32)
        cols = rng.choice([2048, 2500, 3056], m).astype(np.int32)

        pid, sid, iid = _str(patient), _str(study), _str(ids)
        study_uid = pc.binary_join_element_wise("1.2.826.0.1.3680043.8.498.", sid, "")
        series_uid = pc.binary_join_element_wise(study_uid, _str(in_study + 1), ".")
        sop_uid = pc.binary_join_element_wise(series_uid, "1", iid, ".")
        path = pc.binary_join_element_wise("/archive/p", pc.utf8_slice_codeunits(pid, 0, 2), "/p", pid, "/s", sid, "/",
                                           pc.utf8_lpad(iid, 10, "0"), ".dcm", "")
        cat = {
            "image_id": pa.array(ids),
            "path": path,
            "file_format": pa.array(["dicom"] * m),
            "size": pa.array(size),
            "mtime_ns": pa.array(mtime),
            "content_hash": _hex_strings(rng, m),
            "conversion": pa.array(["mimic"] * m),
            "width": pa.array(cols), "height": pa.array(rows),
            "run_id": pa.array([run_id] * m),
            "added_at": pa.array(np.full(m, int(now.timestamp() * 1e6), np.int64)).cast(pa.timestamp("us", tz="UTC")),
            "patient_id": pid,
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "sop_instance_uid": sop_uid,
            "sop_class_uid": _decode(mod, ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"]),
            "modality": _decode(mod, ["CR", "DX"]),
            "view_position": _decode(view, list(VIEWS)),
            "study_date": pa.array(days.astype(np.int32)).cast(pa.date32()),
            "study_time": pc.utf8_lpad(_str(rep(s_secs // 3600 * 10000 + s_secs % 3600 // 60 * 100 + s_secs % 60)), 6, "0"),
            "patient_age": pa.array(age),
            "patient_sex": _decode(rep(patient_sex[study_patient]), ["F", "M"]),
            "manufacturer": _decode(rng.integers(0, 3, m), ["GE Healthcare", "Philips", "Agfa"]),
            "body_part_examined": pa.array(["CHEST"] * m),
            "rows": pa.array(rows), "columns": pa.array(cols),
            "bits_allocated": pa.array(np.full(m, 16, np.int32)),
            "bits_stored": pa.array(np.full(m, 12, np.int32)),
            "photometric_interpretation": pa.array(["MONOCHROME2"] * m),
            "transfer_syntax_uid": pa.array(["1.2.840.10008.1.2.1"] * m),
            "number_of_frames": pa.array(np.ones(m, np.int32)),
            "frame_used": pa.array(np.zeros(m, np.int32)),
        }
        catalog = pa.table({f.name: cat[f.name] if f.name in cat else pa.nulls(m, f.type) for f in CATALOG_SCHEMA}, schema=CATALOG_SCHEMA)
        # embeddings: cluster centre + finding directions + noise, normalised
        x = rng.standard_normal((m, self.dim), dtype=np.float32)
        x *= self.noise
        x += self.centers[rep(s_cluster)]
        x += pos.astype(np.float32) @ self.finding_dirs
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        # probabilities
        pp = np.where(pos, rng.beta(6.0, 3.0, pos.shape), rng.beta(1.5, 6.0, pos.shape)).astype(np.float32)
        return {"ids": ids, "catalog": catalog, "emb": x, "probs": pp, "study": study, "view": view, "age": age}


def build(root: Path, n: int, dim: int, part_rows: int, commit_every: int, ck_path: Path, sha: str, seed: int,
          keep_cols: list[str], n_samples: int = 8) -> dict:
    """Build the workspace; return what the checks need (kept arrays, sample embeddings, timings)."""
    from curator.pipelines.embed import register_prompt_set
    from curator.pipelines.stages import embeddings_table, predictions_table, run_record
    from curator.prompts import default_prompt_set
    from curator.workspace import Workspace

    t0 = time.perf_counter()
    ps = default_prompt_set()
    gen = Generator(n, dim, ps.columns, [f.name for f in ps.findings], seed)
    now = dt.datetime.now(dt.timezone.utc)
    run_id = now.strftime("%Y%m%dT%H%M%S") + "-synth"
    rng = np.random.default_rng(seed + 1)
    sample_idx = set(rng.choice(n, size=min(n_samples, n), replace=False).tolist())
    keep = {"study": np.empty(n, np.int64), "view": np.empty(n, np.int8), "age": np.empty(n, np.int32),
            **{c: np.empty(n, np.float32) for c in keep_cols}}
    col_idx = {c: ps.columns.index(c) for c in keep_cols}
    samples: dict[int, np.ndarray] = {}
    ws = Workspace(root)
    with ws.writer():
        # First commit as `curator embed` makes it: checkpoint, ensemble, default prompt set.
        sets, fcols = register_prompt_set({}, {}, ps, now.isoformat())
        ws.commit(checkpoints={sha: {"path": str(ck_path.resolve()), "embed_dim": dim, "added": now.isoformat()}},
                  ensemble=[sha], prompt_sets=sets, finding_columns=fcols, modality_filter=["CR", "DX"])
        pending: list = []
        done = 0
        n_parts = 0
        while done < n:
            m = min(part_rows, n - done)
            first_id = int(ws.manifest["next_image_id"]) + sum(p.rows for p in pending if p.dataset == "catalog")
            ch = gen.chunk(first_id, m, now, run_id)
            sl = slice(done, done + m)
            keep["study"][sl], keep["view"][sl], keep["age"][sl] = ch["study"], ch["view"], ch["age"]
            for c, j in col_idx.items():
                keep[c][sl] = ch["probs"][:, j]
            for i in sample_idx:
                if done <= i < done + m:
                    samples[int(ch["ids"][i - done])] = ch["emb"][i - done].copy()
            pending.append(ws.write_part("catalog", ch["catalog"]))
            pending.append(ws.write_part("embeddings", embeddings_table(ch["ids"], sha, ch["emb"])))
            # one row group per member, as curator embed writes them
            pending.append(ws.write_part("predictions", predictions_table(ch["ids"], ps, {sha: ch["probs"], "ensemble": ch["probs"]}),
                                         row_group_size=m, prompt_set=ps.id))
            done += m
            n_parts += 1
            if n_parts % commit_every == 0 or done == n:
                added = sum(p.rows for p in pending if p.dataset == "catalog")
                if done == n:
                    rec = run_record(run_id, "synthetic-build", "completed", now, [{"sha256": sha, "path": str(ck_path)}], [ps.id],
                                     {"processed": n}, {"total_s": time.perf_counter() - t0}, {"benchmark": "workspace_scale.py"})
                    pending.append(ws.write_part("runs", rec))
                ws.commit(add=pending, next_image_id=int(ws.manifest["next_image_id"]) + added)
                pending = []
                print(f"  built {done:,} / {n:,} images ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            del ch
    return {"keep": keep, "samples": samples, "build_s": time.perf_counter() - t0, "prompt_set": ps.id, "parts": n_parts}


def disk_bytes(root: Path) -> dict:
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        out[d.name] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    out["total"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return out


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def timing_line(q: dict) -> str:
    return (f"warm-up {q['warmup_s']:.2f} s; median {q['median_s']:.3f} s, p95 {q['p95_s']:.3f} s "
            f"(runs: {', '.join(f'{t:.2f}' for t in q['times_s'])})")


def cohort(root: Path, built: dict, repeats: int) -> dict:
    import duckdb

    from curator.query import run_query
    from curator.workspace import Workspace

    from curator import query_cache

    ws = Workspace(root)
    uses_cache = query_cache.status(ws).fresh
    t = time.perf_counter()
    df = run_query(ws, COHORT_SQL)
    warm = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        df = run_query(ws, COHORT_SQL)
        times.append(time.perf_counter() - t)
    if uses_cache:  # the figures above came from the cache, not from a fallback to Parquet
        from curator.query import connect

        con = connect(ws)
        uses_cache = "images_cache" in con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'images'").fetchone()[0]
        con.close()
    # independent 1: numpy on the generated arrays (float32 comparisons, as DuckDB compares FLOAT)
    k = built["keep"]
    mask = ((k["edema"] > np.float32(0.6)) & (k["pleural_effusion"] > np.float32(0.5)) & (k["cardiomegaly"] > np.float32(0.3))
            & (k["view"] <= 1) & (k["age"] >= 50) & (k["age"] <= 80))
    np_studies = np.unique(k["study"][mask])
    got_studies = np.sort(df["study_instance_uid"].str.rsplit(".", n=1).str[-1].astype(np.int64).to_numpy())
    # independent 2: plain DuckDB on the Parquet parts, no curator views
    cat = [str(p) for p in ws.part_paths("catalog")]
    pred = [str(p) for p in ws.part_paths("predictions", prompt_set=built["prompt_set"])]
    con = duckdb.connect()
    t = time.perf_counter()
    plain = con.execute(
        "SELECT count(DISTINCT c.study_instance_uid) FROM read_parquet(?) c JOIN read_parquet(?) p USING (image_id) "
        "WHERE p.member = 'ensemble' AND p.edema > 0.6 AND p.pleural_effusion > 0.5 AND p.cardiomegaly > 0.3 "
        "AND c.view_position IN ('PA', 'AP') AND c.patient_age BETWEEN 50 AND 80", [cat, pred]).fetchone()[0]
    plain_s = time.perf_counter() - t
    con.close()
    return {
        "query_cache": uses_cache, "rows": len(df), "warmup_s": warm, "times_s": times, "median_s": statistics.median(times), "p95_s": pctl(times, 95),
        "numpy_rows": int(len(np_studies)), "plain_duckdb_rows": int(plain), "plain_duckdb_s": plain_s,
        "match": bool(len(df) == len(np_studies) == plain and np.array_equal(got_studies, np_studies)),
        "images_matching": int(mask.sum()),
    }


def timed_subprocess(cmd: list[str], env: dict) -> dict:
    """Run under /usr/bin/time -v when present: wall time, peak RSS (MB), stdout."""
    full = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").exists() else cmd
    t = time.perf_counter()
    r = subprocess.run(full, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if m:
        peak_mb = int(m.group(1)) / 1024
    else:  # largest child so far: fine when this is the largest child
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"wall_s": wall, "peak_rss_mb": peak_mb, "stdout": r.stdout, "stderr": r.stderr}


def label(root: Path, toml: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "curator.cli", "-q", "label", "--workspace", str(root), "--prompts", str(toml), "--device", "cpu"]
    r = timed_subprocess(cmd, env)
    m = re.search(r"labelled (\d+) images", r["stdout"])
    r["images"] = int(m.group(1)) if m else None
    r["cmd"] = " ".join(cmd)
    return r


def expected_probabilities(model, toml: Path, vectors: np.ndarray) -> np.ndarray:
    """CheXzero's softmax zero-shot in numpy, text vectors from the in-memory (saved) model."""
    import tomllib

    import torch
    from open_clip.tokenizer import tokenize

    spec = tomllib.loads(toml.read_text())

    def enc(texts):
        with torch.no_grad():
            t = model.encode_text(tokenize(texts, context_length=77)).double().numpy()
        return t / np.linalg.norm(t, axis=1, keepdims=True)

    def weights(template):
        cols = []
        for f in spec["finding"]:
            v = enc([template.format(p) for p in f["phrases"]]).mean(axis=0)
            cols.append(v / np.linalg.norm(v))
        return np.stack(cols, axis=1)

    x = vectors.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lp, ln = x @ weights(spec["positive"]), x @ weights(spec["negative"])
    return np.exp(lp) / (np.exp(lp) + np.exp(ln))


def check_label(root: Path, model, toml: Path, samples: dict[int, np.ndarray], sha: str) -> dict:
    import tomllib

    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from curator.prompts import snake_case
    from curator.query import run_query
    from curator.workspace import Workspace

    spec = tomllib.loads(toml.read_text())
    cols = [snake_case(f["name"]) for f in spec["finding"]]
    ws = Workspace(root)
    # the prompt set the manifest recorded with exactly these phrasings
    want = [[p for p in f["phrases"]] for f in spec["finding"]]
    ps_id = next(i for i, s in ws.manifest["prompt_sets"].items() if [f["phrases"] for f in s["findings"]] == want)
    ids = np.array(sorted(samples), dtype=np.int64)
    exp = expected_probabilities(model, toml, np.stack([samples[i] for i in ids]))
    tab = ds.dataset([str(p) for p in ws.part_paths("predictions", prompt_set=ps_id)]).to_table(
        filter=pc.field("image_id").isin(ids.tolist()))
    df = tab.to_pandas()
    diffs = {}
    for member in (sha, "ensemble"):
        sub = df[df["member"] == member].set_index("image_id").loc[ids, cols].to_numpy(np.float64)
        diffs[member if member == "ensemble" else "checkpoint"] = float(np.abs(sub - exp).max())
    view = run_query(ws, f"SELECT image_id, {', '.join(cols)} FROM images WHERE image_id IN ({', '.join(map(str, ids))}) ORDER BY image_id")
    diffs["images_view"] = float(np.abs(view[cols].to_numpy(np.float64) - exp).max())
    shown = all(ws.manifest["finding_columns"][c] == ps_id for c in cols)
    return {"prompt_set": ps_id, "images_checked": len(ids), "max_abs_diff": diffs, "columns_switched": shown,
            "ok": shown and max(diffs.values()) < 1e-5, "example": {int(ids[0]): {c: round(float(v), 6) for c, v in zip(cols[:3], exp[0][:3])}}}


def code_state() -> str:
    """The commit measured, and whether the working tree differs from it (the product's own files)."""
    here = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "curator", "pipelines", "sql"], cwd=here, capture_output=True, text=True).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
    except OSError:
        return "unknown"
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="images (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--part-rows", type=int, default=65536, help="rows per Parquet part (default 65536)")
    ap.add_argument("--commit-every", type=int, default=4, help="commit the manifest every K parts (default 4)")
    ap.add_argument("--repeats", type=int, default=5, help="timed cohort queries after one warm-up (default 5)")
    ap.add_argument("--flat-check-n", type=int, default=None, help="images of the second workspace for the label memory check (default N/10; 0 = skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads here and in the label subprocess (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, metavar="DIR", help="build in DIR and keep it (default: a temporary folder, deleted)")
    ap.add_argument("--json", action="store_true", help="also print all figures as one JSON line")
    ap.add_argument("--skip-label", action="store_true", help="measure the cohort query only")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    flat_n = args.n // 10 if args.flat_check_n is None else args.flat_check_n
    base = Path(args.keep).expanduser().resolve() if args.keep else Path(tempfile.mkdtemp(prefix="ws-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    root = base / "workspace"
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists and is not empty; give another --keep folder")
    ck_path = base / "tiny-clip.pt"
    toml = base / "rephrased14.toml"
    toml.write_text(LABEL_TOML)
    res: dict = {"n": args.n, "dim": args.dim, "part_rows": args.part_rows, "commit_every": args.commit_every,
                 "threads": args.threads, "date": dt.date.today().isoformat(), "cpus": os.cpu_count(), "code": code_state()}
    try:
        print(f"code: {res['code']}", flush=True)
        sha, model = make_checkpoint(ck_path, args.dim, args.seed)
        print(f"checkpoint {ck_path} sha256 {sha[:12]}; building {args.n:,} images into {root}", flush=True)
        built = build(root, args.n, args.dim, args.part_rows, args.commit_every, ck_path, sha, args.seed,
                      ["edema", "pleural_effusion", "cardiomegaly"])
        sizes = disk_bytes(root)
        res["build_s"] = built["build_s"]
        res["parts_per_dataset"] = built["parts"]
        res["disk_gb"] = {k: round(v / 1e9, 3) for k, v in sizes.items()}
        print(f"build: {built['build_s']:.1f} s, {built['parts']} parts per dataset, disk {sizes['total'] / 1e9:.2f} GB "
              f"(" + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sizes.items() if k != "total") + ")", flush=True)

        print(f"(a) cohort query, run_query on `images`, 1 warm-up + {args.repeats} runs ...", flush=True)
        q = cohort(root, built, args.repeats)
        res["cohort"] = q
        print(f"    {timing_line(q)}", flush=True)
        print(f"    {q['rows']:,} rows (one per study; {q['images_matching']:,} images match); numpy {q['numpy_rows']:,}, plain DuckDB "
              f"{q['plain_duckdb_rows']:,} ({q['plain_duckdb_s']:.2f} s): {'MATCH' if q['match'] else 'MISMATCH'}", flush=True)
        print(f"    target < 1 s: {'met' if q['median_s'] < 1 else 'NOT met'} (Parquet parts, no query cache)", flush=True)

        print("(a2) `curator cache`: the images view materialised in W/cache/images.duckdb ...", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
        cache_cmd = [sys.executable, "-m", "curator.cli", "-q", "cache", "--workspace", str(root)]
        cb = timed_subprocess(cache_cmd, env)
        res["cache_build"] = {"wall_s": cb["wall_s"], "peak_rss_mb": cb["peak_rss_mb"], "stdout": cb["stdout"].strip(),
                              "size_gb": round((root / "cache" / "images.duckdb").stat().st_size / 1e9, 3)}
        print(f"    {cb['stdout'].strip()}", flush=True)
        print(f"    wall {cb['wall_s']:.1f} s (process), peak RSS {cb['peak_rss_mb']:,.0f} MB", flush=True)
        qc = cohort(root, built, args.repeats)
        res["cohort_cached"] = qc
        print(f"    cohort query with the cache: {timing_line(qc)}; read the cache: {qc['query_cache']}", flush=True)
        print(f"    {qc['rows']:,} rows; numpy {qc['numpy_rows']:,}: {'MATCH' if qc['match'] else 'MISMATCH'}; "
              f"target < 1 s: {'met' if qc['median_s'] < 1 and qc['match'] and qc['query_cache'] else 'NOT met'}", flush=True)

        if args.skip_label:
            if args.json:  # (the JSON line below is not reached from here)
                print(json.dumps(res, default=str))
            return 0
        print("(b) curator label, 14 rephrased findings, all stored embeddings ...", flush=True)
        lab = label(root, toml, args.threads)
        chk = check_label(root, model, toml, built["samples"], sha)
        res["label"] = {k: lab[k] for k in ("wall_s", "peak_rss_mb", "images", "cmd")} | {"check": chk}
        res["label"]["stdout"] = lab["stdout"].strip()
        print(f"    {lab['images']:,} images in {lab['wall_s']:.1f} s wall (process), peak RSS {lab['peak_rss_mb']:,.0f} MB", flush=True)
        print(f"    {lab['stdout'].strip().splitlines()[0]}", flush=True)
        print(f"    check vs numpy on {chk['images_checked']} images: max |diff| "
              + ", ".join(f"{k} {v:.2e}" for k, v in chk["max_abs_diff"].items())
              + f"; images view shows the new set: {chk['columns_switched']} -> {'OK' if chk['ok'] else 'FAILED'}", flush=True)
        print(f"    target < 5 min: {'met' if lab['wall_s'] < 300 else 'NOT met'}", flush=True)
        del built
        if flat_n:
            froot = base / "workspace-flat"
            print(f"    memory flatness: building {flat_n:,} images and labelling them ...", flush=True)
            fb = build(froot, flat_n, args.dim, args.part_rows, args.commit_every, ck_path, sha, args.seed + 7, ["edema"])
            fl = label(froot, toml, args.threads)
            res["label_flat_check"] = {"n": flat_n, "build_s": fb["build_s"], "wall_s": fl["wall_s"], "peak_rss_mb": fl["peak_rss_mb"], "images": fl["images"]}
            ratio = lab["peak_rss_mb"] / fl["peak_rss_mb"]
            res["label_flat_check"]["rss_ratio"] = ratio
            print(f"    label at {flat_n:,}: {fl['wall_s']:.1f} s, peak RSS {fl['peak_rss_mb']:,.0f} MB; at {args.n:,}: "
                  f"{lab['peak_rss_mb']:,.0f} MB (x{ratio:.2f} for x{args.n / flat_n:.0f} images)", flush=True)
            shutil.rmtree(froot, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            shutil.rmtree(base / "workspace-flat", ignore_errors=True)
    if args.json:
        print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
