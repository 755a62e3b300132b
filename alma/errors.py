"""The one exception tree of alma.

::

    AlmaError                 every error alma raises on purpose
    ├── ConfigError           a bad .experiment, .batch or run module (names file, field, fix)
    ├── StateError            a state file alma cannot use: unreadable, corrupt, foreign
    └── LockedError           the experiment is already running in another process/kernel

    Interrupted (BaseException)   raised inside run() by save_callback once stop() was asked
    Paused (KeyboardInterrupt)    join() was interrupted (Ctrl-C, the kernel's stop button):
                                  the experiment paused first

``Interrupted`` derives from ``BaseException`` (like ``KeyboardInterrupt``) so that a
``try: ... except Exception:`` inside a user's run function does not swallow a pause.
"""

from __future__ import annotations

__all__ = ["AlmaError", "ConfigError", "Interrupted", "LockedError", "Paused", "StateError"]


class AlmaError(Exception):
    """Base class of every error alma raises on purpose."""


class ConfigError(AlmaError, ValueError):
    """An experiment, batch or run module is invalid; nothing was run or written."""

    @classmethod
    def at(cls, where: object, field: str | None, problem: str, fix: str) -> ConfigError:
        """The one message shape: ``<file>, field '<field>': <problem>. <fix>``."""
        field_part = f", field {field!r}" if field else ""
        return cls(f"{where}{field_part}: {problem}. {fix}")


class StateError(AlmaError):
    """A state file cannot be used (corrupt, not alma's, or another experiment's).

    alma never overwrites such a file: move it away or point ``"state"`` elsewhere.
    """


class LockedError(AlmaError):
    """The experiment is already running in another process or kernel."""


class Interrupted(BaseException):
    """Raised by ``save_callback`` after it saved, once a stop was asked.

    It aborts the run cooperatively; the run is owed again and resumes from the
    checkpoint just saved.
    """


class Paused(KeyboardInterrupt):
    """``join()`` was interrupted (Ctrl-C, or the kernel's interrupt button) and paused the
    experiment before raising: nothing goes on in the background, and ``start()``
    continues. A KeyboardInterrupt, so a script still stops; in a notebook with alma's
    extension or controller loaded, it prints as its one-line message."""
