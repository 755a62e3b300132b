"""Shared fixtures; the plain helpers they build on are in helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory


@pytest.fixture
def make_experiment(tmp_path: Path) -> ExperimentFactory:
    """Factory writing an experiment (module, batch, data files) under ``tmp_path``."""
    return ExperimentFactory(tmp_path)


@pytest.fixture
def dispatchers() -> Iterator[list[Any]]:
    """Collects dispatchers a test creates and stops/closes them whatever happens,
    so a failing test never leaves worker threads or locks behind."""
    made: list[Any] = []
    yield made
    for d in made:
        try:
            if d.stop(timeout=5):  # close() would wait forever on a stuck run
                d.close()
        except Exception:  # best-effort cleanup
            pass
