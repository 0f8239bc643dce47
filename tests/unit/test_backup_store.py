"""Repository chunk storage: zstd only where it pays (a sampled probe first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from blockctl._backup.store import Repository

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
