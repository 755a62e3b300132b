"""The ``alma`` command: run, stop, status, results, reset, replay. A thin front-end
over the Dispatcher.

Exit codes:
    0    success (``run``: every run of the plan finished and none failed)
    1    ``run``: not every run finished done: some failed, or an executor failed;
         ``stop``: the runner did not pause within the timeout
    2    bad usage or a bad experiment/batch/run module (ConfigError)
    3    the state file cannot be used, or could not be written during ``run`` (StateError)
    4    the experiment is already running elsewhere (LockedError)
    130  ``run`` was paused by Ctrl-C, SIGTERM or ``alma stop``; ``alma run`` again
         continues
``replay`` exits 1 with the run's traceback when ``run()`` raises.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AlmaError, ConfigError, LockedError, StateError

EXIT_OK, EXIT_FAILED_RUNS, EXIT_CONFIG, EXIT_STATE, EXIT_LOCKED, EXIT_PAUSED = 0, 1, 2, 3, 4, 130


def _load(path: str, readonly: bool = True) -> Any:
    """The experiment's Dispatcher; read-only (run module not imported) unless it runs."""
    from .experiment import load

    return load(path, readonly=readonly)


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) until every run finished; Ctrl-C/SIGTERM/``alma stop`` pause
    cleanly. ``--detach``: in a background runner, returning once it holds the lock."""
    if args.detach:
        return _detach(args.experiment)
    return _run(_load(args.experiment, readonly=False), args.experiment, args.quiet)


def _detach(experiment: str) -> int:
    dispatcher = _load(experiment)  # the runner imports the run module, not us
    if dispatcher.finished:
        print(f"alma: nothing to run: every run of {experiment} has finished.", file=sys.stderr)
        return EXIT_OK
    dispatcher.start(detach=True)  # raises what made the runner exit (codes 2, 3, 4)
    runner = dispatcher.runner
    if runner is None:  # it ended already: nothing was owed after all
        print(f"alma: {_summary(dispatcher)}.", file=sys.stderr)
        return EXIT_OK
    print(
        f"alma: running detached: pid {runner.pid} on host {runner.host}.\n"
        f"alma: log:    {runner.log}\n"
        f"alma: follow: alma status {experiment}   (or: tail -f {runner.log})\n"
        f"alma: stop:   alma stop {experiment}   (alma run --detach {experiment} resumes)"
    )
    return EXIT_OK


def _summary(dispatcher: Any) -> str:
    p = dispatcher.progress
    return f"{p.status}: {p.done} of {p.total} runs done, {p.failed} failed"


def cmd_runner(args: argparse.Namespace) -> int:
    """The detached runner that ``run --detach`` starts (not for people to call)."""
    from .lock import mark_detached

    mark_detached(Path(args.log))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal to lose; never hang up
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"alma: {stamp}: detached runner, pid {os.getpid()}", file=sys.stderr)
    if args.spec is not None:
        from .detach import read_spec
        from .dispatcher import Dispatcher

        dispatcher, label = Dispatcher(read_spec(Path(args.spec))), None
    else:
        dispatcher, label = _load(args.experiment, readonly=False), args.experiment
    try:
        return _run(dispatcher, label, quiet=True)
    finally:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"alma: {stamp}: detached runner {os.getpid()} ends", file=sys.stderr)


def _run(dispatcher: Any, experiment: str | None, quiet: bool) -> int:
    """Run ``dispatcher`` to the end or a pause; the exit code. ``experiment``: the file
    to name in the hints (None for one defined in code)."""
    from tqdm import tqdm

    again = f"alma run {experiment}" if experiment else "start() on its dispatcher"
    asked = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if asked.is_set():  # a second signal: leave now; committed runs are safe
            print("\nalma: forced exit; finished runs are saved.", file=sys.stderr)
            os._exit(EXIT_PAUSED)
        asked.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        dispatcher.start()  # LockedError before any output
        p = dispatcher.progress
        bar = tqdm(
            total=p.total,
            initial=p.finished,
            unit="run",
            desc=dispatcher.spec.name,
            dynamic_ncols=True,
            disable=quiet,
        )
        while not asked.is_set() and not dispatcher.join(timeout=0.2) and dispatcher.running:
            _update(bar, dispatcher.progress, dispatcher.jobs)
        if asked.is_set():
            bar.write(
                f"alma: pausing; waiting for {dispatcher.progress.running} run(s) "
                "in flight to end or checkpoint (Ctrl-C again to leave at once)…"
            )
            dispatcher.stop()
        p = dispatcher.progress
        _update(bar, p, dispatcher.jobs)
        bar.close()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    summary = f"{p.done} of {p.total} runs done, {p.failed} failed"
    halted = dispatcher.halted
    if halted is not None:  # alma's own machinery failed: never "finished"
        print(f"alma: stopped: {summary}.\nalma: error: {halted}", file=sys.stderr)
        return EXIT_STATE if isinstance(halted, StateError) else EXIT_FAILED_RUNS
    if not dispatcher.finished:
        if asked.is_set() or dispatcher.stopped_remotely:
            by = " by a stop request" if not asked.is_set() else ""
            print(f"alma: paused{by}: {summary}. Continue with: {again}", file=sys.stderr)
            return EXIT_PAUSED
        print(f"alma: stopped before the end: {summary}.", file=sys.stderr)
        _print_last_error(dispatcher.last_error, experiment)
        return EXIT_FAILED_RUNS
    print(f"alma: finished: {summary}. State: {dispatcher.state_path}", file=sys.stderr)
    if p.failed or dispatcher.last_error is not None:
        _print_last_error(dispatcher.last_error, experiment)
    return EXIT_FAILED_RUNS if p.failed else EXIT_OK


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)', re.MULTILINE)
_ALMA_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_location(traceback: str) -> str | None:
    """``file:line`` of the innermost frame in the user's own code, if the traceback has one.

    Tracebacks start at the run function; frames in the standard library, installed
    packages or alma itself (e.g. save_callback) are skipped so the line shown is one the
    user can edit. None when no frame is the user's (e.g. a Dask cluster that did not start).
    """
    frames = _FRAME.findall(traceback)
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    skip = (*{os.path.join(paths[k], "") for k in keys if k in paths}, _ALMA_DIR)
    for file, line in reversed(frames):
        if not file.startswith(skip) and not file.startswith("<"):
            return f"{file}:{line}"
    return None


def _print_last_error(error: Any, experiment: str | None) -> None:
    """After a run with failures, say what went wrong last and how to redo the failed runs."""
    if error is not None:
        where = f"{error.instance}, iteration {error.iteration}: " if error.instance else ""
        location = _user_location(error.traceback or "")
        at = f" (at {location})" if location else ""
        print(f"alma: last error: {where}{error.error}{at}", file=sys.stderr)
    if experiment is None:
        print(
            "alma: see its results for every failure; retry_failed() redoes them.", file=sys.stderr
        )
        return
    print(
        f"alma: see `alma results {experiment}` for every failure; "
        f"fix, then `alma reset --failed {experiment}`",
        file=sys.stderr,
    )


def _update(bar: Any, p: Any, jobs: Any = None) -> None:
    bar.update(p.finished - bar.n)
    postfix: dict[str, Any] = {"failed": p.failed, "running": p.running}
    if jobs is not None and jobs.total:  # "slurm": the worker jobs, as SLURM said last
        postfix[f"{jobs.system} jobs"] = f"{jobs.pending}/{jobs.running}/{jobs.gone}"
    bar.set_postfix(postfix, refresh=False)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the per-instance table; works while the experiment runs elsewhere."""
    dispatcher = _load(args.experiment)
    p = dispatcher.progress
    state = dispatcher.state
    print(state.to_string(index=False))
    if len(dispatcher.spec.params) > 1:  # a grid: progress per configuration too
        print("\nper configuration:\n" + dispatcher.configs.to_string(index=False))
    elsewhere = dispatcher.running_elsewhere
    status = f"running in another process ({elsewhere})" if elsewhere else p.status
    print(
        f"\n{status}: {p.done}/{p.total} done, {p.failed} failed, {p.pending} pending"
        f"  (state: {dispatcher.state_path})"
    )
    runner = dispatcher.runner
    if runner is not None:
        how = "detached" if runner.detached else "not detached"
        print(f"runner: pid {runner.pid} on host {runner.host}, {how}, since {runner.since}")
        if runner.log:
            print(f"log: {runner.log}")
    jobs = dispatcher.jobs
    if jobs is not None and jobs.total:
        print(jobs.describe())
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    """Ask whichever process runs the experiment to pause; wait until it has."""
    dispatcher = _load(args.experiment)
    runner = dispatcher.runner
    if runner is None:
        print(f"alma: not running: {_summary(dispatcher)}.", file=sys.stderr)
        return EXIT_OK
    print(f"alma: asking pid {runner.pid} on host {runner.host} to pause…", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the message below says it better
        paused = dispatcher.stop(timeout=args.timeout)
    if not paused:
        print(
            f"alma: error: {runner.describe()} did not pause within {args.timeout:g} s "
            "(runs in flight that never checkpoint end first); it pauses once they end. "
            f"Wait, or stop again with a longer --timeout.",
            file=sys.stderr,
        )
        return EXIT_FAILED_RUNS
    print(
        f"alma: paused: {_summary(dispatcher).split(': ', 1)[1]}. "
        f"Continue with: alma run [--detach] {args.experiment}",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    """Write the results table: CSV to stdout, or to -o FILE (.csv, .json, .parquet)."""
    frame = _load(args.experiment).results
    if args.output is None:
        frame.to_csv(sys.stdout, index=False)
        return EXIT_OK
    out = Path(args.output)
    suffix = out.suffix.lower()
    try:
        if suffix == ".csv":
            frame.to_csv(out, index=False)
        elif suffix == ".json":
            frame.to_json(out, orient="records", date_format="iso", indent=1)
        elif suffix == ".parquet":
            try:
                frame.to_parquet(out, index=False)
            except ImportError:
                raise ConfigError(
                    f"{out}: writing parquet needs pyarrow: pip install pyarrow"
                ) from None
        else:
            raise ConfigError(
                f"-o {out}: unknown format {suffix or '(none)'!r}. Use a file name "
                "ending in .csv, .json or .parquet."
            )
    except OSError as exc:  # missing folder, no permission, disk full: a usage error, not 1
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"alma: wrote {len(frame)} rows to {out}", file=sys.stderr)
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    """Run one run again in this process, exactly as it ran; print its result as JSON.
    Writes nothing to the state file; an exception in run() prints its traceback."""
    import json

    from .values import to_json

    params: dict[str, Any] = {}
    for item in args.param:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE, e.g. --param restarts=10")
        try:
            params[name] = json.loads(text)  # 10, 0.5, true, "x", [1, 2]
        except ValueError:
            params[name] = text  # a bare word is a string
    dispatcher = _load(args.experiment, readonly=False)
    result = dispatcher.replay(args.instance, args.iteration, **params)
    print(to_json(result))
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    """Forget finished runs so they run again: all of them, or only the failed ones."""
    dispatcher = _load(args.experiment)
    if not args.failed and not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError(
                "alma reset deletes every result; add --yes to confirm, or "
                "--failed to forget only the failed runs."
            )
        answer = input(
            f"Delete all {dispatcher.progress.finished} results of {args.experiment}? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("alma: nothing deleted.", file=sys.stderr)
            return EXIT_OK
    n = dispatcher.reset(failed_only=args.failed)
    what = "failed runs" if args.failed else "runs"
    print(f"alma: forgot {n} {what}; they will run again on the next start.", file=sys.stderr)
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="alma",
        description="Plan, run, pause and resume file-based experiments.",
        epilog="Exit codes: 0 ok, 1 some runs failed (or an executor failed), 2 bad usage or "
        "config, 3 unusable state file (or it could not be written), 4 already running "
        "elsewhere, 130 paused by Ctrl-C/SIGTERM/alma stop.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"alma {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run or resume an experiment, with a progress bar")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="run in a background process that outlives this terminal; returns once it "
        "runs (output to <state>.log; pause it with alma stop)",
    )
    run.set_defaults(func=cmd_run)
    stop = sub.add_parser("stop", help="pause the experiment, wherever it runs on this machine")
    stop.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for it to pause (default 60)",
    )
    stop.set_defaults(func=cmd_stop)
    sub.add_parser("status", help="per-instance progress (readable while it runs)").set_defaults(
        func=cmd_status
    )
    res = sub.add_parser("results", help="results table as CSV, or to a file")
    res.add_argument("-o", "--output", help="write to FILE.csv, FILE.json or FILE.parquet")
    res.set_defaults(func=cmd_results)
    reset = sub.add_parser("reset", help="forget results so runs are done again")
    reset.add_argument("--failed", action="store_true", help="only the failed runs")
    reset.add_argument("-y", "--yes", action="store_true", help="do not ask to confirm")
    reset.set_defaults(func=cmd_reset)
    for action in (run, stop, sub.choices["status"], res, reset):
        action.add_argument("experiment", help="path of the .experiment file")
    replay = sub.add_parser("replay", help="run one run again here, print its result as JSON")
    replay.add_argument("experiment", help="path of the .experiment file")
    replay.add_argument("instance", help="the instance's name, as listed in the batch")
    replay.add_argument("iteration", type=int)
    replay.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the configuration (VALUE read as JSON, else as text)",
    )
    replay.set_defaults(func=cmd_replay)
    runner = sub.add_parser("_runner")  # started by run --detach; no help: not listed
    runner.add_argument("--log", required=True)
    what = runner.add_mutually_exclusive_group(required=True)
    what.add_argument("--experiment")
    what.add_argument("--spec")
    runner.set_defaults(func=cmd_runner)
    return p


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings as one line, printed above the progress bar. alma's own say ``alma:
    warning: ...`` (their file:line and source are noise); others (a run's own, e.g.
    sklearn's ConvergenceWarning) keep their category and the line that raised them."""
    from tqdm import tqdm

    text = str(message).removeprefix("alma: ")
    if filename.startswith(_ALMA_DIR):
        line_out = f"alma: warning: {text}"
    else:
        kind = category.__qualname__
        if category.__module__ != "builtins":
            kind = f"{category.__module__}.{kind}"
        line_out = f"warning: {kind}: {text} (at {filename}:{lineno})"
    tqdm.write(line_out, file=sys.stderr)  # keeps a progress bar intact


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alma`` console script; returns the exit code."""
    args = parser().parse_args(argv)
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `alma results x | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_OK
    except AlmaError as exc:  # said what is wrong and the fix; a traceback adds nothing
        print(f"alma: error: {exc}", file=sys.stderr)
        for kind, code in ((ConfigError, EXIT_CONFIG), (StateError, EXIT_STATE)):
            if isinstance(exc, kind):
                return code
        return EXIT_LOCKED if isinstance(exc, LockedError) else EXIT_FAILED_RUNS
    finally:
        warnings.showwarning = previous_showwarning


if __name__ == "__main__":
    sys.exit(main())
