"""Fixtures for the browser tests: a private JupyterLab server and Debian's Chromium.

How they are started, stopped and isolated (a temporary HOME), and the skip rule, are
in harness.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

from . import harness
from .harness import JupyterServer


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Folder for screenshots and the server log (env ALMA_ARTIFACTS, else tests/artifacts)."""
    path = Path(os.environ.get("ALMA_ARTIFACTS") or REPO / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def jupyter_server(
    tmp_path_factory: pytest.TempPathFactory, artifacts: Path
) -> Iterator[JupyterServer]:
    """A JupyterLab server on 127.0.0.1 with a random token and a temp HOME and root."""
    harness._require_e2e()
    server = harness._start_server(tmp_path_factory.mktemp("jupyter"), artifacts)
    try:
        yield server
    finally:
        harness._stop_server(server)


@pytest.fixture(scope="session")
def browser(jupyter_server: JupyterServer) -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (its own browser download cannot work here)."""
    harness._require_e2e()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(harness.CHROMIUM),
            args=harness.CHROMIUM_ARGS,
            env={**jupyter_server.env},
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any, artifacts: Path) -> Iterator[Any]:
    """A fresh browser context and page with a roomy viewport; the browser console is
    saved next to the screenshots (widget errors show up there, not in the kernel)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"[{msg.type}] {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"[pageerror] {exc}"))
    try:
        yield page
    finally:
        context.close()
        (artifacts / "browser-console.log").write_text("\n".join(console) + "\n")
