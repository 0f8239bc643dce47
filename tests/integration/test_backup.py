"""Backups of a running guest: every restored point equals the guest's disk at that point."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl._jobs import JobProgress, JobStatus, JobTransition
from blockctl._ops import backup as bk
from blockctl._qmp import wire
from blockctl.errors import BackupCorrupt, ConfigError, JobFailed, UntrustedImage
from blockctl.types import Drive, ImageFormat, MachineConfig
from tests.conftest import missing
from tests.integration.conftest import (
    MIB,
    PauseSignal,
    cli_json,
    qcow2_image,
    resume_from_cli,
    run,
    sha256,
)

pytestmark = pytest.mark.guest

DISK_MIB = 16


def config(guest: GuestImage, name: str, *disks: Path) -> MachineConfig:
    from blockctl.types import DeprecatedInput

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


async def disk_sha(vm: LaunchedVM, dev: str) -> str:
    out = await sh(
        vm, f"dd if=/dev/{dev} bs=1M count={DISK_MIB} iflag=direct 2>/dev/null | sha256sum"
    )
    return out.split()[0]


async def restored_sha(repo: Path, vm: str, backup_id: str, device: str, out: Path) -> str:
    dest = out / f"{backup_id}-{device}.raw"
    await bk.restore(repo, vm, backup_id, device, dest, ImageFormat.RAW)
    data = dest.read_bytes()
    dest.unlink()
    return sha256(data)


async def test_full_incremental_differential_restore_verify_prune(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    d0 = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    d1 = await qcow2_image(images / "d1.qcow2", b"", DISK_MIB * MIB)
    points: dict[str, dict[str, str]] = {}
    async with open_vm(config(guest, "bk", d0, d1)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 4096)
        await write(vm, "vdb", 0, 2048)
        full = await bk.backup(vm, repo, kind=bk.BackupKind.INCREMENTAL)
        # Nothing to build on yet: the incremental became a full backup, and says why.
        assert full.kind is bk.BackupKind.FULL
        assert full.fallback_reason == "there is no earlier backup in the repository"
        assert (full.consistency, full.frozen_filesystems) == ("crash", 0)  # no quiesce asked
        points[full.id] = {"disk0": await disk_sha(vm, "vda"), "disk1": await disk_sha(vm, "vdb")}

        await write(vm, "vda", 8192, 1024)  # 1 MiB
        await write(vm, "vdb", 64, 64)  # 64 KiB
        inc1 = await bk.backup(vm, repo)
        assert inc1.kind is bk.BackupKind.INCREMENTAL
        assert inc1.parent == full.id
        copied = {d.device: d.bytes_copied for d in inc1.disks}
        assert copied == {"disk0": 1 * MIB, "disk1": 64 * 1024}  # the dirty bytes, no more
        points[inc1.id] = {"disk0": await disk_sha(vm, "vda"), "disk1": await disk_sha(vm, "vdb")}

        await write(vm, "vda", 0, 512)
        inc2 = await bk.backup(vm, repo)
        assert inc2.parent == inc1.id
        assert {d.device: d.bytes_copied for d in inc2.disks} == {"disk0": 512 * 1024, "disk1": 0}
        points[inc2.id] = {"disk0": await disk_sha(vm, "vda"), "disk1": await disk_sha(vm, "vdb")}

        diff = await bk.backup(vm, repo, kind=bk.BackupKind.DIFFERENTIAL)
        assert diff.parent == full.id
        # Everything changed since the full backup: 1 MiB + 512 KiB on disk0 (overlapping
        # nothing), 64 KiB on disk1.
        assert {d.device: d.bytes_copied for d in diff.disks} == {
            "disk0": 1 * MIB + 512 * 1024,
            "disk1": 64 * 1024,
        }
        points[diff.id] = points[inc2.id]
        assert await wire.query_jobs(vm.session) == ()
        assert not [n for n in await vm.block_nodes() if n.node_name.startswith("bk")]

    for backup_id, sums in points.items():
        for device, expected in sums.items():
            assert await restored_sha(repo, "bk", backup_id, device, tmp_path) == expected
        assert (await bk.verify(repo, "bk", backup_id, deep=True)).ok

    # Retention: keep the last two; the kept incremental/differential stay restorable.
    deleted = await bk.prune(repo, "bk", keep_last=2)
    assert deleted == [full.id, inc1.id]
    kept = bk.Repository(root=repo, vm="bk").manifests()
    assert [m.id for m in kept] == [inc2.id, diff.id]
    assert kept[0].kind is bk.BackupKind.FULL  # inc2 absorbed its chain
    for manifest in kept:
        for device, expected in points[manifest.id].items():
            assert await restored_sha(repo, "bk", manifest.id, device, tmp_path) == expected

    # A damaged repository is caught by verify and by restore.
    victim = bk.Repository(root=repo, vm="bk").data_file(kept[1], kept[1].disks[0])
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - 4096)
        f.write(b"\xff" * 16)
    report = await bk.verify(repo, "bk", diff.id)
    assert not report.ok
    assert "checksum" in report.problems[0]
    with pytest.raises(ConfigError, match="exists"):
        await bk.restore(repo, "bk", diff.id, "disk0", victim, ImageFormat.RAW)
    with pytest.raises(ConfigError, match="no complete backup"):
        await bk.restore(repo, "bk", "nosuch", "disk0", tmp_path / "x.raw")


async def test_one_percent_dirty_copies_one_percent(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    size_mib = 64
    disk = await qcow2_image(images / "big.qcow2", b"", size_mib * MIB)
    async with open_vm(config(guest, "pct", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await sh(
            vm, f"dd if=/dev/urandom of=/dev/vda bs=1M count={size_mib} oflag=direct 2>/dev/null"
        )
        full = await bk.backup(vm, tmp_path / "repo", kind=bk.BackupKind.FULL)
        assert full.disks[0].bytes_copied == size_mib * MIB
        # Dirty 1% of the disk (10 x 64 KiB spread over it).
        for i in range(10):
            await write(vm, "vda", i * 6400, 64)
        inc = await bk.backup(vm, tmp_path / "repo")
        copied = inc.disks[0].bytes_copied
        assert copied == 10 * 64 * 1024
        assert copied / (size_mib * MIB) < 0.011


async def test_failed_backup_leaves_nothing_and_keeps_the_bitmap(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """The repository on a 6 MiB tmpfs: an incremental of 8 MiB runs out of space. No manifest,
    no directory is left, the bitmap is not consumed; after the space grows (remount), the next
    incremental copies the same 8 MiB and restores to the guest's disk."""
    if os.geteuid() != 0:
        missing("root (to mount a small tmpfs)")
    disk = await qcow2_image(images / "d.qcow2", b"", DISK_MIB * MIB)
    repo = tmp_path / "small"
    repo.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", repo)
    try:
        async with open_vm(config(guest, "nospace", disk)) as vm:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            await write(vm, "vda", 0, 1024)
            full = await bk.backup(vm, repo, kind=bk.BackupKind.FULL)  # ~1 MiB of data
            await write(vm, "vda", 4096, 8192)  # 8 MiB more: does not fit
            with pytest.raises(JobFailed, match="No space left"):
                await bk.backup(vm, repo)
            assert [m.id for m in bk.Repository(root=repo, vm="nospace").manifests()] == [full.id]
            assert sorted(p.name for p in (repo / "nospace").iterdir()) == [full.id]
            assert await wire.query_jobs(vm.session) == ()
            await run("mount", "-o", "remount,size=64m", repo)
            inc = await bk.backup(vm, repo)
            assert inc.kind is bk.BackupKind.INCREMENTAL
            assert inc.disks[0].bytes_copied == 8 * MIB  # the bitmap kept the failed range
            expected = await disk_sha(vm, "vda")
        assert await restored_sha(repo, "nospace", inc.id, "disk0", tmp_path) == expected
    finally:
        await run("umount", repo)


async def test_enospc_pauses_then_grown_and_resumed_from_the_cli_completes(
    guest: GuestImage, images: Path, tmp_path: Path, runtime_dir: Path
) -> None:
    """Error policy ``enospc`` with a real ENOSPC: the repository on a 4 MiB tmpfs, a 12 MiB
    full backup. The job pauses and blockctl says so; the space grows (remount) and another
    process resumes the job (``blockctl jobs VM resume ID``); the backup completes, and its
    image is identical to the guest's disk."""
    if os.geteuid() != 0:
        missing("root (to mount a small tmpfs)")
    disk = await qcow2_image(images / "d.qcow2", b"", DISK_MIB * MIB)
    repo = tmp_path / "small"
    repo.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", repo)
    try:
        async with open_vm(config(guest, "grow", disk)) as vm:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            await write(vm, "vda", 0, 12 * 1024)
            expected = await disk_sha(vm, "vda")
            signal_ = PauseSignal()
            resumed: list[str] = []

            async def operator() -> None:
                await signal_.paused.wait()
                # While paused: QEMU reports the job paused with io-status nospace.
                (job,) = await wire.query_jobs(vm.session)
                assert job.status is JobStatus.PAUSED
                assert await wire.block_job_io_status(vm.session, job.id) == "nospace"
                (row,) = await cli_json("jobs", "grow")  # what a user sees meanwhile
                assert (row["id"], row["status"], row["io_status"]) == (job.id, "paused", "nospace")
                await run("mount", "-o", "remount,size=96m", repo)
                resumed.append(await resume_from_cli("grow", job.id))

            async with anyio.create_task_group() as tg:
                tg.start_soon(operator)
                manifest = await bk.backup(
                    vm,
                    repo,
                    kind=bk.BackupKind.FULL,
                    on_target_error="enospc",
                    pause_timeout=300,  # far away: the resume, not a timer, ends the pause
                    hooks=[signal_],
                )
            assert resumed == ["resume"]
            assert [(e.operation, e.action) for e in signal_.errors][:1] == [("write", "stop")]
            assert manifest.disks[0].bytes_copied == DISK_MIB * MIB  # offset == len
            assert await wire.query_jobs(vm.session) == ()
        assert await restored_sha(repo, "grow", manifest.id, "disk0", tmp_path) == expected
        assert (await bk.verify(repo, "grow", manifest.id)).ok
    finally:
        await run("umount", repo)


async def test_qemu_killed_next_backup_is_full(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Persistent bitmaps are written on clean close only: after kill -9 the next backup
    falls back to full (logged, recorded), and restores correctly."""
    disk = await qcow2_image(images / "k.qcow2", b"", DISK_MIB * MIB)
    repo = tmp_path / "repo"
    async with open_vm(config(guest, "killed", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 1024)
        await bk.backup(vm, repo, kind=bk.BackupKind.FULL)
        await write(vm, "vda", 2048, 1024)
        os.kill(vm.pid or 0, signal.SIGKILL)
        await vm.wait_exit()
    await run("qemu-img", "check", "-r", "leaks", "-f", "qcow2", disk)
    async with open_vm(config(guest, "killed", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        again = await bk.backup(vm, repo)
        assert again.kind is bk.BackupKind.FULL
        assert again.fallback_reason is not None
        assert "bitmap" in again.fallback_reason
        expected = await disk_sha(vm, "vda")
    assert await restored_sha(repo, "killed", again.id, "disk0", tmp_path) == expected


async def test_bad_backup_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keep at least one"):
        await bk.prune(tmp_path, "x", keep_last=0)
    with pytest.raises(ConfigError, match="no complete backup"):
        await bk.verify(tmp_path, "x", "nope")
    with pytest.raises(BackupCorrupt.__mro__[1]):  # any BlockctlError for an absent repo
        await bk.restore(tmp_path, "x", "nope", "disk0", tmp_path / "o.raw")


async def test_cli_backup_list_verify_restore_prune(runtime_dir: Path, tmp_path: Path) -> None:
    from tests.integration.test_attach_cli import cli

    repo = tmp_path / "repo"
    await cli("up", "--name", "bcli", "--strict")
    try:
        first = json.loads((await cli("backup", "bcli", "--repo", repo, "--json")).stdout)
        assert first["kind"] == "full"
        assert "no earlier backup" in first["fallback_reason"]
        second = json.loads(
            (await cli("backup", "bcli", "--repo", repo, "--pull", "--json")).stdout
        )
        assert second["kind"] == "incremental"
        assert second["parent"] == first["id"]
        # Restore straight into the running VM as a new disk.
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
        assert restored["attached"] == "disk1"
        drives_now = json.loads((await cli("drives", "bcli", "--json")).stdout)
        assert [d["file"] for d in drives_now][-1] == str(tmp_path / "r0.qcow2")
    finally:
        await cli("down", "bcli")
    listed = json.loads((await cli("backup", "list", "bcli", "--repo", repo, "--json")).stdout)
    assert [m["id"] for m in listed] == [first["id"], second["id"]]
    verified = json.loads(
        (await cli("backup", "verify", "bcli", second["id"], "--repo", repo, "--json")).stdout
    )
    assert verified == {"id": second["id"], "ok": True, "problems": []}
    dest = tmp_path / "restored.qcow2"
    await cli("restore", "bcli", second["id"], "disk0", dest, "--repo", repo)
    assert dest.exists()
    pruned = json.loads(
        (await cli("backup", "prune", "bcli", "--keep", "1", "--repo", repo, "--json")).stdout
    )
    assert pruned == {"deleted": [first["id"]]}
    bad = await cli("restore", "bcli", "nope", "disk0", tmp_path / "x", "--repo", repo, check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("blockctl: ConfigError: backup: no complete backup 'nope'")


async def test_controller_killed_mid_backup_is_adopted_never_recorded(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """A second process runs a slow backup and is killed -9 mid-job. The next backup (a fresh
    controller's) adopts and cancels the orphaned job, deletes its nodes and its half-written
    directory, and takes a full backup: nothing incomplete is ever listed as a backup."""
    disk = await qcow2_image(images / "c.qcow2", b"", DISK_MIB * MIB)
    repo = tmp_path / "repo"
    async with open_vm(config(guest, "orphan", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 8192)
        first = await bk.backup(vm, repo, kind=bk.BackupKind.FULL)
        await write(vm, "vda", 0, 4096)
        controller = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "blockctl",
                "backup",
                "orphan",
                "--repo",
                str(repo),
                "--full",
                "--speed",
                "256K",
            ],
        )
        try:
            with anyio.fail_after(30):
                while not await wire.query_jobs(vm.session):  # noqa: ASYNC110 - another process's job
                    await anyio.sleep(0.05)
        finally:
            controller.kill()
            await controller.wait()
            await controller.aclose()
        orphan = await wire.query_jobs(vm.session)
        assert orphan[0].status.value == "running"
        # Only the complete backup is listed, even though a directory was being written.
        assert [m.id for m in bk.Repository(root=repo, vm="orphan").manifests()] == [first.id]
        assert len(list((repo / "orphan").iterdir())) == 2
        after = await bk.backup(vm, repo)
        assert after.kind is bk.BackupKind.FULL
        assert after.fallback_reason is not None
        assert "interrupted" in after.fallback_reason
        assert await wire.query_jobs(vm.session) == ()
        assert not [n for n in await vm.block_nodes() if n.node_name.startswith("bk")]
        assert sorted(p.name for p in (repo / "orphan").iterdir()) == sorted([first.id, after.id])
        expected = await disk_sha(vm, "vda")
    assert await restored_sha(repo, "orphan", after.id, "disk0", tmp_path) == expected


class StartSignal:
    """A job hook that sets an event once a job is running (after the transaction's point)."""

    def __init__(self, event: anyio.Event) -> None:
        self.event = event

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.RUNNING:
            self.event.set()

    def on_progress(self, progress: JobProgress) -> None:
        pass


async def test_pull_backups_over_nbd_while_the_guest_writes(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Pull mode: the point-in-time view is exported over NBD (fleecing) and copied by
    blockctl's NBD reader while the guest keeps writing; each restore equals the guest's disk
    at the backup's point, an incremental pull copies only the dirty bytes."""
    repo = tmp_path / "repo"
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
        full = await bk.backup(vm, repo, kind=bk.BackupKind.FULL, pull=True)
        assert full.disks[0].bytes_copied == 4 * MIB  # allocated data only
        await write(vm, "vda", 8192, 1024)
        at_inc = await disk_sha(vm, "vda")
        # The guest starts writing right after the point in time (when the fleecing job
        # runs) and goes on while blockctl reads the export.
        after_point = anyio.Event()
        manifests: list[bk.Manifest] = []

        async def pull() -> None:
            manifests.append(
                await bk.backup(vm, repo, pull=True, hooks=(StartSignal(after_point),))
            )

        async def guest_writes() -> None:
            await after_point.wait()
            await sh(vm, "rm -f /tmp/stop /tmp/stopped; " + writer)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pull)
            tg.start_soon(guest_writes)
        (inc,) = manifests
        await sh(vm, "touch /tmp/stop; until [ -e /tmp/stopped ]; do usleep 10000; done")
        assert inc.kind is bk.BackupKind.INCREMENTAL
        assert inc.disks[0].bytes_copied == 1 * MIB
        # The writes made during the pull are in the bitmap for the next backup.
        at_next = await disk_sha(vm, "vda")
        nxt = await bk.backup(vm, repo, pull=True)
        assert nxt.kind is bk.BackupKind.INCREMENTAL
        assert nxt.disks[0].bytes_copied > 0
        assert await wire.query_jobs(vm.session) == ()
        assert not [n for n in await vm.block_nodes() if n.node_name.startswith("bk")]
        names = {
            b.name
            for n in await wire.query_named_block_node_details(vm.session)
            for b in n.dirty_bitmaps
        }
        assert names == {"blockctl-inc", "blockctl-full"}
    assert await restored_sha(repo, "pull", full.id, "disk0", tmp_path) == at_full
    assert await restored_sha(repo, "pull", inc.id, "disk0", tmp_path) == at_inc
    assert await restored_sha(repo, "pull", nxt.id, "disk0", tmp_path) == at_next


async def test_legacy_drive_backup_path_on_request(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """drive-backup (deprecated) only on request: refused by a QEMU that rejects deprecated
    input, working (full + incremental, restorable) on one that accepts it."""
    from blockctl.errors import CommandFailed
    from blockctl.types import DeprecatedInput

    disk = await qcow2_image(images / "l.qcow2", b"", DISK_MIB * MIB)
    repo = tmp_path / "repo"
    async with open_vm(config(guest, "strict", disk)) as vm:
        with pytest.raises(CommandFailed, match="drive-backup"):
            await bk.backup(vm, repo, kind=bk.BackupKind.FULL, legacy=True)
        assert bk.Repository(root=repo, vm="strict").manifests() == []
    legacy_config = dataclasses.replace(
        config(guest, "legacy", disk), deprecated_input=DeprecatedInput.ACCEPT
    )
    async with open_vm(legacy_config) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 1024)
        full = await bk.backup(vm, repo, kind=bk.BackupKind.FULL, legacy=True)
        at_full = await disk_sha(vm, "vda")
        await write(vm, "vda", 4096, 512)
        inc = await bk.backup(vm, repo, legacy=True)
        assert inc.disks[0].bytes_copied == 512 * 1024
        at_inc = await disk_sha(vm, "vda")
        with pytest.raises(ConfigError, match="pull"):
            await bk.backup(vm, repo, legacy=True, pull=True)
    assert await restored_sha(repo, "legacy", full.id, "disk0", tmp_path) == at_full
    assert await restored_sha(repo, "legacy", inc.id, "disk0", tmp_path) == at_inc
    # Retention by age: everything is younger than an hour; keep_last=1 alone would drop one.
    assert await bk.prune(repo, "legacy", keep_within=3600) == []
    assert await bk.prune(repo, "legacy", keep_last=1) == [full.id]
    # A tampered repository: the kept backup now names a host file as its backing.
    kept = bk.Repository(root=repo, vm="legacy").get(inc.id)
    data_file = bk.Repository(root=repo, vm="legacy").data_file(kept, kept.disks[0])
    await run(
        "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", data_file
    )
    with pytest.raises(UntrustedImage):
        await bk.restore(repo, "legacy", inc.id, "disk0", tmp_path / "evil.raw")
    assert not (tmp_path / "evil.raw").exists()


async def test_injected_target_io_error(guest: GuestImage, images: Path, tmp_path: Path) -> None:
    """EIO on the target's writes (blkdebug): the job fails with QEMU's error, nothing is
    recorded, no node is left, and the bitmap was not consumed."""
    disk = await qcow2_image(images / "e.qcow2", b"", DISK_MIB * MIB)
    repo = tmp_path / "repo"
    eio = [{"event": "write_aio", "errno": 5}]
    async with open_vm(config(guest, "eio", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 1024)
        with pytest.raises(JobFailed, match="Input/output error"):
            await bk.backup(vm, repo, kind=bk.BackupKind.FULL, inject_errors=eio)
        full = await bk.backup(vm, repo, kind=bk.BackupKind.FULL)
        await write(vm, "vda", 2048, 512)
        with pytest.raises(JobFailed, match="Input/output error"):
            await bk.backup(vm, repo, inject_errors=eio)
        assert [m.id for m in bk.Repository(root=repo, vm="eio").manifests()] == [full.id]
        assert not [n for n in await vm.block_nodes() if n.node_name.startswith("bk")]
        assert await wire.query_jobs(vm.session) == ()
        inc = await bk.backup(vm, repo)
        assert inc.kind is bk.BackupKind.INCREMENTAL
        assert inc.disks[0].bytes_copied == 512 * 1024  # the failed attempt consumed nothing
        expected = await disk_sha(vm, "vda")
    assert await restored_sha(repo, "eio", inc.id, "disk0", tmp_path) == expected
