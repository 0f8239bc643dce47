"""The job state machine against the fake QMP peer: exact transitions, failures, deadlines."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl._jobs import (
    IGNORE_RETRIES,
    Job,
    JobIOError,
    JobProgress,
    JobStatus,
    JobTransition,
    QEMUErrorPolicy,
    adopt_jobs,
    error_policy,
    new_job_id,
    start_job,
)
from blockctl._qmp import wire
from blockctl._qmp.session import QMPSession
from blockctl.errors import (
    CommandFailed,
    ConfigError,
    ConnectionLost,
    JobCancelled,
    JobFailed,
    JobNeverReady,
    JobStoppedOnError,
    OperationTimeout,
)
from blockctl.testing import FakeError, FakeQMP, FakeReply
from blockctl.types import ErrorPolicy

EVENTS = Path(__file__).resolve().parents[2] / "fixtures" / "qmp" / "events"
Ev = tuple[str, Mapping[str, Any]]

C, R, P, RDY = JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.READY
W, PEND, AB = JobStatus.WAITING, JobStatus.PENDING, JobStatus.ABORTING
CONC, NULL = JobStatus.CONCLUDED, JobStatus.NULL

#: What QEMU 7.2 sent for a backup (fixtures/qmp/events/backup-ok.jsonl).
BACKUP_OK = (C, R, P, R, W, PEND, CONC, NULL)
MIB = 1 << 20


def status(job_id: str, value: JobStatus) -> Ev:
    return ("JOB_STATUS_CHANGE", {"id": job_id, "status": value.value})


def block_event(name: str, job_id: str, offset: int, length: int, **extra: object) -> Ev:
    data = {"device": job_id, "type": "backup", "offset": offset, "len": length, "speed": 0}
    return (name, {**data, **extra})


def recorded(name: str) -> list[Ev]:
    """A recorded event sequence; the job id is replaced by the test's."""
    out: list[Ev] = []
    for line in (EVENTS / f"{name}.jsonl").read_text().splitlines():
        msg = json.loads(line)
        if msg["data"].get("status") != "null":  # the fake sends NULL on job-dismiss
            out.append((msg["event"], msg["data"]))
    return out


@dataclass
class FakeJob:
    """One job in the fake QEMU: what it sends on each verb, and its query-jobs entry."""

    job_type: str = "backup"
    on_start: list[Ev] = field(default_factory=list)
    on_complete: list[Ev] = field(default_factory=list)
    on_cancel: list[Ev] = field(default_factory=list)
    on_finalize: list[Ev] = field(default_factory=list)
    on_resume: list[Ev] = field(default_factory=list)
    io_status: str = "ok"
    progress: tuple[int, int] = (32 * MIB, 32 * MIB)
    error: str | None = None
    status: str = "created"
    job_id: str = ""
    polls: int = 0

    def info(self) -> dict[str, Any]:
        self.polls += 1
        entry: dict[str, Any] = {
            "id": self.job_id,
            "type": self.job_type,
            "status": self.status,
            "current-progress": self.progress[0],
            "total-progress": self.progress[1],
        }
        if self.error is not None:
            entry["error"] = self.error
        return entry


class FakeQEMU:
    """A handler that plays one :class:`FakeJob` (events are rewritten to its id)."""

    def __init__(self, job: FakeJob, *, listed: list[dict[str, Any]] | None = None) -> None:
        self.job = job
        self.listed = listed  # query-jobs for adopt tests
        self.dismissed: list[str] = []

    def events(self, events: list[Ev]) -> list[Ev]:
        out: list[Ev] = []
        for name, data in events:
            key = "id" if name == "JOB_STATUS_CHANGE" else "device"
            out.append((name, {**data, key: self.job.job_id}))
            if name == "JOB_STATUS_CHANGE":
                self.job.status = str(data["status"])
        return out

    def __call__(self, command: str, args: Mapping[str, Any]) -> object:
        job = self.job
        if command in ("blockdev-backup", "block-commit"):
            assert args["auto-dismiss"] is False
            job.job_id = str(args["job-id"])
            return FakeReply({}, after=self.events(job.on_start))
        if command == "query-jobs":
            if self.listed is not None:
                return self.listed
            return [] if job.status == "null" or not job.job_id else [job.info()]
        if command == "job-dismiss":
            if self.listed is not None:
                self.dismissed.append(str(args["id"]))
                self.listed = [j for j in self.listed if j["id"] != args["id"]]
                return {}
            if job.status != "concluded":
                raise FakeError("GenericError", f"Job '{args['id']}' in state '{job.status}'")
            return FakeReply({}, before=self.events([status(job.job_id, NULL)]))
        verbs = {
            "job-complete": job.on_complete,
            "job-cancel": job.on_cancel,
            "job-finalize": job.on_finalize,
            "job-resume": job.on_resume,
        }
        if command in verbs:
            return FakeReply({}, after=self.events(verbs[command]))
        if command == "query-block-jobs":
            listed = job.job_id and job.status not in ("null", "concluded")
            return [{"device": job.job_id, "io-status": job.io_status}] if listed else []
        if command in ("block-job-set-speed", "job-pause"):
            return {}
        raise FakeError("CommandNotFound", f"The command {command} has not been found")


@contextlib.asynccontextmanager
async def qemu(fake_qemu: FakeQEMU) -> AsyncIterator[tuple[FakeQMP, QMPSession]]:
    async with (
        FakeQMP(fake_qemu).serving() as fake,
        QMPSession.connect(fake.client_socket, label="fake") as session,
    ):
        yield fake, session


class Recorder:
    def __init__(self) -> None:
        self.transitions: list[JobTransition] = []
        self.progress: list[JobProgress] = []
        self.io_errors: list[JobIOError] = []
        self.got_io_error = anyio.Event()

    def on_io_error(self, error: JobIOError) -> None:
        self.io_errors.append(error)
        self.got_io_error.set()

    def on_transition(self, transition: JobTransition) -> None:
        self.transitions.append(transition)

    def on_progress(self, progress: JobProgress) -> None:
        self.progress.append(progress)


def backup_start(session: QMPSession) -> Any:
    async def start(job_id: str) -> None:
        await wire.blockdev_backup(session, job_id=job_id, device="drv0", target="bk")

    return start


def commands(fake: FakeQMP) -> list[str]:
    return [c for c, _ in fake.received if c != "query-jobs"]


def ok_backup() -> FakeJob:
    return FakeJob(
        on_start=[
            *(status("", s) for s in (C, R, P, R, W, PEND)),
            block_event("BLOCK_JOB_COMPLETED", "", 32 * MIB, 32 * MIB),
            status("", CONC),
        ]
    )


async def test_backup_recorded_from_qemu_succeeds_with_the_exact_transitions() -> None:
    job = FakeJob(on_start=recorded("backup-ok"))
    async with qemu(FakeQEMU(job)) as (fake, session):
        hook = Recorder()
        async with start_job(session, "backup", backup_start(session), target="drv0") as handle:
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[hook])
        assert result.transitions == BACKUP_OK
        assert [t.status for t in hook.transitions] == list(BACKUP_OK)
        assert result.offset == result.length == 32 * MIB
        assert result.job_type == "backup" and not result.completed_on_ready
        assert commands(fake) == ["blockdev-backup", "job-dismiss"]
        assert handle.done and handle.outcome is result


async def test_job_ids_are_generated_and_unique() -> None:
    ids = {new_job_id("backup") for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("bc-backup-") for i in ids)
    with pytest.raises(ValueError, match="alphanumeric"):
        new_job_id("a,b")


async def test_error_recorded_from_qemu_raises_job_failed_and_dismisses() -> None:
    job = FakeJob(on_start=recorded("backup-eio"), error="Input/output error")
    job.progress = (29360128, 33554432)
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "backup", backup_start(session), target="drv0") as handle:
            with pytest.raises(JobFailed) as info:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        err = info.value
        assert err.error == "Input/output error" and err.job_id == handle.id
        assert err.job_type == "backup" and err.target == "drv0"
        assert (err.offset, err.length) == (29360128, 33554432)
        assert "Input/output error" in str(err) and handle.id in str(err)
        assert handle.transitions == (C, R, P, R, AB, CONC, NULL)
        assert commands(fake) == ["blockdev-backup", "job-dismiss"]


async def test_error_only_in_the_event_still_fails() -> None:
    """query-jobs has no error (say, another QEMU version), the final event has one."""
    job = ok_backup()
    job.on_start[-2] = block_event("BLOCK_JOB_COMPLETED", "", 8, 32 * MIB, error="No space")
    async with (
        qemu(FakeQEMU(job)) as (_fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        with pytest.raises(JobFailed, match="No space"):
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[])


async def test_concluded_without_error_but_short_is_a_failure() -> None:
    job = ok_backup()
    job.progress = (31 * MIB, 32 * MIB)
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "backup", backup_start(session)) as handle:
            with pytest.raises(JobFailed, match="copied only") as info:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert info.value.error is None
        assert "job-dismiss" in commands(fake)


async def test_active_commit_ready_then_complete_pivots() -> None:
    job = FakeJob(
        job_type="commit",
        on_start=[status("", C), status("", R), status("", RDY)],
        on_complete=[
            status("", W),
            status("", PEND),
            block_event("BLOCK_JOB_COMPLETED", "", 4 * MIB, 4 * MIB, type="commit"),
            status("", CONC),
        ],
        progress=(4 * MIB, 4 * MIB),
    )

    async def start(job_id: str) -> None:
        await wire.block_commit(session, job_id=job_id, device="drv0", base_node="drv0-b2")

    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "commit", start) as handle:
            result = await handle.wait(complete_on_ready=True, deadline=10, hooks=[])
        assert result.transitions == (C, R, RDY, W, PEND, CONC, NULL)
        assert result.completed_on_ready
        assert commands(fake) == ["block-commit", "job-complete", "job-dismiss"]


async def test_wait_ready_then_complete_in_two_steps() -> None:
    job = FakeJob(
        job_type="commit",
        on_start=[status("", C), status("", R), status("", RDY)],
        on_complete=[status("", W), status("", PEND), status("", CONC)],
    )
    async with qemu(FakeQEMU(job)) as (fake, session):

        async def start(job_id: str) -> None:
            await wire.block_commit(session, job_id=job_id, device="drv0")

        async with start_job(session, "commit", start) as handle:
            await handle.wait_ready(deadline=10, hooks=[])
            assert handle.status is RDY
            await handle.complete()
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert result.transitions == (C, R, RDY, W, PEND, CONC, NULL)
        assert commands(fake) == ["block-commit", "job-complete", "job-dismiss"]


async def test_pending_is_finalized_when_auto_finalize_is_off() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R), status("", W), status("", PEND)],
        on_finalize=[status("", CONC)],
    )
    async with qemu(FakeQEMU(job)) as (fake, session):

        async def start(job_id: str) -> None:
            await wire.blockdev_backup(
                session, job_id=job_id, device="drv0", target="bk", auto_finalize=False
            )

        async with start_job(session, "backup", start, auto_finalize=False) as handle:
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert result.transitions == (C, R, W, PEND, CONC, NULL)
        assert commands(fake) == ["blockdev-backup", "job-finalize", "job-dismiss"]
        assert fake.received[0][1]["auto-finalize"] is False


async def test_cancel_raises_job_cancelled_and_dismisses() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R)],
        on_cancel=[
            status("", AB),
            block_event("BLOCK_JOB_CANCELLED", "", 3 * MIB, 32 * MIB),
            status("", CONC),
        ],
        progress=(3 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "backup", backup_start(session)) as handle:
            await handle.cancel()
            job.error = "Operation canceled"
            with pytest.raises(JobCancelled) as info:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert info.value.offset == 3 * MIB and handle.transitions == (C, R, AB, CONC, NULL)
        assert commands(fake) == ["blockdev-backup", "job-cancel", "job-dismiss"]


async def test_deadline_raises_and_leaving_the_block_cancels_and_dismisses() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R)],
        on_cancel=[status("", AB), status("", CONC)],
        error="Operation canceled",
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        with anyio.fail_after(10):
            with pytest.raises(OperationTimeout, match="cancelled job bc-backup-") as info:
                async with start_job(session, "backup", backup_start(session)) as handle:
                    await handle.wait(complete_on_ready=False, deadline=0.3, hooks=[])
        assert not isinstance(info.value, JobNeverReady)
        assert "still running" not in str(info.value)  # it was cancelled on the way out
        assert info.value.seconds == 0.3
        assert commands(fake) == ["blockdev-backup", "job-cancel", "job-dismiss"]
        assert handle.transitions == (C, R, AB, CONC, NULL)


async def test_leaving_the_block_on_any_error_cancels_and_dismisses() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R)],
        on_cancel=[status("", AB), status("", CONC)],
        error="Operation canceled",
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        with anyio.fail_after(10):
            with pytest.raises(LookupError, match="the caller's own error"):
                async with start_job(session, "backup", backup_start(session)) as handle:
                    raise LookupError("the caller's own error")
        assert commands(fake) == ["blockdev-backup", "job-cancel", "job-dismiss"]
        assert handle.done and handle.transitions == (C, R, AB, CONC, NULL)


async def test_active_commit_that_never_gets_ready_says_why() -> None:
    job = FakeJob(
        job_type="commit",
        on_start=[status("", C), status("", R)],
        on_cancel=[status("", AB), status("", CONC)],
        error="Operation canceled",
    )
    async with qemu(FakeQEMU(job)) as (_fake, session):

        async def start(job_id: str) -> None:
            await wire.block_commit(session, job_id=job_id, device="drv0", speed=MIB)

        with pytest.raises(JobNeverReady, match=r"READY.*1048576 bytes/s") as info:
            async with start_job(session, "commit", start, speed=MIB) as handle:
                await handle.wait(complete_on_ready=True, deadline=0.3, hooks=[])
        assert handle.done  # cleaned up on the way out
        # The message says what happened to the job (cancelled) and the way out in both the
        # library's and the CLI's words; it does not claim the job still runs.
        message = str(info.value)
        assert "blockctl cancelled job bc-commit-" in message
        assert "--speed" in message and "--timeout" in message
        assert "still running" not in message and "set_speed" not in message


async def test_disconnect_mid_job_raises_connection_lost_not_a_hang() -> None:
    job = FakeJob(on_start=[status("", C), status("", R)])
    async with qemu(FakeQEMU(job)) as (fake, session):
        failures: list[BaseException] = []
        with anyio.fail_after(10):
            async with start_job(session, "backup", backup_start(session)) as handle:

                async def wait() -> None:
                    try:
                        await handle.wait(complete_on_ready=False, deadline=30, hooks=[])
                    except ConnectionLost as exc:
                        failures.append(exc)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait)
                    await anyio.sleep(0.1)
                    await fake.close()
        assert len(failures) == 1
        assert "outcome is unknown" in str(failures[0]) and handle.id in str(failures[0])


async def test_progress_hook_gets_samples_with_rate_and_eta() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R)],
        on_cancel=[status("", AB), status("", CONC)],
        progress=(0, 64 * MIB),
        error="Operation canceled",
    )
    original = job.info

    def moving() -> dict[str, Any]:
        job.progress = (min(job.progress[0] + MIB, 64 * MIB), 64 * MIB)
        return original()

    job.info = moving  # type: ignore[method-assign]
    enough = anyio.Event()

    class Counting(Recorder):
        """Stops the wait after three samples, however long they took (no timing)."""

        def on_progress(self, progress: JobProgress) -> None:
            super().on_progress(progress)
            if len(self.progress) >= 3:
                enough.set()

    hook = Counting()
    async with (
        qemu(FakeQEMU(job)) as (_fake, session),
        start_job(session, "backup", backup_start(session), hooks=[]) as handle,
        anyio.create_task_group() as tg,
    ):

        async def stop_after_three() -> None:
            await enough.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(stop_after_three)
        await handle.wait(
            complete_on_ready=False, deadline=3600, hooks=[hook], progress_interval=0.05
        )
        pytest.fail("the job cannot end: it runs until it is cancelled")
    assert len(hook.progress) >= 3
    last = hook.progress[-1]
    assert last.status is R and last.total == 64 * MIB and last.done > hook.progress[0].done
    assert last.rate is not None and last.rate > 0
    assert last.eta is not None and last.eta > 0
    assert [t.status for t in hook.transitions] == [C, R]


async def test_adopt_reports_and_dismisses_concluded_jobs_and_keeps_running_ones() -> None:
    listed = [
        {
            "id": "bc-backup-9-aaaaaa",
            "type": "backup",
            "status": "concluded",
            "current-progress": 5,
            "total-progress": 10,
            "error": "Input/output error",
        },
        {
            "id": "bc-backup-10-bbbbbb",
            "type": "backup",
            "status": "concluded",
            "current-progress": 10,
            "total-progress": 10,
        },
        {
            "id": "bc-commit-11-cccccc",
            "type": "commit",
            "status": "running",
            "current-progress": 1,
            "total-progress": 10,
        },
    ]
    fake_qemu = FakeQEMU(FakeJob(), listed=listed)
    async with qemu(fake_qemu) as (_fake, session):
        failed, ok, running = await adopt_jobs(session, hooks=[])
        assert isinstance(failed.outcome, JobFailed)
        assert failed.outcome.error == "Input/output error"
        assert ok.outcome is not None and not isinstance(ok.outcome, Exception)
        assert ok.outcome.offset == ok.outcome.length == 10
        assert not running.done and running.status is R and running.type == "commit"
        assert fake_qemu.dismissed == ["bc-backup-9-aaaaaa", "bc-backup-10-bbbbbb"]


async def test_adopted_job_that_vanished_is_reported() -> None:
    fake_qemu = FakeQEMU(FakeJob(), listed=[])
    async with qemu(fake_qemu) as (_fake, session):
        job = Job(session, "bc-backup-1-000000", job_type="backup", status=R)
        with pytest.raises(JobFailed, match="no longer listed"):
            await job.wait(complete_on_ready=False, deadline=5, hooks=[])


async def test_failing_start_command_leaves_nothing_to_clean() -> None:
    def handler(command: str, args: Mapping[str, Any]) -> object:
        raise FakeError("GenericError", "Block node is read-only")

    async with (
        FakeQMP(handler).serving() as fake,
        QMPSession.connect(fake.client_socket, label="fake") as session,
    ):
        with pytest.raises(CommandFailed, match="read-only") as info:
            async with start_job(session, "commit", backup_start(session)):
                pytest.fail("the block must not run")
        assert (info.value.command, info.value.error_class) == ("blockdev-backup", "GenericError")
        assert [c for c, _ in fake.received] == ["blockdev-backup"]


# Section: error policies (BLOCK_JOB_ERROR)


def io_error(operation: str, action: str) -> Ev:
    return ("BLOCK_JOB_ERROR", {"device": "", "operation": operation, "action": action})


CANCELLED_AT_8 = [
    status("", AB),
    block_event("BLOCK_JOB_CANCELLED", "", 8 * MIB, 32 * MIB),
    status("", CONC),
]


async def test_stopped_on_error_and_never_resumed_is_cancelled_and_reported() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R), io_error("write", "stop"), status("", P)],
        on_cancel=CANCELLED_AT_8,
        io_status="nospace",
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        hook = Recorder()
        async with start_job(session, "backup", backup_start(session), target="drv0") as handle:
            with pytest.raises(JobStoppedOnError) as info:
                await handle.wait(
                    complete_on_ready=False, deadline=30, hooks=[hook], pause_timeout=0.2
                )
        err = info.value
        assert err.operation == "write" and (err.offset, err.length) == (8 * MIB, 32 * MIB)
        assert err.io_status == "nospace"
        assert "no space left" in str(err) and "resume" in str(err) and handle.id in str(err)
        assert [(e.operation, e.action, e.count) for e in hook.io_errors] == [("write", "stop", 1)]
        assert commands(fake) == [
            "blockdev-backup",
            "query-block-jobs",
            "job-cancel",
            "job-dismiss",
        ]


async def test_stopped_on_error_then_resumed_completes() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R), io_error("write", "stop"), status("", P)],
        on_resume=[
            status("", R),
            status("", W),
            status("", PEND),
            block_event("BLOCK_JOB_COMPLETED", "", 32 * MIB, 32 * MIB),
            status("", CONC),
        ],
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        hook = Recorder()
        async with (
            start_job(session, "backup", backup_start(session)) as handle,
            anyio.create_task_group() as tg,
        ):

            async def operator() -> None:  # someone frees space, then resumes the job
                await hook.got_io_error.wait()
                await handle.resume()

            tg.start_soon(operator)
            # pause_timeout is far away: the resume, not a timer, ends the pause.
            result = await handle.wait(
                complete_on_ready=False, deadline=30, hooks=[hook], pause_timeout=300
            )
        assert result.offset == result.length and handle.io_errors == 1
        assert "job-cancel" not in commands(fake)


async def test_ignored_errors_are_bounded_then_the_job_is_cancelled() -> None:
    flood = [io_error("read", "ignore") for _ in range(200)]
    job = FakeJob(
        on_start=[status("", C), status("", R), *flood],
        on_cancel=CANCELLED_AT_8,
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        hook = Recorder()
        async with start_job(session, "backup", backup_start(session)) as handle:
            with pytest.raises(JobFailed) as info:
                await handle.wait(
                    complete_on_ready=False, deadline=30, hooks=[hook], ignored_error_limit=10
                )
        assert not isinstance(info.value, JobStoppedOnError)
        assert "retried under error policy ignore" in str(info.value)
        assert "source keeps failing" in str(info.value)
        assert [e.count for e in hook.io_errors] == [1, 10]  # the first, and the last straw
        assert commands(fake).count("job-cancel") == 1
        assert handle.io_errors == 200  # the retries already queued are counted, not reported


async def test_a_transient_error_retried_under_ignore_still_succeeds() -> None:
    job = ok_backup()
    job.on_start.insert(2, io_error("read", "ignore"))
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "backup", backup_start(session)) as handle:
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert result.offset == result.length and handle.io_errors == 1
        assert commands(fake) == ["blockdev-backup", "job-dismiss"]


async def test_ignore_policy_resumes_a_stopped_job_a_bounded_number_of_times() -> None:
    """blockctl's ``ignore``: QEMU ``stop`` + resume at once, ``retries`` times, then cancel."""
    stop = [io_error("read", "stop"), status("", P)]
    job = FakeJob(
        on_start=[status("", C), status("", R), *stop],
        on_resume=[status("", R), *stop],  # the fault persists: every retry fails again
        on_cancel=CANCELLED_AT_8,
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        hook = Recorder()
        async with start_job(session, "backup", backup_start(session)) as handle:
            with pytest.raises(JobFailed) as info:
                await handle.wait(complete_on_ready=False, deadline=30, hooks=[hook], retries=3)
        assert not isinstance(info.value, JobStoppedOnError)
        assert "retried 3 times" in str(info.value) and "ignore" in str(info.value)
        assert commands(fake).count("job-resume") == 3
        assert commands(fake)[-2:] == ["job-cancel", "job-dismiss"]
        assert [e.action for e in hook.io_errors] == ["retry"] * 4


def test_ignore_is_sent_to_qemu_as_stop_with_retries() -> None:
    assert error_policy("ignore") == QEMUErrorPolicy("stop", IGNORE_RETRIES)
    assert IGNORE_RETRIES == 16  # what the README promises: "16 times at most"
    assert error_policy(ErrorPolicy.REPORT) == QEMUErrorPolicy(None, 0)
    assert error_policy("enospc") == QEMUErrorPolicy("enospc", 0)
    with pytest.raises(ConfigError, match="on_error"):
        error_policy("sometimes")


async def test_retries_apply_only_to_the_side_whose_policy_is_ignore() -> None:
    """A backup with ``ignore`` on the source and ``stop`` on the target: a target error waits
    for a resume (and is cancelled after pause_timeout); it is not retried."""
    job = FakeJob(
        on_start=[status("", C), status("", R), io_error("write", "stop"), status("", P)],
        on_cancel=CANCELLED_AT_8,
        io_status="failed",
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "backup", backup_start(session)) as handle:
            with pytest.raises(JobStoppedOnError):
                await handle.wait(
                    complete_on_ready=False,
                    deadline=30,
                    hooks=[],
                    retries=5,
                    retry_on=frozenset({"read"}),
                    pause_timeout=0.2,
                )
        assert "job-resume" not in commands(fake)


async def test_an_adopted_job_already_ready_is_completed_not_waited_for() -> None:
    """Recovery adopts an active commit that turned READY between its query-jobs and its
    wait: READY's event is gone, so the resync must act on it (it waited out its deadline)."""
    job = FakeJob(
        job_type="commit",
        status="ready",
        job_id="bc-commit-7-abcdef",
        on_complete=[
            status("", W),
            status("", PEND),
            block_event("BLOCK_JOB_COMPLETED", "", 4 * MIB, 4 * MIB, type="commit"),
            status("", CONC),
        ],
        progress=(4 * MIB, 4 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        adopted = Job(session, job.job_id, job_type="commit", status=R)
        result = await adopted.wait(complete_on_ready=True, deadline=5, hooks=[])
        assert result.completed_on_ready
        assert commands(fake).count("job-complete") == 1
        # Waiting only for READY returns at once too.
        again = FakeJob(job_type="commit", status="ready", job_id="bc-commit-8-abcdef")
    async with qemu(FakeQEMU(again)) as (fake, session):
        adopted = Job(session, again.job_id, job_type="commit", status=R)
        await adopted.wait_ready(deadline=5, hooks=[])
        assert "job-complete" not in commands(fake)
