"""The one error tree of blockctl.

Every exception blockctl raises on purpose is a :class:`BlockctlError`. Each says what was
wrong and what to do about it, and carries the facts as attributes, not only as text::

    BlockctlError
     ├── ConfigError            a machine or drive configuration is invalid (field, value)
     │    └── UntrustedImage    an image points at files outside the allowed roots (path, reason)
     ├── MissingComponent       a binary or the test guest is not installed (what, hint)
     ├── ProcessFailed          a helper process (qemu-img, apt-get, ...) exited non-zero
     ├── LaunchFailed           qemu-system refused to start or died during start-up
 ├── StorageDaemonFailed    a drive's qemu-storage-daemon refused to start or to stop
 ├── InStorageDaemon        refused: the disk's nodes live in a qemu-storage-daemon, not QEMU
     ├── PassedThrough          refused: a passed-through LUN (scsi-block, scsi-generic)
     ├── VMError                something about a named VM in the runtime directory
     │    ├── VMNotFound
     │    └── VMExists
     ├── DriveNotFound          the VM has no such drive (device_id)
     ├── UnsafeOperation        refused: it would change data something else depends on
     │    └── Conflict          refused: another operation runs on that disk (CLI exit code 5)
     │         ├── StorageDaemonBusy  a vhost-user-blk disk's daemon's one monitor is taken
     │         └── NodeBusy     QEMU refused a command: a block job uses the node (also a
     │                          CommandFailed)
     ├── RepositoryError        a backup repository is missing, loose, locked or malformed (path)
     │    ├── BackupCorrupt     a backup's data does not match its manifest or index
     │    ├── BackupKeyError    an encrypted repository's key is missing or wrong
     │    └── RepositoryBusy    another process holds the repository (gc vs a backup, a server)
     ├── NbdError               reading a point-in-time export over NBD failed (errno, name)
     ├── QMPError               anything on the QMP connection
     │    ├── QMPConnectFailed  could not connect, attach or negotiate
     │    │    └── MonitorsBusy  every QMP monitor of the VM is taken (holders: who, running what)
     │    ├── CommandFailed     QEMU answered a command with an error (command, error_class)
     │    ├── ConnectionLost    QEMU went away (exited or closed the socket) mid-operation
     │    ├── ProtocolMismatch  a reply did not have the shape this QEMU was expected to send
     │    ├── QMPStateError     the session is not in a state that allows the call
     │    └── Unsupported       this QEMU's schema lacks a command blockctl needs
     ├── OperationTimeout       a user-visible operation missed its deadline (operation, seconds)
     │    └── JobNeverReady     a mirror/active commit never became READY (speed below write rate?)
     ├── JobError               a block job did not succeed (job_id, job_type, target, error)
     │    ├── JobFailed         it concluded with an error, or without copying everything
     │    │    ├── JobStoppedOnError  it paused on an I/O error and nobody resumed it in time
     │    │    └── SnapshotLoadFailed  snapshot-load failed midway (run state, what was reverted)
     │    └── JobCancelled      it was cancelled before it finished
     │         └── JobCancelledByOther  by another client (CLI exit code 3)
     ├── NodeNotFound           the block graph has no such node or device (name)
     ├── ShutdownFailed         QEMU had to be killed, or would not exit at all
     ├── GuestError             the serial console of the test guest misbehaved
     │    └── GuestCommandFailed  a guest shell command exited non-zero (command, rc, output)
     └── GuestAgentError        anything about the guest agent (qemu-ga) of a VM
          ├── AgentNotConfigured   the VM has no guest-agent channel
          ├── AgentUnavailable     no reply in time: not started, hung or busy (what, seconds)
          ├── AgentCommandFailed   the agent answered with an error (command, error_class, desc)
          │    └── AgentFrozen     refused because the guest's filesystems are frozen
          ├── QuiesceFailed        a freeze did not freeze what was expected (frozen, expected)
          ├── FreezeDeadlineExceeded  the operation outlasted the freeze deadline (thawed)
          └── ThawFailed           the thaw did not succeed: the guest may still be frozen

The mapping from ``qemu.qmp`` exceptions lives in one place, ``blockctl._qmp.session``, and a
test fails if any ``qemu.qmp`` exception class is left unmapped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "BlockctlError",
    "CommandFailed",
    "DriveNotFound",
    "PassedThrough",
    "NoFreeSlot",
    "PartiallyApplied",
    "UnsafeOperation",
    "Conflict",
    "NodeBusy",
    "StorageDaemonBusy",
    "UntrustedImage",
    "BackupCorrupt",
    "BackupKeyError",
    "RepositoryBusy",
    "NbdError",
    "RepositoryError",
    "ConfigError",
    "ConnectionLost",
    "GuestCommandFailed",
    "GuestError",
    "GuestAgentError",
    "AgentNotConfigured",
    "AgentUnavailable",
    "AgentCommandFailed",
    "AgentFrozen",
    "QuiesceFailed",
    "FreezeDeadlineExceeded",
    "ThawFailed",
    "JobCancelled",
    "JobCancelledByOther",
    "MonitorsBusy",
    "JobError",
    "JobFailed",
    "JobNeverReady",
    "JobStoppedOnError",
    "SnapshotLoadFailed",
    "LaunchFailed",
    "StorageDaemonFailed",
    "InStorageDaemon",
    "MissingComponent",
    "NodeNotFound",
    "OperationTimeout",
    "ProcessFailed",
    "ProtocolMismatch",
    "QMPConnectFailed",
    "QMPError",
    "QMPStateError",
    "ShutdownFailed",
    "Unsupported",
    "VMError",
    "VMExists",
    "VMNotFound",
    "errno_name",
    "errno_symbol",
]


def _tail(text: str, lines: int = 20) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in kept)


class BlockctlError(Exception):
    """Root of every error blockctl raises on purpose.

    ``exit_code`` is the command line's exit status for it: 1, unless a subclass documents
    another (:class:`JobCancelledByOther`: 3).
    """

    exit_code: int = 1


class ConfigError(BlockctlError, ValueError):
    """A configuration value is invalid. ``field`` names it, as in the TOML file."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class UntrustedImage(ConfigError):
    """An image blockctl did not create would make QEMU read something nobody named.

    Its header (or a backing file's header) names a backing file or data file outside the
    allowed roots, a protocol/``json:`` string, a backing file without its format, or it is
    not an image of the declared format. ``path`` is the image whose header says so; ``reason``
    (which names it) what is wrong. QEMU has opened nothing. A subclass of
    :class:`ConfigError`: ``field`` names the drive, as for any other bad configuration.
    """

    def __init__(self, field: str, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(field, reason)


class MissingComponent(BlockctlError):
    """Something blockctl needs is not installed here; ``hint`` says how to get it."""

    def __init__(self, what: str, hint: str) -> None:
        self.what = what
        self.hint = hint
        super().__init__(f"{what} is missing: {hint}")


def errno_symbol(number: int | None) -> str:
    """The symbolic name of an errno number (``ENOSPC``): what every error message that
    carries an errno prints; ``no errno`` for None or 0."""
    if not number:
        return "no errno"
    return errno.errorcode.get(number, str(number))


def errno_name(text: str) -> str | None:
    """The symbolic name (``ENOSPC``) of the errno whose ``strerror`` text appears in
    ``text`` (the longest match: "No space left on device" → ``ENOSPC``), or None."""
    best: tuple[int, str] | None = None
    for code, name in errno.errorcode.items():
        message = os.strerror(code)
        if message.startswith("Unknown error") or message not in text:
            continue
        if best is None or len(message) > best[0]:
            best = (len(message), name)
    return None if best is None else best[1]


def _reason(stdout: str, stderr: str) -> str | None:
    """The line a failed program gave as its reason: its last line on stderr; else its last
    line on stdout, unless that is JSON (a closing brace explains nothing)."""
    for text in (stderr, "" if stdout.lstrip()[:1] in ("{", "[") else stdout):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return None


def _step(argv: Sequence[str]) -> str:
    """``qemu-img convert``: the program (past a ``prlimit`` wrapper) and its subcommand."""
    args = list(argv)
    for i, arg in enumerate(args):
        if os.path.basename(arg).startswith("qemu"):
            args = args[i:]
            break
    step = os.path.basename(args[0]) if args else "?"
    if len(args) > 1 and not args[1].startswith("-"):
        step += f" {args[1]}"
    return step


class ProcessFailed(BlockctlError):
    """A helper process exited non-zero. Its argv, exit code and output are attached.

    ``reason`` is the line it gave as its reason (its last line on stderr), ``errno`` the
    symbolic name of an OS error named there (``ENOSPC``); both lead the message.
    """

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = _reason(stdout, stderr)
        self.errno = None if self.reason is None else errno_name(self.reason)
        head = f"{_step(self.argv)} exited with code {returncode}"
        if self.reason is not None:
            head += f": {self.reason}"
        if self.errno is not None:
            head += f" ({self.errno})"
        parts = [head, f"  command: {list(self.argv)}"]
        if stderr.strip():
            parts.append("  stderr:\n" + _tail(stderr))
        if stdout.strip():
            parts.append("  stdout:\n" + _tail(stdout, 10))
        super().__init__("\n".join(parts))


class LaunchFailed(BlockctlError):
    """qemu-system did not come up. Carries what a user needs to see why."""

    def __init__(
        self, reason: str, *, argv: Sequence[str], exitcode: int | None, stderr: str
    ) -> None:
        self.reason = reason
        self.argv = tuple(argv)
        self.exitcode = exitcode
        self.stderr = stderr
        parts = [f"QEMU failed to launch: {reason}"]
        if exitcode is not None:
            parts.append(f"  exit code: {exitcode}")
        if stderr.strip():
            parts.append("  QEMU said:\n" + _tail(stderr))
        parts.append(f"  command: {list(self.argv)}")
        super().__init__("\n".join(parts))


class StorageDaemonFailed(BlockctlError):
    """The qemu-storage-daemon serving a vhost-user-blk drive did not come up (or would not
    stop). Carries its command line, exit code and what it printed."""

    def __init__(
        self, device_id: str, reason: str, *, argv: Sequence[str], exitcode: int | None, log: str
    ) -> None:
        self.device_id = device_id
        self.reason = reason
        self.argv = tuple(argv)
        self.exitcode = exitcode
        self.log = log
        parts = [f"the qemu-storage-daemon of {device_id} failed: {reason}"]
        if exitcode is not None:
            parts.append(f"  exit code: {exitcode}")
        if log.strip():
            parts.append("  it said:\n" + _tail(log))
        parts.append(f"  command: {list(self.argv)}")
        super().__init__("\n".join(parts))


class InStorageDaemon(BlockctlError):
    """Refused: ``device_id`` is a vhost-user-blk disk whose image and nodes live in a
    qemu-storage-daemon (``daemon_pid``, QMP on ``monitor``), not in QEMU, and blockctl does
    not route ``operation`` to the daemon's QMP. Acting on QEMU would act on no node, or on
    the wrong one."""

    def __init__(
        self,
        operation: str,
        device_id: str,
        *,
        daemon_pid: int | None,
        monitor: str | None,
        why: str | None = None,
        way_out: str | None = None,
    ) -> None:
        self.operation = operation
        self.device_id = device_id
        self.daemon_pid = daemon_pid
        self.monitor = monitor
        why = why or f"blockctl does not route {operation} to the daemon yet"
        label = "Way out" if way_out else "Ways out"
        way_out = way_out or (
            f"leave {device_id} out (name the other disks), run the block commands on the "
            "daemon's QMP socket yourself, or detach the disk and attach its image as a plain "
            "file"
        )
        super().__init__(
            f"{operation}: {device_id} is a vhost-user-blk disk; its image is served by a "
            f"qemu-storage-daemon (pid {daemon_pid}, QMP {monitor}), not by QEMU, and {why}. "
            f"{label}: {way_out}"
        )


class PassedThrough(BlockctlError):
    """Refused: ``device_id`` is a passed-through LUN (``device_driver``: scsi-block or
    scsi-generic): the guest's SCSI commands go to the target as they are (an ioctl through
    QEMU's nodes), which only the iscsi node can carry, and which no overlay, bitmap or job
    above it sees."""

    #: Why each operation cannot be done on such a disk, and the way out it names.
    WHY: ClassVar[dict[str, tuple[str, str]]] = {
        "snapshot": (
            "a qcow2 overlay above it cannot pass them on (every guest read and write would "
            "fail with an I/O error)",
            "take the snapshot on the target (the storage's own snapshot), or attach the LUN "
            "emulated (scsi-hd, without passthrough) to snapshot it",
        ),
        "backup": (
            "its writes bypass QEMU's block layer: no dirty bitmap records them and no "
            "copy-before-write filter holds the point in time, so a backup could miss writes "
            "without a sign",
            "back it up on the target (the storage's own snapshot or backup), or attach the "
            "LUN emulated (scsi-hd, without passthrough) to back it up",
        ),
        "throttle": (
            "its reads and writes are ioctls, which QEMU's I/O limits do not hold back (the "
            "limits would be set and not applied)",
            "limit it on the target, or attach the LUN emulated (scsi-hd, without "
            "passthrough) to throttle it",
        ),
    }
    #: Operations on one named disk: no other disks to name instead.
    SINGLE: ClassVar[frozenset[str]] = frozenset({"throttle"})

    def __init__(self, operation: str, device_id: str, *, device_driver: str) -> None:
        self.operation = operation
        self.device_id = device_id
        self.device_driver = device_driver
        why, elsewhere = self.WHY.get(operation, self.WHY["snapshot"])
        leave_out = (
            "" if operation in self.SINGLE else f"leave {device_id} out (name the other disks), "
        )
        super().__init__(
            f"{operation}: {device_id} is a passed-through LUN ({device_driver}): the guest's "
            f"SCSI commands reach the target directly, and {why}. Ways out: {leave_out}"
            f"{elsewhere}"
        )


class VMError(BlockctlError):
    """A named VM in the runtime directory is not as the caller expected."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class VMNotFound(VMError):
    """No running VM has this name."""


class VMExists(VMError):
    """A VM with this name is already running."""


class DriveNotFound(BlockctlError):
    """The VM has no drive with this device id (it may have been detached already)."""

    def __init__(self, device_id: str, message: str) -> None:
        self.device_id = device_id
        super().__init__(message)


class NoFreeSlot(BlockctlError):
    """A hot-plugged PCI device has nowhere to go: every hot-plug slot of the VM is taken.
    The message names what holds them and the ways out (virtio-scsi, detach, more ports)."""


class PartiallyApplied(BlockctlError):
    """``apply`` stopped at a step that failed although the whole plan was checked first:
    ``done`` were carried out, ``failed`` and ``not_done`` were not."""

    def __init__(
        self,
        message: str,
        *,
        done: tuple[object, ...],
        failed: object,
        not_done: tuple[object, ...],
    ) -> None:
        self.done = done
        self.failed = failed
        self.not_done = not_done
        super().__init__(message)


class UnsafeOperation(BlockctlError):
    """Refused because it would change data that something else depends on (e.g. a commit
    into a shared base). The message says how to proceed if it is really intended."""


class Conflict(UnsafeOperation):
    """Refused before anything changed: another operation is running on the same disk (a
    commit, stream, external snapshot or backup, from this process or any other client).

    ``kind`` (``commit``, ``stream``, ``snapshot``, ``backup``, or QEMU's job type),
    ``job_id``, ``device`` and ``pid`` (the process driving it; None when unknown) name the
    running operation. Wait for it to end (``blockctl jobs VM``), or cancel it; then run the
    command again. CLI exit code 5: nothing was done, and running it again later may work.
    """

    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        job_id: str | None = None,
        device: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.kind = kind
        self.job_id = job_id
        self.device = device
        self.pid = pid
        super().__init__(message)


class StorageDaemonBusy(Conflict):
    """Refused before anything changed: the qemu-storage-daemon of vhost-user-blk disk
    ``device_id`` (``daemon_pid``, QMP on ``monitor``) serves one QMP client at a time, and
    another holds it: ``holder`` says who when blockctl knows (an operation in the disk's
    operations directory, ``kind``, ``job_id``, ``pid``), else it is a client blockctl keeps
    no record of (a ``chain`` or ``snapshot list`` from another process, another tool).
    Wait for it to end (a job in the daemon is listed by ``blockctl jobs VM``), or cancel
    it; then run the command again. CLI exit code 5, as for any conflict."""

    def __init__(
        self,
        operation: str,
        device_id: str,
        *,
        vm: str,
        daemon_pid: int | None,
        monitor: str | None,
        holder: str,
        kind: str,
        job_id: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.operation = operation
        self.device_id = device_id
        self.daemon_pid = daemon_pid
        self.monitor = monitor
        self.holder = holder
        ways = [f"wait for it to end (`blockctl jobs {vm}` lists a job running in the daemon)"]
        if job_id is not None:
            ways.append(f"cancel it (`blockctl jobs {vm} cancel {job_id}`)")
        super().__init__(
            f"{operation}: {device_id}'s qemu-storage-daemon (pid {daemon_pid}, QMP {monitor}) "
            f"is busy: its monitor serves one client at a time, and {holder} holds it; nothing "
            f"was changed. Way out: {' or '.join(ways)}, then run it again",
            kind=kind,
            job_id=job_id,
            device=device_id,
            pid=pid,
        )


class RepositoryError(BlockctlError):
    """A backup repository cannot be used as it is: missing, not a repository, group- or
    world-writable, owned by someone else, or holding names that would leave it (hostile).
    The message names the path and what to do."""


class BackupCorrupt(RepositoryError):
    """A backup's data does not match its manifest or index (digest, missing chunk, failed
    authentication). The message names the chunk or file and the points it affects."""


class BackupKeyError(RepositoryError):
    """An encrypted repository was opened without its key, or with another one. Raised before
    anything is read or written."""


class NbdError(BlockctlError):
    """Reading a backup's point-in-time export over NBD failed. ``errno`` is the number
    (None if the server gave none); the message names the export, the offset and the errno's
    name (``EIO``, ``ENOSPC``...)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class RepositoryBusy(RepositoryError):
    """Another process holds the repository's lock (garbage collection waits for no backup to
    be writing and no point's NBD server to be serving, a backup for no collection to be
    running). The message names a server holding it, and the VM to recover first."""


class QMPError(BlockctlError):
    """Anything that went wrong on the QMP connection."""


class QMPConnectFailed(QMPError):
    """Connecting, accepting or negotiating the QMP session failed."""


class MonitorsBusy(QMPConnectFailed):
    """Every QMP monitor of a VM was taken for the whole attach timeout.

    ``holders`` describes each client holding one (pid, since when, the command it runs).
    Wait for one of them to finish, or stop one; a VM started by ``blockctl up`` has a pool
    of monitors (``qmp-N.sock``), one client each.
    """

    def __init__(self, message: str, holders: Sequence[str]) -> None:
        super().__init__(message)
        self.holders = tuple(holders)


class CommandFailed(QMPError):
    """QEMU answered a command with an error.

    ``error_class`` is QEMU's class (``GenericError``, ``DeviceNotFound``, ...); ``desc`` is
    QEMU's sentence, which usually says exactly what was wrong.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")


class NodeBusy(Conflict, CommandFailed):
    """QEMU refused a command because a block job uses the node (``Node 'X' is busy: block
    device is in use by block job: commit``): the conflict blockctl's own check did not see
    (a job started by another tool, or a race). ``node`` is QEMU's node, ``kind`` the job's
    type. Nothing was changed by the refused command."""

    def __init__(self, command: str, error_class: str, desc: str, *, node: str, kind: str):
        CommandFailed.__init__(self, command, error_class, desc)
        self.kind = kind
        self.job_id = None
        self.device = None
        self.pid = None
        self.node = node
        self.args = (
            f"QEMU refused {command}: node {node} is in use by a running {kind} job ({desc}); "
            "wait for the job to end (`blockctl jobs VM`) or cancel it, then run it again",
        )


class ConnectionLost(QMPError):
    """QEMU closed the connection or exited while an operation was under way.

    Whether a command sent just before this happened took effect cannot be known from the
    client side; attach again and ask QEMU (if it still runs).
    """


class ProtocolMismatch(QMPError):
    """A reply or event did not have the shape blockctl expects; ``command`` names it."""

    def __init__(self, command: str, message: str) -> None:
        self.command = command
        super().__init__(f"unexpected reply to {command}: {message}")


class QMPStateError(QMPError):
    """The session is not in a state that allows this call (for example: already closed)."""


class Unsupported(QMPError):
    """This QEMU does not offer a command or argument blockctl needs."""

    def __init__(self, feature: str, message: str) -> None:
        self.feature = feature
        super().__init__(message)


class OperationTimeout(BlockctlError, TimeoutError):
    """A user-visible operation did not finish before its deadline."""

    def __init__(self, operation: str, seconds: float, detail: str = "") -> None:
        self.operation = operation
        self.seconds = seconds
        text = f"{operation} did not finish within {seconds:g} s"
        super().__init__(f"{text}: {detail}" if detail else text)


class ShutdownFailed(BlockctlError):
    """QEMU did not exit by the polite rungs of the shutdown ladder.

    Raised only after the process was killed and reaped: no QEMU is left behind.
    """


class GuestError(BlockctlError):
    """The test guest's serial console did not behave as the protocol expects."""


class GuestCommandFailed(GuestError):
    """A shell command in the guest exited non-zero."""

    def __init__(self, command: str, returncode: int, output: str) -> None:
        self.command = command
        self.returncode = returncode
        self.output = output
        super().__init__(f"guest command {command!r} exited with {returncode}:\n{_tail(output)}")


# Section: jobs


class JobError(BlockctlError):
    """A block job did not succeed. It has been dismissed: QEMU no longer lists it.

    ``target`` names the node or device the job worked on; ``offset``/``length`` are QEMU's
    progress counters when it concluded (equal only when everything was copied).
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: str,
        job_type: str | None,
        target: str | None,
        status: str | None,
        error: str | None,
        offset: int | None,
        length: int | None,
    ) -> None:
        self.job_id = job_id
        self.job_type = job_type
        self.target = target
        self.status = status
        self.error = error
        self.offset = offset
        self.length = length
        super().__init__(message)


class JobFailed(JobError):
    """The job concluded with an error (``error`` is QEMU's text), or with ``offset != length``.

    A job that stopped early is never counted as done, even without an error (qemu-facts F5).
    """


class JobStoppedOnError(JobFailed):
    """The job paused on an I/O error (error policy ``stop``, or ``enospc`` on a full target)
    and was not resumed within its pause timeout, so blockctl cancelled it.

    ``operation`` is ``read`` (the source failed) or ``write`` (the target failed);
    ``io_status`` is QEMU's view of the job's last error (``failed`` or ``nospace``). Fix the
    cause (free space, repair the storage) and resume the job while it waits, or raise the
    pause timeout.
    """

    operation: str | None = None
    io_status: str | None = None


class SnapshotLoadFailed(JobFailed):
    """``snapshot-load`` failed inside QEMU after blockctl's checks passed (e.g. the VM's RAM
    size differs from the snapshot's: QEMU finds out only while loading the VM state).

    QEMU stops the VM for the load and leaves it stopped on failure. ``reverted`` names the
    disks QEMU had already reverted to the snapshot (it reverts every disk before it loads
    the VM state; a failure while loading the state comes after), ``run_state`` is
    ``query-status`` afterwards, ``resumed`` whether blockctl resumed the guest (only when
    nothing was reverted and it was running before: it then continues where it was), and
    ``qemu_log`` the lines QEMU wrote to its log meanwhile (its reason is often only there).
    """

    run_state: str = "unknown"
    reverted: tuple[str, ...] = ()
    resumed: bool = False
    qemu_log: tuple[str, ...] = ()


class JobCancelled(JobError):
    """The job was cancelled before it finished (by blockctl or another client).

    For a commit this leaves ``base`` partly written: the top image is still authoritative.
    """


class JobCancelledByOther(JobCancelled):
    """The job was cancelled by another client (``blockctl jobs VM cancel ID`` from another
    process, or any QMP client's ``job-cancel``), not through the job's handle. What it
    leaves is what any cancel leaves (the chain as before the job; a commit's base read-only
    again). The command line exits with status 3 for it.
    """

    exit_code = 3


class JobNeverReady(OperationTimeout):
    """A mirror or active commit did not reach READY before the deadline.

    Its copy cannot converge while the guest dirties data faster than the job's speed limit
    allows. The message says what became of the job: cancelled by blockctl when blockctl
    started it (run the operation again with a higher speed limit or a longer deadline), else
    still running (raise its limit, ``Job.set_speed(0)`` / ``blockctl jobs VM speed ID 0``, or
    cancel it). An intermediate commit has no READY phase and never raises this.
    """

    def __init__(self, operation: str, seconds: float, detail: str, *, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(operation, seconds, detail)


class NodeNotFound(BlockctlError):
    """The block graph has no node (or device) with this name."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


# Section: guest agent


class GuestAgentError(BlockctlError):
    """Anything about a VM's guest agent (qemu-ga on ``org.qemu.guest_agent.0``)."""


class AgentNotConfigured(GuestAgentError):
    """The VM has no guest-agent channel: launch it with ``guest_agent=True``
    (TOML ``guest-agent = true``) and a guest that runs qemu-ga."""


class AgentUnavailable(GuestAgentError, TimeoutError):
    """Nothing answered on the agent's channel within ``seconds``.

    qemu-ga is not running in the guest (not installed, not started yet, killed), is hung, or
    another client holds the channel (the agent serves one client at a time).
    """

    def __init__(self, what: str, seconds: float, detail: str = "") -> None:
        self.what = what
        self.seconds = seconds
        text = f"the guest agent did not answer {what} within {seconds:g} s"
        super().__init__(f"{text}: {detail}" if detail else text)


class AgentCommandFailed(GuestAgentError):
    """The agent answered a command with an error (``error_class``, ``desc`` as qemu-ga said)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"the guest agent refused {command}: {desc} ({error_class})")


class AgentFrozen(AgentCommandFailed):
    """Refused because the guest's filesystems are frozen (the agent disables most commands
    then). ``blockctl agent VM thaw`` thaws them if nothing else should stay frozen."""


class QuiesceFailed(GuestAgentError):
    """A freeze did not freeze what was expected (``frozen`` of ``expected`` filesystems), or
    the guest was already frozen by someone else. blockctl left nothing frozen."""

    def __init__(
        self, message: str, *, frozen: int | None = None, expected: int | None = None
    ) -> None:
        self.frozen = frozen
        self.expected = expected
        super().__init__(message)


class FreezeDeadlineExceeded(GuestAgentError, TimeoutError):
    """The point-in-time operation did not finish within ``seconds`` of the freeze: blockctl
    thawed the guest and failed the operation (a guest left frozen is an outage)."""

    def __init__(self, operation: str, seconds: float) -> None:
        self.operation = operation
        self.seconds = seconds
        super().__init__(
            f"{operation} did not finish within the freeze deadline of {seconds:g} s; the "
            "guest was thawed and the operation abandoned (raise the deadline if it is just slow)"
        )


class ThawFailed(GuestAgentError):
    """The thaw did not succeed: the guest's filesystems may still be frozen.

    Writes in the guest block until they are thawed: retry ``blockctl agent VM thaw``, or
    restart qemu-ga in the guest and thaw (its state file remembers the freeze).
    """
