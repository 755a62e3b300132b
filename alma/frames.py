"""The results DataFrame, built from the text the store read: columns, order, types.

Why text: a ``fetchall`` makes a Python object of every value, and at a million runs
that alone takes longer than anything else. So the store has SQLite write, in C, two
lines per run: a JSON array of its columns, which pyarrow's CSV reader turns into typed
columns (a JSON array without its brackets is a CSV line whose strings escape with a
backslash), and its *document*, ``{"r": result}`` or ``{"e": error, "t": traceback,
"r": result}``, which pyarrow's JSON reader parses. Only Python's ``sqlite3`` ever
touches the file: a second SQLite library in the process (an ADBC driver, say) would
drop its POSIX locks when closing the file, which SQLite's documentation warns about.

Results Arrow cannot type (a type that changes from row to row, a damaged row) are
decoded with :mod:`json`, row by row, to the same values.

:func:`merge` extends a frame with the runs committed since it was read, so a re-read
costs the new rows (and one copy), not the whole table; the store keeps that frame.

A leaf of the engine (it imports no other part of alma), called by the store.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

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

#: What each line holds, in order, between a leading and a trailing 0 (the brackets
#: of the array stick to those, and they are not read). ``finished`` is in
#: microseconds.
LINE_COLUMNS = (
    "instance",
    "config",
    "iteration",
    "seed",
    "status",
    "duration",
    "attempts",
    "interruptions",
    "finished",
    "code",
)


#: (instance id, config id, iteration) per row: a run's key, the frame's order.
Key = tuple["np.ndarray", "np.ndarray", "np.ndarray"]


class Part(NamedTuple):
    """Some runs read: their frame and, per row, its key."""

    frame: pd.DataFrame
    keys: Key


def empty() -> pd.DataFrame:
    """The frame of no runs: alma's own columns, and ``result``."""
    import pandas as pd

    return pd.DataFrame(columns=[*IDENTITY_COLUMNS, *RUN_COLUMNS, "result"])


class Chunk(NamedTuple):
    """Some runs, parsed: the store reads a whole table chunk by chunk."""

    runs: pa.Table  #: LINE_COLUMNS
    docs: pa.Table | None  #: e, t, r; None where Arrow cannot type them as json would
    text: bytes  #: the documents, one per line, for the exact way


def parse(lines: bytes, docs: bytes) -> Chunk:
    """Parse the lines (see LINE_COLUMNS) and the documents of some runs: UTF-8 text
    of one line per run, both in the same order."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = ["_", *LINE_COLUMNS, "__"]
    types = {name: pa.int64() for name in LINE_COLUMNS}
    types.update(status=pa.large_string(), code=pa.large_string(), duration=pa.float64())
    runs = pcsv.read_csv(
        io.BytesIO(lines),
        read_options=pcsv.ReadOptions(column_names=names, block_size=1 << 24),
        parse_options=pcsv.ParseOptions(escape_char="\\"),
        convert_options=pcsv.ConvertOptions(
            column_types=types,
            include_columns=list(LINE_COLUMNS),
            null_values=["null"],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    return Chunk(runs, _parse_docs(docs, runs.num_rows), docs)


def _parse_docs(text: bytes, rows: int) -> pa.Table | None:
    """The documents, parsed by Arrow; None when it fails (a type that changes
    between rows, damaged JSON, text that is not UTF-8: Arrow's JSON reader lets that
    through, and only the full validation finds it)."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = pa.schema([("e", pa.large_string()), ("t", pa.large_string())])
    try:
        parsed = pj.read_json(
            io.BytesIO(text),
            read_options=pj.ReadOptions(block_size=1 << 24),
            parse_options=pj.ParseOptions(explicit_schema=schema),
        )
        parsed.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return parsed if parsed.num_rows == rows and "r" in parsed.column_names else None


def from_chunks(chunks: Sequence[Chunk], names: dict[int, str], configs: dict[int, str]) -> Part:
    """The frame of the runs in ``chunks``, with the names of the instances and the
    parameters (JSON) of the configurations, by id."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if not chunks:
        none = np.empty(0, np.int64)
        return Part(empty(), (none, none, none))
    table = pa.concat_tables([chunk.runs for chunk in chunks])
    ids = table.column("instance").to_numpy()
    config = table.column("config").to_numpy()
    iteration = table.column("iteration").to_numpy()
    frame = pd.DataFrame({"instance": _names(ids, names), "iteration": iteration})
    frame = _with_params(frame, config, configs)
    docs = _docs_of(chunks)
    for name in RUN_COLUMNS:
        if name in ("error", "traceback"):
            frame[name] = docs.column(name[0]).to_pandas() if docs else None
        elif name == "finished":
            micros = table.column("finished").to_numpy()
            frame[name] = pd.to_datetime(micros, unit="us", utc=True)
        else:
            frame[name] = table.column(name).to_pandas()
    if docs is None:
        # Text that is not UTF-8 (a damaged file) reads with U+FFFD, never an exception.
        text = "\n".join(chunk.text.decode(errors="replace") for chunk in chunks)
        texts = text.split("\n")
        frame = _decode_exactly(frame, texts)
    else:
        frame = _results_of(frame, docs.column("r").combine_chunks())
    return Part(frame, (ids, config, iteration))


def _docs_of(chunks: Sequence[Chunk]) -> pa.Table | None:
    """The documents of all chunks as one table, or None when Arrow cannot type them
    the way :mod:`json` would (the exact way then reads them)."""
    import pyarrow as pa

    if any(chunk.docs is None for chunk in chunks):
        return None
    try:  # chunks typed apart: ints and floats make floats, as in one parse
        docs = pa.concat_tables([c.docs for c in chunks], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    kind = docs.schema.field("r").type
    return None if _has_time(kind) or _lossy(kind) else docs


def _names(ids: np.ndarray, names: dict[int, str]) -> Any:
    """The instances' names, one per row, taken from one small array (not a string per
    row out of SQLite)."""
    import numpy as np
    import pyarrow as pa

    if not len(ids):
        return pa.array([], pa.large_string()).to_pandas()
    position = np.full(max(max(names, default=0), int(ids.max())) + 1, -1, np.int64)
    position[list(names)] = np.arange(len(names))
    return pa.array(list(names.values()), pa.large_string()).take(position[ids]).to_pandas()


def _results_of(frame: pd.DataFrame, results: pa.Array) -> pd.DataFrame:
    """``frame`` with the results Arrow parsed: dict results one column per key."""
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_struct(results.type):
        fields = [results.type.field(i).name for i in range(results.type.num_fields)]
        extra = pd.DataFrame(
            {name: _values(results.field(i), math.nan) for i, name in enumerate(fields)},
            index=frame.index,
        )
        return _join_result_columns(frame, extra)
    frame["result"] = _values(results, None)
    return frame


def _values(array: Any, missing: object) -> Any:
    """An Arrow column as pandas values, the way pandas makes them from what json.loads
    gives: numbers and text typed, nested values (lists, dicts) and booleans with gaps
    as Python objects, gaps as ``missing`` (NaN in a column of a dict's key, None in
    the ``result`` column)."""
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_null(array.type):
        return pd.Series([missing] * len(array), dtype=object if missing is None else float)
    if pa.types.is_nested(array.type) or (pa.types.is_boolean(array.type) and array.null_count):
        values = array.to_pylist()
        if missing is not None:
            values = [missing if v is None else v for v in values]
        return pd.Series(values, dtype=object)
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

    return _has(kind, pa.types.is_temporal)


def _decode_exactly(frame: pd.DataFrame, docs: list[str]) -> pd.DataFrame:
    """``frame`` with the documents decoded by :mod:`json`. The error and the
    traceback (written by SQLite) always read; a result that does not (damaged in the
    file) gets None and says why in its row's ``error``, so one bad row never hides
    the others."""
    decoder = json.JSONDecoder()
    errors, tracebacks, results = [], [], []
    for doc in docs:
        error = trace = None
        end = 0
        if doc.startswith('{"e":'):  # a run with an error or a traceback
            error, end = decoder.raw_decode(doc, len('{"e":'))
            trace, end = decoder.raw_decode(doc, end + len(',"t":'))
        try:
            results.append(json.loads(doc[end + len('{"r":') : -1]))
        except (ValueError, RecursionError) as exc:
            results.append(None)
            error = f"the stored result cannot be read back ({type(exc).__name__}: {exc})"
        errors.append(error)
        tracebacks.append(trace)
    frame["error"] = errors
    frame["traceback"] = tracebacks
    return _expand_results(frame, results)


def _with_params(frame: pd.DataFrame, config: Sequence[int], configs: dict[int, str]) -> Any:
    """``frame`` with one column per parameter, from each row's configuration id."""
    import pandas as pd

    params = {cid: json.loads(text) for cid, text in configs.items()}
    if not any(params.values()):
        return frame
    per_config = pd.DataFrame.from_records(list(params.values()), index=list(params))
    taken = per_config.reindex(list(config)).reset_index(drop=True)
    return pd.concat([frame, taken.set_axis(frame.index)], axis=1)


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


def own_copy(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` its caller may change without changing ``frame``. Under
    copy-on-write (pandas 3) a shallow copy is one, and costs nothing."""
    import pandas as pd

    cow = int(pd.__version__.split(".")[0]) >= 3 or pd.get_option("mode.copy_on_write") is True
    return frame.copy(deep=not cow)


def _alike(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """True when the frames of two parts, put together, give the columns and types one
    read of both would (not so: a result key only one has, or typed apart)."""
    if list(a.columns) != list(b.columns):
        return False
    # A key some rows lack (a failed run has no result): int64 and float64 make float64
    # both ways, and booleans with gaps are objects both ways.
    return all(
        x == y or {str(x), str(y)} in _ALIKE_TYPES for x, y in zip(a.dtypes, b.dtypes, strict=True)
    )


#: Pairs of column types that put together give what one read of both would.
_ALIKE_TYPES = ({"int64", "float64"}, {"bool", "object"})


def concat(parts: Sequence[Part]) -> Part | None:
    """The parts, each holding the runs after those of the one before, as one part; or
    None when they are not :func:`_alike` (the caller then reads them as one)."""
    import numpy as np
    import pandas as pd

    if not parts:
        return from_chunks([], {}, {})
    if len(parts) == 1:
        return parts[0]
    if not all(_alike(parts[0].frame, p.frame) for p in parts[1:]):
        return None
    frame = pd.concat([p.frame for p in parts], ignore_index=True)
    ids, config, iteration = (np.concatenate([p.keys[i] for p in parts]) for i in range(3))
    return Part(frame, (ids, config, iteration))


def merge(old: Part, new: Part) -> Part | None:
    """``old`` with the runs of ``new`` in their places (a run in both: the new row),
    or None when a whole read could give other columns or types (a new result key, a
    text column that gains missing values): the caller then reads the whole table."""
    import numpy as np
    import pandas as pd

    if not _alike(old.frame, new.frame):
        return None
    ordering = _ordering(old.keys, new.keys)
    if ordering is None:
        return None
    old_key, new_key = ordering
    # A run committed again (both sorted: one binary search per new run).
    at = np.minimum(np.searchsorted(old_key, new_key), max(len(old_key) - 1, 0))
    again = at[old_key[at] == new_key] if len(old_key) else at[:0]
    kept = slice(None) if not len(again) else np.delete(np.arange(len(old_key)), again)
    key = np.concatenate([old_key[kept], new_key])
    order = np.argsort(key, kind="stable")  # two sorted runs: merged in linear time
    frame = pd.concat([old.frame.iloc[kept], new.frame], ignore_index=True)
    frame = frame.take(order).reset_index(drop=True)
    keys = [np.concatenate([o[kept], n])[order] for o, n in zip(old.keys, new.keys, strict=True)]
    return Part(frame, (keys[0], keys[1], keys[2]))


def _ordering(*keys: Key) -> list[np.ndarray] | None:
    """One int64 per row, ordered as (instance, config, iteration) are, for each of
    ``keys``; None if they do not fit in one."""
    widths = [max((int(k[i].max()) + 1 for k in keys if len(k[i])), default=1) for i in range(3)]
    if widths[0] * widths[1] * widths[2] >= 1 << 62:
        return None
    return [(k[0] * widths[1] + k[1]) * widths[2] + k[2] for k in keys]
