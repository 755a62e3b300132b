"""The notebook controller without a kernel: buttons drive the dispatcher, the display
follows its status, a broken widget never breaks a run, and no timer thread leaks."""

from __future__ import annotations

import dataclasses
import gc
import logging
import re
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from ipywidgets.widgets.widget import _instances
from notebook_helpers import controller_threads, make_dispatcher, wait_for

import alma.notebook
import alma.notebook.registry
from alma.notebook import controller as controller_mod
from alma.notebook import strip, watch
from alma.notebook.controller import IDLE_GRACE, Controller

# A run that checkpoints often: stop() interrupts it at its next save_callback.
GATE = threading.Event()


def quick_run(instance: str, save_callback: Any, state: Any, iteration: int) -> dict[str, Any]:
    return {"value": iteration}


def slow_run(instance: str, save_callback: Any, state: Any, iteration: int) -> dict[str, Any]:
    for step in range(150):
        time.sleep(0.01)
        save_callback({"step": step})
    return {"value": iteration}


def gated_run(instance: str, save_callback: Any, state: Any, iteration: int) -> dict[str, Any]:
    """Holds its worker until the test opens the gate (then checkpoints and ends)."""
    GATE.wait(20)
    save_callback({"gate": "passed"})
    return {"value": iteration}


def failing_run(instance: str, save_callback: Any, state: Any, iteration: int) -> dict[str, Any]:
    if instance.endswith("f0001.txt"):
        raise ValueError(f"bad input in {Path(instance).name}")
    return {"value": iteration}


def bar_text(c: Controller) -> str:
    """The text right of the bar, as read (tqdm pads it with figure spaces)."""
    return str(c.bar.container.children[2].value).replace("\u2007", " ")


@pytest.fixture
def cleanup() -> Any:
    made: list[Any] = []
    yield made
    GATE.set()
    for obj in made:
        if isinstance(obj, Controller):
            obj.close()
        else:
            obj.stop(timeout=10)
            obj.close()
    GATE.clear()


def test_initial_display_is_idle_with_start_enabled(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, quick_run)
    c = Controller(d)
    cleanup += [c, d]
    assert c.start_button.description == "Start"
    assert c.stop_button.description == "Stop"
    assert c.status_label.value == "idle"
    assert not c.start_button.disabled
    assert c.stop_button.disabled
    for widget, cls in [
        (c.start_button, "alma-start"),
        (c.stop_button, "alma-stop"),
        (c.status_label, "alma-status"),
        (c.counts, "alma-counts"),
        (c.instances, "alma-instances"),
        (c, "alma-controller"),
    ]:
        assert cls in widget._dom_classes
    pbar = c.bar.container.children[1]
    assert (pbar.value, pbar.max) == (0, 6)
    assert "pending <b>6</b>" in c.counts.value


def test_start_button_runs_to_finished(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, quick_run, instances=4, iterations=5)
    c = Controller(d)
    cleanup += [c, d]
    c.start_button.click()
    assert d.join(timeout=20)
    wait_for(lambda: c.status_label.value == "finished", timeout=5)
    pbar = c.bar.container.children[1]
    assert (pbar.value, pbar.max) == (20, 20)
    assert pbar.bar_style == "success"
    assert c.start_button.disabled and c.stop_button.disabled
    assert "done <b>20</b>" in c.counts.value
    assert c.instances.html.count("alma-cell-complete") == 4


def test_the_batch_jobs_show_in_one_line_only_when_there_are_some(
    tmp_path: Path, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alma.records import JobCounts

    d = make_dispatcher(tmp_path, quick_run)
    c = Controller(d)
    cleanup += [c, d]
    assert c.jobs.value == ""  # threads: no jobs, no line
    jobs: list[JobCounts | None] = [JobCounts(pending=1, running=2, gone=3)]
    monkeypatch.setattr(type(d), "jobs", property(lambda self: jobs[0]))
    c.refresh()
    text = re.sub(r"<[^>]+>", "", c.jobs.value)
    assert text == "SLURM jobs: 1 pending · 2 running · 3 gone"
    jobs[0] = JobCounts(0, 0, 0)  # an executor with jobs that has submitted none yet
    c.refresh()
    assert c.jobs.value == ""


def test_a_grid_shows_counts_per_configuration(tmp_path: Path, cleanup: list[Any]) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")

    def variant(instance: str, k: int) -> int:
        if k == 2 and instance.endswith("b.txt"):
            raise ValueError("no")
        return k

    d = alma.Experiment(
        run=variant,
        instances=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        iterations=3,
        params={"k": [1, 2]},
        state=str(tmp_path / "grid.sqlite"),
    )
    c = Controller(d)
    cleanup += [c, d]
    assert "k=1: done <b>0</b>" in c.configs.value
    c.start_button.click()
    assert d.join(timeout=20)
    wait_for(lambda: c.status_label.value == "finished", timeout=5)
    assert "k=1: done <b>6</b> · failed <b>0</b>" in c.configs.value
    assert "k=2: done <b>3</b> · failed <b>3</b>" in c.configs.value
    assert "b.txt · k=2" in c.instances.html  # each cell names its configuration


def test_stop_button_does_not_block_and_shows_stopping(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, gated_run, instances=2, iterations=2, workers=2)
    c = Controller(d)
    cleanup += [c, d]
    c.start_button.click()
    wait_for(lambda: d.progress.running == 2)
    c.refresh()
    assert c.status_label.value == "running"
    assert c.start_button.disabled and not c.stop_button.disabled

    t0 = time.monotonic()
    c.stop_button.click()  # the runs are held at the gate: stop() itself cannot return
    assert time.monotonic() - t0 < 1.0
    assert c.status_label.value == "stopping"
    assert c.start_button.disabled and c.stop_button.disabled
    assert d.running  # still winding down, and the kernel thread is free

    GATE.set()  # runs reach save_callback, are interrupted and saved
    wait_for(lambda: c.status_label.value == "paused", timeout=10)
    assert not d.running
    assert not c.start_button.disabled and c.stop_button.disabled
    assert d.progress.done + d.progress.pending == 4


def test_stop_then_start_resumes(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, slow_run, instances=2, iterations=1, workers=2)
    c = Controller(d)
    cleanup += [c, d]
    c.start_button.click()
    wait_for(lambda: d.progress.running == 2)
    c.stop_button.click()
    wait_for(lambda: c.status_label.value == "paused", timeout=10)
    assert d.progress.done == 0
    c.start_button.click()
    assert d.running
    assert d.join(timeout=30)
    wait_for(lambda: c.status_label.value == "finished", timeout=5)


def test_start_error_is_shown_not_raised(
    tmp_path: Path, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = make_dispatcher(tmp_path, quick_run)
    c = Controller(d)
    cleanup += [c, d]

    def refuse() -> None:
        raise alma.LockedError("exp is running in another process (pid 1)")

    monkeypatch.setattr(d, "start", refuse)
    c.start_button.click()  # must not raise into the kernel's comm handler
    assert "Could not start" in c.message.value
    assert "another process" in c.message.value


def test_failures_grouped_behind_a_toggle_in_a_warning_style(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    d = make_dispatcher(tmp_path, failing_run, instances=3, iterations=2)
    c = Controller(d)
    cleanup += [c, d]
    assert c.error.layout.display == "none"
    assert c.retry_button.disabled  # nothing failed yet
    c.start_button.click()
    d.join(timeout=20)
    wait_for(lambda: c.status_label.value == "finished", timeout=5)
    assert c.error.layout.display != "none"
    assert c.error.selected_index is None  # folded until the user opens it
    assert c.error.titles[0] == "Errors: 2 failed runs (1 kind)"
    panel = c.error_text.value
    assert panel.count("alma-error-group") == 1  # two runs, one kind of error
    assert "<b>2</b>" in panel and "ValueError: bad input in f0001.txt" in panel
    assert re.search(r"e\.g\. \S*f0001\.txt #[01]<", panel)  # an example run
    assert "<details>" in panel and "Traceback" in panel  # behind a toggle
    assert "failed <b>2</b>" in c.counts.value
    # a few failed runs are a warning, not the red bar of a crash
    assert c.bar.container.children[1].bar_style == "warning"
    assert "2 failed" in bar_text(c)
    assert c.instances.html.count("alma-cell-failing") == 1
    assert not c.retry_button.disabled


def test_retry_failed_runs_them_again(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, failing_run, instances=3, iterations=2)
    c = Controller(d)
    cleanup += [c, d]
    d.start()
    assert d.join(timeout=20) is True
    c.refresh()
    assert d.progress.failed == 2
    c.retry_button.click()  # forgets them and starts: they fail again, once each
    assert d.join(timeout=20) is True
    wait_for(lambda: c.status_label.value == "finished", timeout=5)
    assert "2 failed runs will run again." in c.busy.value
    runs = d.results
    assert len(runs) == 6 and (runs["attempts"] == 1).all()
    assert sorted(runs[runs["status"] == "failed"]["iteration"]) == [0, 1]


def test_a_halted_session_is_the_only_red_bar(tmp_path: Path, cleanup: list[Any]) -> None:
    from alma.errors import StateError

    d = make_dispatcher(tmp_path, quick_run, instances=2, iterations=1)
    c = Controller(d)
    cleanup += [c, d]
    d.start()
    assert d.join(timeout=20)
    # what a failed write leaves: the session's reason and the error front-ends show
    d._halted = StateError("State file x.sqlite: saving failed (disk full).")
    d.last_error = alma.RunError("", -1, str(d._halted), "")
    c.refresh()
    assert c.bar.container.children[1].bar_style == "danger"
    assert c.error.titles[0].startswith("Stopped by an error: State file x.sqlite")


def test_finished_shows_this_sessions_time_and_rate(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, quick_run, instances=3, iterations=4)
    c = Controller(d)
    cleanup += [c, d]
    assert "run/s" not in bar_text(c)  # no session yet: counts only
    d.start()
    assert d.join(timeout=20)
    c.refresh()
    text = bar_text(c)
    assert "12/12" in text and "this session" in text
    rate = d.progress.rate
    assert rate and "?" not in text and "run/s" in text


def test_a_resumed_session_shows_its_own_numbers(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, slow_run, instances=2, iterations=2, workers=2)
    d.start()
    wait_for(lambda: d.progress.done >= 2, timeout=20)
    d.stop()
    d.close()
    d = make_dispatcher(tmp_path, slow_run, instances=2, iterations=2, workers=2)
    c = Controller(d)
    cleanup += [c, d]
    shown = bar_text(c)
    assert "this session" not in shown and "run/s" not in shown  # none in this process
    d.start()
    assert d.join(timeout=20)
    c.refresh()
    p = d.progress
    assert p.elapsed < 5  # this session's clock, not the first one's
    assert "this session" in bar_text(c)


def test_running_now_is_folded_and_lists_runs_in_flight(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, gated_run, instances=2, iterations=1, workers=2)
    c = Controller(d)
    cleanup += [c, d]
    assert c.running_now.selected_index is None
    c.start_button.click()
    wait_for(lambda: d.progress.running == 2, timeout=10)
    c.refresh()
    assert c.running_now.titles[0] == "Running now (2)"
    assert c.running_text.value == ""  # folded: not even read
    c.running_now.selected_index = 0  # the user unfolds it: drawn at once
    table = c.running_text.value
    assert "f0000.txt" in table and "f0001.txt" in table and "#0" in table
    assert "running for" in table
    GATE.set()
    assert d.join(timeout=20)


def test_ui_error_never_reaches_the_engine(
    tmp_path: Path, cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    d = make_dispatcher(tmp_path, slow_run, instances=2, iterations=2, workers=2)
    c = Controller(d)
    cleanup += [c, d]

    def broken(*args: Any) -> None:
        raise RuntimeError("widget exploded")

    c._draw_bar = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="alma.notebook.controller"):
        c.start_button.click()
        wait_for(lambda: c.ui_errors >= 3, timeout=10)  # the timer keeps ticking
        assert d.join(timeout=30)
    assert d.progress.done == 4
    assert len(d.results) == 4
    logged = [r for r in caplog.records if "redrawing failed" in r.getMessage()]
    assert len(logged) == 1  # logged once, not once per tick


def test_timer_thread_ends_when_quiet_and_restarts_on_start(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    d = make_dispatcher(tmp_path, slow_run, instances=1, iterations=2, workers=1)
    c = Controller(d)
    cleanup += [c, d]
    assert c._timer is None  # idle: nothing to poll
    c.start_button.click()
    assert c._timer is not None and c._timer.is_alive()
    wait_for(lambda: d.progress.running == 1)
    c.stop_button.click()
    wait_for(lambda: not d.running, timeout=10)
    timer = c._timer
    assert timer is not None
    timer.join(timeout=IDLE_GRACE + 5)
    assert not timer.is_alive()
    assert c.status_label.value == "paused"
    c.start_button.click()
    assert c._timer is not None and c._timer.is_alive() and c._timer is not timer


def test_a_cell_that_starts_and_joins_refreshes_a_shown_controller(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    """`d.start(); d.join()` in a later cell: the shown controller must not stay stale."""
    d = make_dispatcher(tmp_path, quick_run)
    c = Controller(d)
    cleanup += [c, d]
    assert c.status_label.value == "idle"
    d.start()
    d.join(timeout=20)
    watch._after_cell()  # what IPython's post_run_cell event calls
    wait_for(lambda: c.status_label.value == "finished")


def test_close_ends_the_timer(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, slow_run, instances=1, iterations=1, workers=1)
    cleanup.append(d)
    before = len(controller_threads())
    models_before = set(_instances)
    c = Controller(d)
    c.start_button.click()
    assert len(controller_threads()) == before + 1
    c.close()
    assert len(controller_threads()) == before
    assert set(_instances) == models_before  # every part was closed
    assert d.running  # closing the view leaves the experiment alone
    assert alma.notebook.controller_for(d) is not c  # a closed controller is not reused


def test_a_closed_controller_lets_its_dispatcher_go(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, quick_run)
    c = alma.notebook.controller_for(d)
    cleanup.append(c)
    ref = weakref.ref(d)
    c.close()
    assert c.dispatcher is None
    d.close()  # the state file; what must go is the object (and its connection)
    del d
    gc.collect()
    assert ref() is None


class _Holder:
    """Stands for a controller the widget machinery dropped without close()."""

    closed = False

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher


def test_the_registry_alone_keeps_no_dispatcher_alive(tmp_path: Path) -> None:
    d = make_dispatcher(tmp_path, quick_run)
    holder = _Holder(d)  # like a controller, it holds its dispatcher strongly
    alma.notebook.registry.register(d, holder)  # type: ignore[arg-type]
    assert alma.notebook.controller_for(d) is holder
    ref = weakref.ref(d)
    d.close()
    del d, holder
    gc.collect()
    assert ref() is None


def test_one_controller_per_dispatcher(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, quick_run)
    c1 = alma.notebook.controller_for(d)
    c2 = alma.notebook.controller_for(d)
    cleanup += [c1, d]
    assert c1 is c2


def test_a_newer_load_retires_the_old_controller(tmp_path: Path, cleanup: list[Any]) -> None:
    d1 = make_dispatcher(tmp_path, quick_run)
    c1 = alma.notebook.controller_for(d1)
    d2 = make_dispatcher(tmp_path, quick_run)  # same state file: a re-run load cell
    c2 = alma.notebook.controller_for(d2)
    cleanup += [c1, c2, d1, d2]
    assert c2 is not c1
    assert c1.closed and c1.dispatcher is None
    assert c1.status_label.value == "replaced"
    assert c1.start_button.disabled
    c1.start_button.click()  # harmless
    assert not d1.running and not d2.running


def test_outside_a_kernel_a_dispatcher_shows_its_repr(tmp_path: Path, cleanup: list[Any]) -> None:
    d = make_dispatcher(tmp_path, quick_run)
    cleanup.append(d)
    assert d._repr_mimebundle_() == {"text/plain": repr(d)}


def test_instance_strip_reads_at_a_glance_for_many_files() -> None:
    n = 150
    names = [f"g{i}.txt" for i in range(n)]
    done = [30 if i < 50 else 10 if i < 100 else 0 for i in range(n)]
    failed = [1 if i == 7 else 0 for i in range(n)]
    running = [1 if 100 <= i < 103 else 0 for i in range(n)]
    legend, cells = strip.picture(names, done, failed, running, [30] * n)
    page = legend + "".join(cells)
    assert page.count("class='alma-cell ") == n
    assert page.count("alma-cell-complete") == 49
    assert page.count("alma-cell-failing") == 1
    assert page.count("alma-cell-partial") == 50
    assert page.count("alma-cell-running") == 3
    assert page.count("alma-cell-untouched") == 47
    assert "title='g7.txt: 30/30 done, 1 failed'" in page
    assert "untouched 47" in page  # the legend counts each kind


def test_instance_strip_groups_huge_batches() -> None:
    n = strip.MAX_CELLS * 4 + 1
    legend, cells = strip.picture(
        [str(i) for i in range(n)], [0] * n, [0] * (n - 1) + [1], [0] * n, [1] * n
    )
    page = legend + "".join(cells)
    assert page.count("class='alma-cell ") <= strip.MAX_CELLS
    assert "one cell = 5 instances" in page
    assert page.count("alma-cell-failing") == 1  # a failure stays visible when grouped


@pytest.mark.timeout(60)
def test_engine_import_does_not_load_the_widget_stack() -> None:
    code = (
        "import sys, alma, alma.experiment, alma.dispatcher\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('ipywidgets', 'IPython', 'ipykernel', 'alma.notebook') or m == 'alma.notebook')\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_reloading_a_running_experiment_reuses_dispatcher_and_controller(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    d = make_dispatcher(tmp_path, gated_run, instances=2, iterations=1)
    c = alma.notebook.controller_for(d)
    cleanup += [c, d]
    c.start_button.click()
    with pytest.warns(UserWarning, match="already running"):
        again = make_dispatcher(tmp_path, gated_run, instances=2, iterations=1)
    assert again is d
    assert alma.notebook.controller_for(again) is c
    assert not c.closed


def test_a_run_in_another_process_is_watched_not_shown_paused(
    make_experiment: Any, cleanup: list[Any]
) -> None:
    """A notebook watching `alma run` in a terminal: live counts; Stop (which would pause
    it) works, Start does not (test_detach.py clicks Stop)."""
    from helpers import alma_popen

    exp = make_experiment(
        "import time\n"
        "def run(instance, save_callback, state):\n"
        "    time.sleep(0.02)\n"
        "    return 1\n",
        instances=4,
        iterations=25,
    )
    d = alma.experiment.load(exp)
    c = Controller(d)
    cleanup += [c, d]
    proc = alma_popen("run", "-q", exp)
    try:
        wait_for(lambda: d.running_elsewhere is not None, timeout=30)
        c._ensure_timer()
        wait_for(lambda: c.status_label.value == controller_mod.ELSEWHERE, timeout=10)
        assert c.start_button.disabled and not c.stop_button.disabled
        first = d.progress.done
        wait_for(lambda: d.progress.done > first, timeout=10)  # it follows the other process
    finally:
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    wait_for(lambda: c.status_label.value == "finished", timeout=10)


def scored_run(instance: str, save_callback: Any, state: Any, iteration: int) -> dict[str, Any]:
    if instance.endswith("f0002.txt") and iteration == 0:
        raise ValueError("no convergence")
    n = int(Path(instance).read_text())
    return {"score": n * 10 + iteration, "label": f"n{n}", "steps": iteration}


def test_results_view_costs_nothing_folded_and_summarises_when_open(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    d = make_dispatcher(tmp_path, scored_run, instances=3, iterations=3)
    c = Controller(d)
    cleanup += [c, d]
    d.start()
    assert d.join(timeout=20)
    c.refresh()
    view = c.results
    assert view.selected_index is None and view.reads == 0  # folded: never read
    view.selected_index = 0  # the user opens it: drawn at once
    assert view.reads == 1
    assert list(view.column.options) == ["score", "steps"]  # numeric result columns
    assert view.column.value == "score"
    table = view.table.value
    # f0001: scores 10, 11, 12 -> mean 11, min 10, max 12; f0002 has one failed run
    assert "<td>" + str(tmp_path / "data" / "f0001.txt") + "</td>" in table
    assert ">11</td>" in table and ">10</td>" in table and ">12</td>" in table
    c.refresh()
    assert view.reads == 1  # no new run committed: not read again
    view.sort.value = "failed"
    first_row = view.table.value.split("<tr>")[2]
    assert "f0002.txt" in first_row  # failing instances first when sorted by failed
    view.column.value = "steps"
    assert view.reads == 3 and ">2</td>" in view.table.value


def test_results_view_plots_with_matplotlib(tmp_path: Path, cleanup: list[Any]) -> None:
    pytest.importorskip("matplotlib")
    d = make_dispatcher(tmp_path, scored_run, instances=3, iterations=3)
    c = Controller(d)
    cleanup += [c, d]
    d.start()
    assert d.join(timeout=20)
    c.results.selected_index = 0
    assert c.results.plot.value.startswith("<svg")


def test_a_whole_strip_picture_empties_the_budget_without_a_debt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A final or forced picture is sent at once whatever its size; afterwards the strip
    is back to its budget within a second, instead of standing still for as long as
    that picture would have taken at the budget's rate."""
    clock = [1000.0]
    monkeypatch.setattr(strip.time, "monotonic", lambda: clock[0])
    n = 3000

    def pic(running_from: int) -> strip.Picture:
        running = [1 if running_from <= i < running_from + 64 else 0 for i in range(n)]
        return strip.picture(
            [f"data/i{i:05d}.txt" for i in range(n)], [1] * n, [0] * n, running, [40] * n
        )

    s = strip.Strip()
    s.show(pic(0), whole=True)
    s.show(pic(1000), whole=True)  # every chunk it touches goes now: far above BUDGET
    assert not s._waiting and s._tokens == 0
    clock[0] += 1.5  # the next timed redraw, a moment later
    sent: list[int] = []
    for i, chunk in enumerate(s._chunks):
        chunk.observe(lambda _change, i=i: sent.append(i), names="value")
    s.show(pic(2000))
    assert sent, "the strip stood still after a whole picture"
    assert s._waiting, "the budget no longer applies"  # the rest follows, within budget
    clock[0] += 60
    s.show(pic(2000))
    assert not s._waiting
    assert s.html.count("alma-cell-running") == 32  # 64 running instances, 2 a cell


def test_unfolding_a_section_keeps_the_strip_within_its_budget(
    tmp_path: Path, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = make_dispatcher(tmp_path, scored_run, instances=3, iterations=3)
    c = Controller(d)
    cleanup += [c, d]
    d.start()
    assert d.join(timeout=20)
    c.refresh()
    wholes: list[bool] = []
    draw = c._draw_instances
    monkeypatch.setattr(
        c, "_draw_instances", lambda d, whole: (wholes.append(whole), draw(d, whole))
    )
    c.results.selected_index = 0
    c.running_now.selected_index = 0
    assert wholes == [False, False]  # drawn now, but not as a forced whole picture
    assert c.results.reads == 1 and c.results.table.value


def test_the_error_panel_catches_up_once_the_experiment_settles(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    """While failures keep coming the panel is read at most every ERRORS_INTERVAL; the
    last failures before a finish must still show, as no later refresh may come."""
    d = make_dispatcher(tmp_path, failing_run, instances=3, iterations=2)
    c = Controller(d)
    cleanup += [c, d]
    d.start()
    assert d.join(timeout=20)
    p = d.progress
    assert p.failed == 2
    t = time.monotonic() + 100  # well after any drawing the controller did itself
    c._draw_errors(d, dataclasses.replace(p, failed=1), None, t, settled=False)
    assert c.error.titles[0].startswith("Errors: 1 failed run")
    c._draw_errors(d, p, None, t + 0.5, settled=False)  # more of the same: later
    assert c.error.titles[0].startswith("Errors: 1 failed run")
    c._draw_errors(d, p, None, t + 0.6, settled=True)  # finished: now
    assert c.error.titles[0] == "Errors: 2 failed runs (1 kind)"


def test_an_error_panel_that_could_not_be_read_is_read_at_the_next_redraw(
    tmp_path: Path, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed read of the failures (the file busy, say) must not leave the panel
    hidden for good: nothing may remember it as drawn."""
    d = make_dispatcher(tmp_path, failing_run, instances=3, iterations=2)
    d.start()
    assert d.join(timeout=20)
    reads: list[int] = []
    real = type(d).failures

    def flaky(self: Any) -> Any:
        reads.append(1)
        if len(reads) == 1:
            raise RuntimeError("database is locked")
        return real.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(type(d), "failures", property(flaky))
    c = Controller(d)  # its first drawing fails to read the failures
    cleanup += [c, d]
    assert c.ui_errors == 1 and c.error.layout.display == "none"
    c.refresh()
    assert c.error.layout.display != "none"
    assert c.error.titles[0] == "Errors: 2 failed runs (1 kind)"
