"""The CLI's progress lines (blockctl._cli.progress): a line per job with bytes, rate and ETA;
plain lines every interval when stderr is not a terminal; a live display on one; nothing
under --json."""

from __future__ import annotations

import io

from blockctl._cli.progress import ProgressDisplay, close_all, figures

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_figures_say_bytes_rate_and_eta() -> None:
    assert (
        figures(3 * MIB, 8 * MIB, 1.5 * MIB, 3.4, "B") == "3.0 MiB of 8.0 MiB, 1.5 MiB/s, ETA 3 s"
    )
    assert figures(3 * MIB, 8 * MIB, None, None, "B") == "3.0 MiB of 8.0 MiB"
    assert figures(37.5, 100, None, None, "%") == "37.5 %"


def test_plain_lines_per_job_every_interval_and_at_the_end() -> None:
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(enabled=True, tty=False, interval=5.0, file=out, clock=clock)
    display.update("disk0", "disk0 read", 1 * MIB, 8 * MIB, rate=MIB, eta=7)
    display.update("disk1", "disk1 read", 0, 4 * MIB)
    clock.now = 2.0
    display.update("disk0", "disk0 read", 2 * MIB, 8 * MIB, rate=MIB, eta=6)  # too soon
    clock.now = 5.0
    display.update("disk0", "disk0 read", 5 * MIB, 8 * MIB, rate=MIB, eta=3)
    display.update("disk0", "disk0 read", 8 * MIB, 8 * MIB, rate=MIB, eta=0)  # the end: said
    display.update("disk0", "disk0 read", 8 * MIB, 8 * MIB)  # after the end: nothing
    assert out.getvalue().splitlines() == [
        "disk0 read: 1.0 MiB of 8.0 MiB, 1.0 MiB/s, ETA 7 s",
        "disk1 read: 0 B of 4.0 MiB",
        "disk0 read: 5.0 MiB of 8.0 MiB, 1.0 MiB/s, ETA 3 s",
        "disk0 read: 8.0 MiB of 8.0 MiB, 1.0 MiB/s, ETA 0 s",
    ]


def test_json_shows_nothing() -> None:
    out = io.StringIO()
    display = ProgressDisplay(enabled=False, tty=True, file=out)
    display.update("j", "commit", MIB, 2 * MIB)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_live_line_per_job_and_is_closed() -> None:
    out = io.StringIO()
    display = ProgressDisplay(enabled=True, tty=True, file=out)
    display.update("a", "commit (job-a)", 2 * MIB, 8 * MIB, rate=MIB, eta=6)
    display.update("b", "stream (job-b)", 1 * MIB, 4 * MIB)
    display.update("a", "commit (job-a)", 8 * MIB, 8 * MIB, rate=MIB, eta=0)
    assert display._live is not None  # job b still runs
    close_all()  # what the CLI does when a command ends, however it ends
    assert display._live is None
    text = out.getvalue()
    assert "commit (job-a)" in text and "stream (job-b)" in text
    assert "8.0 MiB of 8.0 MiB, 1.0 MiB/s, ETA 0 s" in text
    assert "1.0 MiB of 4.0 MiB" in text
