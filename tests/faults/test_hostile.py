"""Nothing foreign is run, nothing outside is touched: a state file or a lock file
planted by someone else, and junk on the Dask checkpoint channel."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, alma_cli, wait_until

import alma
import alma.experiment


def _state(exp: Path) -> Path:
    return exp.with_name(exp.name + ".sqlite")


@pytest.mark.parametrize(
    "planted",
    [
        "CREATE TRIGGER wipe AFTER INSERT ON runs BEGIN DELETE FROM runs; END",
        "CREATE VIEW v AS SELECT * FROM runs",
        "CREATE TABLE extra (x)",
        "CREATE INDEX by_status ON runs (status)",
    ],
)
def test_a_state_file_with_foreign_schema_objects_is_refused_untouched(
    make_experiment: ExperimentFactory, tmp_path: Path, planted: str
) -> None:
    exp = make_experiment(instances=2, iterations=2)
    assert alma_cli("run", "-q", exp).returncode == 0
    with contextlib.closing(sqlite3.connect(_state(exp))) as db:
        db.execute(planted)
        db.commit()
    before = _state(exp).read_bytes()
    with pytest.raises(alma.StateError, match="schema objects alma did not create"):
        alma.experiment.load(exp)
    done = alma_cli("run", exp)
    assert done.returncode == 3 and "did not create" in done.stderr
    assert _state(exp).read_bytes() == before  # nothing written, nothing fired


@pytest.mark.parametrize(
    ("plant", "message"),
    [("symlink_to", "is a symbolic link"), ("hardlink_to", "not a plain file of its own")],
)
def test_a_planted_lock_link_is_refused_and_its_target_untouched(
    make_experiment: ExperimentFactory, tmp_path: Path, plant: str, message: str
) -> None:
    exp = make_experiment()
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch")
    getattr(Path(f"{_state(exp)}.lock"), plant)(victim)
    done = alma_cli("run", exp)
    assert done.returncode == 3 and message in done.stderr, done.stderr
    assert victim.read_text() == "do not touch"


# -- the Dask executor's direct checkpoint channel ------------------------------------


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("distributed")
    from alma.executors import dask as dask_executor

    monkeypatch.setattr(dask_executor, "AUTH_TIMEOUT", 1.0)
    seen: list[tuple[tuple[int, int, int], str]] = []

    def handler(key: tuple[int, int, int], state: str) -> str:
        seen.append((tuple(key), state))
        return "ok"

    server = dask_executor._CheckpointServer.open("127.0.0.1", handler)
    assert server is not None
    yield server, seen
    server.close()


def _connect(server: Any) -> socket.socket:
    host, port, _ = server.channel
    return socket.create_connection((host, port), timeout=10)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _good_checkpoint(server: Any) -> bytes:
    from multiprocessing.connection import Connection

    sock = _connect(server)
    sock.setblocking(True)
    conn = Connection(sock.detach())
    try:
        conn.send_bytes(json.dumps({"secret": server.channel[2]}).encode())
        conn.send_bytes(json.dumps([1, 1, 2, '{"x": 1}']).encode())
        return conn.recv_bytes()
    finally:
        conn.close()


def test_a_stalled_connection_is_dropped_before_it_authenticates(channel: Any) -> None:
    server, seen = channel
    stalled = _connect(server)
    start = time.monotonic()
    assert _closed_by_peer(stalled, within=10)
    assert time.monotonic() - start < 5  # AUTH_TIMEOUT is 1 s here
    assert _good_checkpoint(server) == b"ok" and seen == [((1, 1, 2), '{"x": 1}')]


def test_a_huge_length_header_allocates_nothing_and_is_dropped(channel: Any) -> None:
    server, _ = channel
    junk = _connect(server)
    junk.sendall(struct.pack("!i", 2**31 - 1))  # "2 GB follow"
    assert _closed_by_peer(junk, within=10)
    assert _good_checkpoint(server) == b"ok"


def test_a_flood_of_unauthenticated_connections_is_bounded(channel: Any) -> None:
    from alma.executors import dask as dask_executor

    server, _ = channel
    flood = [_connect(server) for _ in range(dask_executor.MAX_UNAUTHENTICATED + 8)]
    try:
        # Those beyond the bound are closed at once, the others within AUTH_TIMEOUT.
        wait_until(lambda: all(_closed_by_peer(s, within=0.05) for s in flood), timeout=10)
        assert _good_checkpoint(server) == b"ok"
    finally:
        for s in flood:
            s.close()


def _wildcard_listeners() -> set[str]:
    """Local addresses of TCP sockets listening on every interface (from /proc/net)."""
    found = set()
    for table, wildcard in (("tcp", "00000000"), ("tcp6", "0" * 32)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and local.split(":")[0] == wildcard:  # 0A: LISTEN
                    found.add(f"{table} {local}")
    return found


@pytest.mark.slow
def test_a_local_dask_cluster_listens_on_loopback_only(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    pytest.importorskip("distributed")
    exp = make_experiment(
        "import time\n\ndef run(instance, save_callback, state):\n    time.sleep(0.2)\n",
        instances=4,
        iterations=3,
        workers=2,
        executor="dask",
    )
    before = _wildcard_listeners()
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    wait_until(lambda: d.progress.done >= 1, timeout=60)
    during = _wildcard_listeners()
    assert d.join(timeout=60)
    assert during - before == set()
