"""The Streamlit app, page by page, with streamlit's AppTest on a real small workspace.

The workspace is real (PNG + DICOM archive embedded with tiny checkpoints, FAISS index); the
expected answers come from independent computations (brute force over the stored embeddings,
plain DuckDB over the Parquet files).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from curator.pipelines.embed import EmbedConfig, run_embed

from curator.index import build_index, read_index_info, search_vectors_filtered
from curator.model import load_checkpoint
from curator.query import run_query
from curator.workspace import Workspace
from tests.conftest import write_raster_archive

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "app" / "main.py"
TIMEOUT = 90
PATIENTS = [f"PID-{i:04d}" for i in range(5)]


def build_workspace(root: Path, checkpoints, n_png: int = 8, n_dicom: int = 12, index: bool = True, junk: bool = True) -> Path:
    """PNG/JPEG files plus DICOMs with varied headers (view, sex, age, date, patient), embedded and indexed."""
    arc, ws = root / "arc", root / "ws"
    if n_png:
        write_raster_archive(arc / "png", n_png)
    if n_dicom:
        from tests.dicom_factory import write_dicom

        (arc / "dcm").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(7)
        views = ["PA", "AP", "LATERAL"]
        for i in range(n_dicom):
            yy, xx = np.mgrid[0:96, 0:80]
            blob = ((xx - rng.uniform(20, 60)) ** 2 + (yy - rng.uniform(20, 76)) ** 2) < rng.uniform(80, 600)
            px = (rng.random((96, 80)) * 1500 + 2000 * blob).astype(np.uint16)
            write_dicom(arc / "dcm" / f"d{i:02d}.dcm", px, view_position=views[i % 3], patient_sex="FM"[i % 2],
                        patient_age=f"{20 + 5 * i:03d}Y", study_date=f"{2015 + i % 6}0{1 + i % 9}15",
                        patient_id=PATIENTS[i % len(PATIENTS)], modality="CR" if i % 4 == 0 else "DX")
    if junk:
        (arc / "junk.png").write_bytes(b"this is not an image")
    cfg = EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(c) for c in checkpoints], device="cpu",
                      workers=0, batch_size=8, progress=False)
    run_embed(cfg)
    if index:
        w = Workspace(ws)
        with w.writer():
            build_index(w)
    return ws


@pytest.fixture(scope="module")
def ws_path(tmp_path_factory, tiny_checkpoints):
    return build_workspace(tmp_path_factory.mktemp("appws"), tiny_checkpoints[:2])


@pytest.fixture(autouse=True)
def served_locally():
    """The server settings `curator app` passes (AppTest runs the script in this process)."""
    from streamlit import config

    before = {k: config.get_option(k) for k in ("server.address", "browser.gatherUsageStats")}
    config.set_option("server.address", "127.0.0.1")
    config.set_option("browser.gatherUsageStats", False)
    yield
    for k, v in before.items():
        config.set_option(k, v)


@pytest.fixture()
def app(ws_path, monkeypatch, tmp_path):
    monkeypatch.setenv("CURATOR_WORKSPACE", str(ws_path))
    monkeypatch.setenv("CURATOR_EXPORTS", str(tmp_path / "exports"))
    monkeypatch.setenv("CURATOR_DEVICE", "cpu")
    return AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()


def images_table(ws: Path) -> pd.DataFrame:
    """Catalog + ensemble probabilities straight from the Parquet files (no curator code)."""
    con = duckdb.connect()
    return con.execute(
        f"SELECT c.*, p.* EXCLUDE (image_id, prompt_set, member) FROM read_parquet('{ws}/catalog/*.parquet') c "
        f"LEFT JOIN (SELECT * FROM read_parquet('{ws}/predictions/*.parquet', union_by_name = true) WHERE member = 'ensemble') p "
        "USING (image_id) ORDER BY image_id").df()


def stored_vectors(ws: Path, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    emb = pd.concat([pq.read_table(p).to_pandas() for p in sorted((ws / "embeddings").glob("*.parquet"))])
    emb = emb[emb.checkpoint == checkpoint].sort_values("image_id")
    return emb.image_id.to_numpy(), np.stack(emb.embedding.to_numpy()).astype(np.float64)


def result_ids(at) -> list[int]:
    """Image ids of the result grid, in display order (from the Details buttons)."""
    return [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("res-det-")]


def brute_force(ws: Path, vector: np.ndarray, allowed=None, exclude=()) -> list[int]:
    info = read_index_info(Workspace(ws))
    ids, vecs = stored_vectors(ws, info.checkpoint)
    sims = vecs @ np.asarray(vector, np.float64)
    keep = np.ones(len(ids), bool) if allowed is None else np.isin(ids, list(allowed))
    keep &= ~np.isin(ids, list(exclude))
    order = np.argsort(-sims[keep], kind="stable")
    return ids[keep][order].tolist()


def text_vector(ws: Path, text: str) -> np.ndarray:
    w = Workspace(ws)
    info = read_index_info(w)
    ck = load_checkpoint(w.manifest["checkpoints"][info.checkpoint]["path"], "cpu")
    return ck.encode_texts([text]).numpy()[0]


# -- search page ------------------------------------------------------------------------------
def test_app_opens_on_search_with_the_query_box_first(app):
    assert not app.exception
    assert app.title[0].value == "Search"
    assert app.text_input[0].label == "Search text"


def test_text_search_returns_the_expected_top_hits(app, ws_path):
    app.text_input[0].input("small left pleural effusion").run()
    assert not app.exception
    got = result_ids(app)
    assert len(got) == 20  # every image (20 < default k) once
    expected = brute_force(ws_path, text_vector(ws_path, "small left pleural effusion"))
    assert got[0] == expected[0]
    assert got == expected[: len(got)]
    # each card shows similarity, the chosen probabilities, view position and study date
    cards = [m.value for m in app.markdown if m.value.startswith("**#")]
    assert cards[0].startswith("**#1** · similarity") and "pleural_effusion" in cards[0]
    assert len(app.get("image")) == 20


def test_contrast_search_ranks_by_the_text_against_its_negation(app, ws_path):
    app.text_input[0].input("pleural effusion").run()
    plain = result_ids(app)
    app.toggle(key="search_contrast").set_value(True).run()
    assert not app.exception
    got = result_ids(app)
    # independent: the zero-shot logit difference of "pleural effusion" vs "no pleural effusion" per image
    pos, neg = text_vector(ws_path, "pleural effusion"), text_vector(ws_path, "no pleural effusion")
    direction = pos / np.linalg.norm(pos) - neg / np.linalg.norm(neg)
    expected = brute_force(ws_path, direction)
    assert got == expected[: len(got)] and len(got) == 20
    assert got != plain  # a different ranking from plain text search on this workspace
    assert any("against “no …”" in s.value for s in app.subheader)


def test_filters_restrict_the_search_itself(app, ws_path):
    table = images_table(ws_path)
    women = set(table.image_id[table.patient_sex == "F"])
    assert len(women) == 6
    app.text_input[0].input("cardiomegaly").run()
    unfiltered = result_ids(app)
    app.number_input(key="search_k").set_value(5).run()
    app.multiselect(key="search-filter-sex").select("F").run()
    assert not app.exception
    got = result_ids(app)
    assert len(got) == 5 and set(got) <= women
    # the best five among the women, not the women among an unfiltered top five
    assert got == brute_force(ws_path, text_vector(ws_path, "cardiomegaly"), allowed=women)[:5]
    assert len(set(unfiltered[:5]) & women) < 5
    # a probability condition too: every hit satisfies it, and k come back while >= k pass
    t = float(np.round(table.edema.median(), 4))
    passing = set(table.image_id[(table.edema > t) & (table.patient_sex == "F")])
    app.text_input(key="search-filter-cond").input(f"edema > {t}").run()
    got = result_ids(app)
    assert not app.exception and set(got) <= passing and len(got) == min(5, len(passing))
    # fewer than k pass: all of them come back
    app.number_input(key="search_k").set_value(50).run()
    assert set(result_ids(app)) == passing
    # a broken condition is explained, not a crash
    app.text_input(key="search-filter-cond").input("edema >> 2").run()
    assert not app.exception and any("Filter" in e.value for e in app.error)


def test_details_hide_patient_identifiers(app, ws_path):
    table = images_table(ws_path)
    dicom_id = int(table.image_id[table.file_format == "dicom"].iloc[0])
    app.text_input[0].input("edema").run()
    app.button(key=f"res-det-{dicom_id}").click().run()
    assert not app.exception
    assert any(m.value == f"**Image {dicom_id}**" for m in app.markdown)
    probs, meta = app.dataframe[0].value, app.dataframe[1].value
    assert set(probs.finding) >= {"edema", "pleural_effusion", "cardiomegaly"} and len(probs) == 14
    fields = dict(zip(meta.field, meta.value))
    assert fields["view_position"] in ("PA", "AP", "LATERAL") and "study_date" not in fields
    assert int(fields["study_year"]) == int(str(table.study_date[table.image_id == dicom_id].iloc[0])[:4])  # the year only
    assert not {"patient_id", "patient_name", "patient_birth_date", "path", "study_instance_uid", "series_instance_uid",
                "sop_instance_uid", "institution_name"} & set(fields)
    assert not any(pid in str(v) for v in fields.values() for pid in PATIENTS)
    assert not any(str(ws_path.parent) in str(v) or "General Hospital" in str(v) for v in fields.values())


def test_details_show_ages_over_89_as_a_de_identified_export_does():
    from curator.app.common import visible_metadata
    from curator.deid import deidentify_frame

    for age, shown in ((97, "90+"), (90, "90+"), (89, 89), (45, 45)):
        assert visible_metadata({"patient_age": age, "view_position": "PA"})["patient_age"] == shown
        exported = deidentify_frame(pd.DataFrame({"image_id": [1], "patient_age": [age]}), "00" * 32)[0].patient_age[0]
        assert (exported == 90) == (shown == "90+")


@pytest.mark.parametrize("address, stats, refused", [
    (None, False, "every network interface"),  # a plain `streamlit run` with no configuration
    ("0.0.0.0", False, "listens on 0.0.0.0"),
    ("127.0.0.1", True, "usage statistics"),
])
def test_app_refuses_to_serve_beyond_this_machine_unless_curator_app_chose_to(ws_path, monkeypatch, address, stats, refused):
    from streamlit import config

    monkeypatch.setenv("CURATOR_WORKSPACE", str(ws_path))
    config.set_option("server.address", address)
    config.set_option("browser.gatherUsageStats", stats)
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert at.error and refused in at.error[0].value and "curator app --workspace" in at.error[0].value
    assert not at.text_input and not at.dataframe  # nothing of the workspace shown
    for view in PAGES:  # each page script refuses too, run on its own
        at = AppTest.from_file(str(MAIN.parent / view), default_timeout=TIMEOUT).run()
        assert not at.exception and at.error and refused in at.error[0].value, view
        assert not at.dataframe and not at.metric and not at.image, view
    monkeypatch.setenv("CURATOR_APP_LAUNCHED", "1")  # `curator app --host 0.0.0.0` chose it (and warned)
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error and at.text_input


def test_overview_error_examples_leave_paths_out(tmp_path, tiny_checkpoints, monkeypatch):
    arc = tmp_path / "arc" / "DOE^JOHN"
    write_raster_archive(arc, 2)
    (arc / "loop").symlink_to("loop")  # a link to itself: its error quotes the path
    (arc / "broken.png").write_bytes(b"not an image")
    ws = tmp_path / "ws"
    run_embed(EmbedConfig(archives=[str(tmp_path / "arc")], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])],
                          device="cpu", workers=0, batch_size=8, progress=False))
    assert duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{ws}/errors/*.parquet') WHERE error LIKE '%DOE^JOHN%'").fetchone()[0] >= 1
    monkeypatch.setenv("CURATOR_WORKSPACE", str(ws))
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    at.switch_page("views/overview.py").run()
    assert not at.exception
    shown = " ".join(df.value.to_csv() for df in at.dataframe)
    assert "<file>" in shown or "<path>" in shown
    assert "DOE^JOHN" not in shown and str(tmp_path) not in shown


def test_more_like_this_and_upload(app, ws_path):
    table = images_table(ws_path)
    target = int(table.image_id.iloc[3])
    app.text_input[0].input("edema").run()
    app.button(key=f"res-mlt-{target}").click().run()
    assert not app.exception
    info = read_index_info(Workspace(ws_path))
    ids, vecs = stored_vectors(ws_path, info.checkpoint)
    got = result_ids(app)
    assert target not in got and got == brute_force(ws_path, vecs[list(ids).index(target)], exclude=[target])[: len(got)]
    # an uploaded copy of an archived file finds that file first, similarity 1
    png = table[table.file_format == "png"].iloc[0]
    app.file_uploader(key="search_upload").set_value(("query.png", Path(png.path).read_bytes(), "image/png")).run()
    assert not app.exception
    res = app.session_state["search_results"]
    assert int(res.image_id.iloc[0]) == int(png.image_id) and res.similarity.iloc[0] == pytest.approx(1.0, abs=1e-4)
    # a text search since: the file stays loaded, and one click searches with it again
    app.text_input[0].input("cardiomegaly").run()
    assert app.session_state["search_mode"] == "text" and app.button(key="search-use-upload")
    app.button(key="search-use-upload").click().run()
    res = app.session_state["search_results"]
    assert not app.exception and int(res.image_id.iloc[0]) == int(png.image_id)
    assert not [b for b in app.button if b.key == "search-use-upload"]
    # Details open below the row of the card clicked, not above the grid: after the last card of its
    # row, before the first of the next
    from curator.app.common import GRID_COLUMNS

    ids = [int(i) for i in res.image_id]
    assert len(ids) > 2 * GRID_COLUMNS
    app.button(key=f"res-det-{ids[GRID_COLUMNS + 1]}").click().run()
    keys = [b.key for b in app.button]
    at = keys.index("detail-close")
    assert keys.index(f"res-mlt-{ids[2 * GRID_COLUMNS - 1]}") < at < keys.index(f"res-det-{ids[2 * GRID_COLUMNS]}")
    # a file that is not an image is refused with a reason
    app.file_uploader(key="search_upload").set_value(("evil.dcm", b"\x00" * 300, "application/dicom")).run()
    assert not app.exception and any("Cannot use the uploaded file" in e.value for e in app.error)


# -- cohort page ------------------------------------------------------------------------------
def _cohort(app, threshold: float, views=("PA", "AP")):
    app.switch_page("views/cohort.py").run()
    assert not app.exception, app.exception
    app.selectbox(key="cohort-finding").select("edema").run()
    app.slider(key="cohort-threshold").set_value(threshold).run()
    app.multiselect(key="cohort-absent").select("cardiomegaly").run()
    app.slider(key="cohort-absent-threshold").set_value(0.99).run()
    for v in views:
        app.multiselect(key="cohort-filter-view").select(v).run()
    assert not app.exception, app.exception
    return app


def test_pages_keep_their_inputs_while_another_page_is_shown(app):
    """A half-built cohort, a query and its filters are still there after a look at another page."""
    app.text_input(key="search_q").input("pleural effusion").run()
    app.number_input(key="search_k").set_value(15).run()
    app.switch_page("views/cohort.py").run()
    app.selectbox(key="cohort-finding").select("edema").run()
    app.text_input(key="cohort-name").input("edema_study").run()
    app.multiselect(key="cohort-filter-view").select("PA").run()
    app.switch_page("views/sql.py").run()
    app.text_area(key="sql-query").input("SELECT 42 AS answer").run()
    app.switch_page("views/search.py").run()
    assert not app.exception
    assert app.text_input(key="search_q").value == "pleural effusion" and app.number_input(key="search_k").value == 15
    assert len(app.session_state["search_results"]) == 15
    app.switch_page("views/overview.py").run()
    app.switch_page("views/cohort.py").run()
    assert not app.exception
    assert app.selectbox(key="cohort-finding").value == "edema" and app.text_input(key="cohort-name").value == "edema_study"
    assert app.multiselect(key="cohort-filter-view").value == ["PA"]
    app.switch_page("views/sql.py").run()
    assert app.text_area(key="sql-query").value == "SELECT 42 AS answer"


def test_sampling_positives_and_negatives_needs_a_finding_before_export(app):
    app.switch_page("views/cohort.py").run()
    assert not app.button(key="cohort-export").disabled
    app.radio(key="cohort-sampling").set_value("N positives + N negatives").run()
    assert any("Choose a finding" in w.value for w in app.warning) and app.button(key="cohort-export").disabled
    app.selectbox(key="cohort-finding").select("edema").run()
    assert not app.exception and not app.button(key="cohort-export").disabled
    # an uploaded spec replaces the builder: the builder's unfinished sampling does not hold its export back
    app.selectbox(key="cohort-finding").select("(any)").run()
    assert app.button(key="cohort-export").disabled
    app.file_uploader(key="cohort-spec-file").set_value(("s.toml", b'name = "up"\nwhere = "edema >= 0"\n', "application/toml")).run()
    assert not app.exception and any("Using the uploaded spec" in i.value for i in app.info)
    assert not app.button(key="cohort-export").disabled


def test_cohort_export_rows_equal_an_independent_query(app, ws_path, tmp_path):
    table = images_table(ws_path)
    t = float(np.round(table.edema.median(), 2))
    _cohort(app, t)
    con = duckdb.connect()
    expected = con.execute(
        f"SELECT c.image_id FROM read_parquet('{ws_path}/catalog/*.parquet') c JOIN "
        f"read_parquet('{ws_path}/predictions/*.parquet', union_by_name = true) p USING (image_id) "
        f"WHERE p.member = 'ensemble' AND p.edema >= {t!r} AND p.cardiomegaly < 0.99 AND c.view_position IN ('PA', 'AP') "
        "ORDER BY 1").df().image_id.tolist()
    assert 0 < len(expected) < len(table)
    assert app.metric[0].value == str(len(expected))
    assert len(app.get("image")) == min(10, len(expected))  # the sample grid
    app.button(key="cohort-export").click().run()
    assert not app.exception and app.success, [e.value for e in app.error]
    out = Path(app.session_state["cohort_export"]["dir"])
    assert out.parent == tmp_path / "exports"
    got = pd.read_parquet(out / "cohort.parquet")
    assert sorted(got.image_id.tolist()) == expected
    assert sorted(pd.read_csv(out / "cohort.csv").image_id.tolist()) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == len(expected) and manifest["deidentified"] is True
    assert "edema" in manifest["sql"] and manifest["checkpoints"]
    labels = [d.label for d in app.get("download_button")]
    assert {"Download cohort.csv", "Download cohort.parquet", "Download manifest.json"} <= set(labels)


def test_cohort_extra_predicate_may_end_in_a_comment(app, ws_path):
    table = images_table(ws_path)
    _cohort(app, 0.0, views=())
    app.text_area(key="cohort-sql").input("modality = 'DX' -- digital films only").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.metric[0].value == str(int((table.modality == "DX").sum()))
    # but it cannot close the parenthesis around it and override the finding's condition
    app.text_area(key="cohort-sql").input("1=1) OR (1=1").run()
    assert not app.exception and any("closes a parenthesis it did not open" in e.value for e in app.error)
    for typed, says in (("-- only a comment", "nothing but a comment"), ("modality = 'DX", "quoted string open"),
                        ("modality = 'DX' /* open", "comment open")):
        app.text_area(key="cohort-sql").input(typed).run()
        errors = [e.value for e in app.error]
        assert not app.exception and any(says in e for e in errors) and not any("TUPLE" in e or "Cohort spec: cohort spec" in e
                                                                                for e in errors), (typed, errors)
    # a wrong column: DuckDB's reason, without the line number of SQL the user did not write
    app.text_area(key="cohort-sql").input("no_such_column > 1").run()
    errors = [e.value for e in app.error]
    assert any("Cannot run this cohort" in e and "no_such_column" in e for e in errors) and not any("LINE " in e for e in errors)


def test_cohort_export_is_deidentified_unless_opted_out(app, ws_path):
    table = images_table(ws_path)
    _cohort(app, 0.0, views=())
    app.text_input(key="cohort-name").input(f"follow-up of {PATIENTS[0]}").run()
    app.button(key="cohort-export").click().run()
    out = Path(app.session_state["cohort_export"]["dir"])
    assert PATIENTS[0] not in out.name and out.name.startswith("cohort-")  # the folder leaves with the data
    assert PATIENTS[0] not in json.loads((out / "manifest.json").read_text())["name"]
    df = pd.read_parquet(out / "cohort.parquet")
    assert len(df) == len(table)
    for col in ("patient_id", "path", "study_instance_uid", "sop_instance_uid", "study_date"):
        assert col not in df.columns
    secrets = [*PATIENTS, *table.study_instance_uid.dropna(), *table.sop_instance_uid.dropna(), str(ws_path.parent / "arc")]
    for name in ("cohort.csv", "manifest.json"):
        text = (out / name).read_text()
        leaked = [s for s in secrets if s in text]
        assert not leaked, (name, leaked[:3])
    # explicit opt-out: identifiers are kept
    app.toggle(key="cohort-deid").set_value(False).run()
    assert any("Identified export" in w.value for w in app.warning)
    app.button(key="cohort-export").click().run()
    out2 = Path(app.session_state["cohort_export"]["dir"])
    assert out2 != out
    df2 = pd.read_parquet(out2 / "cohort.parquet")
    assert set(df2.patient_id.dropna()) == set(PATIENTS)
    # a changed cohort does not keep showing (and offering) the last export's files
    app.slider(key="cohort-threshold").set_value(0.5).run()
    assert app.session_state["cohort_export"] is None and not any("Download cohort.csv" == d.label for d in app.get("download_button"))
    assert any("changed since the last export" in i.value for i in app.info)


def test_cohort_one_per_patient_and_sampling(app, ws_path):
    _cohort(app, 0.0, views=())
    app.radio(key="cohort-one-per").set_value("patient").run()
    table = images_table(ws_path)
    n_expected = table.patient_id.nunique() + int(table.patient_id.isna().sum())
    assert app.metric[0].value == str(n_expected)
    app.radio(key="cohort-one-per").set_value("image (all)").run()
    app.radio(key="cohort-sampling").set_value("N at random").run()
    app.number_input(key="cohort-nany").set_value(7).run()
    assert not app.exception and app.metric[0].value == "7"


# -- overview and SQL -------------------------------------------------------------------------
def test_overview_page(app, ws_path):
    app.switch_page("views/overview.py").run()
    assert not app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Images"] == "20" and metrics["Indexed"] == "20" and metrics["Checkpoints"] == "2"
    unusable = int(run_query(Workspace(ws_path), "SELECT count(*) AS n FROM errors WHERE coalesce(stage, '') <> 'filter'").n[0])
    assert int(metrics["Unusable files"]) == unusable >= 1  # (files filtered out on purpose are counted apart)
    subheaders = [s.value for s in app.subheader]
    assert {"Images", "Probabilities", "Unusable and filtered-out files by reason", "Runs"} <= set(subheaders)
    tables = [d.value for d in app.dataframe]
    errors = next(t for t in tables if "reason" in t.columns)
    assert "not_an_image" in set(errors.reason)


def test_sql_page_runs_selects_and_refuses_files_and_writes(app, ws_path, tmp_path):
    app.switch_page("views/sql.py").run()
    app.button(key="sql-run").click().run()
    assert not app.exception and not app.error
    assert len(app.dataframe[0].value) == 20 and app.get("download_button")
    refused = [
        "SELECT * FROM read_csv('/etc/passwd')",
        f"COPY (SELECT * FROM images) TO '{tmp_path}/out.csv'",
        f"COPY (SELECT * FROM images) TO '{ws_path}/out.csv'",
        "SELECT 1; SELECT 2",
        "SET enable_external_access = true",
        f"ATTACH '{tmp_path}/x.db'",
        "CREATE TABLE t AS SELECT 1",
        # EXPLAIN ANALYZE runs the statement it explains: a write inside one is refused as well
        f"EXPLAIN ANALYZE COPY (SELECT 'x' AS a) TO '{ws_path}/manifest.json' (FORMAT csv, HEADER false)",
        f"EXPLAIN ANALYZE /* SELECT */ COPY (SELECT 1) TO '{ws_path}/out.csv'",
        "EXPLAIN ANALYZE CREATE OR REPLACE VIEW images AS SELECT 1 AS image_id",
        # DuckDB's token offsets count UTF-8 bytes: after 33 two-byte characters, a slice by them
        # would start 33 characters late, at the SELECT inside the statement
        f"EXPLAIN ANALYZE /* {'ö' * 33} */ CREATE OR REPLACE VIEW images AS SELECT 1 AS image_id",
        # the workspace's top-level files (manifest, de-identification salt) are outside the sandbox
        f"SELECT content FROM read_text('{ws_path}/.deid_salt')",
        f"SELECT content FROM read_text('{ws_path}/manifest.json')",
    ]
    (ws_path / ".deid_salt").write_text("f" * 64)
    manifest = (ws_path / "manifest.json").read_bytes()
    for sql in refused:
        app.text_area(key="sql-query").input(sql)
        app.button(key="sql-run").click().run()
        assert not app.exception
        assert app.error and "Refused or failed" in app.error[0].value, sql
        assert not app.dataframe, sql
    assert not (tmp_path / "out.csv").exists() and not (ws_path / "out.csv").exists()
    assert not any("root:" in e.value or "ffff" in e.value for e in app.error)
    assert (ws_path / "manifest.json").read_bytes() == manifest
    (ws_path / ".deid_salt").unlink()
    # read-only EXPLAINs still run, and the views are intact after the refused statements
    for sql in ("EXPLAIN SELECT * FROM images", "EXPLAIN ANALYZE SELECT count(*) FROM images", "SELECT count(*) AS n FROM images"):
        app.text_area(key="sql-query").input(sql)
        app.button(key="sql-run").click().run()
        assert not app.exception and not app.error, sql
        assert app.dataframe, sql
    assert app.dataframe[0].value["n"].tolist() == [20]
    # an error names the line as typed, its marker aligned in a code block
    app.text_area(key="sql-query").input("SELECT 1 AS a,\n  'a'::INTEGER AS b")
    app.button(key="sql-run").click().run()
    assert "Conversion Error" in app.error[0].value and "LINE 2:" in app.code[0].value and "^^^" in app.code[0].value
    # results of an earlier text say so; a DATE shows as a date
    app.text_area(key="sql-query").input("SELECT DATE '2020-11-14' AS d").run()
    assert any("changed since these results" in c.value for c in app.caption)
    app.button(key="sql-run").click().run()
    assert str(app.dataframe[0].value["d"][0]) == "2020-11-14"
    assert not any("changed since" in c.value for c in app.caption)
    assert any("identifiers included" in c.value for c in app.caption)
    # errors met after the first rows are streamed are reported too, and DuckDB's other types display
    for sql, says in (("SELECT CASE WHEN range = 20000 THEN error('boom') ELSE range END AS x FROM range(100000)", "boom"),
                      ("SELECT (range * 1000000)::INTEGER AS x FROM range(5000)", "Conversion Error"),
                      ("SELECT DATE 'infinity' AS d", "Conversion Error")):
        app.text_area(key="sql-query").input(sql)
        app.button(key="sql-run").click().run()
        assert not app.exception and app.error and says in app.error[0].value + "".join(c.value for c in app.code), sql
    app.text_area(key="sql-query").input("SELECT union_value(k := 1) AS u, INTERVAL 3 DAY AS i, MAP {1: 2} AS m, 1::HUGEINT AS h")
    app.button(key="sql-run").click().run()
    assert not app.exception and not app.error and app.dataframe[0].value["u"].tolist() == [1]
    app.text_area(key="sql-query").input("SELECT range AS x FROM range(100001)")
    app.button(key="sql-run").click().run()
    assert not app.exception and len(app.dataframe[0].value) == 100_000 and any("Only the first 100,000" in w.value for w in app.warning)


# -- workspaces without an index, without images, or none at all ------------------------------
PAGES = ["views/search.py", "views/cohort.py", "views/overview.py", "views/sql.py"]


def _all_pages(monkeypatch, root):
    if root is None:
        monkeypatch.delenv("CURATOR_WORKSPACE", raising=False)
    else:
        monkeypatch.setenv("CURATOR_WORKSPACE", str(root))
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    out = {}
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        out[page] = " ".join(x.value for x in [*at.info, *at.warning, *at.error])
    return at, out


def test_workspace_without_index(ws_path, tmp_path, monkeypatch):
    copy = tmp_path / "noindex"
    shutil.copytree(ws_path, copy, ignore=shutil.ignore_patterns("index", "thumbnails"))
    at, msgs = _all_pages(monkeypatch, copy)
    assert "curator index --workspace" in msgs["views/search.py"]
    at.switch_page("views/overview.py").run()
    assert {m.label: m.value for m in at.metric}["Indexed"] == "no index"
    at.switch_page("views/cohort.py").run()
    assert at.metric[0].value == "20"


def test_app_on_a_workspace_with_a_query_cache(ws_path, tmp_path, monkeypatch):
    """Large workspaces have W/cache/images.duckdb: every page works on it and filtered search agrees."""
    from curator import query_cache
    from curator.cli import main as cli_main

    copy = tmp_path / "cached"
    shutil.copytree(ws_path, copy, ignore=shutil.ignore_patterns("thumbnails"))
    assert cli_main(["-q", "cache", "--workspace", str(copy)]) == 0
    assert query_cache.status(Workspace(copy)).fresh
    at, _ = _all_pages(monkeypatch, copy)
    at.switch_page("views/cohort.py").run()
    assert at.metric[0].value == "20"
    at.switch_page("views/search.py").run()
    table = images_table(copy)
    women = set(table.image_id[table.patient_sex == "F"])
    at.text_input[0].input("cardiomegaly").run()
    at.number_input(key="search_k").set_value(5).run()
    at.multiselect(key="search-filter-sex").select("F").run()
    assert not at.exception
    assert result_ids(at) == brute_force(copy, text_vector(copy, "cardiomegaly"), allowed=women)[:5]


def test_empty_and_missing_workspaces(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    with Workspace(empty).writer() as w:
        w.commit()  # a committed workspace holding no images (as after an embed that found none)
    _, msgs = _all_pages(monkeypatch, empty)
    assert "no images yet" in msgs["views/search.py"] and "no images yet" in msgs["views/cohort.py"].lower()
    _, msgs = _all_pages(monkeypatch, tmp_path / "nothing-here")
    assert all("not a curator workspace" in m for m in msgs.values())
    _, msgs = _all_pages(monkeypatch, None)
    assert all("curator app --workspace" in m for m in msgs.values())


# -- library pieces the app stands on ---------------------------------------------------------
@pytest.mark.parametrize("batch_max", [10**9, 0])  # IDSelectorBatch / IDSelectorBitmap
def test_filtered_faiss_search_is_exact_top_k_among_allowed(batch_max, monkeypatch):
    import faiss

    import curator.index as ci

    monkeypatch.setattr(ci, "_BATCH_SELECTOR_MAX", batch_max)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    faiss.normalize_L2(x)
    ids = np.arange(3000, dtype=np.int64) * 3 + 5
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(24))
    index.add_with_ids(x, ids)
    allowed = ids[rng.random(3000) < 0.05]
    _, got = search_vectors_filtered(index, x[:4], 20, allowed)
    for qi in range(4):
        s = x @ x[qi]
        m = np.isin(ids, allowed)
        assert got[qi].tolist() == ids[m][np.argsort(-s[m], kind="stable")][:20].tolist()
    _, got = search_vectors_filtered(index, x[:1], 20, allowed[:3])
    assert sorted(got[0].tolist()) == sorted(allowed[:3].tolist())
    assert search_vectors_filtered(index, x[:1], 20, [])[1].shape == (1, 0)
    _, plain = search_vectors_filtered(index, x[:2], 10)
    np.testing.assert_array_equal(plain, index.search(x[:2], 10)[1])


def test_thumbnails_come_from_the_catalog_only_and_are_cached(ws_path, monkeypatch):
    from curator import thumbnails as T
    from curator.query import connect

    w = Workspace(ws_path)
    con = connect(w)
    table = images_table(ws_path)
    ids = table.image_id.tolist()[:3]
    found, problems = T.get_thumbnails(w.root, con, [*ids, 99999])
    assert set(found) == set(ids) and problems == {99999: "not in the catalog"}
    assert all(T.thumbnail_path(w.root, i, "small").is_file() and T.thumbnail_path(w.root, i, "large").is_file() for i in ids)
    import io

    from PIL import Image

    assert max(Image.open(io.BytesIO(found[ids[0]])).size) <= T.SIZES["small"]
    # cached: the source is not decoded again
    monkeypatch.setattr(T, "render", lambda e: (_ for _ in ()).throw(AssertionError("decoded again")))
    again, _ = T.get_thumbnails(w.root, con, ids)
    assert again == found
    monkeypatch.undo()
    # a file changed since it was catalogued is not shown as the catalogued image
    row = table.iloc[5]
    entry = T.CatalogEntry(int(row.image_id), row.path, int(row["size"]) + 1, int(row.mtime_ns), row.conversion)
    with pytest.raises(T.ThumbnailError, match="changed"):
        T.render(entry)
    con.close()


def test_thumbnails_carry_no_metadata_of_the_source(tmp_path, tiny_checkpoints):
    """A JPEG's comment (and EXIF) can name the patient: thumbnails, which the app sends to the
    browser as they are, have none; one cached before (with the comment) is made again."""
    import io

    from PIL import Image

    from curator import thumbnails as T
    from curator.query import connect

    arc = tmp_path / "arc" / "DOE^JOHN_MRN778899"
    arc.mkdir(parents=True)
    img = Image.fromarray((np.arange(200 * 160) % 253).reshape(200, 160).astype(np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "ImageDescription SMITH^JANE"
    img.save(arc / "a.jpg", quality=90, comment=b"JPEGCOM DOE^JOHN MRN778899", exif=exif)
    img.save(arc / "b.jpg", quality=90, comment=b"JPEGCOM DOE^JOHN MRN778899")
    assert Image.open(arc / "a.jpg").info["comment"].startswith(b"JPEGCOM")  # (the sources do carry them)
    ws = tmp_path / "ws"
    run_embed(EmbedConfig(archives=[str(tmp_path / "arc")], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                          progress=False, workers=0, threads=1))
    w = Workspace(ws)
    con = connect(w)
    ids = [int(i) for i in con.execute("SELECT image_id FROM catalog ORDER BY path").fetchnumpy()["image_id"]]
    # b's thumbnail as an older curator cached it: the source's comment kept
    stale = io.BytesIO()
    img.save(stale, format="JPEG", quality=85, comment=b"JPEGCOM DOE^JOHN MRN778899")
    T.thumbnail_path(w.root, ids[1], "small").parent.mkdir(parents=True, exist_ok=True)
    T.thumbnail_path(w.root, ids[1], "small").write_bytes(stale.getvalue())
    assert T.carries_metadata(stale.getvalue())
    for size in ("small", "large"):
        found, problems = T.get_thumbnails(w.root, con, ids, size)
        assert set(found) == set(ids) and not problems
        for data in [*found.values(), *(T.thumbnail_path(w.root, i, size).read_bytes() for i in ids)]:
            assert b"DOE" not in data and b"SMITH" not in data and b"MRN" not in data
            got = Image.open(io.BytesIO(data))
            assert "comment" not in got.info and "exif" not in got.info and not T.carries_metadata(data)
    con.close()


def test_app_command(tmp_path, monkeypatch, capsys, ws_path):
    from curator import appserver
    from curator.cli import build_parser, main

    args = build_parser().parse_args(["app", "--workspace", str(ws_path)])
    assert args.host == "127.0.0.1" and args.port == 8501 and args.func is appserver.cmd_app
    cmd = appserver.streamlit_command(ws_path, args.host, 9999)
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.headless"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false" and flags["--server.port"] == "9999"
    assert Path(cmd[4]).is_file() and cmd[4].endswith("main.py")
    started = []

    class FakePopen:
        def __init__(self, cmd, env=None):
            started.append((cmd, env))

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(appserver.subprocess, "Popen", FakePopen)
    assert main(["app", "--workspace", str(ws_path), "--port", "8600"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert main(["app", "--workspace", str(ws_path), "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: serving on 0.0.0.0" in err
    assert started[-1][1]["CURATOR_WORKSPACE"] == str(ws_path)
    assert main(["app", "--workspace", str(tmp_path / "missing")]) == 2
    for host, loop in [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("10.1.2.3", False)]:
        assert appserver.is_loopback(host) is loop


def test_wheel_ships_the_app(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                       check=False, capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for needed in ("curator/app/main.py", "curator/app/common.py", "curator/app/views/search.py", "curator/app/views/cohort.py",
                   "curator/app/views/overview.py", "curator/app/views/sql.py", "curator/appserver.py", "curator/thumbnails.py"):
        assert needed in names, needed


def test_cohort_with_calibrated_labels(ws_path, tmp_path, monkeypatch):
    from curator.cli import main
    from curator.query import run_query

    copy = tmp_path / "calibrated"
    shutil.copytree(ws_path, copy, ignore=shutil.ignore_patterns("thumbnails"))
    table = images_table(copy)
    y = (table.edema > table.edema.median()).astype(int)
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"path": table.path, "Edema": y}).to_csv(truth, index=False)
    assert main(["calibrate", "--workspace", str(copy), "--truth", str(truth), "--resamples", "50"]) == 0
    monkeypatch.setenv("CURATOR_WORKSPACE", str(copy))
    monkeypatch.setenv("CURATOR_EXPORTS", str(tmp_path / "exports"))
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT).run()
    at.switch_page("views/cohort.py").run()
    at.toggle(key="cohort-use-labels").set_value(True).run()
    at.selectbox(key="cohort-finding").select("edema").run()
    assert not at.exception
    expected = run_query(Workspace(copy), "SELECT count(*) AS n FROM labels WHERE edema_label = 1").n[0]
    assert at.metric[0].value == str(expected)
    at.button(key="cohort-export").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    manifest = json.loads((Path(at.session_state["cohort_export"]["dir"]) / "manifest.json").read_text())
    assert '"edema_label" = 1' in manifest["spec"]["where"] and "edema_label" in manifest["columns"]["labels"]
