"""The one driver for every QEMU job: backup, commit, stream, mirror, snapshot-*.

A job is a state machine over ``JOB_STATUS_CHANGE`` events (the ``BLOCK_JOB_*`` events add
offset/length/error details). Rules, each from something that went wrong elsewhere
(``notes/qemu-facts.md`` §0, F2, F3, F5, F7):

- The listener is registered *before* the command that creates the job
  (:func:`start_job`): a fast job can conclude before its command's reply arrives.
- Jobs are created with ``auto-dismiss: false``; the driver reads ``query-jobs[].error`` at
  ``concluded`` and always sends ``job-dismiss``. Nothing is left in ``query-jobs``. Streams
  are the exception (QEMU crashes on a graph read while one is concluded:
  :func:`~blockctl._qmp.wire.block_stream`): ``auto-finalize: false`` and ``auto-dismiss:
  true``; the driver finalizes at ``pending`` and reads the outcome from the final event.
- Success is *only* "concluded, no ``error``, and ``current-progress == total-progress``".
  Anything else raises :class:`~blockctl.errors.JobFailed` (or ``JobCancelled``).
- One deadline per operation (``anyio.fail_after`` around the whole wait), never per event;
  every wait races the connection (a QEMU that dies raises ``ConnectionLost``, no hang).
- I/O errors follow the job's error policy (``on-error``/``on-source-error``/
  ``on-target-error``), reported by ``BLOCK_JOB_ERROR``: ``report`` fails the job; ``stop``
  (and ``enospc`` on ENOSPC) pauses it, and a job nobody resumes within ``pause_timeout`` is
  cancelled (:class:`~blockctl.errors.JobStoppedOnError`). QEMU's own ``ignore`` makes backup,
  commit and mirror retry the failing request in a tight loop: about 17,000
  ``BLOCK_JOB_ERROR`` events/s on a persistent fault (measured), which buried the QMP monitor
  so deep that a ``job-cancel`` took 24 s to be answered. So blockctl's ``ignore`` runs the job
  with ``stop`` and resumes it itself, ``retries`` times at most (:meth:`Job.wait`), then
  cancels it; a transient fault is ridden out and still ends in a complete copy. A job someone
  else started with QEMU's ``ignore`` is cancelled after ``ignored_error_limit`` errors.
- Completion is event-driven. ``query-jobs`` is sampled at an interval only to feed
  progress hooks (:class:`JobHook`); the samples never decide anything.

The transitions a job goes through are kept in :attr:`Job.transitions` and reported to hooks
as frozen :class:`JobTransition` records; progress samples as :class:`JobProgress` records
(stamina's hook idea: this module calls hooks, it imports no UI).

Cancelling (:meth:`Job.cancel`, ``job-cancel``) a mirror or active commit that is READY ends
it *without* the pivot: the device stays on the top image, and ``base`` has already received
some or all of top's data, so it no longer matches its own point in time (qemu-facts F2).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import anyio

from blockctl._log import get_logger
from blockctl._qmp import wire
from blockctl._qmp.models import JOB_FINAL, JobEvent, JobEventKind, JobInfo, JobStatus
from blockctl._qmp.session import Event, EventStream, QMPSession, raise_single
from blockctl.errors import (
    BlockctlError,
    CommandFailed,
    ConfigError,
    ConnectionLost,
    JobCancelled,
    JobCancelledByOther,
    JobError,
    JobFailed,
    JobNeverReady,
    JobStoppedOnError,
    OperationTimeout,
)
from blockctl.types import ErrorPolicy, coerce_enum

__all__ = [
    "Job",
    "JobControl",
    "JobEnded",
    "JobHook",
    "JobIOError",
    "JobProgress",
    "JobResult",
    "JobStatus",
    "JobTransition",
    "StructlogJobHook",
    "adopt_jobs",
    "call_hooks",
    "error_policy",
    "measured_rate",
    "new_job_id",
    "start_job",
]

_log = get_logger()

#: Job types that wait in READY for job-complete (the "copy until in sync" jobs).
READY_JOB_TYPES = frozenset({"mirror", "commit"})
#: QEMU's JobType values that are also valid job-id kinds.
_TYPE_KINDS = frozenset({"commit", "stream", "mirror", "backup", "create", "amend"})

_counter = itertools.count(1)


def new_job_id(kind: str) -> str:
    """A job id blockctl owns: ``bc-<kind>-<n>-<random>``. Never a user string."""
    if not kind.isalnum():
        raise ValueError(f"job kind {kind!r} must be alphanumeric")
    return f"bc-{kind}-{next(_counter)}-{secrets.token_hex(3)}"


#: How many times blockctl's ``ignore`` policy retries a failing request (per job).
IGNORE_RETRIES = 16


@dataclass(frozen=True, slots=True)
class QEMUErrorPolicy:
    """An :class:`~blockctl.types.ErrorPolicy` as sent to QEMU (``value``; None: QEMU's
    default, ``report``, not sent) plus the ``retries`` :meth:`Job.wait` gives it."""

    value: str | None
    retries: int


def error_policy(policy: ErrorPolicy | str, where: str = "on_error") -> QEMUErrorPolicy:
    """What blockctl asks of QEMU for ``policy``: ``ignore`` becomes ``stop`` plus
    :data:`IGNORE_RETRIES` resumes (see the module docstring for why)."""
    chosen = coerce_enum(ErrorPolicy, policy, where)
    if chosen is ErrorPolicy.IGNORE:
        return QEMUErrorPolicy(ErrorPolicy.STOP.value, IGNORE_RETRIES)
    return QEMUErrorPolicy(None if chosen is ErrorPolicy.REPORT else chosen.value, 0)


# Section: records and hooks


@dataclass(frozen=True, slots=True, kw_only=True)
class JobTransition:
    """A job moved to ``status`` (from ``previous``); ``seconds`` since blockctl began
    watching it."""

    job_id: str
    job_type: str | None
    status: JobStatus
    previous: JobStatus | None
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class JobProgress:
    """A progress sample: ``done`` of ``total`` (QEMU's unit: bytes for block jobs).

    ``rate`` (bytes/s) and ``eta`` (seconds) are estimated from consecutive samples and are
    None until two samples exist (or while nothing moves).
    """

    job_id: str
    job_type: str | None
    status: JobStatus
    done: int
    total: int
    rate: float | None
    eta: float | None
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSample:
    """One ``query-jobs`` reading of a job: ``at`` is a monotonic clock time (seconds)."""

    at: float
    done: int
    total: int


def measured_rate(first: JobSample, second: JobSample) -> tuple[float | None, float | None]:
    """The rate (bytes/s) and the ETA (seconds) of a job between two samples of it, as
    measured, never guessed: ``(None, None)`` when they cannot say (no time between them, or
    progress that went back: another job with the same id); a rate of 0 (paused, or waiting
    for I/O) gives no ETA. An ETA assumes the rest goes at the measured rate."""
    interval = second.at - first.at
    moved = second.done - first.done
    if interval <= 0 or moved < 0:
        return None, None
    rate = moved / interval
    if rate == 0:
        return 0.0, None
    return rate, max(second.total - second.done, 0) / rate


@dataclass(frozen=True, slots=True, kw_only=True)
class JobResult:
    """A job that concluded with no error and ``offset == length``, and was dismissed."""

    job_id: str
    job_type: str | None
    target: str | None
    transitions: tuple[JobStatus, ...]
    offset: int
    length: int
    seconds: float
    completed_on_ready: bool  # job-complete was sent at READY (an active commit pivoted)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobIOError:
    """The job met an I/O error (``BLOCK_JOB_ERROR``): ``operation`` ``read`` (source) or
    ``write`` (target), and what its error policy did: ``action`` ``report`` (it fails),
    ``stop`` (it pauses until resumed), ``retry`` (blockctl resumes it at once: its ``ignore``
    policy) or ``ignore`` (QEMU retried it by itself). ``count`` numbers the
    errors of this job; ``pause_timeout`` is how long a stopped job waits to be resumed."""

    job_id: str
    job_type: str | None
    operation: str
    action: str
    count: int
    pause_timeout: float
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEnded:
    """A job's end, as :meth:`Job.wait` saw it: ``error`` is None if it succeeded."""

    job_id: str
    job_type: str | None
    error: JobError | None


class JobHook(Protocol):
    """What the jobs layer calls. Implementations must be quick and must not block.

    A hook may also define ``on_io_error(self, error: JobIOError) -> None``: it is called
    when the job meets an I/O error (for ``ignore``, the first one and the one it gives up
    at), and ``on_end(self, ended: JobEnded) -> None``, called when :meth:`Job.wait` has
    the job's outcome (the CLI's Ctrl-C summary uses it); a backup also calls
    ``on_point_recorded(self, manifest) -> None`` once its manifest is written. These are
    optional so hooks written before them keep working.
    """

    def on_transition(self, transition: JobTransition) -> None: ...

    def on_progress(self, progress: JobProgress) -> None: ...


class StructlogJobHook:
    """Logs ``blockctl.job.<status>`` for every transition and ``blockctl.job.progress``."""

    def on_transition(self, transition: JobTransition) -> None:
        _log.info(
            f"blockctl.job.{transition.status.value}",
            job_id=transition.job_id,
            job_type=transition.job_type,
            previous=None if transition.previous is None else transition.previous.value,
            seconds=round(transition.seconds, 4),
        )

    def on_progress(self, progress: JobProgress) -> None:
        _log.debug(
            "blockctl.job.progress",
            job_id=progress.job_id,
            status=progress.status.value,
            done=progress.done,
            total=progress.total,
            rate=None if progress.rate is None else round(progress.rate),
            eta=None if progress.eta is None else round(progress.eta, 1),
        )

    def on_io_error(self, error: JobIOError) -> None:
        _log.warning(
            "blockctl.job.io_error",
            job_id=error.job_id,
            job_type=error.job_type,
            operation=error.operation,
            action=error.action,
            count=error.count,
        )


DEFAULT_HOOKS: tuple[JobHook, ...] = (StructlogJobHook(),)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobControl:
    """How a long-running operation drives its QEMU jobs, shared by backup, commit, stream,
    the deletion of external snapshots and internal snapshots. Checked when it is made
    (:class:`~blockctl.errors.ConfigError` naming the field).

    ``speed``: at most this many bytes/s (None: no limit). ``deadline``: seconds for the whole
    operation (None: the operation's own default, e.g. 600 s for a commit, 3600 s for a
    backup). ``on_error``: the jobs' error policy (:class:`~blockctl.types.ErrorPolicy`; a
    string is taken as one); a job paused on an error waits ``pause_timeout`` s to be resumed
    (``blockctl jobs VM resume ID``), then is cancelled. ``hooks`` (:class:`JobHook`) see the
    jobs' transitions and progress; the default logs them.
    """

    speed: int | None = None
    deadline: float | None = None
    on_error: ErrorPolicy = ErrorPolicy.REPORT
    pause_timeout: float = 60.0
    hooks: Sequence[JobHook] = DEFAULT_HOOKS

    def __post_init__(self) -> None:
        put = object.__setattr__
        speed = self.speed
        if speed is not None and (not isinstance(speed, int) or isinstance(speed, bool)):
            raise ConfigError("speed", f"{speed!r}: bytes/s as an integer, or None for no limit")
        if speed is not None and speed <= 0:
            raise ConfigError("speed", f"{speed} bytes/s: a speed limit must be positive")
        if self.deadline is not None and not _positive(self.deadline):
            raise ConfigError("deadline", f"{self.deadline!r}: seconds, more than 0")
        if not (_positive(self.pause_timeout) or self.pause_timeout == 0):
            raise ConfigError("pause_timeout", f"{self.pause_timeout!r}: seconds, 0 or more")
        put(self, "on_error", coerce_enum(ErrorPolicy, self.on_error, "on_error"))
        if isinstance(self.hooks, str) or not isinstance(self.hooks, Sequence):
            raise ConfigError("hooks", f"{self.hooks!r}: a sequence of job hooks")
        put(self, "hooks", tuple(self.hooks))

    def deadline_or(self, default: float) -> float:
        """``deadline``, or the operation's ``default`` when none was given."""
        return default if self.deadline is None else self.deadline


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0  # False for NaN too
    )


#: The default :class:`JobControl`: no speed limit, the operation's deadline, ``report``.
DEFAULT_CONTROL = JobControl()


def call_hooks(hooks: Sequence[JobHook], method: str, record: object) -> None:
    for hook in hooks:
        call = getattr(hook, method, None)
        if call is None:
            continue  # an optional method (on_io_error) this hook does not define
        try:
            call(record)
        except Exception as exc:  # a broken progress bar must not break a commit
            _log.warning("blockctl.job.hook_failed", hook=repr(hook), error=repr(exc))


# Section: the job handle


class Job:
    """One QEMU job, started by :func:`start_job` or found by :func:`adopt_jobs`.

    :meth:`wait` drives it to its end; :meth:`cancel`, :meth:`pause`, :meth:`resume`,
    :meth:`set_speed` and :meth:`complete` act on it meanwhile (from another task, or before
    calling :meth:`wait` again after :meth:`wait_ready`).
    """

    def __init__(
        self,
        session: QMPSession,
        job_id: str,
        *,
        job_type: str | None,
        target: str | None = None,
        auto_finalize: bool | None = True,
        auto_dismiss: bool = False,
        speed: int | None = None,
        status: JobStatus | None = None,
        stream: EventStream | None = None,
    ) -> None:
        self.session = session
        self.id = job_id
        self.type = job_type
        #: The node or device the job works on, for messages.
        self.target = target
        #: None for an adopted job: QEMU does not report it, so PENDING is finalized anyway.
        self.auto_finalize = auto_finalize
        #: Created with ``auto-dismiss: true``: gone from ``query-jobs`` once concluded.
        self.auto_dismiss = auto_dismiss
        self.speed = speed
        self.status = status
        self._stream = stream
        self._transitions: list[JobStatus] = [] if status is None else [status]
        self._started = time.monotonic()
        self._ready = False
        self._completing = False
        self._finalizing = False
        self._cancel_requested = False
        self._cancelled_event = False
        self._final_event: JobEvent | None = None
        self._dismissed = False
        self._result: JobResult | None = None
        self._error: JobError | None = None
        #: I/O errors seen (``BLOCK_JOB_ERROR``); see :class:`JobIOError`.
        self.io_errors = 0
        self._last_io_error: JobIOError | None = None
        self._stopped_since: float | None = None  # paused on an I/O error, waiting for resume
        self._gave_up: str | None = None  # why blockctl cancelled it (its I/O errors)
        self._stopped_io_status: str | None = None  # QEMU's io-status when it gave up
        self._pause_timeout = 60.0
        self._ignored_error_limit = 64
        self._retries = 0  # stops to resume at once (blockctl's "ignore" policy)
        self._retry_on: frozenset[str] = frozenset()
        self._retried = 0
        self._retry_pending = False

    def __repr__(self) -> str:
        return f"<Job {self.id} type={self.type} status={self.status}>"

    @property
    def transitions(self) -> tuple[JobStatus, ...]:
        """Every status seen, in order (from events, or a ``query-jobs`` resync)."""
        return tuple(self._transitions)

    @property
    def done(self) -> bool:
        """Whether the job has concluded and been dismissed (its outcome is known)."""
        return self._result is not None or self._error is not None

    @property
    def outcome(self) -> JobResult | JobError | None:
        """The result or error once :attr:`done` (an adopted concluded job has one at once)."""
        return self._result if self._result is not None else self._error

    # Section: verbs

    async def cancel(self) -> None:
        """``job-cancel``. The job ends in :class:`JobCancelled` (or, if it was about to
        finish anyway, succeeds). For a READY mirror/active commit: ends without pivot."""
        self._cancel_requested = True
        await wire.job_cancel(self.session, self.id)

    async def pause(self) -> None:
        await wire.job_pause(self.session, self.id)

    async def resume(self) -> None:
        await wire.job_resume(self.session, self.id)

    async def complete(self) -> None:
        """``job-complete`` (only in READY): an active commit pivots onto its base."""
        self._completing = True
        try:
            await wire.job_complete(self.session, self.id)
        except BaseException:
            self._completing = False
            raise

    async def set_speed(self, bytes_per_second: int) -> None:
        """Change the speed limit; 0 removes it."""
        await wire.block_job_set_speed(self.session, self.id, bytes_per_second)
        self.speed = bytes_per_second

    async def info(self) -> JobInfo | None:
        """The job's ``query-jobs`` entry now (None once dismissed). For display only."""
        return next((j for j in await wire.query_jobs(self.session) if j.id == self.id), None)

    async def io_status(self) -> str | None:
        """QEMU's I/O status of the job: ``ok``, or ``failed``/``nospace`` while it is paused
        on an I/O error (None once dismissed)."""
        return await wire.block_job_io_status(self.session, self.id)

    # Section: waiting

    async def wait(
        self,
        *,
        complete_on_ready: bool,
        deadline: float,
        hooks: Sequence[JobHook] = DEFAULT_HOOKS,
        progress_interval: float | None = 1.0,
        pause_timeout: float = 60.0,
        ignored_error_limit: int = 64,
        retries: int = 0,
        retry_on: frozenset[str] = frozenset({"read", "write"}),
    ) -> JobResult:
        """Drive the job until it concludes; dismiss it; return its result.

        ``complete_on_ready``: at READY, send ``job-complete`` (active commit: pivot);
        otherwise keep waiting in READY (someone else completes or cancels).
        ``deadline``: seconds for the whole wait.
        ``pause_timeout``: how long a job paused on an I/O error (policy ``stop``/``enospc``)
        waits for someone to resume it (:meth:`resume`, ``blockctl jobs VM resume ID``) before
        blockctl cancels it. ``retries``: how many times a job that stopped on an I/O error is
        resumed at once (a retry of the failing request: blockctl's ``ignore`` policy, with
        QEMU's ``stop``) before blockctl gives up and cancels it; ``retry_on``: for errors of
        these operations only (``read``: source, ``write``: target; a backup can have
        ``ignore`` on one side and ``stop`` on the other). ``ignored_error_limit``:
        errors QEMU itself retried (a job started with QEMU's ``ignore``) before blockctl
        cancels the job.

        :raise JobFailed: concluded with an error, or ``offset != length``, or cancelled by
            blockctl after ``retries`` retries or ``ignored_error_limit`` ignored errors.
        :raise JobStoppedOnError: paused on an I/O error longer than ``pause_timeout``.
        :raise JobCancelled: it was cancelled.
        :raise JobNeverReady: a mirror/commit was still not READY at the deadline.
        :raise OperationTimeout: any other missed deadline (a job started by
            :func:`start_job` is then cancelled on the way out; any other keeps running).
        :raise ConnectionLost: QEMU went away; the outcome is unknown (attach and adopt).
        """
        self._pause_timeout = pause_timeout
        self._ignored_error_limit = ignored_error_limit
        self._retries = retries
        self._retry_on = retry_on
        await self._drive(
            until_ready=False,
            complete_on_ready=complete_on_ready,
            deadline=deadline,
            hooks=hooks,
            progress_interval=progress_interval,
        )
        call_hooks(hooks, "on_end", JobEnded(job_id=self.id, job_type=self.type, error=self._error))
        if self._error is not None:
            raise self._error
        assert self._result is not None
        # Include the NULL transition that followed job-dismiss.
        self._result = replace(self._result, transitions=self.transitions)
        return self._result

    async def wait_ready(
        self,
        *,
        deadline: float,
        hooks: Sequence[JobHook] = DEFAULT_HOOKS,
        progress_interval: float | None = 1.0,
    ) -> None:
        """Drive the job until READY (then :meth:`complete` or :meth:`cancel`, and
        :meth:`wait`). A job that concludes first raises its error, or returns."""
        await self._drive(
            until_ready=True,
            complete_on_ready=False,
            deadline=deadline,
            hooks=hooks,
            progress_interval=progress_interval,
        )
        if self._error is not None:
            raise self._error

    async def _drive(
        self,
        *,
        until_ready: bool,
        complete_on_ready: bool,
        deadline: float,
        hooks: Sequence[JobHook],
        progress_interval: float | None,
    ) -> None:
        if self.done or (until_ready and self._ready and self.status is JobStatus.READY):
            return
        operation = f"job {self.id} ({self.type or 'job'}{self._on()})"
        try:
            with anyio.fail_after(deadline), self._listening() as (stream, resync):
                try:
                    async with anyio.create_task_group() as tg:
                        if progress_interval is not None and hooks:
                            tg.start_soon(self._sample, hooks, progress_interval)
                        stop = False
                        if resync:
                            await self._resync(hooks)
                            # READY before we listened: its event will not come again.
                            if self.status is JobStatus.READY:
                                stop = await self._reached_ready(until_ready, complete_on_ready)
                        if not stop:
                            await self._loop(stream, until_ready, complete_on_ready, hooks)
                        tg.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    raise_single(group)
        except TimeoutError:
            if self.done:
                return  # the outcome is known; only the trailing NULL event was late
            raise self._timeout(operation, deadline, complete_on_ready or until_ready) from None
        except ConnectionLost as exc:
            raise ConnectionLost(
                f"{operation}: {exc}; the job's outcome is unknown (if QEMU still runs, "
                "attach again: adopt_jobs() reports it)"
            ) from exc

    def _on(self) -> str:
        return f" on {self.target}" if self.target else ""

    def _timeout(self, operation: str, deadline: float, wants_ready: bool) -> OperationTimeout:
        """The missed deadline, in words. A job started by :func:`start_job` is cancelled on
        the way out of its block, which then says so (:func:`_after_abandon`); any other job
        is still running, and the error says what to do with it."""
        detail = f"status {self.status.value if self.status else 'unknown'}"
        owned = self._stream is not None
        if wants_ready and not self._ready and self.type in READY_JOB_TYPES:
            speed = f"{self.speed} bytes/s" if self.speed else "its speed limit"
            running = (
                ""
                if owned
                else "; the job is still running: raise its speed limit (Job.set_speed(0), "
                f"blockctl jobs VM speed {self.id} 0) or cancel it"
            )
            return JobNeverReady(
                operation,
                deadline,
                f"never became READY ({detail}); the guest may write faster than {speed}" + running,
                job_id=self.id,
            )
        running = (
            ""
            if owned
            else f"; the job is still running (wait for it, or cancel it: blockctl jobs VM "
            f"cancel {self.id})"
        )
        return OperationTimeout(operation, deadline, detail + running)

    @contextlib.contextmanager
    def _listening(self) -> Iterator[tuple[EventStream, bool]]:
        """The job's event stream. A job not started by :func:`start_job` gets one now,
        and then needs a ``query-jobs`` resync for what happened before."""
        if self._stream is not None:
            yield self._stream, False
            return
        with wire.job_events(self.session) as stream:
            yield stream, True

    def _vanished(self) -> JobFailed:
        return JobFailed(
            f"job {self.id}{self._on()} is no longer listed by QEMU (dismissed by another "
            "client?); its outcome is unknown",
            job_id=self.id,
            job_type=self.type,
            target=self.target,
            status=None,
            error=None,
            offset=None,
            length=None,
        )

    async def _resync(self, hooks: Sequence[JobHook]) -> None:
        info = await self.info()
        if info is None:
            self._error = self._vanished()
            return
        if info.status is not self.status:
            self._transition(info.status, hooks)
        if info.status is JobStatus.READY:
            self._ready = True
        # An adopted job may be paused on an error that happened before we listened.
        if (
            info.status is JobStatus.PAUSED
            and self._stopped_since is None
            and await self.io_status() not in (None, "ok")
        ):
            self._stopped_since = time.monotonic()
        if info.status is JobStatus.PENDING:
            # Its PENDING event came before we listened: finalized now, under the listener
            # (an auto-dismissed stream is gone the moment it concludes).
            await self._finalize()
        if info.status is JobStatus.CONCLUDED:
            await self._conclude(info)

    async def _reached_ready(self, until_ready: bool, complete_on_ready: bool) -> bool:
        """The job is READY (an event, or a resync): True when the caller waited for just
        that; with ``complete_on_ready`` it is told to complete (pivot) once."""
        self._ready = True
        if until_ready:
            return True
        if complete_on_ready and not self._completing and not self._cancel_requested:
            try:
                await self.complete()
            except CommandFailed as exc:  # no longer ready (an error reset it)
                _log.info("blockctl.job.complete_refused", job_id=self.id, error=str(exc))
        return False

    async def _loop(
        self,
        stream: EventStream,
        until_ready: bool,
        complete_on_ready: bool,
        hooks: Sequence[JobHook],
    ) -> None:
        # After job-dismiss QEMU sends the NULL transition before the reply: read it too, so
        # the recorded sequence is complete.
        while not (self.done and self.status in (JobStatus.NULL, None)):
            if (
                self._error is not None
                and self.status is not JobStatus.NULL
                and not self._dismissed
            ):
                return  # vanished (resync found nothing): there is no NULL to wait for
            raw = await self._next_event(stream)
            if raw is None:  # paused on an I/O error for pause_timeout: nobody resumed it
                await self._give_up(await self._stopped_reason())
                continue
            event = wire.parse_job_event(raw)
            if event.job_id != self.id:
                continue
            if event.kind is JobEventKind.ERROR:
                await self._io_error(event, hooks)
                continue
            if event.kind is not JobEventKind.STATUS:
                self._detail(event)
                continue
            assert event.status is not None
            self._transition(event.status, hooks)
            if event.status is JobStatus.RUNNING:
                self._stopped_since = None  # resumed (by us, a hook, or another client)
            if event.status is JobStatus.PAUSED and self._retry_pending:
                self._retry_pending = False
                self._retried += 1
                with contextlib.suppress(CommandFailed):  # cancelled or resumed meanwhile
                    await self.resume()
            match event.status:
                case JobStatus.READY:
                    if await self._reached_ready(until_ready, complete_on_ready):
                        return
                case JobStatus.PENDING:
                    await self._finalize()
                case JobStatus.CONCLUDED if not self._dismissed:
                    info = await self.info()
                    if info is None and self.auto_dismiss:
                        # QEMU dismissed it in the same step: only the final event tells.
                        # (Still listed, it was not: dismissed below, as any other.)
                        self._dismissed = True
                    await self._conclude(info)
                case JobStatus.NULL if not self.done:
                    # Dismissed by someone else (or created with auto-dismiss): only the
                    # final BLOCK_JOB_* event, if any, tells how it ended.
                    self._dismissed = True
                    await self._conclude(None)
                case _:
                    pass

    async def _finalize(self) -> None:
        """At PENDING: ``job-finalize`` a job QEMU does not finalize by itself (or may not:
        an adopted one), once."""
        if self.auto_finalize is True or self._finalizing:
            return
        self._finalizing = True
        try:
            await wire.job_finalize(self.session, self.id)
        except CommandFailed as exc:  # an adopted job that finalized by itself
            _log.info("blockctl.job.finalize_refused", job_id=self.id, error=str(exc))

    async def _next_event(self, stream: EventStream) -> Event | None:
        """The next event; None once the job has been paused on an I/O error for
        ``pause_timeout`` (then blockctl gives up on it)."""
        if self._stopped_since is None or self._gave_up is not None:
            return await stream.next()
        left = self._stopped_since + self._pause_timeout - time.monotonic()
        with anyio.move_on_after(max(left, 0.0)):
            return await stream.next()
        return None

    async def _io_error(self, event: JobEvent, hooks: Sequence[JobHook]) -> None:
        self.io_errors += 1
        if self._gave_up is not None:
            return  # the retries of a job being cancelled: counted, not reported again
        action = event.action or "unknown"
        retry = action == "stop" and self._retries > 0 and event.operation in self._retry_on
        record = JobIOError(
            job_id=self.id,
            job_type=self.type,
            operation=event.operation or "unknown",
            action="retry" if retry else action,
            count=self.io_errors,
            pause_timeout=self._pause_timeout,
            seconds=time.monotonic() - self._started,
        )
        self._last_io_error = record
        side = _side(self.type, record.operation)
        if retry:
            call_hooks(hooks, "on_io_error", record)
            if self._retried < self._retries:
                self._retry_pending = True  # resumed when QEMU reports it paused
                return
            await self._give_up(
                f"met {self.io_errors} {record.operation} errors in a row and was retried "
                f"{self._retried} times (error policy ignore: the {side} keeps failing), so "
                "blockctl cancelled it"
            )
            return
        if record.action == "stop":
            self._stopped_since = time.monotonic()
        if record.action != "ignore" or self.io_errors == 1:
            call_hooks(hooks, "on_io_error", record)
        if record.action == "ignore" and self.io_errors >= self._ignored_error_limit:
            call_hooks(hooks, "on_io_error", record)
            await self._give_up(
                f"met {self.io_errors} {record.operation} errors that QEMU retried under error "
                f"policy ignore (the {side} keeps failing), so blockctl cancelled it"
            )

    async def _stopped_reason(self) -> str:
        io_status = self._stopped_io_status = await self.io_status()
        last = self._last_io_error
        operation = last.operation if last is not None else "unknown"
        side = _side(self.type, operation, detailed=True)
        what = "no space left" if io_status == "nospace" else "an I/O error"
        return (
            f"paused on a {side} error ({what}; io-status {io_status}) and was not resumed "
            f"within {self._pause_timeout:g} s, so blockctl cancelled it. Fix the cause (free "
            "space on the target, repair the storage) and run it again, or resume it in time "
            "(blockctl jobs VM resume ID)"
        )

    async def _give_up(self, reason: str) -> None:
        """Cancel the job because of its I/O errors; :meth:`_conclude` reports ``reason``."""
        self._gave_up = reason
        _log.warning("blockctl.job.gave_up", job_id=self.id, reason=reason)
        with contextlib.suppress(CommandFailed):  # it may have concluded meanwhile
            await wire.job_cancel(self.session, self.id)

    def _transition(self, status: JobStatus, hooks: Sequence[JobHook]) -> None:
        previous, self.status = self.status, status
        self._transitions.append(status)
        record = JobTransition(
            job_id=self.id,
            job_type=self.type,
            status=status,
            previous=previous,
            seconds=time.monotonic() - self._started,
        )
        call_hooks(hooks, "on_transition", record)

    def _detail(self, event: JobEvent) -> None:
        if event.job_type is not None and self.type is None:
            self.type = event.job_type
        if event.speed is not None:
            self.speed = event.speed or None
        if event.kind in (JobEventKind.COMPLETED, JobEventKind.CANCELLED):
            self._final_event = event
            self._cancelled_event = event.kind is JobEventKind.CANCELLED

    async def _conclude(self, info: JobInfo | None) -> None:
        """Read the outcome (``query-jobs`` first, the final event as a fallback), dismiss,
        and record the result or the error."""
        event = self._final_event
        if info is None and event is None:
            self._error = self._vanished()
            return
        error = info.error if info is not None else None
        if error is None and event is not None:
            error = event.error
        offset: int | None = None
        length: int | None = None
        if info is not None:
            offset, length = info.current_progress, info.total_progress
        elif event is not None:
            offset, length = event.offset, event.length
        if info is not None and self.type is None:
            self.type = info.type
        if not self._dismissed:
            try:
                await wire.job_dismiss(self.session, self.id)
            except CommandFailed:
                # Another client dismissed it between our query-jobs and job-dismiss (or
                # before: info is None). Its outcome is what QEMU reported.
                if info is not None and event is None:
                    raise
            self._dismissed = True

        def failure(cls: type[JobError], message: str) -> JobError:
            return cls(
                message,
                job_id=self.id,
                job_type=self.type,
                target=self.target,
                status=JobStatus.CONCLUDED.value,
                error=error,
                offset=offset,
                length=length,
            )

        what = f"{self.type or 'job'} job {self.id}{self._on()}"
        cancelled = self._cancelled_event or (self._cancel_requested and error is not None)
        if self._gave_up is not None and (cancelled or error is not None):
            last = self._last_io_error
            # Given up because it stayed paused on an error (its io-status was read then):
            # also for an adopted job whose BLOCK_JOB_ERROR came before we listened.
            stopped = self._stopped_io_status is not None
            failed = failure(
                JobStoppedOnError if stopped else JobFailed,
                f"{what} {self._gave_up} (at {offset} of {length})",
            )
            if isinstance(failed, JobStoppedOnError):
                failed.operation = last.operation if last is not None else None
                failed.io_status = self._stopped_io_status
            self._error = failed
        elif cancelled and not self._cancel_requested:
            detail = f": {error}" if error else ""
            self._error = failure(
                JobCancelledByOther,
                f"{what} was cancelled by another client at {_percent(offset, length)}{detail}",
            )
        elif cancelled:
            detail = f": {error}" if error else ""
            self._error = failure(
                JobCancelled, f"{what} was cancelled at {offset} of {length}{detail}"
            )
        elif error is not None:
            self._error = failure(JobFailed, f"{what} failed at {offset} of {length}: {error}")
        elif offset is None or length is None or offset != length:
            self._error = failure(
                JobFailed,
                f"{what} concluded without an error but copied only {offset} of {length}; "
                "it is not counted as done",
            )
        else:
            self._result = JobResult(
                job_id=self.id,
                job_type=self.type,
                target=self.target,
                transitions=self.transitions,
                offset=offset,
                length=length,
                seconds=time.monotonic() - self._started,
                completed_on_ready=self._completing,
            )

    async def _sample(self, hooks: Sequence[JobHook], interval: float) -> None:
        """Progress for display: ``query-jobs`` every ``interval`` s. Never decides anything."""
        last: tuple[float, int] | None = None
        rate: float | None = None
        wake = anyio.Event()  # never set: the task group's cancellation ends this loop
        while True:
            try:
                info = await self.info()
            except BlockctlError:
                return  # the main loop reports what went wrong
            if info is None or info.status in JOB_FINAL:
                return
            now = time.monotonic()
            if last is not None and now > last[0]:
                current = (info.current_progress - last[1]) / (now - last[0])
                rate = current if rate is None else 0.5 * rate + 0.5 * current
            last = (now, info.current_progress)
            remaining = max(info.total_progress - info.current_progress, 0)
            eta = remaining / rate if rate else None
            record = JobProgress(
                job_id=self.id,
                job_type=info.type,
                status=info.status,
                done=info.current_progress,
                total=info.total_progress,
                rate=rate,
                eta=eta,
                seconds=now - self._started,
            )
            call_hooks(hooks, "on_progress", record)
            with anyio.move_on_after(interval):
                await wake.wait()

    async def _abandon(self, hooks: Sequence[JobHook], timeout: float) -> None:
        """Cancel a job its owner left unfinished, drive it to the end and dismiss it."""
        if self.done or self.session.lost or self.status is JobStatus.NULL:
            return
        _log.warning("blockctl.job.abandoned", job_id=self.id, status=str(self.status))
        if self.status is not JobStatus.CONCLUDED:
            with contextlib.suppress(CommandFailed):  # it may have concluded meanwhile
                await self.cancel()
        try:
            await self.wait(complete_on_ready=False, deadline=timeout, hooks=hooks)
        except BlockctlError as exc:
            _log.info("blockctl.job.abandoned_outcome", job_id=self.id, outcome=str(exc))


def _percent(offset: int | None, length: int | None) -> str:
    """``37 % (1234 of 3333 bytes)``, or the raw counters when the length is unknown."""
    if offset is None or not length:
        return f"{offset} of {length}"
    return f"{100 * offset // length} % ({offset} of {length} bytes)"


def _side(job_type: str | None, operation: str, *, detailed: bool = False) -> str:
    """Which side failed, in words. A stream job reports every error as a read, including
    a failed copy-on-read write into the active layer (measured: QEMU 7.2 and 10.0)."""
    if job_type == "stream":
        return "source or target" if not detailed else "source read or target write"
    if operation == "read":
        return "source read" if detailed else "source"
    return "target write" if detailed else "target"


# Section: starting and adopting


@contextlib.asynccontextmanager
async def start_job(
    session: QMPSession,
    kind: str,
    start: Callable[[str], Awaitable[None]],
    *,
    job_type: str | None = None,
    target: str | None = None,
    auto_finalize: bool = True,
    speed: int | None = None,
    hooks: Sequence[JobHook] = DEFAULT_HOOKS,
    cleanup_timeout: float = 30.0,
    job_id: str | None = None,
) -> AsyncIterator[Job]:
    """Register the job listener, then ``await start(job_id)`` (the QMP command that creates
    the job, with ``auto-dismiss: false``; the ``wire`` job starters do that), then yield
    the :class:`Job`.

    ``kind`` names the job id (``bc-<kind>-…``) and, when it is a QEMU job type (``backup``,
    ``commit``, ``stream``, ``mirror``, …), the job's type unless ``job_type`` says otherwise
    (the type matters before QEMU reports it: a commit that never gets READY is
    :class:`~blockctl.errors.JobNeverReady`). ``auto_finalize`` and ``speed`` must be what
    ``start`` passes to QEMU. If the block exits while the job is unfinished (an exception,
    a deadline), the job is cancelled, driven to its end and dismissed (shielded, at most
    ``cleanup_timeout`` s), so no job is left behind. ``job_id``: the id to give the job
    (one blockctl derived, ``bc-<kind>-…``, so that a retry finds the job again; default a
    fresh one).
    """
    if job_id is None:
        job_id = new_job_id(kind)
    elif not job_id.startswith(f"bc-{kind}-"):
        raise ValueError(f"job id {job_id!r} is not blockctl's bc-{kind}-…")
    # wire.block_stream's options: finalized here, dismissed by QEMU (QEMU issue #3149).
    streamed = kind == "stream"
    with wire.job_events(session) as stream:
        job = Job(
            session,
            job_id,
            job_type=job_type or (kind if kind in _TYPE_KINDS else None),
            target=target,
            auto_finalize=auto_finalize and not streamed,
            auto_dismiss=streamed,
            speed=speed,
            stream=stream,
        )
        await start(job_id)
        try:
            yield job
        except OperationTimeout as exc:
            # Only a deadline that left the job unfinished is about the job: say what became
            # of it (a job that had already concluded was not cancelled by anyone).
            if not job.done:
                with anyio.CancelScope(shield=True):
                    await job._abandon(hooks, cleanup_timeout)
                _after_abandon(exc, job)
            raise
        finally:
            if not job.done:
                with anyio.CancelScope(shield=True):
                    await job._abandon(hooks, cleanup_timeout)


def _after_abandon(exc: OperationTimeout, job: Job) -> None:
    """Complete a missed deadline's message with what became of the job (cancelled by
    :func:`start_job`, or not) and the way out."""
    if not job.done:
        tail = (
            f"; blockctl could not cancel job {job.id}: see blockctl jobs VM, and cancel it there"
        )
    elif isinstance(exc, JobNeverReady):
        tail = (
            f"; blockctl cancelled job {job.id} (nothing is left running): run the operation "
            "again with a higher speed limit or none (speed= / --speed), or a longer deadline "
            "(deadline= / --timeout)"
        )
    else:
        tail = (
            f"; blockctl cancelled job {job.id} (nothing is left running): run the operation "
            "again with a longer deadline (deadline= / --timeout)"
        )
    exc.args = (f"{exc}{tail}", *exc.args[1:])


async def adopt_jobs(
    session: QMPSession, *, hooks: Sequence[JobHook] = DEFAULT_HOOKS, dismiss: bool = True
) -> tuple[Job, ...]:
    """Every job QEMU lists, as handles (after attaching: events are not replayed).

    Concluded jobs are read (``error``, progress) and dismissed here; their handle is
    :attr:`Job.done` with the :attr:`Job.outcome`. The others can be waited for, cancelled, ….
    ``dismiss=False`` leaves concluded jobs to their owner: while other clients are attached,
    one of them may be about to read and dismiss its job (its outcome is only there).
    """
    jobs = []
    for info in await wire.query_jobs(session):
        job = Job(session, info.id, job_type=info.type, auto_finalize=None, status=info.status)
        call_hooks(
            hooks,
            "on_transition",
            JobTransition(
                job_id=info.id, job_type=info.type, status=info.status, previous=None, seconds=0
            ),
        )
        if info.status is JobStatus.CONCLUDED and dismiss:
            await job._conclude(info)
        jobs.append(job)
    return tuple(jobs)
