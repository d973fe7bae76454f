"""Number formatting shared by the matrix's verdict messages and its rendered table and summary."""

from __future__ import annotations

import math
import statistics


def _f(x, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else f"{x:.{nd}f}"


def _mean(xs) -> str:
    xs = [x for x in xs if x is not None]
    return _f(statistics.fmean(xs)) if xs else "n/a"


def _ci(e: dict, nd: int = 2, unit: str = "") -> str:
    if e["value"] is None:
        return "n/a"
    return f"{_f(e['value'], nd)}{unit} [{_f(e['ci_lo'], nd)}, {_f(e['ci_hi'], nd)}]"


def _span(xs, nd: int = 2, suffix: str = "") -> str:
    """``"lo to hi"`` of per-seed values (always both ends, so the README's text does not depend on rounding)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{min(xs):.{nd}f}{suffix} to {max(xs):.{nd}f}{suffix}"
