"""What alma changes in the IPython shell it runs in: one custom exception handler.

An interrupted ``join()`` pauses the experiment and raises :class:`alma.Paused` (a
KeyboardInterrupt, so scripts stop). In a notebook its traceback would only show the
inside of ``threading``: the handler prints its one-line message instead. A leaf module
(IPython only), used by the controller and the ``%alma`` magics.
"""

from __future__ import annotations

from typing import Any

from ..errors import Paused


def _show_pause(
    shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None
) -> None:
    print(value)  # the cell's own output, where the interrupted join() was
    return None


def quiet_pauses(shell: Any) -> None:
    """Show :class:`alma.Paused` as one line in ``shell``, unless the user has a custom
    exception handler of their own (IPython keeps one set: never replace theirs)."""
    if hasattr(shell, "set_custom_exc") and not tuple(shell.custom_exceptions or ()):
        shell.set_custom_exc((Paused,), _show_pause)
