"""The per-instance strip: one small coloured cell per instance file, cheap to keep live.

Why chunks: an ``ipywidgets.HTML`` resends its whole value on every change. At 3,000
files the strip is ~100 KB of HTML, and resending it twice a second is ~0.5 MB/s of
comm traffic (it hurts through JupyterHub or an SSH tunnel). So the cells are split
into chunks of ``CHUNK`` cells, each an HTML widget of its own, and only chunks whose
HTML changed are sent, within ``BUDGET`` bytes per second: when more changed than the
budget allows (thousands of fast runs), the chunks waiting longest go first and the rest
follow on the next refreshes. A final picture (stop, finish, a display) is sent whole,
outside the budget (which it empties, so the budget still bounds the rate over time).
The chunks take ``display: contents`` (render.STYLE), so their cells flow as one strip.

Imports: ipywidgets and :mod:`alma.notebook.render`.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import NamedTuple

import ipywidgets as widgets

from . import render

#: Above this many instances, one cell stands for several.
MAX_CELLS = 1500
#: Cells per chunk widget (a chunk is sent whole when one of its cells changed).
CHUNK = 50
#: Bytes of cell HTML sent per second at most while runs go on.
BUDGET = 4_000

# When one cell stands for several instances, the most telling status wins.
_RANK = {"failing": 4, "running": 3, "partial": 2, "complete": 1, "untouched": 0}


class Picture(NamedTuple):
    """What the strip shows: the legend line and one HTML string per cell."""

    legend: str
    cells: list[str]


def kind(done: int, failed: int, running: int, iterations: int) -> str:
    if failed:
        return "failing"
    if running:
        return "running"
    if done >= iterations:
        return "complete"
    if done:
        return "partial"
    return "untouched"


def picture(
    names: Sequence[str],
    done: Sequence[int],
    failed: Sequence[int],
    running: Sequence[int],
    iterations: Sequence[int],
) -> Picture:
    """The cells (one per instance, or per group beyond MAX_CELLS), each with a tooltip,
    and a legend with the count of each kind."""
    kinds = [kind(*row) for row in zip(done, failed, running, iterations, strict=True)]
    totals = dict.fromkeys(render.KINDS, 0)
    for k in kinds:
        totals[k] += 1
    n = len(names)
    per_cell = max(1, -(-n // MAX_CELLS))
    cells = []
    for start in range(0, n, per_cell):
        group = range(start, min(start + per_cell, n))
        k = max((kinds[i] for i in group), key=_RANK.__getitem__)
        if per_cell == 1:
            i = start
            tip = f"{names[i]}: {done[i]}/{iterations[i]} done"
            if failed[i]:
                tip += f", {failed[i]} failed"
            if running[i]:
                tip += f", {running[i]} running"
        else:
            tip = f"{names[group[0]]} … {names[group[-1]]}: {k}"
        cells.append(
            f"<div class='alma-cell alma-cell-{k}' title='{html.escape(tip, quote=True)}'></div>"
        )
    legend = " ".join(
        f"<span style='white-space:nowrap;margin-right:10px'>"
        f"{render.swatch(k)} {label} {totals[k]}</span>"
        for k, (_color, label) in render.KINDS.items()
    )
    unit = f" (one cell = {per_cell} instances)" if per_cell > 1 else ""
    line = f"<div style='font-size:11px;color:{render.TEXT}'>instances: {n}{unit} · {legend}</div>"
    return Picture(line, cells)


class Strip(widgets.VBox):
    """The legend and the cells, in chunks sent only when they changed."""

    def __init__(self) -> None:
        self.legend = widgets.HTML()
        self.cells = widgets.Box()
        self.cells.add_class("alma-cells")
        self._chunks: list[widgets.HTML] = []
        self._shown: list[str] = []  # each chunk's HTML as last sent
        self._waiting: dict[int, str] = {}  # chunk -> HTML to send, oldest first
        self._tokens = float(BUDGET)
        self._refilled = time.monotonic()
        super().__init__(children=[self.legend, self.cells])
        self.add_class("alma-instances")

    @property
    def html(self) -> str:
        """The whole strip as HTML, as it will look once every chunk is sent."""
        chunks = [self._waiting.get(i, h) for i, h in enumerate(self._shown)]
        return self.legend.value + "".join(chunks)

    @property
    def parts(self) -> list[widgets.Widget]:
        """Every widget of the strip (to resend their state, or close them)."""
        return [self.legend, self.cells, *self._chunks]

    def show(self, pic: Picture, whole: bool = False) -> None:
        """Show ``pic``: send the chunks that changed, within the budget (``whole``: all
        of them now, for a final or first picture)."""
        texts = ["".join(pic.cells[i : i + CHUNK]) for i in range(0, len(pic.cells), CHUNK)]
        if len(texts) != len(self._chunks):
            self._rebuild(texts)
        else:
            for i, text in enumerate(texts):
                if text != self._shown[i]:
                    self._waiting[i] = text  # keeps its place in the queue if waiting
                else:
                    self._waiting.pop(i, None)
        if self.legend.value != pic.legend:
            self.legend.value = pic.legend
        self._send_waiting(whole)

    def _send_waiting(self, whole: bool) -> None:
        now = time.monotonic()
        self._tokens = min(float(BUDGET), self._tokens + (now - self._refilled) * BUDGET)
        self._refilled = now
        for i in list(self._waiting):
            if not whole and self._tokens <= 0:
                break
            text = self._waiting.pop(i)
            self._tokens -= len(text)
            self._chunks[i].value = self._shown[i] = text
        if whole:  # a whole picture is outside the budget: it leaves it empty, not in
            self._tokens = max(self._tokens, 0.0)  # a debt that would freeze the strip

    def _rebuild(self, texts: list[str]) -> None:
        old = self._chunks
        self._chunks = [widgets.HTML(text) for text in texts]
        for chunk in self._chunks:
            chunk.add_class("alma-chunk")
        self._shown = list(texts)
        self._waiting.clear()
        self.cells.children = self._chunks
        for chunk in old:
            chunk.close()
