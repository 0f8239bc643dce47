"""Live restore, first slice: a disk of a backup point hot-plugged into a running guest at
once, its data copied underneath while the guest uses it (``notes/backup-data-path.md``,
"Live restore on stock QEMU 7.2").

::

    verify the point (index against manifest, every chunk present)
    nbdkit serves the point's disk read-only (serve.serve_point)
    new empty qcow2 target
    blockdev-add nbd (read-only, reconnect-delay) → raw → the target's qcow2, backing = raw
    device_add                                       (drives.hotplug: records, rollback)
    block-stream on the target (the job driver)      the guest reads and writes meanwhile;
                                                     QEMU's copy-on-read filter brings the
                                                     blocks it reads first
    concluded → blockdev-del raw, nbd; the server stops; the target stands alone

A failure before the stream starts removes everything it added (device, nodes, server,
target file).

Journaled (a VM with a run directory): the operation's record (:mod:`blockctl._journal`, a
stream whose backing is the server, the server's pid named) is written before the hot-plug,
from its plan (device id, node names; it names the nodes the hot-plug adds and the files made
for it), and rewritten from QEMU's graph once the disk is attached, before the stream
starts: a controller killed before the ``device_add`` leaves `blockctl recover` to delete
those nodes and files and stop the server (the guest never had the disk); killed after it,
recovery copies. The server runs in its own session, not tied to this
process. A controller that is killed, interrupted or sees the copy fail leaves the server
running and the record; ``blockctl recover`` adopts the copy (or starts it again while the
server runs), then deletes the backup nodes and stops the server. Server killed: recovery
starts a new one and puts the target on new backup nodes (``blockdev-reopen``), then copies.
QEMU killed: recovery stops the server and says how to make the target whole keeping the
guest's writes (the controller keeps the record however early or late QEMU dies: before the
stream, during it, or in the cleanup after it, and raises ConnectionLost).

A raw target (a new raw file, or an existing block device: ``host_device``) cannot back onto
anything, so the guest's disk runs on a temporary local qcow2 overlay over the backup nodes,
mirrored into the target::

    new raw target (a file: created 0600; a block device: at least the point's size)
    new empty qcow2 overlay (next to a file target; else in the run directory) over the
    backup nodes, hot-plugged as above
    blockdev-add the target's nodes (file or host_device → raw)
    blockdev-mirror overlay → target, sync full, copy-mode write-blocking (a guest write
    completes once it is on the target too)
    READY → job-complete: the device pivots onto the target's raw node
    concluded with no error and offset == length, the device on the target → flush the
    target (blockdev-reopen), then blockdev-del the overlay and backup nodes, remove the
    overlay file; the server stops

Journaled as a ``mirror`` record (before: overlay ← backup; after: the target's raw node);
``recover`` adopts the mirror (pivoting at READY), or mirrors again while the server runs.

A lost VM is launched from its config instead (:func:`launch_live`): the server starts in
the new run directory and the target is made before QEMU, whose launch plan puts the
config's drive over the backup nodes (``launch_detached``'s ``prepare`` returns
:class:`blockctl._machine.Prepared`): a qcow2 drive on the target itself, a raw drive (a
new file, a block device or an iSCSI LUN) on the temporary overlay, as above. The copy's
record (a stream's, or a mirror's naming the target's nodes to add) is written in
``prepare``, before QEMU's spawn, from the launch plan's node names, and names the files
``prepare`` made until the spawn (``Prepared.spawned`` rewrites it): ``blockctl recover``
of a launch killed before the spawn removes them and stops the server; killed from the
spawn on, it copies. The guest starts on the drive at once, then the stream (qcow2) or the
target's nodes and the mirror (raw), the record rewritten from QEMU's graph, and recovery
are the hot-plug paths' above. A failure before the copy starts shuts the VM down and
removes the overlay and a new target. A LUN drive (named by its URL) is the raw path with
the LUN as the mirror's target: the config's credentials (a CHAP ``secret`` object added
before the LUN's node, the record naming its password file), the LUN's size checked before
the copy.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from blockctl import _argv, _fsutil, _images, _journal, _proc, _runtime
from blockctl._argv import DrivePlan
from blockctl._backup import remote
from blockctl._backup.serve import (
    BACKUP_NODE_PREFIX,
    PointExport,
    backing_nodes,
    serve_point,
    socket_in,
)
from blockctl._backup.store import Repository
from blockctl._jobs import DEFAULT_CONTROL, JobControl, JobHook, JobResult, start_job
from blockctl._log import get_logger
from blockctl._machine import VM, Prepared, Timeouts, attach, launch_detached, shutdown_detached
from blockctl._ops import drives
from blockctl._ops.nodes import delete_nodes, delete_secrets, flush_chain, read_graph
from blockctl._qmp import wire
from blockctl.errors import (
    BackupCorrupt,
    BlockctlError,
    ConfigError,
    ConnectionLost,
)
from blockctl.types import (
    Drive,
    ErrorPolicy,
    ImageFormat,
    Interface,
    IscsiSource,
    MachineConfig,
    Media,
    NfsSource,
)

_log = get_logger()

#: Test hook: called with ``"served"`` right after a live restore's (or launch's) server
#: listens, before its record names the server's pid, and with ``"attached"`` right after a
#: live restore's hot-plug returned, before its record is rewritten from QEMU's graph (crash
#: tests kill the process here).
FAILPOINT: Callable[[str], None] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveRestoreResult:
    """A finished live restore: the guest's new disk stands alone on ``path``."""

    device_id: str  # the new device in the guest
    path: Path | IscsiSource | NfsSource  # a file, a block device, an iSCSI LUN, an NFS image
    point: str
    source_device: str  # the disk of the point
    #: Seconds from the call until the guest had the disk (what an outage lasts).
    seconds_to_attach: float
    seconds: float
    job: JobResult


def check_point(repo: Repository, vm_name: str, point: str, device: str) -> int:
    """The cheap check before a live restore: the index matches the manifest and every chunk
    it names is present (a full read is ``backup verify``; each chunk is still checked
    against its digest as it is served). Returns the disk's size."""
    disk = repo.get(vm_name, point).disk(device)
    index = repo.read_index(vm_name, point, device)
    if index.disk_digest() != disk.disk_digest or index.virtual_size != disk.virtual_size:
        raise BackupCorrupt(
            f"the index of {device} in {point} does not match its manifest: the repository is "
            "damaged (run `blockctl backup verify`)"
        )
    missing = [d for d in index.referenced() if not repo.has_chunk(d)]
    if missing:
        raise BackupCorrupt(
            f"{len(missing)} chunk(s) of {device} in {point} are missing (the first: "
            f"{missing[0].hex()[:16]}…): the point cannot be restored; run `blockctl backup "
            "verify` to see which points are affected"
        )
    return index.virtual_size


async def restore_live(
    vm: VM,
    repo: Repository,
    vm_name: str,
    point: str,
    device: str,
    target: Path | IscsiSource | NfsSource,
    *,
    interface: Interface = Interface.VIRTIO,
    control: JobControl = DEFAULT_CONTROL,
    target_format: ImageFormat = ImageFormat.QCOW2,
) -> LiveRestoreResult:
    """Hot-plug ``device`` of ``vm_name``'s backup ``point`` into the running ``vm`` as a new
    disk on ``target`` (a new qcow2, 0600), usable by the guest at once, and copy the point
    into it underneath (``block-stream``; ``control``'s speed, deadline (default 3600 s) and
    hooks as for any job; its error policy must be ``report``). Returns once the disk stands
    alone: no backing file, no backup node, no server. The repository is held shared for
    the whole time (no gc).

    ``target_format`` raw: ``target`` is a new raw file (0600) or an existing block device at
    least as large as the disk; the guest runs on a temporary qcow2 overlay meanwhile, which
    is mirrored into the target (module docstring); the result's ``job`` is the mirror.
    ``target`` may also be an :class:`IscsiSource` (raw only): an existing LUN at least as
    large as the disk, opened by QEMU's initiator (node ``iscsi``) as the mirror's target; or
    an :class:`NfsSource` (raw only): an existing image on an NFS server at least as large as
    the disk, opened by QEMU's NFS client (node ``nfs``) likewise."""
    started = time.monotonic()
    if control.on_error is not ErrorPolicy.REPORT:
        raise ConfigError(
            "on_error", "a live restore's copy fails on its first error (policy 'report')"
        )
    raw = target_format is ImageFormat.RAW
    if target_format not in (ImageFormat.QCOW2, ImageFormat.RAW):
        raise ConfigError("target_format", "a live restore writes a qcow2 or a raw target")
    copy = ("blockdev-mirror", "job-complete") if raw else ("block-stream",)
    await vm.require("blockdev-add", "device_add", *copy, "job-dismiss")
    if isinstance(target, IscsiSource | NfsSource):
        _check_remote_target(target, raw)
        device_target = True  # an existing target: nothing to create or remove
    else:
        target = _local_target(target)
        device_target = raw and target.is_block_device()
    if isinstance(target, Path) and not device_target and (target.exists() or target.is_symlink()):
        raise ConfigError(
            "target",
            f"{target} exists; a live restore writes a new file"
            + (" or an existing block device" if raw else ""),
        )
    with repo.lock(exclusive=False):
        size = await anyio.to_thread.run_sync(check_point, repo, vm_name, point, device)
        if isinstance(target, Path) and device_target:
            _check_device_size(target, size)
        call = _Call(
            vm=vm,
            repo=repo,
            vm_name=vm_name,
            point=point,
            device=device,
            target=target,
            size=size,
            device_target=device_target,
            interface=interface,
            control=control,
            started=started,
        )
        copied = await (_restore_raw if raw else _restore_qcow2)(call)
    return LiveRestoreResult(
        device_id=copied.device_id,
        path=target,
        point=point,
        source_device=device,
        seconds_to_attach=round(copied.attached, 3),
        seconds=round(time.monotonic() - started, 3),
        job=copied.job,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveLaunchResult:
    """A finished live launch: the VM runs, its disk stands alone on ``path``."""

    vm: str  # the launched VM's name
    device_id: str  # the config's drive that came back from the point
    path: Path | IscsiSource | NfsSource  # a file, a block device, the config's LUN or image
    format: ImageFormat  # the drive's: qcow2 (streamed into) or raw (mirrored into)
    point: str
    source_device: str  # the disk of the point
    #: Seconds from the call until QEMU ran the guest on the disk (what an outage lasts,
    #: the guest's own boot aside).
    seconds_to_start: float
    seconds: float
    job: JobResult


async def launch_live(
    config: MachineConfig,
    repo: Repository,
    vm_name: str,
    point: str,
    device: str,
    target: Path | str | IscsiSource | NfsSource,
    *,
    control: JobControl = DEFAULT_CONTROL,
    timeouts: Timeouts | None = None,
    target_format: ImageFormat | None = None,
) -> LiveLaunchResult:
    """Launch the VM of ``config`` (as ``blockctl up``: it outlives this call) with its drive
    whose file is ``target`` brought back from ``device`` of ``vm_name``'s backup ``point``,
    served by the point's NBD server (nbdkit, started in the VM's run directory before QEMU)
    from the start, so the guest starts at once; then the point is copied underneath,
    journaled as :func:`restore_live`'s (``blockctl recover`` finishes it after a crash).
    Returns once the disk stands alone; the VM keeps running.

    A qcow2 drive: ``target`` is made a new empty qcow2 (0600) whose run-time backing is the
    server, streamed into (``block-stream``). A raw drive: ``target`` is a new raw file
    (0600) or an existing block device at least the disk's size; QEMU starts with the drive
    on a temporary qcow2 overlay over the server (where :func:`restore_live` puts it), which
    is then mirrored into ``target`` (write-blocking) and pivoted onto it. A raw LUN drive:
    ``target`` is its URL (``iscsi://portal/target/lun``, a str or an :class:`IscsiSource`;
    the config's drive gives the initiator name and CHAP credentials), an existing LUN at
    least the disk's size, mirrored into as a block device is. A raw NFS drive likewise:
    ``target`` is its URL (``nfs://server/path``, with the config's uid and gid if it gives
    them; a str or an :class:`NfsSource`), an existing image at least the disk's size, opened
    by QEMU's own NFS client. The drive must not
    be read-only, a snapshot, copy-on-read (raw), passed through or vhost-user-blk.
    ``target_format``, if given, must be the drive's format (the config's decides).
    A failure before the copy starts leaves nothing: the VM shut down, its run directory,
    the server, the overlay and a new ``target`` gone."""
    started = time.monotonic()
    if control.on_error is not ErrorPolicy.REPORT:
        raise ConfigError(
            "on_error", "a live restore's copy fails on its first error (policy 'report')"
        )
    name = config.name
    if name is None:
        raise ConfigError("name", "a VM launched from a backup point needs a name")
    named = _launch_target(target)
    index, drive_format = _launch_drive(config, named)
    if target_format is not None and target_format is not drive_format:
        raise ConfigError(
            "target_format",
            f"the config's drive[{index}] on {named} is {drive_format.value}, not "
            f"{target_format.value}: the config's format is the one launched. Way out: give "
            "the matching format (-O), or none",
        )
    raw = drive_format is ImageFormat.RAW
    # The LUN or NFS image as the config gives it (a LUN's initiator name and CHAP
    # credentials, an image's uid and gid), or a path.
    remote_image = config.drives[index].iscsi or config.drives[index].nfs
    dest: Path | IscsiSource | NfsSource = remote_image or Path(named)
    local = dest if isinstance(dest, Path) else None  # a local file or block device
    device_target = local is None or (raw and local.is_block_device())
    if local is not None and not device_target and (local.exists() or local.is_symlink()):
        raise ConfigError(
            "target",
            f"{local} exists; a live launch writes a new file"
            + (" or an existing block device" if raw else ""),
        )
    tag = secrets.token_hex(2)
    base = f"{BACKUP_NODE_PREFIX}{tag}"
    overlay = None
    if raw:
        # Where restore_live's raw path puts it (a device's: not in the run directory, which
        # goes with the VM while this overlay may hold the guest's only writes).
        overlay = (
            local.parent / f".{local.name}.live-overlay-{tag}.qcow2"
            if local is not None and not device_target
            else _live_overlay_dir() / f"live-overlay-{tag}.qcow2"
        )
    made: list[Path] = []  # the files prepare made: removed on a failure before the copy
    with repo.lock(exclusive=False):
        size = await anyio.to_thread.run_sync(check_point, repo, vm_name, point, device)
        if local is not None and device_target:
            _check_device_size(local, size)
        elif remote_image is not None:
            # Before QEMU starts: a guest launched onto a LUN too small would run (and write)
            # until the LUN's node were added and measured, then go with its writes. Measured
            # again once the node is in (_add_target): the LUN is not ours to hold.
            have = await remote.size_of(remote_image)
            if have < size:
                raise _too_small(remote_image, have, size, "nothing was launched; ")
        async with contextlib.AsyncExitStack() as stack:
            exports: list[PointExport] = []
            planned: list[_journal.Op] = []

            async def prepare(run_dir: Path) -> Prepared:
                launched = config
                on_overlay = config.drives[index]
                # The files made, in order.
                making = [local] if local is not None and not device_target else []
                if overlay is not None:
                    making.append(overlay)
                    # QEMU starts with the drive on the overlay; the mirror takes it to
                    # ``target`` (the drive's record then names the target's nodes).
                    on_overlay = replace(
                        on_overlay, file=overlay, format=ImageFormat.QCOW2, iscsi=None, nfs=None
                    )
                    launched = replace(
                        config,
                        drives=(*config.drives[:index], on_overlay, *config.drives[index + 1 :]),
                    )

                def starting(home: Path) -> None:
                    # The copy's record, before the server starts and QEMU: a controller
                    # killed from here on leaves it to `blockctl recover` (QEMU's record is
                    # written at its spawn), which copies, or says what the target holds
                    # once QEMU is gone. It names the server's directory (where nbdkit
                    # writes its pid; the record gets the pid once it listens) and, until
                    # QEMU's spawn, the files made here: killed before QEMU started,
                    # recover stops the server and removes them (nothing ran on them).
                    server = _server_record(repo, vm_name, point, device, home)
                    socket = socket_in(home)
                    if overlay is None:
                        assert local is not None  # a qcow2 drive: a new local file
                        intent = _launch_intent(name, index, base, local, socket, server)
                    else:
                        intent = _launch_mirror_intent(
                            name,
                            index,
                            base,
                            overlay,
                            on_overlay,
                            dest,
                            size,
                            device_target,
                            socket,
                            server,
                        )
                    intent = replace(intent, created_files=tuple(str(p) for p in making))
                    planned.append(_journal.begin_at(run_dir, intent, lambda: False))

                exports.append(
                    await stack.enter_async_context(
                        serve_point(
                            repo,
                            vm_name,
                            point,
                            device,
                            run_dir,
                            size=size,
                            detached=True,
                            into=name,
                            starting=starting,
                        )
                    )
                )
                if FAILPOINT is not None:
                    FAILPOINT("served")
                op = planned[0]
                server = _server_record(
                    repo, vm_name, point, device, exports[0].home, exports[0].pid
                )
                op.step(op.intent.step, server=server)
                for path in making:
                    made.append(path)
                    raw_target = overlay is not None and path == local
                    fmt = ImageFormat.RAW if raw_target else ImageFormat.QCOW2
                    await _images.create(path, fmt, size=size)

                def spawned() -> None:
                    op.step(op.intent.step, created_files=())

                return Prepared(
                    launched, {index: backing_nodes(base, exports[0].socket)}, spawned=spawned
                )

            try:
                await launch_detached(config, prepare=prepare, timeouts=timeouts or Timeouts())
            except BaseException:
                for op in planned:
                    op.release()  # removed with the run directory
                _remove(made)
                raise
            (export,) = exports

            def call_on(vm: VM) -> _Call:
                return _Call(
                    vm=vm,
                    repo=repo,
                    vm_name=vm_name,
                    point=point,
                    device=device,
                    target=dest,
                    size=size,
                    device_target=device_target,
                    interface=config.drives[index].interface,
                    control=control,
                    started=started,
                )

            copied = await _copy_launched(
                name, call_on, base, export, overlay, made, planned[0] if planned else None
            )
    return LiveLaunchResult(
        vm=name,
        device_id=copied.device_id,
        path=dest,
        format=ImageFormat.RAW if raw else ImageFormat.QCOW2,
        point=point,
        source_device=device,
        seconds_to_start=round(copied.attached, 3),
        seconds=round(time.monotonic() - started, 3),
        job=copied.job,
    )


def _remove(files: Sequence[Path]) -> None:
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _launch_target(target: Path | str | IscsiSource | NfsSource) -> Path | str:
    """A live launch's target: a local file or block device (absolute), or a LUN's or an NFS
    image's URL (``iscsi://portal/target/lun``, ``nfs://server/path``, as
    :attr:`blockctl.types.Drive.remote_url` gives them; a Path has folded the URL's ``//``
    into ``/``, so a URL comes as a str)."""
    if isinstance(target, IscsiSource | NfsSource):
        return target.url
    if isinstance(target, str) and target.startswith("iscsi://"):
        return IscsiSource.from_url(target, "target").url  # checked, its port spelled out
    if isinstance(target, str) and target.startswith("nfs://"):
        return NfsSource.from_url(target, "target").url
    return _local_target(target)


def _same_remote(drive: Drive, url: str) -> bool:
    """Whether ``url`` is the drive's LUN or NFS image (an NFS URL without the config's
    ?uid=&gid= names the same image)."""
    mine = drive.remote_url
    if mine is None:
        return False
    return mine == url or (
        drive.nfs is not None and mine.partition("?")[0] == url.partition("?")[0]
    )


def _launch_drive(config: MachineConfig, target: Path | str) -> tuple[int, ImageFormat]:
    """The index and format of the config's drive whose file is ``target`` (a path), or whose
    LUN it is (a URL), checked for a live launch."""
    for i, drive in enumerate(config.drives):
        if isinstance(target, str):
            if not _same_remote(drive, target):
                continue
        elif drive.file is None or Path(drive.file).absolute() != target:
            continue
        where = f"drive[{i}]"
        if drive.remote_url is not None and drive.format is not ImageFormat.RAW:
            what = "a LUN drive" if drive.iscsi is not None else "an NFS drive"
            raise ConfigError(
                f"{where}.format",
                f"{what} launched from a point is raw (mirrored onto its storage; a qcow2 "
                f"image there is not a live target); {target} is "
                f"{drive.format.value if drive.format else 'unset'}",
            )
        if drive.passthrough is not None:
            raise ConfigError(
                f"{where}.passthrough",
                "a passed-through LUN is the guest's SCSI device itself: no overlay can stand "
                "in for it while the point comes back. Way out: launch it emulated (drop "
                "passthrough) for the restore",
            )
        if drive.format is None or drive.format not in (ImageFormat.QCOW2, ImageFormat.RAW):
            raise ConfigError(
                f"{where}.format",
                f"a live launch writes a qcow2 or a raw drive ({target} is "
                f"{drive.format.value if drive.format else 'unset'})",
            )
        if drive.read_only or drive.snapshot or drive.media is not Media.DISK:
            raise ConfigError(
                where, "a live launch restores a writable disk (not read-only, no snapshot)"
            )
        if drive.copy_on_read and drive.format is ImageFormat.RAW:
            raise ConfigError(
                f"{where}.copy_on_read",
                "a raw drive launched from a point is mirrored from an overlay, which a "
                "copy-on-read filter would sit on: not built. Way out: drop copy_on_read "
                "from the config for the launch",
            )
        return i, drive.format
    if isinstance(target, str):
        lun = target.startswith("iscsi://")
        what, kinds = ("LUN", "LUNs") if lun else ("NFS image", "NFS images")
        urls = ", ".join(
            str(d.remote_url) for d in config.drives if (d.iscsi if lun else d.nfs) is not None
        )
        raise ConfigError(
            "target",
            f"no drive of the config is the {what} {target} (its {kinds}: {urls or 'none'}): "
            f"a live launch brings back the drive whose {what} is the target",
        )
    files = ", ".join(str(d.file) for d in config.drives if d.file is not None) or "none"
    raise ConfigError(
        "target",
        f"no drive of the config has the file {target} (its files: {files}): a live launch "
        "brings back the drive whose file is the target",
    )


async def _copy_launched(
    name: str,
    call_on: Callable[[VM], _Call],
    base: str,
    export: PointExport,
    overlay: Path | None,
    made: Sequence[Path],
    planned: _journal.Op | None,
) -> _Copied:
    """The launched VM runs on the backup: journal the copy, stream (qcow2) or mirror from
    ``overlay`` (raw), clean up. A qcow2 drive's record (``planned``) was written before
    QEMU started and is rewritten from QEMU's graph. Until the copy starts, a failure shuts
    the VM down and removes the files ``made`` (and the record)."""
    # True until the record is written; after that only the copy's own rollback (it never
    # started, QEMU still there) sets it again.
    undone = True
    try:
        async with attach(name) as vm:
            call = call_on(vm)
            device_id = next(
                r.device_id
                for r in vm.registry.drives.values()
                if any(n.get("backing") == base for n in r.nodes)
            )
            attached = _attached(vm, device_id, call.point, call.started)

            async def undo() -> None:
                nonlocal undone
                undone = True

            if overlay is None:
                await vm.require("block-stream", "job-dismiss")
                op = await _begin(
                    call, device_id, export, op_id="" if planned is None else planned.intent.id
                )
                undone = False
                result = await _stream(
                    vm,
                    device_id,
                    base,
                    call.control.speed,
                    call.control.deadline_or(3600.0),
                    call.control.hooks,
                    op,
                    export,
                    undo,
                )
            else:
                await vm.require("blockdev-mirror", "job-complete", "job-dismiss")
                record = vm.registry.drives[device_id]
                image = next(str(n["node-name"]) for n in record.nodes if n.get("backing") == base)
                target_nodes = _target_nodes(
                    record.nodes, image, call.target, call.size, call.device_target
                )
                await _add_target(call, target_nodes)  # a failure here: the VM goes (undone)
                op = await _begin_mirror(
                    call,
                    device_id,
                    export,
                    target_nodes,
                    op_id=planned.intent.id if planned else "",
                )
                undone = False
                result = await _mirror(
                    vm,
                    device_id,
                    image,
                    base,
                    target_nodes,
                    overlay,
                    call.control,
                    op,
                    export,
                    undo,
                )
    except BaseException:
        if undone:
            with anyio.CancelScope(shield=True):
                if planned is not None:
                    planned.finished()  # nothing to recover: the VM and the target go
                with contextlib.suppress(BlockctlError, OSError):
                    await shutdown_detached(name)
                _remove(made)
        raise
    return _Copied(device_id, attached, result)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Call:
    """One call of :func:`restore_live` (or :func:`launch_live`, once its VM runs),
    checked, as the target's path gets it (the repository lock held)."""

    vm: VM
    repo: Repository
    vm_name: str
    point: str
    device: str  # the disk of the point
    target: Path | IscsiSource | NfsSource
    size: int  # the disk's
    #: ``target`` exists (a block device, a LUN, an NFS image): not created, not removed.
    device_target: bool
    interface: Interface
    control: JobControl
    started: float  # time.monotonic() at the call


@dataclass(frozen=True, slots=True)
class _Copied:
    """What a target's path reports back: the new device, when the guest had it (seconds
    since the call), and the copy's job."""

    device_id: str
    attached: float
    job: JobResult


async def _restore_qcow2(call: _Call) -> _Copied:
    """The qcow2 target's path (``call.device_target`` is always false here)."""
    assert isinstance(call.target, Path)
    target = call.target
    journaled = call.vm.run_dir is not None
    planned: list[_journal.Op] = []  # the record written before the server, until rewritten
    try:
        async with _serving(call, planned, (target,), raw=False) as export:
            base = f"{BACKUP_NODE_PREFIX}{secrets.token_hex(2)}"
            backing = backing_nodes(base, export.socket)

            def before_hotplug(plan: DrivePlan) -> None:
                if journaled:
                    intent = _hotplug_intent(call, plan, base, export, created=(target,))
                    planned[0] = _journal.begin(call.vm, replace(intent, id=planned[0].intent.id))

            info = await _attach(
                call.vm, target, call.size, call.interface, backing, before_hotplug
            )
            attached = _attached(call.vm, info.device_id, call.point, call.started)
            if FAILPOINT is not None:
                FAILPOINT("attached")
            op = None
            if journaled:
                op = await _begin(call, info.device_id, export, op_id=planned[0].intent.id)
                planned.clear()
            result = await _stream(
                call.vm,
                info.device_id,
                base,
                call.control.speed,
                call.control.deadline_or(3600.0),
                call.control.hooks,
                op,
                export,
            )
    except BaseException:
        _unplanned(call.vm, planned)
        raise
    return _Copied(info.device_id, attached, result)


def _unplanned(vm: VM, planned: Sequence[_journal.Op]) -> None:
    """A live restore failed before its record was rewritten from QEMU's graph (the server
    has stopped by now): its own rollbacks ran (the hot-plug's, the files'), so the record
    goes; QEMU gone, it stays (``blockctl recover`` says what is on disk)."""
    for op in planned:
        if vm.session.lost:
            op.release()
        else:
            op.finished()


def _hotplug_intent(
    call: _Call,
    plan: DrivePlan,
    base: str,
    export: PointExport,
    *,
    created: Sequence[Path],
    overlay: Path | None = None,
) -> _journal.Intent:
    """A live restore's copy, recorded before the hot-plug from its plan as :func:`_begin`
    (qcow2) or :func:`_begin_mirror` (``overlay``: raw) record it from QEMU's graph once the
    disk is attached, naming the nodes the hot-plug adds and the files ``created`` for it:
    a controller killed before the device was added leaves them to ``blockctl recover``,
    which removes them and stops the server (the guest never had the disk); killed once it
    was added, recovery copies."""
    image = next(str(n["node-name"]) for n in plan.nodes if n.get("backing") == base)
    served = f"nbd+unix:///?socket={export.socket}"  # the NBD client's file, as QEMU names it
    server = _server_record(
        call.repo, call.vm_name, call.point, call.device, export.home, export.pid
    )
    plugged = tuple(reversed([str(n["node-name"]) for n in plan.nodes]))  # top-down
    if overlay is None:
        assert isinstance(call.target, Path)
        intent = _journal.Intent(
            id="",
            kind=_journal.OpKind.STREAM,
            vm=call.vm.name,
            devices={
                plan.device_id: _journal.DeviceChains(
                    before=(image, base),
                    after=(image,),
                    files_before=(str(call.target), served),
                    files_after=(str(call.target),),
                    formats_before=(ImageFormat.QCOW2.value, "raw"),
                )
            },
            drop_nodes=(base, f"{base}-nbd"),
            drop_files=(served,),
            what=(
                f"live restore of {call.device} ({call.point}) into {call.target.name} on "
                f"{plan.device_id}"
            ),
        )
    else:
        target_nodes = _target_nodes(
            plan.record_nodes(), image, call.target, call.size, call.device_target
        )
        intent = _journal.Intent(
            id="",
            kind=_journal.OpKind.MIRROR,
            vm=call.vm.name,
            active=True,
            devices={
                plan.device_id: _journal.DeviceChains(
                    before=(image, base),
                    after=(str(target_nodes[-1]["node-name"]),),
                    files_before=(str(overlay), served),
                    files_after=(_target_name(call.target),),
                    formats_before=(ImageFormat.QCOW2.value, "raw"),
                )
            },
            drop_nodes=(image, f"{image}-file", base, f"{base}-nbd"),
            drop_files=(str(overlay),),
            delete_files=True,
            add_nodes={plan.device_id: target_nodes},
            what=(
                f"live restore of {call.device} ({call.point}) into {_target_name(call.target)} "
                f"(raw) on {plan.device_id}"
            ),
        )
    return replace(
        intent,
        server=server,
        hotplug_nodes=plugged,
        created_files=tuple(str(p) for p in created),
    )


def _attached(vm: VM, device_id: str, point: str, started: float) -> float:
    """The guest has the disk: said; returns the seconds since the call."""
    attached = time.monotonic() - started
    _log.info(
        "blockctl.backup.live_attached",
        vm=vm.name,
        device=device_id,
        point=point,
        seconds=round(attached, 3),
    )
    return attached


_URL = re.compile(r"^[a-z][a-z0-9+.-]*:/")


def _local_target(target: Path | str) -> Path:
    """A file or block device target; a URL other than an iSCSI source is refused (a Path
    has folded its ``//`` into ``/``)."""
    if _URL.match(str(target)):
        raise ConfigError(
            "target",
            f"{target}: a live restore writes a local file, a block device, an iSCSI LUN or "
            "an NFS image (given as an IscsiSource or an NfsSource, or to the CLI as "
            "iscsi://host[:port]/iqn/lun or nfs://server/path), not this URL",
        )
    return Path(target).absolute()


def _check_remote_target(target: IscsiSource | NfsSource, raw: bool) -> None:
    what = "a LUN" if isinstance(target, IscsiSource) else "an NFS image"
    if not raw:
        raise ConfigError(
            "target_format",
            f"{target.url}: {what} is written raw; a qcow2 live restore (block-stream) writes "
            "a new local file. Way out: target format raw (the CLI's -O raw)",
        )


def _target_name(target: Path | IscsiSource | NfsSource) -> str:
    """How records and messages name a target (a LUN or an NFS image by its URL, never
    credentials)."""
    return target.url if isinstance(target, IscsiSource | NfsSource) else str(target)


def _check_device_size(path: Path, size: int) -> None:
    with open(path, "rb") as dev:
        have = dev.seek(0, os.SEEK_END)
    if have < size:
        raise ConfigError(
            "target",
            f"{path} holds {have} bytes, the disk {size}: give a block device at least as large",
        )


def _live_overlay_dir() -> Path:
    """Where a block device's or LUN's live restore keeps its overlay: ``_live-overlays``
    in the runtime root, private (no VM can be named so: names start with a letter or
    digit)."""
    directory = _runtime.runtime_root() / "_live-overlays"
    _fsutil.make_private_dir(directory, what="runtime_dir")
    return directory


async def _restore_raw(call: _Call) -> _Copied:
    """The raw target's path."""
    journaled = call.vm.run_dir is not None
    tag = secrets.token_hex(2)
    if call.device_target:
        # Not in the run directory: that goes with the VM (`blockctl down`, the end of
        # open_vm), and once QEMU is gone this overlay holds the only copy of the guest's
        # writes, until the way on that recovery gives has put them onto the target.
        overlay = _live_overlay_dir() / f"live-overlay-{tag}.qcow2"
    else:
        assert isinstance(call.target, Path)
        overlay = call.target.parent / f".{call.target.name}.live-overlay-{tag}.qcow2"
    made = [overlay]  # made for the restore (the overlay by _attach)
    if not call.device_target and isinstance(call.target, Path):
        made.append(call.target)
    planned: list[_journal.Op] = []  # the record written before the server, until rewritten
    try:
        async with _serving(call, planned, made, raw=True) as export:
            base = f"{BACKUP_NODE_PREFIX}{tag}"
            if not call.device_target and isinstance(call.target, Path):
                await _images.create(call.target, ImageFormat.RAW, size=call.size)

            def before_hotplug(plan: DrivePlan) -> None:
                if journaled:
                    intent = _hotplug_intent(
                        call, plan, base, export, created=made, overlay=overlay
                    )
                    planned[0] = _journal.begin(call.vm, replace(intent, id=planned[0].intent.id))

            info = await _attach(
                call.vm,
                overlay,
                call.size,
                call.interface,
                backing_nodes(base, export.socket),
                before_hotplug,
            )
            attached = _attached(call.vm, info.device_id, call.point, call.started)
            if FAILPOINT is not None:
                FAILPOINT("attached")
            record = call.vm.registry.drives[info.device_id]
            image = next(str(n["node-name"]) for n in record.nodes if n.get("backing") == base)
            target_nodes = _target_nodes(
                record.nodes, image, call.target, call.size, call.device_target
            )
            try:
                await _add_target(call, target_nodes)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await _delete_target_secrets(call.vm, target_nodes)
                    await _detach(call.vm, info.device_id, record.nodes)
                raise
            op = None
            if journaled:
                op = await _begin_mirror(
                    call, info.device_id, export, target_nodes, op_id=planned[0].intent.id
                )
                planned.clear()
            result = await _mirror(
                call.vm,
                info.device_id,
                image,
                base,
                target_nodes,
                overlay,
                call.control,
                op,
                export,
            )
    except BaseException:
        # A new file target nothing writes to any more (the mirror never started, or it was
        # taken away with the device) goes; one the device may still use stays.
        if not call.device_target and isinstance(call.target, Path) and not overlay.exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(call.target)
        _unplanned(call.vm, planned)
        raise
    return _Copied(info.device_id, attached, result)


async def _add_target(call: _Call, target_nodes: Sequence[dict[str, Any]]) -> None:
    """The raw target's nodes, bottom-up: a CHAP LUN's ``secret`` object first, a LUN's or
    NFS image's size checked once its node is there. On a failure the caller removes what
    was added (the hot-plug: the secret, the disk; a launch: the VM)."""
    await _add_target_secret(call.vm, call.target, target_nodes)
    for node in target_nodes:
        await wire.blockdev_add(call.vm.session, node)
        if node is target_nodes[0] and not isinstance(call.target, Path):
            await _check_remote_size(call, str(node["node-name"]))


async def _check_remote_size(call: _Call, node: str) -> None:
    """The LUN's or NFS image's node was just added: it must hold the disk (else deleted,
    and refused)."""
    have = next(
        (n.virtual_size or 0 for n in await call.vm.block_nodes() if n.node_name == node), 0
    )
    if have < call.size:
        await delete_nodes(call.vm, [node], event="blockctl.backup.live_node_kept")
        assert not isinstance(call.target, Path)
        raise _too_small(call.target, have, call.size)


def _too_small(
    target: IscsiSource | NfsSource, have: int, size: int, done: str = ""
) -> ConfigError:
    """The refusal of a LUN or an NFS image smaller than the disk (``done``: what became of
    the operation), with the way to a large enough one."""
    grow = (
        "a LUN at least as large (grow its backing store, then make its LU again)"
        if isinstance(target, IscsiSource)
        else "an NFS image at least as large (e.g. `qemu-img resize -f raw` on it)"
    )
    return ConfigError(
        "target", f"{target.url} holds {have} bytes, the disk {size}: {done}give {grow}"
    )


async def _add_target_secret(
    vm: VM, target: Path | IscsiSource | NfsSource, target_nodes: Sequence[dict[str, Any]]
) -> None:
    """A CHAP LUN's ``secret`` object, before its node (the node names it)."""
    if not isinstance(target, IscsiSource) or target.password_file is None:
        return
    await wire.secret_add(vm.session, _argv.chap_secret(str(target_nodes[0]["node-name"]), target))


async def _delete_target_secrets(vm: VM, target_nodes: Sequence[dict[str, Any]]) -> None:
    """The target's ``secret`` objects, its nodes gone (or never added)."""
    await delete_secrets(
        vm, [str(n["password-secret"]) for n in target_nodes if "password-secret" in n]
    )


def _target_nodes(
    nodes: Sequence[Any],
    image: str,
    target: Path | IscsiSource | NfsSource,
    size: int,
    device_target: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw target's nodes (bottom-up), with the overlay's cache and discard options."""
    overlay_file = next(n for n in nodes if n["node-name"] == f"{image}-file")
    name = f"{image}-target"
    file_node: dict[str, Any]
    if isinstance(target, IscsiSource):
        # QEMU's own initiator (libiscsi) opens the LUN: no kernel session, no device node.
        file_node = {
            "driver": "iscsi",
            "node-name": f"{name}-file",
            "transport": "tcp",
            "portal": target.portal,
            "target": target.target,
            "lun": target.lun,
            "cache": overlay_file.get("cache"),
            "initiator-name": target.initiator_name,
        }
        if target.password_file is not None:
            # CHAP: the password in a secret object QEMU reads from the file
            # (:func:`_add_target_secret`); the node names only the object.
            file_node["user"] = target.user
            file_node["password-secret"] = _argv.secret_id(f"{name}-file")
        file_node = {k: v for k, v in file_node.items() if v is not None}
    elif isinstance(target, NfsSource):
        # QEMU's own NFSv3 client (libnfs): the host mounts nothing.
        file_node = {
            "driver": "nfs",
            "node-name": f"{name}-file",
            "server": {"type": "inet", "host": target.server},
            "path": target.path,
            "user": target.user,
            "group": target.group,
            "readahead-size": target.readahead_size,
            "cache": overlay_file.get("cache"),
        }
        file_node = {k: v for k, v in file_node.items() if v is not None}
    else:
        file_node = {
            **overlay_file,
            "driver": "host_device" if device_target else "file",
            "node-name": f"{name}-file",
            "filename": str(target),
        }
    raw = {
        "driver": "raw",
        "node-name": name,
        "file": f"{name}-file",
        "cache": overlay_file.get("cache"),
        "discard": overlay_file.get("discard"),
        "read-only": False,
    }
    if device_target:
        raw["size"] = size  # the disk's size, not the device's
    return file_node, {k: v for k, v in raw.items() if v is not None}


async def _begin_mirror(
    call: _Call,
    device_id: str,
    export: PointExport,
    target_nodes: Sequence[dict[str, Any]],
    op_id: str = "",
) -> _journal.Op:
    """The record of the copy to come: the device leaves its overlay and the backup nodes for
    the target's raw node; the overlay file goes with them. ``op_id``: the record to rewrite
    (a live launch's, written before QEMU started)."""
    graph = await read_graph(call.vm)
    chain = graph.chain_of(device_id)
    dropped = [n for layer in chain for n in graph.layer_nodes(layer)]
    chains = _journal.DeviceChains(
        before=tuple(n.name for n in chain),
        after=(str(target_nodes[-1]["node-name"]),),
        files_before=tuple(str(n.filename) for n in chain),
        files_after=(_target_name(call.target),),
        formats_before=tuple(n.driver for n in chain),
    )
    server = _server_record(
        call.repo, call.vm_name, call.point, call.device, export.home, export.pid
    )
    intent = _journal.Intent(
        id=op_id,
        kind=_journal.OpKind.MIRROR,
        vm=call.vm.name,
        active=True,
        devices={device_id: chains},
        drop_nodes=tuple(dropped),
        drop_files=(str(chain[0].filename),),
        delete_files=True,
        add_nodes={device_id: tuple(target_nodes)},
        server=server,
        secret_files=_secret_files(call.target, target_nodes),
        what=(
            f"live restore of {call.device} ({call.point}) into {_target_name(call.target)} "
            f"(raw) on {device_id}"
        ),
    )
    return _journal.begin(call.vm, intent)


def _secret_files(
    target: Path | IscsiSource | NfsSource, target_nodes: Sequence[dict[str, Any]]
) -> dict[str, str]:
    """A CHAP LUN's ``secret`` object id → its password file (never the password)."""
    if not isinstance(target, IscsiSource) or target.password_file is None:
        return {}
    password_file = str(Path(target.password_file).absolute())
    return {
        str(n["password-secret"]): password_file for n in target_nodes if "password-secret" in n
    }


async def _mirror(
    vm: VM,
    device_id: str,
    image: str,
    base: str,
    target_nodes: Sequence[dict[str, Any]],
    overlay: Path,
    control: JobControl,
    op: _journal.Op | None,
    export: PointExport,
    undo: Callable[[], Awaitable[None]] | None = None,
) -> JobResult:
    """``undo``: how the disk is taken away when the mirror did not start (default: the
    target's nodes deleted, the disk unplugged and its overlay removed)."""
    record = vm.registry.drives[device_id]
    target = str(target_nodes[-1]["node-name"])
    started = False

    async def start(job_id: str) -> None:
        nonlocal started
        if op is not None:
            op.starting(job_id)
        await wire.blockdev_mirror(
            vm.session,
            job_id=job_id,
            device=image,
            target=target,
            copy_mode="write-blocking",
            speed=control.speed,
        )
        started = True

    hooks = control.hooks if op is None else (*control.hooks, op)
    try:
        async with start_job(
            vm.session, "mirror", start, target=image, speed=control.speed, hooks=hooks
        ) as job:
            result = await job.wait(
                complete_on_ready=True, deadline=control.deadline_or(3600.0), hooks=hooks
            )
        # JobResult: concluded with no error and offset == length. And QEMU must show the
        # pivot before anything the device ran on is given up.
        on = (await read_graph(vm)).chain_of(device_id)
        if [n.name for n in on] != [target]:
            raise BlockctlError(
                f"live restore of {device_id}: the mirror concluded but the device is on "
                f"{' ← '.join(n.name for n in on)}, not on {target}; nothing was removed"
            )
    except BaseException:
        if vm.session.lost and op is not None:
            op.release()  # QEMU is gone (as in _stream): the record is for `blockctl recover`
        elif not started:
            if op is not None:
                op.release()
            with anyio.CancelScope(shield=True):
                if undo is not None:
                    await undo()
                else:
                    await delete_nodes(
                        vm,
                        [str(n["node-name"]) for n in target_nodes],
                        event="blockctl.backup.live_node_kept",
                    )
                    await _delete_target_secrets(vm, target_nodes)
                    await _detach(vm, device_id, record.nodes)
            if op is not None:
                op.finished()
        else:
            _left_behind(vm, device_id, image, op, export)
        raise
    if op is not None:  # only the cleanup is left (recovery finishes it)
        op.step(_journal.Step.CONCLUDED)
    # The target's nodes are the drive's now; flushed before the overlay is given up.
    vm.registry.put(replace(record, nodes=tuple(target_nodes)))
    await flush_chain(vm, device_id)
    old = [str(n["node-name"]) for n in record.nodes]  # bottom-up: deleted top-down
    refused = await delete_nodes(vm, old, event="blockctl.backup.live_node_kept")
    _gone_after_the_copy(vm, device_id, op)
    if image not in refused and f"{image}-file" not in refused:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(overlay)
    if op is not None:
        op.finished()
    return result


def _gone_after_the_copy(vm: VM, device_id: str, op: _journal.Op | None) -> None:
    """After the copy concluded: QEMU went away during the cleanup (its node deletions
    failed quietly). Not a finished restore: what the target holds on disk is not known to
    be durable. The record (step concluded) stays for `blockctl recover` to report.

    :raise ConnectionLost: QEMU is gone.
    """
    if not vm.session.lost:
        return
    if op is not None:
        op.release()
    raise ConnectionLost(
        f"live restore on {device_id}: QEMU went away after the copy concluded, before its "
        f"cleanup; run `blockctl recover {vm.name}` for what the target holds and how to "
        "finish"
    )


def _left_behind(
    vm: VM, device_id: str, image: str, op: _journal.Op | None, export: PointExport
) -> None:
    """The copy started and did not finish: the disk stays (the guest may have written to
    it); journaled, the server stays too and the record says how to finish. (QEMU gone:
    the callers keep the record themselves.)"""
    if op is not None:
        op.release()
        export.keep_running = True
        _log.warning(
            "blockctl.backup.live_unfinished",
            vm=vm.name,
            device=device_id,
            image=image,
            server=export.pid,
            reason="the copy did not finish: the disk stays attached and reads the backup "
            "through its server, which keeps running; `blockctl recover "
            f"{vm.name}` copies the rest and finishes",
        )
    else:
        _log.warning(
            "blockctl.backup.live_left_attached",
            vm=vm.name,
            device=device_id,
            image=image,
            reason="the copy did not finish: the disk stays attached, what the guest "
            "wrote is kept in it, and blocks not yet copied fail to read once the backup's "
            f"server stops; detach it (blockctl detach {vm.name} {device_id}) and "
            "restore again",
        )


@contextlib.asynccontextmanager
async def _serving(
    call: _Call, planned: list[_journal.Op], created: Sequence[Path], *, raw: bool
) -> AsyncIterator[PointExport]:
    """The point's server; detached (not tied to this process) when the restore is
    journaled. Then the copy's first record is written before the server starts (into
    ``planned``), naming the server's directory (its pid once it listens) and the files
    ``created`` for the restore (made after it): a controller killed before the hot-plug's
    plan leaves them to ``blockctl recover``, which stops the server and removes them (the
    guest never had the disk)."""

    def starting(home: Path) -> None:
        if call.vm.run_dir is not None:
            planned.append(_journal.begin(call.vm, _serving_intent(call, home, created, raw)))

    with _server_home(call.vm) as home:
        async with serve_point(
            call.repo,
            call.vm_name,
            call.point,
            call.device,
            home,
            size=call.size,
            detached=call.vm.run_dir is not None,
            # Named only where `blockctl recover` finds it (a run directory: a journal).
            into=call.vm.name if call.vm.run_dir is not None else None,
            starting=starting,
        ) as export:
            if FAILPOINT is not None:
                FAILPOINT("served")
            for op in planned:  # the server's pid, now that it listens
                server = _server_record(
                    call.repo, call.vm_name, call.point, call.device, export.home, export.pid
                )
                op.step(op.intent.step, server=server)
            yield export


def _serving_intent(call: _Call, home: Path, created: Sequence[Path], raw: bool) -> _journal.Intent:
    """A live restore's first record, before its server starts (:func:`_serving`): the
    server in ``home`` (no pid yet) and the files to be ``created``; no device yet (the
    hot-plug's plan, which names it, comes once the target exists)."""
    return _journal.Intent(
        id="",
        kind=_journal.OpKind.MIRROR if raw else _journal.OpKind.STREAM,
        vm=call.vm.name,
        server=_server_record(call.repo, call.vm_name, call.point, call.device, home),
        created_files=tuple(str(p) for p in created),
        what=(
            f"live restore of {call.device} ({call.point}) into {_target_name(call.target)}"
            + (" (raw)" if raw else "")
        ),
    )


def _server_record(
    repo: Repository, vm_name: str, point: str, device: str, home: Path, pid: int = 0
) -> _journal.ServerRecord:
    """The journal's name for the server: its directory, the process (pid 0: recorded before
    it started; recovery then finds it by the pid file nbdkit writes in ``home``,
    :func:`blockctl._backup.serve.servers_in`), and what it serves."""
    return _journal.ServerRecord(
        pid=pid,
        pid_start=_proc.process_start(pid) if pid else None,
        home=str(home),
        repo=str(repo.path),
        source_vm=vm_name,
        point=point,
        device=device,
    )


def _launch_intent(
    name: str,
    index: int,
    base: str,
    target: Path,
    socket: Path,
    server: _journal.ServerRecord,
) -> _journal.Intent:
    """A live launch's copy, recorded before QEMU starts, as :func:`_begin` records it from
    QEMU's graph once the VM runs: the chain is the launch plan's (drive ``i`` is device
    ``disk{i}`` over image node ``drv{i}``, :func:`blockctl._argv.plan_drive`; here on the
    backup's raw node ``base`` over its NBD client ``base-nbd``)."""
    device_id, image = f"disk{index}", f"drv{index}"
    served = f"nbd+unix:///?socket={socket}"  # the NBD client's file, as QEMU names it
    chains = _journal.DeviceChains(
        before=(image, base),
        after=(image,),
        files_before=(str(target), served),
        files_after=(str(target),),
        formats_before=(ImageFormat.QCOW2.value, "raw"),
    )
    return _journal.Intent(
        id="",
        kind=_journal.OpKind.STREAM,
        vm=name,
        devices={device_id: chains},
        drop_nodes=(base, f"{base}-nbd"),
        drop_files=(served,),
        server=server,
        what=f"live restore of {server.device} ({server.point}) into {target.name} on {device_id}",
    )


def _launch_mirror_intent(
    name: str,
    index: int,
    base: str,
    overlay: Path,
    on_overlay: Drive,
    target: Path | IscsiSource | NfsSource,
    size: int,
    device_target: bool,
    socket: Path,
    server: _journal.ServerRecord,
) -> _journal.Intent:
    """A raw drive's launch: its mirror, recorded before QEMU starts as :func:`_begin_mirror`
    records it once the VM runs, from the launch plan (device ``disk{i}`` on the overlay's
    image node ``drv{i}`` over ``drv{i}-file``, backing onto ``base`` over ``base-nbd``;
    the target's nodes as :func:`_target_nodes` makes them from the overlay's file node; a
    CHAP LUN's password file named for its ``secret`` object, as :func:`_begin_mirror`)."""
    device_id, image = f"disk{index}", f"drv{index}"
    overlay_file = dict(
        _argv.protocol_node(
            f"{image}-file", str(overlay), on_overlay, block_device=False, read_only=False
        )
    )
    target_nodes = _target_nodes([overlay_file], image, target, size, device_target)
    served = f"nbd+unix:///?socket={socket}"
    chains = _journal.DeviceChains(
        before=(image, base),
        after=(str(target_nodes[-1]["node-name"]),),
        files_before=(str(overlay), served),
        files_after=(_target_name(target),),
        formats_before=(ImageFormat.QCOW2.value, "raw"),
    )
    return _journal.Intent(
        id="",
        kind=_journal.OpKind.MIRROR,
        vm=name,
        active=True,
        devices={device_id: chains},
        drop_nodes=(image, f"{image}-file", base, f"{base}-nbd"),
        drop_files=(str(overlay),),
        delete_files=True,
        add_nodes={device_id: target_nodes},
        server=server,
        secret_files=_secret_files(target, target_nodes),
        what=(
            f"live restore of {server.device} ({server.point}) into {_target_name(target)} (raw) "
            f"on {device_id}"
        ),
    )


@contextlib.contextmanager
def _server_home(vm: VM) -> Any:
    """Where the server's private directory goes: the VM's run directory, or (a QEMU
    blockctl did not launch) a private temporary one."""
    if vm.run_dir is not None:
        yield Path(vm.run_dir)
        return
    home = Path(tempfile.mkdtemp(prefix="blockctl-live-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def _attach(
    vm: VM,
    target: Path,
    size: int,
    interface: Interface,
    backing: Sequence[dict[str, Any]],
    planned: Callable[[DrivePlan], None] | None = None,
) -> drives.DriveInfo:
    """A new empty qcow2 at ``target``, hot-plugged over ``backing``; nothing left of it on
    a failure. ``planned``: :func:`blockctl._ops.drives.hotplug`'s (before anything is
    added)."""
    try:
        await _images.create(target, ImageFormat.QCOW2, size=size)
        drive = Drive(file=target, format=ImageFormat.QCOW2, interface=interface)
        return await drives.hotplug(vm, drive, backing=backing, planned=planned)
    except BaseException:
        # hotplug removed its nodes and device itself; the file is ours.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise


async def _begin(call: _Call, device_id: str, export: PointExport, op_id: str = "") -> _journal.Op:
    """The record of the copy to come: a stream of ``device_id`` off the backup nodes, and
    the server that recovery stops once they are gone. ``op_id``: the record to rewrite (a
    live launch's, written before QEMU started)."""
    graph = await read_graph(call.vm)
    intent = _journal.chain_intent(
        call.vm.name,
        _journal.OpKind.STREAM,
        device_id,
        graph,
        top=0,
        base=len(graph.chain_of(device_id)),
        delete_files=False,
    )
    server = _server_record(
        call.repo, call.vm_name, call.point, call.device, export.home, export.pid
    )
    assert isinstance(call.target, Path)
    what = f"live restore of {call.device} ({call.point}) into {call.target.name} on {device_id}"
    return _journal.begin(call.vm, replace(intent, id=op_id, server=server, what=what))


async def _stream(
    vm: VM,
    device_id: str,
    base: str,
    speed: int | None,
    deadline: float,
    hooks: Sequence[JobHook],
    op: _journal.Op | None,
    export: PointExport,
    undo: Callable[[], Awaitable[None]] | None = None,
) -> JobResult:
    """``undo``: how the disk is taken away when the stream did not start (default: it is
    unplugged and its file removed)."""
    record = vm.registry.drives[device_id]
    image = next(str(n["node-name"]) for n in record.nodes if n.get("backing") == base)
    backing_names = [
        str(n["node-name"]) for n in record.nodes if n["node-name"] in (f"{base}-nbd", base)
    ]

    started = False

    async def start(job_id: str) -> None:
        nonlocal started
        if op is not None:
            op.starting(job_id)
        await wire.block_stream(vm.session, job_id=job_id, device=image, speed=speed)
        started = True

    watchers = hooks if op is None else (*hooks, op)
    try:
        async with start_job(
            vm.session, "stream", start, target=image, speed=speed, hooks=watchers
        ) as job:
            result = await job.wait(complete_on_ready=False, deadline=deadline, hooks=watchers)
    except BaseException:
        if vm.session.lost and op is not None:
            # QEMU is gone, before the stream or during it: nothing can be taken away, and
            # the guest may have written to the disk since it was attached. The record
            # stays for `blockctl recover` to say what the target holds and how to finish.
            op.release()
        elif not started:  # the guest has not had the disk long: take it away again
            if op is not None:
                # Released first: unplug's conflict check would otherwise see this very
                # record (a stream on the device, its writer alive) and refuse.
                op.release()
            with anyio.CancelScope(shield=True):
                if undo is None:
                    await _detach(vm, device_id, record.nodes)
                else:
                    await undo()
            if op is not None:
                op.finished()
        else:
            # Not taken away under a guest that may have written to it: said instead.
            _left_behind(vm, device_id, image, op, export)
        raise
    if op is not None:  # only the cleanup is left (recovery finishes it)
        op.step(_journal.Step.CONCLUDED)
    # QEMU dropped the backing link at the end of the stream: the backup nodes are free.
    refused = await delete_nodes(vm, backing_names, event="blockctl.backup.live_node_kept")
    _gone_after_the_copy(vm, device_id, op)
    record = vm.registry.drives[device_id]
    nodes = tuple(
        {**n, "backing": None} if n["node-name"] == image else n
        for n in record.nodes
        if n["node-name"] not in backing_names or n["node-name"] in refused
    )
    vm.registry.put(replace(record, nodes=nodes))
    if op is not None:
        op.finished()
    return result


async def _detach(vm: VM, device_id: str, nodes: Sequence[Any]) -> None:
    path = next((n["filename"] for n in nodes if n.get("driver") == "file"), None)
    try:
        unplugged = await drives.unplug(vm, device_id)
    except BlockctlError as exc:
        _log.warning("blockctl.backup.live_rollback_failed", device=device_id, error=str(exc))
        return
    if unplugged.state is not drives.UnplugState.REMOVED:
        # The guest still holds the disk: its file stays (unplug again to finish).
        _log.warning("blockctl.backup.live_rollback_pending", device=device_id)
        return
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
