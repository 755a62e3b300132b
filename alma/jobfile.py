"""The batch jobs of a running experiment, for the other processes that watch it.

An executor whose workers live in batch jobs (``"slurm"``) counts them at each look at
the queue (:attr:`alma.executors.Executor.jobs`). The process that runs the experiment
has them at hand; ``alma status``, a notebook watching a detached runner or another
kernel do not (they have no executor, and the jobs carry nothing that names the
experiment). So the lock holder's session writes the counts to ``<state>.jobs`` each
time they change (at most every couple of seconds), and once more when the session
ends, marked final: a reader shows a record only when it comes from the process that
holds the lock now, or is the final one of the last session (a runner killed without
its final record leaves one that names a process that holds nothing: not shown). A
session deletes the file when it opens.

The file is written whole to a temporary file and renamed over the old one (readers
never see half of it); it holds counts only, never anything that is acted on, so a
reader ignores whatever it cannot parse.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path

from .lock import Holder
from .records import JobCounts

#: Bytes of the file read back, at most.
_MAX_BYTES = 4096


def jobs_path(state_path: Path) -> Path:
    """Where the jobs of the experiment with this state file are recorded."""
    return state_path.with_name(state_path.name + ".jobs")


def write(state_path: Path, me: Holder, counts: JobCounts, final: bool = False) -> None:
    """Record ``counts`` as the jobs of ``me``'s session (``final``: at its end).
    Raises OSError when the folder cannot be written."""
    record = {
        "pid": me.pid,
        "host": me.host,
        "system": counts.system,
        "pending": counts.pending,
        "running": counts.running,
        "gone": counts.gone,
        "final": final,
        "at": time.time(),
    }
    path = jobs_path(state_path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)  # replaces a planted symlink itself, never what it points to


def clear(state_path: Path) -> None:
    """Forget the jobs of an earlier session (a new one opens)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(jobs_path(state_path))


def read(state_path: Path, holder: Holder | None) -> JobCounts | None:
    """The jobs recorded for the experiment: those of ``holder`` (the process holding
    its lock now), or, when none holds it, the final counts of its last session; None
    when there are none (or the file is not alma's)."""
    try:
        fd = os.open(jobs_path(state_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # none (the common case), or a planted symlink: never followed
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _MAX_BYTES)
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
        counts = JobCounts(
            int(record["pending"]),
            int(record["running"]),
            int(record["gone"]),
            str(record.get("system", "SLURM")),
        )
        pid, host, final = int(record["pid"]), str(record["host"]), bool(record["final"])
    except (ValueError, KeyError, TypeError):
        return None
    if holder is not None:
        return counts if (pid, host) == (holder.pid, holder.host) else None
    return counts if final else None


__all__ = ["clear", "jobs_path", "read", "write"]
