"""Crash safety, consistent readers, disk full, GPU OOM splitting (issue 7)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from curator.pipelines.embed import EmbedConfig, run_embed
from curator.query import run_query
from curator.verify import verify
from curator.workspace import Workspace, WorkspaceError
from tests.conftest import write_raster_archive

CRASH_POINTS = ["batch", "mapped", "part", "manifest-tmp", "commit"]


def _embed_cmd(arc, ws, ck, flush=3, workers=0):
    return [sys.executable, "-m", "curator.cli", "-q", "embed", str(arc), "--workspace", str(ws), "--checkpoint", str(ck),
            "--device", "cpu", "--batch-size", "2", "--flush-rows", str(flush), "--workers", str(workers)]


def _check_exact(ws, n_valid, n_bad):
    rep = verify(str(ws))
    assert rep.ok, rep.lines()
    w = Workspace(ws)
    df = run_query(w, "SELECT (SELECT count(*) FROM catalog_raw) raw, (SELECT count(*) FROM catalog) cur, "
                      "(SELECT count(*) FROM predictions WHERE member = 'ensemble') pred, "
                      "(SELECT count(*) FROM images WHERE edema IS NULL) unscored, (SELECT count(*) FROM errors) err")
    assert df.iloc[0].tolist() == [n_valid, n_valid, n_valid, 0, n_bad]


def crash_trials(tmp_path, ck, trials: int, seed: int):
    """Kill `curator embed` (injected SIGKILL at a random point, or from outside at a random time), rerun, check."""
    rng = random.Random(seed)
    arc = tmp_path / "arc"
    write_raster_archive(arc, 10, seed=seed)
    (arc / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (arc / "empty.jpg").write_bytes(b"")
    killed = 0
    for t in range(trials):
        ws = tmp_path / f"ws{t}"
        env = dict(os.environ)
        if t % 3 == 2:  # from outside, at a random moment
            # (the whole process group, as a scheduler or `docker kill` ends a job: the writer alone,
            # killed between forking a reader and that reader first running (it then closes its
            # copy of the lock), leaves the workspace locked for that moment, and the rerun below
            # comes at once)
            proc = subprocess.Popen(_embed_cmd(arc, ws, ck, workers=t % 2 * 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            time.sleep(rng.uniform(1.0, 6.0))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            env["CURATOR_CRASH_AT"] = f"{rng.choice(CRASH_POINTS)}:{rng.randint(1, 4)}"
            proc = subprocess.run(_embed_cmd(arc, ws, ck, workers=t % 2 * 2), env=env, capture_output=True)
        killed += proc.returncode == -signal.SIGKILL
        # a second run resumes (sometimes killed again first)
        if rng.random() < 0.3:
            env = dict(os.environ, CURATOR_CRASH_AT=f"{rng.choice(CRASH_POINTS)}:1")
            subprocess.run(_embed_cmd(arc, ws, ck), env=env, capture_output=True)
        run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(ck)], device="cpu", workers=0, batch_size=2, flush_rows=3, progress=False))
        _check_exact(ws, 10, 2)
    return killed


def test_killed_runs_resume_without_loss_or_duplicates(tmp_path, tiny_checkpoints):
    killed = crash_trials(tmp_path, tiny_checkpoints[0], trials=int(os.environ.get("CURATOR_CRASH_TRIALS", 6)), seed=1234)
    assert killed >= 3  # the faults really fired


_HOLD_LOCK_AND_FORK = """
import multiprocessing, os, sys, time
from curator.workspace import Workspace

def worker():
    print(os.getpid(), flush=True)  # the fork handlers have run by now (they run before the target)
    time.sleep(60)

with Workspace(sys.argv[1]).writer():
    child = multiprocessing.get_context("fork").Process(target=worker, daemon=False)
    child.start()
    time.sleep(60)
"""


def test_a_killed_writer_frees_the_workspace_even_while_its_forked_workers_live(tmp_path):
    """DataLoader workers are forked while the lock is held; killing the writer must free it at once."""
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK_AND_FORK, str(ws)], stdout=subprocess.PIPE, text=True)
    # The child says its pid once it runs, not the parent once it forked: on a loaded machine the
    # child may not be scheduled for a while after fork, and until it runs its fork handler it
    # holds the lock description too (a rerun seconds after a real kill does not meet this).
    child_pid = int(proc.stdout.readline())
    try:
        with pytest.raises(WorkspaceError, match="another curator run"):
            with Workspace(ws).writer():
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child_pid, 0)  # the orphaned child is still alive...
        with Workspace(ws).writer():  # ...and the workspace is free all the same
            pass
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)


_FORK_WITH_GARBAGE = """
import gc, os, sys
import duckdb
from curator.pipelines.embed import EmbedConfig, run_embed
from curator.synth import generate_archive

gc.disable()  # the garbage below waits for a collection, as it does between automatic ones
for _ in range(3):  # DuckDB connections whose databases run threads, reachable only from a cycle
    cycle = {"con": duckdb.connect()}
    cycle["self"] = cycle
    cycle["con"].sql("SELECT sum(range) FROM range(1000000)").fetchall()
    del cycle
os.register_at_fork(after_in_child=gc.collect)  # every child collects at once (a worker would, soon)
arc, ws, ck, synth = sys.argv[1:5]
run_embed(EmbedConfig(archives=[arc], workspace=ws, checkpoints=[ck], device="cpu", workers=2, batch_size=2,
                      threads=1, progress=False))
print("embedded", flush=True)
generate_archive(synth, studies=4, seed=5, image_size=96, broken=False, progress=False, workers=2)
print("generated", flush=True)
"""


def test_forked_workers_leave_the_parents_garbage_alone(tmp_path, tiny_checkpoints):
    """CI saw a decode worker die by SIGSEGV holding no file: a forked child's garbage collector ran
    the native destructor of a DuckDB connection its parent had left in a reference cycle, against
    threads that exist only in the parent. Decode workers and the synthetic archive's pool are now
    forked with the parent's objects frozen, out of the children's collector's reach, and every
    forked child freezes what it inherited as it starts (either alone passes this test; with
    neither the embed fails and the pool hangs)."""
    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_raster_archive(arc, 6)
    args = [sys.executable, "-c", _FORK_WITH_GARBAGE, str(arc), str(ws), str(tiny_checkpoints[0]), str(tmp_path / "synth")]
    try:
        # (a pool whose worker dies mid-task waits for ever: a time-out means the pool's child crashed)
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {(e.stdout or b'').decode().split()}: {(e.stderr or b'').decode()[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["embedded", "generated"]
    _check_exact(ws, 6, 0)


def test_index_agrees_after_a_killed_rerun(tmp_path, tiny_checkpoints):
    from curator.index import build_index

    arc = tmp_path / "arc"
    write_raster_archive(arc, 8)
    ws = tmp_path / "ws"
    ck = tiny_checkpoints[0]
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(ck)], device="cpu", workers=0, progress=False))
    with Workspace(ws).writer() as w:
        build_index(w)
    write_raster_archive(arc, 4, seed=3, start=50)
    # commit 1 records the checkpoints; commit 2 adds the new images; the kill comes before the index update
    r = subprocess.run(_embed_cmd(arc, ws, ck, flush=10), env=dict(os.environ, CURATOR_CRASH_AT="commit:2"), capture_output=True)
    assert r.returncode == -signal.SIGKILL
    rep = verify(str(ws))
    assert not rep.ok and any("index is stale: 4 image(s) missing" in p for p in rep.problems), rep.lines()
    rep = verify(str(ws), repair=True)
    assert rep.ok and any("rebuilt the index" in r for r in rep.repaired)
    # a rerun also brings the index up to date by itself (appending, not rebuilding)
    write_raster_archive(arc, 3, seed=4, start=80)
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(ck)], device="cpu", workers=0, progress=False))
    rep = verify(str(ws))
    assert rep.ok and rep.stats["index"] == "15 vectors", rep.lines()


def test_reader_never_sees_counts_go_down_or_unscored_rows(tmp_path, tiny_checkpoints):
    arc = tmp_path / "arc"
    write_raster_archive(arc, 40)  # 20 commits, each followed by a pause: a slow reader sees several
    ws = tmp_path / "ws"
    env = dict(os.environ, CURATOR_PAUSE_AT="commit:0.25")
    proc = subprocess.Popen(_embed_cmd(arc, ws, tiny_checkpoints[0], flush=2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    seen = []
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            done = proc.poll() is not None
            if (ws / "manifest.json").exists():
                df = run_query(Workspace(ws), "SELECT (SELECT count(*) FROM catalog) n, (SELECT count(*) FROM images WHERE edema IS NULL OR atelectasis IS NULL) missing, "
                                             "(SELECT count(*) FROM embeddings) e")
                n, missing, e = df.iloc[0].tolist()
                assert missing == 0 and e == n
                seen.append(n)
            if done:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert seen == sorted(seen) and seen[-1] == 40
    assert len(set(seen)) >= 3  # the reader really watched intermediate commits


def _mount_tmpfs(path, size_kb):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_leaves_a_valid_resumable_workspace(tmp_path, tiny_checkpoints):
    arc = tmp_path / "arc"
    write_raster_archive(arc, 10)
    disk = tmp_path / "disk"
    cfg = dict(archives=[str(arc)], workspace=str(disk / "ws"), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0, batch_size=2, flush_rows=2, progress=False)
    if _mount_tmpfs(disk, 256):
        try:
            filler = disk / "filler"
            with open(filler, "wb") as f:  # leave ~60 kB: room for a commit or two, not for the run
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                f.write(b"\0" * max(0, free - 60_000))
            with pytest.raises(WorkspaceError, match="disk full"):
                run_embed(EmbedConfig(**cfg))
            rep = verify(str(disk / "ws"))
            assert not [p for p in rep.problems if "not listed" not in p], rep.lines()
            filler.unlink()
            run_embed(EmbedConfig(**cfg))
            _check_exact(disk / "ws", 10, 0)
        finally:
            subprocess.run(["umount", str(disk)], capture_output=True)
    else:  # no permission to mount: inject ENOSPC into the part writer instead
        import errno

        import pyarrow.parquet as pq

        real = pq.write_table
        calls = {"n": 0}

        def full(*a, **k):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)

        pq.write_table = full
        try:
            with pytest.raises(WorkspaceError, match="disk full"):
                run_embed(EmbedConfig(**cfg))
        finally:
            pq.write_table = real
        assert verify(str(disk / "ws")).ok
        run_embed(EmbedConfig(**cfg))
        _check_exact(disk / "ws", 10, 0)


def test_gpu_out_of_memory_splits_the_batch(tiny_checkpoints, caplog):
    from curator.model import load_checkpoint
    from curator.pipelines.stages import Mapper
    from curator.prompts import default_prompt_set

    ck = load_checkpoint(tiny_checkpoints[0], "cpu")
    mapper = Mapper([ck], [default_prompt_set()])
    x = torch.randn(8, 3, 224, 224)
    expected = ck.encode_images(x).numpy()
    real = ck.encode_images
    sizes = []

    def limited(batch):
        sizes.append(len(batch))
        if len(batch) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch)

    ck.encode_images = limited
    with caplog.at_level("WARNING"):
        out = mapper(x)
    np.testing.assert_allclose(out["embeddings"][ck.sha256], expected, atol=1e-6)
    assert max(s for s in sizes if s <= 3) <= 3 and 8 in sizes and 2 in sizes
    assert "splitting" in caplog.text


def test_a_missing_or_damaged_part_is_a_one_line_error_naming_it_and_label_restores_predictions(tmp_path, tiny_checkpoints, capsys):
    from curator.cli import main
    from curator.pipelines.label import run_label
    from curator.prompts import default_prompt_set

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_raster_archive(arc, 4)
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
                          progress=False))
    w = Workspace(ws)
    pred = w.part_paths("predictions")[0]
    pred.unlink()
    with pytest.raises(WorkspaceError, match=f"predictions part {pred.name}, listed in the manifest, is missing"):
        run_query(Workspace(ws), "SELECT count(*) FROM images")
    assert main(["info", "-w", str(ws)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "curator label" in err and "Traceback" not in err
    run_label(str(ws), default_prompt_set(), device="cpu", checkpoints=None, progress=False)  # what the message suggests
    assert run_query(Workspace(ws), "SELECT count(*) AS n FROM images WHERE edema IS NOT NULL").n[0] == 4
    emb = Workspace(ws).part_paths("embeddings")[0]
    with open(emb, "r+b") as f:
        f.truncate(100)
    with pytest.raises(WorkspaceError, match=f"embeddings part {emb.name} cannot be read"):
        run_query(Workspace(ws), "SELECT count(*) FROM images")
    assert not verify(str(ws)).ok


def test_verify_repair_raises_a_next_image_id_below_the_ids_in_use(tmp_path, tiny_checkpoints):
    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_raster_archive(arc, 4)
    cfg = EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
                      progress=False)
    run_embed(cfg)
    with Workspace(ws).writer() as w:  # a hand-edited manifest
        w.commit(next_image_id=2)
    rep = verify(str(ws))
    assert not rep.ok and any("not below the manifest's next_image_id 2" in p for p in rep.problems)
    fixed = verify(str(ws), repair=True)
    top = int(run_query(Workspace(ws), "SELECT max(image_id) AS m FROM catalog_raw").m[0])
    assert any(f"to {top + 1}" in r for r in fixed.repaired) and fixed.ok
    write_raster_archive(arc, 2, seed=3, start=10)
    run_embed(cfg)
    assert verify(str(ws)).ok
    ids = run_query(Workspace(ws), "SELECT image_id FROM catalog_raw").image_id
    assert ids.is_unique and len(ids) == 6


def _indexed_workspace(arc, ws, ck) -> int:
    """A workspace of 4 images of ``arc`` with an index; its manifest generation."""
    from curator.index import build_index

    write_raster_archive(arc, 4)
    run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(ck)], device="cpu", workers=0, progress=False))
    with Workspace(ws).writer() as w:
        build_index(w)
    return Workspace(ws).manifest["generation"]


def test_verify_during_a_live_run_notes_its_uncommitted_parts_and_a_killed_runs_are_problems(tmp_path, tiny_checkpoints):
    """A run in progress (it holds the writer lock) has parts written and not committed yet, and an
    index behind its commits: verify says so and passes; once the run is killed, its leftovers fail."""
    arc, more, ws = tmp_path / "arc", tmp_path / "more", tmp_path / "ws"
    ck = tiny_checkpoints[0]
    g0 = _indexed_workspace(arc, ws, ck)
    write_raster_archive(more, 6, seed=3, start=50)
    env = dict(os.environ, CURATOR_PAUSE_AT="part:1.5")  # each part written waits before the next (and the commit)
    proc = subprocess.Popen(_embed_cmd(more, ws, ck, flush=2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # a flush committed (the index is behind) and the next one's catalog part written
            w = Workspace(ws)
            if w.manifest["generation"] >= g0 + 2 and any(p.parent.name == "catalog" for p in w.orphans()):
                break
            assert proc.poll() is None
            time.sleep(0.05)
        rep = verify(str(ws))  # (two more parts of 1.5 s each before that flush commits)
        assert rep.ok and rep.writer_active, rep.lines()
        assert any("a curator run is writing this workspace" in n and "not committed yet are not counted" in n for n in rep.notes), rep.lines()
        assert any("index is stale" in n and "run in progress" in n for n in rep.notes), rep.lines()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not Workspace(ws).writer_active()
    rep = verify(str(ws))
    assert not rep.ok and not rep.writer_active and not rep.notes
    assert any("not listed in the manifest (left by a killed run" in p for p in rep.problems), rep.lines()
    assert any(p.startswith("index is stale") for p in rep.problems), rep.lines()
    assert verify(str(ws), repair=True).ok


@pytest.mark.parametrize("where", ["part", "written", "manifest-renamed", "commit"])
def test_an_interrupt_anywhere_in_a_flush_leaves_its_rows_committed_exactly_once(tmp_path, tiny_checkpoints, monkeypatch, where):
    """Ctrl-C in the first flush of rows: while its parts are written (before the commit), just
    after a part was written and before the flush recorded it ("written": a file on disk that only
    its name would tell), just after its manifest was renamed into place (before the workspace
    object saw it), or just after the commit. The interrupt handler flushes again: the rows end
    committed once, none lost, no file left unlisted."""
    from curator import faults
    from curator import workspace as cw

    arc, ws = tmp_path / "arc", tmp_path / "ws"
    write_raster_archive(arc, 6)
    cfg = EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(tiny_checkpoints[0])], device="cpu", workers=0,
                      batch_size=2, flush_rows=2, progress=False)
    seen = {"part": 0, "manifest": 0, "commit": 0}
    reached, write_manifest = faults.reached, cw.atomic_write_bytes

    def interrupting_reached(point):  # parts 1-3 are the first flush's; commit 1 records the checkpoints, 2 is the flush's
        reached(point)
        if point in seen:
            seen[point] += 1
            if (where, point, seen[point]) in (("part", "part", 2), ("commit", "commit", 2)):
                raise KeyboardInterrupt

    def interrupting_write(path, data):
        write_manifest(path, data)
        seen["manifest"] += 1
        if where == "manifest-renamed" and seen["manifest"] == 2:
            raise KeyboardInterrupt

    write_part = cw.Workspace.write_part

    def interrupting_write_part(self, *a, **kw):
        part = write_part(self, *a, **kw)
        seen["written"] = seen.get("written", 0) + 1
        if where == "written" and seen["written"] == 2:
            raise KeyboardInterrupt  # (the part is on disk; the flush never learns its name)
        return part

    monkeypatch.setattr(faults, "reached", interrupting_reached)
    monkeypatch.setattr(cw, "atomic_write_bytes", interrupting_write)
    monkeypatch.setattr(cw.Workspace, "write_part", interrupting_write_part)
    with pytest.raises(KeyboardInterrupt):
        run_embed(cfg)
    monkeypatch.undo()
    w = Workspace(ws)
    rep = verify(str(ws))
    assert rep.ok, rep.lines()
    df = run_query(w, "SELECT (SELECT count(*) FROM catalog_raw) raw, (SELECT count(DISTINCT path) FROM catalog_raw) paths, "
                      "(SELECT count(*) FROM embeddings_raw) emb")
    assert df.iloc[0].tolist() == [2, 2, 2]  # the first flush's rows, once
    assert run_query(w, "SELECT status FROM runs").status.tolist() == ["interrupted"]
    again = run_embed(cfg)
    assert (again.unchanged, again.processed) == (2, 4)
    _check_exact(ws, 6, 0)


def test_signals_during_a_writer_step_take_effect_after_it():
    """The writer's few steps that must happen together (buffering a batch's rows with their
    vectors, taking them out to commit) finish before a Ctrl-C or SIGTERM acts, which then acts
    as it would have (KeyboardInterrupt; the handler in place)."""
    import signal as sg

    from curator.pipelines.stages import _signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred():
            os.kill(os.getpid(), sg.SIGINT)
            done.append("the step went on")
    assert done == ["the step went on"] and sg.getsignal(sg.SIGINT) is sg.default_int_handler
    seen = []
    previous = sg.signal(sg.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with _signals_deferred():
            os.kill(os.getpid(), sg.SIGTERM)
            assert not seen
        assert seen == [sg.SIGTERM]
    finally:
        sg.signal(sg.SIGTERM, previous)


def test_sigterm_stops_a_local_run_as_ctrl_c_does(tmp_path, tiny_checkpoints):
    """`timeout`, Slurm and Kubernetes end a job with SIGTERM: the run commits what it holds, records
    itself interrupted and updates the index (no orphans, nothing stale), and a rerun completes it."""
    arc, ws = tmp_path / "arc", tmp_path / "ws"
    ck = tiny_checkpoints[0]
    g0 = _indexed_workspace(arc, ws, ck)
    write_raster_archive(arc, 6, seed=3, start=50)
    env = dict(os.environ, CURATOR_PAUSE_AT="commit:1")  # a pause after each commit: the signal comes in one
    proc = subprocess.Popen(_embed_cmd(arc, ws, ck, flush=2, workers=2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while Workspace(ws).manifest["generation"] < g0 + 2:  # the checkpoint record, then the first two new images
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM; committed work is kept" in err
    w = Workspace(ws)
    runs = run_query(w, "SELECT status FROM runs ORDER BY started")
    assert runs.status.tolist() == ["completed", "interrupted"]
    rep = verify(str(ws))
    n = int(run_query(w, "SELECT count(*) AS n FROM catalog_raw").n[0])  # 6 unless this test was slow to send the signal
    assert 6 <= n < 10
    assert rep.ok and rep.stats["index"] == f"{n} vectors", rep.lines()  # no orphans, the index holds what was committed
    again = run_embed(EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[str(ck)], device="cpu", workers=0, progress=False))
    assert (again.unchanged, again.processed) == (n, 10 - n)
    _check_exact(ws, 10, 0)
    assert verify(str(ws)).stats["index"] == "10 vectors"
