"""The repository store (issue 13 item 2, issue 21 items 1-2) without QEMU: chunks, dedup, zero
chunks, indexes, manifests, garbage collection and its lock, prune, owner-only modes, loose
repositories and keys. Repositories are built with the store's own API; the NBD reader is fed
by a fake handle where a test needs it."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Any

import anyio
import blake3
import pytest

from blockctl import _direct
from blockctl._backup import operations as ops
from blockctl._backup import reader
from blockctl._backup.reader import ChunkCopier
from blockctl._backup.store import (
    CHUNK_HEADER,
    ZERO_DIGEST,
    DiskIndex,
    DiskPoint,
    Manifest,
    Repository,
)
from blockctl.errors import (
    BackupCorrupt,
    BackupKeyError,
    ConfigError,
    RepositoryBusy,
    RepositoryError,
)
from blockctl.types import ImageFormat
from tests.conftest import mode_of

CHUNK = 64 << 10
SECRET = b"store-suite-secret"
VM = "vm1"
POINTS = (
    "20261203T100000.000001-aaaa",
    "20261203T100100.000002-bbbb",
    "20261203T100200.000003-cccc",
)

INCOMPRESSIBLE = os.urandom(CHUNK)
COMPRESSIBLE = (b"blockctl repository chunk " * CHUNK)[:CHUNK]


def chunk_files(repo: Repository) -> set[str]:
    return {p.name for p in (repo.path / "chunks").glob("*/*")}


def store(repo: Repository, data: bytes) -> bytes:
    digest = repo.digest(data)
    repo.write_chunk(digest, data)
    repo.sync()
    return digest


def commit(repo: Repository, point: str, disks: dict[str, DiskIndex], n: int = 0) -> Manifest:
    """Index and manifest of one point, as a backup writes them (after the chunks)."""
    repo.sync()
    repo.begin_point(VM, point)
    entries = []
    for device, index in disks.items():
        repo.write_index(VM, point, device, index)
        entries.append(
            DiskPoint(
                device=device,
                node=f"node-{device}",
                virtual_size=index.virtual_size,
                chunk_size=index.chunk_size,
                disk_digest=index.disk_digest(),
                chunks=index.count,
                zero_chunks=sum(1 for i in range(index.count) if index.at(i) == ZERO_DIGEST),
                bytes_read=0,
                bytes_new=0,
                bytes_stored=0,
            )
        )
    manifest = Manifest(
        id=point,
        vm=VM,
        kind="full",
        parent=None,
        checkpoint=f"bc-{repo.config.id[:12]}-{point}",
        started=1000.0 + n,
        completed=1001.0 + n,
        qemu="7.2.0",
        disks=tuple(entries),
    )
    repo.write_manifest(manifest)
    return manifest


def index_of(repo: Repository, *pieces: bytes) -> DiskIndex:
    """A disk made of ``pieces`` (one chunk each, zeros not stored)."""
    index = DiskIndex.empty(sum(len(p) for p in pieces), CHUNK)
    for i, piece in enumerate(pieces):
        if any(piece):
            index.put(i, store(repo, piece))
    return index


def tree(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under ``root``: mode, mtime, content."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            info = os.lstat(path)
            content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
            found[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, content)
    return found


# Section: chunks


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize(
    "data",
    [COMPRESSIBLE, INCOMPRESSIBLE, COMPRESSIBLE[:1000]],
    ids=["compressible", "incompressible", "short"],
)
def test_chunk_round_trip(tmp_path: Path, compression: str, encrypted: bool, data: bytes) -> None:
    repo = Repository.init(
        tmp_path / "r",
        chunk_size=CHUNK,
        compression=compression,
        secret=SECRET if encrypted else None,
    )
    digest = repo.digest(data)
    # blake3 by default, recorded in config.json; keyed (HMAC-SHA256) when encrypted.
    assert (digest == blake3.blake3(data).digest()) is not encrypted
    assert repo.config.digest == ("hmac-sha256" if encrypted else "blake3")
    written = repo.write_chunk(digest, data)
    repo.sync()
    blob = (repo.path / "chunks" / digest.hex()[:2] / digest.hex()).read_bytes()
    assert written == len(blob)
    assert blob[:4] == b"BCC2"
    flags = blob[4]
    assert bool(flags & 1) is (compression == "zstd" and data is not INCOMPRESSIBLE)
    assert bool(flags & 2) is encrypted
    if encrypted or flags & 1:
        assert data[:64] not in blob
    reopened = Repository.open(repo.path, secret=SECRET if encrypted else None)
    assert reopened.read_chunk(digest, len(data)) == data
    assert reopened.has_chunk(digest)


def test_a_sha256_repository_keeps_its_digest_and_both_kinds_read_their_chunks(
    tmp_path: Path,
) -> None:
    """A repository made before blake3 records sha256: it is opened, read, verified and
    written with sha256; a new one uses blake3; neither takes the other's chunk names."""
    old = Repository.init(tmp_path / "old", chunk_size=CHUNK, digest="sha256")
    new = Repository.init(tmp_path / "new", chunk_size=CHUNK)
    config = json.loads((old.path / "config.json").read_bytes())
    assert config["digest"] == "sha256"
    assert json.loads((new.path / "config.json").read_bytes())["digest"] == "blake3"
    for repo, expected in (
        (old, hashlib.sha256(INCOMPRESSIBLE).digest()),
        (new, blake3.blake3(INCOMPRESSIBLE).digest()),
    ):
        digest = repo.digest(INCOMPRESSIBLE)
        assert digest == expected
        assert repo.write_chunk(digest, INCOMPRESSIBLE) > 0
        repo.sync()
        reopened = Repository.open(repo.path)
        assert reopened.digest(INCOMPRESSIBLE) == expected
        assert reopened.read_chunk(digest, len(INCOMPRESSIBLE)) == INCOMPRESSIBLE
    assert chunk_files(old).isdisjoint(chunk_files(new))
    # A chunk file renamed to the other algorithm's digest of the same bytes is not taken for
    # it: reading checks the digest this repository records.
    sha, b3 = hashlib.sha256(COMPRESSIBLE).digest(), blake3.blake3(COMPRESSIBLE).digest()
    new.write_chunk(b3, COMPRESSIBLE)
    new.sync()
    (new.path / "chunks" / sha.hex()[:2]).mkdir(mode=0o700, exist_ok=True)
    os.rename(
        new.path / "chunks" / b3.hex()[:2] / b3.hex(),
        new.path / "chunks" / sha.hex()[:2] / sha.hex(),
    )
    with pytest.raises(BackupCorrupt):
        new.read_chunk(sha, len(COMPRESSIBLE))
    with pytest.raises(ConfigError, match="digest"):
        Repository.init(tmp_path / "md5", chunk_size=CHUNK, digest="md5")


def test_same_chunk_is_stored_once_and_keys_do_not_share_digests(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    digest = repo.digest(INCOMPRESSIBLE)
    assert repo.write_chunk(digest, INCOMPRESSIBLE) > 0
    assert repo.write_chunk(digest, INCOMPRESSIBLE) == 0  # being written: nothing more
    repo.sync()
    assert repo.write_chunk(digest, INCOMPRESSIBLE) == 0  # already there: nothing written
    index = index_of(repo, INCOMPRESSIBLE, INCOMPRESSIBLE, COMPRESSIBLE, INCOMPRESSIBLE)
    assert chunk_files(repo) == {digest.hex(), repo.digest(COMPRESSIBLE).hex()}
    assert index.referenced() == {digest, repo.digest(COMPRESSIBLE)}
    one = Repository.init(tmp_path / "k1", chunk_size=CHUNK, secret=b"first secret")
    two = Repository.init(tmp_path / "k2", chunk_size=CHUNK, secret=b"second secret")
    assert len({one.digest(INCOMPRESSIBLE), two.digest(INCOMPRESSIBLE), digest}) == 3


def test_a_symlink_at_a_chunks_name_is_not_the_chunk_and_is_replaced_not_followed(
    tmp_path: Path,
) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    digest = repo.digest(COMPRESSIBLE)
    victim = tmp_path / "victim"
    victim.write_bytes(b"outside")
    path = repo.path / "chunks" / digest.hex()[:2] / digest.hex()
    path.parent.mkdir(mode=0o700)
    path.symlink_to(victim)
    assert not repo.has_chunk(digest)
    assert repo.write_chunk(digest, COMPRESSIBLE) > 0
    repo.sync()
    assert not path.is_symlink() and victim.read_bytes() == b"outside"
    assert repo.read_chunk(digest, CHUNK) == COMPRESSIBLE


class _FakeNbd:
    class Error(Exception):
        pass

    class Buffer:
        def __init__(self, shared: bytearray) -> None:
            self._o = shared

        @classmethod
        def from_buffer(cls, shared: bytearray) -> _FakeNbd.Buffer:
            return cls(shared)

        def to_buffer(self) -> bytearray:
            return self._o


class _FakeHandle:
    def __init__(self, disk: bytes) -> None:
        self.disk = disk

    def aio_pread(self, buffer: _FakeNbd.Buffer, offset: int) -> int:
        buffer._o[:] = self.disk[offset : offset + len(buffer._o)]
        return 1

    def aio_command_completed(self, cookie: int) -> bool:
        return True

    def poll(self, timeout: int) -> None:
        raise AssertionError("the fake completes every command at once")


def copy(repo: Repository, disk: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[DiskIndex, Any]:
    """The reader's copy loop over a fake NBD handle serving ``disk``."""
    monkeypatch.setattr(reader, "_connect", lambda socket, export, context: _FakeHandle(disk))
    monkeypatch.setattr(reader, "libnbd", lambda: _FakeNbd)
    monkeypatch.setattr(reader, "close", lambda handle: None)
    index = DiskIndex.empty(len(disk), CHUNK)
    copier = ChunkCopier(
        socket="unused",
        export="disk0",
        repo=repo,
        index=index,
        chunks=tuple(range(index.count)),
        connections=3,
    )
    copier.start()
    copier.join()
    repo.sync()
    return index, copier.stats


class _CheckingBatch:
    """A batch whose writes take a while (the disk's wait, as the writer thread has it) and
    check the bytes they are given against their digest when they are done: a reader that
    read the next chunk into a buffer still being written would fail the check."""

    def __init__(self, repo: Repository, fail_at: int | None = None) -> None:
        self.inner = repo.batch()
        self.repo = repo
        self.fail_at = fail_at
        self.writes = 0
        self.mismatched = 0
        self.framed = 0  # writes whose bytes sat in an aligned frame after the header's place

    def write(self, digest: bytes, data: bytearray, *, frame: memoryview | None = None) -> int:
        self.writes += 1
        if self.fail_at is not None and self.writes == self.fail_at:
            raise OSError(errno.EIO, "injected write error (test)")
        threading.Event().wait(0.005)  # widens the window for a reuse; not an assertion
        if self.repo.digest(bytes(data)) != digest:
            self.mismatched += 1
        if frame is not None:
            assert frame[CHUNK_HEADER : CHUNK_HEADER + len(data)] == data
            self.framed += 1
        return self.inner.write(digest, data, frame=frame)


@pytest.mark.parametrize("connections", [1, 2])
def test_pipelined_copy_never_reads_into_a_buffer_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connections: int
) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    chunks = [os.urandom(CHUNK) for _ in range(12)]
    disk = b"".join(chunks)
    monkeypatch.setattr(reader, "_connect", lambda socket, export, context: _FakeHandle(disk))
    monkeypatch.setattr(reader, "libnbd", lambda: _FakeNbd)
    monkeypatch.setattr(reader, "close", lambda handle: None)
    index = DiskIndex.empty(len(disk), CHUNK)
    batch = _CheckingBatch(repo)
    copier = ChunkCopier(
        socket="unused",
        export="disk0",
        repo=repo,
        index=index,
        chunks=tuple(range(index.count)),
        connections=connections,
        batch=batch,  # type: ignore[arg-type]
    )
    copier.start()
    copier.join()
    assert batch.writes == 12 and batch.mismatched == 0
    # Full chunks are written out of the frame they were read into (no copy per chunk).
    assert batch.framed == 12
    batch.inner.sync()
    assert [index.at(i) for i in range(12)] == [repo.digest(c) for c in chunks]
    assert copier.stats.chunks_read == 12 and copier.stats.bytes_new == 12 * CHUNK
    for c in chunks:
        assert repo.read_chunk(repo.digest(c), CHUNK) == c


def test_a_write_error_in_the_writer_thread_fails_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    disk = b"".join(os.urandom(CHUNK) for _ in range(8))
    monkeypatch.setattr(reader, "_connect", lambda socket, export, context: _FakeHandle(disk))
    monkeypatch.setattr(reader, "libnbd", lambda: _FakeNbd)
    monkeypatch.setattr(reader, "close", lambda handle: None)
    index = DiskIndex.empty(len(disk), CHUNK)
    batch = _CheckingBatch(repo, fail_at=3)
    copier = ChunkCopier(
        socket="unused",
        export="disk0",
        repo=repo,
        index=index,
        chunks=tuple(range(index.count)),
        connections=1,
        batch=batch,  # type: ignore[arg-type]
    )
    copier.start()
    with pytest.raises(OSError, match="injected write error"):
        copier.join()
    # The failed chunk was never recorded, and the copy stopped: not every chunk is in the
    # index (a backup would not be recorded).
    assert index.at(2) == ZERO_DIGEST
    assert copier.stats.chunks_read < 8
    batch.inner.discard()


async def test_zero_chunks_are_never_stored_nor_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    half_zero = bytes(CHUNK // 2)
    disk = INCOMPRESSIBLE + bytes(CHUNK) + INCOMPRESSIBLE + COMPRESSIBLE + half_zero
    index, stats = copy(repo, disk, monkeypatch)
    assert [index.at(i) for i in range(index.count)] == [
        repo.digest(INCOMPRESSIBLE),
        ZERO_DIGEST,
        repo.digest(INCOMPRESSIBLE),
        repo.digest(COMPRESSIBLE),
        ZERO_DIGEST,
    ]
    assert stats.zero_read == 2
    assert stats.chunks_new == 2 and stats.bytes_new == 2 * CHUNK  # the repeat stored once
    assert chunk_files(repo) == {repo.digest(INCOMPRESSIBLE).hex(), repo.digest(COMPRESSIBLE).hex()}
    assert ZERO_DIGEST not in index.referenced()
    commit(repo, POINTS[0], {"disk0": index})
    # A planted chunk by the zero digest's name is never read: restore writes zeros there.
    planted = repo.path / "chunks" / "00" / ZERO_DIGEST.hex()
    planted.parent.mkdir(mode=0o700, exist_ok=True)
    planted.write_bytes(b"BCC2\x00" + b"\xff" * CHUNK)
    dest = tmp_path / "restored.raw"
    await ops.restore(repo, VM, POINTS[0], "disk0", dest, ImageFormat.RAW)
    assert dest.read_bytes() == disk
    assert repo.gc().chunks_removed == 1 and not planted.exists()


# Section: indexes and manifests


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_index_and_manifest_round_trip(tmp_path: Path, encrypted: bool) -> None:
    secret = SECRET if encrypted else None
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK, secret=secret)
    index = index_of(repo, COMPRESSIBLE, bytes(CHUNK), INCOMPRESSIBLE[:100])
    manifest = commit(repo, POINTS[0], {"disk0": index, "disk1": index_of(repo, COMPRESSIBLE)})
    reopened = Repository.open(repo.path, secret=secret)
    read = reopened.read_index(VM, POINTS[0], "disk0")
    assert (read.virtual_size, read.chunk_size, read.digests) == (
        2 * CHUNK + 100,
        CHUNK,
        index.digests,
    )
    assert reopened.read_manifest(VM, POINTS[0]) == manifest
    assert reopened.get(VM, POINTS[0]) == manifest
    assert reopened.manifests(VM) == [manifest] and reopened.latest(VM) == manifest
    raw = (repo.path / "points" / VM / POINTS[0] / "disk0.index").read_bytes()
    assert (index.digests in raw) is not encrypted


def test_a_manifest_write_that_fails_leaves_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is the commit point, written atomically: a write that fails before it is
    durable (here its fsync) leaves no manifest, not a torn one; the point does not exist."""
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    first = commit(repo, POINTS[0], {"disk0": index_of(repo, COMPRESSIBLE)})
    second = dataclasses.replace(first, id=POINTS[1], started=2000.0, completed=2001.0)
    repo.begin_point(VM, POINTS[1])
    repo.write_index(VM, POINTS[1], "disk0", repo.read_index(VM, POINTS[0], "disk0"))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RepositoryError, match="writing the manifest"):
        repo.write_manifest(second)
    monkeypatch.undo()
    point = repo.path / "points" / VM / POINTS[1]
    assert sorted(p.name for p in point.iterdir()) == ["disk0.index"]
    assert repo.manifests(VM) == [first]


def test_disk_digest_derives_from_the_index_alone(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    index = index_of(repo, COMPRESSIBLE, bytes(CHUNK), INCOMPRESSIBLE)
    expected = hashlib.sha256(
        b"blockctl-disk-v2\0" + struct.pack(">QQ", 3 * CHUNK, CHUNK) + bytes(index.digests)
    ).hexdigest()
    assert index.disk_digest() == expected
    assert index_of(repo, COMPRESSIBLE, bytes(CHUNK), INCOMPRESSIBLE).disk_digest() == expected
    changed = index.copy()
    changed.put(1, repo.digest(COMPRESSIBLE))
    assert changed.disk_digest() != expected and index.disk_digest() == expected
    longer = DiskIndex(3 * CHUNK + 1, CHUNK, bytearray(index.digests) + bytes(32))
    assert longer.disk_digest() != expected


# Section: garbage collection and prune


def test_gc_removes_unreferenced_chunks_and_dead_points_and_keeps_referenced(
    tmp_path: Path,
) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    kept = index_of(repo, COMPRESSIBLE, INCOMPRESSIBLE)
    commit(repo, POINTS[0], {"disk0": kept})
    orphan = store(repo, INCOMPRESSIBLE[::-1])
    # A backup that died after its index, before its manifest: not a point.
    dead = DiskIndex.empty(CHUNK, CHUNK)
    dead.put(0, store(repo, COMPRESSIBLE[::-1]))
    repo.sync()
    repo.begin_point(VM, POINTS[1])
    repo.write_index(VM, POINTS[1], "disk0", dead)
    tmp = repo.path / "chunks" / orphan.hex()[:2] / f".{orphan.hex()}.1.dead.tmp"
    tmp.write_bytes(b"partial")
    result = repo.gc()
    assert (result.chunks_kept, result.chunks_removed, result.temporary_removed) == (2, 2, 2)
    assert result.bytes_removed > 0
    assert chunk_files(repo) == {d.hex() for d in kept.referenced()}
    assert repo.point_ids(VM) == [POINTS[0]]
    assert not tmp.exists()
    for i in range(kept.count):
        assert repo.read_chunk(kept.at(i), kept.chunk_length(i))
    assert repo.gc().chunks_removed == 0


def test_gc_refuses_while_another_open_file_holds_the_shared_lock(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    orphan = store(repo, INCOMPRESSIBLE)
    fd = os.open(repo.path / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a backup writing (another open file description)
        with pytest.raises(RepositoryBusy):
            repo.gc()
        with repo.lock(exclusive=False), pytest.raises(RepositoryBusy):
            repo.gc()  # a second shared holder in this very process
        assert chunk_files(repo) == {orphan.hex()}
    finally:
        os.close(fd)
    assert repo.gc().chunks_removed == 1


def point_files(repo: Repository, point: str) -> dict[str, bytes]:
    directory = repo.path / "points" / VM / point
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.exists() else {}


async def test_prune_keeps_a_served_point_and_a_server_waits_for_a_deletion(
    tmp_path: Path,
) -> None:
    """A point held by ``serving`` (as its NBD server holds it) is not deleted by a prune (it
    is reported as served, unnamed: no nbdkit here) and is deleted once let go. A server
    starting while a deletion holds the point's lock waits for it (the kernel lists it as
    waiting), then finds the point gone and refuses."""
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    for n, point in enumerate(POINTS[:2]):
        commit(
            repo, point, {"disk0": index_of(repo, INCOMPRESSIBLE[::-1] if n else COMPRESSIBLE)}, n
        )
    before = point_files(repo, POINTS[0])
    with repo.serving(VM, POINTS[0]):
        result = await ops.prune(repo, VM, keep_last=1)
        assert result.deleted == () and result.kept == POINTS[:2]
        [served] = result.served
        assert (served.point, served.pid, served.into) == (POINTS[0], None, None)
        assert "prune again once it has stopped" in served.reason
        assert point_files(repo, POINTS[0]) == before
    result = await ops.prune(repo, VM, keep_last=1)
    assert result.deleted == POINTS[:1] and result.served == ()
    assert point_files(repo, POINTS[1]) and not point_files(repo, POINTS[0])

    directory = repo.path / "points" / VM / POINTS[1]
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    outcome: list[BaseException | None] = []

    def start_server() -> None:
        try:
            with repo.serving(VM, POINTS[1]):
                outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a prune deleting the point
        server = threading.Thread(target=start_server)
        server.start()
        inode = f":{os.stat(directory).st_ino} "
        while not any(
            "->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()
        ):
            assert server.is_alive() and not outcome
            await anyio.sleep(0.01)
        (directory / "manifest.json").unlink()  # the deletion's first step
    finally:
        os.close(fd)
    server.join()
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError)
    assert "no complete backup" in str(outcome[0])


async def test_prune_keeps_the_newest_and_what_it_references(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    old_only = INCOMPRESSIBLE[::-1]
    for n, point in enumerate(POINTS):
        disk = (old_only if n < 2 else INCOMPRESSIBLE) + COMPRESSIBLE
        commit(repo, point, {"disk0": index_of(repo, disk[:CHUNK], disk[CHUNK:])}, n)
    with pytest.raises(ConfigError):
        await ops.prune(repo, VM, keep_last=0)
    result = await ops.prune(repo, VM, keep_last=1)
    assert result.deleted == POINTS[:2] and result.kept == POINTS[2:]
    assert result.chunks_removed == 1 and result.gc_skipped is None
    assert [m.id for m in repo.manifests(VM)] == [POINTS[2]]
    assert repo.digest(old_only).hex() not in chunk_files(repo)
    dest = tmp_path / "newest.raw"
    await ops.restore(repo, VM, POINTS[2], "disk0", dest, ImageFormat.RAW)
    assert dest.read_bytes() == INCOMPRESSIBLE + COMPRESSIBLE
    # keep_within=0 keeps nothing by age, but the newest always stays.
    again = await ops.prune(repo, VM, keep_within=0)
    assert again.deleted == () and again.kept == POINTS[2:]


async def test_prune_keeps_the_newest_point_of_each_disk_backed_up_apart(
    tmp_path: Path,
) -> None:
    """A disk backed up apart (a vhost-user-blk disk's backup runs in its daemon, apart from
    QEMU's disks) keeps its newest point through ``keep_last=1``: its checkpoint is named after
    it, and without it the repository would hold no backup of that disk."""
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    apart = {POINTS[0]: "disk1", POINTS[1]: "disk1", POINTS[2]: "disk0"}
    data = {point: os.urandom(CHUNK) for point in apart}
    for n, (point, device) in enumerate(apart.items()):
        commit(repo, point, {device: index_of(repo, data[point])}, n)
    manifests = repo.manifests(VM)
    assert ops.latest_holding(manifests, "disk1") == manifests[1]
    assert ops.latest_holding(manifests, "disk0") == manifests[2]
    assert ops.latest_holding(manifests, "disk2") is None
    result = await ops.prune(repo, VM, keep_last=1)
    assert result.deleted == POINTS[:1] and result.kept == POINTS[1:3]
    dest = tmp_path / "disk1.raw"
    await ops.restore(repo, VM, POINTS[1], "disk1", dest, ImageFormat.RAW)
    assert dest.read_bytes() == data[POINTS[1]]


async def test_prune_says_when_gc_was_skipped_for_a_running_backup(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    for n, point in enumerate(POINTS[:2]):
        commit(repo, point, {"disk0": index_of(repo, os.urandom(CHUNK))}, n)
    with repo.lock(exclusive=False):
        result = await ops.prune(repo, VM, keep_last=1)
    assert result.deleted == POINTS[:1] and result.gc_skipped is not None
    assert len(chunk_files(repo)) == 2  # collected later, not while the backup writes
    assert repo.gc().chunks_removed == 1


# Section: modes, loose repositories, keys


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_everything_is_owner_only_whatever_the_umask(
    tmp_path: Path, umask: int, encrypted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK, secret=SECRET if encrypted else None)
    index, _ = copy(repo, INCOMPRESSIBLE + COMPRESSIBLE + bytes(CHUNK), monkeypatch)
    commit(repo, POINTS[0], {"disk0": index})
    with ops._vm_lock(repo, VM):
        repo.begin_point(VM, POINTS[1])  # a backup in progress
    store(repo, os.urandom(CHUNK))
    repo.gc()
    dest = tmp_path / "out" / "restored.raw"
    dest.parent.mkdir()
    await ops.restore(repo, VM, POINTS[0], "disk0", dest, ImageFormat.RAW)
    seen = 0
    for path in [repo.path, *repo.path.rglob("*")]:
        seen += 1
        assert mode_of(path) == (0o700 if path.is_dir() else 0o600), path
    assert seen >= 10
    assert mode_of(dest) == 0o600


@pytest.mark.parametrize("how", ["mode-0777", "mode-0770", "uid-65534"])
def test_a_loose_repository_is_refused(tmp_path: Path, how: str) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    if how == "uid-65534":
        os.chown(repo.path, 65534, 65534)
    else:
        os.chmod(repo.path, int(how[-4:], 8))
    with pytest.raises(RepositoryError) as info:
        Repository.open(repo.path)
    assert type(info.value) is RepositoryError and str(repo.path) in str(info.value)
    empty = tmp_path / "new"
    empty.mkdir()
    os.chmod(empty, 0o777)
    with pytest.raises(RepositoryError):
        Repository.init(empty, chunk_size=CHUNK)
    assert list(empty.iterdir()) == []


def test_a_repository_path_that_is_a_symlink_is_followed_once(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    digest = store(repo, COMPRESSIBLE)
    (tmp_path / "link").symlink_to(repo.path)
    opened = Repository.open(tmp_path / "link")
    assert opened.path == repo.path
    assert opened.read_chunk(digest, CHUNK) == COMPRESSIBLE


def key_file(path: Path, secret: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(secret + b"\n")
    os.chmod(path, mode)
    return path


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    loose = key_file(tmp_path / "key", SECRET, 0o644)
    with pytest.raises(ConfigError):
        ops.init_repository(tmp_path / "r", key_file=loose)
    assert not (tmp_path / "r").exists()
    ops.init_repository(tmp_path / "r", key_file=key_file(tmp_path / "good", SECRET))
    with pytest.raises(ConfigError):
        ops.open_repository(tmp_path / "r", key_file=loose)
    assert ops.open_repository(tmp_path / "r", key_file=tmp_path / "good").encrypted


def test_a_wrong_or_missing_key_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    good = key_file(tmp_path / "good", SECRET)
    repo = ops.init_repository(tmp_path / "r", key_file=good, chunk_size=CHUNK)
    commit(repo, POINTS[0], {"disk0": index_of(repo, COMPRESSIBLE)})
    before = tree(repo.path)
    wrong = key_file(tmp_path / "wrong", b"not the secret")
    with pytest.raises(BackupKeyError):
        ops.open_repository(repo.path, key_file=wrong)
    with pytest.raises(BackupKeyError):
        ops.open_repository(repo.path)
    with pytest.raises(BackupKeyError):
        Repository.open(repo.path, secret=b"\x00" * 32)
    assert tree(repo.path) == before
    assert ops.open_repository(repo.path, key_file=good).get(VM, POINTS[0]).id == POINTS[0]


def test_two_backups_sharing_a_repository_object_sync_only_their_own_chunks(
    tmp_path: Path,
) -> None:
    """Two backups in one process share a Repository: each syncs (or discards) its own
    chunks. With one shared pending set, one backup's sync raced the other's writes and left
    a chunk its index named as a temporary file (found by the concurrent two-VM test)."""
    repo = Repository.init(tmp_path / "r", compression="none")
    first, second = repo.batch(), repo.batch()
    one, two = os.urandom(CHUNK), os.urandom(CHUNK)
    d1, d2 = repo.digest(one), repo.digest(two)
    assert first.write(d1, one) > 0
    assert second.write(d2, two) > 0
    first.sync()
    assert repo.has_chunk(d1) and not repo.has_chunk(d2)  # the other's is still pending
    second.discard()
    assert not repo.has_chunk(d2)
    assert not [p for p in (repo.path / "chunks").rglob("*.tmp")]
    assert repo.read_chunk(d1, CHUNK) == one


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("tail", [CHUNK, 1536, 1001])
async def test_restore_to_raw_is_exact_with_or_without_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, tail: int
) -> None:
    """The data goes past the page cache where the file takes it (ext4 here), through it
    where not (a filesystem refusing O_DIRECT, as tmpfs did before Linux 6.6); a short last
    chunk's padding is cut off: the image is the disk, byte for byte, and exactly its size."""
    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    disk = INCOMPRESSIBLE[:CHUNK] + bytes(CHUNK) + INCOMPRESSIBLE[:tail][::-1]
    pieces = disk[:CHUNK], disk[CHUNK : 2 * CHUNK], disk[2 * CHUNK :]
    commit(repo, POINTS[0], {"disk0": index_of(repo, *pieces)})
    if not direct:
        monkeypatch.setattr(_direct, "reopen_direct", lambda fd: None)
    dest = tmp_path / "disk.raw"
    await ops.restore(repo, VM, POINTS[0], "disk0", dest, ImageFormat.RAW)
    assert dest.stat().st_size == len(disk)
    assert dest.read_bytes() == disk
