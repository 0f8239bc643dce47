"""Many clients, one VM (issue 14), without QEMU: the monitor pool's locks and messages, the
pool's argv, a job cancelled or dismissed by another client, and the CLI's Ctrl-C summary."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from blockctl import _monitors
from blockctl._argv import build_argv
from blockctl._cli import interrupt
from blockctl._jobs import JobEnded, JobSample, JobTransition, adopt_jobs, measured_rate, start_job
from blockctl.errors import JobCancelled, JobCancelledByOther, MonitorsBusy, QMPConnectFailed
from blockctl.testing import FakeError, FakeReply
from blockctl.types import Accel, MachineConfig
from tests.unit.test_jobs import (
    AB,
    CONC,
    MIB,
    NULL,
    C,
    FakeJob,
    FakeQEMU,
    R,
    backup_start,
    block_event,
    commands,
    ok_backup,
    qemu,
    status,
)

# Section: the pool's argv


def test_pool_monitors_are_listening_sockets_with_control_monitors() -> None:
    pool = [Path("/run/x/qmp-0.sock"), Path("/run/x/qmp-1.sock")]
    argv = build_argv(
        binary="qemu-system-x86_64",
        config=MachineConfig(),
        label="t",
        accel=Accel.TCG,
        plans=(),
        qmp_fd=3,
        monitor_path=Path("/run/x/qmp.sock"),
        console=None,
        monitor_pool=pool,
    )
    pairs = [(argv[i], argv[i + 1]) for i in range(len(argv) - 1) if argv[i] == "-chardev"]
    assert ("-chardev", "socket,id=qmp-pool-1,path=/run/x/qmp-1.sock,server=on,wait=off") in pairs
    assert argv.count("-mon") == 4  # qmp0 (fd), qmp1 (qmp.sock), two pool monitors
    assert "chardev=qmp-pool-0,mode=control" in argv


# Section: the pool's locks


def test_take_signs_the_lock_and_holders_name_who_runs_what(tmp_path: Path) -> None:
    sockets = _monitors.pool_sockets(tmp_path, 2)
    first = _monitors.try_take(sockets, "blockctl commit vm disk0")
    second = _monitors.try_take(sockets, "blockctl jobs vm")
    assert first is not None and second is not None
    assert (first.socket.name, second.socket.name) == ("qmp-0.sock", "qmp-1.sock")
    assert _monitors.try_take(sockets, "a third") is None
    held = _monitors.holders(sockets)
    assert [(h.pid, h.command) for h in held] == [
        (os.getpid(), "blockctl commit vm disk0"),
        (os.getpid(), "blockctl jobs vm"),
    ]
    assert [h.command for h in _monitors.holders(sockets, besides=first.socket)] == [
        "blockctl jobs vm"
    ]
    assert (tmp_path / "qmp-0.lock").stat().st_mode & 0o777 == 0o600
    first.release()
    assert [h.command for h in _monitors.holders(sockets)] == ["blockctl jobs vm"]
    again = _monitors.try_take(sockets, "again")
    assert again is not None and again.socket.name == "qmp-0.sock"
    again.release()
    second.release()
    assert _monitors.holders(sockets) == []


async def test_take_waits_then_fails_naming_the_holders(tmp_path: Path) -> None:
    sockets = _monitors.pool_sockets(tmp_path, 1)
    lease = _monitors.try_take(sockets, "blockctl commit vm disk0 --speed 1M")
    assert lease is not None
    try:
        with pytest.raises(MonitorsBusy) as busy:
            await _monitors.take(sockets, vm="vm", timeout=0.2)
        message = str(busy.value)
        assert "attach to VM 'vm': all 1 of its QMP monitors stayed in use for 0.2 s" in message
        assert (
            f"qmp-0.sock: pid {os.getpid()} running `blockctl commit vm disk0 --speed 1M`"
            in message
        )
        assert "`blockctl jobs vm`" in message  # the way out
        assert len(busy.value.holders) == 1

        async def release_soon() -> None:
            await anyio.sleep(0.1)
            lease.release()

        async with anyio.create_task_group() as tg:
            tg.start_soon(release_soon)
            taken = await _monitors.take(sockets, vm="vm", timeout=30, command="next")
        assert [h.command for h in _monitors.holders(sockets)] == ["next"]
        taken.release()
    finally:
        lease.release()


# Section: jobs and other clients


async def test_a_job_cancelled_by_another_client_says_so() -> None:
    job = FakeJob(
        on_start=[
            status("", C),
            status("", R),
            # Nobody in this process sent job-cancel: another client did.
            status("", AB),
            block_event("BLOCK_JOB_CANCELLED", "", 3 * MIB, 32 * MIB),
            status("", CONC),
        ],
        progress=(3 * MIB, 32 * MIB),
        error="Operation canceled",
    )
    async with qemu(FakeQEMU(job)) as (fake, session):
        async with start_job(session, "backup", backup_start(session)) as handle:
            with pytest.raises(JobCancelledByOther) as info:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert "was cancelled by another client at 9 % (3145728 of 33554432 bytes)" in str(
            info.value
        )
        assert info.value.exit_code == 3
        assert commands(fake) == ["blockdev-backup", "job-dismiss"]


async def test_our_own_cancel_is_not_another_clients() -> None:
    job = FakeJob(
        on_start=[status("", C), status("", R)],
        on_cancel=[
            status("", AB),
            block_event("BLOCK_JOB_CANCELLED", "", 3 * MIB, 32 * MIB),
            status("", CONC),
        ],
        progress=(3 * MIB, 32 * MIB),
    )
    async with qemu(FakeQEMU(job)) as (_fake, session):
        async with start_job(session, "backup", backup_start(session)) as handle:
            await handle.cancel()
            with pytest.raises(JobCancelled) as info:
                await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert not isinstance(info.value, JobCancelledByOther)
        assert info.value.exit_code == 1


class DismissedElsewhere(FakeQEMU):
    """Another client dismisses the job as soon as it concludes (a `jobs` listing)."""

    def __call__(self, command: str, args: Any) -> object:
        if command == "query-jobs" and self.job.status == "concluded":
            # The other client's job-dismiss came first: QEMU announced NULL to every monitor.
            return FakeReply([], before=self.events([status(self.job.job_id, NULL)]))
        if command == "query-jobs" and self.job.status == "null":
            return []
        if command == "job-dismiss":
            raise FakeError("GenericError", f"Job '{args['id']}' not found")
        return super().__call__(command, args)


async def test_a_job_dismissed_by_another_client_keeps_its_outcome_from_the_event() -> None:
    async with qemu(DismissedElsewhere(ok_backup())) as (_fake, session):
        async with start_job(session, "backup", backup_start(session)) as handle:
            result = await handle.wait(complete_on_ready=False, deadline=10, hooks=[])
        assert result.offset == result.length == 32 * MIB


async def test_adopt_without_dismiss_leaves_concluded_jobs_to_their_owner() -> None:
    listed = [
        {
            "id": "bc-commit-1-aaaaaa",
            "type": "commit",
            "status": "concluded",
            "current-progress": 10,
            "total-progress": 10,
        }
    ]
    fake_qemu = FakeQEMU(FakeJob(), listed=listed)
    async with qemu(fake_qemu) as (_fake, session):
        (job,) = await adopt_jobs(session, hooks=[], dismiss=False)
        assert not job.done and job.status is CONC
        assert fake_qemu.dismissed == []


# Section: Ctrl-C


def args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(json=False, verbose=False, **kw)


def test_summary_says_what_was_cancelled_and_at_what_point() -> None:
    tracker = interrupt.JobTracker()
    error = JobCancelled(
        "cancelled",
        job_id="bc-commit-1-a",
        job_type="commit",
        target="b",
        status="concluded",
        error=None,
        offset=37,
        length=100,
    )
    tracker.on_end(JobEnded(job_id="bc-commit-1-a", job_type="commit", error=error))
    sentence, rows = interrupt.summary(tracker)
    assert sentence == "cancelled job bc-commit-1-a (commit) at 37 %; the chain is unchanged"
    assert rows == [
        {
            "job": "bc-commit-1-a",
            "type": "commit",
            "done": 37,
            "total": 100,
            "outcome": "cancelled",
            "chain_unchanged": True,
        }
    ]
    assert (
        interrupt.summary(interrupt.JobTracker())[0]
        == "the command was cancelled and its clean-up ran (no job of it was running)"
    )


async def test_sigint_cancels_the_command_runs_its_cleanup_and_reports(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cleaned = []

    async def command(_: argparse.Namespace) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)
                cleaned.append(True)
        return 0

    interrupt.TRACKER.clear()
    saved = structlog.get_config()  # the interrupt mutes warnings process-wide
    try:
        assert await interrupt.run_interruptible(command, args()) == 130
    finally:
        structlog.configure(**saved)
    assert cleaned == [True]
    assert (
        capsys.readouterr().err
        == "blockctl: interrupted: the command was cancelled and its clean-up ran (no job of "
        "it was running)\n"
    )


def test_null_transition_alone_is_not_reported() -> None:
    tracker = interrupt.JobTracker()
    tracker.on_transition(
        JobTransition(job_id="j", job_type="stream", status=NULL, previous=CONC, seconds=1)
    )
    assert (
        interrupt.summary(tracker)[0]
        == "the command was cancelled and its clean-up ran (no job of it was running)"
    )


async def test_a_vanished_run_directory_is_a_clear_connect_error(tmp_path: Path) -> None:
    sockets = _monitors.pool_sockets(tmp_path / "gone", 2)
    with pytest.raises(QMPConnectFailed) as failed:
        await _monitors.take(sockets, vm="gone", timeout=1)
    message = str(failed.value)
    assert "attach to VM 'gone': taking a QMP monitor failed" in message
    assert "qmp-0.lock: No such file or directory" in message
    assert "Is the VM still running?" in message


# Section: rate and ETA in `blockctl jobs`, measured from two samples


def test_rate_and_eta_are_measured_between_two_samples() -> None:
    first = JobSample(at=100.0, done=1 * MIB, total=9 * MIB)
    second = JobSample(at=100.5, done=2 * MIB, total=9 * MIB)
    rate, eta = measured_rate(first, second)
    assert rate == 2 * MIB  # 1 MiB in 0.5 s
    assert eta == 3.5  # 7 MiB left at 2 MiB/s


def test_a_job_that_did_not_move_has_rate_zero_and_no_eta() -> None:
    sample = JobSample(at=1.0, done=MIB, total=2 * MIB)
    assert measured_rate(sample, JobSample(at=2.0, done=MIB, total=2 * MIB)) == (0.0, None)


def test_no_rate_without_time_between_or_when_progress_goes_back() -> None:
    sample = JobSample(at=5.0, done=MIB, total=2 * MIB)
    assert measured_rate(sample, sample) == (None, None)
    assert measured_rate(sample, JobSample(at=4.0, done=2 * MIB, total=2 * MIB)) == (None, None)
    # A new job under the same id (the old one dismissed meanwhile): progress went back.
    assert measured_rate(sample, JobSample(at=6.0, done=0, total=MIB)) == (None, None)


def test_the_eta_follows_a_growing_total_and_never_goes_negative() -> None:
    # An active commit's total grows with the guest's writes; done may pass the old total.
    rate, eta = measured_rate(
        JobSample(at=0.0, done=0, total=MIB), JobSample(at=1.0, done=MIB, total=3 * MIB)
    )
    assert (rate, eta) == (MIB, 2.0)
    rate, eta = measured_rate(
        JobSample(at=0.0, done=0, total=MIB), JobSample(at=2.0, done=2 * MIB, total=MIB)
    )
    assert (rate, eta) == (MIB, 0.0)


# Section: the drive registry, shared by the clients


def _record(n: int) -> Any:
    from blockctl._registry import DriveRecord

    return DriveRecord(
        device_id=f"disk{n}",
        device={"driver": "virtio-blk-pci"},
        nodes=({"driver": "qcow2", "node-name": f"drv{n}"},),
    )


def test_a_client_sees_and_keeps_the_drives_another_client_recorded(tmp_path: Path) -> None:
    """Two clients' registries of one VM (each loaded when it attached): what one records,
    the other sees at its next look, and a change by either keeps the other's records."""
    from blockctl._registry import DriveRegistry

    a, b = DriveRegistry.load(tmp_path), DriveRegistry.load(tmp_path)
    a.put(_record(1))
    assert set(b.drives) == set()  # (the field as loaded: refresh() reads the file again)
    b.refresh()
    assert set(b.drives) == {"disk1"}
    b.put(_record(2))
    a.remove("disk9")  # (no such record: nothing written)
    assert set(DriveRegistry.load(tmp_path).drives) == {"disk1", "disk2"}
    a.set_pending("disk2", True)  # a knows disk2 only from the file
    assert DriveRegistry.load(tmp_path).drives["disk2"].pending_unplug
    b.remove("disk1")
    a.refresh()
    assert set(a.drives) == {"disk2"}


def test_reconcile_keeps_a_record_written_after_qemu_was_asked(tmp_path: Path) -> None:
    """A client's ``drives`` asks QEMU, then forgets the records QEMU does not have; a disk
    another client hot-plugged meanwhile (its record written after the reply) stays."""
    from blockctl._registry import DriveRegistry

    a, b = DriveRegistry.load(tmp_path), DriveRegistry.load(tmp_path)
    a.put(_record(1))
    known = dict(a.drives)
    b.put(_record(2))  # after a's query: QEMU's reply (no devices) predates it
    a.reconcile(devices=[], nodes=[], known=known)
    assert set(DriveRegistry.load(tmp_path).drives) == {"disk2"}


def test_a_hot_plugs_record_is_judged_by_qemu_once_its_process_is_gone(tmp_path: Path) -> None:
    """``drives.hotplug`` records the drive before it changes QEMU, marked with its process.
    While that process runs, QEMU's lack of the device and nodes says nothing (they are not
    added yet): the record stays as written. Once it is gone (a process that started at
    another time under that pid is another process), what QEMU has is what it did: the
    device there, the record kept, settled (the drive can be listed and unplugged); nodes
    without the device, those kept (``detach`` deletes them); nothing, forgotten."""
    from dataclasses import replace

    from blockctl import _proc
    from blockctl._registry import DriveRegistry, this_process

    here = this_process()
    assert _proc.process_alive(here["pid"], here["pid_start"])
    gone = {**here, "pid_start": here["pid_start"] - 1}

    def nodes(n: int) -> dict[str, Any]:
        return {"nodes": ({"node-name": f"drv{n}f"}, {"node-name": f"drv{n}"})}

    a = DriveRegistry.load(tmp_path)
    for n in (1, 2, 3):
        a.put(replace(_record(n), **nodes(n), plugging=gone))
    a.put(replace(_record(4), **nodes(4), plugging=here))
    assert DriveRegistry.load(tmp_path).drives["disk1"].plugging == gone  # (as written)
    a.reconcile(devices=["disk1"], nodes=["drv1f", "drv1", "drv2f"], known=dict(a.drives))
    after = DriveRegistry.load(tmp_path).drives
    assert sorted(after) == ["disk1", "disk2", "disk4"]
    assert after["disk1"] == replace(_record(1), **nodes(1))
    assert after["disk2"] == replace(_record(2), nodes=({"node-name": "drv2f"},))
    assert after["disk4"] == replace(_record(4), **nodes(4), plugging=here)
    assert after["disk4"].plug_under_way and not after["disk1"].plug_under_way


async def test_a_drive_another_process_is_hot_plugging_is_not_unplugged_nor_plugged_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose hot-plug's process runs (this test's process stands for it): an
    unplug of it is refused (``Conflict``, naming the process) before QEMU is asked, and so
    is a hot-plug under its id; a settled record of that id refuses a hot-plug with the way
    out (detach it). Nothing is written."""
    from dataclasses import replace
    from types import SimpleNamespace

    from blockctl._ops import drives as drives_ops
    from blockctl._registry import FILE, DriveRegistry, this_process
    from blockctl.errors import ConfigError, Conflict

    registry = DriveRegistry.load(tmp_path)
    registry.put(replace(_record(1), plugging=this_process()))

    async def no_devices() -> list[Any]:
        return []

    async def listed(_vm: Any) -> tuple[Any, ...]:
        return ()

    monkeypatch.setattr(drives_ops, "list_drives", listed)
    vm: Any = SimpleNamespace(name="vm1", registry=registry, block_devices=no_devices)
    for attempt in (drives_ops.unplug(vm, "disk1"), drives_ops._record_plugging(vm, _record(1))):
        before = (tmp_path / FILE).read_bytes()
        with pytest.raises(Conflict) as refused:
            await attempt
        assert refused.value.pid == os.getpid() and "hot-plugging" in str(refused.value)
        assert (tmp_path / FILE).read_bytes() == before
    registry.put(_record(1))
    with pytest.raises(ConfigError, match="blockctl detach vm1 disk1"):
        await drives_ops._record_plugging(vm, replace(_record(1), plugging=this_process()))
    assert DriveRegistry.load(tmp_path).drives == {"disk1": _record(1)}


def test_a_rewrite_with_the_same_inode_mtime_and_size_is_seen(tmp_path: Path) -> None:
    """Another client's rewrite is seen even when the file's (inode, mtime, size) repeat: a
    rewrite within one kernel tick of a reused inode number looks so. (The first version
    compared those three and kept its stale copy.)"""
    from blockctl._registry import FILE, DriveRegistry

    a = DriveRegistry.load(tmp_path)
    a.put(_record(1))
    path = tmp_path / FILE
    before = os.stat(path)
    # The same bytes but disk1 → disk2, written in place, its mtime put back.
    text = path.read_bytes().replace(b"disk1", b"disk2").replace(b"drv1", b"drv2")
    with open(path, "r+b") as f:
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    a.refresh()
    assert set(a.drives) == {"disk2"}


def test_an_interrupted_backup_says_whether_its_point_was_recorded() -> None:
    from blockctl._jobs import JobProgress, JobStatus

    def read(tracker: interrupt.JobTracker, done: int) -> None:
        tracker.on_progress(
            JobProgress(
                job_id="read-disk0",
                job_type="backup-read",
                status=JobStatus.RUNNING,
                done=done,
                total=8 << 20,
                rate=None,
                eta=None,
                seconds=1.0,
            )
        )

    tracker = interrupt.JobTracker()
    read(tracker, 3 << 20)
    sentence, rows = interrupt.summary(tracker)
    assert sentence == (
        "cancelled the backup (read: disk0 3.0 MiB of 8.0 MiB); no point was recorded and "
        "the checkpoints are as before it"
    )
    assert [(r["outcome"], r["done"], r["total"]) for r in rows] == [
        ("cancelled", 3 << 20, 8 << 20)
    ]
    read(tracker, 8 << 20)

    class Point:
        id = "20261203T1700-1"

    tracker.on_point_recorded(Point())
    sentence, rows = interrupt.summary(tracker)
    assert sentence.startswith("the backup's point 20261203T1700-1 was recorded before the cancel")
    assert rows[0]["outcome"] == "finished" and rows[0]["points_recorded"] == ["20261203T1700-1"]
