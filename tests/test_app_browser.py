"""The app in a real browser: `curator app` on a free localhost port, driven by Playwright on
Debian's chromium (installed by .ci/run; Playwright's own browser download is not used)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.test_app import build_workspace

try:
    from playwright import sync_api
except ImportError:  # pragma: no cover - the test extra installs it
    sync_api = None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.path.exists("/usr/bin/chromium"):
    CHROMIUM = "/usr/bin/chromium"
# Outside CI a machine without the browser skips this test; in CI (.ci/run installs both) it must run.
pytestmark = pytest.mark.skipif(not os.environ.get("CI") and (sync_api is None or CHROMIUM is None),
                                reason="needs playwright (pip install .[test]) and Debian's chromium (apt-get install chromium)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"curator app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no /_stcore/health after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End a server started in a session of its own: SIGTERM to its group, SIGKILL after 15 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture()
def server(tmp_path, tiny_checkpoints):
    ws = build_workspace(tmp_path / "data", tiny_checkpoints[:1], n_png=10, n_dicom=0, junk=False)
    port = free_port()
    log = tmp_path / "server.log"
    exports = tmp_path / "exports"
    env = dict(os.environ, CURATOR_DEVICE="cpu")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "curator.cli", "app", "--workspace", str(ws), "--port", str(port),
                                 "--exports", str(exports), "--device", "cpu"],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, ws, exports, log
    finally:
        stop(proc)


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector(IDLE, timeout=timeout)


def rerun(page) -> None:
    """Wait for the rerun an interaction started (if it was not over already), then for idle."""
    try:
        page.wait_for_selector("[data-testid='stApp'][data-test-script-state='running']", timeout=3_000)
    except sync_api.TimeoutError:  # the rerun was over before we looked
        pass
    wait_idle(page)


def test_search_and_export_in_a_browser(server, tmp_path):
    assert sync_api is not None, "playwright is not installed: pip install -e .[test]"
    assert CHROMIUM, "chromium is not installed: apt-get install chromium (.ci/run does)"
    url, _ws, exports, log = server
    # the server listens on loopback only
    text = log.read_text()
    assert "127.0.0.1" in text and "0.0.0.0" not in text
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(60_000)
            # nothing is fetched from anywhere but this server (no fonts or icons from the internet)
            outside = []
            ctx.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
            page.goto(url)
            wait_idle(page)
            box = page.locator("input[type='text']").first
            assert box.get_attribute("aria-label") == "Search text"
            box.fill("left pleural effusion")
            box.press("Enter")
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('[data-testid=\"stImage\"] img'))"
                ".filter(i => i.complete && i.naturalWidth > 0).length >= 10")
            wait_idle(page)
            widths = page.eval_on_selector_all("[data-testid='stImage'] img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) == 10 and all(w > 0 for w in widths)
            assert page.get_by_text("10 “left pleural effusion”").count() == 1
            page.set_viewport_size({"width": 1400, "height": 2200})
            wait_idle(page)
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

            # cohort: a probability condition typed in, exported de-identified
            page.get_by_role("link", name="Cohort builder").click()
            page.get_by_role("button", name="Export cohort").wait_for()
            wait_idle(page)
            cond = page.get_by_label("More probability conditions (optional)")
            cond.fill("edema > 0 and not cardiomegaly > 0.99")
            cond.press("Enter")
            rerun(page)
            assert page.get_by_test_id("stMetricValue").first.inner_text().strip() == "10"
            page.get_by_role("button", name="Export cohort").click()
            page.get_by_text("Exported", exact=False).first.wait_for()
            wait_idle(page)
            with page.expect_download() as dl:
                page.get_by_role("button", name="Download cohort.csv").click()
            csv_path = tmp_path / "downloaded.csv"
            dl.value.save_as(str(csv_path))
            page.set_viewport_size({"width": 1400, "height": 3000})
            wait_idle(page)
            page.screenshot(path=str(tmp_path / "cohort.png"), full_page=True)
        finally:
            ctx.close()
    assert not outside, outside
    rows = pd.read_csv(csv_path)
    assert len(rows) == 10 and "path" not in rows.columns
    (folder,) = exports.iterdir()
    assert sorted(pd.read_parquet(folder / "cohort.parquet").image_id) == sorted(rows.image_id)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert '"edema" > 0.0' in manifest["spec"]["where"] and manifest["deidentified"] is True
    for name in ("search.png", "cohort.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_a_plain_streamlit_run_shows_no_page(tmp_path, tiny_checkpoints):
    """`streamlit run app/main.py` without curator's settings (here: usage statistics on, Streamlit's
    default) refuses on every page's URL, not only the first: no page script is served on its own."""
    assert sync_api is not None and CHROMIUM, "playwright and chromium are needed (.ci/run installs both)"
    from curator.appserver import app_script

    ws = build_workspace(tmp_path / "data", tiny_checkpoints[:1], n_png=4, n_dicom=0, junk=False, index=False)
    port = free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CURATOR_", "STREAMLIT_"))}
    env["CURATOR_WORKSPACE"] = str(ws)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(app_script()), "--server.port", str(port),
                                 "--server.address", "127.0.0.1", "--server.headless", "true"],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                for path in ("", "/search", "/cohort", "/overview", "/sql"):
                    page.goto(url + path)
                    page.get_by_text("does not run while it sends Streamlit usage statistics", exact=False).first.wait_for()
                    wait_idle(page)
                    page.screenshot(path=str(tmp_path / f"refused{path.replace('/', '-')}.png"))
                    shown = page.inner_text("body")
                    assert "Run" not in page.eval_on_selector_all("button", "els => els.map(e => e.innerText)"), path
                    assert page.locator("textarea, input[type='text']").count() == 0, path
                    assert "workspace:" not in shown and "Cohort builder" not in shown and "SQL" not in shown.replace("SQL page", ""), path
            finally:
                browser.close()
    finally:
        stop(proc)
