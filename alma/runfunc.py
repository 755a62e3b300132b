"""The user's run function: loading it, calling it, hashing it, shipping it to workers.

One leaf module (it imports only :mod:`alma.errors`) used by the spec, which loads and
checks the function once, and by every executor, which calls it and sends it to other
processes or machines. Keeping all of it here means a run module is loaded, adapted
and shipped the same way wherever it runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import linecache
import sys
import sysconfig
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Module names alma gives the run modules it loads from experiment files. No other
#: process can import such a module by name, so it travels as its source text.
MODULE_PREFIX = "alma_run_"
#: What alma passes to ``run()`` by name, when the function declares it.
PARAMETERS = ("instance", "save_callback", "state", "iteration")
#: Filled by position when ``run()`` uses other names, e.g. ``def run(path)``.
_POSITIONAL = ("instance", "save_callback", "state")

#: ``caller(instance, save_callback, state, iteration)``: what executors call.
Caller = Callable[[str, Any, Any, int], Any]


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


def load_module_run(module: Path, where: str | Path) -> Callable[..., Any]:
    """Import the run module from its file and return its checked ``run`` function."""
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
    check_signature(run, module)
    return run


def check_signature(run: Callable[..., Any], where: str | Path) -> None:
    """Refuse a run function alma could not call, before anything runs."""
    try:
        sig = inspect.signature(run)
    except (TypeError, ValueError):
        return  # builtins and C callables: trust them
    # Mirrors make_caller: only the first three positional slots are filled by position.
    for idx, p in enumerate(sig.parameters.values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in PARAMETERS and p.kind is not p.POSITIONAL_ONLY:
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and idx < 3:
            continue
        if p.default is p.empty:
            raise ConfigError.at(
                where,
                None,
                f"run() requires a parameter {p.name!r} that alma cannot supply",
                "alma passes instance, save_callback, state and, "
                "if declared, iteration; give other parameters a default.",
            )


def make_caller(run: Callable[..., Any]) -> Caller:
    """Adapt ``run`` so alma can always call ``caller(instance, save, state, iteration)``.

    Only the parameters that ``run`` declares are passed: by name when they use alma's
    names, else by position (instance, save_callback, state), so ``def run(path)`` works.
    """
    try:
        params = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):
        return lambda i, s, st, it: run(i, s, st)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return lambda i, s, st, it: run(instance=i, save_callback=s, state=st, iteration=it)
    positional: list[str] = []  # value names passed by position, in order
    keyword: dict[str, str] = {}  # parameter name -> value name
    contiguous = True
    for idx, p in enumerate(params):
        if p.kind is p.VAR_POSITIONAL:
            contiguous = False
            continue
        if p.name in PARAMETERS and p.kind is not p.POSITIONAL_ONLY:
            value = p.name
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and idx < 3:
            value = _POSITIONAL[idx]
        else:
            contiguous = False  # has a default (check_signature made sure)
            continue
        if contiguous and p.kind is not p.KEYWORD_ONLY:
            positional.append(value)
        else:
            keyword[p.name] = value
    if not keyword and positional == list(_POSITIONAL[: len(positional)]):
        n = len(positional)  # the common case: a plain positional call, no dict per run
        if n == 3:
            return lambda i, s, st, it: run(i, s, st)
        if n == 2:
            return lambda i, s, st, it: run(i, s)
        if n == 1:
            return lambda i, s, st, it: run(i)

    def caller(i: str, s: Any, st: Any, it: int) -> Any:
        values = {"instance": i, "save_callback": s, "state": st, "iteration": it}
        return run(
            *[values[v] for v in positional], **{name: values[v] for name, v in keyword.items()}
        )

    return caller


# -- shipping to other processes and machines ----------------------------------------


@dataclass(frozen=True)
class ShippedRun:
    """A run function packed for another process: exactly one field is set."""

    #: An experiment's run module: (module name, file name, source text). It is
    #: executed there under the same names, so tracebacks show the user's file and
    #: lines, and the file need not exist on the worker.
    module: tuple[str, str, str] | None = None
    #: Anything else, cloudpickled (see :func:`ship` for by value or by reference).
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
    import cloudpickle

    module = sys.modules.get(getattr(run, "__module__", "") or "")
    name = getattr(module, "__name__", "")
    file = getattr(module, "__file__", None)
    if name.startswith(MODULE_PREFIX) and file and getattr(run, "__name__", None) == "run":
        try:
            return ShippedRun(module=(name, file, Path(file).read_text(encoding="utf-8")))
        except OSError:
            pass  # the file went away: pickle the function instead
    by_value = remote and module is not None and name != "__main__" and not _installed(module)
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
        import cloudpickle

        return cloudpickle.loads(shipped.pickled)  # type: ignore[no-any-return]
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
    "check_signature",
    "function_hash",
    "hash_bytes",
    "load_module_run",
    "make_caller",
    "neighbours",
    "ship",
    "unship",
]
