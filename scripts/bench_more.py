"""More benchmark rows for scripts/bench.py: launch, snapshot stall, scale (backup: bench_backup).

Each function returns rows measured next to their baseline in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import tempfile
import time
from pathlib import Path

import anyio
from qemu.qmp import QMPClient

from blockctl import GuestImage, _binaries, _images, open_vm
from blockctl._ops import chains
from blockctl.jobs import JobControl
from blockctl.types import Drive, ImageFormat, MachineConfig
from scripts.bench_common import Row

MIB = 1 << 20


def guest_config(guest: GuestImage, *drives: Drive, name: str | None = None) -> MachineConfig:
    return MachineConfig(
        name=name, kernel=guest.kernel, initrd=guest.initrd, append=guest.append, drives=drives
    )


async def bench_launch(guest: GuestImage, reps: int) -> list[Row]:
    """Launch until QMP answers, and until the guest shell answers: blockctl vs QEMU started by
    hand (same machine options, QMP and serial on server sockets, connect with retries)."""
    qmp_mine, shell_mine, qmp_raw, shell_raw = [], [], [], []
    for _ in range(reps):
        start = time.perf_counter()
        async with open_vm(guest_config(guest)) as vm:
            await vm.status()
            qmp_mine.append((time.perf_counter() - start) * 1000)
            assert vm.console is not None
            await vm.console.wait_ready()
            await vm.console.check("true")
            shell_mine.append((time.perf_counter() - start) * 1000)
        a, b = await raw_launch(guest)
        qmp_raw.append(a)
        shell_raw.append(b)
    return [
        Row("launch until QMP answers", "ms", qmp_mine, qmp_raw, "QEMU by hand + QMP connect"),
        Row(
            "launch until the guest shell answers",
            "ms",
            shell_mine,
            shell_raw,
            "QEMU by hand + serial socket",
        ),
    ]


async def raw_launch(guest: GuestImage) -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="raw-", dir="/tmp"))
    qmp, serial = tmp / "q.sock", tmp / "s.sock"
    # The same machine, with the monitors on plain server sockets instead of fds.
    argv = [
        _binaries.qemu_system(),
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "256M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        guest.append,
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-chardev",
        f"socket,id=s0,path={serial},server=on,wait=off",
        "-serial",
        "chardev:s0",
    ]
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        client = QMPClient("raw")
        while True:  # what a raw user does: retry until the socket exists
            try:
                await client.connect(str(qmp))
                break
            except Exception:
                await anyio.sleep(0.005)
        await client.execute("query-status")
        qmp_ms = (time.perf_counter() - start) * 1000
        stream = await anyio.connect_unix(str(serial))
        seen = b""
        while b"guest# " not in seen:
            seen += await stream.receive()
        await stream.send(b"echo RAW-$((40+2))\n")  # the echoed line shows the sum unexpanded
        while b"RAW-42" not in seen:
            seen += await stream.receive()
        shell_ms = (time.perf_counter() - start) * 1000
        await stream.aclose()
        await client.execute("quit")
        with contextlib.suppress(EOFError):  # QEMU closes the socket as it quits
            await client.disconnect()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return qmp_ms, shell_ms


async def bench_snapshot_stall(guest: GuestImage, reps: int, work: Path) -> list[Row]:
    """Longest gap between a guest writer's writes during a 2-disk atomic snapshot, vs the
    longest gap over the same span with no snapshot."""
    disks = []
    for n in range(2):
        disk = work / f"s{n}.qcow2"
        await _images.create(disk, ImageFormat.QCOW2, size=64 * MIB)
        disks.append(Drive(file=disk, format=ImageFormat.QCOW2))
    mine: list[float] = []
    quiet: list[float] = []
    async with open_vm(guest_config(guest, *disks)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        writer = (
            "( while [ ! -e /tmp/stop ]; do dd if=/dev/zero of=/dev/vda bs=4k count=1 "
            "oflag=direct conv=notrunc 2>/dev/null; read u _ < /proc/uptime; echo $u >> /tmp/t; "
            "done; "
            "touch /tmp/done ) &"
        )
        # busybox date has no %N: /proc/uptime gives 10 ms resolution, enough for stalls.
        gaps = "awk 'NR>1{g=$1-p; if(g>m)m=g} {p=$1} END{print m*1000}' /tmp/t"
        for rep in range(reps):
            for phase in ("quiet", "snapshot"):
                await vm.console.check("rm -f /tmp/t /tmp/stop /tmp/done")
                await vm.console.check(writer)
                await vm.console.check("until [ -s /tmp/t ]; do usleep 1000; done")
                if phase == "snapshot":
                    await chains.external_snapshot(vm, f"b{rep}", work)
                else:
                    await anyio.sleep(0.2)
                await vm.console.check(
                    "touch /tmp/stop; until [ -e /tmp/done ]; do usleep 1000; done"
                )
                gap = float(await vm.console.check(gaps))
                (mine if phase == "snapshot" else quiet).append(gap)
    return [
        Row(
            "guest write stall during a 2-disk atomic snapshot (longest gap)",
            "ms",
            mine,
            quiet,
            "longest gap with no snapshot",
        )
    ]


async def bench_scale(counts: tuple[int, ...], work: Path) -> list[Row]:
    """N VMs driven concurrently from one event loop: a snapshot + active commit round on all
    of them. Rows: wall time per VM, controller CPU per VM, controller RSS (baseline: N=1)."""
    per_vm_wall: dict[int, float] = {}
    per_vm_cpu: dict[int, float] = {}
    rss: dict[int, float] = {}
    for count in counts:
        configs = []
        for i in range(count):
            disk = work / f"n{count}-{i}.qcow2"
            await _images.create(disk, ImageFormat.QCOW2, size=16 * MIB)
            configs.append(
                MachineConfig(memory_mib=64, drives=(Drive(file=disk, format=ImageFormat.QCOW2),))
            )
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()

        async def one_vm(cfg: MachineConfig, tag: str) -> None:
            # Each VM lives in its own task (its cancel scopes stay in one task).
            async with open_vm(cfg, console=False) as vm:
                await chains.external_snapshot(vm, tag, work)
                await chains.commit(vm, "disk0", delete_files=True, control=JobControl(hooks=()))

        async with anyio.create_task_group() as tg:
            for i, cfg in enumerate(configs):
                tg.start_soon(one_vm, cfg, f"r{count}x{i}")
        wall = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        per_vm_wall[count] = wall / count
        per_vm_cpu[count] = cpu / count
        rss[count] = cpu1.ru_maxrss / 1024
    base = counts[0]
    return (
        [
            Row(
                f"{n} VMs: launch + snapshot + commit, wall per VM",
                "s",
                [per_vm_wall[n]],
                [per_vm_wall[base]],
                f"{base} VM",
            )
            for n in counts[1:]
        ]
        + [
            Row(
                f"{n} VMs: controller CPU per VM",
                "s",
                [per_vm_cpu[n]],
                [per_vm_cpu[base]],
                f"{base} VM",
            )
            for n in counts[1:]
        ]
        + [
            Row(f"{n} VMs: controller max RSS", "MB", [rss[n]], [rss[base]], f"{base} VM")
            for n in counts[1:]
        ]
    )
