"""Crash safety: ``kill -9`` of a running ``alma run`` at random moments loses nothing.

The promise under test: a run counts as done only once committed, so whatever a reader
saw done before a kill is never run again, and the state file always loads afterwards.
The run module logs every attempt (instance, iteration, pid) so re-runs are visible.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import alma_cli, alma_popen

import alma.experiment

RUN = """
import os, random, time

LOG = os.path.join(os.path.dirname(__file__), "attempts.log")

def run(instance, save_callback, state, iteration):
    with open(LOG, "a") as f:  # one short write per attempt: lines do not interleave
        f.write(f"{os.path.basename(instance)} {iteration} {os.getpid()}\\n")
    rng = random.Random()
    if state is None:
        sum(range(rng.randrange(1000, 20000)))
        time.sleep(rng.uniform(0.002, 0.015))
        save_callback({"half": 1})
    time.sleep(rng.uniform(0.002, 0.015))
    return {"pid": os.getpid()}
"""

INSTANCES, ITERATIONS, KILLS = 6, 200, 5


def _done(exp: Path) -> dict[tuple[str, int], int]:
    """(instance file name, iteration) -> pid that produced it, as a reader sees it now."""
    r = alma.experiment.load(exp).results
    r = r[r["status"] == "done"]
    if r.empty:  # no dict result yet: no "pid" column either
        return {}
    return {
        (Path(i).name, int(it)): int(pid)
        for i, it, pid in zip(r["instance"], r["iteration"], r["pid"], strict=True)
    }


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_at_random_moments_loses_nothing_and_reruns_nothing(make_experiment) -> None:
    exp = make_experiment(RUN, instances=INSTANCES, iterations=ITERATIONS, workers=3)
    log = exp.parent / "attempts.log"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    info = f"(seed {seed})"

    seen: dict[tuple[str, int], int] = {}  # runs some reader saw done, and by which pid
    seen_before_kill: list[set[tuple[str, int]]] = []
    pids: list[int] = []
    kills = 0
    for _ in range(KILLS):
        proc = alma_popen("run", "-q", exp)
        pids.append(proc.pid)
        deadline = time.monotonic() + rng.uniform(0.3, 1.5)
        while time.monotonic() < deadline and proc.poll() is None:
            seen.update(_done(exp))
        if proc.poll() is not None:  # it finished before this kill: nothing left to kill
            proc.communicate()
            break
        seen.update(_done(exp))
        seen_before_kill.append(set(seen))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        # The state always loads after a kill, and keeps everything a reader saw.
        after = _done(exp)
        missing = set(seen) - set(after)
        assert not missing, f"runs seen done were lost: {sorted(missing)[:5]} {info}"
        assert all(after[k] == seen[k] for k in seen), info
    assert kills >= 3, f"the experiment ended too early to kill it {info}"

    final = alma_cli("run", "-q", exp, timeout=120)
    assert final.returncode == 0, final.stderr
    pids.append(-1)  # the final process (its pid is not needed)

    d = alma.experiment.load(exp)
    r = d.results
    assert d.finished and d.progress.done == INSTANCES * ITERATIONS
    assert len(r) == INSTANCES * ITERATIONS, info
    assert not r.duplicated(["instance", "iteration"]).any()
    assert (r["status"] == "done").all()

    attempts = [line.split() for line in log.read_text().splitlines()]
    by_pid: dict[int, set[tuple[str, int]]] = {}
    for name, it, pid in attempts:
        by_pid.setdefault(int(pid), set()).add((name, int(it)))
    every = Counter((name, int(it)) for name, it, _ in attempts)
    assert set(every) == {
        (f"file{i}.txt", it) for i in range(INSTANCES) for it in range(ITERATIONS)
    }
    # No run a reader saw done before kill k was attempted by any later process.
    for k, before in enumerate(seen_before_kill):
        later = [p for p in pids[k + 1 :] if p != -1]
        again = {key for p in later for key in by_pid.get(p, set())} & before
        assert not again, f"runs seen done before kill {k + 1} ran again: {sorted(again)} {info}"
    final_pid = set(by_pid) - set(pids)
    assert len(final_pid) <= 1  # only the final `alma run` is unknown to us
    for fp in final_pid:
        rerun = by_pid[fp] & set(seen)
        assert not rerun, f"the final run repeated runs seen done: {sorted(rerun)} {info}"
    # Each committed result was produced by a process that logged that attempt.
    for i, it, pid in zip(r["instance"], r["iteration"], r["pid"], strict=True):
        assert (Path(i).name, int(it)) in by_pid[int(pid)]


CHECKPOINTER = """
import os, time

HERE = os.path.dirname(__file__)

def run(instance, save_callback, state):
    step = 0 if state is None else state["step"]
    with open(os.path.join(HERE, "saved.log"), "a") as f:
        f.write(f"start {step}\\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        step += 1
        save_callback({"step": step})
        with open(os.path.join(HERE, "saved.log"), "a") as f:  # once save_callback returned
            f.write(f"saved {step}\\n")
        if os.path.exists(os.path.join(HERE, "go")):
            return step
        time.sleep(0.005)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_checkpoint_is_durable_once_save_callback_returns(make_experiment) -> None:
    """After ``kill -9``, the run resumes from a checkpoint at least as recent as the last
    save_callback that returned."""
    exp = make_experiment(CHECKPOINTER, instances=1, iterations=1)
    side = exp.parent / "saved.log"
    proc = alma_popen("run", "-q", exp)
    try:
        deadline = time.monotonic() + 30
        while not (side.exists() and side.read_text().count("saved") >= 20):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    last_saved = max(int(x.split()[1]) for x in side.read_text().splitlines() if "saved" in x)
    (exp.parent / "go").touch()
    final = alma_cli("run", "-q", exp)
    assert final.returncode == 0, final.stderr
    starts = [int(x.split()[1]) for x in side.read_text().splitlines() if x.startswith("start")]
    assert starts[0] == 0
    assert starts[-1] >= last_saved  # nothing acknowledged was lost
    assert alma.experiment.load(exp).results["result"].tolist() == [starts[-1] + 1]
