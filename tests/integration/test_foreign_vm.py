"""A QEMU that blockctl did not launch: plain ``-drive`` options, attached by socket path,
driven through the CLI with ``--json`` as hot-plug automation and backup agents do."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl import GuestImage
from blockctl._console import GuestConsole
from tests.integration.conftest import (
    MIB,
    pattern,
    qcow2_image,
    qemu_binary,
    run,
    sha256,
)

pytestmark = pytest.mark.guest


async def cli(*args: str | Path, check: bool = True) -> tuple[int, Any]:
    """``blockctl ARGS --json`` in another process; its exit code and JSON output."""
    result = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *map(str, args), "--json"],
        check=False,
        env=dict(os.environ),
    )
    out = result.stdout.decode()
    if check:
        assert result.returncode == 0, (args, out, result.stderr.decode())
    return result.returncode, json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


@contextlib.asynccontextmanager
async def foreign_qemu(
    guest: GuestImage, disk: Path, where: Path, *, name: str | None
) -> AsyncIterator[tuple[Path, GuestConsole]]:
    """QEMU as another tool starts it: ``-drive``, one QMP socket, no blockctl run directory."""
    qmp, console = where / "ext.sock", where / "con.sock"
    argv = [
        qemu_binary("qemu-system-x86_64"),
        *(["-name", name] if name else []),
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        guest.append,
        "-drive",
        f"file={disk},format=qcow2,if=virtio,id=drive0",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-serial",
        f"unix:{console},server=on,wait=off",
    ]
    process = await anyio.open_process(argv, stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if qmp.exists() and console.exists():
                break
            await anyio.sleep(0.05)
        stream = await anyio.connect_unix(str(console))
        shell = GuestConsole(stream, "ext")
        await shell.wait_ready()
        yield qmp, shell
        await stream.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def guest_sum(shell: GuestConsole, dev: str, mib: int) -> str:
    out = await shell.check(
        f"dd if=/dev/{dev} bs=1M count={mib} iflag=direct 2>/dev/null | sha256sum"
    )
    return out.split()[0]


async def test_a_qemu_started_with_drive_options(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    size_mib = 16
    disk = await qcow2_image(images / "legacy.qcow2", pattern(7, 4 * MIB), size_mib * MIB)
    extra = await qcow2_image(images / "extra.qcow2", pattern(8, MIB), 16 * MIB)
    repo = tmp_path / "repo"
    async with foreign_qemu(guest, disk, tmp_path, name="ext1") as (sock, shell):
        # Its -drive disk appears under a name a user can type back: the BlockBackend's.
        _, status = await cli("status", sock)
        assert status["name"] == "ext1"
        devices = {d["device"] for d in status["drives"]}
        assert devices == {"drive0"}

        # Hot-plug and detach: what blockctl records about its drive is kept for this VM.
        _, plugged = await cli("attach", sock, extra, "--format", "qcow2")
        await shell.check("for i in $(seq 100); do [ -b /dev/vdb ] && exit 0; sleep 0.1; done")
        assert await guest_sum(shell, "vdb", 1) == sha256(pattern(8, MIB))
        await cli("detach", sock, str(plugged["device"]))

        # An external snapshot, named after the VM's identity and the device, then commit.
        _, snap = await cli("snapshot", sock, "create", "s1")
        overlay = Path(str(snap["overlays"]["drive0"]))
        assert overlay.name == "ext1-drive0-s1.qcow2"
        await shell.check("dd if=/dev/urandom of=/dev/vda bs=1M count=1 seek=8 oflag=direct")
        await cli("commit", sock, "drive0")
        before_backup = await guest_sum(shell, "vda", size_mib)

        # A full and an incremental backup, each restoring equal to what the guest read.
        await cli("backup", "init", "--repo", repo)
        _, full = await cli("backup", "create", sock, "--repo", repo, "--full")
        await shell.check("dd if=/dev/urandom of=/dev/vda bs=64k count=3 seek=40 oflag=direct")
        after = await guest_sum(shell, "vda", size_mib)
        _, inc = await cli("backup", "create", sock, "--repo", repo)
        for point, expected in ((full, before_backup), (inc, after)):
            out = tmp_path / f"{point['id']}.raw"
            await cli(
                "restore", "ext1", str(point["id"]), "drive0", out, "--repo", repo, "-O", "raw"
            )
            await run("truncate", "-s", f"{size_mib}M", out)
            assert sha256(out.read_bytes()) == expected, point["id"]

        # A live cache change needs the complete option set of nodes QEMU opened from -drive:
        # refused with the reason, nothing changed.
        _, chain = await cli("chain", sock)
        code, refused = await cli("cache", sock, "drive0", "none", check=False)
        assert code == 1
        error = refused["error"]
        assert isinstance(error, dict)
        assert error["type"] == "Unsupported"
        assert "'drive0' was not created by blockctl" in error["message"]
        assert "blockdev-reopen resets every option" in error["message"]
        assert (await cli("chain", sock))[1] == chain


async def test_an_unnamed_qemu_gets_its_identity_from_the_user(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """Started without -name: queries work; what names files is refused with the way out
    (--vm-name), then works under the name given; never a path in a file name."""
    disk = await qcow2_image(images / "anon.qcow2", pattern(9, MIB), 8 * MIB)
    async with foreign_qemu(guest, disk, tmp_path, name=None) as (sock, _):
        _, status = await cli("status", sock)
        assert "/" in str(status["name"])  # a description of where it was reached...
        assert str(status["name"]).startswith("unnamed VM at ")
        code, refused = await cli("snapshot", sock, "create", "s1", check=False)
        assert code == 1
        assert "--vm-name" in str(refused["error"])
        assert list(images.glob("*s1*")) == []
        _, snap = await cli("snapshot", sock, "create", "s1", "--vm-name", "anon7")
        overlay = Path(str(snap["overlays"]["drive0"]))
        assert overlay.name == "anon7-drive0-s1.qcow2"
        _, chain = await cli("chain", sock, "--vm-name", "anon7")
        files = {n["node_name"]: n["filename"] for n in chain["nodes"]}
        device = chain["devices"][0]
        assert device["id"] == "drive0"
        assert [files[n] for n in device["chain"]] == [str(overlay), str(disk)]
