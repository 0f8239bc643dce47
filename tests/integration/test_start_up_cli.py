"""``blockctl status`` and ``drives`` against a running VM import only what they use, and a
warning still reaches stderr without ``-v`` (structlog is configured when the first one comes).
The unit half, without QEMU, is tests/unit/test_start_up.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import Drive, GuestImage, ImageFormat, open_vm
from blockctl._ops.drives import list_drives
from tests.integration.conftest import MIB, base_config, pattern, qcow2_image
from tests.unit.test_start_up import HEAVY, REPORT_MODULES, ROOT

pytestmark = pytest.mark.guest


async def blockctl(*argv: str) -> tuple[Any, int, set[str], list[dict[str, Any]]]:
    """``blockctl ARGV --json`` in a fresh process: its JSON output, exit code, the modules
    it executed, and the log events it printed on stderr."""
    result = await anyio.run_process(
        [sys.executable, "-c", REPORT_MODULES, *argv, "--json"],
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = result.stderr.decode().splitlines()
    report = json.loads(lines[-1])
    events = [json.loads(line) for line in lines[:-1] if line.startswith('{"')]
    return json.loads(result.stdout), report["code"], set(report["loaded"]), events


async def test_status_and_drives_import_only_what_they_use(guest: GuestImage, images: Path) -> None:
    disk = await qcow2_image(images / "lean.qcow2", pattern(1, MIB), 4 * MIB)
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2), name="lean")
    async with open_vm(config, console=False) as vm:
        expected = [
            {k: d.to_json()[k] for k in ("device", "node", "format", "file", "size")}
            for d in await list_drives(vm)
        ]
        status, code, loaded, events = await blockctl("status", "lean")
        assert (code, events) == (0, [])
        assert (status["name"], status["pid"]) == ("lean", vm.pid)
        assert [d["file"] for d in status["drives"]] == [str(disk)]
        assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))

        listed, code, loaded, events = await blockctl("drives", "lean")
        assert (code, events) == (0, [])
        assert [{k: d[k] for k in expected[0]} for d in listed] == expected
        assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


async def test_a_warning_is_shown_without_v(guest: GuestImage, images: Path) -> None:
    """A qcow2 file plugged as raw: `blockctl.image.raw_with_header`, a warning, on stderr
    (JSON: stderr is not a terminal); the debug events stay hidden."""
    disk = await qcow2_image(images / "header.qcow2", pattern(2, MIB), MIB)
    async with open_vm(base_config(guest, name="warned"), console=False):
        plugged, code, loaded, events = await blockctl(
            "attach", "warned", str(disk), "--format", "raw"
        )
        assert code == 0, plugged
        assert [(e["event"], e["level"]) for e in events] == [
            ("blockctl.image.raw_with_header", "warning")
        ]
        assert events[0]["image"] == str(disk)
        assert "structlog" in loaded  # configured then, for that warning
