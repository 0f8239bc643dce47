"""Issue 16: what blockctl reports equals what QEMU (and the guest) has, and failures say what
they left behind. Each test is the regression test of one defect of the issue, checked against
QEMU's own replies (``query-block``, ``query-named-block-nodes``, ``query-jobs``,
``query-status``) rather than against blockctl's other views.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl._images import convert, snapshot
from blockctl._jobs import JobIOError, JobProgress, JobTransition
from blockctl._ops import chains, drives
from blockctl._ops.apply import apply, load_desired
from blockctl._qmp import wire
from blockctl._qmp.models import JobStatus
from blockctl.errors import (
    ConfigError,
    JobCancelled,
    JobNeverReady,
    NodeNotFound,
    OperationTimeout,
    ProcessFailed,
    SnapshotLoadFailed,
    UnsafeOperation,
)
from blockctl.jobs import JobControl
from blockctl.types import CacheMode, Drive, ImageFormat, Interface, Media
from tests.conftest import missing
from tests.integration.conftest import (
    MIB,
    base_config,
    cli_json,
    pattern,
    qcow2_image,
    raw_image,
    run,
    truth_check,
)
from tests.integration.test_attach_cli import cli

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
        await truth_check(vm)


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
        await truth_check(vm)


class RunningSignal:
    """A JobHook that tells the test when its job is RUNNING."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.running = anyio.Event()

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.RUNNING:
            self.job_id = transition.job_id
            self.running.set()

    def on_progress(self, progress: JobProgress) -> None:
        pass

    def on_io_error(self, error: JobIOError) -> None:
        pass


async def read_only_state(vm: LaunchedVM) -> dict[str, bool]:
    """Every node's read-only flag as QEMU reports it."""
    return {n.node_name: n.read_only for n in await vm.block_nodes()}


async def assert_base_usable(base: Path, tmp: Path) -> None:
    """What a live backup does with a backing image: read its header and copy it (both
    fail on QEMU's write lock while it is writable)."""
    await run("qemu-img", "info", "-f", "qcow2", "--output=json", base)
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", base, tmp / "copy.raw")


async def slow_chain(images: Path) -> list[Path]:
    """D ← C ← B ← A with 4 MiB of data in B and D: a commit at 64 KiB/s takes a minute."""
    layers = await four_layer_chain(images)
    for layer in (layers[0], layers[2]):
        await run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {4 * MIB}", layer)
    return layers


async def test_intermediate_commit_past_its_deadline(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Defects 3 and 4: a timed-out intermediate commit left its base (and the overlay whose
    backing link it rewrites) read-write, and said JobNeverReady with a library name."""
    layers = await slow_chain(images)
    async with open_vm(base_config(guest, Drive(file=layers[0], format=ImageFormat.QCOW2))) as vm:
        before = await read_only_state(vm)
        assert before["drv0-b3"] and before["drv0-b1"]  # A and C are backing layers
        with pytest.raises(OperationTimeout) as info:
            await chains.commit(
                vm, "disk0", top="drv0-b2", control=JobControl(speed=64 * 1024, deadline=1.5)
            )
        assert not isinstance(info.value, JobNeverReady)  # no READY phase to wait for
        message = str(info.value)
        assert "READY" not in message and "set_speed" not in message
        assert "still running" not in message
        assert re.search(
            r"blockctl cancelled job bc-commit-\S+ \(nothing is left running\)", message
        )
        assert await wire.query_jobs(vm.session) == ()
        assert await read_only_state(vm) == before
        assert [n.name for n in (await chains.read_graph(vm)).chain_of("disk0")] == [
            "drv0",
            "drv0-b1",
            "drv0-b2",
            "drv0-b3",
        ]
        await assert_base_usable(layers[3], tmp_path)
        await assert_base_usable(layers[1], tmp_path)
        await truth_check(vm)


async def test_active_commit_cancelled_from_elsewhere(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Defect 3: an active commit cancelled by another client (``job-cancel``) left its
    base read-write."""
    layers = await slow_chain(images)
    async with open_vm(base_config(guest, Drive(file=layers[0], format=ImageFormat.QCOW2))) as vm:
        before = await read_only_state(vm)
        signal_ = RunningSignal()

        async def other_client() -> None:
            await signal_.running.wait()
            assert signal_.job_id is not None
            await wire.job_cancel(vm.session, signal_.job_id)

        outcome: list[BaseException] = []

        async def commit() -> None:
            try:
                await chains.commit(
                    vm, "disk0", control=JobControl(speed=64 * 1024, hooks=[signal_])
                )
            except JobCancelled as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_client)
            tg.start_soon(commit)
        assert len(outcome) == 1
        assert await wire.query_jobs(vm.session) == ()
        assert await read_only_state(vm) == before
        await assert_base_usable(layers[1], tmp_path)
        await truth_check(vm)


async def test_commit_interrupted_by_the_caller(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Defect 3: a commit whose caller is cancelled (Ctrl-C on the CLI) left its base
    read-write; the clean-up is shielded."""
    layers = await slow_chain(images)
    async with open_vm(base_config(guest, Drive(file=layers[0], format=ImageFormat.QCOW2))) as vm:
        before = await read_only_state(vm)
        signal_ = RunningSignal()
        async with anyio.create_task_group() as tg:

            async def caller() -> None:
                await chains.commit(
                    vm, "disk0", top="drv0-b2", control=JobControl(speed=64 * 1024, hooks=[signal_])
                )

            tg.start_soon(caller)
            await signal_.running.wait()
            tg.cancel_scope.cancel()
        assert await wire.query_jobs(vm.session) == ()
        assert await read_only_state(vm) == before
        await assert_base_usable(layers[3], tmp_path)
        await assert_base_usable(layers[1], tmp_path)
        await truth_check(vm)


async def details_by_node(vm: LaunchedVM) -> dict[str, dict[str, int]]:
    """Internal snapshots per node, with their VM state size, from query-named-block-nodes."""
    return {
        d.node.node_name: dict(d.vm_state_sizes)
        for d in await wire.query_named_block_node_details(vm.session)
    }


async def test_snapshot_load_refuses_before_changing(guest: GuestImage, images: Path) -> None:
    """Defect 5: a load of a missing tag or of a disk-only snapshot left the VM paused in
    ``restore-vm``; it is now refused before anything is sent, and the guest runs on."""
    disk = await qcow2_image(images / "d.qcow2", b"", 8 * MIB)
    await snapshot(disk, "create", "diskonly")  # qemu-img: no VM state
    async with open_vm(base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2))) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        assert (await details_by_node(vm))["drv0"] == {"diskonly": 0}
        with pytest.raises(ConfigError, match=r"'nosuch' is not on disk0.*nothing was changed"):
            await chains.load_internal(vm, "nosuch")
        with pytest.raises(ConfigError, match=r"holds no VM state.*nothing was changed"):
            await chains.load_internal(vm, "diskonly")
        status = await vm.status()
        assert (status.running, status.status) == (True, "running")
        assert await wire.query_jobs(vm.session) == ()
        assert (await sh(vm, "echo alive")) == "alive\n"
        await truth_check(vm)


async def test_snapshot_load_failing_midway_says_what_it_left(
    guest: GuestImage, images: Path
) -> None:
    """Defect 5: a load QEMU fails only while reading the VM state (the RAM size differs)
    reverted the disks, left the VM paused and said nothing; now the error names the run
    state (as query-status has it), the reverted disks and QEMU's reason from its log."""
    disk = await qcow2_image(images / "d.qcow2", b"", 8 * MIB)
    drive = Drive(file=disk, format=ImageFormat.QCOW2)
    async with open_vm(base_config(guest, drive, memory_mib=256)) as vm:
        await chains.save_internal(vm, "small")
    async with open_vm(base_config(guest, drive, memory_mib=320)) as vm:
        with pytest.raises(SnapshotLoadFailed) as info:
            await chains.load_internal(vm, "small")
        failed = info.value
        status = await vm.status()
        assert failed.run_state == status.status
        assert not status.running
        assert failed.reverted == ("disk0",)
        assert not failed.resumed
        message = str(failed)
        assert f"left the VM {status.status}" in message
        assert "does not resume it" in message
        assert any("mismatch" in line for line in failed.qemu_log), failed.qemu_log
        assert "mismatch" in message
        assert await wire.query_jobs(vm.session) == ()
        await truth_check(vm)


async def test_internal_snapshot_disks(guest: GuestImage, images: Path) -> None:
    """Defect 6: ``--disk`` was ignored by save/load/delete, even for a device that does not
    exist; a writable raw disk could not be left out; the VM state disk could not be chosen."""
    a = await qcow2_image(images / "a.qcow2", b"", 8 * MIB)
    b = await qcow2_image(images / "b.qcow2", b"", 8 * MIB)
    raw = await raw_image(images / "r.raw", b"", 8 * MIB)
    config = base_config(
        guest,
        Drive(file=a, format=ImageFormat.QCOW2),
        Drive(file=b, format=ImageFormat.QCOW2),
        Drive(file=raw, format=ImageFormat.RAW),
        name="intdisks",
    )
    async with open_vm(config) as vm:
        for call in (chains.save_internal, chains.load_internal, chains.delete_internal):
            with pytest.raises(NodeNotFound, match="disk9"):
                await call(vm, "t", devices=["disk9"])
        with pytest.raises(UnsafeOperation, match=r"disk2 \(raw\) is writable.*Leave it out"):
            await chains.save_internal(vm, "t")
        with pytest.raises(ConfigError, match="vmstate"):
            await chains.save_internal(vm, "t", devices=["disk0"], vmstate="disk1")
        # The raw disk is left out; the VM state goes to disk1.
        await chains.save_internal(vm, "t", devices=["disk0", "disk1"], vmstate="disk1")
        sizes = await details_by_node(vm)
        assert sizes["drv0"]["t"] == 0 and sizes["drv1"]["t"] > 0
        assert sizes["drv2"] == {}
        # Loading with the VM state on disk0 is refused before anything changes.
        with pytest.raises(ConfigError, match="holds no VM state"):
            await chains.load_internal(vm, "t", devices=["disk0", "disk1"])
        await chains.load_internal(vm, "t", devices=["disk0", "disk1"], vmstate="disk1")
        assert (await vm.status()).running
        # The CLI passes --disk through (and refuses an unknown one).
        bad = await cli(
            "snapshot", "intdisks", "delete", "t", "--internal", "--disk", "disk9", check=False
        )
        assert bad.returncode == 1 and "NodeNotFound" in bad.stderr
        await cli("snapshot", "intdisks", "delete", "t", "--internal", "--disk", "disk0")
        sizes = await details_by_node(vm)
        assert "t" not in sizes["drv0"] and "t" in sizes["drv1"]
        assert await wire.query_jobs(vm.session) == ()
        await truth_check(vm)


async def test_attaching_an_attached_image_names_its_device(
    guest: GuestImage, images: Path
) -> None:
    """Defect 9: attaching an image the VM already has open failed as ``UntrustedImage …
    Failed to get shared "write" lock``; it now names the device (or the chain) using it."""
    base = await qcow2_image(images / "base.qcow2", b"", 8 * MIB)
    top = images / "top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    config = base_config(
        guest,
        Drive(file=top, format=ImageFormat.QCOW2),
        Drive(interface=Interface.IDE, media=Media.CDROM),  # empty
        name="twice",
    )
    async with open_vm(config) as vm:
        nodes_before = {n.node_name for n in await vm.block_nodes()}
        with pytest.raises(ConfigError, match=r"already attached as disk0 \(node drv0\)"):
            await drives.insert(vm, "disk1", top, ImageFormat.QCOW2)
        with pytest.raises(ConfigError, match=r"already attached as disk0 \(node drv0\)"):
            await drives.hotplug(vm, Drive(file=top, format=ImageFormat.QCOW2))
        with pytest.raises(ConfigError, match=r"a backing layer of disk0 \(node drv0-b1\)"):
            await drives.hotplug(vm, Drive(file=base, format=ImageFormat.QCOW2))
        done = await cli("attach", "twice", top, "--format", "qcow2", check=False)
        assert done.returncode == 1
        assert "already attached as disk0" in done.stderr
        assert "UntrustedImage" not in done.stderr and "Failed to get" not in done.stderr
        assert {n.node_name for n in await vm.block_nodes()} == nodes_before
        # A read-only layer can be shared read-only.
        info = await drives.hotplug(vm, Drive(file=base, format=ImageFormat.QCOW2, read_only=True))
        assert info.read_only and info.file == str(base)
        await truth_check(vm)


def bmp_24bpp(path: Path) -> Path:
    """A 1x1 24-bit BMP (the format QEMU's boot splash takes)."""
    pixels = b"\x00\x00\xff\x00"  # one pixel, padded to 4 bytes
    header = (
        b"BM" + (54 + len(pixels)).to_bytes(4, "little") + bytes(4) + (54).to_bytes(4, "little")
    )
    info = (
        (40).to_bytes(4, "little")
        + (1).to_bytes(4, "little")
        + (1).to_bytes(4, "little")
        + (1).to_bytes(2, "little")
        + (24).to_bytes(2, "little")
        + bytes(24)
    )
    path.write_bytes(header + info + pixels)
    return path


async def test_splash_is_relative_to_the_config_file(
    guest: GuestImage, images: Path, runtime_dir: Path
) -> None:
    """Defect 7: ``[boot] splash`` was not resolved against the TOML's directory (kernel and
    initrd are): QEMU logged "failed to find file" and ``up`` reported success."""
    splash = bmp_24bpp(images / "splash.bmp")
    config = images / "vm.toml"
    text = (
        f'name = "splashvm"\nkernel = "{guest.kernel}"\ninitrd = "{guest.initrd}"\n'
        f'append = "{guest.append}"\n\n[boot]\nmenu = true\nsplash = "SPLASH"\n'
        "splash-time = 100\n"
    )
    config.write_text(text.replace("SPLASH", splash.name))
    await cli("up", config)
    try:
        argv = json.loads((await cli("status", "splashvm", "--json")).stdout)
        assert argv["running"]
        log = (runtime_dir / "splashvm" / "qemu.log").read_text()
        assert "failed to find file" not in log
        cmdline = (Path("/proc") / str(argv["pid"]) / "cmdline").read_bytes().split(b"\0")
        assert any(f"splash={splash}".encode() in arg for arg in cmdline), cmdline
    finally:
        await cli("down", "splashvm")
    # A splash image that is not there is refused before QEMU starts.
    config.write_text(text.replace("SPLASH", "absent.bmp"))
    done = await cli("up", config, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("blockctl: ConfigError: boot.splash: ")
    assert str(images / "absent.bmp") in done.stderr
    assert list(runtime_dir.iterdir()) == []


async def test_img_errors_name_their_reason(images: Path, tmp_path: Path) -> None:
    """Defect 8 (qemu-img): ``img check`` of an image qemu-img cannot even open printed the
    last line of its JSON (``}``) or only the exit code; ``-o KEY`` without a value was
    dropped and the convert succeeded."""
    disk = await qcow2_image(images / "c.qcow2", b"\x01" * MIB, 8 * MIB)
    data = bytearray(disk.read_bytes())
    data[40:48] = (0x12345).to_bytes(8, "big")  # an L1 table offset that is not aligned
    disk.write_bytes(bytes(data))
    done = await cli("img", "check", disk, "-f", "qcow2", check=False)
    assert done.returncode == 1
    first = done.stderr.splitlines()[0]
    assert first.startswith("blockctl: ProcessFailed: qemu-img check exited with code 1: ")
    assert "Active L1 table offset invalid" in first
    assert not first.endswith("}")
    good = await qcow2_image(images / "g.qcow2", b"", 8 * MIB)
    out = images / "out.qcow2"
    done = await cli(
        "img", "convert", good, out, "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size", check=False
    )
    assert done.returncode == 1
    assert "ConfigError: option: -o 'cluster_size': needs KEY=VALUE" in done.stderr
    assert not out.exists()


async def test_img_enospc_names_the_errno(images: Path, tmp_path: Path) -> None:
    """Defect 8: a qemu-img step failing on a full file system said only "exited with code
    1"; the error now leads with qemu-img's reason and the errno's name."""
    if os.geteuid() != 0:
        missing("root (to mount a small tmpfs)")
    small = tmp_path / "small"
    small.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small)
    try:
        source = await raw_image(images / "src.raw", pattern(9, 4 * MIB))
        with pytest.raises(ProcessFailed) as info:
            await convert(source, ImageFormat.RAW, small / "dst.raw", ImageFormat.RAW)
        assert info.value.errno == "ENOSPC"
        head = str(info.value).splitlines()[0]
        assert head.startswith("qemu-img convert exited with code 1: ")
        assert "No space left on device (ENOSPC)" in head
        done = await cli(
            "img", "convert", source, small / "dst2.raw", "-f", "raw", "-O", "raw", check=False
        )
        assert done.returncode == 1
        # The error's one line (after the run's plain progress lines: stderr is no terminal).
        (said,) = [line for line in done.stderr.splitlines() if line.startswith("blockctl: ")]
        assert "(ENOSPC)" in said
    finally:
        await run("umount", small)


async def test_url_in_a_toml_file_is_refused_as_a_protocol_string(
    images: Path, runtime_dir: Path
) -> None:
    """Defect 8: a URL in a TOML ``file =`` was joined to the TOML's directory and reported
    missing; it is refused as what it is."""
    config = images / "vm.toml"
    config.write_text('[[drive]]\nfile = "http://example.com/disk.qcow2"\nformat = "qcow2"\n')
    done = await cli("up", config, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("blockctl: ConfigError: drive[0].file: ")
    assert "protocol string" in done.stderr
    assert str(images) not in done.stderr
    drives_file = images / "drives.toml"
    drives_file.write_text('[[drive]]\nfile = "nbd://host/export"\nformat = "raw"\n')
    with pytest.raises(ConfigError, match=r"drive\[0\].file: .*protocol string"):
        load_desired(drives_file)


async def test_external_snapshot_then_cache_change_keeps_backing_read_only(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Found by the truth check: QEMU reopens a snapshot's old top read-only, but blockctl's
    record still said read-write, so the next reopen from the record (``blockctl cache``)
    made that backing layer writable again (and its write lock stopped any copy of it); the
    overlay, recorded without cache options, kept its old cache mode."""
    disk = await qcow2_image(images / "d.qcow2", b"", 8 * MIB)
    config = base_config(
        guest, Drive(file=disk, format=ImageFormat.QCOW2, cache=CacheMode.WRITEBACK)
    )
    async with open_vm(config) as vm:
        # (The guest's virtio driver renegotiates the write cache while it boots, and the
        # cache change depends on it.)
        await vm.console.wait_ready()  # type: ignore[union-attr]
        snap = await chains.external_snapshot(vm, "t1", images)
        assert (await read_only_state(vm))["drv0"]  # QEMU's doing
        await truth_check(vm)
        info = await drives.set_cache(vm, "disk0", CacheMode.NONE)
        assert info.cache is not None and info.cache.direct  # the overlay took the new mode
        nodes = {n.node_name: n for n in await vm.block_nodes()}
        assert nodes["drv0"].read_only
        assert nodes["drv0-s1"].cache.direct and nodes["drv0-s1-file"].cache.direct
        await assert_base_usable(disk, tmp_path)
        await truth_check(vm)
        assert snap.overlays["disk0"].exists()


async def test_drives_names_image_files_not_json_descriptions(
    guest: GuestImage, images: Path
) -> None:
    """Found with the truth check: QEMU names a node whose header gives its backing file by
    a relative name by a ``json:`` description; ``drives`` showed that as the disk's file,
    and ``apply`` matched disks by it, so a drives file naming the attached image planned to
    attach it again and to detach the disk."""
    base = await raw_image(images / "base.raw", b"", 8 * MIB)
    top = images / "top.qcow2"
    # A relative backing name (resolved against the overlay's directory), as is common.
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    config = base_config(guest, Drive(file=top, format=ImageFormat.QCOW2), name="jsonname")
    async with open_vm(config) as vm:
        (raw,) = await vm.block_devices()
        assert raw.inserted is not None and raw.inserted.file.startswith("json:")  # QEMU's way
        (info,) = await drives.list_drives(vm)
        assert info.file == str(top)
        assert [n["filename"] for n in info.to_json()["chain"]] == [str(top), str(base)]
        wanted = images / "drives.toml"
        wanted.write_text(f'[[drive]]\nfile = "{top.name}"\nformat = "qcow2"\n')
        assert (await apply(vm, load_desired(wanted), dry_run=True)).steps == ()
        await truth_check(vm)


async def test_attach_json_reports_the_devices_write_cache(guest: GuestImage, images: Path) -> None:
    """Defect 2, ``attach --json``: a writethrough or directsync disk was reported with
    ``"writeback": true``."""
    async with open_vm(base_config(guest, name="attachwce")) as vm:
        # After boot: the disks' write cache changes while the guest boots (QEMU reports it
        # off for a while, measured), so attach once it has settled.
        await vm.console.wait_ready()  # type: ignore[union-attr]
        for i, mode in enumerate(("writethrough", "directsync", "none")):
            disk = await qcow2_image(images / f"{mode}.qcow2", b"", 8 * MIB)
            attached = await cli_json(
                "attach", "attachwce", str(disk), "--format", "qcow2", "--cache", mode
            )
            assert attached["device"] == f"disk{i}"
            raw = {d.device_id: d for d in await vm.block_devices()}[f"disk{i}"]
            assert raw.inserted is not None
            assert attached["cache"]["writeback"] is raw.inserted.cache.writeback
            assert attached["cache"]["writeback"] is CacheMode(mode).write_cache
        await truth_check(vm)
