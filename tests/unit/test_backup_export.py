"""A backup point's disk as a flat image (issue 18, live restore: what the NBD server serves),
without a server: reads across chunk boundaries equal the disk, zero chunks read as zeros
without touching the repository, encrypted repositories read alike, and a damaged chunk is an
error, never other bytes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockctl._backup.export import Extent, PointImage
from blockctl._backup.store import Repository
from blockctl.errors import BackupCorrupt
from tests.unit.test_repository_store import CHUNK, POINTS, SECRET, VM, commit, index_of

#: A short last chunk, data chunks either side of a zero chunk, two equal chunks.
PIECES = (
    os.urandom(CHUNK),
    bytes(CHUNK),
    (b"blockctl " * CHUNK)[:CHUNK],
    os.urandom(CHUNK),
    (b"blockctl " * CHUNK)[:CHUNK],
    os.urandom(CHUNK // 2 + 123),
)
DISK = b"".join(PIECES)


def point_image(tmp_path: Path, encrypted: bool = False) -> PointImage:
    repo = Repository.init(tmp_path / "repo", secret=SECRET if encrypted else None)
    index = index_of(repo, *PIECES)
    commit(repo, POINTS[0], {"disk0": index})
    reopened = Repository.open(tmp_path / "repo", secret=SECRET if encrypted else None)
    return PointImage(reopened, reopened.read_index(VM, POINTS[0], "disk0"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, PointImage]:
    return {
        encrypted: point_image(tmp_path_factory.mktemp(f"enc{encrypted}"), encrypted)
        for encrypted in (False, True)
    }


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_the_whole_disk_reads_back(images: dict[bool, PointImage], encrypted: bool) -> None:
    image = images[encrypted]
    assert image.size == len(DISK)
    assert image.read(0, len(DISK)) == DISK


@settings(max_examples=300)
@given(data=st.data(), encrypted=st.booleans())
def test_any_range_reads_what_the_disk_holds_there(
    images: dict[bool, PointImage], data: st.DataObject, encrypted: bool
) -> None:
    offset = data.draw(st.integers(0, len(DISK)))
    length = data.draw(st.integers(0, len(DISK) - offset))
    assert images[encrypted].read(offset, length) == DISK[offset : offset + length]


@pytest.mark.parametrize(
    ("offset", "length"),
    [(CHUNK - 1, 2), (CHUNK - 100, CHUNK + 200), (2 * CHUNK - 5, 10), (len(DISK) - 7, 7)],
    ids=["data|zero", "data|zero|data", "zero|data", "short last chunk"],
)
def test_reads_across_chunk_boundaries(tmp_path: Path, offset: int, length: int) -> None:
    assert point_image(tmp_path).read(offset, length) == DISK[offset : offset + length]


def test_zero_chunks_read_as_zeros_without_the_repository(tmp_path: Path) -> None:
    image = point_image(tmp_path)
    # The zero chunk is in no file: deleting every chunk file cannot change its reading.
    for chunk in (image.repo.path / "chunks").glob("*/*"):
        chunk.unlink()
    assert image.read(CHUNK + 10, CHUNK - 20) == bytes(CHUNK - 20)
    assert image.chunks_decoded == 0
    with pytest.raises(BackupCorrupt):
        image.read(0, 1)


def test_a_chunk_is_decoded_once_for_many_small_reads(tmp_path: Path) -> None:
    image = point_image(tmp_path)
    for offset in range(0, CHUNK, 4096):
        assert image.read(offset, 4096) == DISK[offset : offset + 4096]
    assert image.chunks_decoded == 1


def test_threads_reading_one_chunk_decode_it_once(tmp_path: Path) -> None:
    image = point_image(tmp_path)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(image.read(3 * CHUNK, CHUNK)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [PIECES[3]] * 8
    assert image.chunks_decoded == 1


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    pieces = [os.urandom(CHUNK) for _ in range(5)]
    commit(repo, POINTS[0], {"disk0": index_of(repo, *pieces)})
    image = PointImage(repo, repo.read_index(VM, POINTS[0], "disk0"), cache_chunks=2)
    for _ in range(2):
        for i in range(5):
            assert image.read(i * CHUNK, 10) == pieces[i][:10]
    assert image.chunks_decoded == 10  # nothing survived five other chunks in a cache of two


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("how", ["flipped byte", "truncated"])
def test_a_damaged_chunk_is_an_error_not_other_bytes(
    tmp_path: Path, encrypted: bool, how: str
) -> None:
    image = point_image(tmp_path, encrypted)
    index = image.index
    path = image.repo.path / "chunks" / index.at(3).hex()[:2] / index.at(3).hex()
    blob = bytearray(path.read_bytes())
    if how == "flipped byte":
        blob[len(blob) // 2] ^= 0x01
    else:
        del blob[-100:]
    path.chmod(0o600)
    path.write_bytes(bytes(blob))
    with pytest.raises(BackupCorrupt, match="chunk"):
        image.read(3 * CHUNK + 10, 100)
    # Not cached as good or bad: its neighbours still read, it still fails.
    assert image.read(0, CHUNK) == PIECES[0]
    with pytest.raises(BackupCorrupt):
        image.read(4 * CHUNK - 1, 2)


def test_reads_past_the_end_are_refused(tmp_path: Path) -> None:
    image = point_image(tmp_path)
    with pytest.raises(ValueError, match="past the end"):
        image.read(len(DISK) - 1, 2)
    with pytest.raises(ValueError, match="past the end"):
        image.read(-1, 1)


def test_extents_mark_zero_chunks_and_merge_runs(tmp_path: Path) -> None:
    image = point_image(tmp_path)
    assert image.extents(0, len(DISK)) == [
        Extent(0, CHUNK, False),
        Extent(CHUNK, CHUNK, True),
        Extent(2 * CHUNK, len(DISK) - 2 * CHUNK, False),
    ]
    assert image.extents(CHUNK + 5, 10) == [Extent(CHUNK + 5, 10, True)]
    assert image.extents(len(DISK) - 3, 100) == [Extent(len(DISK) - 3, 3, False)]
