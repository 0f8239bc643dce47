"""The qemu-storage-daemons that serve a VM's vhost-user-blk drives, one daemon per drive.

A daemon belongs to the VM's lifecycle: it is started (and answers on QMP, its export
listed) before QEMU connects to it, it is a child of the process that launched the VM and
dies with it (PR_SET_PDEATHSIG), it is stopped (SIGTERM: the daemon quits cleanly on it) and
reaped when QEMU exits for any reason (shutdown, crash, kill) and when its drive is unplugged.
It has two QMP monitors: a socketpair, on which the launcher waits for its greeting (sent
after the export exists) and checks the export, and a listening socket in the run directory
(:meth:`StorageDaemon.qmp`), one client at a time. No session is held open between calls: a
QMP session is a task group, which must be left by the task that entered it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio

from blockctl import _binaries, _proc, _runtime
from blockctl._argv import DrivePlan, VhostPlan, daemon_argv
from blockctl._log import get_logger
from blockctl._qmp import wire
from blockctl._qmp.models import node_json
from blockctl._qmp.session import QMPSession
from blockctl.errors import (
    MissingComponent,
    QMPConnectFailed,
    StorageDaemonFailed,
)

_log = get_logger()

#: Seconds a daemon gets to come up (greeting), and to exit on ``quit`` before SIGTERM/SIGKILL.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def vhost_socket(run_dir: Path, index: int) -> Path:
    """Where drive ``index``'s daemon serves vhost-user-blk."""
    return run_dir / f"drv{index}-vhost.sock"


def monitor_socket(run_dir: Path, device_id: str) -> Path:
    """The daemon's QMP socket for processes other than the launcher."""
    return run_dir / f"{device_id}-qsd.sock"


@dataclass(slots=True, kw_only=True)
class StorageDaemon:
    """One running daemon: its process, the launcher's QMP session with it, its sockets."""

    device_id: str
    process: Any  # asyncio.subprocess.Process
    plan: VhostPlan
    monitor: Path
    log: Path
    argv: tuple[str, ...]
    pid_start: int | None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @contextlib.asynccontextmanager
    async def qmp(self, *, timeout: float = 10.0) -> AsyncIterator[QMPSession]:
        """A QMP session with the daemon, on its listening monitor socket."""
        async with QMPSession.connect(
            str(self.monitor), label=f"qsd-{self.device_id}", timeout=timeout
        ) as session:
            session.process_exit = self.process.wait
            yield session

    def record(self, file: Path, fmt: str) -> dict[str, Any]:
        """What the drive's record keeps of it (for other processes: ``blockctl drives``,
        and an unplug from another process, which stops it by pid and start time)."""
        return {
            "pid": self.pid,
            "pid_start": self.pid_start,
            "monitor": str(self.monitor),
            "socket": str(self.plan.socket),
            "chardev": self.plan.chardev_id,
            "export": self.plan.export["id"],
            "file": str(file),
            "format": fmt,
            "nodes": [node_json(n) for n in self.plan.nodes],
        }


class StorageDaemons:
    """The daemons of one VM, children of this process."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.running: dict[str, StorageDaemon] = {}

    async def start(self, plan: DrivePlan) -> StorageDaemon:
        """Start the daemon of ``plan`` and wait until it serves its export; on failure
        nothing of it is left (process reaped, sockets removed)."""
        assert plan.vhost is not None
        binary = _binaries.qemu_storage_daemon()
        if shutil.which(binary) is None:
            raise MissingComponent(binary, _binaries.install_hint("qemu-storage-daemon"))
        monitor = monitor_socket(self.run_dir, plan.device_id)
        for path in (plan.vhost.socket, monitor):
            _runtime.check_socket_path(path, "runtime_dir")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a leftover of a daemon killed with its controller
        ours, theirs = socket.socketpair()
        argv = daemon_argv(binary, plan.vhost, qmp_fd=theirs.fileno(), monitor=monitor)
        log_path = self.run_dir / f"{plan.device_id}-qsd.log"
        log_file: IO[bytes] = os.fdopen(
            os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb"
        )
        try:
            process = await _proc.spawn(argv, log=log_file, pass_fds=[theirs.fileno()])
        finally:
            log_file.close()
            theirs.close()
        _log.info("blockctl.storage_daemon.spawned", device=plan.device_id, pid=process.pid)
        try:
            try:
                async with QMPSession.connect(
                    ours, label=f"qsd-{plan.device_id}", timeout=START_TIMEOUT
                ) as session:
                    session.process_exit = process.wait
                    exports = [e.id for e in await wire.query_block_exports(session)]
            except QMPConnectFailed as exc:
                with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_TIMEOUT):
                    await process.wait()  # a refused argv: it exits right after connecting
                raise StorageDaemonFailed(
                    plan.device_id,
                    "it did not come up" if process.returncode is None else "it exited",
                    argv=argv,
                    exitcode=process.returncode,
                    log=_read(log_path),
                ) from exc
            if plan.vhost.export["id"] not in exports:
                raise StorageDaemonFailed(
                    plan.device_id,
                    f"its export {plan.vhost.export['id']} is missing: {exports!r}",
                    argv=argv,
                    exitcode=None,
                    log=_read(log_path),
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _proc.terminate(process, grace=STOP_TIMEOUT)
                _remove(plan.vhost.socket, monitor)
            raise
        finally:
            ours.close()
        daemon = StorageDaemon(
            device_id=plan.device_id,
            process=process,
            plan=plan.vhost,
            monitor=monitor,
            log=log_path,
            argv=tuple(argv),
            pid_start=_proc.process_start(process.pid),
        )
        self.running[plan.device_id] = daemon
        return daemon

    async def stop(self, device_id: str) -> int | None:
        """Stop and reap ``device_id``'s daemon (SIGTERM, then SIGKILL after a grace time);
        its sockets are removed. Shielded. Its exit code; None if it was not running here."""
        daemon = self.running.pop(device_id, None)
        if daemon is None:
            return None
        code = await _proc.terminate(daemon.process, grace=STOP_TIMEOUT)  # shielded
        _remove(daemon.plan.socket, daemon.monitor)
        _log.info("blockctl.storage_daemon.stopped", device=device_id, pid=daemon.pid, code=code)
        return code

    async def stop_all(self) -> None:
        """Stop every daemon (QEMU is gone, or going). Shielded."""
        with anyio.CancelScope(shield=True):
            for device_id in list(self.running):
                await self.stop(device_id)


@contextlib.asynccontextmanager
async def daemons_of(run_dir: Path) -> AsyncIterator[StorageDaemons]:
    """A VM's set of daemons; every one still running is stopped and reaped when the block
    exits, however it exits."""
    daemons = StorageDaemons(run_dir)
    try:
        yield daemons
    finally:
        await daemons.stop_all()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
