"""Every drive option reaches QEMU as intended: seen through QMP, inside the guest, on disk.

One VM carries all the drives (a boot costs seconds on TCG); each test function checks one
aspect of it through a shared, module-scoped launch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from blockctl import GuestImage, LaunchedVM
from blockctl._qmp.models import BlockDevice, BlockNode
from blockctl.types import (
    Aio,
    BootConfig,
    CacheMode,
    DetectZeroes,
    Discard,
    Drive,
    ImageFormat,
    Interface,
    Media,
)
from tests.integration.conftest import (
    MIB,
    base_config,
    image_bytes,
    pattern,
    qcow2_image,
    raw_image,
    run,
    sha256,
    truth_check,
    vm_in_background,
)

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Rig:
    vm: LaunchedVM
    images: Path
    data: dict[str, bytes]
    nodes: dict[str, BlockNode]
    devices: dict[str, BlockDevice]

    async def sh(self, command: str) -> str:
        assert self.vm.console is not None
        return await self.vm.console.check(command)

    async def guest_sha(self, dev: str, mib: int) -> str:
        out = await self.sh(f"dd if={dev} bs=1M count={mib} 2>/dev/null | sha256sum")
        return out.split()[0]

    async def virtio_by_serial(self) -> dict[str, str]:
        out = await self.sh("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial); done")
        return {
            serial: f"/dev/{dev}" for dev, serial in (line.split() for line in out.splitlines())
        }

    async def flush(self, dev: str) -> None:
        """fsync the block device: the guest's FLUSH makes QEMU write its cached qcow2
        metadata, so ``qemu-img map -U`` on the host sees the current allocation."""
        await self.sh(f"dd if=/dev/null of={dev} count=0 conv=fsync 2>/dev/null")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(
    guest: GuestImage, tmp_path_factory: pytest.TempPathFactory, module_runtime_dir: Path
) -> AsyncIterator[Rig]:
    images = tmp_path_factory.mktemp("drives")
    data = {name: pattern(seed, 2 * MIB) for seed, name in enumerate("ABCDE")}
    d0 = await qcow2_image(images / "d0.qcow2", data["A"], 16 * MIB)
    d1 = await raw_image(images / "d1.raw", data["B"], 8 * MIB)
    d2 = await qcow2_image(images / "d2.qcow2", b"", 16 * MIB)
    d3 = await raw_image(images / "d3.iso", data["C"])
    d4 = await qcow2_image(images / "d4.qcow2", data["D"], 8 * MIB)
    d5_base = await raw_image(images / "d5-base.raw", data["E"], 8 * MIB)
    d5 = images / "d5-top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", d5_base, "-F", "raw", d5)
    d6 = await raw_image(images / "d6.img", b"", 1440 * 1024)
    d7 = await qcow2_image(images / "d7.qcow2", b"", 8 * MIB)
    config = base_config(
        guest,
        Drive(
            file=d0,
            format=ImageFormat.QCOW2,
            serial="D0-NONE",
            cache=CacheMode.NONE,
            aio=Aio.NATIVE,
            discard=Discard.UNMAP,
            detect_zeroes=DetectZeroes.UNMAP,
            bootindex=1,
        ),
        Drive(
            file=d1,
            format=ImageFormat.RAW,
            serial="D1-RO",
            read_only=True,
            cache=CacheMode.DIRECTSYNC,
        ),
        Drive(
            file=d2,
            format=ImageFormat.QCOW2,
            interface=Interface.SCSI,
            serial="D2-SCSI",
            cache=CacheMode.WRITETHROUGH,
        ),
        Drive(file=d3, format=ImageFormat.RAW, interface=Interface.IDE, media=Media.CDROM),
        Drive(
            file=d4,
            format=ImageFormat.QCOW2,
            serial="D4-SNAP",
            snapshot=True,
            cache=CacheMode.UNSAFE,
        ),
        Drive(file=d5, format=ImageFormat.QCOW2, serial="D5-COR", copy_on_read=True),
        Drive(file=d6, format=ImageFormat.RAW, interface=Interface.FLOPPY),
        Drive(
            file=d7,
            format=ImageFormat.QCOW2,
            interface=Interface.IDE,
            index=2,
            serial="D7-IDE",
            bootindex=2,
        ),
        boot=BootConfig(order="dc", menu=True, splash_time=500, strict=True),
        name="drives",
    )
    async with vm_in_background(config) as vm:
        nodes = {n.node_name: n for n in await vm.block_nodes()}
        devices = {d.device_id or "": d for d in await vm.block_devices()}
        yield Rig(vm=vm, images=images, data=data, nodes=nodes, devices=devices)
        await truth_check(vm)


async def test_nodes_are_explicit_and_named_by_blockctl(rig: Rig) -> None:
    assert rig.nodes["drv0"].driver == "qcow2"
    assert rig.nodes["drv0-file"].driver == "file"
    # The backing chain of d5 was opened layer by layer with the declared formats.
    assert rig.nodes["drv5-b1"].driver == "raw"
    assert rig.nodes["drv5-b1"].read_only
    assert rig.nodes["drv5"].backing_file == str(rig.images / "d5-base.raw")
    assert rig.nodes["drv5-cor"].driver == "copy-on-read"
    assert rig.devices["disk5"].inserted is not None
    assert rig.devices["disk5"].inserted.node_name == "drv5-cor"


async def test_cache_modes(rig: Rig) -> None:
    none, directsync = rig.nodes["drv0-file"], rig.nodes["drv1-file"]
    assert (none.cache.direct, none.cache.no_flush) == (True, False)
    assert (directsync.cache.direct, directsync.cache.no_flush) == (True, False)
    assert rig.nodes["drv4-snap"].cache.no_flush  # unsafe
    assert not rig.nodes["drv2"].cache.direct  # writethrough
    # The guest-visible write cache: query-block reports the device's WCE as "writeback".
    wce = {dev: d.inserted.cache.writeback for dev, d in rig.devices.items() if d.inserted}
    assert wce["disk0"] is True and wce["disk4"] is True
    assert wce["disk1"] is False and wce["disk2"] is False
    assert (await rig.sh("cat /sys/block/vda/cache_type")).strip() == "write back"
    scsi = await rig.sh(
        "for d in /sys/block/sd*; do strings $d/device/vpd_pg80 | tr -d ' '; "
        "cat $d/device/scsi_disk/*/cache_type; done"
    )
    lines = scsi.splitlines()
    assert lines[lines.index("D2-SCSI") + 1] == "write through"
    assert lines[lines.index("D7-IDE") + 1] == "write back"


async def test_serials_and_data_reach_the_guest(rig: Rig) -> None:
    by_serial = await rig.virtio_by_serial()
    assert set(by_serial) == {"D0-NONE", "D1-RO", "D4-SNAP", "D5-COR"}
    assert await rig.guest_sha(by_serial["D0-NONE"], 2) == sha256(rig.data["A"])
    assert await rig.guest_sha(by_serial["D1-RO"], 2) == sha256(rig.data["B"])
    assert await rig.guest_sha(by_serial["D5-COR"], 2) == sha256(rig.data["E"])


async def test_read_only_disk_and_cdrom(rig: Rig) -> None:
    ro = (await rig.virtio_by_serial())["D1-RO"]
    assert rig.nodes["drv1"].read_only
    assert (await rig.sh(f"cat /sys/block/{ro[5:]}/ro")).strip() == "1"
    assert rig.vm.console is not None
    write = await rig.vm.console.run(f"echo x | dd of={ro} conv=fsync 2>&1")
    assert write.returncode != 0
    cd = rig.devices["disk3"]
    assert cd.removable
    assert cd.inserted is not None
    assert cd.inserted.read_only
    assert (await rig.sh("cat /sys/block/sr0/ro")).strip() == "1"
    assert await rig.guest_sha("/dev/sr0", 2) == sha256(rig.data["C"])


async def test_scsi_and_ide_disks_appear(rig: Rig) -> None:
    serials = await rig.sh("for d in /sys/block/sd*; do strings $d/device/vpd_pg80; done")
    assert {s.strip() for s in serials.splitlines()} == {"D2-SCSI", "D7-IDE"}
    assert rig.devices["disk2"].inserted is not None
    assert rig.devices["disk7"].inserted is not None


async def test_floppy(rig: Rig) -> None:
    # The guest kernel has no floppy driver; QEMU's view is the evidence here.
    floppy = rig.devices["disk6"]
    assert floppy.inserted is not None
    assert floppy.inserted.node_name == "drv6"
    assert floppy.removable
    assert await rig.vm.qom_get("/machine/peripheral/disk6", "unit") == 0


async def test_discard_and_detect_zeroes(rig: Rig) -> None:
    assert rig.nodes["drv0"].detect_zeroes == "unmap"
    vda = (await rig.virtio_by_serial())["D0-NONE"]
    await rig.sh(f"blkdiscard {vda}")
    await rig.flush(vda)
    mapping = await run(
        "qemu-img", "map", "-U", "-f", "qcow2", "--output=json", rig.images / "d0.qcow2"
    )
    # discard=unmap passed the guest's discard down: no data cluster is left in the image.
    assert '"data": true' not in mapping


async def test_snapshot_overlay_keeps_the_image_unchanged(rig: Rig) -> None:
    snap = (await rig.virtio_by_serial())["D4-SNAP"]
    await rig.sh(f"dd if=/dev/zero of={snap} bs=1M count=2 oflag=direct 2>/dev/null")
    assert await rig.guest_sha(snap, 2) == sha256(bytes(2 * MIB))
    assert rig.nodes["drv0"].read_only is False
    assert rig.nodes["drv4"].read_only  # the real image is opened read-only
    before = await image_bytes(rig.images / "d4.qcow2", "qcow2", 2 * MIB)
    assert before == rig.data["D"]


async def test_copy_on_read_populates_the_top_image(rig: Rig) -> None:
    cor = (await rig.virtio_by_serial())["D5-COR"]
    await rig.sh(f"dd if={cor} of=/dev/null bs=1M count=2 iflag=direct 2>/dev/null")
    await rig.flush(cor)
    mapping = await run(
        "qemu-img", "map", "-U", "-f", "qcow2", "--output=json", rig.images / "d5-top.qcow2"
    )
    # Reads through the copy-on-read filter copied the base's clusters into the top image.
    assert '"depth": 0, "present": true, "zero": false, "data": true' in mapping


async def test_boot_order_and_bootindex(rig: Rig) -> None:
    boot = await rig.vm.qom_get("/machine", "boot")
    assert boot == {"order": "dc", "menu": True, "splash-time": 500, "strict": True}
    assert await rig.vm.qom_get("/machine/peripheral/disk0", "bootindex") == 1
    assert await rig.vm.qom_get("/machine/peripheral/disk7", "bootindex") == 2
