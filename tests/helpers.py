"""Plain helpers shared by the tests: build experiments on disk, poll with deadlines,
run the CLI. Tests import them (``from helpers import wait_until``); fixtures live in
conftest.py.

Why helpers rather than fixture files: every test writes the exact run module it needs,
so a reader sees the behaviour under test next to its assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Environment for CLI subprocesses: unbuffered, and the repo importable even if the
#: editable install is missing.
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def make_files(tmp_path: Path, n: int) -> list[str]:
    """``n`` small files ``data/f<i>.txt`` under ``tmp_path``; returns their paths."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        f = data / f"f{i}.txt"
        f.write_text(str(i))
        out.append(str(f))
    return out


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: compare before/after to prove no write."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class ExperimentFactory:
    """Writes ``<name>.experiment``, ``<name>.batch``, ``<name>.py`` and data files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(
        self,
        run_source: str = "def run(instance, save_callback, state):\n    return 1\n",
        *,
        instances: int | list[str] = 3,
        iterations: int = 2,
        workers: int = 1,
        name: str = "example",
        folder: str = ".",
        **options: Any,
    ) -> Path:
        """Create an experiment and return the path of its ``.experiment`` file.

        ``instances`` is a count of data files to create (``data/file<i>.txt``), or the
        literal batch entries (the files must then exist already). Extra keyword
        arguments become fields of the experiment file.
        """
        base = self.root / folder
        data = base / "data"
        data.mkdir(parents=True, exist_ok=True)
        if isinstance(instances, int):
            entries = []
            for i in range(instances):
                f = data / f"file{i}.txt"
                f.write_text(f"instance {i}\n")
                entries.append(f"data/file{i}.txt")
        else:
            entries = instances
        (base / f"{name}.batch").write_text(json.dumps({"instances": entries}))
        (base / f"{name}.py").write_text(textwrap.dedent(run_source))
        exp = base / f"{name}.experiment"
        fields = {
            "load": f"{name}.py",
            "workers": workers,
            "iterations": iterations,
            "batch": f"{name}.batch",
            **options,
        }
        exp.write_text(json.dumps(fields, indent=1))
        return exp


def alma_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 60, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m alma ARGS`` to completion and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "alma", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
        **kw,
    )


def alma_popen(
    *args: str | os.PathLike[str], cwd: Path | None = None, **kw: Any
) -> subprocess.Popen[str]:
    """Start ``python -m alma ARGS`` in the background (stdout/stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "alma", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
        **kw,
    )


def python_env() -> dict[str, str]:
    """Environment for any Python subprocess a test starts."""
    return _env()


#: Set by .ci/run: a SLURM cluster that cannot be reached fails the SLURM tests.
SLURM_REQUIRED = os.environ.get("ALMA_SLURM") == "1"


def slurm_unavailable() -> str | None:
    """Why the SLURM tests cannot run here (None: a SLURM cluster answers, with a node
    up, and dask-jobqueue is installed). ``bash .ci/slurm-up.sh`` (root) starts one."""
    import importlib.util

    if importlib.util.find_spec("dask_jobqueue") is None:
        return 'dask-jobqueue is not installed (pip install -e ".[test]")'
    if shutil.which("sbatch") is None:
        return "no SLURM here (sbatch not on PATH); as root, bash .ci/slurm-up.sh installs one"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    up = [s for s in out.stdout.split() if s.rstrip("*~#") in ("idle", "mix", "alloc", "comp")]
    if out.returncode != 0 or not up:
        said = " ".join((out.stderr or out.stdout).split())
        return f"the SLURM cluster has no node up ({said}); as root, bash .ci/slurm-up.sh"
    return None


def slurm_options(root: Path, **options: Any) -> dict[str, Any]:
    """``"executor"`` options for the test cluster of .ci/slurm-up.sh: single-core jobs
    on this machine (the scheduler on loopback), files under ``root``."""
    return {
        "interface": "lo",
        "memory": "512MB",
        "walltime": "00:10:00",
        "local_directory": str(root / "dask-scratch"),
        "log_directory": str(root / "slurm-logs"),
        **options,
    }
