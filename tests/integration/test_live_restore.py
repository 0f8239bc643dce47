"""Live restore, first slice (issue 18): the NBD server of a backup point (nbdkit with
blockctl's Python plugin) read with libnbd, and a point restored into a running guest that
reads and writes the disk while it is copied underneath."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import nbd
import pytest
from structlog.testing import capture_logs

from blockctl import VM as Machine
from blockctl import GuestImage, LaunchedVM, _journal, _proc, backup, open_vm
from blockctl import attach as attach_vm
from blockctl._backup import live, serve
from blockctl._backup.serve import serve_point
from blockctl._backup.store import Repository
from blockctl._jobs import JobControl, JobProgress, JobStatus, JobTransition
from blockctl._journal import Intent, OpKind, Step, Verdict
from blockctl._machine import launch_detached, shutdown_detached
from blockctl._ops import drives, recovery
from blockctl._ops.vm_recovery import recover_vm
from blockctl._qmp import wire
from blockctl._runtime import read_record
from blockctl.errors import (
    BackupCorrupt,
    BlockctlError,
    CommandFailed,
    ConnectionLost,
    JobFailed,
    OperationTimeout,
    ProcessFailed,
    RepositoryBusy,
)
from blockctl.types import ImageFormat, MachineConfig
from tests.conftest import missing
from tests.integration.conftest import (
    MIB,
    pids_under,
    qcow2_image,
    run,
    running,
    sha256,
    truth_check,
)
from tests.integration.test_backup import config, disk_sha, sh, write
from tests.integration.test_hotplug import wait_block
from tests.unit.test_repository_store import CHUNK, POINTS, SECRET, VM, commit, index_of

ROOT = Path(__file__).parents[2]
PIECES = (os.urandom(CHUNK), bytes(CHUNK), os.urandom(CHUNK), os.urandom(1000))
DISK = b"".join(PIECES)


@pytest.fixture(autouse=True)
def nbdkit() -> None:
    if shutil.which("nbdkit") is None:
        missing("nbdkit (apt-get install nbdkit nbdkit-plugin-python)")


def point_repo(root: Path, encrypted: bool) -> Repository:
    repo = Repository.init(root / "repo", secret=SECRET if encrypted else None)
    commit(repo, POINTS[0], {"disk0": index_of(repo, *PIECES)})
    return repo


def connect(socket: Path) -> nbd.NBD:
    handle = nbd.NBD()
    handle.connect_unix(str(socket))
    return handle


# Section: the server


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_the_server_serves_the_point_and_is_reaped(tmp_path: Path, encrypted: bool) -> None:
    repo = point_repo(tmp_path, encrypted)
    async with serve_point(repo, VM, POINTS[0], "disk0", tmp_path, size=len(DISK)) as export:
        assert os.stat(export.socket).st_mode & 0o777 == 0o600
        assert os.stat(export.socket.parent).st_mode & 0o777 == 0o700
        handle = connect(export.socket)
        assert handle.get_size() == len(DISK)
        assert handle.is_read_only()
        assert handle.pread(len(DISK), 0) == DISK
        assert handle.pread(200, CHUNK - 100) == DISK[CHUNK - 100 : CHUNK + 100]
        assert handle.pread(CHUNK, CHUNK) == bytes(CHUNK)
        with pytest.raises(nbd.Error):
            handle.pwrite(b"x", 0)
        handle.shutdown()
    assert not running(export.pid)
    assert not export.socket.parent.exists()


async def test_a_damaged_chunk_is_eio_never_other_bytes(tmp_path: Path) -> None:
    repo = point_repo(tmp_path, encrypted=False)
    digest = repo.read_index(VM, POINTS[0], "disk0").at(2).hex()
    path = repo.path / "chunks" / digest[:2] / digest
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    async with serve_point(repo, VM, POINTS[0], "disk0", tmp_path, size=len(DISK)) as export:
        handle = connect(export.socket)
        with pytest.raises(nbd.Error) as caught:
            handle.pread(4096, 2 * CHUNK + 4096)
        assert caught.value.errno == "EIO"  # libnbd names it
        # The rest of the disk still reads.
        assert handle.pread(CHUNK, 0) == PIECES[0]
        handle.shutdown()
    assert not running(export.pid)


async def test_the_server_is_reaped_when_the_block_fails(tmp_path: Path) -> None:
    repo = point_repo(tmp_path, encrypted=False)
    pids: list[int] = []

    async def fail_while_serving() -> None:
        async with serve_point(repo, VM, POINTS[0], "disk0", tmp_path, size=len(DISK)) as export:
            pids.append(export.pid)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await fail_while_serving()
    assert pids and not running(pids[0])
    assert not list(tmp_path.glob("nbd-*"))


async def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    repo = point_repo(tmp_path, encrypted=False)
    with pytest.raises(ProcessFailed, match="disk9"):
        async with serve_point(repo, VM, POINTS[0], "disk9", tmp_path, size=len(DISK)):
            pass
    assert not list(tmp_path.glob("nbd-*"))


async def test_a_server_holds_the_repository_lock_by_itself_until_it_stops(tmp_path: Path) -> None:
    """A point's NBD server holds the repository's lock shared for as long as it runs, by
    itself: a detached one left running (as a killed controller leaves it), the point
    deleted meanwhile (a prune), a garbage collection is refused, naming the server and the
    way out, and removes no chunk; the server still serves them. The lock this process took
    and released beside it (the controller's) changes nothing. Once the server stops, the
    collection removes them."""
    repo = point_repo(tmp_path, encrypted=False)
    home = tmp_path / "home"
    home.mkdir()
    chunks = tree_digest(repo.path / "chunks")
    assert chunks
    async with serve_point(
        repo, VM, POINTS[0], "disk0", home, size=len(DISK), detached=True, into="lrx"
    ) as export:
        with repo.lock(exclusive=False):  # the controller's own, as a live restore holds it
            export.keep_running = True
    try:
        assert running(export.pid)
        repo.delete_point(VM, POINTS[0])
        with pytest.raises(RepositoryBusy) as refused:
            repo.gc()
        assert f"pid {export.pid} (a live restore into the VM lrx)" in str(refused.value)
        assert "`blockctl recover lrx` first" in str(refused.value)
        assert tree_digest(repo.path / "chunks") == chunks
        handle = connect(export.socket)
        assert sha256(handle.pread(len(DISK), 0)) == sha256(DISK)
        handle.shutdown()
    finally:
        await _proc.stop_recorded(export.pid, _proc.process_start(export.pid), grace=5.0)
        shutil.rmtree(export.home)
    assert repo.gc().chunks_removed == len(chunks)
    assert tree_digest(repo.path / "chunks") == {}


async def prune_cli(repo: Repository, *options: str) -> str:
    """``blockctl backup prune`` of the test VM keeping one point, in another process."""
    prune = ("backup", "prune", VM, "--keep", "1", "--repo", str(repo.path))
    result = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *prune, *options],
        check=False,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_prune_keeps_the_point_a_server_serves_until_it_stops(tmp_path: Path) -> None:
    """A prune keeping one point of two, while a detached server (a live restore's, its
    controller gone) serves the older: the point is kept, reported with the server, the
    restore's VM and the way out (library, ``--json`` and text), nothing of it is deleted
    (its manifest, index and chunks, so a recovery could start a replacement server) and the
    server still serves it. Once the server stops, a prune deletes it and collects its
    chunks."""
    repo = point_repo(tmp_path, encrypted=False)
    newer = (os.urandom(CHUNK), os.urandom(CHUNK))
    commit(repo, POINTS[1], {"disk0": index_of(repo, *newer)}, n=100)
    older_files = tree_digest(repo.path / "points" / VM / POINTS[0])
    chunks = tree_digest(repo.path / "chunks")
    home = tmp_path / "home"
    home.mkdir()
    async with serve_point(
        repo, VM, POINTS[0], "disk0", home, size=len(DISK), detached=True, into="lrx"
    ) as export:
        export.keep_running = True
    try:
        pruned = await backup.prune(repo, VM, keep_last=1)
        way_out = "let the restore finish, or `blockctl recover lrx`"
        assert pruned.deleted == ()
        assert pruned.kept == POINTS[:2]
        [served] = pruned.served
        assert (served.point, served.pid, served.into) == (POINTS[0], export.pid, "lrx")
        assert f"the live restore into the VM lrx (pid {export.pid})" in served.reason
        assert way_out in served.reason
        assert pruned.gc_skipped is None  # nothing deleted: nothing to collect
        as_json = json.loads(await prune_cli(repo, "--json"))
        assert as_json["deleted"] == [] and as_json["kept"] == list(POINTS[:2])
        assert as_json["served"] == [
            {"point": POINTS[0], "pid": export.pid, "into": "lrx", "reason": served.reason}
        ]
        text = await prune_cli(repo)
        assert f"kept {POINTS[0]}: served by the live restore into the VM lrx" in text
        assert way_out in text
        assert [m.id for m in repo.manifests(VM)] == list(POINTS[:2])
        assert tree_digest(repo.path / "points" / VM / POINTS[0]) == older_files
        assert tree_digest(repo.path / "chunks") == chunks
        handle = connect(export.socket)
        assert sha256(handle.pread(len(DISK), 0)) == sha256(DISK)
        handle.shutdown()
    finally:
        await _proc.stop_recorded(export.pid, _proc.process_start(export.pid), grace=5.0)
        shutil.rmtree(export.home)
    pruned = await backup.prune(repo, VM, keep_last=1)
    assert (pruned.deleted, pruned.kept, pruned.served) == ((POINTS[0],), (POINTS[1],), ())
    assert not (repo.path / "points" / VM / POINTS[0]).exists()
    # The older point's data chunks (PIECES[0], [2], [3]) are collected; the newer's stay.
    assert pruned.chunks_removed == 3
    assert len(tree_digest(repo.path / "chunks")) == len(chunks) - 3


async def test_a_server_does_not_start_on_a_point_a_prune_is_deleting(tmp_path: Path) -> None:
    """A server started on a point a prune is deleting (its manifest gone first, its index
    not yet: the server waited for the prune's lock on the point) does not start, and says
    the point is gone: it would serve a point no recovery can serve again."""
    repo = point_repo(tmp_path, encrypted=False)
    (repo.path / "points" / VM / POINTS[0] / "manifest.json").unlink()
    with pytest.raises(ProcessFailed, match="no complete backup"):
        async with serve_point(repo, VM, POINTS[0], "disk0", tmp_path, size=len(DISK)):
            pass


async def test_a_server_started_while_a_gc_runs_waits_for_it(tmp_path: Path) -> None:
    """While a garbage collection holds the repository (exclusively), a new server waits
    before it listens (its log says why), then serves once the collection is done."""
    repo = point_repo(tmp_path, encrypted=False)
    served = anyio.Event()

    async def serve() -> None:
        async with serve_point(repo, VM, POINTS[0], "disk0", tmp_path, size=len(DISK)) as export:
            served.set()
            handle = connect(export.socket)
            assert sha256(handle.pread(len(DISK), 0)) == sha256(DISK)
            handle.shutdown()

    def says_it_waits() -> bool:
        return any(
            "waiting for the repository's garbage collection" in log.read_text()
            for log in tmp_path.glob("nbd-*/nbdkit.log")
        )

    with anyio.fail_after(60):  # a guard against a hang, not a timed assertion
        async with anyio.create_task_group() as tg:
            with repo.lock(exclusive=True):  # a collection's
                tg.start_soon(serve)
                for _ in range(1200):
                    if says_it_waits() or served.is_set():
                        break
                    await anyio.sleep(0.05)
                assert says_it_waits() and not served.is_set()
    assert served.is_set()


#: A stand-in for nbdkit 1.32 forking into the background, as far as the launcher goes: the
#: launcher (the process started) and the server share a quit pipe; the launcher's SIGTERM
#: handler writes to it; the launcher exits by itself a moment after the server is ready. The
#: server answers each connection with whether the pipe is readable (real nbdkit then spins and
#: never accepts: a blockdev-add of it hangs).
FAKE_NBDKIT = """\
import os, select, signal, socket, sys, time
args = sys.argv[1:]
path = args[args.index("--unix") + 1]
ready = int(next(a for a in args if a.startswith("readyfd=")).split("=")[1])
quit_r, quit_w = os.pipe()
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen()
if os.fork() == 0:
    os.setsid()
    os.write(ready, b"1%d\\n" % os.getpid())
    os.close(ready)
    while True:
        conn, _ = listener.accept()
        readable = select.select([quit_r], [], [], 0)[0]
        conn.sendall(b"quit" if readable else b"ok")
        conn.close()
os.close(ready)
signal.signal(signal.SIGTERM, lambda *_: (os.write(quit_w, b"x"), os._exit(0)))
time.sleep(2)
"""


async def test_a_detached_server_is_never_told_to_quit_by_its_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher of a detached server is reaped, not sent SIGTERM: that once left the
    server spinning on its quit pipe, never accepting QEMU (the live restore's hang)."""
    fake = tmp_path / "fake-nbdkit"
    fake.write_text(f"#!{sys.executable}\n{FAKE_NBDKIT}")
    fake.chmod(0o700)
    monkeypatch.setattr(serve, "NBDKIT", str(fake))
    repo = point_repo(tmp_path, encrypted=False)
    home = tmp_path / "home"
    home.mkdir()
    async with serve_point(
        repo, VM, POINTS[0], "disk0", home, size=len(DISK), detached=True
    ) as export:
        client = await anyio.connect_unix(export.socket)
        said = await client.receive()
        await client.aclose()
        assert said == b"ok"
    assert not running(export.pid)


# Section: live restore into a running guest


class StreamWatch:
    """A job hook: the stream's id, once it runs."""

    def __init__(self) -> None:
        self.running = anyio.Event()
        self.job_id: str | None = None

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.RUNNING and self.job_id is None:
            self.job_id = transition.job_id
            self.running.set()

    def on_progress(self, progress: JobProgress) -> None:
        pass


async def node_names(vm: Machine) -> set[str]:
    return {n.node_name for n in await vm.block_nodes()}


#: What the guest writes into the new disk during the stream: (offset KiB, KiB, byte):
#: inside the data, across a chunk boundary, and where the point has zeros (bytes that are
#: letters: W, X, Y).
GUEST_WRITES = ((1024, 128, 0x57), (4032, 128, 0x58), (12288, 64, 0x59))


async def guest_fill(vm: LaunchedVM, dev: str, offset_kib: int, kib: int, byte: int) -> None:
    await sh(vm, fill(dev, offset_kib, kib, byte))


#: 1 MiB of the disk at 8 MiB (data in the point, beyond the stream's first request).
READ_8MIB = "dd if=/dev/{dev} bs=1M skip=8 count=1 iflag=direct 2>/dev/null"
#: Starts that read of the new disk in the background; ends once the read is in flight at
#: the device (/sys/block/vdb/inflight: reads, writes).
OUTAGE_READ = (
    f"rm -f /tmp/outage.*; ({READ_8MIB.format(dev='vdb')} > /tmp/outage.out; "
    "echo $? > /tmp/outage.rc) >/dev/null 2>&1 & "
    "for i in $(seq 400); do read r w < /sys/block/vdb/inflight; [ $r -gt 0 ] && exit 0; "
    "sleep 0.05; done; exit 1"
)
#: Waits for that read to end: its exit status, then the sha256 of what it read.
OUTAGE_READ_DONE = (
    "for i in $(seq 600); do [ -s /tmp/outage.rc ] && break; sleep 0.05; done; "
    "cat /tmp/outage.rc; sha256sum < /tmp/outage.out"
)


def kill_server(pid: int) -> list[str]:
    """SIGKILL a live restore's server; returns its argv, once it is gone."""
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [])  # readable once it has exited
    finally:
        os.close(pidfd)
    return argv


async def restart_server(argv: list[str], home: Path) -> tuple[int, int | None]:
    """Start a killed server's ``argv`` again on the same socket (a new ready pipe); returns
    the new server's pid and start time once it listens. The caller stops it."""
    os.unlink(argv[argv.index("--unix") + 1])  # left by the dead server: nbdkit won't bind
    ready_r, ready_w = os.pipe()
    argv = [f"readyfd={ready_w}" if a.startswith("readyfd=") else a for a in argv]
    try:
        with open(home / "restarted.log", "wb") as log:
            launcher = await _proc.spawn(argv, log=log, pass_fds=[ready_w], die_with_parent=False)
        os.close(ready_w)
        ready_w = -1
        await anyio.wait_readable(ready_r)
        said = os.read(ready_r, 32)
        await _proc.reap(launcher, grace=30.0)
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    assert said.startswith(b"1"), (home / "restarted.log").read_text()
    return int(said[1:]), _proc.process_start(int(said[1:]))


@pytest.mark.guest
async def test_live_restore_while_the_guest_reads_and_writes(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    repo = backup.init_repository(tmp_path / "repo", chunk_size=256 * 1024)
    disk = await qcow2_image(images / "d0.qcow2", b"", 16 * MIB)
    target = images / "live.qcow2"
    watch = StreamWatch()
    restarted: list[tuple[int, int | None]] = []  # the server started again (the outage)
    try:
        async with open_vm(config(guest, "lr", disk)) as vm:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            await write(vm, "vda", 0, 4096)
            await write(vm, "vda", 8192, 1024)
            point = await backup.create(vm, repo)
            at_point = await disk_sha(vm, "vda")
            at_8mib = (await sh(vm, f"{READ_8MIB.format(dev='vda')} | sha256sum")).split()[0]
            before = await node_names(vm)
            results: list[live.LiveRestoreResult] = []

            async def restore() -> None:
                # 1 byte/s: the stream copies at most one request, then waits for the speed
                # change below; so everything the guest does meanwhile is during the stream.
                results.append(
                    await backup.restore_live(
                        vm,
                        repo,
                        "lr",
                        point.id,
                        "disk0",
                        target,
                        control=JobControl(speed=1, hooks=(watch,)),
                    )
                )

            with capture_logs() as logs:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(restore)
                    await watch.running.wait()
                    assert watch.job_id is not None
                    await sh(
                        vm, "for i in $(seq 200); do [ -b /dev/vdb ] && break; sleep 0.1; done"
                    )
                    # A server outage shorter than reconnect-delay: the server killed, a guest
                    # read of blocks not copied yet sent and seen in flight at the device (it
                    # cannot complete while the server is dead), the same server started again
                    # on the same socket: the read completes with the point's bytes.
                    (old,) = [
                        e["pid"] for e in logs if e["event"] == "blockctl.backup.export_started"
                    ]
                    argv = kill_server(old)
                    await sh(vm, OUTAGE_READ)
                    restarted.append(await restart_server(argv, tmp_path))
                    assert (await sh(vm, OUTAGE_READ_DONE)).split()[:2] == ["0", at_8mib]
                    # The guest reads the whole disk through the backup (copy-on-read) ...
                    assert await disk_sha(vm, "vdb") == at_point
                    # ... and writes to it.
                    for offset, kib, byte in GUEST_WRITES:
                        await guest_fill(vm, "vdb", offset, kib, byte)
                    during = await disk_sha(vm, "vdb")
                    jobs = await wire.query_jobs(vm.session)
                    assert [j.id for j in jobs] == [watch.job_id]
                    assert any(n.startswith("bclr-") for n in await node_names(vm))
                    await vm.command("block-job-set-speed", {"device": watch.job_id, "speed": 0})
            (result,) = results
            assert result.device_id in {d.device_id for d in await vm.block_devices()}
            # After the stream: the guest's writes are there, the backup is not.
            assert await disk_sha(vm, "vdb") == during
            after = await node_names(vm)
            assert not [n for n in after if n.startswith("bclr-")]
            record = vm.registry.drives[result.device_id]
            assert after == before | set(record.node_names)
            assert await wire.query_jobs(vm.session) == ()
    finally:
        for pid, start in restarted:
            await _proc.stop_recorded(pid, start, grace=5.0)
    (started,) = [e for e in logs if e["event"] == "blockctl.backup.export_started"]
    assert not running(started["pid"])
    info = json.loads(await run("qemu-img", "info", "--output=json", "-f", "qcow2", target))
    assert "backing-filename" not in info
    # The reference, built without live restore: the point restored plainly, then the
    # guest's writes applied offline at the same offsets.
    reference = images / "reference.raw"
    await backup.restore(repo, "lr", point.id, "disk0", reference, ImageFormat.RAW)
    for offset, kib, byte in GUEST_WRITES:
        await run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            f"write -P {byte} {offset * 1024} {kib * 1024}",
            reference,
        )
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", target, reference)
    assert sha256(reference.read_bytes()) == during


@pytest.mark.guest
async def test_a_failure_before_the_stream_leaves_nothing(
    guest: GuestImage, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        repo = backup.init_repository(tmp_path / "repo")
        disk = await qcow2_image(images / "d0.qcow2", b"", 8 * MIB)
        target = images / "live.qcow2"
        async with open_vm(config(guest, "lrf", disk)) as vm:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            await write(vm, "vda", 0, 1024)
            point = await backup.create(vm, repo)
            before_nodes = await node_names(vm)
            before_devices = {d.device_id for d in await vm.block_devices()}

            # Refused at device_add (the nodes are in: hotplug's rollback), then at block-stream
            # (the device is in: unplugged again).
            for command in ("device_add", "block_stream"):

                async def refused(*args: object, command: str = command, **kwargs: object) -> None:
                    raise CommandFailed(command, "GenericError", "injected")

                with monkeypatch.context() as patch:
                    patch.setattr(wire, command, refused)
                    with capture_logs() as logs, pytest.raises(CommandFailed, match="injected"):
                        await backup.restore_live(vm, repo, "lrf", point.id, "disk0", target)
                assert await node_names(vm) == before_nodes
                assert {d.device_id for d in await vm.block_devices()} == before_devices
                assert set(vm.registry.drives) == {"disk0"}
                assert not target.exists()
                (started,) = [e for e in logs if e["event"] == "blockctl.backup.export_started"]
                assert not running(started["pid"])
                assert not list(vm.run_dir.glob("nbd-*"))
            # A point with a missing chunk is refused before anything is started.
            digest = next(iter(repo.read_index("lrf", point.id, "disk0").referenced())).hex()
            (repo.path / "chunks" / digest[:2] / digest).unlink()
            with capture_logs() as logs, pytest.raises(BackupCorrupt, match="missing"):
                await backup.restore_live(vm, repo, "lrf", point.id, "disk0", target)
            assert not [e for e in logs if e["event"] == "blockctl.backup.export_started"]
            assert not target.exists()
    finally:
        # Whatever the code under test left (a mutant of the promise ledger keeps the server
        # running by design): no nbdkit of this test outlives it.
        for pid in nbdkit_pids_under(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def nbdkit_pids_under(directory: Path) -> list[int]:
    """nbdkit processes whose command line mentions ``directory`` (their socket is there)."""
    return pids_under(directory, lambda cmdline: cmdline.startswith(b"nbdkit\0"))


@pytest.mark.guest
async def test_cli_restore_live(runtime_dir: Path, tmp_path: Path) -> None:
    from tests.integration.test_attach_cli import cli

    repo = tmp_path / "repo"
    await cli("backup", "init", "--repo", repo)
    await cli("up", "--name", "lcli", "--strict")
    try:
        point = json.loads((await cli("backup", "create", "lcli", "--repo", repo, "--json")).stdout)
        live_image = tmp_path / "live.qcow2"
        restored = json.loads(
            (
                await cli(
                    "restore",
                    "lcli",
                    point["id"],
                    "disk0",
                    live_image,
                    "--repo",
                    repo,
                    "--attach",
                    "lcli",
                    "--live",
                    "--json",
                )
            ).stdout
        )
        assert restored["live"] is True and restored["attached"] == "disk1"
        assert restored["seconds_to_attach"] <= restored["seconds"]
        drives_now = json.loads((await cli("drives", "lcli", "--json")).stdout)
        assert [d["file"] for d in drives_now][-1] == str(live_image)
        # One layer: the backup's nodes are gone.
        assert [n["filename"] for n in drives_now[-1]["chain"]] == [str(live_image)]
        assert nbdkit_pids_under(runtime_dir) == []
    finally:
        await cli("down", "lcli")
    info = json.loads(await run("qemu-img", "info", "--output=json", "-f", "qcow2", live_image))
    assert "backing-filename" not in info
    plain = tmp_path / "plain.raw"
    await cli("restore", "lcli", point["id"], "disk0", plain, "--repo", repo, "-O", "raw")
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", live_image, plain)


@pytest.mark.guest
async def test_a_copy_that_does_not_finish_keeps_the_server_and_recover_finishes_it(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Past the start of the stream the guest may have written to the disk: it is not taken
    away. The copy stops (a missed deadline here); the server stays, so the guest still reads
    every block, the warning says how to finish, and ``recover`` copies the rest, deletes the
    backup nodes and stops the server."""
    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "d0.qcow2", b"", 8 * MIB)
    target = images / "live.qcow2"
    async with open_vm(config(guest, "lrs", disk)) as vm:
        assert vm.run_dir is not None
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 1024)
        point = await backup.create(vm, repo)
        want = await disk_sha(vm, "vda", 8)
        with capture_logs() as logs, pytest.raises(OperationTimeout):
            await backup.restore_live(
                vm,
                repo,
                "lrs",
                point.id,
                "disk0",
                target,
                control=JobControl(speed=1, deadline=1.0),
            )
        (left,) = [e for e in logs if e["event"] == "blockctl.backup.live_unfinished"]
        device = left["device"]
        assert device in {d.device_id for d in await vm.block_devices()}
        assert "blockctl recover lrs" in left["reason"]
        assert nbdkit_pids_under(vm.run_dir) == [left["server"]]
        (record,) = list(vm.run_dir.glob("journal-*.json"))
        assert json.loads(record.read_text())["server"]["pid"] == left["server"]
        # The guest still reads the whole disk (through the server).
        await wait_block(vm, "vdb")
        assert await disk_sha(vm, "vdb", 8) == want
        (done,) = await recovery.reconcile(vm)
        assert done.verdict is Verdict.FINISHED, done.message
        assert any(d.startswith("stopped the backup's server") for d in done.done), done.done
        assert nbdkit_pids_under(vm.run_dir) == []
        assert not list(vm.run_dir.glob("journal-*.json"))
        assert not {n for n in await node_names(vm) if n.startswith("bclr")}
        (drive,) = [d for d in await drives.list_drives(vm) if d.device_id == device]
        assert [n.node_name for n in drive.chain] == [drive.top_node]
        assert await disk_sha(vm, "vdb", 8) == want
        await truth_check(vm)
    info = json.loads(await run("qemu-img", "info", "--output=json", "-f", "qcow2", target))
    assert "backing-filename" not in info
    plain = tmp_path / "plain.raw"
    await backup.restore(repo, "lrs", point.id, "disk0", plain, ImageFormat.RAW)
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", target, plain)


# Section: kill points (a qcow2 target; the VM outlives its controllers: `blockctl up`)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → sha256 of its bytes)."""
    return {
        str(p.relative_to(root)): sha256(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def fill(dev: str, offset_kib: int, kib: int, byte: int) -> str:
    """The guest command writing ``kib`` KiB of ``byte`` at ``offset_kib``, flushed, in whole
    64 KiB writes (``fullblock``: a pipe gives dd short reads, and a short write into a
    qcow2 cluster not allocated yet reads the rest of the cluster from the backing)."""
    return (
        f"dd if=/dev/zero bs=64k count={kib // 64} 2>/dev/null | tr '\\000' {chr(byte)} | "
        f"dd of=/dev/{dev} bs=64k seek={offset_kib // 64} iflag=fullblock oflag=direct "
        "conv=fsync,notrunc 2>/dev/null"
    )


def read_sha(dev: str, mib: int) -> str:
    return f"dd if=/dev/{dev} bs=1M count={mib} iflag=direct 2>/dev/null | sha256sum"


WAIT_VDB = "for i in $(seq 200); do test -b /dev/vdb && exit 0; sleep 0.1; done; exit 1"


#: Where the server and QEMU kill points fall in the copy: ``start`` at the record's
#: ``starting`` write (the disk attached and serving, the stream about to be sent), ``mid``
#: while the stream runs at 1 B/s after the guest wrote, ``end`` at its ``concluded`` write
#: (the copy done, offset == length; the backup nodes and the server not yet removed).
KILL_POINTS = ("start", "mid", "end")
KILL_STEPS = {"start": Step.STARTING, "end": Step.CONCLUDED}


#: A raw target's disk: larger than what a mirror copies in one request (its buffer, 16 MiB),
#: so at 1 B/s it is mid-copy (one request done, then waiting) until the speed changes.
RAW_DISK_MIB = 64
#: A raw target's guest writes: :data:`GUEST_WRITES` (inside the mirror's first request: each
#: must reach the target through the write-blocking mirror) and one far beyond it (not
#: copied yet while the mirror waits).
RAW_WRITES = (*GUEST_WRITES, (40960, 128, 0x5A))


@dataclass(frozen=True, slots=True)
class LiveTarget:
    """What differs between a qcow2 target (``block-stream``) and a raw one (an overlay
    mirrored into a raw file) in the kill-point tests."""

    format: ImageFormat
    mib: int  # the disk's size
    writes: tuple[tuple[int, int, int], ...]  # the guest's, during the copy
    device: bool = False  # an existing block device (raw only), not a new file

    @property
    def raw(self) -> bool:
        return self.format is ImageFormat.RAW

    @property
    def kind(self) -> OpKind:
        return OpKind.MIRROR if self.raw else OpKind.STREAM

    @property
    def crash_kind(self) -> str:  # tests/integration/crash_child.py's
        return "live-raw" if self.raw else "live"

    def overlays(self, images: Path, run_dir: Path) -> list[Path]:
        """A raw target's temporary overlays: next to a file; for a block device, in the
        runtime root's ``_live-overlays``."""
        return device_overlays(run_dir) if self.device else overlays(images)


LIVE_TARGETS = {
    "qcow2": LiveTarget(ImageFormat.QCOW2, 16, GUEST_WRITES),
    "raw": LiveTarget(ImageFormat.RAW, RAW_DISK_MIB, RAW_WRITES),
    "device": LiveTarget(ImageFormat.RAW, RAW_DISK_MIB, RAW_WRITES, device=True),
}
#: The file targets every kill point runs with (a block device: one kill point).
FILE_TARGETS = ["qcow2", "raw"]


def overlays(directory: Path) -> list[Path]:
    """The temporary overlays of raw targets in ``directory``."""
    return list(directory.glob("*live-overlay*"))


def device_overlays(run_dir: Path) -> list[Path]:
    """The temporary overlays of block-device and LUN targets: in the runtime root's
    ``_live-overlays``, not in the VM's run directory (which goes with the VM)."""
    return overlays(run_dir.parent / "_live-overlays")


async def target_path(
    live_target: LiveTarget, images: Path, loop_devices: Callable[[Path], Awaitable[Path]]
) -> Path:
    """Where a live restore writes: a new file in ``images``, or a loop device on a sparse
    file there 1 MiB larger than the disk (the target's raw node is cut to the disk's
    size)."""
    if not live_target.device:
        return images / f"live.{live_target.format.value}"
    backing = images / "loop.img"
    with open(backing, "wb") as file:
        file.truncate((live_target.mib + 1) * MIB)
    return await loop_devices(backing)


def kill_at(
    monkeypatch: pytest.MonkeyPatch,
    at: str,
    pid_of: Callable[[Intent], int],
    kind: OpKind = OpKind.STREAM,
) -> None:
    """SIGKILL ``pid_of(record)`` right after this process writes the live restore's record
    (of ``kind``) at ``at``'s step (the journal's failpoint: exact, never a race); ``mid`` is
    the test's."""
    if at not in KILL_STEPS:
        return
    killed: list[int] = []

    def failpoint(intent: Intent) -> None:
        if intent.kind is kind and intent.step is KILL_STEPS[at] and not killed:
            killed.append(pid_of(intent))
            os.kill(killed[0], signal.SIGKILL)

    monkeypatch.setattr(_journal, "FAILPOINT", failpoint)


async def reference(
    repo: Repository,
    vm_name: str,
    point: str,
    path: Path,
    writes: Sequence[tuple[int, int, int]] = GUEST_WRITES,
) -> Path:
    """Built without live restore: the point restored plainly, then ``writes`` (the guest's:
    offset KiB, KiB, byte) applied offline at the same offsets."""
    await backup.restore(repo, vm_name, point, "disk0", path, ImageFormat.RAW)
    for offset, kib, byte in writes:
        await run(
            "qemu-io", "-f", "raw", "-c", f"write -P {byte} {offset * 1024} {kib * 1024}", path
        )
    return path


async def standalone_equals(target: Path, want: Path, fmt: ImageFormat = ImageFormat.QCOW2) -> None:
    info = json.loads(await run("qemu-img", "info", "--output=json", "-f", fmt.value, target))
    assert "backing-filename" not in info
    await run("qemu-img", "compare", "-f", fmt.value, "-F", "raw", target, want)


@pytest.mark.guest
@pytest.mark.parametrize(
    ("step", "fmt"),
    [
        *((step, fmt) for fmt in FILE_TARGETS for step in ("starting", "running", "concluded")),
        ("running", "device"),
        *(("attached", fmt) for fmt in FILE_TARGETS),
    ],
)
async def test_a_controller_killed_during_the_copy_then_recover_finishes_with_every_guest_write(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    runtime_dir: Path,
    loop_devices: Callable[[Path], Awaitable[Path]],
    step: str,
    fmt: str,
) -> None:
    """kill -9 of the controller right after its record reaches ``step``: right after the
    hot-plug (``attached``: the record written before it, not yet rewritten from
    QEMU's graph), at the start (the copy about to be sent), mid-copy (it runs at 1 B/s:
    under way, far from done) or at the end (the copy done, the cleanup not). A qcow2
    target is streamed into; a raw one is mirrored into from an overlay (its end: the
    device pivoted); a raw one on a block device (a loop device) mid-copy only. The guest
    reads every block and writes; ``blockctl recover`` starts the copy again or adopts it,
    and cleans up: the disk stands alone, equal to the point plus the guest's writes; the repository
    unchanged, no server, no overlay, no node beyond the disk's, no record. Mid-copy, the
    point restored is pruned meanwhile (a newer one kept) by another process: the server
    holds the point, so the prune keeps it, naming the server and the way out, and changes
    nothing in the repository; a ``backup gc`` is refused naming the server; once
    ``recover`` is done, a prune deletes the point and collects the chunks only it had."""
    from tests.integration.test_attach_cli import cli
    from tests.integration.test_backup_faults import detached

    live_target = LIVE_TARGETS[fmt]
    mib = live_target.mib
    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "k0.qcow2", b"", mib * MIB)
    target = await target_path(live_target, images, loop_devices)
    run_dir = runtime_dir / "lrk"
    async with detached(guest, "lrk", disk) as console:
        await console.check(
            "dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct conv=fsync 2>/dev/null"
        )
        async with attach_vm("lrk") as vm:
            point = await backup.create(vm, repo)
            before = await node_names(vm)
        want = (await console.check(read_sha("vda", mib))).split()[0]
        want_file = await reference(repo, "lrk", point.id, tmp_path / "r.raw", live_target.writes)
        if prune := step == "running":
            # A newer point whose first chunk differs: a prune would delete the one
            # restored, and its garbage collection that chunk.
            await console.check(
                "dd if=/dev/urandom of=/dev/vda bs=64k count=1 oflag=direct conv=fsync 2>/dev/null"
            )
            async with attach_vm("lrk") as vm:
                newer = (await backup.create(vm, repo)).id
            kept = repo.read_index("lrk", newer, "disk0").referenced()
        hashes = tree_digest(repo.path)
        chunks = {k: v for k, v in hashes.items() if k.startswith("chunks/")}
        arguments = {
            "repo": str(repo.path),
            "point": point.id,
            "device": "disk0",
            "target": str(target),
            "speed": None if step == "concluded" else 1,
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "tests.integration.crash_child", "lrk"]
        killed = await anyio.run_process(
            [*argv, live_target.crash_kind, step, json.dumps(arguments)], check=False, env=env
        )
        assert killed.returncode == -9, killed.stderr.decode()
        (server,) = nbdkit_pids_under(run_dir)
        (record,) = list(run_dir.glob("journal-*.json"))
        written = json.loads(record.read_text())
        assert written["kind"] == live_target.kind.value and written["server"]["pid"] == server
        # Killed right after the hot-plug: its record is the one written before it.
        assert bool(written["hotplug_nodes"]) == (step == "attached"), written
        assert len(live_target.overlays(images, run_dir)) == live_target.raw
        if prune:
            # Another process prunes: the point restored stays (the server serves it; a
            # recovery replacing a dead server needs it), reported with the server and the
            # way out; a gc is refused (the server holds the repository's lock).
            pruned = json.loads(
                (
                    await cli(
                        "backup", "prune", "lrk", "--repo", repo.path, "--keep", "1", "--json"
                    )
                ).stdout
            )
            assert pruned["deleted"] == [] and pruned["kept"] == [point.id, newer], pruned
            (served,) = pruned["served"]
            assert (served["point"], served["pid"], served["into"]) == (point.id, server, "lrk")
            assert "`blockctl recover lrk`" in served["reason"], pruned
            refused = await cli("backup", "gc", "--repo", repo.path, check=False)
            held = f"pid {server} (a live restore into the VM lrk)"
            assert refused.returncode == 1 and held in refused.stderr, refused
            assert tree_digest(repo.path) == hashes
        # The controller is gone; the guest reads the new disk whole, through the server,
        # and writes to it.
        await console.check(WAIT_VDB)
        assert (await console.check(read_sha("vdb", mib))).split()[0] == want
        for write_ in live_target.writes:
            await console.check(fill("vdb", *write_))
        during = (await console.check(read_sha("vdb", mib))).split()[0]
        done = json.loads((await cli("recover", "lrk", "--json")).stdout)
        (result,) = [r for r in done["operations"] if r["kind"] == live_target.kind.value]
        assert result["verdict"] == "finished", result
        assert nbdkit_pids_under(run_dir) == [] and not running(server)
        assert not list(run_dir.glob("journal-*.json"))
        assert live_target.overlays(images, run_dir) == []
        listed = json.loads((await cli("drives", "lrk", "--json")).stdout)
        assert [n["filename"] for n in listed[-1]["chain"]] == [str(target)]
        assert (await console.check(read_sha("vdb", mib))).split()[0] == during
        async with attach_vm("lrk") as vm:
            assert await wire.query_jobs(vm.session) == ()
            (device,) = set(vm.registry.drives) - {"disk0"}
            assert await node_names(vm) == before | set(vm.registry.drives[device].node_names)
            await truth_check(vm)
    if prune:
        # The server gone, a prune deletes the point and collects the chunks only it had.
        collected = json.loads(
            (
                await cli("backup", "prune", "lrk", "--repo", repo.path, "--keep", "1", "--json")
            ).stdout
        )
        assert collected["deleted"] == [point.id] and collected["served"] == [], collected
        only_deleted = [k for k in chunks if bytes.fromhex(k.rsplit("/", 1)[1]) not in kept]
        assert only_deleted and collected["chunks_removed"] == len(only_deleted), collected
        hashes = {
            k: v
            for k, v in hashes.items()
            if not k.startswith(f"points/lrk/{point.id}/") and k not in only_deleted
        }
    assert tree_digest(repo.path) == hashes
    await standalone_equals(target, want_file, live_target.format)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
async def test_a_restore_killed_once_its_server_listens_then_recover_leaves_nothing(
    tmp_path: Path, runtime_dir: Path, fmt: str
) -> None:
    """kill -9 of the controller right after the backup's server listens (``served``:
    before the record names the server's pid, before the target (raw: and overlay) is made
    and the hot-plug planned), into a VM that runs its firmware only (the disk is never
    attached). The copy's record, written before the server started, names its directory
    and the files the restore makes: ``blockctl recover`` finds the server by the pid file
    nbdkit wrote there and stops it; no nbdkit, record, target or overlay is left, QEMU's
    nodes are as before and the repository is unchanged."""
    from tests.integration.test_attach_cli import cli

    repo = point_repo(tmp_path, encrypted=False)
    hashes = tree_digest(repo.path)
    target = tmp_path / f"live.{fmt}"
    kind = "mirror" if fmt == "raw" else "stream"
    run_dir = runtime_dir / VM  # the VM the point is of: crash_child restores its own
    await launch_detached(MachineConfig(name=VM, memory_mib=64))
    try:
        async with attach_vm(VM) as vm:
            before = await node_names(vm)
        arguments = {"repo": str(repo.path), "point": POINTS[0], "device": "disk0"}
        arguments["target"] = str(target)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        crash = "live-raw" if fmt == "raw" else "live"
        argv = [sys.executable, "-m", "tests.integration.crash_child", VM, crash, "served"]
        killed = await anyio.run_process([*argv, json.dumps(arguments)], check=False, env=env)
        assert killed.returncode == -9, killed.stderr.decode()
        (server,) = nbdkit_pids_under(run_dir)
        (record,) = list(run_dir.glob("journal-*.json"))
        written = json.loads(record.read_text())
        assert written["kind"] == kind and written["server"]["pid"] == 0, written
        assert written["devices"] == {} and str(target) in written["created_files"]
        done = json.loads((await cli("recover", VM, "--json")).stdout)
        (result,) = [r for r in done["operations"] if r["kind"] == kind]
        assert result["verdict"] == "not-done", result
        assert f"stopped the backup's server (pid {server})" in result["done"], result
        assert nbdkit_pids_under(runtime_dir) == [] and not running(server)
        assert not list(run_dir.glob("journal-*.json")) and not list(run_dir.glob("nbd-*"))
        assert not target.exists() and overlays(tmp_path) == []
        async with attach_vm(VM) as vm:
            assert await node_names(vm) == before
    finally:
        with anyio.CancelScope(shield=True):
            await shutdown_detached(VM)
    assert tree_digest(repo.path) == hashes


@pytest.mark.guest
@pytest.mark.parametrize("fmt", FILE_TARGETS)
@pytest.mark.parametrize("at", KILL_POINTS)
async def test_qemu_killed_during_the_copy_then_recover_says_how_to_finish_keeping_the_guest_writes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    runtime_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    at: str,
    fmt: str,
) -> None:
    """kill -9 of QEMU at the start of the copy (the stream or mirror about to be sent),
    mid-copy (the guest has read the disk and written to it) or at its end (the copy
    concluded, its cleanup not done; the guest wrote before; a raw target's device had
    pivoted): the controller raises ConnectionLost and stops the server; ``blockctl
    recover`` drops the record and says what the target holds and the commands that make it
    whole. Run as given, they give the point plus the guest's writes (none at the start: the
    guest died before it had the disk long), standalone; the repository is unchanged."""
    from tests.integration.test_attach_cli import cli
    from tests.integration.test_backup_faults import detached

    live_target = LIVE_TARGETS[fmt]
    mib = live_target.mib
    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "q0.qcow2", b"", mib * MIB)
    target = images / f"live.{live_target.format.value}"
    run_dir = runtime_dir / "lrq"
    watch = StreamWatch()
    raised: list[BaseException] = []
    writes = () if at == "start" else live_target.writes
    kill_at(monkeypatch, at, lambda _: read_record("lrq").pid, live_target.kind)
    async with detached(guest, "lrq", disk) as console:
        await console.check(
            "dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct conv=fsync 2>/dev/null"
        )
        async with attach_vm("lrq") as vm:
            point = await backup.create(vm, repo)
            hashes = tree_digest(repo.path)
            want = (await console.check(read_sha("vda", mib))).split()[0]

            async def restore() -> None:
                try:
                    await backup.restore_live(
                        vm,
                        repo,
                        "lrq",
                        point.id,
                        "disk0",
                        target,
                        control=JobControl(speed=1, hooks=(watch,)),
                        target_format=live_target.format,
                    )
                except BlockctlError as exc:
                    raised.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(restore)
                if at != "start":
                    await watch.running.wait()
                    await console.check(WAIT_VDB)
                    assert (await console.check(read_sha("vdb", mib))).split()[0] == want
                    for write_ in writes:
                        await console.check(fill("vdb", *write_))
                    if at == "mid":
                        os.kill(read_record("lrq").pid, signal.SIGKILL)
                    else:  # full speed: the copy ends, and QEMU with it (kill_at)
                        await vm.command(
                            "block-job-set-speed", {"device": watch.job_id, "speed": 0}
                        )
        (error,) = raised
        assert isinstance(error, ConnectionLost), repr(error)
        assert nbdkit_pids_under(run_dir) == []
        left = overlays(images)
        assert len(left) == live_target.raw
        done = json.loads((await cli("recover", "lrq", "--json")).stdout)
        (result,) = [r for r in done["operations"] if r["kind"] == live_target.kind.value]
        assert result["verdict"] == "qemu-gone", result
        assert result["step"] == {"start": "starting", "end": "concluded"}.get(at, "running")
        assert not list(run_dir.glob("journal-*.json"))
    # The device's top: the target, or a raw target's overlay until the pivot.
    top = left[0] if live_target.raw and at != "end" else target
    assert result["tops"] == {"disk1": str(top)}
    message = result["message"]
    pivoted = live_target.raw and at == "end"
    assert ("holds the whole disk" if pivoted else "holds the guest's writes") in message
    # The way on, run as the message gives it.
    steps = [] if pivoted else await follow_way_on(message)
    finish = "convert" if live_target.raw else "rebase"
    assert steps == (
        [] if pivoted else [["blockctl", "restore"], ["qemu-img", "rebase"], ["qemu-img", finish]]
    )
    # Then removed, as it says (a raw target's overlay; the base the commands restored).
    for path in (*left, *([Path(f"{top}.base.raw")] if steps else [])):
        assert str(path) in message and "remove" in message
        path.unlink()
    assert tree_digest(repo.path) == hashes
    want_file = await reference(repo, "lrq", point.id, tmp_path / "r.raw", writes)
    await standalone_equals(target, want_file, live_target.format)


async def follow_way_on(message: str) -> list[list[str]]:
    """Run the commands a recovery message gives after "To finish", as given (each
    `quoted`); returns each one's first two words."""
    from tests.integration.test_attach_cli import cli

    steps = re.findall(r"`([^`]+)`", message.split("To finish")[1])
    for step in steps:
        words = shlex.split(step)
        if words[0] == "blockctl":
            await cli(*words[1:])
        else:
            await run(*words)
    return [step.split()[:2] for step in steps]


async def killed_recover(vm: LaunchedVM, step: str) -> None:
    """``blockctl recover`` of ``vm`` in another process, SIGKILLed at ``step`` of its
    replacement of the live restore's dead server (tests/integration/crash_child.py). The
    record's writer (this process: its restore failed and left the record) is first named
    gone, as if the restore had run in a controller killed since: another process recovers
    only the records of writers that are gone."""
    assert vm.run_dir is not None
    (path,) = vm.run_dir.glob("journal-*.json")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "pid": None, "pid_start": None}))
    argv = [sys.executable, "-m", "tests.integration.crash_child", vm.name, "recover", step, "{}"]
    child = await anyio.run_process(argv, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]


def server_pid(intent: Intent) -> int:
    assert intent.server is not None
    return intent.server.pid


@pytest.mark.guest
async def test_a_raw_restore_given_up_leaves_no_node_of_its_target(
    guest: GuestImage, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live restore into a raw file whose server is killed mid-copy, its repository gone
    (moved away): ``recover`` cannot put in a new server and keeps the record, naming the
    way to give it up (detach the disk, then ``recover --forget``). Given up so: no node of
    the backup, the overlay or the raw target is left in QEMU (the target's nodes are in no
    drive's record until the pivot: the detach does not take them), no server, no record;
    the files left (the overlay with the guest's writes, the partly copied target) are
    named; the repository, moved back, unchanged; the guest goes on."""
    live_target = LIVE_TARGETS["raw"]
    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "g0.qcow2", b"", live_target.mib * MIB)
    target = images / "given-up.raw"
    watch = StreamWatch()
    monkeypatch.setattr(serve, "RECONNECT_DELAY", 2)
    async with open_vm(config(guest, "lrg", disk)) as vm:
        assert vm.run_dir is not None
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 1024)
        point = await backup.create(vm, repo)
        hashes = tree_digest(repo.path)
        raised: list[BaseException] = []

        async def restore() -> None:
            try:
                await backup.restore_live(
                    vm,
                    repo,
                    "lrg",
                    point.id,
                    "disk0",
                    target,
                    control=JobControl(speed=1, hooks=(watch,)),
                    target_format=ImageFormat.RAW,
                )
            except BlockctlError as exc:
                raised.append(exc)

        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(restore)
                await watch.running.wait()
                await sh(vm, WAIT_VDB)
                await guest_fill(vm, "vdb", 0, 64, 0x47)
                (server,) = nbdkit_pids_under(vm.run_dir)
                os.kill(server, signal.SIGKILL)
                await vm.command("block-job-set-speed", {"device": watch.job_id, "speed": 0})
        (error,) = raised
        assert isinstance(error, JobFailed), repr(error)
        (attached,) = [e for e in logs if e["event"] == "blockctl.backup.live_attached"]
        device = attached["device"]
        moved = tmp_path / "repo.away"
        repo.path.rename(moved)
        (kept,) = await recovery.reconcile(vm)
        assert kept.verdict is Verdict.ATTENTION and kept.kept, kept
        assert "blockctl detach" in kept.message and "--forget" in kept.message, kept.message
        target_nodes = {n for n in await node_names(vm) if n.endswith(("-target", "-target-file"))}
        assert target_nodes, await node_names(vm)
        assert (await drives.unplug(vm, device)).state is drives.UnplugState.REMOVED
        (given_up,) = await recovery.reconcile(vm, forget=True)
        assert not given_up.kept, given_up
        left = await node_names(vm)
        assert not {n for n in left if n.startswith("bclr") or n in target_nodes}, left
        assert not any(n.file == str(target) for n in await vm.block_nodes())
        assert nbdkit_pids_under(vm.run_dir) == []
        assert not list(vm.run_dir.glob("journal-*.json"))
        said = " ".join(given_up.done)
        assert str(target) in said and any(str(o) in said for o in overlays(images)), said
        assert (await sh(vm, "echo alive")).strip() == "alive"
        await truth_check(vm)
    moved.rename(repo.path)
    assert tree_digest(repo.path) == hashes


@pytest.mark.guest
@pytest.mark.parametrize(
    ("at", "fmt"), [*((at, fmt) for fmt in FILE_TARGETS for at in KILL_POINTS), ("mid", "device")]
)
async def test_a_server_killed_during_the_copy_then_recover_puts_in_a_new_one_and_finishes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    loop_devices: Callable[[Path], Awaitable[Path]],
    at: str,
    fmt: str,
) -> None:
    """kill -9 of the NBD server at the start of the copy (the stream or mirror about to be
    sent: its first read waits out the reconnect delay and fails), mid-copy after the guest
    wrote, or at its end (the copy concluded after the guest wrote; its cleanup not done).
    The guest writes whole clusters (nothing read from the backup). Start and mid: the copy
    fails on a read; ``recover`` starts a new server, puts new backup nodes on it under the
    target or a raw target's overlay (``blockdev-reopen``), copies again and finishes. End:
    nothing is read from the server any more; the controller's cleanup finishes (the dead
    server's nodes deleted, the server found gone) and leaves ``recover`` nothing. Each: the
    point plus the guest's writes, standalone; the repository unchanged, no server, no
    overlay, no record. A block device target (a loop device 1 MiB larger than the disk):
    mid-copy only. Mid-copy into qcow2, the repository is encrypted: a recovery without its
    key keeps the record (the key named as the way out) and changes nothing; with the
    repository opened with its key (``blockctl recover --repo --key-file``) it finishes."""
    live_target = LIVE_TARGETS[fmt]
    encrypted = at == "mid" and fmt == "qcow2"
    key_file = tmp_path / "key"
    key_file.write_bytes(SECRET)
    key_file.chmod(0o600)
    repo = backup.init_repository(tmp_path / "repo", key_file=key_file if encrypted else None)
    disk = await qcow2_image(images / "s0.qcow2", b"", live_target.mib * MIB)
    target = await target_path(live_target, images, loop_devices)
    watch = StreamWatch()
    raised: list[BaseException] = []
    returned = anyio.Event()
    # QEMU waits this long for the dead server before a read fails: 2 s instead of 10 (the
    # same path, 8 s less per case).
    monkeypatch.setattr(serve, "RECONNECT_DELAY", 2)
    kill_at(monkeypatch, at, server_pid, live_target.kind)
    async with open_vm(config(guest, "lrn", disk)) as vm:
        assert vm.run_dir is not None
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 1024)
        await write(vm, "vda", 8192, 1024)
        point = await backup.create(vm, repo)
        hashes = tree_digest(repo.path)

        async def restore() -> None:
            try:
                await backup.restore_live(
                    vm,
                    repo,
                    "lrn",
                    point.id,
                    "disk0",
                    target,
                    # At the start, no limit: the copy reads at once and fails (QEMU 10.0's
                    # mirror at 1 B/s was seen to sleep before its first read, never failing).
                    control=JobControl(speed=None if at == "start" else 1, hooks=(watch,)),
                    target_format=live_target.format,
                )
            except BlockctlError as exc:
                raised.append(exc)
            finally:
                returned.set()

        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(restore)
                await watch.running.wait()
                await sh(vm, WAIT_VDB)
                if at == "start" and live_target.raw:
                    # The guest writes once the mirror has failed: QEMU 10.0.2 aborted
                    # (glibc: "corrupted double-linked list") in 3 of 11 runs when the guest
                    # wrote while the write-blocking mirror waited on its dead source.
                    await returned.wait()
                for offset, kib, byte in live_target.writes:
                    await guest_fill(vm, "vdb", offset, kib, byte)
                if at == "mid":
                    (server,) = nbdkit_pids_under(vm.run_dir)
                    os.kill(server, signal.SIGKILL)
                if at != "start":  # (at the start the copy fails by itself: its first read)
                    await vm.command("block-job-set-speed", {"device": watch.job_id, "speed": 0})
        (attached,) = [e for e in logs if e["event"] == "blockctl.backup.live_attached"]
        left = [e for e in logs if e["event"] == "blockctl.backup.live_unfinished"]
        if at == "end":
            assert raised == [] and left == []
            assert await recovery.reconcile(vm) == []
        else:
            (error,) = raised
            assert isinstance(error, JobFailed), repr(error)
            assert [e["device"] for e in left] == [attached["device"]]
            if encrypted:
                nodes = await node_names(vm)
                (kept,) = await recovery.reconcile(vm)
                assert kept.verdict is Verdict.ATTENTION and kept.kept, kept
                way_out = f"`blockctl recover lrn --repo {repo.path} --key-file KEY`"
                assert "is encrypted" in kept.message and way_out in kept.message, kept.message
                assert await node_names(vm) == nodes
                # What `blockctl recover lrn --repo R --key-file K` runs (in this process:
                # the record's owner, alive, would be another client's to a second one).
                keyed = backup.open_repository(repo.path, key_file=key_file)
                _alive, (done,), _notes = await recover_vm("lrn", repo=keyed)
                assert done.verdict is Verdict.FINISHED, (done.message, done.done)
                done_steps = done.done
            else:
                if at == "start":
                    # `blockctl recover` in another process, kill -9ed inside its server
                    # replacement: into qcow2 once the new server listens and is recorded
                    # (QEMU not told), into raw once QEMU reads through it (the record not
                    # following yet). The next recover undoes or finishes it, then goes on.
                    await killed_recover(vm, "replacement-served" if fmt == "qcow2" else "replaced")
                (done,) = await recovery.reconcile(vm)
                assert done.verdict is Verdict.FINISHED, (done.message, done.done)
                done_steps = done.done
            if at == "start" and fmt == "raw":
                assert any(d.startswith("finished putting in the new server") for d in done_steps)
            else:
                assert any(d.startswith("started a new server") for d in done_steps), done_steps
            if at == "start" and fmt == "qcow2":
                assert any(d.startswith("undid the server replacement") for d in done_steps)
        assert nbdkit_pids_under(vm.run_dir) == []
        assert not list(vm.run_dir.glob("journal-*.json"))
        assert not list(vm.run_dir.glob("nbd-*"))
        assert live_target.overlays(images, vm.run_dir) == []
        assert not {n for n in await node_names(vm) if n.startswith("bclr")}
        (drive,) = [d for d in await drives.list_drives(vm) if d.device_id == attached["device"]]
        assert [n.node_name for n in drive.chain] == [drive.top_node]
        assert drive.filenames == (str(target),)
        await truth_check(vm)
    assert tree_digest(repo.path) == hashes
    want_file = await reference(repo, "lrn", point.id, tmp_path / "r.raw", live_target.writes)
    await standalone_equals(target, want_file, live_target.format)
