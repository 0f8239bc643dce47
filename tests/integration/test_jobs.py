"""Block jobs on a running guest, driven by blockctl._jobs, checked by guest-visible data.

Every test boots the real guest under real QEMU 7.2 (TCG), so checksums are taken inside the
guest (what it reads through virtio-blk) and on the host (``qemu-img convert`` with the
explicit format) and compared.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl._graph import BlockGraph
from blockctl._jobs import JobStatus, start_job
from blockctl._qmp import wire
from blockctl.errors import JobCancelled, JobFailed
from blockctl.types import CacheMode, Drive, ImageFormat
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
)

pytestmark = pytest.mark.guest

DISK_MIB = 16
C, R, P, RDY = JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.READY
W, PEND, AB = JobStatus.WAITING, JobStatus.PENDING, JobStatus.ABORTING
CONC, NULL = JobStatus.CONCLUDED, JobStatus.NULL

#: A guest writer: 4 KiB O_DIRECT writes of fresh random data, cycling over 4 MiB at 8 MiB.
#: Double-forked (a direct `&` child dies with the shell, guest.md), PID kept in a file.
WRITER = (
    "( i=0; while :; do dd if=/dev/urandom of=/dev/vda bs=4k count=1 "
    "seek=$((2048 + i % 1024)) oflag=direct conv=notrunc 2>/dev/null; i=$((i+1)); "
    "done & echo $! > /tmp/writer.pid )"
)


async def sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def guest_sha(vm: LaunchedVM) -> str:
    await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
    out = await sh(
        vm, f"dd if=/dev/vda bs=1M count={DISK_MIB} iflag=direct 2>/dev/null | sha256sum"
    )
    return out.split()[0]


async def add_qcow2_target(vm: LaunchedVM, path: Path, name: str) -> None:
    await run("qemu-img", "create", "-q", "-f", "qcow2", path, f"{DISK_MIB}M")
    await wire.blockdev_add(
        vm.session, {"driver": "file", "node-name": f"{name}-file", "filename": str(path)}
    )
    await wire.blockdev_add(
        vm.session, {"driver": "qcow2", "node-name": name, "file": f"{name}-file"}
    )


async def del_nodes(vm: LaunchedVM, *names: str) -> None:
    for name in names:
        await wire.blockdev_del(vm.session, name)


async def graph(vm: LaunchedVM) -> BlockGraph:
    nodes = await wire.query_named_block_node_details(vm.session)
    return BlockGraph.from_qmp(nodes, await wire.query_block(vm.session))


async def assert_no_jobs(vm: LaunchedVM) -> None:
    assert await wire.query_jobs(vm.session) == ()


async def test_backup_of_a_running_guest_matches_the_guest(guest: GuestImage, images: Path) -> None:
    disk = await qcow2_image(images / "d.qcow2", pattern(1, 6 * MIB), DISK_MIB * MIB)
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2, cache=CacheMode.NONE))
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        # The guest changes its disk; the backup must see the new data.
        await sh(vm, "dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=100 oflag=direct")
        expected = await guest_sha(vm)
        target = images / "backup.qcow2"
        await add_qcow2_target(vm, target, "bk")

        async def start(job_id: str) -> None:
            await wire.blockdev_backup(vm.session, job_id=job_id, device="drv0", target="bk")

        started = time.monotonic()
        async with start_job(vm.session, "backup", start, target="drv0") as job:
            result = await job.wait(complete_on_ready=False, deadline=60)
        seconds = time.monotonic() - started
        assert result.offset == result.length == DISK_MIB * MIB
        assert result.transitions[0] is C and result.transitions[-3:] == (PEND, CONC, NULL)
        assert R in result.transitions
        await assert_no_jobs(vm)
        await del_nodes(vm, "bk", "bk-file")
        assert (await vm.status()).running
        await truth_check(vm)
    backed_up = await image_bytes(target, "qcow2", DISK_MIB * MIB)
    assert sha256(backed_up) == expected
    print(f"backup of {DISK_MIB} MiB: {seconds:.2f} s")


async def reopen_writable(vm: LaunchedVM, *nodes: str, read_only: bool = False) -> None:
    """Backing layers are opened read-only; a commit needs its target layers writable.
    Reopen them (file nodes first) with their full options, as QEMU requires, and keep
    blockctl's record of them true (as blockctl's own commit does)."""
    record = vm.registry.drives["disk0"]
    options = {str(n["node-name"]): n for n in record.nodes}
    changed = [
        {**options[name], "read-only": read_only}
        for node in nodes
        for name in (f"{node}-file", node)
    ]
    await wire.blockdev_reopen(vm.session, changed)
    by_name = {str(o["node-name"]): o for o in changed}
    vm.registry.put(
        replace(record, nodes=tuple(by_name.get(str(n["node-name"]), n) for n in record.nodes))
    )


async def test_intermediate_then_active_commit_under_a_writing_guest(
    guest: GuestImage, images: Path
) -> None:
    base = await raw_image(images / "base.raw", pattern(2, 8 * MIB), DISK_MIB * MIB)
    mid = images / "mid.qcow2"
    top = images / "top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid)
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 2M", mid)
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 2M 2M", top)
    config = base_config(guest, Drive(file=top, format=ImageFormat.QCOW2, cache=CacheMode.NONE))
    timings: dict[str, float] = {}
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        g = await graph(vm)
        assert [n.name for n in g.chain_of("disk0")] == ["drv0", "drv0-b1", "drv0-b2"]
        await reopen_writable(vm, "drv0-b2", "drv0-b1")
        await sh(vm, WRITER)

        # 1. Intermediate commit: mid → base, top stays active.
        async def commit_mid(job_id: str) -> None:
            await wire.block_commit(
                vm.session, job_id=job_id, device="drv0", top_node="drv0-b1", base_node="drv0-b2"
            )

        started = time.monotonic()
        async with start_job(vm.session, "commit", commit_mid, target="drv0-b1") as job:
            result = await job.wait(complete_on_ready=False, deadline=60)
        timings["intermediate"] = time.monotonic() - started
        assert RDY not in result.transitions and result.transitions[-2:] == (CONC, NULL)
        assert result.length > 0 and not result.completed_on_ready
        assert [n.name for n in (await graph(vm)).chain_of("disk0")] == ["drv0", "drv0-b2"]

        # 2. Active commit: top → base, READY, then job-complete pivots the device.
        async def commit_top(job_id: str) -> None:
            await wire.block_commit(vm.session, job_id=job_id, device="drv0", base_node="drv0-b2")

        started = time.monotonic()
        async with start_job(vm.session, "commit", commit_top, target="drv0") as job:
            result = await job.wait(complete_on_ready=True, deadline=60)
        timings["active"] = time.monotonic() - started
        assert RDY in result.transitions and result.completed_on_ready
        assert result.transitions[-2:] == (CONC, NULL)
        await assert_no_jobs(vm)
        g = await graph(vm)
        assert [n.name for n in g.chain_of("disk0")] == ["drv0-b2"]
        # The layers dropped by both commits still exist and still point at base.
        stale = {(u.name, u.attached) for u in g.users_of("drv0-b2") if u.kind == "overlay"}
        assert stale == {("drv0", False), ("drv0-b1", False)}
        # The guest keeps writing after the pivot, into base.raw now.
        await sh(vm, "sleep 1")
        await sh(vm, "kill $(cat /tmp/writer.pid)")
        expected = await guest_sha(vm)
        # The dropped nodes keep their files open until blockdev-del.
        await del_nodes(vm, "drv0", "drv0-file", "drv0-b1", "drv0-b1-file")
        assert set((await graph(vm)).nodes) == {"drv0-b2", "drv0-b2-file"}
        assert (await vm.status()).running
        await truth_check(vm)
    on_disk = await image_bytes(base, "raw", DISK_MIB * MIB)
    assert sha256(on_disk) == expected
    print(f"commit timings: {timings}")


async def test_failing_backup_raises_qemus_error_and_the_guest_runs_on(
    guest: GuestImage, images: Path
) -> None:
    disk = await qcow2_image(images / "d.qcow2", pattern(3, 4 * MIB), DISK_MIB * MIB)
    bad = await raw_image(images / "bad.raw", b"", DISK_MIB * MIB)
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2))
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        s = vm.session
        await wire.blockdev_add(
            s, {"driver": "file", "node-name": "bad-file", "filename": str(bad)}
        )
        await wire.blockdev_add(
            s,
            {
                "driver": "blkdebug",
                "node-name": "bad-dbg",
                "image": "bad-file",
                "inject-error": [{"event": "write_aio", "errno": 5}],
            },
        )
        await wire.blockdev_add(s, {"driver": "raw", "node-name": "bad", "file": "bad-dbg"})

        async def start(job_id: str) -> None:
            await wire.blockdev_backup(s, job_id=job_id, device="drv0", target="bad")

        async with start_job(s, "backup", start, target="drv0") as job:
            with pytest.raises(JobFailed) as info:
                await job.wait(complete_on_ready=False, deadline=60)
        err = info.value
        assert err.error == "Input/output error"
        assert err.job_id == job.id and err.job_type == "backup" and err.target == "drv0"
        assert err.offset is not None and err.length == DISK_MIB * MIB
        assert err.offset < err.length
        assert AB in job.transitions and job.transitions[-2:] == (CONC, NULL)
        await assert_no_jobs(vm)
        await del_nodes(vm, "bad", "bad-dbg", "bad-file")
        assert (await vm.status()).running
        assert await sh(vm, "echo alive") == "alive\n"
        await truth_check(vm)


async def test_cancel_midway_leaves_everything_consistent(guest: GuestImage, images: Path) -> None:
    disk = await qcow2_image(images / "d.qcow2", pattern(4, 12 * MIB), DISK_MIB * MIB)
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2, cache=CacheMode.NONE))
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        before = await guest_sha(vm)
        await add_qcow2_target(vm, images / "slow.qcow2", "slow")

        async def slow(job_id: str) -> None:
            await wire.blockdev_backup(
                vm.session, job_id=job_id, device="drv0", target="slow", speed=1 * MIB
            )

        async with start_job(vm.session, "backup", slow, target="drv0", speed=MIB) as job:
            info = None
            with anyio.fail_after(30):
                while info is None or info.current_progress == 0:
                    await anyio.sleep(0.1)
                    info = await job.info()
            await job.cancel()
            with pytest.raises(JobCancelled) as cancelled:
                await job.wait(complete_on_ready=False, deadline=30)
        assert 0 < (cancelled.value.offset or 0) < DISK_MIB * MIB
        assert job.transitions[-3:] == (AB, CONC, NULL)
        await assert_no_jobs(vm)
        await del_nodes(vm, "slow", "slow-file")
        # The source is untouched; a new backup (new id, full speed) succeeds after it.
        assert await guest_sha(vm) == before
        target = images / "again.qcow2"
        await add_qcow2_target(vm, target, "again")

        async def again(job_id: str) -> None:
            await wire.blockdev_backup(vm.session, job_id=job_id, device="drv0", target="again")

        async with start_job(vm.session, "backup", again) as job:
            await job.wait(complete_on_ready=False, deadline=60)
        await del_nodes(vm, "again", "again-file")
        await assert_no_jobs(vm)
        await truth_check(vm)
    assert sha256(await image_bytes(target, "qcow2", DISK_MIB * MIB)) == before


async def test_cancelling_a_ready_active_commit_does_not_pivot(
    guest: GuestImage, images: Path
) -> None:
    base = await raw_image(images / "base.raw", pattern(5, 4 * MIB), DISK_MIB * MIB)
    top = images / "top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", top)
    config = base_config(guest, Drive(file=top, format=ImageFormat.QCOW2, cache=CacheMode.NONE))
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        before = await guest_sha(vm)
        await reopen_writable(vm, "drv0-b1")

        async def commit(job_id: str) -> None:
            await wire.block_commit(vm.session, job_id=job_id, device="drv0", base_node="drv0-b1")

        async with start_job(vm.session, "commit", commit, target="drv0") as job:
            await job.wait_ready(deadline=60)
            await job.cancel()
            with pytest.raises(JobCancelled):
                await job.wait(complete_on_ready=False, deadline=30)
        assert job.transitions[:3] == (C, R, RDY) and job.transitions[-2:] == (CONC, NULL)
        await assert_no_jobs(vm)
        g = await graph(vm)
        assert [n.name for n in g.chain_of("disk0")] == ["drv0", "drv0-b1"]  # no pivot
        assert await guest_sha(vm) == before
        # The base stays a backing layer: read-only again, as blockctl's commit leaves it.
        await reopen_writable(vm, "drv0-b1", read_only=True)
        await truth_check(vm)
