"""Drives on a running guest, seen from inside the guest and on disk."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl._ops import drives
from blockctl._ops.apply import Action
from blockctl._ops.apply import apply as apply_drives
from blockctl._ops.drives import UnplugState
from blockctl._qmp import wire
from blockctl.errors import (
    CommandFailed,
    ConfigError,
    ConnectionLost,
    DriveNotFound,
    Unsupported,
)
from blockctl.types import (
    CacheMode,
    DetectZeroes,
    Discard,
    Drive,
    ImageFormat,
    Interface,
    MachineConfig,
    Media,
    NbdSource,
)
from tests.integration.conftest import (
    MIB,
    STRICT,
    base_config,
    image_bytes,
    pattern,
    qcow2_image,
    qemu_binary,
    raw_image,
    sha256,
    shell_prompt_in,
    truth_check,
)

pytestmark = pytest.mark.guest


async def sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def wait_block(vm: LaunchedVM, dev: str, present: bool = True) -> None:
    """Wait (in the guest, bounded) until /dev/DEV appears or disappears."""
    test = f"[ -b /dev/{dev} ]" if present else f"[ ! -b /dev/{dev} ]"
    await sh(vm, f"for i in $(seq 100); do {test} && exit 0; sleep 0.1; done; exit 1")


async def node_names(vm: LaunchedVM) -> set[str]:
    return {n.node_name for n in await vm.block_nodes()}


async def test_hotplug_write_and_unplug_virtio_and_scsi(guest: GuestImage, images: Path) -> None:
    data = pattern(11, 2 * MIB)
    virtio_img = await qcow2_image(images / "hot ü,1.qcow2", data, 16 * MIB)
    scsi_img = await qcow2_image(images / "scsi.qcow2", b"", 16 * MIB)
    async with open_vm(base_config(guest)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        before = await node_names(vm)
        virtio = await drives.hotplug(
            vm, Drive(file=virtio_img, format=ImageFormat.QCOW2, serial="HOT-V")
        )
        scsi = await drives.hotplug(
            vm,
            Drive(
                file=scsi_img,
                format=ImageFormat.QCOW2,
                interface=Interface.SCSI,
                cache=CacheMode.NONE,
            ),
        )
        assert (virtio.device_id, virtio.top_node, virtio.format) == ("disk0", "drv0", "qcow2")
        assert scsi.device_driver == "scsi-hd"
        assert scsi.cache is not None
        assert scsi.cache.direct
        await wait_block(vm, "vda")
        await wait_block(vm, "sda")
        assert (await sh(vm, "cat /sys/block/vda/serial")) == "HOT-V"
        guest_sum = await sh(vm, "dd if=/dev/vda bs=1M count=2 2>/dev/null | sha256sum")
        assert guest_sum.split()[0] == sha256(data)
        await sh(vm, "dd if=/dev/vda of=/dev/sda bs=1M count=1 oflag=direct 2>/dev/null")
        await sh(vm, "sync")

        listed = {d.device_id: d for d in await drives.list_drives(vm)}
        assert set(listed) == {"disk0", "disk1"}
        assert listed["disk0"].file == str(virtio_img)
        await truth_check(vm)

        for device_id, dev in (("disk0", "vda"), ("disk1", "sda")):
            result = await drives.unplug(vm, device_id)
            assert result.state is UnplugState.REMOVED
            await wait_block(vm, dev, present=False)
        assert await node_names(vm) == before
        assert vm.registry.drives == {}
        with pytest.raises(DriveNotFound):
            await drives.unplug(vm, "disk0")  # a repeat call changes nothing
        assert (await vm.status()).running
        await truth_check(vm)
    # What the guest copied onto the SCSI disk is in the image, read offline with its format.
    assert await image_bytes(scsi_img, "qcow2", MIB) == data[:MIB]


async def test_failed_device_add_rolls_back(guest: GuestImage, images: Path) -> None:
    first = await qcow2_image(images / "a.qcow2", b"", 8 * MIB)
    second = await qcow2_image(images / "b.qcow2", b"", 8 * MIB)
    config = base_config(guest, Drive(file=first, format=ImageFormat.QCOW2, bootindex=1))
    async with open_vm(config) as vm:
        before = await node_names(vm)
        with pytest.raises(CommandFailed, match="bootindex"):
            await drives.hotplug(vm, Drive(file=second, format=ImageFormat.QCOW2, bootindex=1))
        assert await node_names(vm) == before
        assert set(vm.registry.drives) == {"disk0"}
        assert "disk1" not in await wire.qom_list(vm.session, "/machine/peripheral")
        await truth_check(vm)


async def test_bad_hotplug_inputs(guest: GuestImage, images: Path) -> None:
    disk = await qcow2_image(images / "in-use.qcow2", b"", 8 * MIB)
    raw = await raw_image(images / "plain.raw", pattern(3, MIB))
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2))
    async with open_vm(config) as vm:
        before = await node_names(vm)
        with pytest.raises(ConfigError, match="does not exist"):
            await drives.hotplug(vm, Drive(file=images / "nope.qcow2", format=ImageFormat.QCOW2))
        with pytest.raises(ConfigError, match="as qcow2"):
            await drives.hotplug(vm, Drive(file=raw, format=ImageFormat.QCOW2))
        # The running VM has its own disk open: a second attach is refused by name.
        with pytest.raises(ConfigError, match=r"already attached as disk0 \(node drv0\)"):
            await drives.hotplug(vm, Drive(file=disk, format=ImageFormat.QCOW2))
        with pytest.raises(ConfigError, match="no hot-plug"):
            await drives.hotplug(
                vm, Drive(file=raw, format=ImageFormat.RAW, interface=Interface.IDE)
            )
        with pytest.raises(DriveNotFound):
            await drives.unplug(vm, "disk7")
        with pytest.raises(ConfigError, match="shrink"):
            await drives.resize(vm, "disk0", 4 * MIB)
        with pytest.raises(ConfigError):
            await drives.set_throttle(vm, "disk0", {"bps": 1, "bps_rd": 1})
        assert await node_names(vm) == before
        assert (await vm.status()).running
        await truth_check(vm)


async def test_unplug_pending_when_the_guest_never_releases(images: Path) -> None:
    """A VM with no OS never acknowledges an ACPI unplug: PENDING, nodes kept, then reset."""
    disk = await qcow2_image(images / "p.qcow2", b"", 8 * MIB)
    async with open_vm(MachineConfig(deprecated_input=STRICT), console=False) as vm:
        plugged = await drives.hotplug(vm, Drive(file=disk, format=ImageFormat.QCOW2))
        result = await drives.unplug(vm, plugged.device_id, timeout=1)
        assert result.state is UnplugState.PENDING
        assert {"drv0", "drv0-file"} <= await node_names(vm)
        (info,) = await drives.list_drives(vm)
        assert info.pending_unplug
        # Asking again is safe and still pending.
        assert (await drives.unplug(vm, "disk0", timeout=1)).state is UnplugState.PENDING
        # A reset completes the removal (qmp-ref); the next call finishes the job.
        with wire.device_deleted_events(vm.session) as events:
            await wire.system_reset(vm.session)
            await events.wait_for(lambda e: wire.is_device_deleted(e, "disk0"))
        result = await drives.unplug(vm, "disk0")
        assert result.state is UnplugState.REMOVED
        assert result.deleted_nodes == ("drv0", "drv0-file")
        assert await drives.list_drives(vm) == ()
        await truth_check(vm)


async def test_apply_reports_a_detach_the_guest_has_not_finished_then_finishes_it(
    images: Path, runtime_dir: Path
) -> None:
    """``apply`` does not call a detach done while the guest holds the disk: the result names
    it pending (the CLI says ``"applied": false`` and exits 3); once released, the next apply
    deletes its nodes."""
    from tests.integration.test_attach_cli import cli

    disk = await qcow2_image(images / "p.qcow2", b"", 8 * MIB)
    empty = images / "none.toml"
    empty.write_text("")
    # A VM with no OS never acknowledges an ACPI unplug; named, so the CLI reaches it too.
    config = MachineConfig(name="pend", deprecated_input=STRICT)
    async with open_vm(config, console=False) as vm:
        plugged = await drives.hotplug(vm, Drive(file=disk, format=ImageFormat.QCOW2))
        result = await apply_drives(vm, [], unplug_timeout=1)
        assert [(s.action, s.device) for s in result.steps] == [(Action.DETACH, plugged.device_id)]
        assert result.pending == (plugged.device_id,)
        (info,) = await drives.list_drives(vm)
        assert info.pending_unplug
        assert {"drv0", "drv0-file"} <= await node_names(vm)
        # Asked again, from the CLI: still pending, still said.
        again = await cli("apply", "pend", empty, "--timeout", "1", "--json", check=False)
        assert again.returncode == 3, again.stderr
        said = json.loads(again.stdout)
        assert (said["applied"], said["pending"]) == (False, [plugged.device_id])
        with wire.device_deleted_events(vm.session) as events:
            await wire.system_reset(vm.session)
            await events.wait_for(lambda e: wire.is_device_deleted(e, plugged.device_id))
        # The device is gone, its nodes are not: the next apply deletes them.
        assert {"drv0", "drv0-file"} <= await node_names(vm)
        finished = json.loads((await cli("apply", "pend", empty, "--json")).stdout)
        assert [(s["action"], s["device"]) for s in finished["steps"]] == [
            ("detach", plugged.device_id)
        ]
        assert (finished["applied"], finished["pending"]) == (True, [])
        assert not {"drv0", "drv0-file"} & await node_names(vm)
        assert (await apply_drives(vm, [])).empty
        await truth_check(vm)


async def test_media_eject_insert_change_and_a_locked_tray(guest: GuestImage, images: Path) -> None:
    one = await raw_image(images / "one.iso", b"MEDIUM-ONE", MIB)
    two = await raw_image(images / "two,2.iso", b"MEDIUM-TWO", MIB)
    config = base_config(
        guest, Drive(file=one, format=ImageFormat.RAW, interface=Interface.IDE, media=Media.CDROM)
    )
    read = "head -c 10 /dev/sr0 2>/dev/null || head -c 10 /dev/sr0"  # 1st read: media changed
    async with open_vm(config) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        assert await sh(vm, read) == "MEDIUM-ONE"
        await drives.eject(vm, "disk0")
        (info,) = await drives.list_drives(vm)
        assert info.top_node is None
        assert info.tray_open
        assert "drv0" not in await node_names(vm)
        await drives.insert(vm, "disk0", two, ImageFormat.RAW)
        assert await sh(vm, read) == "MEDIUM-TWO"
        changed = await drives.change_medium(vm, "disk0", one, ImageFormat.RAW)
        assert changed.file == str(one)
        assert await sh(vm, read) == "MEDIUM-ONE"
        await truth_check(vm)

        # A SCSI cdrom can be hot-plugged (an IDE one cannot): the guest reads its medium.
        scsi_cd = await drives.hotplug(
            vm, Drive(file=two, format=ImageFormat.RAW, interface=Interface.SCSI, media=Media.CDROM)
        )
        assert scsi_cd.device_driver == "scsi-cd"
        assert scsi_cd.read_only
        await wait_block(vm, "sr1")
        assert await sh(vm, read.replace("sr0", "sr1")) == "MEDIUM-TWO"
        assert (await drives.unplug(vm, scsi_cd.device_id)).state is UnplugState.REMOVED

        # Linux locks the tray while /dev/sr0 is open.
        await sh(vm, "( sleep 600 </dev/sr0 & )")
        with anyio.fail_after(20):  # the guest's open (and its lock) happens in the background
            while not {d.device_id: d for d in await vm.block_devices()}["disk0"].locked:  # noqa: ASYNC110 - no QMP event reports a tray lock
                await anyio.sleep(0.1)
        with pytest.raises(CommandFailed, match="force"):
            await drives.eject(vm, "disk0")
        await drives.eject(vm, "disk0", force=True)
        (info,) = await drives.list_drives(vm)
        assert info.top_node is None
        await truth_check(vm)


async def test_live_cache_resize_and_throttle(guest: GuestImage, images: Path) -> None:
    disk = await qcow2_image(images / "c.qcow2", pattern(5, MIB), 16 * MIB)
    drive = Drive(
        file=disk,
        format=ImageFormat.QCOW2,
        serial="C",
        discard=Discard.UNMAP,
        detect_zeroes=DetectZeroes.UNMAP,
    )
    config = base_config(guest, drive)
    async with open_vm(config) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        writer = "dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek={} oflag=direct 2>/dev/null"
        await sh(vm, writer.format(0))
        info = await drives.set_cache(vm, "disk0", CacheMode.NONE)
        assert info.cache is not None
        assert (info.cache.direct, info.cache.no_flush) == (True, False)
        nodes = {n.node_name: n for n in await vm.block_nodes()}
        assert nodes["drv0-file"].cache.direct
        # The complete option set was sent: nothing reset to QEMU's defaults.
        assert not nodes["drv0"].read_only
        assert nodes["drv0"].detect_zeroes == "unmap"
        await sh(vm, writer.format(64))  # the guest keeps writing after the reopen
        info = await drives.set_cache(vm, "disk0", CacheMode.UNSAFE)
        assert info.cache is not None
        assert (info.cache.direct, info.cache.no_flush) == (False, True)
        await truth_check(vm)
        with pytest.raises(Unsupported, match="realized"):
            await drives.set_cache(vm, "disk0", CacheMode.WRITETHROUGH)
        await sh(vm, "sync")
        guest_sum = await sh(
            vm, "dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | sha256sum"
        )

        info = await drives.resize(vm, "disk0", 32 * MIB)
        assert info.size == 32 * MIB
        sectors = await sh(
            vm,
            "for i in $(seq 50); do s=$(cat /sys/block/vda/size); "
            "[ $s = 65536 ] && break; sleep 0.1; done; echo $s",
        )
        assert sectors.strip() == "65536"
        info = await drives.resize(vm, "disk0", 24 * MIB, allow_shrink=True)
        assert info.size == 24 * MIB

        info = await drives.set_throttle(vm, "disk0", {"bps_wr": 4 * MIB, "iops": 500})
        assert info.io_limits is not None
        assert (info.io_limits.bps_wr, info.io_limits.iops, info.io_limits.bps) == (4 * MIB, 500, 0)
        await truth_check(vm)
        info = await drives.set_throttle(vm, "disk0", {})
        assert info.io_limits is not None
        assert not info.io_limits.limited
        await truth_check(vm)
    offline = await image_bytes(disk, "qcow2", 2 * MIB)
    assert sha256(offline) == guest_sum.split()[0]


async def test_qemu_dying_mid_operation(guest: GuestImage, images: Path) -> None:
    disk = await qcow2_image(images / "x.qcow2", b"", 8 * MIB)
    with anyio.fail_after(60):
        async with open_vm(base_config(guest)) as vm:
            os.kill(vm.pid or 0, signal.SIGKILL)
            await vm.session.wait_lost()
            with pytest.raises(ConnectionLost):
                await drives.hotplug(vm, Drive(file=disk, format=ImageFormat.QCOW2))


async def test_cli_drive_commands_and_idempotent_apply(
    guest: GuestImage, images: Path, runtime_dir: Path
) -> None:
    from tests.integration.test_attach_cli import cli

    first = await qcow2_image(images / "one, ü.qcow2", b"", 16 * MIB)
    second = await qcow2_image(images / "two.qcow2", b"", 16 * MIB)
    up = json.loads((await cli("up", "--name", "dr", "--strict", "--json")).stdout)
    try:
        # Booted before apply's detach: a guest still booting may not answer the ACPI unplug
        # in time (apply then says pending, tested above).
        await shell_prompt_in(Path(up["console"]).with_name("console.log"))
        attached = json.loads(
            (
                await cli(
                    "attach",
                    "dr",
                    first,
                    "--format",
                    "qcow2",
                    "--bus",
                    "scsi",
                    "--cache",
                    "none",
                    "--json",
                )
            ).stdout
        )
        assert attached["device"] == "disk1"
        assert attached["cache"]["direct"] is True
        listed = json.loads((await cli("drives", "dr", "--json")).stdout)
        assert [d["device"] for d in listed] == ["disk0", "disk1"]
        bad = await cli("cache", "dr", "disk1", "fast", check=False)
        assert bad.returncode == 1
        assert bad.stderr.startswith("blockctl: ConfigError: mode: 'fast' is not one of")
        assert (
            json.loads((await cli("resize", "dr", "disk1", "32M", "--json")).stdout)["size"]
            == 32 * MIB
        )
        throttled = json.loads(
            (await cli("throttle", "dr", "disk1", "--bps-wr", "8M", "--json")).stdout
        )
        assert throttled["throttle"]["bps_wr"] == 8 * MIB
        desired = images / "want.toml"
        desired.write_text(
            f'[[drive]]\nfile = "{first}"\nformat = "qcow2"\nif = "scsi"\ncache = "unsafe"\n'
            f'size = "48M"\n\n[[drive]]\nfile = "{second}"\nformat = "qcow2"\n'
        )

        def settled(listing: str) -> Any:
            # The guest's virtio driver renegotiates disk0's write cache while it boots (QEMU
            # reports it truthfully meanwhile); blockctl changes nothing else.
            drives = json.loads(listing)
            for d in drives:
                if d["device"] == "disk0":
                    d["cache"].pop("writeback")
            return drives

        before = settled((await cli("drives", "dr", "--json")).stdout)
        dry = json.loads((await cli("apply", "dr", desired, "--dry-run", "--json")).stdout)
        assert [s["action"] for s in dry["steps"]] == ["cache", "resize", "attach", "detach"]
        # A dry run changes nothing.
        assert settled((await cli("drives", "dr", "--json")).stdout) == before
        done = json.loads((await cli("apply", "dr", desired, "--json")).stdout)
        assert done["applied"] is True
        again = json.loads((await cli("apply", "dr", desired, "--json")).stdout)
        assert again["steps"] == []
        assert again["conflicts"] == []
        final = {d["file"]: d for d in json.loads((await cli("drives", "dr", "--json")).stdout)}
        assert set(final) == {str(first), str(second)}
        assert final[str(first)]["size"] == 48 * MIB
        assert final[str(first)]["cache"]["no_flush"] is True
        detached = json.loads((await cli("detach", "dr", "disk1", "--json")).stdout)
        assert detached["state"] == "removed"
        missing = await cli("detach", "dr", "disk1", check=False)
        assert missing.returncode == 1
        assert "DriveNotFound" in missing.stderr
    finally:
        await cli("down", "dr")


async def test_hotplug_an_nbd_export(guest: GuestImage, images: Path, runtime_dir: Path) -> None:
    data = pattern(21, MIB)
    image = await qcow2_image(images / "served.qcow2", data, 8 * MIB)
    sock = runtime_dir / "nbd.sock"
    # qemu-nbd reads the qcow2 (its format named) and exports the guest-visible bytes: raw.
    server = await anyio.open_process(
        [qemu_binary("qemu-nbd"), "--format=qcow2", "--persistent", f"--socket={sock}", str(image)]
    )
    try:
        with anyio.fail_after(10):
            while not sock.exists():  # noqa: ASYNC110 - qemu-nbd has no readiness signal
                await anyio.sleep(0.05)
        async with open_vm(base_config(guest)) as vm:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            info = await drives.hotplug(
                vm, Drive(nbd=NbdSource(socket=sock), format=ImageFormat.RAW, serial="NBD")
            )
            assert info.chain[0].driver == "raw"
            assert [n.node_name for n in await vm.block_nodes() if n.node_name == "drv0-file"]
            await truth_check(vm)
            await wait_block(vm, "vda")
            got = await sh(vm, "dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum")
            assert got.split()[0] == sha256(data)
            await sh(vm, "echo over-nbd | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null")
            assert (await drives.unplug(vm, info.device_id)).state is UnplugState.REMOVED
            with pytest.raises(ConfigError, match="No such file"):
                await drives.hotplug(
                    vm, Drive(nbd=NbdSource(socket=runtime_dir / "x.sock"), format=ImageFormat.RAW)
                )
    finally:
        server.terminate()
        await server.wait()
        await server.aclose()
    assert (await image_bytes(image, "qcow2", 4096 * 512 + 9))[-9:] == b"over-nbd\n"
