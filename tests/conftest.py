"""Shared fixtures; the plain helpers they build on are in helpers.py."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, SLURM_REQUIRED, ExperimentFactory, slurm_options, slurm_unavailable

# Jupyter kernels and servers that the tests start inherit this environment and run in
# folders of their own: put this checkout first on PYTHONPATH, with absolute paths, so
# they import the alma under test. (With `PYTHONPATH=.` they would resolve "." in their
# own folder and import whichever alma is installed, e.g. another checkout's.)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [
        str(REPO),
        *(
            str(Path(entry).resolve())
            for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if entry
        ),
    ]
)


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


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``"executor"`` options for the local SLURM cluster (.ci/slurm-up.sh), with a job
    name of this test's own; its jobs are cancelled at the end whatever happens.
    Skipped where no cluster answers, failed instead under ALMA_SLURM=1 (CI)."""
    reason = slurm_unavailable()
    if reason:
        if SLURM_REQUIRED:
            pytest.fail(f"ALMA_SLURM=1 but {reason}")
        pytest.skip(reason)
    name = f"alma-test-{uuid.uuid4().hex[:8]}"
    yield slurm_options(tmp_path, job_name=name)
    subprocess.run(["scancel", "--name", name], check=False, timeout=30)
