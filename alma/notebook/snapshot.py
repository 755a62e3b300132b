"""A still picture of the controller that survives saving the notebook.

Why an output of its own: a widget view only renders with a live kernel (or with saved
widget state and the widget JavaScript at hand). A notebook reopened without a kernel,
``jupyter nbconvert --to html`` and static renderers show "model not found" or nothing,
and a ``text/html`` placed next to the widget view in the same output is dropped by
nbconvert and never shown as a fallback by JupyterLab. So the controller also displays a
plain ``text/html`` output with a ``display_id`` (experiment name, status, counts, a
bar) and keeps it current with ``update_display``: at the end of every cell (in that
cell's context, so nbclient, which keeps only the running cell's messages, records it)
and from the timer when the status changes (so what JupyterLab saves is current).

While the live controller is drawn in the same output area, the controller's stylesheet
hides the snapshot (``:has()``), so it is only seen where the widget is not.

Imports: IPython's display functions, lazily; :mod:`alma.notebook.render`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

log = logging.getLogger(__name__)

#: Seconds between snapshot updates while runs go on (the counts change all the time).
INTERVAL = 5.0


class Snapshot:
    """One controller's ``text/html`` output, shown with the controller and updated."""

    def __init__(self) -> None:
        self.display_id = f"alma-snapshot-{uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._html = ""
        self._text = ""
        self._at = 0.0
        self._shown = False

    def show(self, html: str, text: str) -> None:
        """Display the snapshot as an output of the cell running now."""
        from IPython.display import display

        with self._lock:
            self._html, self._text, self._at = html, text, time.monotonic()
            self._shown = True
        display({"text/html": html, "text/plain": text}, raw=True, display_id=self.display_id)

    def update(self, html: str, text: str, now: bool = True) -> None:
        """Update every output showing it, if the picture changed (``now``: whatever the
        time since the last update; else at most every INTERVAL seconds)."""
        with self._lock:
            if not self._shown or html == self._html:
                return
            if not now and time.monotonic() - self._at < INTERVAL:
                return
            self._html, self._text, self._at = html, text, time.monotonic()
        try:
            from IPython.display import update_display

            update_display(
                {"text/html": html, "text/plain": text}, raw=True, display_id=self.display_id
            )
        except Exception:  # no display hook (closed kernel): the live widget still shows it
            log.debug("alma snapshot: update failed", exc_info=True)
