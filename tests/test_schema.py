"""The state file across releases (migrations from every earlier schema, tested on
files the earlier releases wrote) and the results frame a reader keeps and extends."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import ExperimentFactory

import alma.experiment
import alma.frames
from alma.store import SCHEMA_VERSION, Store

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "v01"


# -- alma 0.1 (schema 1) --------------------------------------------------------------


@pytest.fixture
def v01(tmp_path: Path) -> Path:
    """A copy of the experiment whose state file alma 0.1 wrote (tests/fixtures/v01)."""
    folder = tmp_path / "v01"
    shutil.copytree(FIXTURE, folder)
    (folder / "search.py").write_text(
        "import os\n\ndef run(instance, save_callback, state):\n"
        "    return {'score': len(os.path.basename(instance)) * 10 + 1, 'resumed': state}\n"
    )
    return folder / "search.experiment"


def _version(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(state)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_state_file_of_alma_0_1_is_read_without_being_changed(v01: Path) -> None:
    state = v01.with_name("search.experiment.sqlite")
    before = state.read_bytes()
    with pytest.warns(UserWarning, match="run code changed"):
        d = alma.experiment.load(v01, readonly=True)
    p = d.progress
    assert (p.total, p.done, p.failed) == (9, 6, 1)
    r = d.results
    assert len(r) == 7 and r["seed"].notna().all()
    assert r.loc[r["status"] == "failed", "error"].item() == "ValueError: g2 is odd at iteration 1"
    d.close()
    assert state.read_bytes() == before and _version(state) == 1


def test_a_state_file_of_alma_0_1_is_migrated_and_resumed(v01: Path) -> None:
    state = v01.with_name("search.experiment.sqlite")
    with pytest.warns(UserWarning, match="run code changed"):
        old = alma.experiment.load(v01, readonly=True).results
    with pytest.warns(UserWarning, match="run code changed"):
        d = alma.experiment.load(v01)
    d.start()
    assert d.join(timeout=60) is True
    assert _version(state) == SCHEMA_VERSION
    r = d.results
    assert (len(r), (r["status"] == "done").sum()) == (9, 8)  # the failed run stays failed
    kept = r.merge(old, on=["instance", "iteration"], suffixes=("", "_old"))
    assert len(kept) == 7 and (kept["seed"] == kept["seed_old"]).all()
    assert (kept["finished"] == kept["finished_old"]).all()  # not re-run
    resumed = r[(r["instance"] == "data/g1.txt") & (r["iteration"] == 2)]
    assert resumed["resumed"].item() == {"step": 1}  # its 0.1 checkpoint was handed back
    # The migrated file still grows a grid: the old runs are the empty configuration's.
    d.close()


def test_a_crash_during_migration_leaves_the_old_file_usable(
    v01: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = v01.with_name("search.experiment.sqlite")
    real = Store._migrate_from_1

    def crash(self: Store, db: sqlite3.Connection) -> None:
        real(self, db)  # every statement done, the transaction not committed yet
        raise OSError("power cut")

    monkeypatch.setattr(Store, "_migrate_from_1", crash)
    with pytest.warns(UserWarning):
        d = alma.experiment.load(v01)
    with pytest.raises(OSError, match="power cut"):
        d.start()
    assert _version(state) == 1
    assert not d.running
    monkeypatch.setattr(Store, "_migrate_from_1", real)
    with pytest.warns(UserWarning):
        d = alma.experiment.load(v01)
    d.start()
    assert d.join(timeout=60) is True and len(d.results) == 9


# -- schema 2 -------------------------------------------------------------------------


@pytest.fixture
def v02(tmp_path: Path) -> Path:
    """A copy of the experiment whose state file schema 2 wrote (tests/fixtures/v02)."""
    folder = tmp_path / "v02"
    shutil.copytree(FIXTURES / "v02", folder)
    (folder / "search.py").write_text(
        "import os\n\ndef run(instance, save_callback, state, iteration, k):\n"
        "    return {'score': len(os.path.basename(instance)) * 10 + k, 'resumed': state}\n"
    )
    return folder / "search.experiment"


def test_a_schema_2_file_is_read_without_being_changed(v02: Path) -> None:
    state = v02.with_name("search.experiment.sqlite")
    before = state.read_bytes()
    with pytest.warns(UserWarning, match="run code changed"):
        d = alma.experiment.load(v02, readonly=True)
    p = d.progress
    assert (p.total, p.done, p.failed) == (8, 4, 1)
    r = d.results
    assert len(r) == 5 and sorted(r["k"]) == [1, 1, 1, 2, 2]
    assert r.loc[r["status"] == "failed", "error"].item() == "ValueError: g2.txt is odd at k=2"
    assert len(d.results) == 5  # read again: whole again (no commit numbers in schema 2)
    d.close()
    assert state.read_bytes() == before and _version(state) == 2


def test_a_schema_2_file_is_migrated_and_resumed(v02: Path) -> None:
    state = v02.with_name("search.experiment.sqlite")
    with pytest.warns(UserWarning, match="run code changed"):
        old = alma.experiment.load(v02, readonly=True).results
    with pytest.warns(UserWarning, match="run code changed"):
        d = alma.experiment.load(v02)
    d.start()
    assert d.join(timeout=60) is True
    assert _version(state) == SCHEMA_VERSION
    Store(state, "search").validate()  # the migrated file holds only alma's own objects
    r = d.results
    assert (len(r), (r["status"] == "done").sum()) == (8, 7)  # the failed run stays failed
    kept = r.merge(old, on=["instance", "k", "iteration"], suffixes=("", "_old"))
    assert len(kept) == 5 and (kept["seed"] == kept["seed_old"]).all()
    assert (kept["finished"] == kept["finished_old"]).all()  # not re-run
    resumed = r[(r["instance"] == "data/g1.txt") & (r["k"] == 2) & (r["iteration"] == 1)]
    assert resumed["resumed"].item() == {"step": 1}  # its checkpoint was handed back
    d.close()


def test_a_new_and_a_migrated_file_hold_the_same_definitions(
    v02: Path, make_experiment: ExperimentFactory
) -> None:
    exp = make_experiment(params={"k": [1, 2]})
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60) is True
    d.close()
    with pytest.warns(UserWarning):
        m = alma.experiment.load(v02)
    m.start()
    assert m.join(timeout=60) is True
    m.close()

    def definitions(state: Path) -> set[tuple[str, str]]:
        with contextlib.closing(sqlite3.connect(state)) as db:
            return set(db.execute("SELECT name, sql FROM sqlite_master"))

    fresh = definitions(exp.with_name("example.experiment.sqlite"))
    assert definitions(v02.with_name("search.experiment.sqlite")) == fresh
    assert any(name == "runs_seq" for name, _ in fresh)


def test_a_crash_during_the_migration_from_2_leaves_the_old_file_usable(
    v02: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = v02.with_name("search.experiment.sqlite")
    real = Store._migrate_from_2

    def crash(self: Store, db: sqlite3.Connection) -> None:
        real(self, db)
        raise OSError("power cut")

    monkeypatch.setattr(Store, "_migrate_from_2", crash)
    with pytest.warns(UserWarning):
        d = alma.experiment.load(v02)
    with pytest.raises(OSError, match="power cut"):
        d.start()
    assert _version(state) == 2
    monkeypatch.setattr(Store, "_migrate_from_2", real)
    with pytest.warns(UserWarning):
        d = alma.experiment.load(v02)
    d.start()
    assert d.join(timeout=60) is True and len(d.results) == 8


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


def test_a_whole_read_in_chunks_is_the_same_frame(
    make_experiment: ExperimentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alma.store

    exp = make_experiment(GROWING, instances=5, iterations=8, params={"k": [1, 2]})
    _session(exp, 8)
    state = exp.with_name("example.experiment.sqlite")
    whole = Store(state, "example").results_frame()
    monkeypatch.setattr(alma.store, "_CHUNK", 7)  # 80 runs: 12 chunks, the last short
    chunked = Store(state, "example").results_frame()
    pd.testing.assert_frame_equal(chunked, whole)
    keys = list(zip(whole["instance"], whole["k"], whole["iteration"], strict=True))
    assert keys == sorted(keys) and len(set(keys)) == 80
