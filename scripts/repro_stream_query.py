"""Reproduce QEMU's segfault at ``query-named-block-nodes`` around a stream job's end.

No guest and no blockctl: a firmware-idle QEMU, a qcow2 over raw over an NBD client of
nbdkit (a live restore's chain), hot-plugged as virtio-blk; ``block-stream`` (auto-dismiss
off, as blockctl starts it), then ``query-named-block-nodes`` sent:

  --mode window   once, after the job's JOB_STATUS_CHANGE to concluded, before job-dismiss
  --mode hammer   in a loop from the stream's start until it is dismissed
  --guard         each query preceded by query-jobs and skipped while a stream job is
                  concluded (blockctl's rule, ``wire._named_block_nodes``)
  --auto-dismiss  the stream started with auto-dismiss on
  --pending       the stream started with auto-finalize off and auto-dismiss on, and
                  finalized (job-finalize) once PENDING (blockctl's streams since then)

Each run's QEMU exit is reported; a crash keeps its core, QMP log and output under
DIR/crash-N (gdb -batch -ex bt QEMU-BINARY DIR/crash-N/core). Exit 1 if QEMU crashed.

    python scripts/repro_stream_query.py --runs 10 --mode window
    python scripts/repro_stream_query.py --runs 20 --mode hammer --guard \\
        --qemu ~/.cache/blockctl/qemu-10.0.2/bin/qemu-system-x86_64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class Monitor:
    """A minimal QMP client: commands by id, events kept in arrival order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict[str, Any]] = []
        self.arrived = asyncio.Condition()
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.sent = 0
        self.log: list[str] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                line = await self.reader.readline()
            except ConnectionError:
                line = b""
            if not line:
                for waiter in self.waiting.values():
                    if not waiter.done():
                        waiter.set_exception(ConnectionError("QMP closed"))
                async with self.arrived:
                    self.arrived.notify_all()
                return
            message = json.loads(line)
            if "event" in message:
                self.log.append(f"{time.monotonic():.3f} {message['event']} {message.get('data')}")
                async with self.arrived:
                    self.events.append(message)
                    self.arrived.notify_all()
            elif "id" in message:
                self.waiting.pop(message["id"]).set_result(message)

    async def command(self, name: str, args: dict[str, Any] | None = None) -> Any:
        self.sent += 1
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[self.sent] = reply
        message: dict[str, Any] = {"execute": name, "id": self.sent}
        if args is not None:
            message["arguments"] = args
        self.log.append(f"{time.monotonic():.3f} -> {name}")
        self.writer.write(json.dumps(message).encode() + b"\n")
        answer = await reply
        if "error" in answer:
            raise RuntimeError(f"{name}: {answer['error']}")
        return answer.get("return")

    async def job_status(self, job: str, status: str) -> None:
        async with self.arrived:
            while True:
                for event in self.events:
                    data = event.get("data", {})
                    if event["event"] == "JOB_STATUS_CHANGE" and data == {
                        "id": job,
                        "status": status,
                    }:
                        return
                if self.task.done():
                    raise ConnectionError("QMP closed")
                await self.arrived.wait()


async def query_nodes(qmp: Monitor, guard: bool) -> bool:
    """One query-named-block-nodes; False when the guard held it back."""
    if guard:
        jobs = await qmp.command("query-jobs")
        if any(j["type"] == "stream" and j["status"] == "concluded" for j in jobs):
            return False
    await qmp.command("query-named-block-nodes", {"flat": True})
    return True


async def hammer(qmp: Monitor, guard: bool, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if not await query_nodes(qmp, guard):
            await asyncio.sleep(0.01)


async def scenario(qmp: Monitor, args: argparse.Namespace, socket: Path, target: Path) -> None:
    await qmp.command("qmp_capabilities")
    await qmp.command(
        "blockdev-add",
        {
            "driver": "nbd",
            "node-name": "bclr-0-nbd",
            "server": {"type": "unix", "path": str(socket)},
            "read-only": True,
            "reconnect-delay": 10,
        },
    )
    await qmp.command(
        "blockdev-add",
        {"driver": "raw", "node-name": "bclr-0", "file": "bclr-0-nbd", "read-only": True},
    )
    await qmp.command(
        "blockdev-add", {"driver": "file", "node-name": "target-file", "filename": str(target)}
    )
    await qmp.command(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "target", "file": "target-file", "backing": "bclr-0"},
    )
    await qmp.command("device_add", {"driver": "virtio-blk-pci", "drive": "target", "id": "d0"})
    dismiss = args.auto_dismiss or args.pending
    stream = {"job-id": "j", "device": "target", "auto-dismiss": dismiss}
    if args.pending:
        stream["auto-finalize"] = False
    await qmp.command("block-stream", stream)
    stop = asyncio.Event()
    loop = asyncio.create_task(hammer(qmp, args.guard, stop)) if args.mode == "hammer" else None
    try:
        if args.pending:
            await qmp.job_status("j", "pending")
            if args.mode == "window":
                await query_nodes(qmp, args.guard)
            await qmp.command("query-jobs")
            await qmp.command("job-finalize", {"id": "j"})
        await qmp.job_status("j", "concluded")
        if not dismiss:
            if args.mode == "window":
                await query_nodes(qmp, args.guard)
            await qmp.command("query-jobs")
            await qmp.command("job-dismiss", {"id": "j"})
        await qmp.job_status("j", "null")
    finally:
        stop.set()
        if loop is not None:
            with contextlib.suppress(ConnectionError):
                await loop
    await qmp.command("blockdev-del", {"node-name": "bclr-0"})
    await qmp.command("blockdev-del", {"node-name": "bclr-0-nbd"})
    await query_nodes(qmp, args.guard)
    await qmp.command("quit")


def wait_for(path: Path) -> None:
    for _ in range(1000):
        if path.exists():
            return
        time.sleep(0.01)
    raise SystemExit(f"{path} never appeared")


def spawn(
    args: argparse.Namespace, work: Path, image: Path
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """nbdkit serving ``image`` and a firmware-idle QEMU waiting for its QMP client."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(  # noqa: S603 (fixed argv, the operator's own paths)
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            str(work / "target.qcow2"),
            f"{args.size_mib}M",
        ],
        check=True,
    )
    nbdkit = subprocess.Popen(  # noqa: S603
        ["nbdkit", "-f", "-r", "--unix", str(work / "nbd.sock"), "file", f"file={image}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Core dumps for QEMU only (the kernel's core_pattern decides where they go: "core" in
    # the working directory on this machine).
    qemu = subprocess.Popen(  # noqa: S603
        [
            "sh",
            "-c",
            'ulimit -c unlimited; exec "$0" "$@"',
            args.qemu,
            *("-machine", "pc", "-nodefaults", "-display", "none", "-accel", "tcg"),
            *("-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=on"),
        ],
        cwd=work,
        stdout=open(work / "qemu.out", "wb"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
    )
    wait_for(work / "nbd.sock")
    wait_for(work / "qmp.sock")
    return nbdkit, qemu


async def one_run(args: argparse.Namespace, work: Path, image: Path, run: int) -> str:
    nbdkit, qemu = spawn(args, work, image)
    socket, monitor, target = work / "nbd.sock", work / "qmp.sock", work / "target.qcow2"
    outcome = "ok"
    qmp: Monitor | None = None
    try:
        for _ in range(500):  # the socket file appears before QEMU listens on it
            try:
                reader, writer = await asyncio.open_unix_connection(str(monitor), limit=1 << 24)
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.01)
        else:
            raise ConnectionError(f"{monitor}: QEMU never listened")
        qmp = Monitor(reader, writer)
        async with asyncio.timeout(args.timeout):
            await scenario(qmp, args, socket, target)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        killed = False
        try:
            code = qemu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            qemu.kill()
            code, killed = qemu.wait(), True
        nbdkit.kill()
        nbdkit.wait()
    if code == 0:
        return outcome
    if killed:  # hung or never spoken to: the harness's failure, not a crash
        return f"harness: QEMU killed after {outcome}"
    kept = work.parent / f"crash-{run}"
    shutil.rmtree(kept, ignore_errors=True)
    work.rename(kept)
    if qmp is not None:
        (kept / "qmp.log").write_text("\n".join(qmp.log[-100:]) + "\n")
    return f"QEMU exit {code} ({outcome}); kept {kept}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--mode", choices=["window", "hammer"], default="window")
    parser.add_argument("--guard", action="store_true")
    parser.add_argument("--auto-dismiss", action="store_true")
    parser.add_argument("--pending", action="store_true")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/repro-stream-query"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    image = args.dir / f"point-{args.size_mib}.raw"
    if not image.exists():  # half data, half zeroes, as a backup point's disk may be
        with open(image, "wb") as out:
            for mib in range(args.size_mib):
                out.write(os.urandom(1 << 20) if mib % 2 == 0 else bytes(1 << 20))
    crashed = 0
    for run in range(args.runs):
        started = time.monotonic()
        outcome = await one_run(args, args.dir / "run", image, run)
        crashed += outcome.startswith("QEMU exit")
        print(f"run {run}: {outcome} ({time.monotonic() - started:.1f} s)", flush=True)
    print(f"QEMU crashed in {crashed} of {args.runs} runs", flush=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
