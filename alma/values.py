"""How results and checkpoints become JSON text, and only what can be read back.

A leaf module (workers use it too). The common case costs one ``json.dumps``; the
conversions below (numpy and pandas values, dates, paths, sets, non-string dict keys)
happen only for values that need them, and anything JSON cannot hold, or could not
read back, fails the run with the path of the bad value (``result['scores'][2]``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

#: Deeper nesting fails the run: the decoder could not read it back.
MAX_DEPTH = 200


class _PlacedError(TypeError):
    """A TypeError whose message already names the path of the bad value."""


def _json_default(obj: Any) -> Any:
    kind = type(obj).__name__
    if kind == "datetime64":  # numpy: any unit becomes ISO text (NaT: null)
        text = str(obj)
        return None if text == "NaT" else text
    # numpy (and pandas) scalars and arrays, without importing numpy.
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return obj.item()
    if hasattr(obj, "to_dict") and hasattr(obj, "index"):  # pandas: keep the labels
        return {key_text(k): v for k, v in obj.to_dict().items()}
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    # A date exists only once its module is loaded: not imported here, as every worker
    # process imports this module first (about 3 ms of its start-up).
    dt = sys.modules.get("datetime")
    if dt is not None and isinstance(obj, (dt.date, dt.time)):  # datetime is a date too
        return obj.isoformat()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"an object of type {type(obj).__module__}.{type(obj).__qualname__} "
        "cannot be stored as JSON; return or save numbers, strings, lists and "
        "dicts (numpy and pandas values, dates and paths are converted)"
    )


def key_text(key: Any) -> str:
    """A dict key as JSON writes it: str as is, bool as true/false, None as null, a
    number (numpy's too) as its JSON text, a tuple as the JSON text of its list
    (``(1, "a")`` -> ``[1,"a"]``), a date or numpy datetime64 as ISO text."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    if isinstance(key, tuple):
        return json.dumps(list(key), default=_json_default, separators=(",", ":"))
    value = _json_default(key)  # numpy scalars, dates, paths
    if isinstance(value, (dict, list)) or value is key:
        raise TypeError(f"a dict key of type {type(key).__qualname__} cannot be stored")
    return key_text(value)


def _normalised(obj: Any, path: str, depth: int) -> Any:
    """``obj`` with every dict key made a string; raises TypeError naming the path of a
    key collision or of nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise _PlacedError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        origin: dict[str, Any] = {}
        for key, value in obj.items():
            text = key_text(key)
            if text in out:
                raise _PlacedError(
                    f"{path}: the keys {origin[text]!r} and {key!r} are both stored as "
                    f"{text!r}; one would be lost"
                )
            origin[text] = key
            out[text] = _normalised(value, f"{path}[{key!r}]", depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalised(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
    return obj


def _plain(obj: Any, depth: int = 0) -> bool:
    """True when ``obj`` needs no key conversion: every dict key is a str, and it is
    not nested too deep. Walks containers only."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(obj, dict):
        return all(type(k) is str for k in obj) and all(
            _plain(v, depth + 1) for v in obj.values() if isinstance(v, (dict, list, tuple))
        )
    if isinstance(obj, (list, tuple)):
        return all(_plain(v, depth + 1) for v in obj if isinstance(v, (dict, list, tuple)))
    return True


#: Results that are one plain value (no run's result at all, most often) skip
#: ``json.dumps`` and its encoder set-up: the same text, a few µs less per run.
_SCALARS: dict[type, Any] = {
    type(None): lambda _: "null",
    bool: lambda b: "true" if b else "false",
    int: int.__repr__,
    str: json.encoder.encode_basestring_ascii,  # what json.dumps uses (ensure_ascii)
}


def to_json(obj: Any, what: str = "result") -> str:
    """Encode a result or checkpoint; TypeError names where the unstorable value sits."""
    scalar = _SCALARS.get(type(obj))
    if scalar is not None:
        return scalar(obj)  # type: ignore[no-any-return]
    try:
        if not _plain(obj):
            obj = _normalised(obj, what, 0)
        return json.dumps(obj, default=_json_default, separators=(",", ":"))
    except _PlacedError:
        raise
    except TypeError as exc:
        raise TypeError(f"{_unstorable(obj, what)}: {exc}") from None


def _unstorable(obj: Any, path: str) -> str:
    """Path (e.g. ``result['when']``) of the first value JSON cannot store (failure path)."""
    items: Any = ()
    if isinstance(obj, dict):
        items = ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    for sub, value in items:
        try:
            json.dumps(value, default=_json_default)
        except TypeError:
            return _unstorable(value, sub)
    return path


__all__ = ["MAX_DEPTH", "key_text", "to_json"]
