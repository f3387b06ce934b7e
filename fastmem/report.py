"""How the book writes an estimate and its interval, in prose and in tables (all chapters).

One formatter, so that every chapter prints intervals the same way: "[low, high]" after the
estimate, signs shown where the number is a change, the same decimals for the estimate and its
interval.
"""

from __future__ import annotations

import math


def number_text(value: float, digits: int = 3, *, signed: bool = False, scientific: bool = False) -> str:
    """One number as the book prints it; "n/a" for a missing value (all chapters)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    kind = "e" if scientific else "f"
    return f"{value:{'+' if signed else ''}.{digits}{kind}}"


def interval_text(low: float, high: float, digits: int = 3, *, signed: bool = False,
                  scientific: bool = False) -> str:
    """A 95% interval as "[low, high]" (all chapters)."""
    def text(value):
        return number_text(value, digits, signed=signed, scientific=scientific)
    return f"[{text(low)}, {text(high)}]"


def estimate_text(estimate: float, low: float, high: float, digits: int = 3, *, signed: bool = False,
                  scientific: bool = False, unit: str = "") -> str:
    """An estimate, its unit and its interval: "0.512 [0.43, 0.60]" (all chapters).

    The unit (for example "%") follows the estimate, not each bound, so the interval reads as the
    estimate's.
    """
    estimate_part = number_text(estimate, digits, signed=signed, scientific=scientific)
    return f"{estimate_part}{unit} {interval_text(low, high, digits, signed=signed, scientific=scientific)}"


def html_table(frame, uuid: str, caption: str | None = None, precision: int = 3, index: bool = False):
    """A DataFrame as an HTML table that wraps inside the page column (chapter 2).

    ``uuid`` fixes the table's HTML id, so that an executed notebook's output is the same on every
    run (nbval checks it); text is escaped, so a cell reading "p < 0.05" stays text; cells wrap
    instead of widening the page; the index is hidden unless it means something (``index=True``).
    """
    styler = frame.style.set_uuid(uuid).format(precision=precision, escape="html")
    if caption:
        styler = styler.set_caption(caption)
    styler = styler.set_table_styles([{"selector": "th, td", "props": "white-space: normal; font-size: 0.85em;"}])
    return styler if index else styler.hide(axis="index")


def estimate_table(estimates: dict, rows: list, columns: dict, digits: int = 3, missing: str = "-"):
    """A DataFrame of "estimate [low, high]" cells (chapter 2's result tables).

    ``estimates`` maps ``(*key, column)`` to (estimate, low, high); ``rows`` lists (label, key)
    pairs, one table row each; ``columns`` maps a column to its title. A missing estimate reads
    ``missing``.
    """
    import pandas as pd

    return pd.DataFrame([{"row": label, **{title: estimate_text(*estimates[(*key, column)], digits)
                                            if (*key, column) in estimates else missing
                                            for column, title in columns.items()}}
                         for label, key in rows])
