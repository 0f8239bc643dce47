"""Issue 16: what blockctl reports equals what QEMU (and the guest) has, and failures say what
they left behind. Each test is the regression test of one defect of the issue, checked against
QEMU's own replies (``query-block``, ``query-named-block-nodes``, ``query-jobs``,
``query-status``) rather than against blockctl's other views.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl._ops import drives
from blockctl.types import CacheMode, Drive, ImageFormat
from tests.integration.conftest import MIB, base_config, cli_json, qcow2_image, run

pytestmark = pytest.mark.guest


async def sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def four_layer_chain(images: Path) -> list[Path]:
    """A ← B ← C ← D, all qcow2 (D on top); returns [D, C, B, A]."""
    layers = [await qcow2_image(images / "A.qcow2", b"", 8 * MIB)]
    for name in "BCD":
        layer = images / f"{name}.qcow2"
        await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", layers[-1], "-F", "qcow2", layer)
        layers.append(layer)
    return layers[::-1]


async def test_drives_shows_every_layer_of_a_chain(guest: GuestImage, images: Path) -> None:
    """Defect 1: ``drives`` walked backing files by filename and stopped at a file node."""
    layers = await four_layer_chain(images)
    config = base_config(guest, Drive(file=layers[0], format=ImageFormat.QCOW2), name="chain4")
    async with open_vm(config) as vm:
        (info,) = await drives.list_drives(vm)
        raw = {n.node_name: n for n in await vm.block_nodes()}
        assert [n.file for n in info.chain] == [str(p) for p in layers]
        assert [n.driver for n in info.chain] == ["qcow2"] * 4
        # Each layer below the top is what QEMU says the layer above it is backed by.
        for upper, lower in zip(info.chain, info.chain[1:], strict=False):
            assert raw[upper.node_name].backing_file == lower.file
        assert raw[info.chain[-1].node_name].backing_file is None
        listed = await cli_json("drives", vm.name)
        assert [c["driver"] for c in listed[0]["chain"]] == ["qcow2"] * 4


@pytest.mark.parametrize(
    "mode", [CacheMode.WRITETHROUGH, CacheMode.DIRECTSYNC, CacheMode.NONE, CacheMode.WRITEBACK]
)
async def test_write_cache_is_the_devices(guest: GuestImage, images: Path, mode: CacheMode) -> None:
    """Defect 2: ``drives`` reported the node's ``writeback`` (always true) instead of the
    device's write cache, which ``query-block`` reports."""
    disk = await qcow2_image(images / "d.qcow2", b"", 8 * MIB)
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2, cache=mode), name="wce")
    async with open_vm(config) as vm:
        # The guest's virtio driver renegotiates the write cache while it probes the disk:
        # compare once it has booted.
        await vm.console.wait_ready()  # type: ignore[union-attr]
        (info,) = await drives.list_drives(vm)
        (device,) = await vm.block_devices()
        assert device.inserted is not None
        assert device.inserted.cache.writeback is mode.write_cache
        assert info.cache is not None
        assert info.cache.writeback is mode.write_cache
        assert (info.cache.direct, info.cache.no_flush) == (mode.direct, mode.no_flush)
        listed = await cli_json("drives", vm.name)
        assert listed[0]["cache"]["writeback"] is mode.write_cache
        seen = (await sh(vm, "cat /sys/block/vda/cache_type")).strip()
        assert seen == ("write back" if mode.write_cache else "write through")
