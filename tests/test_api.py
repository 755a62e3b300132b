"""The public surface: ``alma.__all__``, the exception tree, and a light core import.

A light import matters: ``import alma.experiment`` runs in every CLI call and in worker
processes, where pulling in IPython, ipywidgets or Dask would cost seconds.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types

import pytest
from helpers import python_env

import alma
import alma.experiment

#: IPython looks this hook up by name; it is public but not part of ``from alma import *``.
NOT_EXPORTED = {"load_ipython_extension", "annotations"}


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(alma).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } | set(alma._LAZY)  # loaded on first use (PEP 562), so absent from vars() until then
    assert set(alma.__all__) == (public - NOT_EXPORTED) | {"__version__"}
    assert len(alma.__all__) == len(set(alma.__all__))
    for name in alma.__all__:
        assert hasattr(alma, name), name


def test_star_import_gives_the_documented_names() -> None:
    namespace: dict[str, object] = {}
    exec("from alma import *", namespace)
    names = {n for n in namespace if n != "__builtins__"}
    assert names == set(alma.__all__)
    assert {"load", "Experiment", "Dispatcher", "Interrupted"} <= names


def test_experiment_module_keeps_the_seed_entry_point() -> None:
    assert alma.experiment.load is alma.load
    assert callable(alma.Experiment)
    params = list(inspect.signature(alma.experiment.load).parameters.values())
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == ["path"]
    # Anything added since is keyword-only with a default: load(path) means what it did.
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[1:])


def test_dispatcher_has_the_documented_api() -> None:
    for name in ("start", "stop", "join", "retry_failed", "reset", "close", "__enter__"):
        assert callable(getattr(alma.Dispatcher, name)), name
    for name in ("running", "finished", "status", "state_path", "progress", "results", "state"):
        assert isinstance(inspect.getattr_static(alma.Dispatcher, name), property), name
    fields = {f for f in alma.Progress.__dataclass_fields__}
    assert {"total", "done", "failed", "running", "pending", "status", "rate", "eta"} <= fields
    assert alma.Progress.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert set(alma.RunError.__dataclass_fields__) == {
        "instance",
        "iteration",
        "error",
        "traceback",
    }


@pytest.mark.parametrize("cls", [alma.ConfigError, alma.StateError, alma.LockedError])
def test_errors_share_one_base(cls: type[Exception]) -> None:
    assert issubclass(cls, alma.AlmaError)
    assert issubclass(alma.AlmaError, Exception)


def test_interrupted_is_not_an_exception() -> None:
    """``except Exception`` in a user's run must not swallow a pause."""
    assert issubclass(alma.Interrupted, BaseException)
    assert not issubclass(alma.Interrupted, Exception)
    assert not issubclass(alma.Interrupted, alma.AlmaError)
    caught = None
    try:
        try:
            raise alma.Interrupted("stop")
        except Exception:  # what user code writes
            caught = "swallowed"
    except alma.Interrupted:
        caught = "passed through"
    assert caught == "passed through"


def test_core_import_is_light() -> None:
    code = "import json, sys\nimport alma.experiment\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
        check=True,
    )
    loaded = set(json.loads(out.stdout))
    for heavy in ("ipywidgets", "IPython", "dask", "distributed", "alma.notebook", "alma.cli"):
        assert heavy not in loaded, f"import alma.experiment imported {heavy}"
