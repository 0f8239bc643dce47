"""Repository chunk storage: zstd only where it pays (a sampled probe first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from blockctl._backup.store import DiskPoint, Manifest, Repository, check_request_id
from blockctl.errors import BackupCorrupt, ConfigError

CHUNK = 4 << 20


class CountingZstd:
    """zstandard, recording the size of every input given to a compressor."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.inputs: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)  # the rest of zstandard, as it is

    def ZstdCompressor(self, **kwargs: Any) -> Any:
        outer = self
        compressor = self.real.ZstdCompressor(**kwargs)

        class Counting:
            def compress(self, data: bytes) -> bytes:
                outer.inputs.append(len(data))
                result: bytes = compressor.compress(data)
                return result

        return Counting()


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "R")  # zstandard is a dependency of blockctl


def stored(repo: Repository, data: bytes, counter: CountingZstd) -> tuple[int, list[int]]:
    counter.inputs.clear()
    digest = repo.digest(data)
    written = repo.write_chunk(digest, data)
    repo.sync()
    assert repo.read_chunk(digest, len(data)) == data
    return written, list(counter.inputs)


def test_incompressible_chunk_is_not_compressed_whole(repo: Repository) -> None:
    counter = CountingZstd(repo._zstd)
    repo._zstd = counter
    data = os.urandom(CHUNK)
    written, inputs = stored(repo, data, counter)
    assert CHUNK not in inputs, "zstd ran over a whole random chunk"
    assert written == CHUNK + 5  # header + the bytes as they are


def test_compressible_and_partly_compressible_chunks_are_compressed(repo: Repository) -> None:
    counter = CountingZstd(repo._zstd)
    repo._zstd = counter
    text = (b"the quick brown fox jumps over the lazy dog " * (CHUNK // 44 + 1))[:CHUNK]
    written, inputs = stored(repo, text, counter)
    assert CHUNK in inputs and written < CHUNK // 10
    half = os.urandom(CHUNK // 2) + bytes(CHUNK // 2)
    written, inputs = stored(repo, half, counter)
    assert CHUNK in inputs and written < CHUNK * 0.6


def chunk_files(repo: Repository) -> list[Path]:
    return sorted(p for p in (repo.path / "chunks").rglob("*") if p.is_file())


@pytest.mark.parametrize("length", [CHUNK, CHUNK - 1, 4096 - 5, 1])
def test_direct_writes_keep_every_byte_and_the_exact_size(repo: Repository, length: int) -> None:
    """O_DIRECT writes whole pages: the padding past the chunk's end is cut off again, so
    the file holds exactly header + payload, whatever the payload's length."""
    data = os.urandom(length)
    digest = repo.digest(data)
    batch = repo._default_batch()
    written = batch.write(digest, data)
    assert batch._direct  # this filesystem (the tests' tmp dir) takes O_DIRECT
    repo.sync()
    (file,) = chunk_files(repo)
    assert file.stat().st_size == written
    assert repo.read_chunk(digest, length) == data


def test_a_filesystem_without_o_direct_gets_buffered_writes(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem refusing O_DIRECT at open (EINVAL; tmpfs before Linux 6.6): the batch
    writes that chunk, and every next one, through the page cache; nothing lost or left."""
    real_open = os.open
    refused: list[str] = []

    def no_direct(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            refused.append(str(path))
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    batch = repo._default_batch()
    chunks = [os.urandom(CHUNK - 7), os.urandom(5000)]
    for data in chunks:
        batch.write(repo.digest(data), data)
    assert len(refused) == 1 and not batch._direct
    monkeypatch.undo()
    repo.sync()
    for data in chunks:
        assert repo.read_chunk(repo.digest(data), len(data)) == data
    assert not [p for p in chunk_files(repo) if p.name.endswith(".tmp")]


def test_an_alignment_refused_at_write_falls_back_without_a_torn_file(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device wanting more than page alignment refuses the direct write itself (EINVAL):
    the half-made file is removed and the chunk written buffered."""
    calls: list[int] = []

    def refuse(fd: int, data: Any, offset: int) -> int:
        calls.append(fd)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refuse)
    data = os.urandom(CHUNK)
    batch = repo._default_batch()
    batch.write(repo.digest(data), data)
    monkeypatch.undo()
    assert not batch._direct and len(calls) == 1
    repo.sync()
    (file,) = chunk_files(repo)
    assert file.stat().st_size == 5 + CHUNK  # no leftover of the refused direct write
    assert repo.read_chunk(repo.digest(data), CHUNK) == data


def _manifest(repo: Repository, request_id: str | None) -> Manifest:
    point = "20261203T101500.123456-ab12"
    disk = DiskPoint(
        device="disk0", node="drv0", virtual_size=CHUNK, chunk_size=CHUNK, disk_digest="0" * 64,
        chunks=1, zero_chunks=1, bytes_read=0, bytes_new=0, bytes_stored=0,
    )  # fmt: skip
    return Manifest(
        id=point, vm="vm1", kind="full", parent=None, checkpoint=f"bc-x-{point}", started=1.0,
        completed=2.0, qemu="7.2.0", disks=(disk,), request_id=request_id,
    )  # fmt: skip


def test_a_request_id_is_recorded_and_read_back_and_absent_without_one(repo: Repository) -> None:
    """A fleet activity's id survives the manifest's round trip (a retry finds its point by
    it); a point taken without one is written as before the field existed."""
    key = "temporal:fleet-backup-1/run-2/backup/hv1/web"
    with_id = _manifest(repo, key)
    repo.begin_point("vm1", with_id.id)
    repo.write_manifest(with_id)
    assert repo.get("vm1", with_id.id).request_id == key
    assert "request_id" not in _manifest(repo, None).to_json()
    assert Manifest.from_json(_manifest(repo, None).to_json(), "m").request_id is None


@pytest.mark.parametrize("bad", ["", "a b", "a\nb", "é", "x" * 2049, 5])
def test_a_malformed_request_id_is_refused(repo: Repository, bad: object) -> None:
    with pytest.raises(ConfigError):
        check_request_id(bad)
    data = _manifest(repo, "ok").to_json()
    data["request_id"] = bad
    with pytest.raises(BackupCorrupt):
        Manifest.from_json(data, "manifest")
