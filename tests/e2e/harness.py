"""What the browser tests' fixtures build on: a private JupyterLab server and Debian's
Chromium. The fixtures themselves are in conftest.py. The same server serves Notebook 7
at ``/notebooks/<path>`` when the ``notebook`` package (>= 7) is installed.

Everything the server and the browser write (Jupyter config, runtime files, kernel
connection files, Chromium's profile) goes to a temporary HOME, so a test run leaves no
dotfiles behind and never depends on the developer's own Jupyter settings.

Skip rule: these tests skip only when ``/usr/bin/chromium`` is missing and ``ALMA_E2E``
is unset (a laptop without a browser). With ``ALMA_E2E`` set, as ``.ci/run`` does, a
missing browser or package fails the run instead of silently skipping it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: The "Jupyter news" plugin opens a toast that can cover the notebook.
ANNOUNCEMENTS = "@jupyterlab/apputils-extension:announcements"


def _require_e2e() -> None:
    """Skip only when the browser is missing and nobody asked for these tests."""
    if CHROMIUM.exists():
        return
    if "ALMA_E2E" not in os.environ:
        pytest.skip(f"{CHROMIUM} is missing (install it: apt-get install -y chromium)")
    pytest.fail(
        f"ALMA_E2E is set but {CHROMIUM} is missing: install it with "
        "`apt-get install -y chromium` (as .ci/run does), or unset ALMA_E2E."
    )


def _require_notebook7() -> None:
    """Notebook 7 is the ``notebook`` package (>= 7) in the server's environment: skip
    without it, unless ALMA_E2E asks for every browser test (then fail and say how)."""
    try:
        version = importlib.metadata.version("notebook")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    if version and int(version.split(".")[0]) >= 7:
        return
    found = f"notebook {version} is installed" if version else "the notebook package is missing"
    if "ALMA_E2E" not in os.environ:
        pytest.skip(f"Notebook 7 is not available: {found}")
    pytest.fail(
        f'ALMA_E2E is set but {found}: install the test extra (`pip install -e ".[test]"`, '
        "which has notebook>=7), or unset ALMA_E2E."
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _configure(config_dir: Path) -> None:
    """Quiet JupyterLab through config files in the temp dirs, never in sys.prefix.

    ``jupyter labextension disable --level=sys_prefix`` would edit the environment for
    every later user; a page_config.json in our own JUPYTER_CONFIG_DIR has the same
    effect (jupyterlab_server merges labconfig/page_config.json from every config path)
    and dies with the temp folder.
    """
    _write_json(
        config_dir / "labconfig" / "page_config.json",
        {"disabledExtensions": {ANNOUNCEMENTS: True}},
    )
    # Belt and braces: also say "never fetch news / updates" in the user settings.
    _write_json(
        config_dir
        / "lab"
        / "user-settings"
        / "@jupyterlab"
        / "apputils-extension"
        / "notification.jupyterlab-settings",
        {"fetchNews": "false", "checkForUpdates": False},
    )


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


@dataclass
class JupyterServer:
    """A running JupyterLab server owned by the test session."""

    url: str
    token: str
    root_dir: Path
    home: Path
    runtime_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(repr=False)

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        """Call the REST API with the token; returns the decoded JSON (or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def lab_url(self, path: str) -> str:
        """URL that opens ``path`` (relative to root_dir) in JupyterLab, logged in, in a
        reset workspace: the browser tests share one server, and JupyterLab would
        otherwise restore an earlier test's notebook in a tab beside this one (its
        controller, first in the page, then answers the test's locators)."""
        return f"{self.url}/lab/tree/{path}?token={self.token}&reset"

    def notebook7_url(self, path: str) -> str:
        """URL that opens ``path`` in Notebook 7 (the ``notebook`` package's server
        extension, served by this same server), logged in."""
        return f"{self.url}/notebooks/{path}?token={self.token}"

    def kernel_state(self, notebook_path: str) -> str | None:
        """The execution state (idle, busy, starting) of the kernel of the session
        attached to ``notebook_path``, or None while there is none."""
        for session in self.api("GET", "/api/sessions"):
            if session["path"] == notebook_path and session.get("kernel"):
                return str(session["kernel"].get("execution_state"))
        return None

    def kernel_id(self, notebook_path: str) -> str:
        """Id of the kernel of the session attached to ``notebook_path``."""
        for session in self.api("GET", "/api/sessions"):
            if session["path"] == notebook_path and session.get("kernel"):
                return str(session["kernel"]["id"])
        raise AssertionError(f"no kernel session for {notebook_path}: {self.api_sessions()}")

    def api_sessions(self) -> Any:
        return self.api("GET", "/api/sessions")

    def kernel_pids(self, kernel_id: str) -> list[int]:
        """Pids of the kernel process(es) started for ``kernel_id``.

        The REST API does not expose a pid, but every kernel is launched with its
        connection file ``kernel-<id>.json`` on the command line.
        """
        return _processes_mentioning(f"kernel-{kernel_id}.json")

    def log_tail(self, n: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


def _start_server(tmp: Path, artifacts: Path) -> JupyterServer:
    home, root, config = tmp / "home", tmp / "root", tmp / "home" / "jupyter-config"
    for d in (home, root, config):
        d.mkdir(parents=True, exist_ok=True)
    _configure(config)
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(home / "jupyter-runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "PYTHONUNBUFFERED": "1",
    }
    # Do not let a developer's global config (JUPYTER_PATH, settings dirs) leak in.
    for name in ("JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR", "JUPYTER_PATH"):
        env.pop(name, None)
    token = secrets.token_hex(24)
    log_path = artifacts / "jupyter-server.log"
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--port-retries=0",
            f"--IdentityProvider.token={token}",
            "--ServerApp.password=",
            "--allow-root",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None",
        ]
        log = log_path.open("wb")
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown can end it all
        )
        log.close()
        server = JupyterServer(
            url=f"http://127.0.0.1:{port}",
            token=token,
            root_dir=root,
            home=home,
            runtime_dir=Path(env["JUPYTER_RUNTIME_DIR"]),
            log_path=log_path,
            proc=proc,
            env=env,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                server.api("GET", "/api/status", timeout=2)
                return server
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.2)
        last_error = server.log_tail()
        _stop_server(server)
    raise RuntimeError(f"JupyterLab did not start; its log ends with:\n{last_error}")


def _stop_server(server: JupyterServer) -> None:
    """Shut kernels down politely, then end the server's process group, then strays."""
    if server.proc.poll() is None:
        with contextlib.suppress(Exception):
            for kernel in server.api("GET", "/api/kernels", timeout=5):
                server.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=15)
    # Kernels run in process groups of their own; any left over still name a
    # connection file inside our temp runtime dir, which nothing else can.
    for pid in _processes_mentioning(str(server.runtime_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
