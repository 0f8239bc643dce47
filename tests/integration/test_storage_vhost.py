"""vhost-user-blk disks: images served by a real qemu-storage-daemon per disk, the guest's
RAM a shared memfd, the real test guest reading and writing them.

The daemons belong to the VM's lifecycle: started before QEMU (or on hot-plug), stopped and
reaped when QEMU exits however it exits, and on unplug. QEMU has none of such a disk's nodes
(``query-block`` does not list it), so the block operations blockctl cannot yet route to the
daemon's QMP are refused by name, and nothing in QEMU or the daemon changes.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, chains, open_vm
from blockctl._backup import operations as backup_ops
from blockctl._binaries import binary as qemu_binary
from blockctl._binaries import install_hint
from blockctl._machine import launch_detached
from blockctl._ops import drives
from blockctl._qmp import wire
from blockctl.errors import ConfigError, InStorageDaemon
from blockctl.types import CacheMode, Drive, ImageFormat, MachineConfig, VhostUserBlkSource
from tests.conftest import missing
from tests.integration.conftest import (
    MIB,
    base_config,
    cli_json,
    pattern,
    raw_image,
    run,
    running,
    sha256,
    truth_check,
)

pytestmark = pytest.mark.guest

DISK_SIZE = 16 * MIB


@pytest.fixture
def storage_daemon() -> str:
    program = qemu_binary("qemu-storage-daemon")
    if shutil.which(program) is None:
        missing(f"{program} ({install_hint('qemu-storage-daemon')})")
    return program


def vhost_drive(path: Path, fmt: ImageFormat, **kwargs: object) -> Drive:
    return Drive(vhost_user_blk=VhostUserBlkSource(file=path), format=fmt, **kwargs)  # type: ignore[arg-type]


async def sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def guest_disks(vm: LaunchedVM) -> set[str]:
    return set((await sh(vm, "ls /sys/block | grep '^vd' || true")).split())


async def new_disk(vm: LaunchedVM, before: set[str]) -> str:
    """The one vdX the guest has now and did not have in ``before`` (bounded wait)."""
    listed = " ".join(sorted(before))
    found = await sh(
        vm,
        "for i in $(seq 200); do for d in $(ls /sys/block | grep '^vd'); do "
        f'case " {listed} " in *" $d "*) ;; *) echo $d; exit 0;; esac; done; sleep 0.1; done; '
        "exit 1",
    )
    return found.strip()


async def guest_write_read(vm: LaunchedVM, dev: str, seed: int, offset_mib: int) -> str:
    """The guest writes 1 MiB of fresh data at ``offset_mib`` of /dev/DEV (O_DIRECT, synced)
    and reads it back from the disk; returns the sha256 both agree on."""
    await sh(vm, f"dd if=/dev/urandom of=/tmp/w{seed} bs=1M count=1 2>/dev/null")
    written = (await sh(vm, f"sha256sum /tmp/w{seed}")).split()[0]
    await sh(
        vm, f"dd if=/tmp/w{seed} of=/dev/{dev} bs=1M seek={offset_mib} oflag=direct 2>/dev/null"
    )
    await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
    read = await sh(
        vm,
        f"dd if=/dev/{dev} bs=1M skip={offset_mib} count=1 iflag=direct 2>/dev/null | sha256sum",
    )
    assert read.split()[0] == written
    return written


async def qemu_state(vm: LaunchedVM) -> tuple[object, ...]:
    """QEMU's block state, to show a refused operation changed nothing."""
    return (
        await vm.command("query-block"),
        await vm.command("query-named-block-nodes", {"flat": True}),
        await vm.command("query-jobs"),
        sorted(await wire.query_chardev_labels(vm.session)),
    )


async def daemon_state(vm: LaunchedVM, device: str) -> object:
    """The daemon's own block state (its nodes and exports), read on its QMP."""
    async with vm.daemons.running[device].qmp() as session:
        return (
            await session.execute("query-named-block-nodes", {"flat": True}),
            await session.execute("query-block-exports"),
            await session.execute("query-jobs"),
        )


async def test_vhost_user_blk_launch_io_refusals_hotplug_unplug(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """One boot with a qcow2 vhost-user-blk disk from launch: blockctl lists it truthfully
    (the CLI from another process too), the guest reads what the host put there, writes and
    reads back; snapshot, commit, stream, backup, resize, cache and throttle are refused
    naming the disk and its daemon, with QEMU's and the daemon's state unchanged. A raw one
    is hot-plugged, written, and unplugged: its daemon reaped, chardev and sockets gone. After
    shutdown the images hold what the guest wrote (qemu-img compare against a reference)."""
    base = await raw_image(tmp_path / "launch-data.raw", pattern(301, DISK_SIZE))
    launch_img = tmp_path / "launch.qcow2"
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, launch_img)
    hot_img = await raw_image(tmp_path / "hot.raw", pattern(302, 8 * MIB))
    launch = vhost_drive(launch_img, ImageFormat.QCOW2)
    repo = backup_ops.init_repository(tmp_path / "repo")
    async with open_vm(base_config(guest, launch, name="vhostvm")) as vm:
        assert vm.console is not None
        daemon0 = vm.daemons.running["disk0"]
        launch_pid = daemon0.pid
        await vm.console.wait_ready()
        # QEMU: the device and its chardev, no node; its RAM a shared memfd.
        assert await vm.command("query-block") == []
        assert await vm.block_nodes() == ()
        assert await vm.qom_get("/objects/ram0", "share") is True
        listed = {d.device_id: d for d in await drives.list_drives(vm)}
        assert list(listed) == ["disk0"]
        info = listed["disk0"]
        assert info.device_driver == "vhost-user-blk-pci"
        assert info.vhost_user is not None
        assert info.vhost_user.daemon_pid == launch_pid
        assert info.vhost_user.daemon_running
        assert info.vhost_user.file == str(launch_img)
        assert info.vhost_user.format == "qcow2"
        assert Path(info.vhost_user.socket).is_socket()
        # The daemon's own QMP says what it serves.
        async with daemon0.qmp() as session:
            exports = await session.execute("query-block-exports")
        assert [(e["type"], e["node-name"]) for e in exports] == [("vhost-user-blk", "drv0")]
        # Another process (the CLI) sees the same.
        cli = await cli_json("drives", "vhostvm")
        assert [(d["device"], d["vhost_user"]["daemon_pid"]) for d in cli] == [
            ("disk0", launch_pid)
        ]
        await truth_check(vm)

        (vda,) = await guest_disks(vm)
        head = await sh(vm, f"dd if=/dev/{vda} bs=1M count=2 2>/dev/null | sha256sum")
        assert head.split()[0] == sha256(pattern(301, DISK_SIZE)[: 2 * MIB])
        size = await sh(vm, f"cat /sys/block/{vda}/size")
        assert int(size) * 512 == DISK_SIZE
        launch_sum = await guest_write_read(vm, vda, 1, 2)

        # Refusals: by name, nothing changed in QEMU or in the daemon.
        before = (await qemu_state(vm), await daemon_state(vm, "disk0"))
        refused = {
            "resize": drives.resize(vm, "disk0", 2 * DISK_SIZE),
            "cache": drives.set_cache(vm, "disk0", CacheMode.NONE),
            "throttle": drives.set_throttle(vm, "disk0", {"bps": 1 << 20}),
            "commit": chains.commit(vm, "disk0"),
            "stream": chains.stream(vm, "disk0"),
            "snapshot": chains.external_snapshot(vm, "s1", tmp_path, devices=["disk0"]),
        }
        for operation, call in refused.items():
            with pytest.raises(InStorageDaemon) as caught:
                await call
            assert caught.value.operation == operation
            assert caught.value.device_id == "disk0"
            assert caught.value.daemon_pid == launch_pid
            assert "qemu-storage-daemon" in str(caught.value)
        # Whole-VM operations do not leave the disk out silently.
        for whole in (
            chains.external_snapshot(vm, "s2", tmp_path),
            backup_ops.backup(vm, repo, kind="full"),
            backup_ops.backup(vm, repo, kind="full", devices=["disk0"]),
        ):
            with pytest.raises(InStorageDaemon, match="disk0"):
                await whole
        assert (await qemu_state(vm), await daemon_state(vm, "disk0")) == before
        assert not list(tmp_path.glob("*s1*")) and not list(tmp_path.glob("*s2*"))

        # Hot-plug a raw one, write, unplug: nothing of it left.
        disks = await guest_disks(vm)
        hot = await drives.hotplug(vm, vhost_drive(hot_img, ImageFormat.RAW))
        assert hot.vhost_user is not None and hot.vhost_user.daemon_running
        hot_daemon = vm.daemons.running[hot.device_id]
        hot_files = (hot_daemon.plan.socket, hot_daemon.monitor)
        vdb = await new_disk(vm, disks)
        hot_head = await sh(vm, f"dd if=/dev/{vdb} bs=1M count=1 2>/dev/null | sha256sum")
        assert hot_head.split()[0] == sha256(pattern(302, MIB))
        hot_sum = await guest_write_read(vm, vdb, 2, 3)
        await truth_check(vm)
        gone = await drives.unplug(vm, hot.device_id, timeout=60)
        assert gone.state is drives.UnplugState.REMOVED
        assert hot_daemon.process.returncode is not None  # reaped
        assert not running(hot_daemon.pid)
        assert hot.device_id not in vm.daemons.running
        assert hot.vhost_user.chardev not in await wire.query_chardev_labels(vm.session)
        assert hot.device_id not in await wire.qom_list(vm.session, "/machine/peripheral")
        assert not any(p.exists() for p in hot_files)
        assert [d.device_id for d in await drives.list_drives(vm)] == ["disk0"]
        assert hot.device_id not in vm.registry.drives
        await truth_check(vm)
    assert daemon0.process.returncode is not None
    assert not running(launch_pid)

    # The images hold what the guest wrote, and nothing else changed.
    launch_ref = bytearray(pattern(301, DISK_SIZE))
    launch_now = tmp_path / "launch-now.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", launch_img, launch_now)
    data = launch_now.read_bytes()
    assert sha256(data[2 * MIB : 3 * MIB]) == launch_sum
    launch_ref[2 * MIB : 3 * MIB] = data[2 * MIB : 3 * MIB]
    reference = await raw_image(tmp_path / "launch-ref.raw", bytes(launch_ref))
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", launch_img, reference)
    hot_data = hot_img.read_bytes()
    assert sha256(hot_data[3 * MIB : 4 * MIB]) == hot_sum
    hot_ref = bytearray(pattern(302, 8 * MIB))
    hot_ref[3 * MIB : 4 * MIB] = hot_data[3 * MIB : 4 * MIB]
    assert hot_data == bytes(hot_ref)


async def test_vhost_user_blk_daemon_dies_with_killed_qemu(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """QEMU killed (SIGKILL, no shutdown): its storage daemon is stopped and reaped, its
    sockets removed, before the block ends."""
    img = await raw_image(tmp_path / "disk.raw", pattern(303, 4 * MIB))
    async with open_vm(base_config(guest, vhost_drive(img, ImageFormat.RAW))) as vm:
        daemon = vm.daemons.running["disk0"]
        assert running(daemon.pid)
        os.kill(vm.process.pid, signal.SIGKILL)
        await vm.process.wait()
        with anyio.fail_after(60):  # a bound on a hang, not a measured time
            await daemon.process.wait()
        assert not running(daemon.pid)
        assert not daemon.plan.socket.exists() and not daemon.monitor.exists()
        assert vm.daemons.running == {}


async def test_vhost_user_blk_refused_without_shared_memory(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A VM launched without shared memory refuses a vhost-user-blk hot-plug with the way out,
    before any daemon starts; a config asking for both is refused; so is a detached VM with
    one (its daemon could not die with it)."""
    img = await raw_image(tmp_path / "disk.raw", pattern(304, 4 * MIB))
    with pytest.raises(ConfigError, match="shared memory"):
        base_config(guest, vhost_drive(img, ImageFormat.RAW), shared_memory=False)
    with pytest.raises(ConfigError, match="outlives its launcher"):
        await launch_detached(base_config(guest, vhost_drive(img, ImageFormat.RAW), name="vdet"))
    with pytest.raises(ConfigError, match="serial"):
        vhost_drive(img, ImageFormat.RAW, serial="x")
    async with open_vm(base_config(guest)) as vm:
        peripherals = await wire.qom_list(vm.session, "/machine/peripheral")
        with pytest.raises(ConfigError, match="shared-memory = true") as caught:
            await drives.hotplug(vm, vhost_drive(img, ImageFormat.RAW))
        assert caught.value.field == "shared_memory"
        assert vm.daemons.running == {}
        assert await wire.qom_list(vm.session, "/machine/peripheral") == peripherals
        assert not list(vm.run_dir.glob("*vhost*")) and not list(vm.run_dir.glob("*qsd*"))


async def test_vhost_user_blk_hotplug_into_shared_memory_vm(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A VM launched with shared-memory = true and no vhost disk takes one hot-plugged: the
    guest sees its data and writes it; unplug stops the daemon."""
    img = await raw_image(tmp_path / "disk.raw", pattern(305, 4 * MIB))
    config = base_config(guest, shared_memory=True)
    assert isinstance(config, MachineConfig) and config.shared_memory
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        before = await guest_disks(vm)
        hot = await drives.hotplug(vm, vhost_drive(img, ImageFormat.RAW))
        dev = await new_disk(vm, before)
        head = await sh(vm, f"dd if=/dev/{dev} bs=1M count=1 2>/dev/null | sha256sum")
        assert head.split()[0] == sha256(pattern(305, MIB))
        written = await guest_write_read(vm, dev, 5, 1)
        daemon = vm.daemons.running[hot.device_id]
        assert (await drives.unplug(vm, hot.device_id, timeout=60)).state is (
            drives.UnplugState.REMOVED
        )
        assert daemon.process.returncode is not None
    assert sha256(img.read_bytes()[MIB : 2 * MIB]) == written
