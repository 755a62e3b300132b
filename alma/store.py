"""The state of an experiment, in one SQLite file: the only module that imports sqlite3.

Why SQLite: a commit is atomic and, in WAL mode, survives ``kill -9`` at any moment;
readers in other processes (``alma status``, a second notebook) see the last commit
without blocking the writer. ``synchronous=NORMAL`` means a power cut may cost the last
group commit, never the file. Only the dispatcher's side writes; workers never open it.

The plan is not stored: a run is owed when no row in ``runs`` says it finished, so a
million-run experiment costs a million result rows and nothing more.

Values are JSON text (results, checkpoints), never pickles.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import StateError
from .records import DONE, FAILED, CheckpointRecord, ErrorGroup, RunKey, RunRecord

if TYPE_CHECKING:
    import pandas as pd

#: PRAGMA application_id of alma state files: b"alma" read as a big-endian integer.
APPLICATION_ID = int.from_bytes(b"alma", "big")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE instances (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, path TEXT);
CREATE TABLE runs (
    instance  INTEGER NOT NULL REFERENCES instances(id),
    iteration INTEGER NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    result    TEXT,            -- JSON
    error     TEXT,
    traceback TEXT,
    attempts  INTEGER NOT NULL,
    duration  REAL,
    finished  REAL NOT NULL,   -- unix time
    code      TEXT,            -- hash of the run module that produced this row
    PRIMARY KEY (instance, iteration)
) WITHOUT ROWID;
CREATE TABLE checkpoints (
    instance  INTEGER NOT NULL,
    iteration INTEGER NOT NULL,
    state     TEXT NOT NULL,   -- JSON
    saved     REAL NOT NULL,
    PRIMARY KEY (instance, iteration)
) WITHOUT ROWID;
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, pid INTEGER, host TEXT,
    code TEXT, iterations INTEGER, instances INTEGER
);
"""


class Counts(NamedTuple):
    """Finished runs of one instance."""

    done: int
    failed: int


class Store:
    """One experiment's state file: validation, a writer connection, cheap readers."""

    def __init__(self, path: str | os.PathLike[str], experiment: str) -> None:
        self.path = Path(path)
        self.experiment = experiment
        self._writer: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) the writer opened
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._ready = False  # the file was seen holding alma's schema

    # -- validation -------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the state file exists and holds something (an empty file is new)."""
        try:
            if self.path.stat().st_size == 0:
                return False
        except FileNotFoundError:
            return False
        if not self._ready:
            # A writer in another process may be creating the schema right now: an SQLite
            # file with no table yet is as new as an empty one, not another program's.
            with self._reading() as db:
                if db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                    self._ready = True
                elif db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                    return False
        return True

    def _refuse(self, problem: str) -> StateError:
        return StateError(
            f"State file {self.path}: {problem}. alma will not overwrite it: move it away, "
            f'or point the experiment\'s "state" field at another file.'
        )

    def validate(self) -> None:
        """Check, read-only, that an existing file is this experiment's state.

        Raises StateError for a file that is not SQLite, not alma's, corrupt, from a
        newer alma, or from another experiment. Writes nothing.
        """
        if not self.exists():
            return
        try:
            with self._reading() as db:
                app = db.execute("PRAGMA application_id").fetchone()[0]
                if app != APPLICATION_ID:
                    raise self._refuse(
                        "not an alma state file (it is an SQLite database of another program)"
                    )
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise self._refuse(
                        f"written by a newer alma (schema {version}, this "
                        f"alma reads up to {SCHEMA_VERSION}); upgrade alma"
                    )
                row = db.execute("SELECT value FROM meta WHERE key='experiment'").fetchone()
                foreign = _foreign_objects(db)
        except sqlite3.DatabaseError as exc:
            raise self._refuse(f"unreadable or corrupt ({exc})") from None
        if foreign:
            raise self._refuse(
                f"it holds schema objects alma did not create ({', '.join(foreign[:5])}): "
                "a trigger or view there could change results behind alma's back"
            )
        if row is None:
            raise self._refuse("it lacks alma's metadata (damaged)")
        if row[0] != self.experiment:
            raise self._refuse(f"it belongs to experiment {row[0]!r}, not {self.experiment!r}")

    # -- reading ----------------------------------------------------------------------

    def _reading(self) -> _Reading:
        return _Reading(self)

    def _connect_reader(self) -> sqlite3.Connection:
        # mode=ro: a reader can never create, change or lock out the file.
        db = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=30
        )
        return db

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap change detection)."""
        if not self.exists():
            return -1
        with self._reading() as db:
            return int(db.execute("PRAGMA data_version").fetchone()[0])

    def instance_ids(self) -> dict[str, int]:
        """Ids of every instance the state knows (current and removed)."""
        if not self.exists():
            return {}
        with self._reading() as db:
            return dict(db.execute("SELECT name, id FROM instances"))

    def counts(self, iterations: int) -> dict[int, Counts]:
        """Per instance id: done and failed runs among iterations ``0..iterations-1``."""
        if not self.exists():
            return {}
        with self._reading() as db:
            rows = db.execute(
                "SELECT instance, SUM(status = ?), SUM(status = ?) FROM runs "
                "WHERE iteration < ? GROUP BY instance",
                (DONE, FAILED, iterations),
            )
            return {inst: Counts(done, failed) for inst, done, failed in rows}

    def finished_marks(self, ids: Sequence[int], iterations: int) -> dict[int, bytearray]:
        """Per instance id, 1 at every finished iteration (done or failed) below
        ``iterations``; each bytearray ends at the last finished one (see alma.plan), so
        memory follows the runs finished, not the runs planned."""
        marks = {i: bytearray() for i in ids}
        if not self.exists():
            return marks
        with self._reading() as db:
            rows = db.execute(
                "SELECT instance, max(iteration), group_concat(iteration) FROM runs "
                "WHERE iteration < ? GROUP BY instance",
                (iterations,),
            )
            for inst, last, its in rows:
                if inst in marks:
                    mark = marks[inst] = bytearray(last + 1)
                    for it in map(int, its.split(",")):
                        mark[it] = 1
        return marks

    def checkpoints(self) -> dict[tuple[int, int], str]:
        """Last checkpoint (JSON text) of every unfinished run that saved one."""
        if not self.exists():
            return {}
        with self._reading() as db:
            rows = db.execute("SELECT instance, iteration, state FROM checkpoints")
            return {RunKey(i, it): s for i, it, s in rows}

    def last_session_code(self) -> str | None:
        """Code hash recorded by the previous session, if any."""
        if not self.exists():
            return None
        with self._reading() as db:
            row = db.execute("SELECT code FROM sessions ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    def error_groups(self) -> list[ErrorGroup]:
        """Failed runs grouped by their error, most frequent first; each with the first
        one to fail (SQLite takes bare columns from the row of the MIN())."""
        if not self.exists():
            return []
        with self._reading() as db:
            rows = db.execute(
                "SELECT COALESCE(r.error, ''), COUNT(*), i.name, r.iteration,"
                " COALESCE(r.traceback, ''), MIN(r.finished) FROM runs r"
                " JOIN instances i ON i.id = r.instance WHERE r.status = ?"
                " GROUP BY r.error ORDER BY COUNT(*) DESC, MIN(r.finished)",
                (FAILED,),
            ).fetchall()
        return [ErrorGroup(e, n, name, it, tb) for e, n, name, it, tb, _ in rows]

    def results_frame(self) -> pd.DataFrame:
        """One row per finished run; a dict result becomes one column per key."""
        rows: list[Any] = []
        if self.exists():
            with self._reading() as db:
                rows = db.execute(
                    "SELECT i.name, r.iteration, r.status, r.error, r.duration, r.attempts,"
                    " r.finished, r.code, r.traceback, r.result FROM runs r "
                    "JOIN instances i ON i.id = r.instance ORDER BY r.instance, r.iteration"
                ).fetchall()
        return _results_frame(rows)

    # -- writing (the dispatcher's side only) ------------------------------------------

    def open_writer(
        self, instances: Sequence[tuple[str, str]], iterations: int, code: str
    ) -> dict[str, int]:
        """Open (creating if new) for writing; register instances and this session.

        Returns the id of every instance the state knows (those given included).
        """
        self.validate()
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                # A new (or empty) file: the schema is created in the same transaction
                # as the metadata, so a crash leaves either nothing or a whole schema.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("experiment", self.experiment), ("created", str(time.time()))],
                )
            ids = dict(db.execute("SELECT name, id FROM instances"))
            new = [(name, path) for name, path in instances if name not in ids]
            if new:  # a resumed experiment usually has none: no 100,000-row insert
                last = db.execute("SELECT coalesce(max(id), 0) FROM instances").fetchone()[0]
                db.executemany("INSERT INTO instances (name, path) VALUES (?, ?)", new)
                # Under this write lock SQLite gives each new row max(id) + 1: the ids are
                # known without reading 100,000 rows back (checked, else read back).
                if db.execute("SELECT max(id) FROM instances").fetchone()[0] == last + len(new):
                    ids.update((name, last + 1 + i) for i, (name, _) in enumerate(new))
                else:
                    ids = dict(db.execute("SELECT name, id FROM instances"))
            db.execute(
                "INSERT INTO sessions (started, pid, host, code, iterations, instances)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), os.getpid(), socket.gethostname(), code, iterations, len(instances)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        self._writer = db
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        return ids

    def write(
        self,
        runs: Iterable[RunRecord],
        checkpoints: Iterable[CheckpointRecord],
        drop_checkpoints: Iterable[RunKey],
    ) -> None:
        """Commit a group of finished runs and checkpoints in one atomic transaction."""
        db = self._writer
        assert db is not None, "open_writer() first"
        self._check_still_there()
        db.execute("BEGIN")
        try:
            # map(tuple): sqlite3 binds exact tuples ~1 µs per row faster than NamedTuples.
            db.executemany(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)", map(tuple, checkpoints)
            )
            db.executemany(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                map(tuple, runs),
            )
            db.executemany(
                "DELETE FROM checkpoints WHERE instance = ? AND iteration = ?", drop_checkpoints
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT (disk full) has already rolled back
                db.execute("ROLLBACK")
            raise

    def _check_still_there(self) -> None:
        """Refuse to commit into a file that is no longer the one at the path.

        A state file deleted, moved or replaced while a session writes to it (``rm``, a
        sync tool, ``git checkout``) would otherwise take every later commit with it,
        unseen: the open connection writes on into the old file. One ``stat`` per group
        commit (every few milliseconds at most) notices it.
        """
        what = _moved_away(self.path, self._identity)
        if what is not None:
            raise StateError(
                f"State file {self.path} {what} while this session was writing to it; the "
                "session stopped. Runs it committed before went with the old file. Put the "
                "file back (or let alma start a new one), then run the experiment again."
            )

    def delete_runs(self, failed_only: bool) -> int:
        """Forget finished runs (all, or only the failed ones) so they are owed again."""
        db = self._writer
        assert db is not None, "open_writer() first"
        self._check_still_there()
        db.execute("BEGIN IMMEDIATE")
        try:
            if failed_only:
                n = db.execute("DELETE FROM runs WHERE status = ?", (FAILED,)).rowcount
            else:
                n = db.execute("DELETE FROM runs").rowcount
            if not failed_only:
                db.execute("DELETE FROM checkpoints")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return n

    def close_writer(self) -> None:
        """Close the writer connection, folding the WAL back into the file first."""
        if self._writer is not None:
            # SQLite folds the WAL in on close only for the last connection, and our own
            # read-only reader is usually still open: without this, the .sqlite file alone
            # (copied elsewhere) would miss the session. TRUNCATE also empties the -wal
            # file; a reader mid-transaction elsewhere makes it give up after the short
            # busy timeout rather than wait.
            with contextlib.suppress(sqlite3.Error):  # if it fails, the WAL still holds all
                self._writer.execute("PRAGMA busy_timeout = 200")
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._writer.close()
            self._writer = None
            self._identity = None

    def close(self) -> None:
        """Close every connection this object holds."""
        self.close_writer()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


def _moved_away(path: Path, identity: tuple[int, int] | None) -> str | None:
    """What happened to the file opened as ``identity`` (device, inode), if it is no
    longer the one at ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "was deleted (or moved away)"
    return None if (st.st_dev, st.st_ino) == identity else "was replaced by another file"


@functools.cache
def _own_objects() -> frozenset[tuple[str, str, str | None]]:
    """(type, name, sql) of every schema object alma creates: tables and their indexes."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.executescript(_SCHEMA)
        return frozenset(db.execute("SELECT type, name, sql FROM sqlite_master"))


def _foreign_objects(db: sqlite3.Connection) -> list[str]:
    """Schema objects alma did not create (or whose definition was changed), by name."""
    own = _own_objects()
    rows = db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    return sorted(f"{kind} {name}" for kind, name, sql in rows if (kind, name, sql) not in own)


class _Reading:
    """Context manager lending the store's shared read-only connection to one caller."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        s = self.store
        s._read_lock.acquire()
        try:
            if s._reader is None:
                s._reader = s._connect_reader()
        except sqlite3.Error as exc:
            s._read_lock.release()
            raise s._refuse(f"cannot be opened ({exc})") from None
        except BaseException:
            s._read_lock.release()
            raise
        return s._reader

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.store._read_lock.release()
        # A damaged page or a missing table surfaces only when read: report it as the
        # StateError it is. A busy or locked database is contention, not damage.
        if isinstance(exc, sqlite3.DatabaseError) and not (
            isinstance(exc, sqlite3.OperationalError)
            and any(w in str(exc) for w in ("locked", "busy"))
        ):
            raise self.store._refuse(f"unreadable or corrupt ({exc})") from None


#: The columns of results_frame before the result's own (see docs/experiment.md).
RESULT_COLUMNS = (
    "instance",
    "iteration",
    "status",
    "error",
    "duration",
    "attempts",
    "finished",
    "code",
    "traceback",
)


def _results_frame(rows: list[Any]) -> pd.DataFrame:
    """The results frame of rows read as RESULT_COLUMNS + (result JSON,)."""
    import pandas as pd

    cols = list(zip(*rows, strict=True)) if rows else [()] * (len(RESULT_COLUMNS) + 1)
    frame = pd.DataFrame(dict(zip(RESULT_COLUMNS, cols, strict=False)))
    frame["finished"] = pd.to_datetime(frame["finished"], unit="s", utc=True)
    return _expand_results(frame, _decode_results(cols[-1], frame))


def _decode_results(texts: Sequence[str | None], frame: pd.DataFrame) -> list[Any]:
    """The stored results, decoded. One parse of one JSON array is ~4x faster than a
    json.loads per row; if a row cannot be read back (damaged in the file), the rows are
    parsed one by one and each bad one gets None and says why in its ``error`` column,
    so one bad row never hides the others."""
    try:
        return list(json.loads("[" + ",".join(t or "null" for t in texts) + "]"))
    except (ValueError, RecursionError):
        pass
    values: list[Any] = []
    for row, text in enumerate(texts):
        try:
            values.append(None if text is None else json.loads(text))
        except (ValueError, RecursionError) as exc:
            values.append(None)
            frame.loc[row, "error"] = (
                f"the stored result cannot be read back ({type(exc).__name__}: {exc})"
            )
    return values


def _expand_results(frame: pd.DataFrame, values: list[Any]) -> pd.DataFrame:
    """Dict results become columns (prefixed ``result_`` on a name clash), others ``result``."""
    import pandas as pd

    dicts = [v if isinstance(v, dict) else {} for v in values]
    others = [None if isinstance(v, dict) else v for v in values]
    if any(dicts):
        extra = pd.DataFrame.from_records(dicts, index=frame.index)
        extra.columns = [
            f"result_{c}" if c in frame.columns or c == "result" else str(c) for c in extra.columns
        ]
        frame = pd.concat([frame, extra], axis=1)
    if any(v is not None for v in others) or not any(dicts):
        frame["result"] = others
    return frame
