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
