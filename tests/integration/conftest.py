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
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, _binaries, find_guest, open_vm
from blockctl._jobs import JobIOError, JobProgress, JobTransition
from blockctl.errors import MissingComponent
from blockctl.types import DeprecatedInput, Drive, MachineConfig
from tests.conftest import missing

MIB = 1 << 20


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    for program in _binaries.PROGRAMS:
        if shutil.which(qemu_binary(program)) is None:
            missing(f"{qemu_binary(program)} ({_binaries.install_hint(program)})")
    try:
        return find_guest()
    except MissingComponent as exc:
        missing(str(exc))
        raise


def qemu_pids_under(directory: Path) -> list[int]:
    """QEMU processes whose command line mentions ``directory`` (their run dir lives there)."""
    needle = os.fsencode(str(directory))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline:
            pids.append(int(entry.name))
    return pids


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
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert not leaked, f"QEMU processes left running: {leaked}"


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
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert not leaked, f"QEMU processes left running: {leaked}"


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
