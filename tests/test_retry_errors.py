"""Files that failed for the machine's reasons are read again; `--retry-errors` reads every failed file again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from curator.pipelines.embed import EmbedConfig, run_embed
from curator.query import run_query
from curator.workspace import Workspace


def _films(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (90, 110), dtype=np.uint8)).save(folder / n)
    return [str(folder / n) for n in names]


def _without_read_override() -> list[str]:
    """A command prefix that runs a process unable to read a mode-000 file: root keeps the
    permission checks only without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (util-linux's setpriv)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run this test as root"
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def _cli_embed(arc, ws, ck):
    cmd = _without_read_override() + [sys.executable, "-m", "curator.cli", "-q", "embed", str(arc), "-w", str(ws), "-c", str(ck),
                                      "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_file_without_read_permission_is_an_error_and_is_read_again_by_the_next_run(tmp_path, tiny_checkpoints):
    arc, ws = tmp_path / "arc", tmp_path / "ws"
    paths = _films(arc, [f"a{i}.png" for i in range(4)] + ["locked.png"])
    locked = paths[-1]
    os.chmod(locked, 0)
    try:
        _cli_embed(arc, ws, tiny_checkpoints[0])
        w = Workspace(ws)
        err = run_query(w, "SELECT path, stage, kind, error FROM errors")
        assert err.path.tolist() == [locked] and err.kind.tolist() == ["unreadable"], err
        assert "Permission denied" in err.error[0] and locked not in err.error[0]  # (no path: messages may be shown in the app)
        assert sorted(run_query(w, "SELECT path FROM catalog").path) == paths[:-1]
        _cli_embed(arc, ws, tiny_checkpoints[0])  # still locked: read again (a second error row), not skipped
        w = Workspace(ws)
        assert run_query(w, "SELECT count(*) AS n FROM errors_raw WHERE path = $p", {"p": locked}).n[0] == 2
    finally:
        os.chmod(locked, 0o644)
    s = run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
                              batch_size=4, progress=False))
    assert (s.processed, s.unchanged, s.known_errors) == (1, 4, 0)
    w = Workspace(ws)
    assert sorted(run_query(w, "SELECT path FROM catalog").path) == paths
    assert run_query(w, "SELECT count(*) AS n FROM errors").n[0] == 0


def test_retry_errors_reads_every_failed_file_again(tmp_path, tiny_checkpoints):
    from curator.cli import main

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    _films(arc, ["a.png", "b.png"])
    (arc / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cfg = dict(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0, batch_size=4,
               progress=False)
    first = run_embed(EmbedConfig(**cfg))
    assert first.processed == 2 and sum(first.failed.values()) == 1
    again = run_embed(EmbedConfig(**cfg))
    assert (again.processed, again.known_errors, sum(again.failed.values())) == (0, 1, 0)
    retried = run_embed(EmbedConfig(**cfg, retry_errors=True))
    assert (retried.processed, retried.unchanged, retried.known_errors) == (0, 2, 0)
    assert retried.failed == first.failed
    assert main(["-q", "embed", str(arc), "-w", str(ws), "-c", str(tiny_checkpoints[0]), "--device", "cpu", "--workers", "0",
                 "--retry-errors"]) == 0
    w = Workspace(ws)
    raw = run_query(w, "SELECT count(*) AS n FROM errors_raw WHERE path LIKE '%broken.png'").n[0]
    assert raw == 3  # the first run, --retry-errors in the library, then on the command line; the plain rerun skipped it
    assert run_query(w, "SELECT count(*) AS n FROM errors").n[0] == 1  # the view: one row a file


_THUMBNAIL_OF = """
import json, sys
from curator import thumbnails as T
from curator.query import connect
from curator.workspace import Workspace
w = Workspace(sys.argv[1])
found, problems = T.get_thumbnails(w.root, connect(w), [int(sys.argv[2])])
print(json.dumps({"found": len(found), "problems": {str(k): v for k, v in problems.items()}}))
"""


def test_a_preview_of_an_unreadable_file_does_not_show_its_path(tmp_path, tiny_checkpoints):
    # the app shows no source paths (they name patients' folders); its "no preview" reasons neither
    import json

    arc, ws = tmp_path / "DOE^JOHN_12345678", tmp_path / "ws"
    paths = _films(arc, ["a.png", "b.png"])
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
                          progress=False))
    image_id = int(run_query(Workspace(ws), "SELECT image_id FROM catalog WHERE path = $p", {"p": paths[0]}).image_id[0])
    os.chmod(paths[0], 0)
    try:
        proc = subprocess.run(_without_read_override() + [sys.executable, "-c", _THUMBNAIL_OF, str(ws), str(image_id)],
                              capture_output=True, text=True)
    finally:
        os.chmod(paths[0], 0o644)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["found"] == 0 and "permission denied" in got["problems"][str(image_id)]
    assert "DOE^JOHN" not in got["problems"][str(image_id)] and "12345678" not in got["problems"][str(image_id)]


def test_a_new_workspace_is_private_to_its_owner_and_an_existing_folder_keeps_its_mode(tmp_path, tiny_checkpoints):
    import stat

    arc = tmp_path / "arc"
    _films(arc, ["a.png"])
    for ws, made_before in ((tmp_path / "new" / "ws", False), (tmp_path / "shared", True)):
        if made_before:
            ws.mkdir(mode=0o750)
            os.chmod(ws, 0o750)
        run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
                              progress=False))
        assert stat.S_IMODE(os.stat(ws).st_mode) == (0o750 if made_before else 0o700)
