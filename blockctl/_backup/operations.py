"""Backups of running guests into a chunked repository, and restore, verify, prune.

A backup is one point in time for all its disks: one ``transaction`` adds each disk's new
checkpoint bitmap, freezes the previous one (incrementals), and starts a fleecing job per disk
(``blockdev-backup sync: none`` into a scratch overlay whose backing is the disk: old data is
copied aside before the guest overwrites it). The point-in-time views are exported read-only
over QEMU's NBD server on a private socket and read with libnbd: only chunks that are not zero
(full) or that a dirty extent touches (incremental), each byte once, hashed and compressed as
it arrives. Then the chunks are made durable, the indexes written, and the manifest (the
commit point); only after that is the previous checkpoint given up. Any failure before the
manifest puts the checkpoints back as they were (see :mod:`.checkpoints`) and removes the
incomplete point; exports, jobs, nodes and scratch files are torn down in every path.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import hashlib
import inspect
import json
import os
import re
import shutil
import socket as socket_module
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import anyio

from blockctl import _direct, _fsutil
from blockctl._agent import (
    DEFAULT_FREEZE_DEADLINE,
    Quiesce,
    Quiesced,
    coerce_quiesce,
    quiesced,
    require_agent,
)
from blockctl._backup import checkpoints, remote
from blockctl._backup import control as control_ops
from blockctl._backup.control import CopyControl
from blockctl._backup.crypto import read_key_file
from blockctl._backup.qcow2 import Qcow2Writer, write_empty
from blockctl._backup.reader import (
    DEFAULT_CONNECTIONS,
    ChunkCopier,
    libnbd,
    measure_rate,
    plan_reads,
)
from blockctl._backup.store import (
    DEFAULT_DIGEST,
    ZERO_DIGEST,
    ChunkBatch,
    DiskIndex,
    DiskPoint,
    Manifest,
    Repository,
    check_name,
    check_point_id,
    check_request_id,
    new_point_id,
    start_writeback,
)
from blockctl._graph import BlockGraph, GraphNode
from blockctl._jobs import (
    DEFAULT_CONTROL,
    DEFAULT_HOOKS,
    Job,
    JobControl,
    JobHook,
    JobIOError,
    JobProgress,
    JobStatus,
    adopt_jobs,
    call_hooks,
    start_job,
)
from blockctl._log import get_logger
from blockctl._machine import DAEMON_OPS_SUFFIX, VM
from blockctl._ops import conflicts
from blockctl._ops.nodes import delete_nodes, read_graph, refuse_passed_through
from blockctl._qmp import wire
from blockctl._qmp.models import FileOptions, FormatOptions
from blockctl.errors import (
    BackupCorrupt,
    BlockctlError,
    ConfigError,
    JobCancelled,
    JobError,
    JobFailed,
    RepositoryBusy,
    RepositoryError,
    errno_symbol,
)
from blockctl.types import ErrorPolicy, ImageFormat, IscsiSource, NfsSource

_log = get_logger()

#: Names of what a backup adds to QEMU: fleecing nodes, exports, jobs (recovery finds them).
_FLEECE_NODE = re.compile(r"^bcf\d+-[0-9a-f]{4}(-file)?$")
#: ``<run dir>/backup-scratch``: the scratch directory of the backup running now (its
#: fleecing overlays and NBD socket). QEMU names it through the fleecing nodes; once QEMU
#: (or a daemon) is gone, only this says where a killed backup's overlays are.
SCRATCH_RECORD = "backup-scratch"
_EXPORT = re.compile(r"^bcx\d+-[0-9a-f]{4}$")
#: Steps where a test can make a backup fail (``failpoint``), in order.
STEPS = (
    "before-transaction",
    "after-transaction",
    "after-server-start",
    "after-chunks",
    "after-index",
    "after-manifest",
)

#: Called at each step; it may raise (a fault) or return an awaitable (a test acting meanwhile).
Failpoint = Callable[[str], Any]


async def _at(failpoint: Failpoint, step: str) -> None:
    result = failpoint(step)
    if inspect.isawaitable(result):
        await result


def _no_failpoint(step: str) -> None:
    return None


def open_repository(
    path: Path | str, *, key_file: Path | str | None = None, secret: bytes | None = None
) -> Repository:
    """Open the repository at ``path``; an encrypted one needs its key file (0600) or the
    secret itself."""
    if key_file is not None:
        secret = read_key_file(Path(key_file))
    return Repository.open(Path(path), secret=secret)


def init_repository(
    path: Path | str,
    *,
    key_file: Path | str | None = None,
    chunk_size: int | None = None,
    compression: str = "zstd",
    digest: str = DEFAULT_DIGEST,
) -> Repository:
    """Create a repository (owner-only); with ``key_file`` its chunks, indexes and manifests
    are encrypted and authenticated with a key wrapped by that file's secret. ``digest``: the
    chunk digest of an unencrypted one, blake3 (default) or sha256 (as older repositories)."""
    secret = None if key_file is None else read_key_file(Path(key_file))
    kwargs: dict[str, Any] = {"compression": compression, "secret": secret, "digest": digest}
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    return Repository.init(Path(path), **kwargs)


@contextlib.contextmanager
def _vm_lock(repo: Repository, vm: VM | str) -> Any:
    """One backup of a VM at a time: per repository (its checkpoints are one sequence) and,
    for a VM with a run directory, per VM (a backup's recovery step tears down what it finds
    of blockctl's backups in QEMU, which must not be another process's running backup)."""
    name = vm if isinstance(vm, str) else vm.name
    directory = repo.vm_dir(name)
    with contextlib.ExitStack() as stack:
        paths = [directory / ".lock"]
        if not isinstance(vm, str) and vm.run_dir is not None:
            paths.append(Path(vm.run_dir) / "backup.lock")
        for path in paths:
            fd = stack.enter_context(_flock(path, f"another backup of {name} is running"))
            if path.name == conflicts.BACKUP_LOCK:
                # Named, so that a commit or unplug of a disk under it is refused naming it.
                conflicts.write_backup_owner(fd, "backup")
                stack.callback(conflicts.clear_backup_owner, fd)
        yield


def _flock(path: Path, busy: str) -> Any:
    return _fsutil.flocked(
        path,
        create=True,
        wait=False,
        busy=lambda: RepositoryBusy(f"{busy} (it holds {path}); wait for it to finish"),
    )


@contextlib.contextmanager
def _step(repo: Repository, step: str) -> Any:
    """An OSError while writing the repository names the step and the errno's name."""
    try:
        yield
    except OSError as exc:
        name = errno_symbol(exc.errno)
        full = " (the repository is full)" if exc.errno == errno_module.ENOSPC else ""
        raise RepositoryError(
            f"repository {repo.path}: {step}: {exc.strerror or exc}: {name}{full}; the backup "
            "is not recorded and the next incremental still holds every write"
        ) from exc


# Section: recovery


async def recover(vm: VM, repo: Repository) -> list[str]:
    """Put a VM and a repository back in order after a backup's controller stopped midway
    (kill -9, lost session). QEMU is the truth: blockctl's backup jobs are cancelled and
    dismissed, its exports and the NBD server they used stopped, its fleecing nodes and scratch
    files deleted; the repository's incomplete points removed; the checkpoints settled (a
    failed attempt's bitmap is merged into the last good point's, so nothing is lost). Returns
    what was done."""
    with _vm_lock(repo, vm):
        notes, _graph = await _recover(vm, repo)
        return notes


async def _recover(vm: VM, repo: Repository) -> tuple[list[str], BlockGraph | None]:
    """What :func:`recover` does, and the block graph as it is afterwards when recovery
    changed nothing in QEMU (None otherwise: read it again), so a backup reads it once."""
    notes: list[str] = []
    # NBD exports only: the NBD server is ours when they are all ours (a qemu-storage-daemon
    # also runs its vhost-user-blk export, which is not served by the NBD server).
    exports = [e.id for e in await wire.query_block_exports(vm.session) if e.type == "nbd"]
    ours = [e for e in exports if _EXPORT.match(e)]
    # What cannot be undone is said, not passed over: the notes are the caller's report.
    for export in ours:
        try:
            await wire.block_export_del(vm.session, export)
            notes.append(f"removed the leftover NBD export {export}")
        except BlockctlError as exc:
            notes.append(f"could not remove the leftover NBD export {export}: {exc}")
    for job in await adopt_jobs(vm.session):
        if job.type != "backup" or not job.id.startswith("bc-backup-"):
            continue
        if not job.done:
            with contextlib.suppress(BlockctlError):  # it may be ending by itself
                await job.cancel()
            try:
                await job.wait(complete_on_ready=False, deadline=60)
            except (JobCancelled, JobFailed):
                pass  # ended, as asked (or by itself), and dismissed
            except BlockctlError as exc:
                notes.append(f"could not end the fleecing job {job.id}: {exc}")
                continue
        notes.append(f"the fleecing job {job.id} of a stopped controller was ended")
    graph: BlockGraph | None = await read_graph(vm)
    assert graph is not None
    stale = sorted(
        (n for n in graph.nodes.values() if _FLEECE_NODE.match(n.name)),
        key=lambda n: n.name.endswith("-file"),  # format nodes before their files
    )
    # QEMU runs one NBD server, and names neither its address nor its owner. It is ours when
    # our exports were its only ones, or, killed before any export was added, when it listens
    # on a stopped backup's socket (in the scratch directory beside its fleecing overlays):
    # left running, it would refuse every later backup ("NBD server already running").
    if len(ours) == len(exports) and (ours or any(map(_listens, _scratch_sockets(stale)))):
        try:
            await wire.nbd_server_stop(vm.session)
            if not ours:
                notes.append("stopped the NBD server of a stopped controller (it had no export)")
        except BlockctlError as exc:
            notes.append(f"could not stop the NBD server of a stopped controller: {exc}")
    for node in stale:
        graph = None  # nodes go: the graph is read again
        try:
            await wire.blockdev_del(vm.session, node.name)
            notes.append(f"deleted the leftover fleecing node {node.name}")
        except BlockctlError as exc:
            # Still open in QEMU (something uses it): its scratch file stays with it.
            notes.append(f"could not delete the leftover fleecing node {node.name}: {exc}")
            continue
        if node.name.endswith("-file") and node.filename:
            scratch = Path(node.filename)
            if scratch.name.startswith("fleece-") and scratch.parent.name.startswith("bc-scratch-"):
                shutil.rmtree(scratch.parent, ignore_errors=True)
    for point in repo.incomplete_points(vm.name):
        repo.delete_point(vm.name, point)
        notes.append(f"removed the incomplete point {point} (it has no manifest)")
    _drop_attempt_record(vm)  # what it planned is gone: no retry can take it over
    settled = await _settle(vm, repo, devices=None, graph=graph)
    if settled:
        graph = None
    notes += settled
    for note in notes:
        _log.warning("blockctl.backup.recovered", vm=vm.name, note=note)
    return notes, graph


def _record_scratch(vm: VM, scratch: Path) -> None:
    if vm.run_dir is not None:
        _fsutil.atomic_write_bytes(Path(vm.run_dir) / SCRATCH_RECORD, str(scratch).encode())


def _drop_scratch_record(vm: VM) -> None:
    if vm.run_dir is not None:
        with contextlib.suppress(FileNotFoundError):
            (Path(vm.run_dir) / SCRATCH_RECORD).unlink()


def recover_offline(name: str, run_dir: Path, repo: Repository) -> list[str]:
    """:func:`recover` once QEMU is gone, and its qemu-storage-daemons with it: a killed
    backup's jobs, nodes, exports and NBD servers went with them. What it left is the
    repository's incomplete point (removed), its scratch directory (fleecing overlays, NBD
    socket: removed, found through :data:`SCRATCH_RECORD` in QEMU's run directory or in a
    vhost-user-blk disk's operations directory ``D-qsd.ops/``) and its control sockets
    (removed). The checkpoint bitmaps in the disks' images cannot be changed without a QEMU
    (nor need they be now): the next backup settles them first, as after any failed backup.
    Returns what was done."""
    notes: list[str] = []
    with _vm_lock(repo, name):
        for point in repo.incomplete_points(name):
            repo.delete_point(name, point)
            notes.append(f"removed the incomplete point {point} (it has no manifest)")
    directories = [(run_dir, "")]
    for directory in sorted(run_dir.glob(f"*{DAEMON_OPS_SUFFIX}")):
        if directory.is_dir() and not directory.is_symlink():
            device = directory.name[: -len(DAEMON_OPS_SUFFIX)]
            directories.append((directory, f" (in {device}'s qemu-storage-daemon, gone with QEMU)"))
    for directory, where in directories:
        record = directory / SCRATCH_RECORD
        try:
            scratch = Path(record.read_text().strip())
        except (OSError, UnicodeDecodeError):
            scratch = None
        # Only a directory a backup made (its prefix, its files) is removed.
        if scratch is not None and scratch.name.startswith("bc-scratch-") and scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
            notes.append(f"removed the scratch directory {scratch} of a stopped backup{where}")
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
        _drop_attempt_record(None, directory)
        for path in sorted((directory / control_ops.CONTROL_DIR).glob("*.sock")):
            if not _listens(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                job = path.name[: -len(".sock")]
                notes.append(f"removed the control socket of the stopped backup job {job}{where}")
    if notes:
        notes.append(
            "QEMU is gone: the checkpoint bitmaps in the disks' images are settled by the next "
            "backup, before it reads anything"
        )
    for note in notes:
        _log.warning("blockctl.backup.recovered", vm=name, note=note, offline=True)
    return notes


def _scratch_sockets(nodes: Sequence[GraphNode]) -> list[Path]:
    """Where the backups that added these fleecing nodes served their exports."""
    return sorted(
        {
            Path(n.filename).parent / "nbd.sock"
            for n in nodes
            if n.filename and Path(n.filename).parent.name.startswith("bc-scratch-")
        }
    )


def _listens(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (a socket file
    outlives the QEMU that listened on it)."""
    with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def latest_holding(manifests: Sequence[Manifest], device: str) -> Manifest | None:
    """The newest of ``manifests`` (oldest first) that holds ``device``. Each disk's chain of
    points is its own: a point of other disks only (a vhost-user-blk disk's backup is taken in
    its daemon, apart from QEMU's disks) neither ends nor breaks it, as its checkpoint bitmap
    is only on the disks it holds."""
    return next((m for m in reversed(manifests) if any(d.device == device for d in m.disks)), None)


def _checkpoint(
    repo: Repository, device: str, node: GraphNode, manifests: Sequence[Manifest]
) -> checkpoints.DiskCheckpoint:
    """The repository's checkpoint of one disk (``manifests``: its complete points, oldest
    first)."""
    latest = latest_holding(manifests, device)
    return checkpoints.plan(
        device=device,
        node=node.name,
        driver=node.driver,
        bitmaps=node.dirty_bitmaps,
        repository_id=repo.config.id,
        latest=None if latest is None else latest.id,
        committed=[m.id for m in manifests],
        in_latest=latest is not None
        and any(d.device == device and d.virtual_size == node.virtual_size for d in latest.disks),
    )


async def _settle(
    vm: VM, repo: Repository, devices: Sequence[str] | None, graph: BlockGraph | None = None
) -> list[str]:
    """Bring each disk's checkpoints of ``repo`` to the invariant (see :mod:`.checkpoints`).
    ``graph``: the block graph as it is now, if the caller just read it."""
    if graph is None:
        graph = await read_graph(vm)
    manifests = repo.manifests(vm.name)
    notes = []
    actions: list[dict[str, Any]] = []
    for device in graph.devices.values():
        if device.root is None or (devices is not None and device.id not in devices):
            continue
        node = graph.format_node(device.id)
        plan = _checkpoint(repo, device.id, node, manifests)
        actions += plan.settle
        actions += checkpoints.legacy_removals(node.name, node.dirty_bitmaps)
    if actions:
        await wire.transaction(vm.session, actions)
        notes.append(f"settled the checkpoints ({len(actions)} bitmap actions)")
    return notes


# Section: taking a backup

#: ``<run dir>/backup-attempt.json``: the plan of the backup running now (its point, bitmap,
#: per-disk nodes, exports and job ids, scratch directory), written before its transaction.
#: A controller killed mid-copy leaves QEMU holding the frozen point; a retry with the same
#: request id reads this to find it and continue the copy (:func:`_adoptable`).
ATTEMPT_RECORD = "backup-attempt.json"
_ATTEMPT_VERSION = 1
_JOB_ID = re.compile(r"^bc-backup-[0-9a-z-]{1,60}$")


def backup_job_id(request_id: str, number: int) -> str:
    """The fleecing job id of disk ``number`` of the backup of ``request_id``: the same in
    every attempt, so a retry finds the job its killed first attempt left running. A valid
    QMP id (letters, digits, ``-``) with the ``bc-backup-`` prefix recovery ends."""
    digest = hashlib.sha256(request_id.encode()).hexdigest()[:16]
    return f"bc-backup-{digest}-{number}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptDisk:
    """One disk of an :class:`AttemptPlan`: what the attempt added to QEMU for it."""

    device: str
    node: str
    driver: str
    virtual_size: int
    number: int
    base: str | None  # the frozen bitmap an incremental reads (None: full)
    reason: str | None
    parent: str | None
    fleece: str
    export: str
    job: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptPlan:
    """A backup attempt with a request id, as :data:`ATTEMPT_RECORD` holds it."""

    request_id: str
    vm: str
    repository: str
    point: str
    bitmap: str
    kind: str
    started: float
    scratch: str
    disks: tuple[AttemptDisk, ...]
    #: Known once the transaction ran: ``filesystem`` or ``crash``, and the frozen count.
    consistency: str | None = None
    frozen_filesystems: int = 0

    @property
    def socket(self) -> str:
        return str(Path(self.scratch) / "nbd.sock")

    def dumps(self) -> bytes:
        record = {
            "version": _ATTEMPT_VERSION,
            **{k: getattr(self, k) for k in self.__slots__ if k != "disks"},
            "disks": [{k: getattr(d, k) for k in d.__slots__} for d in self.disks],
        }
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> AttemptPlan:
        """Parse and check a record; anything else is :class:`BackupCorrupt` naming it."""

        def bad(what: str) -> BackupCorrupt:
            return BackupCorrupt(f"{where}: {what}")

        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"not JSON ({exc})") from None
        if not isinstance(record, dict) or record.get("version") != _ATTEMPT_VERSION:
            raise bad("not a version-1 backup attempt record")

        def field_of(obj: dict[str, Any], name: str, kind: Any, none: bool = False) -> Any:
            value = obj.get(name)
            if none and value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, kind):
                raise bad(f"{name}: {value!r}")
            return value

        raw_disks = record.get("disks")
        if not isinstance(raw_disks, list) or not raw_disks:
            raise bad("no disks")
        disks = []
        for n, raw in enumerate(raw_disks):
            if not isinstance(raw, dict):
                raise bad(f"disk {n}: {raw!r}")
            disk = AttemptDisk(
                device=field_of(raw, "device", str),
                node=field_of(raw, "node", str),
                driver=field_of(raw, "driver", str),
                virtual_size=field_of(raw, "virtual_size", int),
                number=field_of(raw, "number", int),
                base=field_of(raw, "base", str, none=True),
                reason=field_of(raw, "reason", str, none=True),
                parent=field_of(raw, "parent", str, none=True),
                fleece=field_of(raw, "fleece", str),
                export=field_of(raw, "export", str),
                job=field_of(raw, "job", str),
            )
            if disk.number != n or disk.virtual_size <= 0:
                raise bad(f"disk {n}: number {disk.number}, size {disk.virtual_size}")
            if not (_FLEECE_NODE.match(disk.fleece) and _EXPORT.match(disk.export)):
                raise bad(f"disk {n}: {disk.fleece!r}, {disk.export!r} are not a backup's")
            if not _JOB_ID.match(disk.job):
                raise bad(f"disk {n}: job {disk.job!r} is not a backup's")
            if (disk.base is None) != (disk.parent is None):
                raise bad(f"disk {n}: an incremental names its base and parent, a full neither")
            disks.append(disk)
        consistency = field_of(record, "consistency", str, none=True)
        if consistency not in (None, "filesystem", "crash"):
            raise bad(f"consistency: {consistency!r}")
        plan = cls(
            request_id=field_of(record, "request_id", str),
            vm=field_of(record, "vm", str),
            repository=field_of(record, "repository", str),
            point=field_of(record, "point", str),
            bitmap=field_of(record, "bitmap", str),
            kind=field_of(record, "kind", str),
            started=float(field_of(record, "started", int | float)),
            scratch=field_of(record, "scratch", str),
            disks=tuple(disks),
            consistency=consistency,
            frozen_filesystems=field_of(record, "frozen_filesystems", int),
        )
        try:
            check_request_id(plan.request_id, where)
            check_point_id(plan.point)
        except RepositoryError as exc:
            raise bad(str(exc)) from None
        if plan.kind not in ("full", "incremental"):
            raise bad(f"kind: {plan.kind!r}")
        if not Path(plan.scratch).name.startswith("bc-scratch-"):
            raise bad(f"scratch: {plan.scratch!r} is not a backup's scratch directory")
        return plan


def _record_attempt(vm: VM, plan: AttemptPlan) -> None:
    if vm.run_dir is not None:
        _fsutil.atomic_write_bytes(Path(vm.run_dir) / ATTEMPT_RECORD, plan.dumps())


def _drop_attempt_record(vm: VM | None, run_dir: Path | None = None) -> None:
    directory = run_dir if vm is None else vm.run_dir
    if directory is not None:
        with contextlib.suppress(FileNotFoundError):
            (Path(directory) / ATTEMPT_RECORD).unlink()


@dataclass(slots=True, kw_only=True)
class _Disk:
    device: str
    node: str
    driver: str
    virtual_size: int
    number: int
    base: str | None  # the frozen bitmap an incremental reads (None: full)
    reason: str | None
    parent_index: DiskIndex | None
    parent: str | None = None  # the point whose index an incremental starts from
    fleece: str = ""
    export: str = ""
    job: str | None = None  # the fleecing job's id when derived from the request id
    copier: ChunkCopier | None = None
    started: float = 0.0
    index: DiskIndex | None = None
    zero_known: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupOptions:
    """How a backup takes its point in time and reads it; checked when made
    (:class:`~blockctl.errors.ConfigError` naming the field).

    ``quiesce`` freezes the guest's filesystems around the transaction only (``True``:
    required, ``False``: off), for at most ``freeze_deadline`` s. ``connections``: NBD
    connections per disk. ``scratch_dir`` holds the fleecing overlays (what the guest
    overwrites while the backup reads; default: the temp dir).
    """

    quiesce: Quiesce = Quiesce.OFF
    freeze_deadline: float = DEFAULT_FREEZE_DEADLINE
    connections: int = DEFAULT_CONNECTIONS
    scratch_dir: Path | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "quiesce", coerce_quiesce(self.quiesce))
        deadline = self.freeze_deadline
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not deadline > 0:
            raise ConfigError("freeze_deadline", f"{deadline!r}: seconds, more than 0")
        n = self.connections
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("connections", f"{n!r}: at least 1 NBD connection per disk")
        if self.scratch_dir is not None:
            put(self, "scratch_dir", Path(self.scratch_dir))


#: The default :class:`BackupOptions`.
DEFAULT_OPTIONS = BackupOptions()


async def backup(
    vm: VM,
    repo: Repository,
    *,
    kind: str = "incremental",
    devices: Sequence[str] | None = None,
    options: BackupOptions = DEFAULT_OPTIONS,
    control: JobControl = DEFAULT_CONTROL,
    request_id: str | None = None,
    _failpoint: Failpoint = _no_failpoint,
    _fail_after_chunks: int | None = None,
) -> Manifest:
    """Back up ``devices`` (default: every writable disk) of a running VM at one point in
    time into ``repo``. ``kind`` ``incremental`` (the default) reads only what changed since
    this repository's last point of this VM; it is taken as ``full`` (the reason recorded in
    the manifest, per disk) when the repository has no usable checkpoint. ``options``: quiesce,
    NBD connections, scratch directory (:class:`BackupOptions`).

    ``control`` (:class:`~blockctl._jobs.JobControl`): ``speed``, at most this many bytes/s
    read from QEMU, all disks together; ``deadline`` (default 3600 s); ``on_error``:
    ``report`` (a full repository fails the backup), ``enospc`` or ``stop`` (the copy pauses
    on a full repository, or on any write error, until another client resumes it, ``blockctl
    jobs VM resume ID``, or ``pause_timeout`` s pass; ``ignore`` is refused); ``hooks``.
    While it copies, any process can list, pause, resume, re-speed or cancel it
    (:mod:`blockctl._backup.control`).

    ``request_id``: the caller's id of this request, recorded in the point's manifest; it
    also names the fleecing jobs (:func:`backup_job_id`). A retry with the same id (its
    first attempt's controller killed, or its answer lost) re-adopts the attempt's frozen
    point when QEMU still holds it whole (jobs running, nodes, bitmaps, exports, NBD server,
    the incomplete point: :data:`ATTEMPT_RECORD`), continuing the copy into that same point;
    otherwise it recovers what the attempt left (as :func:`recover`, the reason logged), then
    returns the point that attempt recorded, if it got that far, instead of taking a second
    one.

    ``_failpoint``/``_fail_after_chunks``: fault injection for blockctl's own tests."""
    if kind not in ("full", "incremental"):
        raise ConfigError("kind", f"{kind!r}: full or incremental")
    if control.on_error is ErrorPolicy.IGNORE:
        raise ConfigError(
            "on_error", "ignore: a backup's copy fails (report) or pauses (stop, enospc)"
        )
    copy_control = CopyControl(
        rate=control.speed, on_error=control.on_error.value, pause_timeout=control.pause_timeout
    )
    quiesce = options.quiesce
    routed = vm.daemon_disk("backup", devices)
    if routed is not None:
        # Its nodes are the daemon's: fleecing, bitmaps, NBD server and export run there.
        if quiesce is not Quiesce.OFF:
            raise ConfigError(
                "quiesce",
                f"{routed} is a vhost-user-blk disk: blockctl does not freeze the guest around "
                "a backup taken in its qemu-storage-daemon yet; back it up without quiesce",
            )
        async with vm.on_storage_daemon(routed, "backup") as daemon:
            return await backup(
                daemon,
                repo,
                kind=kind,
                devices=[routed],
                options=options,
                control=control,
                request_id=request_id,
                _failpoint=_failpoint,
                _fail_after_chunks=_fail_after_chunks,
            )
    require_agent(vm, quiesce)
    check_name(vm.identity, "VM")
    if request_id is not None:
        check_request_id(request_id)
    await vm.require(
        "blockdev-backup",
        "blockdev-create",
        "transaction",
        "block-dirty-bitmap-add",
        "job-dismiss",
        "nbd-server-start",
        "block-export-add",
        "block-export-del",
    )
    libnbd()  # before anything is changed
    with repo.lock(exclusive=False), _vm_lock(repo, vm):
        adopted = (
            None if request_id is None else await _adoptable(vm, repo, request_id, kind, devices)
        )
        if adopted is not None:
            attempt = adopted
        else:
            recovered, graph = await _recover(vm, repo)
            if request_id is not None:
                # Under the VM's lock and after recovery: the point an earlier attempt
                # recorded is complete and its checkpoints settled, or there is none.
                for manifest in reversed(repo.manifests(vm.name)):
                    if manifest.request_id == request_id:
                        _log.warning(
                            "blockctl.backup.already_recorded",
                            vm=vm.name,
                            id=manifest.id,
                            request_id=request_id,
                            recovered=recovered,
                        )
                        return manifest
            attempt = await _plan(
                vm, repo, kind, devices, options.scratch_dir, recovered, graph, request_id
            )
        return await _backup(
            vm,
            repo,
            attempt,
            control.deadline_or(3600.0),
            control.hooks,
            quiesce,
            options.freeze_deadline,
            options.connections,
            _failpoint,
            _fail_after_chunks,
            copy_control,
        )


@dataclass(slots=True, kw_only=True)
class _Attempt:
    """One backup's point and what it holds in QEMU, from its plan to its manifest."""

    point: str
    bitmap: str
    kind: str
    disks: list[_Disk]
    started: float
    scratch: Path
    request_id: str | None
    #: Taken over from a killed attempt of the same request (its frozen point still whole).
    adopted: bool = False
    consistency: str = "crash"
    frozen_filesystems: int = 0
    added: list[str] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    transaction_sent: bool = False
    server_started: bool = False

    @property
    def socket(self) -> str:
        return str(self.scratch / "nbd.sock")

    def plan(self, vm: VM, repo: Repository) -> AttemptPlan | None:
        """The record a retry of the same request reads (None: no request id)."""
        if self.request_id is None:
            return None
        return AttemptPlan(
            request_id=self.request_id,
            vm=vm.name,
            repository=repo.config.id,
            point=self.point,
            bitmap=self.bitmap,
            kind=self.kind,
            started=self.started,
            scratch=str(self.scratch),
            # A disk's plan is its fields of the same names (the job's id is set: derived
            # from the request id).
            disks=tuple(
                AttemptDisk(**{f.name: getattr(d, f.name) for f in fields(AttemptDisk)})
                for d in self.disks
            ),
            consistency=self.consistency if self.transaction_sent else None,
            frozen_filesystems=self.frozen_filesystems,
        )


async def _plan(
    vm: VM,
    repo: Repository,
    kind: str,
    devices: Sequence[str] | None,
    scratch_dir: Path | None,
    recovered: list[str],
    graph: BlockGraph | None,
    request_id: str | None,
) -> _Attempt:
    """A new point: its disks, their bases, the names of what it adds to QEMU."""
    if graph is None:
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
    manifests = repo.manifests(vm.name)
    point = new_point_id()
    bitmap = checkpoints.bitmap_name(repo.config.id, point)
    disks: list[_Disk] = []
    for n, device in enumerate(chosen):
        if device not in graph.devices or graph.devices[device].root is None:
            raise ConfigError("devices", f"{vm.name} has no disk {device!r}")
        node = graph.format_node(device)
        if node.virtual_size is None:
            raise ConfigError("devices", f"{device}: unknown size")
        plan = _checkpoint(repo, device, node, manifests)
        base = plan.base if kind == "incremental" else None
        reason = plan.reason if kind == "incremental" else None
        parent_index: DiskIndex | None = None
        latest = latest_holding(manifests, device)
        if base is not None and latest is not None:
            parent_index = repo.read_index(vm.name, latest.id, device)
            if parent_index.chunk_size != repo.chunk_size:
                base, reason, parent_index = None, "the repository's chunk size changed", None
        disks.append(
            _Disk(
                device=device,
                node=node.name,
                driver=node.driver,
                virtual_size=node.virtual_size,
                number=n,
                base=base,
                reason=reason,
                parent_index=parent_index,
                parent=None if base is None or latest is None else latest.id,
                fleece=f"bcf{n}-{point[-4:]}",
                export=f"bcx{n}-{point[-4:]}",
                job=None if request_id is None else backup_job_id(request_id, n),
            )
        )
    # Before anything is added: a passed-through LUN's writes would escape the checkpoint.
    await refuse_passed_through(vm, graph, chosen, "backup")
    if recovered and kind == "incremental":
        _log.warning("blockctl.backup.recovered_first", vm=vm.name, notes=recovered)
    for d in disks:
        if d.reason:
            _log.warning(
                "blockctl.backup.fallback_to_full", vm=vm.name, device=d.device, reason=d.reason
            )
    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="bc-scratch-", dir=scratch_dir))
    os.chmod(scratch, 0o700)
    return _Attempt(
        point=point,
        bitmap=bitmap,
        kind=kind,
        disks=disks,
        started=started,
        scratch=scratch,
        request_id=request_id,
    )


async def _adoptable(
    vm: VM, repo: Repository, request_id: str, kind: str, devices: Sequence[str] | None
) -> _Attempt | None:
    """The attempt of ``request_id`` a killed controller left, when its frozen point is
    still whole in QEMU: its fleecing jobs running, its nodes, bitmaps, exports and NBD
    server there, its point directory incomplete. Otherwise None (recovery tears down what
    is left, and the backup starts afresh), the reason logged."""
    if vm.run_dir is None:
        return None
    path = Path(vm.run_dir) / ATTEMPT_RECORD
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        plan = AttemptPlan.loads(data, str(path))
    except BackupCorrupt as exc:
        return _not_whole(vm, request_id, str(exc))
    if plan.request_id != request_id:
        return _not_whole(vm, request_id, f"{path} is the attempt of another request")
    chosen = [d.device for d in plan.disks]
    if plan.kind != kind or (devices is not None and list(devices) != chosen):
        asked = f"it was asked for a {plan.kind} backup of {chosen}, not this request's"
        return _not_whole(vm, request_id, asked)
    if (why := await _why_not_whole(vm, repo, plan)) is not None:
        return _not_whole(vm, request_id, why)
    disks = []
    for d in plan.disks:
        parent_index = None
        if d.parent is not None:
            try:
                parent_index = repo.read_index(vm.name, d.parent, d.device)
            except RepositoryError as exc:
                return _not_whole(vm, request_id, f"the parent point {d.parent}: {exc}")
            if parent_index.chunk_size != repo.chunk_size:
                return _not_whole(vm, request_id, "the repository's chunk size changed")
        disks.append(_Disk(**asdict(d), parent_index=parent_index))
    ids = [d.job for d in plan.disks]
    # Concluded jobs stay for their owners (nothing of ours concluded: checked above).
    found = {j.id: j for j in await adopt_jobs(vm.session, dismiss=False)}
    attempt = _Attempt(
        point=plan.point,
        bitmap=plan.bitmap,
        kind=plan.kind,
        disks=disks,
        started=plan.started,
        scratch=Path(plan.scratch),
        request_id=request_id,
        adopted=True,
        consistency=plan.consistency or "crash",
        frozen_filesystems=plan.frozen_filesystems,
        added=[name for d in plan.disks for name in (f"{d.fleece}-file", d.fleece)],
        jobs=[found[i] for i in ids],
        transaction_sent=True,
        server_started=True,
    )
    _log.warning(
        "blockctl.backup.readopted",
        vm=vm.name,
        id=plan.point,
        request_id=request_id,
        jobs=ids,
        note="a killed attempt's frozen point is whole in QEMU: its copy is continued",
    )
    return attempt


def _not_whole(vm: VM, request_id: str, why: str) -> _Attempt | None:
    """Logs why a killed attempt's point is not taken over; None (nothing adopted)."""
    _log.warning(
        "blockctl.backup.not_readopted",
        vm=vm.name,
        request_id=request_id,
        reason=why,
        note="what the earlier attempt left is recovered and the backup taken afresh",
    )
    return None


async def _why_not_whole(vm: VM, repo: Repository, plan: AttemptPlan) -> str | None:
    """Why the frozen point of ``plan`` cannot be read any more (None: it can)."""
    if plan.vm != vm.name:
        return f"it is the attempt of the VM {plan.vm}"
    if plan.repository != repo.config.id:
        return "it wrote into another repository"
    if plan.point not in repo.incomplete_points(vm.name):
        return f"its point {plan.point} is recorded or gone"
    if plan.consistency is None:
        return "it was stopped before its transaction ended"
    jobs = {j.id: j for j in await wire.query_jobs(vm.session)}
    exports = {e.id: e for e in await wire.query_block_exports(vm.session)}
    graph = await read_graph(vm)
    for d in plan.disks:
        job = jobs.get(d.job)
        if job is None:
            return f"its fleecing job {d.job} is gone (QEMU restarted?)"
        if job.type != "backup" or job.status is not JobStatus.RUNNING:
            return f"its fleecing job {d.job} is {job.status.value}"
        device = graph.devices.get(d.device)
        if device is None or device.root is None or graph.format_node(d.device).name != d.node:
            return f"the disk {d.device} is not on the node {d.node} any more"
        bitmaps = {b.name: b for b in graph.format_node(d.device).dirty_bitmaps}
        if plan.bitmap not in bitmaps:
            return f"the checkpoint bitmap {plan.bitmap} is gone from {d.node}"
        if d.base is not None and (d.base not in bitmaps or bitmaps[d.base].recording):
            return f"the frozen bitmap {d.base} of {d.node} is gone or recording again"
        for name in (d.fleece, f"{d.fleece}-file"):
            if name not in graph.nodes:
                return f"its fleecing node {name} is gone"
        if graph.nodes[d.fleece].backing != d.node:
            return f"its fleecing node {d.fleece} is not over {d.node}"
        export = exports.get(d.export)
        if export is None or export.node_name != d.fleece:
            return f"its NBD export {d.export} is gone"
    if not _listens(Path(plan.socket)):
        return f"no NBD server listens on {plan.socket}"
    return None


async def _backup(
    vm: VM,
    repo: Repository,
    a: _Attempt,
    deadline: float,
    hooks: Sequence[JobHook],
    quiesce: Quiesce | bool | str,
    freeze_deadline: float,
    connections: int,
    failpoint: Failpoint,
    fail_after_chunks: int | None,
    control: CopyControl,
) -> Manifest:
    """Freeze the point (unless adopted: frozen by the attempt that planned it), copy it,
    record it. One path from the copy on, whichever attempt froze the point."""
    disks = a.disks
    reasons = [f"{d.device}: {d.reason}" for d in disks if d.reason]
    _record_scratch(vm, a.scratch)
    committed = False
    batch = repo.batch()  # this backup's chunks: synced, or discarded, by this backup alone
    if not a.adopted:
        with _step(repo, "creating the point's directory"):
            repo.begin_point(vm.name, a.point)
    try:
        if (plan := a.plan(vm, repo)) is not None and not a.adopted:
            # Before anything is added to QEMU: a retry finds (or recovery ends) all of it.
            _record_attempt(vm, plan)
        async with contextlib.AsyncExitStack() as stack:
            if not a.adopted:
                await _freeze(vm, repo, a, stack, hooks, quiesce, freeze_deadline, failpoint)
            else:

                async def end_adopted_on_failure(exc_type: object, *_exc: object) -> bool:
                    if exc_type is not None:
                        await _teardown(vm, disks, a.jobs, a.added, a.server_started, hooks)
                    return False

                stack.push_async_exit(end_adopted_on_failure)
            jobs = a.jobs
            with anyio.fail_after(deadline):
                try:
                    async with (
                        control_ops.serving(control, vm.run_dir, [j.id for j in jobs]),
                        anyio.create_task_group() as tg,
                    ):
                        # The fleecing jobs hold the point-in-time view: one that ends (an I/O
                        # error copying old data aside) ends the backup.
                        for job in jobs:
                            tg.start_soon(_watch_fleece, job, hooks, deadline)
                        tg.start_soon(control_ops.watch_cancel, control, jobs[0].id)
                        for d in disks:
                            await _copy_disk(
                                d,
                                repo,
                                batch,
                                a.socket,
                                connections,
                                hooks,
                                fail_after_chunks,
                                control,
                                jobs[0].id,
                            )
                        tg.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # One failure, said as itself: callers catch NbdError, OSError, JobFailed.
                    raise _first_leaf(group) from None

            # The copy is done: QEMU's side goes before the repository is committed, while
            # the chunks are made durable (independent: one waits for QEMU, one for the disk).
            async def qemu_side() -> None:
                await _teardown(vm, disks, jobs, a.added, a.server_started, hooks)
                # The overlays go with their nodes: a controller killed from here on leaves
                # no scratch file that recovery (which finds them through the nodes) could
                # not see; gone before the sync, their pages are not written back.
                shutil.rmtree(a.scratch, ignore_errors=True)

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(qemu_side)
                    with _step(repo, "making the chunks durable"):
                        await anyio.to_thread.run_sync(batch.sync)
            except BaseExceptionGroup as group:
                raise _first_leaf(group) from None
            a.server_started = False
        shutil.rmtree(a.scratch, ignore_errors=True)
        await _at(failpoint, "after-chunks")
        for d in disks:
            assert d.index is not None
            with _step(repo, f"writing the index of {d.device}"):
                repo.write_index(vm.name, a.point, d.device, d.index)
        await _at(failpoint, "after-index")
        version = await vm.version()
        manifest = Manifest(
            id=a.point,
            vm=vm.name,
            kind="incremental" if any(d.base for d in disks) else "full",
            # Disks backed up apart have their own last points: the newest is the parent.
            parent=max((d.parent for d in disks if d.parent is not None), default=None),
            checkpoint=a.bitmap,
            started=a.started,
            completed=time.time(),
            qemu=str(version),
            disks=tuple(_disk_point(d) for d in disks),
            fallback_reason=None if a.kind == "full" or not reasons else "; ".join(reasons),
            consistency=a.consistency,
            frozen_filesystems=a.frozen_filesystems,
            request_id=a.request_id,
        )
        with _step(repo, "writing the manifest"):
            repo.write_manifest(manifest)
        committed = True
        # The point is recorded: a hook reporting an interrupt says so, not "nothing recorded".
        call_hooks(hooks, "on_point_recorded", manifest)
        await _at(failpoint, "after-manifest")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _teardown(vm, disks, a.jobs, a.added, a.server_started, hooks)
            batch.discard()
            if not committed:
                with contextlib.suppress(OSError, RepositoryError):
                    repo.delete_point(vm.name, a.point)
            if a.transaction_sent:
                # Merge this attempt's bitmap into the last good point's and enable it (or,
                # if the manifest was written, give up the old one): nothing is lost.
                try:
                    await _settle(vm, repo, devices=[d.device for d in disks])
                except BlockctlError as exc:
                    _log.error(
                        "blockctl.backup.checkpoints_unsettled",
                        vm=vm.name,
                        error=str(exc),
                        note="run `blockctl recover VM --repo R` or the next backup settles them",
                    )
            shutil.rmtree(a.scratch, ignore_errors=True)
            _drop_scratch_record(vm)
            _drop_attempt_record(vm)
        raise
    shutil.rmtree(a.scratch, ignore_errors=True)
    _drop_scratch_record(vm)
    _drop_attempt_record(vm)
    # The point is durable: now the previous checkpoints may go.
    try:
        await _settle(vm, repo, devices=[d.device for d in disks])
    except BlockctlError as exc:
        _log.warning("blockctl.backup.old_checkpoint_kept", vm=vm.name, error=str(exc))
    _log.info(
        "blockctl.backup.done",
        vm=vm.name,
        id=a.point,
        kind=manifest.kind,
        bytes_read=manifest.bytes_read,
        bytes_new=manifest.bytes_new,
        readopted=a.adopted,
    )
    return manifest


async def _freeze(
    vm: VM,
    repo: Repository,
    a: _Attempt,
    stack: contextlib.AsyncExitStack,
    hooks: Sequence[JobHook],
    quiesce: Quiesce | bool | str,
    freeze_deadline: float,
    failpoint: Failpoint,
) -> None:
    """The point in time: fleecing nodes, one transaction (new bitmaps, frozen bases,
    fleecing jobs), the NBD server and the exports. The jobs' handles live on ``stack``,
    which tears everything down if the block it guards fails."""
    disks = a.disks
    await _at(failpoint, "before-transaction")
    for d in disks:
        path = a.scratch / f"fleece-{d.device}.qcow2"
        _fsutil.create_private_file(path)
        write_empty(path, d.virtual_size)
        scratch_file: FileOptions = {
            "driver": "file",
            "node-name": f"{d.fleece}-file",
            "filename": str(path),
            # Scratch that no crash needs back: flushes (formatting and copying old data
            # aside) would only wait for the disk.
            "cache": {"no-flush": True},
        }
        await wire.blockdev_add(vm.session, scratch_file)
        a.added.append(f"{d.fleece}-file")
        fleece: FormatOptions = {
            "driver": "qcow2",
            "node-name": d.fleece,
            "file": f"{d.fleece}-file",
            "backing": d.node,
        }
        await wire.blockdev_add(vm.session, fleece)
        a.added.append(d.fleece)
    actions: list[dict[str, Any]] = []
    points: list[Quiesced] = []

    def start_for(d: _Disk, last: bool) -> Callable[[str], Any]:
        async def start(job_id: str) -> None:
            actions.append(
                wire.bitmap_add_action(
                    d.node, a.bitmap, persistent=checkpoints.persistent_for(d.driver)
                )
            )
            if d.base is not None:
                actions.append(wire.bitmap_disable_action(d.node, d.base))
            actions.append(
                wire.backup_action(job_id=job_id, device=d.node, target=d.fleece, sync="none")
            )
            if last:
                async with quiesced(
                    vm, quiesce, operation="backup", freeze_deadline=freeze_deadline
                ) as frozen:
                    await wire.transaction(vm.session, actions)
                    a.transaction_sent = True
                points.append(frozen)

        return start

    for i, d in enumerate(disks):
        a.jobs.append(
            await stack.enter_async_context(
                start_job(
                    vm.session,
                    "backup",
                    start_for(d, i == len(disks) - 1),
                    target=d.fleece,
                    hooks=hooks,
                    job_id=d.job,
                )
            )
        )

    async def end_jobs_on_failure(exc_type: object, *_exc: object) -> bool:
        # Before the job handles close: they would warn that a job was abandoned,
        # while ending a sync=none fleecing job by a cancel is how it always ends.
        if exc_type is not None:
            await _teardown(vm, disks, a.jobs, a.added, a.server_started, hooks)
        return False

    stack.push_async_exit(end_jobs_on_failure)
    if points and points[0].consistent:
        a.consistency, a.frozen_filesystems = "filesystem", points[0].frozen
    else:
        a.consistency, a.frozen_filesystems = "crash", points[0].frozen if points else 0
    if (plan := a.plan(vm, repo)) is not None:
        _record_attempt(vm, plan)  # with the consistency the transaction gave
    await _at(failpoint, "after-transaction")
    await wire.nbd_server_start(vm.session, a.socket)
    a.server_started = True
    await _at(failpoint, "after-server-start")
    for d in disks:
        await wire.block_export_add(
            vm.session,
            export_id=d.export,
            node=d.fleece,
            name=d.device,
            writable=False,
            bitmaps=() if d.base is None else ((d.node, d.base),),
        )


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_leaf(exc)
        return exc
    return group


async def _watch_fleece(job: Job, hooks: Sequence[JobHook], deadline: float) -> None:
    try:
        await job.wait(
            complete_on_ready=False, deadline=deadline + 60, hooks=hooks, progress_interval=None
        )
    except JobError as exc:
        raise JobFailed(
            f"the fleecing job {job.id} ended during the copy, so the point-in-time view is "
            f"gone: {exc}; the backup is not recorded",
            job_id=exc.job_id,
            job_type=exc.job_type,
            target=exc.target,
            status=exc.status,
            error=exc.error,
            offset=exc.offset,
            length=exc.length,
        ) from exc
    raise JobFailed(
        f"the fleecing job {job.id} ended during the copy; the backup is not recorded",
        job_id=job.id,
        job_type="backup",
        target=None,
        status="concluded",
        error=None,
        offset=None,
        length=None,
    )


def _disk_point(d: _Disk) -> DiskPoint:
    assert d.index is not None and d.copier is not None
    stats = d.copier.stats
    zero_chunks = sum(1 for i in range(d.index.count) if d.index.at(i) == ZERO_DIGEST)
    return DiskPoint(
        device=d.device,
        node=d.node,
        virtual_size=d.virtual_size,
        chunk_size=d.index.chunk_size,
        disk_digest=d.index.disk_digest(),
        chunks=d.index.count,
        zero_chunks=zero_chunks,
        bytes_read=stats.bytes_read,
        bytes_new=stats.bytes_new,
        bytes_stored=stats.bytes_stored,
        seconds=round(time.monotonic() - d.started, 3),
    )


async def _copy_disk(
    d: _Disk,
    repo: Repository,
    batch: ChunkBatch,
    socket: str,
    connections: int,
    hooks: Sequence[JobHook],
    fail_after_chunks: int | None,
    control: CopyControl,
    job_id: str,
) -> None:
    d.started = time.monotonic()
    plan = await anyio.to_thread.run_sync(
        lambda: plan_reads(
            socket,
            d.device,
            size=d.virtual_size,
            chunk_size=repo.chunk_size,
            dirty_bitmap=d.base,
        )
    )
    if d.parent_index is not None:
        d.index = d.parent_index.copy()
    else:
        d.index = DiskIndex.empty(d.virtual_size, repo.chunk_size)
    copier = ChunkCopier(
        socket=socket,
        export=d.device,
        repo=repo,
        index=d.index,
        chunks=plan.read,
        connections=connections,
        fail_after=fail_after_chunks,
        batch=batch,
        control=control,
    )
    d.copier = copier
    done_before = control.done
    control.total += copier.total
    copier.start()
    try:
        while not copier.finished.is_set():
            # Wakes as soon as the copy ends; progress every 0.25 s meanwhile.
            await anyio.to_thread.run_sync(copier.finished.wait, 0.25)
            control.done = done_before + copier.stats.bytes_read
            _progress(d, f"read-{d.device}", hooks)
            if (paused := control.new_error_pause()) is not None:
                # Said to the hooks once per pause: the CLI prints the command that resumes.
                error = JobIOError(
                    job_id=job_id,
                    job_type="backup",
                    operation="write",
                    action="stop",
                    count=paused.count,
                    pause_timeout=paused.pause_timeout,
                    seconds=time.monotonic() - d.started,
                )
                call_hooks(hooks, "on_io_error", error)
    finally:
        copier.stop()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(copier.join_quietly)
    copier.join()
    control.done = done_before + copier.stats.bytes_read
    _progress(d, f"read-{d.device}", hooks)


def _progress(d: _Disk, job_id: str, hooks: Sequence[JobHook]) -> None:
    assert d.copier is not None
    done, total = d.copier.stats.bytes_read, d.copier.total
    now = time.monotonic()
    rate = measure_rate(d.samples, now, done)
    eta = None if not rate else max(0.0, (total - done) / rate)
    record = JobProgress(
        job_id=job_id,
        job_type="backup-read",
        status=JobStatus.RUNNING,
        done=done,
        total=total,
        rate=rate,
        eta=eta,
        seconds=now - d.started,
    )
    for hook in hooks:
        hook.on_progress(record)


async def _teardown(
    vm: VM,
    disks: list[_Disk],
    jobs: list[Job],
    added: list[str],
    server_started: bool,
    hooks: Sequence[JobHook] = DEFAULT_HOOKS,
) -> None:
    """Exports, server, fleecing jobs (sync=none runs until cancelled: that is its end),
    then the nodes, top-down. Shielded; every step is tried whatever the others did."""
    with anyio.CancelScope(shield=True):
        for d in disks:
            with contextlib.suppress(BlockctlError):
                await wire.block_export_del(vm.session, d.export)
        if server_started:
            with contextlib.suppress(BlockctlError):
                await wire.nbd_server_stop(vm.session)
        for job in jobs:
            if not job.done:
                with contextlib.suppress(BlockctlError):
                    await job.cancel()
                    await job.wait(complete_on_ready=False, deadline=60, hooks=hooks)
        await delete_nodes(vm, added, event="blockctl.backup.node_kept")
        added.clear()


# Section: restore, verify, prune


#: Threads of a qcow2 restore. Measured here (2 cores, shared; 512 MiB random, 8 runs in
#: rotated order against `qemu-img convert -O qcow2` + fsync at 927 MB/s): 2 threads 576,
#: 3 833, 4 821 MB/s; 64 MiB: 777, 809, 799 against 705. A thread waits in the writeback
#: it starts after each chunk while the others hash.
RESTORE_CONNECTIONS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreResult:
    path: Path | IscsiSource | NfsSource  # a remote image: the source it was given as
    format: ImageFormat
    device: str
    point: str
    bytes_written: int
    chunks_verified: int
    seconds: float


async def restore(
    repo: Repository,
    vm_name: str,
    point: str,
    device: str,
    dest: Path | IscsiSource | NfsSource,
    fmt: ImageFormat = ImageFormat.QCOW2,
    *,
    connections: int | None = None,
) -> RestoreResult:
    """Rebuild ``device`` as it was at ``point`` into a new image (raw or qcow2, sparse, mode
    0600). Every chunk is checked against its digest before it is written, the index against
    the manifest first. The new file appears at ``dest`` only once complete and durable: a
    failure, or a kill, leaves nothing there. ``dest`` may also be an existing remote image,
    an iSCSI LUN (raw) or an NFS image (:mod:`.remote`). ``connections``: writer threads
    (default 2 for raw, 4 for qcow2). qcow2 is written directly (:mod:`.qcow2`): zero chunks
    and zero clusters stay unallocated."""
    started = time.monotonic()
    manifest = repo.get(vm_name, point)
    disk = manifest.disk(device)
    if fmt not in (ImageFormat.RAW, ImageFormat.QCOW2):
        raise ConfigError("format", f"restore writes raw or qcow2, not {fmt.value}")
    if isinstance(dest, IscsiSource | NfsSource):
        index = repo.read_index(vm_name, point, device)
        _check_index(index, disk, device, point)
        await remote.restore_onto(repo, vm_name, point, device, index, dest, fmt)
        return RestoreResult(
            path=dest,
            format=fmt,
            device=device,
            point=point,
            bytes_written=sum(index.chunk_length(i) for i in _data_chunks(index)),
            chunks_verified=len(_data_chunks(index)),
            seconds=round(time.monotonic() - started, 3),
        )
    # A URL (``iscsi://…``, ``nfs://…``; a Path has folded its ``//`` into ``/``).
    if re.match(r"^[a-z][a-z0-9+.-]*:/", str(dest)):
        raise ConfigError(
            "dest",
            f"{dest}: a path is a local file or block device; a remote image is given as an "
            "IscsiSource or an NfsSource (the CLI parses iscsi:// and nfs:// URLs into them)",
        )
    dest = Path(dest).absolute()
    device_target = dest.is_block_device()
    if device_target and fmt is not ImageFormat.RAW:
        raise ConfigError(
            "format", f"{dest} is a block device: a restore onto it writes raw (-O raw)"
        )
    if (dest.exists() or dest.is_symlink()) and not device_target:
        raise ConfigError(
            "dest", f"{dest} exists; restore writes a new file (or an existing block device, raw)"
        )
    index = repo.read_index(vm_name, point, device)
    _check_index(index, disk, device, point)
    chunks = _data_chunks(index)
    written = 0
    if device_target:
        return await _restore_onto_device(repo, index, chunks, point, device, dest, started)
    # Complete or absent: the image is written as a file with no name yet and named only once
    # its data is durable, so a restore killed midway leaves nothing at ``dest`` that could be
    # taken for the disk (where the filesystem has no unnamed files, ``dest`` is written
    # directly and removed on failure, as before).
    fd = _fsutil.unnamed_file(dest.parent)
    ours = fd is None  # ``dest`` is this restore's own file (to remove on failure)
    if fd is None:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        direct: int | None = None
        try:
            os.fchmod(fd, 0o600)
            # The data goes past the page cache where the file takes it (blockctl._direct).
            direct = _direct.reopen_direct(fd)
            image: Qcow2Writer | None = None
            if fmt is ImageFormat.QCOW2:
                image = Qcow2Writer(fd, index.virtual_size, index.chunk_size, chunks, direct)
            else:
                os.ftruncate(fd, index.virtual_size)
            written = await anyio.to_thread.run_sync(
                _restore_into,
                repo,
                index,
                chunks,
                point,
                connections or (RESTORE_CONNECTIONS if image else DEFAULT_CONNECTIONS),
                fd,
                direct,
                image,
            )
            if image is not None:
                image.finish()
            else:
                os.ftruncate(fd, index.virtual_size)  # a padded last chunk's tail cut off
            os.fsync(fd)
            if not ours:
                try:
                    _fsutil.name_unnamed_file(fd, dest)
                except FileExistsError:
                    raise ConfigError(
                        "dest",
                        f"{dest} was created by someone else while the restore wrote it: "
                        "the restored image was dropped; restore again to a new file",
                    ) from None
                ours = True
        finally:
            if direct is not None:
                os.close(direct)
            os.close(fd)
    except BaseException:
        if ours:
            dest.unlink(missing_ok=True)
        raise
    return RestoreResult(
        path=dest,
        format=fmt,
        device=device,
        point=point,
        bytes_written=written,
        chunks_verified=len(chunks),
        seconds=round(time.monotonic() - started, 3),
    )


def _check_index(index: DiskIndex, disk: DiskPoint, device: str, point: str) -> None:
    if index.disk_digest() != disk.disk_digest or index.virtual_size != disk.virtual_size:
        raise BackupCorrupt(
            f"the index of {device} in {point} does not match its manifest: the repository is "
            "damaged (run `blockctl backup verify`)"
        )


def _data_chunks(index: DiskIndex) -> list[int]:
    """The chunks a restore writes: all but the zero chunks."""
    return [i for i in range(index.count) if index.at(i) != ZERO_DIGEST]


#: Linux's BLKZEROOUT ioctl (_IO(0x12, 127)): zero a byte range of a block device.
_BLKZEROOUT = 0x127F
#: The byte range QEMU's image locking uses (file-posix: permission bytes from 100, shared
#: bytes from 200): a POSIX write lock over it conflicts with any QEMU holding the device.
_QEMU_LOCK_START, _QEMU_LOCK_LENGTH = 100, 200


async def _restore_onto_device(
    repo: Repository,
    index: DiskIndex,
    chunks: list[int],
    point: str,
    device: str,
    dest: Path,
    started: float,
) -> RestoreResult:
    """:func:`restore` onto an existing block device (raw): refused while anything holds it
    (a mount or exclusive holder: ``O_EXCL``; a QEMU: its image locks) or when it is smaller
    than the disk; the disk's range is zeroed first (a device is not sparse like a new file:
    the point's zero chunks must read as zeros), then the data chunks are written, the first
    one last. A failure midway leaves the device partly written, and says so; a kill midway
    leaves it with its first chunk zeros."""
    import fcntl
    import struct

    size = index.virtual_size
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            "dest",
            f"cannot open the block device {dest} for the restore: {exc.strerror} (it is "
            "mounted or held by another program): release it, then restore again",
        ) from exc
    direct: int | None = None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _QEMU_LOCK_LENGTH, _QEMU_LOCK_START)
        except OSError as exc:
            raise ConfigError(
                "dest",
                f"the block device {dest} is in use by a QEMU (it holds the device's image "
                "locks): nothing was written; detach the device from that VM or shut the VM "
                "down, then restore again",
            ) from exc
        have = os.lseek(fd, 0, os.SEEK_END)
        if have < size:
            raise ConfigError(
                "dest",
                f"the block device {dest} holds {have} bytes, {device} at {point} {size}: "
                "nothing was written; give a block device at least as large",
            )
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", 0, size))
            # Direct I/O pads the last write to a page: a file is cut back afterwards, a
            # device is not, so a disk that ends mid-page is written through the page cache
            # (the padding would overwrite the device's bytes past the disk).
            if size % _direct.ALIGN == 0:
                direct = _direct.reopen_direct(fd)
            # The disk's first chunk (partition table, superblock, boot sector) goes last,
            # after the rest is durable: a restore killed midway leaves a device whose start
            # reads zeros, which nothing mounts or boots as the disk.
            first = chunks[:1] if chunks[:1] == [0] else []
            written = await anyio.to_thread.run_sync(
                _restore_into,
                repo,
                index,
                chunks[len(first) :],
                point,
                DEFAULT_CONNECTIONS,
                fd,
                direct,
                None,
            )
            os.fsync(fd)
            if first:
                written += await anyio.to_thread.run_sync(
                    _restore_into, repo, index, first, point, 1, fd, direct, None
                )
                os.fsync(fd)
        except BaseException as exc:
            exc.add_note(
                f"the block device {dest} is partly written (zeroed from 0 to {size}, some "
                "chunks restored, its first chunk not yet): restore again before using it"
            )
            raise
    finally:
        if direct is not None:
            os.close(direct)
        os.close(fd)
    return RestoreResult(
        path=dest,
        format=ImageFormat.RAW,
        device=device,
        point=point,
        bytes_written=written,
        chunks_verified=len(chunks),
        seconds=round(time.monotonic() - started, 3),
    )


def _restore_into(
    repo: Repository,
    index: DiskIndex,
    chunks: list[int],
    point: str,
    connections: int,
    fd: int,
    direct: int | None,
    image: Qcow2Writer | None,
) -> int:
    """Threads: read+verify chunks, write them at their offsets (raw) or their slots in the
    new qcow2 ``image``, through ``direct`` (the file opened with O_DIRECT) where it was
    taken; otherwise buffered, the qcow2 file's writeback started after each chunk, so the
    final fsync waits for the rest only."""
    import threading

    lock = threading.Lock()
    writes = [direct]  # the O_DIRECT descriptor while the file takes it
    work = iter(chunks)
    errors: list[BaseException] = []
    total = [0]

    def worker() -> None:
        try:
            while True:
                with lock:
                    if errors:
                        return
                    i = next(work, None)
                if i is None:
                    return
                data = repo.read_chunk_view(
                    index.at(i), index.chunk_length(i), where=f" of {point}"
                )
                if image is not None:
                    image.write_chunk(i, data)
                    if image.direct_fd is None:
                        start_writeback(fd, image.host_offset(i), index.chunk_size)
                elif not _write_direct(writes, data, i * index.chunk_size):
                    view = memoryview(data)
                    offset = i * index.chunk_size
                    while view:
                        n = os.pwrite(fd, view, offset)
                        view, offset = view[n:], offset + n
                with lock:
                    total[0] += len(data)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, connections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return total[0]


def _write_direct(writes: list[int | None], data: bytes | memoryview, offset: int) -> bool:
    """``data`` at ``offset`` of a raw image past the page cache; False where it was not
    (no O_DIRECT, or refused now: then never again for this file)."""
    direct = writes[0]
    if direct is None:
        return False
    try:
        _direct.pwrite_direct(direct, (data,), offset)
    except OSError as exc:
        if not _direct.refused(exc):
            raise
        writes[0] = None
        return False
    return True


VERIFY_THREADS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    point: str
    ok: bool
    problems: tuple[str, ...]
    chunks_checked: int
    bytes_checked: int
    #: Points (of any VM in the repository) that reference a bad chunk.
    affected: tuple[str, ...] = ()


async def verify(
    repo: Repository, vm_name: str, point: str, *, sample: float | None = None
) -> Verification:
    """Check a point: its manifest, its indexes against the manifest, and every chunk it
    references (read, decrypted, decompressed, hashed) — so a damaged chunk anywhere in its
    history is found. ``sample`` (0-1): check that fraction of the chunks, chosen at random."""
    return await anyio.to_thread.run_sync(_verify, repo, vm_name, point, sample)


def _verify(repo: Repository, vm_name: str, point: str, sample: float | None) -> Verification:
    import random

    problems: list[str] = []
    checked = checked_bytes = 0
    bad: set[bytes] = set()
    try:
        manifest = repo.get(vm_name, point)
    except BackupCorrupt as exc:
        return Verification(
            point=point, ok=False, problems=(str(exc),), chunks_checked=0, bytes_checked=0
        )
    for disk in manifest.disks:
        try:
            index = repo.read_index(vm_name, point, disk.device)
        except RepositoryError as exc:
            problems.append(f"{disk.device}: {exc}")
            continue
        if index.disk_digest() != disk.disk_digest or index.virtual_size != disk.virtual_size:
            problems.append(f"{disk.device}: the index does not match the manifest")
        wanted: dict[bytes, int] = {}
        for i in range(index.count):
            digest = index.at(i)
            if digest != ZERO_DIGEST:
                wanted.setdefault(digest, index.chunk_length(i))
        items = list(wanted.items())
        if sample is not None:
            items = random.sample(items, max(1, int(len(items) * sample))) if items else []

        def check(item: tuple[bytes, int]) -> str | None:
            try:
                repo.read_chunk_view(item[0], item[1])
            except RepositoryError as exc:
                return str(exc)
            return None

        # Reading, decrypting, decompressing and hashing release the GIL: threads pay.
        with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
            for (digest, length), problem in zip(items, pool.map(check, items), strict=True):
                if problem is not None:
                    problems.append(f"{disk.device}: {problem}")
                    bad.add(digest)
                checked += 1
                checked_bytes += length
    affected: list[str] = []
    if bad:
        for vm in repo.vms():
            for other in repo.manifests(vm):
                for disk in other.disks:
                    with contextlib.suppress(RepositoryError):
                        if repo.read_index(vm, other.id, disk.device).referenced() & bad:
                            affected.append(f"{vm}/{other.id}")
                            break
        problems.append("points affected by the damaged chunks: " + ", ".join(affected))
    return Verification(
        point=point,
        ok=not problems,
        problems=tuple(problems),
        chunks_checked=checked,
        bytes_checked=checked_bytes,
        affected=tuple(affected),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServedPoint:
    """A point a prune would have deleted, kept because an NBD server serves it."""

    point: str
    #: The server's pid and the VM whose live restore it serves, when ``/proc`` names them.
    pid: int | None
    into: str | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneResult:
    deleted: tuple[str, ...]
    #: Every point left, those in ``served`` too.
    kept: tuple[str, ...]
    chunks_removed: int
    bytes_removed: int
    gc_skipped: str | None = None
    served: tuple[ServedPoint, ...] = ()


async def prune(
    repo: Repository,
    vm_name: str,
    *,
    keep_last: int | None = None,
    keep_within: float | None = None,
    gc: bool = True,
) -> PruneResult:
    """Keep the newest ``keep_last`` points and/or those newer than ``keep_within`` seconds
    (the newest point holding each disk always stays: that disk's checkpoint is named after
    it, and a disk backed up apart, like a vhost-user-blk disk in its daemon, keeps a point);
    delete the others, except those an NBD server serves (a live restore's: a recovery
    replacing a dead server starts the new one from the point; kept, in ``served`` with
    the reason), then collect the chunks no point references (skipped, and said, while a
    backup writes or a server runs)."""
    if keep_last is None and keep_within is None:
        raise ConfigError("keep", "say what to keep: keep_last (--keep) or keep_within")
    if keep_last is not None and keep_last < 1:
        raise ConfigError("keep_last", "keep at least one backup")
    manifests = repo.manifests(vm_name)
    now = time.time()
    devices = {d.device for m in manifests for d in m.disks}
    keep = {m.id for m in (latest_holding(manifests, d) for d in devices) if m is not None}
    if keep_last is not None:
        keep |= {m.id for m in manifests[-keep_last:]}
    if keep_within is not None:
        keep |= {m.id for m in manifests if now - m.completed <= keep_within}
    doomed: list[str] = []
    served: list[ServedPoint] = []
    for point in (m.id for m in manifests if m.id not in keep):
        # Each point is locked exclusively for its deletion; a server holds its point's lock
        # shared from before it listens: either the server holds it (the point stays) or it
        # waits for the deletion and then finds no point (Repository.serving).
        if repo.delete_point_unless_served(vm_name, point):
            doomed.append(point)
        else:
            served.append(_served_point(repo, vm_name, point))
    removed = removed_bytes = 0
    skipped = None
    if gc and doomed:
        try:
            result = await anyio.to_thread.run_sync(repo.gc)
            removed, removed_bytes = result.chunks_removed, result.bytes_removed
        except RepositoryBusy as exc:
            skipped = str(exc)
    return PruneResult(
        deleted=tuple(doomed),
        kept=tuple(m.id for m in manifests if m.id not in doomed),
        chunks_removed=removed,
        bytes_removed=removed_bytes,
        gc_skipped=skipped,
        served=tuple(served),
    )


def _served_point(repo: Repository, vm_name: str, point: str) -> ServedPoint:
    """Why a point that holds a server's lock stays, naming the server when ``/proc`` can
    (it may have stopped since: then it is named as unknown, and the point still stays)."""
    server = next((s for s in repo.servers_holding() if s.vm == vm_name and s.point == point), None)
    if server is None:
        return ServedPoint(
            point=point,
            pid=None,
            into=None,
            reason="served by an NBD server of this repository (a live restore's?) that "
            "cannot be named: prune again once it has stopped",
        )
    if server.into is None:
        return ServedPoint(
            point=point,
            pid=server.pid,
            into=None,
            reason=f"served by the NBD server pid {server.pid}: prune again once it has stopped",
        )
    return ServedPoint(
        point=point,
        pid=server.pid,
        into=server.into,
        reason=f"served by the live restore into the VM {server.into} (pid {server.pid}): "
        f"let the restore finish, or `blockctl recover {server.into}`, then prune again",
    )


def summary(manifest: Manifest) -> Mapping[str, Any]:
    """The figures of a point, one meaning in every mode (for ``backup list`` and events)."""
    read, new, stored = manifest.bytes_read, manifest.bytes_new, manifest.bytes_stored
    return {
        "bytes_read": read,
        "bytes_new": new,
        "bytes_stored": stored,
        "dedup_ratio": None if not new else round(read / new, 3),
        "compression_ratio": None if not stored else round(new / stored, 3),
    }
