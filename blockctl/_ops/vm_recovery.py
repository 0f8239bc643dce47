"""``blockctl recover``: everything a dead controller left behind on one VM, in one call —
the crash journal's interrupted chain operations (:mod:`blockctl._ops.recovery`) and, given a
repository, the backup's (:func:`blockctl._backup.operations.recover`). Above both, so that
neither imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import anyio

from blockctl import _journal, _runtime
from blockctl._backup.operations import recover as recover_backup
from blockctl._backup.operations import recover_offline as recover_backup_offline
from blockctl._backup.store import Repository
from blockctl._machine import _pidfd_exited, attach, finish_start
from blockctl._ops.recovery import Recovery, reconcile, reconcile_offline
from blockctl.errors import VMNotFound


class RecoveryReport(NamedTuple):
    """What :func:`recover_vm` found and did (a named tuple: ``alive, ops, notes = ...``)."""

    qemu_running: bool
    #: The journal's interrupted operations, each with its verdict.
    operations: list[Recovery]
    #: What the backup recovery did (fleecing jobs ended, points removed, bitmaps merged).
    backup_notes: list[str]


async def _exited(pid: int, timeout: float = 10.0) -> None:
    """Wait until a QEMU that is no longer running has also closed its files (a killed
    process loses its command line before it releases its image locks)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already reaped
    try:
        with anyio.move_on_after(timeout):  # a reused PID: do not wait for a stranger
            await _pidfd_exited(pidfd).wait()
    finally:
        os.close(pidfd)


async def recover_vm(
    name: str, *, repo: Repository | None = None, deadline: float = 600.0, forget: bool = False
) -> RecoveryReport:
    """Recover the VM named ``name``: reconcile its journal (offline from the records and the
    files on disk if its QEMU is gone) and, with ``repo``, the backup's leftovers; then the
    same in each of its vhost-user-blk disks' qemu-storage-daemons (while QEMU runs; once it
    is gone, from their operations directories and the repository).

    A VM whose launcher died between QEMU's spawn and its greeting (its record still says
    "starting") is taken over once it answers on its monitors; while it does not, this
    raises (:func:`~blockctl._machine.attach` says so) and changes nothing. A launch killed
    before QEMU started, which left only journal records (a live launch's), is recovered as
    QEMU gone."""
    try:
        record = _runtime.read_record(name)
    except VMNotFound:
        run_dir = _runtime.run_dir_of(name)
        left_by_launch = [] if run_dir is None else _journal.load_all(run_dir)
        if not left_by_launch or any(
            isinstance(r, _journal.Intent) and _journal.owner_alive(r) for r in left_by_launch
        ):
            raise
        assert run_dir is not None
        results = await reconcile_offline(run_dir, never_ran=True)
        left = [] if repo is None else recover_backup_offline(name, run_dir, repo)
        return RecoveryReport(False, results, left)
    if not _runtime.is_alive(record):
        await _exited(record.pid)
        run_dir = Path(record.run_dir)
        results = await reconcile_offline(run_dir)
        # QEMU's and its daemons' backups alike: what they left outside QEMU.
        left = [] if repo is None else recover_backup_offline(name, run_dir, repo)
        return RecoveryReport(False, results, left)
    async with attach(name) as vm:  # a VM still starting that does not answer: raises
        if record.starting:
            finish_start(record)
        opened = () if repo is None else (repo,)
        results = await reconcile(vm, deadline=deadline, forget=forget, repositories=opened)
        notes: list[str] = []
        if repo is not None:
            notes = await recover_backup(vm, repo)
        # A vhost-user-blk disk's operations ran in its qemu-storage-daemon: their records
        # and leftovers are there, judged by the daemon's graph.
        for device, drive in vm.registry.drives.items():
            if drive.daemon is None:
                continue
            async with vm.on_storage_daemon(device, "recover") as daemon:
                results += await reconcile(
                    daemon, deadline=deadline, forget=forget, repositories=opened
                )
                if repo is not None:
                    notes += await recover_backup(daemon, repo)
    return RecoveryReport(True, results, notes)
