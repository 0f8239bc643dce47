"""Fixtures for tests against real QEMU and the real test guest.

Every test gets a private, short runtime directory (unix socket paths must stay under 108
bytes, which pytest's tmp_path does not guarantee) and, after it, a check that no QEMU it
started is still running: a leak fails the test, after the leaked process is killed.

The QEMU programs are the ones blockctl would run (``BLOCKCTL_QEMU_SYSTEM`` … or
``BLOCKCTL_QEMU_PREFIX``, see ``blockctl/_binaries.py``): helper commands go through
:func:`qemu_binary` / :func:`run`, never a bare name, so one variable switches the whole suite
to another QEMU. VMs launch with ``-compat deprecated-input=reject`` (:func:`base_config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import VM, GuestImage, LaunchedVM, _binaries, _machine, _runtime, find_guest, open_vm
from blockctl._jobs import JobIOError, JobProgress, JobTransition
from blockctl._qmp import wire
from blockctl.errors import BlockctlError, MissingComponent
from blockctl.types import DeprecatedInput, Drive, MachineConfig
from tests.conftest import missing
from tests.figures import Tally, report

MIB = 1 << 20


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    for program in _binaries.PROGRAMS:
        if program == "qemu-storage-daemon":
            continue  # only for vhost-user-blk disks: their tests ask for it themselves
        if shutil.which(qemu_binary(program)) is None:
            missing(f"{qemu_binary(program)} ({_binaries.install_hint(program)})")
    try:
        return find_guest()
    except MissingComponent as exc:
        missing(str(exc))
        raise


def pids_under(directory: Path, program: Callable[[bytes], bool]) -> list[int]:
    """Processes whose command line mentions ``directory`` and whose command line (NUL
    separated) ``program`` accepts."""
    needle = os.fsencode(str(directory))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if program(cmdline) and needle in cmdline:
            pids.append(int(entry.name))
    return pids


def qemu_pids_under(directory: Path) -> list[int]:
    """QEMU processes (and qemu-storage-daemons) whose command line mentions ``directory``
    (their run dir lives there)."""
    return pids_under(
        directory, lambda cmdline: b"qemu-system" in cmdline or b"qemu-storage-daemon" in cmdline
    )


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has an empty cmdline)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bct-", dir="/tmp"))
    monkeypatch.setenv("BLOCKCTL_RUNTIME_DIR", str(root))
    yield root
    leaked = qemu_pids_under(root)
    # Live restore's NBD servers keep their socket in the VM's run directory, under this
    # root: one left behind (seen when QEMU died under a test) would outlive the run.
    servers = pids_under(root, lambda cmdline: cmdline.startswith(b"nbdkit\0"))
    for pid in leaked + servers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert not leaked, f"QEMU processes left running: {leaked}"
    assert not servers, f"nbdkit servers left running: {servers}"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A directory for test images (not the runtime dir: image paths may be long)."""
    path = tmp_path / "images"
    path.mkdir()
    return path


def qemu_binary(program: _binaries.Program) -> str:
    """The QEMU program the tests (and blockctl) run, honouring the environment."""
    return _binaries.binary(program)


# Every test VM runs with QEMU refusing deprecated QMP commands and arguments, so any use of
# one fails loudly. A test of an explicit legacy path passes deprecated_input=ACCEPT.
STRICT = DeprecatedInput.REJECT


def base_config(guest: GuestImage, *drives: Drive, **kwargs: object) -> MachineConfig:
    kwargs.setdefault("deprecated_input", STRICT)
    return MachineConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        drives=drives,
        **kwargs,  # type: ignore[arg-type]
    )


def pattern(seed: int, size: int) -> bytes:
    """Deterministic, incompressible-looking bytes: a guest reading them back proves the path."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 16
    return bytes(out[:size])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def run(*argv: str | Path) -> str:
    """A helper command for test setup; a failure fails the test with its output.

    A QEMU program named bare (``run("qemu-io", ...)``) is the selected one (:func:`qemu_binary`).
    """
    args = [str(a) for a in argv]
    if args[0] in _binaries.PROGRAMS:
        args[0] = _binaries.binary(args[0])
    result = await anyio.run_process(args, check=False)
    assert result.returncode == 0, (argv, result.stderr.decode())
    return result.stdout.decode()


async def raw_image(path: Path, data: bytes, size: int | None = None) -> Path:
    with open(path, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    return path


async def shell_prompt_in(console_log: Path, timeout: float = 120.0) -> None:
    """Wait until a detached VM's guest has printed its shell prompt (it has booted; its ACPI
    answers hot-plug) on its console log."""
    with anyio.fail_after(timeout):  # the boot, bounded
        while not (console_log.exists() and b"guest# " in console_log.read_bytes()):  # noqa: ASYNC110 - a file has no readiness signal
            await anyio.sleep(0.1)


async def qcow2_image(path: Path, data: bytes, size: int) -> Path:
    raw = path.with_suffix(".src.raw")
    await raw_image(raw, data, size)
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


async def image_bytes(path: Path, fmt: str, length: int) -> bytes:
    """The first ``length`` guest-visible bytes of an image, read on the host with its format."""
    out = path.with_suffix(".check.raw")
    await run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    try:
        with open(out, "rb") as f:
            return f.read(length)
    finally:
        out.unlink()


@contextlib.asynccontextmanager
async def vm_in_background(config: MachineConfig) -> AsyncIterator[LaunchedVM]:
    """A booted VM whose ``open_vm`` block lives in a task of its own.

    pytest-asyncio may run a fixture's setup and teardown in different tasks; anyio's cancel
    scopes (inside ``open_vm``) must be entered and left by one task. The runner task owns
    the whole block; the fixture only starts and stops it.
    """
    booted: asyncio.Future[LaunchedVM] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def runner() -> None:
        try:
            async with open_vm(config) as vm:
                assert vm.console is not None
                await vm.console.wait_ready()
                booted.set_result(vm)
                await stop.wait()
        except BaseException as exc:
            if not booted.done():
                booted.set_exception(exc)
            raise

    task = asyncio.get_running_loop().create_task(runner())
    try:
        yield await booted
    finally:
        stop.set()
        await task


@pytest.fixture(scope="module")
def module_runtime_dir() -> Iterator[Path]:
    """A runtime dir for a module-scoped VM, with the same leak check as ``runtime_dir``."""
    root = Path(tempfile.mkdtemp(prefix="bcm-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLOCKCTL_RUNTIME_DIR", str(root))
        yield root
    leaked = qemu_pids_under(root)
    # Live restore's NBD servers keep their socket in the VM's run directory, under this
    # root: one left behind (seen when QEMU died under a test) would outlive the run.
    servers = pids_under(root, lambda cmdline: cmdline.startswith(b"nbdkit\0"))
    for pid in leaked + servers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert not leaked, f"QEMU processes left running: {leaked}"
    assert not servers, f"nbdkit servers left running: {servers}"


class PauseSignal:
    """A JobHook that tells the test when a job has paused on an I/O error."""

    def __init__(self) -> None:
        self.errors: list[JobIOError] = []
        self.paused = anyio.Event()

    def on_transition(self, transition: JobTransition) -> None:
        pass

    def on_progress(self, progress: JobProgress) -> None:
        pass

    def on_io_error(self, error: JobIOError) -> None:
        self.errors.append(error)
        if error.action == "stop":
            self.paused.set()


async def cli_json(*args: str) -> Any:
    """``blockctl ARGS --json`` from another process, as a user would; its parsed output."""
    out = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *args, "--json"], env=dict(os.environ)
    )
    return json.loads(out.stdout)


async def resume_from_cli(vm_name: str, job_id: str) -> str:
    """``blockctl jobs VM resume ID`` from another process; returns the action it reports."""
    return str((await cli_json("jobs", vm_name, "resume", job_id))["action"])


# Section: the truth check


#: Drivers that pass I/O through to one child (blockctl._graph's filters).
_FILTERS = frozenset({"copy-on-read", "throttle", "blkdebug", "blkverify", "blklogwrites"})


def _image_file(qemu_name: str) -> str:
    """The image file a QEMU node name stands for: itself, or the innermost ``filename`` of a
    ``json:`` description (through ``file``/``image`` children, not ``backing``)."""
    if not qemu_name.startswith("json:"):
        return qemu_name
    spec: Any = json.loads(qemu_name[len("json:") :])
    while isinstance(spec, dict):
        if isinstance(spec.get("filename"), str):
            return str(spec["filename"])
        if spec.get("driver") == "iscsi":  # a LUN is named by its URL
            return f"iscsi://{spec['portal']}/{spec['target']}/{spec['lun']}"
        if spec.get("driver") == "nfs":  # an NFS image by its URL (QEMU flattens "server")
            ids = [f"{q}={spec[k]}" for q, k in (("uid", "user"), ("gid", "group")) if k in spec]
            query = f"?{'&'.join(ids)}" if ids else ""
            return f"nfs://{spec['server.host']}{spec['path']}{query}"
        spec = spec.get("file", spec.get("image"))
    raise AssertionError(f"no filename in {qemu_name}")


def _qemu_facts(block: Any, nodes: Any, jobs: Any, status: Any) -> dict[str, Any]:
    """The facts of QEMU's raw replies that blockctl reports (not the counters a running
    guest changes: allocation, bitmap counts, progress)."""

    def cache(c: Any) -> tuple[bool, bool, bool]:
        return (c["writeback"], c["direct"], c["no-flush"])

    devices = {}
    for d in block:
        qdev = d.get("qdev")
        dev_id = (
            d["device"]
            if not qdev
            else qdev.removesuffix("/virtio-backend").removeprefix("/machine/peripheral/")
        )
        ins = d.get("inserted")
        devices[dev_id] = {
            "tray_open": d.get("tray_open"),
            "io_status": d.get("io-status"),
            "inserted": None
            if ins is None
            else {
                "node": ins["node-name"],
                "file": ins["file"],
                "ro": ins["ro"],
                "cache": cache(ins["cache"]),
                "limits": {k: ins.get(k, 0) for k in ("bps", "bps_rd", "bps_wr", "iops")},
            },
        }
    return {
        "devices": devices,
        "nodes": {
            n["node-name"]: {
                "driver": n["drv"],
                "file": n["file"],
                "ro": n["ro"],
                "backing_file": n.get("backing_file"),
            }
            for n in nodes
        },
        "jobs": sorted((j["id"], j["type"], j["status"]) for j in jobs),
        "status": (status["status"], status["running"]),
    }


async def _raw_facts(vm: VM) -> dict[str, Any]:
    facts = _qemu_facts(
        await vm.command("query-block"),
        await vm.command("query-named-block-nodes", {"flat": True}),
        await vm.command("query-jobs"),
        await vm.command("query-status"),
    )
    # vhost-user-blk disks: QEMU has the device and its chardev (QOM), query-block nothing.
    children: Any = await vm.command("qom-list", {"path": "/machine/peripheral"})
    for child in children:
        if child["type"] == "child<vhost-user-blk-pci>":
            path = f"/machine/peripheral/{child['name']}"
            chardev = await vm.command("qom-get", {"path": path, "property": "chardev"})
            facts["devices"][child["name"]] = {
                "tray_open": None,
                "io_status": None,
                "inserted": None,
                "vhost_chardev": chardev,
            }
    return facts


async def _blockctl_views(vm: VM, cli: bool) -> dict[str, Any]:
    """What blockctl reports: library values, and (``cli``) the CLI's JSON from another
    process, as a user would see them."""
    from blockctl._ops import chains, drives

    views: dict[str, Any] = {
        "drives": [d.to_json() for d in await drives.list_drives(vm)],
        "graph": (await chains.read_graph(vm)).to_json(),
        "jobs": await wire.query_jobs(vm.session),
        "status": await vm.status(),
        "registry": {
            str(n["node-name"]): bool(n.get("read-only", False))
            for r in vm.registry.drives.values()
            for n in r.nodes
        },
    }
    if cli:
        views["cli"] = {
            "drives": await cli_json("drives", vm.name),
            "chain": await cli_json("chain", vm.name),
            "jobs": await cli_json("jobs", vm.name),
            "status": await cli_json("status", vm.name),
        }
    return views


def _compare(raw: dict[str, Any], views: dict[str, Any]) -> list[str]:
    """Every difference between QEMU's facts and blockctl's views, in words."""
    diffs: list[str] = []

    def same(what: str, ours: object, qemu: object) -> None:
        if ours != qemu:
            diffs.append(f"{what}: blockctl says {ours!r}, QEMU says {qemu!r}")

    nodes = raw["nodes"]
    devices = raw["devices"]
    drive_views = [("drives", views["drives"])]
    if "cli" in views:
        drive_views.append(("cli drives", views["cli"]["drives"]))
    for label, listing in drive_views:
        same(f"{label}: devices", sorted(d["device"] for d in listing), sorted(devices))
        for d in listing:
            dev = devices.get(d["device"])
            if dev is None:
                continue
            where = f"{label} {d['device']}"
            same(f"{where}: tray_open", d["tray_open"], dev["tray_open"])
            same(f"{where}: io_status", d["io_status"], dev["io_status"])
            ins = dev["inserted"]
            same(f"{where}: node", d["node"], None if ins is None else ins["node"])
            same(
                f"{where}: vhost-user chardev",
                (d.get("vhost_user") or {}).get("chardev"),
                dev.get("vhost_chardev"),
            )
            if ins is None:
                continue
            same(f"{where}: file", d["file"], _image_file(ins["file"]))
            same(f"{where}: read_only", d["read_only"], ins["ro"])
            cache = d["cache"]
            same(
                f"{where}: cache",
                (cache["writeback"], cache["direct"], cache["no_flush"]),
                ins["cache"],
            )
            same(
                f"{where}: throttle",
                {k: d["throttle"][k] for k in ("bps", "bps_rd", "bps_wr", "iops")},
                ins["limits"],
            )
            # The chain: filters, then format layers, each the backing file of the one
            # above, as many as QEMU's backing_file_depth says, each as QEMU has it.
            chain = d["chain"]
            same(f"{where}: chain top", chain[0]["node"] if chain else None, ins["node"])
            layers = [c for c in chain if c["driver"] not in _FILTERS]
            for c in chain:
                raw_node = nodes.get(c["node"])
                same(f"{where}: chain node {c['node']} exists", raw_node is not None, True)
                if raw_node is not None:
                    same(
                        f"{where}: chain node {c['node']}",
                        (c["driver"], c["file"], c["filename"]),
                        (raw_node["driver"], raw_node["file"], _image_file(raw_node["file"])),
                    )
            if all(c["node"] in nodes for c in layers):
                # (QEMU names a node by a json: string when its backing is not the header's
                # default; it names the backing the same way, so the comparison holds.)
                for upper, lower in itertools.pairwise(layers):
                    same(
                        f"{where}: backing of {upper['node']}",
                        lower["file"],
                        nodes[upper["node"]]["backing_file"],
                    )
                if layers:
                    same(
                        f"{where}: the chain ends where QEMU's does ({layers[-1]['node']})",
                        None,
                        nodes[layers[-1]["node"]]["backing_file"],
                    )
    # The block graph (library and CLI): the same nodes, drivers and read-only flags.
    graph_views = [("chain", views["graph"])]
    if "cli" in views:
        graph_views.append(("cli chain", views["cli"]["chain"]))
    for label, graph in graph_views:
        ours = {n["node_name"]: (n["driver"], n["read_only"]) for n in graph["nodes"]}
        same(f"{label}: nodes", ours, {k: (v["driver"], v["ro"]) for k, v in nodes.items()})
        for dev in graph["devices"]:
            same(
                f"{label}: {dev['id']} root",
                dev["root"],
                None
                if devices.get(dev["id"], {}).get("inserted") is None
                else devices[dev["id"]]["inserted"]["node"],
            )
    # The drives view and the graph agree on every chain's format layers.
    graph_chains = {d["id"]: d["chain"] for d in views["graph"]["devices"]}
    for d in views["drives"]:
        layers = [c["node"] for c in d["chain"] if c["driver"] not in _FILTERS]
        same(f"drives/chain {d['device']}: layers", layers, graph_chains.get(d["device"], []))
    # Jobs and run state (library and CLI).
    same("jobs", sorted((j.id, j.type, j.status.value) for j in views["jobs"]), raw["jobs"])
    same("status", (views["status"].status, views["status"].running), raw["status"])
    if "cli" in views:
        cli_view = views["cli"]
        same(
            "cli jobs",
            sorted((j["id"], j["type"], j["status"]) for j in cli_view["jobs"]),
            raw["jobs"],
        )
        same(
            "cli status",
            (cli_view["status"]["status"], cli_view["status"]["running"]),
            raw["status"],
        )
        for d in cli_view["status"]["drives"]:
            ins = devices.get(d["device"], {}).get("inserted")
            status_drive: tuple[Any, ...] | None = None
            if d["node"] is not None:
                cache = d["cache"]
                status_drive = (
                    d["node"],
                    d["file"],
                    d["read_only"],
                    (cache["writeback"], cache["direct"], cache["no_flush"]),
                )
            qemu = (
                None
                if ins is None
                else (ins["node"], _image_file(ins["file"]), ins["ro"], ins["cache"])
            )
            same(f"cli status {d['device']}", status_drive, qemu)
    # Read-only state: blockctl's record of each node it made matches QEMU, and with no job
    # running every backing layer is read-only (a writable one holds the image's write lock:
    # nothing else could read or copy it).
    for name, recorded in views["registry"].items():
        if name in nodes:
            same(f"registry {name}: read-only", recorded, nodes[name]["ro"])
    if not raw["jobs"]:
        for d in views["drives"]:
            layers = [c["node"] for c in d["chain"] if c["driver"] not in _FILTERS]
            for name in layers[1:]:
                if name in nodes and not nodes[name]["ro"]:
                    diffs.append(f"{d['device']}: backing layer {name} is read-write")
    return diffs


def _registered(vm: VM) -> bool:
    """Whether the CLI can reach ``vm`` while this process holds its session: it must be
    registered by name (a named config) and have a second monitor (one this process
    launched; a monitor serves one client at a time)."""
    if not isinstance(vm, LaunchedVM):
        return False
    try:
        _runtime.read_record(vm.name)
    except BlockctlError:
        return False
    return True


async def truth_check(vm: VM, *, cli: bool = True, attempts: int = 5) -> None:
    """What blockctl reports equals what QEMU has (issue 16); any difference fails the test.

    blockctl's views (``drives``, ``chain``, ``jobs``, ``status``: library values and, with
    ``cli``, the CLI's JSON from another process) are compared with QEMU's raw
    ``query-block``, ``query-named-block-nodes``, ``query-jobs`` and ``query-status``,
    including every node's read-only state and blockctl's record of it. The CLI part runs
    for a VM the CLI can reach meanwhile (launched here from a named config). A guest can change
    facts meanwhile (its virtio driver renegotiates the write cache while it boots): QEMU is
    read before and after the views, and a comparison whose QEMU facts moved, or that differs,
    is taken again, up to ``attempts`` times; a difference in the last one fails.
    """
    diffs: list[str] = []
    for _ in range(attempts):
        before = await _raw_facts(vm)
        views = await _blockctl_views(vm, cli and _registered(vm))
        after = await _raw_facts(vm)
        if before == after:
            diffs = _compare(before, views)
            if not diffs:
                return
            # Equal reads around the views do not rule out a flip and back in between (a
            # virtio reset puts the write cache back, the driver turns it on again, seen
            # with a guest booting): taken again; a real difference stays and fails below.
    assert not diffs, "blockctl's report differs from QEMU:\n" + "\n".join(diffs)
    raise AssertionError(f"QEMU's block facts kept changing over {attempts} reads")


#: The VMs truth-checked at their shutdown in this run, and whether they matched (figures).
TRUTH = Tally({"same": "no difference"})


@pytest.fixture(autouse=True)
def _truth_check_every_vm() -> Iterator[None]:
    """Issue 16: every VM an integration test opens with ``open_vm`` and leaves normally is
    truth-checked before its shutdown (library views against QEMU's raw facts; the CLI views
    are compared by the tests that call :func:`truth_check` themselves)."""

    async def check(vm: VM) -> None:
        # One case per VM opened: a named VM may be opened again (a QEMU restart).
        with TRUTH.case(f"{vm.name}#{len(TRUTH.tried) + 1}") as ok:
            await truth_check(vm, cli=False)
            ok.add("same")

    _machine.BEFORE_SHUTDOWN.append(check)
    try:
        yield
    finally:
        _machine.BEFORE_SHUTDOWN.remove(check)


@pytest.fixture(autouse=True, scope="session")
def _truth_check_figure() -> Iterator[None]:
    yield
    if TRUTH.tried:  # no VM was opened: no figure (this is not a test that can fail)
        report(
            "truth check",
            f"{len(TRUTH.tried)} VMs compared at their shutdown (drives, chain, jobs, status, "
            "the registry's read-only flags vs QEMU's query-block, query-named-block-nodes, "
            f"query-jobs, query-status): {TRUTH.phrases()}",
        )


@pytest.fixture
async def loop_devices() -> AsyncIterator[Callable[[Path], Awaitable[Path]]]:
    """Attaches a file to a free loop device (``losetup -f --show``: a real block device;
    this kernel has no device-mapper) and returns the device; each is detached when the test
    ends, however it ends."""
    if shutil.which("losetup") is None:
        missing("losetup (util-linux)")
    loops: list[Path] = []

    async def attach(image: Path) -> Path:
        attached = await anyio.run_process(["losetup", "-f", "--show", str(image)], check=False)
        if attached.returncode != 0:
            missing(f"a loop device ({attached.stderr.decode().strip()})")
        loops.append(Path(attached.stdout.decode().strip()))
        return loops[-1]

    try:
        yield attach
    finally:
        with anyio.CancelScope(shield=True):
            for loop in loops:
                await anyio.run_process(["losetup", "-d", str(loop)], check=False)
