"""One bad row never breaks the rest: results that JSON cannot hold fail their own run
with the path of the bad value; a row damaged in the state file is shown as such."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ExperimentFactory, alma_cli

import alma
import alma.experiment
from alma.values import to_json


def _run_one(tmp_path: Path, result: Any) -> Any:
    (tmp_path / "a.txt").write_text("a")
    d = alma.Experiment(
        run=lambda instance: result, instances=[str(tmp_path / "a.txt")], name="values",
        state=tmp_path / "values.sqlite",
    )  # fmt: skip
    try:
        d.start()
        assert d.join(timeout=20)
        return d.results.iloc[0]
    finally:
        d.close()


def test_numpy_and_tuple_dict_keys_become_text_as_documented(tmp_path: Path) -> None:
    row = _run_one(
        tmp_path,
        {"scores": {np.int64(3): 1, np.float64(0.5): 2, np.bool_(True): 3, (1, "a"): 4, None: 5}},
    )
    assert row["status"] == "done", row["error"]
    assert row["scores"] == {"3": 1, "0.5": 2, "true": 3, '[1,"a"]': 4, "null": 5}


@pytest.mark.parametrize(
    "value", [None, True, False, 0, -7, 10**40, "", 'a "quoted"\nline', "héllo ☃ 😀", 2.5]
)
def test_a_plain_value_is_stored_as_json_writes_it_and_reads_back_equal(value: Any) -> None:
    """Plain results take a short cut past json.dumps: the text must be the same."""
    text = to_json(value)
    assert text == json.dumps(value, separators=(",", ":"))
    assert json.loads(text) == value and type(json.loads(text)) is type(value)


def test_keys_that_collide_after_conversion_fail_the_run_naming_both(tmp_path: Path) -> None:
    row = _run_one(tmp_path, {"by": {1: "one", "1": "uno"}})
    assert row["status"] == "failed"
    assert "result['by']: the keys 1 and '1' are both stored as '1'" in row["error"]


def test_numpy_datetime64_of_any_unit_is_iso_text(tmp_path: Path) -> None:
    row = _run_one(
        tmp_path,
        {
            "ns": np.datetime64("2026-12-01T10:20:30.123456789", "ns"),
            "day": np.datetime64("2026-12-01", "D"),
            "missing": np.datetime64("NaT"),
        },
    )
    assert row["status"] == "done", row["error"]
    assert row["ns"] == "2026-12-01T10:20:30.123456789" and row["day"] == "2026-12-01"
    assert row["missing"] is None


def test_a_result_nested_too_deep_to_read_back_fails_its_run(tmp_path: Path) -> None:
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    row = _run_one(tmp_path, {"deep": deep})
    assert row["status"] == "failed" and "nested deeper than 200 levels" in row["error"]


@pytest.mark.parametrize("damage", ['{"n": ', '{"n":\n 1,\n{"r": 2'], ids=["cut", "newlines"])
def test_a_damaged_result_row_is_shown_and_the_others_are_kept(
    make_experiment: ExperimentFactory, damage: str
) -> None:
    exp = make_experiment(
        "def run(instance, save_callback, state):\n    return {'n': len(instance)}\n",
        instances=3,
        iterations=2,
    )
    assert alma_cli("run", "-q", exp).returncode == 0
    state = exp.with_name(exp.name + ".sqlite")
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.execute("UPDATE runs SET result = ? WHERE iteration = 1 AND instance = 2", (damage,))
        db.commit()
    r = alma.experiment.load(exp).results
    assert len(r) == 6
    assert r[["instance", "iteration"]].value_counts().eq(1).all()  # still one row each
    bad = r[r["error"].notna()]
    assert len(bad) == 1 and "cannot be read back" in bad["error"].iloc[0]
    assert r["n"].notna().sum() == 5
    out = alma_cli("results", exp)
    assert out.returncode == 0 and "cannot be read back" in out.stdout


def test_a_result_that_is_not_utf8_reads_with_replacement_characters(
    make_experiment: ExperimentFactory,
) -> None:
    """Bytes that are not UTF-8 in a stored result (a damaged file) never break the
    table: that value reads with U+FFFD, every other row as it was."""
    exp = make_experiment(
        "def run(instance, save_callback, state):\n    return {'n': len(instance), 's': 'ok'}\n",
        instances=3,
        iterations=2,
    )
    assert alma_cli("run", "-q", exp).returncode == 0
    state = exp.with_name(exp.name + ".sqlite")
    with contextlib.closing(sqlite3.connect(state)) as db:
        damaged = b'{"n": 1, "s": "b\xffd"}'
        db.execute("UPDATE runs SET result = CAST(? AS TEXT) WHERE iteration = 1", (damaged,))
        db.commit()
    r = alma.experiment.load(exp).results
    assert len(r) == 6 and r["error"].isna().all()
    assert sorted(r["s"]) == ["b\ufffdd"] * 3 + ["ok"] * 3


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_state_and_lock_files_are_never_world_writable(
    make_experiment: ExperimentFactory, umask: int
) -> None:
    import os

    exp = make_experiment()
    old = os.umask(umask)
    try:
        d = alma.experiment.load(exp)
        d.start()
        assert d.join(timeout=20)
        d.close()
    finally:
        os.umask(old)
    for path in exp.parent.glob("example.experiment.sqlite*"):
        assert not path.stat().st_mode & 0o002, path
