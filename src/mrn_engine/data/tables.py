"""Small table helpers: atomic CSV/JSON writing, CSV reading and markdown rendering."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mrn_engine.config import atomic_write_text
from mrn_engine.errors import InputDataError


def rows_to_csv_text(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None
) -> str:
    """CSV text with a header; ``columns`` defaults to the keys of the first row (then any new ones)."""
    if columns is None:
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        columns = cols
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k, "")) for k in columns})
    return buf.getvalue()


def _cell(v: object) -> object:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(round(v, 6))
    if isinstance(v, (list, tuple, frozenset, set)):
        return "+".join(str(x) for x in v)
    return v


def write_csv(
    rows: Sequence[Mapping[str, object]],
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
) -> Path:
    """Write rows as CSV atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    atomic_write_text(path, rows_to_csv_text(rows, columns))
    return path


def write_json(data: object, path: str | os.PathLike) -> Path:
    """Write JSON atomically (NaN written as ``null``)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")
    return path


def _json_safe(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _json_safe(v.item())
    return v


def read_csv(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV with a header; ``InputDataError`` naming the file if a column is missing."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError as e:
        raise InputDataError(f"{path}: file not found") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputDataError(f"{path}: unreadable CSV ({e})") from e
    missing = [c for c in required if c not in header]
    if missing:
        raise InputDataError(f"{path}: missing column(s) {missing} (header: {header})")
    return rows


def to_markdown(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str], *, percent: Sequence[str] = ()
) -> str:
    """A GitHub markdown table; columns in ``percent`` are shown as ``83.0%`` (nan as ``n/a``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if c in percent and isinstance(v, (int, float)):
                cells.append("n/a" if math.isnan(float(v)) else f"{100 * float(v) + 0.0:.1f}%")
            elif isinstance(v, float):
                cells.append("n/a" if math.isnan(v) else f"{v:.3f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
