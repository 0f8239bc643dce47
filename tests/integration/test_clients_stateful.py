"""Two clients, one VM, random sequences of operations (issue 14): a hypothesis state machine.

One named VM (booted once, with no disk) and two library clients, each ``attach(name)`` on its
own monitor of the VM's pool. Each sequence starts with a hot-plugged disk under a
rate-limited commit that one client runs as a background task. Then each step, from either
client: the OTHER client pauses, resumes or cancels the commit, or one lifts its speed limit
(the commit completes); an unplug or snapshot of the committing disk (refused with Conflict);
a guest write; a full or incremental backup of a disk not being committed; and, with no commit
running, a hot-plug, an unplug, an external snapshot, a new commit. After every step:

- what each client reports (``drives``, ``chain``, ``jobs``, ``status``: the library calls
  behind those commands) equals QEMU's raw ``query-block``, ``query-named-block-nodes``,
  ``query-jobs``, ``query-status`` (:func:`truth_check`, once per client);
- it equals the model: which disks are plugged, how many layers each chain has, which job
  runs and whether it is paused;
- the guest reads what the model says each disk holds (``dd … iflag=direct | sha256sum`` in the
  guest against the hash of the model's bytes), and every backup restores to the model's bytes
  at its point in time.

Each example starts from the VM with no disk (the teardown unplugs what QEMU lists), so the one
VM serves every example. The rules run in a worker thread (hypothesis drives them
synchronously) and call into the test's event loop with ``anyio.from_thread.run``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from blockctl import VM, GuestImage, LaunchedVM, attach, backup, open_vm
from blockctl._backup.store import Repository
from blockctl._jobs import JobProgress, JobStatus, JobTransition, adopt_jobs
from blockctl._ops import chains, drives
from blockctl._qmp import wire
from blockctl._qmp.models import JobInfo
from blockctl.errors import Conflict, JobCancelledByOther
from blockctl.jobs import JobControl
from blockctl.types import Drive, ImageFormat
from tests.figures import report
from tests.integration.conftest import MIB, pattern, qcow2_image, run, truth_check
from tests.integration.test_clients import named

pytestmark = pytest.mark.guest

T = TypeVar("T")

DISK = 2 * MIB
BLOCK = 64 * 1024  # what one guest write changes
CHUNK = 512 * 1024  # what QEMU's commit copies per step (its rate limit sleeps between steps)
#: A commit's speed: after its first 512 KiB step it sleeps 512 s, far longer than the steps
#: the model takes while it runs, however busy the machine ("finish" lifts the limit, speed 0,
#: which wakes it at once; "resume" lets it take one step). At 16 KiB/s (a 32 s sleep) two
#: backups and their checks outlasted it on a loaded machine, and the commit ended unasked.
SLOW = 1024
MAX_DISKS = 2
#: Nodes of a drive's chain that are not layers (a backup's filter is there while it runs).
_FILTERS = frozenset({"copy-on-read", "throttle", "copy-before-write", "snapshot-access"})


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Disk:
    serial: str
    owner: int  # the client that hot-plugged it
    #: What the guest must read (all DISK bytes).
    content: bytearray
    #: The chain's layers, top first: the 512 KiB chunks each one holds data in (at least
    #: these: what a commit copied before a cancel is not counted).
    layers: list[set[int]]


@dataclass
class Commit:
    job_id: str
    device: str
    starter: int  # the client that runs it; the other one drives it
    #: The 512 KiB steps it has yet to copy. QEMU's rate limit sleeps between steps; a pause
    #: wakes it, and on resume it copies its next step at once (then sleeps again).
    steps_left: int
    paused: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: object = None  # the ChainResult, or the exception the commit raised


class _Running:
    """A job hook: the job's id once QEMU runs it."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.event = anyio.Event()

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.RUNNING and self.job_id is None:
            self.job_id = transition.job_id
            self.event.set()

    def on_progress(self, progress: JobProgress) -> None:
        pass


@dataclass
class World:
    """What outlives one example: the VM, its two clients, the event loop's task group."""

    vm: LaunchedVM
    clients: tuple[VM, VM]
    tg: anyio.abc.TaskGroup
    images: Path
    work: Path
    examples: int = 0
    serials: int = 0
    #: How many times each rule ran, over all examples (reported as a figure).
    steps: dict[str, int] = field(default_factory=dict)


async def guest_sh(vm: LaunchedVM, command: str) -> str:
    assert vm.console is not None
    return await vm.console.check(command)


async def guest_devices(vm: LaunchedVM) -> dict[str, str]:
    """Serial → /dev name of every virtio disk the guest has."""
    out = await guest_sh(
        vm, "for d in /sys/block/vd*; do [ -e $d ] && echo ${d##*/} $(cat $d/serial); done; true"
    )
    return {s: dev for dev, s in (line.split() for line in out.splitlines() if line.strip())}


async def guest_wait(vm: LaunchedVM, serial: str) -> str:
    """The guest's device for ``serial``, once it has appeared (bounded)."""
    out = await guest_sh(
        vm,
        "for i in $(seq 200); do for d in /sys/block/vd*; do "
        f'[ -e $d ] && [ "$(cat $d/serial)" = {serial} ] && echo ${{d##*/}} && exit 0; '
        "done; sleep 0.05; done; exit 1",
    )
    return out.strip()


async def guest_sha(vm: LaunchedVM, dev: str) -> str:
    out = await guest_sh(
        vm, f"dd if=/dev/{dev} bs=1M count={DISK // MIB} iflag=direct 2>/dev/null | sha256sum"
    )
    return out.split()[0]


class TwoClients(RuleBasedStateMachine):
    def __init__(self, world: World) -> None:
        super().__init__()
        self.w = world
        self.w.examples += 1
        self.disks: dict[str, Disk] = {}
        self.job: Commit | None = None
        self.repo: Repository = backup.init_repository(
            self.w.work / f"repo-{self.w.examples}", chunk_size=BLOCK
        )
        self.points = 0

    # Section: plumbing

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return anyio.from_thread.run(fn, *args)

    def count(self, step: str) -> None:
        self.w.steps[step] = self.w.steps.get(step, 0) + 1

    def idle_disks(self) -> list[str]:
        return sorted(d for d in self.disks if self.job is None or self.job.device != d)

    def committable(self) -> list[str]:
        """Disks whose layer below the top holds data in two or more 512 KiB chunks: a
        commit of it into the layer below sleeps after its first step (see SLOW)."""
        return sorted(
            d
            for d, disk in self.disks.items()
            if len(disk.layers) >= 3 and len(disk.layers[1]) >= 2
        )

    # Section: rules

    @initialize(client=st.integers(0, 1), starter=st.integers(0, 1), data=st.data())
    def first_disk(self, client: int, starter: int, data: st.DataObject) -> None:
        """Each sequence starts with a disk under a running commit (the other steps a commit
        allows come after it, or after it ended)."""
        self.hotplug(client)
        self.start_commit(starter, data)

    @precondition(lambda self: self.job is None and len(self.disks) < MAX_DISKS)
    @rule(client=st.integers(0, 1))
    def hotplug(self, client: int) -> None:
        """A new disk of three layers: an empty base, a layer that holds DISK bytes of a
        pattern (a commit of it into the base has 4 steps to make), an empty top."""
        self.count("hotplug")
        self.w.serials += 1
        serial = f"SM{self.w.serials}"
        data = pattern(self.w.serials, DISK)

        async def go() -> str:
            base = await qcow2_image(self.w.images / f"{serial}-base.qcow2", b"", DISK)
            mid = await qcow2_image(self.w.images / f"{serial}-mid.qcow2", data, DISK)
            # (Every cluster of mid holds data: what the base holds is never read.)
            await run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
            top = self.w.images / f"{serial}.qcow2"
            await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
            info = await drives.hotplug(
                self.w.clients[client], Drive(file=top, format=ImageFormat.QCOW2, serial=serial)
            )
            await guest_wait(self.w.vm, serial)
            return info.device_id

        device = self.run(go)
        assert device not in self.disks
        self.disks[device] = Disk(
            serial=serial,
            owner=client,
            content=bytearray(data),
            layers=[set(), set(range(DISK // CHUNK)), set()],
        )

    @precondition(lambda self: self.job is None and self.disks)
    @rule(client=st.integers(0, 1), data=st.data())
    def unplug(self, client: int, data: st.DataObject) -> None:
        self.count("unplug")
        device = data.draw(st.sampled_from(self.idle_disks()), label="device")
        result = self.run(partial(drives.unplug, self.w.clients[client], device))
        assert result.state is drives.UnplugState.REMOVED
        del self.disks[device]

    @precondition(lambda self: self.disks)
    @rule(data=st.data())
    def guest_write(self, data: st.DataObject) -> None:
        """The guest copies one 64 KiB block of a disk over another (the model does the same
        on its bytes)."""
        self.count("guest_write")
        device = data.draw(st.sampled_from(sorted(self.disks)), label="device")
        src = data.draw(st.integers(0, DISK // BLOCK - 1), label="src")
        dst = data.draw(st.integers(0, DISK // BLOCK - 1), label="dst")
        disk = self.disks[device]

        async def go() -> None:
            dev = (await guest_devices(self.w.vm))[disk.serial]
            await guest_sh(
                self.w.vm,
                f"dd if=/dev/{dev} of=/dev/{dev} bs={BLOCK} skip={src} seek={dst} count=1 "
                "iflag=direct oflag=direct conv=fsync,notrunc 2>/dev/null",
            )

        self.run(go)
        disk.content[dst * BLOCK : (dst + 1) * BLOCK] = disk.content[
            src * BLOCK : (src + 1) * BLOCK
        ]
        disk.layers[0].add(dst * BLOCK // CHUNK)

    @precondition(lambda self: self.job is None and self.disks)
    @rule(client=st.integers(0, 1), data=st.data())
    def snapshot(self, client: int, data: st.DataObject) -> None:
        self.count("snapshot")
        device = data.draw(st.sampled_from(self.idle_disks()), label="device")
        self.w.serials += 1
        tag = f"s{self.w.serials}"
        self.run(
            partial(
                chains.external_snapshot,
                self.w.clients[client],
                tag,
                self.w.images,
                devices=[device],
            )
        )
        self.disks[device].layers.insert(0, set())

    @precondition(lambda self: self.job is None and self.committable())
    @rule(client=st.integers(0, 1), data=st.data())
    def start_commit(self, client: int, data: st.DataObject) -> None:
        """``client`` commits the layer under the top into the one below it, rate-limited,
        in a background task; the step ends once QEMU runs the job."""
        self.count("start_commit")
        device = data.draw(st.sampled_from(self.committable()), label="device")
        vm = self.w.clients[client]

        async def go() -> Commit:
            running = _Running()
            graph = await chains.read_graph(vm)
            top = graph.chain_of(device)[1].name
            box: list[Commit] = []
            started = anyio.Event()

            async def commit() -> None:
                await started.wait()
                job = box[0]
                try:
                    job.outcome = await chains.commit(
                        vm, device, top=top, control=JobControl(speed=SLOW, hooks=(running,))
                    )
                except Exception as exc:  # the model decides whether it was expected
                    job.outcome = exc
                    running.event.set()
                finally:
                    job.done.set()

            steps = len(self.disks[device].layers[1]) - 1  # (the first one is copied at once)
            box.append(Commit(job_id="", device=device, starter=client, steps_left=steps))
            self.w.tg.start_soon(commit)
            started.set()
            with anyio.fail_after(60):
                await running.event.wait()
            assert running.job_id is not None, box[0].outcome
            box[0].job_id = running.job_id
            return box[0]

        self.job = self.run(go)

    def other(self) -> VM:
        assert self.job is not None
        return self.w.clients[1 - self.job.starter]

    async def _adopted(self, vm: VM) -> Any:
        assert self.job is not None
        (job,) = [j for j in await adopt_jobs(vm.session, dismiss=False) if j.id == self.job.job_id]
        return job

    async def _wait_status(self, want: str) -> None:
        """Until QEMU lists the job with status ``want`` (bounded; by its events)."""
        assert self.job is not None
        job_id = self.job.job_id
        listed: dict[str, str] = {}
        with anyio.move_on_after(30), wire.job_events(self.w.vm.session) as stream:
            while True:
                listed = {j.id: j.status.value for j in await wire.query_jobs(self.w.vm.session)}
                if listed.get(job_id) == want:
                    return
                await stream.next()
        raise AssertionError(f"job {job_id} not {want} within 30 s: QEMU lists {listed}")

    @precondition(
        lambda self: self.job is not None and not self.job.paused and self.job.steps_left >= 2
    )
    @rule()
    def pause(self) -> None:
        """The other client pauses the job."""
        self.count("pause")

        async def go() -> None:
            await (await self._adopted(self.other())).pause()
            await self._wait_status("paused")

        self.run(go)
        assert self.job is not None
        self.job.paused = True

    @precondition(lambda self: self.job is not None and self.job.paused)
    @rule()
    def resume(self) -> None:
        self.count("resume")

        async def go() -> None:
            await (await self._adopted(self.other())).resume()
            await self._wait_status("running")

        self.run(go)
        assert self.job is not None
        self.job.paused = False
        self.job.steps_left -= 1

    @precondition(lambda self: self.job is not None)
    @rule()
    def cancel(self) -> None:
        """The other client cancels the job: the starter's commit ends in
        JobCancelledByOther, the chain as before (the base read-only again)."""
        self.count("cancel")
        job = self.job
        assert job is not None

        async def go() -> None:
            await (await self._adopted(self.other())).cancel()
            with anyio.fail_after(60):
                await job.done.wait()

        self.run(go)
        self.job = None
        assert isinstance(job.outcome, JobCancelledByOther), repr(job.outcome)

    @precondition(lambda self: self.job is not None and not self.job.paused)
    @rule(client=st.integers(0, 1))
    def finish(self, client: int) -> None:
        """A client lifts the speed limit; the starter's commit completes."""
        self.count("finish")
        job = self.job
        assert job is not None

        async def go() -> None:
            await (await self._adopted(self.w.clients[client])).set_speed(0)
            with anyio.fail_after(120):
                await job.done.wait()

        self.run(go)
        self._finished(job)

    def _finished(self, job: Commit) -> None:
        """The model of a commit that completed: the committed layer merged into its base."""
        self.job = None
        assert isinstance(job.outcome, chains.ChainResult), repr(job.outcome)
        layers = self.disks[job.device].layers
        layers[2] |= layers[1]
        del layers[1]

    @precondition(lambda self: self.job is not None)
    @rule(client=st.integers(0, 1), what=st.sampled_from(["unplug", "snapshot"]))
    def refused(self, client: int, what: str) -> None:
        """An unplug or snapshot of the committing disk is refused, nothing changed."""
        self.count("refused")
        assert self.job is not None
        device, job_id = self.job.device, self.job.job_id
        vm = self.w.clients[client]

        async def go() -> None:
            self.w.serials += 1
            attempt = (
                partial(drives.unplug, vm, device)
                if what == "unplug"
                else partial(
                    chains.external_snapshot,
                    vm,
                    f"s{self.w.serials}",
                    self.w.images,
                    devices=[device],
                )
            )
            with pytest.raises(Conflict) as refused:
                await attempt()
            assert refused.value.kind == "commit"
            assert refused.value.device == device
            assert refused.value.job_id == job_id

        self.run(go)

    @precondition(lambda self: self.idle_disks())
    @rule(
        client=st.integers(0, 1),
        kind=st.sampled_from(["full", "incremental"]),
        data=st.data(),
    )
    def backup(self, client: int, kind: str, data: st.DataObject) -> None:
        """A backup of one disk; its restore is the model's bytes."""
        self.count("backup")
        device = data.draw(st.sampled_from(self.idle_disks()), label="device")
        expected = bytes(self.disks[device].content)
        self.points += 1
        dest = self.w.work / f"restored-{self.w.examples}-{self.points}.raw"

        async def go() -> bytes:
            vm = self.w.clients[client]
            manifest = await backup.create(vm, self.repo, kind=kind, devices=[device])
            assert [d.device for d in manifest.disks] == [device]
            await backup.restore(
                self.repo, self.w.vm.name, manifest.id, device, dest, ImageFormat.RAW
            )
            try:
                return dest.read_bytes()
            finally:
                dest.unlink()

        restored = self.run(go)
        assert len(restored) == DISK
        assert sha(restored) == sha(expected), f"the backup of {device} restores other bytes"
        if self.job is not None and not self.job.paused:
            self._after_a_drain()

    def _after_a_drain(self) -> None:
        """A backup's ``transaction`` drains every node. QEMU 7.2 wakes a rate-limited job
        that a drain interrupted and lets it take its next step at once (QEMU 8.0 fixed it:
        the job sleeps out what its limit still owes), so on 7.2 each backup may move the
        running commit on, even to its end. The model follows QEMU's progress: the steps
        left are the chunks of the committed layer not yet copied; a commit that ended is
        one that finished (the starter's call returns a ChainResult)."""
        job = self.job
        assert job is not None

        async def go() -> JobInfo | None:
            listed = {j.id: j for j in await wire.query_jobs(self.w.vm.session)}
            info = listed.get(job.job_id)
            if info is None or info.status is not JobStatus.RUNNING:
                with anyio.fail_after(60):
                    await job.done.wait()
                return None
            return info

        info = self.run(go)
        if info is None:
            self._finished(job)
            return
        copied = info.current_progress
        job.steps_left = sum(1 for c in self.disks[job.device].layers[1] if c * CHUNK >= copied)

    # Section: after every step

    @invariant()
    def reports_equal_qemu_model_and_guest(self) -> None:
        async def go() -> None:
            for client in self.w.clients:
                await truth_check(client, cli=False)
            vm = self.w.clients[self.w.examples % 2]
            listed = await drives.list_drives(vm)
            assert sorted(d.device_id for d in listed) == sorted(self.disks)
            for d in listed:
                layers = [n for n in d.chain if n.driver not in _FILTERS]
                assert len(layers) == len(self.disks[d.device_id].layers), (
                    d.device_id,
                    [n.node_name for n in layers],
                )
            jobs = {j.id: j.status.value for j in await wire.query_jobs(vm.session)}
            expected = (
                {}
                if self.job is None
                else {self.job.job_id: "paused" if self.job.paused else "running"}
            )
            assert jobs == expected
            seen = await guest_devices(self.w.vm)
            assert sorted(seen) == sorted(d.serial for d in self.disks.values())
            for device, disk in self.disks.items():
                assert await guest_sha(self.w.vm, seen[disk.serial]) == sha(disk.content), (
                    f"the guest reads other bytes on {device}"
                )

        self.run(go)

    def teardown(self) -> None:
        """Back to a VM with no disk and no job, whatever the example left: each disk the
        model knows is unplugged by the client that did not hot-plug it, then anything else
        QEMU lists."""
        job = self.job
        owners = {device: disk.owner for device, disk in self.disks.items()}

        async def go() -> None:
            if job is not None:
                for j in await adopt_jobs(self.w.clients[0].session, dismiss=False):
                    await j.cancel()
                with anyio.fail_after(60):
                    await job.done.wait()
            for device, owner in owners.items():
                await drives.unplug(self.w.clients[1 - owner], device)
            for d in await drives.list_drives(self.w.clients[0]):
                await drives.unplug(self.w.clients[0], d.device_id)
            assert await guest_devices(self.w.vm) == {}

        self.run(go)


async def test_two_clients_random_operations(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    async with (
        open_vm(named(guest, "statem")) as vm,
        attach("statem", command="client A") as a,
        attach("statem", command="client B") as b,
    ):
        assert vm.console is not None
        await vm.console.wait_ready()
        assert a.monitor != b.monitor
        async with anyio.create_task_group() as tg:
            world = World(vm=vm, clients=(a, b), tg=tg, images=images, work=tmp_path)
            await anyio.to_thread.run_sync(
                partial(
                    run_state_machine_as_test,
                    # (Any factory of machines will do; the annotation says a class.)
                    cast(type[TwoClients], partial(TwoClients, world)),
                    settings=settings(
                        max_examples=6,
                        stateful_step_count=8,
                        deadline=None,
                        # One VM, real guest I/O: shrinking a failure would re-run QEMU
                        # operations for minutes; the failing steps are printed as they ran.
                        phases=(Phase.explicit, Phase.reuse, Phase.generate),
                        suppress_health_check=list(HealthCheck),
                    ),
                )
            )
        steps = ", ".join(f"{n} {name}" for name, n in sorted(world.steps.items()))
        report(
            "two clients, stateful",
            f"{world.examples} random sequences on one VM from two clients, each step checked "
            f"(both clients' reports vs QEMU, the model, the guest's reads): {steps}",
        )
