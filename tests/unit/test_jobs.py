"""The job state machine against the fake QMP peer: exact transitions, failures, deadlines."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from blockctl._jobs import (
    IGNORE_RETRIES,
    Job,
    JobEnded,
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
    JobCancelledByOther,
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
#: A job id the fake sends events of unchanged (another job's).
OTHER_JOB = "bc-backup-99-ffffff"


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
            if data.get(key) == OTHER_JOB:  # another job's event: sent as it is
                out.append((name, data))
                continue
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
        if command == "block-stream":
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
            if args["id"] != job.job_id:
                raise FakeError("GenericError", f"Job ID '{args['id']}' not found")
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


def stream_start(session: QMPSession) -> Any:
    async def start(job_id: str) -> None:
        await wire.block_stream(session, job_id=job_id, device="drv0")

    return start


# QEMU dismisses an auto-dismissed job in the step that concludes it: every event at once.
STREAM_END = [
    block_event("BLOCK_JOB_COMPLETED", "", 4 * MIB, 4 * MIB, type="stream"),
    status("", CONC),
    status("", NULL),
]


async def test_a_stream_is_finalized_at_pending_and_dismissed_by_qemu() -> None:
    """QEMU crashes on a graph read while a stream is concluded and not dismissed (issue
    #3149): blockctl starts it with auto-finalize off and auto-dismiss on, finalizes it at
    PENDING, reads its outcome from the final event and sends no job-dismiss."""
    job = FakeJob(
        job_type="stream",
        on_start=[status("", C), status("", R), status("", W), status("", PEND)],
        on_finalize=STREAM_END,
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "stream", stream_start(session)) as handle:
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert result.transitions == (C, R, W, PEND, CONC, NULL)
        assert (result.offset, result.length) == (4 * MIB, 4 * MIB)
        assert commands(fake) == ["block-stream", "job-finalize"]
        sent = fake.received[0][1]
        assert (sent["auto-finalize"], sent["auto-dismiss"]) == (False, True)


async def test_a_stream_still_listed_at_its_conclusion_is_dismissed() -> None:
    """A stream QEMU did not dismiss by itself (not started by wire.block_stream): still
    listed at CONCLUDED, it is read and dismissed as any other job, not waited for."""
    job = FakeJob(
        job_type="stream",
        on_start=[status("", C), status("", R), status("", W), status("", PEND)],
        on_finalize=[STREAM_END[0], status("", CONC)],
        progress=(4 * MIB, 4 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "stream", stream_start(session)) as handle:
            result = await handle.wait(complete_on_ready=False, deadline=5, hooks=[])
        assert result.transitions == (C, R, W, PEND, CONC, NULL)
        assert commands(fake) == ["block-stream", "job-finalize", "job-dismiss"]


async def test_a_failed_stream_gone_with_its_conclusion_reports_the_error() -> None:
    job = FakeJob(
        job_type="stream",
        on_start=[
            status("", C),
            status("", R),
            status("", AB),
            block_event(
                "BLOCK_JOB_COMPLETED", "", MIB, 4 * MIB, type="stream", error="Input/output error"
            ),
            status("", CONC),
            status("", NULL),
        ],
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        with pytest.raises(JobFailed) as failed:
            async with start_job(session, "stream", stream_start(session)) as handle:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert "failed at 1048576 of 4194304: Input/output error" in str(failed.value)
        assert commands(fake) == ["block-stream"]


async def test_an_adopted_stream_found_pending_is_finalized_once_listened_to() -> None:
    """A dead controller's stream waits in PENDING: the adopter finalizes it only once its
    listener is registered, since the job is gone the moment it concludes."""
    job = FakeJob(
        job_type="stream", status="pending", job_id="bc-stream-1-abcdef", on_finalize=STREAM_END
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        adopted = Job(session, job.job_id, job_type=None, auto_finalize=None, status=PEND)
        result = await adopted.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert (result.offset, result.length) == (4 * MIB, 4 * MIB)
        assert commands(fake) == ["job-finalize", "job-dismiss"]  # refused: gone, harmless


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
        assert str(failures[0]).endswith(
            "; the job's outcome is unknown (if QEMU still runs, attach again: adopt_jobs() "
            "reports it)"
        )


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
        assert ok.outcome.transitions == (CONC,)  # all blockctl saw of it
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


# Section: what a job's end says (the whole message, every field)


async def test_a_job_cancelled_by_another_client_says_so_whole() -> None:
    job = FakeJob(
        on_start=[
            status("", C),
            status("", R),
            status("", AB),  # nobody in this process sent job-cancel
            block_event("BLOCK_JOB_CANCELLED", "", 3 * MIB, 32 * MIB),
            status("", CONC),
        ],
        progress=(3 * MIB, 32 * MIB),
        error="Operation canceled",
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "backup", backup_start(session), target="drv0") as handle:
            with pytest.raises(JobCancelledByOther) as info:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        err = info.value
        assert str(err) == (
            f"backup job {handle.id} on drv0 was cancelled by another client at 9 % "
            "(3145728 of 33554432 bytes): Operation canceled"
        )
        assert (err.job_id, err.job_type, err.target) == (handle.id, "backup", "drv0")
        assert (err.status, err.error, err.offset, err.length) == (
            "concluded",
            "Operation canceled",
            3 * MIB,
            32 * MIB,
        )
        assert handle.outcome is err and handle.transitions == (C, R, AB, CONC, NULL)
        assert commands(fake) == ["blockdev-backup", "job-dismiss"]


async def test_our_cancel_failure_and_short_copy_say_so_whole() -> None:
    cancelled = FakeJob(
        on_start=[status("", C), status("", R)],
        on_cancel=[
            status("", AB),
            block_event("BLOCK_JOB_CANCELLED", "", 3 * MIB, 32 * MIB),
            status("", CONC),
        ],
        progress=(3 * MIB, 32 * MIB),
        error="Operation canceled",
    )
    async with (
        qemu(FakeQEMU(cancelled)) as (_fake, session),
        start_job(session, "backup", backup_start(session), target="drv0") as handle,
    ):
        await handle.cancel()
        with pytest.raises(JobCancelled) as info:
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert type(info.value) is JobCancelled
    assert str(info.value) == (
        f"backup job {handle.id} on drv0 was cancelled at 3145728 of 33554432: Operation canceled"
    )
    assert (info.value.error, info.value.status) == ("Operation canceled", "concluded")

    failed = FakeJob(on_start=recorded("backup-eio"), error="Input/output error")
    failed.progress = (29360128, 33554432)
    async with (
        qemu(FakeQEMU(failed)) as (_fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        with pytest.raises(JobFailed) as failure:
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert type(failure.value) is JobFailed
    assert str(failure.value) == (
        f"backup job {handle.id} failed at 29360128 of 33554432: Input/output error"
    )

    short = ok_backup()
    short.progress = (31 * MIB, 32 * MIB)
    async with (
        qemu(FakeQEMU(short)) as (_fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        with pytest.raises(JobFailed) as failure:
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert str(failure.value) == (
        f"backup job {handle.id} concluded without an error but copied only 32505856 of "
        "33554432; it is not counted as done"
    )
    assert (failure.value.error, failure.value.offset, failure.value.length) == (
        None,
        31 * MIB,
        32 * MIB,
    )


class Ends(Recorder):
    """Also records the optional hooks: ``on_end``."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[JobEnded] = []

    def on_end(self, ended: JobEnded) -> None:
        self.ended.append(ended)


async def test_hooks_get_whole_records_of_transitions_and_the_end() -> None:
    async with qemu(FakeQEMU(ok_backup())) as (_fake, session):
        hook = Ends()
        began = time.monotonic()
        async with start_job(session, "backup", backup_start(session), target="drv0") as handle:
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[hook])
        took = time.monotonic() - began
    expected = list(zip((None, *BACKUP_OK[:-1]), BACKUP_OK, strict=True))
    assert [(t.job_id, t.job_type, t.previous, t.status) for t in hook.transitions] == [
        (handle.id, "backup", previous, now) for previous, now in expected
    ]
    seconds = [t.seconds for t in hook.transitions]
    assert seconds == sorted(seconds) and seconds[0] >= 0 and seconds[-1] <= took
    assert hook.ended == [JobEnded(job_id=handle.id, job_type="backup", error=None)]
    assert (result.job_id, result.target, result.job_type) == (handle.id, "drv0", "backup")
    assert 0 <= result.seconds <= took

    failed = FakeJob(on_start=recorded("backup-eio"), error="Input/output error")
    async with qemu(FakeQEMU(failed)) as (_fake, session):
        hook = Ends()
        async with start_job(session, "backup", backup_start(session)) as handle:
            with pytest.raises(JobFailed) as info:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[hook])
    assert hook.ended == [JobEnded(job_id=handle.id, job_type="backup", error=info.value)]


async def test_waiting_again_for_a_finished_job_gives_its_outcome_at_once() -> None:
    job = FakeJob(status="running", job_id="bc-backup-5-abcdef")
    async with qemu(FakeQEMU(job)) as (fake, session):
        adopted = Job(session, job.job_id, job_type="backup", status=R)
        job.on_finalize = []
        job.status = "concluded"  # it concluded before anyone listened
        result = await adopted.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert (result.offset, result.length) == (32 * MIB, 32 * MIB)
        assert adopted.transitions == (R, CONC, NULL)
        sent = len(fake.received)
        assert await adopted.wait(complete_on_ready=False, deadline=10, hooks=[]) == result
        assert len(fake.received) == sent  # nothing asked of QEMU again


async def test_an_adopted_job_paused_on_an_error_before_we_listened_is_cancelled() -> None:
    job = FakeJob(
        status="paused",
        job_id="bc-backup-6-abcdef",
        io_status="failed",
        on_cancel=CANCELLED_AT_8,
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        adopted = Job(session, job.job_id, job_type="backup", status=R)
        with pytest.raises(JobStoppedOnError) as info:
            await adopted.wait(complete_on_ready=False, deadline=30, hooks=[], pause_timeout=0)
        # Stopped on an error like a job we started, the same class, its io-status read;
        # which side failed is not known (its BLOCK_JOB_ERROR came before we listened).
        assert (info.value.io_status, info.value.operation) == ("failed", None)
        assert "(an I/O error; io-status failed) and was not resumed within 0 s" in str(info.value)
        assert "blockctl cancelled it" in str(info.value)
        assert commands(fake) == [
            "query-block-jobs",
            "query-block-jobs",
            "job-cancel",
            "job-dismiss",
        ]


async def test_an_adopted_job_paused_by_someone_is_not_cancelled() -> None:
    """Paused with io-status ok (``blockctl jobs VM pause``): no I/O error, nothing to give up."""
    job = FakeJob(status="paused", job_id="bc-backup-7-abcdef", on_cancel=CANCELLED_AT_8)
    async with qemu(FakeQEMU(job)) as (fake, session):
        adopted = Job(session, job.job_id, job_type="backup", status=R)
        with pytest.raises(OperationTimeout) as info:
            await adopted.wait(complete_on_ready=False, deadline=0.5, hooks=[], pause_timeout=0)
        assert "status paused" in str(info.value)
        assert commands(fake) == ["query-block-jobs"]


async def test_an_adopted_running_job_is_asked_nothing_but_its_listing() -> None:
    job = FakeJob(
        job_type="commit",
        status="running",
        job_id="bc-commit-8-abcdef",
        on_cancel=[status("", AB), status("", CONC)],
        error="Operation canceled",
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        adopted = Job(session, job.job_id, job_type=None, status=R)
        with pytest.raises(OperationTimeout) as info:
            await adopted.wait(complete_on_ready=False, deadline=0.3, hooks=[])
        assert type(info.value) is OperationTimeout
        assert str(info.value) == (
            f"job {job.job_id} (job) did not finish within 0.3 s: status running; the job is "
            f"still running (wait for it, or cancel it: blockctl jobs VM cancel {job.job_id})"
        )
        assert commands(fake) == []
        # Waiting for READY: a commit that is not READY at the deadline says why, and that
        # it still runs (nobody cancelled it).
        adopted = Job(session, job.job_id, job_type="commit", status=R, speed=MIB)
        with pytest.raises(JobNeverReady) as never:
            await adopted.wait_ready(deadline=0.3, hooks=[])
        assert str(never.value) == (
            f"job {job.job_id} (commit) did not finish within 0.3 s: never became READY "
            "(status running); the guest may write faster than 1048576 bytes/s; the job is "
            f"still running: raise its speed limit (Job.set_speed(0), blockctl jobs VM speed "
            f"{job.job_id} 0) or cancel it"
        )
        assert commands(fake) == []


async def test_an_adopted_job_learns_its_type_from_qemu() -> None:
    job = FakeJob(status="concluded", job_id="bc-backup-9-abcdef")
    async with qemu(FakeQEMU(job)) as (_fake, session):
        adopted = Job(session, job.job_id, job_type=None, status=R)
        result = await adopted.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert result.job_type == "backup" and adopted.type == "backup"


class DismissedElsewhere(FakeQEMU):
    """Another client dismisses the job as soon as it concludes: QEMU announces NULL to every
    monitor, and our job-dismiss finds no job."""

    def __call__(self, command: str, args: Mapping[str, Any]) -> object:
        if command == "query-jobs" and self.job.status == "concluded":
            return FakeReply([], before=self.events([status(self.job.job_id, NULL)]))
        if command == "job-dismiss":
            raise FakeError("GenericError", f"Job '{args['id']}' not found")
        return super().__call__(command, args)


async def test_a_job_dismissed_by_another_client_keeps_the_outcome_of_its_event() -> None:
    job = FakeJob(
        on_start=[
            status("", C),
            status("", R),
            status("", W),
            status("", PEND),
            block_event("BLOCK_JOB_COMPLETED", "", 7 * MIB, 7 * MIB, type="commit", speed=2 * MIB),
            status("", CONC),
        ],
        progress=(1, 2),  # query-jobs no longer lists it: never read
    )
    # A job whose type blockctl did not know: the event says it.
    async with (
        qemu(DismissedElsewhere(job)) as (_fake, session),
        start_job(session, "snapshot", backup_start(session), speed=MIB) as handle,
    ):
        result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert (result.offset, result.length, result.job_type) == (7 * MIB, 7 * MIB, "commit")
    assert handle.speed == 2 * MIB  # the speed QEMU reported last
    assert handle.transitions == (C, R, W, PEND, CONC, NULL)


async def test_a_speed_limit_removed_by_another_client_is_seen() -> None:
    job = ok_backup()
    job.on_start[-2] = block_event("BLOCK_JOB_COMPLETED", "", 32 * MIB, 32 * MIB, speed=0)
    async with (
        qemu(FakeQEMU(job)) as (_fake, session),
        start_job(session, "backup", backup_start(session), speed=MIB) as handle,
    ):
        await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert handle.speed is None


async def test_a_job_dismissed_by_another_client_without_an_event_is_unknown() -> None:
    job = FakeJob(on_start=[status("", C), status("", R), status("", NULL)])
    async with (
        qemu(FakeQEMU(job)) as (fake, session),
        start_job(session, "backup", backup_start(session), target="drv0") as handle,
    ):
        with pytest.raises(JobFailed) as info:
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert str(info.value) == (
        f"job {handle.id} on drv0 is no longer listed by QEMU (dismissed by another client?); "
        "its outcome is unknown"
    )
    assert (info.value.status, info.value.offset, info.value.error) == (None, None, None)
    assert commands(fake) == ["blockdev-backup"]


class DismissRefused(FakeQEMU):
    def __call__(self, command: str, args: Mapping[str, Any]) -> object:
        if command == "job-dismiss":
            raise FakeError("GenericError", f"Job '{args['id']}' not found")
        return super().__call__(command, args)


async def test_a_refused_dismiss_of_a_job_only_query_jobs_reported_is_raised() -> None:
    """query-jobs said concluded, job-dismiss says there is no job, and no final event came:
    the outcome read may not be this job's, so the refusal is not swallowed."""
    job = FakeJob(status="concluded", job_id="bc-backup-10-abcdef")
    async with qemu(DismissRefused(job)) as (_fake, session):
        adopted = Job(session, job.job_id, job_type="backup", status=R)
        with pytest.raises(CommandFailed, match="not found") as info:
            await adopted.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert info.value.command == "job-dismiss"


async def test_a_refused_dismiss_after_the_final_event_keeps_the_outcome() -> None:
    class NullAfterListing(DismissRefused):
        def __call__(self, command: str, args: Mapping[str, Any]) -> object:
            if command == "query-jobs" and self.job.status == "concluded":
                entry = self.job.info()
                return FakeReply([entry], after=self.events([status(self.job.job_id, NULL)]))
            return super().__call__(command, args)

    async with (
        qemu(NullAfterListing(ok_backup())) as (_fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert result.offset == result.length == 32 * MIB


async def test_io_error_records_are_whole_and_a_retried_job_says_why_it_was_cancelled() -> None:
    stop = [io_error("read", "stop"), status("", P)]
    job = FakeJob(
        on_start=[status("", C), status("", R), *stop],
        on_resume=[status("", R), *stop],
        on_cancel=CANCELLED_AT_8,
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        hook = Recorder()
        began = time.monotonic()
        async with start_job(session, "backup", backup_start(session), target="drv0") as handle:
            with pytest.raises(JobFailed) as info:
                await handle.wait(complete_on_ready=False, deadline=30, hooks=[hook], retries=1)
        took = time.monotonic() - began
    assert str(info.value) == (
        f"backup job {handle.id} on drv0 met 2 read errors in a row and was retried 1 times "
        "(error policy ignore: the source keeps failing), so blockctl cancelled it "
        "(at 8388608 of 33554432)"
    )
    assert commands(fake).count("job-resume") == 1
    assert [(e.job_id, e.job_type, e.operation, e.action, e.count) for e in hook.io_errors] == [
        (handle.id, "backup", "read", "retry", 1),
        (handle.id, "backup", "read", "retry", 2),
    ]
    assert all(e.pause_timeout == 60.0 for e in hook.io_errors)  # wait()'s default
    assert all(0 <= e.seconds <= took for e in hook.io_errors)


async def test_ignored_errors_default_limit_and_a_stream_names_both_sides() -> None:
    flood = [io_error("read", "ignore") for _ in range(100)]
    job = FakeJob(
        job_type="stream",
        on_start=[status("", C), status("", R), *flood],
        on_cancel=CANCELLED_AT_8,
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (_fake, session):
        hook = Recorder()
        async with start_job(session, "stream", backup_start(session)) as handle:
            with pytest.raises(JobFailed) as info:
                await handle.wait(complete_on_ready=False, deadline=30, hooks=[hook])
    assert [e.count for e in hook.io_errors] == [1, 64]  # wait()'s default limit
    assert str(info.value) == (
        f"stream job {handle.id} met 64 read errors that QEMU retried under error policy "
        "ignore (the source or target keeps failing), so blockctl cancelled it "
        "(at 8388608 of 33554432)"
    )


async def test_an_error_event_without_operation_or_action_is_reported_as_unknown() -> None:
    job = ok_backup()
    job.on_start.insert(2, ("BLOCK_JOB_ERROR", {"device": ""}))
    async with qemu(FakeQEMU(job)) as (_fake, session):
        hook = Recorder()
        async with start_job(session, "backup", backup_start(session)) as handle:
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[hook])
    assert [(e.operation, e.action) for e in hook.io_errors] == [("unknown", "unknown")]


async def test_a_job_that_finishes_before_blockctl_gives_up_on_it_succeeds() -> None:
    """blockctl gives up (ignored errors) and sends job-cancel, but the job concluded
    meanwhile: the cancel is refused, and the copy is complete: a success."""

    class CancelRefused(FakeQEMU):
        def __call__(self, command: str, args: Mapping[str, Any]) -> object:
            if command == "job-cancel":
                raise FakeError("GenericError", f"Job '{args['id']}' in state 'concluded'")
            return super().__call__(command, args)

    job = ok_backup()
    job.on_start.insert(2, io_error("write", "ignore"))
    async with (
        qemu(CancelRefused(job)) as (fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        result = await handle.wait(
            complete_on_ready=False, deadline=10, hooks=[], ignored_error_limit=1
        )
    assert result.offset == result.length == 32 * MIB
    assert commands(fake) == ["blockdev-backup", "job-cancel", "job-dismiss"]


async def test_a_cancel_that_comes_too_late_leaves_a_success() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R)],
        on_cancel=[  # the job had finished its copy: it completes
            status("", W),
            status("", PEND),
            block_event("BLOCK_JOB_COMPLETED", "", 32 * MIB, 32 * MIB),
            status("", CONC),
        ],
    )
    async with (
        qemu(FakeQEMU(job)) as (_fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        await handle.cancel()
        result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert result.offset == result.length == 32 * MIB


async def test_another_jobs_events_are_not_this_jobs() -> None:
    job = ok_backup()
    job.on_start[2:2] = [
        ("JOB_STATUS_CHANGE", {"id": OTHER_JOB, "status": "concluded"}),
        block_event("BLOCK_JOB_COMPLETED", OTHER_JOB, 1, 2, error="other"),
        ("BLOCK_JOB_ERROR", {"device": OTHER_JOB, "operation": "read", "action": "report"}),
    ]
    async with qemu(FakeQEMU(job)) as (_fake, session):
        hook = Recorder()
        async with start_job(session, "backup", backup_start(session)) as handle:
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[hook])
    assert result.transitions == BACKUP_OK
    assert handle.io_errors == 0 and hook.io_errors == []


async def test_a_vanished_adopted_job_is_reported_at_once_not_at_its_deadline() -> None:
    fake_qemu = FakeQEMU(FakeJob(), listed=[])
    async with qemu(fake_qemu) as (_fake, session):
        job = Job(session, "bc-backup-1-000000", job_type="backup", status=R)
        with anyio.fail_after(60), pytest.raises(JobFailed, match="no longer listed"):
            await job.wait(complete_on_ready=False, deadline=3600, hooks=[])


async def test_a_refused_complete_is_sent_again_at_the_next_ready() -> None:
    class CompleteRefusedOnce(FakeQEMU):
        refused = 0

        def __call__(self, command: str, args: Mapping[str, Any]) -> object:
            if command == "job-complete" and not self.refused:
                self.refused += 1
                raise FakeError("GenericError", "The active block job is not ready")
            return super().__call__(command, args)

    job = FakeJob(
        job_type="commit",
        on_start=[status("", C), status("", R), status("", RDY)],
        on_complete=[status("", W), status("", PEND), status("", CONC)],
    )
    async with qemu(CompleteRefusedOnce(job)) as (fake, session):

        async def start(job_id: str) -> None:
            await wire.block_commit(session, job_id=job_id, device="drv0")

        async with start_job(session, "commit", start) as handle:
            await handle.wait_ready(deadline=10, hooks=[])
            await handle.wait_ready(deadline=3600, hooks=[])  # READY already: returns at once
            with pytest.raises(CommandFailed, match="not ready"):
                await handle.complete()
            await fake.emit("JOB_STATUS_CHANGE", {"id": handle.id, "status": "running"})
            await fake.emit("JOB_STATUS_CHANGE", {"id": handle.id, "status": "ready"})
            result = await handle.wait(complete_on_ready=True, deadline=3600, hooks=[])
    assert result.completed_on_ready
    assert commands(fake) == ["block-commit", "job-complete", "job-complete", "job-dismiss"]


async def test_wait_ready_feeds_progress_hooks() -> None:
    job = FakeJob(
        job_type="commit",
        on_start=[status("", C), status("", R)],
        on_cancel=[status("", AB), status("", CONC)],
        progress=(MIB, 4 * MIB),
        error="Operation canceled",
    )
    sampled = anyio.Event()

    class Once(Recorder):
        def on_progress(self, progress: JobProgress) -> None:
            super().on_progress(progress)
            sampled.set()

    hook = Once()
    async with qemu(FakeQEMU(job)) as (_fake, session):

        async def start(job_id: str) -> None:
            await wire.block_commit(session, job_id=job_id, device="drv0")

        async with (
            start_job(session, "commit", start, hooks=[]) as handle,
            anyio.create_task_group() as tg,
        ):

            async def stop_after_a_sample() -> None:
                await sampled.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_after_a_sample)
            await handle.wait_ready(deadline=3600, hooks=[hook], progress_interval=0.05)
            pytest.fail("the job never gets READY")
    assert (hook.progress[0].done, hook.progress[0].total) == (MIB, 4 * MIB)


def test_an_unknown_error_policy_names_its_field() -> None:
    with pytest.raises(ConfigError) as info:
        error_policy("sometimes")
    assert info.value.field == "on_error"


async def test_what_blockctl_decided_about_a_job_is_logged() -> None:
    """The log says when blockctl gave up on a job (and why) and when an adopted job's
    finalize was refused (it finalized by itself)."""

    refused = anyio.Event()

    class Refusing(FakeQEMU):
        def __call__(self, command: str, args: Mapping[str, Any]) -> object:
            if command == "job-finalize" and args["id"] == self.job.job_id:
                self.job.status = "concluded"  # it finalized by itself meanwhile
                refused.set()
                raise FakeError("GenericError", "Job is not pending")
            return super().__call__(command, args)

    job = FakeJob(status="running", job_id="bc-backup-11-abcdef")
    async with qemu(Refusing(job)) as (fake, session):
        adopted = Job(session, job.job_id, job_type="backup", auto_finalize=None, status=R)
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:

                async def finish() -> None:
                    await fake.emit("JOB_STATUS_CHANGE", {"id": job.job_id, "status": "pending"})
                    await refused.wait()
                    await anyio.wait_all_tasks_blocked()  # the refusal sent
                    await fake.emit("JOB_STATUS_CHANGE", {"id": job.job_id, "status": "concluded"})

                async def wait() -> None:
                    await adopted.wait(complete_on_ready=False, deadline=10, hooks=[])

                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(finish)
        assert adopted.done
        finalize_refused = [e for e in logs if e["event"] == "blockctl.job.finalize_refused"]
        assert [(e["job_id"], e["error"]) for e in finalize_refused] == [
            (job.job_id, "QEMU refused job-finalize: Job is not pending (GenericError)")
        ]

    flood = [io_error("write", "ignore") for _ in range(3)]
    job = FakeJob(
        on_start=[status("", C), status("", R), *flood],
        on_cancel=CANCELLED_AT_8,
        progress=(8 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (_fake, session):
        with capture_logs() as logs:
            async with start_job(session, "backup", backup_start(session)) as handle:
                with pytest.raises(JobFailed) as info:
                    await handle.wait(
                        complete_on_ready=False, deadline=10, hooks=[], ignored_error_limit=3
                    )
    gave_up = [e for e in logs if e["event"] == "blockctl.job.gave_up"]
    assert [(e["job_id"], e["reason"]) for e in gave_up] == [
        (
            handle.id,
            "met 3 write errors that QEMU retried under error policy ignore (the target keeps "
            "failing), so blockctl cancelled it",
        )
    ]
    assert gave_up[0]["reason"] in str(info.value)


async def test_a_retry_whose_resume_is_refused_goes_on_when_another_client_resumes() -> None:
    """blockctl's ``ignore`` resumes a stopped job; another client resumed it first (the
    resume is refused): the wait goes on to the job's end."""

    refused = anyio.Event()

    class ResumeRefused(FakeQEMU):
        def __call__(self, command: str, args: Mapping[str, Any]) -> object:
            if command == "job-resume":
                refused.set()
                raise FakeError("GenericError", f"Job '{args['id']}' is not paused")
            return super().__call__(command, args)

    job = FakeJob(on_start=[status("", C), status("", R), io_error("read", "stop"), status("", P)])
    peer = ResumeRefused(job)
    async with (
        qemu(peer) as (fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
        anyio.create_task_group() as tg,
    ):

        async def other_client() -> None:
            await refused.wait()
            await anyio.wait_all_tasks_blocked()  # the refusal sent, not one event at a time
            finish = [
                status("", R),
                status("", W),
                status("", PEND),
                block_event("BLOCK_JOB_COMPLETED", "", 32 * MIB, 32 * MIB),
                status("", CONC),
            ]
            for name, data in peer.events(finish):
                await fake.emit(name, data)

        tg.start_soon(other_client)
        result = await handle.wait(complete_on_ready=False, deadline=30, hooks=[], retries=2)
    assert result.offset == result.length == 32 * MIB
    assert commands(fake) == ["blockdev-backup", "job-resume", "job-dismiss"]


async def test_a_refused_complete_does_not_count_as_completed_on_ready() -> None:
    """job-complete refused, then another client completes the job: blockctl did not pivot."""

    class CompleteRefused(FakeQEMU):
        def __call__(self, command: str, args: Mapping[str, Any]) -> object:
            if command == "job-complete":
                raise FakeError("GenericError", "The active block job is not ready")
            return super().__call__(command, args)

    job = FakeJob(job_type="commit", on_start=[status("", C), status("", R), status("", RDY)])
    peer = CompleteRefused(job)
    async with qemu(peer) as (fake, session):

        async def start(job_id: str) -> None:
            await wire.block_commit(session, job_id=job_id, device="drv0")

        async with start_job(session, "commit", start) as handle:
            await handle.wait_ready(deadline=10, hooks=[])
            with pytest.raises(CommandFailed, match="not ready"):
                await handle.complete()
            for name, data in peer.events([status("", W), status("", PEND), status("", CONC)]):
                await fake.emit(name, data)
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert result.completed_on_ready is False


async def test_a_cancel_without_an_error_text_says_only_where_it_stopped() -> None:
    by_other = FakeJob(
        on_start=[
            status("", C),
            status("", R),
            status("", AB),
            block_event("BLOCK_JOB_CANCELLED", "", 3 * MIB, 32 * MIB),
            status("", CONC),
        ],
        progress=(3 * MIB, 32 * MIB),
    )
    async with (
        qemu(FakeQEMU(by_other)) as (_fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        with pytest.raises(JobCancelledByOther) as other:
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert str(other.value) == (
        f"backup job {handle.id} was cancelled by another client at 9 % (3145728 of 33554432 bytes)"
    )
    ours = FakeJob(on_start=[status("", C), status("", R)], on_cancel=CANCELLED_AT_8)
    ours.progress = (8 * MIB, 32 * MIB)
    async with (
        qemu(FakeQEMU(ours)) as (_fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        await handle.cancel()
        with pytest.raises(JobCancelled) as cancelled:
            await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert str(cancelled.value) == f"backup job {handle.id} was cancelled at 8388608 of 33554432"


async def test_an_auto_dismissed_job_is_not_dismissed_again() -> None:
    """Its NULL transition came with no CONCLUDED seen (created with auto-dismiss, or dismissed
    by another client at once): the final event tells the outcome; no job-dismiss is sent."""
    job = FakeJob(
        on_start=[
            status("", C),
            status("", R),
            status("", W),
            status("", PEND),
            block_event("BLOCK_JOB_COMPLETED", "", 32 * MIB, 32 * MIB),
            status("", NULL),
        ]
    )
    async with (
        qemu(FakeQEMU(job)) as (fake, session),
        start_job(session, "backup", backup_start(session)) as handle,
    ):
        result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
    assert result.offset == result.length == 32 * MIB
    assert commands(fake) == ["blockdev-backup"]
