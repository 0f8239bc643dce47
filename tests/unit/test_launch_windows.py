"""A detached launch killed before QEMU started (issue 18, a live launch's windows): its
run directory holds only the copy's journal record and the backup's server. ``blockctl
recover`` of the name reports it as QEMU gone and stops the server (and removes the files
the launch made while its record still names them: a raw drive's overlay and new target),
so that ``up`` of the name (refused until then) reuses it; while the launcher still runs,
it is left alone. (The
windows from QEMU's spawn on are tested with QEMU: tests/integration/test_live_launch.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockctl import _journal, _proc
from blockctl._backup.serve import PIDFILE_NAME, servers_in, socket_in
from blockctl._journal import Intent, OpKind, ServerRecord, Step, Verdict
from blockctl._machine import Timeouts, _make_run_dir, shutdown_detached
from blockctl._ops.recovery import Recovery
from blockctl._ops.vm_recovery import recover_vm
from blockctl._runtime import VMRecord, read_record, write_record
from blockctl.errors import QMPConnectFailed, VMExists, VMNotFound


def launch_record(run_dir: Path, writer: subprocess.Popen[bytes], server: int) -> Path:
    intent = Intent(
        id="stream-1",
        kind=OpKind.STREAM,
        vm="lost",
        devices={
            "disk0": _journal.DeviceChains(
                before=("drv0", "bclr-1"),
                after=("drv0",),
                files_before=(str(run_dir / "t.qcow2"), "nbd+unix:///?socket=/s"),
                files_after=(str(run_dir / "t.qcow2"),),
            )
        },
        pid=writer.pid,
        pid_start=_proc.process_start(writer.pid),
        server=ServerRecord(
            pid=server, pid_start=_proc.process_start(server), home=str(run_dir / "srv")
        ),
    )
    _journal.write(run_dir, intent)
    return _journal.path_of(run_dir, intent.id)


def orphan() -> int:
    """A process that is not ours (as a server left by a dead launcher: init reaps it)."""
    out = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], check=True, capture_output=True
    )
    return int(out.stdout)


@pytest.fixture
def writer() -> Iterator[subprocess.Popen[bytes]]:
    """The launcher: alive, then killed by the test."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BLOCKCTL_RUNTIME_DIR", str(tmp_path / "rt"))
    path = tmp_path / "rt" / "lost"
    path.mkdir(parents=True, mode=0o700)
    (tmp_path / "rt").chmod(0o700)
    return path


async def test_a_launch_killed_before_qemu_started_is_recovered_as_qemu_gone(
    run_dir: Path, writer: subprocess.Popen[bytes]
) -> None:
    server = orphan()
    started = _proc.process_start(server)
    try:
        record = launch_record(run_dir, writer, server)
        with pytest.raises(VMExists, match="recover"):  # `up` of the name
            _make_run_dir("lost")
        # The launcher still runs: its launch, not recover's.
        with pytest.raises(VMNotFound):
            await recover_vm("lost")
        assert record.exists() and _proc.process_alive(server, started)
        writer.kill()
        writer.wait()
        report = await recover_vm("lost")
        assert not report.qemu_running
        (result,) = report.operations
        assert result.verdict is Verdict.QEMU_GONE, result
        assert "stopped the backup's server" in " ".join(result.done), result.done
        assert not record.exists() and not _proc.process_alive(server, started)
        assert _make_run_dir("lost") == run_dir and not list(run_dir.iterdir())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


@pytest.mark.parametrize("spawned", [False, True])
async def test_a_raw_launch_killed_before_qemu_started_removes_the_files_it_made(
    run_dir: Path, writer: subprocess.Popen[bytes], tmp_path: Path, spawned: bool
) -> None:
    """A raw drive's launch: its mirror's record, written before QEMU's spawn, names the
    overlay and the new target it made; with no QEMU record in the run directory (QEMU never
    ran), ``recover`` removes them with the server. Once the spawn has rewritten the record
    without them (``spawned``: QEMU may have written to them), they are kept whatever
    happens to QEMU's record, and the way on is said instead."""
    overlay, target = tmp_path / ".t.raw.live-overlay-ab.qcow2", tmp_path / "t.raw"
    overlay.write_bytes(b"overlay")
    target.write_bytes(b"target")
    server = orphan()
    started = _proc.process_start(server)
    chains = _journal.DeviceChains(
        before=("drv0", "bclr-1"),
        after=("drv0-target",),
        files_before=(str(overlay), "nbd+unix:///?socket=/s"),
        files_after=(str(target),),
        formats_before=("qcow2", "raw"),
    )
    intent = Intent(
        id="mirror-1",
        kind=OpKind.MIRROR,
        vm="lost",
        active=True,
        devices={"disk0": chains},
        drop_nodes=("drv0", "drv0-file", "bclr-1", "bclr-1-nbd"),
        drop_files=(str(overlay),),
        delete_files=True,
        created_files=() if spawned else (str(overlay), str(target)),
        pid=writer.pid,
        pid_start=_proc.process_start(writer.pid),
        server=ServerRecord(pid=server, pid_start=started, home=str(run_dir / "srv")),
    )
    _journal.write(run_dir, intent)
    try:
        writer.kill()
        writer.wait()
        report = await recover_vm("lost")
        (result,) = report.operations
        assert result.verdict is Verdict.QEMU_GONE, result
        assert "stopped the backup's server" in " ".join(result.done), result.done
        assert not _proc.process_alive(server, started)
        if spawned:
            assert overlay.exists() and target.exists()
            assert "holds the guest's writes" in result.message, result.message
        else:
            assert not overlay.exists() and not target.exists()
            assert "before QEMU started" in result.message, result.message
            assert result.message.startswith(f"{intent.describe()}: "), result.message
        assert _make_run_dir("lost") == run_dir and not list(run_dir.iterdir())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


async def test_no_record_no_vm(run_dir: Path) -> None:
    with pytest.raises(VMNotFound):
        await recover_vm("lost")
    with pytest.raises(VMNotFound):
        await recover_vm("..")


@pytest.fixture
def never_greets(run_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], VMRecord]]:
    """A "QEMU" whose launcher died before its greeting and that never answers: its record
    says starting, its process runs (its command line names the monitor, as QEMU's does),
    no monitor socket exists."""
    monitor = run_dir / "qmp.sock"
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(monitor)])
    record = VMRecord(
        name="lost",
        pid=process.pid,
        run_dir=str(run_dir),
        monitor=str(monitor),
        console_socket=None,
        console_log=None,
        qemu_log=str(run_dir / "qemu.log"),
        argv=("qemu",),
        accel="tcg",
        started=0.0,
        monitors=(str(run_dir / "qmp-0.sock"),),
        starting=True,
    )
    write_record(record)
    yield process, record
    process.kill()
    process.wait()


async def test_a_vm_still_starting_that_never_answers_is_reported_then_stopped_by_down(
    run_dir: Path, never_greets: tuple[subprocess.Popen[bytes], VMRecord]
) -> None:
    """``recover`` (and any attach) says it is still starting and how to go on, changing
    nothing; ``up`` of the name refuses; ``down`` stops it and removes its run directory."""
    process, record = never_greets
    with pytest.raises(QMPConnectFailed, match="still starting") as refused:
        await recover_vm("lost")
    assert "blockctl down lost" in str(refused.value)
    assert read_record("lost") == record and process.poll() is None
    with pytest.raises(VMExists, match="already running"):
        _make_run_dir("lost")
    await shutdown_detached("lost", timeouts=Timeouts(powerdown=None, quit=0.1, terminate=5.0))
    assert process.wait() == -signal.SIGTERM and not run_dir.exists()


def fake_server(home: Path, *, pidfile: bool = True) -> int:
    """A process that is not ours and looks like a detached nbdkit serving ``home``'s
    socket (its command line), its pid in ``home``'s pid file as nbdkit writes it once it
    listens (serve.servers_in reads both); ``pidfile`` False: not written yet."""
    home.mkdir(parents=True, exist_ok=True)
    sleeper = f"exec -a nbdkit {sys.executable} -c 'import time; time.sleep(60)'"
    out = subprocess.run(
        ["bash", "-c", f"({sleeper} --unix {socket_in(home)}) >/dev/null 2>&1 & echo $!"],
        check=True,
        capture_output=True,
    )
    pid = int(out.stdout)
    if pidfile:
        (home / PIDFILE_NAME).write_text(f"{pid}\n")
    return pid


def test_a_server_is_found_by_its_pid_file_only_if_it_serves_that_home(tmp_path: Path) -> None:
    """A pid file naming a process that is not nbdkit on that home's socket (another
    server's, or a reused pid) finds nothing: recovery never stops it."""
    home, other = tmp_path / "nbd-1", tmp_path / "nbd-2"
    server, stranger = fake_server(home), orphan()
    try:
        assert servers_in(home) == [(server, _proc.process_start(server))]
        other.mkdir()
        (other / PIDFILE_NAME).write_text(str(server))  # the socket it serves is home's
        assert servers_in(other) == []
        (other / PIDFILE_NAME).write_text(str(stranger))  # not nbdkit
        assert servers_in(other) == []
        (other / PIDFILE_NAME).write_text("")  # never written whole
        assert servers_in(other) == []
        assert servers_in(tmp_path / "nbd-3") == []  # never started
    finally:
        for pid in (server, stranger):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_server_that_has_not_written_its_pid_file_is_found_by_its_command_line(
    tmp_path: Path,
) -> None:
    """nbdkit loads its plugin and forks into the background before it writes its pid file:
    a launcher killed in between leaves a server only its command line names (and, at the
    fork, two processes). Each nbdkit serving that home's socket is found; another home's
    server and a process that only mentions the socket are not."""
    home, other = tmp_path / "nbd-1", tmp_path / "nbd-2"
    servers = [fake_server(home, pidfile=False) for _ in range(2)]
    neighbour = fake_server(other, pidfile=False)
    mentions = subprocess.Popen(["sleep", "60", "--unix", str(socket_in(home))])
    try:
        assert servers_in(home) == sorted((p, _proc.process_start(p)) for p in servers)
        assert servers_in(other) == [(neighbour, _proc.process_start(neighbour))]
    finally:
        mentions.kill()
        mentions.wait()
        for pid in (*servers, neighbour):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def forking_server(home: Path, ready: Path) -> int:
    """A process that looks like nbdkit serving ``home``'s socket, with no pid file, that
    forks on SIGTERM (the child, with the same command line, goes on) and exits."""
    home.mkdir()
    forks = (
        "import os, signal, sys, time\n"
        "def term(*_):\n"  # forked: the child has the same command line, as nbdkit's has
        "    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "open(sys.argv[-1], 'w').close()\n"
        "time.sleep(60)\n"
    )
    out = subprocess.run(
        [
            "bash",
            "-c",
            f'(exec -a nbdkit {sys.executable} -c "$1" --unix {socket_in(home)} "$2") '
            ">/dev/null 2>&1 & echo $!",
            "bash",
            forks,
            str(ready),
        ],
        check=True,
        capture_output=True,
    )
    parent = int(out.stdout)
    for _ in range(500):  # its SIGTERM handler is in place
        if ready.exists():
            break
        time.sleep(0.01)
    ready.unlink()
    return parent


def served_stream(
    writer: subprocess.Popen[bytes], target: Path, home: Path, **fields: Any
) -> Intent:
    """A live restore's stream record into ``target`` whose server's directory is ``home``
    (its pid not recorded yet), written by ``writer``; ``fields`` override the rest."""
    chains = _journal.DeviceChains(
        before=("drv0", "bclr-1"),
        after=("drv0",),
        files_before=(str(target), f"nbd+unix:///?socket={socket_in(home)}"),
        files_after=(str(target),),
    )
    defaults: dict[str, Any] = {
        "id": "stream-1",
        "kind": OpKind.STREAM,
        "vm": "lost",
        "devices": {"disk0": chains},
        "pid": writer.pid,
        "pid_start": _proc.process_start(writer.pid),
        "server": ServerRecord(pid=0, pid_start=None, home=str(home)),
    }
    return Intent(**{**defaults, **fields})


async def recovered_after(
    run_dir: Path, writer: subprocess.Popen[bytes], intent: Intent
) -> Recovery:
    """``intent`` on disk, its writer killed, then ``recover`` of the VM: its one result."""
    _journal.write(run_dir, intent)
    writer.kill()
    writer.wait()
    report = await recover_vm("lost")
    (result,) = report.operations
    return result


async def test_a_server_stopped_as_it_forks_leaves_no_child_behind(
    run_dir: Path, writer: subprocess.Popen[bytes]
) -> None:
    """A server with no pid file yet, that on SIGTERM starts another process serving the
    same socket and exits (as nbdkit stopped while it forks into the background leaves its
    child): ``recover`` searches again once it stopped what it found, and stops the child
    too; nothing serves the socket afterwards."""
    home = run_dir / "nbd-1"
    parent = forking_server(home, run_dir / "handler-set")
    intent = served_stream(writer, run_dir / "t.qcow2", home, devices={})
    try:
        result = await recovered_after(run_dir, writer, intent)
        (said,) = [d for d in result.done if "server" in d]
        stopped = [int(p) for p in said.partition("(pid ")[2].rstrip(")").split(", ")]
        assert stopped[0] == parent and len(stopped) == 2, said
        assert servers_in(home) == []
    finally:
        for pid in [*servers_in(home), (parent, 0)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid[0], signal.SIGKILL)


async def test_qemu_gone_after_a_recover_killed_inside_a_server_replacement_stops_both(
    run_dir: Path, writer: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """A recover killed while it put a new server in place of a dead one, then QEMU gone:
    the next recover stops the new server too (nothing reads through it any more)."""
    old_home, new_home = run_dir / "nbd-1", run_dir / "nbd-2"
    old_home.mkdir()
    server = fake_server(new_home)
    started = _proc.process_start(server)
    intent = served_stream(
        writer,
        tmp_path / "t.qcow2",
        old_home,
        step=Step.STARTING,
        replacement=ServerRecord(pid=server, pid_start=started, home=str(new_home)),
        replacement_base="bclr-2",
    )
    try:
        result = await recovered_after(run_dir, writer, intent)
        assert result.verdict is Verdict.QEMU_GONE, result
        assert f"stopped the backup's server (pid {server})" in result.done, result.done
        assert not _proc.process_alive(server, started)
        assert not new_home.exists() and not old_home.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


@pytest.mark.parametrize(
    ("made", "pidfile"), [(False, True), (True, True), (False, False)], ids=str
)
async def test_a_launch_killed_before_its_record_named_the_servers_pid_is_recovered(
    run_dir: Path, writer: subprocess.Popen[bytes], tmp_path: Path, made: bool, pidfile: bool
) -> None:
    """The copy's record is written before the server starts, naming its directory (pid 0)
    and the files the launch makes: killed once the server listens (before its pid was
    recorded, the files ``made`` or not), or before the server wrote its pid file
    (``pidfile`` False), ``recover`` of the name finds the server (by its pid file, or its
    command line), stops it, removes its directory and the files."""
    target = tmp_path / "t.qcow2"
    if made:
        target.write_bytes(b"new")
    home = run_dir / "nbd-1"
    server = fake_server(home, pidfile=pidfile)
    started = _proc.process_start(server)
    intent = served_stream(writer, target, home, created_files=(str(target),))
    try:
        result = await recovered_after(run_dir, writer, intent)
        assert result.verdict is Verdict.QEMU_GONE, result
        assert f"stopped the backup's server (pid {server})" in result.done, result.done
        assert not _proc.process_alive(server, started)
        assert not target.exists() and not home.exists()
        assert _make_run_dir("lost") == run_dir and not list(run_dir.iterdir())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
