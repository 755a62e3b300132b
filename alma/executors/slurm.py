"""Run on a SLURM cluster (``{"slurm": {...}}``): alma starts a
``dask_jobqueue.SLURMCluster`` in the dispatcher's process, submits worker jobs, and
runs the experiment on them with the Dask executor's semantics (it *is* the Dask
executor, with another cluster).

Why its own executor and not ``{"dask": address}`` with a cluster started by hand: what
loses work on a cluster happens at the edges of a batch job, and only an executor that
owns the jobs can handle them.

* **Walltime**: each worker knows when its job ends (the batch shell's start plus the
  walltime). With less than ``max(walltime_margin, longest run seen)`` left it takes
  no run; with less than ``walltime_margin`` left its running runs are interrupted at
  their next checkpoint (after it saved) and handed back (:class:`~alma.executors.dask.
  WorkerExit`); once none runs it leaves, and a new job replaces it while runs are owed.
* **Preemption, scancel**: SLURM sends SIGTERM before SIGKILL; the worker (and its
  nanny) take SIGTERM as "leave": the same hand-back as above. A run killed before its
  next checkpoint is rescheduled by Dask and restarts from its last committed one.
* **Jobs that cannot run**: the job script is checked with ``sbatch --test-only``
  before anything is submitted, so a bad partition or account is an error at once,
  with SLURM's message; jobs that end before their worker ever connected are
  replaced at most ``MAX_FAILED_JOBS`` times, then the experiment stops with an error.
* **Pause**: the session's end closes the cluster, which cancels the jobs; a resume
  starts a new cluster and submits new ones.

Importing ``dask_jobqueue`` sets a SIGINT handler that calls ``sys.exit`` (and fails
outside the main thread, e.g. in the notebook's Start button thread): alma imports it
with SIGINT left as it was, so Ctrl-C still pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import AlmaError, ConfigError
from ..records import JobCounts
from . import dask as dask_executor
from .base import RunSource

try:
    from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin
except ImportError:  # parse_options says what to install
    NannyPlugin = SchedulerPlugin = WorkerPlugin = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

_INSTALL_HINT = 'Install it with: pip install "pyalma[slurm]"'
#: alma's defaults, under the experiment's options: one core per job, and then as many
#: single-threaded worker processes as cores (no GIL shared), 1 GB of memory per core.
DEFAULTS: dict[str, Any] = {"cores": 1}
MEMORY_PER_CORE_GB = 1
#: Seconds before the walltime when a worker hands its runs back (``walltime_margin``);
#: at most half the walltime, so that a short job still runs something.
WALLTIME_MARGIN = 60.0
#: Jobs that may end before their worker connected, in a row, before alma gives up.
MAX_FAILED_JOBS = 3
#: Seconds between looks at the jobs (one ``squeue`` of this session's job ids): to
#: replace those that left, and to count them (:attr:`SlurmExecutor.jobs`).
MONITOR_INTERVAL = 2.0
#: Seconds ``sbatch --test-only`` and ``squeue`` may take.
SLURM_COMMAND_TIMEOUT = 30.0
#: SLURM states of a job that will not run (any more).
_ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
#: SLURM states of a job counted as running; ending jobs (COMPLETING, STAGE_OUT) and
#: those above count as gone, any other state of a queued job as pending (PENDING,
#: CONFIGURING, REQUEUED, SUSPENDED, held, ...).
_RUNNING = {"RUNNING", "SIGNALING", "RESIZING"}
_ENDING = {"COMPLETING", "STAGE_OUT", "REVOKED"}
#: The keys of the ``"adapt"`` option: alma's ``minimum`` (worker processes, as
#: ``workers``), and Dask's ``Adaptive`` keywords passed on (seconds, and a count).
ADAPT_KEYS = ("minimum", "interval", "target_duration", "wait_count")
_ADAPT_FIX = (
    'Write for example "adapt": {"minimum": 1} (worker processes kept while the '
    'experiment runs, at most "workers"), or "adapt": true (minimum 0).'
)
_IMPORT_LOCK = threading.Lock()


def import_jobqueue() -> Any:
    """``dask_jobqueue``, imported without its SIGINT handler (see the module's doc)."""
    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    with _IMPORT_LOCK:
        real = signal.signal

        def keep_sigint(signum: int, handler: Any) -> Any:
            if signum == signal.SIGINT:
                return signal.getsignal(signum)
            return real(signum, handler)

        signal.signal = keep_sigint  # type: ignore[assignment]
        try:
            import dask_jobqueue
        except ImportError as exc:
            raise ConfigError(
                f'executor "slurm" needs dask-jobqueue, which is not installed ({exc}). '
                + _INSTALL_HINT
            ) from None
        finally:
            signal.signal = real
    return dask_jobqueue


def parse_walltime(text: str) -> float:
    """Seconds in a SLURM time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``,
    ``D-H:M:S``."""
    days, _, rest = str(text).strip().rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    if days:
        parts += [0.0] * (3 - len(parts))  # D-H, D-H:M
        hours, minutes, seconds = parts
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, minutes, seconds = 0.0, parts[0], (parts[1] if len(parts) > 1 else 0.0)
    return ((float(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _script_walltime(script: str) -> float | None:
    """The time limit a job script asks for (the last ``-t``/``--time`` wins), seconds."""
    found = re.findall(r"^#SBATCH\s+(?:-t\s*|--time[= ])\s*(\S+)", script, re.MULTILINE)
    return parse_walltime(found[-1]) if found else None


def parse_adapt(value: Any) -> dict[str, Any] | None:
    """The ``"adapt"`` option: None (scale to ``workers`` jobs), or the keywords for
    ``cluster.adapt`` (``minimum`` in worker processes; the maximum is ``workers``)."""
    if value is None or value is False:
        return None
    if value is True:
        return {"minimum": 0}
    if not isinstance(value, dict):
        raise ConfigError(
            f'"slurm" option "adapt" is true, false or an object, got {value!r}. ' + _ADAPT_FIX
        )
    if "maximum" in value:
        raise ConfigError(
            '"slurm" option "adapt" takes no "maximum": it is the experiment\'s "workers" '
            '(runs at a time). Remove "maximum" and set "workers" instead.'
        )
    unknown = sorted(set(value) - set(ADAPT_KEYS), key=str)
    if unknown:
        raise ConfigError(
            f'"slurm" option "adapt": unknown key(s) {unknown}; it takes '
            + ", ".join(ADAPT_KEYS)
            + ". "
            + _ADAPT_FIX
        )
    out = dict(value)
    minimum = out.setdefault("minimum", 0)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise ConfigError(
            f'"slurm" option "adapt": "minimum" is a whole number of worker processes '
            f">= 0, got {minimum!r}. " + _ADAPT_FIX
        )
    for key in ("interval", "target_duration"):
        seconds = out.get(key, 1)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ConfigError(
                f'"slurm" option "adapt": "{key}" is a number of seconds > 0, got '
                f'{seconds!r}. Write for example "adapt": {{"minimum": 1, "{key}": 5}}.'
            )
    wait = out.get("wait_count", 1)
    if isinstance(wait, bool) or not isinstance(wait, int) or wait < 1:
        raise ConfigError(
            f'"slurm" option "adapt": "wait_count" is a whole number >= 1, got {wait!r}. '
            'Write for example "adapt": {"minimum": 1, "wait_count": 3}.'
        )
    return out


def count_jobs(ids: list[str], states: dict[str, str], gone: set[str]) -> JobCounts:
    """Jobs ``ids`` (submitted this session) by what SLURM says: ``states`` from
    ``squeue`` (a job it does not list has left the queue), ``gone`` those seen gone."""
    pending = running = left = 0
    for job in ids:
        state = states.get(job)
        if job in gone or state is None or state in _ENDED or state in _ENDING:
            left += 1
        elif state in _RUNNING:
            running += 1
        else:
            pending += 1
    return JobCounts(pending, running, left)


class SlurmExecutor(dask_executor.DaskExecutor):
    """The Dask executor on worker jobs it submits to SLURM."""

    usage = '"slurm" or {"slurm": {"partition": "short", ...}} (SLURMCluster options)'

    @classmethod
    def parse_options(cls, options: Any) -> Any:
        """SLURMCluster keyword arguments (any of them) plus alma's ``walltime_margin``
        (seconds) and ``adapt``; dask-jobqueue must be installed. Returns a dict."""
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ValueError("SLURM options are an object of dask_jobqueue.SLURMCluster arguments")
        bad = [k for k in options if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ValueError(f"SLURMCluster options are keyword names, got {bad!r}")
        options = dict(options)
        if "partition" in options:  # SLURM's word; dask-jobqueue says queue
            if "queue" in options:
                raise ValueError("partition and queue are the same SLURMCluster option: give one")
            options["queue"] = options.pop("partition")
        if "adapt" in options:
            options["adapt"] = parse_adapt(options["adapt"])
        margin = options.get("walltime_margin", WALLTIME_MARGIN)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError(f"walltime_margin is a number of seconds >= 0, got {margin!r}")
        for package in ("distributed", "dask_jobqueue"):
            if importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f'executor "slurm" needs {package.replace("_", "-")}, which is not '
                    "installed. " + _INSTALL_HINT
                )
        return options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = dict(self.options)
        self.margin = float(options.pop("walltime_margin", WALLTIME_MARGIN))
        #: ``cluster.adapt`` keywords (``minimum`` in worker processes), or None: scale.
        self.adapt: dict[str, Any] | None = options.pop("adapt", None)
        self.cluster_options = {**DEFAULTS, **options}
        cores = self.cluster_options["cores"]
        self.cluster_options.setdefault("processes", cores)
        self.cluster_options.setdefault("memory", f"{MEMORY_PER_CORE_GB * cores}GB")
        self.cluster_options["job_extra_directives"] = _no_requeue(
            options.get("job_extra_directives")
        )
        self.cluster_options["scheduler_options"] = _loopback_dashboard(
            options.get("scheduler_options")
        )
        # `workers` is runs at a time, as everywhere: jobs of `processes` workers each.
        self.max_jobs = math.ceil(self.workers / int(self.cluster_options["processes"]))
        self._monitor: threading.Thread | None = None
        self._done = threading.Event()
        self._source: RunSource | None = None
        self._job_ids: dict[str, None] = {}  # every job id submitted, in order
        self._gone: set[str] = set()  # those seen out of the queue (never back)
        self._counts: JobCounts | None = None
        self._looking = threading.Lock()

    def start(self, source: RunSource) -> None:
        if shutil.which("sbatch") is None:
            raise ConfigError(
                'executor "slurm" submits worker jobs with sbatch, which is not on PATH: '
                "start alma on a machine of the SLURM cluster (a login node), or load "
                "SLURM's environment first (e.g. module load slurm)."
            )
        self._source = source
        super().start(source)

    # -- the cluster -------------------------------------------------------------------

    def _start_cluster(self, distributed: Any) -> Any:
        jobqueue = import_jobqueue()
        cluster = jobqueue.SLURMCluster(**self.cluster_options)
        self._cluster = cluster
        script = cluster.job_script()
        self._test_job(script)
        walltime = _script_walltime(script)
        client = distributed.Client(cluster, set_as_default=False)
        client.register_plugin(_NannyEdges(), name="alma-slurm-nanny")
        client.register_plugin(_JobEdges(walltime, self.margin), name="alma-slurm")
        log.info(
            "alma: SLURM jobs report to %s; dashboard %s",
            cluster.scheduler_address,
            cluster.dashboard_link,
        )
        if self.adapt is not None:
            client.register_plugin(_KeepBusy(), name="alma-keep-busy")
            adapt = dict(self.adapt)
            processes = int(self.cluster_options["processes"])
            minimum = min(math.ceil(adapt.pop("minimum") / processes), self.max_jobs)
            cluster.adapt(minimum_jobs=minimum, maximum_jobs=self.max_jobs, **adapt)
        else:
            cluster.scale(jobs=self.max_jobs)
        self._monitor = threading.Thread(
            target=self._watch_jobs, args=(cluster, client), name="alma-slurm-jobs", daemon=True
        )
        self._monitor.start()
        return client

    @staticmethod
    def _test_job(script: str) -> None:
        """``sbatch --test-only``: SLURM says at once whether it would run the job."""
        try:
            test = subprocess.run(
                ["sbatch", "--test-only"],
                input=script,
                capture_output=True,
                text=True,
                timeout=SLURM_COMMAND_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AlmaError(f"cannot ask SLURM about the worker jobs (sbatch: {exc})") from exc
        if test.returncode != 0:
            said = " ".join((test.stderr or test.stdout).split()) or f"exit {test.returncode}"
            raise AlmaError(
                f"SLURM refuses alma's worker jobs: {said}. Check the partition, account "
                'and limits in the experiment\'s "executor" field (SLURMCluster options).'
            )

    def _cluster_failure(self, exc: Exception) -> str:
        if isinstance(exc, AlmaError):
            return str(exc)
        return f"starting the SLURM cluster failed: {type(exc).__name__}: {exc}"

    def _direct_host(self) -> str | None:
        """Workers connect back to the scheduler's host: this process."""
        if not dask_executor.DIRECT_CHECKPOINTS or self._cluster is None:
            return None
        address = str(self._cluster.scheduler_address)
        if not address.startswith("tcp://"):
            return None
        return address[len("tcp://") :].rpartition(":")[0].strip("[]") or None

    def _shutdown(self) -> None:
        """Stop watching the jobs, then close the cluster: that cancels them; a last
        look counts them gone (or says which are not)."""
        self._done.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(MONITOR_INTERVAL + SLURM_COMMAND_TIMEOUT)
        super()._shutdown()
        try:
            self._look({})
        except Exception:
            log.debug("looking at the SLURM jobs after closing the cluster failed", exc_info=True)

    @property
    def jobs(self) -> JobCounts | None:
        """The worker jobs submitted in this session, as SLURM said at the last look
        (every MONITOR_INTERVAL seconds); None before the first."""
        return self._counts

    # -- the jobs ----------------------------------------------------------------------

    def _look(self, jobs: dict[str, Any]) -> dict[str, str]:
        """One ``squeue`` for this session's jobs still in the queue (``jobs``: the
        cluster's, name -> id, added to them): counts them, tells the session when the
        counts change, returns id -> state for the jobs SLURM lists."""
        with self._looking:
            for job_id in jobs.values():
                if job_id:
                    self._job_ids.setdefault(str(job_id), None)
            ask = [i for i in self._job_ids if i not in self._gone]
            states = _job_states(ask)
            self._gone.update(i for i in ask if i not in states or states[i] in _ENDED)
            counts = count_jobs(list(self._job_ids), states, self._gone)
            changed = counts != self._counts
            self._counts = counts
        if changed and self._source is not None:
            self._source.jobs_changed()
        return states

    def _watch_jobs(self, cluster: Any, client: Any) -> None:
        """Count the jobs; replace jobs that left while runs are owed (with ``adapt``,
        forget them: Dask's adaptive scaling submits others as needed); give up on
        jobs that never start."""
        connected: set[str] = set()  # job names whose worker connected once
        counted: set[str] = set()  # job names seen gone
        failed_in_a_row, last = 0, None
        while not self._done.wait(MONITOR_INTERVAL):
            try:
                jobs = {name: job.job_id for name, job in list(cluster.workers.items())}
                states = self._look(jobs)
                if self._stopping:
                    continue
                workers = client.scheduler_info(n_workers=-1)["workers"].values()
                names = {str(w.get("name", "")) for w in workers}
                connected |= {
                    j for j in jobs if j in names or any(n.startswith(f"{j}-") for n in names)
                }
                # Read after squeue: a job the cluster cancels itself (adaptive scaling
                # down, closing) leaves its plan before it is cancelled.
                planned = set(cluster.worker_spec)
            except Exception:
                log.debug("looking at the SLURM jobs failed", exc_info=True)
                continue
            gone = [
                name
                for name, job_id in jobs.items()
                if job_id
                and name in planned
                and states.get(str(job_id), "GONE") in (_ENDED | {"GONE"})
            ]
            for name in gone:
                if name not in counted:
                    counted.add(name)
                    failed_in_a_row = 0 if name in connected else failed_in_a_row + 1
                    last = jobs[name]
            if failed_in_a_row >= MAX_FAILED_JOBS:
                self._jobs_fail(last)
                return
            if not gone:
                continue
            if self.adapt is not None:  # adaptive scaling replaces them if needed
                cluster.loop.add_callback(_replace, cluster, gone, None)
                continue
            with self._lock:
                owed = bool(self._futures)  # runs submitted: someone must run them
            if not owed:
                continue
            log.info("SLURM jobs %s left; submitting others", [jobs[n] for n in gone])
            cluster.loop.add_callback(_replace, cluster, gone, self.max_jobs)

    def _jobs_fail(self, job_id: Any) -> None:
        """Jobs end before their worker starts: stop the experiment and say why."""
        output, said = self._job_output(job_id)
        message = (
            f"{MAX_FAILED_JOBS} SLURM worker jobs in a row ended before their Dask worker "
            f"connected; alma stopped submitting them. The last one, job {job_id}"
            + (f", said: {said}" if said else "")
            + f" (its output: {output}). The jobs need pyalma installed in the Python "
            "they run: see python and job_script_prologue in the SLURMCluster options."
        )
        log.error("%s", message)
        if self._source is not None:
            self._source.executor_failed(AlmaError(message))
        self.stop()

    def _job_output(self, job_id: Any) -> tuple[str, str]:
        """Where a job's error output is, and its last lines (or "")."""
        folder = self.cluster_options.get("log_directory")
        if folder:
            name = self.cluster_options.get("job_name", "dask-worker")
            path = os.path.join(str(folder), f"{name}-{job_id}.err")
        else:  # SLURM's default, in the folder sbatch ran in
            path = os.path.join(os.getcwd(), f"slurm-{job_id}.out")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        except OSError:
            return path, ""
        return path, " | ".join(lines[-3:])


def job_script(options: dict[str, Any] | None = None) -> str:
    """The batch script alma submits for each worker job with these ``"slurm"`` options
    (dask-jobqueue's ``job_script()``, alma's defaults included): read it before a big
    run, or paste it into ``sbatch --test-only``. Starts and closes a scheduler here."""
    executor = SlurmExecutor(print, 1, options=SlurmExecutor.parse_options(options))
    cluster = import_jobqueue().SLURMCluster(**executor.cluster_options)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


def _no_requeue(directives: list[str] | None) -> list[str]:
    """The job's extra ``#SBATCH`` lines, with ``--no-requeue`` unless they say otherwise:
    SLURM then cancels a preempted job instead of requeuing it (a requeued job waits
    120 s before it may start again); alma replaces it at once."""
    if directives is None:
        import dask

        directives = dask.config.get("jobqueue.slurm.job-extra-directives", []) or []
    directives = [str(d) for d in directives]
    if not any(d.strip().startswith(("--requeue", "--no-requeue")) for d in directives):
        directives.append("--no-requeue")
    return directives


def _loopback_dashboard(scheduler: dict[str, Any] | None) -> dict[str, Any]:
    """The scheduler's options, its dashboard on loopback unless they say where: it
    serves worker pages without authentication (forward its port to open it)."""
    if scheduler is None:
        import dask

        scheduler = dask.config.get("jobqueue.slurm.scheduler-options", {}) or {}
    return {"dashboard_address": "127.0.0.1:0", **scheduler}


def _replace(cluster: Any, names: list[str], jobs: int | None) -> None:
    """On the cluster's loop: forget the jobs that left, submit new ones up to ``jobs``
    (new names, so the cluster's own clean-up of the old ones cannot cancel the new);
    ``jobs`` None: adaptive scaling submits them, seeing fewer jobs planned."""
    for name in names:
        cluster.worker_spec.pop(name, None)
        cluster.workers.pop(name, None)
    if jobs is not None:
        cluster.scale(jobs=jobs)


def _job_states(ids: list[str]) -> dict[str, str]:
    """SLURM job id -> state, for the jobs SLURM still knows among ``ids``."""
    if not ids:
        return {}
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)],
        capture_output=True,
        text=True,
        timeout=SLURM_COMMAND_TIMEOUT,
        check=False,
    )
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise RuntimeError(out.stderr.strip())
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if " " in line)


# -- on the workers ---------------------------------------------------------------------

#: Seconds between a leaving worker's looks at its runs.
_LEAVE_POLL = 0.2
#: Seconds a leaving worker waits for the dispatcher to collect its last results.
_COLLECT_WAIT = 10.0


def _handle_sigterm(handler: Callable[..., None]) -> None:
    """SIGTERM calls ``handler`` in this process (signals are set on the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    else:
        log.warning("alma: SIGTERM not handled on this Dask worker (not the main thread)")


def _job_start() -> float:
    """When this job started: its batch shell's start (SLURM_TASK_PID), else ours."""
    import psutil

    for pid in (os.environ.get("SLURM_TASK_PID"), os.getpid()):
        with contextlib.suppress(Exception):
            return float(psutil.Process(int(pid or 0)).create_time())
    return time.time()


class _KeepBusy(SchedulerPlugin):  # type: ignore[misc]
    """A scheduler plugin (with ``adapt``): adaptive scaling retires only workers with
    no alma run on them. Dask's own choice already prefers idle workers; this makes it
    a guarantee, whatever its estimate of the work left: a retired busy worker would
    cost its run the steps since its last checkpoint."""

    name = "alma-keep-busy"

    def valid_workers_downscaling(self, scheduler: Any, workers: list[Any]) -> list[Any]:
        return [
            ws
            for ws in workers
            if not any(str(ts.key).startswith("alma-run-") for ts in ws.processing)
        ]


class _NannyEdges(NannyPlugin):  # type: ignore[misc]
    """A nanny plugin: SIGTERM does not close the nanny (and kill its worker) at once;
    its worker hands its runs back first and then closes, the nanny with it."""

    name = "alma-slurm-nanny"

    def setup(self, nanny: Any) -> None:
        _handle_sigterm(lambda *_: None)

    def teardown(self, nanny: Any) -> None:
        pass


class _JobEdges(WorkerPlugin):  # type: ignore[misc]
    """A worker plugin: this worker leaves before its job's walltime, or at SIGTERM."""

    name = "alma-slurm"

    def __init__(self, walltime: float | None, margin: float) -> None:
        self.walltime = walltime
        self.margin = margin

    def setup(self, worker: Any) -> None:
        exit_ = dask_executor.EXIT
        if self.walltime is not None:
            exit_.deadline = _job_start() + self.walltime
            exit_.margin = min(self.margin, self.walltime / 2)
        _handle_sigterm(lambda *_: exit_.leaving.set())
        self._task = asyncio.ensure_future(_leave_when_told(worker))

    def teardown(self, worker: Any) -> None:
        pass


async def _leave_when_told(worker: Any) -> None:
    """Once no run may start here (SIGTERM, or too little time left for one): take no
    task, let running runs end or hand back (at the margin, see WorkerExit), close."""
    from distributed.core import Status

    exit_ = dask_executor.EXIT
    while exit_.may_start():
        if worker.status in (Status.closing, Status.closed, Status.closing_gracefully):
            return
        await asyncio.sleep(_LEAVE_POLL)
    log.info("alma: this worker leaves (its job ends); handing its runs back")
    with contextlib.suppress(Exception):
        worker.memory_manager.memory_pause_fraction = False  # it would unpause the worker
        worker.status = Status.paused  # the scheduler sends nothing more; nothing starts

    def ours(states: tuple[str, ...]) -> bool:
        return any(
            str(key).startswith("alma-run-") and ts.state in states
            for key, ts in list(worker.state.tasks.items())
        )

    while ours(("executing", "long-running")):
        await asyncio.sleep(_LEAVE_POLL)
    waited = 0.0
    while ours(("memory",)) and waited < _COLLECT_WAIT:  # results not collected yet
        await asyncio.sleep(_LEAVE_POLL)
        waited += _LEAVE_POLL
    await worker.close_gracefully(reason="alma: the job ends (walltime or SIGTERM)")


__all__ = [
    "ADAPT_KEYS",
    "DEFAULTS",
    "WALLTIME_MARGIN",
    "SlurmExecutor",
    "count_jobs",
    "import_jobqueue",
    "job_script",
    "parse_adapt",
    "parse_walltime",
]
