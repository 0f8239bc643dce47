"""Files and directories for their owner alone: created private, written atomically.

What blockctl writes holds a guest's data or controls a VM: disk images, journal and freeze
records, the drive registry, backups. So what it creates is owner-only *by construction*:
a new file gets mode 0600 and a new directory 0700 set explicitly on the new object
(``fchmod`` on its descriptor, before any byte is written), never left to the umask, which
may be 022 or even 000. An existing directory blockctl is asked to keep private data in is
checked the way ssh checks a key's directory: refused if others can write it or someone else
owns it (:func:`check_private_dir`).

The one atomic writer, :func:`atomic_write_bytes`: a temporary file beside the target named
``<name>.<pid>.tmp`` (the writer's pid, so a loader can tell a live writer's temporary file
from a dead one's, :func:`blockctl._journal.discard_if_stale`), created exclusively without
following a symlink, mode set, data written in full, fsync, rename over the target, fsync of
the directory. A reader sees the old content or the new, whole; once it returns, a crash
keeps the new.

The one file lock, :func:`flocked` (and :func:`flocked_polling` for a coroutine that waits):
``flock`` on a file opened ``O_CLOEXEC`` (a child process never inherits the lock), created
0600, released when the block ends however it ends, or when the process dies.

Stable API (other modules build on these signatures): :func:`atomic_write_bytes`,
:func:`make_private_dir`, :func:`create_private_file`, :func:`check_private_dir`,
:func:`fsync_dir`, :func:`temp_path`, :func:`flocked`, :func:`flocked_polling`,
:func:`flock_holders`,
:func:`unnamed_file`, :func:`name_unnamed_file`,
:data:`PRIVATE_FILE`, :data:`PRIVATE_DIR`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio

from blockctl.errors import BlockctlError, ConfigError

__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "TMP_SUFFIX",
    "atomic_write_bytes",
    "check_private_dir",
    "create_private_file",
    "flocked",
    "flocked_polling",
    "fsync_dir",
    "make_private_dir",
    "name_unnamed_file",
    "temp_path",
    "unnamed_file",
]

#: Mode of every file blockctl creates unless its caller asks for another.
PRIVATE_FILE = 0o600
#: Mode of every directory blockctl creates.
PRIVATE_DIR = 0o700
#: Suffix of :func:`atomic_write_bytes`' temporary files (``<name>.<pid>.tmp``).
TMP_SUFFIX = ".tmp"

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_path(path: Path) -> Path:
    """The temporary file :func:`atomic_write_bytes` uses for ``path`` in this process:
    ``<name>.<pid>.tmp`` beside it."""
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write_bytes(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file has exactly ``mode``
    (default 0600) whatever the umask.

    Steps: the temporary file :func:`temp_path` (a leftover of this pid's is removed first) is
    created with ``O_EXCL | O_NOFOLLOW`` and ``fchmod``-ed to ``mode`` before any byte is
    written; ``data`` is written in full and fsynced; the file is renamed over ``path``; the
    directory is fsynced. A reader sees the old content or the new, never a mix; after the
    return, the new content survives a crash. The result is a new inode: an old ``path``'s
    mode, owner or hard links do not carry over, and a symlink at ``path`` is replaced, not
    followed. On any error the temporary file is removed and ``path`` is left as it was.

    The temporary name is per process: one writer per ``path`` per process at a time.
    """
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # this pid's: its writer (a previous holder of the pid) is gone
    fd = os.open(tmp, _NEW_FILE, mode & 0o777)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def unnamed_file(directory: Path, mode: int = PRIVATE_FILE) -> int | None:
    """A new file in ``directory`` with no name yet (``O_TMPFILE``, read-write, exactly
    ``mode``): a process killed while writing it leaves nothing behind; the file appears only
    when :func:`name_unnamed_file` names it. None where the filesystem has no ``O_TMPFILE``
    (the caller then writes a named file)."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode & 0o777)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def name_unnamed_file(fd: int, path: Path) -> None:
    """Give the :func:`unnamed_file` ``fd`` (its data already fsynced) the name ``path``,
    never over anything already there (:class:`FileExistsError`), and fsync the directory:
    after the return the file survives a crash under its name."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # linkat with AT_SYMLINK_FOLLOW through /proc: CPython calls plain link() (which does
        # not follow the /proc link: EXDEV) unless a directory descriptor is given.
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory, follow_symlinks=True)
        os.fsync(directory)
    finally:
        os.close(directory)


def create_private_file(path: Path, *, mode: int = PRIVATE_FILE) -> None:
    """Create ``path`` as a new, empty file with exactly ``mode`` (default 0600), whatever the
    umask. Exclusive: :class:`FileExistsError` if anything is at ``path`` (a symlink included,
    which is never followed).

    For a file another program then fills (``qemu-img create``/``convert``, QEMU's
    ``blockdev-create``): they open an existing file without changing its mode, so the data
    is never readable by others, not even for a moment.
    """
    fd = os.open(path, _NEW_FILE, mode & 0o777)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def make_private_dir(path: Path, *, what: str = "directory") -> None:
    """Make sure directory ``path`` exists for its owner alone.

    Missing, it is created with mode 0700 set explicitly whatever the umask, and so is each
    missing parent. Existing, it is not changed (its mode is its owner's choice) but checked
    with :func:`check_private_dir`: refused, with :class:`~blockctl.errors.ConfigError`
    (``field`` = ``what``), if others can write it or someone else owns it.
    """
    missing = []
    parent = path
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            continue  # made meanwhile by someone else: checked below if it is ``path``
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, PRIVATE_DIR)
        finally:
            os.close(fd)
    check_private_dir(path, what)


def check_private_dir(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is a directory owned by the current (effective) user that
    neither its group nor others can write, as ssh refuses a loose key file.

    Raises :class:`~blockctl.errors.ConfigError` with ``field`` = ``what``, a message naming
    the path, the cause (mode or owner) and the fix (``chmod 700 PATH``, ``chown``). A symlink
    at ``path`` is followed: the directory it names is checked. Readability by others is not
    refused (a directory blockctl creates is 0700; a looser one someone made on purpose is
    their choice), only what would let another user replace or add files.
    """
    quoted = shlex.quote(str(path))
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(what, f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError(what, f"cannot check {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(what, f"{path} is not a directory")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise ConfigError(
            what,
            f"{path} is owned by uid {info.st_uid}, not by you (uid {uid}): another user "
            f"could replace what blockctl keeps there; use a directory of your own, or "
            f"`chown {uid} {quoted} && chmod 700 {quoted}`",
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        who = " and ".join(
            name for bit, name in ((0o020, "its group"), (0o002, "all users")) if mode & bit
        )
        raise ConfigError(
            what,
            f"{path} is writable by {who} (mode {mode:04o}): they could replace what "
            f"blockctl keeps there; `chmod 700 {quoted}`",
        )


def fsync_dir(directory: Path) -> None:
    """fsync ``directory``: a rename, creation or unlink in it is then durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_lock(path: Path, *, create: bool, read_only: bool, directory: bool) -> int:
    """The descriptor to ``flock``: ``O_CLOEXEC`` always; a file is never reached through a
    symlink (``O_NOFOLLOW``) and, with ``create``, made if missing and set to 0600 whatever
    the umask."""
    if directory:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags | (os.O_CREAT if create else 0), PRIVATE_FILE)
    if create:
        try:
            os.fchmod(fd, PRIVATE_FILE)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _flock_operation(*, shared: bool, wait: bool) -> int:
    return (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)


@contextlib.contextmanager
def flocked(
    path: Path,
    *,
    shared: bool = False,
    wait: bool = True,
    create: bool = False,
    read_only: bool = False,
    directory: bool = False,
    busy: Callable[[], BlockctlError] | None = None,
    open_error: Callable[[OSError], BaseException] | None = None,
) -> Iterator[int | None]:
    """Hold a ``flock`` on ``path`` for the block; yields the locked descriptor.

    ``shared``: a shared lock (any number of holders) instead of an exclusive one. ``wait``:
    block until the lock is free; without it a held lock is *busy*: raised as ``busy()``
    (a :class:`~blockctl.errors.BlockctlError` naming who to wait for), or, without ``busy``,
    the block gets ``None`` instead of a descriptor. The file is opened read-write
    (``read_only``: read-only) and ``O_CLOEXEC``, never through a symlink; ``create`` makes a
    missing one, mode 0600. ``directory``: ``path`` is a directory, opened read-only and
    locked itself. ``open_error``: what an :class:`OSError` opening the file is raised as (by
    default it propagates). The descriptor is closed when the block ends, however it ends, which
    releases the lock; the kernel releases it too if the process dies.
    """
    try:
        fd = _open_lock(path, create=create, read_only=read_only, directory=directory)
    except OSError as exc:
        if open_error is None:
            raise
        raise open_error(exc) from exc
    try:
        try:
            fcntl.flock(fd, _flock_operation(shared=shared, wait=wait))
        except BlockingIOError as exc:
            if busy is not None:
                raise busy() from exc
            locked = False
        else:
            locked = True
        yield fd if locked else None
    finally:
        os.close(fd)


def flock_holders(path: Path) -> list[int]:
    """The processes holding a ``flock`` on ``path`` (granted, not waiting), from the kernel's
    ``/proc/locks``: each lock's pid is the process that took it. Empty where there is no
    ``/proc/locks`` or ``path`` is gone: for naming who holds a lock, never for deciding."""
    try:
        info = os.stat(path, follow_symlinks=False)
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return []
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    pids: list[int] = []
    for line in lines:
        # "N: FLOCK  ADVISORY  READ 1234 fe:00:2146464 0 EOF"; a waiter's line has "->".
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            with contextlib.suppress(ValueError):
                pid = int(fields[4])
                if pid > 0 and pid not in pids:
                    pids.append(pid)
    return pids


@contextlib.asynccontextmanager
async def flocked_polling(
    path: Path, *, poll: float, create: bool = False, on_wait: Callable[[], None] | None = None
) -> AsyncIterator[int]:
    """:func:`flocked` (exclusive, on a file) for a coroutine: tries every ``poll`` s until the
    lock is free, so that a cancellation or a timeout around it still ends the wait (a
    blocking ``flock`` would hold the event loop). ``on_wait`` is called once, when the lock
    is first found held. Yields the locked descriptor; closed, so released, when the block
    ends however it ends."""
    fd = _open_lock(path, create=create, read_only=False, directory=False)
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, _flock_operation(shared=False, wait=False))
                break
            except BlockingIOError:
                if not waiting and on_wait is not None:
                    on_wait()
                waiting = True
                await anyio.sleep(poll)
        yield fd
    finally:
        os.close(fd)
