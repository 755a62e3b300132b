"""Parse and validate what a user writes: ``.experiment``, ``.batch`` and the run module.

Everything is checked here, once, before anything runs or is written, so that a mistake
surfaces as a :class:`~alma.errors.ConfigError` naming the file, the field and the fix.
The result is a frozen :class:`Spec` that the rest of the engine trusts.
"""

from __future__ import annotations

import difflib
import glob
import itertools
import json
import math
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import executors
from .errors import ConfigError
from .executors import ExecutorChoice
from .frames import RUN_COLUMNS
from .records import NO_PARAMS, Config, canonical_json
from .runfunc import PARAMETERS, hash_bytes, load_module_run

#: Upper bounds, far above any real experiment, that keep a typo (2**63 iterations,
#: a million workers) a clear error instead of a machine brought down.
MAX_ITERATIONS = 100_000_000
MAX_WORKERS = 10_000
MAX_RETRIES = 1_000
#: The orders runs can go in (see alma.plan).
ORDERS = ("round-robin", "instance")
#: Suffix of the default state file, written next to the experiment file.
STATE_SUFFIX = ".sqlite"


def _count(minimum: int, maximum: int) -> Callable[[str | Path, str, Any], int]:
    def check(where: str | Path, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise _fail(
                where,
                key,
                f"expected an integer from {minimum} to {maximum:,}, got {value!r}",
                f'Write for example "{key}": {max(minimum, 1)}.',
            )
        return value

    return check


def _order(where: str | Path, key: str, value: Any) -> str:
    if value not in ORDERS:
        close = difflib.get_close_matches(str(value), ORDERS, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else f"Use one of {list(ORDERS)}."
        raise _fail(where, key, f"{value!r} is not one of {list(ORDERS)}", hint)
    return str(value)


def _timeout(where: str | Path, key: str, value: Any) -> float | None:
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))  # NaN <= 0 is False
        or value <= 0
    ):
        raise _fail(
            where,
            key,
            f"expected a finite number of seconds > 0, got {value!r}",
            f'Write for example "{key}": 600, or leave it out.',
        )
    return value


#: Names a parameter may not have: what run() receives from alma, and the results'
#: own columns.
RESERVED_PARAMETERS = (
    *PARAMETERS,
    *(c for c in RUN_COLUMNS if c not in PARAMETERS),
    "result",
)
#: Configurations a grid may hold: far above any real sweep.
MAX_CONFIGS = 100_000


def _params(where: str | Path, key: str, value: Any) -> tuple[Config, ...]:
    """``"params"``: a grid (name -> list of values, their Cartesian product) or a list
    of configurations (objects). Identity of each is its canonical JSON; duplicates are
    dropped, keeping the first."""
    if value is None:
        return (NO_PARAMS,)
    if isinstance(value, tuple) and value and all(isinstance(c, Config) for c in value):
        return value  # checked already (the default, or a Spec's own)
    example = 'Write for example "params": {"restarts": [1, 10], "cooling": [0.9, 0.99]}'
    if isinstance(value, Mapping):
        for name, values in value.items():
            _check_name(where, key, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise _fail(
                    where,
                    key,
                    f"parameter {name!r}: expected a list of values, got {values!r}",
                    f"{example}; a single value is a list of one: [{values!r}].",
                )
            if not values:
                raise _fail(
                    where,
                    key,
                    f"parameter {name!r} has an empty list of values",
                    "Give at least one value, or remove the parameter.",
                )
        size = math.prod(len(v) for v in value.values())
        if size > MAX_CONFIGS:
            raise _fail(
                where,
                key,
                f"the grid has {size:,} configurations (at most {MAX_CONFIGS:,})",
                "Use fewer values.",
            )
        names = list(value)
        raw = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*value.values())]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not value:
            raise _fail(
                where,
                key,
                "the list of configurations is empty",
                "List at least one object, or remove the field.",
            )
        raw = []
        for i, config in enumerate(value):
            if not isinstance(config, Mapping):
                raise _fail(
                    where,
                    key,
                    f"configuration {i} is {config!r}, not an object",
                    'Write for example "params": [{"restarts": 1}, {"restarts": 10}].',
                )
            for name in config:
                _check_name(where, key, name)
            raw.append(dict(config))
        if len(raw) > MAX_CONFIGS:
            raise _fail(
                where, key, f"{len(raw):,} configurations (at most {MAX_CONFIGS:,})", "Use fewer."
            )
    else:
        raise _fail(
            where, key, f"expected an object or a list of objects, got {value!r}", f"{example}."
        )
    configs: dict[str, Config] = {}
    for config in raw:
        try:  # canonical JSON, read back: values are JSON values from here on
            text = canonical_json(config)
        except (TypeError, ValueError) as exc:
            raise _fail(
                where,
                key,
                f"configuration {config!r} is not JSON ({exc})",
                "Use numbers, strings, booleans, null, lists and objects.",
            ) from None
        configs.setdefault(text, Config(dict(sorted(json.loads(text).items()))))
    return tuple(configs.values())


def _check_name(where: str | Path, key: str, name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise _fail(
            where,
            key,
            f"parameter name {name!r} is not a Python identifier",
            "run() receives each parameter as a keyword argument of that name.",
        )
    if name in RESERVED_PARAMETERS:
        raise _fail(
            where,
            key,
            f"parameter name {name!r} is reserved",
            f"Rename it; reserved: {', '.join(RESERVED_PARAMETERS)}.",
        )


def _executor(where: str | Path, key: str, value: Any) -> ExecutorChoice:
    return executors.parse(value, where)


DEFAULT_EXECUTOR = ExecutorChoice("threads")


def _option(default: Any, check: Callable[[str | Path, str, Any], Any]) -> Any:
    """A field of Options: its default, and the check that validates a given value."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True, kw_only=True)
class Options:
    """The tunable fields of an experiment, declared once: their names, defaults and
    checks. The ``.experiment`` validator, :class:`Spec` and :func:`alma.Experiment`
    all derive from this declaration (docs/experiment.md describes each field)."""

    iterations: int = _option(1, _count(1, MAX_ITERATIONS))
    workers: int = _option(1, _count(1, MAX_WORKERS))
    order: str = _option("round-robin", _order)
    retries: int = _option(0, _count(0, MAX_RETRIES))
    executor: ExecutorChoice = _option(DEFAULT_EXECUTOR, _executor)  # noqa: RUF009 - frozen
    timeout: float | None = _option(None, _timeout)
    #: The configurations: ``"params"`` as given in the file, checked and expanded.
    params: tuple[Config, ...] = _option((NO_PARAMS,), _params)
    seed: int = _option(0, _count(0, 2**63 - 1))


#: The names of the tunable fields, in declaration order.
OPTION_FIELDS = tuple(f.name for f in fields(Options))
#: Every field an ``.experiment`` file may hold.
EXPERIMENT_FIELDS = ("load", "batch", *OPTION_FIELDS, "state")


@dataclass(frozen=True, kw_only=True)
class Spec(Options):
    """A validated experiment: everything the dispatcher needs, nothing it must re-check."""

    name: str
    #: The run function; None when loaded for reading only.
    run: Callable[..., Any] | None = field(repr=False)
    #: Instances as listed (globs expanded), and their resolved file paths.
    instances: tuple[str, ...]
    paths: tuple[str, ...] = field(repr=False)
    state_path: Path
    #: sha256 of the run module's file (or of the function's source), recorded per run.
    code_hash: str = ""
    #: The ``.experiment`` file it was read from (None when defined in code): a detached
    #: runner loads that file afresh instead of receiving a pickled function.
    source: Path | None = field(default=None, repr=False)

    @property
    def cells(self) -> int:
        """Rows of the plan: every instance in every configuration."""
        return len(self.instances) * len(self.params)

    @property
    def total(self) -> int:
        """Number of runs in the plan."""
        return self.cells * self.iterations

    def cell(self, pos: int) -> tuple[int, Config]:
        """Position in the batch of row ``pos``'s instance, and its configuration: the
        rows go instance by instance, every configuration of one instance together."""
        inst, cfg = divmod(pos, len(self.params))
        return inst, self.params[cfg]


_fail = ConfigError.at


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
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the {what} file is not UTF-8 text (byte {exc.start} is "
            f"{exc.object[exc.start : exc.start + 1]!r}; saved as UTF-16 or Latin-1?). "
            "Save it as UTF-8 (in Notepad: Save as, Encoding UTF-8)."
        ) from None
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


def _spelt(match: str) -> str:
    """A glob match as its instance name: "./data/a.txt" is "data/a.txt" (as pathlib
    spells it), without the cost of a Path per file for the common, clean case."""
    if "/." in "/" + match or "//" in match or os.sep != "/":
        return Path(match).as_posix()
    return match


class _FileResolver:
    """Resolved path of a regular file relative to ``base``, or None: what
    ``Path.resolve()`` gives, at one ``lstat`` per file instead of one per path
    component (the folders' real paths are cached), so a batch of 100,000 files loads
    in well under a second."""

    def __init__(self, base: Path, where: str | Path) -> None:
        self._prefix = os.path.join(str(base), "")
        self._where = where
        self._folders: dict[str, str] = {}

    def __call__(self, relative: str) -> str | None:
        # Plain concatenation: os.path.join costs as much as the lstat here.
        full = relative if os.path.isabs(relative) else self._prefix + relative
        try:
            mode = os.lstat(full).st_mode
        except (OSError, ValueError):
            return None
        if stat.S_ISLNK(mode):  # the file itself is a link: follow it all the way
            real = os.path.realpath(full)
            return self._stored(real) if os.path.isfile(real) else None
        if not stat.S_ISREG(mode):
            return None
        folder, _, name = full.rpartition(os.sep)
        folder = folder or os.sep  # a file at the root
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.join(os.path.realpath(folder), "")
        return self._stored(real_folder + name)

    def _stored(self, path: str) -> str:
        """``path``, once sure it can be stored: names are UTF-8 text in the state."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # the file system gave a name in another encoding
            raise _fail(
                self._where,
                "instances",
                f"the file name {os.fsencode(path)!r} is not valid UTF-8",
                "Rename the file (alma stores names as UTF-8 text).",
            ) from None
        return path


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
    resolve = _FileResolver(base, where)

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
            found = [
                (_spelt(m), real)
                for m in sorted(glob.glob(entry, root_dir=base, recursive=True))
                if (real := resolve(m)) is not None
            ]
            if not found:
                raise _fail(
                    where,
                    "instances",
                    f"pattern {entry!r} matches no file in {base}",
                    "Fix the pattern or remove it.",
                )
            for name, real in found:
                add(name, real)
        else:
            real = resolve(entry)
            if real is None:
                full = os.path.normpath(base / entry)
                raise _fail(
                    where,
                    "instances",
                    f"entry {i}, {entry!r}, is not a file (looked for {full})",
                    "Fix the path or remove the entry.",
                )
            add(entry, real)
    if not names:
        raise _fail(where, "instances", "the list is empty", "List at least one file.")
    return tuple(names), tuple(names.values())


def parse_options(where: str | Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the tunable fields given in ``data`` (files and :func:`alma.Experiment`
    alike) and fill in the defaults of the others: the keyword arguments of Options."""
    out: dict[str, Any] = {}
    for f in fields(Options):
        value = data.get(f.name, f.default)
        out[f.name] = f.metadata["check"](where, f.name, value)
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


def read_experiment(path: str | os.PathLike[str], *, import_run: bool = True) -> Spec:
    """Read and validate an ``.experiment`` file, its batch and its run module.

    ``import_run=False`` leaves the run module unimported (its code is hashed only): for
    reading results and progress, which must stay fast and work when the module's
    heavy imports are slow or missing. Such a Spec has ``run`` None and cannot run."""
    exp = Path(path).resolve()
    data = _read_json(exp, "experiment", Path.cwd())
    if "instances" in data and "load" not in data and "batch" not in data:
        raise _fail(
            exp,
            None,
            'this looks like a batch file (it lists "instances"), not an experiment',
            "Pass the .experiment file that names it.",
        )
    _check_keys(exp, data, EXPERIMENT_FIELDS)
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
    options = parse_options(exp, data)
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
    run = load_module_run(module, exp, options["params"]) if import_run else None
    state = _state_path(exp, data.get("state"), exp.with_name(exp.name + STATE_SUFFIX))
    try:
        code_hash = hash_bytes(module.read_bytes())
    except OSError:
        if import_run:
            raise
        code_hash = ""  # reading only: results stay readable without the module
    return Spec(
        name=exp.stem,
        run=run,
        instances=instances,
        paths=paths,
        state_path=state,
        code_hash=code_hash,
        source=exp,
        **options,
    )
