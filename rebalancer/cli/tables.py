"""Tables that fit the terminal, also an 80-column one.

Each column has a priority: when the columns cannot all be shown at their minimum widths,
the ones with the highest priority number go first (0: always shown) and a line after the
table names them. Long values wrap (a word longer than the column folds onto the next line);
codes (reason codes, states, ids) are never wrapped or cut: their column is as wide as the
longest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_PER_COLUMN = 3
"""Characters a column costs besides its content: padding on both sides and a border."""
_LONGEST_WORD = 24
"""Words longer than this fold inside a wrapping column instead of widening it."""


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    priority: int = 0
    """0: always shown; higher numbers are left out first when the terminal is too narrow."""
    code: bool = False
    """Shown whole: each line of the value is one code (a reason, a state, an id)."""
    justify: str = "left"


def min_width(column: Column, cells: Sequence[str]) -> int:
    """The narrowest the column can be without cutting a header word, a code or a word."""
    header = max(len(word) for word in column.header.split())
    if column.code:
        content = max((len(line) for cell in cells for line in cell.splitlines()), default=0)
    else:
        words = (len(word) for cell in cells for word in cell.split())
        content = min(max(words, default=0), _LONGEST_WORD)
    return max(header, content, 1)


def max_width(column: Column, cells: Sequence[str]) -> int:
    """The width the column takes when nothing has to wrap."""
    lines = [len(line) for cell in cells for line in cell.splitlines()]
    return max(len(column.header), *lines, min_width(column, cells))


def fit(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> dict[int, int]:
    """The columns to show in `width` characters (index -> content width), in their order:
    each at least its minimum, the space left given to the columns that wrap."""
    cells = [[row[i] for row in rows] for i in range(len(columns))]
    widths = {i: min_width(column, cells[i]) for i, column in enumerate(columns)}

    def needed() -> int:
        return sum(w + _PER_COLUMN for w in widths.values()) + 1

    while needed() > width:
        optional = [i for i in widths if columns[i].priority > 0]
        if not optional:
            break
        del widths[max(optional, key=lambda i: (columns[i].priority, i))]
    spare = width - needed()
    for i in widths:
        grow = min(max(spare, 0), max_width(columns[i], cells[i]) - widths[i])
        widths[i] += grow
        spare -= grow
    return widths


def print_table(
    console: Any,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
) -> list[str]:
    """Print the table on a rich console; returns the headers of the columns left out."""
    from rich.table import Table

    shown = fit(columns, rows, console.width)
    table = Table(title=title, title_justify="left")
    for i, width in shown.items():
        column = columns[i]
        table.add_column(
            column.header,
            justify=column.justify,  # type: ignore[arg-type]
            width=width,
            no_wrap=column.code,
            overflow="fold",
        )
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    hidden = [column.header for i, column in enumerate(columns) if i not in shown]
    if hidden:
        console.print(
            f"Not shown at {console.width} columns: {', '.join(hidden)} "
            "(a wider terminal or --json shows them)."
        )
    return hidden
