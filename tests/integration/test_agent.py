"""The guest agent end to end: real QEMU, the test guest with qemu-ga, an ext4 disk.

One VM for the module (named, so the CLI attaches to it from another process). Its disk is an
ext4 filesystem made on the host and mounted at /mnt in the guest. What is shown:

- a writer blocks while the guest is frozen and completes after the thaw;
- a quiesced external snapshot under a running writer holds a clean ext4 (``e2fsck -fn``
  passes, no ``needs_recovery``), a crash-consistent one needs journal recovery;
- faults: the snapshot transaction fails between freeze and thaw, the controller task is
  cancelled mid-operation, the freeze deadline passes, the agent is absent or hung (a clear
  error within the deadline, nothing frozen), stale replies of an earlier connection;
- quiesced backup and internal snapshot, and the ``blockctl agent`` CLI.

"Nothing frozen" is checked twice each time: the agent says ``thawed`` and a guest write
completes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

from blockctl import GuestImage, LaunchedVM, backup, build_guest, find_guest
from blockctl._agent import FreezeStatus, Quiesce, connect_agent
from blockctl._ops import chains
from blockctl._qmp import wire
from blockctl.errors import (
    AgentUnavailable,
    BlockctlError,
    CommandFailed,
    FreezeDeadlineExceeded,
    MissingComponent,
)
from blockctl.types import Drive, ImageFormat
from tests.conftest import missing
from tests.figures import Tally, report, require_any
from tests.integration.conftest import base_config, run, vm_in_background

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="module")]

#: The frozen-guest crash point's checks (the figure counts it only once all held).
FROZEN_KILL = Tally(
    {
        "frozen": "the guest left frozen (agent: frozen, a writer asleep in the freeze wait)",
        "verdicts": "recover thawed it first (finished), the snapshot not-done",
        "thawed": "the blocked write completed, the agent says thawed",
        "rolled-back": "the chain, nodes and files as before, no record left",
        "nothing-left": "nothing left for the next recovery",
    }
)

NAME = "agentvm"
DISK_MIB = 48
# Double-forked ( … & ): a direct background child of the serial shell would end the shell
# when it exits (qga.md §7).
WRITER = (
    "mkdir -p /mnt/w; ( ( i=0; while [ ! -e /tmp/stop ]; do "
    "dd if=/dev/urandom of=/mnt/w/f$((i % 20)) bs=64k count=4 2>/dev/null; "
    "i=$((i+1)); echo $i > /tmp/wcount; done; touch /tmp/wstopped ) >/dev/null 2>&1 & )"
)


@pytest.fixture(scope="session")
def agent_guest(guest: GuestImage) -> GuestImage:
    """The guest with qemu-ga: cached, built (a few seconds, apt) only when missing."""
    try:
        return find_guest(agent=True)
    except MissingComponent:
        pass
    try:
        # In a thread of its own: no event loop may be running where anyio.run starts one.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            build = functools.partial(build_guest, agent=True)
            return pool.submit(anyio.run, build).result()
    except BlockctlError as exc:
        missing(f"the test guest with qemu-ga ({exc})")
        raise


@dataclass
class Rig:
    vm: LaunchedVM
    images: Path
    disk: Path
    runtime: Path

    async def sh(self, command: str, timeout: float = 60) -> str:
        assert self.vm.console is not None
        return await self.vm.console.check(command, timeout=timeout)

    async def status(self) -> FreezeStatus:
        async with connect_agent(self.vm) as ga:
            return await ga.fsfreeze_status()

    async def assert_thawed(self, tag: str) -> None:
        """The agent says thawed, and a write to the filesystem completes."""
        assert await self.status() is FreezeStatus.THAWED
        await self.sh(f"echo {tag} > /mnt/probe-{tag} && sync && cat /mnt/probe-{tag}")

    async def wait_for(self, condition: str, tries: int = 400) -> None:
        """Poll a guest condition inside the guest (50 ms steps, bounded), no host sleeps."""
        await self.sh(
            f"n=0; until {condition}; do n=$((n+1)); [ $n -ge {tries} ] && exit 1; "
            "usleep 50000; done"
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(
    agent_guest: GuestImage, tmp_path_factory: pytest.TempPathFactory, module_runtime_dir: Path
) -> AsyncIterator[Rig]:
    images = tmp_path_factory.mktemp("agent")
    raw = images / "d0.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK_MIB << 20)
    await run("mkfs.ext4", "-q", "-F", "-b", "4096", raw)
    disk = images / "d0.qcow2"
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk)
    raw.unlink()
    config = base_config(
        agent_guest,
        Drive(file=disk, format=ImageFormat.QCOW2, serial="agent-d0"),
        name=NAME,
        guest_agent=True,
    )
    async with vm_in_background(config) as vm:
        rig = Rig(vm=vm, images=images, disk=disk, runtime=module_runtime_dir)
        await rig.sh("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
        yield rig
        await rig.sh("touch /tmp/stop; umount /mnt || true")


async def test_the_agent_answers(rig: Rig) -> None:
    async with connect_agent(rig.vm, timeout=30) as ga:  # the agent may still be starting
        await ga.ping()
        info = await ga.info()
        assert info.version.startswith(("7.", "8.", "9.", "10."))
        for command in ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-get-fsinfo"):
            assert info.enabled(command), command
        filesystems = await ga.get_fsinfo()
        assert [(fs.mountpoint, fs.type) for fs in filesystems] == [("/mnt", "ext4")]
        assert filesystems[0].disks[0].bus_type == "virtio"
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED


async def test_a_writer_blocks_while_frozen_and_completes_after_the_thaw(rig: Rig) -> None:
    async with connect_agent(rig.vm) as ga:
        assert await ga.fsfreeze_freeze() == 1
        try:
            await rig.sh(
                "rm -f /tmp/wdone; ( ( echo hello > /mnt/x; echo done > /tmp/wdone ) "
                ">/dev/null 2>&1 & echo $! > /tmp/wpid )"
            )
            # Event, not time: the writer is asleep in the kernel's freeze wait.
            await rig.wait_for("grep -q percpu_rwsem /proc/$(cat /tmp/wpid)/wchan 2>/dev/null")
            assert "D" in await rig.sh("cut -d' ' -f3 /proc/$(cat /tmp/wpid)/stat")
            assert "missing" in await rig.sh("[ -e /tmp/wdone ] && echo there || echo missing")
            assert await ga.fsfreeze_status() is FreezeStatus.FROZEN
        finally:
            assert await ga.fsfreeze_thaw() == 1
    await rig.wait_for("[ -e /tmp/wdone ]")
    assert (await rig.sh("cat /mnt/x")).strip() == "hello"


async def fs_state(image: Path, scratch: Path) -> tuple[bool, int, str]:
    """(needs_recovery, e2fsck -fn exit code, its output) of the ext4 in a qcow2 chain."""
    raw = scratch.with_suffix(".raw")
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw)
    try:
        header = await run("dumpe2fs", "-h", raw)
        features = next(
            line for line in header.splitlines() if line.startswith("Filesystem features")
        )
        done = await anyio.run_process(["e2fsck", "-fn", str(raw)], check=False)
        output = (done.stdout + done.stderr).decode(errors="replace")
        return "needs_recovery" in features, done.returncode, output
    finally:
        raw.unlink()


async def test_quiesced_snapshot_holds_a_clean_filesystem(rig: Rig) -> None:
    await rig.sh("rm -f /tmp/stop /tmp/wstopped; " + WRITER)
    await rig.wait_for("[ -s /tmp/wcount ]")
    quiet = await chains.external_snapshot(rig.vm, "q1", rig.images, quiesce=True)
    assert quiet.quiesced
    before = int(await rig.sh("cat /tmp/wcount"))
    # The writer goes on after the thaw.
    await rig.wait_for(f"[ $(cat /tmp/wcount) -gt {before + 2} ]")
    crash = await chains.external_snapshot(rig.vm, "c1", rig.images, quiesce=False)
    assert not crash.quiesced
    await rig.sh("touch /tmp/stop")
    await rig.wait_for("[ -e /tmp/wstopped ]")

    q_recovery, q_rc, q_out = await fs_state(Path(quiet.frozen["disk0"]), rig.images / "q")
    c_recovery, c_rc, c_out = await fs_state(Path(crash.frozen["disk0"]), rig.images / "c")
    assert not q_recovery and q_rc == 0 and "skipping journal recovery" not in q_out, q_out
    # The contrast: without the freeze the image needs journal replay (e2fsck -n skips it).
    assert c_recovery, c_out
    report(
        "guest agent",
        f"quiesced snapshot under a writer: needs_recovery={q_recovery}, e2fsck -fn rc={q_rc}; "
        f"crash-consistent: needs_recovery={c_recovery}, e2fsck -fn rc={c_rc}",
    )


async def test_thawed_when_the_snapshot_fails_between_freeze_and_thaw(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = wire.transaction_snapshot
    seen: list[FreezeStatus] = []

    async def failing(session: Any, pairs: list[tuple[str, str]]) -> None:
        seen.append(FreezeStatus.FROZEN)  # we are between freeze and thaw here
        # A real transaction that QEMU refuses: the overlay node does not exist.
        await real(session, [(node, "no-such-overlay") for node, _overlay in pairs])

    monkeypatch.setattr(wire, "transaction_snapshot", failing)
    with pytest.raises(CommandFailed):
        await chains.external_snapshot(rig.vm, "f1", rig.images, quiesce=True)
    assert seen
    await rig.assert_thawed("f1")
    assert not list(rig.images.glob("*-f1.qcow2"))  # the rollback removed the overlay


async def test_thawed_when_the_controller_task_is_cancelled(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = anyio.Event()

    async def stuck(session: Any, pairs: list[tuple[str, str]]) -> None:
        inside.set()
        await anyio.sleep_forever()

    monkeypatch.setattr(wire, "transaction_snapshot", stuck)
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(chains.external_snapshot, quiesce=True), rig.vm, "k1")
        await inside.wait()
        # The guest-side proof of the freeze (the one agent connection is the operation's):
        # qemu-ga keeps this file while frozen.
        assert "frozen" in await rig.sh("[ -e /run/qga.state.isfrozen ] && echo frozen")
        tg.cancel_scope.cancel()
    await rig.assert_thawed("k1")
    assert not list(rig.images.glob("*-k1.qcow2"))


async def test_the_freeze_deadline_thaws_and_fails(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck(session: Any, pairs: list[tuple[str, str]]) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(wire, "transaction_snapshot", stuck)
    with pytest.raises(FreezeDeadlineExceeded):
        await chains.external_snapshot(rig.vm, "d1", rig.images, quiesce=True, freeze_deadline=1.0)
    await rig.assert_thawed("d1")


async def test_absent_agent_is_a_clear_error_and_if_possible_goes_on(rig: Rig) -> None:
    await rig.sh("kill $(cat /run/qemu-ga.pid)")
    await rig.wait_for("! kill -0 $(cat /run/qemu-ga.pid) 2>/dev/null")
    try:
        with pytest.raises(AgentUnavailable, match="within 5 s"):
            await chains.external_snapshot(rig.vm, "a1", rig.images, quiesce=True)
        assert not list(rig.images.glob("*-a1.qcow2"))
        snap = await chains.external_snapshot(rig.vm, "a2", rig.images, quiesce=Quiesce.IF_POSSIBLE)
        assert not snap.quiesced  # crash-consistent, logged
        await rig.sh("echo still-writable > /mnt/absent && sync")
    finally:
        assert "qga started" in await rig.sh("/sbin/qga-start 5")
    # Whatever was sent while the agent was gone (QEMU drops it while the guest's port is
    # closed, as far as seen here): the next connection syncs past anything stale.
    async with connect_agent(rig.vm, timeout=20) as ga:
        await ga.ping()
        stale = ga.stale_skipped
    await rig.assert_thawed("a3")
    report("guest agent", f"after the agent came back: {stale} stale line(s) skipped by guest-sync")


async def test_hung_agent_is_a_clear_error_and_stale_replies_are_ignored(rig: Rig) -> None:
    await rig.sh("kill -STOP $(cat /run/qemu-ga.pid)")
    try:
        with pytest.raises(AgentUnavailable, match="guest-sync within 5 s"):
            await chains.external_snapshot(rig.vm, "h1", rig.images, quiesce=True)
        await rig.sh("echo still-writable > /mnt/hung && sync")
    finally:
        await rig.sh("kill -CONT $(cat /run/qemu-ga.pid)")
    async with connect_agent(rig.vm) as ga:
        # The hung agent's backlog (our guest-sync requests) was answered to nobody.
        assert ga.stale_skipped >= 1
        await ga.ping()
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED


async def test_quiesced_backup_and_internal_snapshot(rig: Rig) -> None:
    repo = backup.init_repository(rig.images / "repo")
    manifest = await backup.create(
        rig.vm, repo, kind="full", options=backup.BackupOptions(quiesce=Quiesce.REQUIRED)
    )
    await rig.assert_thawed("b1")
    # The manifest says what the point is (the freeze covered every mounted filesystem).
    assert manifest.consistency == "filesystem" and manifest.frozen_filesystems >= 1
    again = repo.get(NAME, manifest.id)
    assert (again.consistency, again.frozen_filesystems) == (
        "filesystem",
        manifest.frozen_filesystems,
    )
    await backup.restore(repo, NAME, manifest.id, manifest.disks[0].device, rig.images / "b.qcow2")
    recovery, rc, out = await fs_state(rig.images / "b.qcow2", rig.images / "b")
    assert not recovery and rc == 0, out
    result = await chains.save_internal(rig.vm, "i1", quiesce=True)
    assert result.job_id
    await rig.assert_thawed("i1")


async def blockctl_cli(rig: Rig, *args: str, rc: int = 0) -> Any:
    env = {**os.environ, "BLOCKCTL_RUNTIME_DIR": str(rig.runtime)}
    done = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *args, "--json"], check=False, env=env
    )
    assert done.returncode == rc, done.stderr.decode()
    return json.loads(done.stdout)


async def test_cli(rig: Rig) -> None:
    assert (await blockctl_cli(rig, "agent", NAME, "ping"))["ok"] is True
    assert (await blockctl_cli(rig, "agent", NAME, "fsinfo"))[0]["mountpoint"] == "/mnt"
    assert (await blockctl_cli(rig, "agent", NAME, "freeze", "--mountpoint", "/mnt"))["frozen"] == 1
    assert (await blockctl_cli(rig, "agent", NAME, "status"))["status"] == "frozen"
    thawed = await blockctl_cli(rig, "agent", NAME, "thaw")
    assert thawed == {"thawed": 1, "status": "thawed", "ms": thawed["ms"]}
    # A mountpoint that is not a filesystem freezes nothing: an error, and nothing left frozen.
    wrong = await blockctl_cli(rig, "agent", NAME, "freeze", "--mountpoint", "/tmp", rc=1)
    assert wrong["error"]["type"] == "QuiesceFailed"
    assert (await blockctl_cli(rig, "agent", NAME, "status"))["status"] == "thawed"
    snap = await blockctl_cli(
        rig, "snapshot", NAME, "create", "cli1", "--dir", str(rig.images), "--quiesce"
    )
    assert snap["quiesced"] is True
    await rig.assert_thawed("cli1")


async def test_a_controller_killed_while_frozen_is_thawed_by_recover(rig: Rig) -> None:
    """A child controller runs a quiesced external snapshot and SIGKILLs itself right after
    the freeze is confirmed (before the snapshot transaction): the guest stays frozen, with
    nobody to thaw it. ``blockctl recover`` (a fresh process) thaws it from the freeze record
    and rolls back the snapshot that never switched."""
    with FROZEN_KILL.case("controller kill -9 between freeze and thaw") as ok:
        run_dir = rig.vm.run_dir
        chain_before = (await chains.list_external(rig.vm))["disk0"]
        nodes_before = set((await chains.read_graph(rig.vm)).nodes)
        root = Path(__file__).parents[2]
        env = {**os.environ, "PYTHONPATH": str(root), "BLOCKCTL_RUNTIME_DIR": str(rig.runtime)}
        kwargs = {"device": "disk0", "tag": "z1", "directory": str(rig.images), "quiesce": True}
        argv = [sys.executable, "-m", "tests.integration.crash_child", NAME, "snapshot", "frozen"]
        done = await anyio.run_process([*argv, json.dumps(kwargs)], check=False, env=env, cwd=root)
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr.decode()[-2000:])
        assert len(list(run_dir.glob("freeze-*"))) == 1, "the killed controller left no record"
        assert len(list(run_dir.glob("journal-*"))) == 1
        # Frozen, proven by the agent and by a writer asleep in the kernel's freeze wait.
        assert await rig.status() is FreezeStatus.FROZEN
        await rig.sh(
            "rm -f /tmp/zdone; ( ( echo after > /mnt/z1; sync; echo done > /tmp/zdone ) "
            ">/dev/null 2>&1 & echo $! > /tmp/zpid )"
        )
        await rig.wait_for("grep -q percpu_rwsem /proc/$(cat /tmp/zpid)/wchan 2>/dev/null")
        assert "missing" in await rig.sh("[ -e /tmp/zdone ] && echo there || echo missing")
        ok.add("frozen")

        result = await blockctl_cli(rig, "recover", NAME)
        ops = {op["kind"]: op for op in result["operations"]}
        assert set(ops) == {"freeze", "snapshot"}, result
        freeze, snap = ops["freeze"], ops["snapshot"]
        assert result["operations"][0]["kind"] == "freeze"  # the guest first
        assert (freeze["verdict"], freeze["kept"]) == ("finished", False), freeze
        assert freeze["message"].startswith("thawed the guest's filesystems"), freeze
        assert "died during external snapshot" in freeze["message"], freeze
        # The snapshot never switched (killed before its transaction): not done, rolled back.
        assert (snap["step"], snap["verdict"], snap["kept"]) == ("switching", "not-done", False), (
            snap
        )
        ok.add("verdicts")

        await rig.wait_for("[ -e /tmp/zdone ]")  # the blocked write completed
        await rig.assert_thawed("z1")
        assert (await rig.sh("cat /mnt/z1")).strip() == "after"
        ok.add("thawed")
        assert not list(run_dir.glob("freeze-*")) and not list(run_dir.glob("journal-*"))
        assert (await chains.list_external(rig.vm))["disk0"] == chain_before
        assert set((await chains.read_graph(rig.vm)).nodes) == nodes_before, (
            "an overlay node leaked"
        )
        assert not list(rig.images.glob("*-z1.qcow2")), "the overlay file leaked"
        ok.add("rolled-back")
        # Nothing left for the next operation's settle either.
        assert (await blockctl_cli(rig, "recover", NAME))["operations"] == []
        ok.add("nothing-left")
    require_any(FROZEN_KILL)
    report(
        "crash recovery",
        "controller kill -9 between freeze and thaw (quiesced snapshot), then `blockctl "
        f"recover`: {FROZEN_KILL.summary()}: {FROZEN_KILL.phrases()}",
    )
