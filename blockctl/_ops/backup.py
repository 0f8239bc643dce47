"""Backups of running guests: full, incremental and differential, into a repository on disk.

A backup of a VM's disks is one point in time: one ``transaction`` starts a
``blockdev-backup`` job per disk (for incrementals ``completion-mode: grouped``: they succeed
or fail together) and, for a full backup, (re)creates each disk's persistent dirty bitmaps
at that same point. An incremental copies what its bitmap marks (``sync: incremental``,
``bitmap-mode: on-success``, so a failed backup leaves the bitmap as it was); a differential
copies everything since the last full (``sync: bitmap``, ``bitmap-mode: never``, on a
second bitmap that only full backups reset).

Repository: ``<repo>/<vm>/<backup id>/<device>.qcow2`` plus ``manifest.json``. An incremental
data file is a thin qcow2 whose backing file is the parent backup's data file (a relative path
with its format), so ``qemu-img convert`` of it reads the whole disk at that point. A backup is
complete only when its jobs concluded with no error and ``offset == len`` (the job driver's
rule) *and* its manifest was written atomically (write, fsync, rename, fsync the directory).
A failed backup leaves no manifest, and its directory is removed.

A missing, disabled, busy or ``inconsistent`` bitmap (QEMU killed, bitmap removed) makes the
next backup a full one, logged with the reason.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from blockctl import _images
from blockctl._agent import (
    DEFAULT_FREEZE_DEADLINE,
    Quiesce,
    Quiesced,
    quiesced,
    require_agent,
)
from blockctl._jobs import (
    DEFAULT_HOOKS,
    Job,
    JobHook,
    QEMUErrorPolicy,
    adopt_jobs,
    error_policy,
    start_job,
)
from blockctl._log import get_logger
from blockctl._machine import VM
from blockctl._nbd import MAX_REQUEST, STATE_DIRTY, STATE_ZERO, NbdClient
from blockctl._ops.chains import read_graph
from blockctl._qmp import wire
from blockctl.errors import BackupCorrupt, BlockctlError, ConfigError, JobError, Unsupported
from blockctl.types import ErrorPolicy, ImageFormat

_log = get_logger()

MANIFEST = "manifest.json"
#: Two persistent bitmaps per disk: changes since the last backup of any kind (incrementals
#: use and reset it), and changes since the last full backup (differentials read it, only full
#: backups reset it).
BITMAP_INC = "blockctl-inc"
BITMAP_FULL = "blockctl-full"
BITMAPS = (BITMAP_INC, BITMAP_FULL)


class BackupKind(enum.StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"  # since the previous backup of any kind
    DIFFERENTIAL = "differential"  # since the last full backup


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskBackup:
    device: str
    node: str
    file: str  # relative to the backup's directory
    virtual_size: int
    bytes_copied: int
    image_sha256: str  # the guest-visible disk at this point (what a restore must produce)
    file_sha256: str  # the data file as stored (what verify checks without restoring)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    id: str
    vm: str
    kind: BackupKind
    parent: str | None
    full: str  # the full backup this point is built on (itself, for a full one)
    bitmap: str
    started: float
    completed: float
    qemu: str
    disks: tuple[DiskBackup, ...]
    fallback_reason: str | None = None  # why an incremental was taken as a full backup
    #: "filesystem": the guest's filesystems were frozen at the point (quiesce, guest agent),
    #: so they need no journal replay; "crash": crash-consistent (older manifests say nothing).
    consistency: str = "crash"
    frozen_filesystems: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["disks"] = [asdict(d) for d in self.disks]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        values = dict(data)
        values["kind"] = BackupKind(values["kind"])
        values["disks"] = tuple(DiskBackup(**d) for d in values["disks"])
        return cls(**values)


@dataclass(slots=True)
class Repository:
    """``<root>/<vm>/<id>/``: the backups of one VM, oldest first by id."""

    root: Path
    vm: str
    _cache: dict[str, Manifest] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.root / self.vm

    def manifests(self) -> list[Manifest]:
        """Complete backups only (a directory without a manifest is not a backup)."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in sorted(self.directory.iterdir()):
            path = entry / MANIFEST
            if path.is_file():
                found.append(Manifest.from_json(json.loads(path.read_text())))
        # The order of the points in time, whatever the directory names say.
        return sorted(found, key=lambda m: (m.started, m.id))

    def get(self, backup_id: str) -> Manifest:
        for manifest in self.manifests():
            if manifest.id == backup_id:
                return manifest
        raise ConfigError(
            "backup", f"no complete backup {backup_id!r} of {self.vm} in {self.directory}"
        )

    def latest(self) -> Manifest | None:
        manifests = self.manifests()
        return manifests[-1] if manifests else None

    def data_file(self, manifest: Manifest, disk: DiskBackup) -> Path:
        return self.directory / manifest.id / disk.file

    def write_manifest(self, manifest: Manifest) -> None:
        """Atomically: a reader sees no manifest or the whole one, even after a crash."""
        directory = self.directory / manifest.id
        tmp = directory / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def new_backup_id() -> str:
    """Sortable by time to the microsecond, unique: ``20261127T223700.123456-1a2b``.

    (Seconds were not enough: two backups in one second sorted by their random suffix.)
    """
    now = time.time_ns() // 1000
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000))
    return f"{stamp}.{now % 1_000_000:06d}-{secrets.token_hex(2)}"


async def image_sha256(path: Path, fmt: ImageFormat, scratch: Path) -> str:
    """sha256 of the guest-visible bytes of an image (its chain included)."""
    flat = scratch / f".sha-{secrets.token_hex(4)}.raw"
    try:
        await _images.convert(path, fmt, flat, ImageFormat.RAW)
        return await anyio.to_thread.run_sync(_file_sha256, flat)
    finally:
        flat.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Section: recovery


_TARGET_NODE = re.compile(r"^bk\d+-[0-9a-f]{4}(-fl)?(-dbg|-file)?$")


async def recover(vm: VM, repo_root: Path) -> list[str]:
    """Reconcile after a controller stopped in the middle of a backup (crash, kill -9).

    QEMU is the source of truth: backup jobs blockctl started are adopted (a running one is
    cancelled, a concluded one reported and dismissed), target nodes left in QEMU are deleted,
    and backup directories without a manifest (never complete) are removed. If any such
    leftover is found, the disks' bitmaps are dropped: a killed *full* backup had already reset
    them, so only a new full backup is safe. Returns what was done, for the log.
    """
    notes: list[str] = []
    for job in await adopt_jobs(vm.session):
        if job.type != "backup" or not job.id.startswith("bc-backup-"):
            continue
        if job.done:
            notes.append(f"job {job.id} had ended ({job.outcome}); dismissed")
            continue
        with contextlib.suppress(BlockctlError):
            await job.cancel()
        with contextlib.suppress(BlockctlError):
            await job.wait(complete_on_ready=False, deadline=60)
        notes.append(f"job {job.id} of a stopped controller was cancelled")
    stale = sorted(
        (n.node_name for n in await vm.block_nodes() if _TARGET_NODE.match(n.node_name)),
        key=lambda n: (n.endswith("-file"), n.endswith("-dbg"), n.endswith("-fl")),
    )
    for name in stale:  # format nodes before their file nodes
        with contextlib.suppress(BlockctlError):
            await wire.blockdev_del(vm.session, name)
            notes.append(f"deleted leftover target node {name}")
    repo = Repository(root=Path(repo_root).absolute(), vm=vm.name)
    incomplete = [
        d
        for d in (repo.directory.iterdir() if repo.directory.is_dir() else ())
        if d.is_dir() and not (d / MANIFEST).exists()
    ]
    for directory in incomplete:
        shutil.rmtree(directory, ignore_errors=True)
        notes.append(f"removed incomplete backup {directory.name} (it has no manifest)")
    if notes:
        graph = await read_graph(vm)
        for device in graph.devices.values():
            if device.root is None:
                continue
            node = graph.format_node(device.id)
            for bitmap in node.dirty_bitmaps:
                name = bitmap.name or ""
                if name in BITMAPS or name.endswith(".next"):
                    with contextlib.suppress(BlockctlError):
                        await wire.bitmap_remove(vm.session, node.name, name)
        notes.append("dropped the backup bitmaps: the next backup is a full one")
        for note in notes:
            _log.warning("blockctl.backup.recovered", vm=vm.name, note=note)
    return notes


# Section: taking a backup


@dataclass(frozen=True, slots=True, kw_only=True)
class _DiskPlan:
    device: str
    node: str
    virtual_size: int
    target: Path
    target_node: str
    bitmaps_ok: frozenset[str]  # present, persistent, recording, consistent, not busy
    bitmaps_present: frozenset[str]


async def backup(
    vm: VM,
    repo_root: Path,
    *,
    kind: BackupKind = BackupKind.INCREMENTAL,
    devices: Sequence[str] | None = None,
    compress: bool = False,
    speed: int | None = None,
    deadline: float = 3600.0,
    hooks: Sequence[JobHook] = DEFAULT_HOOKS,
    pull: bool = False,
    legacy: bool = False,
    inject_errors: Sequence[Mapping[str, Any]] = (),
    on_source_error: ErrorPolicy | str = ErrorPolicy.REPORT,
    on_target_error: ErrorPolicy | str = ErrorPolicy.REPORT,
    pause_timeout: float = 60.0,
    quiesce: Quiesce | bool | str = Quiesce.OFF,
    freeze_deadline: float = DEFAULT_FREEZE_DEADLINE,
) -> Manifest:
    """Back up ``devices`` (default: every writable disk) of a running VM at one point in time.

    ``quiesce``: freeze the guest's filesystems (guest agent) just around the transaction that
    starts the jobs, and thaw as soon as it returns, not after the copy.

    ``inject_errors``: blkdebug rules put under each push target (fault-injection tests).

    ``on_source_error``/``on_target_error``: the jobs' error policies (push mode). With
    ``stop``/``enospc`` a job paused on an error waits ``pause_timeout`` s to be resumed (free
    space on the target, then ``blockctl jobs VM resume ID``) before it is cancelled. Whatever
    the policy, a backup is recorded only if every job copied everything.

    ``pull``: instead of QEMU pushing the data, export a frozen point-in-time view over NBD
    (fleecing) and copy it with blockctl's own NBD reader: only allocated extents for a full
    backup, only the dirty ones (the frozen bitmap, exported) for an incremental/differential.

    ``kind`` incremental or differential falls back to full (logged, and recorded as the
    manifest's ``fallback_reason``) when there is no earlier backup or a disk's bitmap is
    missing, disabled, busy or inconsistent.
    """
    require_agent(vm, quiesce)
    repo = Repository(root=Path(repo_root).absolute(), vm=vm.name)
    policies = _policies(on_source_error, on_target_error)
    if pull and any(p.value is not None for p in policies.values()):
        raise ConfigError(
            "on_source_error", "pull mode has no error policies (its copy is blockctl's own)"
        )
    caps = await vm.capabilities()
    if not legacy and not caps.has("blockdev-backup") and caps.has("drive-backup"):
        legacy = True  # chosen from the schema, never from a version number
        _log.warning("blockctl.backup.legacy", vm=vm.name, reason="no blockdev-backup")
    if legacy:
        if pull:
            raise ConfigError("legacy", "pull mode needs blockdev-backup, not drive-backup")
        if not caps.has("drive-backup"):
            raise Unsupported("drive-backup", "this QEMU has no drive-backup")
        _log.warning(
            "blockctl.backup.legacy",
            vm=vm.name,
            note="drive-backup is deprecated by QEMU; use it only where needed",
        )
        await vm.require("transaction", "block-dirty-bitmap-add", "job-dismiss")
    else:
        # The modern route: blockdev-backup into nodes blockctl adds itself.
        await vm.require("blockdev-backup", "transaction", "block-dirty-bitmap-add", "job-dismiss")
    recovered = await recover(vm, repo_root)
    graph = await read_graph(vm)
    chosen = (
        list(devices)
        if devices is not None
        else [
            d.id
            for d in graph.devices.values()
            if d.root is not None and not graph.format_node(d.id).read_only
        ]
    )
    if not chosen:
        raise ConfigError("devices", "no writable disk to back up")
    previous = repo.latest()
    parent: Manifest | None = None
    fallback: str | None = None
    if kind is not BackupKind.FULL:
        if recovered:
            fallback = "an earlier backup was interrupted: " + recovered[0]
        elif previous is None:
            fallback = "there is no earlier backup in the repository"
        elif {d.device for d in previous.disks} != set(chosen):
            fallback = "the disks differ from the last backup's"
        elif kind is BackupKind.DIFFERENTIAL:
            parent = repo.get(previous.full)
        else:
            parent = previous
    backup_id = new_backup_id()
    directory = repo.directory / backup_id
    plans: list[_DiskPlan] = []
    for n, device in enumerate(chosen):
        node = graph.format_node(device)
        if node.virtual_size is None:
            raise ConfigError("devices", f"{device}: unknown size")
        present = {b.name: b for b in node.dirty_bitmaps if b.name in BITMAPS}
        usable = frozenset(
            name
            for name, b in present.items()
            if b.persistent and b.recording and not b.inconsistent and not b.busy
        )
        needed = BITMAP_INC if kind is BackupKind.INCREMENTAL else BITMAP_FULL
        if kind is not BackupKind.FULL and fallback is None and needed not in usable:
            bitmap = present.get(needed)
            state = (
                "missing"
                if bitmap is None
                else "inconsistent"
                if bitmap.inconsistent
                else "busy"
                if bitmap.busy
                else "not recording"
            )
            fallback = f"the dirty bitmap of {device} is {state} (e.g. after QEMU was killed)"
        if node.driver != "qcow2" and kind is not BackupKind.FULL:
            fallback = fallback or f"{device} is {node.driver}: persistent bitmaps need qcow2"
        plans.append(
            _DiskPlan(
                device=device,
                node=node.name,
                virtual_size=node.virtual_size,
                target=directory / f"{device}.qcow2",
                target_node=f"bk{n}-{backup_id[-4:]}",
                bitmaps_ok=usable,
                bitmaps_present=frozenset(present),
            )
        )
    effective = kind if fallback is None else BackupKind.FULL
    if fallback is not None:
        _log.warning(
            "blockctl.backup.fallback_to_full", vm=vm.name, asked=kind.value, reason=fallback
        )
        parent = None
    started = time.time()
    directory.mkdir(parents=True)
    added: list[str] = []
    points: list[Quiesced] = []  # what the freeze around the starting transaction achieved
    try:
        if pull:
            jobs = await _run_pull(
                vm,
                plans,
                effective,
                parent,
                deadline,
                hooks,
                added,
                quiesce,
                freeze_deadline,
                points,
            )
        else:
            jobs = await _run_backup(
                vm,
                plans,
                effective,
                parent,
                repo,
                compress,
                speed,
                deadline,
                hooks,
                added,
                legacy,
                inject_errors,
                policies,
                pause_timeout,
                quiesce,
                freeze_deadline,
                points,
            )
        # QEMU must let go of the targets before they are read (image locks).
        await _delete_nodes(vm, added)
        disks = []
        for plan in plans:
            result = jobs[plan.device]
            disks.append(
                DiskBackup(
                    device=plan.device,
                    node=plan.node,
                    file=plan.target.name,
                    virtual_size=plan.virtual_size,
                    bytes_copied=result,
                    image_sha256=await image_sha256(plan.target, ImageFormat.QCOW2, directory),
                    file_sha256=await anyio.to_thread.run_sync(_file_sha256, plan.target),
                )
            )
        version = await vm.version()
        manifest = Manifest(
            id=backup_id,
            vm=vm.name,
            kind=effective,
            parent=None if parent is None else parent.id,
            full=backup_id if parent is None else parent.full,
            bitmap=BITMAP_INC if effective is not BackupKind.DIFFERENTIAL else BITMAP_FULL,
            started=started,
            completed=time.time(),
            qemu=str(version),
            disks=tuple(disks),
            fallback_reason=fallback,
            consistency="filesystem" if points and points[0].consistent else "crash",
            frozen_filesystems=points[0].frozen if points else 0,
        )
        repo.write_manifest(manifest)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _delete_nodes(vm, added)
            shutil.rmtree(directory, ignore_errors=True)
            if effective is BackupKind.FULL:
                # The transaction already reset the bitmaps to "changes since this backup",
                # which did not happen: drop them, so the next backup is a full one.
                for plan in plans:
                    for name in BITMAPS:
                        with contextlib.suppress(BlockctlError):
                            await wire.bitmap_remove(vm.session, plan.node, name)
        raise
    await _delete_nodes(vm, added)
    _log.info(
        "blockctl.backup.done",
        vm=vm.name,
        id=backup_id,
        kind=effective.value,
        bytes=sum(d.bytes_copied for d in manifest.disks),
    )
    return manifest


async def _delete_nodes(vm: VM, names: list[str]) -> None:
    for name in reversed(names):
        with contextlib.suppress(BlockctlError):
            await wire.blockdev_del(vm.session, name)
    names.clear()


async def _reset_bitmaps(vm: VM, plan: _DiskPlan) -> list[dict[str, Any]]:
    """The transaction actions that make both bitmaps start counting at a full backup's point:
    clear a usable one, (re)add one that is missing or unusable (removed first, outside the
    transaction, as a bitmap in use cannot be replaced inside it)."""
    actions = []
    for name in BITMAPS:
        if name in plan.bitmaps_ok:
            actions.append(wire.bitmap_clear_action(plan.node, name))
        else:
            if name in plan.bitmaps_present:
                await wire.bitmap_remove(vm.session, plan.node, name)
            actions.append(wire.bitmap_add_action(plan.node, name))
    return actions


async def _run_backup(
    vm: VM,
    plans: list[_DiskPlan],
    kind: BackupKind,
    parent: Manifest | None,
    repo: Repository,
    compress: bool,
    speed: int | None,
    deadline: float,
    hooks: Sequence[JobHook],
    added: list[str],
    legacy: bool = False,
    inject_errors: Sequence[Mapping[str, Any]] = (),
    policies: Mapping[str, QEMUErrorPolicy] | None = None,
    pause_timeout: float = 60.0,
    quiesce: Quiesce | bool | str = Quiesce.OFF,
    freeze_deadline: float = DEFAULT_FREEZE_DEADLINE,
    points: list[Quiesced] | None = None,
) -> dict[str, int]:
    """Create the targets, start every job in one transaction, wait for all. Returns the
    bytes each disk's job copied. ``legacy``: drive-backup into the created files instead of
    blockdev-backup into added nodes."""
    for plan in plans:
        await _create_target(plan, parent)
        if not legacy:
            # backing: null: the job writes whole clusters; the parent is for readers later.
            await _add_qcow2(vm, plan.target_node, plan.target, None, added, inject_errors)

    actions: list[dict[str, Any]] = []
    sent = {k: p.value for k, p in (policies or {}).items() if p.value is not None}
    chosen = policies or {}
    retries = max((p.retries for p in chosen.values()), default=0)
    # Which side's errors are retried: a source on "ignore" and a target on "stop" differ.
    retry_on = frozenset(
        op
        for key, op in (("on_source_error", "read"), ("on_target_error", "write"))
        if key in chosen and chosen[key].retries
    )

    def start_for(plan: _DiskPlan, last: bool) -> Any:
        async def start(job_id: str) -> None:
            if kind is BackupKind.FULL:
                sync, bitmap, mode = "full", None, None
                actions.extend(await _reset_bitmaps(vm, plan))
            elif kind is BackupKind.INCREMENTAL:
                sync, bitmap, mode = "incremental", BITMAP_INC, "on-success"
            else:
                sync, bitmap, mode = "bitmap", BITMAP_FULL, "never"
            if legacy:
                actions.append(
                    wire.drive_backup_action(
                        job_id=job_id,
                        device=plan.node,
                        target=str(plan.target),
                        target_format="qcow2",
                        sync=sync,
                        bitmap=bitmap,
                        bitmap_mode=mode,
                        compress=compress,
                        speed=speed,
                        **sent,
                    )
                )
            else:
                actions.append(
                    wire.backup_action(
                        job_id=job_id,
                        device=plan.node,
                        target=plan.target_node,
                        sync=sync,
                        bitmap=bitmap,
                        bitmap_mode=mode,
                        compress=compress,
                        speed=speed,
                        **sent,
                    )
                )
            if last:
                # Every job's listener is registered by now: start them all at one point.
                # Incremental jobs fail together (grouped): a disk whose job succeeded while
                # another failed would otherwise have consumed its bitmap for a backup that
                # is never recorded. QEMU refuses grouped mode with bitmap actions, so a full
                # backup runs its jobs individually; if one fails, every bitmap is dropped.
                async with quiesced(
                    vm, quiesce, operation="backup", freeze_deadline=freeze_deadline
                ) as point:
                    await wire.transaction(vm.session, actions, grouped=kind is not BackupKind.FULL)
                if points is not None:
                    points.append(point)

        return start

    copied: dict[str, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        jobs: list[tuple[_DiskPlan, Job]] = []
        for i, plan in enumerate(plans):
            job = await stack.enter_async_context(
                start_job(
                    vm.session,
                    "backup",
                    start_for(plan, i == len(plans) - 1),
                    target=plan.target_node,
                    speed=speed,
                    hooks=hooks,
                )
            )
            jobs.append((plan, job))
        errors: list[JobError] = []

        async def wait(plan: _DiskPlan, job: Job) -> None:
            try:
                result = await job.wait(
                    complete_on_ready=False,
                    deadline=deadline,
                    hooks=hooks,
                    pause_timeout=pause_timeout,
                    retries=retries,
                    retry_on=retry_on,
                )
                copied[plan.device] = result.offset
            except JobError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for plan, job in jobs:
                tg.start_soon(wait, plan, job)
        if errors:
            raise errors[0]
    return copied


# Section: pull mode (NBD export of a fleecing view)


def _policies(source: ErrorPolicy | str, target: ErrorPolicy | str) -> dict[str, QEMUErrorPolicy]:
    """The error policies of the backup actions, by argument name (QEMU's default,
    ``report``, is not sent: the actions stay as before)."""
    return {
        "on_source_error": error_policy(source, "on_source_error"),
        "on_target_error": error_policy(target, "on_target_error"),
    }


async def _create_target(plan: _DiskPlan, parent: Manifest | None) -> None:
    if parent is None:
        await _images.create(plan.target, ImageFormat.QCOW2, size=plan.virtual_size)
        return
    parent_disk = next(d for d in parent.disks if d.device == plan.device)
    # A relative backing path keeps the repository movable.
    await _images.create(
        plan.target,
        ImageFormat.QCOW2,
        size=plan.virtual_size,
        backing=Path("..") / parent.id / parent_disk.file,
        backing_format=ImageFormat.QCOW2,
        unsafe=True,
    )


async def _add_qcow2(
    vm: VM,
    name: str,
    path: Path,
    backing: str | None,
    added: list[str],
    inject_errors: Sequence[Mapping[str, Any]] = (),
) -> None:
    """A qcow2 node on a file node; with ``inject_errors`` a blkdebug node sits between them
    (fault injection: the reliability tests make the target fail exactly where they want)."""
    await wire.blockdev_add(
        vm.session, {"driver": "file", "node-name": f"{name}-file", "filename": str(path)}
    )
    added.append(f"{name}-file")
    file_node = f"{name}-file"
    if inject_errors:
        await wire.blockdev_add(
            vm.session,
            {
                "driver": "blkdebug",
                "node-name": f"{name}-dbg",
                "image": file_node,
                "inject-error": [dict(rule) for rule in inject_errors],
            },
        )
        added.append(f"{name}-dbg")
        file_node = f"{name}-dbg"
    await wire.blockdev_add(
        vm.session,
        {"driver": "qcow2", "node-name": name, "file": file_node, "backing": backing},
    )
    added.append(name)


async def _run_pull(
    vm: VM,
    plans: list[_DiskPlan],
    kind: BackupKind,
    parent: Manifest | None,
    deadline: float,
    hooks: Sequence[JobHook],
    added: list[str],
    quiesce: Quiesce | bool | str = Quiesce.OFF,
    freeze_deadline: float = DEFAULT_FREEZE_DEADLINE,
    points: list[Quiesced] | None = None,
) -> dict[str, int]:
    """Fleece every disk at one point in time (``blockdev-backup sync: none`` into a
    temporary overlay whose backing is the disk: the guest keeps writing, old data is copied
    aside first), export the views over NBD, copy what is needed through an NBD client into the
    backup targets (exported writable by the same server), and tear it all down in every path.

    For an incremental/differential the bitmap is *rotated* in the same transaction: the
    current one is disabled (frozen at the point, exported read-only) and a ``.next`` one starts
    recording. Afterwards ``.next`` is merged back (success of an incremental: the frozen bits
    are cleared first), so no change is lost whatever happens.
    """
    await vm.require("nbd-server-start", "block-export-add", "block-export-del")
    frozen = {BackupKind.INCREMENTAL: BITMAP_INC, BackupKind.DIFFERENTIAL: BITMAP_FULL}.get(kind)
    fresh = None if frozen is None else f"{frozen}.next"
    workdir = Path(tempfile.mkdtemp(prefix="bc-nbd-", dir="/tmp"))  # a short socket path
    server = workdir / "nbd.sock"
    fleece_files: list[Path] = []
    for plan in plans:
        fleece = plan.target.with_name(f".fleece-{plan.device}.qcow2")
        await _images.create(fleece, ImageFormat.QCOW2, size=plan.virtual_size)
        fleece_files.append(fleece)
        await _add_qcow2(vm, f"{plan.target_node}-fl", fleece, plan.node, added)
        await _create_target(plan, parent)
        # Written through NBD in whole bitmap clusters: no backing needed while writing.
        await _add_qcow2(vm, plan.target_node, plan.target, None, added)

    actions: list[dict[str, Any]] = []

    def start_for(plan: _DiskPlan, last: bool) -> Any:
        async def start(job_id: str) -> None:
            if kind is BackupKind.FULL:
                actions.extend(await _reset_bitmaps(vm, plan))
            else:
                assert frozen is not None and fresh is not None
                actions.append(wire.bitmap_add_action(plan.node, fresh))
                actions.append(wire.bitmap_disable_action(plan.node, frozen))
            actions.append(
                wire.backup_action(
                    job_id=job_id, device=plan.node, target=f"{plan.target_node}-fl", sync="none"
                )
            )
            if last:
                async with quiesced(
                    vm, quiesce, operation="backup", freeze_deadline=freeze_deadline
                ) as point:
                    await wire.transaction(vm.session, actions)
                if points is not None:
                    points.append(point)

        return start

    copied: dict[str, int] = {}
    success = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            jobs: list[Job] = []
            for i, plan in enumerate(plans):
                jobs.append(
                    await stack.enter_async_context(
                        start_job(
                            vm.session,
                            "backup",
                            start_for(plan, i == len(plans) - 1),
                            target=f"{plan.target_node}-fl",
                            hooks=hooks,
                        )
                    )
                )
            await wire.nbd_server_start(vm.session, str(server))
            try:
                for plan in plans:
                    await wire.block_export_add(
                        vm.session,
                        export_id=f"src-{plan.target_node}",
                        node=f"{plan.target_node}-fl",
                        name=f"src-{plan.device}",
                        writable=False,
                        bitmaps=() if frozen is None else ((plan.node, frozen),),
                    )
                    await wire.block_export_add(
                        vm.session,
                        export_id=f"dst-{plan.target_node}",
                        node=plan.target_node,
                        name=f"dst-{plan.device}",
                        writable=True,
                    )
                with anyio.fail_after(deadline):
                    for plan in plans:
                        copied[plan.device] = await _pull_disk(str(server), plan.device, frozen)
                success = True
            finally:
                with anyio.CancelScope(shield=True):
                    for plan in plans:
                        for prefix in ("src", "dst"):
                            with contextlib.suppress(BlockctlError):
                                await wire.block_export_del(
                                    vm.session, f"{prefix}-{plan.target_node}"
                                )
                    with contextlib.suppress(BlockctlError):
                        await wire.nbd_server_stop(vm.session)
                    for job in jobs:  # sync=none runs until cancelled: that is its end
                        with contextlib.suppress(BlockctlError):
                            await job.cancel()
                            await job.wait(complete_on_ready=False, deadline=60, hooks=hooks)
    finally:
        with anyio.CancelScope(shield=True):
            if frozen is not None and fresh is not None:
                await _unrotate(
                    vm, plans, frozen, fresh, clear=success and kind is BackupKind.INCREMENTAL
                )
            shutil.rmtree(workdir, ignore_errors=True)
            # The fleecing overlays go now; the targets' nodes go with the caller's cleanup.
            for name in [n for n in reversed(added) if "-fl" in n]:  # top-down
                with contextlib.suppress(BlockctlError):
                    await wire.blockdev_del(vm.session, name)
                added.remove(name)
            for fleece in fleece_files:
                fleece.unlink(missing_ok=True)
    return copied


async def _unrotate(vm: VM, plans: list[_DiskPlan], frozen: str, fresh: str, clear: bool) -> None:
    """Put the rotated bitmaps back into one recording bitmap. ``clear``: the frozen bits were
    backed up (incremental success) and are dropped; otherwise they are kept (failure, or a
    differential, which keeps counting from the full backup)."""
    actions: list[dict[str, Any]] = []
    for plan in plans:
        if clear:
            actions.append(wire.bitmap_clear_action(plan.node, frozen))
        actions.append(wire.bitmap_merge_action(plan.node, frozen, [fresh]))
        actions.append(wire.bitmap_enable_action(plan.node, frozen))
        actions.append(wire.bitmap_remove_action(plan.node, fresh))
    try:
        await wire.transaction(vm.session, actions)
    except BlockctlError as exc:
        _log.warning(
            "blockctl.backup.bitmap_restore_failed",
            vm=vm.name,
            error=str(exc),
            note="the next backup will be a full one",
        )
        for plan in plans:
            for name in (frozen, fresh):
                with contextlib.suppress(BlockctlError):
                    await wire.bitmap_remove(vm.session, plan.node, name)


async def _pull_disk(server: str, device: str, frozen: str | None) -> int:
    """Copy the extents that matter from ``src-DEVICE`` to ``dst-DEVICE``: every allocated,
    non-zero extent (full), or every dirty one (incremental/differential)."""
    context = "base:allocation" if frozen is None else f"qemu:dirty-bitmap:{frozen}"
    copied = 0
    source = await NbdClient.open(server, f"src-{device}", context)
    try:
        target = await NbdClient.open(server, f"dst-{device}", None)
        try:
            offset = 0
            while offset < source.size:
                for extent in await source.block_status(offset, source.size - offset):
                    wanted = (
                        (extent.flags & STATE_DIRTY)
                        if frozen is not None
                        else not (extent.flags & STATE_ZERO)
                    )
                    if wanted:
                        position = extent.offset
                        end = min(extent.offset + extent.length, source.size)
                        while position < end:
                            size = min(MAX_REQUEST, end - position)
                            await target.write(position, await source.read(position, size))
                            position += size
                            copied += size
                    offset = extent.offset + extent.length
            await target.flush()
        finally:
            await target.aclose()
    finally:
        await source.aclose()
    return copied


# Section: restore, verify, prune


async def restore(
    repo_root: Path,
    vm_name: str,
    backup_id: str,
    device: str,
    dest: Path,
    fmt: ImageFormat = ImageFormat.QCOW2,
) -> Path:
    """Rebuild ``device`` as it was at ``backup_id`` into a new file; checked against the
    manifest's checksum (a mismatch removes the file and raises)."""
    repo = Repository(root=Path(repo_root).absolute(), vm=vm_name)
    manifest = repo.get(backup_id)
    disk = next((d for d in manifest.disks if d.device == device), None)
    if disk is None:
        raise ConfigError(
            "device",
            f"backup {backup_id} has no disk {device!r} "
            f"(it has {', '.join(d.device for d in manifest.disks)})",
        )
    if dest.exists():
        raise ConfigError("dest", f"{dest} exists; restore writes a new file")
    source = repo.data_file(manifest, disk)
    # The repository is outside QEMU's and blockctl's control: a tampered incremental could
    # name a host file as its backing. Its chain must stay inside the repository.
    await _images.inspect_untrusted(source, ImageFormat.QCOW2, roots=[repo.root], where="backup")
    await _images.convert(source, ImageFormat.QCOW2, dest, fmt)
    got = await image_sha256(dest, fmt, dest.parent)
    if got != disk.image_sha256:
        dest.unlink(missing_ok=True)
        raise BackupCorrupt(
            f"restored {device} of {backup_id} reads {got[:16]}…, the "
            f"manifest says {disk.image_sha256[:16]}…: the repository is "
            "damaged (run `blockctl backup verify`)"
        )
    return dest


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    backup_id: str
    ok: bool
    problems: tuple[str, ...]


async def verify(
    repo_root: Path, vm_name: str, backup_id: str, *, deep: bool = False
) -> Verification:
    """Recompute each data file's checksum (and with ``deep`` the guest-visible image's,
    through its chain) and compare them with the manifest, without restoring anything."""
    repo = Repository(root=Path(repo_root).absolute(), vm=vm_name)
    manifest = repo.get(backup_id)
    problems = []
    for disk in manifest.disks:
        path = repo.data_file(manifest, disk)
        if not path.is_file():
            problems.append(f"{disk.device}: {path} is missing")
            continue
        if await anyio.to_thread.run_sync(_file_sha256, path) != disk.file_sha256:
            problems.append(f"{disk.device}: {path.name} does not match its checksum")
        check = await _images.check(path, ImageFormat.QCOW2)
        if check.corrupt:
            problems.append(f"{disk.device}: qemu-img check reports corruption")
        if deep and await image_sha256(path, ImageFormat.QCOW2, path.parent) != (disk.image_sha256):
            problems.append(f"{disk.device}: the restored image would not match")
    return Verification(backup_id=backup_id, ok=not problems, problems=tuple(problems))


async def prune(
    repo_root: Path, vm_name: str, *, keep_last: int | None = None, keep_within: float | None = None
) -> list[str]:
    """Keep the newest ``keep_last`` backups and/or those newer than ``keep_within`` seconds
    (a backup kept by either rule stays; the newest one always stays); delete the others. A
    kept backup whose parent is deleted is first made self-contained (its data file absorbs
    its backing chain: qemu-img rebase onto nothing), so every kept point stays restorable.
    Returns the deleted ids."""
    if keep_last is None and keep_within is None:
        raise ConfigError("keep", "say what to keep: keep_last (--keep) or keep_within")
    if keep_last is not None and keep_last < 1:
        raise ConfigError("keep_last", "keep at least one backup")
    repo = Repository(root=Path(repo_root).absolute(), vm=vm_name)
    manifests = repo.manifests()
    now = time.time()
    keep = {manifests[-1].id} if manifests else set()
    if keep_last is not None:
        keep |= {m.id for m in manifests[-keep_last:]}
    if keep_within is not None:
        keep |= {m.id for m in manifests if now - m.completed <= keep_within}
    doomed = [m.id for m in manifests if m.id not in keep]
    if not doomed:
        return []
    for manifest in [m for m in manifests if m.id in keep]:  # oldest first
        if manifest.parent in doomed:
            for disk in manifest.disks:
                await _images.rebase(repo.data_file(manifest, disk), ImageFormat.QCOW2, None, None)
            disks = []
            for disk in manifest.disks:
                digest = await anyio.to_thread.run_sync(
                    _file_sha256, repo.data_file(manifest, disk)
                )
                disks.append(replace(disk, file_sha256=digest))
            repo.write_manifest(
                replace(
                    manifest,
                    kind=BackupKind.FULL,
                    parent=None,
                    full=manifest.id,
                    disks=tuple(disks),
                )
            )
            # Later kept backups that built on the deleted full now build on this one.
            for later in repo.manifests():
                if later.full in doomed and later.id != manifest.id:
                    repo.write_manifest(replace(later, full=manifest.id))
    for backup_id in doomed:
        (repo.directory / backup_id / MANIFEST).unlink()  # first: it stops being a backup
        shutil.rmtree(repo.directory / backup_id)
    return doomed
