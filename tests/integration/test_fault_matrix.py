"""The fault-injection matrix (issue #7, qemu-facts §4): every long job, where the I/O fails,
how it fails, and the job's error policy, against real QEMU and QEMU's ``blkdebug`` driver.

{intermediate commit, active commit, stream}
x {source read error, target write error} x {EIO, ENOSPC} x {report, stop, enospc, ignore}
= 48 cases. Each case builds its own images, opens them in one running VM (the guest keeps
running throughout), runs the operation through blockctl's library API, and checks:

- the outcome blockctl reports: ``report`` → :class:`JobFailed` naming QEMU's error; ``stop``
  (and ``enospc`` with ENOSPC) → the job paused, was not resumed, and was cancelled
  (:class:`JobStoppedOnError`); ``enospc`` with EIO → reported; ``ignore`` → the request is
  retried (blockctl resumes the stopped job) 16 times, then the job fails;
- the source data is unchanged: what the device reads through its chain is byte-identical to
  what it read before (``qemu-img compare`` once QEMU has let go of the images);
- ``qemu-img check`` is clean on every qcow2 image of the case;
- no job and no node is left behind (the node set is back to what it was).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

from blockctl import GuestImage, LaunchedVM
from blockctl._ops import chains
from blockctl._qmp import wire
from blockctl.errors import JobFailed, JobStoppedOnError
from blockctl.types import ErrorPolicy
from tests.conftest import missing
from tests.figures import report
from tests.integration.conftest import MIB, PauseSignal, base_config, run, vm_in_background

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
#: Case outcomes, for the figure: (op, side, errno, policy) -> the outcome class seen.
OUTCOMES: dict[tuple[str, str, str, str], str] = {}

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


# Section: building a case's chain


def rule(event: str, err: str, *, once: bool = False) -> dict[str, Any]:
    """A blkdebug rule failing every ``event`` request (``once``: only the first one)."""
    return {"event": event, "errno": ERRNOS[err], **({"once": True} if once else {})}


@dataclass
class Layer:
    """One qcow2 layer: ``name`` (format node), ``<name>-file``, and optionally a blkdebug
    node ``<name>-dbg`` between them failing as ``rules`` say."""

    name: str
    path: Path
    rules: Sequence[dict[str, Any]] = ()

    def nodes(self, backing: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"driver": "file", "node-name": f"{self.name}-file", "filename": str(self.path)}
        ]
        file_node = f"{self.name}-file"
        if self.rules:
            dbg: dict[str, Any] = {
                "driver": "blkdebug",
                "node-name": f"{self.name}-dbg",
                "image": file_node,
                "inject-error": list(self.rules),
            }
            out.append(dbg)
            file_node = f"{self.name}-dbg"
        out.append(
            {"driver": "qcow2", "node-name": self.name, "file": file_node, "backing": backing}
        )
        return out

    def names(self) -> list[str]:
        """Top-down, for blockdev-del."""
        return [self.name, *([f"{self.name}-dbg"] if self.rules else []), f"{self.name}-file"]


async def qemu_io(path: Path, *commands: str) -> None:
    argv: list[str | Path] = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    await run(*argv, path)


async def make_chain(directory: Path, count: int) -> list[Path]:
    """``count`` qcow2 layers, base first, each writing its own pattern over 2 MiB from
    ``1 MiB + i MiB`` (so every layer holds data the ones above do not all hide)."""
    paths: list[Path] = []
    for i in range(count):
        path = directory / f"l{i}.qcow2"
        argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if paths:
            argv += ["-b", paths[-1], "-F", "qcow2"]
        await run(*argv, path, str(SIZE))
        await qemu_io(path, f"write -P {0x41 + i} {1 + i}M 2M")
        paths.append(path)
    return paths


async def add_chain(vm: LaunchedVM, layers: Sequence[Layer]) -> None:
    """Open ``layers`` (base first) in QEMU, each backed by the one before."""
    backing: str | None = None
    for layer in layers:
        # The base gets "backing": null: nothing below it, stated rather than read.
        for node in layer.nodes(backing):
            await wire.blockdev_add(vm.session, node)
        backing = layer.name


async def remove(vm: LaunchedVM, layers: Sequence[Layer]) -> None:
    """Delete the nodes top-down."""
    for layer in reversed(layers):
        for name in layer.names():
            await wire.blockdev_del(vm.session, name)


async def snapshot_of(path: Path, out: Path) -> Path:
    """What a reader of ``path`` (through its backing chain) sees, as a raw file."""
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out)
    return out


async def assert_same(path: Path, expected: Path) -> None:
    """``path`` through its chain reads exactly like ``expected`` (qemu-img compare: 0)."""
    await run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", path, expected)


async def assert_clean(*paths: Path) -> None:
    for path in paths:
        out = await run("qemu-img", "check", "-f", "qcow2", "--output=json", path)
        assert '"corruptions"' not in out or '"corruptions": 0' in out, out
        assert '"leaks"' not in out or '"leaks": 0' in out, out


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
        assert "error policy ignore" in message and "retried 16 times" in message, message
    else:
        assert MESSAGES[err] in message, message
    OUTCOMES[(op, side, err, policy.value)] = type(raised).__name__


async def no_leftovers(rig: Rig) -> None:
    assert await wire.query_jobs(rig.vm.session) == ()
    assert await node_names(rig.vm) == set(rig.baseline)
    assert (await rig.vm.status()).running


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
    vm, n = rig.vm, next(_serial)
    count = 2 if op == "commit-active" else 3
    paths = await make_chain(directory, count)
    expected = await snapshot_of(paths[-1], directory / "expected.raw")
    names = [f"c{n}-{i}" for i in range(count)]
    # Which layer fails: the one the job reads (source) or the one it writes (target).
    failing = {
        ("commit-intermediate", "source"): 1,  # mid is read
        ("commit-intermediate", "target"): 0,  # base is written
        ("commit-active", "source"): 1,  # the active layer is read
        ("commit-active", "target"): 0,  # base is written
        ("stream", "source"): 1,  # mid (a backing layer) is read
        ("stream", "target"): 2,  # the active layer is written
    }[(op, side)]
    event = "read_aio" if side == "source" else "write_aio"
    layers = [
        Layer(name, path, rules=[rule(event, err, once=transient)] if i == failing else ())
        for i, (name, path) in enumerate(zip(names, paths, strict=True))
    ]
    await add_chain(vm, layers)
    top = names[-1]
    if op == "stream":
        job = chains.stream(vm, top, on_error=policy, pause_timeout=PAUSE_TIMEOUT, hooks=())
    else:
        job = chains.commit(
            vm,
            top,
            top=None if op == "commit-active" else names[1],
            base=names[0],
            on_error=policy,
            pause_timeout=PAUSE_TIMEOUT,
            deadline=120,
            hooks=(),
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
        # What blockctl did not delete is what the chain still holds.
        layers = [layer for layer in layers if layer.name in kept]
        top, final = kept[0], paths[names.index(kept[0])]
    else:
        with pytest.raises(JobFailed) as info:
            await job
        check_outcome(info.value, op, side, err, policy)
        final = paths[-1]
    # The chain is as expected: untouched after a failure (the same layers and links).
    graph = await chains.read_graph(vm)
    assert [node.name for node in graph.chain_of(top)] == (
        list(result.chain) if transient else list(reversed(names))
    )
    await remove(vm, layers)
    await no_leftovers(rig)
    await assert_same(final, expected)  # the device would read exactly what it read
    await assert_clean(*paths)


@pytest.mark.parametrize(("op", "side", "err", "policy"), CASES)
async def test_fault(
    rig: Rig, tmp_path: Path, op: str, side: str, err: str, policy: ErrorPolicy
) -> None:
    await chain_case(rig, tmp_path, op, side, err, policy)


# Section: real ENOSPC (no injection): a small tmpfs fills up, grows, the job resumes

ENOSPC_OPS = ("commit-intermediate", "commit-active", "stream")
ENOSPC_POLICIES = (ErrorPolicy.ENOSPC, ErrorPolicy.STOP, ErrorPolicy.REPORT)
ENOSPC_DONE: list[str] = []


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
    io-status ``nospace``; the tmpfs grows and the job is resumed; the result is exact."""
    vm, n = rig.vm, next(_serial)
    signal_ = PauseSignal()
    async with small_tmpfs(tmp_path / "small", "1m") as small, anyio.create_task_group() as tg:
        if policy is not ErrorPolicy.REPORT:
            tg.start_soon(grow_and_resume, vm, signal_, small)
        # Layers base first; the one the job writes is on the tmpfs; the data is 6 MiB.
        count = 2 if op == "commit-active" else 3
        on_tmpfs = count - 1 if op == "stream" else 0
        paths: list[Path] = []
        for i in range(count):
            path = (small if i == on_tmpfs else tmp_path) / f"l{i}.qcow2"
            argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if paths:
                argv += ["-b", paths[-1], "-F", "qcow2"]
            await run(*argv, path, str(SIZE))
            if i != on_tmpfs:
                await qemu_io(path, f"write -P {0x61 + i} {i}M 6M")
            paths.append(path)
        expected = await snapshot_of(paths[-1], tmp_path / "expected.raw")
        layers = [Layer(f"e{n}-{i}", p) for i, p in enumerate(paths)]
        await add_chain(vm, layers)
        top = layers[-1].name
        job: Coroutine[Any, Any, chains.ChainResult]
        if op == "stream":
            job = chains.stream(vm, top, on_error=policy, pause_timeout=300, hooks=[signal_])
        else:
            job = chains.commit(
                vm,
                top,
                top=None if op == "commit-active" else layers[1].name,
                base=layers[0].name,
                on_error=policy,
                pause_timeout=300,
                hooks=[signal_],
            )
        kept = layers
        if policy is ErrorPolicy.REPORT:
            with pytest.raises(JobFailed, match="No space left on device"):
                await job
        else:
            result = await job
            # (A stream job reports its copy-on-read write errors as reads.)
            assert [e.operation for e in signal_.errors][:1] == [
                "read" if op == "stream" else "write"
            ]
            kept = [layer for layer in layers if layer.name in result.chain]
            top = result.chain[0]
        assert await wire.query_jobs(vm.session) == ()
        await remove(vm, kept)
        await no_leftovers(rig)
        final = next(layer.path for layer in kept if layer.name == top)
        await assert_same(final, expected)  # the device reads exactly what it read
        await assert_clean(*(p for p in paths if p.exists()))
    ENOSPC_DONE.append(f"{op}-{policy.value}")


TRANSIENT: list[str] = []


@pytest.mark.parametrize(
    ("op", "side"), [pytest.param(op, side, id=f"{op}-{side}") for op in OPS for side in SIDES]
)
async def test_transient_fault_is_retried_under_ignore(
    rig: Rig, tmp_path: Path, op: str, side: str
) -> None:
    """One failing request (blkdebug ``once``), policy ``ignore``: the retry succeeds and the
    result is complete and exact (a commit or stream leaves a chain that reads the same)."""
    await chain_case(rig, tmp_path, op, side, "EIO", ErrorPolicy.IGNORE, transient=True)
    TRANSIENT.append(f"{op}-{side}")


async def test_figures(request: pytest.FixtureRequest) -> None:
    """Every selected case recorded its outcome; print the figure."""
    selected = [
        item
        for item in request.session.items
        if item.path == request.path and item.name.startswith("test_fault[")
    ]
    assert len(OUTCOMES) == len(selected)
    transient = [
        item
        for item in request.session.items
        if item.path == request.path and item.name.startswith("test_transient_fault")
    ]
    assert len(TRANSIENT) == len(transient)
    real = [
        item
        for item in request.session.items
        if item.path == request.path and item.name.startswith("test_real_enospc")
    ]
    assert len(ENOSPC_DONE) == len(real)
    kinds = Counter(OUTCOMES.values())
    line = (
        f"{len(OUTCOMES)} of {len(selected)} fault cases passed "
        f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}): the source read the same "
        "in every case, qemu-img check "
        f"clean, no job or node left; {len(TRANSIENT)} transient faults retried under ignore "
        f"to a complete, exact result; {len(ENOSPC_DONE)} real-ENOSPC cases (tmpfs full: "
        "reported, or paused, grown, resumed to an exact result)"
    )
    report("fault injection", line)  # printed at the end of the suite
