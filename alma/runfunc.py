"""The user's run function: loading it, calling it, hashing it, shipping it to workers.

One leaf module (it imports only :mod:`alma.errors`) used by the spec, which loads and
checks the function once, and by every executor, which calls it and sends it to other
processes or machines. Keeping all of it here means a run module is loaded, adapted
and shipped the same way wherever it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import linecache
import pickle
import sys
import sysconfig
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import NO_PARAMS, Config, Task

#: Module names alma gives the run modules it loads from experiment files. No other
#: process can import such a module by name, so it travels as its source text.
MODULE_PREFIX = "alma_run_"
#: What alma passes to ``run()`` by name, when the function declares it (besides the
#: configuration's parameters).
PARAMETERS = ("instance", "save_callback", "state", "iteration", "seed", "params")
#: Filled by position when ``run()`` uses other names, e.g. ``def run(path)``.
_POSITIONAL = ("instance", "save_callback", "state")

#: ``caller(task, save_callback, state)``: what executors call; it calls ``run()`` with
#: what it declares of the task (path, iteration, seed, parameters).
Caller = Callable[[Task, Any, Any], Any]


def hash_bytes(data: bytes) -> str:
    """Short, stable identifier of a run module's code."""
    return hashlib.sha256(data).hexdigest()[:16]


def function_hash(func: Callable[..., Any]) -> str:
    """Hash a function's source (falls back to its bytecode when source is unavailable)."""
    try:
        data = inspect.getsource(func).encode()
    except (OSError, TypeError):
        code = getattr(func, "__code__", None)
        data = code.co_code if code is not None else repr(func).encode()
    return hash_bytes(data)


def load_module_run(
    module: Path, where: str | Path, configs: Sequence[Config] = (NO_PARAMS,)
) -> Callable[..., Any]:
    """Import the run module from its file and return its ``run`` function, checked
    against the experiment's ``configs``."""
    if not module.is_file():
        raise ConfigError.at(
            where,
            "load",
            f"run module {str(module)!r} not found",
            f"Give the path of a .py file, relative to the experiment's folder "
            f"({Path(where).parent}).",
        )
    name = f"{MODULE_PREFIX}{hash_bytes(str(module).encode())}"
    spec = importlib.util.spec_from_file_location(name, module)
    if spec is None or spec.loader is None:
        raise ConfigError.at(
            where, "load", f"{module} is not an importable Python file", "Give a .py file."
        )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # lets pickling, dataclasses and typing find the module
    # Its folder is importable, as a script's is, so `from helpers import x` next to it
    # works from any current folder; worker processes inherit this sys.path.
    folder = str(module.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(mod)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, SystemExit):
            raise ConfigError(
                f"{where}, field 'load': the run module {module} called sys.exit() while "
                'being imported. Put script code under if __name__ == "__main__":.'
            ) from None
        raise ConfigError(
            f"{where}, field 'load': importing {module} failed with "
            f"{type(exc).__name__}: {exc}. Fix the module."
        ) from exc
    run = getattr(mod, "run", None)
    if not callable(run):
        raise ConfigError.at(
            module,
            None,
            "defines no function run(instance, save_callback, state)",
            "Add one; alma calls it once per (instance, iteration).",
        )
    check_params(run, configs, module)
    return run


def check_params(run: Callable[..., Any], configs: Sequence[Config], where: str | Path) -> None:
    """Refuse a run function that requires an argument some configuration lacks."""
    params = _signature(run)
    if params is None:
        return  # builtins and C callables: trust them
    for config in configs:
        layout = _layout(params, config.params)
        if layout.missing is None:
            continue
        if config.params:
            raise ConfigError.at(
                where,
                None,
                f"run() requires a parameter {layout.missing!r} that the configuration "
                f"{config.key} does not give",
                f"Give {layout.missing!r} a default in run(), or a value in every "
                'configuration of "params".',
            )
        raise ConfigError.at(
            where,
            None,
            f"run() requires a parameter {layout.missing!r} that alma cannot supply",
            "alma passes instance, save_callback, state and, if declared, iteration, "
            'seed, params and the parameters of "params"; give other parameters a default.',
        )


def _signature(run: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Layout:
    """How to call ``run()`` for configurations with given parameter names: which value
    goes to which positional slot and keyword (values named as in PARAMETERS, or a
    parameter's own name)."""

    positional: tuple[str, ...]
    keyword: tuple[tuple[str, str], ...]
    #: A required parameter nothing fills, or None.
    missing: str | None = None


def _layout(params: list[inspect.Parameter], given: Mapping[str, Any]) -> _Layout:
    """The call of ``run()`` (its ``params``) for a configuration giving ``given``."""
    if any(p.kind is p.VAR_KEYWORD for p in params):
        # **kwargs: alma's usual four by name, and the configuration's parameters.
        names = (*PARAMETERS[:4], *given)
        return _Layout((), tuple((n, n) for n in names))
    positional: list[str] = []
    keyword: list[tuple[str, str]] = []
    contiguous = True
    for idx, p in enumerate(params):
        if p.kind is p.VAR_POSITIONAL:
            contiguous = False
            continue
        if (p.name in PARAMETERS or p.name in given) and p.kind is not p.POSITIONAL_ONLY:
            value = p.name  # a configuration's parameter wins over a positional slot
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and idx < 3:
            value = _POSITIONAL[idx]
        elif p.default is p.empty:
            return _Layout((), (), missing=p.name)
        else:
            contiguous = False  # has a default: left to it
            continue
        if contiguous and p.kind is not p.KEYWORD_ONLY:
            positional.append(value)
        else:
            keyword.append((p.name, value))
    return _Layout(tuple(positional), tuple(keyword))


def make_caller(run: Callable[..., Any]) -> Caller:
    """Adapt ``run`` so alma can always call ``caller(task, save_callback, state)``.

    Only the parameters that ``run`` declares are passed: by name when they use alma's
    names or a parameter's name, else by position (instance, save_callback, state), so
    ``def run(path)`` works. How to call it is worked out once per set of parameter
    names (a grid has one), not per run.
    """
    params = _signature(run)
    if params is None:
        return lambda task, s, st: run(task.path, s, st)
    callers: dict[tuple[str, ...], Caller] = {}

    def caller(task: Task, s: Any, st: Any) -> Any:
        names = tuple(task.params)  # () without "params": one cheap lookup per run
        call = callers.get(names)
        if call is None:
            call = callers[names] = _compile(run, _layout(params, task.params))
        return call(task, s, st)

    return caller


def _compile(run: Callable[..., Any], layout: _Layout) -> Caller:
    """The call ``layout`` describes; a plain positional call builds no dict per run."""
    positional, keyword = layout.positional, layout.keyword
    if not keyword and positional == _POSITIONAL[: len(positional)]:
        if len(positional) == 3:
            return lambda task, s, st: run(task.path, s, st)
        if len(positional) == 2:
            return lambda task, s, st: run(task.path, s)
        if len(positional) == 1:
            return lambda task, s, st: run(task.path)

    pos = [_getter(v) for v in positional]
    kw = [(name, _getter(v)) for name, v in keyword]

    def call(task: Task, s: Any, st: Any) -> Any:
        return run(*[g(task, s, st) for g in pos], **{n: g(task, s, st) for n, g in kw})

    return call


def _getter(value: str) -> Caller:
    """How to get the value named ``value`` (see _Layout) for one run."""
    fixed: dict[str, Caller] = {
        "instance": lambda task, s, st: task.path,
        "save_callback": lambda task, s, st: s,
        "state": lambda task, s, st: st,
        "iteration": lambda task, s, st: task.iteration,
        "seed": lambda task, s, st: task.seed,
        "params": lambda task, s, st: dict(task.params),
    }
    return fixed.get(value) or (lambda task, s, st: task.params[value])


# -- shipping to other processes and machines ----------------------------------------


@dataclass(frozen=True)
class ShippedRun:
    """A run function packed for another process: exactly one field is set."""

    #: An experiment's run module: (module name, file name, source text). It is
    #: executed there under the same names, so tracebacks show the user's file and
    #: lines, and the file need not exist on the worker.
    module: tuple[str, str, str] | None = None
    #: Anything else, pickled (see :func:`ship`: by reference, or by value with cloudpickle).
    pickled: bytes | None = None


_pickle_lock = threading.Lock()


def _installed(module: Any) -> bool:
    """True when a module comes from the Python installation (workers have it too)."""
    file = getattr(module, "__file__", None)
    if not file:
        return True  # builtin
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    path = Path(file).resolve()
    return any(path.is_relative_to(Path(r).resolve()) for r in roots if r)


def ship(run: Callable[..., Any], executor: str, destination: str, *, remote: bool) -> ShippedRun:
    """Pack ``run`` for ``destination`` (e.g. "a worker process"); what it needs there is
    pyalma and the run's own imports, not the run module's file.

    ``remote``: the destination may be another machine, so a function from a module
    that is not an installed package travels by value. Otherwise (a process on this
    machine, given this ``sys.path``) it travels by reference and is imported there,
    keeping module-level state and identity as a plain import would.
    Raises ConfigError, naming the executor, for a function that cannot be pickled.
    """
    module = sys.modules.get(getattr(run, "__module__", "") or "")
    name = getattr(module, "__name__", "")
    file = getattr(module, "__file__", None)
    if name.startswith(MODULE_PREFIX) and file and getattr(run, "__name__", None) == "run":
        try:
            return ShippedRun(module=(name, file, Path(file).read_text(encoding="utf-8")))
        except OSError:
            pass  # the file went away: pickle the function instead
    by_value = remote and module is not None and name != "__main__" and not _installed(module)
    if not by_value and name not in ("", "__main__") and isinstance(run, types.FunctionType):
        # A module's function travels by reference, as plain pickle writes it (the same
        # bytes cloudpickle would write): this spares importing cloudpickle at every
        # start of the processes executor (its workers spawn about 3 ms sooner). Plain
        # pickle refuses what it cannot find again by name (a lambda, a nested
        # function): cloudpickle's turn.
        with contextlib.suppress(pickle.PicklingError, AttributeError, TypeError):
            return ShippedRun(pickled=pickle.dumps(run, pickle.HIGHEST_PROTOCOL))
    import cloudpickle

    with _pickle_lock:  # registering by value is process-wide: undo it right after
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            return ShippedRun(pickled=cloudpickle.dumps(run))
        except Exception as exc:
            raise ConfigError(
                f'executor "{executor}": the run function '
                f"{getattr(run, '__qualname__', run)!r} cannot be sent to {destination} "
                f"({type(exc).__name__}: {exc}). Define it at the top level of a module or "
                "notebook cell and do not let it capture unpicklable objects (open files, "
                'locks, connections); or use "executor": "threads".'
            ) from exc
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)


def neighbours(run: Callable[..., Any]) -> list[Path]:
    """What the run module imported from its own folder (``from featlib import x``, or
    ``from mylib.models import y`` with a ``mylib/`` package next to it): the module
    files and the package folders that workers on other machines need besides the run
    module itself.
    """
    module = sys.modules.get(getattr(run, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    if not file or not getattr(module, "__name__", "").startswith(MODULE_PREFIX):
        return []
    folder = Path(file).resolve().parent
    found = set()
    for other in list(sys.modules.values()):
        path = getattr(other, "__file__", None)
        if other is module or not path or not path.endswith(".py"):
            continue
        resolved = Path(path).resolve()
        if resolved.parent == folder:
            found.add(resolved)
        elif resolved.name == "__init__.py" and resolved.parent.parent == folder:
            # A package in the folder: the whole package folder travels.
            found.add(resolved.parent)
    return sorted(found)


def unship(shipped: ShippedRun) -> Callable[..., Any]:
    """Inverse of :func:`ship`, in the worker."""
    if shipped.pickled is not None:
        # cloudpickle.loads is pickle.loads: a function pickled by value names
        # cloudpickle's helpers in the stream, which imports it; one pickled by
        # reference does not, and the worker starts without it (about 10 ms).
        return pickle.loads(shipped.pickled)  # type: ignore[no-any-return]
    assert shipped.module is not None
    name, file, source = shipped.module
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__file__ = file
        # Tracebacks read lines through linecache; the worker may not have the file.
        # mtime None: checkcache() keeps the entry.
        linecache.cache[file] = (len(source), None, source.splitlines(True), file)
        sys.modules[name] = module  # lets pickling, dataclasses and typing find it
        try:
            exec(compile(source, file, "exec"), module.__dict__)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return module.run  # type: ignore[no-any-return]


__all__ = [
    "MODULE_PREFIX",
    "PARAMETERS",
    "Caller",
    "ShippedRun",
    "check_params",
    "function_hash",
    "hash_bytes",
    "load_module_run",
    "make_caller",
    "neighbours",
    "ship",
    "unship",
]
