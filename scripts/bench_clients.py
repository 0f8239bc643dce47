"""Many-clients benchmark rows for scripts/bench.py (``clients``, issue 14).

A named VM with a 64 MiB top layer; a second client attached through the VM's pool of QMP
monitors (``attach(name)``, as another ``blockctl`` process would) times ``query-status``
round trips and whole attaches (take a monitor, greeting, capabilities, query-status,
release) while the launcher runs a rate-limited commit, against the same on the idle VM; and
``query-status`` round trips while the launcher runs a rate-limited backup (the fleecing job in
QEMU, the copy read through QEMU's NBD export, both in QEMU's main loop).
The goal of issue 14 is at most 1.2x (QEMU serializes the commands of all monitors in its main
loop; the commit's I/O runs there too).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import anyio
import anyio.abc
from qemu.qmp import QMPClient

from blockctl import GuestImage, _binaries, _images, _monitors, _proc, attach, backup, open_vm
from blockctl._jobs import JobProgress, JobStatus, JobTransition
from blockctl._ops import chains
from blockctl._qmp import wire
from blockctl.jobs import JobControl
from blockctl.types import Drive, ImageFormat, MachineConfig
from scripts.bench_common import Row

MIB = 1 << 20


class _Running:
    def __init__(self) -> None:
        self.event = anyio.Event()

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.RUNNING:
            self.event.set()

    def on_progress(self, progress: JobProgress) -> None:
        pass


class _Copying(_Running):
    """Set once a backup has read its first bytes through the NBD export (its copy runs);
    ``copied`` says whether it has read everything."""

    copied = False

    def on_transition(self, transition: JobTransition) -> None:
        pass

    def on_progress(self, progress: JobProgress) -> None:
        if progress.done:
            self.event.set()
        self.copied = progress.done >= progress.total


async def _status_rtts(name: str, reps: int) -> list[float]:
    times = []
    async with attach(name) as vm:
        for _ in range(reps):
            start = time.perf_counter()
            await vm.status()
            times.append((time.perf_counter() - start) * 1000)
    return times


async def _attach_times(name: str, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        async with attach(name) as vm:
            await vm.status()
        times.append((time.perf_counter() - start) * 1000)
    return times


async def _relay_vs_direct(
    pool: tuple[Path, ...], work: Path, reps: int
) -> tuple[list[float], list[float]]:
    """``query-status`` through a byte relay (the least a multiplexing daemon adds: one more
    hop per command) vs straight to a monitor, both with raw qemu.qmp."""
    relay_path = work / "relay.sock"
    leases = [await _monitors.take(pool, vm="bench", timeout=10) for _ in range(2)]
    try:

        async def pipe(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                async for chunk in src:
                    await dst.send(chunk)

        async def serve(client: anyio.abc.SocketStream) -> None:
            upstream = await anyio.connect_unix(str(leases[0].socket))
            async with client, upstream, anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, upstream)
                await pipe(upstream, client)
                tg.cancel_scope.cancel()

        listener = await anyio.create_unix_listener(relay_path)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            relayed, direct = QMPClient("relayed"), QMPClient("direct")
            await relayed.connect(str(relay_path))
            await direct.connect(str(leases[1].socket))
            via_relay, straight = [], []
            for _ in range(reps):
                start = time.perf_counter()
                await relayed.execute("query-status")
                via_relay.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                await direct.execute("query-status")
                straight.append((time.perf_counter() - start) * 1000)
            await relayed.disconnect()
            await direct.disconnect()
            tg.cancel_scope.cancel()
        return via_relay, straight
    finally:
        for lease in leases:
            lease.release()


async def bench_clients(guest: GuestImage, reps: int, work: Path) -> list[Row]:
    base, top = work / "cl-base.qcow2", work / "cl-top.qcow2"
    await _images.create(base, ImageFormat.QCOW2, size=128 * MIB)
    await _images.create(top, ImageFormat.QCOW2, backing=base, backing_format=ImageFormat.QCOW2)
    await _proc.run([_binaries.qemu_io(), "-f", "qcow2", "-c", "write -P 0x5a 0 64M", str(top)])
    config = MachineConfig(
        name="bench-clients",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        drives=(Drive(file=top, format=ImageFormat.QCOW2),),
    )
    async with open_vm(config, console=False) as vm:
        via_relay, straight = await _relay_vs_direct(vm.pool, work, reps * 50)
        idle_status = await _status_rtts(vm.name, reps * 50)
        idle_attach = await _attach_times(vm.name, reps * 5)
        running = _Running()
        async with anyio.create_task_group() as tg:

            async def commit() -> None:
                # 64 MiB at 8 MiB/s: 8 s, longer than the measurements below.
                await chains.commit(
                    vm, "disk0", control=JobControl(speed=8 * MIB, hooks=(running,))
                )

            tg.start_soon(commit)
            await running.event.wait()
            busy_status = await _status_rtts(vm.name, reps * 50)
            busy_attach = await _attach_times(vm.name, reps * 5)
            jobs = await wire.query_jobs(vm.session)
            if not jobs or jobs[0].status in (JobStatus.CONCLUDED, JobStatus.NULL):
                raise RuntimeError("the commit ended before the measurements: not comparable")
            await wire.block_job_set_speed(vm.session, jobs[0].id, 0)  # finish quickly
        repo = backup.init_repository(work / "cl-repo")
        backing_up = _Copying()
        async with anyio.create_task_group() as tg:

            async def full_backup() -> None:
                # 64 MiB at 8 MiB/s: 8 s, longer than the measurements below.
                await backup.create(
                    vm, repo, kind="full", control=JobControl(speed=8 * MIB, hooks=(backing_up,))
                )

            tg.start_soon(full_backup)
            await backing_up.event.wait()
            backup_status = await _status_rtts(vm.name, reps * 50)
            if backing_up.copied:
                raise RuntimeError("the backup ended before the measurements: not comparable")
    for leftover in (base, top):
        leftover.unlink(missing_ok=True)
    during_backup = Row(
        "query-status, 2nd client, during a backup (8 MiB/s)",
        "ms",
        backup_status,
        idle_status,
        "the same on the idle VM",
        goal="<= 1.2x",
    )
    during_backup.met = during_backup.ratio() <= 1.2
    return [
        Row(
            "query-status, 2nd client, during a commit (8 MiB/s)",
            "ms",
            busy_status,
            idle_status,
            "the same on the idle VM",
        ),
        during_backup,
        Row(
            "attach (pool monitor) + query-status, during a commit",
            "ms",
            busy_attach,
            idle_attach,
            "the same on the idle VM",
        ),
        Row(
            "query-status through a relay (a daemon's extra hop), idle",
            "ms",
            via_relay,
            straight,
            "straight to a pool monitor (raw qemu.qmp)",
        ),
    ]


if __name__ == "__main__":  # standalone: python scripts/bench_clients.py [--quick]
    import logging
    import sys
    import tempfile

    import structlog

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from blockctl import find_guest

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    async def _main() -> None:
        with tempfile.TemporaryDirectory(prefix="blockctl-bench-") as tmp:
            rows = await bench_clients(find_guest(), 1 if "--quick" in sys.argv else 4, Path(tmp))
        for row in rows:
            data = row.to_json()
            goal = row.goal + ("" if row.met is None else " met" if row.met else " MISSED")
            mine, base = data["blockctl_stats"], data["baseline_stats"]
            assert isinstance(mine, dict) and isinstance(base, dict)
            print(
                f"{row.operation:<58} {mine['median']:8.2f} ms  idle {base['median']:8.2f} ms  "
                f"ratio {data['ratio_median']:.2f}  reps {data['reps']}  "
                f"p99 {mine['p99']:.2f} / {base['p99']:.2f}  {goal}"
            )

    anyio.run(_main)
