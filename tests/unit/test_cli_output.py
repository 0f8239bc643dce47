"""The CLI's text tables: headed, numbers right-aligned, sizes in binary units."""

from __future__ import annotations

from blockctl._cli.jobs import job_table
from blockctl._cli.output import human_size, table


def test_a_table_has_a_header_and_aligned_columns() -> None:
    text = table(("NAME", "SIZE"), [("a", "1.5 KiB"), ("longer", None)], right={"SIZE"})
    assert text.splitlines() == [
        "NAME       SIZE",
        "a       1.5 KiB",
        "longer",
    ]


def test_sizes_are_binary_units() -> None:
    assert [human_size(n) for n in (0, 1023, 1536, 3 << 20, 5 << 40)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.0 MiB",
        "5.0 TiB",
    ]


def test_jobs_print_sizes_rates_and_who_copies() -> None:
    row = {
        "id": "bc-backup-1-abc",
        "type": "backup",
        "status": "paused",
        "io_status": "nospace",
        "done": 3 << 20,
        "total": 8 << 20,
        "percent": 37.5,
        "outcome": None,
        "rate": 262144,
        "eta": 20.0,
        "driven_by": 4242,
    }
    header, line = job_table([row]).splitlines()
    assert header.split() == ["ID", "TYPE", "STATUS", "DONE", "TOTAL", "%", "RATE", "ETA", "NOTE"]
    assert line.split("  ")[0] == "bc-backup-1-abc"
    for cell in ("3.0 MiB", "8.0 MiB", "37.5", "256.0 KiB/s", "20 s", "copied by pid 4242"):
        assert cell in line, (cell, line)
    assert "paused on an I/O error: nospace" in line
