"""Launching, attaching to and shutting down QEMU.

- :func:`open_vm` launches QEMU as a child that dies with this process (PR_SET_PDEATHSIG) and
  guarantees it is shut down and reaped when the block exits, however it exits.
- :func:`launch_detached` starts a named VM that outlives the caller (``blockctl up``).
- :func:`attach` connects to a running QEMU's QMP socket (a named VM, a path, or host:port).

QMP runs over a socketpair handed to QEMU (``-chardev socket,fd=N``), so there is no socket
file to poll for; a second monitor on ``<run dir>/qmp.sock`` lets other processes attach, and a
named VM has a pool of more (``qmp-N.sock``, :mod:`blockctl._monitors`) so that several
processes can drive it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
from anyio.abc import SocketStream

from blockctl import (
    _binaries,
    _fsutil,
    _images,
    _journal,
    _monitors,
    _proc,
    _runtime,
    _storage_daemon,
)
from blockctl._accel import AccelChoice, choose_accel
from blockctl._argv import (
    ConsoleFd,
    ConsoleSocket,
    DrivePlan,
    DriveSource,
    build_argv,
    over_backing,
    plan_drives,
)
from blockctl._console import GuestConsole
from blockctl._log import get_logger
from blockctl._qmp import wire
from blockctl._qmp.models import BlockDevice, BlockNode, Capabilities, StatusInfo, VersionInfo
from blockctl._qmp.session import QMPSession, describe_exit, raise_single
from blockctl._registry import DaemonDriveRegistry, DriveRecord, DriveRegistry
from blockctl.errors import (
    BlockctlError,
    ConfigError,
    ConnectionLost,
    InStorageDaemon,
    LaunchFailed,
    MissingComponent,
    QMPConnectFailed,
    ShutdownFailed,
    StorageDaemonBusy,
    StorageDaemonFailed,
    Unsupported,
    VMExists,
)
from blockctl.types import Drive, ImageFormat, MachineConfig

_log = get_logger()

#: The guest agent's socket in a VM's run directory, the same path for the launcher and for
#: any process that attaches by name (``blockctl._agent.agent_socket``).
AGENT_SOCKET = "qga.sock"


def qemu_system_binary() -> str:
    """``$BLOCKCTL_QEMU_SYSTEM``, else ``$BLOCKCTL_QEMU_PREFIX/bin/…``, else from PATH."""
    return _binaries.qemu_system()


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Deadlines, in seconds, of the steps of a VM's life.

    ``Timeouts(powerdown=30)`` asks the guest to power off first and waits 30 s for it.
    """

    launch: float = 30.0  # QEMU started → QMP greeting
    powerdown: float | None = None  # ACPI power button → QEMU exit; None skips the rung
    quit: float = 10.0  # QMP quit → QEMU exit
    terminate: float = 5.0  # SIGTERM → QEMU exit, before SIGKILL


#: How long a resumed VM must keep running before :meth:`VM.resume` counts it as resumed: the
#: requests QEMU retries on ``cont`` fail, and pause it again, within this time.
RESUME_SETTLE = 1.0
#: How long an operation routed to a qemu-storage-daemon waits for its monitor's greeting:
#: the monitor takes one client at a time, so no greeting means another client holds it.
DAEMON_GREETING_TIMEOUT = 10.0


class VM:
    """A running QEMU this process has a QMP session with (launched or attached).

    Typed queries for the common questions; everything else goes through the operation
    modules, which take ``vm.session``.
    """

    def __init__(
        self,
        session: QMPSession,
        *,
        name: str,
        pid: int | None,
        run_dir: Path | None = None,
        monitor: Path | None = None,
        pool: tuple[Path, ...] = (),
        named: bool = True,
    ) -> None:
        self.session = session
        self.name = name
        #: False for a QEMU attached by address that has no identity (no ``-name``, no
        #: ``vm_name``): ``name`` is then a description, never used to name a file.
        self.named = named
        self.pid = pid
        #: Where blockctl keeps this VM's files; None for a QEMU it did not launch.
        self.run_dir = run_dir
        #: The pool monitor this session holds (None: the launcher's own, or one by path).
        self.monitor = monitor
        #: The VM's pool of monitors (empty: a single monitor, one client at a time).
        self.pool = pool
        self._registry = DriveRegistry.load(run_dir)
        self._capabilities: Capabilities | None = None
        self._version: VersionInfo | None = None

    @property
    def registry(self) -> DriveRegistry:
        """The options of the drives blockctl created (for reopen and unplug), as the VM's
        record has them now: another client may have changed them since the last look."""
        self._registry.refresh()
        return self._registry

    @property
    def identity(self) -> str:
        """The VM's name where it names files (snapshot overlays, backup points)."""
        if not self.named:
            raise ConfigError(
                "vm_name",
                f"{self.name} was started without -name, and this operation names files "
                "after the VM: give it an identity with --vm-name NAME (the library: "
                "attach(..., vm_name=NAME)), the same one every time",
            )
        return self.name

    async def status(self) -> StatusInfo:
        """QEMU's run state: ``status`` ``io-error`` is a VM paused by a drive's error
        policy (rerror/werror ``stop``); :func:`blockctl.drives.list_drives` names the drive
        (``DriveInfo.io_status``)."""
        return await wire.query_status(self.session)

    async def resume(self, *, timeout: float = 10.0) -> StatusInfo:
        """Resume a paused VM (QMP ``cont``) and return its run state afterwards.

        After an I/O-error pause (rerror/werror ``stop``) QEMU retries the failed requests on
        ``cont``; if they fail again the VM pauses again (status ``io-error``), nothing lost.
        QEMU's NBD client reconnects in the background, started by the first retried request,
        which fails: so a VM that pauses again within :data:`RESUME_SETTLE` s is resumed
        again, until ``timeout`` s have passed. The returned status is then ``io-error`` if
        the storage is still away. A running VM is left running.
        """
        deadline = time.monotonic() + timeout
        status = await self.status()
        while not status.running:
            with wire.stop_events(self.session) as stops:
                await wire.cont(self.session)
                # Retried requests that fail again pause the VM at once: a STOP within the
                # settle time (none: it runs on).
                with anyio.move_on_after(RESUME_SETTLE):
                    await stops.next()
            status = await self.status()
            if status.status != "io-error" or time.monotonic() >= deadline:
                break
            _log.info("blockctl.vm.paused_again", vm=self.name, status=status.status)
            await anyio.sleep(0.2)  # a back-off: QEMU's NBD client reconnects meanwhile
        return status

    async def version(self) -> VersionInfo:
        """QEMU's version, read once per session (a running QEMU does not change it)."""
        if self._version is None:
            self._version = await wire.query_version(self.session)
        return self._version

    async def capabilities(self) -> Capabilities:
        """What this QEMU offers (``query-qmp-schema``), read once per session."""
        if self._capabilities is None:
            self._capabilities = await wire.query_capabilities(self.session)
        return self._capabilities

    async def require(self, *commands: str) -> None:
        """Fail early, with a clear error, if this QEMU lacks a command or deprecates it.

        Choices are made from the schema, never from version numbers.
        """
        caps = await self.capabilities()
        for command in commands:
            if not caps.has(command):
                raise Unsupported(command, f"this QEMU has no {command!r} command")
            if caps.is_deprecated(command):
                raise Unsupported(
                    command,
                    f"{command!r} is deprecated in this QEMU; blockctl "
                    "does not use deprecated commands",
                )

    async def block_devices(self) -> tuple[BlockDevice, ...]:
        return await wire.query_block(self.session)

    async def block_nodes(self) -> tuple[BlockNode, ...]:
        return await wire.query_named_block_nodes(self.session)

    async def qom_get(self, path: str, prop: str) -> object:
        return await wire.qom_get(self.session, path, prop)

    async def command(self, name: str, arguments: Mapping[str, Any] | None = None) -> object:
        """Any QMP command, untyped (the CLI's ``blockctl qmp``)."""
        return await wire.raw_command(self.session, name, arguments)

    def refuse_daemon_disks(self, operation: str, devices: Iterable[str] | None) -> None:
        """Refuse ``operation`` on a vhost-user-blk disk (its nodes live in its
        qemu-storage-daemon, not in QEMU): on one of ``devices``, or, when ``devices`` is None
        (every disk), on any such disk of the VM; acting on QEMU's nodes alone would leave it
        out without saying so."""
        records = self.registry.drives
        named = list(records) if devices is None else list(devices)
        for device_id in named:
            record = records.get(device_id)
            if record is not None and record.daemon is not None:
                raise InStorageDaemon(
                    operation,
                    device_id,
                    daemon_pid=record.daemon.get("pid"),
                    monitor=record.daemon.get("monitor"),
                )

    def daemon_disk(self, operation: str, devices: Iterable[str] | None) -> str | None:
        """The vhost-user-blk disk ``devices`` names alone, whose ``operation`` goes to its
        qemu-storage-daemon's QMP (:meth:`on_storage_daemon`); None when none of ``devices``
        is such a disk (the operation acts on QEMU).

        :raise InStorageDaemon: such a disk among others, or every disk (``devices`` None)
            when one is such a disk: one point in time across QEMU and a daemon (or two
            daemons) cannot be taken by one transaction.
        """
        records = self.registry.drives
        named = list(records) if devices is None else list(devices)
        in_daemons = [d for d in named if (r := records.get(d)) is not None and r.daemon]
        if not in_daemons:
            return None
        if devices is None or len(named) > 1:
            record = records[in_daemons[0]]
            assert record.daemon is not None
            raise InStorageDaemon(
                operation,
                in_daemons[0],
                daemon_pid=record.daemon.get("pid"),
                monitor=record.daemon.get("monitor"),
                why=(
                    f"one {operation} cannot take QEMU's disks and a daemon's (or two daemons') "
                    "at one point in time"
                ),
                way_out=f"name {in_daemons[0]} alone, and the other disks in another {operation}",
            )
        return in_daemons[0]

    @contextlib.asynccontextmanager
    async def on_storage_daemon(
        self, device_id: str, operation: str = "an operation routed to the daemon"
    ) -> AsyncIterator[DaemonDisk]:
        """``device_id``'s qemu-storage-daemon as the VM a block operation acts on: a QMP
        session with the daemon (on the monitor socket its record names, from any process),
        the drive's nodes as the daemon holds them, the operation's journal and lock in the
        daemon's own directory (:func:`daemon_journal_dir`: QEMU's recovery never judges the
        daemon's nodes by QEMU's graph, nor the other way round).

        :raise StorageDaemonBusy: another client holds the daemon's one monitor: at once when
            the daemon's directory says who (another live process's operation record, or the
            backup lock), else once the daemon sent no greeting within
            :data:`DAEMON_GREETING_TIMEOUT`. ``operation``
            names what was refused."""
        record = self.registry.drives.get(device_id)
        if record is None or record.daemon is None:
            raise ConfigError("device", f"{device_id} is not a vhost-user-blk disk of {self.name}")
        daemon = record.daemon
        pid, pid_start = daemon.get("pid"), daemon.get("pid_start")
        if self.run_dir is None or not isinstance(pid, int):
            raise ConfigError("device", f"{device_id}: its record names no daemon")
        if not _proc.process_alive(pid, None if pid_start is None else int(pid_start)):
            raise StorageDaemonFailed(
                device_id, f"it is not running (pid {pid})", argv=(), exitcode=None, log=""
            )
        journal_dir = daemon_journal_dir(self.run_dir, device_id)
        journal_dir.mkdir(mode=0o700, exist_ok=True)

        def busy(holder: DaemonHolder) -> StorageDaemonBusy:
            return StorageDaemonBusy(
                operation,
                device_id,
                vm=self.name,
                daemon_pid=pid,
                monitor=str(daemon["monitor"]),
                holder=holder.what,
                kind=holder.kind,
                job_id=holder.job_id,
                pid=holder.pid,
            )

        # The daemon's monitor takes one client at a time: a second one waits for a greeting
        # that comes only once the first leaves. An operation running there says so in the
        # daemon's directory: refused at once, naming it.
        holder = daemon_holder(journal_dir)
        if holder is not None:
            raise busy(holder)
        async with contextlib.AsyncExitStack() as stack:
            try:
                session = await stack.enter_async_context(
                    QMPSession.connect(
                        str(daemon["monitor"]),
                        label=f"qsd-{device_id}",
                        timeout=DAEMON_GREETING_TIMEOUT,
                    )
                )
            except QMPConnectFailed as exc:
                alive = _proc.process_alive(pid, None if pid_start is None else int(pid_start))
                if not alive or not Path(str(daemon["monitor"])).exists():
                    raise
                # Still no one named in the directory (or an operation that began meanwhile).
                raise busy(
                    daemon_holder(journal_dir)
                    or DaemonHolder(
                        what=(
                            "another client blockctl keeps no record of (a `chain` or "
                            "`snapshot list` from another process, another QMP tool), or the "
                            f"daemon hangs: no greeting came within {DAEMON_GREETING_TIMEOUT:g} s"
                        ),
                        kind="client",
                    )
                ) from exc
            yield DaemonDisk(
                self,
                session,
                device_id=device_id,
                daemon_pid=pid,
                export_id=daemon.get("export"),
                journal_dir=journal_dir,
            )

    def other_clients(self) -> list[_monitors.Holder]:
        """The other blockctl clients attached to this VM's pool now (pid, command)."""
        return _monitors.holders(self.pool, besides=self.monitor)


#: The end of a vhost-user-blk disk's operations directory's name (:func:`daemon_journal_dir`).
DAEMON_OPS_SUFFIX = "-qsd.ops"


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonHolder:
    """Who holds a qemu-storage-daemon's monitor, as its operations directory says."""

    what: str
    kind: str  # commit, stream, snapshot, backup; "client" when nothing names it
    job_id: str | None = None
    pid: int | None = None


def daemon_holder(journal_dir: Path) -> DaemonHolder | None:
    """The operation another live process runs in a daemon now, from the daemon's
    operations directory: a journal record whose writer still drives it (a snapshot, commit or
    stream), or the backup lock's live owner. None when it names none (this process's own
    operations are not another's)."""
    for item in _journal.load_all(journal_dir):
        if not isinstance(item, _journal.Intent) or item.pid in (None, os.getpid()):
            continue
        if _journal.owner_alive(item):
            job = f", job {item.job_id}" if item.job_id else ""
            return DaemonHolder(
                what=f"the {item.describe()} (pid {item.pid}{job})",
                kind=item.kind.value,
                job_id=item.job_id,
                pid=item.pid,
            )
    try:
        owner = json.loads((journal_dir / _journal.BACKUP_LOCK).read_bytes() or b"null")
        owner_pid, owner_start = int(owner["pid"]), owner.get("pid_start")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if owner_pid == os.getpid() or not _proc.process_alive(
        owner_pid, None if owner_start is None else int(owner_start)
    ):
        return None
    job_id = next(
        (p.name[: -len(".sock")] for p in sorted((journal_dir / "control").glob("*.sock"))),
        None,
    )
    return DaemonHolder(
        what=f"a backup (pid {owner_pid}{'' if job_id is None else f', job {job_id}'})",
        kind="backup",
        job_id=job_id,
        pid=owner_pid,
    )


def daemon_journal_dir(run_dir: Path, device_id: str) -> Path:
    """Where the operations on ``device_id``'s qemu-storage-daemon keep their journal
    records and lock: the directory names the monitor that holds their nodes."""
    return run_dir / f"{device_id}{DAEMON_OPS_SUFFIX}"


class DaemonDisk(VM):
    """A vhost-user-blk drive's qemu-storage-daemon, as the VM a block operation acts on
    (the chain operations take it in place of the VM: one code path for both monitors).
    ``session`` is the daemon's QMP; its one device is the drive, rooted at the node the
    drive's export serves now (an export follows its node's replacement: measured,
    ``query-block-exports`` names the overlay after ``blockdev-snapshot`` and the base again
    after an active commit's pivot)."""

    def __init__(
        self,
        vm: VM,
        session: QMPSession,
        *,
        device_id: str,
        daemon_pid: int,
        export_id: object,
        journal_dir: Path,
    ) -> None:
        super().__init__(session, name=vm.name, pid=daemon_pid, run_dir=journal_dir, named=vm.named)
        self._registry = DaemonDriveRegistry(vm.registry, device_id)
        self.vm = vm
        self.device_id = device_id
        self.export_id = None if export_id is None else str(export_id)

    @property
    def identity(self) -> str:
        return self.vm.identity

    async def export_node(self) -> str:
        """The node the drive's export serves now."""
        exports = {e.id: e.node_name for e in await wire.query_block_exports(self.session)}
        if self.export_id is None and len(exports) == 1:
            return next(iter(exports.values()))  # a record from before the id was kept
        node = None if self.export_id is None else exports.get(self.export_id)
        if node is None:
            raise StorageDaemonFailed(
                self.device_id,
                f"its export {self.export_id} is gone: {sorted(exports)}",
                argv=(),
                exitcode=None,
                log="",
            )
        return node

    async def block_devices(self) -> tuple[BlockDevice, ...]:
        root = await self.export_node()
        inserted = next((n for n in await self.block_nodes() if n.node_name == root), None)
        if inserted is None:
            raise StorageDaemonFailed(
                self.device_id,
                f"its export serves {root}, a node it does not list",
                argv=(),
                exitcode=None,
                log="",
            )
        return (
            BlockDevice(
                qdev=None,
                device=self.device_id,
                removable=False,
                locked=False,
                tray_open=None,
                inserted=inserted,
            ),
        )

    def daemon_disk(self, operation: str, devices: Iterable[str] | None) -> str | None:
        return None  # already on the daemon


class LaunchedVM(VM):
    """A QEMU child of this process, with its console and run directory."""

    def __init__(
        self,
        session: QMPSession,
        *,
        name: str,
        process: asyncio.subprocess.Process,
        run_dir: Path,
        argv: list[str],
        accel: AccelChoice,
        console: GuestConsole | None,
        plans: tuple[DrivePlan, ...],
        pool: tuple[Path, ...] = (),
        daemons: _storage_daemon.StorageDaemons | None = None,
    ) -> None:
        super().__init__(session, name=name, pid=process.pid, run_dir=run_dir, pool=pool)
        #: The qemu-storage-daemons of its vhost-user-blk drives (children of this process).
        self.daemons = daemons or _storage_daemon.StorageDaemons(run_dir)
        self.process = process
        self.run_dir: Path = run_dir
        self.argv = argv
        self.accel = accel
        self.console = console
        self.drives = plans

    @property
    def monitor_path(self) -> Path:
        """The QMP socket other processes attach to."""
        return self.run_dir / "qmp.sock"

    @property
    def qemu_log(self) -> str:
        try:
            return (self.run_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""

    async def wait_exit(self) -> int:
        """Wait for QEMU to exit (e.g. after the guest powers off) and return its exit code."""
        return await self.process.wait()


# Section: preflight


async def preflight(config: MachineConfig) -> tuple[str, dict[int, DriveSource]]:
    """Check everything that needs the file system, before QEMU starts.

    Returns the qemu-system binary and, per drive with an image, its backing chain read with
    the declared format (explicit nodes are built for every layer: nothing is probed).
    """
    binary = qemu_system_binary()
    if shutil.which(binary) is None:
        raise MissingComponent(binary, _binaries.install_hint("qemu-system-x86_64"))
    for field_name in ("kernel", "initrd", "firmware"):
        path = getattr(config, field_name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(field_name, f"{path} does not exist or is not a file")
    # QEMU only warns about a missing splash image ("failed to find file") and boots on.
    splash = None if config.boot is None else config.boot.splash
    if splash is not None and not Path(splash).is_file():
        raise ConfigError(
            "boot.splash",
            f"{splash} does not exist or is not a file (a relative path is relative to the "
            "config file)",
        )
    sources: dict[int, DriveSource] = {}
    for i, drive in enumerate(config.drives):
        if drive.file is not None:
            sources[i] = await inspect_drive(drive, f"drive[{i}].file", roots=config.image_roots)
        elif drive.nbd is not None:
            check_nbd(drive, f"drive[{i}].nbd")
        elif drive.iscsi is not None:
            check_iscsi(drive, f"drive[{i}].iscsi")
        elif drive.vhost_user_blk is not None:
            sources[i] = await inspect_drive(
                vhost_image(drive), f"drive[{i}].vhost_user_blk.file", roots=config.image_roots
            )
    return binary, sources


def vhost_image(drive: Drive) -> Drive:
    """The image a vhost-user-blk drive's daemon opens, as a plain file drive (for the
    inspection every image from outside goes through)."""
    assert drive.vhost_user_blk is not None
    return Drive(file=drive.vhost_user_blk.file, format=drive.format, read_only=drive.read_only)


def check_iscsi(drive: Drive, where: str) -> None:
    """A CHAP password file must be a regular file only its owner can read: QEMU reads the
    password from it (blockctl never does)."""
    assert drive.iscsi is not None
    path = drive.iscsi.password_file
    if path is None:
        return
    try:
        info = Path(path).stat()
    except OSError as exc:
        raise ConfigError(f"{where}.password_file", f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where}.password_file", f"{path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{where}.password_file",
            f"{path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 it",
        )


def check_nbd(drive: Drive, where: str) -> None:
    """The NBD server's socket must exist now; QEMU connects to it when the node is added."""
    assert drive.nbd is not None
    socket_path = drive.nbd.socket
    _runtime.check_socket_path(socket_path, f"{where}.socket")
    try:
        mode = socket_path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{where}.socket", f"{socket_path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{where}.socket", f"{socket_path} is not a unix socket")


async def inspect_drive(
    drive: Drive, where: str, *, roots: Iterable[Path | str] = ()
) -> DriveSource:
    """The image behind ``drive`` as QEMU will open it: checked, and its chain read with the
    declared format. ``where`` names the drive in errors.

    The one door for images from outside (launch, hot-plug, media insert/change): the chain is
    checked by :func:`blockctl._images.inspect_untrusted` (backing/data files confined to the
    image's directory tree, ``$BLOCKCTL_IMAGE_ROOTS`` and ``roots``; no protocol strings; no
    backing without a format) before QEMU opens anything.
    """
    assert drive.file is not None and drive.format is not None  # a Drive with a file has both
    path = Path(drive.file).absolute()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(where, f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError(where, f"{path}: {exc.strerror}") from None
    block_device = stat.S_ISBLK(info.st_mode)
    if not (block_device or stat.S_ISREG(info.st_mode)):
        raise ConfigError(where, f"{path} is neither a regular file nor a block device")
    if not os.access(path, os.R_OK if drive.read_only else os.R_OK | os.W_OK):
        raise ConfigError(
            where, f"{path} is not {'readable' if drive.read_only else 'readable and writable'}"
        )
    chain = await _images.inspect_untrusted(path, drive.format, roots=roots, where=where)
    return DriveSource(
        chain=chain, block_device=block_device, cd_drive=block_device and is_cd_drive(path)
    )


#: linux/cdrom.h: the drive's status (and so whether it is a CD drive at all); the slot.
_CDROM_DRIVE_STATUS = 0x5326
_CDSL_CURRENT = 0x7FFFFFFF


def is_cd_drive(device: Path) -> bool:
    """Whether the block device ``device`` is a CD drive: its driver answers
    CDROM_DRIVE_STATUS (QEMU's own probe for host_cdrom). A loop device over an ISO image
    does not (EINVAL): QEMU's host_cdrom would call it empty, host_device reads it."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, _CDROM_DRIVE_STATUS, _CDSL_CURRENT)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


# Section: launch


def _qemu_log_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Spawned:
    """A QEMU process just started, before its QMP greeting."""

    pid: int
    argv: tuple[str, ...]
    accel: str
    run_dir: Path
    monitor: Path  # the QMP socket other processes attach to
    pool: tuple[Path, ...]  # its monitors for other processes

    def record(self, name: str, *, detached: bool, starting: bool = False) -> _runtime.VMRecord:
        """Its runtime record (``blockctl ls``, :func:`attach`); a detached VM's console is
        a socket and a log in its run directory."""
        console = self.run_dir / "console.sock" if detached else None
        console_log = self.run_dir / "console.log" if detached else None
        return _runtime.VMRecord(
            name=name,
            pid=self.pid,
            run_dir=str(self.run_dir),
            monitor=str(self.monitor),
            console_socket=None if console is None else str(console),
            console_log=None if console_log is None else str(console_log),
            qemu_log=str(self.run_dir / "qemu.log"),
            argv=self.argv,
            accel=self.accel,
            started=time.time(),
            monitors=tuple(str(p) for p in self.pool),
            starting=starting,
        )


#: Test hook: called with "spawned" right after QEMU's process exists (and, launched
#: detached, its record is written), and "greeted" once a detached VM's launch is complete.
#: Crash tests kill the process there, so a kill "at QEMU's start" is exact, never a race.
FAILPOINT: Callable[[str], None] | None = None


@contextlib.asynccontextmanager
async def _started_qemu(
    config: MachineConfig,
    *,
    run_dir: Path,
    label: str,
    detached: bool,
    console: bool,
    timeouts: Timeouts,
    monitors: int = 0,
    backing: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
    on_spawn: Callable[[Spawned], None] | None = None,
) -> AsyncIterator[LaunchedVM]:
    """Start QEMU and its QMP session; on any failure, reap QEMU and raise LaunchFailed.
    ``monitors``: the size of its pool of QMP monitors for other processes. ``backing``:
    per drive index, nodes its image backs onto at run time (:class:`Prepared`).
    ``on_spawn``: called once QEMU's process exists, before its greeting is awaited.

    While the block runs, a watcher marks the session lost the moment QEMU exits. When the
    block exits the session is closed; stopping QEMU is the caller's job. The
    qemu-storage-daemons of vhost-user-blk drives start before QEMU and are stopped and
    reaped when QEMU exits, or at the latest when the block exits.
    """
    vhost = [i for i, d in enumerate(config.drives) if d.vhost_user_blk is not None]
    if detached and vhost:
        raise ConfigError(
            f"drive[{vhost[0]}].vhost_user_blk",
            "a VM that outlives its launcher cannot have vhost-user-blk disks yet (their "
            "qemu-storage-daemons are children of the launching process and die with it): "
            "launch it with the library's open_vm, or attach the image as a plain file",
        )
    async with (
        _storage_daemon.daemons_of(run_dir) as daemons,
        _qemu_with_daemons(
            config,
            run_dir=run_dir,
            label=label,
            detached=detached,
            console=console,
            timeouts=timeouts,
            monitors=monitors,
            daemons=daemons,
            backing=backing or {},
            on_spawn=on_spawn,
        ) as vm,
    ):
        yield vm


@contextlib.asynccontextmanager
async def _qemu_with_daemons(
    config: MachineConfig,
    *,
    run_dir: Path,
    label: str,
    detached: bool,
    console: bool,
    timeouts: Timeouts,
    monitors: int,
    daemons: _storage_daemon.StorageDaemons,
    backing: Mapping[int, Sequence[Mapping[str, Any]]],
    on_spawn: Callable[[Spawned], None] | None,
) -> AsyncIterator[LaunchedVM]:
    binary, sources = await preflight(config)
    accel = choose_accel(config.accel)
    _log.info("blockctl.launch.accel", vm=label, accel=accel.accel.value, reason=accel.reason)
    for i, drive in enumerate(config.drives):
        if drive.snapshot and i in sources:
            overlay = run_dir / f"drv{i}-overlay.qcow2"
            assert drive.format is not None and drive.file is not None
            await _images.create(
                overlay,
                ImageFormat.QCOW2,
                backing=Path(sources[i].chain[0].filename),
                backing_format=drive.format,
            )
            src = sources[i]
            sources[i] = DriveSource(
                chain=src.chain, block_device=src.block_device, overlay=overlay
            )
    for i, drive in enumerate(config.drives):
        if drive.vhost_user_blk is not None:
            socket_path = _storage_daemon.vhost_socket(run_dir, i)
            sources[i] = dataclasses.replace(sources[i], vhost_socket=socket_path)
    plans = plan_drives(config, sources)
    for i, below in backing.items():
        plans = (*plans[:i], over_backing(plans[i], f"drv{i}", below), *plans[i + 1 :])
    registry = DriveRegistry.load(run_dir)
    for plan, drive in zip(plans, config.drives, strict=True):
        daemon = None
        if plan.vhost is not None:
            # Before QEMU: its chardev connects to the daemon's socket at start-up.
            started = await daemons.start(plan)
            assert drive.vhost_user_blk is not None and drive.format is not None
            daemon = started.record(Path(drive.vhost_user_blk.file).absolute(), drive.format.value)
        registry.drives[plan.device_id] = DriveRecord(
            device_id=plan.device_id, device=plan.device, nodes=plan.record_nodes(), daemon=daemon
        )
    registry.save()
    monitor = run_dir / "qmp.sock"
    _runtime.check_socket_path(monitor, "runtime_dir")
    pool = tuple(_monitors.pool_sockets(run_dir, monitors))
    for sock_path in pool:
        _runtime.check_socket_path(sock_path, "runtime_dir")
    console_spec: ConsoleFd | ConsoleSocket | None = None
    qmp_ours, qmp_theirs = socket.socketpair()
    con_ours: socket.socket | None = None
    con_theirs: socket.socket | None = None
    pass_fds = [qmp_theirs.fileno()]
    if console and not detached:
        con_ours, con_theirs = socket.socketpair()
        console_spec = ConsoleFd(fd=con_theirs.fileno())
        pass_fds.append(con_theirs.fileno())
    elif console:
        console_spec = ConsoleSocket(path=run_dir / "console.sock", log=run_dir / "console.log")
        _runtime.check_socket_path(console_spec.path, "runtime_dir")
    agent_socket = run_dir / AGENT_SOCKET if config.guest_agent else None
    if agent_socket is not None:
        _runtime.check_socket_path(agent_socket, "runtime_dir")
    argv = build_argv(
        binary=binary,
        config=config,
        label=label,
        accel=accel.accel,
        plans=plans,
        qmp_fd=qmp_theirs.fileno(),
        monitor_path=monitor,
        console=console_spec,
        agent_socket=agent_socket,
        monitor_pool=pool,
    )
    log_path = run_dir / "qemu.log"
    log_file: IO[bytes] = os.fdopen(
        os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb"
    )
    try:
        process = await _proc.spawn(
            argv, log=log_file, pass_fds=pass_fds, die_with_parent=not detached
        )
    finally:
        log_file.close()
        qmp_theirs.close()
        if con_theirs is not None:
            con_theirs.close()
    _log.info("blockctl.launch.spawned", vm=label, pid=process.pid, argv=argv)

    def failure(reason: str) -> LaunchFailed:
        return LaunchFailed(
            reason, argv=argv, exitcode=process.returncode, stderr=_qemu_log_text(log_path)
        )

    connected = False
    yielded = False
    try:
        if on_spawn is not None:
            on_spawn(
                Spawned(
                    pid=process.pid,
                    argv=tuple(argv),
                    accel=accel.accel.value,
                    run_dir=run_dir,
                    monitor=monitor,
                    pool=pool,
                )
            )
        if FAILPOINT is not None:
            FAILPOINT("spawned")
        try:
            async with QMPSession.connect(
                qmp_ours, label=label, timeout=timeouts.launch
            ) as session:
                connected = True
                session.process_exit = process.wait
                # The greeting came after QEMU created its sockets; tighten them to 0600
                # (QEMU makes them 0700 under our umask; the run dir is 0700 as well).
                for sock_path in (
                    monitor,
                    *pool,
                    run_dir / "console.sock",
                    run_dir / AGENT_SOCKET,
                ):
                    with contextlib.suppress(FileNotFoundError):
                        os.chmod(sock_path, 0o600)
                async with anyio.create_task_group() as tg:

                    async def watch_exit() -> None:
                        session.mark_lost(describe_exit(await process.wait()))
                        # Its storage daemons die with it, whoever ended QEMU.
                        await daemons.stop_all()

                    tg.start_soon(watch_exit)
                    try:
                        stream = None
                        if con_ours is not None:
                            stream = await SocketStream.from_socket(con_ours)
                            con_ours = None
                        yielded = True
                        yield LaunchedVM(
                            session,
                            name=label,
                            process=process,
                            run_dir=run_dir,
                            argv=argv,
                            accel=accel,
                            console=None if stream is None else GuestConsole(stream, label),
                            plans=plans,
                            pool=pool,
                            daemons=daemons,
                        )
                    finally:
                        tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise_single(group)
    except QMPConnectFailed as exc:
        if connected:
            raise
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeouts.terminate):
            await process.wait()  # QEMU rejecting its argv exits right after connecting
        raise failure(
            str(exc) if process.returncode is None else "QEMU exited during start-up"
        ) from exc
    finally:
        with anyio.CancelScope(shield=True):
            if not yielded:
                await _proc.terminate(process, grace=timeouts.terminate)
            qmp_ours.close()
            if con_ours is not None:
                con_ours.close()


@contextlib.asynccontextmanager
async def open_vm(
    config: MachineConfig,
    *,
    console: bool = True,
    timeouts: Timeouts = Timeouts(),
    monitors: int = _monitors.POOL_SIZE,
) -> AsyncIterator[LaunchedVM]:
    """Launch QEMU for ``config``; it is shut down and reaped when the block exits.

    The guest's serial console is ``vm.console`` (if ``console``). A named config registers
    the VM in the runtime directory for the block's duration, so ``blockctl ls`` and
    :func:`attach` find it, and gives it a pool of ``monitors`` QMP monitors, so that that
    many other processes can attach at once. Shutdown is one shielded ladder: optional
    ``system_powerdown`` (``timeouts.powerdown``) → QMP ``quit`` → SIGTERM → SIGKILL → reap.
    """
    require_asyncio("open_vm")
    run_dir = _make_run_dir(config.name)
    label = config.name or run_dir.name
    spawned: list[Spawned] = []
    try:
        async with _started_qemu(
            config,
            run_dir=run_dir,
            label=label,
            detached=False,
            console=console,
            timeouts=timeouts,
            monitors=monitors if config.name is not None else 0,
            on_spawn=spawned.append,
        ) as vm:
            if config.name is not None:
                _runtime.write_record(spawned[0].record(config.name, detached=False))
            try:
                yield vm
                # The block ended normally: observers see the VM before it is shut down.
                if vm.process.returncode is None and not vm.session.lost:
                    for observe in BEFORE_SHUTDOWN:
                        await observe(vm)
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await shutdown_child(vm.session, vm.process, timeouts)
                    finally:
                        if vm.console is not None:
                            await vm.console.aclose()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


#: Called with each VM of :func:`open_vm` whose block ended normally, before its shutdown.
#: A seam for test suites (the integration tests compare blockctl's reports with QEMU's facts
#: there); an exception from one fails the block.
BEFORE_SHUTDOWN: list[Callable[[VM], Awaitable[None]]] = []


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a launch's ``prepare`` may return besides a bare config: per drive index, nodes
    (bottom-up) its qcow2 image backs onto at run time, not named in its header (a live
    restore's NBD export of a backup point). They are added before the image and belong to
    the drive's record."""

    config: MachineConfig
    backing: Mapping[int, Sequence[Mapping[str, Any]]]
    #: Called right after QEMU's record is written at its spawn (before its greeting): from
    #: then on QEMU may write to the files ``prepare`` made (a live launch's journal record
    #: stops naming them as files to remove if the launch never started QEMU).
    spawned: Callable[[], None] | None = None


async def launch_detached(
    config: MachineConfig,
    *,
    timeouts: Timeouts = Timeouts(),
    prepare: Callable[[Path], Awaitable[MachineConfig | Prepared]] | None = None,
    monitors: int = _monitors.POOL_SIZE,
) -> _runtime.VMRecord:
    """Start a named VM that keeps running after this process exits (``blockctl up``).

    Its console is ``console.sock`` (connect with ``socat - UNIX:…``) and ``console.log``;
    ``monitors`` processes can drive it at once (its pool of QMP monitors, ``qmp-N.sock``).
    ``prepare(run_dir)``, if given, returns the final config once the run directory exists
    (the embedded default creates its disk there), or a :class:`Prepared`.
    Stop it with :func:`shutdown_detached`.
    """
    require_asyncio("launch_detached")
    name = config.name
    if name is None:
        raise ConfigError("name", "a VM that outlives its launcher needs a name")
    run_dir = _make_run_dir(name)
    spawned: list[_runtime.VMRecord] = []

    def record_spawn(process: Spawned) -> None:
        # Before the greeting: a launcher killed from here on leaves a QEMU that
        # `blockctl recover` and `down` find, and that `up` of the name does not clear away.
        spawned.append(process.record(name, detached=True, starting=True))
        _runtime.write_record(spawned[0])
        if after_spawn is not None:
            after_spawn()

    after_spawn: Callable[[], None] | None = None
    try:
        backing: Mapping[int, Sequence[Mapping[str, Any]]] = {}
        if prepare is not None:
            prepared = await prepare(run_dir)
            if isinstance(prepared, Prepared):
                config, backing = prepared.config, prepared.backing
                after_spawn = prepared.spawned
            else:
                config = prepared
        async with _started_qemu(
            config,
            run_dir=run_dir,
            label=name,
            detached=True,
            console=True,
            timeouts=timeouts,
            monitors=monitors,
            backing=backing,
            on_spawn=record_spawn,
        ):
            record = dataclasses.replace(spawned[0], starting=False)
            _runtime.write_record(record)
            if FAILPOINT is not None:
                FAILPOINT("greeted")
            # The greeting arrived, so QEMU created qmp.sock before we return.
            return record
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def finish_start(record: _runtime.VMRecord) -> _runtime.VMRecord:
    """A detached VM whose launcher died between QEMU's spawn and its greeting, found
    answering on its monitors (the caller attached): what the launcher would have done after
    the greeting (its sockets 0600, the record no longer "starting")."""
    run_dir = Path(record.run_dir)
    for sock_path in (*map(Path, record.monitors), Path(record.monitor), run_dir / "console.sock"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(sock_path, 0o600)
    with contextlib.suppress(FileNotFoundError):
        os.chmod(run_dir / AGENT_SOCKET, 0o600)
    done = dataclasses.replace(record, starting=False)
    _runtime.write_record(done)
    _log.info("blockctl.launch.start_finished", vm=record.name, pid=record.pid)
    return done


def _make_run_dir(name: str | None) -> Path:
    root = _runtime.runtime_root()
    if name is None:
        run_dir = Path(tempfile.mkdtemp(prefix="vm-", dir=root))
        os.chmod(run_dir, _fsutil.PRIVATE_DIR)  # explicitly, whatever the umask
        return run_dir
    run_dir = root / name
    try:
        run_dir.mkdir(mode=_fsutil.PRIVATE_DIR)
    except FileExistsError:
        try:
            record = _runtime.read_record(name, root)
        except BlockctlError:
            record = None
        if record is not None and _runtime.is_alive(record):
            raise VMExists(
                name,
                f"a VM named {name!r} is already running (pid {record.pid}); "
                f"`blockctl down {name}` first",
            ) from None
        if _journal.load_all(run_dir):  # never drop an unreported interrupted operation
            raise VMExists(
                name,
                f"VM {name!r} died in the middle of an operation (journal records in {run_dir}): "
                f"`blockctl recover {name}` reports and repairs it; then start it again",
            ) from None
        # A leftover of a VM that died without cleaning up: QEMU is gone, so reuse the name.
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=_fsutil.PRIVATE_DIR)
    os.chmod(run_dir, _fsutil.PRIVATE_DIR)  # explicitly, whatever the umask
    return run_dir


# Section: shutdown


async def shutdown_child(
    session: QMPSession, process: asyncio.subprocess.Process, timeouts: Timeouts
) -> int:
    """The shutdown ladder for a child QEMU. Shielded; QEMU is reaped whatever happens.

    :raise ShutdownFailed: QEMU ignored ``quit`` and had to be signalled (after reaping).
    """
    with anyio.CancelScope(shield=True):
        if process.returncode is None and timeouts.powerdown is not None and not session.lost:
            with anyio.move_on_after(timeouts.powerdown), contextlib.suppress(BlockctlError):
                await wire.system_powerdown(session)
                await process.wait()
        if process.returncode is None and not session.lost:
            with anyio.move_on_after(timeouts.quit), contextlib.suppress(BlockctlError):
                await wire.quit_qemu(session)
        if process.returncode is None:
            with anyio.move_on_after(timeouts.quit):
                await process.wait()
        if process.returncode is None:
            _log.warning("blockctl.shutdown.signalled", pid=process.pid)
            code = await _proc.terminate(process, grace=timeouts.terminate)
            raise ShutdownFailed(
                f"QEMU (pid {process.pid}) did not exit on quit; it was "
                f"signalled and reaped (exit code {code})"
            )
    return await process.wait()


async def shutdown_detached(name: str, *, timeouts: Timeouts = Timeouts()) -> None:
    """Stop a VM started by :func:`launch_detached`: the same ladder, by its recorded PID."""
    record = _runtime.read_record(name)
    run_dir = Path(record.run_dir)
    if not _runtime.is_alive(record):
        _remove_run_dir(name, run_dir)
        return
    pidfd = os.pidfd_open(record.pid)
    try:
        # Checked after opening the pidfd: the fd pins this process, so a PID reused later
        # cannot be signalled by mistake.
        if not _runtime.is_alive(record):
            return
        exited = _pidfd_exited(pidfd)
        with contextlib.suppress(BlockctlError, OSError):
            async with attach(name, timeout=timeouts.launch) as vm:
                if timeouts.powerdown is not None:
                    with anyio.move_on_after(timeouts.powerdown):
                        await wire.system_powerdown(vm.session)
                        await exited.wait()
                if not exited.is_set():
                    with contextlib.suppress(ConnectionLost):
                        await wire.quit_qemu(vm.session)
        with anyio.move_on_after(timeouts.quit):
            await exited.wait()
        if not exited.is_set():
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            with anyio.move_on_after(timeouts.terminate):
                await exited.wait()
        if not exited.is_set():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with anyio.fail_after(timeouts.terminate):
                await exited.wait()
            raise ShutdownFailed(
                f"VM {name!r} (pid {record.pid}) ignored quit and SIGTERM; it was killed"
            )
    finally:
        os.close(pidfd)
        _remove_run_dir(name, run_dir)


def _remove_run_dir(name: str, run_dir: Path) -> None:
    """A stopped detached VM's run directory goes, unless it holds the journal record of an
    interrupted operation (QEMU died in it): that stays for `blockctl recover`, which says
    what the VM's disks hold and how to finish (as a relaunch under the name is refused
    until then)."""
    if _journal.load_all(run_dir):
        _log.warning(
            "blockctl.vm.run_dir_kept",
            vm=name,
            run_dir=str(run_dir),
            reason=f"an interrupted operation's journal record: `blockctl recover {name}`",
        )
        return
    shutil.rmtree(run_dir, ignore_errors=True)


class _PidfdWatch:
    """Set when the process behind a pidfd exits (the fd becomes readable)."""

    def __init__(self, pidfd: int) -> None:
        self._event = anyio.Event()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._fd = pidfd
        loop.add_reader(pidfd, self._fired)

    def _fired(self) -> None:
        self._loop.remove_reader(self._fd)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


def _pidfd_exited(pidfd: int) -> _PidfdWatch:
    return _PidfdWatch(pidfd)


# Section: attach


def require_asyncio(entry: str) -> None:
    """blockctl runs on asyncio: its QMP library (qemu.qmp) is asyncio-based, so under trio
    every entry point would fail deep inside with "no running event loop". Say so at once."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigError(
            "event_loop",
            f"{entry}() needs asyncio (blockctl's QMP library, qemu.qmp, is asyncio-based); "
            "trio is not supported: run it with anyio.run(main, backend='asyncio') or "
            "asyncio.run(main())",
        ) from None


#: Where the state of VMs blockctl did not launch lives, under the runtime directory: one
#: directory per VM identity. Not a valid VM name, so no launched VM's run directory collides.
ATTACHED_DIR = "_attached"
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_identity(name: str) -> str:
    """A VM identity (QEMU's ``-name``, or the caller's): it names files (snapshot overlays,
    the VM's points in a backup repository, its state directory), so it is one safe path
    component, refused otherwise with the way out."""
    if not _IDENTITY.fullmatch(name):
        raise ConfigError(
            "vm_name",
            f"{name!r} cannot name this VM's files (use 1-128 of A-Z a-z 0-9 . _ + -, starting "
            "with a letter or digit); give it another with --vm-name NAME",
        )
    return name


def attached_state_dir(identity: str) -> Path:
    """The state directory (drive records, journal) of a VM blockctl did not launch."""
    base = _runtime.runtime_root() / ATTACHED_DIR
    _fsutil.make_private_dir(base, what="runtime_dir")
    state = base / identity
    _fsutil.make_private_dir(state, what="runtime_dir")
    return state


def _launched_run_dir(socket_path: Path) -> Path | None:
    """The run directory of the blockctl-launched VM whose monitor ``socket_path`` is."""
    parent = socket_path.absolute().parent
    try:
        in_runtime = parent.parent == _runtime.runtime_root()
    except BlockctlError:
        return None
    return parent if in_runtime else None


@contextlib.asynccontextmanager
async def attach(
    target: str | Path | tuple[str, int],
    *,
    timeout: float = 10.0,
    command: str | None = None,
    vm_name: str | None = None,
) -> AsyncIterator[VM]:
    """A session with a running QEMU: a VM name, a QMP unix socket path, or (host, port).

    A QEMU blockctl did not launch is identified by ``vm_name``, else by the name it was
    started with (``-name``); its state (drive records, journal) lives in
    ``<runtime dir>/_attached/<identity>/``. Without either it is "unnamed": queries and
    hot-plug work, operations that name files refuse with the way out (``--vm-name``).

    A VM blockctl launched by name has a pool of monitors: this takes a free one (and holds it
    for the block's life, signed with ``command``, default this process's argv), waiting up to
    ``timeout`` while all are taken, then fails with :class:`~blockctl.errors.MonitorsBusy`
    naming their holders. A single monitor (a socket path, host:port, or a QEMU started
    elsewhere) serves one client at a time; while another is attached, this waits up to
    ``timeout`` and then fails with a message naming the socket.
    """
    require_asyncio("attach")
    pid: int | None = None
    run_dir: Path | None = None
    pool: tuple[Path, ...] = ()
    address: str | tuple[str, int]
    foreign = True
    starting = False
    if isinstance(target, tuple):
        address, name = target, f"{target[0]}:{target[1]}"
    elif isinstance(target, Path) or "/" in target:
        address = str(target)
        name = str(target)
        launched = _launched_run_dir(Path(target))
        if launched is not None:  # a blockctl VM's own monitor, named by path
            foreign, run_dir = False, launched
    else:
        foreign = False
        record = _runtime.read_record(target)
        if not _runtime.is_alive(record):
            raise ConnectionLost(
                f"VM {target!r} is not running any more (its QEMU, pid "
                f"{record.pid}, is gone); `blockctl down {target}` cleans up"
            )
        address, name, pid = record.monitor, record.name, record.pid
        starting = record.starting
        run_dir = Path(record.run_dir)
        pool = tuple(Path(p) for p in record.monitors)
    if not pool:
        if isinstance(address, str):
            _runtime.check_socket_path(Path(address), "socket")
        async with QMPSession.connect(address, label=name, timeout=timeout) as session:
            identity = vm_name or await wire.query_name(session)
            if identity is not None:
                name = check_identity(identity)
                if foreign:
                    run_dir = attached_state_dir(name)
            elif run_dir is None:
                name = f"unnamed VM at {name}"
            yield VM(session, name=name, pid=pid, run_dir=run_dir, named=identity is not None)
        return
    started = time.monotonic()
    lease = await _monitors.take(pool, vm=name, timeout=timeout, command=command)
    try:
        remaining = max(timeout - (time.monotonic() - started), 1.0)
        async with contextlib.AsyncExitStack() as stack:
            try:
                session = await stack.enter_async_context(
                    QMPSession.connect(
                        str(lease.socket), label=name, timeout=remaining, where=str(lease.socket)
                    )
                )
            except QMPConnectFailed as exc:
                if not starting:
                    raise
                raise QMPConnectFailed(
                    f"VM {name!r} (QEMU pid {pid}) is still starting: its launcher has not "
                    f"seen QEMU's QMP greeting, and its monitor does not answer ({exc}). If "
                    f"its launcher died, `blockctl recover {name}` takes it over once QEMU "
                    f"answers; `blockctl down {name}` stops it"
                ) from exc
            yield VM(session, name=name, pid=pid, run_dir=run_dir, monitor=lease.socket, pool=pool)
    finally:
        lease.release()  # after the session closed: the next client finds the monitor free
