"""Storage types against real servers: image files over NFS, served by a real NFS-Ganesha
(user space: the kernel here has no nfsd) and reached by QEMU's own NFSv3 client (libnfs).

Where the server runs (measured here): rpcbind binds 0.0.0.0:111 (TCP and UDP) and Ganesha
every one of its ports on all addresses, and QEMU's nfs driver has no port option (it asks the
portmapper on port 111). On the host that would be a server open to the network, on a port
the whole host shares. So both run in a network namespace of their own (``unshare -n``, only
``lo`` up: nothing outside the namespace can reach them) and a mount namespace of their own
(tmpfs over /run and /var/lib/nfs: their pid, lock and recovery files stay out of the
host's). QEMU joins that network namespace only (``nsenter --net``, which execs QEMU in
place: blockctl's process is QEMU itself); its QMP and guest console are unix sockets, which
work across network namespaces. Both servers are children of the test process, stopped by
their process ids whatever the test did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockctl import GuestImage, LaunchedVM, chains, open_vm
from blockctl._backup import operations as backup_ops
from blockctl._binaries import binary as qemu_binary
from blockctl._ops import drives
from blockctl._ops.apply import Action, load_desired
from blockctl._ops.apply import apply as apply_drives
from blockctl.errors import ConfigError
from blockctl.types import Drive, ImageFormat, NfsSource
from tests.conftest import missing
from tests.integration import test_storage_iscsi as iscsi
from tests.integration.conftest import (
    MIB,
    base_config,
    pattern,
    raw_image,
    run,
    sha256,
    truth_check,
)

pytestmark = pytest.mark.guest

DISK_SIZE = 16 * MIB
_TOOLS = {
    "ganesha.nfsd": "nfs-ganesha, nfs-ganesha-vfs",
    "rpcbind": "rpcbind",
    "rpcinfo": "rpcbind",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "ip": "iproute2",
}

# NFSv3 only (QEMU's client speaks nothing else); no dbus, no Kerberos here: Ganesha logs CRIT
# lines about both and serves on. Graceless: no 90 s grace period before the first open. No
# RQUOTA or NLM (libnfs uses neither): Ganesha's fixed RQUOTA port (875) is in the reserved
# range its own RPC sockets draw from at random, and 2 of ~10 starts here failed on it
# ("Cannot bind RQUOTA tcp6 socket, error 98", then FATAL).
_GANESHA_CONF = """
NFS_CORE_PARAM {{ Protocols = 3; Enable_RQUOTA = false; Enable_NLM = false; }}
NFSV4 {{ UseGetpwnam = true; Graceless = true; }}
EXPORT {{
    Export_Id = 1; Path = {export}; Pseudo = {export};
    Protocols = 3; Transports = TCP; Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = WARN; }}
"""

# The namespace's first process: loopback up, private /run and /var/lib/nfs, then rpcbind
# (exec'd in place: this process's id is rpcbind's, and its namespaces the server's).
_NAMESPACE = (
    "set -e; ip link set lo up; mount -t tmpfs nfs-run /run; mount -t tmpfs nfs-lib /var/lib/nfs; "
    "mkdir -p /run/rpcbind; chown _rpc /run/rpcbind; exec rpcbind -f -w"
)


@dataclass(frozen=True, slots=True)
class Nfs:
    """A running Ganesha exporting ``export`` (a local directory) to 127.0.0.1 inside the
    network namespace of process ``netns_pid``."""

    export: Path
    netns_pid: int

    def source(self, name: str, **kwargs: object) -> NfsSource:
        return NfsSource(server="127.0.0.1", path=str(self.export / name), **kwargs)  # type: ignore[arg-type]

    def url(self, name: str) -> str:
        return f"nfs://127.0.0.1{self.export / name}"


def _in_netns(pid: int, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *argv]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM by process id, then SIGKILL if it is still there after 10 s; reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def nfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Nfs]:
    """rpcbind and Ganesha in their own network and mount namespaces, exporting
    ``tmp_path/export``; QEMU (blockctl's qemu-system program) runs in that network
    namespace for the test's duration."""
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            missing(f"{tool} (Debian {package}, installed by scripts/setup)")
    if os.geteuid() != 0:
        missing("root (a network namespace for the NFS server)")
    qemu = shutil.which(qemu_binary("qemu-system-x86_64"))
    if qemu is None:
        missing("qemu-system-x86_64")
    assert qemu is not None
    export = tmp_path / "export"
    export.mkdir()
    conf = tmp_path / "ganesha.conf"
    conf.write_text(_GANESHA_CONF.format(export=export))
    log = (tmp_path / "nfs-servers.log").open("wb")
    started: list[subprocess.Popen[bytes]] = []
    try:
        holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", _NAMESPACE],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(holder)
        _wait_for(holder, tmp_path, "rpcbind", lambda out: "portmapper" in out)
        ganesha = subprocess.Popen(
            [
                "nsenter",
                f"--net=/proc/{holder.pid}/ns/net",
                f"--mount=/proc/{holder.pid}/ns/mnt",
                "ganesha.nfsd",
                "-F",
                "-f",
                str(conf),
                "-L",
                str(tmp_path / "ganesha.log"),
                "-p",
                str(tmp_path / "ganesha.pid"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(ganesha)
        # Ready when the portmapper lists MOUNT (100005) and NFS (100003) version 3.
        _wait_for(
            ganesha,
            tmp_path,
            "ganesha",
            lambda out: " 100005    3   tcp" in out and " 100003    3   tcp" in out,
            holder.pid,
        )
        wrapper = tmp_path / "qemu-in-netns"
        wrapper.write_text(
            f'#!/bin/sh\nexec nsenter --net=/proc/{holder.pid}/ns/net -- {qemu} "$@"\n'
        )
        wrapper.chmod(0o755)
        monkeypatch.setenv("BLOCKCTL_QEMU_SYSTEM", str(wrapper))
        yield Nfs(export=export, netns_pid=holder.pid)
    finally:
        for process in reversed(started):
            _stop(process)
        log.close()


def _wait_for(
    process: subprocess.Popen[bytes],
    tmp_path: Path,
    what: str,
    ready: object,
    netns_pid: int | None = None,
) -> None:
    """Poll ``rpcinfo -p 127.0.0.1`` in the namespace until ``ready(output)`` (bounded: 20 s);
    the server exiting first fails with the servers' log."""
    assert callable(ready)
    pid = process.pid if netns_pid is None else netns_pid
    for _ in range(200):
        if process.poll() is not None:
            logs = [tmp_path / "nfs-servers.log", tmp_path / "ganesha.log"]
            text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
            raise AssertionError(f"{what} exited ({process.returncode}): {text}")
        probe = subprocess.run(
            _in_netns(pid, "rpcinfo", "-p", "127.0.0.1"),
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and ready(probe.stdout):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not register with the portmapper in 20 s")


async def sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def disk_with_serial(vm: LaunchedVM, serial: str) -> str:
    """The guest's vdX whose serial is ``serial`` (bounded wait for it)."""
    found = await sh(
        vm,
        "for i in $(seq 100); do for d in /sys/block/vd*; do "
        f'[ "$(cat $d/serial 2>/dev/null)" = {serial} ] && {{ basename $d; exit 0; }}; done; '
        "sleep 0.1; done; exit 1",
    )
    return found.strip()


async def guest_write_read(vm: LaunchedVM, dev: str, seed: int, offset_mib: int) -> str:
    """The guest writes 1 MiB of fresh data at ``offset_mib`` of /dev/DEV (O_DIRECT, synced)
    and reads it back from the disk; returns the sha256 both agree on."""
    await sh(vm, f"dd if=/dev/urandom of=/tmp/w{seed} bs=1M count=1 2>/dev/null")
    written = (await sh(vm, f"sha256sum /tmp/w{seed}")).split()[0]
    await sh(
        vm, f"dd if=/tmp/w{seed} of=/dev/{dev} bs=1M seek={offset_mib} oflag=direct 2>/dev/null"
    )
    await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
    read = await sh(
        vm,
        f"dd if=/dev/{dev} bs=1M skip={offset_mib} count=1 iflag=direct 2>/dev/null | sha256sum",
    )
    assert read.split()[0] == written
    return written


async def guest_view(vm: LaunchedVM, dev: str) -> str:
    """sha256 of the whole disk as the guest reads it."""
    return (await sh(vm, f"dd if=/dev/{dev} bs=1M iflag=direct 2>/dev/null | sha256sum")).split()[0]


async def node_names(vm: LaunchedVM) -> set[str]:
    return {n.node_name for n in await vm.block_nodes()}


async def test_nfs_disks_launch_hotplug_snapshot_commit_backup_apply(
    guest: GuestImage, nfs: Nfs, tmp_path: Path
) -> None:
    """One boot: a raw image over NFS from launch and a qcow2 one hot-plugged; the guest reads
    what the host put there, writes and reads back. The qcow2 disk is snapshotted onto a local
    overlay, written, and actively committed back onto its NFS node, then changes cache mode,
    is throttled and grown live (the guest writing into the new part). A full backup restores to
    exactly the guest's view of both disks. A drives file naming the disks by nfs:// URL finds
    them (QEMU's name for each reads back as its URL) and attaches a third, read-only with a
    uid, gid and readahead (QEMU's name has the ids, not the readahead: the second apply finds
    it all the same); an empty file detaches all three, leaving no node in QEMU. The export's files
    hold what the guest wrote."""
    launch_img = await raw_image(nfs.export / "launch.raw", pattern(201, DISK_SIZE))
    base = await raw_image(tmp_path / "hot-data.raw", pattern(202, DISK_SIZE))
    hot_img = nfs.export / "hot.qcow2"
    grown_size = DISK_SIZE + 8 * MIB
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, hot_img)
    await raw_image(nfs.export / "third.raw", pattern(203, 4 * MIB))
    launch = Drive(nfs=nfs.source("launch.raw"), format=ImageFormat.RAW, serial="nfslaunch")
    repo = backup_ops.init_repository(tmp_path / "repo")
    async with open_vm(base_config(guest, launch, name="nfsvm")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        listed = {d.device_id: d for d in await drives.list_drives(vm)}
        assert listed["disk0"].file == nfs.url("launch.raw")
        assert [n.driver for n in await vm.block_nodes() if n.node_name == "drv0-file"] == ["nfs"]
        hot = await drives.hotplug(
            vm, Drive(nfs=nfs.source("hot.qcow2"), format=ImageFormat.QCOW2, serial="nfshot")
        )
        assert hot.file == nfs.url("hot.qcow2")
        assert hot.size == DISK_SIZE
        # libnfs takes no lock: blockctl refuses a second writer by the image's URL.
        for again in (nfs.source("launch.raw"), nfs.source("launch.raw", user=5, group=5)):
            with pytest.raises(ConfigError, match="already attached as disk0"):
                await drives.hotplug(vm, Drive(nfs=again, format=ImageFormat.RAW))
        vda = await disk_with_serial(vm, "nfslaunch")
        vdb = await disk_with_serial(vm, "nfshot")
        for dev, seed in ((vda, 201), (vdb, 202)):
            head = await sh(vm, f"dd if=/dev/{dev} bs=1M count=2 2>/dev/null | sha256sum")
            assert head.split()[0] == sha256(pattern(seed, DISK_SIZE)[: 2 * MIB])
        sums = {
            vda: await guest_write_read(vm, vda, 1, 2),
            vdb: await guest_write_read(vm, vdb, 2, 2),
        }
        await truth_check(vm)

        # External snapshot onto a local overlay, then an active commit back onto NFS.
        with pytest.raises(ConfigError, match="--dir"):
            await chains.external_snapshot(vm, "s1", devices=[hot.device_id])
        overlays = tmp_path / "overlays"
        overlays.mkdir()
        snap = await chains.external_snapshot(vm, "s1", overlays, devices=[hot.device_id])
        overlay = snap.overlays[hot.device_id]
        assert overlay.parent == overlays
        assert snap.frozen[hot.device_id] == nfs.url("hot.qcow2")
        chain = (await chains.list_external(vm))[hot.device_id]
        assert chain == [str(overlay), nfs.url("hot.qcow2")]
        in_overlay = await guest_write_read(vm, vdb, 3, 5)
        await truth_check(vm)
        committed = await chains.commit(vm, hot.device_id)
        assert len(committed.chain) == 1
        assert (await chains.list_external(vm))[hot.device_id] == [nfs.url("hot.qcow2")]
        assert (await drives.drive_info(vm, hot.device_id)).file == nfs.url("hot.qcow2")
        await truth_check(vm)

        # Live operations on the qcow2 image over NFS (on a raw one: the next test): cache
        # change and throttling with the guest's I/O going on, then a grow that reaches the
        # qcow2 header on the export and the guest, which writes into the new part.
        await iscsi.live_cache_and_throttle(vm, hot.device_id, vdb, 70)
        assert (await drives.resize(vm, hot.device_id, grown_size)).size == grown_size
        assert await iscsi.guest_size(vm, vdb, grown_size) == grown_size
        header = json.loads(await run("qemu-img", "info", "--output=json", "-U", hot_img))
        assert header["virtual-size"] == grown_size
        in_new_part = await guest_write_read(vm, vdb, 73, DISK_SIZE // MIB + 4)
        await truth_check(vm)

        # A full backup restores to the guest's view of each disk.
        await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
        views = {"disk0": await guest_view(vm, vda), hot.device_id: await guest_view(vm, vdb)}
        manifest = await backup_ops.backup(vm, repo, kind="full")
        assert sorted(d.device for d in manifest.disks) == sorted(views)

        # apply: the two disks match by URL, a third is attached, then all are detached.
        third_url = f"{nfs.url('third.raw')}?uid=1000&gid=1000"
        wanted = tmp_path / "drives.toml"
        wanted.write_text(
            f'[[drive]]\nformat = "raw"\nnfs = "{nfs.url("launch.raw")}"\n'
            f'serial = "nfslaunch"\n\n'
            f'[[drive]]\nformat = "qcow2"\nnfs = "{nfs.url("hot.qcow2")}"\nserial = "nfshot"\n\n'
            f'[[drive]]\nformat = "raw"\nread-only = true\nnfs = "{third_url}&readahead=65536"\n'
        )
        first = await apply_drives(vm, load_desired(wanted))
        assert [s.action for s in first.steps] == [Action.ATTACH]
        third = next(d for d in await drives.list_drives(vm) if d.file == third_url)
        assert third.size == 4 * MIB
        # QEMU took the readahead (an option blockdev-add would refuse if it did not know it).
        sent = vm.registry.drives[third.device_id].nodes
        assert [n.get("readahead-size") for n in sent if n["driver"] == "nfs"] == [65536]
        assert (await apply_drives(vm, load_desired(wanted), dry_run=True)).empty
        await truth_check(vm)
        empty = tmp_path / "none.toml"
        empty.write_text("")
        gone = await apply_drives(vm, load_desired(empty))
        assert sorted(s.device or "" for s in gone.steps) == sorted(
            ["disk0", hot.device_id, third.device_id]
        )
        assert {s.action for s in gone.steps} == {Action.DETACH}
        assert await drives.list_drives(vm) == ()
        assert await node_names(vm) == set()
        await truth_check(vm)

    # The overlay (left on disk: commit deletes no file unless asked) names its NFS backing by
    # its URL, as QEMU does.
    header = json.loads(await run("qemu-img", "info", "--output=json", "-U", overlay))
    assert header["backing-filename"] == nfs.url("hot.qcow2")
    assert header["backing-filename-format"] == "qcow2"
    for device, view in views.items():
        restored = tmp_path / f"restored-{device}.raw"
        await backup_ops.restore(repo, "nfsvm", manifest.id, device, restored, ImageFormat.RAW)
        assert sha256(restored.read_bytes()) == view
    # The export's files hold what the guest wrote (the commit reached the NFS image).
    data = launch_img.read_bytes()
    assert sha256(data[2 * MIB : 3 * MIB]) == sums[vda]
    assert data[: 2 * MIB] == pattern(201, DISK_SIZE)[: 2 * MIB]
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", hot_img,
              tmp_path / f"restored-{hot.device_id}.raw")  # fmt: skip
    hot_raw = tmp_path / "hot-now.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", hot_img, hot_raw)
    hot_data = hot_raw.read_bytes()
    assert sha256(hot_data[2 * MIB : 3 * MIB]) == sums[vdb]
    assert sha256(hot_data[5 * MIB : 6 * MIB]) == in_overlay
    assert len(hot_data) == grown_size
    assert sha256(hot_data[(DISK_SIZE // MIB + 4) * MIB :][:MIB]) == in_new_part


async def test_nfs_disk_live_operations_incremental_backup_and_restore_onto_nfs(
    guest: GuestImage, nfs: Nfs, tmp_path: Path
) -> None:
    """One boot, a raw image over NFS: live cache change and throttling with the guest's I/O
    going on; a grow (QEMU's node and the guest's disk the new size, the export's file too, the
    guest writing into the new part); a full backup, a guest write, an incremental one reading
    less than the disk; the point restored into a file and onto another image of the export
    (``restore`` with an NfsSource: QEMU's NFS client writes it), each exactly the guest's
    view."""
    image = await raw_image(nfs.export / "ops.raw", pattern(211, DISK_SIZE))
    grown_size = DISK_SIZE + 8 * MIB
    spare = await raw_image(nfs.export / "spare.raw", pattern(212, grown_size))
    disk = Drive(nfs=nfs.source("ops.raw"), format=ImageFormat.RAW, serial="nfsops")
    repo = backup_ops.init_repository(tmp_path / "repo")
    async with open_vm(base_config(guest, disk, name="nfsops")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        dev = await disk_with_serial(vm, "nfsops")
        await iscsi.live_cache_and_throttle(vm, "disk0", dev, 60)
        await truth_check(vm)
        assert (await drives.drive_info(vm, "disk0")).size == DISK_SIZE
        assert await iscsi.guest_size(vm, dev) == DISK_SIZE
        grown = await drives.resize(vm, "disk0", grown_size)
        assert grown.size == grown_size
        assert await iscsi.guest_size(vm, dev, grown_size) == grown_size
        assert image.stat().st_size == grown_size
        in_new_part = await guest_write_read(vm, dev, 63, DISK_SIZE // MIB + 4)
        await truth_check(vm)
        full = await backup_ops.backup(vm, repo, kind="full")
        await guest_write_read(vm, dev, 64, 9)
        await sh(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
        view = await guest_view(vm, dev)
        inc = await backup_ops.backup(vm, repo, kind="incremental")
        assert (inc.kind, inc.parent) == ("incremental", full.id)
        (point,) = inc.disks
        assert point.bytes_read < grown_size
        await truth_check(vm)
    restored = tmp_path / "restored.raw"
    await backup_ops.restore(repo, "nfsops", inc.id, "disk0", restored, ImageFormat.RAW)
    assert sha256(restored.read_bytes()) == view
    # Onto another image of the export, written by QEMU's NFS client: blockctl's qemu-img in
    # the server's network namespace, as QEMU is (the client asks the server's portmapper).
    wrapper = tmp_path / "qemu-img-in-netns"
    wrapper.write_text(
        f"#!/bin/sh\nexec nsenter --net=/proc/{nfs.netns_pid}/ns/net -- "
        f'{qemu_binary("qemu-img")} "$@"\n'
    )
    wrapper.chmod(0o755)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BLOCKCTL_QEMU_IMG", str(wrapper))
        onto = await backup_ops.restore(
            repo, "nfsops", inc.id, "disk0", nfs.source("spare.raw"), ImageFormat.RAW
        )
    assert onto.path == nfs.source("spare.raw")
    assert sha256(spare.read_bytes()) == view
    assert sha256(image.read_bytes()[(DISK_SIZE // MIB + 4) * MIB :][:MIB]) == in_new_part
