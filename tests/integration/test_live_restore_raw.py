"""Live restore into a raw target (issue 18): the guest's disk runs on a temporary qcow2
overlay over the backup's NBD server, mirrored (write-blocking) into a new raw file or a block
device; at READY the device pivots onto the raw node, then the overlay, the backup nodes and
the server go. (The kill points are test_live_restore.py's, parametrized over the target.)"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from blockctl import GuestImage, backup, open_vm
from blockctl._backup import live
from blockctl._jobs import JobControl
from blockctl._qmp import wire
from blockctl.types import ImageFormat
from tests.integration.conftest import MIB, qcow2_image, run, running, sha256, truth_check
from tests.integration.test_backup import config, disk_sha, sh, write
from tests.integration.test_live_restore import (
    LIVE_TARGETS,
    RAW_DISK_MIB,
    RAW_WRITES,
    WAIT_VDB,
    StreamWatch,
    guest_fill,
    nbdkit,  # noqa: F401 (the fixture: nbdkit is required)
    node_names,
    reference,
    target_path,
)

DISK_MIB = RAW_DISK_MIB


@pytest.mark.guest
@pytest.mark.parametrize("fmt", ["raw", "device"])
async def test_live_restore_into_a_raw_target_while_the_guest_reads_and_writes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    loop_devices: Callable[[Path], Awaitable[Path]],
    fmt: str,
) -> None:
    """Into a new raw file, or a block device (a loop device 1 MiB larger than the disk:
    the guest sees the disk's size)."""
    live_target = LIVE_TARGETS[fmt]
    repo = backup.init_repository(tmp_path / "repo", chunk_size=256 * 1024)
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    target = await target_path(live_target, images, loop_devices)
    watch = StreamWatch()  # the mirror's id, once it runs
    async with open_vm(config(guest, "lrr", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 4096)
        await write(vm, "vda", 8192, 1024)
        point = await backup.create(vm, repo)
        at_point = await disk_sha(vm, "vda", DISK_MIB)
        before = await node_names(vm)
        results: list[live.LiveRestoreResult] = []

        async def restore() -> None:
            # 1 byte/s: the mirror copies at most one request, then waits for the speed
            # change below; everything the guest does meanwhile is during the copy.
            results.append(
                await backup.restore_live(
                    vm,
                    repo,
                    "lrr",
                    point.id,
                    "disk0",
                    target,
                    control=JobControl(speed=1, hooks=(watch,)),
                    target_format=ImageFormat.RAW,
                )
            )

        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(restore)
                await watch.running.wait()
                assert watch.job_id is not None
                await sh(vm, WAIT_VDB)
                # The overlay exists while the copy runs (next to a file target; in the
                # run directory for a device).
                assert vm.run_dir is not None
                assert len(live_target.overlays(images, vm.run_dir)) == 1
                # The guest reads the whole disk through the overlay and the backup ...
                assert await disk_sha(vm, "vdb", DISK_MIB) == at_point
                # ... and writes to it.
                for offset, kib, byte in RAW_WRITES:
                    await guest_fill(vm, "vdb", offset, kib, byte)
                during = await disk_sha(vm, "vdb", DISK_MIB)
                jobs = await wire.query_jobs(vm.session)
                assert [(j.id, j.type) for j in jobs] == [(watch.job_id, "mirror")]
                assert any(n.startswith("bclr-") for n in await node_names(vm))
                await vm.command("block-job-set-speed", {"device": watch.job_id, "speed": 0})
        (result,) = results
        assert result.job.completed_on_ready and result.job.offset == result.job.length
        # After the pivot: the guest's writes are there; the device is on the raw file alone.
        assert await disk_sha(vm, "vdb", DISK_MIB) == during
        after = await node_names(vm)
        assert not [n for n in after if n.startswith("bclr-")]
        record = vm.registry.drives[result.device_id]
        file_driver = "host_device" if live_target.device else "file"
        assert [n["driver"] for n in record.nodes] == [file_driver, "raw"]
        assert record.nodes[0]["filename"] == str(target)
        # The device's raw node is the disk's size, not the (larger) device's.
        sizes = {n.node_name: n.virtual_size for n in await vm.block_nodes()}
        assert sizes[record.nodes[-1]["node-name"]] == DISK_MIB * MIB
        assert after == before | set(record.node_names)
        assert await wire.query_jobs(vm.session) == ()
        assert live_target.overlays(images, vm.run_dir) == []
        assert not list(vm.run_dir.glob("journal-*.json"))
        await truth_check(vm)
    (started,) = [e for e in logs if e["event"] == "blockctl.backup.export_started"]
    assert not running(started["pid"])
    info = json.loads(await run("qemu-img", "info", "--output=json", "-f", "raw", target))
    assert info["virtual-size"] == (DISK_MIB + live_target.device) * MIB
    # The reference, built without live restore: the point restored plainly, then the
    # guest's writes applied offline at the same offsets. (A device's last MiB, beyond the
    # disk, is compared against zeros: nothing was written there.)
    want = await reference(repo, "lrr", point.id, tmp_path / "reference.raw", RAW_WRITES)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", target, want)
    assert sha256(want.read_bytes()) == during
