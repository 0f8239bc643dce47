"""A fleet worker with a fault at an exact step of one VM's backup (test-only: nothing of
this is in blockctl; it wraps ``blockctl.backup.create``, which the worker's backup activity
calls, in this process only).

``python -m tests.integration.fleet_worker_child VM STEP ACTION ARGV...`` runs ``blockctl
ARGV...`` (``fleet worker ...``) with, for VM's backup: at STEP (a name in
``blockctl.backup.STEPS``, or ``copy``: the read's first progress record, with QEMU's
fleecing job, nodes, NBD server and export live), ACTION: ``kill`` (this worker SIGKILLs
itself: the crash point is exact, never a race) or ``hold:PATH`` (it creates PATH and waits
until PATH is removed, while the test acts; once; not at ``copy``, where job hooks cannot
wait). STEP ``prune``: in VM's prune (``blockctl.backup.prune``, which the worker's prune
activity calls), once its points are deleted, as it starts collecting the chunks (the first
collection this worker starts: one prune at a time per repository); ACTION ``kill`` only.
STEP ``restore``: in VM's restore (``blockctl.backup.restore``, which the worker's restore
activity calls), once its file is named, complete (before the activity reports it); STEP
``restore-unnamed``: as the file, written and fsynced, is about to be named; ACTION ``kill``
only. STEP ``snapshot``: in VM's fleet snapshot, once QEMU's transaction switched its
overlays in (before blockctl records that: its journal record at SWITCHING); STEP
``commit``: in VM's fleet commit, once the commit job pivoted and the overlay's nodes are
deleted, just before the overlay file is (``chains.flush_chain``, its step before the
unlink); ACTION ``kill`` only. STEP ``verify``: in VM's verify (``blockctl.backup.verify``,
which the worker's verify activity calls), as the first chunk is read once it started (the
read runs in a thread: any verify's read then kills, VM's own reads guarantee one); ACTION
``kill`` only. STEP ``attach``: in VM's fleet attach, once QEMU's ``device_add`` of the disk
returned, before ``drives.hotplug`` settles blockctl's record of the drive (and before the
activity reports it); STEP ``attach-nodes``: the same attach, once its nodes are added, as its
``device_add`` is about to be sent (QEMU has the nodes, no device uses them); ACTION ``kill``
only.
"""

from __future__ import annotations

import contextvars
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from blockctl import backup
from blockctl._cli.main import main
from blockctl.jobs import JobControl, JobProgress, JobTransition


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DieReading:
    """A job hook: SIGKILL this process at the backup's first progress record of its read."""

    def on_transition(self, transition: JobTransition) -> None:
        pass

    def on_progress(self, progress: JobProgress) -> None:
        if progress.job_type == "backup-read":
            die()


async def hold(path: Path) -> None:
    path.write_text(str(os.getpid()))
    while path.exists():  # noqa: ASYNC110 - the test removes it once it has acted
        await anyio.sleep(0.1)


def install_prune_kill(vm_name: str) -> None:
    """SIGKILL this process when ``vm_name``'s prune, its points deleted, starts collecting."""
    prune = backup.prune
    pruning = False

    def gc_then_die(repo: backup.Repository, **kwargs: Any) -> Any:
        if pruning:
            die()
        return gc(repo, **kwargs)

    async def prune_with_fault(repo: Any, vm: str, **kwargs: Any) -> Any:
        nonlocal pruning
        pruning = vm == vm_name
        try:
            return await prune(repo, vm, **kwargs)
        finally:
            pruning = False

    gc = backup.Repository.gc
    backup.Repository.gc = gc_then_die  # type: ignore[method-assign, assignment]
    backup.prune = prune_with_fault  # type: ignore[assignment]


def install_verify_kill(vm_name: str) -> None:
    """SIGKILL this process at the first chunk read once ``vm_name``'s verify started."""
    verify = backup.verify
    read_chunk_view = backup.Repository.read_chunk_view
    verifying = False

    def read_then_die(repo: backup.Repository, *args: Any, **kwargs: Any) -> Any:
        if verifying:
            die()
        return read_chunk_view(repo, *args, **kwargs)

    async def verify_with_fault(repo: Any, vm: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal verifying
        verifying = verifying or vm == vm_name
        return await verify(repo, vm, *args, **kwargs)

    backup.Repository.read_chunk_view = read_then_die  # type: ignore[method-assign, assignment]
    backup.verify = verify_with_fault  # type: ignore[assignment]


def install_restore_kill(vm_name: str, named: bool) -> None:
    """SIGKILL this process in ``vm_name``'s restore: once its file is named (``named``),
    else just before (the file told by its name, ``VM.POINT.DEVICE.qcow2``: restores of
    several VMs run at once)."""
    from blockctl import _fsutil

    restore = backup.restore
    name_unnamed_file = _fsutil.name_unnamed_file

    def name_then_die(fd: int, path: Path) -> None:
        if not named and path.name.startswith(f"{vm_name}."):
            die()
        name_unnamed_file(fd, path)

    async def restore_then_die(repo: Any, vm: str, *args: Any, **kwargs: Any) -> Any:
        result = await restore(repo, vm, *args, **kwargs)
        if named and vm == vm_name:
            die()
        return result

    _fsutil.name_unnamed_file = name_then_die
    backup.restore = restore_then_die  # type: ignore[assignment]


def install_chain_kill(vm_name: str, step: str) -> None:
    """SIGKILL this process in ``vm_name``'s snapshot (``step`` "snapshot") once QEMU's
    transaction returned, or in its commit ("commit") just before the overlay file is
    deleted (the other VMs' calls go through: the VM's call is marked in its task)."""
    from blockctl import chains
    from blockctl._ops import chains as ops
    from blockctl._qmp import wire

    marked = contextvars.ContextVar("marked", default=False)
    if step == "snapshot":
        transaction = wire.transaction_snapshot

        async def transaction_then_die(*args: Any, **kwargs: Any) -> None:
            await transaction(*args, **kwargs)
            if marked.get():
                die()

        wire.transaction_snapshot = transaction_then_die
        entry = "external_snapshot"
    else:
        flush_chain = ops.flush_chain

        async def die_before_deleting(*args: Any, **kwargs: Any) -> Any:
            if marked.get():
                die()
            return await flush_chain(*args, **kwargs)

        ops.flush_chain = die_before_deleting
        entry = "delete_external"
    call = getattr(chains, entry)

    async def marking(vm: Any, *args: Any, **kwargs: Any) -> Any:
        token = marked.set(vm.name == vm_name)
        try:
            return await call(vm, *args, **kwargs)
        finally:
            marked.reset(token)

    setattr(chains, entry, marking)


def install_attach_kill(vm_name: str, before_device: bool) -> None:
    """SIGKILL this process once QEMU's ``device_add`` of ``vm_name``'s hot-plugged disk
    returned (in ``drives.hotplug``, which the worker's attach activity calls), before
    ``hotplug`` settles the drive's record; ``before_device``: as that ``device_add`` is
    about to be sent, its nodes added."""
    from blockctl._ops import drives

    device_add = drives._device_add_placed

    async def device_add_then_die(vm: Any, device: Any) -> None:
        disk = vm.name == vm_name and device.get("id") != "scsi0"  # (not its controller)
        if disk and before_device:
            die()
        await device_add(vm, device)
        if disk:
            die()

    drives._device_add_placed = device_add_then_die


def install(vm_name: str, step: str, action: str) -> None:
    if step in ("attach", "attach-nodes"):
        if action != "kill":
            sys.exit(f"no action {action!r} at {step}: kill")
        install_attach_kill(vm_name, before_device=step == "attach-nodes")
        return
    if step in ("snapshot", "commit"):
        if action != "kill":
            sys.exit(f"no action {action!r} at {step}: kill")
        install_chain_kill(vm_name, step)
        return
    if step in ("restore", "restore-unnamed"):
        if action != "kill":
            sys.exit(f"no action {action!r} at {step}: kill")
        install_restore_kill(vm_name, named=step == "restore")
        return
    if step == "verify":
        if action != "kill":
            sys.exit(f"no action {action!r} at verify: kill")
        install_verify_kill(vm_name)
        return
    if step == "prune":
        if action != "kill":
            sys.exit(f"no action {action!r} at prune: kill")
        install_prune_kill(vm_name)
        return
    if step != "copy" and step not in backup.STEPS:
        sys.exit(f"no backup step {step!r}: {', '.join(backup.STEPS)} or copy")
    if action != "kill" and not (action.startswith("hold:") and step != "copy"):
        sys.exit(f"no action {action!r}: kill, or hold:PATH (not at copy)")
    create = backup.create
    held = False

    async def failpoint(at: str) -> None:
        nonlocal held
        if at != step or held:
            return
        if action == "kill":
            die()
        held = True  # once: the worker goes on serving as any other
        await hold(Path(action.removeprefix("hold:")))

    async def create_with_fault(vm: Any, repo: Any, **kwargs: Any) -> Any:
        if vm.name == vm_name:
            if step == "copy":
                control: JobControl = kwargs.get("control", JobControl())
                kwargs["control"] = replace(control, hooks=[*control.hooks, DieReading()])
            else:
                kwargs["_failpoint"] = failpoint
        return await create(vm, repo, **kwargs)

    backup.create = create_with_fault


if __name__ == "__main__":
    install(*sys.argv[1:4])
    sys.exit(main(sys.argv[4:]))
