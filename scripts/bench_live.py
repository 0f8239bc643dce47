"""Live restore's NBD server of a backup point (issue 18), measured against its alternatives.

A point of one disk (a quarter each random, text, zeros, random; 4 MiB chunks, zstd) is read
whole by ``nbdcopy`` in 512 KiB requests one at a time, as ``block-stream`` reads it:

- nbdkit + blockctl's Python plugin (decoded-chunk cache) vs the same without the cache
  (every request decodes its chunk): what the cache buys;
- the same server vs ``qemu-nbd`` serving the point already restored to a raw file (QEMU's
  native server, no decoding): what serving straight from the repository costs;
- time until the first byte can be served: the server's start vs a plain ``restore`` of the
  whole disk (what restore-then-boot waits for before the guest can start);
- with a running guest (``bench_live_guest``): from the call until the guest has read its
  disk's first MiB, ``restore_live`` vs a plain ``restore`` to qcow2 then a hot-plug (what a
  user does without live restore), and the time until the live-restored disk stands alone.
  The guest boots from its kernel and initramfs, so a boot costs both sides the same and is
  left out: the VM is up before either clock starts;
- the lost-VM case (``bench_live_launch``): from the call until a VM launched from its
  config has booted, its shell answers and it has read its disk's first MiB,
  ``launch_live`` vs a plain ``restore`` to qcow2 then the same launch. The boot is in both
  sides (it is what the user waits for).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio

from blockctl import GuestImage, LaunchedVM, _binaries, _proc, open_vm
from blockctl import backup as bk
from blockctl._backup.serve import serve_point
from blockctl._backup.store import DiskIndex, DiskPoint, Manifest, Repository, new_point_id
from blockctl._console import GuestConsole
from blockctl._jobs import JobProgress, JobStatus, JobTransition
from blockctl._machine import launch_detached, shutdown_detached
from blockctl._ops import drives
from blockctl.jobs import JobControl
from blockctl.types import Drive, ImageFormat, MachineConfig
from scripts.bench_backup import guest_config, sh
from scripts.bench_common import Row

VM = "bench-live"
REQUEST = 512 << 10


def make_point(root: Path, mib: int) -> tuple[Repository, str]:
    repo = Repository.init(root / "repo")
    size = mib << 20
    index = DiskIndex.empty(size, repo.chunk_size)
    text = (b"blockctl live restore bench " * (repo.chunk_size // 16))[: repo.chunk_size]
    for i in range(index.count):
        quarter = 4 * i // index.count
        if quarter == 2:
            continue  # zeros: not stored
        data = text if quarter == 1 else os.urandom(repo.chunk_size)
        if quarter == 1:
            data = i.to_bytes(8, "big") + data[8:]  # distinct chunks, no dedup
        digest = repo.digest(data)
        repo.write_chunk(digest, data)
        index.put(i, digest)
    repo.sync()
    point = new_point_id()
    repo.begin_point(VM, point)
    repo.write_index(VM, point, "disk0", index)
    disk = DiskPoint(
        device="disk0",
        node="bench",
        virtual_size=size,
        chunk_size=repo.chunk_size,
        disk_digest=index.disk_digest(),
        chunks=index.count,
        zero_chunks=index.count // 4,
        bytes_read=size,
        bytes_new=size,
        bytes_stored=size,
    )
    now = time.time()
    repo.write_manifest(
        Manifest(
            id=point,
            vm=VM,
            kind="full",
            parent=None,
            checkpoint="bench",
            started=now,
            completed=now,
            qemu="bench",
            disks=(disk,),
        )
    )
    return repo, point


async def nbdcopy_seconds(socket: Path) -> float:
    started = time.monotonic()
    await _proc.run(
        [
            "nbdcopy",
            f"--request-size={REQUEST}",
            "--requests=1",
            "--connections=1",
            f"nbd+unix:///?socket={socket}",
            "null:",
        ]
    )
    return time.monotonic() - started


async def served_read(
    repo: Repository, point: str, size: int, work: Path, cache: int | None
) -> float:
    async with serve_point(repo, VM, point, "disk0", work, size=size, cache_chunks=cache) as ex:
        return await nbdcopy_seconds(ex.socket)


async def qemu_nbd_read(raw: Path, work: Path) -> float:
    socket = work / "qemu-nbd.sock"
    log = work / "qemu-nbd.log"
    with open(log, "wb") as out:
        process = await _proc.spawn(
            [
                _binaries.qemu_nbd(),
                "--read-only",
                "--persistent",
                "-f",
                "raw",
                "-k",
                str(socket),
                str(raw),
            ],
            log=out,
        )
    try:
        # qemu-nbd has no readiness signal here: its socket appears once it listens.
        with anyio.fail_after(30):
            while not socket.exists():  # noqa: ASYNC110 - a baseline's start, not timed
                await anyio.sleep(0.01)
        return await nbdcopy_seconds(socket)
    finally:
        await _proc.terminate(process, grace=5.0)
        socket.unlink(missing_ok=True)


async def start_seconds(repo: Repository, point: str, size: int, work: Path) -> float:
    started = time.monotonic()
    async with serve_point(repo, VM, point, "disk0", work, size=size):
        return time.monotonic() - started


async def restore_seconds(repo: Repository, point: str, work: Path) -> float:
    dest = work / "restored.raw"
    dest.unlink(missing_ok=True)
    started = time.monotonic()
    await bk.restore(repo, VM, point, "disk0", dest, ImageFormat.RAW)
    return time.monotonic() - started


async def bench_live(quick: bool, work: Path) -> list[Row]:
    mib = 64 if quick else 512
    reps = 1 if quick else 3
    repo, point = make_point(work, mib)
    size = mib << 20
    cached: list[float] = []
    uncached: list[float] = []
    native: list[float] = []
    starts: list[float] = []
    restores: list[float] = []
    for _ in range(reps):
        cached.append(await served_read(repo, point, size, work, None))
        uncached.append(await served_read(repo, point, size, work, 0))
        restores.append(await restore_seconds(repo, point, work))
        native.append(await qemu_nbd_read(work / "restored.raw", work))
        starts.append(await start_seconds(repo, point, size, work))
    (work / "restored.raw").unlink(missing_ok=True)
    return [
        Row(
            f"live export: read a {mib} MiB point (512 KiB requests), chunk cache",
            "s",
            cached,
            uncached,
            "the same server decoding a chunk per request",
            "<= 1x",
            sorted(cached)[len(cached) // 2] <= sorted(uncached)[len(uncached) // 2],
        ),
        Row(
            f"live export: read a {mib} MiB point from the repository",
            "s",
            cached,
            native,
            "qemu-nbd serving the point restored to raw",
            "note: the cost of decoding (zstd, sha256) and of Python",
        ),
        Row(
            f"live export: first byte servable, {mib} MiB point",
            "s",
            starts,
            restores,
            "plain restore of the whole disk to raw",
            "<= 0.1x",
            sorted(starts)[len(starts) // 2] <= 0.1 * sorted(restores)[len(restores) // 2],
        ),
    ]


#: The guest's first disk (the VM has none of its own), and what reading it means here.
GUEST_DEV = "vda"
FIRST_MIB = (
    f"until [ -b /dev/{GUEST_DEV} ]; do usleep 10000; done; "
    f"dd if=/dev/{GUEST_DEV} bs=1M count=1 iflag=direct 2>/dev/null | sha256sum"
)


async def _unplug_and_remove(vm: LaunchedVM, device_id: str, image: Path) -> None:
    await drives.unplug(vm, device_id)
    await sh(vm, f"while [ -b /dev/{GUEST_DEV} ]; do usleep 10000; done")
    image.unlink()


async def bench_live_guest(guest: GuestImage, quick: bool, work: Path) -> list[Row]:
    """restore_live into a running guest vs restore-then-hot-plug, the same point."""
    mib = 256 if quick else 1024
    reps = 1 if quick else 3
    work = work / "guest"
    work.mkdir()
    repo, point = make_point(work, mib)
    live_read: list[float] = []
    live_total: list[float] = []
    plain_read: list[float] = []
    plain_total: list[float] = []
    async with open_vm(guest_config(guest, "bench-lr")) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        for rep in range(reps):
            target = work / f"live-{rep}.qcow2"
            results: list[bk.LiveRestoreResult] = []
            started = time.monotonic()

            async def restore(target: Path, results: list[bk.LiveRestoreResult]) -> None:
                results.append(
                    await bk.restore_live(
                        vm, repo, VM, point, "disk0", target, control=JobControl(hooks=())
                    )
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(restore, target, results)
                live_sum = await sh(vm, FIRST_MIB)
                live_read.append(time.monotonic() - started)
            live_total.append(time.monotonic() - started)
            await _unplug_and_remove(vm, results[0].device_id, target)

            plain = work / f"plain-{rep}.qcow2"
            started = time.monotonic()
            await bk.restore(repo, VM, point, "disk0", plain, ImageFormat.QCOW2)
            restored = time.monotonic() - started
            info = await drives.hotplug(vm, Drive(file=plain, format=ImageFormat.QCOW2))
            plain_sum = await sh(vm, FIRST_MIB)
            plain_read.append(time.monotonic() - started)
            plain_total.append(restored)
            # Both ways the guest read the point's first MiB (not a number typed here).
            assert live_sum == plain_sum, (live_sum, plain_sum)
            await _unplug_and_remove(vm, info.device_id, plain)
    return [
        Row(
            f"live restore, {mib} MiB point: the guest reads the disk (from the call)",
            "s",
            live_read,
            plain_read,
            "restore to qcow2, then hot-plug, the guest reads it",
            "<= 0.1x",
            sorted(live_read)[len(live_read) // 2]
            <= 0.1 * sorted(plain_read)[len(plain_read) // 2],
        ),
        Row(
            f"live restore, {mib} MiB point: until the disk stands alone",
            "s",
            live_total,
            plain_total,
            "restore to qcow2 (offline)",
            "note: the copy under a running guest, through NBD",
        ),
    ]


class _Running:
    """A job hook: set once the copy runs (the launched VM exists by then)."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.RUNNING:
            self.event.set()

    def on_progress(self, progress: JobProgress) -> None:
        pass


async def _shell_reads_first_mib(console_socket: Path, console_log: Path) -> str:
    """Wait for a detached VM's shell prompt on its console log, then have the guest read its
    disk's first MiB; returns the guest's sha256 of it."""
    while b"guest# " not in (console_log.read_bytes() if console_log.exists() else b""):  # noqa: ASYNC110 - a file has no readiness signal
        await anyio.sleep(0.02)
    stream = await anyio.connect_unix(console_socket)
    console = GuestConsole(stream, "bench-ll")
    try:
        await stream.send(b"exit\n")  # a fresh shell prints the prompt the console waits for
        await console.wait_ready()
        return await console.check(FIRST_MIB, timeout=300)
    finally:
        await console.aclose()


async def _launch(
    config: MachineConfig, repo: Repository, point: str, running: _Running, speed: int | None
) -> None:
    assert config.drives[0].file is not None
    target = Path(config.drives[0].file)
    control = JobControl(speed=speed, hooks=(running,))
    await bk.launch_live(config, repo, VM, point, "disk0", target, control=control)


#: The live side's copy: unlimited, and limited (the copy and the guest's TCG boot share
#: the machine's two cores; a limited copy leaves the boot more of them).
LAUNCH_SPEEDS = (None, 50 << 20)


async def bench_live_launch(guest: GuestImage, quick: bool, work: Path) -> list[Row]:
    """The lost VM: ``launch_live`` (its copy unlimited, and at 50 MiB/s) vs
    restore-then-launch, the same point and config, interleaved in each repetition."""
    from blockctl._runtime import runtime_root

    mib = 256 if quick else 1024
    reps = 1 if quick else 3
    work = work / "launch"
    work.mkdir()
    repo, point = make_point(work, mib)
    live_read: dict[int | None, list[float]] = {speed: [] for speed in LAUNCH_SPEEDS}
    plain_read: list[float] = []
    name = "bench-ll"
    run_dir = runtime_root() / name
    for rep in range(reps):
        sums = set()
        for speed in LAUNCH_SPEEDS:
            target = work / f"live-{rep}.qcow2"
            running = _Running()
            started = time.monotonic()
            try:
                async with anyio.create_task_group() as tg:
                    config = guest_config(guest, name, target)
                    tg.start_soon(_launch, config, repo, point, running, speed)
                    await running.event.wait()
                    sums.add(
                        await _shell_reads_first_mib(
                            run_dir / "console.sock", run_dir / "console.log"
                        )
                    )
                    live_read[speed].append(time.monotonic() - started)
            finally:
                with anyio.CancelScope(shield=True):
                    await shutdown_detached(name)
            target.unlink()

        plain = work / f"plain-{rep}.qcow2"
        started = time.monotonic()
        await bk.restore(repo, VM, point, "disk0", plain, ImageFormat.QCOW2)
        try:
            record = await launch_detached(guest_config(guest, name, plain))
            assert record.console_socket is not None and record.console_log is not None
            sums.add(
                await _shell_reads_first_mib(Path(record.console_socket), Path(record.console_log))
            )
            plain_read.append(time.monotonic() - started)
        finally:
            with anyio.CancelScope(shield=True):
                await shutdown_detached(name)
        plain.unlink()
        # Every way the guest read the point's first MiB (not a number typed here).
        assert len(sums) == 1, sums
    return [
        Row(
            f"live launch, {mib} MiB point, copy "
            f"{'unlimited' if speed is None else f'at {speed >> 20} MiB/s'}: booted, the "
            "guest reads the disk (from the call)",
            "s",
            live_read[speed],
            plain_read,
            "restore to qcow2, then launch, the guest reads it",
            "note: both include the guest's boot",
        )
        for speed in LAUNCH_SPEEDS
    ]
