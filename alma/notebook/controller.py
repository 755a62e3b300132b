"""The live notebook controller: Start/Stop, a progress bar, counts, errors, instances.

The controller is a thin front-end over :class:`~alma.dispatcher.Dispatcher`: it acts
only through the dispatcher's public methods and watches it by polling the frozen
:attr:`~alma.dispatcher.Dispatcher.progress` snapshot on its own timer thread. The
engine never calls the UI, so 20,000 runs/s cost one snapshot per redraw, and a widget
that raises is logged once and ignored instead of breaking a run.

Imports: this module uses only :mod:`alma.notebook.registry` (each Controller registers
itself there, so ``alma.notebook.controller_for`` and the ``%alma`` magics find it) and
never the package ``__init__``; the package imports this module lazily, on first use of
``Controller`` or ``controller_for``. The engine reaches it only through
``alma.notebook.mimebundle`` (lazily, from ``Dispatcher._repr_mimebundle_``).

Why a captured context: with ipykernel 7 a comm message sent from a plain background
thread carries whatever parent header the kernel saw last (the cell running *now*), or
none, so the browser may drop the update or route it to the wrong output area (ipykernel
#1450, ipywidgets #4001). The controller therefore records the ``contextvars`` context of
the cell that displayed it and sends every timer update from inside a copy of that
context, where ``kernel.get_parent()`` answers with the displaying cell's request. This
does not touch the kernel's global parent, so output of the cell running meanwhile stays
where it belongs.
"""

from __future__ import annotations

import contextvars
import html
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import ipywidgets as widgets
from tqdm.notebook import tqdm as tqdm_notebook

from . import render, strip, watch
from .registry import open_controllers, register, touch, unregister
from .results import ResultsView
from .shell import quiet_pauses
from .snapshot import Snapshot

if TYPE_CHECKING:
    import pandas as pd

    from ..dispatcher import Dispatcher, Progress
    from ..records import RunError

__all__ = ["Controller"]

log = logging.getLogger(__name__)

#: Seconds between redraws while runs go on (4 per second: each redraw sends a few
#: comm messages of ~0.7 KB, mostly headers; see docs/notebook.md for the traffic).
INTERVAL = 0.25
#: Seconds between refreshes of the counts and the per-instance view while running (the
#: view reads a DataFrame).
INSTANCES_INTERVAL = 0.5
#: Seconds between readings of the grouped failures while more keep coming (a query).
ERRORS_INTERVAL = 2.0
#: Seconds the timer keeps polling after the dispatcher went quiet (see watch.py).
IDLE_GRACE = watch.IDLE_GRACE
#: A cell that has run this long while the experiment runs is a blocking one.
BUSY_AFTER = 1.0
#: What the controller says while a cell blocks the kernel (clicks wait for its end).
BUSY_NOTE = "kernel busy: Stop acts when this cell ends, or interrupt the kernel to pause now"

#: Shown while another process or kernel runs the experiment: this view only watches.
ELSEWHERE = "running elsewhere"
_ACTIVE = ("running", "stopping", ELSEWHERE)


class Controller(widgets.VBox):
    """A live control panel for one dispatcher: Start/Stop, progress, counts, status,
    the last error, and a per-instance strip that reads at a glance for 100+ files.

    Displaying a Dispatcher shows this widget (one per dispatcher, reused); build one
    explicitly with ``Controller(dispatcher)``. Buttons never block the kernel: Stop
    waits for runs to wind down in a background thread while the status says "stopping".
    """

    def __init__(self, dispatcher: Dispatcher, *, interval: float = INTERVAL) -> None:
        self.interval = max(float(interval), 0.1)  # at most ~10 redraws per second
        self._dispatcher: Dispatcher | None = dispatcher
        self._draw_lock = threading.RLock()
        self._clock = watch.Timer()
        self._stopper: threading.Thread | None = None
        self._message = ""
        self._note = ""
        self._ui_error_logged = False
        #: How many redraws raised (each is logged once, then ignored).
        self.ui_errors = 0
        # The displaying cell's context: every timer update is sent from a copy of it
        # (ipykernel 7 routes a comm message by it; see the module docstring).
        self._context = contextvars.copy_context()
        self._instances_key: Any = None
        self._instances_picture = strip.Picture("", [])
        self._instances_at = 0.0
        self._errors_key: Any = None
        self._errors_at = 0.0
        self._last_status = ""
        #: Whether Start runs the experiment in a detached runner (it outlives the
        #: kernel); set once this controller has seen the experiment run elsewhere, so
        #: Start resumes a detached runner detached again. The Start button says so.
        self.detach = False
        self.snapshot = Snapshot()

        name = html.escape(dispatcher.spec.name)
        self.heading = _html("alma-title", f"<b>alma</b> · {name}")
        self.start_button, self.stop_button, self.retry_button = _buttons()
        self.start_button.on_click(self._on_start)
        self.stop_button.on_click(self._on_stop)
        self.retry_button.on_click(self._on_retry)
        self.status_label = _styled(widgets.Label(value=""), "alma-status")
        self.bar = _make_bar(dispatcher.spec.total)
        self.counts = _html("alma-counts")
        self.configs = _html("alma-configs")  # with "params": counts per configuration
        self.jobs = _html("alma-jobs")  # with "slurm": the worker jobs, from Dispatcher.jobs
        self.message = _html("alma-message")
        self.busy = _html("alma-busy")
        self.error, self.error_text = _folded("alma-error", hidden=True)
        self.running_now, self.running_text = _folded("alma-running-now")
        self.running_now.observe(self._folded_or_unfolded, names="selected_index")
        self.instances = strip.Strip()
        params = frozenset(n for c in dispatcher.spec.params for n in c.params)
        self.results = ResultsView(self._read_results, params)
        self.results.observe(self._folded_or_unfolded, names="selected_index")
        self.dashboard = _html("alma-dashboard")
        header = widgets.HBox(
            [
                self.start_button,
                self.stop_button,
                self.retry_button,
                widgets.HTML("status:"),
                self.status_label,
                self.dashboard,
            ],
            layout=widgets.Layout(align_items="center"),
        )
        parts = [
            self.bar.container,
            self.counts,
            self.configs,
            self.jobs,
            self.busy,
            self.message,
            self.error,
            self.running_now,
            self.results,
            self.instances,
        ]
        self.style_sheet = _html("alma-style", render.STYLE)
        super().__init__(children=[self.style_sheet, self.heading, header, *parts])
        self.add_class("alma-controller")

        _retire_others(dispatcher)
        register(dispatcher, self)
        shell = watch.current_shell()
        watch.install(shell)  # follow the kernel's cells (a blocking one, their ends)
        if shell is not None:
            quiet_pauses(shell)  # an interrupted join() prints one line
        watch.add(self)
        self.refresh()
        if dispatcher.running:
            self.follow()

    # -- public --------------------------------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher | None:
        """The dispatcher shown (None once closed or replaced by a newer load)."""
        return self._dispatcher

    @property
    def closed(self) -> bool:
        """True once close() was called or a newer controller replaced this one."""
        return self._clock.closed

    def refresh(self) -> None:
        """Redraw now from the caller's thread; never raises (a UI error is logged)."""
        self._safe_redraw(force=True)

    def _folded_or_unfolded(self, _change: Any = None) -> None:
        """A section was opened or closed: draw what it shows now, with the strip kept
        within its budget (a forced redraw would send every changed chunk of the strip
        at once: tens of KB at 3,000 files while runs go on, on every click)."""
        self._instances_at = float("-inf")  # the slow parts (results included) now
        self._safe_redraw()

    def resync(self) -> None:
        """Redraw now and resend the whole state from the calling cell (what ``%alma
        status`` does), so that even front-ends which keep only the messages of the cell
        they run see the current picture."""
        self.refresh()
        self._send_full_state()

    def follow(self) -> None:
        """Make sure the controller redraws on its timer while the dispatcher runs (what
        the buttons, a display, the post-cell hook and the ``%alma`` magics ask for). The
        timer ends by itself once the dispatcher has been quiet for ``IDLE_GRACE``
        seconds; on a closed controller this does nothing."""
        self._ensure_timer()

    def close(self) -> None:
        """Stop the timer, close the widgets and let go of the dispatcher (which is left
        as it is, running or not): a closed controller keeps neither the dispatcher nor
        its open state file alive."""
        self._clock.end()
        with self._draw_lock:
            d, self._dispatcher = self._dispatcher, None
        if d is not None:
            unregister(d, self)
        self.bar.disable = True  # tqdm must not redraw a closed bar when collected
        with self._draw_lock:
            _close_all(self.children)
            self.layout.close()
            super().close()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        # Displayed (again): updates now belong to this cell's output area.
        self._context = contextvars.copy_context()
        if self._dispatcher is not None:
            touch(self._dispatcher)  # what the %alma magics act on by default
        self.resync()
        if self._dispatcher is not None and self._dispatcher.running:
            self.follow()
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None and self._dispatcher is not None:
            bundle["text/plain"] = repr(self._dispatcher)
            try:  # an output of its own, for a notebook saved and read without a kernel
                self.snapshot.show(*self._snapshot())
            except Exception:
                log.debug("alma controller: showing the snapshot failed", exc_info=True)
        return bundle

    def _snapshot(self) -> tuple[str, str]:
        """The still picture (HTML, plain text) of what the controller shows now."""
        d = self._dispatcher
        if d is None:
            return "", ""
        p = d.progress  # read now: the timer may not have redrawn since the cell's end
        return render.snapshot_html(d.spec.name, p, self._status(d, p)), repr(d)

    def update_snapshot(self, now: bool = True) -> None:
        """Bring the saved snapshot up to date (``now``: else at most every few seconds);
        the post-cell hook calls it in each cell's context, so nbclient records it too."""
        if self._dispatcher is not None:
            self.snapshot.update(*self._snapshot(), now=now)

    def _send_full_state(self) -> None:
        """Resend every part's state from this cell: front-ends that only keep messages
        of the cell they run (nbclient, for the notebook's saved widget state) then see
        the whole current picture, not just what changed since the last display."""
        parts = [
            self.start_button,
            self.stop_button,
            self.retry_button,
            self.status_label,
            self.counts,
            self.configs,
            self.jobs,
            self.message,
            self.busy,
            self.error,
            self.error.layout,
            self.error_text,
            self.running_now,
            self.running_text,
            *self.results.parts,
            self.dashboard,
            *self.instances.parts,
            *self.bar.container.children,  # text, bar, text
        ]
        try:
            for w in parts:
                w.send_state()
        except Exception:  # a closed widget: the display shows what it has
            log.debug("alma controller: resending state failed", exc_info=True)

    # -- buttons -------------------------------------------------------------------

    def _on_start(self, _button: Any = None) -> None:
        d = self._dispatcher
        if d is None:
            return
        self._message = self._note = ""
        try:
            if self.detach:  # returns once the runner holds the lock (about 0.4 s)
                d.start(detach=True)
            else:
                d.start()  # returns at once; opening the session is a few milliseconds
        except Exception as exc:  # e.g. LockedError: show it, keep the kernel happy
            self._message = f"Could not start: {exc}"
        self.refresh()
        self.follow()

    def _on_stop(self, _button: Any = None) -> None:
        d = self._dispatcher
        if d is None or self._stopping():
            return
        self._message = self._note = ""
        # stop() waits for in-flight runs to wind down: never in the kernel's thread.
        self._stopper = threading.Thread(
            target=self._stop_in_background, args=(d,), name="alma-stop", daemon=True
        )
        self._stopper.start()
        self.refresh()
        self.follow()

    def _on_retry(self, _button: Any = None) -> None:
        d = self._dispatcher
        if d is None:
            return
        try:
            n = d.retry_failed()  # a few milliseconds: one deletion through the writer
            if not d.running:
                d.start()
            self._message = ""
            self._errors_key = None  # read the failures again now
            self._note = f"{n} failed run{'s' if n != 1 else ''} will run again."
        except Exception as exc:  # e.g. LockedError
            self._message = f"Could not retry: {exc}"
        self.refresh()
        self.follow()

    def _stop_in_background(self, d: Dispatcher) -> None:
        try:
            d.stop()
        except Exception as exc:
            self._message = f"Could not stop: {exc}"
        finally:
            self._clock.wake.set()

    def _stopping(self) -> bool:
        """True while the Stop button's thread waits for runs to wind down."""
        return self._stopper is not None and self._stopper.is_alive()

    # -- drawing -------------------------------------------------------------------

    def _safe_redraw(self, force: bool = False) -> None:
        try:
            self._redraw(force)
        except Exception:
            self.ui_errors += 1
            if not self._ui_error_logged:
                self._ui_error_logged = True
                log.warning(
                    "alma controller: redrawing failed; the experiment is not affected "
                    "and further UI errors are not logged.",
                    exc_info=True,
                )

    def _status(self, d: Dispatcher, p: Progress) -> str:
        """What the status label says: the dispatcher's status, and what it cannot know
        (a stop asked from here, a runner elsewhere)."""
        status: str = p.status
        if status == "running" and self._stopping():
            status = "stopping"  # the stop thread may not have reached the engine yet
        elif status in ("idle", "paused") and d.running_elsewhere:
            # e.g. `alma run` in a terminal: keep watching it; Stop pauses it
            status = "stopping" if self._stopping() else ELSEWHERE
        return status

    def _redraw(self, force: bool = False) -> None:
        with self._draw_lock:
            d = self._dispatcher
            if d is None:
                return
            p = d.progress
            status = self._status(d, p)
            changed = status != self._last_status
            self._last_status = status
            now = time.monotonic()
            slow_parts = force or changed or now - self._instances_at >= INSTANCES_INTERVAL
            if slow_parts:
                self._instances_at = now
                self._draw_instances(d, whole=force or changed)
                self.results.refresh(p.finished)  # folded: returns at once
                self.dashboard.value = _dashboard_html(d.dashboard if d.running else None)
            halted = d.last_error if d.halted is not None else None
            with self.hold_sync():
                self._draw_bar(p, status, halted is not None)
                if slow_parts:  # the bar says how far it is 4 times a second already
                    self.counts.value = render.counts_html(p)
                    self.jobs.value = render.jobs_html(d.jobs)
                self.message.value = render.message_html(self._message)
                self.busy.value = render.busy_html(_busy_note(status) or self._note)
                self._draw_errors(d, p, halted, now, settled=status not in _ACTIVE)
                self._draw_running(d, p)
                # Status and buttons last: once they say "finished", the rest says so too.
                self.status_label.value = status
                self._set_buttons(status, p)
            if changed or status not in _ACTIVE:  # what JupyterLab would save is current
                self.snapshot.update(
                    render.snapshot_html(d.spec.name, p, status), repr(d), now=changed
                )

    def _read_results(self) -> pd.DataFrame:
        """The one read of results the Results view makes. The dispatcher keeps the
        frame it read and merges in the runs committed since, so a read while runs go
        on costs the new rows (and a copy), not the whole table."""
        d = self._dispatcher
        if d is None:
            import pandas as pd

            return pd.DataFrame({"instance": [], "status": []})
        return d.results

    def _set_buttons(self, status: str, p: Progress) -> None:
        """Which buttons can act now, and what Start does: the one place that decides
        it. A runner elsewhere (detached, a terminal, another kernel) can be stopped
        from here; once this controller has seen one, Start resumes it detached again,
        and its label says so."""
        if status == ELSEWHERE:
            self.detach = True
        self.start_button.disabled = status not in ("idle", "paused")
        self.stop_button.disabled = status not in ("running", ELSEWHERE)
        self.retry_button.disabled = not p.failed or status in ("stopping", ELSEWHERE)
        label = "Start detached" if self.detach else "Start"
        if self.start_button.description != label:
            self.start_button.description = label

    def _draw_bar(self, p: Progress, status: str, halted: bool = False) -> None:
        self.bar.show(p, status, halted)

    def _draw_errors(
        self, d: Dispatcher, p: Progress, halted: RunError | None, now: float, settled: bool
    ) -> None:
        """The folded error panel: failures grouped by error, read from the state file
        when the failed count changed (at most every ERRORS_INTERVAL while it grows, and
        at once when the experiment has settled: no later refresh may come)."""
        key = (p.failed, halted)
        if key == self._errors_key:
            return
        recent = self._errors_key is not None and now - self._errors_at < ERRORS_INTERVAL
        if recent and self._errors_key[0] and p.failed and not settled:  # catch up later
            return
        if not p.failed and halted is None:
            self.error.layout.display = "none"
        else:
            # Read and render first: if that fails (the file busy, say), the key stays
            # old and the next redraw tries again instead of believing the panel drawn.
            groups = d.failures if p.failed else []
            title = render.errors_title(p.failed, len(groups), halted)
            html = render.errors_html(groups, halted)
            self.error.titles = (title,)
            self.error_text.value = html
            self.error.layout.display = ""
        self._errors_key, self._errors_at = key, now

    def _draw_running(self, d: Dispatcher, p: Progress) -> None:
        """The folded list of runs in flight: only its title costs while folded."""
        self.running_now.titles = (f"Running now ({p.running})",)
        if self.running_now.selected_index == 0:
            self.running_text.value = render.running_html(d.in_flight)

    def _draw_instances(self, d: Dispatcher, whole: bool) -> None:
        frame = d.state
        names = [str(x) for x in frame["instance"]]
        done, failed, running, iterations = (
            [int(x) for x in frame[column]]
            for column in ("done", "failed", "running", "iterations")
        )
        key = (tuple(done), tuple(failed), tuple(running))
        if key == self._instances_key and not whole:
            self.instances.show(self._instances_picture, whole)  # chunks still waiting
            return
        self._instances_key = key
        grid = sorted({n for c in d.spec.params for n in c.params})
        if grid:  # a cell per instance in each configuration: say which in its name
            labels = (
                frame[grid]
                .astype(str)
                .agg(
                    lambda row: ", ".join(f"{n}={v}" for n, v in zip(grid, row, strict=True)),
                    axis=1,
                )
            )
            names = [f"{n} · {label}" for n, label in zip(names, labels, strict=True)]
            self.configs.value = render.configs_html(
                list(labels.drop_duplicates()), frame.assign(config=labels)
            )
        self._instances_picture = strip.picture(names, done, failed, running, iterations)
        self.instances.show(self._instances_picture, whole)

    # -- timer ---------------------------------------------------------------------

    @property
    def _timer(self) -> threading.Thread | None:
        """The live timer thread (None while idle: nothing to poll)."""
        return self._clock.thread

    def _ensure_timer(self) -> None:
        """Make sure a timer thread redraws (start one, or keep the live one awake); the
        implementation of :meth:`follow`."""
        self._clock.start(self)

    def _tick(self) -> bool:
        """One timed redraw in the displaying cell's context; True while worth polling."""
        try:
            self._context.run(self._safe_redraw)
        except RuntimeError:  # context entered elsewhere (should not happen): draw plainly
            self._safe_redraw()
        return self._last_status in _ACTIVE or self._stopping()

    def _needs_follow(self, after_cell: bool = False) -> bool:
        """True when the timer sleeps but should redraw: the dispatcher runs (asked by
        the watcher twice a second, so a blocking cell gets updates), or, at the end of
        a cell, the cell changed what the display last showed (after
        ``d.start(detach=True)``, the runner elsewhere is worth watching too)."""
        d = self._dispatcher
        if d is None or self._clock.alive:
            return False
        if d.running:
            return True
        if not after_cell:
            return False
        stale = d.status != self._last_status or d.running_elsewhere is not None
        return self._last_status in _ACTIVE or stale

    def _retire(self) -> None:
        """A newer controller shows the same experiment: let go of the old dispatcher
        (and its open state file) and say so, instead of showing stale numbers."""
        self._clock.end()
        with self._draw_lock:
            self._dispatcher = None
            try:
                self.start_button.disabled = True
                self.stop_button.disabled = True
                self.retry_button.disabled = True
                self.status_label.value = "replaced"
                self.message.value = (
                    "<i>This experiment was loaded again; the newer controller is live.</i>"
                )
            except Exception:  # a closed widget: nothing to tell
                pass


def _retire_others(dispatcher: Dispatcher) -> None:
    """Retire the idle controllers of other dispatchers of the same experiment."""
    others = [
        c
        for d, c in open_controllers()
        if d is not dispatcher and d.state_path == dispatcher.state_path
    ]
    for c in others:
        d = c.dispatcher
        if d is not None and not d.running:
            c._retire()


# -- building the widgets ------------------------------------------------------------

_W = TypeVar("_W", bound=widgets.DOMWidget)


def _styled(widget: _W, css_class: str) -> _W:
    widget.add_class(css_class)
    return widget


def _html(css_class: str, value: str = "") -> widgets.HTML:
    return _styled(widgets.HTML(value), css_class)


def _buttons() -> tuple[widgets.Button, widgets.Button, widgets.Button]:
    """Start, Stop and Retry failed, in the theme's own button colours (ipywidgets'
    coloured styles put white text on light green or orange: too little contrast)."""
    start = widgets.Button(description="Start", icon="play", tooltip="Start or resume")
    stop = widgets.Button(
        description="Stop",
        icon="stop",
        tooltip="Pause: no new runs, in-flight runs end and are saved",
    )
    retry = widgets.Button(
        description="Retry failed",
        icon="redo",
        tooltip="Forget the failed runs and run them again",
    )
    return (
        _styled(start, "alma-start"),
        _styled(stop, "alma-stop"),
        _styled(retry, "alma-retry"),
    )


def _dashboard_html(url: str | None) -> str:
    if not url:
        return ""
    link = html.escape(url, quote=True)
    return f"<a href='{link}' target='_blank' style='margin-left:12px'>Dask dashboard</a>"


def _busy_note(status: str) -> str:
    """What to say while a cell blocks the kernel and the experiment runs: clicks are
    handled between cells, so Stop would only act once that cell ends."""
    if status not in ("running", "stopping") or watch.cell_busy_for() < BUSY_AFTER:
        return ""
    return BUSY_NOTE


def _make_bar(total: int) -> _Bar:
    bar = _Bar(total=total, display=False, unit="run", leave=True, disable=False)
    bar.container.add_class("alma-progress")
    bar.container.children[1].add_class("alma-progress-bar")
    bar.container.layout.width = "100%"
    return bar


def _folded(css_class: str, hidden: bool = False) -> tuple[widgets.Accordion, widgets.HTML]:
    """A folded one-section accordion and the HTML inside it."""
    text = widgets.HTML()
    section = widgets.Accordion(children=[text])
    section.selected_index = None  # folded until asked for
    if hidden:
        section.layout.display = "none"
    section.add_class(css_class)
    return section, text


def _close_all(children: Iterable[widgets.Widget]) -> None:
    """Close every part (layouts and styles too): the widget registry holds each one
    until it is closed, and the front-end drops their views."""
    stack: list[widgets.Widget] = list(children)
    while stack:
        w = stack.pop()
        stack.extend(getattr(w, "children", ()))
        for part in (getattr(w, "layout", None), getattr(w, "style", None), w):
            if isinstance(part, widgets.Widget):
                part.close()


class _Bar(tqdm_notebook):  # type: ignore[misc]
    """tqdm's notebook bar fed from a dispatcher snapshot instead of update() calls, so
    elapsed time, rate and ETA are the dispatcher's own: this session's, frozen when it
    ended (a resumed experiment does not show the previous session's numbers)."""

    monitor_interval = 0  # no tqdm monitor thread: our timer drives every redraw

    #: Once this session's clock stopped (paused, finished): its time and rate, no ETA.
    ENDED = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed} this session, {rate_fmt}{postfix}]"
    #: No session in this process (loaded finished, or run elsewhere): counts only.
    COUNTS = "{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}"

    snapshot: tuple[int, int, float, float | None] | None = None
    bar_format: str | None

    @property
    def format_dict(self) -> dict[str, Any]:
        d = dict(super().format_dict)
        if self.snapshot is not None:
            n, total, elapsed, rate = self.snapshot
            # initial=n: when rate is unknown tqdm must not invent one from elapsed time
            d.update(n=n, total=total, elapsed=elapsed, rate=rate, initial=n)
        return d

    def show(self, p: Progress, status: str, halted: bool = False) -> None:
        """Draw ``p`` as seen by a controller whose status is ``status``; ``halted``: the
        session stopped because alma's own machinery failed (the only red bar)."""
        if status == ELSEWHERE or not p.elapsed:
            self.bar_format = self.COUNTS
        elif status in _ACTIVE:
            self.bar_format = None  # tqdm's own: elapsed<remaining, rate
        else:
            self.bar_format = self.ENDED
        self.snapshot = (p.finished, p.total, p.elapsed, p.rate)
        self.postfix = f"{p.failed} failed" if p.failed else None
        self.n = p.finished
        pbar = self.container.children[1]
        if pbar.max != p.total:
            pbar.max = p.total
            self.total = p.total
        if halted:
            style = "danger"
        elif p.failed:
            style = "warning"  # some runs failed; the experiment itself is fine
        elif status == "finished":
            style = "success"
        else:
            style = ""
        pbar.bar_style = style
        self.display(check_delay=False)
