"""A backup point's disk as a flat image: what the NBD server of a live restore serves.

Reads map onto the point's index: the chunks a request spans are read with the store's own
reading code (decrypted, decompressed, and checked against their digest before a byte is
returned), a zero chunk reads as zeros without touching the repository. A chunk that fails its
check raises :class:`~blockctl.errors.BackupCorrupt`: the server answers EIO, never wrong data.

Decoded chunks are kept in a small cache: QEMU asks for much less than a chunk at a time
(block-stream and the guest's copy-on-read reads), and decoding a 4 MiB chunk per 64 KiB
request would read, decrypt and hash each chunk dozens of times. A chunk being decoded by one
thread is waited for by the others that need it, not decoded twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from blockctl._backup.store import ZERO_DIGEST, DiskIndex, Repository

#: Decoded chunks kept (8 chunks of 4 MiB: 32 MiB at the default chunk size).
CACHE_CHUNKS = 8


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the image: ``zero`` when it is made of zero chunks (a hole)."""

    offset: int
    length: int
    zero: bool


class _Pending:
    """A chunk one thread is decoding; the others wait on ``done``."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class PointImage:
    """The guest-visible bytes of one disk at one point, read-only, safe across threads."""

    def __init__(
        self,
        repo: Repository,
        index: DiskIndex,
        *,
        where: str = "",
        cache_chunks: int = CACHE_CHUNKS,
    ) -> None:
        self.repo = repo
        self.index = index
        self.where = where
        self._cache_chunks = max(0, cache_chunks)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pending: dict[int, _Pending] = {}
        #: Chunks decoded from the repository (each costs a read, decrypt and hash).
        self.chunks_decoded = 0

    @property
    def size(self) -> int:
        return self.index.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; a range past the end is a ``ValueError``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset}: past the end ({self.size})")
        chunk_size = self.index.chunk_size
        parts: list[bytes] = []
        end = offset + length
        while offset < end:
            i, inner = divmod(offset, chunk_size)
            n = min(end - offset, self.index.chunk_length(i) - inner)
            if self.index.at(i) == ZERO_DIGEST:
                parts.append(bytes(n))
            else:
                parts.append(self._chunk(i)[inner : inner + n])
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The runs of data and of zero chunks covering ``offset`` to ``offset + length``
        (clipped to the image), adjacent runs of one kind merged."""
        end = min(offset + length, self.size)
        chunk_size = self.index.chunk_size
        runs: list[Extent] = []
        while offset < end:
            i = offset // chunk_size
            n = min(end, (i + 1) * chunk_size) - offset
            zero = self.index.at(i) == ZERO_DIGEST
            if runs and runs[-1].zero == zero:
                last = runs[-1]
                runs[-1] = Extent(last.offset, last.length + n, zero)
            else:
                runs.append(Extent(offset, n, zero))
            offset += n
        return runs

    def _chunk(self, i: int) -> bytes:
        with self._lock:
            data = self._cache.get(i)
            if data is not None:
                self._cache.move_to_end(i)
                return data
            pending = self._pending.get(i)
            mine = pending is None
            if pending is None:
                pending = self._pending[i] = _Pending()
        if not mine:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            return pending.data
        try:
            data = self.repo.read_chunk(
                self.index.at(i), self.index.chunk_length(i), where=self.where
            )
        except BaseException as exc:
            pending.error = exc
            # A failed chunk is not cached: the next read tries again (and fails again if
            # the chunk is damaged; a passing I/O error may not recur).
            with self._lock:
                del self._pending[i]
            pending.done.set()
            raise
        pending.data = data
        with self._lock:
            self.chunks_decoded += 1
            self._cache[i] = data
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
            del self._pending[i]
        pending.done.set()
        return data
