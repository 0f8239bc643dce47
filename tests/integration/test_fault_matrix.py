"""The fault-injection matrix (issue #7, qemu-facts §4): every long job, where the I/O fails,
how it fails, and the job's error policy, against real QEMU and QEMU's ``blkdebug`` driver.

{intermediate commit, active commit, stream}
x {source read error, target write error} x {EIO, ENOSPC} x {report, stop, enospc, ignore}
= 48 cases, in one running VM (the guest keeps running throughout). Each case builds its chain
with blockctl (issue 22): a new base image hot-plugged (``drives.hotplug``), then external
snapshots (``chains.external_snapshot``), each layer given its own data through the device.
blockctl's snapshots cannot insert a ``blkdebug`` node, so the test inserts one under the layer
that fails (``blockdev-reopen`` with it as the layer's ``file``) and records it in blockctl's
drive registry: blockctl's own read-write reopen of a commit's base and its read-only restore
afterwards run under the fault. The operation runs through blockctl's library API on the
device, and the case checks (each check recorded for the figure only once it held):

- the outcome blockctl reports: ``report`` → :class:`JobFailed` naming QEMU's error; ``stop``
  (and ``enospc`` with ENOSPC) → the job paused, was not resumed, and was cancelled
  (:class:`JobStoppedOnError`); ``enospc`` with EIO → reported; ``ignore`` → the request is
  retried (blockctl resumes the stopped job) ``IGNORE_RETRIES`` times, then the job fails;
- the chain is untouched (the same layers and links); every backing layer is read-only
  again, in QEMU and in blockctl's record, except a commit base behind a persistent write
  fault (QEMU flushes a node before reopening it; that flush fails, so the base stays
  read-write, and blockctl's record says so);
- the blkdebug node is still under its layer (blockctl's reopens sent the complete options);
- once the drive is unplugged, no job and no node is left (the node set is as before);
- the source data is unchanged: the top image reads, through its chain, exactly the bytes
  its layers were given;
- ``qemu-img check`` is clean on every image of the case.

The faults are persistent (every matching request fails), so a case never depends on timing.
Source read errors are rules on ``read_aio`` of a layer's file (data reads only: qcow2
metadata reads do not fire it); target write errors are rules on ``write_aio``.

Backups are not here: they read a fleecing export over NBD (no QEMU job writes a target, so
no error policy applies); their faults at every step, ENOSPC and kill -9 are in
``test_backup_faults.py``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

from blockctl import GuestImage, LaunchedVM
from blockctl._images import check
from blockctl._jobs import IGNORE_RETRIES
from blockctl._ops import chains, drives
from blockctl._ops.drives import UnplugState
from blockctl._qmp import wire
from blockctl.errors import JobFailed, JobStoppedOnError
from blockctl.jobs import JobControl
from blockctl.types import Drive, ErrorPolicy, ImageFormat
from tests.conftest import missing
from tests.figures import Tally, report, require_any
from tests.integration.conftest import (
    MIB,
    PauseSignal,
    base_config,
    run,
    vm_in_background,
)

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="module")]

OPS = ("commit-intermediate", "commit-active", "stream")
SIDES = ("source", "target")
ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
MESSAGES = {"EIO": "Input/output error", "ENOSPC": "No space left on device"}
POLICIES = tuple(ErrorPolicy)
CASES = [
    pytest.param(op, side, err, policy, id=f"{op}-{side}-{err}-{policy.value}")
    for op, side, err, policy in itertools.product(OPS, SIDES, ERRNOS, POLICIES)
]
SIZE = 16 * MIB
#: A job paused on an error waits this long for a resume that never comes (then is cancelled).
PAUSE_TIMEOUT = 0.3
#: Case outcomes, for the figure: case id -> the outcome class seen (set once it passed).
OUTCOMES: dict[str, str] = {}
#: How long the guest may take to release an unplugged disk (a loaded host is slow).
UNPLUG_TIMEOUT = 120.0

_serial = itertools.count(1)


@dataclass
class Rig:
    vm: LaunchedVM
    baseline: frozenset[str]  # node names of the VM before any case


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(guest: GuestImage, module_runtime_dir: Path) -> AsyncIterator[Rig]:
    async with vm_in_background(base_config(guest, name="faults")) as vm:
        yield Rig(vm=vm, baseline=frozenset(await node_names(vm)))


async def node_names(vm: LaunchedVM) -> set[str]:
    return {n.node_name for n in await vm.block_nodes()}


# Section: building a case's chain, with blockctl

CHECKS = {
    "outcome": "outcome as expected",
    "chain": "chain unchanged",
    "read-only": "backing layers read-only again where QEMU could flush them",
    "blkdebug": "blkdebug kept through blockctl's reopens",
    "nothing-left": "no job or node left",
    "bytes": "source byte-identical",
    "check": "qemu-img check clean",
}
#: One tally per figure line: the 48 persistent faults, the 6 transient ones, real ENOSPC.
FAULTS = Tally(CHECKS)
TRANSIENT = Tally(CHECKS)
ENOSPC = Tally(CHECKS)


def rule(event: str, err: str, *, once: bool = False) -> dict[str, Any]:
    """A blkdebug rule failing every ``event`` request (``once``: only the first one)."""
    return {"event": event, "errno": ERRNOS[err], **({"once": True} if once else {})}


def layer_data(
    count: int, offset_mib: int = 1, length_mib: int = 2, write: Sequence[bool] = ()
) -> bytes:
    """What the device reads once layer ``i`` (base first) wrote byte ``0x41 + i`` over
    ``length_mib`` MiB from ``offset_mib + i`` MiB (unless ``write[i]`` is false): every layer
    holds data the ones above do not all hide."""
    data = bytearray(SIZE)
    for i in range(count):
        if i < len(write) and not write[i]:
            continue
        start = (offset_mib + i) * MIB
        data[start : start + length_mib * MIB] = bytes([0x41 + i]) * (length_mib * MIB)
    return bytes(data)


async def guest_write(vm: LaunchedVM, device: str, command: str) -> None:
    """A write through the device's own block backend (HMP ``qemu-io``), as the guest's
    writes go: into the active layer of the chain blockctl built."""
    out = await vm.command(
        "human-monitor-command",
        {"command-line": f'qemu-io -d /machine/peripheral/{device}/virtio-backend "{command}"'},
    )
    assert "error" not in str(out).lower(), out


@dataclass
class Chain:
    """A drive blockctl plugged and snapshotted: its device, its layers' files (base first)
    and node names (base first)."""

    device: str
    paths: list[Path]
    names: list[str]


async def build_chain(
    vm: LaunchedVM,
    directory: Path,
    count: int,
    *,
    base_dir: Path | None = None,
    overlay_dirs: Sequence[Path] = (),
    write: Sequence[bool] = (),
    offset_mib: int = 1,
    length_mib: int = 2,
) -> Chain:
    """``count`` layers made by blockctl: the base (a new qcow2 image, ``base_dir``) hot-plugged
    with :func:`drives.hotplug`, then ``count - 1`` external snapshots
    (:func:`chains.external_snapshot`, overlays in ``overlay_dirs[i]``). Layer ``i`` gets
    its data as :func:`layer_data` says (the base offline before the plug, the overlays
    through the device), unless ``write[i]`` is false."""
    n = next(_serial)
    base = (base_dir or directory) / f"base{n}.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))

    def writes(i: int) -> bool:
        return write[i] if i < len(write) else True

    def command(i: int) -> str:
        return f"write -P {0x41 + i} {offset_mib + i}M {length_mib}M"

    if writes(0):
        await run("qemu-io", "-f", "qcow2", "-c", command(0), base)
    info = await drives.hotplug(vm, Drive(file=base, format=ImageFormat.QCOW2))
    paths = [base]
    for i in range(1, count):
        where = overlay_dirs[i - 1] if i - 1 < len(overlay_dirs) else directory
        snap = await chains.external_snapshot(vm, f"f{n}-{i}", where, devices=[info.device_id])
        paths.append(snap.overlays[info.device_id])
        if writes(i):
            await guest_write(vm, info.device_id, command(i))
    chain = (await chains.read_graph(vm)).chain_of(info.device_id)
    assert [node.filename for node in chain] == [str(p) for p in reversed(paths)]
    return Chain(info.device_id, paths, [node.name for node in reversed(chain)])


async def insert_blkdebug(vm: LaunchedVM, device: str, name: str, rules: list[Any]) -> str:
    """Put a blkdebug node failing as ``rules`` say between the layer ``name`` (a format
    node blockctl opened) and its file node: ``blockdev-add`` it over the file node, then
    ``blockdev-reopen`` the layer with it as its ``file``. blockctl's snapshots cannot
    insert one, so the test does, and records it in blockctl's drive registry as if blockctl
    had opened the layer that way: every later reopen by blockctl (a commit's read-write
    reopen of its base, the read-only restore afterwards) sends the layer's complete
    options, blkdebug included. Returns the blkdebug node's name."""
    graph = await chains.read_graph(vm)
    node = graph.nodes[name]
    assert node.file_child is not None
    dbg = f"{name}-dbg"
    spec = {"driver": "blkdebug", "node-name": dbg, "image": node.file_child}
    await wire.blockdev_add(vm.session, {**spec, "inject-error": rules})
    record = vm.registry.drives[device]
    [options] = [dict(o) for o in record.nodes if o["node-name"] == name]
    options["file"] = dbg
    if "backing" in options:
        options["backing"] = node.backing  # the live link (a snapshot recorded null)
    await wire.blockdev_reopen(vm.session, [options])
    nodes: list[dict[str, Any]] = []
    for o in record.nodes:
        if o["node-name"] == name:
            nodes += [{**spec, "inject-error": rules, "read-only": options.get("read-only")}]
            nodes.append({**o, "file": dbg})
        else:
            nodes.append(dict(o))
    nodes = [{k: v for k, v in o.items() if v is not None} for o in nodes]
    vm.registry.put(replace(record, nodes=tuple(nodes)))
    return dbg


async def assert_same(path: Path, expected: bytes, scratch: Path) -> None:
    """``path`` through its chain reads exactly ``expected`` (QEMU has let go of it); the
    raw copy goes to ``scratch`` (not beside the image: it may be on a full tmpfs)."""
    out = scratch / "read-back.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out)
    try:
        assert out.read_bytes() == expected, f"{path} reads other data"
    finally:
        out.unlink()


async def assert_clean(*paths: Path) -> None:
    for path in paths:
        result = await check(path, ImageFormat.QCOW2)
        assert (result.check_errors, result.corruptions, result.leaks) == (0, 0, 0), (
            path,
            result,
        )


def expected_outcome(op: str, err: str, policy: ErrorPolicy) -> type[JobFailed]:
    if policy is ErrorPolicy.STOP or (policy is ErrorPolicy.ENOSPC and err == "ENOSPC"):
        return JobStoppedOnError
    return JobFailed


def check_outcome(raised: JobFailed, op: str, side: str, err: str, policy: ErrorPolicy) -> None:
    expected = expected_outcome(op, err, policy)
    assert type(raised) is expected, f"{type(raised).__name__}: {raised}"
    message = str(raised)
    if expected is JobStoppedOnError:
        assert isinstance(raised, JobStoppedOnError)
        # QEMU's stream job reports its copy-on-read write errors as reads too.
        assert raised.operation == ("read" if side == "source" or op == "stream" else "write")
        assert "was not resumed" in message
        assert ("no space left" in message) == (err == "ENOSPC"), message
        assert raised.io_status == ("nospace" if err == "ENOSPC" else "failed")
    elif policy is ErrorPolicy.IGNORE:
        # Retried (blockctl resumes the stopped job), a bounded number of times, then failed.
        assert "error policy ignore" in message, message
        assert f"retried {IGNORE_RETRIES} times" in message, message
    else:
        assert MESSAGES[err] in message, message


async def no_leftovers(rig: Rig) -> None:
    assert await wire.query_jobs(rig.vm.session) == ()
    assert await node_names(rig.vm) == set(rig.baseline)
    assert (await rig.vm.status()).running


async def backing_read_only(vm: LaunchedVM, device: str, *, unflushable: str | None = None) -> None:
    """Every layer below the top is read-only in QEMU, and blockctl's record says what QEMU
    says. ``unflushable``: a layer whose storage fails every write: QEMU flushes a node
    before it reopens it, the flush fails, so blockctl cannot make it read-only again (it logs
    ``blockctl.commit.read_only_not_restored``); it must be read-write in both."""
    graph = await chains.read_graph(vm)
    chain = graph.chain_of(device)
    record = {str(o["node-name"]): o for o in vm.registry.drives[device].nodes}
    for node in chain[1:]:
        expected = node.name != unflushable
        assert node.read_only is expected, f"{node.name}: read-only {node.read_only}"
        assert record[node.name].get("read-only") is expected, (node.name, record[node.name])
    assert not chain[0].read_only


# Section: the cases


async def chain_case(
    rig: Rig,
    directory: Path,
    op: str,
    side: str,
    err: str,
    policy: ErrorPolicy,
    transient: bool = False,
) -> None:
    vm = rig.vm
    case = f"{op}-{side}-{err}-{policy.value}" if not transient else f"{op}-{side}"
    tally = TRANSIENT if transient else FAULTS
    with tally.case(case) as ok:
        count = 2 if op == "commit-active" else 3
        built = await build_chain(vm, directory, count)
        expected = layer_data(count)
        names, device = built.names, built.device
        # Which layer fails (base first): the one the job reads (source) or writes (target).
        failing = {
            ("commit-intermediate", "source"): 1,  # mid is read
            ("commit-intermediate", "target"): 0,  # base is written
            ("commit-active", "source"): 1,  # the active layer is read
            ("commit-active", "target"): 0,  # base is written
            ("stream", "source"): 1,  # mid (a backing layer) is read
            ("stream", "target"): 2,  # the active layer is written
        }[(op, side)]
        event = "read_aio" if side == "source" else "write_aio"
        dbg = await insert_blkdebug(vm, device, names[failing], [rule(event, err, once=transient)])
        if op == "stream":
            job = chains.stream(
                vm,
                device,
                control=JobControl(on_error=policy, pause_timeout=PAUSE_TIMEOUT, hooks=()),
            )
        else:
            job = chains.commit(
                vm,
                device,
                top=None if op == "commit-active" else names[1],
                base=names[0],
                control=JobControl(
                    on_error=policy, pause_timeout=PAUSE_TIMEOUT, deadline=120, hooks=()
                ),
            )
        if transient:
            result = await job  # the one failed request was retried
            if op == "commit-intermediate":
                kept = [names[2], names[0]]  # mid merged into base
            elif op == "commit-active":
                kept = [names[0]]  # pivoted onto base
            else:
                kept = [names[2]]  # everything streamed into the active layer
            assert list(result.chain) == kept
            final = built.paths[names.index(kept[0])]
            outcome = "completed"
        else:
            with pytest.raises(JobFailed) as info:
                await job
            check_outcome(info.value, op, side, err, policy)
            kept = list(reversed(names))  # untouched: the same layers and links
            final = built.paths[-1]
            outcome = type(info.value).__name__
        ok.add("outcome")
        graph = await chains.read_graph(vm)
        assert [node.name for node in graph.chain_of(device)] == kept
        ok.add("chain")
        # A failed commit leaves its base behind a persistent write fault: unflushable.
        unflushable = (
            names[0] if not transient and op.startswith("commit") and side == "target" else None
        )
        await backing_read_only(vm, device, unflushable=unflushable)
        ok.add("read-only")
        # The fault layer is still where it was put, unless the job removed its layer.
        if names[failing] in kept:
            assert graph.nodes[names[failing]].file_child == dbg, graph.nodes[names[failing]]
        else:
            assert dbg not in graph.nodes
        ok.add("blkdebug")
        unplugged = await drives.unplug(vm, device, timeout=UNPLUG_TIMEOUT)
        assert unplugged.state is UnplugState.REMOVED, unplugged
        await no_leftovers(rig)
        ok.add("nothing-left")
        await assert_same(final, expected, directory)  # what the device read before
        ok.add("bytes")
        await assert_clean(*built.paths)
        ok.add("check")
        OUTCOMES[case] = outcome


@pytest.mark.parametrize(("op", "side", "err", "policy"), CASES)
async def test_fault(
    rig: Rig, tmp_path: Path, op: str, side: str, err: str, policy: ErrorPolicy
) -> None:
    await chain_case(rig, tmp_path, op, side, err, policy)


# Section: real ENOSPC (no injection): a small tmpfs fills up, grows, the job resumes

ENOSPC_OPS = ("commit-intermediate", "commit-active", "stream")
ENOSPC_POLICIES = (ErrorPolicy.ENOSPC, ErrorPolicy.STOP, ErrorPolicy.REPORT)


@contextlib.asynccontextmanager
async def small_tmpfs(path: Path, size: str) -> AsyncIterator[Path]:
    if os.geteuid() != 0:
        missing("root (to mount a small tmpfs)")
    path.mkdir()
    await run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        await run("umount", "-l", path)  # lazy: a failed case may still hold a file open


async def grow_and_resume(vm: LaunchedVM, signal_: PauseSignal, mount: Path) -> None:
    """The operator: once the job paused on the full disk, grow the tmpfs and resume it."""
    await signal_.paused.wait()
    job_id = signal_.errors[0].job_id
    assert await wire.block_job_io_status(vm.session, job_id) == "nospace"
    await run("mount", "-o", "remount,size=64m", mount)
    await wire.job_resume(vm.session, job_id)


@pytest.mark.parametrize(
    ("op", "policy"),
    [pytest.param(op, p, id=f"{op}-{p.value}") for op in ENOSPC_OPS for p in ENOSPC_POLICIES],
)
async def test_real_enospc(rig: Rig, tmp_path: Path, op: str, policy: ErrorPolicy) -> None:
    """The job's target lives on a 1 MiB tmpfs and needs 6 MiB. ``report``: a clean failure
    (the source reads the same). ``enospc``/``stop``: the job pauses with
    io-status ``nospace``; the tmpfs grows and the job is resumed; the result is exact.
    The chain is blockctl's: the base hot-plugged, the layers above external snapshots; the
    layer on the tmpfs (a commit's base, a stream's active layer) holds no data of its own."""
    vm = rig.vm
    signal_ = PauseSignal()
    case = f"{op}-{policy.value}"
    async with small_tmpfs(tmp_path / "small", "1m") as small, anyio.create_task_group() as tg:
        with ENOSPC.case(case, required=frozenset(CHECKS) - {"blkdebug"}) as ok:
            if policy is not ErrorPolicy.REPORT:
                tg.start_soon(grow_and_resume, vm, signal_, small)
            count = 2 if op == "commit-active" else 3
            on_tmpfs = count - 1 if op == "stream" else 0
            write = [i != on_tmpfs for i in range(count)]
            built = await build_chain(
                vm,
                tmp_path,
                count,
                base_dir=small if on_tmpfs == 0 else None,
                overlay_dirs=[small if i == on_tmpfs else tmp_path for i in range(1, count)],
                write=write,
                offset_mib=0,
                length_mib=6,
            )
            expected = layer_data(count, offset_mib=0, length_mib=6, write=write)
            names, device = built.names, built.device
            job: Coroutine[Any, Any, chains.ChainResult]
            if op == "stream":
                job = chains.stream(
                    vm,
                    device,
                    control=JobControl(on_error=policy, pause_timeout=300, hooks=[signal_]),
                )
            else:
                job = chains.commit(
                    vm,
                    device,
                    top=None if op == "commit-active" else names[1],
                    base=names[0],
                    control=JobControl(on_error=policy, pause_timeout=300, hooks=[signal_]),
                )
            if policy is ErrorPolicy.REPORT:
                with pytest.raises(JobFailed, match="No space left on device") as info:
                    await job
                assert type(info.value) is JobFailed, info.value  # reported, not paused
                kept = list(reversed(names))
            else:
                result = await job
                # (A stream job reports its copy-on-read write errors as reads.)
                assert [e.operation for e in signal_.errors][:1] == [
                    "read" if op == "stream" else "write"
                ]
                kept = list(result.chain)
            ok.add("outcome")
            graph = await chains.read_graph(vm)
            assert [node.name for node in graph.chain_of(device)] == kept
            ok.add("chain")
            await backing_read_only(vm, device)
            ok.add("read-only")
            final = built.paths[names.index(kept[0])]
            unplugged = await drives.unplug(vm, device, timeout=UNPLUG_TIMEOUT)
            assert unplugged.state is UnplugState.REMOVED, unplugged
            await no_leftovers(rig)
            ok.add("nothing-left")
            await assert_same(final, expected, tmp_path)  # what the device read before
            ok.add("bytes")
            await assert_clean(*(p for p in built.paths if p.exists()))
            ok.add("check")


@pytest.mark.parametrize(
    ("op", "side"), [pytest.param(op, side, id=f"{op}-{side}") for op in OPS for side in SIDES]
)
async def test_transient_fault_is_retried_under_ignore(
    rig: Rig, tmp_path: Path, op: str, side: str
) -> None:
    """One failing request (blkdebug ``once``), policy ``ignore``: the retry succeeds and the
    result is complete and exact (a commit or stream leaves a chain that reads the same)."""
    await chain_case(rig, tmp_path, op, side, "EIO", ErrorPolicy.IGNORE, transient=True)


def selected(request: pytest.FixtureRequest, prefix: str) -> int:
    return sum(
        1
        for item in request.session.items
        if item.path == request.path and item.name.startswith(prefix)
    )


async def test_figures(request: pytest.FixtureRequest) -> None:
    """Print the figure, computed from the cases' checks; fails if no case ran (or a
    selected one never started)."""
    FAULTS.require_cases(selected(request, "test_fault["))
    TRANSIENT.require_cases(selected(request, "test_transient_fault"))
    ENOSPC.require_cases(selected(request, "test_real_enospc"))
    require_any(FAULTS, TRANSIENT, ENOSPC)
    parts = []
    if FAULTS.tried:
        kinds = Counter(OUTCOMES[c] for c in FAULTS.complete())
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        parts.append(f"{FAULTS.summary()} ({outcomes}): {FAULTS.phrases()}")
    if TRANSIENT.tried:
        parts.append(
            f"transient faults under ignore: {TRANSIENT.summary()}, retried to a complete "
            f"result ({TRANSIENT.phrases('bytes')})"
        )
    if ENOSPC.tried:
        parts.append(
            f"real ENOSPC (tmpfs full: reported, or paused, grown, resumed): "
            f"{ENOSPC.summary()} ({ENOSPC.phrases('bytes')})"
        )
    line = "; ".join(parts)
    report("fault injection", line)  # printed at the end of the suite
