"""The shape of the package, held by tests: imports point one way, defaults live once.

The import graph is read from the source (every ``import`` statement, at module level
or inside functions, except those under ``if TYPE_CHECKING:``, which are for type
checkers only), so a lazy import that closes a cycle is caught as well as an eager one.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ExperimentFactory, python_env

import alma
import alma.executors
import alma.experiment
from alma.dispatcher import Dispatcher
from alma.executors import Executor, ExecutorChoice, RunSource
from alma.records import NO_PARAMS
from alma.spec import EXPERIMENT_FIELDS, OPTION_FIELDS, Options, Spec

PACKAGE = Path(alma.__file__).parent
#: The front-ends: they may import the engine, never the other way round.
FRONT_ENDS = ("alma.notebook", "alma.cli", "alma.__main__")
#: The one place the engine reaches a front-end (documented in Dispatcher).
SEAM = ("alma.dispatcher", "_repr_mimebundle_", "alma.notebook")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, str]]:
    """(imported alma module, enclosing function or '') for every import in ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub, function)
                continue
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = function or child.name
            if isinstance(child, ast.Import):
                found.extend((a.name, function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py")
                    is_package = PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
                    found.append(
                        (sub if is_module.exists() or is_package.exists() else base, function)
                    )
            visit(child, inner)

    visit(tree, "")
    return [(m, f) for m, f in found if m == "alma" or m.startswith("alma.")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        edges = graph.setdefault(name, set())
        for target, function in _imports(path):
            if (name, function, target) == SEAM:
                continue
            if target != name:
                edges.add(target)
    # Executors registered by "module:Class" are imported by name, on first use.
    for cls in alma.executors._BUILTIN.values():
        graph["alma.executors"].add(cls.partition(":")[0])
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_among_alma_modules() -> None:
    graph = _graph()
    assert "alma.session" in graph and "alma.runfunc" in graph  # the graph is real
    assert _cycles(graph) == []


def test_the_cycle_detector_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_reaches_front_ends_only_through_the_documented_seam() -> None:
    crossings = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name == "alma" or name.startswith(FRONT_ENDS):
            continue  # the package's front door and the front-ends themselves
        for target, function in _imports(path):
            if target.startswith(FRONT_ENDS):
                crossings.append((name, function, target))
    assert crossings == [SEAM]


def test_leaf_modules_import_no_other_part_of_alma() -> None:
    """records and errors are shared by everything, workers included; runfunc (what
    workers need to call run()) adds only them."""
    graph = _graph()
    assert graph["alma.records"] == set()
    assert graph["alma.errors"] == set()
    assert graph["alma.runfunc"] <= {"alma.errors", "alma.records"}


# -- defaults in one place -------------------------------------------------------------


def test_experiment_keywords_are_the_declared_options_with_their_defaults() -> None:
    params = inspect.signature(alma.Experiment).parameters
    for f in dataclasses.fields(Options):
        assert f.name in params, f"alma.Experiment lacks {f.name}="
        default = params[f.name].default
        declared = f.default.name if isinstance(f.default, ExecutorChoice) else f.default
        if declared == (NO_PARAMS,):
            declared = None  # no "params": the one empty configuration
        assert default == declared, f.name
    assert set(EXPERIMENT_FIELDS) == {"load", "batch", "state", *OPTION_FIELDS}


def test_a_spec_built_with_the_defaults_runs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    spec = Spec(
        name="plain",
        run=lambda instance, save_callback, state: 1,
        instances=("a.txt",),
        paths=(str(tmp_path / "a.txt"),),
        state_path=tmp_path / "plain.sqlite",
    )
    assert spec.executor == ExecutorChoice("threads") and spec.iterations == 1
    with Dispatcher(spec) as d:
        d.start()
        assert d.join(timeout=30)
        assert d.results["result"].tolist() == [1]


# -- the executor registry is open -------------------------------------------------------


class _Recorder(Executor):
    usage = '{"recorder": "<label>"}'

    @classmethod
    def parse_options(cls, options: object) -> object:
        if not isinstance(options, str):
            raise ValueError("the recorder needs a label")
        return options.upper()

    def start(self, source: RunSource) -> None:
        source.executor_done()


def test_register_makes_a_name_usable_and_validates_through_the_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alma.executors, "_REGISTRY", dict(alma.executors._REGISTRY))
    alma.executors.register("recorder", _Recorder)
    assert "recorder" in alma.executors.names()
    assert alma.executors.parse({"recorder": "x"}, "here") == ExecutorChoice("recorder", "X")
    with pytest.raises(alma.ConfigError, match=r"here, field 'executor'.*needs a label"):
        alma.executors.parse("recorder", "here")
    with pytest.raises(alma.ConfigError, match=r"expected one of \[.*'recorder'.*\]"):
        alma.executors.parse("nope", "here")
    with pytest.raises(TypeError):
        alma.executors.register("bad", object)  # type: ignore[arg-type]


def test_an_installed_package_provides_an_executor_to_alma_run(
    make_experiment: ExperimentFactory, tmp_path: Path
) -> None:
    """A package declaring ``[project.entry-points."alma.executors"]`` needs no register
    call: ``alma run`` (a fresh process) finds its executor by name."""
    site = tmp_path / "site"
    (site / "almapool-1.0.dist-info").mkdir(parents=True)
    (site / "almapool-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: almapool\nVersion: 1.0\n"
    )
    (site / "almapool-1.0.dist-info" / "entry_points.txt").write_text(
        "[alma.executors]\npool = almapool:PoolExecutor\n"
    )
    (site / "almapool.py").write_text(
        "from alma.executors.threads import ThreadExecutor\n\n"
        "class PoolExecutor(ThreadExecutor):\n"
        "    usage = '\"pool\"'\n"
    )
    exp = make_experiment(instances=2, iterations=2, executor="pool")
    env = python_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    done = subprocess.run(
        [sys.executable, "-m", "alma", "run", str(exp)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert "4 of 4" in done.stdout + done.stderr
    # Without the package, the name is unknown and the message lists the known ones.
    done = subprocess.run(
        [sys.executable, "-m", "alma", "run", str(exp)],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
        stdin=subprocess.DEVNULL,
    )
    assert (
        done.returncode == 2
        and "expected one of ['dask', 'processes', 'slurm', 'threads']" in done.stderr
    )
