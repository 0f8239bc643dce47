"""The library as an embedding service uses it: silent unless asked, public names only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.guest

_SCRIPT = """
import sys
from pathlib import Path

import anyio

from blockctl import Drive, ImageFormat, MachineConfig, open_vm
from blockctl import drives
from blockctl.types import DeprecatedInput

async def main(image: str, configure: bool) -> None:
    if configure:
        import structlog
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        )
    config = MachineConfig(deprecated_input=DeprecatedInput.REJECT)
    async with open_vm(config, console=False) as vm:
        info = await drives.hotplug(vm, Drive(file=Path(image), format=ImageFormat.QCOW2))
    print("done", info.device_id)

anyio.run(main, sys.argv[1], sys.argv[2] == "configured")
"""


async def run_script(image: Path, mode: str) -> tuple[str, str]:
    result = await anyio.run_process(
        [sys.executable, "-c", _SCRIPT, str(image), mode], env=dict(os.environ), check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode(), result.stderr.decode()


async def test_the_library_prints_nothing_unless_logging_is_configured(images: Path) -> None:
    image = images / "lib.qcow2"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"])
    out, err = await run_script(image, "silent")
    assert (out, err) == ("done disk0\n", "")
    # The same events reach an application that configures structlog (here: to stderr).
    out, err = await run_script(image, "configured")
    assert out == "done disk0\n"
    assert "blockctl.drive.plugged" in err
    assert "blockctl.qmp.command" in err  # debug events too: the application chose no filter
