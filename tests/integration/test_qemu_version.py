"""The QEMU selected by the environment is the one that runs, and it runs strict.

``BLOCKCTL_QEMU_PREFIX`` (or ``BLOCKCTL_QEMU_SYSTEM`` …) picks the programs; the running
QEMU's ``query-version`` must be what the selected binary's ``--version`` prints, and every
helper program must be the same build. Under ``BLOCKCTL_EXPECT_QEMU=MAJOR.MINOR`` (CI sets it
per pass) the version must also be that one, so a pass that silently ran the system QEMU fails.
"""

from __future__ import annotations

import os
import re

import pytest

from blockctl import GuestImage, _binaries, open_vm
from blockctl.errors import CommandFailed
from blockctl.types import MachineConfig
from tests.integration.conftest import STRICT, qemu_binary, run

pytestmark = pytest.mark.guest

# "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
# "qemu-img version 7.2.22 (Debian …)", "qemu-nbd 10.0.2 (Debian …)"
_VERSION = re.compile(r"^\S.*?\s(\d+)\.(\d+)\.(\d+)(?:\s+\((.*)\))?$", re.MULTILINE)


async def printed_version(program: _binaries.Program) -> tuple[tuple[int, int, int], str]:
    out = await run(qemu_binary(program), "--version")
    match = _VERSION.search(out)
    assert match is not None, (program, out)
    major, minor, micro, package = match.groups()
    return (int(major), int(minor), int(micro)), (package or "").strip()


async def test_the_selected_qemu_is_the_one_running(guest: GuestImage) -> None:
    printed, package = await printed_version("qemu-system-x86_64")
    async with open_vm(MachineConfig(deprecated_input=STRICT), console=False) as vm:
        running = await vm.version()
    assert (running.major, running.minor, running.micro) == printed
    assert running.package == package
    # qemu-img, qemu-io and qemu-nbd come from the same build as qemu-system.
    for program in ("qemu-img", "qemu-io", "qemu-nbd"):
        assert await printed_version(program) == (printed, package), program
    expected = os.environ.get("BLOCKCTL_EXPECT_QEMU")
    if expected:
        assert f"{running.major}.{running.minor}" == expected, (
            f"BLOCKCTL_EXPECT_QEMU={expected}, but {qemu_binary('qemu-system-x86_64')} "
            f"is QEMU {running} ({running.package})"
        )


async def test_tests_run_with_deprecated_input_rejected(guest: GuestImage) -> None:
    """The suite's VMs refuse deprecated commands: a use of one cannot go unnoticed."""
    async with open_vm(MachineConfig(deprecated_input=STRICT), console=False) as vm:
        assert "-compat" in vm.argv
        with pytest.raises(CommandFailed, match="disabled by policy") as info:
            await vm.command(
                "drive-backup", {"device": "none0", "target": "/nonexistent", "sync": "full"}
            )
        assert info.value.error_class == "CommandNotFound"
        # A deprecated argument of a current command is refused too.
        with pytest.raises(CommandFailed, match="Deprecated parameter device"):
            await vm.command("block_set_io_throttle", {"device": "none0", **_ZERO_THROTTLE})


_ZERO_THROTTLE = {k: 0 for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")}
