"""ChunkCopier's completion signal: what a backup waits on instead of polling at an interval."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl._backup.reader import ChunkCopier
from blockctl._backup.store import DiskIndex, Repository
from blockctl.errors import NbdError
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
