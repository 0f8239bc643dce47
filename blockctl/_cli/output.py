"""The CLI's text output: headed tables and human sizes (``--json`` prints the raw values)."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def human_size(n: float) -> str:
    """1536 → '1.5 KiB' (binary units, as qemu-img prints them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Collection[str] = ()
) -> str:
    """A header line, then one line per row, columns two spaces apart; the columns named in
    ``right`` (numbers) right-aligned. None prints as an empty cell."""
    cells = [["" if value is None else str(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if header in right else value.ljust(width)
            for value, width, header in zip(values, widths, headers, strict=True)
        ).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])
