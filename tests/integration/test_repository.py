"""Repository v2 against a real guest: every restored point equals a reference image that
QEMU's own qemu-img took of the disk at that point (VM paused), whatever other repositories,
failures and kills happened in between."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blockctl import VM, GuestImage, open_vm
from blockctl._backup import checkpoints
from blockctl._backup import operations as ops
from blockctl._backup.store import Manifest, Repository
from blockctl._ops.chains import read_graph
from blockctl._qmp import wire
from blockctl.errors import BackupCorrupt, BackupKeyError, RepositoryBusy, RepositoryError
from blockctl.types import Drive, ImageFormat, MachineConfig
from tests.integration.conftest import MIB, pattern, qcow2_image, qemu_binary, run
from tests.integration.test_backup import config, write

pytestmark = pytest.mark.guest

DISK_MIB = 64


@dataclass
class References:
    """Reference images of each disk at each point, made by qemu-img with the VM paused."""

    directory: Path
    taken: dict[tuple[str, str], Path] = field(default_factory=dict)
    n: int = 0

    async def take(self, vm: VM, disks: dict[str, Path]) -> dict[str, Path]:
        await wire.stop(vm.session)  # QEMU flushes every disk when the VM stops
        self.n += 1
        out = {}
        for device, image in disks.items():
            ref = self.directory / f"ref{self.n}-{device}.raw"
            await run(
                qemu_binary("qemu-img"), "convert", "-U", "-f", "qcow2", "-O", "raw", image, ref
            )
            out[device] = ref
        return out

    async def resume(self, vm: VM) -> None:
        await wire.cont(vm.session)


async def same(a: Path, fmt: str, b: Path) -> bool:
    try:
        await run(qemu_binary("qemu-img"), "compare", "-f", fmt, "-F", "raw", a, b)
    except Exception:
        return False
    return True


async def restore_equals(
    repo: Repository,
    vm: str,
    point: str,
    device: str,
    ref: Path,
    out: Path,
    fmt: ImageFormat = ImageFormat.RAW,
) -> bool:
    dest = out / f"restore-{point}-{device}.{fmt.value}"
    await ops.restore(repo, vm, point, device, dest, fmt)
    try:
        if fmt is ImageFormat.QCOW2:  # blockctl wrote the qcow2 itself: QEMU's judgement
            await run(qemu_binary("qemu-img"), "check", "-f", "qcow2", dest)
        return await same(dest, fmt.value, ref)
    finally:
        dest.unlink()


async def test_two_repositories_interleaved_every_point_restores_exactly(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """The issue's silent loss: a backup into repository B must not hide a write from A's next
    incremental. Fulls and incrementals interleaved; every point of both equals its reference."""
    refs = References(tmp_path)
    a = ops.init_repository(tmp_path / "A")
    b = ops.init_repository(tmp_path / "B", compression="none")
    d0 = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    d1 = await qcow2_image(images / "d1.qcow2", b"", DISK_MIB * MIB)
    disks = {"disk0": d0, "disk1": d1}
    recorded: list[tuple[Repository, str, dict[str, Path]]] = []
    async with open_vm(config(guest, "two", d0, d1)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 8192)
        await write(vm, "vdb", 1024, 1024)

        async def point(repo: Repository, kind: str = "incremental") -> Manifest:
            ref = await refs.take(vm, disks)
            try:
                manifest = await ops.backup(vm, repo, kind=kind)
            finally:
                await refs.resume(vm)
            recorded.append((repo, manifest.id, ref))
            return manifest

        first_a = await point(a)
        assert first_a.kind == "full"
        assert first_a.fallback_reason is not None
        assert "no earlier backup" in first_a.fallback_reason
        await write(vm, "vda", 20 * 1024, 256)  # the write only A's next incremental may hold
        first_b = await point(b)  # B's full must not reset what A sees
        assert first_b.kind == "full"
        await write(vm, "vda", 22 * 1024, 128)
        await write(vm, "vdb", 0, 64)
        inc_a = await point(a)
        assert inc_a.kind == "incremental" and inc_a.parent == first_a.id
        # A read what changed since ITS last point: 20 MiB, 22 MiB (one 4 MiB chunk each,
        # they are in chunks 5) and vdb's first chunk; nothing else.
        read = {d.device: d.bytes_read for d in inc_a.disks}
        chunk = a.chunk_size
        assert read["disk1"] == chunk
        assert read["disk0"] <= 2 * chunk
        await write(vm, "vdb", 4096, 512)
        inc_b = await point(b)
        assert inc_b.kind == "incremental" and inc_b.parent == first_b.id
        full_a = await point(a, "full")
        assert full_a.kind == "full" and full_a.fallback_reason is None
        await write(vm, "vda", 40 * 1024, 64)
        await point(a)
        await point(b)
        # Each repository keeps one checkpoint per disk, named after its latest point.
        graph = await read_graph(vm)
        expected = {
            checkpoints.bitmap_name(r.config.id, r.latest("two").id)  # type: ignore[union-attr]
            for r in (a, b)
        }
        for device in disks:
            names = {x.name for x in graph.format_node(device).dirty_bitmaps}
            assert names == expected, (device, names)
    for repo, point_id, ref in recorded:
        for device, path in ref.items():
            assert await restore_equals(repo, "two", point_id, device, path, tmp_path), (
                repo.path.name,
                point_id,
                device,
            )
    # qcow2 output too, for one point.
    repo, point_id, ref = recorded[2]
    assert await restore_equals(
        repo, "two", point_id, "disk0", ref["disk0"], tmp_path, ImageFormat.QCOW2
    )


async def test_owner_only_modes_whatever_the_umask(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    old = os.umask(0)
    try:
        repo = ops.init_repository(tmp_path / "R")
        d0 = await qcow2_image(images / "d0.qcow2", b"", 16 * MIB)
        async with open_vm(config(guest, "modes", d0)) as vm:
            await vm.console.wait_ready()  # type: ignore[union-attr]
            await write(vm, "vda", 0, 1024)
            manifest = await ops.backup(vm, repo)
        restored = await ops.restore(
            repo, "modes", manifest.id, "disk0", tmp_path / "r.raw", ImageFormat.RAW
        )
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(repo.path):
        for name in dirs:
            assert stat.S_IMODE(os.stat(Path(root) / name).st_mode) == 0o700, name
        for name in files:
            assert stat.S_IMODE(os.stat(Path(root) / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(repo.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "r.raw").st_mode) == 0o600
    assert restored.path == tmp_path / "r.raw"
    # A loose repository is refused.
    os.chmod(repo.path, 0o777)
    with pytest.raises(RepositoryError, match="chmod 700"):
        ops.open_repository(repo.path)


async def test_encrypted_repository_roundtrip_wrong_key_and_tamper(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode() + b"\n")
    key.chmod(0o600)
    other = tmp_path / "other"
    other.write_bytes(b"another key entirely\n")
    other.chmod(0o600)
    refs = References(tmp_path)
    repo = ops.init_repository(tmp_path / "E", key_file=key)
    d0 = await qcow2_image(images / "d0.qcow2", b"", 16 * MIB)
    async with open_vm(config(guest, "enc", d0)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 2048)
        ref1 = await refs.take(vm, {"disk0": d0})
        p1 = await ops.backup(vm, repo)
        await refs.resume(vm)
        await write(vm, "vda", 4096, 256)
        ref2 = await refs.take(vm, {"disk0": d0})
        p2 = await ops.backup(vm, repo)
        await refs.resume(vm)
    assert p2.kind == "incremental"
    assert await restore_equals(repo, "enc", p1.id, "disk0", ref1["disk0"], tmp_path)
    assert await restore_equals(repo, "enc", p2.id, "disk0", ref2["disk0"], tmp_path)
    with pytest.raises(BackupKeyError, match="wrong key"):
        ops.open_repository(repo.path, key_file=other)
    with pytest.raises(BackupKeyError, match="encrypted"):
        ops.open_repository(repo.path)
    assert (await ops.verify(repo, "enc", p2.id)).ok
    # No chunk file holds its plaintext (the guest's random data) as such.
    index = repo.read_index("enc", p2.id, "disk0")
    for i in range(index.count):
        if index.at(i) != bytes(32):
            plain = repo.read_chunk(index.at(i), index.chunk_length(i))
            name = index.at(i).hex()
            stored = (repo.path / "chunks" / name[:2] / name).read_bytes()
            assert plain[:4096] not in stored and plain[-4096:] not in stored
    # Damage a chunk of the first point, which the second inherited: both are affected.
    inherited = sorted(repo.read_index("enc", p1.id, "disk0").referenced())[0].hex()
    chunk = repo.path / "chunks" / inherited[:2] / inherited
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 1
    chunk.write_bytes(bytes(raw))
    report = await ops.verify(repo, "enc", p2.id)
    assert not report.ok
    assert f"enc/{p1.id}" in report.affected and f"enc/{p2.id}" in report.affected
    with pytest.raises(BackupCorrupt):
        await ops.restore(repo, "enc", p1.id, "disk0", tmp_path / "x.raw", ImageFormat.RAW)
    assert not (tmp_path / "x.raw").exists()


async def test_no_key_material_in_argv_logs_journal_or_json(
    runtime_dir: Path, tmp_path: Path
) -> None:
    """An encrypted repository driven from the CLI with the event stream on: neither the key
    file's secret nor the repository's master keys appear in QEMU's or any helper's argv
    (logged by the one subprocess door), the logs, the run directory (journal, records) or the
    JSON output."""
    from tests.integration.test_attach_cli import cli

    secret = os.urandom(24).hex()
    key = tmp_path / "key"
    key.write_text(secret + "\n")
    key.chmod(0o600)
    repo = tmp_path / "R"
    outputs: list[str] = []

    async def run_cli(*args: str | Path) -> str:
        done = await cli("-v", *args)
        outputs.extend((done.stdout, done.stderr))
        return done.stdout

    await run_cli("backup", "init", "--repo", repo, "--key-file", key, "--json")
    await run_cli("up", "--name", "keyvm", "--strict")
    try:
        record = json.loads((runtime_dir / "keyvm" / "vm.json").read_text())
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes()
        point = json.loads(
            await run_cli("backup", "create", "keyvm", "--repo", repo, "--key-file", key, "--json")
        )
        await run_cli("backup", "list", "keyvm", "--repo", repo, "--key-file", key, "--json")
        await run_cli("backup", "verify", "keyvm", "--repo", repo, "--key-file", key, "--json")
        await run_cli(
            "restore",
            "keyvm",
            point["id"],
            "disk0",
            tmp_path / "r.qcow2",
            "--repo",
            repo,
            "--key-file",
            key,
            "--json",
        )
        run_dir_bytes = b"".join(
            p.read_bytes() for p in (runtime_dir / "keyvm").rglob("*") if p.is_file()
        )
    finally:
        await cli("down", "keyvm")
    opened = ops.open_repository(repo, key_file=key)
    assert opened.key is not None
    needles = [
        secret.encode(),
        opened.key.enc,
        opened.key.mac,
        opened.key.enc.hex().encode(),
        opened.key.mac.hex().encode(),
    ]
    haystacks = {
        "qemu argv": cmdline,
        "cli output and logs": "\n".join(outputs).encode(),
        "run dir": run_dir_bytes,
        "repository metadata": (repo / "config.json").read_bytes(),
    }
    assert "blockctl.proc.spawned" in haystacks["cli output and logs"].decode()  # argv logged
    for where, data in haystacks.items():
        for needle in needles:
            assert needle not in data, where


async def test_another_backup_of_the_vm_meanwhile_is_refused_and_harms_nothing(
    guest: GuestImage, images: Path, tmp_path: Path, runtime_dir: Path
) -> None:
    """While one backup of a VM reads its export, a second one (another repository, another
    process's view) is refused before it changes anything: the first completes exactly."""
    from blockctl import attach as attach_vm
    from blockctl import launch_detached, shutdown_detached

    refs = References(tmp_path)
    a = ops.init_repository(tmp_path / "A")
    b = ops.init_repository(tmp_path / "B")
    d0 = await qcow2_image(images / "d0.qcow2", b"", 16 * MIB)
    launched = await launch_detached(config(guest, "meanwhile", d0))
    try:
        async with attach_vm("meanwhile") as vm:
            refused: list[BaseException] = []

            async def second_backup(step: str) -> None:
                if step == "after-transaction":
                    try:
                        await ops.backup(vm, b)
                    except RepositoryBusy as exc:
                        refused.append(exc)

            ref = await refs.take(vm, {"disk0": d0})
            try:
                first = await ops.backup(vm, a, _failpoint=second_backup)
            finally:
                await refs.resume(vm)
            assert len(refused) == 1 and "another backup of meanwhile" in str(refused[0])
            assert b.manifests("meanwhile") == []
            graph = await read_graph(vm)
            names = {x.name for x in graph.format_node("disk0").dirty_bitmaps}
            assert names == {first.checkpoint}
    finally:
        await shutdown_detached(launched.name)
    assert await restore_equals(a, "meanwhile", first.id, "disk0", ref["disk0"], tmp_path)


async def test_a_failed_full_backup_keeps_the_checkpoint(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Format 1 dropped both bitmaps when a full backup failed, and the next incremental turned
    full "because QEMU was killed". Now a failed full leaves the repository's checkpoint as it
    was: the next backup is an incremental holding every write since the last good point."""
    refs = References(tmp_path)
    repo = ops.init_repository(tmp_path / "R")
    d0 = await qcow2_image(images / "d0.qcow2", b"", 32 * MIB)
    async with open_vm(config(guest, "ff", d0)) as vm:
        await vm.console.wait_ready()  # type: ignore[union-attr]
        await write(vm, "vda", 0, 2048)
        good = await ops.backup(vm, repo)
        await write(vm, "vda", 8 * 1024, 1024)  # the write the failed full must not lose

        def fail(step: str) -> None:
            if step == "after-index":
                raise OSError(5, "injected before the manifest")

        with pytest.raises(OSError, match="injected"):
            await ops.backup(vm, repo, kind="full", _failpoint=fail)
        assert [m.id for m in repo.manifests("ff")] == [good.id]
        graph = await read_graph(vm)
        (bitmap,) = graph.format_node("disk0").dirty_bitmaps
        assert bitmap.name == good.checkpoint and bitmap.recording
        await write(vm, "vda", 16 * 1024, 64)
        ref = await refs.take(vm, {"disk0": d0})
        try:
            nxt = await ops.backup(vm, repo)
        finally:
            await refs.resume(vm)
    assert nxt.kind == "incremental" and nxt.fallback_reason is None
    assert nxt.parent == good.id
    assert nxt.bytes_read == 2 * repo.chunk_size  # the chunks at 8 MiB and 16 MiB
    assert await restore_equals(repo, "ff", nxt.id, "disk0", ref["disk0"], tmp_path)


async def test_a_retried_request_returns_the_point_it_recorded(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """An attempt that failed after its manifest (a killed controller's retry sees the same):
    the same request id returns that point, not a second one; another id takes its own."""
    repo = ops.init_repository(tmp_path / "R")
    d0 = await qcow2_image(images / "d0.qcow2", pattern(1, MIB), 4 * MIB)
    # No kernel: the firmware finds nothing to boot and idles; it never writes.
    machine = MachineConfig(
        name="rq", memory_mib=64, drives=(Drive(file=d0, format=ImageFormat.QCOW2),)
    )

    def fail(step: str) -> None:
        if step == "after-manifest":
            raise OSError(5, "injected after the manifest")

    async with open_vm(machine) as vm:
        with pytest.raises(OSError, match="injected"):
            await ops.backup(vm, repo, request_id="fleet/run-1/backup/rq", _failpoint=fail)
        (recorded,) = repo.manifests("rq")
        assert recorded.request_id == "fleet/run-1/backup/rq"
        again = await ops.backup(vm, repo, request_id="fleet/run-1/backup/rq")
        other = await ops.backup(vm, repo, request_id="fleet/run-2/backup/rq")
    assert again == recorded
    assert [m.id for m in repo.manifests("rq")] == [recorded.id, other.id]
    # The failed attempt's checkpoints were settled: the next point is an incremental on it.
    assert other.kind == "incremental" and other.parent == recorded.id
    ref = tmp_path / "ref.raw"  # the disk as QEMU left it (the firmware never wrote to it)
    await run(qemu_binary("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", d0, ref)
    assert await restore_equals(repo, "rq", other.id, "disk0", ref, tmp_path)
