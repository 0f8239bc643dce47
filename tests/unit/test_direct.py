"""Writes past the page cache: aligned, padded, pooled, and refused where O_DIRECT is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockctl import _direct


def test_parts_are_written_whole_at_the_offset_and_padded_with_zeros(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = _direct.open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert fd is not None  # the tests' tmp dir is ext4 here: O_DIRECT is taken
    try:
        assert _direct.pwrite_direct(fd, (b"head", b"x" * 5000), 2 * _direct.ALIGN) == 5004
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 2 * _direct.ALIGN + _direct.padded(5004)
    assert data[2 * _direct.ALIGN :][:5004] == b"head" + b"x" * 5000
    assert data[2 * _direct.ALIGN + 5004 :] == bytes(_direct.padded(5004) - 5004)


def test_a_refused_open_is_none_and_other_errors_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: object, flags: int, mode: int = 0o777) -> int:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "open", refuse)
    assert _direct.open_direct(tmp_path / "f", os.O_WRONLY | os.O_CREAT) is None
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        _direct.open_direct(tmp_path / "missing" / "f", os.O_WRONLY | os.O_CREAT)


def test_reopen_direct_names_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        path.rename(tmp_path / "g")  # the path changed: the descriptor's file is written
        direct = _direct.reopen_direct(fd)
        assert direct is not None
        try:
            _direct.pwrite_direct(direct, (b"z" * _direct.ALIGN,), 0)
        finally:
            os.close(direct)
    finally:
        os.close(fd)
    assert (tmp_path / "g").read_bytes() == b"z" * _direct.ALIGN


def test_buffers_are_page_aligned_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_direct, "_POOL", [])
    with _direct.aligned_buffer(5000) as first:
        assert len(first) >= 5000 and len(first) % _direct.ALIGN == 0
        first[:3] = b"abc"
    assert len(_direct._POOL) == 1
    with _direct.aligned_buffer(100) as again:
        assert bytes(again[:3]) == b"abc"  # the same pages, not fresh ones
    with _direct.aligned_buffer(1 << 20) as bigger:
        assert len(bigger) >= 1 << 20  # the pooled one is too small: a new buffer
    assert len(_direct._POOL) == 2
