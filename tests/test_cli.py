"""The command line: help, version, clear errors for wrong input, preview, packaging."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curator.cli import build_parser, main
from curator.preprocess import model_input
from curator.preview import denormalize
from curator.readers import read_image

COMMANDS = ["embed", "label", "index", "search", "sql", "info", "preview"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from curator import __version__

    assert capsys.readouterr().out.strip() == f"curator {__version__}"


def test_help_and_version_do_not_import_torch():
    # Building the whole parser (every subcommand) must stay light: torch alone takes seconds.
    code = ("import sys; from curator.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'open_clip', 'streamlit', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: curator {command}") and len(out.splitlines()) > 4


def test_wrong_flag_says_what_is_wrong(capsys):
    with pytest.raises(SystemExit) as e:
        main(["embed", "x", "--workspace", "w", "--checkpoint", "c", "--batch-size", "0"])
    assert e.value.code == 2
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sql", "--workspace", "w", "select 1", "--format", "xml"])
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    rc = main(["-q", "embed", str(tmp_path), "--workspace", str(tmp_path / "ws"), "--checkpoint", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nope.pt" in err and "no such checkpoint" in err


def test_cuda_asked_without_cuda_is_an_error(tmp_path, tiny_checkpoints, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # not counted as a pass; CI machines have no GPU
    rc = main(["-q", "embed", str(tmp_path), "--workspace", str(tmp_path / "ws"), "--checkpoint", str(tiny_checkpoints[0]), "--device", "cuda"])
    assert rc == 1 and "CUDA is not available" in capsys.readouterr().err


def test_a_modality_that_dicom_does_not_define_is_warned(tmp_path, tiny_checkpoints, caplog):
    from tests.conftest import write_raster_archive

    write_raster_archive(tmp_path / "arc", 2)
    for given, odd in (("XR,dx", "XR"), ("CR,DX,CT", None), ("any", None)):
        caplog.clear()
        assert main(["-q", "embed", str(tmp_path / "arc"), "--workspace", str(tmp_path / f"ws-{given}"), "--checkpoint",
                     str(tiny_checkpoints[0]), "--modality", given, "--workers", "0"]) == 0
        warned = [r.getMessage() for r in caplog.records if "not a DICOM modality code" in r.getMessage()]
        assert warned == ([f"--modality {odd}: not a DICOM modality code (radiographs are CR and DX; 'any' takes every modality); "
                           "only DICOM files whose Modality is exactly that pass"] if odd else []), given


def test_commands_on_a_missing_workspace_explain(tmp_path, capsys):
    for cmd in (["info"], ["index"], ["sql", "select 1"], ["search", "edema"]):
        rc = main([cmd[0], "--workspace", str(tmp_path / "none"), *cmd[1:]])
        err = capsys.readouterr().err
        assert rc == 2 and "not a curator workspace" in err, (cmd, err)


def test_library_info_lines_stay_out_of_the_output():
    """The CLI shows curator's INFO lines, and libraries' only from WARNING up (-vv shows most)."""
    code = ("import logging, sys\nfrom curator.cli import _setup_logging\n_setup_logging(int(sys.argv[1]), False)\n"
            "logging.getLogger('openjpeg.encode').info('codec-info')\nlogging.getLogger('somelib').info('lib-info')\n"
            "logging.getLogger('somelib').warning('lib-warning')\n"
            "logging.getLogger('curator.model').info('our-info')\n")
    runs = {v: subprocess.run([sys.executable, "-c", code, str(v)], capture_output=True, text=True, check=True).stderr for v in (0, 2)}
    assert "our-info" in runs[0] and "lib-warning" in runs[0] and "lib-info" not in runs[0] and "codec-info" not in runs[0]
    assert "lib-info" in runs[2] and "our-info" in runs[2]


def test_a_file_no_decoder_can_read_is_one_error_row_not_a_traceback(tmp_path, tiny_checkpoints):
    """A JPEG Lossless DICOM whose fragment is noise: pydicom logs its decoders' failures with
    tracebacks; the CLI's output holds none of them (-vv does), and the file is recorded."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    from tests.dicom_factory import make_dataset

    arc = tmp_path / "arc"
    arc.mkdir()
    ds = make_dataset(np.zeros((64, 48), np.uint16), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + np.random.default_rng(0).integers(0, 256, 900, dtype=np.uint8).tobytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(arc / "noise.dcm", enforce_file_format=True)
    runs = {}
    for flags in ([], ["-vv"]):
        runs[bool(flags)] = r = subprocess.run([sys.executable, "-m", "curator.cli", *flags, "-q", "embed", str(arc), "--workspace",
                                                str(tmp_path / f"ws{len(flags)}"), "--checkpoint", str(tiny_checkpoints[0]), "--device", "cpu"],
                                               capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert "Traceback" not in runs[False].stderr and "failed: 1" in runs[False].stdout + runs[False].stderr
    assert "Traceback" in runs[True].stderr  # (the test can tell: pydicom does log one)


def test_preview_writes_what_the_model_sees(tmp_path):
    src = tmp_path / "x.png"
    arr = (np.arange(300 * 200) % 251).reshape(200, 300).astype(np.uint8)
    Image.fromarray(arr).save(src)
    rc = main(["preview", str(src), "--out", str(tmp_path / "o.png"), "--model-input", str(tmp_path / "m.png")])
    assert rc == 0
    with Image.open(tmp_path / "o.png") as o:
        np.testing.assert_array_equal(np.asarray(o), arr)
    with Image.open(tmp_path / "m.png") as m:
        assert m.size == (224, 224)
        expected = denormalize(model_input(read_image(src).image).numpy())
        np.testing.assert_array_equal(np.asarray(m), expected)
        # letterbox: a 3:2 image leaves black bands top and bottom
        got = np.asarray(m)
        assert got[:10].max() == 0 and got[-10:].max() == 0 and got[112].max() > 0


def test_denormalize_inverts_the_normalisation():
    import torch

    from curator.preprocess import normalize

    x = torch.arange(256, dtype=torch.float32).reshape(1, 16, 16).repeat(3, 1, 1)
    np.testing.assert_array_equal(denormalize(normalize(x).numpy()), np.arange(256).reshape(16, 16))


def test_wheel_ships_the_sql_prompts_and_pipelines(tmp_path):
    """`pip install .` (not only -e) must carry the non-Python files and the mapped packages."""
    import shutil

    root = Path(__file__).parents[1]
    src = tmp_path / "src"  # (a copy without build/: setuptools would also pack what an older build left there)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in ("curator", "pipelines", "app", "sql"):
        shutil.copytree(root / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, cwd=str(src))
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("curator/sql/views.sql", "curator/sql/cohorts/edema.sql", "curator/prompts/chexpert.toml",
                   "curator/pipelines/embed.py", "curator/pipelines/stages.py", "curator/cli.py", "curator/synth/archive.py",
                   "curator/data/demo_model.pt", "curator/app/main.py", "curator/app/views/search.py"):
        assert needed in names, needed
    # every source file of the package's folders, where the package maps it (a subpackage left out
    # of pyproject's list works with -e and fails after a plain install)
    mapped = {"curator": "curator", "pipelines": "curator/pipelines", "app": "curator/app", "sql": "curator/sql"}
    for folder, target in mapped.items():
        for f in (root / folder).rglob("*"):
            if f.is_file() and f.suffix in (".py", ".sql", ".toml", ".txt", ".pt", ".json") and "__pycache__" not in f.parts:
                want = f"{target}/{f.relative_to(root / folder).as_posix()}"
                assert want in names, f"{want} is not in the wheel"
    assert any(n.endswith("entry_points.txt") for n in names)
