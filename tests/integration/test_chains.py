"""Snapshots, commit and stream under a guest that keeps writing: nothing may be lost.

Two guest writers run throughout (O_DIRECT): a sequence writer puts ``SEQ %08d`` records into
4 KiB block ``i % 512`` of disk0, a bulk writer random 64 KiB blocks into disk1. After the
chain operations, the writers stop, the guest checksums both disks, QEMU shuts down, and the
same bytes are read offline with their formats: equal checksums, every SEQ record the latest
one for its block, ``qemu-img check`` clean, ``query-jobs`` empty.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from blockctl import GuestImage, LaunchedVM, attach, open_vm
from blockctl._images import check
from blockctl._ops import chains
from blockctl._qmp import wire
from blockctl._qmp.session import QMPSession
from blockctl.errors import (
    CommandFailed,
    ConfigError,
    JobFailed,
    JobNeverReady,
    NodeNotFound,
    OperationTimeout,
    UnsafeOperation,
)
from blockctl.jobs import JobControl
from blockctl.types import Drive, ErrorPolicy, ImageFormat
from tests.conftest import missing
from tests.integration.conftest import (
    MIB,
    PauseSignal,
    base_config,
    image_bytes,
    pattern,
    qcow2_image,
    raw_image,
    resume_from_cli,
    run,
    sha256,
    truth_check,
)

pytestmark = pytest.mark.guest

DISK_MIB = 8
SEQ_BLOCKS = 512
SEQ_WRITER = (
    "( i=0; while [ ! -e /tmp/stop ]; do printf 'SEQ %08d\\n' $i | dd of=/dev/vda bs=4096 "
    f"seek=$((i % {SEQ_BLOCKS})) conv=sync,notrunc oflag=direct 2>/dev/null && echo $i > /tmp/seq"
    "; i=$((i+1)); done; touch /tmp/seq.done ) &"
)
BULK_WRITER = (
    "( i=0; while [ ! -e /tmp/stop ]; do dd if=/dev/urandom of=/dev/vdb bs=64k count=1 "
    "seek=$((i % 128)) conv=notrunc oflag=direct 2>/dev/null; i=$((i+1)); done; "
    "touch /tmp/bulk.done ) &"
)


async def sh(vm: LaunchedVM, command: str, timeout: float = 60) -> str:
    assert vm.console is not None
    return await vm.console.check(command, timeout=timeout)


async def guest_sha(vm: LaunchedVM, dev: str) -> str:
    out = await sh(
        vm, f"dd if=/dev/{dev} bs=1M count={DISK_MIB} iflag=direct 2>/dev/null | sha256sum"
    )
    return out.split()[0]


def check_records(data: bytes, last: int) -> int:
    """Every SEQ block holds the latest record written to it (the writer's counter is
    ``last``); returns how many blocks were checked."""
    checked = 0
    for block in range(SEQ_BLOCKS):
        candidates = [i for i in range(block, last + 1, SEQ_BLOCKS)]
        if not candidates:
            continue
        record = data[block * 4096 : block * 4096 + 13]
        assert record == b"SEQ %08d\n" % candidates[-1], (block, record, candidates[-1])
        checked += 1
    return checked


async def test_snapshot_commit_stream_under_writing_guest(
    guest: GuestImage, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = await raw_image(images / "base.raw", pattern(1, DISK_MIB * MIB))
    top = images / "top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    bulk = await qcow2_image(images / "bulk.qcow2", pattern(2, DISK_MIB * MIB), DISK_MIB * MIB)
    config = base_config(
        guest,
        Drive(file=top, format=ImageFormat.QCOW2),
        Drive(file=bulk, format=ImageFormat.QCOW2),
    )
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        await sh(vm, SEQ_WRITER)
        await sh(vm, BULK_WRITER)
        await sh(vm, "until [ -s /tmp/seq ]; do usleep 10000; done")

        # One point in time across both disks.
        snap = await chains.external_snapshot(vm, "t1", images)
        assert set(snap.overlays) == {"disk0", "disk1"}
        await truth_check(vm)
        graph = await chains.read_graph(vm)
        assert [n.filename for n in graph.chain_of("disk0")] == [
            str(snap.overlays["disk0"]),
            str(top),
            str(base),
        ]

        # Intermediate commit: the old top into base, under the live overlay.
        reopened: list[list[str]] = []
        real_reopen = wire.blockdev_reopen

        async def recording(session: QMPSession, options: list[dict[str, Any]]) -> None:
            reopened.append([str(o["node-name"]) for o in options])
            await real_reopen(session, options)

        monkeypatch.setattr(wire, "blockdev_reopen", recording)
        inter = await chains.commit(vm, "disk0", top=str(top), base=str(base))
        monkeypatch.undo()
        # Only base is reopened (read-write for the job, read-only after). The overlay above
        # top, writable already, is not: on QEMU 7.2 that needless reopen, right before the
        # commit and under the guest's writes, corrupted the overlay.
        assert reopened == [["drv0-b1-file", "drv0-b1"]] * 2
        assert inter.chain == ("drv0-s1", "drv0-b1")
        assert inter.removed_nodes == ("drv0", "drv0-file")
        await truth_check(vm)
        # Stream disk1's original image into its overlay: the overlay stands alone.
        streamed = await chains.stream(vm, "disk1")
        assert streamed.chain == ("drv1-s1",)
        await truth_check(vm)
        # Active commit of disk0's overlay into base, READY → pivot, while writes go on.
        with capture_logs() as logs:
            active = await chains.commit(vm, "disk0", delete_files=True)
        assert active.chain == ("drv0-b1",)
        # The surviving chain was flushed (reopened) before the overlay's file went.
        flushed = [e for e in logs if e["event"] == "blockctl.chain.flushed"]
        assert [(e["device"], e["nodes"]) for e in flushed] == [("disk0", 2)]
        assert active.removed_files == (str(snap.overlays["disk0"]),)
        assert not snap.overlays["disk0"].exists()
        assert "ready" in [t.value for t in active.job.transitions]

        await sh(
            vm,
            "touch /tmp/stop; until [ -e /tmp/seq.done ] && [ -e /tmp/bulk.done ]; "
            "do usleep 10000; done",
        )
        last = int(await sh(vm, "cat /tmp/seq"))
        assert last > 0
        sums = {dev: await guest_sha(vm, dev) for dev in ("vda", "vdb")}
        assert await wire.query_jobs(vm.session) == ()
        assert set(vm.registry.drives["disk0"].node_names) == {"drv0-b1", "drv0-b1-file"}
        # The live graph and the images on disk tell the same chains.
        graph = await chains.read_graph(vm)
        for device, image, fmt in (
            ("disk0", base, "raw"),
            ("disk1", snap.overlays["disk1"], "qcow2"),
        ):
            on_disk = json.loads(
                await run(
                    "qemu-img", "info", "-U", "-f", fmt, "--backing-chain", "--output=json", image
                )
            )
            assert [n.filename for n in graph.chain_of(device)] == [i["filename"] for i in on_disk]
        await truth_check(vm)
    # Offline, with explicit formats: disk0 is now base.raw itself, disk1 the stream target.
    disk0 = await image_bytes(base, "raw", DISK_MIB * MIB)
    disk1 = await image_bytes(snap.overlays["disk1"], "qcow2", DISK_MIB * MIB)
    assert sha256(disk0) == sums["vda"]
    assert sha256(disk1) == sums["vdb"]
    assert check_records(disk0, last) == min(SEQ_BLOCKS, last + 1)
    info = await run("qemu-img", "info", "-f", "qcow2", "--output=json", snap.overlays["disk1"])
    assert '"backing-filename"' not in info  # the stream left it standing alone
    assert (await check(snap.overlays["disk1"], ImageFormat.QCOW2)).clean


async def test_cancelled_commit_and_stream_leave_a_consistent_chain(
    guest: GuestImage, images: Path
) -> None:
    base = await raw_image(images / "base.raw", pattern(3, DISK_MIB * MIB))
    top = images / "top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    await run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 0 {4 * MIB}", top)
    config = base_config(guest, Drive(file=top, format=ImageFormat.QCOW2))
    async with open_vm(config) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        before = await guest_sha(vm, "vda")
        chain_before = [n.name for n in (await chains.read_graph(vm)).chain_of("disk0")]
        # 64 KiB/s cannot copy 4 MiB within the deadline: an active commit never gets READY;
        # the job is cancelled and dismissed, and the error says why.
        with pytest.raises(JobNeverReady, match="speed"):
            await chains.commit(vm, "disk0", control=JobControl(speed=64 * 1024, deadline=1.5))
        with pytest.raises(OperationTimeout):
            await chains.stream(vm, "disk0", control=JobControl(speed=64 * 1024, deadline=1.5))
        assert await wire.query_jobs(vm.session) == ()
        assert [n.name for n in (await chains.read_graph(vm)).chain_of("disk0")] == chain_before
        assert await guest_sha(vm, "vda") == before
        assert (await vm.status()).running
        await truth_check(vm)
    assert (await check(top, ImageFormat.QCOW2)).clean


async def test_commit_into_a_full_base_pauses_then_grown_and_resumed_completes(
    guest: GuestImage, images: Path, tmp_path: Path, runtime_dir: Path
) -> None:
    """Active commit under error policy ``enospc`` into a base on a 2 MiB tmpfs: the job
    pauses on ENOSPC; the space grows and another process resumes it; the commit pivots and
    the guest reads exactly what it read before."""
    if os.geteuid() != 0:
        missing("root (to mount a small tmpfs)")
    small = tmp_path / "small"
    small.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", small)
    try:
        base = small / "base.qcow2"
        await run("qemu-img", "create", "-q", "-f", "qcow2", base, f"{DISK_MIB}M")
        top = images / "top.qcow2"
        await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        drive = Drive(file=top, format=ImageFormat.QCOW2)
        config = base_config(guest, drive, name="cgrow", image_roots=(small,))
        async with open_vm(config) as vm:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            await sh(vm, "dd if=/dev/urandom of=/dev/vda bs=1M count=6 oflag=direct 2>/dev/null")
            before = await guest_sha(vm, "vda")
            signal_ = PauseSignal()
            resumed: list[str] = []

            async def operator() -> None:
                await signal_.paused.wait()
                (job,) = await wire.query_jobs(vm.session)
                assert await wire.block_job_io_status(vm.session, job.id) == "nospace"
                await run("mount", "-o", "remount,size=32m", small)
                resumed.append(await resume_from_cli("cgrow", job.id))

            async with anyio.create_task_group() as tg:
                tg.start_soon(operator)
                result = await chains.commit(
                    vm,
                    "disk0",
                    control=JobControl(
                        on_error=ErrorPolicy.ENOSPC, pause_timeout=300, hooks=[signal_]
                    ),
                )
            assert resumed == ["resume"]
            assert signal_.errors[0].operation == "write"
            assert result.job.completed_on_ready
            assert [n.filename for n in (await chains.read_graph(vm)).chain_of("disk0")] == [
                str(base)
            ]
            assert await guest_sha(vm, "vda") == before
            assert await wire.query_jobs(vm.session) == ()
            await truth_check(vm)
        assert (await check(base, ImageFormat.QCOW2)).clean
    finally:
        await run("umount", small)


async def test_injected_io_error_names_the_job_and_node(guest: GuestImage, images: Path) -> None:
    base = await raw_image(images / "base.raw", pattern(4, DISK_MIB * MIB))
    top = images / "top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    async with open_vm(base_config(guest)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        # A chain whose base reads fail (blkdebug), attached by hand as device "dbg".
        for node in (
            # The backing layer read-only, as blockctl opens backing layers.
            {"driver": "file", "node-name": "b-file", "filename": str(base), "read-only": True},
            {
                "driver": "blkdebug",
                "node-name": "b-dbg",
                "image": "b-file",
                "inject-error": [{"event": "read_aio", "errno": 5}],
                "read-only": True,
            },
            {"driver": "raw", "node-name": "b", "file": "b-dbg", "read-only": True},
            {"driver": "file", "node-name": "t-file", "filename": str(top)},
            {"driver": "qcow2", "node-name": "t", "file": "t-file", "backing": "b"},
        ):
            await wire.blockdev_add(vm.session, node)
        await wire.device_add(vm.session, {"driver": "virtio-blk-pci", "id": "dbg", "drive": "t"})
        with pytest.raises(JobFailed) as info:
            await chains.stream(vm, "dbg")
        message = str(info.value)
        assert "Input/output error" in message
        assert re.search(r"bc-stream-\d+", message)
        assert "t" in message
        assert await wire.query_jobs(vm.session) == ()
        assert (await vm.status()).running
        assert (await sh(vm, "echo alive")) == "alive\n"
        await truth_check(vm)


async def test_internal_snapshots_save_load_delete(guest: GuestImage, images: Path) -> None:
    disk = await qcow2_image(images / "int.qcow2", b"", DISK_MIB * MIB)
    async with open_vm(base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2))) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await sh(vm, "echo AAAA > /tmp/ram; echo AAAA | dd of=/dev/vda conv=fsync 2>/dev/null")
        saved = await chains.save_internal(vm, "before")
        assert saved.transitions[-1].value == "null"
        assert (await chains.list_internal(vm))["disk0"] == ("before",)
        await sh(vm, "echo BBBB > /tmp/ram; echo BBBB | dd of=/dev/vda conv=fsync 2>/dev/null")
        with pytest.raises(JobFailed, match="before"):
            await chains.save_internal(vm, "before")  # a duplicate tag fails inside the job
        await chains.load_internal(vm, "before")
        # Disk and RAM are back at the save point; the console still works.
        assert (await sh(vm, "cat /tmp/ram")) == "AAAA\n"
        assert (await sh(vm, "head -c 5 /dev/vda")) == "AAAA\n"
        await chains.delete_internal(vm, "before")
        assert (await chains.list_internal(vm))["disk0"] == ()
        assert await wire.query_jobs(vm.session) == ()
        await truth_check(vm)
    assert (await check(disk, ImageFormat.QCOW2)).clean


async def test_bad_chain_requests(guest: GuestImage, images: Path) -> None:
    shared = await raw_image(images / "shared.raw", pattern(5, DISK_MIB * MIB))
    a, b = images / "a.qcow2", images / "b.qcow2"
    for overlay in (a, b):
        await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", shared, "-F", "raw", overlay)
    raw = await raw_image(images / "plain.raw", b"", DISK_MIB * MIB)
    config = base_config(
        guest,
        Drive(file=a, format=ImageFormat.QCOW2),
        Drive(file=b, format=ImageFormat.QCOW2),
        Drive(file=raw, format=ImageFormat.RAW),
    )
    async with open_vm(config) as vm:
        # Two chains share shared.raw: committing a into it would change what b reads.
        with pytest.raises(UnsafeOperation, match="disk1"):
            await chains.commit(vm, "disk0")
        with pytest.raises(ConfigError, match="not in the backing chain"):
            await chains.commit(vm, "disk0", base="nosuch")
        with pytest.raises(ConfigError, match="no backing file"):
            await chains.commit(vm, "disk2")
        with pytest.raises(NodeNotFound):
            await chains.stream(vm, "disk9")
        with pytest.raises(UnsafeOperation, match=r"disk2.*internal snapshots"):
            await chains.save_internal(vm, "x")
        with pytest.raises(ConfigError, match="tag"):
            await chains.external_snapshot(vm, "bad tag!", images)
        await chains.external_snapshot(vm, "t1", images, devices=["disk2"])
        with pytest.raises(ConfigError, match="exists"):
            await chains.external_snapshot(vm, "t1", images, devices=["disk2"])
        # allow_shared_base (--allow-shared-base) passes blockctl's check and reaches QEMU,
        # which refuses the write itself while disk1's device has the image open (its lock);
        # the base is read-only again afterwards (truth_check below).
        with pytest.raises(CommandFailed, match="block-commit"):
            await chains.commit(vm, "disk0", allow_shared_base=True)
        assert await wire.query_jobs(vm.session) == ()
        assert (await vm.status()).running
        await truth_check(vm)


async def test_failed_snapshot_removes_its_nodes_and_overlays(
    guest: GuestImage, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot whose transaction QEMU refuses leaves the VM as it was: the overlay nodes
    it added are deleted (not only their files), the chain and the journal unchanged."""
    d0 = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    d1 = await qcow2_image(images / "d1.qcow2", b"", DISK_MIB * MIB)
    config = base_config(
        guest, Drive(file=d0, format=ImageFormat.QCOW2), Drive(file=d1, format=ImageFormat.QCOW2)
    )
    real = wire.transaction_snapshot

    async def refused(session: object, pairs: list[tuple[str, str]]) -> None:
        # A real transaction QEMU refuses (the last overlay node does not exist): the overlays
        # of both disks were added before it.
        await real(session, [*pairs[:-1], (pairs[-1][0], "no-such-overlay")])  # type: ignore[arg-type]

    async with open_vm(config) as vm:
        before = {n.node_name for n in await vm.block_nodes()}
        chains_before = {d: (await chains.read_graph(vm)).chain_of(d) for d in ("disk0", "disk1")}
        monkeypatch.setattr(wire, "transaction_snapshot", refused)
        with pytest.raises(CommandFailed):
            await chains.external_snapshot(vm, "f1", images)
        monkeypatch.undo()
        assert {n.node_name for n in await vm.block_nodes()} == before
        graph = await chains.read_graph(vm)
        assert {d: graph.chain_of(d) for d in chains_before} == chains_before
        assert not list(images.glob("*f1*"))
        assert vm.run_dir is not None and not list(vm.run_dir.glob("journal-*"))
        await truth_check(vm)


async def test_image_without_a_backing_format_is_refused(guest: GuestImage, images: Path) -> None:
    base = await raw_image(images / "b.raw", b"", MIB)
    legacy = images / "legacy.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", legacy)
    # Erase the backing-format header extension, as images from before QEMU 6.1 may lack it.
    data = bytearray(legacy.read_bytes())
    at = data.find(b"\xe2\x79\x2a\xca")
    assert at > 0
    data[at : at + 4] = b"\0\0\0\0"
    legacy.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="without its format"):
        async with open_vm(base_config(guest, Drive(file=legacy, format=ImageFormat.QCOW2))):
            pass


async def test_cli_chain_snapshot_commit_stream_jobs(runtime_dir: Path) -> None:
    from tests.integration.test_attach_cli import cli

    await cli("up", "--name", "ch", "--strict")
    try:
        graph = json.loads((await cli("chain", "ch", "--json")).stdout)
        assert graph["devices"]
        created = json.loads((await cli("snapshot", "ch", "create", "t1", "--json")).stdout)
        overlay = Path(created["overlays"]["disk0"])
        assert overlay.exists()
        listed = json.loads((await cli("snapshot", "ch", "list", "--json")).stdout)
        assert listed["external"]["disk0"][0] == str(overlay)
        assert len(listed["external"]["disk0"]) == 2
        await cli("snapshot", "ch", "create", "t2")
        # Deleting t1 merges its overlay into the image below it (an intermediate commit).
        deleted = json.loads((await cli("snapshot", "ch", "delete", "t1", "--json")).stdout)
        assert deleted[0]["removed_files"] == [str(overlay)]
        assert not overlay.exists()
        streamed = json.loads((await cli("stream", "ch", "disk0", "--json")).stdout)
        assert len(streamed["chain"]) == 1
        bad = await cli("commit", "ch", "disk0", check=False)
        assert bad.returncode == 1
        assert bad.stderr.startswith("blockctl: ConfigError: base: ")
        await cli("snapshot", "ch", "save", "i1")
        internal = json.loads((await cli("snapshot", "ch", "list", "--json")).stdout)["internal"]
        assert internal["disk0"] == ["i1"]
        await cli("snapshot", "ch", "load", "i1")
        await cli("snapshot", "ch", "delete", "i1", "--internal")
        assert json.loads((await cli("jobs", "ch", "--json")).stdout) == []
        async with attach("ch") as vm:  # (the CLI views were checked above)
            await truth_check(vm, cli=False)
    finally:
        await cli("down", "ch")
