"""The results DataFrame, built from rows the store read: columns, order and types.

Two ways in, one frame out (docs/run_module.md lists its columns):

- :func:`from_arrow`, the fast way: an Arrow table read by the ADBC SQLite driver, whose
  JSON results pyarrow parses column by column, without a Python object per value. On
  1,000,000 runs it takes about a third of the time and memory of a plain ``fetchall``.
- :func:`from_rows`, the exact way: Python rows from ``sqlite3``, each result decoded
  with :mod:`json`. It takes whatever the file holds (a result whose type changes from
  row to row, a damaged row, a schema-1 file read through views), so the fast way
  hands over to it whenever Arrow cannot type a column.

A leaf of the engine (it imports no other part of alma) that only the store calls.
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

#: The fast way needs both (dependencies of pyalma); without them the exact way does
#: everything. Found, not imported: pyarrow costs a tenth of a second to import, paid
#: on the first read of results only.
ARROW = all(importlib.util.find_spec(m) is not None for m in ("pyarrow", "adbc_driver_sqlite"))

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
#: Text columns whose NULL the fast query reads as "" (restored to missing here).
_NULLABLE_TEXT = ("error", "code", "traceback")


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


class ArrowRows(NamedTuple):
    """What the store's fast query read: the runs as an Arrow table (instance ids,
    iteration, config id, *RUN_COLUMNS, result as a line of JSON), the instances'
    names and the configurations' parameters (JSON), by id."""

    table: Any
    names: dict[int, str]
    configs: dict[int, str]


def from_arrow(rows: ArrowRows) -> pd.DataFrame | None:
    """The frame of the rows the store's fast query read, or None when Arrow cannot
    type the results (the exact way then reads them)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    table = rows.table
    if table.num_rows == 0:
        return None
    # Each value ends in a newline: a chunk's data buffer is the NDJSON text itself,
    # read chunk after chunk (joining them first would copy every result once more).
    text = _Chunks(_text(chunk) for chunk in table.column(table.num_columns - 1).chunks)
    try:
        options = pj.ReadOptions(block_size=1 << 22)  # 4 MB: fewer, larger parses
        parsed = pj.read_json(text, read_options=options).column("r").combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # a type that changes between rows, damaged JSON: read exactly
    if len(parsed) != table.num_rows or _has_time(parsed.type) or _lossy(parsed.type):
        return None
    columns = table.column_names
    # Names by id: one small array taken per row, not a string per row out of SQLite.
    ids = table.column(columns[0]).to_numpy()
    position = np.full(max(max(rows.names, default=0), int(ids.max())) + 1, -1, np.int64)
    position[list(rows.names)] = np.arange(len(rows.names))
    if (position[ids] < 0).any():
        return None  # a run of an instance not read: the exact way joins them
    names = pa.array(list(rows.names.values()), pa.string()).take(position[ids])
    frame = pd.DataFrame(
        {"instance": names.to_pandas(), "iteration": table.column(columns[1]).to_numpy()}
    )
    frame = _with_params(frame, table.column(columns[2]).to_numpy(), rows.configs)
    for i, name in enumerate(RUN_COLUMNS, start=3):
        column = table.column(columns[i])
        if name in _NULLABLE_TEXT:
            column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
        frame[name] = column.to_pandas()
    frame["finished"] = pd.to_datetime(frame["finished"], unit="s", utc=True)
    if pa.types.is_struct(parsed.type):  # dict results: one column per key
        fields = [parsed.type.field(i).name for i in range(parsed.type.num_fields)]
        extra = pd.DataFrame(
            {name: _values(parsed.field(i)) for i, name in enumerate(fields)},
            index=frame.index,
        )
        return _join_result_columns(frame, extra)
    frame["result"] = _values(parsed)
    return frame


def _text(chunk: Any) -> Any:
    """The characters of a chunk of a string column, as one Arrow buffer."""
    offsets = chunk.buffers()[1]
    first, last = (
        int.from_bytes(offsets[i * 4 : i * 4 + 4], "little", signed=True)
        for i in (chunk.offset, chunk.offset + len(chunk))
    )
    return chunk.buffers()[2].slice(first, last - first)


class _Chunks(io.RawIOBase):
    """A readable file over a sequence of buffers, one after the other."""

    def __init__(self, buffers: Iterable[Any]) -> None:
        self._buffers = iter(buffers)
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, into: Any) -> int:
        while not self._current:
            buffer = next(self._buffers, None)
            if buffer is None:
                return 0
            self._current = memoryview(buffer)
        n = min(len(into), len(self._current))
        into[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


def _values(array: Any) -> Any:
    """An Arrow column as pandas values: numbers and text typed, nested values (lists,
    dicts) as the Python lists and dicts json.loads would give."""
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_nested(array.type):
        return pd.Series(array.to_pylist(), dtype=object)
    return array.to_pandas()


def _lossy(kind: Any) -> bool:
    """True when Arrow may have changed a nested value: a list or dict (inside a dict
    result, or the result itself) holding floats may hold ints Arrow made floats, where
    json.loads keeps [1, 0.5] as it was. (A column of a dict result mixing ints and
    floats becomes floats in both ways, as pandas makes it.)"""
    import pyarrow as pa

    fields = (
        [kind.field(i).type for i in range(kind.num_fields)] if pa.types.is_struct(kind) else [kind]
    )
    return any(pa.types.is_nested(f) and _has(f, pa.types.is_floating) for f in fields)


def _has(kind: Any, test: Any) -> bool:
    """True when ``test`` holds for an Arrow type or any type nested in it."""
    if test(kind):
        return True
    return any(_has(kind.field(i).type, test) for i in range(getattr(kind, "num_fields", 0)))


def _has_time(kind: Any) -> bool:
    """True when an Arrow type holds a timestamp or a date anywhere (pyarrow reads ISO
    date text as timestamps; the results keep it as text)."""
    import pyarrow as pa

    return _has(kind, lambda k: pa.types.is_temporal(k))


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
