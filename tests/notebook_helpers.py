"""Helpers for the notebook front-end tests (controller, magics, real kernels).

Kept apart from helpers.py so that file stays about the engine (and imports nothing
notebook-only); tests import what they need from here.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import REPO, wait_until

import alma

EXAMPLES = REPO / "examples"
NOTEBOOKS = REPO / "notebooks"

#: One deadline-bounded poll for every test (defined in helpers.py).
wait_for = wait_until


def make_dispatcher(
    tmp_path: Path,
    run: Callable[..., Any],
    *,
    instances: int = 3,
    iterations: int = 2,
    workers: int = 2,
    name: str = "exp",
) -> alma.Dispatcher:
    """An in-code experiment over ``instances`` small files in ``tmp_path``."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    paths = []
    for i in range(instances):
        f = data / f"f{i:04d}.txt"
        f.write_text(str(i))
        paths.append(str(f))
    return alma.Experiment(
        run=run,
        instances=paths,
        iterations=iterations,
        workers=workers,
        state=tmp_path / f"{name}.sqlite",
        name=name,
    )


def copy_examples(tmp_path: Path) -> Path:
    """Copy the shipped examples (and notebooks) into ``tmp_path``; return the examples dir.

    Notebooks refer to ``../examples/maxcut.experiment``, so the layout is kept.
    """
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("*.sqlite*"))
    if NOTEBOOKS.exists():
        shutil.copytree(NOTEBOOKS, tmp_path / "notebooks")
    return tmp_path / "examples"


def controller_threads() -> list[threading.Thread]:
    """Live controller timer threads (to prove none leak)."""
    return [t for t in threading.enumerate() if t.name == "alma-controller" and t.is_alive()]


def widget_states(nb: Any) -> dict[str, dict[str, Any]]:
    """model_id -> {'model_name': ..., 'state': {...}} from an executed notebook."""
    return nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
