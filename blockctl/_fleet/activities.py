"""What a host's worker runs: blockctl's public operations on this host's VMs and on the
repositories as this host sees them (backup, verify, prune, restore; external snapshot and
its commit back), and the list of this host's
VMs, as Temporal activities. Only the worker of a VM's host talks QMP to it (the VM is found
by name in this process's runtime directory, ``BLOCKCTL_RUNTIME_DIR``).

Verify and prune are idempotent: a verify reads only, the point it checks chosen by the
workflow (``blockctl.points``, recorded in the workflow's history before the verify starts);
a prune retried after its worker died deletes what the dead attempt had not (the same points
kept: the newest ``keep_last``), then collects the chunks no point references (a retry always
does: the dead attempt may have deleted points and not collected); its result names every
point the workflow's ``blockctl.points`` listed that is gone, the dead attempt's deletions
included.

A restore writes each disk's file only once complete and durable (``backup.restore``: an
unnamed file, named at the end), under a name fixed by VM, point and device: a retry that
finds the file reports it instead of writing it again.

A backup activity is idempotent: its request id (the workflow's id and run and the
activity's id, the same in every attempt) is recorded in the point's manifest and names the
backup's QEMU fleecing jobs (``bc-backup-<digest of the id>-<n>``). A worker killed mid-copy
leaves its frozen point in QEMU (fleecing jobs, nodes, NBD export, new checkpoint bitmap) and
its plan in the VM's run directory: ``backup.create`` given the same id re-adopts it when it
is still whole, continuing the copy from that same point in time (chunks already stored are
deduplicated) into the same point. Otherwise (QEMU restarted, a job ended, a node or export
gone, killed before the transaction or after the manifest) it recovers what the attempt left
(fleecing job, nodes, export, incomplete point; checkpoint bitmaps settled), then returns the
attempt's point if it was recorded, else backs up afresh. Either way: exactly one point.

Errors: a backup that raised is not retried (it failed on its own: the VM is gone, the
repository is full...) except :class:`~blockctl.errors.RepositoryBusy` (an earlier attempt of
a worker taken for lost still holds the VM's backup lock). A lost worker is retried by the
workflow's heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from temporalio import activity
from temporalio.exceptions import ApplicationError

from blockctl import VM, Drive, _fsutil, _runtime, attach, backup, chains, drives, jobs, recovery
from blockctl._fleet.inventory import (
    HostVMs,
    ListedVM,
    VMAttach,
    VMBackup,
    VMBackupResult,
    VMChain,
    VMChainResult,
    VMDetach,
    VMPlugResult,
    VMPoints,
    VMPrune,
    VMPruneResult,
    VMRestore,
    VMRestoreResult,
    VMVerify,
    VMVerifyResult,
    restored_name,
)
from blockctl.errors import ConfigError, DriveNotFound, RepositoryBusy, UnsafeOperation
from blockctl.types import ImageFormat, coerce_enum

#: The activities' names (workflows name them as strings: they never import this module).
BACKUP_VM = "blockctl.backup"
POINTS = "blockctl.points"
VERIFY_VM = "blockctl.verify"
PRUNE_VM = "blockctl.prune"
RESTORE_VM = "blockctl.restore"
SNAPSHOT_VM = "blockctl.snapshot"
COMMIT_VM = "blockctl.commit"
ATTACH_VM = "blockctl.attach"
DETACH_VM = "blockctl.detach"
LIST_VMS = "blockctl.list-vms"
#: Heartbeats per heartbeat timeout while nothing else heartbeats (recovery, syncing the
#: chunks, writing the manifest): one lost or late heartbeat does not lose the worker.
BEATS_PER_TIMEOUT = 4


class _Heartbeat:
    """A job hook that heartbeats the activity with the copy's progress (done, total)."""

    def on_transition(self, transition: jobs.JobTransition) -> None:
        activity.heartbeat(transition.job_id, transition.status.value)

    def on_progress(self, progress: jobs.JobProgress) -> None:
        activity.heartbeat(progress.job_id, progress.done, progress.total)


async def _beat(interval: float) -> None:
    """Heartbeat every ``interval`` s: the worker is alive, whatever the backup is doing."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(interval)


@asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    """Heartbeat every quarter of the activity's heartbeat timeout while the block runs, and
    turn its errors into final ones (not retried: only a lost worker is), but
    ``RepositoryBusy`` (retried: the lock's holder ends, or is found dead)."""
    timeout = activity.info().heartbeat_timeout
    beat = (
        None
        if timeout is None
        else asyncio.ensure_future(_beat(timeout.total_seconds() / BEATS_PER_TIMEOUT))
    )
    try:
        yield
    except RepositoryBusy:
        raise
    except Exception as exc:
        raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from exc
    finally:
        if beat is not None:
            beat.cancel()


@asynccontextmanager
async def _on_vm(name: str, info: activity.Info) -> AsyncIterator[VM]:
    """The VM this activity acts on, attached under the activity's id and attempt (what
    ``jobs`` and the records show of it), heartbeating meanwhile."""
    command = f"blockctl fleet worker ({info.activity_id}#{info.attempt})"
    async with _heartbeating(), attach(name, command=command) as vm:
        yield vm


def request_id(info: activity.Info) -> str:
    """The backup's request id: the same in every attempt of one activity of one workflow
    run (quoted: a manifest's request id is printable ASCII without spaces)."""
    return quote(f"temporal:{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}", "/:")


@activity.defn(name=BACKUP_VM)
async def backup_vm(request: VMBackup) -> VMBackupResult:
    """Back up VM ``request.vm`` of this host into ``request.repository`` (it must exist:
    ``blockctl backup init``); an incremental when the repository has a usable base. A retry
    returns the point an earlier attempt recorded, if it did."""
    info = activity.info()
    timeout = info.heartbeat_timeout
    beat = (
        None
        if timeout is None
        else asyncio.ensure_future(_beat(timeout.total_seconds() / BEATS_PER_TIMEOUT))
    )
    try:
        repo = backup.open_repository(request.repository)
        control = jobs.JobControl(hooks=[*jobs.JobControl().hooks, _Heartbeat()])
        async with attach(
            request.vm, command=f"blockctl fleet worker ({info.activity_id}#{info.attempt})"
        ) as vm:
            point = await backup.create(vm, repo, control=control, request_id=request_id(info))
    except RepositoryBusy:
        raise  # retried: the attempt holding the lock ends, or is found dead
    except Exception as exc:
        raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from exc
    finally:
        if beat is not None:
            beat.cancel()
    return VMBackupResult(
        host=request.host,
        vm=request.vm,
        repository=request.repository,
        point=point.id,
        kind=point.kind,
        bytes_read=point.bytes_read,
    )


@activity.defn(name=POINTS)
async def vm_points(request: VMVerify) -> VMPoints:
    """VM ``request.vm``'s complete points in ``request.repository``, oldest first (read
    only: the workflow records them, and what follows is planned on them)."""
    async with _heartbeating():
        repo = backup.open_repository(request.repository)
        manifests = await anyio.to_thread.run_sync(repo.manifests, request.vm)
    return VMPoints(request.host, request.vm, request.repository, [m.id for m in manifests])


@activity.defn(name=VERIFY_VM)
async def verify_vm(request: VMVerify, point: str) -> VMVerifyResult:
    """Verify ``point`` of the VM (its manifest, indexes and every chunk it references):
    reading only, so a retry checks the same point again."""
    async with _heartbeating():
        repo = backup.open_repository(request.repository)
        report = await backup.verify(repo, request.vm, point)
    return VMVerifyResult(
        host=request.host,
        vm=request.vm,
        repository=request.repository,
        point=point,
        ok=report.ok,
        problems=list(report.problems),
        chunks_checked=report.chunks_checked,
        bytes_checked=report.bytes_checked,
    )


@activity.defn(name=PRUNE_VM)
async def prune_vm(request: VMPrune, before: list[str]) -> VMPruneResult:
    """Keep the VM's newest ``keep_last`` points, delete the others, collect the chunks no
    point references. ``before``: its points when the workflow planned the prune; a point of
    them not kept is reported deleted, whichever attempt deleted it."""
    info = activity.info()
    async with _heartbeating():
        repo = backup.open_repository(request.repository)
        result = await backup.prune(repo, request.vm, keep_last=request.keep_last)
        removed, removed_bytes, skipped = (
            result.chunks_removed,
            result.bytes_removed,
            result.gc_skipped,
        )
        if not result.deleted and info.attempt > 1:
            # An earlier attempt may have deleted points and died before collecting: collect
            # now (a point directory it left without its manifest goes too).
            try:
                gc = await anyio.to_thread.run_sync(repo.gc)
                removed, removed_bytes = gc.chunks_removed, gc.bytes_removed
            except RepositoryBusy as exc:
                skipped = str(exc)
    kept = set(result.kept)
    deleted = [p for p in before if p not in kept]
    deleted += [p for p in result.deleted if p not in deleted]
    return VMPruneResult(
        host=request.host,
        vm=request.vm,
        repository=request.repository,
        deleted=deleted,
        kept=list(result.kept),
        chunks_removed=removed,
        bytes_removed=removed_bytes,
        gc_skipped=skipped,
        served={p.point: p.reason for p in result.served},
    )


def _names_only_complete(directory: Path) -> bool:
    """Whether a restore into ``directory`` names its file only once complete (its
    filesystem has unnamed files); else ``backup.restore`` writes the named file directly."""
    fd = _fsutil.unnamed_file(directory)
    if fd is None:
        return False
    os.close(fd)
    return True


@activity.defn(name=RESTORE_VM)
async def restore_vm(request: VMRestore, point: str) -> VMRestoreResult:
    """Restore each disk of the VM's ``point`` into a new qcow2 file in ``request.dest_dir``
    (``restored_name``). ``backup.restore`` names a file only once it is complete and
    durable, so a retry (attempt > 1) that finds its file there takes it as an earlier
    attempt's, complete, and reports it (``reused``) instead of failing or writing it again;
    a first attempt that finds it there fails (that file is not this restore's)."""
    info = activity.info()
    async with _heartbeating():
        repo = backup.open_repository(request.repository)
        manifest = repo.get(request.vm, point)
        dest_dir = Path(request.dest_dir)
        if not dest_dir.is_dir():
            raise ConfigError(
                "dest-dir", f"{dest_dir} is not a directory on {request.host} (create it first)"
            )
        files: list[str] = []
        reused: list[str] = []
        written = 0
        for disk in manifest.disks:
            dest = dest_dir / restored_name(request.vm, point, disk.device)
            files.append(str(dest))
            if info.attempt > 1 and dest.exists():
                if not await anyio.to_thread.run_sync(_names_only_complete, dest_dir):
                    raise ConfigError(
                        "dest-dir",
                        f"{dest} exists and may be an earlier attempt's incomplete file: "
                        f"{dest_dir} has no unnamed files (O_TMPFILE); remove it and restore "
                        "again",
                    )
                reused.append(str(dest))
                continue
            result = await backup.restore(repo, request.vm, point, disk.device, dest)
            written += result.bytes_written
    return VMRestoreResult(
        host=request.host,
        vm=request.vm,
        repository=request.repository,
        point=point,
        files=files,
        reused=reused,
        bytes_written=written,
    )


def _tagged(vm_identity: str, found: dict[str, list[str]], tag: str) -> dict[str, str]:
    """Each device whose chain (``chains.list_external``) has snapshot ``tag``'s overlay:
    that overlay's file."""
    return {
        device: f
        for device, files in found.items()
        for f in files
        if Path(f).name == chains.overlay_name(vm_identity, device, tag)
    }


#: Verdicts after which the chain is in a known state: the interrupted operation took
#: effect, or it did not and what it added is gone (its job's failure left it as before).
_SETTLED = frozenset(
    {recovery.Verdict.FINISHED, recovery.Verdict.NOT_DONE, recovery.Verdict.FAILED}
)


async def _settle(vm: VM, activity_name: str) -> None:
    """Reconcile what an earlier attempt (or another client) left on the VM; fail unless
    every record is settled. A record kept for attention, or another client's operation
    still running, leaves the chain in a state nobody finished: a retry reading it would
    report the snapshot or commit done (``reused``) while QEMU holds that half-done
    operation."""
    unsettled = [r for r in await recovery.reconcile(vm) if r.kept or r.verdict not in _SETTLED]
    if unsettled:
        raise UnsafeOperation(
            f"{activity_name} of {vm.name}: not done: an interrupted operation is not settled: "
            + "; ".join(
                f"{r.kind} {r.op_id} ({r.what}): {r.verdict.value}: {r.message}" for r in unsettled
            )
            + f"; check it and run `blockctl recover {vm.name}` (`--forget` drops the record "
            "once checked), then the fleet command again"
        )


@activity.defn(name=SNAPSHOT_VM)
async def snapshot_vm(request: VMChain) -> VMChainResult:
    """Take external snapshot ``request.tag`` of every writable disk of the VM (one point in
    time). The chain is read first, after settling what an earlier attempt left
    (``recovery.reconcile``: its journal record finished or undone; a record kept for
    attention fails the activity, ``_settle``): if it has the tag's overlays, an earlier
    attempt took it, and it is reported (``reused``), not taken twice."""
    info = activity.info()
    async with _on_vm(request.vm, info) as vm:
        await _settle(vm, "snapshot")
        taken = _tagged(vm.identity, await chains.list_external(vm), request.tag)
        if not taken:
            directory = None if request.directory is None else Path(request.directory)
            snap = await chains.external_snapshot(vm, request.tag, directory)
            overlays = {d: str(p) for d, p in snap.overlays.items()}
        else:
            overlays = taken
        after = await chains.list_external(vm)
    return VMChainResult(
        request.host, request.vm, request.tag, overlays, reused=bool(taken), chains=after
    )


@activity.defn(name=COMMIT_VM)
async def commit_vm(request: VMChain) -> VMChainResult:
    """Commit external snapshot ``request.tag``'s overlays back into the images below them
    (an active commit where the overlay is the top; ``chains.delete_external``), their files
    deleted. After settling what an earlier attempt left (``_settle``: a record kept for
    attention fails it): a retry (attempt > 1) that finds none of the tag's overlays in the
    chain reports the commit done (``reused``); a first attempt fails (no such snapshot)."""
    info = activity.info()
    async with _on_vm(request.vm, info) as vm:
        await _settle(vm, "commit")
        tagged = _tagged(vm.identity, await chains.list_external(vm), request.tag)
        if tagged or info.attempt == 1:
            await chains.delete_external(vm, request.tag)
        after = await chains.list_external(vm)
    return VMChainResult(
        request.host, request.vm, request.tag, tagged, reused=not tagged, chains=after
    )


def _same_file(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _record_file(nodes: Iterable[Mapping[str, Any]]) -> str | None:
    """The image file a drive's recorded nodes open (its protocol node's)."""
    return next((str(n["filename"]) for n in nodes if "filename" in n), None)


@activity.defn(name=ATTACH_VM)
async def attach_vm(request: VMAttach) -> VMPlugResult:
    """Hot-plug ``request.file`` into the VM as device ``request.device_id``
    (``drives.hotplug``). A retry (attempt > 1) first settles what an earlier attempt left
    (``_settle``), then looks for the device: there on that file, an earlier attempt added
    it, and it is reported (``reused``), not added twice (``drives.hotplug`` records the
    drive's nodes before its ``device_add``: a device an attempt killed after it is known);
    there on another file, or without blockctl's record, it fails (not this attach's). A
    record of the device on that file without the device (killed between the nodes and the
    ``device_add``): its nodes are removed, then the drive added."""
    info = activity.info()
    async with _on_vm(request.vm, info) as vm:
        if info.attempt > 1:
            await _settle(vm, "attach")
            found = {d.device_id: d for d in await drives.list_drives(vm)}.get(request.device_id)
            if found is not None:
                if not _same_file(found.file, request.file):
                    raise ConfigError(
                        "id",
                        f"{request.vm} has device {request.device_id} on {found.file}, not on "
                        f"{request.file}: give another --id, or detach it first",
                    )
                if request.device_id not in vm.registry.drives:
                    # Not added by a hot-plug that records its nodes before its device_add
                    # (by hand, or by an older blockctl): blockctl could not unplug it.
                    raise UnsafeOperation(
                        f"attach of {request.vm}: device {request.device_id} is on "
                        f"{request.file} but blockctl has no record of its nodes (it was not "
                        "added by this blockctl): remove it with QMP device_del and "
                        "blockdev-del, then the fleet command again"
                    )
                # An earlier attempt's device_add went through (killed before or after its
                # record was settled: `list_drives` settled it from QEMU's devices).
                return VMPlugResult(
                    request.host, request.vm, request.device_id, found.file, "attached", True
                )
            left = vm.registry.drives.get(request.device_id)
            if (
                left is not None
                and left.nodes
                and _same_file(_record_file(left.nodes), request.file)
            ):
                # Killed between its blockdev-adds and its device_add: its nodes are in QEMU,
                # no device uses them; removed (as `blockctl detach` does), then added again.
                await drives.unplug(vm, request.device_id)
        drive = Drive(
            file=Path(request.file),
            format=coerce_enum(ImageFormat, request.format, "format"),
            read_only=request.read_only,
        )
        added = await drives.hotplug(vm, drive, device_id=request.device_id)
    return VMPlugResult(request.host, request.vm, added.device_id, added.file, "attached")


@activity.defn(name=DETACH_VM)
async def detach_vm(request: VMDetach) -> VMPlugResult:
    """Unplug device ``request.device_id`` from the VM (``drives.unplug``: a pending unplug
    keeps its nodes, and unplugging again finishes it). A retry (attempt > 1) first settles
    what an earlier attempt left (``_settle``); one that finds the device gone reports the
    detach done (``reused``: the earlier attempt removed it); a first attempt fails (no
    such device)."""
    info = activity.info()
    async with _on_vm(request.vm, info) as vm:
        if info.attempt > 1:
            await _settle(vm, "detach")
        try:
            result = await drives.unplug(vm, request.device_id, timeout=request.timeout)
        except DriveNotFound:
            if info.attempt == 1:
                raise
            return VMPlugResult(request.host, request.vm, request.device_id, None, "removed", True)
    return VMPlugResult(request.host, request.vm, request.device_id, None, result.state.value)


@activity.defn(name=LIST_VMS)
async def list_vms(host: str) -> HostVMs:
    """This host's VMs: its runtime directory's records (as ``blockctl ls`` reads them),
    each running or dead (its QEMU gone)."""
    async with _heartbeating():
        records = await anyio.to_thread.run_sync(_runtime.list_records)
        vms = [
            ListedVM(r.name, "running" if _runtime.is_alive(r) else "dead", r.pid) for r in records
        ]
    return HostVMs(host, vms)
