"""Live restore into an iSCSI LUN (issue 18): the guest's disk runs on a temporary qcow2
overlay over the backup's NBD server, mirrored (write-blocking) into a LUN that QEMU's own
initiator opens (node ``iscsi``, no kernel session); at READY the device pivots onto the
LUN's raw node. tgtd is test_storage_iscsi.py's fixture; its LUN files are read after."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import GuestImage, _machine, backup, open_vm
from blockctl import attach as attach_vm
from blockctl._backup import live
from blockctl._jobs import JobControl
from blockctl._ops import drives
from blockctl._ops.drives import UnplugState
from blockctl._qmp import wire
from blockctl._runtime import read_record
from blockctl.errors import BlockctlError, CommandFailed, ConfigError, ConnectionLost
from blockctl.types import ImageFormat, IscsiSource, NfsSource
from tests.integration.conftest import MIB, qcow2_image, run, running, sha256, truth_check
from tests.integration.test_backup import config, disk_sha
from tests.integration.test_live_restore import (
    RAW_DISK_MIB,
    RAW_WRITES,
    ROOT,
    WAIT_VDB,
    StreamWatch,
    device_overlays,
    fill,
    follow_way_on,
    guest_fill,
    nbdkit,  # noqa: F401 (the fixture: nbdkit is required)
    nbdkit_pids_under,
    node_names,
    overlays,
    read_sha,
    reference,
    tree_digest,
)
from tests.integration.test_storage_iscsi import Tgt, tgt  # noqa: F401 (tgt: the fixture)

DISK_MIB = RAW_DISK_MIB
#: The LUN the restore writes: 1 MiB larger than the disk (its last MiB must stay as it was).
LUN = 2


def lun_ready(server: Tgt, lun: int = LUN) -> bytes:
    """LUN ``lun`` grown to the disk + 1 MiB (its pattern kept); returns its last MiB."""
    server.grow(lun, (DISK_MIB + 1) * MIB)
    with open(server.backing[lun - 1], "rb") as file:
        file.seek(DISK_MIB * MIB)
        return file.read()


async def lun_equals(server: Tgt, want: Path, tail: bytes, lun: int = LUN) -> None:
    """LUN ``lun``'s file holds ``want`` (``qemu-img compare``) over the disk's size, and
    ``tail`` after it."""
    lun_file = server.backing[lun - 1]
    await run(
        "qemu-img", "compare", "--image-opts",
        f"driver=raw,size={DISK_MIB * MIB},file.driver=file,file.filename={lun_file}",
        f"driver=raw,file.driver=file,file.filename={want}",
    )  # fmt: skip
    with open(lun_file, "rb") as file:
        file.seek(DISK_MIB * MIB)
        assert file.read() == tail


@pytest.mark.guest
async def test_live_restore_into_an_iscsi_lun_while_the_guest_reads_and_writes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    tgt: Tgt,  # noqa: F811
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Refused first, nothing changed: a qcow2 target on a LUN, a LUN smaller than the disk
    (LUN 1, 16 MiB: its node is added, measured, deleted). Then CHAP on the target: a wrong
    password refused (the LUN, the nodes, QEMU's objects as they were). Then into LUN 2 with
    the right one (a secret object QEMU reads from the file; the drive's record names it,
    unplug removes it) while the guest reads the whole disk and writes during the copy. The
    password is in no output, record or log."""
    from tests.integration.test_storage_iscsi import object_ids

    repo = backup.init_repository(tmp_path / "repo", chunk_size=256 * 1024)
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    tail = lun_ready(tgt)
    password = "chap-secret-7d2a0b"  # tgt: 12-16 characters for iSCSI CHAP
    good = tmp_path / "chap.pw"
    good.write_text(password)
    good.chmod(0o600)
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    target = tgt.source(LUN, user="carol", password_file=good)
    watch = StreamWatch()  # the mirror's id, once it runs
    async with open_vm(config(guest, "lri", disk)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await guest_fill(vm, "vda", 0, 64, 0x41)
        await guest_fill(vm, "vda", 128, 64, 0x42)
        point = await backup.create(vm, repo)
        at_point = await disk_sha(vm, "vda", DISK_MIB)
        before = await node_names(vm)
        assert vm.run_dir is not None
        objects = set(await object_ids(vm))
        # (A LUN with CHAP credentials was refused here before it was a target: issue 18.)
        refusals = (
            (tgt.source(LUN), ImageFormat.QCOW2, "target_format", "a LUN is written raw"),
            (tgt.source(1), ImageFormat.RAW, "target", "give a LUN at least as large"),
        )
        for bad, fmt, field, says in refusals:
            with pytest.raises(ConfigError) as refused:
                await backup.restore_live(
                    vm, repo, "lri", point.id, "disk0", bad, target_format=fmt
                )
            assert refused.value.field == field and says in str(refused.value), refused.value
            assert await node_names(vm) == before
            assert set(vm.registry.drives) == {"disk0"}
            assert await wire.query_jobs(vm.session) == ()
            assert device_overlays(vm.run_dir) == [] and nbdkit_pids_under(vm.run_dir) == []
            assert not list(vm.run_dir.glob("journal-*.json"))
        tgt.admin("--lld", "iscsi", "--op", "new", "--mode", "account", "--user", "carol",
                  "--password", password)  # fmt: skip
        tgt.admin("--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", "1",
                  "--user", "carol")  # fmt: skip
        lun_before = sha256(tgt.backing[LUN - 1].read_bytes())
        with pytest.raises(CommandFailed) as denied:
            await backup.restore_live(
                vm,
                repo,
                "lri",
                point.id,
                "disk0",
                tgt.source(LUN, user="carol", password_file=wrong),
                target_format=ImageFormat.RAW,
            )
        assert "Authentication failure" in str(denied.value), denied.value
        assert await node_names(vm) == before and set(await object_ids(vm)) == objects
        assert set(vm.registry.drives) == {"disk0"}
        assert device_overlays(vm.run_dir) == [] and nbdkit_pids_under(vm.run_dir) == []
        assert not list(vm.run_dir.glob("journal-*.json"))
        assert sha256(tgt.backing[LUN - 1].read_bytes()) == lun_before
        results: list[live.LiveRestoreResult] = []

        async def restore() -> None:
            # 1 byte/s: the mirror copies one request, then waits for the speed change below.
            results.append(
                await backup.restore_live(
                    vm,
                    repo,
                    "lri",
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
            assert len(device_overlays(vm.run_dir)) == 1  # (a LUN's overlay: in _live-overlays)
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
        assert [n["driver"] for n in record.nodes] == ["iscsi", "raw"]
        assert (record.nodes[0]["portal"], record.nodes[0]["lun"]) == (tgt.portal, LUN)
        # The drive's record names the secret object (its unplug deletes it), QEMU has it.
        secret = record.nodes[0]["password-secret"]
        assert set(await object_ids(vm)) == objects | {secret}
        # The LUN's raw node is the disk's size, not the (larger) LUN's.
        sizes = {n.node_name: n.virtual_size for n in await vm.block_nodes()}
        assert sizes[record.nodes[-1]["node-name"]] == DISK_MIB * MIB
        assert await node_names(vm) == before | set(record.node_names)
        assert await wire.query_jobs(vm.session) == ()
        assert device_overlays(vm.run_dir) == [] and nbdkit_pids_under(vm.run_dir) == []
        assert not list(vm.run_dir.glob("journal-*.json"))
        await truth_check(vm)
        for path in [p for p in vm.run_dir.rglob("*") if p.is_file()]:
            assert password.encode() not in path.read_bytes(), path
        unplugged = await drives.unplug(vm, result.device_id)
        assert unplugged.state is UnplugState.REMOVED
        assert set(await object_ids(vm)) == objects and await node_names(vm) == before
    want = await reference(repo, "lri", point.id, tmp_path / "reference.raw", RAW_WRITES)
    assert sha256(want.read_bytes()) == during
    await lun_equals(tgt, want, tail)
    out, err = capfd.readouterr()
    assert password not in out + err  # blockctl's log lines and QEMU's


@pytest.mark.guest
async def test_a_controller_killed_mid_mirror_into_a_lun_then_recover_finishes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    runtime_dir: Path,
    tgt: Tgt,  # noqa: F811
) -> None:
    """The CLI first: `restore --live URL` without -O raw is refused (nothing changed);
    then a controller (another process) SIGKILLed with its mirror into the LUN running at
    1 B/s; the guest reads the disk whole and writes; `blockctl recover` finishes: the
    device on the LUN alone, no server, overlay, record or job; the LUN's file equals the
    point plus the guest's writes, the repository unchanged. Last, `restore --live -O raw
    URL` from the CLI into LUN 1: its file then holds the point."""
    from tests.integration.test_attach_cli import cli
    from tests.integration.test_backup_faults import detached

    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "k0.qcow2", b"", DISK_MIB * MIB)
    tail = lun_ready(tgt)
    tail1 = lun_ready(tgt, 1)
    url = tgt.source(LUN).url
    run_dir = runtime_dir / "lrj"
    async with detached(guest, "lrj", disk) as console:
        await console.check(
            "dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct conv=fsync 2>/dev/null"
        )
        async with attach_vm("lrj") as vm:
            point = await backup.create(vm, repo)
            before = await node_names(vm)
        hashes = tree_digest(repo.path)
        want = (await console.check(read_sha("vda", DISK_MIB))).split()[0]
        restore = ("restore", "lrj", point.id, "disk0", url, "--repo", repo.path)
        refused = await cli(*restore, "--attach", "lrj", "--live", check=False)
        assert refused.returncode != 0 and "a LUN is written raw" in refused.stderr, refused
        async with attach_vm("lrj") as vm:
            assert await node_names(vm) == before and set(vm.registry.drives) == {"disk0"}
        assert nbdkit_pids_under(run_dir) == [] and device_overlays(run_dir) == []
        arguments = {
            "repo": str(repo.path),
            "point": point.id,
            "device": "disk0",
            "target": url,
            "speed": 1,
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "tests.integration.crash_child", "lrj"]
        killed = await anyio.run_process(
            [*argv, "live-raw", "running", json.dumps(arguments)], check=False, env=env
        )
        assert killed.returncode == -9, killed.stderr.decode()
        (server,) = nbdkit_pids_under(run_dir)
        (record,) = list(run_dir.glob("journal-*.json"))
        written = json.loads(record.read_text())
        assert written["kind"] == "mirror" and written["server"]["pid"] == server
        assert len(device_overlays(run_dir)) == 1
        await console.check(WAIT_VDB)
        assert (await console.check(read_sha("vdb", DISK_MIB))).split()[0] == want
        for write_ in RAW_WRITES:
            await console.check(fill("vdb", *write_))
        during = (await console.check(read_sha("vdb", DISK_MIB))).split()[0]
        done = json.loads((await cli("recover", "lrj", "--json")).stdout)
        (result,) = [r for r in done["operations"] if r["kind"] == "mirror"]
        assert result["verdict"] == "finished", result
        assert nbdkit_pids_under(run_dir) == [] and not running(server)
        assert not list(run_dir.glob("journal-*.json"))
        assert device_overlays(run_dir) == []
        assert (await console.check(read_sha("vdb", DISK_MIB))).split()[0] == during
        async with attach_vm("lrj") as vm:
            assert await wire.query_jobs(vm.session) == ()
            (device,) = set(vm.registry.drives) - {"disk0"}
            nodes = vm.registry.drives[device].nodes
            assert [n["driver"] for n in nodes] == ["iscsi", "raw"]
            assert await node_names(vm) == before | set(vm.registry.drives[device].node_names)
            await truth_check(vm)
        restored = json.loads(
            (
                await cli(
                    *restore[:4],
                    tgt.source(1).url,
                    *restore[5:],
                    "--attach",
                    "lrj",
                    "--live",
                    "-O",
                    "raw",
                    "--json",
                )
            ).stdout
        )
        assert restored["live"] is True and restored["restored"] == tgt.source(1).url
        async with attach_vm("lrj") as vm:
            added = vm.registry.drives[restored["attached"]]
            assert [(n["driver"], n.get("lun")) for n in added.nodes] == [
                ("iscsi", 1),
                ("raw", None),
            ]
            await truth_check(vm)
        assert nbdkit_pids_under(run_dir) == [] and device_overlays(run_dir) == []
    assert tree_digest(repo.path) == hashes
    plain = tmp_path / "plain.raw"
    await backup.restore(repo, "lrj", point.id, "disk0", plain, ImageFormat.RAW)
    await lun_equals(tgt, plain, tail1, lun=1)
    want_file = await reference(repo, "lrj", point.id, tmp_path / "r.raw", RAW_WRITES)
    assert sha256(want_file.read_bytes()) == during
    await lun_equals(tgt, want_file, tail)


@dataclass(frozen=True)
class QemuKilledMidMirror:
    """What :func:`qemu_killed_mid_mirror` leaves for its test to check."""

    point: str
    hashes: dict[str, str]  # the repository's files, before the restore
    during: str  # the restored disk's sha256 read in the guest just before QEMU's kill
    overlay: Path  # the guest's writes, kept outside the run directory
    record: bytes  # the journal record `recover` found
    recovered: dict[str, Any]  # `blockctl recover --json`
    result: dict[str, Any]  # its mirror operation


async def qemu_killed_mid_mirror(
    guest: GuestImage,
    name: str,
    disk: Path,
    repo: backup.Repository,
    target: IscsiSource | NfsSource,
    run_dir: Path,
) -> QemuKilledMidMirror:
    """A live restore of the point of ``disk`` into the remote raw ``target``, in the
    detached VM ``name``: once the guest has read the disk (equal to the point) and written
    ``RAW_WRITES`` to it, QEMU is SIGKILLed mid-copy. The controller raises ConnectionLost
    and stops the server; the overlay stays outside the run directory; `blockctl down` keeps
    the record and `blockctl recover` (other processes) reports the mirror as qemu-gone and
    drops it."""
    from tests.integration.test_attach_cli import cli
    from tests.integration.test_backup_faults import detached

    watch = StreamWatch()
    raised: list[BaseException] = []
    async with detached(guest, name, disk) as console:
        await console.check(
            "dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct conv=fsync 2>/dev/null"
        )
        async with attach_vm(name) as vm:
            point = await backup.create(vm, repo)
            hashes = tree_digest(repo.path)
            want = (await console.check(read_sha("vda", DISK_MIB))).split()[0]

            async def restore() -> None:
                try:
                    await backup.restore_live(
                        vm,
                        repo,
                        name,
                        point.id,
                        "disk0",
                        target,
                        control=JobControl(speed=1, hooks=(watch,)),
                        target_format=ImageFormat.RAW,
                    )
                except BlockctlError as exc:
                    raised.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(restore)
                await watch.running.wait()
                await console.check(WAIT_VDB)
                assert (await console.check(read_sha("vdb", DISK_MIB))).split()[0] == want
                for write_ in RAW_WRITES:
                    await console.check(fill("vdb", *write_))
                during = (await console.check(read_sha("vdb", DISK_MIB))).split()[0]
                os.kill(read_record(name).pid, signal.SIGKILL)
        (error,) = raised
        assert isinstance(error, ConnectionLost), repr(error)
        assert nbdkit_pids_under(run_dir) == []
        # The overlay is not in the run directory, which goes with the VM; and `down` of
        # the dead VM keeps that directory while it holds the interrupted restore's record.
        assert overlays(run_dir) == []
        (overlay,) = device_overlays(run_dir)
        await cli("down", name)
        (record,) = list(run_dir.glob("journal-*.json"))
        record_bytes = record.read_bytes()
        recovered = json.loads((await cli("recover", name, "--json")).stdout)
        (result,) = [r for r in recovered["operations"] if r["kind"] == "mirror"]
        assert result["verdict"] == "qemu-gone", result
        assert not list(run_dir.glob("journal-*.json"))
    return QemuKilledMidMirror(
        point=point.id,
        hashes=hashes,
        during=during,
        overlay=overlay,
        record=record_bytes,
        recovered=recovered,
        result=result,
    )


@pytest.mark.guest
async def test_qemu_killed_mid_mirror_into_a_lun_then_the_way_on_gives_point_plus_writes(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    runtime_dir: Path,
    tgt: Tgt,  # noqa: F811
    capfd: pytest.CaptureFixture[str],
) -> None:
    """kill -9 of QEMU mid-copy into a CHAP LUN (the guest has read the disk and written to
    it): the controller raises ConnectionLost and stops the server; ``blockctl recover``
    drops the record and says what the LUN and the overlay hold, with the commands that make
    the LUN whole. Run as given (the last one writes the LUN through qemu-img's own
    initiator, the password read from its file by a secret object), the LUN's file holds
    the point plus the guest's writes, and its bytes past the disk as they were; the
    repository is unchanged; the password is in no record, message or output."""
    repo = backup.init_repository(tmp_path / "repo")
    disk = await qcow2_image(images / "q0.qcow2", b"", DISK_MIB * MIB)
    tail = lun_ready(tgt)
    password = "chap-secret-5e8f1c"  # tgt: 12-16 characters for iSCSI CHAP
    tgt.admin("--lld", "iscsi", "--op", "new", "--mode", "account", "--user", "dave",
              "--password", password)  # fmt: skip
    tgt.admin("--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", "1",
              "--user", "dave")  # fmt: skip
    good = tmp_path / "chap.pw"
    good.write_text(password)
    good.chmod(0o600)
    target = tgt.source(LUN, user="dave", password_file=good)
    run_dir = runtime_dir / "lrl"
    killed = await qemu_killed_mid_mirror(guest, "lrl", disk, repo, target, run_dir)
    assert password.encode() not in killed.record
    message = killed.result["message"]
    assert "holds the guest's writes" in message and target.url in message
    assert password not in json.dumps(killed.recovered) and str(good) in message
    assert "--object" in message and "--target-image-opts" in message
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
    want_file = await reference(repo, "lrl", killed.point, tmp_path / "r.raw", RAW_WRITES)
    assert sha256(want_file.read_bytes()) == killed.during
    await lun_equals(tgt, want_file, tail)
    out, err = capfd.readouterr()
    assert password not in out + err


@pytest.mark.guest
async def test_a_vm_launched_from_a_point_onto_a_chap_lun_runs_on_a_mirrored_overlay(
    guest: GuestImage,
    images: Path,
    tmp_path: Path,
    runtime_dir: Path,
    tgt: Tgt,  # noqa: F811
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A lost VM whose config's drive is a CHAP LUN (named by its URL, as the CLI hands it):
    QEMU starts with the drive on a temporary qcow2 overlay (in the runtime root's
    ``_live-overlays``) over the point's server; the guest reads the disk whole (the point's
    sha256) and writes while the mirror into the LUN waits at 1 B/s; released, the device
    pivots onto the LUN's nodes (``iscsi``, ``raw``; the CHAP secret object QEMU reads from
    the file), then runs alone on it: no job, backup node, overlay, server or record. After
    shutdown the LUN's file equals the point plus exactly the guest's writes (``qemu-img
    compare`` against plain restore + ``qemu-io``), its last MiB as it was; the repository
    unchanged; the password in no output or file of the run directory. Then the same
    launch with its controller ``kill -9``ed at QEMU's spawn (before the LUN's secret and
    nodes were added): the guest writes, ``blockctl recover`` adds the
    secret from the password file the record names, the nodes, mirrors and pivots; the
    LUN (scribbled over first) again equals the reference."""
    from blockctl._backup.live import LiveLaunchResult
    from blockctl._cli.common import load_config
    from tests.integration.test_attach_cli import cli
    from tests.integration.test_live_launch import backed_up, console_of, down

    repo = backup.init_repository(tmp_path / "repo")
    point, want = await backed_up(guest, images, repo, DISK_MIB)
    hashes = tree_digest(repo.path)
    tail = lun_ready(tgt)
    # Onto LUN 1 (16 MiB, smaller than the disk): refused before QEMU starts (no guest runs
    # and writes only to be taken down), nothing made, no server left.
    small = tgt.source(1)
    small_toml = tmp_path / "small.toml"
    small_toml.write_text(
        f'name = "lostsmall"\nmachine = "pc"\nkernel = {json.dumps(str(guest.kernel))}\n'
        f'deprecated-input = "reject"\n[[drive]]\nformat = "raw"\n'
        f"iscsi = {{ portal = {json.dumps(small.portal)}, target = {json.dumps(small.target)}, "
        "lun = 1 }\n"
    )
    spawned: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_machine, "FAILPOINT", spawned.append)
        with pytest.raises(ConfigError) as refused:
            await backup.launch_live(
                load_config(small_toml, None), repo, "src", point.id, "disk0", small.url
            )
    assert refused.value.field == "target", refused.value
    assert "give a LUN at least as large" in str(refused.value)
    assert "nothing was launched" in str(refused.value)
    assert spawned == [] and not (runtime_dir / "lostsmall" / "vm.json").exists()
    assert nbdkit_pids_under(runtime_dir) == [] and device_overlays(runtime_dir / "x") == []
    password = "chap-secret-3c9e41"  # tgt: 12-16 characters for iSCSI CHAP
    good = tmp_path / "chap.pw"
    good.write_text(password)
    good.chmod(0o600)
    tgt.admin("--lld", "iscsi", "--op", "new", "--mode", "account", "--user", "dave",
              "--password", password)  # fmt: skip
    tgt.admin("--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", "1",
              "--user", "dave")  # fmt: skip
    lun = tgt.source(LUN)
    toml = tmp_path / "lost.toml"
    toml.write_text(
        f'name = "lostl"\nmachine = "pc"\nkernel = {json.dumps(str(guest.kernel))}\n'
        f"initrd = {json.dumps(str(guest.initrd))}\nappend = {json.dumps(guest.append)}\n"
        'deprecated-input = "reject"\n[[drive]]\nformat = "raw"\n'
        f"iscsi = {{ portal = {json.dumps(lun.portal)}, target = {json.dumps(lun.target)}, "
        f'lun = {LUN}, user = "dave", password-file = {json.dumps(str(good))} }}\n'
    )
    run_dir = runtime_dir / "lostl"
    watch = StreamWatch()  # the mirror's id, once it runs
    results: list[LiveLaunchResult] = []

    async def launch() -> None:
        results.append(
            await backup.launch_live(
                load_config(toml, None),
                repo,
                "src",
                point.id,
                "disk0",
                lun.url,
                control=JobControl(speed=1, hooks=(watch,)),
            )
        )

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(launch)
            await watch.running.wait()
            (overlay,) = device_overlays(run_dir)
            (record_file,) = list(run_dir.glob("journal-*.json"))
            written = json.loads(record_file.read_text())
            assert written["kind"] == "mirror"
            (added,) = written["add_nodes"].values()
            assert [n["driver"] for n in added] == ["iscsi", "raw"]
            assert set(written["secret_files"].values()) == {str(good)}
            async with console_of("lostl") as console:
                # The mirror waits at 1 B/s: everything here happens during the copy.
                assert (await console.check(read_sha("vda", DISK_MIB))).split()[0] == want
                for write_ in RAW_WRITES:
                    await console.check(fill("vda", *write_))
                during = (await console.check(read_sha("vda", DISK_MIB))).split()[0]
                async with attach_vm("lostl") as vm:
                    jobs = await wire.query_jobs(vm.session)
                    assert [(j.id, j.type) for j in jobs] == [(watch.job_id, "mirror")]
                    assert any(n.startswith("bclr-") for n in await node_names(vm))
                    await vm.command("block-job-set-speed", {"device": watch.job_id, "speed": 0})
        (result,) = results
        assert result.vm == "lostl" and result.device_id == "disk0"
        assert isinstance(result.path, IscsiSource) and result.path.url == lun.url
        assert result.format is ImageFormat.RAW
        assert result.job.completed_on_ready and result.job.offset == result.job.length
        async with console_of("lostl") as console:
            assert (await console.check(read_sha("vda", DISK_MIB))).split()[0] == during
        async with attach_vm("lostl") as vm:
            assert await wire.query_jobs(vm.session) == ()
            record = vm.registry.drives["disk0"]
            assert [(n["driver"], n.get("lun")) for n in record.nodes] == [
                ("iscsi", LUN),
                ("raw", None),
            ]
            assert await node_names(vm) == set(record.node_names)
            assert record.nodes[0]["password-secret"] in await wire.qom_list(vm.session, "/objects")
            await truth_check(vm)
        assert nbdkit_pids_under(runtime_dir) == [] and not overlay.exists()
        assert not list(run_dir.glob("journal-*.json"))
        seen = capfd.readouterr()
        assert password not in seen.out + seen.err
        for path in run_dir.rglob("*"):
            if path.is_file() and not path.is_socket():
                assert password.encode() not in path.read_bytes(), path
    finally:
        await down("lostl")
    assert tree_digest(repo.path) == hashes
    want_file = await reference(repo, "src", point.id, tmp_path / "r.raw", RAW_WRITES)
    want_sha = sha256(want_file.read_bytes())
    assert want_sha == during  # the guest's view: point plus writes
    await lun_equals(tgt, want_file, tail)

    # The same launch with its controller kill -9ed (another process) at QEMU's spawn: the
    # VM runs on the overlay over the server, the LUN's nodes and CHAP secret not added
    # yet; the guest reads and writes; `blockctl recover` (another process) adds the secret
    # from the password file the record names, then the nodes, mirrors and pivots. The
    # LUN's disk part scribbled over first: the mirror must write all of it.
    with open(tgt.backing[LUN - 1], "r+b") as file:
        file.write(b"\xee" * (DISK_MIB * MIB))
    killed_dir = runtime_dir / "lostk"
    arguments = {
        "repo": str(repo.path),
        "source_vm": "src",
        "point": point.id,
        "device": "disk0",
        "target": lun.url,
        "config": str(toml),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "tests.integration.crash_child", "lostk", "live-launch-raw"]
    try:
        killed = await anyio.run_process(
            [*argv, "spawned", json.dumps(arguments)], check=False, env=env
        )
        assert killed.returncode == -9, killed.stderr.decode()
        (server,) = nbdkit_pids_under(killed_dir)
        (record_file,) = list(killed_dir.glob("journal-*.json"))
        assert set(json.loads(record_file.read_text())["secret_files"].values()) == {str(good)}
        assert len(device_overlays(killed_dir)) == 1
        async with console_of("lostk") as console:
            for write_ in RAW_WRITES:
                await console.check(fill("vda", *write_))
            done = json.loads((await cli("recover", "lostk", "--json")).stdout)
            (recovered,) = [r for r in done["operations"] if r["kind"] == "mirror"]
            assert recovered["verdict"] == "finished", recovered
            assert nbdkit_pids_under(killed_dir) == [] and not running(server)
            assert not list(killed_dir.glob("journal-*.json"))
            assert device_overlays(killed_dir) == []
            assert (await console.check(read_sha("vda", DISK_MIB))).split()[0] == want_sha
        async with attach_vm("lostk") as vm:
            assert await wire.query_jobs(vm.session) == ()
            nodes = vm.registry.drives["disk0"].nodes
            assert [(n["driver"], n.get("lun")) for n in nodes] == [("iscsi", LUN), ("raw", None)]
            assert await node_names(vm) == set(vm.registry.drives["disk0"].node_names)
            await truth_check(vm)
        seen = capfd.readouterr()
        assert password not in seen.out + seen.err
    finally:
        await down("lostk")
    assert tree_digest(repo.path) == hashes
    await lun_equals(tgt, want_file, tail)
