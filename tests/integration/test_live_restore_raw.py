"""Live restore into a raw target (issue 18): the guest's disk runs on a temporary qcow2
overlay over the backup's NBD server, mirrored (write-blocking) into a new raw file; at READY
the device pivots onto the raw node, then the overlay, the backup nodes and the server go."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from blockctl import GuestImage, backup, open_vm
from blockctl import attach as attach_vm
from blockctl._backup import live
from blockctl._backup.store import Repository
from blockctl._jobs import JobControl
from blockctl._machine import VM
from blockctl._qmp import wire
from blockctl.types import ImageFormat
from tests.integration.conftest import MIB, qcow2_image, run, running, sha256, truth_check
from tests.integration.test_backup import config, disk_sha, sh, write
from tests.integration.test_live_restore import (
    GUEST_WRITES,
    ROOT,
    WAIT_VDB,
    StreamWatch,
    fill,
    guest_fill,
    nbdkit,  # noqa: F401 (the fixture: nbdkit is required)
    nbdkit_pids_under,
    node_names,
    read_sha,
    tree_digest,
)

#: The disk: larger than what a mirror copies in one request (its buffer, 16 MiB), so at
#: 1 B/s it is mid-copy (one request done, then waiting) until the speed changes.
DISK_MIB = 64
#: The guest's writes: :data:`GUEST_WRITES` (inside the first request's range: each must reach
#: the target through the write-blocking mirror) and one far beyond it (not copied yet).
RAW_WRITES = (*GUEST_WRITES, (40960, 128, 0x5A))


async def nodes_of(vm: VM) -> set[str]:
    return {n.node_name for n in await vm.block_nodes()}


def overlays(directory: Path) -> list[Path]:
    return list(directory.glob("*live-overlay*"))


async def raw_reference(repo: Repository, vm_name: str, point: str, path: Path) -> Path:
    """Built without live restore: the point restored plainly, then :data:`RAW_WRITES`
    applied offline at the same offsets."""
    await backup.restore(repo, vm_name, point, "disk0", path, ImageFormat.RAW)
    for offset, kib, byte in RAW_WRITES:
        await run(
            "qemu-io", "-f", "raw", "-c", f"write -P {byte} {offset * 1024} {kib * 1024}", path
        )
    return path


@pytest.mark.guest
async def test_live_restore_into_a_raw_file_while_the_guest_reads_and_writes(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    repo = backup.init_repository(tmp_path / "repo", chunk_size=256 * 1024)
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    target = images / "live.raw"
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
                # The overlay exists while the copy runs, next to the target.
                assert len(overlays(images)) == 1
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
        assert [n["driver"] for n in record.nodes] == ["file", "raw"]
        assert record.nodes[0]["filename"] == str(target)
        assert after == before | set(record.node_names)
        assert await wire.query_jobs(vm.session) == ()
        assert overlays(images) == []
        assert vm.run_dir is not None and not list(vm.run_dir.glob("journal-*.json"))
        await truth_check(vm)
    (started,) = [e for e in logs if e["event"] == "blockctl.backup.export_started"]
    assert not running(started["pid"])
    info = json.loads(await run("qemu-img", "info", "--output=json", "-f", "raw", target))
    assert info["virtual-size"] == DISK_MIB * MIB
    # The reference, built without live restore: the point restored plainly, then the
    # guest's writes applied offline at the same offsets.
    want = await raw_reference(repo, "lrr", point.id, tmp_path / "reference.raw")
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", target, want)
    assert sha256(want.read_bytes()) == during


@pytest.mark.guest
async def test_a_controller_killed_mid_mirror_then_recover_pivots_with_every_guest_write(
    guest: GuestImage, images: Path, tmp_path: Path, runtime_dir: Path
) -> None:
    """kill -9 of the controller mid-copy (the mirror runs at 1 B/s: under way, far from
    done). The guest reads every block and writes; ``blockctl recover`` adopts the mirror,
    pivots at READY and cleans up: the raw file stands alone, equal to the point plus the
    guest's writes; no overlay, server, node or record left; the repository unchanged."""
    from tests.integration.test_attach_cli import cli
    from tests.integration.test_backup_faults import detached

    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "k0.qcow2", b"", DISK_MIB * MIB)
    target = images / "live.raw"
    run_dir = runtime_dir / "lrrk"
    async with detached(guest, "lrrk", disk) as console:
        await console.check(
            "dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct conv=fsync 2>/dev/null"
        )
        async with attach_vm("lrrk") as vm:
            point = await backup.create(vm, repo)
            before = await nodes_of(vm)
        hashes = tree_digest(repo.path)
        want = (await console.check(read_sha("vda", DISK_MIB))).split()[0]
        arguments = {
            "repo": str(repo.path),
            "point": point.id,
            "device": "disk0",
            "target": str(target),
            "speed": 1,
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "tests.integration.crash_child", "lrrk", "live-raw"]
        killed = await anyio.run_process(
            [*argv, "running", json.dumps(arguments)], check=False, env=env
        )
        assert killed.returncode == -9, killed.stderr.decode()
        (server,) = nbdkit_pids_under(run_dir)
        (record,) = list(run_dir.glob("journal-*.json"))
        written = json.loads(record.read_text())
        assert written["kind"] == "mirror" and written["server"]["pid"] == server
        assert len(overlays(images)) == 1
        # The controller is gone; the mirror runs on in QEMU; the guest reads the disk whole
        # and writes to it.
        await console.check(WAIT_VDB)
        assert (await console.check(read_sha("vdb", DISK_MIB))).split()[0] == want
        for write_ in RAW_WRITES:
            await console.check(fill("vdb", *write_))
        during = (await console.check(read_sha("vdb", DISK_MIB))).split()[0]
        done = json.loads((await cli("recover", "lrrk", "--json")).stdout)
        (result,) = [r for r in done["operations"] if r["kind"] == "mirror"]
        assert result["verdict"] == "finished", result
        assert nbdkit_pids_under(run_dir) == [] and not running(server)
        assert not list(run_dir.glob("journal-*.json"))
        assert overlays(images) == []
        listed = json.loads((await cli("drives", "lrrk", "--json")).stdout)
        assert [n["filename"] for n in listed[-1]["chain"]] == [str(target)]
        assert (await console.check(read_sha("vdb", DISK_MIB))).split()[0] == during
        async with attach_vm("lrrk") as vm:
            assert await wire.query_jobs(vm.session) == ()
            (device,) = set(vm.registry.drives) - {"disk0"}
            assert await nodes_of(vm) == before | set(vm.registry.drives[device].node_names)
            await truth_check(vm)
    assert tree_digest(repo.path) == hashes
    want_file = await raw_reference(repo, "lrrk", point.id, tmp_path / "r.raw")
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", target, want_file)
