"""Executors by name. Optional ones are imported when first asked for.

``"executor"`` in an experiment is ``"threads"`` (default), ``"processes"``, ``"dask"``
or ``{"dask": "tcp://host:8786"}``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .base import Executor, Outcome, RunSource, Task, execute, to_json

#: name -> "module:Class", imported lazily so optional dependencies stay optional.
REGISTRY: dict[str, str] = {
    "threads": "alma.executors.threads:ThreadExecutor",
    "processes": "alma.executors.processes:ProcessExecutor",
    "dask": "alma.executors.dask:DaskExecutor",
}


def check_executor(value: Any) -> tuple[str, Any]:
    """Normalise an ``"executor"`` value to (name, options); ValueError names valid ones."""
    if isinstance(value, dict) and len(value) == 1:
        ((name, options),) = value.items()
    else:
        name, options = value, None
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"invalid executor {value!r}, expected one of {sorted(REGISTRY)}")
    if name == "dask":
        if options is not None and (not isinstance(options, str) or not options):
            raise ValueError(
                f"invalid executor {value!r}: a Dask scheduler is given by its address, "
                'e.g. {"dask": "tcp://host:8786"}'
            )
        _require_dask()
    elif options is not None:
        raise ValueError(f"invalid executor {value!r}: {name!r} takes no options")
    return name, options


def _require_dask() -> None:
    """Fail at load time, with the fix, when the optional Dask extra is missing."""
    if importlib.util.find_spec("distributed") is None:
        from ..errors import ConfigError

        raise ConfigError(
            'executor "dask" needs Dask distributed, which is not installed. '
            'Install it with: pip install "pyalma[dask]"'
        )


def executor_class(name: str) -> type[Executor]:
    """Import and return the executor class registered under ``name``."""
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


__all__ = [
    "REGISTRY",
    "Executor",
    "Outcome",
    "RunSource",
    "Task",
    "check_executor",
    "execute",
    "executor_class",
    "to_json",
]
