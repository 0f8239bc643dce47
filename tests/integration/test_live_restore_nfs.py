"""Live restore onto an NFS image (issue 18): the guest's disk runs on a temporary qcow2
overlay over the backup's NBD server, mirrored (write-blocking) into an existing image on
an NFS server, opened by QEMU's own NFSv3 client (node ``nfs``; the host mounts nothing); at
READY the device pivots onto the image's raw node. Ganesha is test_storage_nfs.py's fixture
(QEMU runs in its network namespace); the export's files are read after."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, _machine, backup, open_vm
from blockctl import attach as attach_vm
from blockctl._backup import live
from blockctl._binaries import binary as qemu_binary
from blockctl._jobs import JobControl
from blockctl._qmp import wire
from blockctl.errors import ConfigError
from blockctl.types import ImageFormat
from tests.integration.conftest import MIB, pattern, qcow2_image, raw_image, sha256, truth_check
from tests.integration.test_backup import config, disk_sha
from tests.integration.test_live_restore import (
    RAW_DISK_MIB,
    RAW_WRITES,
    WAIT_VDB,
    StreamWatch,
    device_overlays,
    follow_way_on,
    guest_fill,
    nbdkit,  # noqa: F401 (the fixture: nbdkit is required)
    nbdkit_pids_under,
    node_names,
    reference,
    tree_digest,
)
from tests.integration.test_live_restore_iscsi import qemu_killed_mid_mirror
from tests.integration.test_storage_nfs import Nfs, nfs  # noqa: F401 (nfs: the fixture)

DISK_MIB = RAW_DISK_MIB


@pytest.mark.guest
async def test_live_restore_onto_an_nfs_image_while_the_guest_reads_and_writes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    nfs: Nfs,  # noqa: F811
) -> None:
    """Refused first, nothing changed on the VM or the export: a qcow2 target on an NFS
    image, an image smaller than the disk (its node is added, measured, deleted). Then onto
    an image 1 MiB larger than the disk while the guest reads the whole disk and writes
    during the copy: the image holds the point plus the guest's writes, its last MiB as it
    was; the repository unchanged."""
    repo = backup.init_repository(tmp_path / "repo", chunk_size=256 * 1024)
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    image = await raw_image(nfs.export / "t.raw", pattern(221, (DISK_MIB + 1) * MIB))
    small = await raw_image(nfs.export / "small.raw", pattern(222, 16 * MIB))
    tail = sha256(image.read_bytes()[DISK_MIB * MIB :])
    small_sha = sha256(small.read_bytes())
    target = nfs.source("t.raw")
    watch = StreamWatch()  # the mirror's id, once it runs
    async with open_vm(config(guest, "lrn", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await guest_fill(vm, "vda", 0, 64, 0x41)
        await guest_fill(vm, "vda", 128, 64, 0x42)
        point = await backup.create(vm, repo)
        hashes = tree_digest(repo.path)
        at_point = await disk_sha(vm, "vda", DISK_MIB)
        before = await node_names(vm)
        assert vm.run_dir is not None
        untouched = sha256(image.read_bytes())
        refusals = (
            (target, ImageFormat.QCOW2, "target_format", "an NFS image is written raw"),
            (nfs.source("small.raw"), ImageFormat.RAW, "target", "an NFS image at least as"),
        )
        for bad, fmt, field, says in refusals:
            with pytest.raises(ConfigError) as refused:
                await backup.restore_live(
                    vm, repo, "lrn", point.id, "disk0", bad, target_format=fmt
                )
            assert refused.value.field == field and says in str(refused.value), refused.value
            assert await node_names(vm) == before
            assert set(vm.registry.drives) == {"disk0"}
            assert await wire.query_jobs(vm.session) == ()
            assert device_overlays(vm.run_dir) == [] and nbdkit_pids_under(vm.run_dir) == []
            assert not list(vm.run_dir.glob("journal-*.json"))
        assert sha256(small.read_bytes()) == small_sha
        assert sha256(image.read_bytes()) == untouched
        results: list[live.LiveRestoreResult] = []

        async def restore() -> None:
            # 1 byte/s: the mirror copies one request, then waits for the speed change below.
            results.append(
                await backup.restore_live(
                    vm,
                    repo,
                    "lrn",
                    point.id,
                    "disk0",
                    target,
                    control=JobControl(speed=1, hooks=(watch,)),
                    target_format=ImageFormat.RAW,
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(restore)
            await watch.running.wait()
            assert watch.job_id is not None
            await vm.console.check(WAIT_VDB)  # type: ignore[union-attr]
            assert len(device_overlays(vm.run_dir)) == 1
            assert await disk_sha(vm, "vdb", DISK_MIB) == at_point
            for offset, kib, byte in RAW_WRITES:
                await guest_fill(vm, "vdb", offset, kib, byte)
            during = await disk_sha(vm, "vdb", DISK_MIB)
            jobs = await wire.query_jobs(vm.session)
            assert [(j.id, j.type) for j in jobs] == [(watch.job_id, "mirror")]
            await vm.command("block-job-set-speed", {"device": watch.job_id, "speed": 0})
        (result,) = results
        assert result.path == target
        assert result.job.completed_on_ready and result.job.offset == result.job.length
        assert await disk_sha(vm, "vdb", DISK_MIB) == during
        record = vm.registry.drives[result.device_id]
        assert [n["driver"] for n in record.nodes] == ["nfs", "raw"]
        assert record.nodes[0]["path"] == str(image)
        # The image's raw node is the disk's size, not the (larger) image's.
        sizes = {n.node_name: n.virtual_size for n in await vm.block_nodes()}
        assert sizes[record.nodes[-1]["node-name"]] == DISK_MIB * MIB
        assert await node_names(vm) == before | set(record.node_names)
        assert await wire.query_jobs(vm.session) == ()
        assert device_overlays(vm.run_dir) == [] and nbdkit_pids_under(vm.run_dir) == []
        assert not list(vm.run_dir.glob("journal-*.json"))
        await truth_check(vm)
    assert tree_digest(repo.path) == hashes
    want = await reference(repo, "lrn", point.id, tmp_path / "reference.raw", RAW_WRITES)
    assert sha256(want.read_bytes()) == during
    written = image.read_bytes()
    assert sha256(written[: DISK_MIB * MIB]) == during
    assert sha256(written[DISK_MIB * MIB :]) == tail


@pytest.mark.guest
async def test_qemu_killed_mid_mirror_onto_nfs_then_the_way_on_gives_point_plus_writes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    runtime_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    nfs: Nfs,  # noqa: F811
) -> None:
    """kill -9 of QEMU mid-copy onto an NFS image (the guest has read the disk and written
    to it): the controller raises ConnectionLost and stops the server; ``blockctl recover``
    drops the record and gives the commands that make the image whole. Run as given (the
    last one writes the image by its nfs:// URL through qemu-img's own NFS client, in the
    server's network namespace as QEMU is), the image holds the point plus the guest's
    writes and its bytes past the disk as they were; the repository is unchanged."""
    wrapper = tmp_path / "qemu-img-in-netns"
    wrapper.write_text(
        f"#!/bin/sh\nexec nsenter --net=/proc/{nfs.netns_pid}/ns/net -- "
        f'{qemu_binary("qemu-img")} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("BLOCKCTL_QEMU_IMG", str(wrapper))
    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "q0.qcow2", b"", DISK_MIB * MIB)
    image = await raw_image(nfs.export / "k.raw", pattern(223, (DISK_MIB + 1) * MIB))
    tail = sha256(image.read_bytes()[DISK_MIB * MIB :])
    target = nfs.source("k.raw")
    run_dir = runtime_dir / "lrk"
    killed = await qemu_killed_mid_mirror(guest, "lrk", disk, repo, target, run_dir)
    message = killed.result["message"]
    assert "holds the guest's writes" in message and target.url in message
    assert await follow_way_on(message) == [
        ["blockctl", "restore"],
        ["qemu-img", "rebase"],
        ["qemu-img", "convert"],
    ]
    base = Path(f"{killed.overlay}.base.raw")
    for path in (killed.overlay, base):
        assert str(path) in message and "remove" in message
        path.unlink()
    assert tree_digest(repo.path) == killed.hashes
    want_file = await reference(repo, "lrk", killed.point, tmp_path / "r.raw", RAW_WRITES)
    assert sha256(want_file.read_bytes()) == killed.during
    written = image.read_bytes()
    assert sha256(written[: DISK_MIB * MIB]) == killed.during
    assert sha256(written[DISK_MIB * MIB :]) == tail


@pytest.mark.guest
async def test_a_vm_launched_from_a_point_onto_an_nfs_image_runs_on_a_mirrored_overlay(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    runtime_dir: Path,
    nfs: Nfs,  # noqa: F811
) -> None:
    """A lost VM whose config's drive is a raw image on NFS (named by its URL, as the CLI
    hands it). Onto a 16 MiB image first: refused before QEMU starts (qemu-img measures it),
    nothing made. Then onto an image 1 MiB larger than the disk: QEMU starts with the drive on
    a temporary qcow2 overlay over the point's server; the guest reads the disk whole (the
    point's sha256) and writes while the mirror waits at 1 B/s; released, the device pivots
    onto the image's nodes (``nfs``, ``raw``) and runs alone on it: no job, backup node,
    overlay, server or record. After shutdown the image holds the point plus exactly the
    guest's writes, its last MiB as it was; the repository unchanged."""
    from blockctl._cli.common import load_config
    from tests.integration.test_live_launch import backed_up, console_of, down
    from tests.integration.test_live_restore import fill, read_sha

    # qemu-img (the size check before the launch) reaches the server as QEMU does: in its
    # network namespace.
    wrapper = tmp_path / "qemu-img-in-netns"
    wrapper.write_text(
        f"#!/bin/sh\nexec nsenter --net=/proc/{nfs.netns_pid}/ns/net -- "
        f'{qemu_binary("qemu-img")} "$@"\n'
    )
    wrapper.chmod(0o755)
    repo = backup.init_repository(tmp_path / "repo")
    point, want = await backed_up(guest, images, repo, DISK_MIB)
    hashes = tree_digest(repo.path)
    image = await raw_image(nfs.export / "t.raw", pattern(223, (DISK_MIB + 1) * MIB))
    small = await raw_image(nfs.export / "small.raw", pattern(224, 16 * MIB))
    tail = sha256(image.read_bytes()[DISK_MIB * MIB :])
    small_sha = sha256(small.read_bytes())

    def toml(name: str, file: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'name = "{name}"\nmachine = "pc"\nkernel = "{guest.kernel}"\n'
            f'initrd = "{guest.initrd}"\nappend = "{guest.append}"\n'
            f'deprecated-input = "reject"\n[[drive]]\nformat = "raw"\nnfs = "{nfs.url(file)}"\n'
        )
        return path

    watch = StreamWatch()  # the mirror's id, once it runs
    results: list[live.LiveLaunchResult] = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BLOCKCTL_QEMU_IMG", str(wrapper))
        spawned: list[str] = []
        env.setattr(_machine, "FAILPOINT", spawned.append)
        with pytest.raises(ConfigError) as refused:
            await backup.launch_live(
                load_config(toml("nfssmall", "small.raw"), None),
                repo,
                "src",
                point.id,
                "disk0",
                nfs.url("small.raw"),
            )
        assert refused.value.field == "target" and "nothing was launched" in str(refused.value)
        assert "an NFS image at least as large" in str(refused.value)
        assert spawned == [] and not (runtime_dir / "nfssmall" / "vm.json").exists()
        assert sha256(small.read_bytes()) == small_sha
        env.setattr(_machine, "FAILPOINT", None)

        async def launch() -> None:
            results.append(
                await backup.launch_live(
                    load_config(toml("lostn", "t.raw"), None),
                    repo,
                    "src",
                    point.id,
                    "disk0",
                    nfs.url("t.raw"),
                    control=JobControl(speed=1, hooks=(watch,)),
                )
            )

        run_dir = runtime_dir / "lostn"
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(launch)
                await watch.running.wait()
                (overlay,) = device_overlays(run_dir)
                async with console_of("lostn") as console:
                    # The mirror waits at 1 B/s: everything here happens during the copy.
                    assert (await console.check(read_sha("vda", DISK_MIB))).split()[0] == want
                    for write in RAW_WRITES:
                        await console.check(fill("vda", *write))
                    during = (await console.check(read_sha("vda", DISK_MIB))).split()[0]
                    async with attach_vm("lostn") as vm:
                        jobs = await wire.query_jobs(vm.session)
                        assert [(j.id, j.type) for j in jobs] == [(watch.job_id, "mirror")]
                        assert any(n.startswith("bclr-") for n in await node_names(vm))
                        await vm.command(
                            "block-job-set-speed", {"device": watch.job_id, "speed": 0}
                        )
            (result,) = results
            assert result.vm == "lostn" and result.device_id == "disk0"
            assert result.path == nfs.source("t.raw") and result.format is ImageFormat.RAW
            assert result.job.completed_on_ready and result.job.offset == result.job.length
            async with console_of("lostn") as console:
                assert (await console.check(read_sha("vda", DISK_MIB))).split()[0] == during
            async with attach_vm("lostn") as vm:
                assert await wire.query_jobs(vm.session) == ()
                record = vm.registry.drives["disk0"]
                assert [n["driver"] for n in record.nodes] == ["nfs", "raw"]
                assert record.nodes[0]["path"] == str(image)
                assert await node_names(vm) == set(record.node_names)
                await truth_check(vm)
            assert nbdkit_pids_under(runtime_dir) == [] and not overlay.exists()
            assert not list(run_dir.glob("journal-*.json"))
        finally:
            await down("lostn")
    assert tree_digest(repo.path) == hashes
    want_file = await reference(repo, "src", point.id, tmp_path / "r.raw", RAW_WRITES)
    assert sha256(want_file.read_bytes()) == during
    written = image.read_bytes()
    assert sha256(written[: DISK_MIB * MIB]) == during
    assert sha256(written[DISK_MIB * MIB :]) == tail
