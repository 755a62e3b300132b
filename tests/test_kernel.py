"""alma in real Jupyter kernels: the example notebooks run headless (nbclient), a kernel
killed with SIGKILL mid-run loses nothing and duplicates nothing, and the controller's
timer updates really reach the front-end, tagged with the cell that displayed it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from nbclient import NotebookClient
from notebook_helpers import NOTEBOOKS, copy_examples, wait_for, widget_states

import alma.experiment
from alma.lock import ExperimentLock

# -- helpers -------------------------------------------------------------------------


def execute_notebook(path: Path, timeout: int = 180) -> Any:
    """Run a notebook headless in its own folder; return it with outputs and widgets."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return nb


def outputs_text(cell: Any) -> str:
    """Everything a cell printed or returned, as plain text."""
    parts = []
    for out in cell.outputs:
        assert out.output_type != "error", f"{cell.source!r} raised {out.ename}: {out.evalue}"
        if out.output_type == "stream":
            parts.append(out.text)
        else:
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def cell_with(nb: Any, source_start: str) -> Any:
    matches = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    assert len(matches) == 1, f"expected one cell starting with {source_start!r}"
    return matches[0]


def models(nb: Any, model_name: str, dom_class: str | None = None) -> list[dict[str, Any]]:
    """States of the saved widgets of one kind (optionally carrying a CSS class)."""
    return [
        m["state"]
        for m in widget_states(nb).values()
        if m["model_name"] == model_name
        and (dom_class is None or dom_class in m["state"].get("_dom_classes", []))
    ]


class Kernel:
    """A real ipykernel driven through jupyter_client, recording every iopub message."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.km: KernelManager
        self.kc: BlockingKernelClient
        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd))
        self.iopub: list[dict[str, Any]] = []

    def run(self, code: str, timeout: float = 60) -> str:
        """Execute ``code``; return its msg_id. Fails on an error; collects all iopub."""
        msg_id = self.kc.execute(textwrap.dedent(code))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"cell did not finish within {timeout} s: {code!r}"
            try:
                msg = self.kc.get_iopub_msg(timeout=left)
            except queue.Empty:
                continue
            self.iopub.append(msg)
            parent = msg["parent_header"].get("msg_id")
            if parent == msg_id and msg["msg_type"] == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            if (
                parent == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return msg_id

    def stdout(self, msg_id: str) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.iopub
            if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
        )

    def eval(self, expr: str, timeout: float = 60) -> Any:
        """Value of a JSON-able expression evaluated in the kernel."""
        msg_id = self.run(f"import json as _j\nprint(_j.dumps({expr}))", timeout)
        return json.loads(self.stdout(msg_id).strip().splitlines()[-1])

    def kill(self) -> None:
        """SIGKILL, as the OS OOM killer or a crash would: no cleanup runs at all."""
        os.kill(self.km.provisioner.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        wait_for(lambda: not self.km.is_alive(), timeout=10)

    def restart(self) -> None:
        self.km.restart_kernel(now=True)
        self.kc.wait_for_ready(timeout=60)
        self.iopub.clear()

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(tmp_path)
    try:
        yield k
    finally:
        k.shutdown()


RUN_MODULE = """\
import os
import time

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")


def run(instance, save_callback, state, iteration):
    # One line per call, written before the work: a duplicated run shows up twice.
    with open(LOG, "a") as f:
        f.write(f"{os.path.basename(instance)} {iteration}\\n")
    time.sleep(%(sleep)s)
    return {"value": iteration}
"""


def write_experiment(root: Path, instances: int, iterations: int, sleep: float) -> Path:
    (root / "data").mkdir()
    for i in range(instances):
        (root / "data" / f"i{i:02d}.txt").write_text(str(i))
    (root / "slow.py").write_text(RUN_MODULE % {"sleep": sleep})
    (root / "slow.batch").write_text(json.dumps({"instances": ["data/*.txt"]}))
    exp = root / "slow.experiment"
    exp.write_text(
        json.dumps(
            {"load": "slow.py", "batch": "slow.batch", "iterations": iterations, "workers": 2}
        )
    )
    return exp


def persisted(exp: Path) -> tuple[int, set[tuple[str, int]]]:
    """What the state file holds, read from this (test) process with alma itself."""
    d = alma.experiment.load(exp)
    try:
        res = d.results
        done = res[res["status"] == "done"]
        pairs = zip(done["instance"], done["iteration"], strict=True)
        keys = {(Path(i).name, int(it)) for i, it in pairs}
        return d.progress.done, keys
    finally:
        d.close()


def test_kernels_import_the_alma_under_test(tmp_path: Path, kernel: Kernel) -> None:
    """A kernel runs in a folder of its own: it must still import this checkout's alma
    (conftest.py puts it first on PYTHONPATH), or every kernel test tests another."""
    where = kernel.eval("__import__('alma').__file__")
    assert Path(where).resolve() == (Path(alma.__file__)).resolve(), where


# -- notebooks -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_notebook_runs_headless(tmp_path: Path) -> None:
    copy_examples(tmp_path)
    nb = execute_notebook(tmp_path / "notebooks" / "quickstart.ipynb")

    shown = outputs_text(cell_with(nb, "import alma.experiment"))
    assert "<alma.Dispatcher 'maxcut' idle: 0/360 done" in shown
    paused = outputs_text(cell_with(nb, "d.stop()"))
    assert "'maxcut' paused:" in paused
    summary = outputs_text(cell_with(nb, "done = results["))
    assert "mean" in summary and "graphs/g00_n40.txt" in summary
    bars = cell_with(nb, "summary.style.bar")
    assert any("text/html" in o.get("data", {}) for o in bars.outputs)
    assert "'maxcut' finished: 360/360 done" in outputs_text(cell_with(nb, "d.start()\nd.join()"))
    assert outputs_text(cell_with(nb, "p = d.progress")).strip() == (
        "360 done, 0 failed out of 360"
    )
    # the state went next to the (copied) experiment, not into the repository
    assert list((tmp_path / "examples").glob("maxcut*.sqlite"))
    # section 6: an experiment defined in a cell, run detached, paused, resumed
    assert "detached=True" in outputs_text(cell_with(nb, "counts.start(detach=True)  #"))
    paused = outputs_text(cell_with(nb, "counts.stop()"))
    assert "status='paused'" in paused
    assert "finished 120 runs" in outputs_text(cell_with(nb, "counts.start(detach=True)\n"))
    assert ExperimentLock(tmp_path / "notebooks" / "line_count.sqlite").holder() is None

    # saved widget state: one controller, its last picture is the finished experiment
    (start,) = models(nb, "ButtonModel", "alma-start")
    (stop,) = models(nb, "ButtonModel", "alma-stop")
    assert (start["description"], stop["description"]) == ("Start", "Stop")
    assert start["disabled"] and stop["disabled"]
    (status,) = models(nb, "LabelModel", "alma-status")
    assert status["value"] == "finished"
    (bar,) = models(nb, "FloatProgressModel", "alma-progress-bar")
    assert (bar["value"], bar["max"]) == (360, 360)
    (counts,) = models(nb, "HTMLModel", "alma-counts")
    assert "done <b>360</b>" in counts["value"]
    cells = "".join(m["value"] for m in models(nb, "HTMLModel", "alma-chunk"))
    assert cells.count("alma-cell-complete") == 12

    # the snapshot, an output of its own in the displaying cell, shows the last state
    loaded = cell_with(nb, "import alma.experiment")
    (snap,) = [o for o in loaded.outputs if "text/html" in o.get("data", {})]
    assert "maxcut: <b>finished</b>" in snap["data"]["text/html"]
    assert "360/360 finished" in snap["data"]["text/html"]
    # ... and survives the HTML export
    saved = tmp_path / "notebooks" / "executed.ipynb"
    nbformat.write(nb, saved)
    subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(saved)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    exported = saved.with_suffix(".html").read_text()
    assert "alma-snapshot" in exported and "360/360 finished" in exported


@pytest.mark.timeout(180)
def test_magics_notebook_runs_headless(tmp_path: Path) -> None:
    copy_examples(tmp_path)
    nb = execute_notebook(tmp_path / "notebooks" / "magics.ipynb")

    (bare,) = [c for c in nb.cells if c.cell_type == "code" and c.source == "%alma"]
    assert "%alma load PATH" in outputs_text(bare)
    loaded = cell_with(nb, "%alma load")
    assert any(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in loaded.outputs
    )  # the controller is shown
    assert "maxcut: running" in outputs_text(cell_with(nb, "%alma start"))
    stopped = outputs_text(cell_with(nb, "%alma stop"))
    assert stopped.startswith("maxcut: paused · ")
    done = int(stopped.split("· ")[1].split("/")[0])
    assert 0 < done < 360
    table = outputs_text(cell_with(nb, "df = %alma results"))
    assert "graphs/g00_n40.txt" in table and "mean" in table
    assert "0 failed run(s) will run again." in outputs_text(cell_with(nb, "%alma retry"))

    (status,) = models(nb, "LabelModel", "alma-status")
    assert status["value"] == "paused"
    (bar,) = models(nb, "FloatProgressModel", "alma-progress-bar")
    assert (bar["value"], bar["max"]) == (done, 360)
    (start,) = models(nb, "ButtonModel", "alma-start")
    assert not start["disabled"]


@pytest.mark.timeout(240)
def test_magics_notebook_on_a_finished_experiment_offers_a_reset(tmp_path: Path) -> None:
    """Opened after the experiment has finished (the README's ``alma run``): the load
    cell says so and shows ``%alma reset`` / ``%alma reset --failed``; as shipped the
    notebook forgets nothing, and with the reset line uncommented it runs again."""
    examples = copy_examples(tmp_path)
    exp = examples / "maxcut.experiment"
    spec = json.loads(exp.read_text())
    exp.write_text(json.dumps({**spec, "iterations": 2}))  # 24 runs: seconds, not half a minute
    with alma.experiment.load(exp) as d:
        d.start()
        assert d.join(timeout=120) and d.finished
    path = tmp_path / "notebooks" / "magics.ipynb"
    nb = execute_notebook(path)

    loaded = outputs_text(cell_with(nb, "%alma load"))
    assert "maxcut has already finished (24/24 done, 0 failed)" in loaded
    assert "%alma reset forgets every finished run" in loaded
    assert "%alma reset --failed only the failed ones" in loaded
    offer = cell_with(nb, "# %alma reset")
    assert outputs_text(offer).startswith("maxcut: finished · 24/24 done")  # nothing forgotten
    started = outputs_text(cell_with(nb, "%alma start"))
    assert started.startswith("maxcut: finished · 24/24 done") and "%alma reset" in started
    (status,) = models(nb, "LabelModel", "alma-status")
    assert status["value"] == "finished"

    # the user takes the offer: uncomment %alma reset and run the notebook again
    shipped = nbformat.read(path, as_version=4)
    (cell,) = [c for c in shipped.cells if c.source.startswith("# %alma reset")]
    cell.source = cell.source.replace("# %alma reset", "%alma reset", 1)  # its comment stays
    assert cell.source.startswith("%alma reset")
    nbformat.write(shipped, path)
    nb = execute_notebook(path)
    assert "24 finished run(s) forgotten." in outputs_text(cell_with(nb, "%alma reset"))
    assert outputs_text(cell_with(nb, "%alma start")).startswith("maxcut: running")
    assert "has already finished" not in outputs_text(cell_with(nb, "%alma start"))


# -- SIGKILL mid-run -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_mid_run_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, kernel: Kernel
) -> None:
    exp = write_experiment(tmp_path, instances=4, iterations=12, sleep=0.05)
    total = 48
    kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd")
    kernel.run("d.start()")
    # wait from this process, reading the state file as any observer could
    wait_for(lambda: persisted(exp)[0] >= 10, timeout=30)
    reported_done = kernel.eval(
        "sorted([__import__('os').path.basename(i), int(t)] for i, t, s in "
        "zip(d.results['instance'], d.results['iteration'], d.results['status']) "
        "if s == 'done')"
    )
    assert kernel.eval("d.status") == "running"
    kernel.kill()

    log = tmp_path / "calls.log"
    calls_before = len(log.read_text().splitlines())
    done_count, done_keys = persisted(exp)
    assert {tuple(k) for k in reported_done} <= done_keys  # nothing reported done is lost
    assert done_count == len(done_keys) < total  # killed mid-run

    kernel.restart()
    kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd")
    progress = kernel.eval("[d.progress.done, d.progress.failed, d.progress.status]")
    assert progress == [done_count, 0, "paused"]  # exactly what was persisted

    kernel.run("d.start()\nassert d.join(120)", timeout=150)
    assert kernel.eval("[d.progress.done, d.status]") == [total, "finished"]
    assert kernel.eval("len(d.results)") == total

    calls = [tuple(line.split()) for line in log.read_text().splitlines()]
    after = [(name, int(it)) for name, it in calls[calls_before:]]
    assert not set(after) & done_keys  # no run reported done before the kill ran again
    assert len(after) == len(set(after))  # and nothing ran twice after the restart
    assert set(after) | done_keys == {(f"i{i:02d}.txt", it) for i in range(4) for it in range(12)}


# -- the ipykernel 7 trap: timer updates from a background thread --------------------


@pytest.mark.timeout(120)
def test_timer_updates_reach_iopub_as_the_displaying_cell(tmp_path: Path, kernel: Kernel) -> None:
    exp = write_experiment(tmp_path, instances=4, iterations=10, sleep=0.05)
    shown = kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd")
    ids = kernel.eval(
        "[__import__('alma.notebook').notebook.controller_for(d).bar.container.children[1]"
        ".model_id, __import__('alma.notebook').notebook.controller_for(d).status_label.model_id]"
    )
    bar_id, status_id = ids
    started = kernel.run("d.start()")
    # The kernel's main thread is busy in this cell: only the timer thread can send.
    busy = kernel.run("import time\ntime.sleep(1.0)")
    kernel.run("assert d.join(60)")

    def updates(model_id: str) -> list[dict[str, Any]]:
        return [
            m
            for m in kernel.iopub
            if m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == model_id
            and m["content"]["data"].get("method") == "update"
        ]

    bar_updates = [m for m in updates(bar_id) if "value" in m["content"]["data"]["state"]]
    values = [m["content"]["data"]["state"]["value"] for m in bar_updates]
    mid_run = [v for v in values if 0 < v < 40]
    assert len(mid_run) >= 3, f"too few progress updates while running: {values}"
    assert values == sorted(values)
    # every update of the bar is tagged with the displaying cell, none with a later one
    parents = {m["parent_header"].get("msg_id") for m in bar_updates}
    assert parents == {shown}, (parents, shown, started, busy)
    # ... including those sent while another cell was executing
    busy_status = [
        i
        for i, m in enumerate(kernel.iopub)
        if m["msg_type"] == "status" and m["parent_header"].get("msg_id") == busy
    ]
    first, last = busy_status[0], busy_status[-1]
    during = [m for m in kernel.iopub[first:last] if m in bar_updates]
    assert during, "no progress update arrived while another cell ran"
    status_values = [m["content"]["data"]["state"].get("value") for m in updates(status_id)]
    assert "running" in status_values


def comm_updates(kernel: Kernel, model_id: str, since: int = 0) -> list[dict[str, Any]]:
    """The state updates sent for one widget model (from iopub message ``since`` on)."""
    return [
        m
        for m in kernel.iopub[since:]
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == model_id
        and m["content"]["data"].get("method") == "update"
    ]


def during(kernel: Kernel, msg_id: str) -> tuple[int, int]:
    """Indexes in kernel.iopub of the busy and idle status of the cell ``msg_id``."""
    statuses = [
        i
        for i, m in enumerate(kernel.iopub)
        if m["msg_type"] == "status" and m["parent_header"].get("msg_id") == msg_id
    ]
    return statuses[0], statuses[-1]


CONTROLLER = "__import__('alma.notebook').notebook.controller_for(d)"


@pytest.mark.timeout(120)
def test_updates_flow_during_a_blocking_cell_after_the_controller_went_quiet(
    tmp_path: Path, kernel: Kernel
) -> None:
    """The quickstart's resume cell, ``d.start(); d.join()``, run once the controller's
    timer has ended: the controller still shows the run as it goes, says the kernel is
    busy, and no button, display or cell end is needed to wake it."""
    exp = write_experiment(tmp_path, instances=4, iterations=12, sleep=0.1)
    kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd")
    bar_id, status_id, busy_id = kernel.eval(
        f"[{CONTROLLER}.bar.container.children[1].model_id, {CONTROLLER}.status_label.model_id,"
        f" {CONTROLLER}.busy.model_id]"
    )
    quiet = "[t.name for t in __import__('threading').enumerate() if t.name == 'alma-controller']"
    wait_for(lambda: kernel.eval(quiet) == [], timeout=30)  # the timer ended: gone quiet
    blocking = kernel.run("d.start(); d.join()", timeout=90)
    first, last = during(kernel, blocking)
    inside = kernel.iopub[first:last]

    values = [
        m["content"]["data"]["state"]["value"]
        for m in comm_updates(kernel, bar_id)
        if m in inside and "value" in m["content"]["data"]["state"]
    ]
    assert len([v for v in values if 0 < v < 48]) >= 3, f"too few updates during the cell: {values}"
    statuses = [m["content"]["data"]["state"].get("value") for m in comm_updates(kernel, status_id)]
    assert "running" in statuses
    notes = [
        m["content"]["data"]["state"].get("value", "")
        for m in comm_updates(kernel, busy_id)
        if m in inside
    ]
    assert any("kernel busy: Stop acts when this cell ends" in n for n in notes), notes
    # once the cell ended, the note goes and the display says finished
    wait_for(lambda: kernel.eval(f"{CONTROLLER}.status_label.value") == "finished", timeout=10)
    assert kernel.eval(f"{CONTROLLER}.busy.value") == ""


def iopub_bytes(messages: list[dict[str, Any]]) -> int:
    """Bytes of messages as they travel: header, parent header, metadata, content."""
    parts = ("header", "parent_header", "metadata", "content")
    return sum(len(json.dumps([m.get(k) for k in parts], default=str)) for m in messages)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_iopub_traffic_at_3000_files_while_running(tmp_path: Path, kernel: Kernel) -> None:
    """The controller of a 3,000-file experiment, running at several hundred runs a
    second: what it sends the browser (every iopub message while a cell sleeps) stays
    under 20 KB/s, while the strip still shows the runs going on."""
    exp = write_experiment(tmp_path, instances=3000, iterations=3, sleep=0.003)
    kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd", 120)
    kernel.run("d.start()")
    wait_for(lambda: kernel.eval("d.progress.done") > 200, timeout=60)
    window = kernel.run("import time\nt0 = time.monotonic(); time.sleep(8); t1 = time.monotonic()")
    seconds = kernel.eval("t1 - t0")
    done = kernel.eval("[d.progress.done, d.status]")
    first, last = during(kernel, window)
    sent = [m for m in kernel.iopub[first + 1 : last] if m["msg_type"] == "comm_msg"]
    rate = iopub_bytes(sent) / seconds
    by_model: dict[str, int] = {}
    for m in sent:
        comm = m["content"]["comm_id"]
        by_model[comm] = by_model.get(comm, 0) + iopub_bytes([m])
    names = kernel.eval(
        "{k: type(w).__name__ + '.'.join(['', *getattr(w, '_dom_classes', ())])"
        " for k, w in __import__('ipywidgets').widgets.widget._instances.items()}"
    )
    top = sorted(by_model.items(), key=lambda kv: -kv[1])[:6]
    print(f"iopub at 3,000 files, running: {rate / 1000:.1f} KB/s ({len(sent)} messages):")
    print(", ".join(f"{names.get(k, k)} {v / seconds / 1000:.1f} KB/s" for k, v in top))
    assert done[1] == "running", "the experiment ended before the window closed"
    strip = kernel.eval(f"[w.model_id for w in {CONTROLLER}.instances.parts]")
    assert [m for m in sent if m["content"]["comm_id"] in strip[2:]], "the strip stood still"
    assert rate < 20_000, f"{rate / 1000:.1f} KB/s of iopub traffic"
    kernel.run("d.stop()", timeout=60)


@pytest.mark.timeout(120)
def test_the_displaying_cell_carries_a_snapshot_kept_current(
    tmp_path: Path, kernel: Kernel
) -> None:
    """Beside the widget, an output of its own: text/html with a display_id, updated
    with update_display (what a notebook saved and read without a kernel shows)."""
    exp = write_experiment(tmp_path, instances=3, iterations=4, sleep=0.01)
    shown = kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd")
    mine = [m for m in kernel.iopub if m["parent_header"].get("msg_id") == shown]
    displays = [m for m in mine if m["msg_type"] in ("display_data", "execute_result")]
    snaps = [m for m in displays if "text/html" in m["content"]["data"]]
    assert len(snaps) == 1 and len(displays) == 2  # the snapshot and the widget view
    snap = snaps[0]["content"]
    display_id = snap["transient"]["display_id"]
    assert "alma-snapshot" in snap["data"]["text/html"]
    assert "slow: <b>idle</b>" in snap["data"]["text/html"]
    assert "0/12 finished" in snap["data"]["text/html"]
    assert "application/vnd.jupyter.widget-view+json" not in snap["data"]
    kernel.run("d.start(); d.join()")
    updates = [
        m["content"]
        for m in kernel.iopub
        if m["msg_type"] == "update_display_data"
        and m["content"]["transient"]["display_id"] == display_id
    ]
    assert updates, "the snapshot was never updated"
    last = updates[-1]["data"]["text/html"]
    assert "slow: <b>finished</b>" in last and "12/12 finished" in last, last[:300]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_variants_notebook_compares_a_grid_headless(tmp_path: Path) -> None:
    copy_examples(tmp_path)
    nb = execute_notebook(tmp_path / "notebooks" / "variants.ipynb")
    per_config = outputs_text(cell_with(nb, "d.start()\nd.join()\nd.configs"))
    assert "2000" in per_config and "20000" in per_config and " 60 " in per_config
    table = outputs_text(cell_with(nb, "r = d.results"))
    assert "graphs/g00_n40.txt" in table and "20000" in table
    plot = cell_with(nb, "ax = table.plot.barh")
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)
    assert outputs_text(cell_with(nb, "row = done.iloc[0]")).startswith("True {")
    assert (tmp_path / "notebooks" / "variants.sqlite").exists()


@pytest.mark.parametrize("name", ["quickstart.ipynb", "magics.ipynb", "variants.ipynb"])
def test_notebooks_are_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata  # no saved widget state either


def test_interrupting_join_in_a_kernel_pauses_with_one_line(tmp_path: Path, kernel: Kernel) -> None:
    """The kernel's interrupt button during ``d.start(); d.join()``: the experiment
    pauses (nothing runs on in the background), the cell shows one line, no traceback."""
    exp = write_experiment(tmp_path, instances=4, iterations=20, sleep=0.05)
    kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd")
    msg_id = kernel.kc.execute("d.start(); d.join()")
    wait_for(lambda: persisted(exp)[0] >= 4, timeout=60)
    kernel.km.interrupt_kernel()
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the interrupted cell did not end"
        msg = kernel.kc.get_iopub_msg(timeout=60)
        kernel.iopub.append(msg)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    mine = [m for m in kernel.iopub if m["parent_header"].get("msg_id") == msg_id]
    assert not [m for m in mine if m["msg_type"] == "error"], "a traceback was shown"
    text = kernel.stdout(msg_id)
    assert "alma: slow paused:" in text and "start() continues" in text
    assert text.count("\n") == 1  # one line
    # Not running means the session has ended: no executor is left to run anything.
    state = kernel.eval("[d.running, d.status, d.progress.done]")
    assert state[0] is False and state[1] == "paused" and 4 <= state[2] < 80
    kernel.run("d.start(); assert d.join(timeout=120)", timeout=150)
    assert persisted(exp)[0] == 80
