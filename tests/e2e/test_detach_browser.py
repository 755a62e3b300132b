"""The controller's Stop, clicked in a real JupyterLab in Chromium, pauses a detached
runner that ``alma run --detach`` started from a terminal; Start then reads "Start
detached" and resumes it detached."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, python_env

import alma.experiment
from alma.lock import ExperimentLock

from .harness import JupyterServer
from .test_browser import ControllerView, _poll, run_until_controller, wait_kernel_idle

FOLDER = "detached"  # its own copy: the quickstart test finishes the one at the root
NOTEBOOK = f"{FOLDER}/notebooks/quickstart.ipynb"


def _runner(exp: Path) -> Any:
    return ExperimentLock(Path(f"{exp}.sqlite")).holder_info()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_controller_stop_pauses_a_runner_started_from_the_cli(
    page: Any, jupyter_server: JupyterServer, artifacts: Path
) -> None:
    root = jupyter_server.root_dir / FOLDER
    for folder in ("notebooks", "examples"):
        shutil.copytree(
            REPO / folder,
            root / folder,
            ignore=shutil.ignore_patterns("*.sqlite*", ".ipynb_checkpoints", "__pycache__"),
        )
    exp = root / "examples" / "maxcut.experiment"
    launched = subprocess.run(
        [sys.executable, "-m", "alma", "run", "--detach", str(exp)],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
        stdin=subprocess.DEVNULL,
    )
    assert launched.returncode == 0, launched.stderr
    cli_runner = _runner(exp)
    assert cli_runner is not None and cli_runner.detached
    try:
        page.goto(jupyter_server.lab_url(NOTEBOOK))
        wait_kernel_idle(page)
        view = ControllerView(run_until_controller(page))
        _poll("'running elsewhere'", lambda: view.status_text() == "running elsewhere", 30, page)
        assert view.start.is_disabled() and not view.stop.is_disabled()
        page.screenshot(path=str(artifacts / "e2e-detach-01-elsewhere.png"))

        view.stop.click()
        _poll("status 'paused'", lambda: view.status_text() == "paused", 60, page)
        assert _runner(exp) is None, "the CLI's runner still holds the experiment"
        with alma.experiment.load(exp) as d:
            saved = d.progress
        assert saved.status == "paused" and 0 < saved.done < saved.total
        _poll(
            "the paused bar to show what is saved",
            lambda: view.fraction() == (saved.done, saved.total),
            10,
            page,
        )
        assert view.start.inner_text().strip() == "Start detached"
        page.screenshot(path=str(artifacts / "e2e-detach-02-paused.png"))

        view.start.click()  # resumes it in a new detached runner, not in the kernel
        _poll("a new detached runner", lambda: _runner(exp) is not None, 30, page)
        resumed = _runner(exp)
        assert resumed.detached and resumed.pid != cli_runner.pid
        _poll("'running elsewhere'", lambda: view.status_text() == "running elsewhere", 30, page)
    finally:
        with alma.experiment.load(exp, readonly=True) as d:
            d.stop(timeout=60)
