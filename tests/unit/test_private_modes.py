"""What blockctl writes in the run directory is owner-only whatever the umask (issue 21):
drives.json, vm.json, journal and freeze records all go through the one atomic writer."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from blockctl import _agent, _fsutil, _journal, _runtime
from blockctl._journal import Intent, OpKind, Step
from blockctl._registry import DriveRecord, DriveRegistry
from tests.conftest import mode_of


def intent() -> Intent:
    return Intent(id="snap-1", kind=OpKind.SNAPSHOT, vm="vm", step=Step.PLANNED, started=1.0)


def test_drive_registry_is_0600(tmp_path: Path, umask: int) -> None:
    registry = DriveRegistry.load(tmp_path)
    registry.put(DriveRecord(device_id="disk1", device={"driver": "virtio-blk-pci"}))
    assert mode_of(tmp_path / "drives.json") == 0o600
    assert DriveRegistry.load(tmp_path).drives.keys() == {"disk1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drives.json"]


def test_vm_record_is_0600(tmp_path: Path, umask: int) -> None:
    record = _runtime.VMRecord(
        name="vm",
        pid=os.getpid(),
        run_dir=str(tmp_path),
        monitor=str(tmp_path / "qmp.sock"),
        console_socket=None,
        console_log=None,
        qemu_log=str(tmp_path / "qemu.log"),
        argv=("qemu-system-x86_64",),
        accel="tcg",
        started=time.time(),
    )
    _runtime.write_record(record)
    assert mode_of(tmp_path / _runtime.RECORD) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [_runtime.RECORD]


def test_journal_record_is_0600_even_over_a_loose_leftover_temporary_file(
    tmp_path: Path, umask: int
) -> None:
    # A temporary file of this pid left behind (a previous holder of the pid died before its
    # rename): reusing it kept its loose mode.
    path = _journal.path_of(tmp_path, "snap-1")
    leftover = _fsutil.temp_path(path)
    leftover.write_bytes(b"stale")
    leftover.chmod(0o666)
    _journal.write(tmp_path, intent())
    assert mode_of(path) == 0o600
    assert [i.id for i in _journal.load_all(tmp_path) if isinstance(i, Intent)] == ["snap-1"]


def test_journal_write_never_follows_a_symlink_at_its_temporary_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    path = _journal.path_of(tmp_path, "snap-1")
    _fsutil.temp_path(path).symlink_to(victim)
    _journal.write(tmp_path, intent())
    assert victim.read_bytes() == b"keep"
    assert not path.is_symlink()
    assert mode_of(path) == 0o600


def test_freeze_record_is_0600_even_over_a_loose_leftover_temporary_file(
    tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets, "token_hex", lambda _n: "cafe")
    expected = tmp_path / f"{_agent.FREEZE_PREFIX}{os.getpid()}-cafe.json"
    leftover = _fsutil.temp_path(expected)
    leftover.write_bytes(b"stale")
    leftover.chmod(0o666)
    path = _agent._write_freeze_record(tmp_path, "snapshot", None)
    assert path == expected
    assert mode_of(path) == 0o600


def test_runtime_root_and_its_missing_parents_are_0700(
    tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "a" / "b" / "blockctl"
    monkeypatch.setenv("BLOCKCTL_RUNTIME_DIR", str(root))
    assert _runtime.runtime_root() == root
    for directory in (tmp_path / "a", tmp_path / "a" / "b", root):
        assert mode_of(directory) == 0o700, directory
