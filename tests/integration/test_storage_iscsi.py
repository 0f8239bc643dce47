"""Storage types against real servers: iSCSI LUNs served by a real tgtd on loopback (as an
emulated disk, scsi-hd, and passed through, scsi-block), and host_device on a loop device.

tgtd is started by a fixture on a free loopback port with its own control port, and stopped by
its process id whatever the test did (tgtd ignores SIGTERM while it has targets: they are
deleted first). QEMU reaches the LUNs with its own initiator (libiscsi); the kernel here has no
SCSI layer, so nothing is logged in on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, _binaries, chains, open_vm
from blockctl._backup import operations as backup_ops
from blockctl._machine import is_cd_drive
from blockctl._ops import drives
from blockctl._ops.apply import Action, load_desired
from blockctl._ops.apply import apply as apply_drives
from blockctl._ops.drives import UnplugState
from blockctl._ops.nodes import read_graph
from blockctl._qmp import wire
from blockctl.errors import CommandFailed, ConfigError, PassedThrough
from blockctl.types import (
    CacheMode,
    DeviceErrorPolicy,
    Drive,
    ImageFormat,
    Interface,
    IscsiSource,
    Media,
    Passthrough,
)
from tests.conftest import missing
from tests.figures import report
from tests.integration import test_outage as outage
from tests.integration.conftest import (
    MIB,
    base_config,
    cli_json,
    pattern,
    raw_image,
    run,
    sha256,
    truth_check,
)

pytestmark = pytest.mark.guest

TARGET = "iqn.2026-12.org.blockctl.test:storage"
LUN_SIZE = 16 * MIB


@dataclass(frozen=True, slots=True)
class Tgt:
    """A running tgtd with one target whose LUNs 1.. are files in ``backing``; ``processes``
    holds every tgtd started for it (the last one is the one serving, unless killed)."""

    portal: str
    control: int
    backing: tuple[Path, ...]
    log: Path
    processes: list[subprocess.Popen[bytes]]

    def source(self, lun: int, **kwargs: object) -> IscsiSource:
        return IscsiSource(portal=self.portal, target=TARGET, lun=lun, **kwargs)  # type: ignore[arg-type]

    def admin(self, *args: str) -> None:
        tgtadm(self.control, *args)

    def grow(self, lun: int, size: int) -> None:
        """Grow LUN ``lun``'s file to ``size`` bytes and make the LU again over it: tgt reads
        a LUN's size when the LU is made (removed and made again: the initiators' session
        stays)."""
        os.truncate(self.backing[lun - 1], size)
        self.admin("--lld", "iscsi", "--op", "delete", "--mode", "logicalunit", "--tid", "1",
                   "--lun", str(lun))  # fmt: skip
        self.admin("--lld", "iscsi", "--op", "new", "--mode", "logicalunit", "--tid", "1",
                   "--lun", str(lun), "-b", str(self.backing[lun - 1]))  # fmt: skip

    def kill(self) -> None:
        """The outage: SIGKILL by pid (no goodbye to the initiators), reaped."""
        process = self.processes[-1]
        process.kill()
        process.wait()

    def restart(self) -> None:
        """A new tgtd on the same portal and control port serving the same target, LUNs and
        backing files."""
        for leftover in (f"socket.{self.control}", f"socket.{self.control}.lock"):
            Path("/var/run/tgtd", leftover).unlink(missing_ok=True)
        self.processes.append(start_tgtd(self.portal, self.control, self.backing, self.log))


def tgtadm(control: int, *args: str) -> None:
    result = subprocess.run(
        ["tgtadm", "-C", str(control), *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_control_port() -> int:
    """A tgtd control port (tgtadm -C N: the unix socket /var/run/tgtd/socket.N) no tgtd
    uses now."""
    return next(n for n in range(100, 30000) if not Path(f"/var/run/tgtd/socket.{n}").exists())


def start_tgtd(
    portal: str, control: int, backing: tuple[Path, ...], log: Path
) -> subprocess.Popen[bytes]:
    """tgtd on ``portal`` with control port ``control``: target TARGET, LUN i+1 over
    ``backing[i]``, open to every initiator. The caller stops it (:func:`stop_tgtd`)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal={portal}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # tgtd is ready when its control socket answers (bounded: 10 s).
        for _ in range(100):
            probe = subprocess.run(
                ["tgtadm", "-C", str(control), "--op", "show", "--mode", "system"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                break
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        else:
            raise AssertionError("tgtd did not answer on its control port")
        tgtadm(control, "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1",
               "-T", TARGET)  # fmt: skip
        for lun, path in enumerate(backing, start=1):
            tgtadm(control, "--lld", "iscsi", "--op", "new", "--mode", "logicalunit",
                   "--tid", "1", "--lun", str(lun), "-b", str(path))  # fmt: skip
        tgtadm(control, "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1",
               "-I", "ALL")  # fmt: skip
    except BaseException:
        stop_tgtd(control, process)
        raise
    return process


def stop_tgtd(control: int, process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` by its pid: tgtd ignores SIGTERM while it has targets, so they are
    deleted first, then the system (it exits); SIGKILL if it is still there after 10 s."""
    if process.poll() is None:
        for args in (
            ("--op", "delete", "--mode", "target", "--tid", "1", "--force"),
            ("--op", "delete", "--mode", "system"),
        ):
            subprocess.run(["tgtadm", "-C", str(control), *args], capture_output=True, check=False)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # tgtd leaves its control socket behind when it exits.
    for leftover in (f"socket.{control}", f"socket.{control}.lock"):
        Path("/var/run/tgtd", leftover).unlink(missing_ok=True)


@pytest.fixture
def tgt(tmp_path: Path) -> Iterator[Tgt]:
    """tgtd on 127.0.0.1:PORT (with a control port of its own: another tgtd's is never used),
    target TARGET with LUNs 1 and 2 over files holding a pattern, open to every initiator."""
    if shutil.which("tgtd") is None or shutil.which("tgtadm") is None:
        missing("tgtd/tgtadm (Debian package tgt, installed by scripts/setup)")
    portal = f"127.0.0.1:{free_port()}"
    control = free_control_port()
    backing = []
    for lun in (1, 2):
        path = tmp_path / f"lun{lun}.img"
        path.write_bytes(pattern(100 + lun, LUN_SIZE))
        backing.append(path)
    log = tmp_path / "tgtd.log"
    server = Tgt(
        portal=portal,
        control=control,
        backing=tuple(backing),
        log=log,
        processes=[start_tgtd(portal, control, tuple(backing), log)],
    )
    try:
        yield server
    finally:
        for process in reversed(server.processes):  # the serving one first: its socket
            stop_tgtd(control, process)


async def sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def disk_with_vendor(vm: LaunchedVM, vendor: str) -> str:
    """The guest's sdX whose SCSI INQUIRY vendor is ``vendor`` (bounded wait for it)."""
    found = await sh(
        vm,
        "for i in $(seq 100); do for d in /sys/block/sd*; do "
        f'[ -e $d/device/vendor ] && [ "$(cat $d/device/vendor | tr -d " ")" = {vendor} ] '
        "&& { basename $d; exit 0; }; done; sleep 0.1; done; exit 1",
    )
    return found.strip()


async def guest_write_read(vm: LaunchedVM, dev: str, seed: int, offset_mib: int = 2) -> str:
    """The guest writes 1 MiB of fresh data at ``offset_mib`` of /dev/DEV (O_DIRECT, synced)
    and reads it back from the disk; returns the sha256 both agree on."""
    await sh(vm, f"dd if=/dev/urandom of=/tmp/w{seed} bs=1M count=1 2>/dev/null")
    written = (await sh(vm, f"sha256sum /tmp/w{seed}")).split()[0]
    await sh(
        vm, f"dd if=/tmp/w{seed} of=/dev/{dev} bs=1M seek={offset_mib} oflag=direct 2>/dev/null"
    )
    await sh(vm, "sync")
    await sh(vm, "echo 3 > /proc/sys/vm/drop_caches")
    read = (
        await sh(
            vm,
            f"dd if=/dev/{dev} bs=1M skip={offset_mib} count=1 iflag=direct 2>/dev/null "
            "| sha256sum",
        )
    ).split()[0]
    assert read == written
    return written


async def guest_view(vm: LaunchedVM, dev: str) -> str:
    """sha256 of the whole disk as the guest reads it (caches dropped, O_DIRECT)."""
    await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
    return (await sh(vm, f"dd if=/dev/{dev} bs=1M iflag=direct 2>/dev/null | sha256sum")).split()[0]


def mib(data: bytes, at: int) -> bytes:
    """The MiB of ``data`` at ``at`` MiB."""
    return data[at * MIB : (at + 1) * MIB]


async def node_names(vm: LaunchedVM) -> set[str]:
    return {n.node_name for n in await vm.block_nodes()}


async def test_iscsi_lun_at_launch_and_passed_through_by_hotplug(
    guest: GuestImage, tgt: Tgt
) -> None:
    """LUN 1 is an emulated SCSI disk from launch (scsi-hd: the guest sees QEMU's INQUIRY),
    LUN 2 is hot-plugged passed through (scsi-block: the guest sees tgt's own INQUIRY). The
    guest reads what the host put on each LUN, writes and reads back through each; after
    unplug the LUNs' backing files hold what the guest wrote, and nothing is left in QEMU."""
    launch = Drive(iscsi=tgt.source(1), format=ImageFormat.RAW, interface=Interface.SCSI)
    async with open_vm(base_config(guest, launch)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        listed = {d.device_id: d for d in await drives.list_drives(vm)}
        assert listed["disk0"].device_driver == "scsi-hd"
        assert listed["disk0"].file == f"iscsi://{tgt.portal}/{TARGET}/1"
        assert [n.driver for n in await vm.block_nodes() if n.node_name == "drv0-file"] == ["iscsi"]
        passthrough = await drives.hotplug(
            vm,
            Drive(
                iscsi=tgt.source(2),
                format=ImageFormat.RAW,
                interface=Interface.SCSI,
                passthrough=Passthrough.BLOCK,
            ),
        )
        assert passthrough.device_driver == "scsi-block"
        # QEMU takes no lock on a LUN: blockctl refuses a second writer by the LUN's URL.
        for again in (launch, Drive(iscsi=tgt.source(2), format=ImageFormat.RAW)):
            with pytest.raises(ConfigError, match="already attached as disk"):
                await drives.hotplug(vm, again)
        assert passthrough.file == f"iscsi://{tgt.portal}/{TARGET}/2"
        emulated = await disk_with_vendor(vm, "QEMU")
        passed = await disk_with_vendor(vm, "IET")  # tgt's vendor id: the LUN itself
        assert emulated != passed
        for dev, lun in ((emulated, 1), (passed, 2)):
            head = await sh(vm, f"dd if=/dev/{dev} bs=1M count=2 2>/dev/null | sha256sum")
            assert head.split()[0] == sha256(pattern(100 + lun, LUN_SIZE)[: 2 * MIB])
        sums = {
            1: await guest_write_read(vm, emulated, 1),
            2: await guest_write_read(vm, passed, 2),
        }
        await truth_check(vm)
        for device_id in ("disk0", passthrough.device_id):
            result = await drives.unplug(vm, device_id)
            assert result.state is UnplugState.REMOVED
        assert await node_names(vm) == set()
        assert vm.registry.drives == {}
        await truth_check(vm)
    for lun, path in enumerate(tgt.backing, start=1):
        data = path.read_bytes()
        assert sha256(data[2 * MIB : 3 * MIB]) == sums[lun]
        # The rest of the LUN is as the host wrote it.
        assert data[: 2 * MIB] == pattern(100 + lun, LUN_SIZE)[: 2 * MIB]


async def test_iscsi_chap_secret_from_a_file(
    guest: GuestImage, tgt: Tgt, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """With CHAP on the target, a LUN is reached with the right password (read by QEMU from
    a 0600 file through a secret object, deleted at unplug) and refused with a wrong one,
    which leaves nothing behind; the password is in no argv, log or record."""
    password = "chap-secret-4f1c2e9a"  # tgt: 12-16 characters for iSCSI CHAP
    tgt.admin("--lld", "iscsi", "--op", "new", "--mode", "account", "--user", "bob",
              "--password", password)  # fmt: skip
    tgt.admin("--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", "1",
              "--user", "bob")  # fmt: skip
    good = tmp_path / "chap.pw"
    good.write_text(password)
    good.chmod(0o600)
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    # LUN 2 from launch (the secret an -object), LUN 1 hot-plugged (object-add).
    at_launch = Drive(
        iscsi=tgt.source(2, user="bob", password_file=good),
        format=ImageFormat.RAW,
        interface=Interface.SCSI,
    )
    async with open_vm(base_config(guest, at_launch)) as vm:
        assert "-object" in vm.argv
        assert (await drives.drive_info(vm, "disk0")).size == LUN_SIZE
        before = await node_names(vm)
        launch_secrets = {o for o in await object_ids(vm) if o.endswith("-secret")}
        assert launch_secrets == {"drv0-file-secret"}
        with pytest.raises(CommandFailed) as refused:
            await drives.hotplug(
                vm,
                Drive(
                    iscsi=tgt.source(1, user="bob", password_file=wrong),
                    format=ImageFormat.RAW,
                    interface=Interface.SCSI,
                ),
            )
        assert "Authentication failure" in str(refused.value)
        assert await node_names(vm) == before
        assert {o for o in await object_ids(vm) if o.endswith("-secret")} == launch_secrets
        info = await drives.hotplug(
            vm,
            Drive(
                iscsi=tgt.source(1, user="bob", password_file=good),
                format=ImageFormat.RAW,
                interface=Interface.SCSI,
            ),
        )
        assert info.size == LUN_SIZE
        secrets = [o for o in await object_ids(vm) if o.endswith("-secret")]
        assert len(secrets) == 2
        # The drive's record (registry), vm.json, journals, qemu.log: the file name only.
        files = [p for p in vm.run_dir.rglob("*") if p.is_file()]
        assert files
        for path in files:
            assert password.encode() not in path.read_bytes(), path
        # The drive's record is among them, naming the secret object only.
        assert any(secrets[0].encode() in p.read_bytes() for p in files)
        result = await drives.unplug(vm, info.device_id)
        assert result.state is UnplugState.REMOVED
        assert {o for o in await object_ids(vm) if o.endswith("-secret")} == launch_secrets
        assert await node_names(vm) == before
        result = await drives.unplug(vm, "disk0")
        assert result.state is UnplugState.REMOVED
        assert not [o for o in await object_ids(vm) if o.endswith("-secret")]
        assert await node_names(vm) == set()
        argv = list(vm.argv)
    assert password not in " ".join(argv)
    out, err = capfd.readouterr()
    assert password not in out + err  # blockctl's log lines and QEMU's


async def object_ids(vm: LaunchedVM) -> list[str]:
    return list(await wire.qom_list(vm.session, "/objects"))


async def test_host_device_on_a_loop_device(guest: GuestImage, tmp_path: Path) -> None:
    """A raw drive whose file is a block device (a loop device here: this kernel has no
    device-mapper, so no LVM volume) is opened with the host_device driver; the guest reads
    the host's data and writes through to the device."""
    if shutil.which("losetup") is None:
        missing("losetup (util-linux)")
    image = await raw_image(tmp_path / "loop.img", pattern(7, 8 * MIB))
    attached = await anyio.run_process(["losetup", "-f", "--show", str(image)], check=False)
    if attached.returncode != 0:
        missing(f"a loop device ({attached.stderr.decode().strip()})")
    loop = Path(attached.stdout.decode().strip())
    try:
        async with open_vm(base_config(guest)) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            info = await drives.hotplug(vm, Drive(file=loop, format=ImageFormat.RAW))
            assert info.file == str(loop)
            drivers = {n.node_name: n.driver for n in await vm.block_nodes()}
            assert drivers[f"{info.top_node}-file"] == "host_device"
            await sh(vm, "for i in $(seq 100); do [ -b /dev/vda ] && exit 0; sleep 0.1; done")
            head = await sh(vm, "dd if=/dev/vda bs=1M count=2 2>/dev/null | sha256sum")
            assert head.split()[0] == sha256(pattern(7, 8 * MIB)[: 2 * MIB])
            written = await guest_write_read(vm, "vda", 3)
            await truth_check(vm)
            result = await drives.unplug(vm, info.device_id)
            assert result.state is UnplugState.REMOVED
            assert await node_names(vm) == set()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.run_process(["losetup", "-d", str(loop)], check=False)
    assert sha256(image.read_bytes()[2 * MIB : 3 * MIB]) == written


async def iso_image(directory: Path, name: str, data: bytes) -> Path:
    """An ISO 9660 image (genisoimage, Rock Ridge) holding ``data`` as ``data.bin``."""
    if shutil.which("genisoimage") is None:
        missing("genisoimage (Debian package genisoimage, installed by scripts/setup)")
    tree = directory / name
    tree.mkdir()
    (tree / "data.bin").write_bytes(data)
    iso = directory / f"{name}.iso"
    await run("genisoimage", "-quiet", "-R", "-V", name.upper(), "-o", iso, tree)
    return iso


async def cd_read(vm: LaunchedVM, dev: str) -> tuple[str, str]:
    """What the guest reads from the CD in /dev/DEV: the sha256 of the whole device (the
    first read after a media change may fail with UNIT ATTENTION: read again, bounded) and
    of data.bin from the ISO 9660 file system mounted on it."""
    whole = await sh(
        vm,
        f"for i in $(seq 50); do dd if=/dev/{dev} of=/dev/null bs=2048 count=1 2>/dev/null "
        f"&& break; sleep 0.1; done; dd if=/dev/{dev} bs=2048 2>/dev/null | sha256sum",
    )
    mounted = await sh(
        vm,
        f"mkdir -p /mnt/cd && mount -t iso9660 -o ro /dev/{dev} /mnt/cd && "
        "sha256sum /mnt/cd/data.bin; umount /mnt/cd",
    )
    return whole.split()[0], mounted.split()[0]


async def test_a_cdrom_drive_over_a_loop_device_holding_an_iso(
    guest: GuestImage, tmp_path: Path
) -> None:
    """This host has no CD drive: a read-only loop device over an ISO 9660 image stands in
    for one. It is no CD drive to the kernel (CDROM_DRIVE_STATUS: EINVAL), and QEMU's
    host_cdrom driver then reports it empty ("No medium found", checked here with qemu-io),
    so blockctl opens it host_device under a scsi-cd, as QEMU's own probe would. The guest
    reads the whole disc and a file from the mounted ISO; eject, insert and change onto
    another such device; a second CD drive hot-plugged and unplugged."""
    if shutil.which("losetup") is None:
        missing("losetup (util-linux)")
    data = {name: pattern(seed, 300 * 1024) for name, seed in (("one", 61), ("two", 62))}
    isos = {name: await iso_image(tmp_path, name, content) for name, content in data.items()}
    expect = {
        name: (sha256(isos[name].read_bytes()), sha256(content)) for name, content in data.items()
    }
    loops: dict[str, Path] = {}
    try:
        for name, iso in isos.items():
            attached = await anyio.run_process(["losetup", "-r", "-f", "--show", str(iso)])
            loops[name] = Path(attached.stdout.decode().strip())
        assert not any(is_cd_drive(loop) for loop in loops.values())
        probe = await anyio.run_process(
            [_binaries.binary("qemu-io"), "-r", "-c", "read 0 2048", "--image-opts",
             f"driver=raw,file.driver=host_cdrom,file.filename={loops['one']}"],
            check=False,
        )  # fmt: skip
        assert "No medium found" in (probe.stdout + probe.stderr).decode()

        cdrom = Drive(
            file=loops["one"], format=ImageFormat.RAW, interface=Interface.SCSI, media=Media.CDROM
        )
        async with open_vm(base_config(guest, cdrom, name="loopcd")) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            drivers = {n.node_name: n.driver for n in await vm.block_nodes()}
            assert drivers == {"drv0-file": "host_device", "drv0": "raw"}
            (info,) = await drives.list_drives(vm)
            assert (info.device_driver, info.file, info.read_only) == (
                "scsi-cd",
                str(loops["one"]),
                True,
            )
            assert await cd_read(vm, "sr0") == expect["one"]
            await truth_check(vm)

            await drives.eject(vm, "disk0")
            (info,) = await drives.list_drives(vm)
            assert (info.top_node, info.tray_open) == (None, True)
            assert await node_names(vm) == set()
            inserted = await drives.insert(vm, "disk0", loops["two"], ImageFormat.RAW)
            assert inserted.file == str(loops["two"])
            drivers = {n.node_name: n.driver for n in await vm.block_nodes()}
            assert sorted(drivers.values()) == ["host_device", "raw"]
            assert await cd_read(vm, "sr0") == expect["two"]
            changed = await drives.change_medium(vm, "disk0", loops["one"], ImageFormat.RAW)
            assert changed.file == str(loops["one"])
            assert await cd_read(vm, "sr0") == expect["one"]
            await truth_check(vm)

            # A second CD drive from the command line (another process): attach --cdrom.
            kept = await node_names(vm)
            second = await cli_json(
                "attach", vm.name, str(loops["two"]), "--format", "raw", "--bus", "scsi", "--cdrom"
            )
            assert (second["driver"], second["read_only"], second["file"]) == (
                "scsi-cd",
                True,
                str(loops["two"]),
            )
            assert [n["driver"] for n in second["chain"]] == ["raw"]
            drivers = {n.node_name: n.driver for n in await vm.block_nodes()}
            assert drivers[f"{second['node']}-file"] == "host_device"
            await sh(vm, "for i in $(seq 100); do [ -b /dev/sr1 ] && exit 0; sleep 0.1; done")
            assert await cd_read(vm, "sr1") == expect["two"]
            await truth_check(vm)
            detached = await cli_json("detach", vm.name, second["device"])
            assert detached["state"] == "removed"
            assert await node_names(vm) == kept
            await truth_check(vm)
    finally:
        with anyio.CancelScope(shield=True):
            for loop in loops.values():
                await anyio.run_process(["losetup", "-d", str(loop)], check=False)
    # Read-only all along: the ISOs are as made.
    assert {name: sha256(iso.read_bytes()) for name, iso in isos.items()} == {
        name: sums[0] for name, sums in expect.items()
    }


async def test_full_backup_of_an_iscsi_disk_restores_the_guests_view(
    guest: GuestImage, tgt: Tgt, tmp_path: Path
) -> None:
    """A full backup of a disk on an iSCSI LUN into a repository restores to exactly what
    the guest reads from that disk at the point (and what the LUN's file holds)."""
    repo = backup_ops.init_repository(tmp_path / "repo")
    disk = Drive(iscsi=tgt.source(1), format=ImageFormat.RAW, interface=Interface.SCSI)
    async with open_vm(base_config(guest, disk, name="iscsibk")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        dev = await disk_with_vendor(vm, "QEMU")
        await guest_write_read(vm, dev, 5)
        await sh(vm, "sync")
        guest_view = (
            await sh(vm, f"dd if=/dev/{dev} bs=1M iflag=direct 2>/dev/null | sha256sum")
        ).split()[0]
        manifest = await backup_ops.backup(vm, repo, kind="full")
        assert [d.device for d in manifest.disks] == ["disk0"]
    restored = tmp_path / "restored.raw"
    await backup_ops.restore(repo, "iscsibk", manifest.id, "disk0", restored, ImageFormat.RAW)
    data = restored.read_bytes()
    assert len(data) == LUN_SIZE
    assert sha256(data) == guest_view
    assert data == tgt.backing[0].read_bytes()


async def test_apply_attaches_an_iscsi_lun_once_and_detaches_it(
    guest: GuestImage, tgt: Tgt, tmp_path: Path
) -> None:
    """A drives file naming a LUN by its iscsi:// URL: the first apply attaches it, the
    second finds the VM matching (the live disk is named by the same URL), an empty file
    detaches it."""
    wanted = tmp_path / "drives.toml"
    wanted.write_text(
        f'[[drive]]\nformat = "raw"\nif = "scsi"\niscsi = "iscsi://{tgt.portal}/{TARGET}/2"\n'
    )
    empty = tmp_path / "none.toml"
    empty.write_text("")
    async with open_vm(base_config(guest)) as vm:
        first = await apply_drives(vm, load_desired(wanted))
        assert [s.action for s in first.steps] == [Action.ATTACH]
        (info,) = await drives.list_drives(vm)
        assert info.file == f"iscsi://{tgt.portal}/{TARGET}/2"
        assert info.size == LUN_SIZE
        again = await apply_drives(vm, load_desired(wanted), dry_run=True)
        assert again.empty
        gone = await apply_drives(vm, load_desired(empty))
        assert [(s.action, s.device) for s in gone.steps] == [(Action.DETACH, info.device_id)]
        assert await drives.list_drives(vm) == ()
        assert await node_names(vm) == set()


async def test_iscsi_disk_snapshot_commit_and_incremental_backup(
    guest: GuestImage, tgt: Tgt, tmp_path: Path
) -> None:
    """An emulated iSCSI disk (scsi-hd) is snapshotted onto a local overlay (``--dir``
    required: the LUN has no directory here), the guest writes into the overlay (the LUN's
    file does not change), and an active commit brings it back onto the iscsi node: the LUN's
    file then holds every write. A full backup, more guest writes, and an incremental one that
    reads less than the disk restores to exactly the guest's view and the LUN's file."""
    url = f"iscsi://{tgt.portal}/{TARGET}/1"
    original = pattern(101, LUN_SIZE)
    repo = backup_ops.init_repository(tmp_path / "repo")
    disk = Drive(iscsi=tgt.source(1), format=ImageFormat.RAW, interface=Interface.SCSI)
    async with open_vm(base_config(guest, disk, name="iscsichain")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        dev = await disk_with_vendor(vm, "QEMU")
        before = await guest_write_read(vm, dev, 11, 2)
        nodes_before = await node_names(vm)
        with pytest.raises(ConfigError, match="--dir"):
            await chains.external_snapshot(vm, "s1", devices=["disk0"])
        assert await node_names(vm) == nodes_before
        overlays = tmp_path / "overlays"
        overlays.mkdir()
        snap = await chains.external_snapshot(vm, "s1", overlays, devices=["disk0"])
        overlay = snap.overlays["disk0"]
        assert overlay.parent == overlays
        assert snap.frozen["disk0"] == url
        assert (await chains.list_external(vm))["disk0"] == [str(overlay), url]
        in_overlay = await guest_write_read(vm, dev, 12, 5)
        # The overlay took the write: the LUN still holds what the host put there.
        assert mib(tgt.backing[0].read_bytes(), 5) == mib(original, 5)
        await truth_check(vm)
        committed = await chains.commit(vm, "disk0")
        assert len(committed.chain) == 1
        assert (await chains.list_external(vm))["disk0"] == [url]
        assert (await drives.drive_info(vm, "disk0")).file == url
        assert await node_names(vm) == nodes_before
        await truth_check(vm)
        # The commit reached the target: tgtd wrote it into the LUN's file.
        lun = tgt.backing[0].read_bytes()
        assert sha256(mib(lun, 2)) == before
        assert sha256(mib(lun, 5)) == in_overlay

        full = await backup_ops.backup(vm, repo, kind="full")
        after = await guest_write_read(vm, dev, 13, 9)
        view = await guest_view(vm, dev)
        inc = await backup_ops.backup(vm, repo, kind="incremental")
        assert (inc.kind, inc.parent) == ("incremental", full.id)
        (point,) = inc.disks
        assert point.device == "disk0"
        assert point.bytes_read < LUN_SIZE  # only what changed since the full backup
        await truth_check(vm)
    header = json.loads(await run("qemu-img", "info", "--output=json", "-U", overlay))
    assert header["backing-filename"] == url
    restored = tmp_path / "restored.raw"
    await backup_ops.restore(repo, "iscsichain", inc.id, "disk0", restored, ImageFormat.RAW)
    data = restored.read_bytes()
    assert sha256(data) == view
    assert data == tgt.backing[0].read_bytes()
    assert sha256(mib(data, 9)) == after


async def test_host_device_snapshot_commit_backup_restore(
    guest: GuestImage, tmp_path: Path
) -> None:
    """A raw disk on a block device (host_device on a loop device) is snapshotted onto a local
    overlay (``--dir`` required: its directory is /dev), written by the guest, and actively
    committed back onto the host_device node; a full backup restores to exactly the guest's
    view; after shutdown the loop device's file holds every write, including the one made
    into the overlay, and equals the restored image."""
    if shutil.which("losetup") is None:
        missing("losetup (util-linux)")
    original = pattern(8, LUN_SIZE)
    image = await raw_image(tmp_path / "loop.img", original)
    attached = await anyio.run_process(["losetup", "-f", "--show", str(image)], check=False)
    if attached.returncode != 0:
        missing(f"a loop device ({attached.stderr.decode().strip()})")
    loop = Path(attached.stdout.decode().strip())
    repo = backup_ops.init_repository(tmp_path / "repo")
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    try:
        disk = Drive(file=loop, format=ImageFormat.RAW, serial="loopdisk")
        async with open_vm(base_config(guest, disk, name="loopchain")) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            drivers = {n.node_name: n.driver for n in await vm.block_nodes()}
            assert drivers["drv0-file"] == "host_device"
            before = await guest_write_read(vm, "vda", 21, 2)
            nodes_before = await node_names(vm)
            with pytest.raises(ConfigError, match=f"block device {loop}.*--dir"):
                await chains.external_snapshot(vm, "s1", devices=["disk0"])
            assert await node_names(vm) == nodes_before
            snap = await chains.external_snapshot(vm, "s1", overlays, devices=["disk0"])
            overlay = snap.overlays["disk0"]
            assert snap.frozen["disk0"] == str(loop)
            assert (await chains.list_external(vm))["disk0"] == [str(overlay), str(loop)]
            in_overlay = await guest_write_read(vm, "vda", 22, 5)
            await truth_check(vm)
            await chains.commit(vm, "disk0")
            assert (await chains.list_external(vm))["disk0"] == [str(loop)]
            assert await node_names(vm) == nodes_before
            assert (await drives.drive_info(vm, "disk0")).file == str(loop)
            await truth_check(vm)
            view = await guest_view(vm, "vda")
            manifest = await backup_ops.backup(vm, repo, kind="full")
            assert [d.device for d in manifest.disks] == ["disk0"]
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.run_process(["losetup", "-d", str(loop)], check=False)
    header = json.loads(await run("qemu-img", "info", "--output=json", "-U", overlay))
    assert header["backing-filename"] == str(loop)
    restored = tmp_path / "restored.raw"
    await backup_ops.restore(repo, "loopchain", manifest.id, "disk0", restored, ImageFormat.RAW)
    assert sha256(restored.read_bytes()) == view
    data = image.read_bytes()
    assert sha256(mib(data, 2)) == before
    assert sha256(mib(data, 5)) == in_overlay  # only the commit can have put it there
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, restored)


async def test_a_passed_through_lun_refuses_an_external_snapshot(
    guest: GuestImage, tgt: Tgt, tmp_path: Path
) -> None:
    """A passed-through LUN (scsi-block) cannot take an overlay: QEMU accepts one (measured:
    blockdev-snapshot succeeds), but the guest's SCSI commands then reach a qcow2 node that
    cannot pass them on and every guest read and write fails with EIO. blockctl refuses the
    snapshot before it touches anything, naming the disk, the reason and the ways out, both
    when the disk is named and when every disk is meant; nothing changes (nodes, records,
    files, the guest's I/O), and the emulated disk beside it (the way out: name the others)
    is snapshotted and committed back as usual. A commit has nothing to commit into."""
    emulated = Drive(iscsi=tgt.source(1), format=ImageFormat.RAW, interface=Interface.SCSI)
    passed = Drive(
        iscsi=tgt.source(2),
        format=ImageFormat.RAW,
        interface=Interface.SCSI,
        passthrough=Passthrough.BLOCK,
    )
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    async with open_vm(base_config(guest, emulated, passed, name="ptsnap")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        listed = {d.device_id: d.device_driver for d in await drives.list_drives(vm)}
        assert listed == {"disk0": "scsi-hd", "disk1": "scsi-block"}
        lun_dev = await disk_with_vendor(vm, "IET")
        before = await guest_write_read(vm, lun_dev, 31, 2)
        nodes = await node_names(vm)
        records = dict(vm.registry.drives)
        chains_before = await chains.list_external(vm)
        for devices in (["disk1"], None):
            with pytest.raises(PassedThrough) as refused:
                await chains.external_snapshot(vm, "s1", overlays, devices=devices)
            assert (refused.value.operation, refused.value.device_id) == ("snapshot", "disk1")
            assert refused.value.device_driver == "scsi-block"
            said = str(refused.value)
            assert "disk1 is a passed-through LUN (scsi-block)" in said
            assert "cannot pass them on" in said and "leave disk1 out" in said
            assert await node_names(vm) == nodes
            assert dict(vm.registry.drives) == records
            assert await chains.list_external(vm) == chains_before
            assert list(overlays.iterdir()) == []
        with pytest.raises(ConfigError, match="no backing file to commit into"):
            await chains.commit(vm, "disk1")
        assert await node_names(vm) == nodes
        # A backup too: the LUN's writes are ioctls that no dirty bitmap records and no
        # copy-before-write filter holds back, so a point of it could miss writes silently.
        repo = backup_ops.init_repository(tmp_path / "repo")
        bitmaps = {n.name: n.dirty_bitmaps for n in (await read_graph(vm)).nodes.values()}
        for devices in (["disk1"], None):
            with pytest.raises(PassedThrough) as refused:
                await backup_ops.backup(vm, repo, devices=devices)
            assert (refused.value.operation, refused.value.device_id) == ("backup", "disk1")
            said = str(refused.value)
            assert "no dirty bitmap records them" in said and "leave disk1 out" in said
            assert await node_names(vm) == nodes
            assert {
                n.name: n.dirty_bitmaps for n in (await read_graph(vm)).nodes.values()
            } == bitmaps
            assert await wire.query_jobs(vm.session) == ()
            assert await wire.query_block_exports(vm.session) == ()
            assert repo.manifests("ptsnap") == [] and repo.incomplete_points("ptsnap") == []
        # The guest's I/O on the LUN goes on as before.
        after = await guest_write_read(vm, lun_dev, 32, 5)
        grown = await passed_through_live_operations(vm, tgt, "disk1", lun_dev, 2, rescan=False)
        await truth_check(vm)
        # The way out: the other disks alone.
        snap = await chains.external_snapshot(vm, "s1", overlays, devices=["disk0"])
        assert list(snap.overlays) == ["disk0"]
        await chains.commit(vm, "disk0")
        assert await node_names(vm) == nodes
        point = await backup_ops.backup(vm, repo, devices=["disk0"])
        assert [d.device for d in point.disks] == ["disk0"]
        await truth_check(vm)
    lun = tgt.backing[1].read_bytes()
    assert (sha256(mib(lun, 2)), sha256(mib(lun, 5)), sha256(mib(lun, 20))) == (
        before,
        after,
        grown,
    )


async def iet_disks(vm: LaunchedVM, count: int) -> dict[str, str]:
    """The guest's sdX whose INQUIRY vendor is tgt's (``IET``), once there are ``count`` of
    them (bounded wait), each with the sha256 of its first MiB (which LUN it is)."""
    found = await sh(
        vm,
        "for i in $(seq 100); do n=0; for d in /sys/block/sd*; do "
        '[ -e $d/device/vendor ] && [ "$(cat $d/device/vendor | tr -d " ")" = IET ] '
        f"&& n=$((n+1)); done; [ $n -ge {count} ] && break; sleep 0.1; done; "
        "for d in /sys/block/sd*; do "
        '[ "$(cat $d/device/vendor | tr -d " ")" = IET ] && '
        "echo $(basename $d) $(dd if=/dev/$(basename $d) bs=1M count=1 iflag=direct "
        "2>/dev/null | sha256sum); done; true",
    )
    disks = {line.split()[0]: line.split()[1] for line in found.splitlines() if line.strip()}
    assert len(disks) == count, found
    return disks


async def passed_through_live_operations(
    vm: LaunchedVM, tgt: Tgt, device_id: str, dev: str, lun: int, *, rescan: bool
) -> str:
    """On a passed-through LUN: I/O limits refused (QEMU would show them and not apply them
    to the guest's SG_IO writes: measured) with none set; a live cache change to ``none``
    and back (the nodes' flags as QEMU reports them, the guest's I/O going on); a resize
    past the LUN refused, then, the LUN grown on its target, the resize reaching QEMU's
    node and the guest (scsi-generic: after the guest's own rescan: it reads the LUN's
    capacity from the target), which writes into the new part. Returns that write's sha256."""
    with pytest.raises(PassedThrough) as refused:
        await drives.set_throttle(vm, device_id, {"bps_wr": MIB})
    assert (refused.value.operation, refused.value.device_id) == ("throttle", device_id)
    assert "QEMU's I/O limits do not hold back" in str(refused.value)
    limits = (await drives.drive_info(vm, device_id)).io_limits
    assert limits is None or not limits.limited
    for mode, seed in ((CacheMode.NONE, 51), (CacheMode.WRITEBACK, 52)):
        info = await drives.set_cache(vm, device_id, mode)
        assert info.cache is not None and info.cache.direct == mode.direct
        flags = await node_cache(vm, device_id)
        assert flags and set(flags.values()) == {(mode.direct, False)}, flags
        await guest_write_read(vm, dev, seed, 4)
    nodes = await node_names(vm)
    with pytest.raises(ConfigError, match="grow the LUN on its target first"):
        await drives.resize(vm, device_id, 2 * LUN_SIZE)
    assert (await drives.drive_info(vm, device_id)).size == LUN_SIZE
    assert await node_names(vm) == nodes
    tgt.grow(lun, 2 * LUN_SIZE)
    assert (await drives.resize(vm, device_id, 2 * LUN_SIZE)).size == 2 * LUN_SIZE
    if rescan:
        await sh(vm, f"echo 1 > /sys/block/{dev}/device/rescan")
    assert await guest_size(vm, dev, 2 * LUN_SIZE) == 2 * LUN_SIZE
    return await guest_write_read(vm, dev, 53, 20)


async def test_an_iscsi_lun_passed_through_as_scsi_generic(
    guest: GuestImage, tgt: Tgt, tmp_path: Path
) -> None:
    """``passthrough = "generic"``: LUN 1 at launch and LUN 2 hot-plugged as scsi-generic on
    the ``iscsi`` node (every SCSI command, reads and writes too, is an SG_IO that QEMU's
    libiscsi driver answers). The guest sees tgt's INQUIRY (vendor IET), its sd driver binds
    each as a disk, reads what the host put there, writes and reads back; a snapshot and a
    backup of either are refused (``PassedThrough``) with nothing changed; after unplug the
    LUNs' files hold the guest's writes and nothing is left in QEMU."""
    launch = Drive(
        iscsi=tgt.source(1),
        format=ImageFormat.RAW,
        interface=Interface.SCSI,
        passthrough=Passthrough.GENERIC,
    )
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    async with open_vm(base_config(guest, launch, name="sgeneric")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        hotplugged = await drives.hotplug(
            vm,
            Drive(
                iscsi=tgt.source(2),
                format=ImageFormat.RAW,
                interface=Interface.SCSI,
                passthrough=Passthrough.GENERIC,
            ),
        )
        listed = {d.device_id: d for d in await drives.list_drives(vm)}
        assert {k: d.device_driver for k, d in listed.items()} == {
            "disk0": "scsi-generic",
            hotplugged.device_id: "scsi-generic",
        }
        assert listed["disk0"].file == f"iscsi://{tgt.portal}/{TARGET}/1"
        assert hotplugged.file == f"iscsi://{tgt.portal}/{TARGET}/2"
        assert {n.driver for n in await vm.block_nodes()} == {"iscsi", "raw"}
        # The guest's sd binds both as disks; which is which by the host's pattern.
        heads = {sha256(pattern(100 + lun, LUN_SIZE)[:MIB]): lun for lun in (1, 2)}
        devs = {heads[head]: dev for dev, head in (await iet_disks(vm, 2)).items()}
        assert set(devs) == {1, 2}
        for dev in devs.values():
            assert await sh(vm, f"cat /sys/block/{dev}/size") == f"{LUN_SIZE // 512}\n"
            assert (await sh(vm, f"cat /sys/block/{dev}/device/model")).strip() == "VIRTUAL-DISK"
        sums = {lun: await guest_write_read(vm, dev, 40 + lun) for lun, dev in devs.items()}
        await truth_check(vm)
        # Refused like scsi-block: the guest's I/O is ioctls no overlay, bitmap or job sees.
        nodes = await node_names(vm)
        records = dict(vm.registry.drives)
        repo = backup_ops.init_repository(tmp_path / "repo")
        for device in ("disk0", hotplugged.device_id):
            with pytest.raises(PassedThrough) as refused:
                await chains.external_snapshot(vm, "s1", overlays, devices=[device])
            assert (refused.value.device_id, refused.value.device_driver) == (
                device,
                "scsi-generic",
            )
            assert f"{device} is a passed-through LUN (scsi-generic)" in str(refused.value)
            with pytest.raises(PassedThrough) as refused:
                await backup_ops.backup(vm, repo, devices=[device])
            assert refused.value.operation == "backup"
        for refusal in (
            chains.external_snapshot(vm, "s1", overlays),
            backup_ops.backup(vm, repo),
        ):
            with pytest.raises(PassedThrough):
                await refusal
        assert await node_names(vm) == nodes
        assert dict(vm.registry.drives) == records
        assert await wire.query_jobs(vm.session) == ()
        assert await wire.query_block_exports(vm.session) == ()
        assert list(overlays.iterdir()) == []
        assert repo.manifests("sgeneric") == [] and repo.incomplete_points("sgeneric") == []
        # The guest's I/O goes on after the refusals.
        later = await guest_write_read(vm, devs[1], 43, 3)
        grown = await passed_through_live_operations(
            vm, tgt, hotplugged.device_id, devs[2], 2, rescan=True
        )
        for device_id in ("disk0", hotplugged.device_id):
            result = await drives.unplug(vm, device_id)
            assert result.state is UnplugState.REMOVED
        assert await node_names(vm) == set()
        assert vm.registry.drives == {}
        await truth_check(vm)
    lun1, lun2 = (path.read_bytes() for path in tgt.backing)
    assert (sha256(mib(lun1, 2)), sha256(mib(lun1, 3))) == (sums[1], later)
    assert (sha256(mib(lun2, 2)), sha256(mib(lun2, 20))) == (sums[2], grown)
    # The rest as the host wrote it.
    assert lun1[: 2 * MIB] == pattern(101, LUN_SIZE)[: 2 * MIB]
    assert lun2[: 2 * MIB] == pattern(102, LUN_SIZE)[: 2 * MIB]


async def test_a_killed_tgtd_stalls_the_guest_and_nothing_is_lost(
    guest: GuestImage, tgt: Tgt
) -> None:
    """tgtd SIGKILLed mid-write under a drive with ``rerror = werror = "stop"``. What QEMU
    really does (measured, QEMU 7.2 and 10.0): nothing fails, so nothing pauses. libiscsi
    keeps the guest's requests queued and reconnects on its own; QEMU sees no error, its run
    state stays ``running`` and the drive's io-status ``ok`` (``blockctl status`` says so, as
    QEMU does), while the guest's writer stalls. Once tgtd is back on the same portal with
    the same target and LUN, libiscsi logs in again, the queued writes go through, the writer
    goes on, and the LUN's file holds every record the guest counted: none lost, none failed.
    """
    drive = Drive(
        iscsi=tgt.source(1),
        format=ImageFormat.RAW,
        interface=Interface.SCSI,
        rerror=DeviceErrorPolicy.STOP,
        werror=DeviceErrorPolicy.STOP,
    )
    async with open_vm(base_config(guest, drive, name="iscsiout")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        dev = await disk_with_vendor(vm, "QEMU")
        await sh(vm, outage.WRITER.replace("/dev/vda", f"/dev/{dev}"))
        await sh(vm, "until [ -s /tmp/seq ] && [ $(cat /tmp/seq) -ge 20 ]; do usleep 10000; done")

        tgt.kill()  # mid-I/O: the writer is still running
        killed = time.monotonic()
        # The writer stalls: wait (bounded) until its count holds still for 3 s on end, the
        # VM running all along (a pause would be QEMU seeing the loss, which it does not).
        stalled_at, still_since = await outage.last_record(vm), time.monotonic()
        with anyio.fail_after(120):
            while time.monotonic() - still_since < 3:
                await anyio.sleep(0.5)
                assert (await vm.status()).status == "running"
                now = await outage.last_record(vm)
                if now != stalled_at:
                    stalled_at, still_since = now, time.monotonic()
        status = await cli_json("status", vm.name)
        assert (status["status"], status["running"]) == ("running", True)
        assert status["io_error_drives"] == []
        assert [d["io_status"] for d in status["drives"]] == ["ok"]
        assert await sh(vm, "cat /tmp/failed 2>/dev/null || echo none") == "none\n"
        assert stalled_at < outage.BLOCKS - 1  # stalled, not finished

        tgt.restart()
        restarted = time.monotonic()
        with anyio.fail_after(120):
            while await outage.last_record(vm) == stalled_at:  # noqa: ASYNC110 - a guest poll
                await anyio.sleep(0.1)
        reconnected = time.monotonic() - restarted
        await sh(vm, f"until [ $(cat /tmp/seq) -ge {stalled_at + 20} ]; do usleep 10000; done")
        await sh(vm, "touch /tmp/stop; until [ -e /tmp/seq.done ]; do usleep 10000; done")
        last = await outage.last_record(vm)
        failed = await sh(vm, "cat /tmp/failed 2>/dev/null || echo none")
        assert failed.split()[-1] == "none", "the guest saw a write fail"
        assert (await vm.status()).status == "running"
        await truth_check(vm)
        stalled_for = restarted - killed
        version = await vm.version()
        qemu = f"{version.major}.{version.minor}.{version.micro}"
    data = tgt.backing[0].read_bytes()
    lost = [
        i
        for i in range(last + 1)
        if data[i * 4096 : i * 4096 + len(outage.RECORD % i)] != (outage.RECORD % i).encode()
    ]
    assert lost == [], f"records the guest wrote but the LUN's file lacks: {lost[:10]}"
    report(
        "outage",
        f"tgtd SIGKILLed mid-write under werror=stop (QEMU {qemu}): no pause, "
        f"the guest stalled {stalled_for:.0f} s at record {stalled_at}, went on "
        f"{reconnected:.1f} s after tgtd restarted (libiscsi's reconnect); {last + 1} records "
        f"written, {len(lost)} lost",
    )


async def guest_size(vm: LaunchedVM, dev: str, expect: int | None = None) -> int:
    """The size of /dev/DEV as the guest's kernel has it (``/sys/block/DEV/size``, sectors);
    with ``expect``, after waiting (bounded: 10 s) for it to become that (a resize reaches
    the guest as a config change it handles on its own time)."""
    if expect is not None:
        await sh(
            vm,
            f"for i in $(seq 100); do [ $(cat /sys/block/{dev}/size) = {expect // 512} ] "
            "&& break; sleep 0.1; done; true",
        )
    return int(await sh(vm, f"cat /sys/block/{dev}/size")) * 512


async def node_cache(vm: LaunchedVM, device_id: str) -> dict[str, tuple[bool, bool]]:
    """(direct, no_flush) of each node of the drive's chain, as query-named-block-nodes has it."""
    info = await drives.drive_info(vm, device_id)
    chain = {n.node_name for n in info.chain}
    files = {f"{name}-file" for name in chain}
    return {
        n.node_name: (n.cache.direct, n.cache.no_flush)
        for n in await vm.block_nodes()
        if n.node_name in chain | files
    }


async def live_cache_and_throttle(vm: LaunchedVM, device_id: str, dev: str, seed: int) -> None:
    """Cache mode ``none`` then back to ``writeback`` live (the nodes' flags as QEMU reports
    them, the guest's I/O going on), then I/O limits (``query-block``'s, the guest's write
    completing under them), then none again."""
    before = await drives.drive_info(vm, device_id)
    assert before.cache is not None and not before.cache.direct
    for mode, seed_offset in ((CacheMode.NONE, 0), (CacheMode.WRITEBACK, 1)):
        info = await drives.set_cache(vm, device_id, mode)
        assert info.cache is not None
        assert (info.cache.writeback, info.cache.direct) == (True, mode.direct)
        flags = await node_cache(vm, device_id)
        assert flags and set(flags.values()) == {(mode.direct, False)}, flags
        await guest_write_read(vm, dev, seed + seed_offset, 3 + seed_offset)
    limits = {"bps_wr": 4 * MIB, "iops_rd": 300}
    info = await drives.set_throttle(vm, device_id, limits)
    assert info.io_limits is not None
    assert (info.io_limits.bps_wr, info.io_limits.iops_rd, info.io_limits.bps) == (4 * MIB, 300, 0)
    (listed,) = [d for d in await cli_json("drives", vm.name) if d["device"] == device_id]
    assert listed["throttle"]["bps_wr"] == 4 * MIB
    await guest_write_read(vm, dev, seed + 2, 6)
    info = await drives.set_throttle(vm, device_id, {})
    assert info.io_limits is None or not info.io_limits.limited


async def test_host_device_live_operations_incremental_backup_and_restore_onto_a_device(
    guest: GuestImage, tmp_path: Path
) -> None:
    """On a block device (host_device on a loop device): live cache change and throttling
    with the guest's I/O going on; a grow beyond the device refused by QEMU and by blockctl
    with the way out (grow the device first), which then works (QEMU's node and the guest's
    disk both the new size); a full backup, a guest write, an incremental one reading less than
    the disk; the point restored onto another block device equals the guest's view, refused
    while a QEMU holds the device."""
    if shutil.which("losetup") is None:
        missing("losetup (util-linux)")
    image = await raw_image(tmp_path / "loop.img", pattern(9, LUN_SIZE))
    spare = await raw_image(tmp_path / "spare.img", pattern(10, 2 * LUN_SIZE))
    loops: list[Path] = []
    repo = backup_ops.init_repository(tmp_path / "repo")
    try:
        for file in (image, spare):
            attached = await anyio.run_process(["losetup", "-f", "--show", str(file)], check=False)
            if attached.returncode != 0:
                missing(f"a loop device ({attached.stderr.decode().strip()})")
            loops.append(Path(attached.stdout.decode().strip()))
        loop, target = loops
        disk = Drive(file=loop, format=ImageFormat.RAW, serial="loopdisk")
        async with open_vm(base_config(guest, disk, name="loopops")) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            await live_cache_and_throttle(vm, "disk0", "vda", 40)
            await truth_check(vm)

            # Grow: QEMU cannot grow a block device; blockctl says what to do, nothing changes.
            size = (await drives.drive_info(vm, "disk0")).size
            assert size == await guest_size(vm, "vda") == image.stat().st_size
            nodes = await node_names(vm)
            with pytest.raises(ConfigError) as refused:
                await drives.resize(vm, "disk0", size + 8 * MIB)
            said = str(refused.value)
            assert f"block device {loop}" in said and "grow the device" in said
            assert (await drives.drive_info(vm, "disk0")).size == size
            assert await node_names(vm) == nodes
            # The way out: grow the device (its file, then the loop device's size), then resize.
            os.truncate(image, size + 8 * MIB)
            await run("losetup", "-c", str(loop))
            grown = await drives.resize(vm, "disk0", size + 8 * MIB)
            assert grown.size == size + 8 * MIB
            assert await guest_size(vm, "vda", grown.size) == grown.size
            await guest_write_read(vm, "vda", 45, (size + 4 * MIB) // MIB)  # in the new part
            await truth_check(vm)

            full = await backup_ops.backup(vm, repo, kind="full")
            await guest_write_read(vm, "vda", 46, 9)
            view = await guest_view(vm, "vda")
            inc = await backup_ops.backup(vm, repo, kind="incremental")
            assert (inc.kind, inc.parent) == ("incremental", full.id)
            (point,) = inc.disks
            assert point.bytes_read < grown.size
            # Onto a device a QEMU holds: refused, nothing written.
            with pytest.raises(ConfigError, match="in use by a QEMU"):
                await backup_ops.restore(repo, "loopops", inc.id, "disk0", loop, ImageFormat.RAW)
            assert sha256(await anyio.Path(loop).read_bytes()) == view
            await truth_check(vm)
        with pytest.raises(ConfigError, match="-O raw"):
            await backup_ops.restore(repo, "loopops", inc.id, "disk0", target, ImageFormat.QCOW2)
        restored = await backup_ops.restore(
            repo, "loopops", inc.id, "disk0", target, ImageFormat.RAW
        )
        assert restored.path == target
        on_device = await anyio.Path(target).read_bytes()
        assert sha256(on_device[: grown.size]) == view
        # The rest of the (larger) device is untouched.
        assert on_device[grown.size :] == pattern(10, 2 * LUN_SIZE)[grown.size :]
    finally:
        with anyio.CancelScope(shield=True):
            for device in loops:
                await anyio.run_process(["losetup", "-d", str(device)], check=False)


async def test_iscsi_disk_live_operations_and_restore_onto_a_lun(
    guest: GuestImage, tgt: Tgt, tmp_path: Path
) -> None:
    """On an emulated iSCSI disk (scsi-hd): live cache change and throttling with the guest's
    I/O going on; a grow refused (QEMU cannot grow a LUN: blockctl says to grow it on the
    target) with nothing changed, then the way out: the LUN grown on the target, the resize
    goes through (QEMU's node and the guest's disk the new size, the guest writing into the
    new part, which reaches the LUN's file); a backup point restored onto a LUN: refused while
    the LUN is smaller than the disk (nothing written), then, the LUN grown, ``blockctl
    restore ... iscsi://...`` puts exactly the guest's view of the disk onto its file."""
    repo = backup_ops.init_repository(tmp_path / "repo")
    disk = Drive(iscsi=tgt.source(1), format=ImageFormat.RAW, interface=Interface.SCSI)
    async with open_vm(base_config(guest, disk, name="iscsiops")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        dev = await disk_with_vendor(vm, "QEMU")
        await live_cache_and_throttle(vm, "disk0", dev, 50)
        await truth_check(vm)
        size = (await drives.drive_info(vm, "disk0")).size
        assert size == await guest_size(vm, dev) == LUN_SIZE
        nodes = await node_names(vm)
        with pytest.raises(ConfigError) as refused:
            await drives.resize(vm, "disk0", size + 8 * MIB)
        said = str(refused.value)
        assert f"iSCSI LUN iscsi://{tgt.portal}/{TARGET}/1" in said
        assert "grow the LUN on its target" in said and "nothing changed" in said
        assert (await drives.drive_info(vm, "disk0")).size == size
        assert await guest_size(vm, dev) == size
        assert await node_names(vm) == nodes
        # The way out: grow the LUN on the target (tgt reads its size when the LU is made),
        # then resize: QEMU reads the LUN's capacity again and the guest gets the new size.
        tgt.grow(1, size + 8 * MIB)
        grown = await drives.resize(vm, "disk0", size + 8 * MIB)
        assert grown.size == size + 8 * MIB
        assert await guest_size(vm, dev, grown.size) == grown.size
        in_new_part = await guest_write_read(vm, dev, 56, (size + 4 * MIB) // MIB)
        await truth_check(vm)
        await guest_write_read(vm, dev, 55, 9)
        view = await guest_view(vm, dev)
        point = await backup_ops.backup(vm, repo, kind="full")
        await truth_check(vm)
    other = f"iscsi://{tgt.portal}/{TARGET}/2"
    # LUN 2 is smaller than the grown disk: refused, nothing written; then grown on the target.
    before = tgt.backing[1].read_bytes()
    with pytest.raises(ConfigError, match="grow it on its server first"):
        await backup_ops.restore(
            repo, "iscsiops", point.id, "disk0", tgt.source(2), ImageFormat.RAW
        )
    assert tgt.backing[1].read_bytes() == before
    tgt.grow(2, grown.size)
    cli = await anyio.run_process(
        [sys.executable, "-m", "blockctl", "restore", "iscsiops", point.id, "disk0", other,
         "--repo", str(tmp_path / "repo"), "-O", "raw"],
        check=False,
    )  # fmt: skip
    assert cli.returncode == 0 and other in cli.stdout.decode(), cli.stderr
    assert not Path("iscsi:").exists()  # the URL was never taken for a path
    assert sha256(tgt.backing[1].read_bytes()) == view
    lun = tgt.backing[0].read_bytes()
    assert len(lun) == grown.size
    assert sha256(mib(lun, (size + 4 * MIB) // MIB)) == in_new_part
