"""The results DataFrame, built from the rows the store read: columns, order, types.

Rows come from Python's ``sqlite3`` only. A columnar read through ADBC's SQLite driver
was three times faster, but it links a second copy of SQLite into the process: when
one copy closes the file, POSIX drops the other copy's locks on it, and a session
writing in the same process (the notebook's usual case) crashed with SIGBUS. SQLite's
documentation warns about exactly this ("multiple copies of SQLite in one process").

A leaf of the engine (it imports no other part of alma), called by the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

#: The columns around the parameters' and the result's own: identity, then the
#: parameters, then these, then the result.
IDENTITY_COLUMNS = ("instance", "iteration")
RUN_COLUMNS = (
    "seed",
    "status",
    "error",
    "duration",
    "attempts",
    "interruptions",
    "finished",
    "code",
    "traceback",
)


def from_rows(rows: list[Any], configs: dict[int, str]) -> pd.DataFrame:
    """The frame of rows read as (instance, iteration, config id, *RUN_COLUMNS, result
    JSON), with ``configs`` (id -> params JSON)."""
    import pandas as pd

    width = len(IDENTITY_COLUMNS) + 1 + len(RUN_COLUMNS) + 1
    cols = list(zip(*rows, strict=True)) if rows else [()] * width
    identity, config, run, results = cols[:2], cols[2], cols[3:-1], cols[-1]
    frame = pd.DataFrame(dict(zip(IDENTITY_COLUMNS, identity, strict=True)))
    frame = _with_params(frame, config, configs)
    for name, values in zip(RUN_COLUMNS, run, strict=True):
        frame[name] = values
    frame["finished"] = pd.to_datetime(frame["finished"], unit="s", utc=True)
    return _expand_results(frame, _decode_results(results, frame))


def _with_params(frame: pd.DataFrame, config: Sequence[int], configs: dict[int, str]) -> Any:
    """``frame`` with one column per parameter, from each row's configuration id."""
    import pandas as pd

    params = {cid: json.loads(text) for cid, text in configs.items()}
    if not any(params.values()):
        return frame
    per_config = pd.DataFrame.from_records(list(params.values()), index=list(params))
    taken = per_config.reindex(list(config)).reset_index(drop=True)
    return pd.concat([frame, taken.set_axis(frame.index)], axis=1)


def _decode_results(texts: Sequence[str | None], frame: pd.DataFrame) -> list[Any]:
    """The stored results, decoded. One parse of one JSON array is ~4x faster than a
    json.loads per row; if a row cannot be read back (damaged in the file), the rows are
    parsed one by one and each bad one gets None and says why in its ``error`` column,
    so one bad row never hides the others."""
    try:
        return list(json.loads("[" + ",".join(t or "null" for t in texts) + "]"))
    except (ValueError, RecursionError):
        pass
    values: list[Any] = []
    for row, text in enumerate(texts):
        try:
            values.append(None if text is None else json.loads(text))
        except (ValueError, RecursionError) as exc:
            values.append(None)
            frame.loc[row, "error"] = (
                f"the stored result cannot be read back ({type(exc).__name__}: {exc})"
            )
    return values


def _expand_results(frame: pd.DataFrame, values: list[Any]) -> pd.DataFrame:
    """Dict results become columns, others ``result``."""
    import pandas as pd

    dicts = [v if isinstance(v, dict) else {} for v in values]
    others = [None if isinstance(v, dict) else v for v in values]
    if any(dicts):
        frame = _join_result_columns(frame, pd.DataFrame.from_records(dicts, index=frame.index))
    if any(v is not None for v in others) or not any(dicts):
        frame["result"] = others
    return frame


def _join_result_columns(frame: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """``frame`` and the result's keys as columns, a key named like a column of the
    frame (a parameter, ``status``, …) prefixed ``result_``."""
    import pandas as pd

    extra.columns = [
        f"result_{c}" if c in frame.columns or c == "result" else str(c) for c in extra.columns
    ]
    return pd.concat([frame, extra], axis=1)
