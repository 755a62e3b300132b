"""The controller's Results view: what the runs produce, not just how many ran.

A folded section with a dropdown of the numeric result columns (default: the first), a
per-instance summary of the chosen one (runs, mean, std, min, max, failed; sorted by a
second dropdown, so failing instances are found by sorting on ``failed``) and a plot of
it drawn with matplotlib through pandas (an inline SVG, so it also shows in static
exports; without matplotlib the view says so and shows the table).

Cost: nothing while folded (no read at all). Unfolded, it reads the results at most
every ``INTERVAL`` seconds and only when new runs were committed since the last read.
Every read goes through the one function handed to :class:`ResultsView` (the
controller passes ``lambda: d.results``), so a cheaper incremental reader can replace it
in one place.

Imports: ipywidgets, pandas and matplotlib (lazily), :mod:`alma.notebook.render`.
"""

from __future__ import annotations

import html
import io
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..frames import IDENTITY_COLUMNS, RUN_COLUMNS
from . import render

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: Seconds between two readings of the results while new runs keep coming.
INTERVAL = 2.0
#: Columns of the results frame that are alma's own, never a result.
OWN_COLUMNS = frozenset({*IDENTITY_COLUMNS, *RUN_COLUMNS})
#: The summary's columns, and what the table can be sorted by.
SORTS = ("instance", "runs", "mean", "std", "min", "max", "failed")
#: Above this many instances the plot shows the distribution of per-instance means
#: instead of one box per instance.
MAX_BOXES = 30


def numeric_columns(frame: pd.DataFrame, params: frozenset[str] = frozenset()) -> list[str]:
    """The result columns holding numbers, in the frame's order (neither alma's own
    columns nor the configuration's ``params``)."""
    import pandas as pd

    return [
        c
        for c in frame.columns
        if c not in OWN_COLUMNS
        and c not in params
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]


def summary(frame: pd.DataFrame, column: str, sort: str = "instance") -> pd.DataFrame:
    """One row per instance: runs, mean, std, min and max of ``column`` over its done
    runs, and how many of its runs failed."""
    done = frame[frame["status"] == "done"]
    table = done.groupby("instance")[column].agg(["count", "mean", "std", "min", "max"])
    table = table.rename(columns={"count": "runs"})
    failed = frame[frame["status"] == "failed"].groupby("instance").size()
    table = table.reindex(table.index.union(failed.index))
    table["runs"] = table["runs"].fillna(0).astype(int)
    table["failed"] = failed.reindex(table.index).fillna(0).astype(int)
    if sort == "instance":
        return table.sort_index()
    return table.sort_values(sort, ascending=sort in ("instance",), na_position="last")


def table_html(table: pd.DataFrame, limit: int = 20) -> str:
    shown = table.head(limit)
    rows = []
    for name, row in shown.iterrows():
        cells = "".join(
            f"<td style='text-align:right;padding:0 8px'>{_number(row[c])}</td>"
            for c in ("runs", "mean", "std", "min", "max", "failed")
        )
        rows.append(f"<tr><td>{html.escape(str(name))}</td>{cells}</tr>")
    head = "".join(
        f"<th style='text-align:{'left' if h == 'instance' else 'right'};padding:0 8px;"
        f"color:{render.TEXT2}'>{h}</th>"
        for h in SORTS
    )
    more = (
        f"<div style='color:{render.TEXT2}'>first {limit} of {len(table)} instances</div>"
        if len(table) > limit
        else ""
    )
    return (
        f"<table class='alma-summary' style='color:{render.TEXT};font-size:12px'>"
        f"<tr>{head}</tr>{''.join(rows)}</table>{more}"
    )


def _number(value: Any) -> str:
    if value != value:  # NaN: no done run, or a single one for std
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value)}" if float(value).is_integer() else str(value)


def plot_svg(frame: pd.DataFrame, column: str) -> str:
    """The column's distribution per instance (a box each), or, for many instances, the
    histogram of the per-instance means: an inline SVG drawn by matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    done = frame[frame["status"] == "done"]
    fig = Figure(figsize=(7, 2.8), dpi=96)
    ax = fig.add_subplot()
    groups = done.groupby("instance")[column]
    if groups.ngroups <= MAX_BOXES:
        names = [str(n).rsplit("/", 1)[-1] for n in groups.groups]
        ax.boxplot([g.to_numpy() for _, g in groups], orientation="horizontal", tick_labels=names)
        ax.set_xlabel(column)
        ax.invert_yaxis()
    else:
        groups.mean().plot.hist(ax=ax, bins=30)
        ax.set_xlabel(f"mean {column} per instance ({groups.ngroups} instances)")
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg", facecolor="white")  # readable in a dark theme too
    svg = out.getvalue()
    return svg[svg.index("<svg") :]


class ResultsView(widgets.Accordion):
    """The folded Results section; :meth:`refresh` is cheap to call on every redraw."""

    def __init__(
        self, read: Callable[[], pd.DataFrame], params: frozenset[str] = frozenset()
    ) -> None:
        self._read = read
        self._params = params  # parameter columns of a grid: inputs, not results
        self.column = widgets.Dropdown(description="column", options=[])
        self.sort = widgets.Dropdown(description="sort by", options=SORTS, value="instance")
        self.table = widgets.HTML()
        self.plot = widgets.HTML()
        self.plot.add_class("alma-plot")
        box = widgets.VBox([widgets.HBox([self.column, self.sort]), self.plot, self.table])
        super().__init__(children=[box])
        self.selected_index = None
        self.titles = ("Results",)
        self.add_class("alma-results")
        self._seen: Any = None  # (runs committed, column, sort) drawn last
        self._at = -INTERVAL
        #: How many times the results were read (what a folded view never does).
        self.reads = 0
        self._committed = -1
        self._updating = False
        for w in (self.column, self.sort):
            w.observe(self._chosen, names="value")

    @property
    def parts(self) -> list[widgets.Widget]:
        return [self, self.column, self.sort, self.table, self.plot]

    def _chosen(self, _change: Any) -> None:
        if not self._updating:
            self.refresh(self._committed, force=True)

    def refresh(self, committed: int, force: bool = False) -> None:
        """Redraw if unfolded and ``committed`` (runs finished so far) moved since the
        last read, at most every INTERVAL seconds (``force``: a choice just changed)."""
        self._committed = committed
        if self.selected_index is None:
            return  # folded: costs nothing
        now = time.monotonic()
        key = (committed, self.column.value, self.sort.value)
        if key == self._seen or (not force and now - self._at < INTERVAL):
            return
        self._seen, self._at = key, now
        frame = self._read()
        self.reads += 1
        columns = numeric_columns(frame, self._params)
        if list(self.column.options) != columns:
            keep = self.column.value if self.column.value in columns else None
            keep = keep if keep is not None else (columns[0] if columns else None)
            self._updating = True  # choices set here are not the user's: no redraw
            try:
                self.column.options = columns
                self.column.value = keep  # the user's choice, else the first column
            finally:
                self._updating = False
            self._seen = (committed, self.column.value, self.sort.value)
        column = self.column.value
        if not column:
            self.table.value = f"<span style='color:{render.TEXT2}'>no numeric result yet</span>"
            self.plot.value = ""
            return
        self.table.value = table_html(summary(frame, column, self.sort.value))
        self.plot.value = _plot_or_hint(frame, column)


def _plot_or_hint(frame: pd.DataFrame, column: str) -> str:
    try:
        return plot_svg(frame, column)
    except ImportError:
        return f"<i style='color:{render.TEXT2}'>pip install matplotlib for a plot</i>"
    except Exception:  # a plotting problem never breaks the view
        log.warning("alma results: plotting %s failed", column, exc_info=True)
        return ""
