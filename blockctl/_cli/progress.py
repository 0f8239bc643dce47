"""Progress on stderr: one line per job or disk, with what is done of what, rate and ETA.

On a terminal a live display (rich.progress: a bar and the figures per line, redrawn in
place); otherwise a plain line per job every ``interval`` seconds and when it ends, so a log
file or a CI console shows progress too. Nothing under ``--json`` (stdout stays the result;
stderr stays free for the error line). The figures are the ones blockctl measured (a job's
``JobProgress``: bytes, the measured rate, the ETA at that rate), formatted here once for
both outputs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from blockctl._cli.output import human_size

if TYPE_CHECKING:
    from rich.progress import Progress


def figures(done: float, total: float, rate: float | None, eta: float | None, unit: str) -> str:
    """``3.0 MiB of 8.0 MiB, 1.0 MiB/s, ETA 5 s`` (bytes), or ``37.5 %`` (percent)."""
    if unit == "%":
        return f"{done:.1f} %"
    text = f"{human_size(done)} of {human_size(total)}"
    if rate is not None:
        text += f", {human_size(rate)}/s"
    if eta is not None:
        text += f", ETA {eta:.0f} s"
    return text


@dataclass(slots=True)
class _Line:
    label: str
    last_said: float | None = None
    finished: bool = False
    task: Any = None  # rich's TaskID on a terminal


#: Every display a command opened: the CLI closes them when the command ends, however it
#: ends (a live display left open would leave the terminal's cursor hidden).
_OPEN: list[ProgressDisplay] = []


def close_all() -> None:
    while _OPEN:
        _OPEN.pop().close()


class ProgressDisplay:
    """Lines keyed by job or disk. ``enabled`` False (``--json``): nothing is shown."""

    def __init__(
        self,
        *,
        enabled: bool,
        tty: bool | None = None,
        interval: float = 5.0,
        file: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.file.isatty() if tty is None else tty
        self.interval = interval
        self._clock = clock
        self._lines: dict[str, _Line] = {}
        self._live: Progress | None = None

    def update(
        self,
        key: str,
        label: str,
        done: float,
        total: float,
        *,
        rate: float | None = None,
        eta: float | None = None,
        unit: str = "B",
    ) -> None:
        if not self.enabled:
            return
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line(label=label)
        if line.finished:
            return
        text = figures(done, total, rate, eta, unit)
        finished = total > 0 and done >= total
        if self.tty:
            live = self._start()
            if line.task is None:
                line.task = live.add_task(label, total=total or None, figures=text)
            live.update(line.task, completed=done, total=total or None, figures=text)
        else:
            now = self._clock()
            if finished or line.last_said is None or now - line.last_said >= self.interval:
                line.last_said = now
                print(f"{label}: {text}", file=self.file, flush=True)
        if finished:
            self.finish(key)

    def finish(self, key: str) -> None:
        line = self._lines.get(key)
        if line is None or line.finished:
            return
        line.finished = True
        if all(other.finished for other in self._lines.values()):
            self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self in _OPEN:
            _OPEN.remove(self)

    def _start(self) -> Progress:
        if self._live is None:
            # Imported on first use: only a terminal showing progress pays for rich.
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._live = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[figures]}"),
                console=Console(file=self.file, force_terminal=True),
                transient=False,
            )
            self._live.start()
            _OPEN.append(self)
        return self._live
