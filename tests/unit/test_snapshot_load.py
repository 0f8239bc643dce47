"""What a failed ``snapshot-load`` reports and does (issue 16, defect 5), against the fake QMP
peer: the run state as ``query-status`` has it, the disks reverted, and a resume only when
QEMU failed before it changed anything (its load_snapshot reverts every disk, then loads the VM
state; "while loading VM state" errors come after the revert)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from blockctl._machine import VM
from blockctl._ops.chains import _load_failed
from blockctl._qmp.session import QMPSession
from blockctl.errors import JobFailed
from blockctl.testing import FakeQMP


class Paused:
    """A QEMU whose VM is stopped in restore-vm (as snapshot-load leaves it) until ``cont``."""

    def __init__(self) -> None:
        self.running = False
        self.commands: list[str] = []

    def __call__(self, command: str, args: Mapping[str, Any]) -> object:
        self.commands.append(command)
        if command == "query-status":
            status = "running" if self.running else "restore-vm"
            return {"running": self.running, "status": status}
        if command == "cont":
            self.running = True
            return {}
        raise AssertionError(command)


def failure(error: str) -> JobFailed:
    return JobFailed(
        f"snapshot-load job bc-load-1 failed: {error}",
        job_id="bc-load-1",
        job_type="snapshot-load",
        target=None,
        status="concluded",
        error=error,
        offset=0,
        length=1,
    )


async def load_failed(peer: Paused, error: str, *, was_running: bool, run_dir: Path) -> Any:
    (run_dir / "qemu.log").write_text("old line\n")
    offset = (run_dir / "qemu.log").stat().st_size
    with (run_dir / "qemu.log").open("a") as log:
        log.write("qemu-system-x86_64: Size mismatch: pc.ram: 0x14000000 != 0x10000000\n")
    async with (
        FakeQMP(peer).serving() as fake,
        QMPSession.connect(fake.client_socket, label="fake") as session,
    ):
        vm = VM(session, name="t", pid=None, run_dir=run_dir)
        return await _load_failed(vm, failure(error), ["disk0", "disk1"], was_running, offset)


async def test_reverted_disks_are_named_and_the_guest_stays_stopped(tmp_path: Path) -> None:
    peer = Paused()
    failed = await load_failed(
        peer, "Error -22 while loading VM state", was_running=True, run_dir=tmp_path
    )
    assert failed.reverted == ("disk0", "disk1")
    assert failed.run_state == "restore-vm" and not failed.resumed
    assert "cont" not in peer.commands
    assert failed.qemu_log == (
        "qemu-system-x86_64: Size mismatch: pc.ram: 0x14000000 != 0x10000000",
    )
    first = str(failed).splitlines()[0]
    assert "QEMU had reverted disk0, disk1 to the snapshot but not the RAM" in first
    assert "left the VM restore-vm" in first and "does not resume it" in first
    assert "old line" not in str(failed)


@pytest.mark.parametrize(("was_running", "resumed"), [(True, True), (False, False)])
async def test_nothing_reverted_resumes_a_guest_that_was_running(
    tmp_path: Path, was_running: bool, resumed: bool
) -> None:
    peer = Paused()
    failed = await load_failed(
        peer,
        "Snapshot 'x' does not exist in one or more devices",
        was_running=was_running,
        run_dir=tmp_path,
    )
    assert failed.reverted == ()
    assert failed.resumed is resumed
    assert ("cont" in peer.commands) is resumed
    assert failed.run_state == ("running" if resumed else "restore-vm")
    first = str(failed).splitlines()[0]
    assert "nothing was reverted" in first
    assert ("blockctl resumed the guest" in first) is resumed
