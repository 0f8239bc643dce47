"""Guest-agent benchmark rows for scripts/bench.py (``quiesce``).

A guest writer appends to a file on ext4 (fsync per write) and logs /proc/uptime after each
write; the longest gap between two writes is the stall the guest sees. A quiesced external
snapshot (freeze → snapshot transaction → thaw) is measured next to a crash-consistent one in
the same VM, alternating, plus the wall time of both calls and the agent's freeze and thaw.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from blockctl import GuestImage, _images, _proc, open_vm
from blockctl._agent import connect_agent
from blockctl._ops import chains
from blockctl.types import Drive, ImageFormat, MachineConfig
from scripts.bench_common import Row

MIB = 1 << 20
WRITER = (
    "( ( while [ ! -e /tmp/stop ]; do dd if=/dev/zero of=/mnt/f bs=4k count=1 conv=notrunc,fsync "
    "2>/dev/null; read u _ < /proc/uptime; echo $u >> /tmp/t; done; touch /tmp/done ) "
    ">/dev/null 2>&1 & )"
)
# busybox date has no %N: /proc/uptime gives 10 ms resolution, enough for stalls.
# Wait (in the guest, bounded by the console's timeout) until the writer logged N more writes.
MORE = "n=$(wc -l < /tmp/t); until [ $(wc -l < /tmp/t) -ge $((n + {})) ]; do usleep 10000; done"
GAPS = "awk 'NR>1{g=$1-p; if(g>m)m=g} {p=$1} END{print m*1000}' /tmp/t"


async def bench_quiesce(guest: GuestImage, reps: int, cycles: int, work: Path) -> list[Row]:
    raw = work / "q.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MIB)
    await _proc.run(["mkfs.ext4", "-q", "-F", str(raw)])
    disk = work / "q.qcow2"
    await _images.convert(raw, ImageFormat.RAW, disk, ImageFormat.QCOW2)
    raw.unlink()
    config = MachineConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        drives=(Drive(file=disk, format=ImageFormat.QCOW2),),
        guest_agent=True,
    )
    stall: dict[bool, list[float]] = {True: [], False: []}
    wall: dict[bool, list[float]] = {True: [], False: []}
    freeze: list[float] = []
    thaw: list[float] = []
    ping: list[float] = []
    # The frozen window (freeze reply → thaw reply) is what blockctl logs with the thaw.
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with capture_logs() as logs:
            await _run(config, reps, cycles, work, stall, wall, freeze, thaw, ping)
    finally:
        structlog.configure(**saved)
    frozen_ms = [
        float(e["frozen_ms"])
        for e in logs
        if e["event"] == "blockctl.agent.thaw" and e["frozen_ms"]
    ]
    return [
        Row(
            "guest write stall, quiesced external snapshot (longest gap)",
            "ms",
            stall[True],
            stall[False],
            "longest gap, crash-consistent snapshot",
        ),
        Row(
            "external snapshot call, quiesced (freeze+transaction+thaw)",
            "ms",
            wall[True],
            wall[False],
            "crash-consistent snapshot call",
        ),
        Row(
            "guest frozen during a quiesced snapshot (freeze→thaw)",
            "ms",
            frozen_ms,
            wall[False],
            "crash-consistent snapshot call",
        ),
        Row("qemu-ga guest-fsfreeze-freeze (ext4, idle)", "ms", freeze, ping, "qemu-ga ping"),
        Row("qemu-ga guest-fsfreeze-thaw", "ms", thaw, ping, "qemu-ga ping"),
    ]


async def _run(
    config: MachineConfig,
    reps: int,
    cycles: int,
    work: Path,
    stall: dict[bool, list[float]],
    wall: dict[bool, list[float]],
    freeze: list[float],
    thaw: list[float],
    ping: list[float],
) -> None:
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        await vm.console.check("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
        async with connect_agent(vm, timeout=30):  # wait until the agent answers
            pass
        for rep in range(reps):
            for quiesce in (False, True):
                await vm.console.check("rm -f /tmp/t /tmp/stop /tmp/done")
                await vm.console.check(WRITER)
                await vm.console.check(
                    "until [ $(wc -l < /tmp/t 2>/dev/null || echo 0) -ge 3 ]; do usleep 10000; done"
                )
                started = time.perf_counter()
                await chains.external_snapshot(
                    vm, f"{'q' if quiesce else 'c'}{rep}", work, quiesce=quiesce
                )
                wall[quiesce].append((time.perf_counter() - started) * 1000)
                await vm.console.check(MORE.format(3))
                await vm.console.check(
                    "touch /tmp/stop; until [ -e /tmp/done ]; do usleep 10000; done"
                )
                stall[quiesce].append(float(await vm.console.check(GAPS)))
        async with connect_agent(vm) as ga:
            for _ in range(cycles):
                started = time.perf_counter()
                await ga.ping()
                ping.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await ga.fsfreeze_freeze()
                freeze.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await ga.fsfreeze_thaw()
                thaw.append((time.perf_counter() - started) * 1000)
        await vm.console.check("umount /mnt")
