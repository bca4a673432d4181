"""Cohort builder: findings, negations, metadata, one per study / patient, sampling; count,
histogram, a sample to eyeball, and a de-identified export (the library of `curator cohort`)."""

import io
import tomllib
import zipfile
from pathlib import Path

import pandas as pd
import streamlit as st
from curator.app import common

from curator.cohort import (
    CohortSpec,
    SampleSpec,
    SplitSpec,
    cohort_sql,
    count_cohort,
    export_cohort,
    relations,
    spec_from_dict,
    text_index_staleness,
    spec_to_toml,
    unbalanced_parentheses,
)
from curator.search import FilterError, parse_condition

S = st.session_state
st.title("Cohort builder")
ws = common.workspace()
if ws is None:
    st.stop()

findings = common.finding_columns(ws)
labels = common.label_columns(ws)


def q(col: str) -> str:
    return '"' + col.replace('"', '""') + '"'


name = st.text_input("Cohort name", value="cohort", key="cohort-name")

# -- findings -------------------------------------------------------------------------------
st.subheader("Findings")
use_labels = False
if labels:
    use_labels = st.toggle("Use calibrated labels (`<finding>_label` = 1 / 0) instead of probability thresholds",
                           key="cohort-use-labels")
c1, c2 = st.columns([2, 3])
finding = c1.selectbox("Finding present", ["(any)", *findings], key="cohort-finding")
threshold = c2.slider("… with probability at least", 0.0, 1.0, 0.5, 0.01, key="cohort-threshold",
                      disabled=finding == "(any)" or use_labels)
c1, c2 = st.columns([2, 3])
absent = c1.multiselect("… and not", [f for f in findings if f != finding], key="cohort-absent")
absent_threshold = c2.slider("absent means probability below", 0.0, 1.0, 0.5, 0.01, key="cohort-absent-threshold",
                             disabled=not absent or use_labels)
extra = st.text_input("More probability conditions (optional)", key="cohort-condition",
                      placeholder="e.g. pleural_effusion > 0.6 or (edema > 0.8 and not pneumonia)")

finding_parts = []
if finding != "(any)":
    if use_labels and f"{finding}_label" in labels:
        finding_parts.append(f"{q(finding + '_label')} = 1")
    else:
        finding_parts.append(f"{q(finding)} >= {float(threshold)!r}")
for f in absent:
    if use_labels and f"{f}_label" in labels:
        finding_parts.append(f"{q(f + '_label')} = 0")
    else:
        finding_parts.append(f"{q(f)} < {float(absent_threshold)!r}")
try:
    if extra.strip():
        finding_parts.append(parse_condition(extra, findings + labels))
except FilterError as exc:
    st.error(f"Condition: {exc}")
    st.stop()
positive = " AND ".join(f"(\n{p}\n)" for p in finding_parts)  # own lines: a trailing -- comment ends there

# -- metadata and selection -------------------------------------------------------------------
st.subheader("Images")
flt = common.filter_widgets(ws, "cohort-filter", with_condition=False)
custom = st.text_area("Extra SQL predicate over `images` (optional, for experts)", key="cohort-sql", height=68,
                      placeholder="e.g. manufacturer = 'ACME' AND rows >= 2000")
if custom.strip() and (why := unbalanced_parentheses(custom)):
    st.error(f"Extra SQL predicate: it {why}; it must be a condition of its own (it is joined to the others with AND).")
    st.stop()
c1, c2, c3 = st.columns(3)
one_per = c1.radio("One image per", ["image (all)", "study", "patient"], key="cohort-one-per", horizontal=True)
sampling = c2.radio("Sampling", ["none", "N positives + N negatives", "N at random"], key="cohort-sampling", horizontal=True)
limit = int(c3.number_input("Limit (0 = none)", min_value=0, value=0, step=100, key="cohort-limit"))
n_pos = n_neg = n_any = None
if sampling == "N positives + N negatives":
    c1, c2 = st.columns(2)
    n_pos = int(c1.number_input("Positives", min_value=0, value=100, step=50, key="cohort-npos"))
    n_neg = int(c2.number_input("Negatives", min_value=0, value=100, step=50, key="cohort-nneg"))
    if not positive:
        st.warning("Choose a finding (or a condition) to sample positives and negatives by.")
elif sampling == "N at random":
    n_any = int(st.number_input("Images", min_value=0, value=100, step=50, key="cohort-nany"))
c1, c2, c3 = st.columns(3)
split = c1.toggle("Patient-disjoint split 80 / 10 / 10", key="cohort-split")
deidentify = c2.toggle("De-identify the export", value=True, key="cohort-deid",
                       help="Patient and study identifiers become salted hashes; no source paths, no dates but the year.")
copy_images = c3.selectbox("Images in the export", ["none", "copy"], key="cohort-copy",
                           help="copy: a PNG of each image (the 8-bit image the model saw; no header) when de-identified, "
                                "the original files otherwise")
try:
    metadata = flt.to_sql(findings)
except FilterError as exc:
    st.error(str(exc))
    st.stop()
population = [p for p in (metadata if metadata != "true" else "", custom.strip()) if p]
sample = None
if sampling == "N positives + N negatives" and positive:
    sample = SampleSpec(n_positive=n_pos, positive_where=positive, n_negative=n_neg, negative_where=f"NOT ({positive})")
    where_parts = population
elif sampling == "N at random":
    sample = SampleSpec(n=n_any)
    where_parts = population + ([positive] if positive else [])
else:
    where_parts = population + ([positive] if positive else [])
where = " AND ".join(f"(\n{p}\n)" for p in where_parts) or "true"

# -- a saved spec replaces the builder --------------------------------------------------------
with st.expander("Re-run a saved cohort spec", expanded=False):
    saved = st.file_uploader("Cohort spec (TOML, as downloaded below or written for `curator cohort`)", key="cohort-spec-file")
spec = None
try:
    if saved is not None:
        data = tomllib.loads(saved.getvalue().decode("utf-8"))
        data.setdefault("name", Path(saved.name).stem or "saved")
        spec = spec_from_dict(data)
        st.info(f"Using the uploaded spec **{spec.name}** (the builder above is ignored while it is loaded).")
    else:
        spec = CohortSpec(
            name=name.strip() or "cohort", where=where,
            one_per=None if one_per.startswith("image") else one_per,
            limit=limit or None, sample=sample, split=SplitSpec() if split else None,
            deidentify=deidentify, copy_images=copy_images,
        )
except (ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
    st.error(str(exc) if str(exc).startswith("cohort spec") else f"Cohort spec: {exc}")
    st.stop()

if not spec.deidentify:  # (from the toggle, or from an uploaded spec's deidentify = false)
    st.warning("Identified export: source paths, patient and study identifiers and dates are written as catalogued"
               + (" (the uploaded spec says deidentify = false; the toggle above does not apply to it)." if saved is not None else "."))

with st.expander("The rule as SQL", expanded=False):
    st.code(cohort_sql(spec, ws), language="sql")

# -- live count, histogram, sample ------------------------------------------------------------
try:
    n = count_cohort(ws, spec)
except Exception as exc:  # noqa: BLE001 - a user's SQL: show the reason
    # DuckDB's message without its "LINE n:" excerpt: the line is one of the generated rule's
    # ("The rule as SQL" above shows it whole), not of what was typed
    lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("LINE ") and not ln.strip().startswith("^")]
    st.error(f"Cannot run this cohort: {' '.join(lines)}")
    st.stop()
st.metric("Images in the cohort", f"{n:,}")

cur = common.cursor(ws)
rule = cohort_sql(spec, ws)
for rel, frame in relations(ws, spec).items():  # (a spec with [text]: its images above the text query's similarity)
    cur.register(rel, frame)
if spec.text is not None and (stale := text_index_staleness(ws)):
    st.warning(f"The [text] condition searches an out-of-date index, so the cohort misses the images it lacks: {stale}")


def query(sql: str) -> pd.DataFrame:
    """Run a read-only statement built around the rule on the app's sandboxed cursor."""
    stmts = cur.extract_statements(sql)
    if len(stmts) != 1 or stmts[0].type.name != "SELECT":
        raise ValueError("the cohort's SQL fragments must form one SELECT statement")
    return cur.execute(sql).df()


if n and findings:
    first = finding if finding in findings else common.default_findings(ws, 1)[0]
    # (keyed by the chosen finding, so choosing another finding shows its histogram)
    hist_finding = st.selectbox("Histogram of", findings, index=findings.index(first), key=f"cohort-hist-{first}")
    h = query(f"SELECT least(CAST(floor({q(hist_finding)} * 20) AS INTEGER), 19) AS bin, count(*) AS images "
                f"FROM (\n{rule}\n) WHERE {q(hist_finding)} IS NOT NULL GROUP BY 1")
    h = h.set_index("bin")["images"].reindex(range(20), fill_value=0)
    st.bar_chart(pd.DataFrame({"probability": [f"{b / 20:.2f}" for b in range(20)], "images": h.to_numpy()}),
                 x="probability", y="images", sort=False, height=220)

    S.setdefault("cohort_seed", 0)
    c1, c2 = st.columns([4, 1])
    c1.markdown("**A random sample to eyeball**")
    if c2.button("Another sample", key="cohort-reshuffle"):
        S.cohort_seed += 1
    shown = [c for c in ([finding] if finding in findings else []) + absent if c in findings] or common.default_findings(ws)
    cols = ", ".join(["image_id", "view_position", "study_date", *[q(c) for c in shown]])
    sample_df = query(f"SELECT {cols} FROM (\n{rule}\n) ORDER BY md5(CAST(image_id AS VARCHAR) || ':{int(S.cohort_seed)}') LIMIT 10")
    common.image_grid(ws, sample_df, shown, key="cohort-sample", actions=False)

# -- export -----------------------------------------------------------------------------------
st.subheader("Export")
st.download_button("Download the spec (TOML)", spec_to_toml(spec).encode(), file_name=f"{spec.name}.toml",
                   mime="application/toml", on_click="ignore", key="cohort-spec-download")
# the builder's arm sampling without a finding has no sample to draw (warned above); an uploaded spec is its own
incomplete = saved is None and sampling == "N positives + N negatives" and not positive
if st.button("Export cohort", type="primary", key="cohort-export", disabled=n == 0 or incomplete):
    # a de-identified export's folder does not take the cohort's name (it may hold an identifier
    # the manifest redacts); the manifest holds the (redacted) name
    out = common.export_folder(spec.name if not spec.deidentify else "cohort")
    with st.spinner("Exporting…"):
        try:
            manifest = export_cohort(ws, spec, out)
            S.cohort_export = {"dir": str(out), "manifest": manifest, "spec": spec_to_toml(spec)}
        except Exception as exc:  # noqa: BLE001
            S.cohort_export = None
            st.error(f"Export failed: {exc}")

exp = S.get("cohort_export")
if exp and exp.get("spec") != spec_to_toml(spec):  # the cohort changed: its files are not this cohort's
    st.info("The cohort changed since the last export; export again for this one.")
    S.cohort_export = exp = None
if exp:
    folder = Path(exp["dir"])
    m = exp["manifest"]
    c = m.get("counts", {})
    st.success(f"Exported **{m.get('name')}**: {c.get('rows', 0):,} rows"
               + (" (de-identified)" if m.get("deidentified") else " (identified)") + f" to `{folder}`")
    if not common.exports_base():
        st.caption("The folder stays after the app stops: delete it when you are done with it. `curator app --exports DIR` "
                   "puts exports in a folder of your choosing.")
    cols = st.columns(4)
    for col, (fname, mime) in zip(cols, (("cohort.csv", "text/csv"), ("cohort.parquet", "application/octet-stream"),
                                         ("manifest.json", "application/json"))):
        path = folder / fname
        if path.is_file():
            col.download_button(f"Download {fname}", path.read_bytes(), file_name=f"{m.get('name')}-{fname}", mime=mime,
                                on_click="ignore", key=f"cohort-dl-{fname}")
    if (folder / "images").is_dir():
        def zipped(folder=folder) -> bytes:  # built when the button is clicked, not on every rerun of the page
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(folder.rglob("*")):
                    if p.is_file():
                        z.write(p, p.relative_to(folder))
            return buf.getvalue()

        cols[3].download_button("Download all (zip)", zipped, file_name=f"{m.get('name')}.zip",
                                mime="application/zip", on_click="ignore", key="cohort-dl-zip")
    with st.expander("Manifest"):
        st.json(m, expanded=False)
