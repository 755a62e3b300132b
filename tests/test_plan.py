"""The plan: which runs are owed, in which order, from rows that end at the last
finished iteration (so a plan of a billion iterations costs nothing up front)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import python_env

from alma.plan import mark, owed_count, plan


def _dense(rows: list[bytearray], iterations: int) -> list[bytearray]:
    return [row + bytes(iterations - len(row)) for row in rows]


def _reference(rows: list[bytearray], order: str, iterations: int) -> list[tuple[int, int]]:
    """The obvious algorithm over full rows."""
    full = _dense(rows, iterations)
    if order == "round-robin":
        return [(p, it) for it in range(iterations) for p in range(len(full)) if not full[p][it]]
    return [(p, it) for p in range(len(full)) for it in range(iterations) if not full[p][it]]


@pytest.mark.parametrize("order", ["round-robin", "instance"])
def test_sparse_rows_give_the_same_plan_as_full_ones(order: str) -> None:
    rng = random.Random(7)
    for _ in range(300):
        iterations = rng.randint(1, 12)
        rows = []
        for _ in range(rng.randint(1, 5)):
            n = rng.randint(0, iterations)
            rows.append(bytearray(rng.random() < 0.6 for _ in range(n)))
        expected = _reference(rows, order, iterations)
        assert list(plan(rows, order, iterations)) == expected
        assert owed_count(rows, iterations) == len(expected)


def test_mark_grows_a_row_only_as_far_as_needed() -> None:
    rows = [bytearray(), bytearray(b"\x01")]
    mark(rows, 0, 3)
    mark(rows, 1, 0)
    assert rows == [bytearray(b"\x00\x00\x00\x01"), bytearray(b"\x01")]
    assert owed_count(rows, 5) == 4 + 4


def test_a_plan_of_a_hundred_million_iterations_costs_no_memory_up_front(
    tmp_path: Path,
) -> None:
    code = f"""
import resource, alma
for i in range(5):
    open(f"{tmp_path}/f{{i}}.txt", "w").write("x")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = alma.Experiment(run=lambda instance: 1, instances=["{tmp_path}/f*.txt"],
                    iterations=100_000_000, workers=2, state="{tmp_path}/s.sqlite")
d.start()
d.stop()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d.close()
print((after - before) // 1024, d.progress.done > 0)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=python_env()
    )
    assert out.returncode == 0, out.stderr
    grown_mb, ran = out.stdout.split()
    assert ran == "True"
    assert int(grown_mb) < 100  # a full plan would be 500 MB of marks
