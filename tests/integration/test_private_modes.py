"""Images and run-directory files blockctl creates are owner-only whatever the umask (issue 21).

Under umask 022 (the usual default) and 000: ``blockctl up``'s run directory (its disk image,
vm.json, logs, sockets), an external snapshot's overlay, and what ``_images.create`` /
``convert`` (``blockctl img create|convert``, restores) write are 0600 in a 0700 run dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, open_vm
from blockctl._images import convert, create
from blockctl._ops import chains
from blockctl.errors import ProcessFailed
from blockctl.types import Drive, ImageFormat
from tests.conftest import mode_of
from tests.integration.conftest import MIB, base_config, qcow2_image, raw_image, running

QCOW2, RAW = ImageFormat.QCOW2, ImageFormat.RAW


def modes_under(directory: Path) -> dict[str, str]:
    """Every entry below ``directory`` (itself included, as ".") and its mode, in octal."""
    found = {".": f"{mode_of(directory):04o}"}
    for path in sorted(directory.rglob("*")):
        found[str(path.relative_to(directory))] = f"{mode_of(path):04o}"
    return found


def assert_private_run_dir(run_dir: Path) -> dict[str, str]:
    """The run dir 0700; every file and socket in it 0600 (nothing for group or others)."""
    modes = modes_under(run_dir)
    expected = {
        name: "0700" if (run_dir / name).is_dir() and name != "." else "0600" for name in modes
    }
    expected["."] = "0700"
    assert modes == expected
    return modes


async def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *map(str, args)], check=False, env=dict(os.environ)
    )
    done = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


@pytest.mark.guest
async def test_up_run_dir_and_its_disk_are_owner_only(
    guest: GuestImage, runtime_dir: Path, umask: int
) -> None:
    up = json.loads((await cli("up", "--json", "--strict")).stdout)
    run_dir = runtime_dir / up["name"]
    try:
        modes = assert_private_run_dir(run_dir)
        # The names the issue is about, present and private.
        for name in ("disk0.qcow2", "vm.json", "qemu.log", "qmp.sock"):
            assert modes[name] == "0600", (name, modes)
    finally:
        await cli("down", up["name"])
    assert not running(up["pid"])


@pytest.mark.guest
async def test_snapshot_overlay_is_owner_only(guest: GuestImage, images: Path, umask: int) -> None:
    disk = await qcow2_image(images / "disk.qcow2", b"\x5a" * MIB, 8 * MIB)
    overlays = images / "overlays"
    overlays.mkdir(mode=0o755)
    async with open_vm(base_config(guest, Drive(file=disk, format=QCOW2))) as vm:
        snap = await chains.external_snapshot(vm, "t1", overlays)
        overlay = snap.overlays["disk0"]
        assert overlay.parent == overlays
        assert mode_of(overlay) == 0o600
        assert_private_run_dir(vm.run_dir)


async def test_created_and_converted_images_are_0600(images: Path, umask: int) -> None:
    base = await raw_image(images / "base.raw", b"\xa5" * MIB, 4 * MIB)
    made = images / "made.qcow2"
    await create(made, QCOW2, size=4 * MIB)
    overlay = images / "overlay.qcow2"
    await create(overlay, QCOW2, backing=base, backing_format=RAW)
    restored = images / "restored.raw"
    await convert(overlay, QCOW2, restored, RAW)
    for path in (made, overlay, restored):
        assert mode_of(path) == 0o600, path
    assert restored.read_bytes()[:MIB] == b"\xa5" * MIB  # qemu-img filled the file we made
    # The empty file made before qemu-img runs goes again when qemu-img fails.
    bad = images / "bad.qcow2"
    with pytest.raises(ProcessFailed):
        await create(bad, QCOW2, size=MIB, backing=images / "missing.raw", backing_format=RAW)
    assert not bad.exists()


async def test_img_create_and_convert_from_the_cli_are_0600(images: Path, umask: int) -> None:
    made = images / "cli.qcow2"
    await cli("img", "create", made, "1M", "-f", "qcow2")
    out = images / "cli.raw"
    await cli("img", "convert", made, out, "-f", "qcow2", "-O", "raw")
    assert (mode_of(made), mode_of(out)) == (0o600, 0o600)


async def test_an_existing_destination_keeps_its_mode_and_mode_can_be_asked(
    images: Path,
) -> None:
    old = os.umask(0o022)
    try:
        kept = images / "kept.qcow2"
        kept.write_bytes(b"")
        kept.chmod(0o640)  # the owner's choice for a file they made
        await create(kept, QCOW2, size=MIB)
        assert mode_of(kept) == 0o640
        shared = images / "shared.qcow2"
        await create(shared, QCOW2, size=MIB, mode=0o644)
        assert mode_of(shared) == 0o644
        umasked = images / "umasked.qcow2"
        await create(umasked, QCOW2, size=MIB, mode=None)  # left to qemu-img and the umask
        assert mode_of(umasked) == 0o644
    finally:
        os.umask(old)
