"""``blockctl demo``: the main job on the embedded default, end to end.

Boots the bundled guest with a fresh qcow2 disk, has the guest write random data through
virtio-blk with O_DIRECT and checksum it, shuts QEMU down, and checksums the same bytes on the
host through ``qemu-img convert -f qcow2``. The two checksums must agree.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockctl import _fsutil, _guest, _images, _proc
from blockctl._machine import open_vm
from blockctl.types import Drive, ImageFormat, MachineConfig

_MIB = 1 << 20


async def run_demo(progress: Callable[[str], object] | None = None) -> dict[str, Any]:
    say = progress or (lambda _msg: None)
    guest = _guest.find_guest()
    with tempfile.TemporaryDirectory(prefix="blockctl-demo-") as tmp:
        disk = Path(tmp) / "disk0.qcow2"
        raw = Path(tmp) / "disk0.raw"
        await _images.create(disk, ImageFormat.QCOW2, size=64 * _MIB)
        config = MachineConfig(
            memory_mib=256,
            kernel=guest.kernel,
            initrd=guest.initrd,
            append=guest.append,
            drives=(Drive(file=disk, format=ImageFormat.QCOW2, serial="demo-disk"),),
        )
        started = time.monotonic()
        async with open_vm(config) as vm:
            assert vm.console is not None
            say(f"launched QEMU pid {vm.pid} with {vm.accel.accel.value} ({vm.accel.reason})")
            await vm.console.wait_ready()
            boot = time.monotonic() - started
            version = await vm.version()
            say(f"guest shell ready after {boot:.1f} s on QEMU {version}")
            serial = (await vm.console.check("cat /sys/block/vda/serial")).strip()
            await vm.console.check(
                "dd if=/dev/urandom of=/dev/vda bs=1M count=8 oflag=direct conv=fsync 2>/dev/null"
            )
            guest_sum = (
                await vm.console.check(
                    "dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum"
                )
            ).split()[0]
            say(f"guest wrote 8 MiB to /dev/vda (serial {serial!r}); sha256 {guest_sum[:16]}…")
            devices = await vm.block_devices()
        with _images.new_image_file(raw, _fsutil.PRIVATE_FILE):  # 0600, as the disk
            await _proc.run(
                [
                    _images.qemu_img_binary(),
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    str(disk),
                    str(raw),
                ]
            )
        with open(raw, "rb") as f:
            host_sum = hashlib.sha256(f.read(8 * _MIB)).hexdigest()
        say(f"host read the image back through qemu-img; sha256 {host_sum[:16]}…")
    return {
        "ok": host_sum == guest_sum and serial == "demo-disk",
        "accel": vm.accel.accel.value,
        "qemu": str(version),
        "boot_seconds": round(boot, 2),
        "serial": serial,
        "guest_sha256": guest_sum,
        "host_sha256": host_sum,
        "drives": [
            {"device": d.qdev, "node": d.inserted.node_name if d.inserted else None}
            for d in devices
        ],
    }
