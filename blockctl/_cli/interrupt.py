"""Ctrl-C in the command line: cancel cleanly, then say what was done.

A command runs inside :func:`run_interruptible`. The first SIGINT cancels it: the library's
shielded clean-ups run as for any cancellation (a job blockctl started is cancelled, driven
to its end and dismissed; a commit's base goes back to read-only), the warnings they log are
muted, and the command ends with one sentence (``cancelled job X (commit) at 37 %; the chain
is unchanged``, or a JSON object with ``--json``) and exit status 130. A second SIGINT while
that clean-up runs only says to wait: leaving half-way would leave the job running.

:data:`TRACKER` is a :class:`~blockctl._jobs.JobHook` the commands pass to every job they
start (``job_hooks``): it remembers each job's last progress and how it ended.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from blockctl import _log
from blockctl._cli.output import human_size
from blockctl._qmp.models import JobStatus
from blockctl._qmp.session import raise_single
from blockctl.errors import BlockctlError, JobCancelled

if TYPE_CHECKING:  # the job driver is imported by the commands that run jobs, not by all
    from blockctl._jobs import JobEnded, JobProgress, JobTransition

#: Exit status of a command stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

#: Job types whose cancel leaves the chain as it was before the job (qemu-facts F2: a
#: cancelled commit has written part of top into base, but top still reads the same).
_CHAIN_JOBS = frozenset({"commit", "stream", "mirror"})
#: A backup's read of one disk (blockctl._backup.operations' progress records).
_BACKUP_READ = "backup-read"


@dataclass(slots=True)
class _Seen:
    id: str
    type: str | None
    done: int | None = None
    total: int | None = None
    status: JobStatus | None = None
    ended: BaseException | None = None  # the error (or None) the job ended with
    finished: bool = False  # succeeded before the cancel took effect


class JobTracker:
    """A JobHook that remembers every job of this process and how it ended."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Seen] = {}
        self.points: list[str] = []  # backup points recorded by this command

    def _get(self, job_id: str, job_type: str | None) -> _Seen:
        seen = self.jobs.setdefault(job_id, _Seen(id=job_id, type=job_type))
        if seen.type is None:
            seen.type = job_type
        return seen

    def on_transition(self, transition: JobTransition) -> None:
        self._get(transition.job_id, transition.job_type).status = transition.status

    def on_progress(self, progress: JobProgress) -> None:
        seen = self._get(progress.job_id, progress.job_type)
        seen.done, seen.total = progress.done, progress.total

    def on_end(self, ended: JobEnded) -> None:
        seen = self._get(ended.job_id, ended.job_type)
        seen.ended = ended.error
        seen.finished = ended.error is None
        if ended.error is not None and ended.error.length:
            seen.done, seen.total = ended.error.offset, ended.error.length

    def on_point_recorded(self, manifest: Any) -> None:
        """A backup's manifest was written: its point is recorded, whatever comes after."""
        self.points.append(str(manifest.id))

    def clear(self) -> None:
        self.jobs.clear()
        self.points.clear()


TRACKER = JobTracker()


def _percent(seen: _Seen) -> str:
    if seen.done is None or not seen.total:
        return "an unknown point"
    return f"{100 * seen.done // seen.total} %"


def summary(tracker: JobTracker) -> tuple[str, list[dict[str, object]]]:
    """What the interrupted command did, in one sentence and as JSON rows."""
    sentences: list[str] = []
    rows: list[dict[str, object]] = []
    reads = [seen for seen in tracker.jobs.values() if seen.type == _BACKUP_READ]
    if reads:
        # A backup: its QEMU jobs only held the point in time; what was done is its read.
        read = ", ".join(
            f"{s.id.removeprefix('read-')} {human_size(s.done or 0)} of {human_size(s.total or 0)}"
            for s in reads
        )
        fleece = [s.id for s in tracker.jobs.values() if s.type == "backup"]
        backup_row: dict[str, object] = {
            "job": fleece[0] if fleece else None,
            "type": "backup",
            "done": sum(s.done or 0 for s in reads),
            "total": sum(s.total or 0 for s in reads),
            "points_recorded": list(tracker.points),
        }
        if tracker.points:
            sentences.append(
                f"the backup's point {', '.join(tracker.points)} was recorded before the "
                f"cancel took effect (read: {read})"
            )
            backup_row["outcome"] = "finished"
        else:
            sentences.append(
                f"cancelled the backup (read: {read}); no point was recorded and the "
                "checkpoints are as before it"
            )
            backup_row["outcome"] = "cancelled"
        rows.append(backup_row)
    for seen in tracker.jobs.values():
        if reads and seen.type in (_BACKUP_READ, "backup", "create"):
            continue  # said above, as the backup
        kind = seen.type or "job"
        row: dict[str, object] = {
            "job": seen.id,
            "type": seen.type,
            "done": seen.done,
            "total": seen.total,
        }
        if isinstance(seen.ended, JobCancelled):
            tail = "the chain is unchanged" if kind in _CHAIN_JOBS else "nothing is left running"
            sentences.append(f"cancelled job {seen.id} ({kind}) at {_percent(seen)}; {tail}")
            row.update(outcome="cancelled", chain_unchanged=kind in _CHAIN_JOBS)
        elif seen.finished:
            sentences.append(
                f"job {seen.id} ({kind}) had finished before the cancel took effect; its "
                "clean-up may not have run (see `blockctl chain VM`)"
            )
            row.update(outcome="finished", chain_unchanged=False)
        elif seen.ended is not None:
            sentences.append(f"job {seen.id} ({kind}) ended: {seen.ended}")
            row.update(outcome="failed", error=str(seen.ended), chain_unchanged=None)
        elif seen.status is JobStatus.NULL:
            continue  # an earlier job of this command, done before the interrupt
        else:
            sentences.append(
                f"job {seen.id} ({kind}) may still be running at {_percent(seen)}: see "
                f"`blockctl jobs VM`, and cancel it there"
            )
            row.update(outcome="unknown", chain_unchanged=None)
        rows.append(row)
    if not sentences:
        sentences.append(
            "the command was cancelled and its clean-up ran (no job of it was running)"
        )
    return "; ".join(sentences), rows


def _mute_warnings(args: argparse.Namespace) -> None:
    """The clean-up's warnings (``blockctl.job.abandoned`` …) are what the summary says."""
    if not getattr(args, "verbose", False) and not _log.raise_level_on_demand(logging.ERROR):
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def report(args: argparse.Namespace, error: BaseException | None = None) -> int:
    """Print what the interrupted command did; the exit status."""
    sentence, rows = summary(TRACKER)
    if error is not None:
        sentence += f"; then: {type(error).__name__}: {str(error).splitlines()[0]}"
    if getattr(args, "json", False):
        data: dict[str, object] = {"interrupted": True, "message": sentence, "jobs": rows}
        if error is not None:
            data["error"] = {"type": type(error).__name__, "message": str(error)}
        print(json.dumps(data))
    print(f"blockctl: interrupted: {sentence}", file=sys.stderr)
    return EXIT_INTERRUPTED


async def run_interruptible(
    run: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """``await run(args)``; on SIGINT, cancel it, let its clean-up finish, and report."""
    interrupted = False
    scope = anyio.CancelScope()
    outcome: list[int] = []
    failure: BlockctlError | None = None

    async def watch(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal interrupted
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                if not interrupted:
                    interrupted = True
                    _mute_warnings(args)
                    scope.cancel()
                else:
                    print(
                        "blockctl: cleaning up (cancelling the job); please wait",
                        file=sys.stderr,
                    )

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watch)  # the receiver is in place before the command starts
            try:
                with scope:
                    outcome.append(await run(args))
            except BlockctlError as exc:
                if not interrupted:
                    raise
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)
    if interrupted:
        return report(args, failure)
    return outcome[0]
