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

import concurrent.futures
import contextlib
import functools
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import frames
from .errors import StateError
from .records import (
    DONE,
    FAILED,
    CheckpointRecord,
    Config,
    ErrorGroup,
    RunKey,
    RunRecord,
    seed_of,
)

if TYPE_CHECKING:
    import pandas as pd

#: PRAGMA application_id of alma state files: b"alma" read as a big-endian integer.
APPLICATION_ID = int.from_bytes(b"alma", "big")
SCHEMA_VERSION = 3

#: Schema 2: configurations and seeds.
_SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE instances (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, path TEXT);
CREATE TABLE configs (id INTEGER PRIMARY KEY, params TEXT NOT NULL UNIQUE);  -- JSON
CREATE TABLE runs (
    instance  INTEGER NOT NULL REFERENCES instances(id),
    config    INTEGER NOT NULL REFERENCES configs(id),
    iteration INTEGER NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    result    TEXT,            -- JSON
    error     TEXT,
    traceback TEXT,
    attempts  INTEGER NOT NULL,
    duration  REAL,
    finished  REAL NOT NULL,   -- unix time
    code      TEXT,            -- hash of the run module that produced this row
    seed      INTEGER NOT NULL,
    interruptions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instance, config, iteration)
) WITHOUT ROWID;
CREATE TABLE checkpoints (
    instance  INTEGER NOT NULL,
    config    INTEGER NOT NULL,
    iteration INTEGER NOT NULL,
    state     TEXT NOT NULL,   -- JSON
    saved     REAL NOT NULL,
    PRIMARY KEY (instance, config, iteration)
) WITHOUT ROWID;
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, pid INTEGER, host TEXT,
    code TEXT, iterations INTEGER, instances INTEGER
);
"""

#: Schema 1 (alma 0.1): no configurations, no seed. Kept to recognise its files (and
#: refuse foreign objects in them) and to migrate them.
_SCHEMA_1 = """
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

#: Schema 3: each run records the commit that wrote it (``seq``, counted by the writer;
#: the index finds the runs committed since a given one), so a reader extends the
#: results it read rather than reading them all again. Added the way a schema-2 file
#: is migrated (ALTER TABLE), so new and migrated files hold the same definitions.
_SCHEMA_3_CHANGES = """
ALTER TABLE runs ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_seq ON runs (seq);
"""
_SCHEMA = _SCHEMA_2 + _SCHEMA_3_CHANGES

_SCHEMAS = {1: _SCHEMA_1, 2: _SCHEMA_2, SCHEMA_VERSION: _SCHEMA}

#: Id of the configuration without parameters, ``{}``, in a migrated schema-1 file.
_EMPTY_CONFIG_ID = 1

#: A schema-1 file read without migrating it (by a reader, which never writes): the
#: schema-2 tables as temporary views over the old ones, so every query is the same.
_SCHEMA_1_VIEWS = f"""
CREATE TEMP VIEW configs AS SELECT {_EMPTY_CONFIG_ID} AS id, '{{}}' AS params;
CREATE TEMP VIEW runs AS SELECT instance, {_EMPTY_CONFIG_ID} AS config, iteration, status,
    result, error, traceback, attempts, duration, finished, code,
    alma_seed((SELECT name FROM main.instances WHERE id = instance), iteration) AS seed,
    0 AS interruptions FROM main.runs;
CREATE TEMP VIEW checkpoints AS SELECT instance, {_EMPTY_CONFIG_ID} AS config, iteration,
    state, saved FROM main.checkpoints;
"""

#: A result as the lines hold it, and the same with raw newlines escaped: alma's results
#: hold none (json escapes them), but one damaged in the file may, and would split its
#: document in two. Such a chunk is read again the second way (costlier): json then
#: reads a newline in a string as it would, and one elsewhere leaves the row unreadable,
#: as it is.
_RESULT = "coalesce(r.result, 'null')"
_RESULT_ESCAPED = "replace(coalesce(r.result, 'null'), char(10), '\\n')"

#: Two lines per run, as alma.frames reads them (LINE_COLUMNS, then the document):
#: SQLite writes the text. json_quote only for the few runs with an error: it costs.
_LINES = (
    "SELECT CAST(group_concat(line, char(10)) AS BLOB),"
    " CAST(group_concat(doc, char(10)) AS BLOB) FROM (SELECT"
    " json_array(0, r.instance, r.config, r.iteration, r.seed, r.status, r.duration,"
    " r.attempts, r.interruptions, CAST(round(r.finished * 1000000) AS INTEGER), r.code, 0)"
    " AS line, CASE WHEN r.error IS NULL AND r.traceback IS NULL THEN '{\"r\":'"
    " || {result} || '}' ELSE '{\"e\":' || json_quote(r.error)"
    " || ',\"t\":' || json_quote(r.traceback) || ',\"r\":' || {result}"
    " || '}' END AS doc FROM runs r {where} ORDER BY r.instance, r.config, r.iteration)"
).replace("{result}", _RESULT)
#: The runs after a key, at most so many: a whole read, chunk by chunk.
_LINES_AFTER = _LINES.replace("{where}", "WHERE (r.instance, r.config, r.iteration) > (?, ?, ?)")
_LINES_AFTER = _LINES_AFTER[:-1] + " LIMIT ?)"
#: The runs committed after a given commit (schema 3).
_LINES_SINCE = _LINES.replace("{where}", "WHERE r.seq > ?").replace(
    "FROM runs r",
    "FROM runs r INDEXED BY runs_seq",  # else SQLite scans all, to skip a sort
)
#: Runs per chunk of a whole read: about 25 MB of text with small results.
_CHUNK = 100_000

#: (instance id, config id): one row of the plan, one instance in one configuration.
Cell = tuple[int, int]

#: (first id, names, paths) of instances to insert with the next commit.
_NewInstances = tuple[int, Sequence[str], Sequence[str]]
_NOTHING_NEW: _NewInstances = (0, (), ())


class Counts(NamedTuple):
    """Finished runs of one instance."""

    done: int
    failed: int


class _Results(NamedTuple):
    """The results a store read last, and what it needs to extend them."""

    #: (readers opened, the forgotten count, the last commit read): the first two
    #: unchanged, the frame may be extended with the runs committed after the third.
    stamp: tuple[int, object, int | None]
    part: frames.Part
    names: dict[int, str]
    configs: dict[int, str]


class Store:
    """One experiment's state file: validation, a writer connection, cheap readers."""

    def __init__(self, path: str | os.PathLike[str], experiment: str, seed: int = 0) -> None:
        self.path = Path(path)
        self.experiment = experiment
        #: The experiment's "seed": the seeds of runs stored before seeds were (schema 1).
        self.seed = seed
        self._version = SCHEMA_VERSION  # of the file, as the reader last saw it
        self._opened = 0  # readers connected so far
        self._writer: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) the writer opened
        # Instances open_writer gave ids to, not inserted yet: (first id, names, paths).
        self._unregistered: _NewInstances = _NOTHING_NEW
        self._seq = 0  # the last commit's number (schema 3), kept by the writer
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._results: _Results | None = None  # what results_frame read last
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
                version = db.execute("PRAGMA main.user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise self._refuse(
                        f"written by a newer alma (schema {version}, this "
                        f"alma reads up to {SCHEMA_VERSION}); upgrade alma"
                    )
                row = db.execute("SELECT value FROM meta WHERE key='experiment'").fetchone()
                foreign = _foreign_objects(db, version)
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
        self._opened += 1
        self._version = db.execute("PRAGMA user_version").fetchone()[0]
        if self._version == 1:  # read as it is; the first session migrates it
            db.create_function("alma_seed", 2, self._seed_of, deterministic=True)
            db.executescript(_SCHEMA_1_VIEWS)
        return db

    def _seed_of(self, name: str, iteration: int) -> int:
        return seed_of(name, iteration, "{}", self.seed)

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap change detection)."""
        if not self.exists():
            return -1
        with self._reading() as db:
            # data_version is per connection: a reopened reader (see _Reading) must not
            # look unchanged by chance, so the count of readers opened is part of it.
            return (self._opened << 40) + int(db.execute("PRAGMA data_version").fetchone()[0])

    def instance_ids(self) -> dict[str, int]:
        """Ids of every instance the state knows (current and removed)."""
        if not self.exists():
            return {}
        with self._reading() as db:
            return dict(db.execute("SELECT name, id FROM instances"))

    def config_ids(self) -> dict[str, int]:
        """Ids of every configuration the state knows, by canonical JSON (current and
        removed)."""
        if not self.exists():
            return {}
        with self._reading() as db:
            return dict(db.execute("SELECT params, id FROM configs"))

    def counts(self, iterations: int) -> dict[Cell, Counts]:
        """Per (instance id, config id): done and failed runs among iterations
        ``0..iterations-1``."""
        if not self.exists():
            return {}
        with self._reading() as db:
            rows = db.execute(
                "SELECT instance, config, SUM(status = ?), SUM(status = ?) FROM runs "
                "WHERE iteration < ? GROUP BY instance, config",
                (DONE, FAILED, iterations),
            )
            return {(inst, cfg): Counts(done, failed) for inst, cfg, done, failed in rows}

    def finished_marks(self, cells: Sequence[Cell], iterations: int) -> dict[Cell, bytearray]:
        """Per (instance id, config id), 1 at every finished iteration (done or failed)
        below ``iterations``; each bytearray ends at the last finished one (see
        alma.plan), so memory follows the runs finished, not the runs planned."""
        marks = dict.fromkeys(cells, b"")
        if not self.exists():
            return {cell: bytearray() for cell in marks}
        found: dict[Cell, bytearray] = {}
        with self._reading() as db:
            rows = db.execute(
                "SELECT instance, config, max(iteration), group_concat(iteration) FROM runs "
                "WHERE iteration < ? GROUP BY instance, config",
                (iterations,),
            )
            for inst, cfg, last, its in rows:
                if (inst, cfg) in marks:
                    mark = found[inst, cfg] = bytearray(last + 1)
                    for it in map(int, its.split(",")):
                        mark[it] = 1
        return {cell: found.get(cell) or bytearray() for cell in marks}

    def checkpoints(self) -> dict[tuple[int, int, int], str]:
        """Last checkpoint (JSON text) of every unfinished run that saved one."""
        if not self.exists():
            return {}
        with self._reading() as db:
            rows = db.execute("SELECT instance, config, iteration, state FROM checkpoints")
            return {RunKey(i, c, it): s for i, c, it, s in rows}

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
        """One row per finished run; each parameter of the configurations and each key
        of a dict result becomes a column (see alma.frames).

        The frame is kept: the next call reads only the runs committed since (schema 3)
        and merges them in, unless runs were forgotten (reset) meanwhile. The caller
        gets its own copy to change as it likes.
        """
        if not self.exists():
            return frames.empty()
        with self._reading() as db:
            db.execute("BEGIN")  # one snapshot for every query below
            try:
                self._results = self._read_results(db, self._results)
            finally:
                db.execute("ROLLBACK")
        return frames.own_copy(self._results.part.frame)

    def _read_results(self, db: sqlite3.Connection, last: _Results | None) -> _Results:
        """The results now, from ``last`` and the runs committed since, or read whole."""
        forgotten = db.execute("SELECT value FROM meta WHERE key = 'forgotten'").fetchone()
        seq = db.execute("SELECT max(seq) FROM runs").fetchone()[0] if self._version >= 3 else None
        stamp = (self._opened, forgotten, seq)
        if seq is not None and last is not None and last.stamp[:2] == stamp[:2]:
            if seq == last.stamp[2]:
                return last
            new = db.execute("SELECT count(*) FROM runs WHERE seq > ?", last.stamp[2:]).fetchone()
            if new[0] * 4 < len(last.part.frame):  # else a whole read is as cheap
                names, configs = self._names_and_configs(db, last.names, last.configs)
                lines, docs = _fetch(db, _LINES_SINCE, last.stamp[2:])
                assert lines is not None and docs is not None  # counted, same snapshot
                new_part = frames.from_chunks([frames.parse(lines, docs)], names, configs)
                part = frames.merge(last.part, new_part)
                if part is not None:
                    return _Results(stamp, part, names, configs)
        names, configs = self._names_and_configs(db, {}, {})
        # Each chunk becomes a frame while SQLite writes the next, so little is left to
        # do at the end; chunks that typed a result key apart are read again as one.
        whole = frames.concat([frames.from_chunks([c], names, configs) for c in _chunks(db)])
        if whole is None:
            whole = frames.from_chunks(list(_chunks(db)), names, configs)
        return _Results(stamp, whole, names, configs)

    @staticmethod
    def _names_and_configs(
        db: sqlite3.Connection, names: dict[int, str], configs: dict[int, str]
    ) -> tuple[dict[int, str], dict[int, str]]:
        """``names`` and ``configs`` (by id; rows are never changed nor deleted) with
        those added since."""
        names, configs = dict(names), dict(configs)
        names.update(
            db.execute("SELECT id, name FROM instances WHERE id > ?", (max(names, default=0),))
        )
        configs.update(
            db.execute("SELECT id, params FROM configs WHERE id > ?", (max(configs, default=0),))
        )
        return names, configs

    # -- writing (the dispatcher's side only) ------------------------------------------

    def open_writer(
        self,
        names: Sequence[str],
        paths: Sequence[str],
        configs: Sequence[Config],
        iterations: int,
        code: str,
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Open (creating if new, migrating if older) for writing; register this
        session, the ``configs`` and give the instances (``names``, with their
        ``paths``) that the state does not know yet their ids. Returns the id of every
        instance and of every configuration (by canonical JSON) the state knows, those
        given included.
        """
        self.validate()
        batch_size = len(names)
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
            else:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version == 1:
                    self._migrate_from_1(db)
                if version <= 2:
                    self._migrate_from_2(db)
            self._seq = db.execute("SELECT coalesce(max(seq), 0) FROM runs").fetchone()[0]
            known = {text for (text,) in db.execute("SELECT params FROM configs")}
            db.executemany(
                "INSERT INTO configs (params) VALUES (?)",
                [(c.key,) for c in configs if c.key not in known],
            )
            config_ids = dict(db.execute("SELECT params, id FROM configs"))
            ids = dict(db.execute("SELECT name, id FROM instances"))
            # New instances get their ids now but are inserted by the first group commit
            # (write()), in the writer thread: registering 100,000 files costs ~0.3 s of
            # index building that start() need not wait for. Nothing refers to them until
            # a run of theirs is committed in that same transaction; the OS lock keeps
            # every other writer out meanwhile, so the ids cannot be taken.
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM instances").fetchone()[0]
            if ids:
                new = [pos for pos, name in enumerate(names) if name not in ids]
                names, paths = [names[p] for p in new], [paths[p] for p in new]
            self._unregistered = (first, names, paths)
            ids.update(zip(names, range(first, first + len(names)), strict=True))
            db.execute(
                "INSERT INTO sessions (started, pid, host, code, iterations, instances)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), os.getpid(), socket.gethostname(), code, iterations, batch_size),
            )
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        self._writer = db
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        return ids, config_ids

    def _migrate_from_1(self, db: sqlite3.Connection) -> None:
        """Schema 1 (alma 0.1) to 2, in the caller's transaction, so a crash midway
        leaves the old file as it was: its runs and checkpoints belong to the empty
        configuration ``{}``; each run gets the seed it would be given now."""
        db.create_function("alma_seed", 2, self._seed_of, deterministic=True)
        db.execute("ALTER TABLE runs RENAME TO runs_1")
        db.execute("ALTER TABLE checkpoints RENAME TO checkpoints_1")
        for statement in _SCHEMA_2.split(";"):
            table = statement.split("(")[0].split()[-1] if statement.strip() else ""
            if table in ("configs", "runs", "checkpoints"):
                db.execute(statement)
        db.execute("INSERT INTO configs VALUES (?, '{}')", (_EMPTY_CONFIG_ID,))
        db.execute(
            "INSERT INTO runs SELECT r.instance, ?, r.iteration, r.status, r.result, r.error,"
            " r.traceback, r.attempts, r.duration, r.finished, r.code, alma_seed(i.name,"
            " r.iteration), 0 FROM runs_1 r JOIN instances i ON i.id = r.instance",
            (_EMPTY_CONFIG_ID,),
        )
        db.execute(
            "INSERT INTO checkpoints SELECT instance, ?, iteration, state, saved"
            " FROM checkpoints_1",
            (_EMPTY_CONFIG_ID,),
        )
        db.execute("DROP TABLE runs_1")
        db.execute("DROP TABLE checkpoints_1")
        db.execute("PRAGMA user_version=2")

    def _migrate_from_2(self, db: sqlite3.Connection) -> None:
        """Schema 2 to 3, in the caller's transaction: the runs stored so far count as
        committed before any commit a reader has seen (``seq`` 0)."""
        for statement in _SCHEMA_3_CHANGES.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
            self._register_new(db)
            # map(tuple): sqlite3 binds exact tuples ~1 µs per row faster than NamedTuples.
            db.executemany(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)", map(tuple, checkpoints)
            )
            # The commit's number, a literal: one more parameter per row would cost more.
            db.executemany(
                "INSERT OR REPLACE INTO runs VALUES"
                f" (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {self._seq + 1})",
                map(tuple, runs),
            )
            db.executemany(
                "DELETE FROM checkpoints WHERE instance = ? AND config = ? AND iteration = ?",
                drop_checkpoints,
            )
            db.execute("COMMIT")
            self._unregistered = _NOTHING_NEW
            self._seq += 1
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
            self._register_new(db)
            if failed_only:
                n = db.execute("DELETE FROM runs WHERE status = ?", (FAILED,)).rowcount
            else:
                n = db.execute("DELETE FROM runs").rowcount
            if not failed_only:
                db.execute("DELETE FROM checkpoints")
            # Readers keep the results they read: this tells them to read them again.
            db.execute(
                "INSERT INTO meta VALUES ('forgotten', '1')"
                " ON CONFLICT (key) DO UPDATE SET value = value + 1"
            )
            db.execute("COMMIT")
            self._unregistered = _NOTHING_NEW
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return n

    def _register_new(self, db: sqlite3.Connection) -> None:
        """Insert the instances open_writer gave ids to (in the caller's transaction)."""
        first, names, paths = self._unregistered
        if names:
            db.executemany(
                "INSERT INTO instances VALUES (?, ?, ?)",
                zip(range(first, first + len(names)), names, paths, strict=True),
            )

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
            self._unregistered = _NOTHING_NEW

    def close(self) -> None:
        """Close every connection this object holds."""
        self.close_writer()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


def _chunks(db: sqlite3.Connection) -> Iterator[frames.Chunk]:
    """Every run, parsed chunk by chunk; SQLite writes the next chunk (in a thread,
    without the GIL) while pyarrow parses this one and the caller uses it."""

    def fetch(after: Sequence[int]) -> tuple[bytes | None, bytes | None]:
        return _fetch(db, _LINES_AFTER, (*after, _CHUNK))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fetch, (-1, -1, -1))
        while True:
            lines, docs = pending.result()
            if lines is None or docs is None:
                return
            pending = pool.submit(fetch, json.loads(lines[lines.rfind(b"\n") + 1 :])[1:4])
            yield frames.parse(lines, docs)


def _fetch(
    db: sqlite3.Connection, query: str, params: Sequence[object]
) -> tuple[bytes | None, bytes | None]:
    """The lines and the documents of ``query``, one of each per run: UTF-8 bytes,
    as SQLite wrote them (no decoding to ``str`` and back for pyarrow)."""
    lines, docs = db.execute(query, params).fetchone()
    if lines is not None and docs is not None and docs.count(b"\n") != lines.count(b"\n"):
        lines, docs = db.execute(query.replace(_RESULT, _RESULT_ESCAPED), params).fetchone()
    return lines, docs


def _moved_away(path: Path, identity: tuple[int, int] | None) -> str | None:
    """What happened to the file opened as ``identity`` (device, inode), if it is no
    longer the one at ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "was deleted (or moved away)"
    return None if (st.st_dev, st.st_ino) == identity else "was replaced by another file"


@functools.cache
def _own_objects(version: int) -> frozenset[tuple[str, str, str | None]]:
    """(type, name, sql) of every schema object alma creates in a file of schema
    ``version``: tables and their indexes."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.executescript(_SCHEMAS.get(version, ""))
        return frozenset(db.execute("SELECT type, name, sql FROM sqlite_master"))


def _foreign_objects(db: sqlite3.Connection, version: int) -> list[str]:
    """Schema objects alma did not create (or whose definition was changed), by name."""
    own = _own_objects(version)
    rows = db.execute("SELECT type, name, sql FROM main.sqlite_master").fetchall()
    return sorted(f"{kind} {name}" for kind, name, sql in rows if (kind, name, sql) not in own)


class _Reading:
    """Context manager lending the store's shared read-only connection to one caller."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        s = self.store
        s._read_lock.acquire()
        try:
            if s._reader is not None and s._version != SCHEMA_VERSION:
                # Opened on a new or a schema-1 file: a session may have created or
                # migrated the schema since. (A current file needs no such check.)
                version = s._reader.execute("PRAGMA main.user_version").fetchone()[0]
                if version != s._version:
                    s._reader.close()
                    s._reader = None
            if s._reader is None:
                s._reader = s._connect_reader()
        except sqlite3.Error as exc:
            s._read_lock.release()
            if isinstance(exc, sqlite3.OperationalError):
                raise s._refuse(f"cannot be opened ({exc})") from None
            raise s._refuse(f"unreadable or corrupt ({exc})") from None
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
