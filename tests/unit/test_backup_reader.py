"""ChunkCopier's completion signal: what a backup waits on instead of polling at an interval."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl._backup.reader import ChunkCopier, RateLimiter
from blockctl._backup.store import DiskIndex, Repository
from blockctl.errors import ConfigError, NbdError
from tests.conftest import missing


def test_finished_is_set_when_the_last_thread_ends_even_on_error(tmp_path: Path) -> None:
    try:
        import nbd  # noqa: F401
    except ImportError:
        missing("libnbd's Python bindings (python3-libnbd, linked by scripts/setup)")
    repo = Repository.init(tmp_path / "R")
    index = DiskIndex.empty(2 * repo.chunk_size, repo.chunk_size)
    copier = ChunkCopier(
        socket=str(tmp_path / "absent.sock"),
        export="disk0",
        repo=repo,
        index=index,
        chunks=(0, 1),
        connections=2,
    )
    assert not copier.finished.is_set()
    copier.start()
    with pytest.raises(NbdError):
        copier.join()
    assert copier.finished.is_set()
    assert copier.done()


class _Clock:
    """A clock moved by hand: the limiter's arithmetic, no sleeping, no timing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_speed_limit_spaces_reads_to_the_rate() -> None:
    clock = _Clock()
    limiter = RateLimiter(4 << 20, clock=clock)  # 4 MiB/s
    assert limiter.take(4 << 20) == 0  # the first read goes at once
    assert limiter.take(4 << 20) == pytest.approx(1.0)  # paid for 1 s later
    assert limiter.take(2 << 20) == pytest.approx(2.0)  # granted while the others wait
    clock.now += 2.5  # the reader slept as told: 2.5 MiB-seconds of the debt are paid
    assert limiter.take(4 << 20) == pytest.approx(0.0)
    assert limiter.take(4 << 20) == pytest.approx(1.0)


def test_speed_limit_does_not_bank_idle_time() -> None:
    """A reader idle for a minute does not earn a minute of unlimited reading."""
    clock = _Clock()
    limiter = RateLimiter(1 << 20, clock=clock)
    limiter.take(1 << 20)
    clock.now += 60
    assert limiter.take(1 << 20) == 0
    assert limiter.take(1 << 20) == pytest.approx(1.0)


def test_speed_limit_burst_and_bad_rates() -> None:
    clock = _Clock()
    limiter = RateLimiter(1 << 20, burst=2 << 20, clock=clock)
    assert [limiter.take(1 << 20) for _ in range(3)] == [0, 0, 0]
    assert limiter.take(1 << 20) == pytest.approx(1.0)
    for rate in (0, -1):
        with pytest.raises(ConfigError, match="must be positive"):
            RateLimiter(rate)


def test_readers_sharing_a_limit_are_granted_in_turn() -> None:
    """Several threads take from one limiter: the total they are granted keeps the rate."""
    import threading

    clock = _Clock()
    limiter = RateLimiter(8 << 20, clock=clock)
    waits: list[float] = []
    lock = threading.Lock()

    def reader() -> None:
        for _ in range(4):
            wait = limiter.take(4 << 20)
            with lock:
                waits.append(wait)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 16 reads of 4 MiB at 8 MiB/s, the clock standing still: read k may start k/2 s later.
    assert sorted(waits) == pytest.approx([k / 2 for k in range(16)])
