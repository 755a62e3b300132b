"""The state file across releases (migrations from every earlier schema, tested on
files the earlier releases wrote) and the results frame a reader keeps and extends."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pytest
from helpers import ExperimentFactory

import alma.experiment
import alma.frames
from alma.store import SCHEMA_VERSION, Store

FIXTURES = Path(__file__).parent / "fixtures"


class Old(NamedTuple):
    """A state file an earlier schema wrote (tests/fixtures/<name>/README.md), and
    what it holds."""

    name: str
    version: int
    run: str  # the run module's source, deterministic (and returning its state)
    progress: tuple[int, int, int]  # total, done, failed
    error: str  # of its one failed run
    key: list[str]  # the columns that name a run
    resumed: dict[str, Any]  # the run that had saved a checkpoint
    after: tuple[int, int]  # rows and done runs once resumed

    def copy(self, tmp_path: Path) -> Path:
        folder = tmp_path / self.name
        shutil.copytree(FIXTURES / self.name, folder)
        (folder / "search.py").write_text(textwrap.dedent(self.run))
        return folder / "search.experiment"


OLD = [
    Old(
        "v01",
        1,
        """
        import os

        def run(instance, save_callback, state):
            return {'score': len(os.path.basename(instance)) * 10 + 1, 'resumed': state}
        """,
        (9, 6, 1),
        "ValueError: g2 is odd at iteration 1",
        ["instance", "iteration"],
        {"instance": "data/g1.txt", "iteration": 2},
        (9, 8),
    ),
    Old(
        "v02",
        2,
        """
        import os

        def run(instance, save_callback, state, iteration, k):
            return {'score': len(os.path.basename(instance)) * 10 + k, 'resumed': state}
        """,
        (8, 4, 1),
        "ValueError: g2.txt is odd at k=2",
        ["instance", "k", "iteration"],
        {"instance": "data/g1.txt", "k": 2, "iteration": 1},
        (8, 7),
    ),
]


@pytest.fixture(params=OLD, ids=[f"schema {o.version}" for o in OLD])
def old(request: pytest.FixtureRequest) -> Old:
    return request.param  # type: ignore[no-any-return]


def _version(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(state)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_an_old_file_is_read_without_being_changed(old: Old, tmp_path: Path) -> None:
    exp = old.copy(tmp_path)
    state = exp.with_name("search.experiment.sqlite")
    before = state.read_bytes()
    with pytest.warns(UserWarning, match="run code changed"):
        d = alma.experiment.load(exp, readonly=True)
    p = d.progress
    assert (p.total, p.done, p.failed) == old.progress
    r = d.results
    assert len(r) == sum(old.progress[1:]) and r["seed"].notna().all()
    assert r.loc[r["status"] == "failed", "error"].item() == old.error
    assert len(d.results) == len(r)  # read again: whole again (no commit numbers)
    d.close()
    assert state.read_bytes() == before and _version(state) == old.version


def test_an_old_file_is_migrated_and_resumed(old: Old, tmp_path: Path) -> None:
    exp = old.copy(tmp_path)
    state = exp.with_name("search.experiment.sqlite")
    with pytest.warns(UserWarning, match="run code changed"):
        before = alma.experiment.load(exp, readonly=True).results
    with pytest.warns(UserWarning, match="run code changed"):
        d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60) is True
    assert _version(state) == SCHEMA_VERSION
    Store(state, "search").validate()  # the migrated file holds only alma's own objects
    r = d.results
    assert (len(r), (r["status"] == "done").sum()) == old.after  # failed stays failed
    kept = r.merge(before, on=old.key, suffixes=("", "_old"))
    assert len(kept) == len(before) and (kept["seed"] == kept["seed_old"]).all()
    assert (kept["finished"] == kept["finished_old"]).all()  # not re-run
    resumed = r[(r[list(old.resumed)] == pd.Series(old.resumed)).all(axis=1)]
    assert resumed["resumed"].item() == {"step": 1}  # its checkpoint was handed back
    d.close()


@pytest.mark.parametrize(
    ("old", "step"),
    [(OLD[0], "_migrate_from_1"), (OLD[0], "_migrate_from_2"), (OLD[1], "_migrate_from_2")],
    ids=["schema 1, step 1", "schema 1, step 2", "schema 2"],
)
def test_a_crash_during_a_migration_leaves_the_old_file_usable(
    old: Old, step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = old.copy(tmp_path)
    state = exp.with_name("search.experiment.sqlite")
    real = getattr(Store, step)

    def crash(self: Store, db: sqlite3.Connection) -> None:
        real(self, db)  # every statement done, the transaction not committed yet
        raise OSError("power cut")

    monkeypatch.setattr(Store, step, crash)
    with pytest.warns(UserWarning):
        d = alma.experiment.load(exp)
    with pytest.raises(OSError, match="power cut"):
        d.start()
    assert _version(state) == old.version
    assert not d.running
    monkeypatch.setattr(Store, step, real)
    with pytest.warns(UserWarning):
        d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60) is True and len(d.results) == old.after[0]
    d.close()


def test_a_new_and_a_migrated_file_hold_the_same_definitions(
    old: Old, tmp_path: Path, make_experiment: ExperimentFactory
) -> None:
    exp = make_experiment(params={"k": [1, 2]})
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60) is True
    d.close()
    migrated = old.copy(tmp_path)
    with pytest.warns(UserWarning):
        m = alma.experiment.load(migrated)
    m.start()
    assert m.join(timeout=60) is True
    m.close()

    def definitions(state: Path) -> set[tuple[str, str]]:
        with contextlib.closing(sqlite3.connect(state)) as db:
            return set(db.execute("SELECT name, sql FROM sqlite_master"))

    fresh = definitions(exp.with_name("example.experiment.sqlite"))
    assert definitions(migrated.with_name("search.experiment.sqlite")) == fresh
    assert any(name == "runs_seq" for name, _ in fresh)


# -- the results a reader keeps ---------------------------------------------------------

GROWING = """
import os

def run(instance, save_callback, state, iteration, k):
    fixed = os.path.exists(os.path.join(os.path.dirname(instance), "fixed"))
    if iteration == 1 and k == 2 and not fixed:
        raise ValueError("fails until data/fixed exists")
    out = {"score": iteration * k, "label": f"{k}:{iteration}"}
    if iteration >= 7:
        out["late"] = iteration
    return out
"""


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of runs each read of results parsed, in order."""
    seen: list[int] = []
    real = alma.frames.from_chunks

    def counting(*args: Any) -> alma.frames.Part:
        part = real(*args)
        seen.append(len(part.frame))
        return part

    monkeypatch.setattr(alma.frames, "from_chunks", counting)
    return seen


def _session(exp: Path, iterations: int) -> None:
    fields = json.loads(exp.read_text())
    exp.write_text(json.dumps({**fields, "iterations": iterations}))
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60) is True
    d.close()


def test_a_reader_reads_only_the_runs_committed_since_its_last_read(
    make_experiment: ExperimentFactory, parsed: list[int]
) -> None:
    exp = make_experiment(GROWING, instances=4, iterations=6, params={"k": [1, 2]})
    _session(exp, 6)
    reader = alma.experiment.load(exp, readonly=True)
    first = reader.results
    assert len(first) == 48 and parsed == [48]
    assert reader.results.equals(first) and parsed == [48]  # nothing new: nothing read
    _session(exp, 7)  # 8 new runs
    grown = reader.results
    assert parsed == [48, 8]
    pd.testing.assert_frame_equal(grown, Store(reader.state_path, "example").results_frame())
    assert len(grown) == 56
    reader.close()


def test_extended_results_equal_a_whole_read(
    make_experiment: ExperimentFactory, parsed: list[int]
) -> None:
    """Forgetting failed runs (to retry them), and a result key that appears later,
    make the reader read the whole table; runs that only add rows extend it."""
    exp = make_experiment(GROWING, instances=4, iterations=6, params={"k": [1, 2]}, retries=0)
    _session(exp, 6)
    reader = alma.experiment.load(exp, readonly=True)
    assert (reader.results["status"] == "failed").sum() == 4
    (exp.parent / "data" / "fixed").touch()
    d = alma.experiment.load(exp)
    d.retry_failed()
    d.start()
    assert d.join(timeout=60) is True
    d.close()
    retried = reader.results
    assert (retried["status"] == "done").all() and len(retried) == 48
    assert parsed[-1] == 48  # the failed runs were forgotten, then run again: read whole
    for iterations in (7, 8, 9):
        _session(exp, iterations)
        now = reader.results
        pd.testing.assert_frame_equal(now, Store(reader.state_path, "example").results_frame())
    # Reader, then a fresh store, each session: at 8 iterations "late" appears, so the
    # 8 new runs read do not fit the frame and the reader reads the whole table.
    assert parsed[-7:] == [8, 56, 8, 64, 64, 8, 72]
    assert now["late"].notna().sum() == 16 and len(now) == 72
    reader.close()


def test_reset_makes_the_reader_read_again(make_experiment: ExperimentFactory) -> None:
    exp = make_experiment(GROWING, instances=2, iterations=2, params={"k": [1]})
    _session(exp, 2)
    reader = alma.experiment.load(exp, readonly=True)
    assert len(reader.results) == 4
    d = alma.experiment.load(exp)
    d.reset()
    d.close()
    assert len(reader.results) == 0
    reader.close()


def test_the_caller_may_change_the_frame_it_got(make_experiment: ExperimentFactory) -> None:
    exp = make_experiment(GROWING, instances=2, iterations=2, params={"k": [1]})
    _session(exp, 2)
    reader = alma.experiment.load(exp, readonly=True)
    mine = reader.results
    mine.loc[0, "score"] = -1
    mine["extra"] = 1
    again = reader.results
    assert "extra" not in again and again.loc[0, "score"] != -1
    reader.close()


def test_a_run_committed_again_replaces_its_row() -> None:
    import numpy as np

    def part(keys: list[tuple[int, int, int]], value: float) -> alma.frames.Part:
        columns = [np.array(c, np.int64) for c in zip(*keys, strict=True)]
        frame = pd.DataFrame({"instance": [f"i{k[0]}" for k in keys], "v": value})
        return alma.frames.Part(frame, (columns[0], columns[1], columns[2]))

    old = part([(1, 1, 0), (1, 1, 1), (2, 1, 0)], 0.0)
    merged = alma.frames.merge(old, part([(1, 1, 1), (1, 2, 0), (3, 1, 0)], 1.0))
    assert merged is not None
    assert merged.frame["v"].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert list(zip(*merged.keys, strict=True)) == [
        (1, 1, 0),
        (1, 1, 1),
        (1, 2, 0),
        (2, 1, 0),
        (3, 1, 0),
    ]


#: Results whose chunks type alike (a key int in some, float in others; text with gaps;
#: failed runs in some chunks only): a whole read puts the chunks' frames together.
ALIKE = """
def run(instance, save_callback, state, iteration, k):
    if iteration == 3 and k == 2:
        raise ValueError("three")
    return {"v": iteration if iteration < 5 else iteration + 0.5, "flag": iteration % 2 == 0,
            "label": None if iteration == 6 else f"{k}:{iteration}"}
"""


@pytest.mark.parametrize(
    ("run", "one_read"), [(GROWING, True), (ALIKE, False)], ids=["key appears", "alike"]
)
def test_a_whole_read_in_chunks_is_the_same_frame(
    make_experiment: ExperimentFactory,
    monkeypatch: pytest.MonkeyPatch,
    parsed: list[int],
    run: str,
    one_read: bool,
) -> None:
    """Chunk by chunk, each chunk's frame made while the next is read, then put
    together; chunks that type a key apart ("late" appears in some only) are read
    again as one. Either way the frame is the one a single read gives."""
    import alma.store

    exp = make_experiment(run, instances=5, iterations=8, params={"k": [1, 2]}, retries=0)
    _session(exp, 8)
    state = exp.with_name("example.experiment.sqlite")
    whole = Store(state, "example").results_frame()
    assert parsed == [80]
    monkeypatch.setattr(alma.store, "_CHUNK", 7)  # 80 runs: 12 chunks, the last short
    chunked = Store(state, "example").results_frame()
    pd.testing.assert_frame_equal(chunked, whole)
    assert parsed[1:] == [7] * 11 + [3] + ([80] if one_read else [])
    keys = list(zip(whole["instance"], whole["k"], whole["iteration"], strict=True))
    assert keys == sorted(keys) and len(set(keys)) == 80
