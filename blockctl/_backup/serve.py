"""Serve one disk of a backup point over NBD, read-only, straight from the repository.

The server is nbdkit with its Python plugin running :mod:`.nbdkit_plugin` (which reads
through :class:`.export.PointImage`: the store's own chunk reading, every chunk checked
against its digest). ``scripts/bench live`` measured the choice (README, "Live
restore"). nbdkit is started through :mod:`blockctl._proc` on a unix socket in a private
directory (0700, the socket 0600) under the VM's run directory; it dies with this process
(nbdkit in the foreground sets PR_SET_PDEATHSIG) and is always terminated and reaped when the
block exits (shielded). A ``detached`` server (a live restore's) runs forked into the
background, so that it outlives a killed controller; its pid comes through the ready pipe,
and nbdkit writes it to a pid file in its directory too (before it says it is ready), where
recovery finds a server started after its record was written and before the record named
its pid (:func:`servers_in`).

Readiness is a pipe, not a poll: the plugin writes "1" and its pid from nbdkit's ``after_fork``
hook, which runs once the socket listens. A server that exits first closes the pipe, and its
log is the error.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import sysconfig
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from blockctl import _proc
from blockctl._backup import nbdkit_plugin
from blockctl._backup.store import Repository, check_name, check_point_id
from blockctl._log import get_logger
from blockctl.errors import MissingComponent, ProcessFailed

_log = get_logger()

NBDKIT = "nbdkit"
NBDKIT_HINT = "install nbdkit and nbdkit-plugin-python (Debian: apt-get install nbdkit " + (
    "nbdkit-plugin-python)"
)
#: How long nbdkit may take to load Python and blockctl and listen.
READY_TIMEOUT = 30.0
#: Seconds the NBD client waits for a server that went away before requests fail (a short
#: outage goes unnoticed: ``notes/backup-data-path.md``).
RECONNECT_DELAY = 10
#: In a detached server's directory: its socket, and the pid file nbdkit writes.
SOCKET_NAME = "sock"
PIDFILE_NAME = "nbdkit.pid"
#: The names of a live restore's backup nodes begin with it (recovery tells them from the
#: other nodes an operation drops by it).
BACKUP_NODE_PREFIX = "bclr-"


def backing_nodes(base: str, socket: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The nodes a live restore's target backs onto (bottom-up): an NBD client of the server
    on ``socket`` (read-only, riding out a short outage), and ``base``, raw over it."""
    return (
        {
            "driver": "nbd",
            "node-name": f"{base}-nbd",
            "server": {"type": "unix", "path": str(socket)},
            "read-only": True,
            "reconnect-delay": RECONNECT_DELAY,
        },
        {"driver": "raw", "node-name": base, "file": f"{base}-nbd", "read-only": True},
    )


@dataclass(slots=True, kw_only=True)
class PointExport:
    """A running NBD server of one disk of a point: its unix socket and process id."""

    socket: Path
    pid: int
    size: int
    home: Path  # its private directory (the socket, its log)
    #: Set by the caller of a ``detached`` server to leave it running when the block exits:
    #: a live restore whose copy goes on without this controller (its journal record names
    #: the server, and recovery stops it).
    keep_running: bool = False


def _plugin_paths() -> list[str]:
    """What the plugin's interpreter needs on ``sys.path``: this blockctl, then the
    controller's site-packages (its dependencies). Never the controller's standard library:
    nbdkit embeds Debian's own."""
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return paths


def nbdkit_argv(
    repo: Repository,
    vm_name: str,
    point: str,
    device: str,
    socket: Path,
    keyfd: int | None,
    readyfd: int,
    cache_chunks: int | None = None,
    detached: bool = False,
    into: str | None = None,
) -> list[str]:
    """The server's argv (pure): read-only, one unix socket; in the foreground, or
    ``detached``: forked into the background, where nbdkit no longer dies with the process
    that started it (in the foreground it sets PR_SET_PDEATHSIG itself, measured with
    strace: nbdkit 1.32), and writes its pid to :data:`PIDFILE_NAME` beside the socket."""
    argv = [
        NBDKIT,
        *(
            ["--log=stderr", f"--pidfile={socket.parent / PIDFILE_NAME}"]
            if detached
            else ["--foreground"]
        ),
        "--readonly",
        "--unix",
        str(socket),
        "python",
        str(Path(nbdkit_plugin.__file__).resolve()),
    ]
    argv += [f"path={p}" for p in _plugin_paths()]
    argv += [f"repo={repo.path}", f"vm={vm_name}", f"point={point}", f"device={device}"]
    if keyfd is not None:
        argv.append(f"keyfd={keyfd}")
    if cache_chunks is not None:
        argv.append(f"cache={cache_chunks}")
    if into is not None:
        argv.append(f"into={into}")
    argv.append(f"readyfd={readyfd}")
    return argv


def socket_in(home: Path) -> Path:
    """The socket of the server whose directory is ``home``."""
    return home / SOCKET_NAME


def servers_in(home: Path) -> list[tuple[int, int]]:
    """The detached servers of the directory ``home``: the process its pid file names (nbdkit
    writes it once it listens), if that is still nbdkit serving ``home``'s socket; without a
    pid file, every nbdkit process serving that socket (nbdkit is started, loads its plugin
    and forks into the background before it writes the file: a launcher killed in between
    leaves a server only its command line tells). Each as its pid and start time (for
    :func:`blockctl._proc.stop_recorded`); empty if there is none (never started, or gone)."""
    try:
        named = int((home / PIDFILE_NAME).read_text())
    except (OSError, ValueError):
        named = None
    if named is not None:
        found = _serving(named, home)
        return [] if found is None else [found]
    pids = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    return [found for pid in pids if (found := _serving(pid, home)) is not None]


def _serving(pid: int, home: Path) -> tuple[int, int] | None:
    """``pid`` and its start time, if it is nbdkit serving ``home``'s socket."""
    # The start time first: a pid reused after it is read fails stop_recorded's check, so
    # the command line read next is that process's or the check refuses.
    start = _proc.process_start(pid)
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    socket = str(socket_in(home)).encode()
    serves = (b"--unix", socket) in itertools.pairwise(argv)
    if start is None or os.path.basename(argv[0]) != NBDKIT.encode() or not serves:
        return None
    return pid, start


@contextlib.asynccontextmanager
async def serve_point(
    repo: Repository,
    vm_name: str,
    point: str,
    device: str,
    directory: Path,
    *,
    size: int,
    cache_chunks: int | None = None,
    detached: bool = False,
    into: str | None = None,
    starting: Callable[[Path], None] | None = None,
) -> AsyncIterator[PointExport]:
    """Run an NBD server of ``device`` at ``point`` for the block's duration, on a socket in
    a new private directory under ``directory``; the directory goes when the block exits.

    ``detached``: the server does not die with this process (its own session, no
    PR_SET_PDEATHSIG), and the caller may set ``keep_running`` to leave it (and its
    directory) when the block exits. ``into``: the VM whose live restore it serves (named
    by a garbage collection its lock refuses). ``starting``: called with the server's
    directory (:func:`socket_in` names its socket) before anything is made: a caller that
    journals the server records it there first (:func:`servers_in` finds it later).

    The server holds the repository's lock shared while it runs (:mod:`.nbdkit_plugin`)."""
    check_name(vm_name, "VM")
    check_name(device, "device")
    check_point_id(point)
    if into is not None:
        check_name(into, "VM")
    if shutil.which(NBDKIT) is None:
        raise MissingComponent(NBDKIT, NBDKIT_HINT)
    home = Path(directory) / f"nbd-{secrets.token_hex(4)}"
    if starting is not None:
        starting(home)
    os.mkdir(home, 0o700)
    os.chmod(home, 0o700)  # whatever the umask
    socket = socket_in(home)
    keyfd: int | None = None
    fds: list[int] = []
    export: PointExport | None = None
    try:
        ready_r, ready_w = os.pipe()
        fds += [ready_r, ready_w]
        if repo.key is not None:
            key_r, key_w = os.pipe()
            fds += [key_r, key_w]
            # 64 bytes fit any pipe's buffer: written before the child exists, never blocks.
            os.write(key_w, repo.key.enc + repo.key.mac)
            os.close(key_w)
            fds.remove(key_w)
            keyfd = key_r
        argv = nbdkit_argv(
            repo, vm_name, point, device, socket, keyfd, ready_w, cache_chunks, detached, into
        )
        with open(home / "nbdkit.log", "wb") as log:
            process = await _proc.spawn(
                argv,
                log=log,
                pass_fds=[f for f in fds if f != ready_r],
                die_with_parent=not detached,
            )
        try:
            for fd in [f for f in fds if f != ready_r]:
                os.close(fd)
                fds.remove(fd)
            with anyio.fail_after(READY_TIMEOUT):
                await anyio.wait_readable(ready_r)
            said = os.read(ready_r, 32)  # b"1<pid>\n" from the serving process
            if not said.startswith(b"1"):  # the pipe closed: nbdkit exited before listening
                with anyio.CancelScope(shield=True):
                    code = await _proc.terminate(process, grace=5.0)
                raise ProcessFailed(
                    argv, code, "", (home / "nbdkit.log").read_text(errors="replace")
                )
            pid = int(said[1:]) if said[1:].strip() else process.pid
            if detached:
                # The process started has forked the server and exits by itself: reaped,
                # never sent SIGTERM. It shares nbdkit's quit pipe with the server, and if
                # still alive its SIGTERM handler writes to it: the server, whose own quit flag
                # is unset, then spins on the readable pipe and never accepts a connection (a
                # blockdev-add of it hangs; reproduced by writing a byte to the pipe).
                await _proc.reap(process, grace=READY_TIMEOUT)
                server_start = _proc.process_start(pid)
            # nbdkit makes its socket 0755 whatever the umask; the directory (0700) already
            # keeps others out, the socket's own mode says so too.
            os.chmod(socket, 0o600)
            _log.info(
                "blockctl.backup.export_started",
                vm=vm_name,
                point=point,
                device=device,
                pid=pid,
            )
            export = PointExport(socket=socket, pid=pid, size=size, home=home)
            yield export
        finally:
            if export is not None and export.keep_running:
                _log.warning("blockctl.backup.export_left_running", pid=export.pid)
            elif detached and export is not None:
                await _proc.stop_recorded(export.pid, server_start, grace=5.0)
                _log.info("blockctl.backup.export_stopped", pid=export.pid)
            else:
                code = await _proc.terminate(process, grace=5.0)
                _log.info("blockctl.backup.export_stopped", pid=process.pid, rc=code)
    finally:
        for fd in fds:
            os.close(fd)
        if export is None or not export.keep_running:
            shutil.rmtree(home, ignore_errors=True)
