"""Many clients, one VM (issue 14): the pool of QMP monitors, jobs driven from another process,
Ctrl-C in the CLI, and eight clients querying during a commit."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, attach, open_vm
from blockctl._machine import launch_detached, shutdown_detached
from blockctl._qmp import wire
from blockctl.errors import MonitorsBusy, QMPConnectFailed
from blockctl.types import Drive, ImageFormat, MachineConfig
from tests.integration.conftest import MIB, base_config, pattern, qcow2_image, run, truth_check
from tests.integration.test_attach_cli import cli
from tests.integration.test_backup import disk_sha, write

pytestmark = pytest.mark.guest


def named(guest: GuestImage, name: str, top: Path | None = None) -> MachineConfig:
    drives = () if top is None else (Drive(file=top, format=ImageFormat.QCOW2),)
    config = base_config(guest, *drives)
    return MachineConfig(
        name=name,
        kernel=config.kernel,
        initrd=config.initrd,
        append=config.append,
        drives=config.drives,
        deprecated_input=config.deprecated_input,
    )


async def slow_chain(images: Path) -> list[Path]:
    """D ← C ← B ← A (D on top; returns [D, C, B, A]) with 4 MiB of data in B: committing
    B into A at 64 KiB/s takes a minute, at 1 MiB/s four seconds."""
    layers = [await qcow2_image(images / "A.qcow2", b"", 8 * MIB)]
    for name in "BCD":
        layer = images / f"{name}.qcow2"
        await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", layers[-1], "-F", "qcow2", layer)
        layers.append(layer)
    await run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {4 * MIB}", layers[1])
    await run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xa5 {2 * MIB} {MIB}", layers[3])
    return layers[::-1]


async def chain_names(vm: LaunchedVM) -> list[str]:
    from blockctl._ops import chains

    return [n.name for n in (await chains.read_graph(vm)).chain_of("disk0")]


async def read_only_state(vm: LaunchedVM) -> dict[str, bool]:
    """Every node's read-only flag, from QEMU's raw query-named-block-nodes."""
    nodes = await vm.command("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    return {n["node-name"]: n["ro"] for n in nodes}


async def raw_jobs(vm: LaunchedVM) -> list[dict[str, Any]]:
    jobs = await vm.command("query-jobs")
    assert isinstance(jobs, list)
    return jobs


async def running_job(vm: LaunchedVM) -> dict[str, Any]:
    """The one job, once QEMU reports it running (watched through the launcher's own
    monitor, which takes no pool slot)."""
    with wire.job_events(vm.session) as stream:
        while True:
            jobs = await raw_jobs(vm)
            if jobs and jobs[0]["status"] == "running":
                return jobs[0]
            await stream.next()


@contextlib.asynccontextmanager
async def blockctl_process(*args: str) -> AsyncIterator[anyio.abc.Process]:
    proc = await anyio.open_process(
        [sys.executable, "-m", "blockctl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()


async def finish(proc: anyio.abc.Process) -> tuple[int, str, str]:
    """Wait for the process; its exit code, stdout and stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()

    async def drain(stream: anyio.abc.ByteReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, proc.stdout, out)
        tg.start_soon(drain, proc.stderr, err)
    code = await proc.wait()
    return code, out.decode(), err.decode()


# Section: the pool


async def test_pool_serves_many_clients_and_names_the_holders(guest: GuestImage) -> None:
    async with open_vm(named(guest, "pool"), monitors=3) as vm:
        assert sorted(p.name for p in vm.pool) == ["qmp-0.sock", "qmp-1.sock", "qmp-2.sock"]
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(attach("pool", command=f"holder {i}"))
                for i in range(3)
            ]
            assert len({c.monitor for c in clients}) == 3
            for client in clients:
                assert (await client.status()).running
            assert sorted(h.command for h in clients[0].other_clients()) == [
                "holder 1",
                "holder 2",
            ]
            with pytest.raises(MonitorsBusy) as busy:
                async with attach("pool", timeout=0.5):
                    pass
            message = str(busy.value)
            assert "all 3 of its QMP monitors" in message
            for i in range(3):
                assert f"pid {os.getpid()} running `holder {i}`" in message
            assert len(busy.value.holders) == 3
            # qmp.sock, the single monitor, is still there for a foreign client.
            async with attach(vm.monitor_path) as foreign:
                assert (await foreign.status()).running
            await stack.aclose()
        # Released: a new client gets a monitor at once.
        async with attach("pool", timeout=0.5) as again:
            assert (await again.status()).running


async def test_up_gives_a_detached_vm_eight_monitors(guest: GuestImage, runtime_dir: Path) -> None:
    """`blockctl up` (launch_detached): eight monitors in the record and on QEMU's command
    line, one per client, plus qmp.sock."""
    record = await launch_detached(named(guest, "detached"))
    try:
        assert [Path(m).name for m in record.monitors] == [f"qmp-{i}.sock" for i in range(8)]
        assert record.argv.count("-mon") == 2 + 8
        for sock in record.monitors:
            assert Path(sock).stat().st_mode & 0o777 == 0o600
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(attach("detached")) for _ in range(8)]
            assert {c.monitor for c in clients} == {Path(m) for m in record.monitors}
            for client in clients:
                assert (await client.status()).running
    finally:
        await shutdown_detached("detached")
    assert not (runtime_dir / "detached").exists()


async def test_qemu_accepts_a_large_pool(guest: GuestImage) -> None:
    """No limit on monitors in QEMU (7.2 and 10.0): 64 of them, every one answering."""
    async with open_vm(named(guest, "large"), monitors=64) as vm:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(attach("large")) for _ in range(64)]
            for client in clients:
                assert (await client.status()).running
        assert len(vm.pool) == 64


async def test_a_killed_client_frees_its_monitor(guest: GuestImage) -> None:
    """The kernel drops a dead process's flock: a SIGKILLed client leaves nothing taken."""
    async with open_vm(named(guest, "killed"), monitors=1) as vm:
        code = (
            "import anyio, os, sys\n"
            "from blockctl import attach\n"
            "async def main():\n"
            "    async with attach('killed'):\n"
            "        print('attached', flush=True)\n"
            "        await anyio.sleep_forever()\n"
            "anyio.run(main)\n"
        )
        proc = await anyio.open_process(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, env=dict(os.environ)
        )
        try:
            assert proc.stdout is not None
            said = b""
            while b"attached\n" not in said:  # (structlog's default prints there too)
                said += await proc.stdout.receive()
            with pytest.raises(MonitorsBusy, match=f"pid {proc.pid} running"):
                async with attach("killed", timeout=0.3):
                    pass
            proc.kill()
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()
        async with attach("killed") as again:
            assert again.monitor == vm.pool[0]
            assert (await again.status()).running


async def test_a_single_monitor_serves_one_client_and_names_its_socket(guest: GuestImage) -> None:
    async with open_vm(named(guest, "single")) as vm, attach(vm.monitor_path):
        with pytest.raises(QMPConnectFailed) as failed:
            async with attach(vm.monitor_path, timeout=1):
                pass
        assert not isinstance(failed.value, MonitorsBusy)
        assert f"the monitor {vm.monitor_path} sent no greeting" in str(failed.value)
        assert "one client at a time" in str(failed.value)


# Section: a job started by one process, driven by another


async def test_job_of_one_process_driven_and_cancelled_by_another(
    guest: GuestImage, images: Path
) -> None:
    layers = await slow_chain(images)
    async with open_vm(named(guest, "jobs2", layers[0])) as vm:
        before_ro = await read_only_state(vm)
        before_chain = await chain_names(vm)
        async with blockctl_process(
            "commit", "jobs2", "disk0", "--top", "drv0-b2", "--speed", "64K", "--json"
        ) as a:
            job = await running_job(vm)
            job_id = job["id"]
            listed = await cli("jobs", "jobs2", "--json")
            rows = json.loads(listed.stdout)
            assert [(r["id"], r["type"], r["status"]) for r in rows] == [
                (job_id, "commit", "running")
            ]
            assert rows[0]["total"] == job["total-progress"] > 0
            # Rate and ETA measured over the sample (0.5 s by default). A rate-limited
            # commit moves in 512 KiB steps, so a short sample may see none: a rate of 0
            # and no ETA, said as such.
            assert rows[0]["sampled"] == 0.5
            assert rows[0]["rate"] >= 0
            assert (rows[0]["eta"] is None) == (rows[0]["rate"] == 0)
            human = (await cli("jobs", "jobs2", "--sample", "1")).stdout
            assert "B/s" in human and job_id in human
            unsampled = json.loads((await cli("jobs", "jobs2", "--sample", "0", "--json")).stdout)
            assert (unsampled[0]["rate"], unsampled[0]["eta"], unsampled[0]["sampled"]) == (
                None,
                None,
                None,
            )
            await cli("jobs", "jobs2", "pause", job_id)
            paused = json.loads((await cli("jobs", "jobs2", "--json")).stdout)
            assert paused[0]["status"] in ("paused", "standby")
            await cli("jobs", "jobs2", "resume", job_id)
            assert (await raw_jobs(vm))[0]["status"] == "running"
            # (Slower, not faster: the job must still be there for the cancel below, however
            # long the CLI calls take on a busy machine.)
            await cli("jobs", "jobs2", "speed", job_id, "32K")
            block_jobs = await vm.command("query-block-jobs")
            assert isinstance(block_jobs, list)
            assert block_jobs[0]["speed"] == 32 * 1024
            await cli("jobs", "jobs2", "cancel", job_id)
            code, out, err = await finish(a)
        assert code == 3, (out, err)
        error = json.loads(out)["error"]
        assert error["type"] == "JobCancelledByOther"
        # One line on stderr, the error itself (no log lines: a cancel is not a warning).
        (line,) = err.strip().splitlines()
        assert line.startswith(
            f"blockctl: JobCancelledByOther: commit job {job_id} on drv0-b3 was cancelled by "
            "another client at "
        )
        # Exactly as after any cancel: no job left, the chain and every read-only flag as
        # before (the base A, drv0-b3, and the overlay C above B read-only again).
        assert await raw_jobs(vm) == []
        assert await read_only_state(vm) == before_ro
        assert await chain_names(vm) == before_chain
        await truth_check(vm)


# Section: another client's operation is running, not interrupted


async def test_a_commit_of_another_process_is_running_not_interrupted(
    guest: GuestImage, images: Path
) -> None:
    """Process A commits (rate-limited); process B's `status` lists it as running by A's
    pid and B's `recover` leaves it alone (no adoption, no speed change, the record as A
    wrote it); A's commit then completes exactly."""
    layers = await slow_chain(images)
    top, _c, b, a = layers
    expected = images / "expected.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", b, expected)
    async with open_vm(named(guest, "owned", top)) as vm:
        assert vm.run_dir is not None
        async with blockctl_process(
            "commit", "owned", "disk0", "--top", "drv0-b2", "--speed", "64K", "--json"
        ) as committer:
            job_id = (await running_job(vm))["id"]
            (record,) = vm.run_dir.glob("journal-*.json")
            written = record.read_bytes()
            assert json.loads(written)["pid"] == committer.pid
            ro_before = await read_only_state(vm)
            status = json.loads((await cli("status", "owned", "--json")).stdout)
            assert status["interrupted_operations"] == 0
            (op,) = status["running_operations"]
            assert (op["kind"], op["pid"], op["job_id"]) == ("commit", committer.pid, job_id)
            human = (await cli("status", "owned")).stdout
            assert f"running: commit of B.qcow2 into A.qcow2 on disk0 (pid {committer.pid}" in human
            assert "interrupted" not in human
            recovered = await cli("recover", "owned", "--json", check=False)
            assert recovered.returncode == 0, (recovered.stdout, recovered.stderr)
            (found,) = json.loads(recovered.stdout)["operations"]
            assert (found["verdict"], found["owner_pid"], found["done"]) == (
                "running",
                committer.pid,
                [],
            )
            # Nothing touched: the job runs on at A's speed, the record is A's, flags as before.
            block_jobs = await vm.command("query-block-jobs")
            assert isinstance(block_jobs, list)
            (job,) = block_jobs
            assert (job["device"], job["speed"], job["status"]) == (job_id, 64 * 1024, "running")
            # (A itself may have written RUNNING meanwhile: its job's event can come later.)
            after = json.loads(record.read_bytes())
            assert after["step"] in ("starting", "running")
            assert {**after, "step": None} == {**json.loads(written), "step": None}
            assert await read_only_state(vm) == ro_before
            await cli("jobs", "owned", "speed", job_id, "0")
            code, out, err = await finish(committer)
        assert code == 0, (out, err)
        result = json.loads(out)
        assert (result["job"], result["chain"]) == (job_id, ["drv0", "drv0-b1", "drv0-b3"])
        assert not list(vm.run_dir.glob("journal-*"))
        assert await raw_jobs(vm) == []
        await run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", a, expected)
        await truth_check(vm)


# Section: conflicting operations, refused by name

#: The operation process A runs (rate-limited: it lasts a minute unless re-speeded).
RUNNING = {
    "commit": ["commit", "conflict", "disk0", "--top", "drv0-b2", "--speed", "64K", "--json"],
    "stream": ["stream", "conflict", "disk0", "--base", "drv0-b3", "--speed", "64K", "--json"],
}
#: What process B tries.
SECOND = {
    "commit": ["commit", "conflict", "disk0", "--top", "drv0-b1", "--json"],
    "unplug": ["detach", "conflict", "disk0", "--json"],
    "snapshot": ["snapshot", "conflict", "create", "s1", "--disk", "disk0", "--json"],
}


def assert_refused(done: subprocess.CompletedProcess[str], kind: str, pid: int) -> dict[str, Any]:
    """Exit code 4, one line on stderr, the running operation named in --json."""
    assert done.returncode == 5, (done.stdout, done.stderr)
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "Conflict"
    assert error["running"]["kind"] == kind
    assert error["running"]["device"] == "disk0"
    assert error["running"]["pid"] == pid
    assert f"pid {pid}" in error["message"]
    assert "nothing was changed" in error["message"]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("blockctl: Conflict: ")
    return dict(error)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("commit", "commit"),
        ("commit", "unplug"),
        ("commit", "snapshot"),
        ("stream", "unplug"),
        ("stream", "commit"),
    ],
)
async def test_a_conflicting_operation_is_refused_by_name(
    guest: GuestImage, images: Path, first: str, second: str
) -> None:
    """Process A runs a commit or stream on disk0; process B's commit, unplug or snapshot
    of disk0 is refused (exit 4) naming A's operation, job and pid, before anything changed;
    A's job then completes exactly."""
    layers = await slow_chain(images)
    top, _c, b, a = layers
    expected = images / "expected.raw"  # what the job must leave: see the end
    source = b if first == "commit" else top
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", source, expected)
    async with open_vm(named(guest, "conflict", top)) as vm:
        assert vm.run_dir is not None
        async with blockctl_process(*RUNNING[first]) as proc_a:
            job_id = (await running_job(vm))["id"]
            ro_before = await read_only_state(vm)
            chain_before = await chain_names(vm)
            files_before = sorted(p.name for p in images.iterdir())
            done = await cli(*SECOND[second], check=False)
            error = assert_refused(done, first, proc_a.pid)
            assert error["running"]["job_id"] == job_id
            assert f"job {job_id}" in error["message"]
            assert error["message"].startswith(f"{second} of disk0 refused: {first} of ")
            # Nothing changed: A's job runs on at its speed; flags, chain, files, the disk
            # (no unplug requested), one journal record (A's).
            block_jobs = await vm.command("query-block-jobs")
            assert isinstance(block_jobs, list)
            assert [(j["device"], j["speed"], j["status"]) for j in block_jobs] == [
                (job_id, 64 * 1024, "running")
            ]
            assert await read_only_state(vm) == ro_before
            assert await chain_names(vm) == chain_before
            assert sorted(p.name for p in images.iterdir()) == files_before
            assert "disk0" in await wire.qom_list(vm.session, "/machine/peripheral")
            assert len(list(vm.run_dir.glob("journal-*.json"))) == 1
            await cli("jobs", "conflict", "speed", job_id, "0")
            code, out, err = await finish(proc_a)
        assert code == 0, (out, err)
        assert json.loads(out)["job"] == job_id
        assert await raw_jobs(vm) == []
        await truth_check(vm)
    # (Once QEMU is gone: a stream's metadata may still be in its cache until then.)
    if first == "commit":  # A now reads what B read
        await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", a, expected)
    else:  # D, now backed by A, reads what the whole chain read
        await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, expected)


#: Process A: a full backup of NAME's disk0 into REPO that stops once its fleecing job runs
#: (the failpoint after the transaction), says "held", and goes on when its stdin gets a line.
BACKUP_HOLDER = """
import sys, anyio
from blockctl import attach, backup

async def main(name, repo_path):
    async def hold(step):
        if step == "after-transaction":
            print("held", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
    async with attach(name) as vm:
        manifest = await backup.create(
            vm, backup.open_repository(repo_path), kind="full", _failpoint=hold
        )
    print(manifest.id, flush=True)

anyio.run(main, sys.argv[1], sys.argv[2])
"""


async def test_commit_and_unplug_of_a_disk_under_backup_are_refused(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Process A's backup of disk0 holds its fleecing job; B's commit and unplug of disk0
    are refused naming the backup and A's pid; the backup then completes exactly."""
    from blockctl import backup

    layers = await slow_chain(images)
    top = layers[0]
    reference = images / "reference.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, reference)
    repo_path = tmp_path / "repo"
    repo = backup.init_repository(repo_path, chunk_size=64 * 1024)
    async with open_vm(named(guest, "conflict", top)) as vm:
        proc = await anyio.open_process(
            [sys.executable, "-c", BACKUP_HOLDER, "conflict", str(repo_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ),
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            said = b""
            while b"held\n" not in said:
                said += await proc.stdout.receive()
            (backup_job,) = await raw_jobs(vm)
            assert backup_job["type"] == "backup"
            ro_before = await read_only_state(vm)
            chain_before = await chain_names(vm)
            for second in ("commit", "unplug"):
                done = await cli(*SECOND[second], check=False)
                error = assert_refused(done, "backup", proc.pid)
                assert error["running"]["job_id"] == backup_job["id"]
                assert error["message"].startswith(
                    f"{second} of disk0 refused: a backup of disk0 (job {backup_job['id']}; "
                    f"pid {proc.pid})"
                )
            assert await read_only_state(vm) == ro_before
            assert await chain_names(vm) == chain_before
            assert "disk0" in await wire.qom_list(vm.session, "/machine/peripheral")
            await proc.stdin.send(b"go\n")
            code, out, err = await finish(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
                await proc.aclose()
        assert code == 0, (out, err)
        point = out.strip().splitlines()[-1]
        await truth_check(vm)
    restored = tmp_path / "restored.raw"
    await backup.restore(repo, "conflict", point, "disk0", restored, ImageFormat.RAW)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", restored, reference)


# Section: Ctrl-C


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
async def test_ctrl_c_cancels_the_job_and_says_what_was_done(
    guest: GuestImage, images: Path, as_json: bool
) -> None:
    layers = await slow_chain(images)
    async with open_vm(named(guest, "ctrlc", layers[0])) as vm:
        before_ro = await read_only_state(vm)
        before_chain = await chain_names(vm)
        args = ["commit", "ctrlc", "disk0", "--top", "drv0-b2", "--speed", "64K"]
        async with blockctl_process(*args, *(["--json"] if as_json else [])) as a:
            job_id = (await running_job(vm))["id"]
            said = b""
            if not as_json:
                # The first progress line comes from the CLI's first sample of the job, which
                # may follow QEMU's "running" by a moment: interrupt only once it was printed
                # (a Ctrl-C before any sample rightly prints none).
                assert a.stderr is not None
                while f"commit ({job_id}): ".encode() not in said:
                    said += await a.stderr.receive()
            a.send_signal(signal.SIGINT)
            code, out, err = await finish(a)
            err = said.decode() + err
        assert code == 130, (out, err)
        # One sentence, no raw log lines (JSON events on a non-terminal stderr); without
        # --json, the job's progress lines (a plain one off a terminal) come before it.
        progress = [line for line in err.splitlines() if line.startswith(f"commit ({job_id}): ")]
        assert bool(progress) != as_json, err
        lines = [line for line in err.strip().splitlines() if line not in progress]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"blockctl: interrupted: cancelled job {job_id} (commit) at ")
        assert lines[0].endswith("%; the chain is unchanged")
        if as_json:
            data = json.loads(out)
            assert data["interrupted"] is True
            assert [(j["job"], j["outcome"], j["chain_unchanged"]) for j in data["jobs"]] == [
                (job_id, "cancelled", True)
            ]
        else:
            assert out == ""
        assert await raw_jobs(vm) == []
        assert await read_only_state(vm) == before_ro
        assert await chain_names(vm) == before_chain
        await truth_check(vm)


# Section: eight clients during a commit and a backup


async def test_eight_clients_query_during_a_commit_and_a_backup(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """A commit on disk0 (another process, the CLI) and a backup of disk1 (this process,
    the library) run while eight CLI clients loop over status, drives, chain and jobs: no
    client fails or sees a wrong job list, the committing process sees every event this
    process's monitor sees, and both jobs are exact (disk0's chain reads as before, disk1's
    restore equals it)."""
    from blockctl import backup
    from blockctl._ops import chains

    layers = await slow_chain(images)
    top, _c, b, a = layers
    expected = images / "expected.raw"  # the commit must make A read what B read
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", b, expected)
    data = await qcow2_image(images / "data.qcow2", pattern(7, 4 * MIB), 8 * MIB)
    reference = images / "data.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", data, reference)
    repo = backup.init_repository(tmp_path / "repo", chunk_size=64 * 1024)
    config = named(guest, "eight", top)
    config = dataclasses.replace(
        config, drives=(*config.drives, Drive(file=data, format=ImageFormat.QCOW2))
    )
    held, release, commit_running = anyio.Event(), anyio.Event(), anyio.Event()
    points: list[str] = []

    async with open_vm(config) as vm:
        assert (await chains.read_graph(vm)).chain_of("disk1")[0].filename == str(data)

        async def hold(step: str) -> None:
            if step == "after-transaction":
                held.set()
                await release.wait()

        async def run_backup() -> None:
            manifest = await backup.create(
                vm, repo, kind="full", devices=["disk1"], _failpoint=hold
            )
            points.append(manifest.id)

        seen: list[str] = []  # the commit job's statuses, as this process's monitor saw them

        async def watch(stream: Any) -> None:
            while True:
                event = await stream.next()
                if event.name == "JOB_STATUS_CHANGE" and event.data["id"].startswith("bc-commit-"):
                    seen.append(event.data["status"])
                    if event.data["status"] == "running":
                        commit_running.set()
                    if event.data["status"] == "null":
                        return

        with wire.job_events(vm.session) as stream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, stream)
                tg.start_soon(run_backup)
                await held.wait()
                (backup_job,) = await raw_jobs(vm)
                async with blockctl_process(
                    # 16 KiB/s: four minutes, longer than the clients take on a busy machine.
                    "commit",
                    "eight",
                    "disk0",
                    "--top",
                    "drv0-b2",
                    "--speed",
                    "16K",
                    "--json",
                ) as committer:
                    async with anyio.create_task_group() as race:  # or the commit's failure

                        async def exited() -> None:
                            await committer.wait()
                            race.cancel_scope.cancel()

                        race.start_soon(exited)
                        await commit_running.wait()
                        race.cancel_scope.cancel()
                    assert commit_running.is_set(), await finish(committer)
                    (commit_job,) = [j for j in await raw_jobs(vm) if j["type"] == "commit"]
                    both = {backup_job["id"], commit_job["id"]}
                    failures: list[str] = []
                    calls = 0

                    async def client(i: int) -> None:
                        nonlocal calls
                        for _round in range(2):
                            for command in ("status", "drives", "chain", "jobs"):
                                done = await cli(command, "eight", "--json", check=False)
                                calls += 1
                                if done.returncode != 0:
                                    failures.append(f"client {i} {command}: {done.stderr}")
                                elif command == "jobs":
                                    ids = {r["id"] for r in json.loads(done.stdout)}
                                    if ids != both:
                                        failures.append(f"client {i} jobs: {ids}")
                                elif command == "drives":
                                    devices = [d["device"] for d in json.loads(done.stdout)]
                                    if devices != ["disk0", "disk1"]:
                                        failures.append(f"client {i} drives: {devices}")

                    async with anyio.create_task_group() as clients:
                        for i in range(8):
                            clients.start_soon(client, i)
                    assert failures == []
                    assert calls == 8 * 2 * 4
                    # Both jobs overlapped every client.
                    assert {j["id"] for j in await raw_jobs(vm)} == both
                    release.set()
                    await cli("jobs", "eight", "speed", commit_job["id"], "0")
                    code, out, err = await finish(committer)
        assert code == 0, (out, err)
        result = json.loads(out)
        assert result["job"] == commit_job["id"]
        assert result["chain"] == ["drv0", "drv0-b1", "drv0-b3"]
        # No lost event: the committing process saw what this monitor saw, "created" (its
        # job driver's start) aside.
        assert [t for t in result["transitions"] if t != "created"] == [
            t for t in seen if t != "created"
        ]
        assert seen[-2:] == ["concluded", "null"]
        assert await raw_jobs(vm) == []
        await truth_check(vm)
    (point,) = points
    restored = tmp_path / "restored.raw"
    await backup.restore(repo, "eight", point, "disk1", restored, ImageFormat.RAW)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", restored, reference)
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", a, expected)


# Section: a backup driven from another process


async def node_bitmaps(vm: LaunchedVM) -> dict[str, list[tuple[str, int]]]:
    """Every node's dirty bitmaps (name, count), from QEMU's raw query-named-block-nodes."""
    nodes = await vm.command("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    return {
        n["node-name"]: sorted((b["name"], b["count"]) for b in n.get("dirty-bitmaps", []))
        for n in nodes
        if n.get("dirty-bitmaps")
    }


async def copy_row(
    vm_name: str, pid: int, until: Callable[[dict[str, Any]], bool] = lambda row: True
) -> dict[str, Any]:
    """The backup's row in ``jobs --json``, once its process serves the copy's control (and
    the row satisfies ``until``)."""
    with anyio.fail_after(120):
        while True:
            rows = json.loads((await cli("jobs", vm_name, "--json", "--sample", "0")).stdout)
            mine = [r for r in rows if r["driven_by"] == pid]
            assert len(mine) <= 1, rows
            if mine and until(mine[0]):
                return mine[0]  # type: ignore[no-any-return]
            await anyio.sleep(0.2)


async def restored_sha(repo: Path, vm_name: str, images: Path) -> str:
    """The newest point of ``vm_name``'s disk0, restored to raw by the CLI; its sha256."""
    points = json.loads((await cli("backup", "list", vm_name, "--repo", repo, "--json")).stdout)
    out = images / f"restored-{points[-1]['id']}.raw"
    await cli("restore", vm_name, points[-1]["id"], "disk0", out, "--repo", repo, "-O", "raw")
    return (await run("sha256sum", out)).split()[0]


async def test_a_backup_of_one_process_driven_and_cancelled_by_another(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    disk = await qcow2_image(images / "b.qcow2", b"", 16 * MIB)
    repo = tmp_path / "repo"
    await cli("backup", "init", "--repo", repo, "--chunk-size", "256K")
    async with open_vm(named(guest, "bjobs", disk)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        await write(vm, "vda", 0, 4 * 1024)
        await cli("backup", "create", "bjobs", "--repo", repo, "--json")
        await write(vm, "vda", 8 * 1024, 8 * 1024)  # the incremental below reads these 8 MiB
        bitmaps_before = await node_bitmaps(vm)
        ((_name, dirty),) = bitmaps_before["drv0"]
        async with blockctl_process(
            "backup", "create", "bjobs", "--repo", str(repo), "--speed", "256K", "--json"
        ) as a:
            # Once the copy has planned its reads (its socket serves from just before).
            row = await copy_row("bjobs", a.pid, until=lambda r: r["total"] > 0)
            job_id = row["id"]
            # The copy's own figures: what it reads is what QEMU's checkpoint counted.
            assert (row["type"], row["status"], row["total"]) == ("backup", "running", dirty)
            assert row["speed"] == 256 * 1024
            await cli("jobs", "bjobs", "pause", job_id)
            assert (await copy_row("bjobs", a.pid))["status"] == "paused"
            assert [j["status"] for j in await raw_jobs(vm)] == ["running"]  # QEMU's side holds
            await cli("jobs", "bjobs", "resume", job_id)
            assert (await copy_row("bjobs", a.pid))["status"] == "running"
            await cli("jobs", "bjobs", "speed", job_id, "128K")
            slower = await copy_row("bjobs", a.pid)
            assert slower["speed"] == 128 * 1024 and slower["done"] < slower["total"]
            sampled = json.loads((await cli("jobs", "bjobs", "--json", "--sample", "1")).stdout)
            assert sampled[0]["sampled"] == 1 and sampled[0]["rate"] is not None
            await cli("jobs", "bjobs", "cancel", job_id)
            code, out, err = await finish(a)
        assert code == 3, (out, err)
        assert json.loads(out)["error"]["type"] == "JobCancelledByOther"
        lines = err.strip().splitlines()
        assert len(lines) == 1, lines  # the error, no log lines: a cancel is not a warning
        line = lines[0]
        assert line.startswith(
            f"blockctl: JobCancelledByOther: backup job {job_id} was cancelled by another client "
            f"(pid "
        )
        assert "the backup is not recorded" in line
        # As after any failed backup: no job, no fleecing node, the checkpoint as before (the
        # attempt's bitmap merged back into it), one point, no control socket left.
        assert await raw_jobs(vm) == []
        nodes = await vm.command("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        assert not [n["node-name"] for n in nodes if n["node-name"].startswith("bcf")]
        assert await node_bitmaps(vm) == bitmaps_before
        listed = json.loads((await cli("backup", "list", "bjobs", "--repo", repo, "--json")).stdout)
        assert len(listed) == 1
        assert vm.run_dir is not None
        assert list((vm.run_dir / "control").glob("*")) == []
        # The next incremental is exact: restored, it reads as the guest reads its disk.
        done = json.loads((await cli("backup", "create", "bjobs", "--repo", repo, "--json")).stdout)
        assert done["kind"] == "incremental"
        assert await restored_sha(repo, "bjobs", images) == await disk_sha(vm, "vda", 16)
        await truth_check(vm)


async def test_a_backup_paused_on_a_full_repository_is_resumed_from_a_second_shell(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """The repository on a 4 MiB tmpfs, 8 MiB of random data to store: the chunk writes fail
    with ENOSPC midway. Under ``--on-error enospc`` the copy pauses and prints the command
    that resumes it; the tmpfs grows, that exact command runs in another process, and the
    backup completes to an exact point."""
    import shlex

    from tests.integration.test_backup_faults import small_tmpfs

    disk = await qcow2_image(images / "f.qcow2", b"", 16 * MIB)
    async with (
        small_tmpfs(tmp_path / "small", "4m") as mount,
        open_vm(named(guest, "bfull", disk)) as vm,
    ):
        repo = mount / "repo"
        await cli("backup", "init", "--repo", repo, "--chunk-size", "256K")
        assert vm.console is not None
        await vm.console.wait_ready()
        await write(vm, "vda", 0, 8 * 1024)
        async with blockctl_process(
            "backup", "create", "bfull", "--repo", str(repo), "--on-error", "enospc",
            "--pause-timeout", "600", "--json",
        ) as a:  # fmt: skip
            assert a.stderr is not None
            said = ""
            with anyio.fail_after(300):
                while "`blockctl jobs" not in said:
                    said += (await a.stderr.receive()).decode()
            hint = next(line for line in said.splitlines() if "paused on" in line)
            assert hint.endswith("s, or it is cancelled"), hint
            command = shlex.split(hint.split("`")[1])
            assert command[:4] == ["blockctl", "jobs", "bfull", "resume"], hint
            row = await copy_row("bfull", a.pid)
            assert (row["status"], row["io_status"]) == ("paused", "nospace")
            assert 0 < row["done"] < row["total"]
            await run("mount", "-o", "remount,size=64m", mount)
            resumed = await anyio.run_process(
                [sys.executable, "-m", *command], check=False, env=dict(os.environ)
            )
            assert resumed.returncode == 0, resumed.stderr
            code, out, err = await finish(a)
        assert code == 0, (out, said + err)
        assert json.loads(out)["kind"] == "full"
        assert await restored_sha(repo, "bfull", images) == await disk_sha(vm, "vda", 16)
        assert await raw_jobs(vm) == []


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
async def test_ctrl_c_cancels_a_backup_and_says_what_was_read(
    guest: GuestImage, images: Path, tmp_path: Path, as_json: bool
) -> None:
    """Ctrl-C during ``backup create`` names the backup and what it read, and that no point
    was recorded (it said "no job of it was running" while the copy was at 12 MiB of 32)."""
    disk = await qcow2_image(images / "c.qcow2", pattern(7, 32 * MIB), 32 * MIB)
    repo = tmp_path / "repo"
    await cli("backup", "init", "--repo", repo, "--compression", "none")
    async with open_vm(named(guest, "ctrlcb", disk)) as vm:
        bitmaps_before = await node_bitmaps(vm)
        args = ["backup", "create", "ctrlcb", "--repo", str(repo), "--speed", "1M"]
        async with blockctl_process(*args, *(["--json"] if as_json else [])) as a:
            await copy_row("ctrlcb", a.pid, until=lambda r: r["done"] > 0)  # copying
            a.send_signal(signal.SIGINT)
            code, out, err = await finish(a)
        assert code == 130, (out, err)
        said = err.strip().splitlines()[-1]
        assert said.startswith("blockctl: interrupted: cancelled the backup (read: disk0 "), err
        assert said.endswith(
            "of 32.0 MiB); no point was recorded and the checkpoints are as before it"
        ), err
        if as_json:
            (row,) = json.loads(out)["jobs"]
            assert (row["type"], row["outcome"], row["points_recorded"]) == (
                "backup",
                "cancelled",
                [],
            )
            assert 0 < row["done"] < row["total"] == 32 * MIB
        # As said: no job, no fleecing node, no point, the bitmaps as before.
        assert await raw_jobs(vm) == []
        assert await node_bitmaps(vm) == bitmaps_before
        listed = json.loads(
            (await cli("backup", "list", "ctrlcb", "--repo", repo, "--json")).stdout
        )
        assert listed == []
        await truth_check(vm)
