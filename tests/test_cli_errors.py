"""The command line on wrong or hostile input: read-only SQL, one-line errors instead of
tracebacks, .sql files from any folder, --contrast before the text, output formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curator.cli import main, printable_frame
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.prompts import PromptSetError, load_prompt_set
from curator.query import QueryError, run_query
from curator.workspace import Workspace
from tests.conftest import write_raster_archive
from tests.dicom_factory import write_dicom, write_dicomdir


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_checkpoints):
    """A small indexed workspace: 5 PNG/JPEG files and 2 DICOMs with a study date."""
    root = tmp_path_factory.mktemp("cli_errors")
    arc = root / "arc"
    write_raster_archive(arc, 5)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_dicom(arc / f"d{i}.dcm", rng.integers(0, 4096, (200, 160)).astype(np.uint16), bits_stored=12,
                    study_date="20241007")
    cfg = EmbedConfig(archives=[str(arc)], workspace=str(root / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu",
                      workers=0, batch_size=8, progress=False)
    assert run_embed(cfg).processed == 7
    assert main(["-q", "index", "--workspace", str(root / "ws")]) == 0
    return root / "ws"


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"curator {command}: error: "), err
    return err


# ------------------------------------------------------------------------------------------ 1
def test_sql_cannot_write_and_refuses_what_is_not_one_select(ws, capsys):
    part = sorted((ws / "catalog").glob("*.parquet"))[0]
    before = part.read_bytes()
    rc = main(["sql", "-w", str(ws), f"COPY (SELECT 'garbage' AS a) TO '{part}' (FORMAT parquet)"])
    assert rc == 2 and "not COPY" in one_error_line(capsys, "sql")
    assert part.read_bytes() == before
    rc = main(["sql", "-w", str(ws), f"ATTACH '{ws}/catalog/x.db' AS x; CREATE TABLE x.t AS SELECT 1"])
    assert rc == 2 and "one statement" in one_error_line(capsys, "sql")
    assert not (ws / "catalog" / "x.db").exists()
    for query, says in (("", "empty"), ("-- just a comment", "empty"), ("SET threads=1", "not SET"),
                        ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'", "EXPLAIN of a SELECT")):
        rc = main(["sql", "-w", str(ws), query])
        assert rc == 2 and says in one_error_line(capsys, "sql"), query
    # reading stays possible, EXPLAIN of a SELECT too
    assert main(["sql", "-w", str(ws), "SELECT count(*) AS n FROM images", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 7}]
    assert main(["sql", "-w", str(ws), "EXPLAIN SELECT * FROM images"]) == 0
    capsys.readouterr()


def test_run_query_on_an_empty_query_is_a_query_error(ws):
    with pytest.raises(QueryError, match="empty"):
        run_query(Workspace(ws), "-- nothing")


def test_sql_help_says_read_only_and_lists_the_labels_view(capsys):
    with pytest.raises(SystemExit):
        main(["sql", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Read-only" in out and "labels (image_id" in out and "curator calibrate" in out
    assert "writing files outside" not in out


# ------------------------------------------------------------------------------------------ 2
def test_unusable_images_are_one_line_errors(ws, tmp_path, capsys):
    txt = tmp_path / "some.txt"
    txt.write_text("not an image")
    dicomdir = write_dicomdir(tmp_path / "media")
    for args, says in (([str(txt)], "not a DICOM, PNG or JPEG"), ([str(tmp_path / "nonexistent.dcm")], "no such file"),
                       ([str(dicomdir)], "DICOMDIR"), ([str(tmp_path)], "is a directory")):
        rc = main(["search", "-w", str(ws), "--image", *args])
        err = one_error_line(capsys, "search")
        assert rc == 2 and args[0] in err and says in err, err
        rc = main(["preview", *args, "--out", str(tmp_path / "x.png")])
        err = one_error_line(capsys, "preview")
        assert rc == 2 and args[0] in err and says in err, err
    assert not (tmp_path / "x.png").exists()


def test_reader_says_no_such_file_for_a_missing_path(tmp_path):
    from curator.readers import ReadError, read_image

    with pytest.raises(ReadError, match="no such file"):
        read_image(tmp_path / "never.dcm")


def test_os_errors_are_one_line_errors_with_the_path(tmp_path, tiny_checkpoints, capsys):
    a_file = tmp_path / "some_file.txt"
    a_file.write_text("x")
    write_raster_archive(tmp_path / "arc", 1)
    rc = main(["-q", "embed", str(tmp_path / "arc"), "-w", str(a_file), "-c", str(tiny_checkpoints[0]), "--workers", "0"])
    err = one_error_line(capsys, "embed")
    assert rc == 2 and str(a_file) in err and "not a folder" in err
    rc = main(["-q", "synth", str(tmp_path / "arc"), "--studies", "1"])
    err = one_error_line(capsys, "synth")
    assert rc == 2 and "not empty" in err and "--exist-ok" in err
    rc = main(["-q", "synth", str(a_file), "--studies", "1"])
    err = one_error_line(capsys, "synth")
    assert rc == 2 and str(a_file) in err and "not a folder" in err
    # what the command's own checks do not foresee still reaches main as an OSError with its path
    rc = main(["-q", "synth", str(a_file / "sub"), "--studies", "1", "--image-size", "64"])
    err = one_error_line(capsys, "synth")
    assert rc == 2 and str(a_file) in err


# ------------------------------------------------------------------------------------------ 3
def test_shipped_sql_file_runs_from_any_folder(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no sql/ folder here
    for name in ("sql/cohorts/edema.sql", "cohorts/edema.sql"):
        assert main(["sql", "-w", str(ws), name, "--set", "threshold=0", "--format", "json"]) == 0, capsys.readouterr().err
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 7 and "edema" in rows[0]
    rc = main(["sql", "-w", str(ws), "sql/cohorts/nope.sql"])
    err = one_error_line(capsys, "sql")
    assert rc == 2 and "sql/cohorts/nope.sql: no such file" in err and "cohorts/edema.sql" in err
    # a file of the user's own still comes first, and SQL text ending in ".sql" is still SQL
    (tmp_path / "mine.sql").write_text("SELECT 42 AS answer")
    assert main(["sql", "-w", str(ws), "mine.sql", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"answer": 42}]
    assert main(["sql", "-w", str(ws), "SELECT v.sql FROM (SELECT 'x' AS sql) AS v", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"sql": "x"}]


# ------------------------------------------------------------------------------------------ 4
def test_contrast_before_the_text_means_the_text(ws, capsys):
    assert main(["search", "-w", str(ws), "moderate pulmonary edema", "--contrast", "-k", "5", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert main(["search", "-w", str(ws), "--contrast", "moderate pulmonary edema", "-k", "5", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before == after and before["contrast"] == "no {}" and before["query"] == "moderate pulmonary edema"
    # a template is still a template
    assert main(["search", "-w", str(ws), "edema", "--contrast", "absent {}", "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["contrast"] == "absent {}"
    rc = main(["search", "-w", str(ws), "--contrast", "no {}"])
    assert rc == 2 and "give a search TEXT" in one_error_line(capsys, "search")


# ------------------------------------------------------------------------------------------ 5
def test_dates_print_as_dates_and_csv_lists_as_json_lists(ws, capsys):
    q = "SELECT DATE '2024-10-07' AS d, TIMESTAMP '2024-10-07 10:30:00' AS t, [CAST(-0.128 AS FLOAT), 0.5] AS v, NULL::DATE AS n"
    assert main(["sql", "-w", str(ws), q, "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["d"] == "2024-10-07" and row["t"].startswith("2024-10-07T10:30:00") and row["n"] is None
    assert row["v"] == pytest.approx([-0.128, 0.5])
    assert main(["sql", "-w", str(ws), q, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == '2024-10-07,2024-10-07 10:30:00,"[-0.128, 0.5]",'
    assert main(["sql", "-w", str(ws), "SELECT embedding FROM embeddings LIMIT 1", "--format", "csv"]) == 0
    vec = json.loads(capsys.readouterr().out.splitlines()[1].strip('"'))
    assert len(vec) > 1 and all(isinstance(x, float) for x in vec)
    # search --json: the DICOMs' study date
    assert main(["search", "-w", str(ws), "edema", "-k", "7", "--json"]) == 0
    dates = {r["study_date"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert dates == {"2024-10-07", None}


def test_printable_frame_keeps_timestamps_that_are_not_dates():
    import pandas as pd

    df = pd.DataFrame({"t": pd.to_datetime(["2024-10-07 10:00", "2024-10-08 00:00"]), "d": pd.to_datetime(["2024-10-07", None])})
    out = printable_frame(df)
    assert out.d.tolist() == ["2024-10-07", None] and out.t.dtype.kind == "M"


def test_set_keeps_leading_zeros_and_quotes_force_text(ws, capsys):
    q = "SELECT getvariable('v') AS v, typeof(getvariable('v')) AS t"
    for value, expected in (("007", ["007", "VARCHAR"]), ("7", [7, "INTEGER"]), ("0.52", [0.52, "DOUBLE"]),
                            ("'7'", ["7", "VARCHAR"]), ("0", [0, "INTEGER"])):
        assert main(["sql", "-w", str(ws), q, "--set", f"v={value}", "--format", "json"]) == 0
        row = json.loads(capsys.readouterr().out)[0]
        assert [row["v"], row["t"]] == expected, value


def test_preview_refuses_a_suffix_it_would_not_write(tmp_path, capsys):
    src = tmp_path / "x.png"
    write_raster_archive(tmp_path / "a", 1)[0].rename(src)
    for out in (["--out", str(tmp_path / "x.jpg")], ["--out", str(tmp_path / "o.png"), "--model-input", str(tmp_path / "m.jpeg")]):
        rc = main(["preview", str(src), *out])
        err = one_error_line(capsys, "preview")
        assert rc == 2 and ".png" in err and out[-1] in err
    assert not list(tmp_path.glob("*.jp*g")) and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("body, says", [
    ('[[finding]]\nname = "Edema"\nphrase = ["pulmonary edema"]\n', "unknown key(s) 'phrase'"),
    ('[[finding]]\nname = "Edema"\nphrases = "pulmonary edema"\n', "'phrases' must be a list"),
    ('negativ = "no {}"\n[[finding]]\nname = "Edema"\n', "unknown key(s) 'negativ'"),
])
def test_prompt_set_typos_are_errors_naming_file_and_key(tmp_path, capsys, body, says):
    toml = tmp_path / "p.toml"
    toml.write_text(body)
    with pytest.raises(PromptSetError) as e:
        load_prompt_set(toml)
    assert str(toml) in str(e.value) and says in str(e.value)
    rc = main(["label", "--workspace", str(tmp_path / "none"), "--prompts", str(toml)])
    assert rc == 2 and says in one_error_line(capsys, "label")
