"""The HTML the controller shows: pure functions from records to text, no widgets.

Colours come from JupyterLab's theme (``--jp-*`` CSS variables, with the light theme's
values as fallbacks for renderers without them), so the controller follows the light,
dark and high-contrast themes. All text is drawn in the theme's own font colours
(``--jp-ui-font-color1`` / ``2``), which the themes keep at 4.5:1 or more against their
backgrounds; status colours mark swatches, bars and borders only, never text.

A leaf module: it imports nothing of alma's at runtime.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..dispatcher import Progress
    from ..records import ErrorGroup, InFlight, JobCounts, RunError

#: Text: the theme's main and secondary font colours.
TEXT = "var(--jp-ui-font-color1, rgba(0, 0, 0, 0.87))"
TEXT2 = "var(--jp-ui-font-color2, rgba(0, 0, 0, 0.54))"
BORDER = "var(--jp-border-color2, #e0e0e0)"
#: Marks (never text): one per kind of news.
SUCCESS = "var(--jp-success-color1, #388e3c)"
WARN = "var(--jp-warn-color1, #f57c00)"
ERROR = "var(--jp-error-color1, #d32f2f)"
BRAND = "var(--jp-brand-color1, #1976d2)"

# Per-instance colours: kind -> (colour, legend label).
KINDS = {
    "failing": (ERROR, "failing"),
    "running": (BRAND, "running"),
    "complete": (SUCCESS, "all done"),
    "partial": ("var(--jp-success-color2, #81c784)", "partly done"),
    "untouched": ("var(--jp-layout-color3, #bdbdbd)", "untouched"),
}


# What each mark class stands for: the strip's kinds, and the counts' own.
_MARKS = {
    **{f"cell-{k}": c for k, (c, _) in KINDS.items()},
    **{f"sw-{k}": c for k, (c, _) in KINDS.items()},
    "sw-done": SUCCESS,
    "sw-failed": WARN,
    "sw-running": BRAND,
}

#: One stylesheet for the whole controller, sent once (an HTML widget's ``<style>``
#: applies to the page): JupyterLab draws folded accordion titles in a lighter colour
#: than 4.5:1 allows, and the instance strip's cells take their look from classes here
#: instead of repeating it per cell.
STYLE = f"""<style>
.jp-OutputArea:has(.alma-controller) .alma-snapshot {{ display: none; }}
.alma-controller .lm-AccordionPanel-title, .alma-controller .jupyter-widget-Collapse-header
  {{ color: {TEXT}; }}
.alma-controller .alma-cells {{ display: flex; flex-wrap: wrap; max-width: 100%; }}
.alma-controller .alma-chunk, .alma-controller .alma-chunk > .widget-html-content
  {{ display: contents; }}
.alma-controller .alma-cell {{ width: 10px; height: 10px; margin: 1px; border-radius: 2px; }}
.alma-controller .alma-sw {{ display: inline-block; width: 10px; height: 10px;
  border-radius: 2px; vertical-align: middle; }}
{"".join(f".alma-controller .alma-{k} {{ background: {c}; }}" for k, c in _MARKS.items())}
</style>"""


def swatch(mark: str) -> str:
    """A small coloured square; ``mark`` is a kind of the strip or done/failed/running
    (styled by STYLE: a class, so that updates sent many times a second stay small)."""
    return f"<i class='alma-sw alma-sw-{mark}'></i>"


def counts_html(p: Progress) -> str:
    """done · failed · running · pending · total, each with its colour as a swatch."""
    spans = []
    for k in ("done", "failed", "running", "pending"):
        value = getattr(p, k)
        mark = swatch(k) + " " if k != "pending" and (value or k != "failed") else ""
        spans.append(f"<span class='alma-count-{k}'>{mark}{k} <b>{value}</b></span>")
    return (
        f"<span style='font-family:var(--jp-code-font-family, monospace);color:{TEXT}'>"
        f"{' · '.join(spans)} · total <b>{p.total}</b></span>"
    )


def jobs_html(jobs: JobCounts | None) -> str:
    """The batch jobs carrying the workers, one line (``SLURM jobs: 1 pending · 2
    running · 3 gone``); nothing when the executor has none."""
    if jobs is None or not jobs.total:
        return ""
    counts = " · ".join(
        f"<span class='alma-jobs-{k}'><b>{getattr(jobs, k)}</b> {k}</span>"
        for k in ("pending", "running", "gone")
    )
    return (
        f"<span style='font-family:var(--jp-code-font-family, monospace);color:{TEXT}'>"
        f"{html.escape(jobs.system)} jobs: {counts}</span>"
    )


def configs_html(labels: list[str], frame: Any) -> str:
    """One line per configuration of a grid: its parameters, then its counts (``frame``:
    ``d.state`` with a ``config`` label column)."""
    sums = frame.groupby("config", sort=False)[["done", "failed", "running", "pending"]].sum()
    lines = []
    for label in labels:
        row = sums.loc[label]
        counts = " · ".join(f"{k} <b>{int(row[k])}</b>" for k in sums.columns)
        lines.append(f"<div>{html.escape(label)}: {counts}</div>")
    return (
        f"<div style='font-family:var(--jp-code-font-family, monospace);color:{TEXT}'>"
        f"{''.join(lines)}</div>"
    )


def snapshot_html(name: str, p: Progress, status: str) -> str:
    """The still picture saved with the notebook: name, status, a bar, the counts.
    Inline styles only (no classes to rely on), readable in any renderer."""
    share = 100 * p.finished / p.total if p.total else 100.0
    color = WARN if p.failed else SUCCESS if status == "finished" else BRAND
    counts = (
        f"done {p.done} · failed {p.failed} · running {p.running} · pending {p.pending}"
        f" · total {p.total}"
    )
    return (
        f"<div class='alma-snapshot' style='color:{TEXT};font-size:13px;max-width:640px'>"
        f"<div><b>alma</b> · {html.escape(name)}: <b>{html.escape(status)}</b> "
        f"<span style='color:{TEXT2}'>(snapshot saved with the notebook; run the cell "
        "for the live controller)</span></div>"
        f"<div style='background:var(--jp-layout-color3, #bdbdbd);height:8px;"
        f"border-radius:2px;margin:4px 0'><div style='width:{share:.1f}%;height:8px;"
        f"background:{color};border-radius:2px'></div></div>"
        f"<div style='font-family:var(--jp-code-font-family, monospace)'>{p.finished}/{p.total}"
        f" finished ({share:.0f}%) · {counts}</div></div>"
    )


def message_html(message: str) -> str:
    """A button's error (e.g. could not start): text in the theme colour, a red mark."""
    if not message:
        return ""
    return _banner(html.escape(message), ERROR)


def busy_html(note: str) -> str:
    return f"<i style='color:{TEXT2}'>{html.escape(note)}</i>" if note else ""


def _banner(inner: str, color: str) -> str:
    return f"<div style='border-left:4px solid {color};padding:2px 8px;color:{TEXT}'>{inner}</div>"


def errors_title(failed: int, kinds: int, halted: RunError | None) -> str:
    """The folded error panel's title: why it stopped, or how many runs failed."""
    if halted is not None:
        text = f"Stopped by an error: {halted.error}"
        return text if len(text) <= 140 else text[:139] + "…"
    kind = "kind" if kinds == 1 else "kinds"
    return f"Errors: {failed} failed run{'s' if failed != 1 else ''} ({kinds} {kind})"


def errors_html(groups: Sequence[ErrorGroup], halted: RunError | None) -> str:
    """Failures grouped by error: count, the error, one example, its traceback behind a
    toggle (an HTML ``<details>``, which also works in a static export)."""
    parts = []
    if halted is not None:
        tb = _details("traceback", halted.traceback) if halted.traceback else ""
        parts.append(_banner(f"<b>{html.escape(halted.error)}</b>{tb}", ERROR))
    rows = []
    for g in groups:
        where = f"{html.escape(g.instance)} #{g.iteration}"
        rows.append(
            "<tr class='alma-error-group'>"
            f"<td style='text-align:right;vertical-align:top;padding-right:8px'><b>{g.runs}</b>"
            "</td><td style='vertical-align:top'>"
            f"<code style='color:{TEXT};background:none'>{html.escape(g.error)}</code>"
            f"<div style='color:{TEXT2}'>e.g. {where}</div>"
            f"{_details('traceback', g.traceback) if g.traceback else ''}</td></tr>"
        )
    if rows:
        parts.append(
            f"<table style='color:{TEXT};font-size:12px;border-collapse:collapse'>"
            f"{''.join(rows)}</table>"
        )
    return "".join(parts)


def _details(summary: str, text: str) -> str:
    return (
        f"<details><summary style='cursor:pointer;color:{TEXT2}'>{summary}</summary>"
        f"<pre style='white-space:pre-wrap;font-size:11px;margin:0;color:{TEXT}'>"
        f"{html.escape(text)}</pre></details>"
    )


def running_html(runs: Sequence[InFlight], now: float | None = None) -> str:
    """The runs in flight: instance, iteration, for how long, last checkpoint."""
    if not runs:
        return f"<span style='color:{TEXT2}'>nothing runs now</span>"
    now = time.time() if now is None else now
    rows = []
    for r in runs:
        saved = "—" if r.checkpointed is None else f"{_ago(now - r.checkpointed)} ago"
        rows.append(
            f"<tr><td>{html.escape(r.instance)}</td><td style='text-align:right'>#{r.iteration}"
            f"</td><td style='text-align:right'>{_ago(now - r.started)}</td>"
            f"<td style='text-align:right'>{saved}</td></tr>"
        )
    head = "".join(
        f"<th style='text-align:{a};padding-right:12px;color:{TEXT2}'>{h}</th>"
        for h, a in [
            ("instance", "left"),
            ("iteration", "right"),
            ("running for", "right"),
            ("last checkpoint", "right"),
        ]
    )
    return (
        f"<table class='alma-running' style='color:{TEXT};font-size:12px'>"
        f"<tr>{head}</tr>{''.join(rows)}</table>"
    )


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"
