"""Restore into qcow2 writes the image itself (:mod:`blockctl._backup.qcow2`): QEMU must find
every image it writes consistent (``qemu-img check``), reading exactly the disk's bytes
(``qemu-img compare`` with the raw disk), and as sparse as QEMU's own writer makes it (the
data extents of ``qemu-img map`` equal those of ``qemu-img convert -O qcow2`` of the disk).

The repositories are built with the store's API (no guest needed): data, compressible and
zero chunks, zero clusters inside a chunk, a stored chunk of zeros, a partial last chunk and
cluster, L2 tables that some data skips, a second refcount block."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from blockctl._backup import operations as ops
from blockctl._backup.qcow2 import CLUSTER, Qcow2Writer, write_empty
from blockctl._backup.store import DiskIndex, DiskPoint, Manifest, Repository
from blockctl.types import ImageFormat
from tests.integration.conftest import MIB, run

VM = "vm1"
SECRET = b"restore-suite-secret"
POINT = "20261203T100000.000001-aaaa"


def piece(kind: str, size: int, rng: random.Random) -> bytes:
    """One chunk's content: ``r`` random, ``t`` text (zstd shrinks it), ``0`` zeros, ``h``
    random with zero clusters at the start, in the middle and at the end, and clusters of data
    that start with zeros."""
    if kind == "r":
        return rng.randbytes(size)
    if kind == "t":
        return (b"compressible chunk of text " * (size // 16 + 1))[:size]
    if kind == "0":
        return bytes(size)
    assert kind == "h"
    data = bytearray(rng.randbytes(size))
    for start in (0, (size // CLUSTER // 2) * CLUSTER, size - CLUSTER):
        data[start : start + CLUSTER] = bytes(CLUSTER)
    data[CLUSTER + 7] = 0  # a cluster with one zero byte is data all the same
    data[2 * CLUSTER : 2 * CLUSTER + 4096] = bytes(4096)  # and one with zeros up front
    return bytes(data)


def build(
    path: Path, chunk: int, size: int, layout: dict[int, str], secret: bytes | None
) -> dict[int, bytes]:
    """A repository with one point of one disk: ``layout`` maps chunk numbers to :func:`piece`
    kinds (kind ``0`` stored as a chunk of zeros; chunks not listed are zero chunks, not
    stored). Returns the stored chunks' bytes by chunk number."""
    rng = random.Random(13)
    repo = Repository.init(path, chunk_size=chunk, secret=secret)
    repo.begin_point(VM, POINT)
    index = DiskIndex.empty(size, chunk)
    disk: dict[int, bytes] = {}
    for i, kind in sorted(layout.items()):
        data = piece(kind, chunk, rng)[: index.chunk_length(i)]
        digest = repo.digest(data)
        repo.write_chunk(digest, data)
        index.put(i, digest)
        disk[i] = data
    repo.sync()
    repo.write_index(VM, POINT, "disk0", index)
    repo.write_manifest(
        Manifest(
            id=POINT,
            vm=VM,
            kind="full",
            parent=None,
            checkpoint=f"bc-{repo.config.id[:12]}-{POINT}",
            started=1000.0,
            completed=1001.0,
            qemu="7.2.0",
            disks=(
                DiskPoint(
                    device="disk0",
                    node="node-disk0",
                    virtual_size=size,
                    chunk_size=chunk,
                    disk_digest=index.disk_digest(),
                    chunks=index.count,
                    zero_chunks=index.count - len(layout),
                    bytes_read=size,
                    bytes_new=size,
                    bytes_stored=size,
                ),
            ),
        )
    )
    return disk


def sparse_raw(path: Path, size: int, chunk: int, chunks: dict[int, bytes]) -> Path:
    """The disk as a sparse raw file: these chunks' bytes, zeros elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, data in chunks.items():
            f.seek(i * chunk)
            f.write(data)
    return path


async def data_extents(image: Path) -> list[tuple[int, int]]:
    """The guest ranges ``qemu-img map`` says hold data, merged (host offsets left out)."""
    out: list[tuple[int, int]] = []
    for e in json.loads(await run("qemu-img", "map", "--output=json", "-f", "qcow2", image)):
        if not e["data"]:
            continue
        if out and out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], e["start"] + e["length"])
        else:
            out.append((e["start"], e["start"] + e["length"]))
    return out


async def assert_like_qemu(image: Path, disk: Path) -> None:
    """``image`` is consistent, reads as the raw ``disk``, and holds data exactly where QEMU's
    own qcow2 writer puts it for that disk."""
    check = json.loads(await run("qemu-img", "check", "--output=json", "-f", "qcow2", image))
    assert check.get("check-errors", 0) == 0, check
    assert "corruptions" not in check and "leaks" not in check, check
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, disk)
    reference = disk.with_suffix(".qemu.qcow2")
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, reference)
    try:
        assert await data_extents(image) == await data_extents(reference)
    finally:
        reference.unlink()


LAYOUTS = {
    # 64 KiB chunks (one cluster each); the last chunk and cluster partial (size % 64 KiB).
    "one-cluster-chunks": (64 << 10, 10 * (64 << 10) - 3 * 512, {0: "r", 1: "t", 3: "0", 9: "r"}),
    # 4 MiB chunks: zero chunks, zero clusters inside chunks, data in the 2nd and 4th L2 table
    # range (512 MiB each) only, a partial last chunk.
    "sparse-4m": (
        4 * MIB,
        2 * 1024 * MIB + 5 * MIB + 512,
        {0: "h", 1: "t", 2: "r", 130: "h", 131: "0", 384: "r", 512: "h", 513: "r"},
    ),
}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_restore_qcow2_is_what_qemu_reads_checks_and_maps(
    tmp_path: Path, layout: str, encrypted: bool
) -> None:
    chunk, size, pieces = LAYOUTS[layout]
    stored = build(tmp_path / "R", chunk, size, pieces, SECRET if encrypted else None)
    raw = sparse_raw(tmp_path / "disk.raw", size, chunk, stored)
    repo = Repository.open(tmp_path / "R", secret=SECRET if encrypted else None)
    dest = tmp_path / "restored.qcow2"
    result = await ops.restore(repo, VM, POINT, "disk0", dest, ImageFormat.QCOW2)
    assert result.chunks_verified == len(pieces)
    assert os.stat(dest).st_mode & 0o777 == 0o600
    await assert_like_qemu(dest, raw)


async def test_writer_layout_past_one_refcount_block(tmp_path: Path) -> None:
    """Slots reserved for 600 chunks of 4 MiB (2.3 GiB of host clusters, a sparse file, ten L2
    tables): the refcounts take two blocks, and data lands in both; chunks left unwritten stay
    unallocated."""
    chunk, size = 4 * MIB, 1200 * 4 * MIB
    chunks = list(range(0, 1200, 2))
    rng = random.Random(7)
    written = {0: rng.randbytes(chunk), 2: piece("h", chunk, rng), 1198: rng.randbytes(chunk)}
    image, raw = tmp_path / "w.qcow2", tmp_path / "w.raw"
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = Qcow2Writer(fd, size, chunk, chunks)
        assert writer.host_offset(1198) > (CLUSTER // 2) * CLUSTER  # past the first block
        for i, data in written.items():
            writer.write_chunk(i, data)
        writer.finish()
    finally:
        os.close(fd)
    await assert_like_qemu(image, sparse_raw(raw, size, chunk, written))


@pytest.mark.parametrize("size", [MIB, 4 * 1024 * MIB + 512, 3 * 1024 * 1024 * MIB])
async def test_an_empty_image_written_directly_is_what_qemu_creates(
    tmp_path: Path, size: int
) -> None:
    """A backup's fleecing overlay is formatted by ``write_empty``, not QEMU: the image is
    consistent, has the size asked, holds no data, and reads as zeros."""
    image, raw = tmp_path / "empty.qcow2", tmp_path / "empty.raw"
    image.touch()
    write_empty(image, size)
    check = json.loads(await run("qemu-img", "check", "--output=json", "-f", "qcow2", image))
    assert check.get("check-errors", 0) == 0, check
    assert "corruptions" not in check and "leaks" not in check, check
    info = json.loads(await run("qemu-img", "info", "--output=json", "-f", "qcow2", image))
    assert info["virtual-size"] == size
    assert "backing-filename" not in info
    assert await data_extents(image) == []
    with raw.open("wb") as f:
        f.truncate(size)
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)


async def test_restore_onto_a_device_leaves_its_bytes_past_the_disk_alone(
    tmp_path: Path, loop_devices: Callable[[Path], Awaitable[Path]]
) -> None:
    """A disk whose size is not a multiple of the page (QEMU sizes are multiples of 512)
    restored onto a larger block device: the device reads as the disk up to its size and
    keeps its own bytes after it. Direct I/O pads the last write to a page, which on a file
    is cut off again but on a device would overwrite what lies past the disk."""
    chunk, size = 64 << 10, 3 * (64 << 10) - 512
    chunks = build(tmp_path / "repo", chunk, size, {0: "r", 2: "r"}, None)
    reference = sparse_raw(tmp_path / "disk.raw", size, chunk, chunks)
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xa5" * (1 << 20))
    device = await loop_devices(backing)
    repo = Repository.open(tmp_path / "repo")
    result = await ops.restore(repo, VM, POINT, "disk0", device, ImageFormat.RAW)
    assert result.path == device
    with open(device, "rb") as f:
        restored = f.read(1 << 20)
    assert restored[:size] == reference.read_bytes()
    assert restored[size:] == b"\xa5" * ((1 << 20) - size)
