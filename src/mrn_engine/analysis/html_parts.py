"""Pieces of the HTML report shared by its sections: numbers, PNG figures, tables."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Rows = Sequence[Mapping[str, object]]


def num(v: object) -> float:
    """``float(v)``, NaN for an empty or non-numeric cell."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (110 dpi, tight box)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def img(data: bytes, alt: str) -> str:
    """An ``<img>`` tag with the PNG inlined as base64."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def table(rows: Rows, columns: Sequence[str], percent: Sequence[str] = ()) -> str:
    """An HTML table; ``percent`` columns as percentages, floats to 3 decimals, NaN as n/a."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if c in percent:
                f = num(v)
                v = "n/a" if math.isnan(f) else f"{100 * f + 0.0:.1f}%"
            elif isinstance(v, float):
                v = "n/a" if math.isnan(v) else f"{v:.3f}"
            cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
