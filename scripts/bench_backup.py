"""`scripts/bench backup`: repository v2 (blockctl.backup) against floors measured in the same run.

Floors, never blockctl itself: the raw QMP incremental (a persistent bitmap, then
``blockdev-backup sync=incremental`` into a new qcow2, sent with ``vm.session.execute``),
``qemu-img convert`` of the same image, reading the repository's files with ``cat``, and
``zstd`` level 1 of the whole image. Encrypted vs unencrypted compares blockctl with itself on
purpose (what encryption costs). Everything runs on the same filesystem, page cache warm.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio

from blockctl import GuestImage, LaunchedVM, _binaries, _images, _proc, open_vm
from blockctl import backup as bk
from blockctl._ops.chains import read_graph
from blockctl.backup import BackupOptions
from blockctl.jobs import JobControl
from blockctl.types import Drive, ImageFormat, MachineConfig
from scripts.bench_common import Row

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Sizes:
    """What a run measures; quick mode keeps every figure but shrinks the data."""

    reps: int
    inc_reps: int  # the 16 MiB incrementals: cheap, and the noisiest rows
    inc_disks: tuple[int, ...]  # bytes, sparse qcow2
    regions: int  # contiguous dirty regions of region_mib each
    region_mib: int
    scattered: int  # 64 KiB writes for the chunk-amplification row
    full_mib: int  # random-data disk for full/restore/verify/chunk-size rows
    dedup_mib: int
    text_mib: int  # half text, half zeros


#: Incrementals watched for their peak space (not timed), after the timed ones.
SPACE_REPS = 2

FULL = Sizes(3, 7, (1 * GIB, 4 * GIB), 4, 4, 256, 512, 512, 256)
QUICK = Sizes(1, 1, (1 * GIB, 4 * GIB), 4, 4, 64, 64, 64, 32)


def guest_config(guest: GuestImage, name: str, *disks: Path) -> MachineConfig:
    return MachineConfig(
        name=name,
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        drives=tuple(Drive(file=d, format=ImageFormat.QCOW2) for d in disks),
    )


async def sh(vm: LaunchedVM, command: str, timeout: float = 300) -> str:
    assert vm.console is not None
    return await vm.console.check(command, timeout=timeout)


# Section: measuring space


def du(path: Path) -> int:
    """Bytes allocated under ``path`` (st_blocks), files vanishing meanwhile ignored."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def fs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class SpaceWatch:
    """Peak growth of some directories (du, polled every 20 ms in a thread) and of the whole
    filesystem (statvfs: noisy on a shared machine, reported beside)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.peak = 0
        self.peak_fs = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        self.peak = max(self.peak, sum(du(p) for p in self.paths) - self._base)
        self.peak_fs = max(self.peak_fs, fs_used(self.paths[0]) - self._base_fs)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    @contextlib.contextmanager
    def watching(self) -> Iterator[SpaceWatch]:
        self._base = sum(du(p) for p in self.paths)
        self._base_fs = fs_used(self.paths[0])
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._sample()


# Section: the floors


def own_cpu() -> float:
    """This process's CPU seconds (user and system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    """The CPU seconds of this process's reaped children (user and system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """Another process's CPU seconds so far (user and system), from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def clock() -> float:
    """Write back what earlier steps left dirty (each measurement pays for its own writes),
    then the time."""
    await anyio.to_thread.run_sync(os.sync)
    return time.perf_counter()


async def node_of(vm: LaunchedVM, device: str) -> str:
    return (await read_graph(vm)).format_node(device).name


async def raw_bitmap(vm: LaunchedVM, node: str, name: str = "bench-raw") -> str:
    await vm.session.execute(
        "block-dirty-bitmap-add", {"node": node, "name": name, "persistent": True}
    )
    return name


async def raw_incremental(
    vm: LaunchedVM, node: str, bitmap: str, target: Path, size: int
) -> tuple[float, int]:
    """What a user does by hand: a new qcow2, blockdev-add, blockdev-backup sync=incremental
    (the bitmap is cleared on success), wait for BLOCK_JOB_COMPLETED, blockdev-del. Seconds
    and the target's allocated bytes."""
    session = vm.session
    start = await clock()
    await _proc.run([_binaries.qemu_img(), "create", "-q", "-f", "qcow2", str(target), str(size)])
    await session.execute(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "bench-target",
            "file": {"driver": "file", "filename": str(target)},
        },
    )
    with session.events("BLOCK_JOB_COMPLETED") as events:
        await session.execute(
            "blockdev-backup",
            {
                "job-id": "bench-inc",
                "device": node,
                "target": "bench-target",
                "sync": "incremental",
                "bitmap": bitmap,
            },
        )
        event = await events.wait_for(lambda e: e.data.get("device") == "bench-inc")
    await session.execute("blockdev-del", {"node-name": "bench-target"})
    seconds = time.perf_counter() - start
    if "error" in event.data:
        raise RuntimeError(f"raw incremental failed: {event.data['error']}")
    allocated = os.stat(target).st_blocks * 512
    target.unlink()
    return seconds, allocated


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def convert_seconds(
    src: Path, dst: Path, out_fmt: str, cpu: list[float] | None = None
) -> float:
    """qemu-img convert to a new file on the same filesystem, then fsync it: ``-O raw`` does
    not (strace: no fdatasync; ``-O qcow2`` does), and a backup or a restore is only done when
    its data is durable, as blockctl's are. The VM holds ``src``'s lock, and blockctl never
    overrides a lock (not even here): the floor converts a sparse copy of it, made untimed.
    ``cpu``: gets qemu-img's CPU seconds (user and system)."""
    copy = dst.with_name(dst.name + ".src.qcow2")
    await _proc.run(["cp", "--sparse=always", str(src), str(copy)])
    try:
        start = await clock()
        used = children_cpu()
        await _proc.run(
            [_binaries.qemu_img(), "convert", "-f", "qcow2", "-O", out_fmt, str(copy), str(dst)]
        )
        if cpu is not None:
            cpu.append(children_cpu() - used)
        await anyio.to_thread.run_sync(fsync_file, dst)
        seconds = time.perf_counter() - start
    finally:
        copy.unlink(missing_ok=True)
    dst.unlink()
    return seconds


async def convert_into(
    src: Path, dst: Path, out_fmt: str, mib: int, out: list[float], cpu: list[float] | None = None
) -> None:
    out.append(mib / await convert_seconds(src, dst, out_fmt, cpu))


async def cat_seconds(directory: Path) -> float:
    start = await clock()
    await _proc.run(
        ["sh", "-c", 'find "$1" -type f -print0 | xargs -0 cat > /dev/null', "sh", str(directory)]
    )
    return time.perf_counter() - start


# Section: guest writes


async def write_regions(vm: LaunchedVM, dev: str, size: int, sizes: Sizes) -> int:
    """``regions`` contiguous random regions, aligned to 4 MiB and spread over the disk."""
    step = size // sizes.regions // (4 * MIB) * (4 * MIB)
    for i in range(sizes.regions):
        await sh(
            vm,
            f"dd if=/dev/urandom of=/dev/{dev} bs=64k count={sizes.region_mib * 16} "
            f"seek={(i * step + 4 * MIB) // (64 << 10)} oflag=direct conv=fsync 2>/dev/null",
        )
    return sizes.regions * sizes.region_mib * MIB


async def write_scattered(vm: LaunchedVM, dev: str, size: int, count: int, seed: int) -> int:
    """``count`` 64 KiB random writes at distinct 64 KiB-aligned places (seeded)."""
    slots = sorted(random.Random(seed).sample(range(size // (64 << 10)), count))
    await sh(vm, f"dd if=/dev/urandom of=/tmp/r bs=64k count={count} 2>/dev/null")
    for start in range(0, count, 64):
        batch = " ".join(str(s) for s in slots[start : start + 64])
        await sh(
            vm,
            f"n=0; for o in {batch}; do dd if=/tmp/r of=/dev/{dev} bs=64k count=1 skip=$n "
            "seek=$o oflag=direct conv=notrunc 2>/dev/null || exit 1; n=$((n+1)); done; sync",
        )
    return count * (64 << 10)


def read_mib(manifest: bk.Manifest) -> float:
    return manifest.bytes_read / MIB


# Section: the benchmark


async def bench_backup(guest: GuestImage, quick: bool, work: Path) -> tuple[list[Row], list[str]]:
    sizes = QUICK if quick else FULL
    rows: list[Row] = []
    notes: list[str] = []
    scratch = work / "scratch"
    scratch.mkdir()
    rows += await _incrementals(guest, sizes, work, scratch, notes)
    rows += await _fulls(guest, sizes, work, scratch, notes)
    rows += await _dedup(guest, sizes, work, scratch)
    return rows, notes


async def _incrementals(
    guest: GuestImage, sizes: Sizes, work: Path, scratch: Path, notes: list[str]
) -> list[Row]:
    disks = []
    for n, size in enumerate(sizes.inc_disks):
        disk = work / f"inc{n}.qcow2"
        await _images.create(disk, ImageFormat.QCOW2, size=size)
        disks.append(disk)
    rows: list[Row] = []
    dirty = sizes.regions * sizes.region_mib
    budget = 2 * dirty + 64
    medians: dict[int, tuple[float, float]] = {}
    async with open_vm(guest_config(guest, "bench-inc", *disks)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        for n, size in enumerate(sizes.inc_disks):
            device, dev = f"disk{n}", f"vd{'abcdefgh'[n]}"
            repo = bk.init_repository(work / f"repo-inc{n}")
            first = await bk.create(
                vm,
                repo,
                devices=[device],
                options=BackupOptions(scratch_dir=scratch),
                control=JobControl(hooks=()),
            )
            assert first.kind == "full"
            node = await node_of(vm, device)
            bitmap = await raw_bitmap(vm, node)
            mine: list[float] = []
            raw: list[float] = []
            peaks: list[float] = []
            peaks_fs: list[float] = []
            floor_space: list[float] = []
            read: list[float] = []
            # Timed reps, then reps watched for space: the watcher's du walks hold the GIL
            # and slowed the backup it watched by 50-100 ms.
            for rep in range(sizes.inc_reps + SPACE_REPS):
                await write_regions(vm, dev, size, sizes)
                watched = rep >= sizes.inc_reps
                watch = SpaceWatch(repo.path, scratch)
                with watch.watching() if watched else contextlib.nullcontext(watch):
                    start = await clock()
                    point = await bk.create(
                        vm,
                        repo,
                        devices=[device],
                        options=BackupOptions(scratch_dir=scratch),
                        control=JobControl(hooks=()),
                    )
                    seconds = time.perf_counter() - start
                assert point.kind == "incremental", point.fallback_reason
                read.append(read_mib(point))
                raw_seconds, allocated = await raw_incremental(
                    vm, node, bitmap, work / "raw-target.qcow2", size
                )
                if watched:
                    peaks.append(watch.peak / MIB)
                    peaks_fs.append(watch.peak_fs / MIB)
                    floor_space.append(allocated / MIB)
                else:
                    mine.append(seconds)
                    raw.append(raw_seconds)
            gib = size // GIB
            rows.append(
                Row(
                    f"incremental {dirty} MiB dirty ({sizes.regions}x{sizes.region_mib} MiB), "
                    f"{gib} GiB disk",
                    "s",
                    mine,
                    raw,
                    "raw QMP incremental into a new qcow2",
                    goal="<= 2x",
                )
            )
            rows[-1].met = rows[-1].ratio() <= 2.0
            rows.append(
                Row(
                    f"  peak extra space (repo + scratch), {gib} GiB disk; read {read[0]:.0f} MiB",
                    "MiB",
                    peaks,
                    floor_space,
                    "raw QMP incremental's target size",
                    goal=f"<= {budget} MiB",
                )
            )
            rows[-1].met = max(peaks) <= budget
            notes.append(
                f"{gib} GiB disk: statvfs peak growth of the whole filesystem during the "
                f"incremental {min(peaks_fs):.1f}-{max(peaks_fs):.1f} MiB (shared machine)"
            )
            medians[size] = (statistics.median(mine), statistics.median(raw))
            if n == 0:
                # Chunk amplification: the same dirty bytes scattered in 64 KiB writes.
                mine_s, raw_s, read_s = [], [], []
                for rep in range(sizes.reps):
                    await write_scattered(vm, dev, size, sizes.scattered, seed=rep)
                    start = await clock()
                    point = await bk.create(
                        vm,
                        repo,
                        devices=[device],
                        options=BackupOptions(scratch_dir=scratch),
                        control=JobControl(hooks=()),
                    )
                    mine_s.append(time.perf_counter() - start)
                    read_s.append(read_mib(point))
                    seconds, _ = await raw_incremental(
                        vm, node, bitmap, work / "raw-target.qcow2", size
                    )
                    raw_s.append(seconds)
                rows.append(
                    Row(
                        f"incremental {sizes.scattered}x64 KiB scattered, {gib} GiB disk; "
                        f"read {min(read_s):.0f}-{max(read_s):.0f} MiB",
                        "s",
                        mine_s,
                        raw_s,
                        "raw QMP incremental into a new qcow2",
                        goal="(amplification)",
                    )
                )
    small, large = min(medians), max(medians)
    notes.append(
        f"flatness, incremental time {large // GIB} GiB / {small // GIB} GiB disk: blockctl "
        f"{medians[large][0] / medians[small][0]:.2f}, raw QMP "
        f"{medians[large][1] / medians[small][1]:.2f} (1.00 = flat)"
    )
    return rows


def random_raw(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib // 16):
            f.write(os.urandom(16 * MIB))


def text_raw(path: Path, mib: int) -> None:
    """First half English-like text (random words from a fixed vocabulary), second half zeros."""
    rng = random.Random(13)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(5000)]
    half = mib * MIB // 2
    with open(path, "wb") as f:
        written = 0
        while written < half:
            block = (" ".join(rng.choices(vocab, k=200_000)) + ".\n").encode()
            block = block[: half - written]
            f.write(block)
            written += len(block)
        f.truncate(mib * MIB)


async def to_qcow2(raw: Path, qcow2: Path) -> None:
    await _images.convert(raw, ImageFormat.RAW, qcow2, ImageFormat.QCOW2)


async def _fulls(
    guest: GuestImage, sizes: Sizes, work: Path, scratch: Path, notes: list[str]
) -> list[Row]:
    mib = sizes.full_mib
    src = work / "random.raw"
    random_raw(src, mib)
    disk = work / "full.qcow2"
    await to_qcow2(src, disk)
    src.unlink()
    text_src = work / "text.raw"
    text_raw(text_src, sizes.text_mib)
    text_disk = work / "text.qcow2"
    await to_qcow2(text_src, text_disk)
    key = work / "key"
    key.write_bytes(os.urandom(32).hex().encode() + b"\n")
    key.chmod(0o600)
    rows: list[Row] = []
    async with open_vm(guest_config(guest, "bench-full", disk, text_disk)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        full: list[float] = []
        enc: list[float] = []
        plain: list[float] = []
        conv_raw: list[float] = []
        conv_qcow2: list[float] = []
        first: tuple[bk.Repository, bk.Manifest] | None = None

        cpu: list[tuple[float, float]] = []  # per GiB of the plain full: blockctl's, QEMU's
        convert_cpu: list[float] = []

        async def full_into(repo: bk.Repository, out: list[float]) -> bk.Manifest:
            start = await clock()
            mine, qemu = own_cpu(), process_cpu(vm.process.pid)
            point = await bk.create(
                vm,
                repo,
                devices=["disk0"],
                options=BackupOptions(scratch_dir=scratch),
                control=JobControl(hooks=()),
            )
            out.append(mib / (time.perf_counter() - start))
            if out is full:
                gib = mib / 1024
                cpu.append(((own_cpu() - mine) / gib, (process_cpu(vm.process.pid) - qemu) / gib))
            assert point.bytes_read == mib * MIB, point.bytes_read
            return point

        for rep in range(sizes.reps):
            repo = bk.init_repository(work / f"repo-full{rep}")
            erepo = bk.init_repository(work / f"repo-enc{rep}", key_file=key)
            prepo = bk.init_repository(work / f"repo-plain{rep}", compression="none")
            steps: list[Callable[[], Awaitable[object]]] = [
                partial(full_into, repo, full),
                partial(full_into, erepo, enc),
                partial(full_into, prepo, plain),
                partial(convert_into, disk, work / "conv.raw", "raw", mib, conv_raw, convert_cpu),
                partial(convert_into, disk, work / "conv.qcow2", "qcow2", mib, conv_qcow2),
            ]
            for step in steps[rep % len(steps) :] + steps[: rep % len(steps)]:
                await step()
            first = first or (repo, repo.manifests(vm.name)[-1])
            for other in (erepo, prepo) if rep == 0 else (repo, erepo, prepo):
                shutil.rmtree(other.path)
        rows += [
            Row(
                f"full backup {mib} MiB random, incl. hashing (MiB/s)",
                "MB/s",
                full,
                conv_raw,
                "qemu-img convert -O raw + fsync, same image",
                goal=">= 1x",
            ),
            Row(
                f"full backup {mib} MiB, encrypted repository (MiB/s)",
                "MB/s",
                enc,
                full,
                "the unencrypted full above (what AES-GCM costs)",
                goal="(cost)",
            ),
            Row(
                f"full backup {mib} MiB, compression none (MiB/s)",
                "MB/s",
                plain,
                conv_raw,
                "qemu-img convert -O raw + fsync, same image",
                goal="(zstd's share)",
            ),
        ]
        rows[0].met = rows[0].ratio() >= 1.0
        mine = statistics.median(c[0] for c in cpu)
        qemu = statistics.median(c[1] for c in cpu)
        best = 1024 / max(conv_raw)  # s per GiB at convert's fastest rep
        cores = os.cpu_count() or 1
        notes.append(
            f"full backup CPU per GiB (medians of {len(cpu)}): blockctl {mine:.2f} s, QEMU's "
            f"NBD export {qemu:.2f} s, together {mine + qemu:.2f} s; qemu-img convert -O raw "
            f"{statistics.median(convert_cpu) * 1024 / mib:.2f} s (its writeback's kernel "
            f"threads not counted); at convert's fastest rep ({max(conv_raw):.0f} MB/s, "
            f"{best:.2f} s per GiB) {cores} cores give {best * cores:.2f} CPU s per GiB"
        )
        assert first is not None
        repo, point = first
        restore_raw: list[float] = []
        restore_qcow2: list[float] = []
        verify: list[float] = []
        cat: list[float] = []
        for _ in range(sizes.reps):
            for fmt, out in ((ImageFormat.RAW, restore_raw), (ImageFormat.QCOW2, restore_qcow2)):
                dest = work / f"restored.{fmt.value}"
                start = await clock()
                await bk.restore(repo, vm.name, point.id, "disk0", dest, fmt)
                out.append(mib / (time.perf_counter() - start))
                dest.unlink()
            start = await clock()
            report = await bk.verify(repo, vm.name, point.id)
            verify.append(mib / (time.perf_counter() - start))
            assert report.ok, report.problems
            cat.append(mib / await cat_seconds(repo.path / "chunks"))
        rows += [
            Row(
                f"restore {mib} MiB to raw (MiB/s)",
                "MB/s",
                restore_raw,
                conv_raw,
                "qemu-img convert -O raw + fsync, same image",
                goal=">= 1x",
            ),
            Row(
                f"restore {mib} MiB to qcow2 (MiB/s)",
                "MB/s",
                restore_qcow2,
                conv_qcow2,
                "qemu-img convert -O qcow2 + fsync, same image",
                goal=">= 1x",
            ),
            Row(
                f"verify {mib} MiB point (MiB/s)",
                "MB/s",
                verify,
                cat,
                "cat of the repository's chunk files",
                goal="(throughput)",
            ),
        ]
        for row in rows[-3:-1]:
            row.met = row.ratio() >= 1.0
        rows.append(await _compression(vm, sizes, work, scratch, text_src, notes))
        rows += await _chunk_sizes(vm, sizes, work, scratch, disk)
    return rows


async def _compression(
    vm: LaunchedVM, sizes: Sizes, work: Path, scratch: Path, text_src: Path, notes: list[str]
) -> Row:
    import zstandard

    repo = bk.init_repository(work / "repo-text")
    point = await bk.create(
        vm,
        repo,
        devices=["disk1"],
        options=BackupOptions(scratch_dir=scratch),
        control=JobControl(hooks=()),
    )
    floor = len(zstandard.ZstdCompressor(level=1).compress(text_src.read_bytes()))
    text_src.unlink()
    summary = bk.summary(point)
    notes.append(
        f"compression disk {sizes.text_mib} MiB (half text, half zeros): read "
        f"{point.bytes_read / MIB:.1f} MiB, new {point.bytes_new / MIB:.1f} MiB, stored "
        f"{point.bytes_stored / MIB:.1f} MiB (compression ratio {summary['compression_ratio']}), "
        f"repository on disk {du(repo.path) / MIB:.1f} MiB"
    )
    return Row(
        f"compression: {sizes.text_mib} MiB half text/half zero, bytes stored",
        "MiB",
        [point.bytes_stored / MIB],
        [floor / MIB],
        "zstd -1 of the whole image, one stream",
        goal="(ratio)",
    )


async def _chunk_sizes(
    vm: LaunchedVM, sizes: Sizes, work: Path, scratch: Path, disk: Path
) -> list[Row]:
    """Full then an incremental of scattered 64 KiB writes, per chunk size, with the floors
    (qemu-img convert, then the raw QMP incremental of the same writes)."""
    mib = sizes.full_mib
    node = await node_of(vm, "disk0")
    count = sizes.scattered // 4  # spread over a disk half the size of the 1 GiB one
    bitmap: str | None = None
    fulls: dict[int, list[float]] = {1: [], 4: []}
    incs: dict[int, list[float]] = {1: [], 4: []}
    read: dict[int, list[float]] = {1: [], 4: []}
    index_size: dict[int, int] = {}
    floor: list[float] = []
    for rep in range(sizes.reps):
        order = (1, 4) if rep % 2 == 0 else (4, 1)
        repos: dict[int, bk.Repository] = {}
        for chunk in order:
            repos[chunk] = bk.init_repository(
                work / f"repo-chunk{chunk}-{rep}", chunk_size=chunk * MIB
            )
            start = await clock()
            await bk.create(
                vm,
                repos[chunk],
                devices=["disk0"],
                options=BackupOptions(scratch_dir=scratch),
                control=JobControl(hooks=()),
            )
            fulls[chunk].append(time.perf_counter() - start)
        convert = await convert_seconds(disk, work / "conv.raw", "raw")
        if bitmap is None:
            bitmap = await raw_bitmap(vm, node)
        else:  # start from here, as the repositories do
            await raw_incremental(vm, node, bitmap, work / "raw-target.qcow2", mib * MIB)
        await write_scattered(vm, "vda", mib * MIB, count, seed=99 + rep)
        for chunk in order:
            start = await clock()
            point = await bk.create(
                vm,
                repos[chunk],
                devices=["disk0"],
                options=BackupOptions(scratch_dir=scratch),
                control=JobControl(hooks=()),
            )
            incs[chunk].append(time.perf_counter() - start)
            read[chunk].append(read_mib(point))
            assert point.kind == "incremental", point.fallback_reason
            index = repos[chunk].path / "points" / vm.name / point.id / "disk0.index"
            index_size[chunk] = index.stat().st_size
        await clock()
        raw_inc, _ = await raw_incremental(vm, node, bitmap, work / "raw-target.qcow2", mib * MIB)
        floor.append(convert + raw_inc)
        for repo in repos.values():
            shutil.rmtree(repo.path)
    rows = []
    for chunk in (1, 4):
        total = [f + i for f, i in zip(fulls[chunk], incs[chunk], strict=True)]
        rows.append(
            Row(
                f"chunk {chunk} MiB: full {mib} MiB {statistics.median(fulls[chunk]):.2f}s + "
                f"incr. {count}x64 KiB {statistics.median(incs[chunk]):.2f}s "
                f"(read {statistics.median(read[chunk]):.0f} MiB, index {index_size[chunk]} B)",
                "s",
                total,
                floor,
                "qemu-img convert + raw QMP incremental",
                goal="(choice)",
            )
        )
    return rows


async def _dedup(guest: GuestImage, sizes: Sizes, work: Path, scratch: Path) -> list[Row]:
    """Two VMs cloned from one base image (qcow2 overlays over one raw base), both backed up
    into one repository: the base's data is stored once."""
    base = work / "base.raw"
    random_raw(base, sizes.dedup_mib)
    repo = bk.init_repository(work / "repo-dedup")
    after: list[float] = []
    stored: list[int] = []
    for name in ("clone-a", "clone-b"):
        overlay = work / f"{name}.qcow2"
        await _images.create(
            overlay, ImageFormat.QCOW2, backing=base, backing_format=ImageFormat.RAW
        )
        async with open_vm(guest_config(guest, name, overlay)) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            point = await bk.create(
                vm, repo, options=BackupOptions(scratch_dir=scratch), control=JobControl(hooks=())
            )
        stored.append(point.bytes_stored)
        after.append(du(repo.path / "chunks") / MIB)
    return [
        Row(
            f"dedup: 2 VMs cloned from one {sizes.dedup_mib} MiB base, repository size "
            f"(2nd stored {stored[1] / MIB:.1f} MiB new)",
            "MiB",
            [after[1]],
            [after[0]],
            "the repository after the first clone alone",
            goal="~1x",
        )
    ]
