"""Conflicting operations (issue 14): what is running, and what it rules out. Pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockctl._journal import DeviceChains, Intent, OpKind, Step
from blockctl._ops import conflicts
from blockctl._ops.conflicts import BackupOwner, Running, find_conflict, running_operations
from blockctl._qmp.models import JobInfo, JobStatus
from blockctl.errors import Conflict, NodeBusy, UnsafeOperation


def commit(device: str = "disk0", job: str | None = "bc-commit-1-abc") -> Intent:
    chains = DeviceChains(before=("a", "b"), after=("b",), files_before=(), files_after=())
    return Intent(
        id="commit-1",
        kind=OpKind.COMMIT,
        vm="vm",
        step=Step.RUNNING,
        job_id=job,
        devices={device: chains},
        what=f"commit of B.qcow2 into A.qcow2 on {device}",
        pid=4242,
        pid_start=7,
    )


def job(job_id: str, kind: str, status: JobStatus = JobStatus.RUNNING) -> JobInfo:
    return JobInfo(
        id=job_id, type=kind, status=status, current_progress=0, total_progress=1, error=None
    )


def test_a_live_record_is_running_on_its_disk_with_its_owner() -> None:
    (op,) = running_operations(
        records=[(commit(), True)],
        jobs=[job("bc-commit-1-abc", "commit")],
        fleeces={},
        backup=None,
    )
    assert (op.kind, op.devices, op.job_ids, op.pid) == (
        "commit",
        frozenset({"disk0"}),
        ("bc-commit-1-abc",),
        4242,
    )
    # Before its job exists (step planned/starting) it runs all the same.
    (early,) = running_operations(
        records=[(commit(job=None), True)], jobs=[], fleeces={}, backup=None
    )
    assert early.devices == frozenset({"disk0"}) and early.pid == 4242


def test_a_dead_writers_record_runs_only_while_its_job_does() -> None:
    assert running_operations(records=[(commit(), False)], jobs=[], fleeces={}, backup=None) == []
    (op,) = running_operations(
        records=[(commit(), False)],
        jobs=[job("bc-commit-1-abc", "commit")],
        fleeces={},
        backup=None,
    )
    assert op.pid is None and "controller that is gone" in op.what


def test_a_backup_is_named_by_its_fleecing_nodes_jobs_and_lock() -> None:
    (op,) = running_operations(
        records=[],
        jobs=[
            job("bc-backup-3-aaa", "backup"),
            job("bc-backup-4-bbb", "backup", JobStatus.CONCLUDED),
        ],
        fleeces={"bcf0-1234": "disk1"},
        backup=BackupOwner(pid=99),
    )
    assert (op.kind, op.devices, op.job_ids, op.pid) == (
        "backup",
        frozenset({"disk1"}),
        ("bc-backup-3-aaa",),
        99,
    )
    # Holding the lock, no fleecing node yet: every disk, as far as anyone can tell.
    (starting,) = running_operations(records=[], jobs=[], fleeces={}, backup=BackupOwner(pid=99))
    assert starting.devices is None


def test_a_job_nobody_explains_concerns_every_disk_and_final_jobs_nothing() -> None:
    ops = running_operations(
        records=[],
        jobs=[job("mine", "mirror"), job("done", "commit", JobStatus.CONCLUDED)],
        fleeces={},
        backup=None,
    )
    assert [(o.kind, o.devices, o.job_ids) for o in ops] == [("job", None, ("mine",))]


def running(kind: str, devices: frozenset[str] | None) -> Running:
    return Running(kind=kind, what=f"a {kind}", devices=devices, job_ids=("j",), pid=1)


D0 = frozenset({"disk0"})


@pytest.mark.parametrize(
    ("action", "kind", "devices", "refused"),
    [
        ("commit", "commit", D0, True),
        ("commit", "stream", D0, True),
        ("commit", "backup", D0, True),
        ("commit", "commit", frozenset({"disk1"}), False),
        ("commit", "job", None, True),
        ("unplug", "commit", D0, True),
        ("unplug", "stream", D0, True),
        ("unplug", "backup", D0, True),
        ("unplug", "backup", frozenset({"disk1"}), False),
        ("snapshot", "commit", D0, True),
        ("snapshot", "backup", D0, False),
        ("stream", "snapshot", D0, True),
    ],
)
def test_what_each_action_cannot_run_beside(
    action: str, kind: str, devices: frozenset[str] | None, refused: bool
) -> None:
    hit = find_conflict(action, ["disk0"], [running(kind, devices)])
    assert (hit is not None) == refused
    if hit is not None:
        assert hit[1] == (None if devices is None else "disk0")


def test_the_refusal_names_the_running_operation() -> None:
    op = Running(
        kind="commit",
        what="commit of B.qcow2 into A.qcow2 on disk0",
        devices=D0,
        job_ids=("bc-commit-1-abc",),
        pid=4242,
    )
    error = conflicts.refusal("vm1", "unplug", ["disk0"], op, "disk0")
    assert isinstance(error, Conflict) and isinstance(error, UnsafeOperation)
    assert (error.kind, error.job_id, error.device, error.pid) == (
        "commit",
        "bc-commit-1-abc",
        "disk0",
        4242,
    )
    assert error.exit_code == 5
    assert str(error) == (
        "unplug of disk0 refused: commit of B.qcow2 into A.qcow2 on disk0 (job bc-commit-1-abc; "
        "pid 4242) is running on disk0; nothing was changed. Wait for it to end (`blockctl jobs "
        "vm1`) or cancel it (`blockctl jobs vm1 cancel bc-commit-1-abc`), then run it again"
    )


def test_the_backup_lock_names_a_live_owner_only(tmp_path: Path) -> None:
    import os

    lock = tmp_path / conflicts.BACKUP_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert conflicts.read_backup_owner(tmp_path) is None  # empty: nobody
        conflicts.write_backup_owner(fd, "backup")
        assert conflicts.read_backup_owner(tmp_path) == BackupOwner(pid=os.getpid())
        conflicts.clear_backup_owner(fd)
        assert conflicts.read_backup_owner(tmp_path) is None
        lock.write_text(json.dumps({"pid": os.getpid(), "pid_start": 1}))  # a reused pid
        assert conflicts.read_backup_owner(tmp_path) is None
    finally:
        os.close(fd)


def test_qemus_job_refusal_is_a_conflict_naming_the_node() -> None:
    from qemu.qmp import qmp_client
    from qemu.qmp.models import ErrorResponse

    from blockctl._qmp.session import translate

    desc = "Node 'drv0' is busy: block device is in use by block job: commit"
    response = ErrorResponse({"error": {"class": "GenericError", "desc": desc}})
    exc = qmp_client.ExecuteError(response, {"execute": "block-stream"}, {"error": {}})  # type: ignore[arg-type]
    error = translate(exc, "block-stream", None)
    assert isinstance(error, NodeBusy) and isinstance(error, Conflict)
    assert (error.node, error.kind, error.desc, error.exit_code) == ("drv0", "commit", desc, 5)
    assert "node drv0 is in use by a running commit job" in str(error)
