"""A restore killed midway (SIGKILL, the controller gone) leaves nothing taken for the disk.

Before: `blockctl restore` wrote straight into DEST, so a kill midway left a file at DEST, of
the disk's size, with some chunks in it and the rest holes, which nothing told apart from a
finished restore; onto a block device the first chunk was written among the first, so the
device's start (partition table, superblock) was the point's while the rest was not.

The killed process is the real CLI (`blockctl._cli.main`), killed by itself from inside the
chunk reader at its third chunk (a deterministic point, not a timer). No QEMU: a restore
reads only the repository.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from blockctl import _binaries
from blockctl._backup import operations
from blockctl._backup.store import DiskIndex, Repository, new_point_id
from blockctl.errors import ConfigError
from blockctl.types import ImageFormat
from tests.unit.test_repository_store import VM, commit, store

CHUNKS = 8

#: Runs the CLI and kills its own process (SIGKILL) from inside the restore: with argv[1]
#: "read", when the chunk reader is asked for chunk number argv[2] (counted from 1); with
#: "write", just before the write that would leave only one more (argv[2]: the data
#: chunks), after the others are on the disk. Then argv[3:] are the CLI's.
KILLER = """
import os, signal, sys, threading
from blockctl._backup import operations
from blockctl._backup.store import Repository
from blockctl._cli.main import main
mode, count = sys.argv[1], int(sys.argv[2])
calls = [0]
lock = threading.Lock()
def die_at(n):
    with lock:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
if mode == "read":
    read = Repository.read_chunk_view
    def read_then_die(self, *args, **kwargs):
        die_at(count)
        return read(self, *args, **kwargs)
    Repository.read_chunk_view = read_then_die
else:
    write = operations._write_direct
    def die_then_write(*args, **kwargs):
        die_at(count)
        return write(*args, **kwargs)
    operations._write_direct = die_then_write
sys.argv = ["blockctl", *sys.argv[3:]]
main()
"""


def make_point(
    root: Path, chunks: int = CHUNKS, zero: int = CHUNKS - 1
) -> tuple[Repository, str, bytes]:
    """A point of ``chunks`` random chunks but chunk ``zero`` (a zero chunk, not stored), and
    the disk's bytes."""
    repo = Repository.init(root / "repo")
    size = chunks * repo.chunk_size
    index = DiskIndex.empty(size, repo.chunk_size)
    disk = bytearray(size)
    for i in range(chunks):
        if i != zero:
            data = os.urandom(repo.chunk_size)
            index.put(i, store(repo, data))
            disk[i * repo.chunk_size : (i + 1) * repo.chunk_size] = data
    point = new_point_id()
    commit(repo, point, {"disk0": index})
    return repo, point, bytes(disk)


def killed_restore(
    repo: Repository, point: str, dest: Path, fmt: str, at: tuple[str, int] = ("read", 3)
) -> None:
    """`blockctl restore` of the point into ``dest``, SIGKILLed at ``at`` (KILLER's mode and
    count: by default as it reads its third chunk)."""
    args = ["restore", "--repo", str(repo.path), "-O", fmt, VM, point, "disk0", str(dest)]
    done = subprocess.run(
        [sys.executable, "-c", KILLER, at[0], str(at[1]), *args], capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_a_killed_restore_into_a_file_leaves_nothing_at_its_destination(
    tmp_path: Path, fmt: str
) -> None:
    repo, point, disk = make_point(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / f"disk.{fmt}"
    killed_restore(repo, point, dest, fmt)
    # Before the fix: DEST was there, its size the disk's, part of its chunks missing.
    assert entries(out) == [], entries(out)
    # Nothing is in the way of the restore run again, which gives the point's disk.
    result = await operations.restore(repo, VM, point, "disk0", dest, ImageFormat(fmt))
    assert result.path == dest and entries(out) == [dest.name]
    assert (dest.stat().st_mode & 0o777) == 0o600
    reference = tmp_path / "reference.raw"
    reference.write_bytes(disk)
    compared = await anyio.run_process(
        [_binaries.qemu_img(), "compare", "-f", fmt, "-F", "raw", str(dest), str(reference)],
        check=False,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


async def test_a_killed_restore_onto_a_block_device_leaves_its_start_zeros(
    tmp_path: Path, loop_devices: Callable[[Path], Awaitable[Path]]
) -> None:
    repo, point, disk = make_point(tmp_path)
    backing = tmp_path / "device.img"
    # The device holds something else before: it must not read as the point's disk after.
    backing.write_bytes(b"\xa5" * len(disk))
    device = await loop_devices(backing)
    # Killed just before its last data chunk's write, every other one on the device.
    killed_restore(repo, point, device, "raw", ("write", CHUNKS - 1))
    chunk = repo.chunk_size
    with open(device, "rb") as f:
        head = f.read(chunk)
        rest = f.read()
    # Digests, not bytes: pytest would diff two 4 MiB values for minutes on a failure.
    # Before the fix: the first chunk, read and written among the first, held the point's.
    assert sha(head) == sha(bytes(chunk)), "the device's first chunk was written before the rest"
    # The others were written: the device is neither as before nor the point.
    assert sha(rest) != sha(b"\xa5" * len(rest))
    assert sha(head + rest) != sha(disk)
    result = await operations.restore(repo, VM, point, "disk0", device, ImageFormat.RAW)
    assert result.bytes_written == len(disk) - chunk
    with open(device, "rb") as f:
        assert sha(f.read()) == sha(disk)


async def test_a_file_made_at_the_destination_meanwhile_is_kept_and_the_restore_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else's file appearing at DEST while the restore writes: kept as it is (never
    replaced), the restore refused with a ConfigError, nothing else left in the directory."""
    repo, point, _ = make_point(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "disk.raw"
    read = Repository.read_chunk_view

    def read_and_make_dest(self: Repository, *args: object, **kwargs: object) -> object:
        if not dest.exists():
            dest.write_bytes(b"someone else's")
        return read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Repository, "read_chunk_view", read_and_make_dest)
    with pytest.raises(ConfigError, match="created by someone else"):
        await operations.restore(repo, VM, point, "disk0", dest, ImageFormat.RAW)
    assert entries(out) == [dest.name]
    assert dest.read_bytes() == b"someone else's"
