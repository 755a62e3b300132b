"""What the notebook controller sends the browser: iopub bytes per second at 3,000 files.

Run it with ``python benchmarks/bench_iopub.py`` (about a minute on 2 cores; ``--files``,
``--seconds`` to change the sizes). It starts a real ipykernel through jupyter_client
(the same way Jupyter does), loads in it an experiment of 3,000 small files (a run
sleeps 3 ms, 2 workers, so several hundred runs finish every second and every part of
the controller has something to redraw) and displays its controller, starts it, waits
until it has warmed up, then measures while a cell sleeps (the kernel idle for the user,
the experiment running):

* window 1, the controller as displayed (the Results view and "Running now" folded);
* window 2, the same with the Results view and "Running now" unfolded (the summary
  table and the plot are redrawn every couple of seconds when new runs were committed).

Bytes are counted on the wire: the raw ZeroMQ frames of every iopub message the kernel
published between the window cell's ``busy`` and ``idle`` (identities, signature,
header, parent header, metadata, content and binary buffers), read from the iopub
socket before jupyter_client decodes them. The script prints the total per second, then
per message type and per widget (its class and CSS class, e.g. ``HTML.alma-chunk`` for a
chunk of the per-instance strip), with the number of runs finished in the window.

Target (issue 9): under 20 KB/s at 3,000 files while running, with the controller as
displayed (window 1). benchmarks/README.md quotes a measured run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

TARGET = 20_000  # bytes per second, window 1
REPO = Path(__file__).resolve().parent.parent

RUN_MODULE = """\
import time


def run(instance, save_callback, state, iteration):
    time.sleep(0.003)
    return {"value": iteration, "size": len(instance)}
"""


def write_experiment(root: Path, files: int, iterations: int) -> Path:
    (root / "data").mkdir()
    for i in range(files):
        (root / "data" / f"i{i:05d}.txt").write_text(str(i))
    (root / "sleepy.py").write_text(RUN_MODULE)
    (root / "sleepy.batch").write_text(json.dumps({"instances": ["data/*.txt"]}))
    exp = root / "sleepy.experiment"
    spec = {"load": "sleepy.py", "batch": "sleepy.batch", "iterations": iterations, "workers": 2}
    exp.write_text(json.dumps(spec))
    return exp


class Kernel:
    """A real ipykernel; every iopub message is kept with its size on the wire."""

    def __init__(self, cwd: Path) -> None:
        from jupyter_client.manager import start_new_kernel

        # this checkout's alma, whatever the kernel's working directory
        path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd), env=env)
        self.socket = self.kc.iopub_channel.socket
        self.session = self.kc.session
        #: (arrival time, bytes on the wire, decoded message)
        self.iopub: list[tuple[float, int, dict[str, Any]]] = []

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        if not self.socket.poll(int(timeout * 1000)):
            return None
        frames = self.socket.recv_multipart(copy=True)
        size = sum(len(f) for f in frames)
        _idents, parts = self.session.feed_identities(frames, copy=True)
        msg = self.session.deserialize(parts, content=True, copy=True)
        self.iopub.append((time.monotonic(), size, msg))
        return msg

    def run(self, code: str, timeout: float = 120) -> tuple[str, int, int]:
        """Execute ``code``; return its msg_id and the indexes in ``iopub`` of its busy
        and idle status messages. Raises on an error in the cell."""
        msg_id = self.kc.execute(textwrap.dedent(code))
        deadline = time.monotonic() + timeout
        busy = -1
        while time.monotonic() < deadline:
            msg = self._receive(deadline - time.monotonic())
            if msg is None or msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"]))
            if msg["msg_type"] == "status":
                state = msg["content"]["execution_state"]
                if state == "busy":
                    busy = len(self.iopub) - 1
                elif state == "idle":
                    return msg_id, busy, len(self.iopub) - 1
        raise TimeoutError(f"cell did not finish within {timeout} s: {code!r}")

    def eval(self, expr: str) -> Any:
        msg_id, busy, idle = self.run(f"import json as _j\nprint(_j.dumps({expr}))")
        out = "".join(
            m["content"]["text"]
            for _t, _n, m in self.iopub[busy:idle]
            if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
        )
        return json.loads(out.strip().splitlines()[-1])

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


CONTROLLER = "__import__('alma.notebook').notebook.controller_for(d)"
#: Defines, in the kernel, model_id -> a readable name: the widget's class and CSS
#: class, and for a widget without one (the bar's text, the HTML inside a folded
#: section) also its nearest named ancestor's.
WIDGET_NAMES = """
def _widget_names(w, where=""):
    own = ".".join([type(w).__name__, *getattr(w, "_dom_classes", ())])
    named = "." in own
    out = {w.model_id: own if named or not where else f"{own} in {where}"}
    for child in getattr(w, "children", ()):
        out.update(_widget_names(child, own if named else where))
    return out
"""


def window(kernel: Kernel, seconds: float, label: str) -> dict[str, Any]:
    """Measure every iopub message while a cell sleeps ``seconds``."""
    done0 = kernel.eval("d.progress.done")
    _id, busy, idle = kernel.run(
        f"import time\n_t0 = time.monotonic(); time.sleep({seconds}); _t1 = time.monotonic()",
        timeout=seconds + 60,
    )
    elapsed = kernel.eval("_t1 - _t0")
    progress = kernel.eval("[d.progress.done, d.status]")
    names = kernel.eval(f"_widget_names({CONTROLLER})")
    inside = kernel.iopub[busy + 1 : idle]  # strictly between the cell's busy and idle
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_widget: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _t, size, msg in inside:
        kind = msg["msg_type"]
        by_type[kind][0] += 1
        by_type[kind][1] += size
        if kind == "comm_msg":
            name = names.get(msg["content"]["comm_id"], "(closed widget)")
            by_widget[name][0] += 1
            by_widget[name][1] += size
    total = sum(size for _t, size, _m in inside)
    result = {
        "label": label,
        "seconds": elapsed,
        "bytes": total,
        "messages": len(inside),
        "rate": total / elapsed,
        "runs": progress[0] - done0,
        "status": progress[1],
    }
    print(f"\n{label}: {result['rate'] / 1000:.1f} KB/s on iopub", end="")
    print(f" ({len(inside)} messages, {total / 1000:.1f} KB in {elapsed:.1f} s;", end="")
    print(f" {result['runs'] / elapsed:,.0f} runs/s finished meanwhile, status {progress[1]})")
    print(f"    {'message type':<36} {'msgs':>6} {'KB/s':>8}")
    for kind, (n, size) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"    {kind:<36} {n:>6} {size / elapsed / 1000:>8.2f}")
    print(f"    {'comm_msg by widget':<36} {'msgs':>6} {'KB/s':>8}")
    for name, (n, size) in sorted(by_widget.items(), key=lambda kv: -kv[1][1]):
        print(f"    {name:<36} {n:>6} {size / elapsed / 1000:>8.2f}")
    return result


def loadavg() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000, help="instance files (3000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a window (10)")
    args = parser.parse_args(argv)
    import ipykernel
    import ipywidgets
    import jupyter_client

    print(f"alma iopub benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, ipykernel {ipykernel.__version__}, "
        f"ipywidgets {ipywidgets.__version__}, jupyter_client {jupyter_client.__version__}"
    )
    print(f"load average before (1/5/15 min): {loadavg()}")
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="alma-bench-iopub-"))
    kernel = None
    results = []
    try:
        # enough runs that the experiment outlasts both windows at any speed
        exp = write_experiment(tmp, args.files, iterations=40)
        kernel = Kernel(tmp)
        t = time.perf_counter()
        kernel.run(f"import alma.experiment\nd = alma.experiment.load({str(exp)!r})\nd")
        kernel.run(WIDGET_NAMES)
        shown = time.perf_counter() - t
        total = kernel.eval("d.progress.total")
        print(f"{args.files:,} files x 40 iterations = {total:,} runs, 2 workers, 3 ms each;")
        print(f"load + controller displayed in {shown:.2f} s")
        kernel.run("d.start()")
        deadline = time.monotonic() + 120
        while kernel.eval("d.progress.done") < 2 * args.files:  # a whole strip redrawn
            if time.monotonic() > deadline:
                raise TimeoutError("the experiment did not warm up within 120 s")
            time.sleep(0.5)
        results.append(window(kernel, args.seconds, "window 1, as displayed (folded)"))
        kernel.run(
            f"{CONTROLLER}.results.selected_index = 0\n{CONTROLLER}.running_now.selected_index = 0"
        )
        time.sleep(3)  # the first draw of the unfolded views is not the steady state
        results.append(window(kernel, args.seconds, "window 2, Results and Running now unfolded"))
        for r in results:
            if r["status"] != "running":
                print(f"WARNING: the experiment was {r['status']} at the end of {r['label']}")
        kernel.run("d.stop()", timeout=120)
    finally:
        if kernel is not None:
            kernel.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = results[0]["rate"]
    verdict = "meets target" if rate < TARGET else "ABOVE target"
    print(
        f"\niopub while running, {args.files:,} files, controller as displayed: "
        f"{rate / 1000:.1f} KB/s (target < {TARGET / 1000:.0f} KB/s: {verdict}); "
        f"unfolded: {results[1]['rate'] / 1000:.1f} KB/s"
    )
    total_s = time.perf_counter() - t_all
    print(f"load average after (1/5/15 min): {loadavg()}; total {total_s:.0f} s")
    return 0 if rate < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
