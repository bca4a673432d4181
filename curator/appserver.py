"""``curator app``: start the Streamlit app on a workspace.

The server binds to 127.0.0.1 unless ``--host`` names another address (then a warning is
printed: the app shows patient images), runs headless, and sends no usage statistics. The app's
script ships inside the package (``curator/app/main.py``), so this works from ``pip install .``.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501


# Set by `curator app` for the server it starts: that server's address and statistics settings are
# curator's own choice (the app refuses other servers that listen beyond this machine, app/common.py).
ENV_LAUNCHED = "CURATOR_APP_LAUNCHED"


def app_script() -> Path:
    """The app's entry script (``app/main.py``, installed as ``curator/app/main.py``)."""
    import curator.app

    return Path(curator.app.__file__).resolve().parent / "main.py"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def streamlit_command(workspace: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                      device: str | None = None, exports: str | Path | None = None) -> list[str]:
    """The ``python -m streamlit run ...`` command line for the app."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app_script()),
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--server.enableStaticServing", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
        # (the app hands its widgets' values back to the session state so that they survive a page
        # change, app/common.py keep_widget_state: not the duplication the warning is about)
        "--global.disableWidgetStateDuplicationWarning", "true",
        "--", "--workspace", str(Path(workspace).expanduser().resolve()),
    ]
    if device:
        cmd += ["--device", device]
    if exports:
        cmd += ["--exports", str(Path(exports).expanduser().resolve())]
    return cmd


def _positive_port(value: str) -> int:
    import argparse

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number between 1 and 65535, got {n}")
    return n


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "app", help="start the web app (search, cohorts, overview, SQL) on a workspace",
        description="Start curator's Streamlit app on workspace W: text and image search, cohort builder, overview and a "
                    "read-only SQL page. It listens on 127.0.0.1 only unless --host says otherwise.",
    )
    p.add_argument("--workspace", "-w", required=True, metavar="W", help="workspace folder (created by `curator embed`)")
    p.add_argument("--port", type=_positive_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}, this machine only); 0.0.0.0 serves every network "
                        "interface: anyone who can reach it sees the images")
    p.add_argument("--device", default=None, help="torch device for the query encoder (default: CUDA when available, else CPU)")
    p.add_argument("--exports", default=None, metavar="DIR",
                   help="folder for cohort exports (default: a fresh temporary folder per export; the files are offered as downloads)")
    p.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    from curator.workspace import Workspace, WorkspaceError

    ws = Workspace(args.workspace)
    if not ws.root.is_dir():
        raise WorkspaceError(f"{ws.root}: no such folder")
    try:
        import streamlit  # noqa: F401  (heavy: imported only here)
    except ImportError:
        raise WorkspaceError("streamlit is not installed; `pip install streamlit`") from None
    if not is_loopback(args.host):
        print(f"WARNING: serving on {args.host}: anyone who can reach this address and port sees the workspace's images "
              "and metadata; the app has no login. Use the default (127.0.0.1) with an SSH tunnel unless this network "
              "is trusted.", file=sys.stderr)
    cmd = streamlit_command(ws.root, args.host, args.port, args.device, args.exports)
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"curator app on http://{shown}:{args.port} (workspace {ws.root}); Ctrl+C stops it", file=sys.stderr, flush=True)
    env = dict(os.environ, CURATOR_WORKSPACE=str(ws.root), **{ENV_LAUNCHED: "1"})
    # torch (query encoder) and faiss (search) each keep an OpenMP thread pool; spinning idle
    # threads of one starve the other on few cores (text encodes after a search took seconds).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
