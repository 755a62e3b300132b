"""Run on a Dask cluster: a local one (``"dask"``) or an existing scheduler
(``{"dask": "tcp://host:8786"}``), for experiments that outgrow one machine.

Why Dask and not a home-made protocol: it already knows how to start workers on SLURM,
PBS or Kubernetes (dask-jobqueue, dask-kubernetes), reschedules the tasks of a worker
that dies, and shows a dashboard.

How a run travels:

* The run function goes to workers with cloudpickle, **by value** for code that is
  not an installed package (an experiment's run module, a notebook cell), so workers
  need pyalma and the run's imports installed, but not the run module's file.
* A bounded window of runs is submitted at a time, refilled as runs complete (via
  ``distributed.as_completed``), so a stop never has thousands of queued tasks to
  cancel and the plan order is kept. It is ``2 × workers``, grown up to
  ``16 × workers`` for short runs, so that the queue covers the round trip between
  the dispatcher and the scheduler (``REFILL_LATENCY``) and workers never idle.
* Checkpoints: ``save_callback`` on a worker sends the JSON text to the dispatcher
  and waits for its answer: "ok" once committed, or "stop" when a stop was asked, so
  ``save_callback`` stays durable and stop is honoured at the next checkpoint, as with
  threads. The message goes over a direct TCP connection to the dispatcher when the
  worker can open one (:class:`_CheckpointServer`), else through the scheduler: a
  per-session ``distributed.Queue`` there, and a per-run reply queue back.
* Results come back as the tasks' results; only the dispatcher writes the store, and a
  run is reported once, from its one future, whatever Dask did underneath.

Stop: every worker is told the session stops (``Client.run``, served by the workers'
event loops even while their threads compute) and answers which of our tasks have
started there; futures that have not started are cancelled, those that start late see
the flag and return without calling ``run``, runs in progress are interrupted at their
next ``save_callback`` (after it saved). A run that never checkpoints goes on to its
end and its result is kept, as with threads.

A worker killed mid-run: Dask reschedules its task on another worker, with the
arguments it was submitted with, so with a checkpoint that may be older than the
last committed one. Each execution of a task sends an id of its own with its
checkpoints: the first checkpoint of a second execution of the same task, after the
first one had committed some, is refused with the latest checkpoint instead, and the
run starts again from there (the work since that checkpoint is redone, none is lost).
If Dask gives up (``KilledWorker``, after the task was on several dying workers),
alma resubmits it with its latest checkpoint, at most ``MAX_RESUBMITS`` times, then
records the run as failed with that error.

A worker about to leave (:data:`EXIT`, set on the worker by an executor whose
workers live in batch jobs: the walltime is near, or SLURM sent SIGTERM) starts no
run and interrupts its running ones at their next checkpoint, after it saved; they
come back as "handed back" and are submitted again at once, to another worker, from
that checkpoint: neither a failure nor a retry.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import itertools
import json
import logging
import math
import secrets
import socket
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import AlmaError, ConfigError, Interrupted
from ..records import FAILED, Outcome, RunKey, Task
from ..runfunc import ShippedRun, make_caller, neighbours, ship, unship
from .base import Executor, RunSource, execute

log = logging.getLogger(__name__)

#: Seconds to wait for an external scheduler before giving up with a clear error.
CONNECT_TIMEOUT = 10.0
#: Runs submitted ahead, per worker: at least enough to keep workers busy between
#: round trips, more for short runs (up to the maximum), see REFILL_LATENCY.
IN_FLIGHT_PER_WORKER = 2
MAX_IN_FLIGHT_PER_WORKER = 16
#: Seconds of work to keep queued per worker: a completed run's refill takes a round
#: trip through the scheduler, and a worker should not idle meanwhile.
REFILL_LATENCY = 0.05
#: Times alma resubmits a run that Dask gave up on (KilledWorker) before failing it.
MAX_RESUBMITS = 2
#: Seconds a worker waits for the dispatcher to commit a checkpoint before giving up
#: (the dispatcher's process is gone): the run is then abandoned, as by a stop. It
#: gives up sooner when Dask cancelled the task (the dispatcher's client went away).
CHECKPOINT_ACK_TIMEOUT = 300.0
#: Seconds between checks, while waiting, that the task is still wanted.
_ACK_POLL = 10.0
#: Send checkpoints straight from workers to the dispatcher when they can connect
#: (one round trip), else through the scheduler's queues (several).
DIRECT_CHECKPOINTS = True
#: Seconds a worker tries to open the direct channel before using the queues.
DIRECT_CONNECT_TIMEOUT = 3.0
#: Seconds a connection to the direct channel has to show the session's secret.
AUTH_TIMEOUT = 3.0
#: Connections that have not authenticated yet, at most; more are dropped at once.
MAX_UNAUTHENTICATED = 32

_INSTALL_HINT = 'Install it with: pip install "pyalma[dask]"'
#: What a Dask task returns instead of an Outcome when its run did not end.
_SKIPPED = "skipped"  # the session stopped before the run started
_INTERRUPTED = "interrupted"  # a stop aborted it at a checkpoint: owed again
_HANDED_BACK = "handed back"  # its worker is leaving: submit it again elsewhere
_DECLINED = "declined"  # its worker is leaving: it did not start; submit it again
#: The dispatcher's answer to a checkpoint from a stale execution: "restart:" + the
#: last committed checkpoint, to start again from.
_RESTART = "restart:"


def _distributed() -> Any:
    """Import Dask distributed on first use; a missing package says what to install."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(
            f'executor "dask" needs Dask distributed, which is not installed ({exc}). '
            + _INSTALL_HINT
        ) from None
    return distributed


class DaskExecutor(Executor):
    """Submits runs to a Dask cluster, ``2 × workers`` at a time."""

    usage = (
        '"dask" (a local cluster), {"dask": {"memory_limit": "4GB", ...}} (a local cluster '
        'with LocalCluster options) or {"dask": "tcp://host:8786"} (a running scheduler)'
    )

    @classmethod
    def parse_options(cls, options: Any) -> Any:
        """None (a local cluster), a dict of LocalCluster keyword arguments, or a
        scheduler's address; Dask must be installed."""
        if isinstance(options, dict):
            bad = [k for k in options if not isinstance(k, str) or not k.isidentifier()]
            if bad:
                raise ValueError(f"LocalCluster options are keyword names, got {bad!r}")
        elif options is not None and (not isinstance(options, str) or not options):
            raise ValueError(
                "a Dask scheduler is given by its address, a local cluster's options as an object"
            )
        if importlib.util.find_spec("distributed") is None:
            raise ConfigError(
                'executor "dask" needs Dask distributed, which is not installed. ' + _INSTALL_HINT
            )
        return options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: Any = None
        self._cluster: Any = None
        self._session = f"alma-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._futures: dict[str, Any] = {}  # dask key -> future, in flight
        self._tasks: dict[RunKey, Task] = {}  # run key -> task, in flight
        #: run key -> (dask key, execution id) whose checkpoint was committed last.
        self._writers: dict[RunKey, tuple[str, str]] = {}
        #: run key -> times its worker left under it, this session (Outcome.interruptions).
        self._interruptions: dict[RunKey, int] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- Executor interface ----------------------------------------------------------

    def start(self, source: RunSource) -> None:
        distributed = _distributed()
        # Pickling problems surface here, in start().
        payload = ship(self.run, "dask", "Dask workers", remote=True)
        if isinstance(self.options, str):
            self._client = self._connect(distributed, self.options)
            self._upload_neighbours()
        self._thread = threading.Thread(
            target=self._drive, args=(source, distributed, payload), name="alma-dask", daemon=True
        )
        self._thread.start()

    @property
    def dashboard(self) -> str | None:
        """The Dask dashboard of the cluster in use (None before it is reached)."""
        client = self._client
        try:
            return str(client.dashboard_link) if client is not None else None
        except Exception:  # no dashboard (bokeh missing, or none configured)
            return None

    def stop(self) -> None:
        """Tell workers the session stops, then cancel the tasks that have not started."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        threading.Thread(target=self._cancel_unstarted, name="alma-dask-stop", daemon=True).start()

    # -- connecting ------------------------------------------------------------------

    def _connect(self, distributed: Any, address: str) -> Any:
        """A client of an existing scheduler, or an AlmaError within CONNECT_TIMEOUT."""
        try:
            return distributed.Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except Exception as exc:
            raise AlmaError(
                f"cannot reach the Dask scheduler at {address!r} within {CONNECT_TIMEOUT:g} s "
                f"({type(exc).__name__}: {exc}). Check the address in the experiment's "
                '"executor" field and that `dask scheduler` runs there and is reachable '
                'from this machine; or use "executor": "dask" for a local cluster.'
            ) from exc

    def _upload_neighbours(self) -> None:
        """Send the modules and packages the run module imports from its own folder to
        the workers (which may be on machines without that folder); workers that join
        later get them too. A package travels as a zip archive, which Dask puts on the
        workers' sys.path. A local cluster needs none of this: its workers share this
        sys.path."""
        with tempfile.TemporaryDirectory(prefix="alma-upload-") as tmp:
            for path in neighbours(self.run):
                try:
                    upload = _zip_package(path, Path(tmp)) if path.is_dir() else path
                    self._client.upload_file(str(upload), load=True)
                except Exception as exc:
                    raise AlmaError(
                        f"cannot send {path} (imported by the run module) to the Dask "
                        f"workers ({type(exc).__name__}: {exc}). Install it where the "
                        "workers run, or move what run() needs into the run module."
                    ) from exc

    def _direct_host(self) -> str | None:
        """The address of this machine that the workers can reach, or None.

        A local cluster: loopback. An external ``tcp://`` scheduler: the address of the
        interface that routes to it (workers usually share its network). Anything else
        (TLS, UCX): no direct channel, checkpoints go through the scheduler.
        """
        if not DIRECT_CHECKPOINTS:
            return None
        if not isinstance(self.options, str):  # a local cluster
            return "127.0.0.1"
        address = str(self.options)
        if not address.startswith("tcp://"):
            return None
        host, _, port = address[len("tcp://") :].rpartition(":")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host.strip("[]"), int(port)))  # no packet is sent
                return str(probe.getsockname()[0])
        except (OSError, ValueError):
            return None

    def _start_cluster(self, distributed: Any) -> Any:
        """The client of the cluster this executor starts (in the driver thread, so
        start() returns at once); subclasses start other kinds of cluster."""
        return self._local_cluster(distributed)

    def _cluster_failure(self, exc: Exception) -> str:
        """What to tell the user when :meth:`_start_cluster` raised ``exc``."""
        return (
            f"starting a local Dask cluster failed: {type(exc).__name__}: {exc}. Dask "
            "starts its workers by re-importing your __main__: in a script, put the code "
            'that starts the experiment under if __name__ == "__main__":.'
        )

    def _local_cluster(self, distributed: Any) -> Any:
        """A LocalCluster of ``workers`` single-threaded worker processes (no GIL sharing),
        with the experiment's LocalCluster options on top."""
        options = {
            "n_workers": self.workers,
            "threads_per_worker": 1,
            "processes": True,
            # Loopback only: the dashboard serves worker pages without authentication.
            "dashboard_address": "127.0.0.1:0",
        }
        options.update(self.options if isinstance(self.options, dict) else {})
        self._cluster = distributed.LocalCluster(**options)
        return distributed.Client(self._cluster, set_as_default=False)

    # -- the driver --------------------------------------------------------------------

    def _drive(self, source: RunSource, distributed: Any, payload: ShippedRun) -> None:
        """Submit a bounded window of runs, collect their outcomes, relay checkpoints."""
        relay: _CheckpointRelay | None = None
        try:
            if self._client is None:
                if self._stopping:
                    return
                try:
                    self._client = self._start_cluster(distributed)
                except Exception as exc:
                    self._cluster_failed(source, exc)
                    return
            relay = _CheckpointRelay(self, source, distributed)
            _Window(self, source, distributed, payload, relay).run()
        except BaseException as exc:  # a bug of alma's, not a run's: never silent
            source.executor_failed(exc)
        finally:
            if relay is not None:
                relay.close()  # no checkpoint may reach the session after this
            # Shut down first: once executor_done() returns, join() returns, and a
            # script may exit or start() again before a local cluster has closed.
            self._end_session()
            self._shutdown()
            source.executor_done()

    def _cluster_failed(self, source: RunSource, exc: Exception) -> None:
        """No cluster, no run: say why where front-ends look (last_error) and warn."""
        message = self._cluster_failure(exc)
        log.error("%s", message, exc_info=None if isinstance(exc, AlmaError) else exc)
        warnings.warn(f"alma: {message}", stacklevel=1)
        error = AlmaError(message)
        error.__cause__ = exc
        source.executor_failed(error)  # shown by the controller and the CLI

    def _cancel_unstarted(self) -> None:
        """Stop: flag the session on every worker, cancel the futures not started yet."""
        client = self._client
        if client is None:
            return
        try:
            started_by_worker = client.run(_mark_stopped, self._session, on_error="ignore")
            started = set().union(*[v for v in started_by_worker.values() if isinstance(v, list)])
            with self._lock:
                unstarted = [f for k, f in self._futures.items() if k not in started]
            if unstarted:
                client.cancel(unstarted)
        except Exception:
            log.exception("cancelling Dask tasks on stop failed")

    def _end_session(self) -> None:
        """Let workers drop this session's cached function and queue handles."""
        client = self._client
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.run(_forget_session, self._session, on_error="ignore")

    def _shutdown(self) -> None:
        """Close the client, and the local cluster if we started it."""
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        with contextlib.suppress(Exception):
            if client is not None:
                client.close(timeout=10)
        with contextlib.suppress(Exception):
            if cluster is not None:
                cluster.close(timeout=10)


class _Window:
    """The runs submitted to Dask and not yet collected: at most ``size`` at a time,
    refilled from the session as they complete, resized to the runs' duration."""

    def __init__(
        self,
        executor: DaskExecutor,
        source: RunSource,
        distributed: Any,
        payload: ShippedRun,
        relay: _CheckpointRelay,
    ) -> None:
        self.ex = executor
        self.source = source
        self.distributed = distributed
        self.payload = payload
        self.relay = relay
        self.client = executor._client
        self.token = f"{executor._session}-{uuid.uuid4().hex[:8]}"
        self.size = IN_FLIGHT_PER_WORKER * executor.workers
        self.mean: float | None = None  # moving average of run durations
        # with_results: results are fetched on the client's event loop as tasks end,
        # not by a blocking round trip per run from this thread.
        self.ac = distributed.as_completed(
            with_results=True, raise_errors=False, loop=self.client.loop
        )
        self.meta: dict[str, tuple[Task, int]] = {}  # dask key -> (task, resubmits)
        self.seq = itertools.count()
        self.done: list[tuple[Task, Outcome]] = []  # collected, to report

    def run(self) -> None:
        """Until nothing is owed or in flight: collect what completed, refill."""
        self.refill()
        while not self.ac.is_empty():
            batch = self.ac.next_batch(block=True)
            with self.ex._lock:
                for fut, _ in batch:
                    self.ex._futures.pop(fut.key, None)
            try:
                for fut, res in batch:
                    task, resubmits = self.meta.pop(fut.key)
                    self.collect(task, fut, res, resubmits)
                    fut.release()  # now: a worker that leaves must not be asked to keep it
                    if fut.status == "finished" and isinstance(res, Outcome):
                        self.resize(res.duration / res.attempts)
            finally:
                self.flush()
            self.refill()

    def flush(self) -> None:
        """Report the runs collected from one batch of completed futures, in one call."""
        if self.done:
            done, self.done = self.done, []
            self.source.report_all(done)

    def resize(self, seconds: float) -> None:
        """Keep REFILL_LATENCY seconds of work queued per worker (within bounds)."""
        self.mean = seconds if self.mean is None else 0.8 * self.mean + 0.2 * seconds
        per_worker = math.ceil(REFILL_LATENCY / max(self.mean, 1e-4))
        per_worker = min(max(per_worker, IN_FLIGHT_PER_WORKER), MAX_IN_FLIGHT_PER_WORKER)
        self.size = per_worker * self.ex.workers

    def refill(self) -> None:
        free = self.size - len(self.meta)
        if free > 0 and not self.ex._stopping:
            tasks = self.source.next_tasks(free)
            if tasks:
                self.submit([(task, 0) for task in tasks])

    def submit(self, tasks: list[tuple[Task, int]]) -> None:
        """Submit (task, resubmits) pairs in one client.map: one graph update, not one
        per run."""
        session = self.ex._session
        # Unique per submission: a run submitted again must not get its old future back.
        keys = [
            f"alma-run-{session}-{'-'.join(map(str, t.key))}-{next(self.seq)}" for t, _ in tasks
        ]
        n = len(tasks)
        futures = self.client.map(
            _dask_run,
            [session] * n,
            [self.token] * n,
            [self.payload] * n,
            keys,
            [t.key for t, _ in tasks],
            [t.path for t, _ in tasks],
            [t.iteration for t, _ in tasks],
            [t.params for t, _ in tasks],
            [t.seed for t, _ in tasks],
            [t.checkpoint for t, _ in tasks],
            [self.ex.retries] * n,
            [self.relay.channel] * n,
            key=keys,
            pure=False,
        )
        now = time.time()  # Dask runs them as its workers free up: running from here
        with self.ex._lock:
            for key, fut, (task, _) in zip(keys, futures, tasks, strict=True):
                task.started = now
                self.ex._futures[key] = fut
                self.ex._tasks[task.key] = task
        self.meta.update(zip(keys, tasks, strict=True))
        self.ac.update(futures)

    def collect(self, task: Task, fut: Any, res: Any, resubmits: int) -> None:
        """Report, abandon or resubmit one finished future."""
        stopping = self.ex._stopping
        status = fut.status
        if status == "finished":
            if isinstance(res, Outcome):
                res.interruptions = self.untrack(task)
                self.done.append((task, res))
                return
            if res in (_HANDED_BACK, _DECLINED) and not stopping:  # its worker leaves
                if res == _HANDED_BACK:
                    self.interrupted(task)
                self.submit([(task, resubmits)])  # from its latest checkpoint, elsewhere
                return
            # _SKIPPED (the session stopped before it started) or _INTERRUPTED
        elif status == "error" and not stopping:
            exc = res[1] if isinstance(res, tuple) and len(res) == 3 else fut.exception()
            killed = isinstance(exc, self.distributed.KilledWorker)
            if killed and resubmits < MAX_RESUBMITS:
                log.warning("%s iteration %s: %s; resubmitting", task.instance, task.iteration, exc)
                self.interrupted(task)
                self.submit([(task, resubmits + 1)])  # with task.checkpoint: the latest one
                return
            error = f"{type(exc).__name__}: {exc}"
            if killed:
                error = (
                    f"WorkerDied: the Dask workers running this run died {resubmits + 1} "
                    f"time(s) ({error}); out of memory?"
                )
            interruptions = self.untrack(task)
            self.source.report(task, Outcome(FAILED, None, error, None, 1, 0.0, interruptions))
            return
        elif status != "cancelled" and not stopping:  # lost: try again
            self.interrupted(task)
            self.submit([(task, resubmits)])
            return
        self.untrack(task)
        self.source.abandon(task)

    def interrupted(self, task: Task) -> None:
        """The run's worker left under it; it goes on elsewhere from its checkpoint."""
        with self.ex._lock:
            self.ex._interruptions[task.key] = self.ex._interruptions.get(task.key, 0) + 1

    def untrack(self, task: Task) -> int:
        """Forget a run that ended here; returns how many times it was interrupted."""
        with self.ex._lock:
            self.ex._tasks.pop(task.key, None)
            self.ex._writers.pop(task.key, None)
            interruptions = self.ex._interruptions.pop(task.key, 0)
        self.relay.forget(task.key)
        return interruptions


class _CheckpointRelay:
    """Brings workers' checkpoints to the session and its answers back: over the direct
    channel (:class:`_CheckpointServer`) when workers can connect, else through a
    per-session queue on the scheduler and a reply queue per run."""

    def __init__(self, executor: DaskExecutor, source: RunSource, distributed: Any) -> None:
        self.ex = executor
        self.source = source
        self.distributed = distributed
        self.client = executor._client
        self._replies: dict[RunKey, Any] = {}  # run key -> its reply queue
        self.queue = distributed.Queue(f"{executor._session}-ckpt", client=self.client)
        self._receiver = threading.Thread(
            target=self._receive, name="alma-dask-checkpoints", daemon=True
        )
        self._receiver.start()
        self._server = _CheckpointServer.open(executor._direct_host(), self.commit)
        self.channel = None if self._server is None else self._server.channel

    def commit(self, run_key: RunKey, state: str, key: str = "", execution: str = "") -> str:
        """Commit one checkpoint sent by a worker; the answer: "ok", "stop", or
        "restart:" and the checkpoint to start again from.

        ``key`` and ``execution`` name the Dask task and this execution of it. A second
        execution of a task whose first one committed checkpoints is Dask rerunning it
        after its worker died, from the checkpoint it was submitted with: older than
        the last one committed, so it is refused and the run restarts from that one.
        """
        with self.ex._lock:
            task = self.ex._tasks.get(run_key)
            if task is None:  # abandoned (stop) or finished: nobody stores it any more
                return "stop"
            writer = self.ex._writers.get(run_key)
            self.ex._writers[run_key] = (key, execution)
            if execution and writer and writer[0] == key and writer[1] != execution:
                self.ex._interruptions[run_key] = self.ex._interruptions.get(run_key, 0) + 1
                if task.checkpoint is not None:
                    return _RESTART + task.checkpoint
        task.checkpoint = state
        try:
            self.source.checkpoint(task, state)  # returns once committed
        except Interrupted:
            return "stop"
        return "ok"

    def forget(self, key: RunKey) -> None:
        """The run has ended: drop its reply queue."""
        with self.ex._lock:
            reply = self._replies.pop(key, None)
        if reply is not None:
            with contextlib.suppress(Exception):
                reply.close()

    def _receive(self) -> None:
        """Commit checkpoints sent through the queue and answer each: "ok" or "stop".

        Blocks on the queue without a timeout (a timed-out get is logged as an error by
        the scheduler); close() ends this loop by putting ``None`` on the queue.
        """
        while True:
            try:
                item = self.queue.get()
            except Exception:  # the client or the scheduler is gone
                return
            if item is None:
                return
            reply_name, inst, cfg, it, state, *execution = item
            key = RunKey(inst, cfg, it)
            answer = self.commit(key, state, *execution)
            try:
                with self.ex._lock:
                    reply = self._replies.get(key)
                if reply is None or reply.name != reply_name:
                    if reply is not None:
                        reply.close()
                    # One handle per run, kept until the run ends: a queue is created
                    # on the scheduler once, not at every checkpoint.
                    reply = self.distributed.Queue(reply_name, client=self.client)
                    with self.ex._lock:
                        self._replies[key] = reply
                reply.put(answer)
            except Exception:
                log.exception("answering a checkpoint failed")

    def close(self) -> None:
        """End the receiver and the direct channel; close every queue handle."""
        with contextlib.suppress(Exception):
            self.queue.put(None)  # ends the receiver
        self._receiver.join(10)
        if self._server is not None:
            self._server.close()
        with self.ex._lock:
            replies, self._replies = list(self._replies.values()), {}
        for reply in [*replies, self.queue]:
            with contextlib.suppress(Exception):
                reply.close()


class _CheckpointServer:
    """The fast path for checkpoints: workers connect straight to the dispatcher.

    A checkpoint through the scheduler's queues costs several round trips; a direct
    TCP connection (one per worker process and session) costs one. Messages are JSON
    (never pickle: anyone on the network could connect), and a connection must first
    present the session's random secret. Workers that cannot connect (a firewall, a
    NAT) fall back to the queues, so this only ever makes checkpoints faster.
    """

    def __init__(self, sock: socket.socket, handler: Callable[..., str]) -> None:
        self._sock = sock
        self._handler = handler
        self._secret = secrets.token_hex(16)
        host, port = sock.getsockname()[:2]
        self.channel = (str(host), int(port), self._secret)
        self._conns: set[Connection] = set()
        self._pending = 0  # connections that have not shown the secret yet
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="alma-dask-direct", daemon=True).start()

    @classmethod
    def open(cls, host: str | None, handler: Callable[..., str]) -> _CheckpointServer | None:
        if host is None:
            return None
        try:
            sock = socket.create_server((host, 0))
        except OSError:
            log.warning("no direct checkpoint channel on %s; using the scheduler", host)
            return None
        return cls(sock, handler)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:  # closed
                return
            sock.setblocking(True)
            conn = Connection(sock.detach())
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                if self._pending >= MAX_UNAUTHENTICATED:  # a flood: drop, keep serving
                    conn.close()
                    continue
                self._pending += 1
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="alma-dask-direct-conn", daemon=True
            ).start()

    def _serve(self, conn: Connection) -> None:
        authenticated = False
        try:
            # Nothing is allocated from a peer's length header before it has shown the
            # secret: recv_bytes(256) refuses a longer message without reading it.
            if not conn.poll(AUTH_TIMEOUT):
                return
            hello = json.loads(conn.recv_bytes(256))
            if not isinstance(hello, dict) or not hmac.compare_digest(
                str(hello.get("secret", "")), self._secret
            ):
                return
            authenticated = True
            with self._lock:
                self._pending -= 1
            while True:
                # [instance, config, iteration, state] and, from workers, [dask key, execution]
                inst, cfg, it, state, *execution = json.loads(conn.recv_bytes())
                key = RunKey(int(inst), int(cfg), int(it))
                answer = self._handler(key, str(state), *map(str, execution[:2]))
                conn.send_bytes(answer.encode())
        except (EOFError, OSError, ValueError, TypeError):
            pass  # closed, or not one of ours
        finally:
            with self._lock:
                self._conns.discard(conn)
                if not authenticated:
                    self._pending -= 1
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()


# -- on the workers ---------------------------------------------------------------------


class WorkerExit:
    """Whether this worker process is about to go away, and so must hand its runs back.

    One per worker process (:data:`EXIT`). Nothing sets it on a plain Dask worker; an
    executor whose workers live in batch jobs does (``executors/slurm.py``): at
    SIGTERM (preemption, ``scancel``), or from ``deadline`` (when the job's walltime
    ends, a Unix time). A run then starts only if the time left exceeds both
    ``margin`` and the longest run seen here, and running runs are interrupted at
    their next checkpoint once less than ``margin`` seconds are left.
    """

    def __init__(self) -> None:
        self.leaving = threading.Event()
        self.deadline: float | None = None
        self.margin = 0.0
        self.longest = 0.0

    def may_start(self) -> bool:
        """A run may start: this worker is not leaving and has time for one."""
        if self.leaving.is_set():
            return False
        return self.deadline is None or self.deadline - time.time() > max(self.margin, self.longest)

    def must_leave(self) -> bool:
        """Runs must hand back now: SIGTERM came, or the deadline is within the margin."""
        deadline = self.deadline
        if deadline is not None and deadline - time.time() <= self.margin:
            self.leaving.set()
        return self.leaving.is_set()

    def ran(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


#: This worker process's exit, see :class:`WorkerExit`.
EXIT = WorkerExit()


class _Restart(Interrupted):
    """The dispatcher refused a checkpoint from a stale execution: start again from
    ``state``, the run's last committed checkpoint. An Interrupted, so ``execute``
    lets it through rather than count a failed attempt."""

    def __init__(self, state: str) -> None:
        super().__init__("restarting from the last committed checkpoint")
        self.state = state


#: Per worker process: loaded run functions by token, sessions told to stop, the
#: tasks of each session that have started here, and checkpoint queue handles.
_CALLERS: dict[str, Callable[..., Any]] = {}
_STOPPED: set[str] = set()
_STARTED: dict[str, set[str]] = {}
_QUEUES: dict[str, Any] = {}


def _mark_stopped(session: str) -> list[str]:
    """Runs on every worker at stop: no new run starts; say which have started."""
    _STOPPED.add(session)
    return sorted(_STARTED.get(session, ()))


def _forget_session(session: str) -> None:
    """Runs on every worker at the end of a session."""
    _STARTED.pop(session, None)
    with _CHANNEL_LOCK:
        conn = _CHANNELS.pop(session, None)
    if conn:
        with contextlib.suppress(Exception):
            conn.close()
    for token in [t for t in _CALLERS if t.startswith(session)]:
        del _CALLERS[token]
    queue = _QUEUES.pop(session, None)
    if queue is not None:
        with contextlib.suppress(Exception):
            queue.close()


_CHANNELS: dict[str, Any] = {}  # session -> Connection to the dispatcher, or False
_CHANNEL_LOCK = threading.Lock()


def _send_direct(session: str, channel: tuple[str, int, str], message: list[Any]) -> str | None:
    """A checkpoint over the direct channel: the answer, or None to use the queues."""
    with _CHANNEL_LOCK:  # one connection per worker process, shared by its threads
        conn: Any = _CHANNELS.get(session)
        if conn is None:
            try:
                sock = socket.create_connection(channel[:2], timeout=DIRECT_CONNECT_TIMEOUT)
                sock.setblocking(True)
                conn = Connection(sock.detach())
                conn.send_bytes(json.dumps({"secret": channel[2]}).encode())
            except OSError:
                conn = False
            _CHANNELS[session] = conn
        if conn is False:
            return None
        try:
            conn.send_bytes(json.dumps(message).encode())
            if not conn.poll(CHECKPOINT_ACK_TIMEOUT):
                raise TimeoutError
            return conn.recv_bytes().decode()
        except (EOFError, OSError, TimeoutError):
            # The dispatcher went away (or the network did): the queues decide.
            with contextlib.suppress(OSError):
                conn.close()
            _CHANNELS[session] = False
            return None


def _wait_answer(reply: Any, key: str) -> str:
    """The dispatcher's answer to a checkpoint, or "stop" once nobody will store it."""
    import distributed

    waited = 0.0
    while waited < CHECKPOINT_ACK_TIMEOUT:
        try:
            return str(reply.get(timeout=_ACK_POLL))
        except TimeoutError:
            waited += _ACK_POLL
        except Exception:  # the scheduler is gone
            return "stop"
        try:  # a dispatcher killed with -9: its client left, Dask cancelled this task
            ts = distributed.get_worker().state.tasks.get(key)
        except Exception:
            ts = None
        if ts is None or ts.state in ("cancelled", "released", "forgotten"):
            return "stop"
    return "stop"


def _caller(token: str, payload: ShippedRun) -> Callable[..., Any]:
    caller = _CALLERS.get(token)
    if caller is None:
        caller = _CALLERS[token] = make_caller(unship(payload))
    return caller


def _dask_run(
    session: str,
    token: str,
    payload: ShippedRun,
    key: str,
    run_key: tuple[int, int, int],
    path: str,
    iteration: int,
    params: dict[str, Any],
    seed: int,
    state: str | None,
    retries: int,
    channel: tuple[str, int, str] | None = None,
) -> Outcome | str:
    """The Dask task: one run, with retries, through the same ``execute`` as threads.

    Returns its Outcome, or _SKIPPED / _INTERRUPTED when the run did not end."""
    import distributed

    started = _STARTED.setdefault(session, set())
    started.add(key)  # before the check: see _mark_stopped
    if session in _STOPPED:
        started.discard(key)
        return _SKIPPED
    if not EXIT.may_start():
        started.discard(key)
        return _DECLINED
    execution = uuid.uuid4().hex[:12]  # this execution, should Dask rerun the task
    reply: Any = None
    try:
        caller = _caller(token, payload)
        task = Task(RunKey(*run_key), "", path, iteration, params, seed, state)

        def checkpoint(_task: Task, text: str) -> None:
            answer = send(text)
            if answer.startswith(_RESTART):
                raise _Restart(answer[len(_RESTART) :])
            if answer != "ok":
                raise Interrupted(f"{path} iteration {iteration}: stopped")
            if EXIT.must_leave():  # saved: hand the run back before the job ends
                raise Interrupted(f"{path} iteration {iteration}: the worker leaves")

        def send(text: str) -> str:
            nonlocal reply
            message = [*run_key, text, key, execution]
            answer = _send_direct(session, channel, message) if channel else None
            if answer is not None:
                return answer
            client = distributed.get_client()
            if reply is None:
                # Unique per execution: a rescheduled copy must not read stale answers.
                reply = distributed.Queue(f"{key}-reply-{uuid.uuid4().hex[:8]}", client=client)
            queue = _QUEUES.get(session)
            if queue is None:
                queue = _QUEUES[session] = distributed.Queue(f"{session}-ckpt", client=client)
            queue.put([reply.name, *message])
            return _wait_answer(reply, key)

        while True:
            try:
                out = execute(caller, task, checkpoint, retries)
            except _Restart as restart:
                task.checkpoint = restart.state
                continue
            except Interrupted:
                return _HANDED_BACK if EXIT.must_leave() else _INTERRUPTED
            EXIT.ran(out.duration / out.attempts)
            return out
    finally:
        started.discard(key)
        if reply is not None:
            with contextlib.suppress(Exception):
                reply.close()


__all__ = ["CONNECT_TIMEOUT", "DaskExecutor"]


def _zip_package(package: Path, into: Path) -> Path:
    """``package`` (a folder) as ``into/<name>.zip`` holding ``<name>/...``: its Python
    sources, without caches."""
    archive = into / f"{package.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(package.rglob("*.py")):
            if "__pycache__" not in file.parts:
                zf.write(file, file.relative_to(package.parent).as_posix())
    return archive
