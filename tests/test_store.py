"""The SQLite state file: where it lives, what alma refuses, readers, plan changes, scale.

A state file alma cannot use must be refused with StateError and left byte-identical:
it may hold days of results that a user can still rescue.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import alma_cli, listing, python_env, wait_until

import alma
import alma.experiment
from alma.store import Store

SQLITE_MAGIC = b"SQLite format 3\x00"


def _run_to_end(exp: Path) -> alma.Dispatcher:
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60)
    d.close()
    return d


def _fold_wal(state: Path) -> None:
    """Fold the WAL into the main file and drop it, so the file alone is the state."""
    db = sqlite3.connect(state)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    assert not state.with_name(state.name + "-wal").exists()


def _no_pycache(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in listing(folder).items() if "__pycache__" not in k}


def test_default_state_path_next_to_the_experiment(make_experiment, tmp_path: Path) -> None:
    exp = make_experiment(folder="sub")
    d = alma.experiment.load(exp)
    assert Path(d.state_path) == tmp_path / "sub" / "example.experiment.sqlite"
    assert not Path(d.state_path).exists()  # load() writes nothing
    _run_to_end(exp)
    assert Path(d.state_path).read_bytes()[:16] == SQLITE_MAGIC


def test_state_field_overrides_the_path(make_experiment, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    exp = make_experiment(state="out/mine.db")
    d = _run_to_end(exp)
    assert Path(d.state_path) == tmp_path / "out" / "mine.db"
    assert (tmp_path / "out" / "mine.db").read_bytes()[:16] == SQLITE_MAGIC
    assert not (tmp_path / "example.experiment.sqlite").exists()
    assert len(alma.experiment.load(exp).results) == 6


def test_after_a_session_the_state_file_alone_holds_everything(
    make_experiment, tmp_path: Path
) -> None:
    """Users copy ``example.experiment.sqlite`` around: once a session ended, that one
    file must hold every result, without its ``-wal`` companion."""
    exp = make_experiment(iterations=50)
    out = alma_cli("run", "-q", exp)
    assert out.returncode == 0, out.stderr
    wal = tmp_path / "example.experiment.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # emptied, not left at full size
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copy(tmp_path / "example.experiment.sqlite", copy / "example.experiment.sqlite")
    db = sqlite3.connect(copy / "example.experiment.sqlite")
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 150
    db.close()


def test_results_are_json_not_pickles(make_experiment) -> None:
    exp = make_experiment("def run(instance):\n    return {'a': [1, 2], 'b': 'x'}\n")
    d = _run_to_end(exp)
    db = sqlite3.connect(f"file:{d.state_path}?mode=ro", uri=True)
    values = [json.loads(r) for (r,) in db.execute("SELECT result FROM runs")]
    db.close()
    assert values == [{"a": [1, 2], "b": "x"}] * 6


# -- refused state files ----------------------------------------------------------------


def _corrupt_middle(state: Path) -> None:
    size = state.stat().st_size
    with state.open("r+b") as f:
        f.seek(size // 2)
        f.write(random.Random(0).randbytes(3000))


def _truncate(state: Path) -> None:
    with state.open("r+b") as f:
        f.truncate(state.stat().st_size // 2)


def _foreign_sqlite(state: Path) -> None:
    state.unlink()
    db = sqlite3.connect(state)
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('experiment', 'example')")
    db.commit()
    db.close()


def _text_file(state: Path) -> None:
    state.write_text("these are my notes, not a database\n" * 50)


def _other_experiment(state: Path) -> None:
    # The state of an experiment named "other", copied over this one's.
    other = state.parent / "other.experiment"
    other.write_text(
        json.dumps({"load": "example.py", "batch": "example.batch", "state": "o.sqlite"})
    )
    _run_to_end(other)
    _fold_wal(state.parent / "o.sqlite")
    shutil.copy(state.parent / "o.sqlite", state)


def _newer_schema(state: Path) -> None:
    db = sqlite3.connect(state)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()


REFUSED = {
    "written by a newer alma": (_newer_schema, "newer alma"),
    "not SQLite": (_text_file, "not"),
    "SQLite of another program": (_foreign_sqlite, "another program"),
    "truncated": (_truncate, "corrupt"),
    "corrupt pages": (_corrupt_middle, "corrupt"),
    "another experiment": (_other_experiment, "'other'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unusable_state_is_refused_and_left_identical(
    case: str, make_experiment, tmp_path: Path
) -> None:
    exp = make_experiment(
        "def run(instance, iteration):\n    return {'i': iteration, 'pad': 'p' * 300}\n",
        iterations=100,
    )
    state = tmp_path / "example.experiment.sqlite"
    _run_to_end(exp)
    _fold_wal(state)
    spoil, needle = REFUSED[case]
    spoil(state)
    before = _no_pycache(tmp_path)
    with pytest.raises(alma.StateError) as info:
        d = alma.experiment.load(exp)
        # Damage deep in the file may only show when read: reading must refuse too.
        d.progress  # noqa: B018
        d.results  # noqa: B018
        d.start()
    message = str(info.value)
    assert str(state) in message and needle in message
    assert "will not overwrite" in message
    assert _no_pycache(tmp_path) == before


def test_an_empty_state_file_is_a_new_state(make_experiment, tmp_path: Path) -> None:
    """An empty file (e.g. from ``touch``) holds nothing to lose: alma uses it."""
    exp = make_experiment()
    state = tmp_path / "example.experiment.sqlite"
    state.touch()
    d = _run_to_end(exp)
    assert d.progress.done == 6
    assert state.read_bytes()[:16] == SQLITE_MAGIC


def test_state_error_is_an_alma_error() -> None:
    assert issubclass(alma.StateError, alma.AlmaError)


# -- reading while running ---------------------------------------------------------------

READER = """
import json, sys
import alma.experiment
d = alma.experiment.load(sys.argv[1])
r = d.results
print(json.dumps({"done": d.progress.done, "rows": len(r),
                  "iterations": sorted(r["iteration"].tolist())}))
"""


def test_results_readable_from_another_process_while_running(
    make_experiment, tmp_path: Path, dispatchers
) -> None:
    release = tmp_path / "release"
    exp = make_experiment(
        "import os, time\n"
        "def run(instance, iteration):\n"
        "    if iteration == 2:\n"
        "        deadline = time.monotonic() + 30\n"
        f"        while not os.path.exists({str(release)!r}) and time.monotonic() < deadline:\n"
        "            time.sleep(0.01)\n"
        "    return iteration\n",
        instances=1,
        iterations=3,
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    try:
        wait_until(lambda: d.progress.done == 2)
        assert d.running
        out = subprocess.run(
            [sys.executable, "-c", READER, str(exp)],
            capture_output=True,
            text=True,
            timeout=60,
            env=python_env(),
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"done": 2, "rows": 2, "iterations": [0, 1]}
    finally:
        release.touch()
    assert d.join(timeout=30)


# -- changing the experiment between sessions ---------------------------------------------


def test_more_iterations_and_new_instances_extend_the_plan(make_experiment, tmp_path) -> None:
    log = tmp_path / "calls.log"
    source = (
        "import os\n"
        "def run(instance, iteration):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(f'{os.path.basename(instance)} {iteration}\\n')\n"
        "    return iteration\n"
    )
    exp = make_experiment(source, instances=2, iterations=2)
    _run_to_end(exp)
    (tmp_path / "data" / "file2.txt").write_text("new")
    (tmp_path / "example.batch").write_text(
        json.dumps({"instances": ["data/file1.txt", "data/file2.txt"]})  # file0 removed
    )
    data = json.loads(exp.read_text())
    exp.write_text(json.dumps({**data, "iterations": 3}))
    log.write_text("")

    d = alma.experiment.load(exp)
    p = d.progress
    assert (p.total, p.done, p.pending) == (6, 2, 4)
    assert d.state["instance"].tolist() == ["data/file1.txt", "data/file2.txt"]
    d.start()
    assert d.join(timeout=30)
    d.close()
    assert sorted(log.read_text().splitlines()) == [
        "file1.txt 2",
        "file2.txt 0",
        "file2.txt 1",
        "file2.txt 2",
    ]
    r = d.results
    assert len(r) == 8  # file0's two runs are kept
    assert sorted(r[r["instance"] == "data/file0.txt"]["iteration"]) == [0, 1]
    assert d.progress.done == 6 and d.finished


def test_fewer_iterations_shrink_the_plan_but_keep_results(make_experiment) -> None:
    exp = make_experiment(instances=2, iterations=3)
    _run_to_end(exp)
    data = json.loads(exp.read_text())
    exp.write_text(json.dumps({**data, "iterations": 1}))
    d = alma.experiment.load(exp)
    assert (d.progress.total, d.progress.done, d.progress.pending) == (2, 2, 0)
    assert d.finished and len(d.results) == 6


def test_code_hash_recorded_and_change_warned(make_experiment, tmp_path: Path) -> None:
    exp = make_experiment("def run(instance):\n    return 1\n", instances=1, iterations=1)
    d1 = _run_to_end(exp)
    old = d1.spec.code_hash
    assert d1.results["code"].tolist() == [old]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged code: no warning
        alma.experiment.load(exp)

    (tmp_path / "example.py").write_text("def run(instance):\n    return 2  # fixed\n")
    data = json.loads(exp.read_text())
    exp.write_text(json.dumps({**data, "iterations": 2}))
    with pytest.warns(UserWarning, match="code changed") as record:
        d2 = alma.experiment.load(exp)
    assert old in str(record[0].message) and d2.spec.code_hash in str(record[0].message)
    assert d2.spec.code_hash != old
    d2.start()
    assert d2.join(timeout=30)
    r = d2.results.sort_values("iteration")
    assert r["code"].tolist() == [old, d2.spec.code_hash]
    assert r["result"].tolist() == [1, 2]


def test_reset_forgets_all_or_only_failed(make_experiment, tmp_path: Path) -> None:
    exp = make_experiment(
        "def run(instance, iteration):\n"
        "    if iteration:\n"
        "        raise ValueError('x')\n"
        "    return 0\n",
        instances=2,
        iterations=2,
    )
    d = _run_to_end(exp)
    assert (d.progress.done, d.progress.failed) == (2, 2)
    assert d.reset(failed_only=True) == 2
    assert (d.progress.done, d.progress.failed, d.progress.pending) == (2, 0, 2)
    assert d.reset() == 2
    assert (d.progress.done, d.progress.pending) == (0, 4)
    assert d.results.empty


# -- scale --------------------------------------------------------------------------------


def test_plan_is_not_materialised(tmp_path: Path, dispatchers) -> None:
    """A million planned runs cost nothing until they run: rows exist only for finished
    runs."""
    files = []
    for i in range(1000):
        f = tmp_path / f"f{i:04d}.txt"
        f.write_text("x")
        files.append(f)
    gate: list[int] = []

    def run(instance):
        gate.append(1)

    d = alma.Experiment(run, files, iterations=1000, state=tmp_path / "big.sqlite")
    dispatchers.append(d)
    assert d.progress.total == 1_000_000
    d.start()
    wait_until(lambda: d.progress.done >= 50)
    assert d.stop(timeout=10)
    done = d.progress.done
    assert d.progress.pending == 1_000_000 - done
    db = sqlite3.connect(f"file:{d.state_path}?mode=ro", uri=True)
    tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    counts = {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
    db.close()
    assert counts["runs"] == done
    assert max(counts.values()) <= max(done, 1000)  # nothing per pending run
    # About 80 bytes per finished run; a row per planned run would be 10 MB or more.
    assert os.path.getsize(d.state_path) < 1_000_000 + 100 * done


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_million_finished_runs_load_and_count(make_experiment, tmp_path: Path) -> None:
    exp = make_experiment(instances=100, iterations=10_000)
    spec = alma.experiment.load(exp).spec
    store = Store(spec.state_path, spec.name)
    ids, configs = store.open_writer(
        spec.instances, spec.paths, spec.params, spec.iterations, spec.code_hash
    )
    cid = configs["{}"]
    rows = [
        (ids[name], cid, it, "done", "1", None, None, 1, 0.0, 1.7e9, spec.code_hash, it, 0)
        for name in spec.instances
        for it in range(spec.iterations)
    ]
    for start in range(0, len(rows), 100_000):
        store.write(rows[start : start + 100_000], [], [])
    store.close()
    del rows

    d = alma.experiment.load(exp)
    p = d.progress
    assert (p.total, p.done, p.failed, p.running, p.pending) == (1_000_000, 1_000_000, 0, 0, 0)
    assert p.status == "finished" and d.finished
    assert (d.state["done"] == 10_000).all()
    d.start()  # nothing owed: returns at once, runs nothing
    assert d.join(timeout=30)
    assert d.progress.done == 1_000_000
    r = d.results
    assert len(r) == 1_000_000 and (r["result"] == 1).all()
    d.close()


def test_results_whose_type_changes_between_rows_are_kept(make_experiment) -> None:
    exp = make_experiment(
        "def run(instance, save_callback, state, iteration):\n"
        "    return 'text' if iteration else 3\n",
        instances=2,
        iterations=2,
    )
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60)
    assert sorted(map(str, d.results["result"])) == ["3", "3", "text", "text"]
    d.close()


RESULT_SHAPES = """
def run(instance, save_callback, state, iteration, a):
    if iteration == 1 and a == 2:
        raise ValueError("odd\\nsecond line \\\\ with a backslash and a \\"quote\\"")
    out = {"x": iteration * a, "label": f"{a}-{iteration} ∂", "flag": iteration == 0,
           "nested": {"k": [iteration, 2]}, "none": None}
    if iteration:
        out["extra"] = 0.5
    return out
"""


def test_arrow_and_json_decode_results_to_the_same_frame(
    make_experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow types the results; json decodes what it cannot: both ways give one
    frame (columns, order, values, types, missing values), with a grid, failed runs,
    text with escapes, nested values, booleans and keys some rows lack."""
    import pandas as pd

    import alma.frames

    exp = make_experiment(RESULT_SHAPES, instances=3, iterations=3, params={"a": [1, 2]})
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60)
    typed: list[object] = []
    real = alma.frames._docs_of

    def docs_of(chunks: list[alma.frames.Chunk]) -> object:
        typed.append(real(chunks))
        return typed[-1]

    monkeypatch.setattr(alma.frames, "_docs_of", docs_of)
    arrow = alma.experiment.load(exp, readonly=True).results
    assert typed and typed[0] is not None  # Arrow typed them all
    monkeypatch.setattr(alma.frames, "_docs_of", lambda chunks: None)
    exact = alma.experiment.load(exp, readonly=True).results
    d.close()
    assert len(arrow) == 18 and (arrow["status"] == "failed").sum() == 3
    pd.testing.assert_frame_equal(arrow, exact)
    failed = arrow[arrow["status"] == "failed"]
    assert (
        failed["error"].tolist()
        == ['ValueError: odd\nsecond line \\ with a backslash and a "quote"'] * 3
    )
    assert failed["traceback"].str.contains("raise ValueError").all()
    done = arrow[arrow["status"] == "done"]
    assert done["label"].str.endswith("∂").all() and done["flag"].dtype == object
    assert done["nested"].iloc[0] == {"k": [0, 2]} and done["none"].isna().all()
    assert arrow["error"].isna().sum() == 15 and arrow["extra"].isna().sum() == 9


@pytest.mark.parametrize(
    "value",
    ["{'when': '2026-01-01'}", "{'v': [iteration, 0.5]}", "[1, 0.5]", "'x' if iteration else 1"],
    ids=["date text", "list of int and float", "list result", "type changes"],
)
def test_results_arrow_would_change_are_decoded_by_json(make_experiment, value: str) -> None:
    import json

    exp = make_experiment(
        f"def run(instance, save_callback, state, iteration):\n    return {value}\n",
        instances=2,
        iterations=2,
    )
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60)
    r = d.results
    d.close()
    expected = eval(value.replace("iteration", "1"))  # the test's own text
    got = r.iloc[-1]["result"] if "result" in r else r.iloc[-1][list(expected)].to_dict()
    assert json.dumps(got) == json.dumps(expected)
