"""The quickstart notebook in a real JupyterLab, in Debian's Chromium, driven by Playwright.

What a user does, click by click: open ``notebooks/quickstart.ipynb``, run it down to the
controller, click Start and watch the bar move, click Stop and see "paused", lose the
kernel to a SIGKILL, run the notebook again and find the progress that was saved, click
Start and watch it finish. Only a real kernel and a real browser show that widget updates
sent from alma's background threads reach the page (the ipykernel 7 trap), so each step
is checked in the page itself and cross-checked against the state file read from here.

Screenshots of every step go to ``$ALMA_ARTIFACTS`` (default ``tests/artifacts``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

import alma
import alma.experiment

from . import harness
from .harness import JupyterServer

#: Where the notebook and the example come from (copied to the server's temp root).
SOURCE = REPO
NOTEBOOK = "notebooks/quickstart.ipynb"
EXPERIMENT = "examples/maxcut.experiment"

KERNEL_IDLE = "| Idle"
EXECUTED = re.compile(r"^\[\d+\]:$")
#: JupyterLab tags text, image and error outputs with their mime type; a widget view's
#: output wrapper carries none.
WIDGET_OUTPUT = ".jp-OutputArea-output:not([data-mime-type])"
ERROR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
#: An exception in a stderr output (a warning's line starts with its file name instead).
RAISED = re.compile(r"(?m)^\s*\w*(Error|Exception)\b")


def _poll(what: str, predicate: Callable[[], Any], timeout: float, page: Any = None) -> Any:
    """Wait for ``predicate`` to be truthy; the failure names what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{_outputs(page)}")
        if page is not None:
            page.wait_for_timeout(100)  # lets Playwright process page events meanwhile
        else:
            time.sleep(0.1)


def _outputs(page: Any) -> str:
    """The text of the page's cell outputs (a controller, a warning on stderr), for a
    failure message: CI keeps the log, not always the screenshots."""
    if page is None:
        return ""
    try:
        texts = page.locator(".jp-OutputArea-output").all_inner_texts()
    except Exception as exc:  # the page itself may be what broke
        return f"; the outputs could not be read ({exc})"
    shown = "\n---\n".join(t.strip()[:1500] for t in texts)
    return f"; the cell outputs read:\n{shown}"


class Shots:
    """Numbered screenshots, so the artefacts read as the story of the test."""

    def __init__(self, page: Any, folder: Path) -> None:
        self.page, self.folder, self.n = page, folder, 0
        for old in folder.glob("e2e-*.png"):  # a stale shot from an earlier run would mislead
            old.unlink()

    def __call__(self, name: str) -> Path:
        self.n += 1
        path = self.folder / f"e2e-{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path))
        return path


# -- JupyterLab page helpers ---------------------------------------------------------


def kernel_status(page: Any) -> Any:
    return page.locator(".jp-StatusBar-Widget", has_text=KERNEL_IDLE)


def wait_kernel_idle(page: Any, timeout: float = 90) -> None:
    """Wait for the status bar's ``| Idle``; a Run sent earlier is silently dropped.

    A notebook without kernel metadata asks which kernel to use: take the default.
    """
    select = page.locator(".jp-Dialog", has_text="Select Kernel")

    def idle() -> bool:
        if select.count() and select.first.is_visible():
            select.locator("button.jp-mod-accept").click()
        return bool(kernel_status(page).count())

    _poll("the kernel to be idle (status bar '| Idle')", idle, timeout, page)


def menu(page: Any, top: str, item: str) -> None:
    """Click a main-menu entry, e.g. menu(page, 'Edit', 'Clear Outputs of All Cells')."""
    page.locator(f".lm-MenuBar-itemLabel:text-is('{top}')").click()
    page.locator(f".lm-Menu-itemLabel:text-is('{item}')").click()


def cell_outputs_text(page: Any) -> str:
    return "\n---\n".join(page.locator(".jp-Notebook .jp-OutputArea").all_inner_texts())


def run_until_controller(page: Any, timeout: float = 120) -> Any:
    """Run the notebook's cells one by one (Shift+Enter) until one shows an alma controller.

    Why not Run All: the quickstart also drives the experiment from code further down
    (for readers without a browser), which would start it before we click anything.
    Returns the locator of the controller's cell.
    """
    menu(page, "Edit", "Clear Outputs of All Cells")  # fresh prompts: "[ ]:" until run
    cells = page.locator(".jp-Notebook .jp-Cell")
    n = cells.count()
    assert n, "the notebook shows no cells"
    cells.nth(0).locator(".jp-InputPrompt").click()  # select the first cell, command mode
    for i in range(n):
        cell = cells.nth(i)
        is_code = "jp-CodeCell" in (cell.get_attribute("class") or "")
        page.keyboard.press("Shift+Enter")
        if not is_code:
            continue
        prompt = cell.locator(".jp-InputArea-prompt")
        _poll(
            f"cell {i + 1} to finish running",
            lambda prompt=prompt: EXECUTED.match(prompt.inner_text().strip()),
            timeout,
            page,
        )
        text = "\n".join(cell.locator(ERROR_OUTPUT).all_inner_texts())
        assert not RAISED.search(text), f"cell {i + 1} raised:\n{text}"
        if cell.locator(WIDGET_OUTPUT).count():
            # A widget is on its way; wait until it is drawn, then see whether it is ours.
            _poll(
                f"the widget of cell {i + 1} to render",
                lambda cell=cell: cell.locator(".jupyter-widgets").count(),
                30,
                page,
            )
            if cell.locator(".alma-controller").count():
                return cell
    raise AssertionError(
        f"no cell of the notebook displayed an alma controller; outputs:\n{cell_outputs_text(page)}"
    )


# -- reading the controller in the page ------------------------------------------------


class ControllerView:
    """The controller as the browser shows it (never as the kernel thinks it is)."""

    def __init__(self, cell: Any) -> None:
        root = cell.locator(".alma-controller")
        self.start = root.locator("button.alma-start")
        self.stop = root.locator("button.alma-stop")
        self.status = root.locator(".alma-status")
        self.bar = root.locator(".alma-progress .widget-hprogress .progress-bar")
        self.bar_text = root.locator(".alma-progress")
        self.done = root.locator(".alma-count-done b")

    def width(self) -> float:
        """The progress bar's drawn width in percent (ipywidgets sets style.width)."""
        style = self.bar.evaluate("e => e.style.width") or "0%"
        assert style.endswith("%"), f"unexpected progress bar width {style!r}"
        return float(style[:-1])

    def status_text(self) -> str:
        return self.status.inner_text().strip()

    def fraction(self) -> tuple[int, int]:
        """``n/total`` as tqdm prints it next to the bar."""
        m = re.search(r"(\d+)/(\d+)", self.bar_text.inner_text())
        assert m, f"no n/total in the progress text {self.bar_text.inner_text()!r}"
        return int(m.group(1)), int(m.group(2))


def saved_progress(root: Path) -> alma.Progress:
    """Progress as the state file has it, read from the test process."""
    with alma.experiment.load(root / EXPERIMENT) as d:
        return d.progress


# -- the skip rule -------------------------------------------------------------------


def test_without_chromium_skips_only_when_alma_e2e_is_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(harness, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("ALMA_E2E", raising=False)
    with pytest.raises(pytest.skip.Exception):
        harness._require_e2e()
    for value in ("1", "0", ""):  # set at all means "these tests must run"
        monkeypatch.setenv("ALMA_E2E", value)
        with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
            harness._require_e2e()


def test_with_chromium_never_skips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    browser = tmp_path / "chromium"
    browser.write_text("")
    monkeypatch.setattr(harness, "CHROMIUM", browser)
    monkeypatch.delenv("ALMA_E2E", raising=False)
    harness._require_e2e()  # neither skips nor fails: the fixtures go on and start it


# -- the test ------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_start_stop_kill_resume_finish(
    page: Any, jupyter_server: JupyterServer, artifacts: Path
) -> None:
    root = jupyter_server.root_dir
    for folder in ("notebooks", "examples"):
        shutil.copytree(
            SOURCE / folder,
            root / folder,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("*.sqlite*", ".ipynb_checkpoints", "__pycache__"),
        )
    assert (root / NOTEBOOK).is_file(), f"{NOTEBOOK} is missing from the repository"
    shot = Shots(page, artifacts)
    try:
        _scenario(page, jupyter_server, shot)
    except BaseException:
        shot("failure")  # the page as it was when the test gave up
        raise


def _scenario(page: Any, jupyter_server: JupyterServer, shot: Shots) -> None:
    root = jupyter_server.root_dir

    # 1. Open the quickstart and run it down to the controller.
    page.goto(jupyter_server.lab_url(NOTEBOOK))
    wait_kernel_idle(page)
    config = json.loads(page.locator("#jupyter-config-data").text_content() or "{}")
    assert harness.ANNOUNCEMENTS in config.get("disabledExtensions", []), "news popup not off"
    shot("opened")
    view = ControllerView(run_until_controller(page))
    _poll("status 'idle'", lambda: view.status_text() == "idle", 30, page)
    assert view.width() == 0.0
    assert view.fraction() == (0, saved_progress(root).total)
    shot("controller-idle")

    # 2. Start: the bar advances in the page, driven by alma's background threads.
    view.start.click()
    _poll("status 'running'", lambda: view.status_text() == "running", 30, page)
    assert view.start.is_disabled(), "Start must be disabled while running"
    first = _poll("the progress bar to move", lambda: view.width() or None, 60, page)
    _poll(
        "the progress bar to advance again",
        lambda: view.width() > first,
        60,
        page,
    )
    shot("running")

    # 3. Stop: the page says paused, and what it shows is what the state file holds.
    view.stop.click()
    _poll("status 'paused'", lambda: view.status_text() == "paused", 60, page)
    assert not view.start.is_disabled() and view.stop.is_disabled()
    saved = saved_progress(root)
    assert 0 < saved.done < saved.total, f"Stop came too late or too early: {saved}"
    _poll(
        f"the paused bar to show the saved {saved.done}/{saved.total}",
        lambda: view.fraction() == (saved.done, saved.total),
        10,
        page,
    )
    assert view.width() == pytest.approx(100 * saved.done / saved.total, abs=0.01)
    shot("paused")

    # 4. Kill the kernel hard; Jupyter's restarter brings a new one for the same id.
    kernel_id = jupyter_server.kernel_id(NOTEBOOK)
    old_pids = jupyter_server.kernel_pids(kernel_id)
    assert old_pids, f"no process found for kernel {kernel_id}"
    for pid in old_pids:
        os.kill(pid, signal.SIGKILL)
    _poll(
        "a new kernel process",
        lambda: set(jupyter_server.kernel_pids(kernel_id)) - set(old_pids),
        60,
        page,
    )
    died = page.locator(".jp-Dialog", has_text="died")
    _poll("the 'kernel died' dialog", lambda: died.count(), 30, page)
    page.locator(".jupyter-widgets-disconnected").first.wait_for()  # stale widgets say so
    shot("kernel-killed")
    died.locator("button.jp-mod-accept").click()
    wait_kernel_idle(page)

    # 5. Run the notebook again: the new controller shows the persisted progress.
    after_kill = saved_progress(root)
    assert after_kill.done == saved.done, "a run reported done was lost with the kernel"
    view = ControllerView(run_until_controller(page))
    _poll("status 'paused' after reload", lambda: view.status_text() == "paused", 30, page)
    assert view.fraction() == (saved.done, saved.total)
    assert view.width() == pytest.approx(100 * saved.done / saved.total, abs=0.01)
    assert int(view.done.inner_text()) == saved.done
    assert page.locator(".jupyter-widgets-disconnected").count() == 0
    shot("resumed-view")

    # 6. Start again and see it finish in the page, with every run done once.
    view.start.click()
    _poll("status 'finished'", lambda: view.status_text() == "finished", 180, page)
    assert view.width() == 100.0
    assert view.fraction() == (saved.total, saved.total)
    shot("finished")
    final = saved_progress(root)
    assert (final.done, final.failed, final.status) == (final.total, 0, "finished")
    with alma.experiment.load(root / EXPERIMENT) as d:
        results = d.results
    assert len(results) == final.total
    assert not results.duplicated(["instance", "iteration"]).any(), "a run was duplicated"
