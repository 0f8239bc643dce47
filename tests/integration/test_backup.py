"""Backups of a running guest (repository format 2): each restored point equals the guest's disk
at that point (checksums read in the guest), incrementals read what changed and no more, the
shared data of two VMs is stored once, and the CLI reports it all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from blockctl import GuestImage, LaunchedVM, backup, open_vm
from blockctl._backup import operations as ops
from blockctl._backup.store import Repository
from blockctl._jobs import JobProgress, JobStatus, JobTransition
from blockctl._qmp import wire
from blockctl.errors import ConfigError, RepositoryError
from blockctl.jobs import JobControl
from blockctl.types import DeprecatedInput, Drive, ImageFormat, MachineConfig
from tests.integration.conftest import MIB, qcow2_image, qemu_binary, run, sha256

pytestmark = pytest.mark.guest

DISK_MIB = 16


def config(guest: GuestImage, name: str, *disks: Path) -> MachineConfig:
    return MachineConfig(
        name=name,
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        deprecated_input=DeprecatedInput.REJECT,
        drives=tuple(Drive(file=d, format=ImageFormat.QCOW2) for d in disks),
    )


async def sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def write(vm: LaunchedVM, dev: str, offset_kib: int, kib: int) -> None:
    """Random data at a 64 KiB-aligned place, flushed (the backup sees what the guest wrote)."""
    await sh(
        vm,
        f"dd if=/dev/urandom of=/dev/{dev} bs=64k seek={offset_kib // 64} "
        f"count={kib // 64} oflag=direct conv=fsync 2>/dev/null",
    )


async def disk_sha(vm: LaunchedVM, dev: str, mib: int = DISK_MIB) -> str:
    out = await sh(vm, f"dd if=/dev/{dev} bs=1M count={mib} iflag=direct 2>/dev/null | sha256sum")
    return out.split()[0]


async def restored_sha(repo: Repository, vm: str, point: str, device: str, out: Path) -> str:
    dest = out / f"{point}-{device}.raw"
    await backup.restore(repo, vm, point, device, dest, ImageFormat.RAW)
    data = dest.read_bytes()
    dest.unlink()
    return sha256(data)


class StartSignal:
    """A job hook that sets an event once the fleecing job runs (after the point in time)."""

    def __init__(self, event: anyio.Event) -> None:
        self.event = event

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.RUNNING:
            self.event.set()

    def on_progress(self, progress: JobProgress) -> None:
        pass


async def test_full_incremental_restore_verify_prune(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    repo = backup.init_repository(tmp_path / "repo", chunk_size=64 * 1024)
    d0 = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    d1 = await qcow2_image(images / "d1.qcow2", b"", DISK_MIB * MIB)
    points: dict[str, dict[str, str]] = {}
    async with open_vm(config(guest, "bk", d0, d1)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 4096)
        await write(vm, "vdb", 0, 2048)
        full = await backup.create(vm, repo)
        # Nothing to build on yet: the incremental became a full backup, and says why.
        assert full.kind == "full"
        assert full.fallback_reason is not None
        assert "no earlier backup" in full.fallback_reason
        assert (full.consistency, full.frozen_filesystems) == ("crash", 0)
        # A full backup reads the allocated data only, not the holes.
        assert {d.device: d.bytes_read for d in full.disks} == {
            "disk0": 4 * MIB,
            "disk1": 2 * MIB,
        }
        points[full.id] = {"disk0": await disk_sha(vm, "vda"), "disk1": await disk_sha(vm, "vdb")}

        await write(vm, "vda", 8192, 1024)  # 1 MiB
        await write(vm, "vdb", 64, 64)  # 64 KiB
        inc1 = await backup.create(vm, repo)
        assert inc1.kind == "incremental" and inc1.parent == full.id
        assert inc1.fallback_reason is None
        # With 64 KiB chunks (the bitmap's granularity), exactly the dirty bytes are read.
        assert {d.device: d.bytes_read for d in inc1.disks} == {
            "disk0": 1 * MIB,
            "disk1": 64 * 1024,
        }
        points[inc1.id] = {"disk0": await disk_sha(vm, "vda"), "disk1": await disk_sha(vm, "vdb")}

        await write(vm, "vda", 0, 512)
        inc2 = await backup.create(vm, repo)
        assert inc2.parent == inc1.id
        assert {d.device: d.bytes_read for d in inc2.disks} == {"disk0": 512 * 1024, "disk1": 0}
        points[inc2.id] = {"disk0": await disk_sha(vm, "vda"), "disk1": await disk_sha(vm, "vdb")}
        again = await backup.create(vm, repo, kind="full")
        assert again.kind == "full" and again.fallback_reason is None
        # Nothing new: every chunk of the full backup was in the repository already.
        # It read the allocated data: disk0 0-4 MiB and 8-9 MiB, disk1 0-2 MiB.
        assert again.bytes_new == 0 and again.bytes_read == 5 * MIB + 2 * MIB
        points[again.id] = points[inc2.id]
    for point, shas in points.items():
        for device, expected in shas.items():
            assert await restored_sha(repo, "bk", point, device, tmp_path) == expected
        report = await backup.verify(repo, "bk", point)
        assert report.ok, report.problems
        assert report.chunks_checked > 0
    result = await backup.prune(repo, "bk", keep_last=1)
    assert result.deleted == (full.id, inc1.id, inc2.id)
    assert [m.id for m in repo.manifests("bk")] == [again.id]
    # The kept point restores exactly after its history was pruned and collected.
    for device, expected in points[again.id].items():
        assert await restored_sha(repo, "bk", again.id, device, tmp_path) == expected


async def test_one_percent_dirty_reads_one_percent(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Incrementals cost what changed: 10 x 64 KiB dirty on a 64 MiB disk full of data reads
    the 10 chunks that hold them (64 KiB chunks here: 640 KiB), not the disk."""
    size_mib = 64
    repo = backup.init_repository(tmp_path / "repo", chunk_size=64 * 1024)
    disk = await qcow2_image(images / "big.qcow2", b"", size_mib * MIB)
    async with open_vm(config(guest, "pct", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await sh(
            vm, f"dd if=/dev/urandom of=/dev/vda bs=1M count={size_mib} oflag=direct 2>/dev/null"
        )
        full = await backup.create(vm, repo)
        assert full.disks[0].bytes_read == size_mib * MIB
        for i in range(10):
            await write(vm, "vda", i * 6400, 64)
        inc = await backup.create(vm, repo)
        assert inc.disks[0].bytes_read == 10 * 64 * 1024
        assert inc.disks[0].bytes_new == 10 * 64 * 1024  # random data: all of it is new
        at = await disk_sha(vm, "vda", size_mib)
    assert await restored_sha(repo, "pct", inc.id, "disk0", tmp_path) == at


async def test_one_transaction_fixes_the_point_of_every_disk(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Every disk's new checkpoint bitmap and fleecing job are in ONE transaction (the point in
    time of all disks); a backup that fails during the copy tears down its exports, jobs and
    nodes, whatever it had started."""
    repo = backup.init_repository(tmp_path / "repo")
    d0 = await qcow2_image(images / "d0.qcow2", b"\x01" * MIB, DISK_MIB * MIB)
    d1 = await qcow2_image(images / "d1.qcow2", b"\x02" * MIB, DISK_MIB * MIB)
    async with open_vm(config(guest, "one", d0, d1)) as vm:
        nodes = {n.node_name for n in await vm.block_nodes()}
        with capture_logs() as logs:
            point = await backup.create(vm, repo)
        sent = [
            e["arguments"]["actions"]
            for e in logs
            if e["event"] == "blockctl.qmp.command" and e.get("command") == "transaction"
        ]
        [actions, *_settle] = sent  # then the old checkpoints' removal, if any
        by_type = {
            kind: sorted(
                a["data"].get("node") or a["data"]["device"] for a in actions if a["type"] == kind
            )
            for kind in {a["type"] for a in actions}
        }
        assert by_type == {
            "block-dirty-bitmap-add": ["drv0", "drv1"],
            "blockdev-backup": ["drv0", "drv1"],
        }
        assert {a["data"]["name"] for a in actions if a["type"] == "block-dirty-bitmap-add"} == {
            point.checkpoint
        }
        assert (await backup.verify(repo, "one", point.id)).ok  # every chunk durable
        with pytest.raises(OSError, match="injected"):
            await ops.backup(vm, repo, kind="full", _fail_after_chunks=1)
        assert {n.node_name for n in await vm.block_nodes()} == nodes
        assert await wire.query_jobs(vm.session) == ()
        assert await wire.query_block_exports(vm.session) == ()
        assert [m.id for m in repo.manifests("one")] == [point.id]


async def test_backup_while_the_guest_writes(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """The guest writes from the point in time on, while blockctl reads the export: the restore
    equals the guest's disk at the point, and the writes made meanwhile are in the next one."""
    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "p.qcow2", b"", DISK_MIB * MIB)
    writer = (
        "( while [ ! -e /tmp/stop ]; do dd if=/dev/urandom of=/dev/vda bs=64k count=1 "
        "seek=$((RANDOM % 256)) oflag=direct conv=notrunc 2>/dev/null; done; "
        "touch /tmp/stopped ) &"
    )
    async with open_vm(config(guest, "pull", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 4096)
        at_full = await disk_sha(vm, "vda")
        full = await backup.create(vm, repo)
        await write(vm, "vda", 8192, 1024)
        at_inc = await disk_sha(vm, "vda")
        after_point = anyio.Event()
        manifests: list[backup.Manifest] = []

        async def take() -> None:
            manifests.append(
                await backup.create(vm, repo, control=JobControl(hooks=(StartSignal(after_point),)))
            )

        async def guest_writes() -> None:
            await after_point.wait()
            await sh(vm, "rm -f /tmp/stop /tmp/stopped; " + writer)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            tg.start_soon(guest_writes)
        (inc,) = manifests
        await sh(vm, "touch /tmp/stop; until [ -e /tmp/stopped ]; do usleep 10000; done")
        assert inc.kind == "incremental"
        at_next = await disk_sha(vm, "vda")
        nxt = await backup.create(vm, repo)
        assert nxt.kind == "incremental" and nxt.bytes_read > 0
        # Nothing of the backups is left in QEMU: no job, node, export; one checkpoint.
        assert await wire.query_jobs(vm.session) == ()
        assert not [n for n in await vm.block_nodes() if n.node_name.startswith("bcf")]
        assert await wire.query_block_exports(vm.session) == ()
        names = {
            b.name
            for n in await wire.query_named_block_node_details(vm.session)
            for b in n.dirty_bitmaps
        }
        assert names == {nxt.checkpoint}
    assert await restored_sha(repo, "pull", full.id, "disk0", tmp_path) == at_full
    assert await restored_sha(repo, "pull", inc.id, "disk0", tmp_path) == at_inc
    assert await restored_sha(repo, "pull", nxt.id, "disk0", tmp_path) == at_next


async def test_two_vms_cloned_from_one_base_store_the_shared_data_once(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    # The base image: 8 MiB of random data, then a hole; the same for both clones.
    base = images / "base.raw"
    base.write_bytes(os.urandom(8 * MIB))
    os.truncate(base, DISK_MIB * MIB)
    clones: list[Path] = []
    for name in ("c1", "c2"):
        clone = images / f"{name}.qcow2"
        await run(
            qemu_binary("qemu-img"), "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", clone
        )
        clones.append(clone)
    repo = backup.init_repository(tmp_path / "repo", compression="none")
    async with (
        open_vm(config(guest, "c1", clones[0])) as vm1,
        open_vm(config(guest, "c2", clones[1])) as vm2,
    ):
        vms = (vm1, vm2)
        for vm in vms:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            await write(vm, "vda", 12 * 1024, 64)  # each clone's own change: different chunks
        first = await backup.create(vm1, repo)
        second = await backup.create(vm2, repo)
        assert first.bytes_read == second.bytes_read >= 8 * MIB
        # The second VM's backup found the base's chunks in the repository: only its own
        # chunk (one 4 MiB chunk holding its 64 KiB write) is new.
        assert second.bytes_new == repo.chunk_size
        assert first.bytes_new == first.bytes_read
        chunk_files = list((repo.path / "chunks").glob("*/*"))
        assert len(chunk_files) == 8 * MIB // repo.chunk_size + 2
        # Both VMs back up into the one repository at the same time.
        for vm in vms:
            await write(vm, "vda", 4 * 1024, 128)
        expected = [await disk_sha(vm, "vda") for vm in vms]
        together: dict[str, backup.Manifest] = {}

        async def take(vm: LaunchedVM) -> None:
            together[vm.name] = await backup.create(vm, repo)

        async with anyio.create_task_group() as tg:
            for vm in vms:
                tg.start_soon(take, vm)
    for vm_name, sha in zip(("c1", "c2"), expected, strict=True):
        point = together[vm_name]
        assert point.kind == "incremental"
        assert await restored_sha(repo, vm_name, point.id, "disk0", tmp_path) == sha


async def test_bad_backup_inputs(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="backup init"):
        backup.open_repository(tmp_path / "nowhere")
    repo = backup.init_repository(tmp_path / "r")
    with pytest.raises(RepositoryError, match="not an empty directory"):
        backup.init_repository(tmp_path / "r")
    with pytest.raises(ConfigError, match="keep at least one"):
        await backup.prune(repo, "x", keep_last=0)
    with pytest.raises(ConfigError, match="no complete backup"):
        await backup.verify(repo, "x", "20261203T000000.000000-abcd")
    with pytest.raises(RepositoryError, match="point id"):
        await backup.restore(repo, "x", "../../etc", "disk0", tmp_path / "o.raw")
    assert not (tmp_path / "o.raw").exists()


async def test_cli_backup_init_create_list_verify_restore_prune(
    runtime_dir: Path, tmp_path: Path
) -> None:
    from tests.integration.test_attach_cli import cli

    repo = tmp_path / "repo"
    missing = await cli("backup", "create", "bcli", "--repo", repo, check=False)
    assert missing.returncode == 1
    assert "blockctl backup init" in missing.stderr
    init = json.loads((await cli("backup", "init", "--repo", repo, "--json")).stdout)
    assert init["chunk_size"] == 4 * MIB and not init["encrypted"]
    await cli("up", "--name", "bcli", "--strict")
    try:
        first = json.loads((await cli("backup", "create", "bcli", "--repo", repo, "--json")).stdout)
        assert first["kind"] == "full"
        assert "no earlier backup" in first["fallback_reason"]
        second = json.loads(
            (await cli("backup", "create", "bcli", "--repo", repo, "--json")).stdout
        )
        assert second["kind"] == "incremental"
        assert second["parent"] == first["id"]
        assert {"bytes_read", "bytes_new", "dedup_ratio", "compression_ratio"} <= set(second)
        human = await cli("backup", "create", "bcli", "--repo", repo)
        assert "incremental backup of 1 disk(s): read" in human.stdout
        restored = json.loads(
            (
                await cli(
                    "restore",
                    "bcli",
                    first["id"],
                    "disk0",
                    tmp_path / "r0.qcow2",
                    "--repo",
                    repo,
                    "--attach",
                    "bcli",
                    "--json",
                )
            ).stdout
        )
        assert restored["attached"] == "disk1" and restored["chunks_verified"] >= 0
        drives_now = json.loads((await cli("drives", "bcli", "--json")).stdout)
        assert [d["file"] for d in drives_now][-1] == str(tmp_path / "r0.qcow2")
    finally:
        await cli("down", "bcli")
    listed = json.loads((await cli("backup", "list", "bcli", "--repo", repo, "--json")).stdout)
    assert [m["id"] for m in listed][:2] == [first["id"], second["id"]]
    table = (await cli("backup", "list", "bcli", "--repo", repo)).stdout
    assert table.splitlines()[0].split()[:3] == ["POINT", "KIND", "READ"]
    verified = json.loads(
        (await cli("backup", "verify", "bcli", second["id"], "--repo", repo, "--json")).stdout
    )
    assert verified[0]["id"] == second["id"] and verified[0]["ok"] is True
    dest = tmp_path / "restored.qcow2"
    said = await cli("restore", "bcli", second["id"], "disk0", dest, "--repo", repo)
    assert f"to {dest}" in said.stdout
    await run(
        qemu_binary("qemu-img"),
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        dest,
        tmp_path / "r0.qcow2",
    )
    pruned = json.loads(
        (await cli("backup", "prune", "bcli", "--keep", "1", "--repo", repo, "--json")).stdout
    )
    assert first["id"] in pruned["deleted"] and second["id"] in pruned["deleted"]
    bad = await cli("restore", "bcli", "nope", "disk0", tmp_path / "x", "--repo", repo, check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("blockctl: RepositoryError: point id 'nope'")


async def test_raw_disk_incrementals_until_qemu_restarts(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """A raw disk cannot keep a persistent bitmap: it gets one that lives as long as QEMU, so
    incrementals work until QEMU restarts; then the backup is full and says why."""
    raw = images / "r.raw"
    raw.write_bytes(b"")
    os.truncate(raw, DISK_MIB * MIB)
    repo = backup.init_repository(tmp_path / "repo", chunk_size=64 * 1024)
    cfg = MachineConfig(
        name="rawbk",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        deprecated_input=DeprecatedInput.REJECT,
        drives=(Drive(file=raw, format=ImageFormat.RAW),),
    )
    async with open_vm(cfg) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 1024)
        await backup.create(vm, repo)
        await write(vm, "vda", 4096, 128)
        inc = await backup.create(vm, repo)
        assert inc.kind == "incremental" and inc.bytes_read == 128 * 1024
        (bitmap,) = [
            b
            for n in await wire.query_named_block_node_details(vm.session)
            for b in n.dirty_bitmaps
        ]
        assert not bitmap.persistent
        at_inc = await disk_sha(vm, "vda")
    async with open_vm(cfg) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        again = await backup.create(vm, repo)
        assert again.kind == "full"
        assert again.fallback_reason is not None and "no checkpoint" in again.fallback_reason
    assert await restored_sha(repo, "rawbk", inc.id, "disk0", tmp_path) == at_inc


async def test_recovery_says_what_it_could_not_undo(images: Path, tmp_path: Path) -> None:
    """A killed backup's fleecing node that another client has exported since (so QEMU
    refuses its deletion): ``recover`` says it could not delete it and why, keeps its scratch
    file (QEMU still has it open) and the NBD server (it serves the other export). Once that
    export is gone, recovery deletes the nodes and removes the scratch directory."""
    disk = await qcow2_image(images / "rc.qcow2", b"", 16 * MIB)
    repo = backup.init_repository(tmp_path / "repo")
    scratch = tmp_path / "bc-scratch-test"
    scratch.mkdir()
    fleece = scratch / "fleece-disk0.qcow2"
    await run("qemu-img", "create", "-f", "qcow2", fleece, str(16 * MIB))
    cfg = MachineConfig(
        name="rcv",
        deprecated_input=DeprecatedInput.REJECT,
        drives=(Drive(file=disk, format=ImageFormat.QCOW2),),
    )
    async with open_vm(cfg, console=False) as vm:
        file_node = {"driver": "file", "node-name": "bcf0-abcd-file", "filename": str(fleece)}
        await vm.command("blockdev-add", file_node)
        fmt_node = {"driver": "qcow2", "node-name": "bcf0-abcd", "file": "bcf0-abcd-file"}
        await vm.command("blockdev-add", fmt_node)
        socket = str(tmp_path / "nbd.sock")
        await vm.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket}}})
        export = {"type": "nbd", "id": "theirs", "node-name": "bcf0-abcd"}
        await vm.command("block-export-add", export)
        notes = await backup.recover(vm, repo)
        for node in ("bcf0-abcd", "bcf0-abcd-file"):
            assert any(
                n.startswith(f"could not delete the leftover fleecing node {node}: ") for n in notes
            ), notes
        assert fleece.exists()
        assert {"bcf0-abcd", "bcf0-abcd-file"} <= {n.node_name for n in await vm.block_nodes()}
        assert [e.id for e in await wire.query_block_exports(vm.session)] == ["theirs"]
        with vm.session.events("BLOCK_EXPORT_DELETED") as deleted:
            await vm.command("block-export-del", {"id": "theirs"})
            await deleted.next()  # once its clients are gone (it has none)
        await vm.command("nbd-server-stop")
        notes = await backup.recover(vm, repo)
        assert notes == [
            "deleted the leftover fleecing node bcf0-abcd",
            "deleted the leftover fleecing node bcf0-abcd-file",
        ]
        assert not scratch.exists()
        assert not {"bcf0-abcd", "bcf0-abcd-file"} & {n.node_name for n in await vm.block_nodes()}
