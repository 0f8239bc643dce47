"""vhost-user-blk disks: images served by a real qemu-storage-daemon per disk, the guest's
RAM a shared memfd, the real test guest reading and writing them.

The daemons belong to the VM's lifecycle: started before QEMU (or on hot-plug), stopped and
reaped when QEMU exits however it exits, and on unplug. QEMU has none of such a disk's nodes
(``query-block`` does not list it): an external snapshot and a commit of it go to the daemon's
QMP; the block operations blockctl cannot yet route there are refused by name, and nothing in
QEMU or the daemon changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, Quiesce, _machine, chains, open_vm
from blockctl._backup import operations as backup_ops
from blockctl._binaries import binary as qemu_binary
from blockctl._binaries import install_hint
from blockctl._machine import launch_detached
from blockctl._ops import drives
from blockctl._qmp import wire
from blockctl._qmp.models import JobStatus
from blockctl.backup import BackupOptions
from blockctl.errors import ConfigError, InStorageDaemon, StorageDaemonBusy
from blockctl.types import (
    CacheMode,
    Drive,
    ImageFormat,
    MachineConfig,
    VhostUserBlkSource,
)
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
from tests.integration.test_clients import blockctl_process, finish
from tests.integration.test_crash import kill_controller_at, recover_cli

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
    reads back; a snapshot or backup with other disks or quiesce, cache and throttle are refused
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
            "cache": drives.set_cache(vm, "disk0", CacheMode.NONE),
            "throttle": drives.set_throttle(vm, "disk0", {"bps": 1 << 20}),
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
            chains.external_snapshot(vm, "s3", tmp_path, devices=["disk0"], quiesce=True),
            backup_ops.backup(vm, repo, kind="full"),
            backup_ops.backup(
                vm,
                repo,
                kind="full",
                devices=["disk0"],
                options=BackupOptions(quiesce=Quiesce.REQUIRED),
            ),
        ):
            with pytest.raises((InStorageDaemon, ConfigError), match="disk0"):
                await whole
        assert (await qemu_state(vm), await daemon_state(vm, "disk0")) == before
        assert not list(tmp_path.glob("*-s2.*")) and not list(tmp_path.glob("*-s3.*"))

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


async def daemon_nodes(vm: LaunchedVM, device: str) -> tuple[dict[str, str], set[str], object]:
    """The daemon's exports (id → node), its node names and its jobs, read on its QMP."""
    async with vm.daemons.running[device].qmp() as session:
        exports = {e.id: e.node_name for e in await wire.query_block_exports(session)}
        nodes = {n.node_name for n in await wire.query_named_block_nodes(session)}
        jobs = await session.execute("query-jobs")
    return exports, nodes, jobs


async def test_vhost_user_blk_snapshot_and_active_commit_in_daemon(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """An external snapshot of a vhost-user-blk disk (the CLI, from another process) and its
    active commit (the library) run in the disk's qemu-storage-daemon: the overlay is added
    there, the export follows it (and the base again after the pivot), the commit job is
    driven on the daemon's events; QEMU's block state never changes. What the guest wrote
    while the overlay was on top is in the base afterwards (read in the guest, and in the
    file after shutdown against a reference); the daemon keeps no node of the overlay, the
    drive's record says which nodes the daemon holds at each step."""
    base = await raw_image(tmp_path / "base.raw", pattern(306, DISK_SIZE))
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    async with open_vm(
        base_config(guest, vhost_drive(base, ImageFormat.RAW), name="vhostsc")
    ) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (vda,) = await guest_disks(vm)
        before_sum = await guest_write_read(vm, vda, 11, 1)
        qemu_before = await qemu_state(vm)
        exports0, nodes0, _ = await daemon_nodes(vm, "disk0")
        assert list(exports0.values()) == ["drv0"]
        recorded0 = vm.registry.drives["disk0"].daemon
        assert recorded0 is not None
        assert {n["node-name"] for n in recorded0["nodes"]} == nodes0

        snap = await cli_json(
            "snapshot", "vhostsc", "create", "s1", "--disk", "disk0", "--dir", str(overlays)
        )
        overlay = Path(snap["overlays"]["disk0"])
        assert overlay.parent == overlays and overlay.is_file()
        assert snap["frozen"] == {"disk0": str(base)}
        listed = await cli_json("snapshot", "vhostsc", "list")
        assert listed["external"] == {"disk0": [str(overlay), str(base)]}
        exports1, nodes1, jobs1 = await daemon_nodes(vm, "disk0")
        added = nodes1 - nodes0
        assert len(added) == 2 and list(exports1) == list(exports0)
        (top,) = exports1.values()
        assert top in added and top != "drv0"  # the export serves the overlay now
        assert jobs1 == []
        recorded1 = vm.registry.drives["disk0"].daemon
        assert recorded1 is not None
        assert {n["node-name"] for n in recorded1["nodes"]} == nodes1
        assert vm.registry.drives["disk0"].nodes == ()  # QEMU holds none of them
        assert await qemu_state(vm) == qemu_before
        await truth_check(vm)
        info = json.loads(await run("qemu-img", "info", "-U", "--output=json", overlay))
        assert (info["backing-filename"], info["backing-filename-format"]) == (str(base), "raw")

        # The guest writes while the overlay is on top: the base file does not change.
        base_at_snapshot = base.read_bytes()
        overlay_sums = [await guest_write_read(vm, vda, 12 + k, 4 + 3 * k) for k in range(3)]
        assert base.read_bytes() == base_at_snapshot

        result = await chains.commit(vm, "disk0", delete_files=True)
        assert result.job.length > 0
        assert JobStatus.READY in result.job.transitions  # driven on the daemon's job events
        assert result.removed_files == (str(overlay),) and not overlay.exists()
        assert result.chain == ("drv0",)
        assert await chains.list_external(vm) == {"disk0": [str(base)]}
        exports2, nodes2, jobs2 = await daemon_nodes(vm, "disk0")
        assert list(exports2.values()) == ["drv0"] and nodes2 == nodes0
        assert jobs2 == []
        recorded2 = vm.registry.drives["disk0"].daemon
        assert recorded2 is not None
        assert {n["node-name"] for n in recorded2["nodes"]} == nodes0
        assert not list(vm.run_dir.glob("disk0-qsd.ops/journal-*"))  # no journal record left
        assert await qemu_state(vm) == qemu_before
        await truth_check(vm)
        # The guest reads what it wrote, now from the base.
        await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
        for k, written in enumerate(overlay_sums):
            read = await sh(
                vm,
                f"dd if=/dev/{vda} bs=1M skip={4 + 3 * k} count=1 iflag=direct 2>/dev/null"
                " | sha256sum",
            )
            assert read.split()[0] == written

        # Again, the snapshot by the library, its deletion (a commit) by the CLI.
        again = await chains.external_snapshot(vm, "s2", overlays, devices=["disk0"])
        assert list((await daemon_nodes(vm, "disk0"))[0].values()) != ["drv0"]
        late_sum = await guest_write_read(vm, vda, 20, 12)
        deleted = await cli_json("snapshot", "vhostsc", "delete", "s2", "--disk", "disk0")
        assert [(d["device"], d["chain"]) for d in deleted] == [("disk0", ["drv0"])]
        assert "ready" in deleted[0]["transitions"]  # driven on the daemon's job events
        assert not again.overlays["disk0"].exists()
        exports3, nodes3, jobs3 = await daemon_nodes(vm, "disk0")
        assert (list(exports3.values()), nodes3, jobs3) == (["drv0"], nodes0, [])
        assert await qemu_state(vm) == qemu_before
        whole = await sh(vm, f"dd if=/dev/{vda} bs=1M iflag=direct 2>/dev/null | sha256sum")
    # The base file holds every write, and nothing else changed.
    data = base.read_bytes()
    assert sha256(data) == whole.split()[0]
    reference = bytearray(pattern(306, DISK_SIZE))
    writes = [(1, before_sum), (12, late_sum)] + [
        (4 + 3 * k, s) for k, s in enumerate(overlay_sums)
    ]
    for offset, written in writes:
        chunk = data[offset * MIB : (offset + 1) * MIB]
        assert sha256(chunk) == written
        reference[offset * MIB : (offset + 1) * MIB] = chunk
    ref = await raw_image(tmp_path / "ref.raw", bytes(reference))
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", base, ref)


async def guest_view(vm: LaunchedVM, dev: str) -> str:
    """The sha256 of the whole disk as the guest reads it (past its page cache)."""
    await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
    out = await sh(vm, f"dd if=/dev/{dev} bs=1M iflag=direct 2>/dev/null | sha256sum")
    return out.split()[0]


async def test_vhost_user_blk_backup_in_daemon_and_restore(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A full and then an incremental backup of a qcow2 vhost-user-blk disk run in its
    qemu-storage-daemon (fleecing node, checkpoint bitmap, NBD server and export there; QEMU's
    block state unchanged; nothing of the backup left in the daemon but its checkpoint). Each
    point restored (raw, qcow2) equals the whole disk as the guest read it at that point,
    whatever it wrote after; the incremental's restore, hot-plugged as a second vhost-user-blk
    disk, reads in the guest as the first did."""
    data = await raw_image(tmp_path / "data.raw", pattern(307, DISK_SIZE))
    img = tmp_path / "disk.qcow2"
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", data, img)
    repo = backup_ops.init_repository(tmp_path / "repo")
    async with open_vm(
        base_config(guest, vhost_drive(img, ImageFormat.QCOW2), name="vhostbk")
    ) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (vda,) = await guest_disks(vm)
        await guest_write_read(vm, vda, 31, 2)
        full_view = await guest_view(vm, vda)
        qemu_before = await qemu_state(vm)
        exports0, nodes0, _ = await daemon_nodes(vm, "disk0")

        full = await backup_ops.backup(vm, repo, kind="full", devices=["disk0"])
        assert (full.kind, full.vm, [d.device for d in full.disks]) == (
            "full",
            "vhostbk",
            ["disk0"],
        )
        assert await daemon_nodes(vm, "disk0") == (exports0, nodes0, [])
        async with vm.daemons.running["disk0"].qmp() as session:
            (top,) = [
                n
                for n in await wire.query_named_block_node_details(session)
                if n.node.node_name == "drv0"
            ]
        assert [b.name for b in top.dirty_bitmaps] == [full.checkpoint]
        assert await qemu_state(vm) == qemu_before

        await guest_write_read(vm, vda, 32, 6)
        inc_view = await guest_view(vm, vda)
        assert inc_view != full_view
        inc = await backup_ops.backup(vm, repo, kind="incremental", devices=["disk0"])
        assert (inc.kind, inc.parent, inc.fallback_reason) == ("incremental", full.id, None)
        assert 0 < inc.bytes_read < DISK_SIZE
        assert await daemon_nodes(vm, "disk0") == (exports0, nodes0, [])
        assert await qemu_state(vm) == qemu_before
        await guest_write_read(vm, vda, 33, 9)  # after the incremental's point

        full_raw = tmp_path / "full.raw"
        await backup_ops.restore(repo, "vhostbk", full.id, "disk0", full_raw, ImageFormat.RAW)
        assert sha256(full_raw.read_bytes()) == full_view
        inc_qcow2 = tmp_path / "inc.qcow2"
        await backup_ops.restore(repo, "vhostbk", inc.id, "disk0", inc_qcow2, ImageFormat.QCOW2)
        inc_raw = tmp_path / "inc.raw"
        await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", inc_qcow2, inc_raw)
        assert sha256(inc_raw.read_bytes()) == inc_view

        # The restore as a vhost-user-blk disk: the guest reads what it read at the point.
        before = await guest_disks(vm)
        hot = await drives.hotplug(vm, vhost_drive(inc_qcow2, ImageFormat.QCOW2))
        restored = await new_disk(vm, before)
        assert await guest_view(vm, restored) == inc_view
        listed = await chains.list_external(vm)  # opens each daemon, its directory made
        assert listed == {"disk0": [str(img)], hot.device_id: [str(inc_qcow2)]}
        hot_dir = vm.run_dir / f"{hot.device_id}-qsd.ops"
        assert hot_dir.is_dir()
        await truth_check(vm)
        gone = await drives.unplug(vm, hot.device_id, timeout=60)
        assert gone.state is drives.UnplugState.REMOVED
        assert not hot_dir.exists()  # nothing of the unplugged disk's daemon left


async def test_vhost_user_blk_killed_controller_recovered_in_daemon(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A controller killed (SIGKILL, another process, at an exact step) in an operation on a
    daemon's disk leaves its state in the daemon; the next operation routed there puts the
    daemon back first. A snapshot killed with its overlay added but not switched in: its
    record is in the daemon's directory, and the next snapshot undoes it (nodes, file, record).
    An active commit killed at READY: ``blockctl recover`` (another process) completes it in
    the daemon and deletes the overlay.
    A backup killed while it reads (fleecing job and node, NBD server and export live in the
    daemon): the next backup tears all of it down, and its point restores to the guest's
    view."""
    base = await raw_image(tmp_path / "base.raw", pattern(308, DISK_SIZE))
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    repo_path = tmp_path / "repo"
    repo = backup_ops.init_repository(repo_path)
    async with open_vm(
        base_config(guest, vhost_drive(base, ImageFormat.RAW), name="vhostcr")
    ) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (vda,) = await guest_disks(vm)
        exports0, nodes0, _ = await daemon_nodes(vm, "disk0")
        ops_dir = vm.run_dir / "disk0-qsd.ops"

        await kill_controller_at(
            "vhostcr", "snapshot", "switching", tag="k1", directory=str(overlays), device="disk0"
        )
        exports1, nodes1, jobs1 = await daemon_nodes(vm, "disk0")
        assert (exports1, jobs1) == (exports0, []) and len(nodes1 - nodes0) == 2
        assert len(list(ops_dir.glob("journal-*"))) == 1
        assert (await cli_json("status", "vhostcr"))["interrupted_operations"] == 1
        (k1,) = overlays.glob("*-k1.qcow2")
        k2 = await chains.external_snapshot(vm, "k2", overlays, devices=["disk0"])
        assert not k1.exists() and not list(ops_dir.glob("journal-*"))
        exports2, nodes2, _ = await daemon_nodes(vm, "disk0")
        assert len(nodes2 - nodes0) == 2
        async with vm.daemons.running["disk0"].qmp() as session:
            files = {n.node_name: n.file for n in await wire.query_named_block_nodes(session)}
        assert files[exports2["drv0-export"]] == str(k2.overlays["disk0"])  # not k1's
        # An active commit killed at READY: `blockctl recover` finishes it in the daemon.
        await kill_controller_at("vhostcr", "commit", "ready", device="disk0", delete_files=True)
        assert len(list(ops_dir.glob("journal-*"))) == 1
        async with vm.daemons.running["disk0"].qmp() as session:
            assert [j.status for j in await wire.query_jobs(session)] == [JobStatus.READY]
        recovered = await recover_cli("vhostcr")
        assert [(o["kind"], o["verdict"]) for o in recovered["operations"]] == [
            ("commit", "finished")
        ]
        assert not k2.overlays["disk0"].exists() and not list(ops_dir.glob("journal-*"))
        assert (await cli_json("status", "vhostcr"))["interrupted_operations"] == 0
        assert await daemon_nodes(vm, "disk0") == (exports0, nodes0, [])
        recorded = vm.registry.drives["disk0"].daemon
        assert recorded is not None and {n["node-name"] for n in recorded["nodes"]} == nodes0

        await kill_controller_at(
            "vhostcr", "backup", "copy", repo=str(repo_path), devices=["disk0"]
        )
        async with vm.daemons.running["disk0"].qmp() as session:
            kinds = {e.id: e.type for e in await wire.query_block_exports(session)}
            left_jobs = await session.execute("query-jobs")
        assert sorted(kinds.values()) == ["nbd", "vhost-user-blk"]
        assert left_jobs != []
        await guest_write_read(vm, vda, 41, 3)
        view = await guest_view(vm, vda)
        point = await backup_ops.backup(vm, repo, kind="full", devices=["disk0"])
        assert await daemon_nodes(vm, "disk0") == (exports0, nodes0, [])
        assert [m.id for m in repo.manifests("vhostcr")] == [point.id]
        restored = tmp_path / "restored.raw"
        await backup_ops.restore(repo, "vhostcr", point.id, "disk0", restored, ImageFormat.RAW)
        assert sha256(restored.read_bytes()) == view
        await truth_check(vm)


async def test_vhost_user_blk_stream_in_daemon(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A stream of a vhost-user-blk disk runs in its daemon: after a snapshot and guest writes
    into the overlay, the base's data is copied up and the overlay stands alone (the export
    still on it, the base's nodes gone from the daemon, the base file unchanged since the
    snapshot); the guest reads the whole disk as before the stream, and after shutdown the
    overlay alone (no backing file) holds it."""
    base = await raw_image(tmp_path / "base.raw", pattern(309, DISK_SIZE))
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    async with open_vm(
        base_config(guest, vhost_drive(base, ImageFormat.RAW), name="vhoststr")
    ) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (vda,) = await guest_disks(vm)
        qemu_before = await qemu_state(vm)
        _e, nodes0, _j = await daemon_nodes(vm, "disk0")
        snap = await chains.external_snapshot(vm, "t1", overlays, devices=["disk0"])
        overlay = snap.overlays["disk0"]
        exports1, nodes1, _ = await daemon_nodes(vm, "disk0")
        await guest_write_read(vm, vda, 51, 5)
        base_at_snapshot = base.read_bytes()
        view = await guest_view(vm, vda)
        result = await chains.stream(vm, "disk0")
        assert result.job.length > 0
        exports2, nodes2, jobs2 = await daemon_nodes(vm, "disk0")
        assert exports2 == exports1 and jobs2 == []  # the export stays on the overlay
        assert nodes2 == nodes1 - nodes0 and result.chain == (exports2["drv0-export"],)
        recorded = vm.registry.drives["disk0"].daemon
        assert recorded is not None and {n["node-name"] for n in recorded["nodes"]} == nodes2
        assert await qemu_state(vm) == qemu_before
        assert await guest_view(vm, vda) == view
        await truth_check(vm)
    assert base.read_bytes() == base_at_snapshot
    info = json.loads(await run("qemu-img", "info", "--output=json", overlay))
    assert "backing-filename" not in info
    flat = tmp_path / "flat.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", overlay, flat)
    assert sha256(flat.read_bytes()) == view


async def test_vhost_user_blk_and_qemu_disk_incrementals_each_from_its_own_point(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A daemon's disk and a QEMU disk of one VM backed up separately into one repository:
    full of the daemon's disk, full of QEMU's, then an incremental of each is incremental
    from that disk's own last point (not a fallback to full because the other disk's point came
    between), reads less than the disk, and restores to the whole disk as the guest read it."""
    qemu_data = await raw_image(tmp_path / "q.raw", pattern(321, 8 * MIB))
    qemu_img = tmp_path / "q.qcow2"
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", qemu_data, qemu_img)
    daemon_data = await raw_image(tmp_path / "d.raw", pattern(322, DISK_SIZE))
    daemon_img = tmp_path / "d.qcow2"
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", daemon_data, daemon_img)
    repo = backup_ops.init_repository(tmp_path / "repo")
    config = base_config(
        guest,
        Drive(file=qemu_img, format=ImageFormat.QCOW2),
        vhost_drive(daemon_img, ImageFormat.QCOW2),
        name="vhostalt",
    )
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        assert set(vm.daemons.running) == {"disk1"}
        # Which vdX is which: the guest's sizes (512-byte sectors).
        by_size = {
            int(await sh(vm, f"cat /sys/block/{d}/size")) * 512: d for d in await guest_disks(vm)
        }
        vq, vd = by_size[8 * MIB], by_size[DISK_SIZE]

        full_d = await backup_ops.backup(vm, repo, kind="full", devices=["disk1"])
        await guest_write_read(vm, vd, 41, 3)
        full_q = await backup_ops.backup(vm, repo, kind="full", devices=["disk0"])
        assert [d.device for d in full_d.disks] == ["disk1"]
        assert [d.device for d in full_q.disks] == ["disk0"]
        await guest_write_read(vm, vd, 42, 7)
        await guest_write_read(vm, vq, 43, 2)
        d_view, q_view = await guest_view(vm, vd), await guest_view(vm, vq)

        inc_d = await backup_ops.backup(vm, repo, kind="incremental", devices=["disk1"])
        assert (inc_d.kind, inc_d.parent, inc_d.fallback_reason) == (
            "incremental",
            full_d.id,
            None,
        )
        assert 0 < inc_d.bytes_read < DISK_SIZE
        inc_q = await backup_ops.backup(vm, repo, kind="incremental", devices=["disk0"])
        assert (inc_q.kind, inc_q.parent, inc_q.fallback_reason) == (
            "incremental",
            full_q.id,
            None,
        )
        assert 0 < inc_q.bytes_read < 8 * MIB
        await guest_write_read(vm, vd, 44, 11)  # after the points
        await guest_write_read(vm, vq, 45, 5)

        for point, device, view in ((inc_d, "disk1", d_view), (inc_q, "disk0", q_view)):
            out = tmp_path / f"{device}.raw"
            await backup_ops.restore(repo, "vhostalt", point.id, device, out, ImageFormat.RAW)
            assert sha256(out.read_bytes()) == view


async def test_vhost_user_blk_backup_in_daemon_listed_paused_and_cancelled_by_another_process(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A backup of a daemon's disk run by the CLI in one process is listed by ``blockctl jobs
    VM`` from another (its job is the daemon's, not QEMU's: the row names the daemon's
    monitor, the copy's progress and pid), paused and cancelled from there: the backup ends
    with ``JobCancelledByOther``, no point is recorded, and the daemon's nodes, exports, jobs
    and checkpoint bitmaps are as before."""
    qemu_img = tmp_path / "q.qcow2"
    await run("qemu-img", "create", "-f", "qcow2", qemu_img, str(8 * MIB))
    daemon_data = await raw_image(tmp_path / "d.raw", pattern(331, DISK_SIZE))
    daemon_img = tmp_path / "d.qcow2"
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", daemon_data, daemon_img)
    repo = tmp_path / "repo"
    await cli_json("backup", "init", "--repo", str(repo), "--chunk-size", "256K")
    config = base_config(
        guest,
        Drive(file=qemu_img, format=ImageFormat.QCOW2),
        vhost_drive(daemon_img, ImageFormat.QCOW2),
        name="vhostjobs",
    )
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        before = await daemon_nodes(vm, "disk1")
        qemu_before = await qemu_state(vm)
        async with blockctl_process(
            "backup",
            "create",
            "vhostjobs",
            "--repo",
            str(repo),
            "--disk",
            "disk1",
            "--speed",
            "256K",
            "--json",
        ) as backer:

            async def row(until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
                with anyio.fail_after(120):
                    while True:
                        rows = await cli_json("jobs", "vhostjobs", "--sample", "0")
                        mine = [r for r in rows if r["driven_by"] == backer.pid]
                        assert len(mine) <= 1, rows
                        if mine and until(mine[0]):
                            return mine[0]  # type: ignore[no-any-return]
                        await anyio.sleep(0.2)

            first = await row(lambda r: r["total"] > 0)
            assert (first["type"], first["status"], first["monitor"]) == (
                "backup",
                "running",
                "qsd:disk1",
            )
            assert first["total"] == DISK_SIZE and first["speed"] == 256 * 1024
            assert await vm.command("query-jobs") == []  # not QEMU's job
            job_id = first["id"]
            paused = await cli_json("jobs", "vhostjobs", "pause", job_id)
            assert paused["by"] == "backup"
            held = await row(lambda r: r["status"] == "paused")
            assert held["done"] < held["total"]
            cancelled = await cli_json("jobs", "vhostjobs", "cancel", job_id)
            assert cancelled["by"] == "backup"
            code, out, err = await finish(backer)
        assert code == 3, (out, err)
        assert json.loads(out)["error"]["type"] == "JobCancelledByOther"
        assert await daemon_nodes(vm, "disk1") == before
        assert await qemu_state(vm) == qemu_before
        async with vm.daemons.running["disk1"].qmp() as session:
            details = await wire.query_named_block_node_details(session)
        assert [b.name for n in details for b in n.dirty_bitmaps] == []  # no checkpoint left
        assert await cli_json("backup", "list", "vhostjobs", "--repo", str(repo)) == []
        assert not list((vm.run_dir / "disk1-qsd.ops").glob("control/*.sock"))
        await truth_check(vm)


async def test_vhost_user_blk_offline_recover_reports_and_drops_a_daemons_record(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A controller killed in a snapshot of a daemon's disk leaves its record in the disk's
    operations directory; then QEMU is killed (its daemon with it). ``blockctl recover``
    (another process) finds QEMU gone and reports that record as QEMU's own offline records
    are reported (the disk's top on disk: the overlay, backing onto the base), naming the
    daemon, and drops it."""
    base = await raw_image(tmp_path / "base.raw", pattern(341, DISK_SIZE))
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    async with open_vm(
        base_config(guest, vhost_drive(base, ImageFormat.RAW), name="vhostoff")
    ) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        ops_dir = vm.run_dir / "disk0-qsd.ops"
        await kill_controller_at(
            "vhostoff", "snapshot", "switching", tag="k1", directory=str(overlays), device="disk0"
        )
        assert len(list(ops_dir.glob("journal-*"))) == 1
        daemon = vm.daemons.running["disk0"]
        os.kill(vm.process.pid, signal.SIGKILL)
        await vm.process.wait()
        with anyio.fail_after(60):  # a bound on a hang, not a measured time
            await daemon.process.wait()
        assert len(list(ops_dir.glob("journal-*"))) == 1  # kept: it holds a record
        done = await anyio.run_process(
            [sys.executable, "-m", "blockctl", "recover", "vhostoff", "--json"],
            check=False,
            env=dict(os.environ),
        )
        assert done.returncode == 0, (done.stdout, done.stderr[-2000:])
        report = json.loads(done.stdout)
        assert report["qemu_running"] is False
        (op,) = report["operations"]
        assert (op["kind"], op["step"], op["verdict"]) == ("snapshot", "switching", "qemu-gone")
        assert "disk0's qemu-storage-daemon" in op["what"]
        # As for QEMU's disks: once the switch may have been sent, the overlay is the top
        # either way (it holds the writes after it, or none and backs onto the base).
        (k1,) = overlays.glob("*-k1.qcow2")
        assert op["tops"] == {"disk0": str(k1)}
        info = json.loads(await run("qemu-img", "info", "--output=json", k1))
        assert info["full-backing-filename"] == str(base)
        assert not list(ops_dir.glob("journal-*"))


async def test_vhost_user_blk_chain_shows_the_daemons_graph(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """``blockctl chain VM`` (another process) shows a daemon's disk's chain as its daemon
    holds it (QEMU's graph has none of its nodes): one layer, then after an external snapshot
    in the daemon the overlay over the base, each node's file as the daemon's QMP reports it."""
    base = await raw_image(tmp_path / "base.raw", pattern(351, DISK_SIZE))
    async with open_vm(
        base_config(guest, vhost_drive(base, ImageFormat.RAW), name="vhostchain")
    ) as vm:

        async def daemon_files() -> dict[str, str | None]:
            async with vm.daemons.running["disk0"].qmp() as session:
                return {n.node_name: n.file for n in await wire.query_named_block_nodes(session)}

        async def shown() -> tuple[list[str], dict[str, str | None]]:
            data = await cli_json("chain", "vhostchain")
            assert data["devices"] == []  # QEMU's graph: the disk's nodes are not there
            (device,) = data["storage_daemons"]["disk0"]["devices"]
            assert device["id"] == "disk0"
            nodes = data["storage_daemons"]["disk0"]["nodes"]
            return device["chain"], {n["node_name"]: n["filename"] for n in nodes}

        chain, files = await shown()
        assert files == await daemon_files()
        assert [files[n] for n in chain if files[n] == str(base)] == [str(base)]
        snap = await chains.external_snapshot(vm, "c1", tmp_path, devices=["disk0"])
        overlay = str(snap.overlays["disk0"])
        chain, files = await shown()
        assert files == await daemon_files()
        layers = [files[n] for n in chain]
        assert layers.index(overlay) < layers.index(str(base))  # the overlay over the base
        text = (await run_blockctl("chain", "vhostchain")).splitlines()
        assert "disk0's qemu-storage-daemon:" in text
        assert any(overlay in line for line in text)


async def run_blockctl(*args: str) -> str:
    done = await anyio.run_process([sys.executable, "-m", "blockctl", *args], env=dict(os.environ))
    return done.stdout.decode()


async def jobs_row(
    vm_name: str, pid: int, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The row of ``blockctl jobs VM`` (another process) of the job driven by ``pid``, once
    ``until`` holds for it (bounded: a hang fails, no time is asserted)."""
    with anyio.fail_after(120):
        while True:
            rows = await cli_json("jobs", vm_name, "--sample", "0")
            mine = [r for r in rows if r["driven_by"] == pid]
            assert len(mine) <= 1, rows
            if mine and until(mine[0]):
                return mine[0]  # type: ignore[no-any-return]
            await anyio.sleep(0.2)


async def cli_fails(*args: str) -> tuple[int, dict[str, Any]]:
    """``blockctl ARGS --json`` from another process that is expected to fail: its exit
    code and its JSON error."""
    done = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *args, "--json"], check=False, env=dict(os.environ)
    )
    assert done.returncode != 0, done.stdout
    return done.returncode, json.loads(done.stdout)["error"]


async def test_vhost_user_blk_commit_and_stream_in_daemon_reached_by_another_process(
    guest: GuestImage, storage_daemon: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit and a stream of a daemon's disk, each run by the CLI in one process (which
    holds the daemon's one monitor), are listed by ``blockctl jobs VM`` from another
    (``monitor`` ``qsd:disk0``, the driving pid, the job's type) and driven from there: the
    commit paused, re-speeded and resumed (it completes: the export back on the base, the
    guest's view unchanged), the stream cancelled (``JobCancelledByOther``; the daemon's nodes,
    exports and jobs as before it, no record, no control socket). While the commit holds the
    daemon's monitor, an operation routed there (``snapshot list`` from another process, a
    stream in this one) is refused at once with ``StorageDaemonBusy`` naming the disk, the
    commit, its pid and job (before: ``QMPConnectFailed`` after 10 s); a monitor held by a
    client blockctl has no record of is refused the same way after the connect's wait."""
    base = await raw_image(tmp_path / "base.raw", pattern(361, DISK_SIZE))
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    name = "vhostrelay"
    async with open_vm(base_config(guest, vhost_drive(base, ImageFormat.RAW), name=name)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (vda,) = await guest_disks(vm)
        ops_dir = vm.run_dir / "disk0-qsd.ops"
        qemu_before = await qemu_state(vm)
        exports0, nodes0, _ = await daemon_nodes(vm, "disk0")
        await chains.external_snapshot(vm, "r1", overlays, devices=["disk0"])
        for i in range(4):  # 4 MiB in the overlay: the commit has that much to copy
            await guest_write_read(vm, vda, 60 + i, 4 + i)
        view = await guest_view(vm, vda)
        async with blockctl_process(
            "commit", name, "disk0", "--speed", "64K", "--json"
        ) as committer:
            first = await jobs_row(name, committer.pid, lambda r: r["total"] > 0)
            assert (first["type"], first["monitor"], first["speed"]) == (
                "commit",
                "qsd:disk0",
                64 * 1024,
            )
            assert await vm.command("query-jobs") == []  # the daemon's job, not QEMU's
            job_id = first["id"]
            assert (await cli_json("jobs", name, "pause", job_id))["by"] == "daemon"
            # Paused before READY (the mirror under an active commit copies its first pass
            # in one burst whatever the speed): it cannot end until resumed.
            await jobs_row(name, committer.pid, lambda r: r["status"] == "paused")
            # The monitor is the committer's: refused at once, naming it.
            code, error = await cli_fails("snapshot", name, "list")
            assert (code, error["type"]) == (5, "StorageDaemonBusy"), error
            for said in ("disk0", "commit", str(committer.pid), job_id, "qemu-storage-daemon"):
                assert said in error["message"], (said, error["message"])
            with pytest.raises(StorageDaemonBusy) as busy:
                await chains.stream(vm, "disk0")
            assert (busy.value.kind, busy.value.pid, busy.value.job_id) == (
                "commit",
                committer.pid,
                job_id,
            )
            assert f"blockctl jobs {name} cancel {job_id}" in str(busy.value)
            assert (await cli_json("jobs", name, "speed", job_id, "8M"))["by"] == "daemon"
            respeeded = await jobs_row(name, committer.pid, lambda r: r["speed"] == 8 * MIB)
            assert respeeded["status"] == "paused"
            assert committer.returncode is None  # still paused, still its driver's
            assert (await cli_json("jobs", name, "resume", job_id))["by"] == "daemon"
            code, out, err = await finish(committer)
        assert code == 0, (out, err)
        committed = json.loads(out)
        assert committed["job"] == job_id and committed["bytes"] > 0
        assert await daemon_nodes(vm, "disk0") == (exports0, nodes0, [])  # back on the base
        assert await guest_view(vm, vda) == view
        assert not list(ops_dir.glob("control/*.sock")) and not list(ops_dir.glob("journal-*"))

        # A client blockctl keeps no record of holds the monitor: refused after the connect
        # (given 1 s here instead of 10: the same path).
        monkeypatch.setattr(_machine, "DAEMON_GREETING_TIMEOUT", 1.0)
        async with vm.daemons.running["disk0"].qmp():
            with pytest.raises(StorageDaemonBusy) as busy:
                await chains.stream(vm, "disk0")
        assert busy.value.kind == "client" and busy.value.pid is None

        await chains.external_snapshot(vm, "r2", overlays, devices=["disk0"])
        await guest_write_read(vm, vda, 70, 9)
        snapped = await daemon_nodes(vm, "disk0")
        async with blockctl_process(
            "stream", name, "disk0", "--speed", "64K", "--json"
        ) as streamer:
            row = await jobs_row(name, streamer.pid, lambda r: r["total"] > 0)
            assert (row["type"], row["monitor"]) == ("stream", "qsd:disk0")
            assert (await cli_json("jobs", name, "cancel", row["id"]))["by"] == "daemon"
            code, out, err = await finish(streamer)
        assert code == 3, (out, err)
        assert json.loads(out)["error"]["type"] == "JobCancelledByOther"
        assert await daemon_nodes(vm, "disk0") == snapped
        assert not list(ops_dir.glob("control/*.sock")) and not list(ops_dir.glob("journal-*"))
        assert await qemu_state(vm) == qemu_before
        await truth_check(vm)


async def test_vhost_user_blk_offline_recover_cleans_a_killed_daemon_backup(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A controller SIGKILLed while its backup of a daemon's disk reads, then QEMU SIGKILLed
    (the daemon with it): the repository holds the killed backup's incomplete point, its
    scratch directory its fleecing overlay, the disk's operations directory its control
    socket. ``blockctl recover VM --repo`` (another process) finds QEMU gone, reports each and
    removes them (before: nothing reported, all of it left); the repository then holds the
    full point alone, which verifies and restores to the guest's view at that point."""
    data = await raw_image(tmp_path / "data.raw", pattern(371, DISK_SIZE))
    img = tmp_path / "disk.qcow2"
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", data, img)
    repo_path = tmp_path / "repo"
    repo = backup_ops.init_repository(repo_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    name = "vhostoffbk"
    async with open_vm(base_config(guest, vhost_drive(img, ImageFormat.QCOW2), name=name)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (vda,) = await guest_disks(vm)
        await guest_write_read(vm, vda, 81, 1)
        view = await guest_view(vm, vda)
        full = await backup_ops.backup(vm, repo, kind="full", devices=["disk0"])
        await guest_write_read(vm, vda, 82, 6)
        ops_dir = vm.run_dir / "disk0-qsd.ops"
        await kill_controller_at(
            name, "backup", "copy", repo=str(repo_path), devices=["disk0"], scratch_dir=str(scratch)
        )
        (incomplete,) = repo.incomplete_points(name)
        (left_scratch,) = scratch.iterdir()
        assert list(left_scratch.glob("fleece-*"))
        (control,) = ops_dir.glob("control/*.sock")
        daemon = vm.daemons.running["disk0"]
        os.kill(vm.process.pid, signal.SIGKILL)
        await vm.process.wait()
        with anyio.fail_after(60):  # a bound on a hang, not a measured time
            await daemon.process.wait()
        done = await anyio.run_process(
            [sys.executable, "-m", "blockctl", "recover", name, "--repo", str(repo_path), "--json"],
            check=False,
            env=dict(os.environ),
        )
        assert done.returncode == 0, (done.stdout, done.stderr[-2000:])
        report = json.loads(done.stdout)
        assert report["qemu_running"] is False
        notes = "\n".join(report["backup"])
        assert f"removed the incomplete point {incomplete}" in notes, notes
        assert f"removed the scratch directory {left_scratch}" in notes, notes
        assert "disk0's qemu-storage-daemon" in notes, notes
        assert control.name[: -len(".sock")] in notes, notes
        assert repo.incomplete_points(name) == []
        assert [m.id for m in repo.manifests(name)] == [full.id]
        assert list(scratch.iterdir()) == [] and not control.exists()
        assert not (ops_dir / backup_ops.SCRATCH_RECORD).exists()
    verified = await backup_ops.verify(repo, name, full.id)
    assert verified.ok, verified.problems
    restored = tmp_path / "restored.raw"
    await backup_ops.restore(repo, name, full.id, "disk0", restored, ImageFormat.RAW)
    assert sha256(restored.read_bytes()) == view


async def test_vhost_user_blk_resize_in_daemon_seen_by_the_guest_on_10_refused_on_7_2(
    guest: GuestImage, storage_daemon: str, tmp_path: Path
) -> None:
    """A resize of a vhost-user-blk disk goes to its daemon. From a 10.0 daemon on, the
    guest sees the new size (its ``/sys/block`` size, then reading the whole disk: the old
    data, then zeros), the daemon's node has it, and a shrink without allow_shrink is refused
    with nothing changed. A 7.2 daemon's export does not tell QEMU of a new size (measured):
    refused with ``InStorageDaemon`` naming that reason, the daemon's and QEMU's state
    unchanged, the guest's size too."""
    data = pattern(381, DISK_SIZE)
    base = await raw_image(tmp_path / "base.raw", data)
    name = "vhostresize"
    async with open_vm(base_config(guest, vhost_drive(base, ImageFormat.RAW), name=name)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (vda,) = await guest_disks(vm)
        async with vm.daemons.running["disk0"].qmp() as session:
            version = await wire.query_version(session)

        async def guest_size() -> int:
            return int(await sh(vm, f"cat /sys/block/{vda}/size")) * 512

        before = (await qemu_state(vm), await daemon_state(vm, "disk0"))
        if (version.major, version.minor) < drives.DAEMON_RESIZE_SINCE:
            with pytest.raises(InStorageDaemon) as caught:
                await drives.resize(vm, "disk0", 2 * DISK_SIZE)
            assert caught.value.operation == "resize" and caught.value.device_id == "disk0"
            assert "does not tell QEMU of a new size" in str(caught.value)
            assert (await qemu_state(vm), await daemon_state(vm, "disk0")) == before
            assert await guest_size() == DISK_SIZE
            return
        with pytest.raises(ConfigError, match="smaller"):
            await drives.resize(vm, "disk0", DISK_SIZE // 2)
        assert (await qemu_state(vm), await daemon_state(vm, "disk0")) == before
        shown = await cli_json("resize", name, "disk0", str(2 * DISK_SIZE))
        assert shown["size"] == 2 * DISK_SIZE
        # The guest waits for its new size (bounded: 60 s, a hang's bound, not a figure).
        sectors = 2 * DISK_SIZE // 512
        await sh(
            vm,
            f"for i in $(seq 300); do [ $(cat /sys/block/{vda}/size) = {sectors} ] && exit 0; "
            "sleep 0.2; done; exit 1",
        )
        assert await guest_size() == 2 * DISK_SIZE
        async with vm.daemons.running["disk0"].qmp() as session:
            exports = {e.id: e.node_name for e in await wire.query_block_exports(session)}
            sizes = {
                n.node_name: n.virtual_size for n in await wire.query_named_block_nodes(session)
            }
        assert sizes[exports["drv0-export"]] == 2 * DISK_SIZE
        assert await guest_view(vm, vda) == sha256(data + bytes(DISK_SIZE))
        assert await qemu_state(vm) == before[0]
        await truth_check(vm)
