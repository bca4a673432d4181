"""Cohort specs, SQL, export (de-identified by default), splits, sampling, growth, the Dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydicom.uid import generate_uid

from curator.cohort import (CohortSpec, SampleSpec, SplitSpec, cohort_sql, count_cohort, export_cohort, load_spec,
                            select_cohort, spec_from_dict, spec_to_dict, spec_to_toml)
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.query import QueryError, run_query
from curator.workspace import Workspace
from tests.dicom_factory import write_dicom


def write_dicom_archive(folder: Path, patients: range, seed: int = 0, extra_images_for: dict | None = None) -> list[dict]:
    """DICOMs with identifiers: PatientID in the folder names too. Returns one dict per file."""
    rng = np.random.default_rng(seed)
    out = []
    for p in patients:
        pid = f"PID-{p:04d}"
        for s in range(1 + p % 3):
            study_uid = generate_uid()
            date = f"{2014 + (p + s) % 8}0{1 + s}1{p % 9}"
            for k in range(1 + (p + s) % 2):
                yy, xx = np.mgrid[0:72, 0:64]
                r = rng.uniform(8, 28)
                img = 600 + 2500 * ((xx - rng.uniform(20, 44)) ** 2 + (yy - rng.uniform(20, 52)) ** 2 < r * r) + rng.normal(0, 200, (72, 64))
                info = dict(patient_id=pid, patient_name=f"Doe^Patient{p}", patient_birth_date=f"19{40 + p:02d}0102",
                            study_instance_uid=study_uid, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                            study_date=date, view_position=("PA", "AP", "LATERAL")[(p + s + k) % 3],
                            patient_age="095Y" if p == 1 else f"{30 + p:03d}Y", institution_name="Saint Example Hospital")
                path = folder / pid / f"{date}_{s}" / f"img{k}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_dicom(path, np.clip(img, 0, 4095).astype(np.uint16), bits_stored=12, **info)
                out.append({**info, "path": str(path.resolve()), "patient_name": info["patient_name"], "birth": info["patient_birth_date"]})
    return out


def embed(arc: Path, ws: Path, cks) -> None:
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(c) for c in cks], device="cpu", workers=0,
                          batch_size=16, progress=False))


@pytest.fixture(scope="module")
def dicom_ws(tmp_path_factory, tiny_checkpoints):
    d = tmp_path_factory.mktemp("cohort")
    arc, ws = d / "arc", d / "ws"
    files = write_dicom_archive(arc, range(1, 11))
    embed(arc, ws, tiny_checkpoints[:1])
    return arc, ws, files


def test_spec_toml_contract_and_round_trip(tmp_path):
    p = tmp_path / "edema.toml"
    p.write_text('name = "edema-frontal"\nwhere = "edema >= 0.6 AND view_position IN (\'PA\', \'AP\')"\n'
                 'one_per = "study"\nlimit = 5000\n# deidentify = false\n')
    spec = load_spec(p)
    assert (spec.name, spec.one_per, spec.limit, spec.deidentify) == ("edema-frontal", "study", 5000, True)
    assert "view_position IN ('PA', 'AP')" in spec.where
    full = CohortSpec(name="x", where="edema > 0.1", one_per="patient", keep="edema DESC", order_by="edema DESC",
                      sample=SampleSpec(n_positive=3, positive_where="edema > 0.5", n_negative=2, negative_where="edema < 0.5"),
                      split=SplitSpec(0.6, 0.2, 0.2, seed=4), copy_images="copy", seed=3, findings=["edema"])
    assert spec_from_dict(spec_to_dict(full)) == full
    (tmp_path / "full.toml").write_text(spec_to_toml(full))
    assert load_spec(tmp_path / "full.toml") == full
    # text beyond the BMP, quotes, backslashes, control characters and a trailing SQL comment survive
    odd = CohortSpec(name="lungs \U0001FAC1 \"quoted\" C:\\x", where="edema > 0.5 -- a comment\n\tAND true\x01",
                     description="caf\u00e9\r\n\x7f")
    (tmp_path / "odd.toml").write_text(spec_to_toml(odd), encoding="utf-8")
    assert load_spec(tmp_path / "odd.toml") == odd
    for bad, msg in (({"name": "a", "wher": "x"}, "unknown key"), ({"name": "a", "one_per": "series"}, "one_per"),
                     ({"name": "a", "copy_images": "symlink"}, "symlink"), ({"name": "a", "split": {"train": 0.5, "val": 0.1, "test": 0.1}}, "must be 1"),
                     ({"name": "a", "sample": {"n": 3, "positive_where": "true"}}, "not both"), ({"where": "true"}, "name")):
        with pytest.raises(ValueError, match=msg):
            spec_from_dict(bad)


def test_exported_rows_equal_an_independent_duckdb_query(dicom_ws, tmp_path):
    _, ws, _ = dicom_ws
    w = Workspace(ws)
    med = float(run_query(w, "SELECT median(edema) m FROM images").m[0])
    spec = CohortSpec(name="edema", where=f"edema >= {med} AND view_position IN ('PA', 'AP')", one_per="study",
                      keep="edema DESC", order_by="edema DESC", limit=6, deidentify=False)
    m = export_cohort(ws, spec, tmp_path / "out")
    got = pd.read_parquet(tmp_path / "out" / "cohort.parquet")
    ps = w.manifest["finding_columns"]["edema"]
    con = duckdb.connect()
    expected = con.execute(f"""
        WITH cat AS (
            SELECT * FROM read_parquet('{ws}/catalog/*.parquet')
            QUALIFY row_number() OVER (PARTITION BY path ORDER BY image_id DESC) = 1
        ), pred AS (
            SELECT image_id, edema FROM read_parquet('{ws}/predictions/*.parquet', union_by_name = true)
            WHERE member = 'ensemble' AND prompt_set = '{ps}'
        ), j AS (
            SELECT cat.*, pred.edema FROM cat JOIN pred USING (image_id)
            WHERE pred.edema >= {med} AND view_position IN ('PA', 'AP')
        )
        SELECT image_id, path, study_instance_uid, edema FROM j
        QUALIFY row_number() OVER (PARTITION BY study_instance_uid ORDER BY edema DESC, image_id) = 1
        ORDER BY edema DESC, image_id LIMIT 6
    """).df()
    assert len(expected) == 6
    assert got.image_id.tolist() == expected.image_id.tolist()
    assert got.path.tolist() == expected.path.tolist()
    np.testing.assert_array_equal(got.edema.to_numpy(), expected.edema.to_numpy())
    csv = pd.read_csv(tmp_path / "out" / "cohort.csv")
    assert csv.image_id.tolist() == expected.image_id.tolist()
    assert m["counts"]["rows"] == 6 and m["sql"] == cohort_sql(spec, w)
    # the manifest's SQL reruns as it is
    assert run_query(w, m["sql"]).image_id.tolist() == expected.image_id.tolist()
    assert count_cohort(ws, spec) == 6 == len(select_cohort(ws, spec))
    assert not {"_patient", "_study"} & set(select_cohort(ws, spec).columns)


def _all_text(out: Path) -> list[tuple[str, bytes]]:
    """Every file's bytes, and the decoded cells and metadata of the Parquet file."""
    blobs = []
    for f in sorted(out.rglob("*")):
        if f.is_file():
            blobs.append((str(f), f.read_bytes()))
            if f.suffix == ".parquet":
                t = pq.read_table(f)
                cells = t.to_pandas().astype(str).to_csv(index=False)
                meta = json.dumps({k.decode(): v.decode(errors="replace") for k, v in (t.schema.metadata or {}).items()})
                blobs.append((f"{f} (decoded)", (cells + meta).encode()))
    return blobs


def test_deidentified_export_holds_no_identifiers(dicom_ws, tmp_path):
    arc, ws, files = dicom_ws
    spec = CohortSpec(name="deid", where="patient_id <> 'PID-0009' AND edema > 0", split=SplitSpec(0.6, 0.2, 0.2),
                      copy_images="copy", description="all but 'PID-0009'")
    m = export_cohort(ws, spec, tmp_path / "out")
    out = tmp_path / "out"
    df = pd.read_parquet(out / "cohort.parquet")
    n_expected = sum(f["patient_id"] != "PID-0009" for f in files)
    assert len(df) == n_expected and m["deidentified"] is True
    secrets = {str(arc), str(arc.resolve()), "Saint Example Hospital", "Doe^", "Patient1"}
    for f in files:
        secrets |= {f["patient_id"], f["study_instance_uid"], f["series_instance_uid"], f["sop_instance_uid"], f["path"],
                    f["birth"], f"{f['birth'][:4]}-{f['birth'][4:6]}-{f['birth'][6:]}", f["study_date"],
                    f"{f['study_date'][:4]}-{f['study_date'][4:6]}-{f['study_date'][6:]}"}
    salt = (ws / ".deid_salt").read_text().strip()
    secrets.add(salt)
    blobs = _all_text(out)
    assert any(name.endswith(".png") for name, _ in blobs)
    for name, data in blobs:
        for s in secrets:
            assert s.encode() not in data, f"{s!r} found in {name}"
    assert {"path", "patient_id", "study_instance_uid", "sop_instance_uid", "study_date", "institution_name", "content_hash"}.isdisjoint(df.columns)
    assert {"patient_key", "study_key", "sop_key", "study_year", "split", "image_file", "edema"} <= set(df.columns)
    assert df.patient_age.max() == 90  # 95 -> 90
    assert df.patient_key.nunique() == 9 and df.patient_key.str.fullmatch("[0-9a-f]{24}").all()
    assert "[redacted]" in m["spec"]["where"]
    # no patient in two splits
    assert (df.groupby("patient_key").split.nunique() == 1).all()
    # the same salt: a second export gives the same keys
    m2 = export_cohort(ws, spec, tmp_path / "out2")
    df2 = pd.read_parquet(tmp_path / "out2" / "cohort.parquet")
    assert df2.patient_key.tolist() == df.patient_key.tolist() and m2["counts"] == m["counts"]


def test_deidentified_manifest_redacts_ids_and_patient_folders_in_the_spec_text(tmp_path, tiny_checkpoints):
    # folders named after patients, numeric patient IDs written without quotes, prefixes, free text
    arc, ws = tmp_path / "arc", tmp_path / "ws"
    people = {"DOE^JOHN_17708425": "17708425", "SMITH^JANE": "55501234", "ROE^RICHARD": "99900001", "POE^EDGAR": "31415926"}
    for folder, pid in people.items():
        (arc / folder).mkdir(parents=True)
        write_dicom(arc / folder / "img.dcm", np.full((72, 64), 1000, np.uint16) + np.arange(64, dtype=np.uint16), bits_stored=12,
                    patient_id=pid, patient_name=folder.split("_")[0], study_date="20190704" if pid == "31415926" else "20190317")
    embed(arc, ws, tiny_checkpoints[:1])
    spec = CohortSpec(name="patient 17708425 follow-up", description="cases of DOE^JOHN and SMITH^JANE, threshold 0.1005.",
                      where="(patient_id = 17708425 OR patient_id LIKE '5550123%' OR starts_with(patient_id, '9990') "
                            "OR path LIKE '%ROE^RICHARD%') AND edema >= 0.0 AND rows >= 16 AND study_date <> DATE '2019-07-04' "
                            "AND study_date >= '2001-01-01'")
    m = export_cohort(ws, spec, tmp_path / "out")
    assert m["counts"]["rows"] == 3
    text = (tmp_path / "out" / "manifest.json").read_text()
    for secret in ("17708425", "5550123", "9990", "DOE^JOHN", "SMITH^JANE", "ROE^RICHARD", "2019-07-04"):
        assert secret not in text, secret
    # what identifies no one stays readable: the conditions on other columns; every literal that
    # stands with an identifying column is blanked, even a date no study has
    assert "edema >= 0.0 AND rows >= 16" in m["spec"]["where"] and "threshold 0.1005" in m["description"]
    assert "study_date >= '[redacted]'" in m["spec"]["where"] and "2001-01-01" not in text
    assert m["spec"]["where"].count("[redacted]") == 6 and m["name"] == "patient [redacted] follow-up"
    assert m["deidentification"]["redacted_spec_literals"] >= 6
    assert m["sql"].count("[redacted]") == 7  # and the name in its first line


@pytest.mark.parametrize("where", [
    "lower(patient_id) = 'mrn778899'",
    "patient_id ILIKE 'mrn778899'",
    "patient_id LIKE 'MRN7788_9'",
    "regexp_matches(patient_id, '^MRN7788.9$')",
    "contains(patient_id, 778899::VARCHAR)",
    "year(study_date) = 2019 AND month(study_date) = 3 AND day(study_date) = 17",
    "strftime(study_date, '%d.%m.%Y') = '17.03.2019'",
    "study_date BETWEEN DATE '2019-03-16' AND DATE '2019-03-18'",
    "lower(path) LIKE '%smith^john%'",
    "institution_name = 'St Elsewhere Hospital Zurich'",
    "image_id IN (SELECT image_id FROM catalog WHERE patient_id = 'MRN778899')",
])
def test_deidentified_manifest_blanks_literals_written_against_identifying_columns(where, tmp_path, tiny_checkpoints, redaction_ws):
    # the ways a review wrote one patient's identifiers into a spec without the redactor seeing them
    ws = redaction_ws
    spec = CohortSpec(name="MRN778899_followup", where=f"({where}) AND edema >= 0.0",
                      description="re-read of MRN778899-2019 for John Smith and Jane Doe at St Elsewhere Hospital Zurich, 17.03.2019")
    m = export_cohort(ws, spec, tmp_path / "out")
    assert m["counts"]["rows"] >= 1
    text = (tmp_path / "out" / "manifest.json").read_text().lower()
    for secret in ("778899", "7788", "smith", "2019-03-1", "17.03", "elsewhere", "mrn"):
        assert secret not in text, (secret, where)
    assert "edema >= 0.0" in m["spec"]["where"]  # the condition on a finding stays readable
    assert "doe" not in text.replace("does", "")  # a three-letter surname, a folder of its own


def test_deidentified_manifest_drops_the_comments_of_the_spec_sql(tmp_path, redaction_ws):
    """A comment does nothing to the query and may say anything: a de-identified manifest has none
    (nested, block and line comments; not a '--' inside a string literal); the identified one keeps them."""
    where = ("edema >= 0 -- requested for DOE^JOHN (ROE^RICHARD too), scans of 2019-03-17 and 20180704\n"
             "AND rows >= 16 /* Jane /* nested Smith */ asked */ AND coalesce(view_position, '') <> 'x -- y'")
    spec = CohortSpec(name="edema", where=where, order_by="edema DESC -- Jane's favourite")
    m = export_cohort(redaction_ws, spec, tmp_path / "out")
    assert m["counts"]["rows"] == 3
    text = (tmp_path / "out" / "manifest.json").read_text().lower()
    for secret in ("doe", "roe^", "richard", "2019-03-17", "20180704", "jane", "smith", "requested", "favourite"):
        assert secret not in text.replace("does", ""), secret
    assert " ".join(m["spec"]["where"].split()) == "edema >= 0 AND rows >= 16 AND coalesce(view_position, '') <> 'x -- y'"
    assert m["spec"]["order_by"] == "edema DESC" and "AND rows >= 16" in m["sql"]
    ident = export_cohort(redaction_ws, dataclasses.replace(spec, deidentify=False), tmp_path / "ident")
    assert ident["spec"]["where"] == where and ident["counts"]["rows"] == 3


def test_deidentified_manifest_after_non_ascii_text(tmp_path, redaction_ws):
    """Identifying literals and comments are found where they are after non-ASCII characters
    (DuckDB's offsets count UTF-8 bytes)."""
    where = ("coalesce(body_part_examined, '') <> 'Lungenödem 侧位片（左侧）' AND patient_id <> 'MRN778899' "
             "AND rows >= 16 /* für DOE^JOHN */ AND edema >= 0 -- Smith bat darum")
    m = export_cohort(redaction_ws, CohortSpec(name="n", where=where), tmp_path / "out")
    assert m["counts"]["rows"] == 2
    text = (tmp_path / "out" / "manifest.json").read_text(encoding="utf-8")
    for secret in ("MRN778899", "778899", "DOE", "Smith", "für"):
        assert secret not in text, secret
    assert " ".join(m["spec"]["where"].split()) == ("coalesce(body_part_examined, '') <> 'Lungenödem 侧位片（左侧）' AND patient_id <> "
                                                   "'[redacted]' AND rows >= 16 AND edema >= 0")


@pytest.mark.parametrize("where, secrets", [
    ("study_date = $$2019-03-17$$ OR edema >= 0", ("2019-03-17",)),
    ("study_date <> $d$2019-03-17$d$ OR edema >= 0", ("2019-03-17",)),
    ("institution_name <> E'St Elsewhere\\'s MRN778899' OR edema >= 0", ("MRN778899", "Elsewhere")),
    # a comment between two pieces of one literal: its line break joins them ('MRN77' 'HN8899' is one string)
    ("patient_id <> 'MRN77' -- note\n'8899' OR edema >= 0", ("MRN77", "8899")),
    ("patient_id <> 'MRN77'\n  '8899' OR edema >= 0", ("MRN77", "8899")),
])
def test_deidentified_manifest_redacts_every_kind_of_string_literal(tmp_path, redaction_ws, where, secrets):
    """Dollar-quoted and E'' strings, and a literal continued on the next line, are blanked whole
    where they stand with an identifying column; the export runs (the redacted rule stays valid)."""
    m = export_cohort(redaction_ws, CohortSpec(name="n", where=where), tmp_path / "out")
    assert m["counts"]["rows"] == 3
    text = (tmp_path / "out" / "manifest.json").read_text(encoding="utf-8")
    for secret in secrets:
        assert secret not in text, secret
    assert "[redacted]" in m["spec"]["where"] and "edema >= 0" in m["spec"]["where"]


def test_strip_sql_comments_against_duckdb():
    """The stripped text means what the original did, for DuckDB itself (an independent check)."""
    import duckdb

    from curator.cohort import strip_sql_comments

    for expr in ("1 + 2 -- three", "1 /* a /* b */ c */ + 2", "'a -- b' || 'c' -- d", "'/* x */'", "1 --\r\n + 2", "3",
                 # DuckDB counts its offsets in UTF-8 bytes: text after non-ASCII characters is cut where Python's is
                 "'侧位片（左侧）' || 'x' -- for DOE^JOHN", "'ä' /* für die Studie */ || 'b'", "/* 肺水肿队列 */\n 'ö' -- é",
                 # a comment between two pieces of one string literal keeps its line break ('P' then 'A' is 'PA')
                 "'P' -- split\n'A'"):
        got = strip_sql_comments(expr)
        assert duckdb.sql(f"SELECT {got} AS v").fetchall() == duckdb.sql(f"SELECT {expr}\n AS v").fetchall(), expr
        assert not any(k == duckdb.token_type.comment for _, k in duckdb.tokenize(got)), expr
        assert "DOE" not in got and "Studie" not in got and "队列" not in got, expr
    assert strip_sql_comments("edema > 0.5") == "edema > 0.5"


@pytest.fixture(scope="module")
def redaction_ws(tmp_path_factory, tiny_checkpoints):
    d = tmp_path_factory.mktemp("redaction")
    arc, ws = d / "arc", d / "ws"
    for folder, pid, day in (("SMITH^JOHN_MRN778899/2019-03-17", "MRN778899", "20190317"), ("DOE/2018-01-02", "PID0002", "20180102"),
                             ("ROE^ANN/2017-05-06", "PID0003", "20170506")):
        (arc / folder).mkdir(parents=True)
        write_dicom(arc / folder / "img.dcm", np.full((72, 64), 1000, np.uint16) + np.arange(64, dtype=np.uint16), bits_stored=12,
                    patient_id=pid, study_date=day, institution_name="St Elsewhere Hospital Zurich")
    embed(arc, ws, tiny_checkpoints[:1])
    return ws


def test_png_archive_without_patient_ids_warns_and_patient_key_groups_it(tmp_path, tiny_checkpoints):
    from tests.conftest import write_raster_archive

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    for pid, n in (("p01", 3), ("p02", 2)):
        write_raster_archive(arc / pid, n, seed=n)
    embed(arc, ws, tiny_checkpoints[:1])
    m = export_cohort(ws, CohortSpec(name="all", one_per="patient"), tmp_path / "a")
    assert m["counts"]["rows"] == 5 and m["counts"]["patients"] == 5  # every image its own patient ...
    assert "5 of 5 rows have no patient key" in m["warnings"][0]  # ... and the export says so
    m = export_cohort(ws, CohortSpec(name="all", one_per="patient", patient_key="regexp_extract(path, '/(p[0-9]+)/', 1)"), tmp_path / "b")
    assert m["counts"]["rows"] == 2 and m["counts"]["patients"] == 2 and not m["warnings"]
    # a key expression that matches nothing gives '' : no patient, not one patient for all
    m = export_cohort(ws, CohortSpec(name="all", one_per="patient", patient_key="regexp_extract(path, '/(q[0-9]+)/', 1)"), tmp_path / "c")
    assert m["counts"]["rows"] == 5 and m["warnings"]
    # one per study likewise: PNGs have no study UID; the export says so, and a study_key groups them
    m = export_cohort(ws, CohortSpec(name="all", one_per="study"), tmp_path / "d")
    assert m["counts"]["rows"] == 5 and len(m["warnings"]) == 1 and "5 of 5 rows have no study key" in m["warnings"][0]
    m = export_cohort(ws, CohortSpec(name="all", one_per="study", study_key="regexp_extract(path, '/(p[0-9]+)/', 1)"), tmp_path / "e")
    assert m["counts"]["rows"] == 2 and not m["warnings"]


def test_split_is_patient_disjoint_and_follows_the_documented_hash(dicom_ws, tmp_path):
    _, ws, files = dicom_ws
    spec = CohortSpec(name="split", split=SplitSpec(0.5, 0.25, 0.25, seed=7), deidentify=False)
    export_cohort(ws, spec, tmp_path / "o")
    df = pd.read_parquet(tmp_path / "o" / "cohort.parquet")
    assert len(df) == len(files)
    assert (df.groupby("patient_id").split.nunique() == 1).all()
    for pid, split in df.groupby("patient_id").split.first().items():
        u = int(hashlib.md5(f"7:{pid}".encode()).hexdigest()[:13], 16) / 2**52
        assert split == ("train" if u < 0.5 else "val" if u < 0.75 else "test")
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sum(v["patients"] for v in m["counts"]["split"].values()) == m["counts"]["patients"] == 10


def test_sampling_arms_are_seeded_and_follow_the_md5_rule(dicom_ws):
    _, ws, _ = dicom_ws
    w = Workspace(ws)
    med = float(run_query(w, "SELECT median(edema) m FROM images").m[0])
    spec = CohortSpec(name="s", sample=SampleSpec(n_positive=4, positive_where=f"edema >= {med}", n_negative=3, negative_where="true"), seed=5)
    df = select_cohort(ws, spec)
    assert df.cohort_arm.value_counts().to_dict() == {"positive": 4, "negative": 3}
    allrows = run_query(w, "SELECT image_id, edema FROM images")
    pos = allrows[allrows.edema >= med]
    neg = allrows[allrows.edema < med]
    key = lambda ids: sorted(ids, key=lambda i: (hashlib.md5(f"{i}:5".encode()).hexdigest(), i))
    assert sorted(df[df.cohort_arm == "positive"].image_id) == sorted(key(pos.image_id)[:4])
    assert sorted(df[df.cohort_arm == "negative"].image_id) == sorted(key(neg.image_id)[:3])
    assert select_cohort(ws, spec).image_id.tolist() == df.image_id.tolist()
    one = select_cohort(ws, CohortSpec(name="u", sample=SampleSpec(n=5), seed=1))
    assert len(one) == 5


def test_one_per_patient_keeps_the_first_row_and_user_sql_is_sandboxed(dicom_ws):
    _, ws, _ = dicom_ws
    df = select_cohort(ws, CohortSpec(name="p", one_per="patient", deidentify=False))
    full = run_query(Workspace(ws), "SELECT patient_id, min(image_id) AS first FROM images GROUP BY patient_id")
    assert sorted(df.image_id) == sorted(full["first"])
    with pytest.raises(QueryError):
        select_cohort(ws, CohortSpec(name="evil", where="true AND (SELECT count(*) FROM read_csv('/etc/passwd')) > 0"))
    with pytest.raises(QueryError, match="one statement|does not parse"):
        count_cohort(ws, CohortSpec(name="evil", where="true; SELECT 1"))


def test_rerun_on_a_grown_archive_gives_a_superset(tmp_path, tiny_checkpoints):
    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_dicom_archive(arc, range(1, 4), seed=1)
    embed(arc, ws, tiny_checkpoints[:1])
    spec = CohortSpec(name="grow", where="view_position <> 'LATERAL'", one_per="study", split=SplitSpec())
    export_cohort(ws, spec, tmp_path / "a")
    before = pd.read_parquet(tmp_path / "a" / "cohort.parquet")
    write_dicom_archive(arc / "more", range(3, 7), seed=2)  # patients 3 (new studies) to 6
    embed(arc, ws, tiny_checkpoints[:1])
    export_cohort(ws, spec, tmp_path / "b")
    after = pd.read_parquet(tmp_path / "b" / "cohort.parquet")
    assert len(after) > len(before)
    assert set(before.image_id) <= set(after.image_id)
    merged = before.merge(after, on="image_id", suffixes=("_a", "_b"))
    assert (merged.split_a == merged.split_b).all() and (merged.patient_key_a == merged.patient_key_b).all()
    assert (after.groupby("patient_key").split.nunique() == 1).all()  # a returning patient keeps their split
    with pytest.raises(ValueError, match="not empty"):
        export_cohort(ws, spec, tmp_path / "b")
    export_cohort(ws, spec, tmp_path / "b", overwrite=True)
    # --overwrite replaces an earlier export only: never a folder with anything else in it
    (tmp_path / "b" / "notes.txt").write_text("my notes")
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.txt").write_text("draft")
    for folder, why in ((tmp_path / "b", "also holds notes.txt"), (other, "has no cohort manifest.json"),
                        (ws.parent, "holds the workspace"), (arc, "has no cohort manifest.json")):
        with pytest.raises(ValueError, match=why):
            export_cohort(ws, spec, folder, overwrite=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "my notes" and (other / "chapter1.txt").read_text() == "draft"
    assert (ws / "manifest.json").is_file() and any(arc.rglob("*.dcm"))


def test_dataset_reads_copied_and_source_images_as_the_model_input(dicom_ws, tmp_path):
    from curator.cohort_dataset import CohortDataset
    from curator.preprocess import model_input
    from curator.readers import ReadOptions, read_image

    _, ws, _ = dicom_ws
    export_cohort(ws, CohortSpec(name="d", limit=3, copy_images="copy", split=SplitSpec()), tmp_path / "deid")
    export_cohort(ws, CohortSpec(name="d", limit=3, deidentify=False), tmp_path / "ident")
    export_cohort(ws, CohortSpec(name="d", limit=3), tmp_path / "noimg")
    src = run_query(Workspace(ws), "SELECT image_id, path FROM images ORDER BY image_id LIMIT 3")
    a = CohortDataset(tmp_path / "deid")
    b = CohortDataset(tmp_path / "ident", return_id=True)
    assert len(a) == len(b) == 3 and a.target_columns == b.target_columns and "edema" in a.target_columns
    for i in range(3):
        want = model_input(read_image(src.path[i], ReadOptions(modalities=None)).image)
        xa, ya = a[i]
        xb, yb, iid = b[i]
        assert iid == src.image_id[i]
        torch.testing.assert_close(xa, want, rtol=0, atol=0)
        torch.testing.assert_close(xb, want, rtol=0, atol=0)
        assert ya.dtype == torch.float32 and torch.equal(ya, yb)
    loader = torch.utils.data.DataLoader(a, batch_size=2)
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 224, 224) and y.shape == (2, len(a.target_columns))
    with pytest.raises(ValueError, match="without images"):
        CohortDataset(tmp_path / "noimg")


def test_cli_cohort(dicom_ws, tmp_path, capsys, caplog):
    from curator.cli import main

    _, ws, _ = dicom_ws
    spec = tmp_path / "s.toml"
    spec.write_text('name = "cli"\nwhere = "view_position = \'PA\'"\none_per = "patient"\n')
    assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--count"]) == 0
    n = int(capsys.readouterr().out.split(":")[1].split()[0])
    assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--out", str(tmp_path / "o")]) == 0
    assert "de-identified" in capsys.readouterr().out and "identified export" not in caplog.text
    assert len(pd.read_csv(tmp_path / "o" / "cohort.csv")) == n
    # an identified export is said on stderr, with what makes it one (the flag or the spec)
    assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--out", str(tmp_path / "i"), "--no-deidentify"]) == 0
    assert "(identified)" in capsys.readouterr().out
    assert [r.levelname for r in caplog.records if "identified export (--no-deidentify)" in r.getMessage()] == ["WARNING"]
    spec.write_text(spec.read_text() + "deidentify = false\n")
    assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--out", str(tmp_path / "j")]) == 0
    assert f"identified export (deidentify = false in {spec})" in caplog.text
    assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--sql"]) == 0
    assert "QUALIFY row_number()" in capsys.readouterr().out
    spec.write_text('name = "bad"\nwhere = "no_such_column > 1"\n')
    assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--count"]) == 2
    assert "no_such_column" in capsys.readouterr().err
    (tmp_path / "afile").write_bytes(b"")
    for extra in ([], ["--overwrite"]):  # an existing file is not taken for a folder, with or without --overwrite
        assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--out", str(tmp_path / "afile"), *extra]) == 2
        assert "exists and is not a folder" in capsys.readouterr().err and (tmp_path / "afile").read_bytes() == b""
    spec.write_text('name = "bad"\nfindings = ["edema", "edemaa"]\n')  # whose precision to estimate: a misspelt one
    assert main(["cohort", "--workspace", str(ws), "--spec", str(spec), "--count"]) == 2
    err = capsys.readouterr().err
    assert "'findings' names no finding of this workspace: edemaa" in err and "Traceback" not in err


def test_text_condition_selects_the_images_above_a_similarity(dicom_ws, tmp_path, capsys):
    """[text]: the images whose similarity to a text query is above a threshold (range search over
    the index), checked against brute force over the stored embeddings; usable in `where`, kept in
    the export; clear errors without an index or with a bad [text]."""
    import shutil

    from curator import index as ci
    from curator.cli import main
    from curator.model import load_checkpoint
    from curator.workspace import WorkspaceError

    _, src, _ = dicom_ws
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    w = Workspace(ws)
    with pytest.raises(WorkspaceError, match="needs the index"):
        count_cohort(w, spec_from_dict({"name": "t", "text": {"query": "pleural effusion", "above": 0.0}}))
    with w.writer():
        ci.build_index(w, recall_sample=0)
    # brute force: the query's embedding (the model's own text tower) against every stored image embedding
    ck_path = next(iter(w.manifest["checkpoints"].values()))["path"]
    v = load_checkpoint(ck_path, "cpu").encode_texts(["pleural effusion"]).numpy()[0]
    cat = w.read_table("catalog").to_pandas()[["image_id", "view_position"]]
    emb = {r["image_id"]: np.asarray(r["embedding"], np.float32) for r in w.read_table("embeddings").to_pylist()}
    sims = {i: float(e @ v) for i, e in emb.items()}
    srt = sorted(sims.values(), reverse=True)
    j = int(np.argmax([srt[i] - srt[i + 1] for i in range(5, len(srt) // 2)])) + 5  # a clear gap, some images above
    thr = (srt[j] + srt[j + 1]) / 2
    want = {i for i, s in sims.items() if s > thr}
    spec = spec_from_dict({"name": "effusion", "text": {"query": "pleural effusion", "above": thr}})
    assert count_cohort(w, spec) == len(want) > 0
    rows = select_cohort(w, spec)
    assert set(rows["image_id"]) == want
    np.testing.assert_allclose(rows.set_index("image_id")["text_similarity"].sort_index(),
                               [sims[i] for i in sorted(want)], atol=1e-5)
    pa_ids = set(cat.loc[cat.view_position == "PA", "image_id"])
    both = spec_from_dict({"name": "pa", "where": "view_position = 'PA' AND text_similarity > -1", "order_by": "text_similarity DESC",
                           "text": {"query": "pleural effusion", "above": thr}})
    got = select_cohort(w, both)
    assert set(got["image_id"]) == want & pa_ids and list(got["text_similarity"]) == sorted(got["text_similarity"], reverse=True)
    manifest = export_cohort(w, both, tmp_path / "out")
    out = pd.read_csv(tmp_path / "out" / "cohort.csv")
    assert len(out) == len(want & pa_ids) == manifest["counts"]["rows"] and "text_similarity" in out.columns
    assert manifest["text_search"]["query"] == "pleural effusion" and manifest["text_search"]["index"]["type"] == "flat"
    assert "text_hits" in cohort_sql(both, w) and "[text]" in spec_to_toml(both)
    assert load_spec_roundtrip(both, tmp_path) == spec_to_dict(both)
    sql = cohort_sql(both, w)
    assert "-- text_hits(image_id, text_similarity)" in sql and "curator search -w W --above S" in sql
    # a query naming a patient is redacted in a de-identified manifest, as in `where` or `description`
    named = spec_from_dict({"name": "named", "text": {"query": "pleural effusion in PID-0003", "above": thr}})
    m = export_cohort(w, named, tmp_path / "named")
    assert "PID-0003" not in (tmp_path / "named" / "manifest.json").read_text() and m["text_search"]["contrast"] is None
    # an out-of-date index: the cohort misses what it lacks, and the export says so
    import faiss

    index, info = ci.load_index(w)
    gone = np.array(sorted(want)[:2], np.int64)
    index.remove_ids(gone)
    faiss.write_index(index, str(ws / info.file))
    meta = json.loads((ws / "index" / "index.json").read_text())
    meta.update(source_key=None, count=int(index.ntotal))
    (ws / "index" / "index.json").write_text(json.dumps(meta))
    ci_hits = spec_from_dict({"name": "stale", "text": {"query": "pleural effusion", "above": thr, "contrast": False}})
    m = export_cohort(w, ci_hits, tmp_path / "stale")
    assert m["counts"]["rows"] == len(want) - 2 and any("[text]:" in x and "2 " in x for x in m["warnings"]), m["warnings"]
    # the CLI, and bad [text] tables
    toml = tmp_path / "t.toml"
    toml.write_text(spec_to_toml(spec))
    assert main(["cohort", "--workspace", str(ws), "--spec", str(toml), "--count"]) == 0
    assert f"{len(want) - 2} rows" in capsys.readouterr().out  # (the index, still out of date, lacks two of them)
    for bad, says in (({"query": "", "above": 0.1}, "'query'"), ({"query": "x", "above": 2}, "'above'"),
                      ({"query": "x", "above": 0.1, "contrast": "no"}, "'contrast'"), ({"query": "x", "above": 0.1, "k": 3}, "unknown key"),
                      ({"query": "x", "above": 0.1, "contrast": "no {} {}"}, "'contrast'"),
                      ({"query": "x", "above": 0.1, "contrast": "no {}{x}"}, "'contrast'")):
        with pytest.raises(ValueError, match=says):
            spec_from_dict({"name": "bad", "text": bad})


def load_spec_roundtrip(spec, tmp_path):
    path = tmp_path / "round.toml"
    path.write_text(spec_to_toml(spec))
    return spec_to_dict(load_spec(path))


def test_export_streams_in_batches_with_the_same_files_as_one_batch(tmp_path, tiny_checkpoints, monkeypatch):
    # DICOMs (ages, dates, identifiers) and PNGs (all of those null) in one cohort: batches of
    # three rows, some with nulls only, some without any, give the bytes one batch gives
    import curator.cohort as cohort_mod
    from tests.conftest import write_raster_archive

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_dicom_archive(arc / "dcm", range(1, 5))
    write_raster_archive(arc / "png", 5)
    embed(arc, ws, tiny_checkpoints[:1])
    n = run_query(Workspace(ws), "SELECT count(*) AS n FROM images").n[0]
    specs = [CohortSpec(name="all", where="true", order_by="file_format, image_id", deidentify=False),
             CohortSpec(name="split", where="true", order_by="file_format DESC, image_id", split=SplitSpec(0.5, 0.25, 0.25, seed=1),
                        copy_images="copy")]
    for spec in specs:
        outs = []
        for rows in (3, 1 << 20):
            monkeypatch.setattr(cohort_mod, "EXPORT_BATCH_ROWS", rows)
            outs.append(tmp_path / f"{spec.name}-{rows}")
            m = export_cohort(ws, spec, outs[-1])
            assert m["counts"]["rows"] == n
        small, whole = outs
        assert pq.read_table(small / "cohort.parquet").equals(pq.read_table(whole / "cohort.parquet"), check_metadata=True)
        assert (small / "cohort.csv").read_bytes() == (whole / "cohort.csv").read_bytes()
        ms, mw = (json.loads((o / "manifest.json").read_text()) for o in outs)
        for key in ("counts", "columns", "images", "deidentification"):
            assert ms[key] == mw[key], key
        if spec.copy_images == "copy":
            assert sorted(p.name for p in (small / "images").iterdir()) == sorted(p.name for p in (whole / "images").iterdir())
            assert ms["images"]["written"] == n
    table = pq.read_table(tmp_path / f"all-{1 << 20}" / "cohort.parquet")
    old = int((table.column("patient_age").to_numpy(zero_copy_only=False) > 89).sum())  # (NaN for the PNGs)
    assert old > 0 and ms["deidentification"]["ages_capped"] == old and f"({old} rows)" in ms["deidentification"]["ages"]
    assert table.column("patient_age").null_count == 5 and pa.types.is_integer(table.schema.field("patient_age").type)
    csv = pd.read_csv(tmp_path / f"all-{1 << 20}" / "cohort.csv")
    pd.testing.assert_series_equal(csv.image_id, table.column("image_id").to_pandas(), check_dtype=False)
    parts = pd.read_parquet(tmp_path / f"split-{1 << 20}" / "cohort.parquet")
    man = json.loads((tmp_path / f"split-{1 << 20}" / "manifest.json").read_text())
    for s in ("train", "val", "test"):  # counts checked against the rows written
        assert man["counts"]["split"][s] == {"rows": int((parts.split == s).sum()), "patients": int(parts.loc[parts.split == s, "patient_key"].nunique())}
    assert man["counts"]["patients"] == parts.patient_key.nunique() and man["counts"]["studies"] == parts.study_key.nunique()


def test_a_spec_fragment_cannot_reach_out_of_its_place_in_the_rule():
    # "1=1) OR (1=1" in a where clause would override the conditions the rule puts beside it
    for where in ("edema > 0.5) OR (1=1", "(edema > 0.5"):
        with pytest.raises(ValueError, match="'where' (closes|leaves) a parenthesis"):
            cohort_sql(CohortSpec(name="x", where=where))
    with pytest.raises(ValueError, match="'positive_where' closes"):
        cohort_sql(CohortSpec(name="x", sample=SampleSpec(n_positive=1, positive_where="true) OR (true", n_negative=1, negative_where="true")))
    # an open string or block comment would swallow the SQL after it; a comment alone is no condition
    for where, says in (("view_position = 'PA", "quoted string open"), ("edema > 0.5 /* a /* b */", "comment open"),
                        ("-- edema only", "nothing but a comment"), ("/* x */ -- y", "nothing but a comment")):
        with pytest.raises(ValueError, match=f"'where' .*{says}"):
            cohort_sql(CohortSpec(name="x", where=where))
    for where in ("x = E'it\\'s", "x = $$open", "x = $t$a$$b", "view_position <> 'ä' AND x = 'open"):
        with pytest.raises(ValueError, match="quoted string open"):
            cohort_sql(CohortSpec(name="x", where=where))
    with pytest.raises(ValueError, match="comment open"):
        cohort_sql(CohortSpec(name="x", where="view_position <> '侧位片' /* open"))
    # closed strings after non-ASCII text, E'' and dollar-quoted strings are fine
    for where in ("body_part_examined <> 'THORAX (Brustkorb, Lungenödem)' AND view_position <> ''", "x = E'it\\'s'",
                  "x = $t$a$$b$t$", "'ö' = 'ö' -- é"):
        assert where in cohort_sql(CohortSpec(name="x", where=where), labels=False)
    # parentheses in strings and comments, and nested ones, are fine; so are closed strings and comments
    ok = CohortSpec(name="x", where="(path LIKE '%)%' OR f(g(1)) = 1) AND x IN ((1),(2)) -- )")
    assert "x IN ((1),(2))" in cohort_sql(ok, labels=False)
    ok = CohortSpec(name="x", where="view_position = 'it''s' /* a /* nested */ comment */")
    assert "view_position = 'it''s'" in cohort_sql(ok, labels=False)
