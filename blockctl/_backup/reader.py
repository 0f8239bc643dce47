"""Reading a point-in-time export over NBD into the repository: each byte read once.

libnbd (Debian's ``python3-libnbd``) does the NBD work: it measured 270 MB/s per connection
here against blockctl's own asyncio client's 130-150, and it releases the GIL, so several
connections (QEMU's read-only export allows multi-conn) read and hash in parallel threads, each
handing its chunks to a writer thread of its own (compress, encrypt, write) so the next chunk
is read while the last one goes to the disk: blake3, hashlib, zstandard and the AES-GCM of
``cryptography`` release the GIL too.

The plan comes from block status first: for a full backup, chunks whose extents are all
zeros are not read; for an incremental, only chunks that a dirty extent of the frozen
bitmap touches are read, the others keep their parent's digest.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import mmap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from blockctl import _direct
from blockctl._backup.store import (
    CHUNK_HEADER,
    ZERO_DIGEST,
    ChunkBatch,
    DiskIndex,
    Repository,
)
from blockctl.errors import (
    ConfigError,
    MissingComponent,
    NbdError,
    RepositoryError,
    errno_symbol,
)

if TYPE_CHECKING:
    from blockctl._backup.control import CopyControl

#: NBD block-status flags (base:allocation), and the dirty flag of qemu:dirty-bitmap:*.
STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1
#: Extents asked per block-status call (QEMU answers at most this much at once anyway).
STATUS_SPAN = 1 << 30
#: NBD connections (reader threads, each with its writer thread) of a backup's copy.
#: Measured (512 MiB random, 6 reps interleaved in one VM, 2 shared cores): at load 2.5, 2
#: pipelined read 812 MB/s against 3's 640 (more CPU per GiB: 0.90 s against 0.74); 3 won
#: only at load 6-7, where more threads take a larger share of the busy cores.
DEFAULT_CONNECTIONS = 2


def libnbd() -> ModuleType:
    try:
        import nbd
    except ImportError as exc:
        raise MissingComponent(
            "libnbd's Python bindings (module nbd)",
            "apt-get install python3-libnbd; in a virtualenv, link nbd.py and libnbdmod*.so "
            "from /usr/lib/python3/dist-packages into its site-packages (scripts/setup does)",
        ) from exc
    module: ModuleType = nbd
    return module


def _nbd_error(exc: Any, export: str, what: str) -> NbdError:
    number = getattr(exc, "errno", None)
    name = errno_symbol(number)
    return NbdError(
        f"NBD export {export!r}: {what}: {getattr(exc, 'string', exc)} ({name})", number
    )


def close(handle: Any) -> None:
    """Disconnect politely and release the handle now (libnbd's bindings close only when the
    object is collected, which a thread's frame may delay)."""
    nbd = libnbd()
    if not handle.aio_is_closed():
        with contextlib.suppress(nbd.Error):
            handle.shutdown()
    handle.__del__()
    with contextlib.suppress(AttributeError):
        del handle._o


def _connect(socket: str, export: str, context: str | None) -> Any:
    nbd = libnbd()
    handle = nbd.NBD()
    try:
        handle.set_export_name(export)
        if context is not None:
            handle.add_meta_context(context)
        handle.connect_unix(socket)
        if context is not None and not handle.can_meta_context(context):
            raise NbdError(f"NBD export {export!r} does not offer {context}")
    except nbd.Error as exc:
        close(handle)
        raise _nbd_error(exc, export, "connect") from exc
    except BaseException:
        close(handle)
        raise
    return handle


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadPlan:
    read: tuple[int, ...]  # chunk numbers to read, in order
    zero: tuple[int, ...]  # chunk numbers known to be all zeros without reading


def plan_reads(
    socket: str, export: str, *, size: int, chunk_size: int, dirty_bitmap: str | None
) -> ReadPlan:
    """Which chunks to read: all but the zero ones (full), or the dirty ones (incremental)."""
    context = "base:allocation" if dirty_bitmap is None else f"qemu:dirty-bitmap:{dirty_bitmap}"
    handle = _connect(socket, export, context)
    count = -(-size // chunk_size)
    touched = bytearray(count)  # full: a non-zero extent; incremental: a dirty one
    try:
        offset = 0
        extents: list[tuple[int, int, int]] = []

        def collect(meta: str, start: int, entries: list[int], err: Any) -> int:
            if meta == context:
                position = start
                for i in range(0, len(entries) - 1, 2):
                    extents.append((position, entries[i], entries[i + 1]))
                    position += entries[i]
            return 0

        while offset < size:
            extents.clear()

            try:
                handle.block_status(min(STATUS_SPAN, size - offset), offset, collect)
            except libnbd().Error as exc:
                raise _nbd_error(exc, export, f"block status at {offset}") from exc
            if not extents:
                raise NbdError(f"NBD export {export!r}: no block status at offset {offset}")
            for start, length, flags in extents:
                end = min(start + length, size)
                wanted = bool(flags & STATE_DIRTY) if dirty_bitmap else not flags & STATE_ZERO
                if wanted and end > start:
                    for i in range(start // chunk_size, (end - 1) // chunk_size + 1):
                        touched[i] = 1
                offset = max(offset, end)
    finally:
        close(handle)
    read = tuple(i for i in range(count) if touched[i])
    zero = () if dirty_bitmap else tuple(i for i in range(count) if not touched[i])
    return ReadPlan(read=read, zero=zero)


class RateLimiter:
    """A speed limit in bytes/s shared by every reader thread of a backup (GCRA, the token
    bucket as a "theoretical arrival time"): a read may start at once when the reads before
    it are paid for; otherwise :meth:`take` says how long to wait first. ``clock`` is
    injectable (a test drives it by hand). ``burst``: bytes that may go without waiting."""

    def __init__(self, rate: int, *, burst: int = 0, clock: Callable[[], float] | None = None):
        if rate <= 0:
            raise ConfigError("speed", f"{rate} bytes/s: a speed limit must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._tat: float | None = None  # when every byte granted so far is paid for

    def take(self, n: int) -> float:
        """Grant ``n`` bytes; returns the seconds to wait before using them (0: go now)."""
        with self._lock:
            now = self._clock()
            tat = now if self._tat is None else max(self._tat, now)
            wait = max(0.0, tat - now - self.burst / self.rate)
            self._tat = tat + n / self.rate
            return wait


@dataclass(slots=True)
class CopyStats:
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    chunks_new: int = 0
    chunks_read: int = 0
    zero_read: int = 0  # chunks read that turned out to hold zeros only


class ChunkCopier:
    """Reads ``plan.read`` through ``connections`` NBD connections in threads, stores each
    chunk and fills ``index``. :meth:`start`, then poll :meth:`done`/``stats``; :meth:`stop`
    asks the threads to finish their current chunk; :meth:`join` waits and raises the first
    error a thread met."""

    def __init__(
        self,
        *,
        socket: str,
        export: str,
        repo: Repository,
        index: DiskIndex,
        chunks: tuple[int, ...],
        connections: int = DEFAULT_CONNECTIONS,
        fail_after: int | None = None,
        batch: ChunkBatch | None = None,
        control: CopyControl | None = None,
    ) -> None:
        self.socket = socket
        self.export = export
        self.repo = repo
        self.index = index
        #: Where the chunks go until the backup syncs them (default: the repository's own).
        self.batch = batch if batch is not None else repo._default_batch()
        #: Pause, speed limit and waiting out a full repository: shared by the disks of
        #: one backup, driven by other clients too (blockctl._backup.control).
        self.control = control
        self.stats = CopyStats()
        self.total = sum(index.chunk_length(i) for i in chunks)
        self._chunks: Iterator[int] = iter(chunks)
        self._lock = threading.Lock()
        self._seen: set[bytes] = set()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._work, name=f"bc-read-{export}-{n}", daemon=True)
            for n in range(max(1, min(connections, len(chunks) or 1)))
        ]
        #: Fault injection for tests: fail after this many chunks were stored.
        self._fail_after = fail_after
        #: Set when the last thread has ended, whatever the outcome: what a waiter blocks on
        #: (polling :meth:`done` at a fixed interval added that interval to every backup).
        self.finished = threading.Event()
        self._running = len(self._threads)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.control is not None:
            self.control.wake()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]

    def join_quietly(self) -> None:
        for thread in self._threads:
            thread.join()

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set():
                return None
            return next(self._chunks, None)

    def _work(self) -> None:
        try:
            self._copy()
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self.finished.set()

    def _copy(self) -> None:
        """Read, hash and decide here; write in a second thread of this connection, so the
        next chunk is read while the last one goes to the disk (the O_DIRECT write waits for
        the device: it was half of each chunk's time). One write in flight per connection,
        into the other of two buffers: a buffer is read into again only after its write."""
        try:
            handle = _connect(self.socket, self.export, None)
        except BaseException as exc:
            self._fail(exc)
            return
        size = self.index.chunk_size
        nbd = libnbd()
        writer = ThreadPoolExecutor(1, thread_name_prefix=f"bc-write-{self.export}")
        pending: Future[None] | None = None
        try:
            zeros = bytes(size)
            # Two buffers per connection, read into again and again: a new 4 MiB object per
            # chunk (pread's) costs fresh pages, measurable on a busy machine. Each is a
            # page-aligned frame that the chunk is read into after its header's place, so
            # the O_DIRECT write goes out of it as it is (no 4 MiB copy per chunk).
            frame_size = _direct.padded(CHUNK_HEADER + size)
            frames = [memoryview(mmap.mmap(-1, frame_size)) for _ in range(2)]
            buffers = [
                (frame, nbd.Buffer.from_buffer(frame[CHUNK_HEADER : CHUNK_HEADER + size]))
                for frame in frames
            ]
            turn = 0
            while (i := self._next()) is not None:
                length = self.index.chunk_length(i)
                offset = i * size
                if self.control is not None and not self.control.admit(length, self._stop):
                    return  # stopped while paused or held to the speed: the backup is ending
                frame: memoryview | None
                if length == size:
                    (frame, target), turn = buffers[turn], 1 - turn
                else:
                    frame, target = None, nbd.Buffer.from_buffer(bytearray(length))
                try:
                    cookie = handle.aio_pread(target, offset)
                    while not handle.aio_command_completed(cookie):
                        handle.poll(-1)
                except nbd.Error as exc:
                    raise _nbd_error(
                        exc, self.export, f"read of {length} bytes at {offset}"
                    ) from exc
                data: bytearray | memoryview = target.to_buffer()
                # startswith: a memoryview's == compares item by item, 30x slower here.
                if zeros.startswith(data):
                    digest, new = ZERO_DIGEST, False
                else:
                    digest = self.repo.digest(data)
                    with self._lock:
                        new = digest not in self._seen and not self.repo.has_chunk(digest)
                        self._seen.add(digest)
                if pending is not None:
                    pending.result()  # the other buffer's write: done before it is reused
                    pending = None
                if new:
                    pending = writer.submit(self._store_and_record, i, digest, data, length, frame)
                else:
                    self._record(i, digest, length, new=False, written=0)
            if pending is not None:
                pending.result()
                pending = None
        except BaseException as exc:
            self._fail(exc)
        finally:
            if pending is not None:
                try:
                    pending.result()
                except BaseException as exc:
                    self._fail(exc)  # after another: join() raises the first
            writer.shutdown(wait=True)
            close(handle)

    def _store_and_record(
        self,
        i: int,
        digest: bytes,
        data: bytearray | memoryview,
        length: int,
        frame: memoryview | None = None,
    ) -> None:
        written = self._store(digest, data, frame)
        self._record(i, digest, length, new=True, written=written)

    def _record(self, i: int, digest: bytes, length: int, *, new: bool, written: int) -> None:
        """Chunk ``i`` is in the index and the counts once it is stored (or needed no write)."""
        with self._lock:
            self.index.put(i, digest)
            self.stats.bytes_read += length
            self.stats.chunks_read += 1
            if digest == ZERO_DIGEST:
                self.stats.zero_read += 1
            if new and written:
                self.stats.bytes_new += length
                self.stats.bytes_stored += written
                self.stats.chunks_new += 1
            if self._fail_after is not None and self.stats.chunks_read >= self._fail_after:
                raise OSError(errno_module.EIO, "injected failure (test)")

    def _store(
        self, digest: bytes, data: bytearray | memoryview, frame: memoryview | None = None
    ) -> int:
        """Write one chunk; a write error the control pauses for (a full repository, with the
        ``enospc`` policy) is tried again once another client resumes the copy."""
        while True:
            try:
                return self.batch.write(digest, data, frame=frame)
            except (OSError, RepositoryError) as exc:
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if (
                    self.control is None
                    or not isinstance(cause, OSError)
                    or not self.control.pause_on_error(cause, self._stop)
                ):
                    raise

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)
        self._stop.set()


def measure_rate(samples: list[tuple[float, int]], now: float, done: int) -> float | None:
    """Bytes/s over the last few seconds of ``samples`` (kept to the last 10)."""
    samples.append((now, done))
    del samples[:-10]
    first_t, first_done = samples[0]
    if now - first_t <= 0 or done <= first_done:
        return None
    return (done - first_done) / (now - first_t)


Clock = Callable[[], float]
monotonic: Clock = time.monotonic
