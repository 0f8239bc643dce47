"""Hot-plug slots: q35's PCIe root ports, and a full 'pc' root bus, with the real guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl._ops import drives
from blockctl._ops.apply import Action, DesiredDrive, apply
from blockctl._ops.drives import UnplugState
from blockctl.errors import NoFreeSlot
from blockctl.types import Drive, ImageFormat, Interface, MachineConfig
from tests.integration.conftest import (
    MIB,
    STRICT,
    base_config,
    pattern,
    qcow2_image,
    run,
    sha256,
    truth_check,
)
from tests.integration.test_hotplug import sh, wait_block

pytestmark = pytest.mark.guest


async def nodes(vm: LaunchedVM) -> set[str]:
    return {n.node_name for n in await vm.block_nodes()}


async def test_q35_hotplug_uses_root_ports_frees_and_reuses_them(
    guest: GuestImage, images: Path
) -> None:
    data = pattern(35, 2 * MIB)
    virtio_img = await qcow2_image(images / "v.qcow2", data, 16 * MIB)
    scsi_img = await qcow2_image(images / "s.qcow2", b"", 16 * MIB)
    spare_img = await qcow2_image(images / "spare.qcow2", b"", 16 * MIB)
    async with open_vm(base_config(guest, machine="q35", hotplug_slots=2)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        slots = await drives.hotplug_slots(vm)
        assert slots.pcie
        assert slots.free == ("hp0", "hp1")

        await drives.hotplug(vm, Drive(file=virtio_img, format=ImageFormat.QCOW2, serial="Q35"))
        await drives.hotplug(
            vm, Drive(file=scsi_img, format=ImageFormat.QCOW2, interface=Interface.SCSI)
        )
        await wait_block(vm, "vda")
        await wait_block(vm, "sda")
        guest_sum = await sh(vm, "dd if=/dev/vda bs=1M count=2 2>/dev/null | sha256sum")
        assert guest_sum.split()[0] == sha256(data)
        await sh(vm, "dd if=/dev/vda of=/dev/sda bs=1M count=2 oflag=direct 2>/dev/null")
        copied = await sh(vm, "dd if=/dev/sda bs=1M count=2 iflag=direct 2>/dev/null | sha256sum")
        assert copied.split()[0] == sha256(data)
        # The virtio disk took one port, the on-demand virtio-scsi controller the other.
        slots = await drives.hotplug_slots(vm)
        assert dict(slots.ports) == {"hp0": "disk0", "hp1": "scsi0"}
        assert slots.free == ()

        # A third PCI device has nowhere to go: refused by name, with the ways out, nothing left.
        before = await nodes(vm)
        with pytest.raises(NoFreeSlot) as refused:
            await drives.hotplug(vm, Drive(file=spare_img, format=ImageFormat.QCOW2))
        message = str(refused.value)
        assert "hp0: disk0" in message and "hp1: scsi0" in message
        assert "--bus scsi" in message and "hotplug-slots" in message
        assert await nodes(vm) == before
        assert {d.device_id for d in await drives.list_drives(vm)} == {"disk0", "disk1"}
        # A SCSI disk needs no slot of its own.
        await drives.hotplug(
            vm, Drive(file=spare_img, format=ImageFormat.QCOW2, interface=Interface.SCSI)
        )
        await wait_block(vm, "sdb")

        # Unplug frees the port; the next virtio disk reuses it and the guest reads it again.
        assert (await drives.unplug(vm, "disk0")).state is UnplugState.REMOVED
        await wait_block(vm, "vda", present=False)
        assert (await drives.hotplug_slots(vm)).free == ("hp0",)
        again = await drives.hotplug(vm, Drive(file=virtio_img, format=ImageFormat.QCOW2))
        await wait_block(vm, "vda")
        assert dict((await drives.hotplug_slots(vm)).ports)["hp0"] == again.device_id
        guest_sum = await sh(vm, "dd if=/dev/vda bs=1M count=2 2>/dev/null | sha256sum")
        assert guest_sum.split()[0] == sha256(data)
        await truth_check(vm)


async def test_q35_without_root_ports_names_the_way_out(images: Path) -> None:
    img = await qcow2_image(images / "d.qcow2", b"", 16 * MIB)
    config = MachineConfig(machine="q35", hotplug_slots=0, deprecated_input=STRICT)
    async with open_vm(config, console=False) as vm:
        assert (await drives.hotplug_slots(vm)).ports == ()
        before = await nodes(vm)
        with pytest.raises(NoFreeSlot, match=r"no PCIe root port.*hotplug-slots"):
            await drives.hotplug(vm, Drive(file=img, format=ImageFormat.QCOW2))
        assert await nodes(vm) == before


async def test_a_full_pc_bus_is_refused_with_the_way_out(images: Path) -> None:
    """No guest needed: device_add on 'pc' completes without one. The free count blockctl
    reports predicts exactly when QEMU runs out of slots."""
    async with open_vm(MachineConfig(deprecated_input=STRICT), console=False) as vm:
        free = (await drives.hotplug_slots(vm)).free_count
        assert free > 0
        for i in range(free):
            img = await qcow2_image(images / f"d{i}.qcow2", b"", MIB)
            await drives.hotplug(vm, Drive(file=img, format=ImageFormat.QCOW2))
        assert (await drives.hotplug_slots(vm)).free_count == 0
        before = await nodes(vm)
        last = await qcow2_image(images / "last.qcow2", b"", MIB)
        with pytest.raises(NoFreeSlot, match=r"every slot of the PCI root bus.*--bus scsi"):
            await drives.hotplug(vm, Drive(file=last, format=ImageFormat.QCOW2))
        assert await nodes(vm) == before
        # The way out works: SCSI disks share the controller's one slot... which needs a slot
        # too, so a full bus also refuses the controller, by the same rule.
        with pytest.raises(NoFreeSlot):
            await drives.hotplug(
                vm, Drive(file=last, format=ImageFormat.QCOW2, interface=Interface.SCSI)
            )
        assert await nodes(vm) == before


async def test_a_hundred_scsi_disks_by_apply_attach_idempotently_and_detach(
    guest: GuestImage, images: Path
) -> None:
    """virtio-scsi holds them all on one slot; `apply` stays idempotent at that size."""
    count = 100
    files = []
    for i in range(count):
        path = images / f"many{i:03}.qcow2"
        await run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
        files.append(path)
    desired = [
        DesiredDrive(
            drive=Drive(file=f, format=ImageFormat.QCOW2, interface=Interface.SCSI, serial=f.stem)
        )
        for f in files
    ]
    async with open_vm(base_config(guest, machine="q35", hotplug_slots=1)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        before = await nodes(vm)
        done = await apply(vm, desired)
        assert [s.action for s in done.steps] == [Action.ATTACH] * count
        # One port holds the controller; the guest sees every disk.
        assert dict((await drives.hotplug_slots(vm)).ports) == {"hp0": "scsi0"}
        seen = await sh(
            vm,
            f"for i in $(seq 100); do [ $(ls /sys/block | grep -c '^sd') = {count} ] && break; "
            "sleep 0.2; done; ls /sys/block | grep -c '^sd'",
        )
        assert int(seen) == count
        assert (await apply(vm, desired)).empty  # a second apply has nothing to do
        removed = await apply(vm, [])
        assert [s.action for s in removed.steps] == [Action.DETACH] * count
        left = await sh(
            vm,
            "for i in $(seq 100); do ls /sys/block | grep -q '^sd' || break; sleep 0.2; done; "
            "ls /sys/block | grep -c '^sd' || true",
        )
        assert int(left) == 0
        assert await nodes(vm) == before
        await truth_check(vm)
