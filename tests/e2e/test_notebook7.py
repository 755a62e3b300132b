"""The controller in Notebook 7 (the ``notebook`` package, served by the same Jupyter
server as JupyterLab at ``/notebooks/<path>``), in Debian's Chromium: run the cell that
shows it, click Start and see the counts and the bar move, click Stop and see "paused"
with the counts the state file holds. A screenshot of the page goes to
``$ALMA_ARTIFACTS/controller-notebook7.png``.

Notebook 7 is its own front-end (its own shell, menus and kernel status, no status bar),
built from JupyterLab's notebook and output widgets; ipywidgets reach it through the
same federated extension. So what JupyterLab shows is not proof for it.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import nbformat
import pytest

import alma.experiment

from . import harness
from .harness import JupyterServer
from .test_browser import ControllerView, _poll

FOLDER = "nb7"
NOTEBOOK = f"{FOLDER}/controller.ipynb"

RUN_MODULE = """\
import time


def run(instance, save_callback, state, iteration):
    for step in range((state or {}).get("step", 0), 5):
        time.sleep(0.02)
        save_callback({"step": step + 1})
    return {"value": iteration}
"""
FILES, ITERATIONS = 24, 10  # 240 runs of ~0.1 s on 2 workers: Stop lands mid-run


def write_notebook(root: Path) -> Path:
    """A small experiment (files of its own) and a notebook of one cell showing it."""
    folder = root / FOLDER
    (folder / "data").mkdir(parents=True)
    for i in range(FILES):
        (folder / "data" / f"f{i:02d}.txt").write_text(str(i))
    (folder / "steps.py").write_text(RUN_MODULE)
    (folder / "steps.batch").write_text(json.dumps({"instances": ["data/*.txt"]}))
    exp = folder / "steps.experiment"
    spec = {"load": "steps.py", "batch": "steps.batch", "iterations": ITERATIONS, "workers": 2}
    exp.write_text(json.dumps(spec))
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            'import alma.experiment\n\nd = alma.experiment.load("steps.experiment")\nd'
        )
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(nb, root / NOTEBOOK)
    return exp


def saved(exp: Path) -> alma.Progress:
    """Progress as the state file has it, read from the test process."""
    with alma.experiment.load(exp, readonly=True) as d:
        return d.progress


def done_count(view: ControllerView) -> int:
    return int(view.done.inner_text())


@pytest.fixture
def notebook7() -> None:
    """Listed first, so a missing Notebook 7 skips (or fails) before a server starts."""
    harness._require_notebook7()


def test_without_notebook7_skips_only_when_alma_e2e_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    for version in (missing, lambda name: "6.5.7"):
        monkeypatch.setattr(importlib.metadata, "version", version)
        monkeypatch.delenv("ALMA_E2E", raising=False)
        with pytest.raises(pytest.skip.Exception, match="Notebook 7 is not available"):
            harness._require_notebook7()
        monkeypatch.setenv("ALMA_E2E", "1")
        with pytest.raises(pytest.fail.Exception, match="notebook>=7"):
            harness._require_notebook7()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "7.6.0")
    harness._require_notebook7()  # neither skips nor fails


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_controller_start_stop_in_notebook7(
    notebook7: None, page: Any, jupyter_server: JupyterServer, artifacts: Path
) -> None:
    exp = write_notebook(jupyter_server.root_dir)
    shot = artifacts / "controller-notebook7.png"
    shot.unlink(missing_ok=True)  # a stale one would mislead
    try:
        _scenario(page, jupyter_server, exp, shot)
    except BaseException:
        page.screenshot(path=str(artifacts / "e2e-notebook7-failure.png"))
        raise


def _scenario(page: Any, server: JupyterServer, exp: Path, shot: Path) -> None:
    page.goto(server.notebook7_url(NOTEBOOK))
    config = json.loads(page.locator("#jupyter-config-data").text_content() or "{}")
    assert config.get("notebookPage") == "notebooks", f"not Notebook 7's page: {config}"
    assert "JupyterLab" not in str(config.get("appName")), config.get("appName")
    cell = page.locator(".jp-Notebook .jp-CodeCell").first
    cell.wait_for()
    # Notebook 7 has no status bar: ask the server whether the kernel is ready.
    _poll("the kernel to be idle", lambda: server.kernel_state(NOTEBOOK) == "idle", 90, page)

    controller = page.locator(".alma-controller")
    for attempt in range(3):
        # A run asked while the page still settles can be dropped: ask again (running
        # the cell twice shows the same controller again, harmless).
        cell.locator(".jp-InputPrompt").click()
        page.keyboard.press("Shift+Enter")
        try:
            _poll("the controller to show", lambda: controller.count(), 40, page)
            break
        except AssertionError:
            if attempt == 2:
                raise
    view = ControllerView(page)
    total = FILES * ITERATIONS
    _poll("status 'idle'", lambda: view.status_text() == "idle", 30, page)
    assert view.fraction() == (0, total) and done_count(view) == 0
    assert not view.start.is_disabled() and view.stop.is_disabled()

    # Start: status, bar and counts move in the page, sent from alma's threads.
    view.start.click()
    _poll("status 'running'", lambda: view.status_text() == "running", 30, page)
    assert view.start.is_disabled() and not view.stop.is_disabled()
    first = _poll("the done count to move", lambda: done_count(view) or None, 60, page)
    _poll("the done count to move again", lambda: done_count(view) > first, 60, page)
    assert view.width() > 0
    running = view.fraction()[0]

    # Stop: "paused", and the page shows what the state file holds.
    view.stop.click()
    _poll("status 'paused'", lambda: view.status_text() == "paused", 60, page)
    assert not view.start.is_disabled() and view.stop.is_disabled()
    p = saved(exp)
    assert p.status == "paused" and running <= p.done < total, p
    _poll(
        f"the paused controller to show the saved {p.done}/{total}",
        lambda: view.fraction() == (p.done, total) and done_count(view) == p.done,
        15,
        page,
    )
    assert view.width() == pytest.approx(100 * p.done / total, abs=0.01)
    page.screenshot(path=str(shot))
