"""A pool of QMP monitors: many blockctl processes drive one VM at once.

A QMP monitor serves one client at a time. A VM blockctl launches gets, besides ``qmp.sock``,
``POOL_SIZE`` more monitors, ``<run dir>/qmp-N.sock``. A client takes a free one by locking
``<run dir>/qmp-N.lock`` (``flock``, non-blocking; the kernel releases it if the process dies,
so a killed client never leaves a monitor taken) and writes into that file who it is: pid,
start time, the command it runs. A client that finds every monitor taken retries until its
timeout, then fails with :class:`~blockctl.errors.MonitorsBusy` naming the holders.

QEMU sends every event to every monitor and runs the commands of all monitors one at a time
in its main loop, so each client sees a job's events whoever started it, and nothing needs to
multiplex. Why a pool and not a per-VM daemon: README, "Many clients, one VM".
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from blockctl import _fsutil
from blockctl.errors import MonitorsBusy, QMPConnectFailed

#: Monitors in a VM's pool. QEMU has no limit on ``-mon`` options; each costs one listening
#: socket, and a connected one an I/O watch, in QEMU.
POOL_SIZE = 8


def pool_sockets(run_dir: Path, size: int = POOL_SIZE) -> list[Path]:
    """The pool's socket paths in ``run_dir`` (``qmp-0.sock`` …)."""
    return [run_dir / f"qmp-{i}.sock" for i in range(size)]


def lock_path(socket_path: Path) -> Path:
    """``qmp-N.lock`` beside ``qmp-N.sock``."""
    return socket_path.with_suffix(".lock")


def client_command() -> str:
    """What this process runs, for other clients' messages (its argv, shortened)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "/blockctl")):
        argv[0] = "blockctl"
    text = " ".join(argv) or "python"
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class Holder:
    """Who holds a monitor, as it wrote into the lock file."""

    monitor: str
    pid: int | None
    since: float | None
    command: str

    def describe(self, now: float | None = None) -> str:
        age = "" if self.since is None else f", for {(now or time.time()) - self.since:.0f} s"
        who = "an unknown process" if self.pid is None else f"pid {self.pid}"
        return f"{Path(self.monitor).name}: {who} running `{self.command}`{age}"


class Lease:
    """One monitor taken: its socket, and the lock held until :meth:`release`."""

    def __init__(self, socket_path: Path, lock: contextlib.ExitStack) -> None:
        self.socket = socket_path
        self._lock = lock

    def release(self) -> None:
        self._lock.close()  # closing the file releases the flock (once; then a no-op)


def try_take(sockets: Sequence[Path], command: str) -> Lease | None:
    """The first free monitor, locked and signed with ``command``; None if all are taken."""
    for sock in sockets:
        with contextlib.ExitStack() as lock:
            fd = lock.enter_context(_fsutil.flocked(lock_path(sock), create=True, wait=False))
            if fd is None:
                continue
            record = {"pid": os.getpid(), "since": time.time(), "command": command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            return Lease(sock, lock.pop_all())
    return None


def holders(sockets: Sequence[Path], *, besides: Path | None = None) -> list[Holder]:
    """The clients holding monitors now (``besides``: leave that monitor out, e.g. one's own).

    A lock is probed with a shared, non-blocking ``flock``: it fails only while someone holds
    the monitor. The probe is released at once.
    """
    found: list[Holder] = []
    for sock in sockets:
        if sock == besides:
            continue
        try:
            with _fsutil.flocked(lock_path(sock), shared=True, wait=False, read_only=True) as probe:
                if probe is None:
                    found.append(_read_holder(sock))
        except FileNotFoundError:
            continue  # never taken
    return found


def _read_holder(sock: Path) -> Holder:
    try:
        fd = os.open(lock_path(sock), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            raw = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        data = json.loads(raw or b"{}")
        pid = data.get("pid")
        since = data.get("since")
        command = str(data.get("command") or "(unknown)")
        return Holder(
            monitor=str(sock),
            pid=pid if isinstance(pid, int) else None,
            since=float(since) if isinstance(since, (int, float)) else None,
            command=command,
        )
    except (OSError, ValueError, AttributeError):  # being rewritten right now, or just removed
        return Holder(monitor=str(sock), pid=None, since=None, command="(unknown)")


async def take(
    sockets: Sequence[Path], *, vm: str, timeout: float, command: str | None = None
) -> Lease:
    """A free monitor of the pool, waiting up to ``timeout`` s for one.

    :raise MonitorsBusy: every monitor stayed taken; the message names each holder.
    """
    what = client_command() if command is None else command
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            lease = try_take(sockets, what)
        except OSError as exc:  # the run directory went away (the VM stopped), or worse
            where = exc.filename or (lock_path(sockets[0]) if sockets else "?")
            raise QMPConnectFailed(
                f"attach to VM {vm!r}: taking a QMP monitor failed: {where}: "
                f"{exc.strerror or exc}. Is the VM still running? (`blockctl ls`)"
            ) from exc
        if lease is not None:
            return lease
        if time.monotonic() >= deadline:
            break
        await anyio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 2, 0.25)
    taken = [h.describe() for h in holders(sockets)]
    raise MonitorsBusy(
        f"attach to VM {vm!r}: all {len(sockets)} of its QMP monitors stayed in use for "
        f"{timeout:g} s ({'; '.join(taken) or 'their holders just left'}). Wait for one of "
        "these to finish, or stop one (its job: `blockctl jobs "
        f"{vm}`), then retry",
        taken,
    )
