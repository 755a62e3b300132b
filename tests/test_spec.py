"""Experiment and batch files: the seed README flow, globs, and every bad input.

A bad input must surface as ConfigError naming the file and the field, before anything
is written: a user who mistyped a key must not find a half-created state file.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import listing, wait_until

import alma
import alma.experiment

CHECKPOINTING_RUN = """
import time

def run(instance, save_callback, state):
    step = 0 if state is None else state["step"]
    while step < 4:
        time.sleep(0.002)
        step += 1
        save_callback({"step": step})
    return {"path": instance, "steps": step}
"""


def test_seed_readme_flow_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original README, line by line: batch paths relative to the batch's folder."""
    exp_dir = tmp_path / "project"
    (exp_dir / "batches" / "data").mkdir(parents=True)
    names = [f"data/file{i}.txt" for i in range(1, 4)]
    for n in names:
        (exp_dir / "batches" / n).write_text(n)
    (exp_dir / "batches" / "example.batch").write_text(json.dumps({"instances": names}))
    (exp_dir / "example.py").write_text(textwrap.dedent(CHECKPOINTING_RUN))
    (exp_dir / "example.experiment").write_text(
        '{\n    "load": "example.py",\n\n    "workers": 3,\n\n    "iterations": 20,\n\n'
        '    "batch": "batches/example.batch"\n}\n'
    )
    monkeypatch.chdir(exp_dir)

    dispatcher = alma.experiment.load("example.experiment")
    assert isinstance(dispatcher, alma.Dispatcher)
    assert dispatcher.progress.total == 60 and dispatcher.progress.done == 0
    dispatcher.start()
    wait_until(lambda: dispatcher.progress.done >= 3, timeout=30)
    assert dispatcher.stop(timeout=10) is True
    assert not dispatcher.running
    done_at_stop = dispatcher.progress.done
    assert done_at_stop >= 3

    dispatcher = alma.experiment.load("example.experiment")
    assert dispatcher.progress.done == done_at_stop  # picked up from the state file
    dispatcher.start()
    assert dispatcher.join(timeout=60) is True
    assert dispatcher.finished

    results = dispatcher.results
    assert len(results) == 60
    assert set(results["instance"]) == set(names)  # as listed in the batch
    assert sorted(results.groupby("instance")["iteration"].apply(list).iloc[0]) == list(range(20))
    assert (results["status"] == "done").all()
    assert not results.duplicated(["instance", "iteration"]).any()
    expected = {n: str((exp_dir / "batches" / n).resolve()) for n in names}
    assert (results["path"] == results["instance"].map(expected)).all()
    assert (results["steps"] == 4).all()
    assert Path(dispatcher.state_path) == exp_dir / "example.experiment.sqlite"
    dispatcher.close()


def test_globs_expanded_sorted_and_duplicates_dropped(make_experiment, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for n in ("c.txt", "a.txt", "b.txt", "notes.csv"):
        (data / n).write_text(n)
    exp = make_experiment(instances=["data/b.txt", "data/*.txt", "data/a.txt", "data/*.t?t"])
    spec = alma.experiment.load(exp).spec
    assert spec.instances == ("data/b.txt", "data/a.txt", "data/c.txt")
    assert spec.paths == tuple(str((data / n).resolve()) for n in ("b.txt", "a.txt", "c.txt"))


def test_glob_in_a_subfolder_batch_is_relative_to_the_batch(tmp_path: Path) -> None:
    (tmp_path / "b" / "d").mkdir(parents=True)
    for n in ("2.txt", "10.txt", "1.txt"):
        (tmp_path / "b" / "d" / n).write_text(n)
    (tmp_path / "b" / "x.batch").write_text('{"instances": ["d/*.txt"]}')
    (tmp_path / "r.py").write_text("def run(instance):\n    return 0\n")
    (tmp_path / "e.experiment").write_text('{"load": "r.py", "batch": "b/x.batch"}')
    spec = alma.experiment.load(tmp_path / "e.experiment").spec
    assert spec.instances == ("d/1.txt", "d/10.txt", "d/2.txt")  # sorted as strings
    assert spec.iterations == 1 and spec.workers == 1 and spec.order == "round-robin"


# -- bad input: ConfigError naming file and field, nothing written ------------------------


def _edit_experiment(**changes: object) -> Callable[[Path], None]:
    def edit(exp: Path) -> None:
        data = json.loads(exp.read_text())
        for k, v in changes.items():
            if v is _DROP:
                data.pop(k)
            else:
                data[k] = v
        exp.write_text(json.dumps(data))

    return edit


_DROP = object()


def _write(relative: str, text: str) -> Callable[[Path], None]:
    def edit(exp: Path) -> None:
        (exp.parent / relative).write_text(text)

    return edit


def _remove(relative: str) -> Callable[[Path], None]:
    def edit(exp: Path) -> None:
        (exp.parent / relative).unlink()

    return edit


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "experiment missing": (_remove("example.experiment"), ["example.experiment", "not found"]),
    "bad JSON": (
        _write("example.experiment", '{"load": "example.py",\n "workers": 3,,\n}'),
        ["example.experiment", "line 2", "column 15", "An experiment file is one JSON object"],
    ),
    "a batch file given as the experiment": (
        _write("example.experiment", '{"instances": ["data/file0.txt"]}'),
        ["example.experiment", "looks like a batch file", "the .experiment file that names it"],
    ),
    "not an object": (_write("example.experiment", "[1, 2]"), ["example.experiment", "object"]),
    "unknown key": (
        _write(
            "example.experiment", '{"load": "example.py", "batch": "example.batch", "iteratons": 5}'
        ),
        ["example.experiment", "'iteratons'", "Did you mean 'iterations'"],
    ),
    "workers as string": (
        _edit_experiment(workers="3"),
        ["example.experiment", "'workers'", "'3'"],
    ),
    "iterations zero": (
        _edit_experiment(iterations=0),
        ["example.experiment", "'iterations'", "0"],
    ),
    "iterations float": (_edit_experiment(iterations=1.5), ["'iterations'", "1.5"]),
    "iterations bool": (_edit_experiment(iterations=True), ["'iterations'", "True"]),
    "retries negative": (_edit_experiment(retries=-1), ["example.experiment", "'retries'"]),
    "timeout negative": (_edit_experiment(timeout=-3), ["example.experiment", "'timeout'"]),
    "timeout NaN": (_edit_experiment(timeout=float("nan")), ["example.experiment", "'timeout'"]),
    "timeout infinite": (
        _edit_experiment(timeout=float("inf")),
        ["example.experiment", "'timeout'", "inf"],
    ),
    "order misspelt": (
        _edit_experiment(order="instnce"),
        ["example.experiment", "'order'", "Did you mean 'instance'"],
    ),
    "executor unknown": (_edit_experiment(executor="trheads"), ["'executor'", "trheads"]),
    "executor near miss": (
        _edit_experiment(executor="process"),
        ["example.experiment", "'executor'", "Did you mean 'processes'"],
    ),
    "load missing": (_edit_experiment(load=_DROP), ["example.experiment", "'load'"]),
    "load not a string": (_edit_experiment(load=3), ["example.experiment", "'load'"]),
    "batch missing": (_edit_experiment(batch=_DROP), ["example.experiment", "'batch'"]),
    "batch file missing": (
        _edit_experiment(batch="nope.batch"),
        ["example.experiment", "'batch'", "nope.batch"],
    ),
    "batch bad JSON": (
        _write("example.batch", '{"instances": [}'),
        ["example.batch", "line 1", "A batch file is one JSON object"],
    ),
    "batch unknown key": (
        _write("example.batch", '{"instance": ["data/file0.txt"]}'),
        ["example.batch", "'instance'", "Did you mean 'instances'"],
    ),
    "batch instances not a list": (
        _write("example.batch", '{"instances": "data/file0.txt"}'),
        ["example.batch", "'instances'"],
    ),
    "batch empty": (_write("example.batch", '{"instances": []}'), ["example.batch", "'instances'"]),
    "glob matches nothing": (
        _write("example.batch", '{"instances": ["data/file0.txt", "data/*.csv"]}'),
        ["example.batch", "'instances'", "data/*.csv"],
    ),
    "instance file missing": (
        _write("example.batch", '{"instances": ["data/file0.txt", "data/gone.txt"]}'),
        ["example.batch", "'instances'", "data/gone.txt"],
    ),
    "run module missing": (
        _edit_experiment(load="nope.py"),
        ["example.experiment", "'load'", "nope.py"],
    ),
    "no run()": (_write("example.py", "def go(instance):\n    pass\n"), ["example.py", "run"]),
    "run not callable": (_write("example.py", "run = 3\n"), ["example.py", "run"]),
    "import error": (
        _write("example.py", "import alma_no_such_module_xyz\n"),
        ["example.experiment", "'load'", "ModuleNotFoundError", "alma_no_such_module_xyz"],
    ),
    "syntax error": (
        _write("example.py", "def run(instance:\n"),
        ["example.experiment", "'load'", "SyntaxError"],
    ),
    "run needs an extra parameter": (
        _write("example.py", "def run(instance, save_callback, state, config):\n    pass\n"),
        ["example.py", "'config'"],
    ),
    "run needs an extra keyword-only parameter": (
        _write("example.py", "def run(instance, *, scale):\n    pass\n"),
        ["example.py", "'scale'"],
    ),
    "state folder missing": (
        _edit_experiment(state="nofolder/x.sqlite"),
        ["example.experiment", "'state'", "nofolder"],
    ),
    "state not a string": (_edit_experiment(state=5), ["example.experiment", "'state'"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_config_error_and_writes_nothing(
    case: str, make_experiment, tmp_path: Path
) -> None:
    exp = make_experiment()
    edit, needles = BAD_INPUTS[case]
    edit(exp)
    before = _listing(tmp_path)
    with pytest.raises(alma.ConfigError) as info:
        alma.experiment.load(exp)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert _listing(tmp_path) == before
    assert not list(tmp_path.rglob("*.sqlite*")) and not list(tmp_path.rglob("*.lock"))


def test_missing_instance_shows_the_normalised_path(make_experiment, tmp_path: Path) -> None:
    exp = make_experiment(instances=["p/../../data/t0.csv"])
    with pytest.raises(alma.ConfigError) as info:
        alma.experiment.load(exp)
    assert f"(looked for {tmp_path.parent / 'data' / 't0.csv'})" in str(info.value)


def test_missing_experiment_names_the_current_folder_and_suggests_files(
    make_experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_experiment(folder="proj")
    for n in ("b", "c", "d", "e", "f", "g"):
        (tmp_path / "proj" / f"{n}.experiment").write_text("{}")
    monkeypatch.chdir(tmp_path)  # a typed path is relative to the cwd, not to its folder
    with pytest.raises(alma.ConfigError) as info:
        alma.experiment.load("proj/exmaple.experiment")
    message = str(info.value)
    assert f"resolved against {tmp_path})" in message
    # the first five, sorted; the sixth is left out
    assert "b.experiment, c.experiment, d.experiment, e.experiment, example.experiment." in message
    assert "f.experiment" not in message
    with pytest.raises(alma.ConfigError) as info:
        alma.experiment.load("nowhere/x.experiment")
    assert "Experiment files" not in str(info.value)


def test_missing_batch_or_module_names_the_experiment_folder(
    make_experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = make_experiment(folder="proj")
    monkeypatch.chdir(tmp_path)
    _edit_experiment(batch="nope.batch")(exp)
    with pytest.raises(alma.ConfigError, match="relative to the experiment's folder") as info:
        alma.experiment.load(exp)
    assert f"({tmp_path / 'proj'})" in str(info.value)
    _edit_experiment(batch="example.batch", load="nope.py")(exp)
    with pytest.raises(alma.ConfigError, match="relative to the experiment's folder") as info:
        alma.experiment.load(exp)
    assert f"({tmp_path / 'proj'})" in str(info.value)

    def run(instance):
        return 1

    with pytest.raises(alma.ConfigError) as info:  # Experiment(batch=...) is cwd-relative
        alma.Experiment(run, batch="proj/nope.batch", state=tmp_path / "s.sqlite")
    assert f"resolved against {tmp_path})" in str(info.value)


def _listing(folder: Path) -> dict[str, bytes]:
    # Python's own bytecode cache is not alma writing: leave __pycache__ out.
    return {k: v for k, v in listing(folder).items() if "__pycache__" not in k}


def test_config_error_is_a_value_error_and_alma_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        alma.experiment.load(tmp_path / "nothing.experiment")
    with pytest.raises(alma.AlmaError):
        alma.experiment.load(tmp_path / "nothing.experiment")


def test_programmatic_experiment_validates_too(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    before = _listing(tmp_path)

    def run(instance):
        return 1

    with pytest.raises(alma.ConfigError, match="iterations"):
        alma.Experiment(run, [tmp_path / "a.txt"], iterations=0, state=tmp_path / "s.sqlite")
    with pytest.raises(alma.ConfigError, match="instances"):
        alma.Experiment(run, [tmp_path / "missing.txt"], state=tmp_path / "s.sqlite")
    with pytest.raises(alma.ConfigError, match="state"):
        alma.Experiment(run, [tmp_path / "a.txt"], state=tmp_path / "no" / "s.sqlite")
    with pytest.raises(alma.ConfigError, match="run"):
        alma.Experiment("not a function", [tmp_path / "a.txt"], state=tmp_path / "s.sqlite")

    def needs_more(instance, save_callback, state, config):
        return 1

    with pytest.raises(alma.ConfigError, match="config"):
        alma.Experiment(needs_more, [tmp_path / "a.txt"], state=tmp_path / "s.sqlite")
    assert _listing(tmp_path) == before


def test_the_same_file_under_two_spellings_is_one_instance(make_experiment, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for n in ("a.txt", "b.txt"):
        (data / n).write_text(n)
    exp = make_experiment(
        instances=["data/a.txt", "./data/a.txt", "data/../data/a.txt", "./data/*.txt"]
    )
    spec = alma.experiment.load(exp).spec
    assert spec.instances == ("data/a.txt", "data/b.txt")
    assert spec.paths == (str(data / "a.txt"), str(data / "b.txt"))


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["data/*.txt"], ["data/a.txt", "data/b.txt", "data/c.txt"]),
        (["data/c.txt", "data/*.txt", "data/a.txt"], ["data/c.txt", "data/a.txt", "data/b.txt"]),
        (["data/**/*.txt"], ["data/a.txt", "data/b.txt", "data/c.txt", "data/sub/d.txt"]),
        (["data/[ab].txt", "data/?.txt"], ["data/a.txt", "data/b.txt", "data/c.txt"]),
    ],
)
def test_glob_table_of_the_batch_docs(
    entries: list[str], expected: list[str], make_experiment, tmp_path: Path
) -> None:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    for n in ("a.txt", "b.txt", "c.txt", "sub/d.txt", ".hidden.txt"):
        (tmp_path / "data" / n).write_text(n)
    (tmp_path / "data" / "folder.txt").mkdir()  # a folder matching a pattern is skipped
    exp = make_experiment(instances=entries)
    assert list(alma.experiment.load(exp).spec.instances) == expected


def test_programmatic_experiment_with_globs_or_a_batch(
    make_experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_experiment(instances=3, folder="proj")  # proj/data/file{0,1,2}.txt, proj/example.batch
    monkeypatch.chdir(tmp_path / "proj")

    def run(instance):
        return 1

    by_glob = alma.Experiment(run, ["data/*.txt"], state=tmp_path / "a.sqlite")
    assert by_glob.spec.instances == ("data/file0.txt", "data/file1.txt", "data/file2.txt")
    monkeypatch.chdir(tmp_path)  # a batch resolves against its own folder, not the cwd
    by_batch = alma.Experiment(run, batch="proj/example.batch", state=tmp_path / "b.sqlite")
    assert by_batch.spec.paths == by_glob.spec.paths
    assert by_batch.spec.name == "run"  # named after the function by default
    with pytest.raises(alma.ConfigError, match="exactly one"):
        alma.Experiment(run, ["proj/data/*.txt"], batch="proj/example.batch")
    assert not (tmp_path / "run.sqlite").exists()
