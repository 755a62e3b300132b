"""Executors by name: an open registry, so a new executor is one class and one call.

``"executor"`` in an experiment is a registered name (``"threads"``, the default,
``"processes"``, ``"dask"``, ``"slurm"``) or ``{"<name>": options}`` (e.g. ``{"dask":
"tcp://host:8786"}``); each executor class validates its own options. Built-in
executors are registered by ``"module:Class"`` and imported when first asked for, so
optional dependencies stay optional. An installed package can provide executors under
the ``alma.executors`` entry-point group, so that they work everywhere an experiment is
loaded (``alma run`` included) without a ``register`` call. See "Writing an executor"
in docs/executors.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .base import Executor, ExecutorChoice, RunSource, execute

#: The executors alma ships, imported on first use.
_BUILTIN = {
    "threads": "alma.executors.threads:ThreadExecutor",
    "processes": "alma.executors.processes:ProcessExecutor",
    "dask": "alma.executors.dask:DaskExecutor",
    "slurm": "alma.executors.slurm:SlurmExecutor",
}
#: name -> the class, or "module:Class" to import on first use.
_REGISTRY: dict[str, type[Executor] | str] = dict(_BUILTIN)


def register(name: str, cls: type[Executor] | str) -> None:
    """Make ``cls`` (an :class:`Executor` subclass, or ``"module:Class"`` to import
    lazily) available as ``"executor": name``; registering a name again replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an executor name is a non-empty string, got {name!r}")
    if not isinstance(cls, str) and not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise TypeError(f"expected an Executor subclass or 'module:Class', got {cls!r}")
    _REGISTRY[name] = cls


#: The entry-point group where installed packages declare executors.
ENTRY_POINTS = "alma.executors"
_discovered = False


def _discover() -> None:
    """Register executors that installed packages declare, once (names registered in
    code win). Only done when a name is asked for that alma does not know yet."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import importlib.metadata  # only when a name is not built in: it is slow to import

    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        _REGISTRY.setdefault(ep.name, ep.value)


def names() -> list[str]:
    """The registered executor names (installed packages' included), sorted."""
    _discover()
    return sorted(_REGISTRY)


def executor_class(name: str) -> type[Executor]:
    """The executor class registered under ``name`` (imported on first use)."""
    cls = _REGISTRY[name]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    assert not isinstance(cls, str)
    return cls


def parse(value: Any, where: object) -> ExecutorChoice:
    """Validate an ``"executor"`` value; ConfigError names ``where``, the field and the fix."""
    if isinstance(value, ExecutorChoice):
        value = value.name if value.options is None else {value.name: value.options}
    if isinstance(value, dict) and len(value) == 1:
        ((name, options),) = value.items()
    else:
        name, options = value, None
    if isinstance(name, str) and name not in _REGISTRY:
        _discover()
    if not isinstance(name, str) or name not in _REGISTRY:
        import difflib  # only for this message: worker processes import this package

        close = difflib.get_close_matches(name, _REGISTRY, n=1) if isinstance(name, str) else []
        fix = (
            f"Did you mean {close[0]!r}?"
            if close
            else "Use " + ", ".join(executor_class(n).usage or f'"{n}"' for n in names()) + "."
        )
        raise ConfigError.at(
            where, "executor", f"invalid executor {value!r}, expected one of {names()}", fix
        )
    try:
        options = executor_class(name).parse_options(options)
    except ConfigError as exc:  # already says the fix (e.g. the package to install)
        raise ConfigError(f"{where}, field 'executor': {exc}") from None
    except ValueError as exc:
        raise ConfigError.at(
            where, "executor", f"invalid executor {value!r}: {exc}", _usage(name)
        ) from None
    return ExecutorChoice(name, options)


def _usage(name: str) -> str:
    usage = executor_class(name).usage
    return f"Write {usage}." if usage else f'Write "{name}".'


__all__ = [
    "Executor",
    "ExecutorChoice",
    "RunSource",
    "execute",
    "executor_class",
    "names",
    "parse",
    "register",
]
