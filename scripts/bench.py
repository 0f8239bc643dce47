#!/usr/bin/env python3
"""blockctl benchmarks: each row measured next to its baseline in the same run.

    scripts/bench [--quick] [--json FILE] [BENCHMARK ...]

Benchmarks: qmp (a QMP round trip through blockctl vs raw qemu.qmp), hotplug (attach until the
guest sees the disk, detach until DEVICE_DELETED and the nodes are gone, vs the same QMP steps
sent with raw qemu.qmp), backup (repository v2 vs the raw QMP incremental, qemu-img convert, cat
and zstd: scripts/bench_backup.py), live (live restore's NBD server of a backup point:
scripts/bench_live.py), live-launch (a VM launched from a point vs restore-then-launch: the
same file), cli (the command line's start-up: scripts/bench_cli.py), fleet (a
fleet backup of 12 VMs on Temporal vs the same backups from one event loop:
scripts/bench_fleet.py), and more in bench_more and bench_agent. The machines are
shared and noisy: read the ratios, not the absolute times. Exits non-zero if a benchmark breaks
(never because the machine is slow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockctl import LaunchedVM, _binaries, _images, _proc, build_guest, find_guest, open_vm
from blockctl._images import create
from blockctl._ops import chains, drives
from blockctl.jobs import JobControl
from blockctl.types import Drive, ImageFormat, MachineConfig
from scripts import (
    bench_agent,
    bench_backup,
    bench_cli,
    bench_clients,
    bench_fleet,
    bench_live,
    bench_more,
)
from scripts.bench_common import Row


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return (time.perf_counter() - start) * 1000


async def raw_client(vm: LaunchedVM) -> QMPClient:
    client = QMPClient("bench-raw")
    await client.connect(str(vm.monitor_path))  # the VM's second monitor: same QEMU
    return client


async def bench_qmp(vm: LaunchedVM, reps: int) -> list[Row]:
    raw = await raw_client(vm)
    try:
        mine = [await timed(vm.block_devices) for _ in range(reps)]
        base = [await timed(lambda: raw.execute("query-block")) for _ in range(reps)]
        mine_status = [await timed(vm.status) for _ in range(reps)]
        base_status = [await timed(lambda: raw.execute("query-status")) for _ in range(reps)]
    finally:
        await raw.disconnect()
    return [
        Row("query-block round trip (parsed)", "ms", mine, base, "raw qemu.qmp execute"),
        Row(
            "query-status round trip (parsed)",
            "ms",
            mine_status,
            base_status,
            "raw qemu.qmp execute",
        ),
    ]


async def guest_sees(vm: LaunchedVM, dev: str, present: bool) -> None:
    assert vm.console is not None
    test = f"[ -b /dev/{dev} ]" if present else f"[ ! -b /dev/{dev} ]"
    await vm.console.check(
        f"i=0; until {test}; do usleep 5000; i=$((i+1)); [ $i -gt 2000 ] && exit 1; done; true"
    )


async def bench_hotplug(vm: LaunchedVM, reps: int, images: Path) -> list[Row]:
    image = images / "hp.qcow2"
    await create(image, ImageFormat.QCOW2, size=64 << 20)
    raw = await raw_client(vm)
    attach_mine, detach_mine, attach_raw, detach_raw = [], [], [], []
    try:
        for _ in range(reps):
            start = time.perf_counter()
            info = await drives.hotplug(vm, Drive(file=image, format=ImageFormat.QCOW2))
            await guest_sees(vm, "vda", True)
            attach_mine.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            result = await drives.unplug(vm, info.device_id)
            detach_mine.append((time.perf_counter() - start) * 1000)
            assert result.state is drives.UnplugState.REMOVED
            await guest_sees(vm, "vda", False)

            start = time.perf_counter()
            await raw.execute(
                "blockdev-add", {"driver": "file", "node-name": "raw-file", "filename": str(image)}
            )
            await raw.execute(
                "blockdev-add", {"driver": "qcow2", "node-name": "raw-fmt", "file": "raw-file"}
            )
            await raw.execute(
                "device_add", {"driver": "virtio-blk-pci", "id": "rawdev", "drive": "raw-fmt"}
            )
            await guest_sees(vm, "vda", True)
            attach_raw.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            with raw.listener("DEVICE_DELETED") as listener:
                await raw.execute("device_del", {"id": "rawdev"})
                while True:
                    data = (await listener.get())["data"]
                    if isinstance(data, dict) and data.get("device") == "rawdev":
                        break
            await raw.execute("blockdev-del", {"node-name": "raw-fmt"})
            await raw.execute("blockdev-del", {"node-name": "raw-file"})
            detach_raw.append((time.perf_counter() - start) * 1000)
            await guest_sees(vm, "vda", False)
    finally:
        await raw.disconnect()
    return [
        Row(
            "hot-plug: attach until the guest sees /dev/vda",
            "ms",
            attach_mine,
            attach_raw,
            "raw qemu.qmp: 2x blockdev-add + device_add",
        ),
        Row(
            "hot-unplug: detach until DEVICE_DELETED + nodes deleted",
            "ms",
            detach_mine,
            detach_raw,
            "raw qemu.qmp: device_del, event, 2x blockdev-del",
        ),
    ]


async def make_chain(directory: Path, name: str, mib: int) -> Path:
    """base.raw full of random data, top.qcow2 with half of it rewritten."""
    base, top = directory / f"{name}-base.raw", directory / f"{name}-top.qcow2"
    with open(base, "wb") as f:
        for _ in range(mib // 16):
            f.write(os.urandom(16 << 20))
    await create(top, ImageFormat.QCOW2, backing=base, backing_format=ImageFormat.RAW)
    await _proc.run(
        [_binaries.qemu_io(), "-f", "qcow2", "-c", f"write -P 0x5a 0 {mib // 2}M", str(top)]
    )
    return top


async def bench_chains(reps: int, mib: int, images: Path) -> list[Row]:
    """Commit and stream inside a running QEMU vs qemu-img on an identical chain."""
    commit_mine, commit_base, stream_mine, stream_base = [], [], [], []
    for rep in range(reps):
        ours_top = await make_chain(images, f"c{rep}a", mib)
        theirs_top = await make_chain(images, f"c{rep}b", mib)
        config = MachineConfig(drives=(Drive(file=ours_top, format=ImageFormat.QCOW2),))
        async with open_vm(config, console=False) as vm:
            start = time.perf_counter()
            await chains.commit(vm, "disk0", control=JobControl(hooks=()))
            commit_mine.append(mib / (time.perf_counter() - start))
        start = time.perf_counter()
        await _images.commit(theirs_top, ImageFormat.QCOW2)
        commit_base.append(mib / (time.perf_counter() - start))

        ours_top = await make_chain(images, f"s{rep}a", mib)
        theirs_top = await make_chain(images, f"s{rep}b", mib)
        config = MachineConfig(drives=(Drive(file=ours_top, format=ImageFormat.QCOW2),))
        async with open_vm(config, console=False) as vm:
            start = time.perf_counter()
            await chains.stream(vm, "disk0", control=JobControl(hooks=()))
            stream_mine.append(mib / (time.perf_counter() - start))
        start = time.perf_counter()
        await _images.convert(
            theirs_top, ImageFormat.QCOW2, images / f"s{rep}-flat.qcow2", ImageFormat.QCOW2
        )
        stream_base.append(mib / (time.perf_counter() - start))
        for leftover in images.glob("*"):
            leftover.unlink()
    return [
        Row(
            f"active commit {mib} MiB chain (MiB/s, higher is better)",
            "MB/s",
            commit_mine,
            commit_base,
            "qemu-img commit (offline, same chain)",
        ),
        Row(
            f"stream {mib} MiB chain (MiB/s, higher is better)",
            "MB/s",
            stream_mine,
            stream_base,
            "qemu-img convert -O qcow2 (offline, same chain)",
        ),
    ]


BENCHMARKS = (
    "qmp",
    "launch",
    "hotplug",
    "chains",
    "backup",
    "live",
    "live-launch",
    "stall",
    "scale",
    "quiesce",
    "clients",
    "fleet",
    "cli",
)


def render(rows: list[Row]) -> str:
    width = max([58, *(len(r.operation) for r in rows)])
    head = (
        f"{'operation':<{width}} {'blockctl':>10} {'baseline':>10} {'ratio':>6} "
        f"{'reps':>5}  {'goal':<16} blockctl min/median/max"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        data = row.to_json()
        mine, base = data["blockctl_stats"], data["baseline_stats"]
        assert isinstance(mine, dict) and isinstance(base, dict)
        goal = row.goal + ("" if row.met is None else " met" if row.met else " MISSED")
        lines.append(
            f"{row.operation:<{width}} {mine['median']:>8.2f}{row.unit:<2} "
            f"{base['median']:>8.2f}{row.unit:<2} {data['ratio_median']:>6.2f} "
            f"{data['reps']:>5}  {goal:<16} "
            f"{mine['min']:.2f}/{mine['median']:.2f}/{mine['max']:.2f}"
        )
    lines.append("baselines: " + "; ".join(sorted({f"{r.baseline_name}" for r in rows})))
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    selected = args.benchmarks or list(BENCHMARKS)
    unknown = set(selected) - set(BENCHMARKS)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="blockctl-bench-") as tmp:
        if {"qmp", "hotplug"} & set(selected):
            guest = find_guest()
            config = MachineConfig(kernel=guest.kernel, initrd=guest.initrd, append=guest.append)
            async with open_vm(config) as vm:
                assert vm.console is not None
                await vm.console.wait_ready()
                if "qmp" in selected:
                    rows += await bench_qmp(vm, 50 if args.quick else 500)
                if "hotplug" in selected:
                    rows += await bench_hotplug(vm, 2 if args.quick else 10, Path(tmp))
        if "chains" in selected:
            chain_dir = Path(tmp) / "chains"
            chain_dir.mkdir()
            rows += await bench_chains(1 if args.quick else 3, 64 if args.quick else 256, chain_dir)
        work = Path(tmp) / "more"
        work.mkdir()
        if "launch" in selected:
            rows += await bench_more.bench_launch(find_guest(), 2 if args.quick else 5)
        if "backup" in selected:
            backup_dir = Path(tmp) / "backup"
            backup_dir.mkdir()
            backup_rows, backup_notes = await bench_backup.bench_backup(
                find_guest(), args.quick, backup_dir
            )
            rows += backup_rows
            notes += backup_notes
        if "live" in selected:
            live_dir = Path(tmp) / "live"
            live_dir.mkdir()
            rows += await bench_live.bench_live(args.quick, live_dir)
            rows += await bench_live.bench_live_guest(find_guest(), args.quick, live_dir)
        if "live-launch" in selected:
            launch_dir = Path(tmp) / "live-launch"
            launch_dir.mkdir()
            rows += await bench_live.bench_live_launch(find_guest(), args.quick, launch_dir)
        if "stall" in selected:
            rows += await bench_more.bench_snapshot_stall(
                find_guest(), 1 if args.quick else 5, work
            )
        if "scale" in selected:
            rows += await bench_more.bench_scale((1, 2) if args.quick else (1, 8, 32), work)
        if "quiesce" in selected:
            # The guest with qemu-ga: cached, built only when missing.
            rows += await bench_agent.bench_quiesce(
                await build_guest(agent=True), 1 if args.quick else 5, 3 if args.quick else 20, work
            )
        if "clients" in selected:
            rows += await bench_clients.bench_clients(find_guest(), 1 if args.quick else 4, work)
        if "fleet" in selected:
            fleet_dir = Path(tmp) / "fleet"
            fleet_dir.mkdir()
            fleet_rows, fleet_notes = await bench_fleet.bench_fleet(
                1 if args.quick else 3, fleet_dir
            )
            rows += fleet_rows
            notes += fleet_notes
        if "cli" in selected:
            cli_dir = Path(tmp) / "cli"
            cli_dir.mkdir()
            cli_rows, cli_notes = await anyio.to_thread.run_sync(
                bench_cli.bench_cli, 5 if args.quick else 30, cli_dir
            )
            rows += cli_rows
            notes += cli_notes
    print(render(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help="qmp, launch, hotplug, chains, backup, live, live-launch, stall, scale, quiesce, "
        "clients, fleet, cli (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions (CI smoke)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    sys.exit(anyio.run(main, parser.parse_args(), backend="asyncio"))
