"""Parse and validate what a user writes: ``.experiment``, ``.batch`` and the run module.

Everything is checked here, once, before anything runs or is written, so that a mistake
surfaces as a :class:`~alma.errors.ConfigError` naming the file, the field and the fix.
The result is a frozen :class:`Spec` that the rest of the engine trusts.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Keys an ``.experiment`` file may hold, with their defaults (None: required / unset).
EXPERIMENT_KEYS: dict[str, Any] = {
    "load": None,
    "batch": None,
    "iterations": 1,
    "workers": 1,
    "order": "round-robin",
    "retries": 0,
    "state": None,
    "executor": "threads",
    "timeout": None,
}
ORDERS = ("round-robin", "instance")
#: Suffix of the default state file, written next to the experiment file.
STATE_SUFFIX = ".sqlite"
RUN_PARAMETERS = ("instance", "save_callback", "state", "iteration")


@dataclass(frozen=True)
class Spec:
    """A validated experiment: everything the dispatcher needs, nothing it must re-check."""

    name: str
    run: Callable[..., Any] = field(repr=False)
    #: Instances as listed (globs expanded), and their resolved file paths.
    instances: tuple[str, ...]
    paths: tuple[str, ...] = field(repr=False)
    iterations: int = 1
    workers: int = 1
    order: str = "round-robin"
    retries: int = 0
    state_path: Path = Path("alma.sqlite")
    executor: Any = "threads"
    timeout: float | None = None
    #: sha256 of the run module's file (or of the function's source), recorded per run.
    code_hash: str = ""

    @property
    def total(self) -> int:
        """Number of runs in the plan."""
        return len(self.instances) * self.iterations


def _fail(where: str | Path, key: str | None, problem: str, fix: str) -> ConfigError:
    field_part = f", field {key!r}" if key else ""
    return ConfigError(f"{where}{field_part}: {problem}. {fix}")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _read_json(path: Path, what: str, base: Path) -> dict[str, Any]:
    """Read one JSON object; ``base`` is the folder a relative path was resolved against
    (the current folder for a path the user typed, the experiment's folder for its batch),
    named when the file is missing because that is where the user must look."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = ""
        if what == "experiment" and path.parent.is_dir():
            near = sorted(p.name for p in path.parent.glob("*.experiment") if p.is_file())
            if near:
                hint = f" Experiment files in {path.parent}: {', '.join(near[:5])}."
        raise ConfigError(
            f"{what} file not found: {path}. Check the path (relative paths "
            f"are resolved against {base}).{hint}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file ({exc}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}. {_article(what).capitalize()} {what} file is one JSON object."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object {{...}}, got {type(data).__name__}.")
    return data


def _check_keys(path: str | Path, data: dict[str, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else f"Known fields: {', '.join(allowed)}."
        raise _fail(path, key, "unknown field", hint)


def _int_field(where: str | Path, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(
            where,
            key,
            f"expected an integer >= {minimum}, got {value!r}",
            f'Write for example "{key}": {max(minimum, 1)}.',
        )
    return value


def read_batch(
    path: str | os.PathLike[str], base: Path | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Read a ``.batch`` file: returns (names as listed, resolved paths).

    Entries are paths relative to the batch file's folder; glob patterns are expanded
    (sorted) and duplicates dropped, keeping the first occurrence. ``base`` is the folder
    a relative ``path`` is resolved against (default: the current folder).
    """
    batch = Path(path).resolve()
    data = _read_json(batch, "batch", Path.cwd() if base is None else base)
    _check_keys(batch, data, ["instances"])
    if "instances" not in data:
        raise _fail(
            batch,
            "instances",
            "missing",
            'A batch lists its files: {"instances": ["data/a.txt", "data/*.csv"]}.',
        )
    return expand_instances(data["instances"], batch.parent, batch)


def expand_instances(
    entries: Any, base: Path, where: str | Path
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Expand a list of instance paths/globs relative to ``base``; every file must exist."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise _fail(
            where,
            "instances",
            f"expected a list of paths, got {entries!r}",
            'Write for example "instances": ["data/a.txt", "data/*.txt"].',
        )
    names: dict[str, str] = {}
    seen: set[str] = set()

    def add(name: str, path: str) -> None:
        # A file is one instance however it is spelt ("a.txt", "./a.txt", a glob).
        if path not in seen:
            seen.add(path)
            names.setdefault(name, path)

    for i, entry in enumerate(entries):
        if isinstance(entry, os.PathLike):
            entry = os.fspath(entry)
        if not isinstance(entry, str) or not entry:
            raise _fail(
                where,
                "instances",
                f"entry {i} is {entry!r}, not a path",
                "Each entry is a file path or a glob pattern, as a string.",
            )
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, root_dir=base, recursive=True))
            matches = [m for m in matches if (base / m).is_file()]
            if not matches:
                raise _fail(
                    where,
                    "instances",
                    f"pattern {entry!r} matches no file in {base}",
                    "Fix the pattern or remove it.",
                )
            for m in matches:
                add(Path(m).as_posix(), str((base / m).resolve()))
        else:
            full = base / entry
            if not full.is_file():
                raise _fail(
                    where,
                    "instances",
                    f"entry {i}, {entry!r}, is not a file (looked for {os.path.normpath(full)})",
                    "Fix the path or remove the entry.",
                )
            add(entry, str(full.resolve()))
    if not names:
        raise _fail(where, "instances", "the list is empty", "List at least one file.")
    return tuple(names), tuple(names.values())


def hash_bytes(data: bytes) -> str:
    """Short, stable identifier of a run module's code."""
    return hashlib.sha256(data).hexdigest()[:16]


def load_module_run(module: Path, where: str | Path) -> Callable[..., Any]:
    """Import the run module from its file and return its ``run`` function."""
    if not module.is_file():
        raise _fail(
            where,
            "load",
            f"run module {str(module)!r} not found",
            f"Give the path of a .py file, relative to the experiment's folder "
            f"({Path(where).parent}).",
        )
    name = f"alma_run_{hash_bytes(str(module).encode())}"
    spec = importlib.util.spec_from_file_location(name, module)
    if spec is None or spec.loader is None:
        raise _fail(
            where,
            "load",
            f"{module} is not an importable Python file",
            "Give the path of a .py file.",
        )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # lets pickling, dataclasses and typing find the module
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(
            f"{where}, field 'load': importing {module} failed with "
            f"{type(exc).__name__}: {exc}. Fix the module."
        ) from exc
    run = getattr(mod, "run", None)
    if not callable(run):
        raise _fail(
            module,
            None,
            "defines no function run(instance, save_callback, state)",
            "Add one; alma calls it once per (instance, iteration).",
        )
    check_run_signature(run, module)
    return run


def check_run_signature(run: Callable[..., Any], where: str | Path) -> None:
    """Refuse a run function alma could not call, before anything runs."""
    try:
        sig = inspect.signature(run)
    except (TypeError, ValueError):
        return  # builtins and C callables: trust them
    # Mirrors make_caller: only the first three positional slots are filled by position.
    for idx, p in enumerate(sig.parameters.values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in RUN_PARAMETERS and p.kind is not p.POSITIONAL_ONLY:
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and idx < 3:
            continue
        if p.default is p.empty:
            raise _fail(
                where,
                None,
                f"run() requires a parameter {p.name!r} that alma cannot supply",
                "alma passes instance, save_callback, state and, "
                "if declared, iteration; give other parameters a default.",
            )


def make_caller(run: Callable[..., Any]) -> Callable[[str, Any, Any, int], Any]:
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
    order = ("instance", "save_callback", "state")
    positional: list[str] = []  # value names passed by position, in order
    keyword: dict[str, str] = {}  # parameter name -> value name
    contiguous = True
    for idx, p in enumerate(params):
        if p.kind is p.VAR_POSITIONAL:
            contiguous = False
            continue
        if p.name in RUN_PARAMETERS and p.kind is not p.POSITIONAL_ONLY:
            value = p.name
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and idx < 3:
            value = order[idx]
        else:
            contiguous = False  # has a default (check_run_signature made sure)
            continue
        if contiguous and p.kind is not p.KEYWORD_ONLY:
            positional.append(value)
        else:
            keyword[p.name] = value
    if not keyword and positional == list(order[: len(positional)]):
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


def _check_executor(where: str | Path, value: Any) -> Any:
    from .executors import REGISTRY, check_executor  # keeps executor names in one place

    try:
        return check_executor(value)
    except ConfigError as exc:  # already says the fix (e.g. the package to install)
        raise ConfigError(f"{where}, field 'executor': {exc}") from None
    except ValueError as exc:
        name = next(iter(value), None) if isinstance(value, dict) and len(value) == 1 else value
        close = difflib.get_close_matches(name, REGISTRY, n=1) if isinstance(name, str) else []
        raise _fail(
            where,
            "executor",
            str(exc),
            f"Did you mean {close[0]!r}?"
            if close and close[0] != name
            else 'Use "threads", "processes", "dask" or {"dask": "tcp://host:8786"}.',
        ) from None


def build_options(where: str | Path, data: dict[str, Any]) -> dict[str, Any]:
    """Validate the scalar options shared by files and :func:`alma.Experiment`."""
    out = {
        k: data.get(k, EXPERIMENT_KEYS[k])
        for k in ("iterations", "workers", "order", "retries", "executor", "timeout")
    }
    out["iterations"] = _int_field(where, "iterations", out["iterations"], 1)
    out["workers"] = _int_field(where, "workers", out["workers"], 1)
    out["retries"] = _int_field(where, "retries", out["retries"], 0)
    if out["order"] not in ORDERS:
        close = difflib.get_close_matches(str(out["order"]), ORDERS, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else ""
        raise _fail(
            where,
            "order",
            f"{out['order']!r} is not one of {list(ORDERS)}",
            hint or f"Use one of {list(ORDERS)}.",
        )
    t = out["timeout"]
    if t is not None and (
        isinstance(t, bool)
        or not isinstance(t, (int, float))
        or (isinstance(t, float) and not math.isfinite(t))  # NaN <= 0 is False
        or t <= 0
    ):
        raise _fail(
            where,
            "timeout",
            f"expected a finite number of seconds > 0, got {t!r}",
            'Write for example "timeout": 600, or leave it out.',
        )
    out["executor"] = _check_executor(where, out["executor"])
    return out


def _state_path(where: Path, value: Any, default: Path) -> Path:
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise _fail(
            where,
            "state",
            f"expected a file path, got {value!r}",
            'Write for example "state": "results/example.sqlite".',
        )
    return check_state_dir(where, (where.parent / value).resolve())


def check_state_dir(where: str | Path, path: Path) -> Path:
    """The state file's folder must exist: alma creates the file, never folders."""
    if not path.parent.is_dir():
        raise _fail(
            where,
            "state",
            f"folder {path.parent} does not exist",
            "Create it or choose another state path.",
        )
    if path.is_dir():
        raise _fail(where, "state", f"{path} is a folder", "Give a file path.")
    return path


def read_experiment(path: str | os.PathLike[str]) -> Spec:
    """Read and validate an ``.experiment`` file, its batch and its run module."""
    exp = Path(path).resolve()
    data = _read_json(exp, "experiment", Path.cwd())
    if "instances" in data and "load" not in data and "batch" not in data:
        raise _fail(
            exp,
            None,
            'this looks like a batch file (it lists "instances"), not an experiment',
            "Pass the .experiment file that names it.",
        )
    _check_keys(exp, data, list(EXPERIMENT_KEYS))
    for key in ("load", "batch"):
        if key not in data:
            example = {"load": '"example.py"', "batch": '"example.batch"'}[key]
            raise _fail(exp, key, "missing", f'Add "{key}": {example}.')
        if not isinstance(data[key], str) or not data[key]:
            raise _fail(
                exp,
                key,
                f"expected a file path, got {data[key]!r}",
                "Give a path relative to the experiment file.",
            )
    options = build_options(exp, data)
    batch = exp.parent / data["batch"]
    if not batch.is_file():
        raise _fail(
            exp,
            "batch",
            f"batch file {str(batch)!r} not found",
            f"Give the path of a .batch file, relative to the experiment's folder ({exp.parent}).",
        )
    instances, paths = read_batch(batch, base=exp.parent)
    module = (exp.parent / data["load"]).resolve()
    run = load_module_run(module, exp)
    state = _state_path(exp, data.get("state"), exp.with_name(exp.name + STATE_SUFFIX))
    return Spec(
        name=exp.stem,
        run=run,
        instances=instances,
        paths=paths,
        state_path=state,
        code_hash=hash_bytes(module.read_bytes()),
        **options,
    )


def function_hash(func: Callable[..., Any]) -> str:
    """Hash a function's source (falls back to its bytecode when source is unavailable)."""
    try:
        data = inspect.getsource(func).encode()
    except (OSError, TypeError):
        code = getattr(func, "__code__", None)
        data = code.co_code if code is not None else repr(func).encode()
    return hash_bytes(data)
