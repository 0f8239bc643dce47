"""``apply`` checks the whole plan before it changes anything, and names what a failure left."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage
from blockctl._ops import apply as apply_ops
from blockctl._ops import drives
from blockctl.errors import CommandFailed, PartiallyApplied
from tests.integration.conftest import MIB, qcow2_image
from tests.integration.test_attach_cli import cli

pytestmark = pytest.mark.guest


async def listing(vm: str) -> dict[str, dict[str, object]]:
    return {d["file"]: d for d in json.loads((await cli("drives", vm, "--json")).stdout)}


async def settled_listing(vm: str) -> dict[str, dict[str, object]]:
    """The listing once the guest's virtio driver has set every disk up. Until then QEMU runs a
    virtio-blk disk in "auto writethrough" (``cache.writeback`` false) and turns the write cache
    on when the driver negotiates it: a listing taken while the guest boots changes later by
    itself. (Found under load: the comparison below failed on disk0's write cache.)"""
    with anyio.fail_after(180):
        while True:
            now = await listing(vm)
            if all(d["cache"]["writeback"] for d in now.values()):  # type: ignore[index]
                return now
            await anyio.sleep(0.5)


async def test_apply_checks_the_whole_plan_before_any_change(
    guest: GuestImage, images: Path, runtime_dir: Path
) -> None:
    disk = await qcow2_image(images / "a.qcow2", b"", 16 * MIB)
    await cli("up", "--name", "ap", "--strict")
    try:
        await cli("attach", "ap", disk, "--format", "qcow2", "--cache", "writeback")
        before = await settled_listing("ap")
        # A resize that would work, then an attach of a file that does not exist, and a cache
        # mode that needs another guest write cache: all three found before the resize runs.
        desired = images / "want.toml"
        desired.write_text(
            f'[[drive]]\nfile = "{disk}"\nformat = "qcow2"\ncache = "directsync"\n'
            f'size = "32M"\n\n[[drive]]\nfile = "{images / "missing.qcow2"}"\nformat = "qcow2"\n'
        )
        dry = await cli("apply", "ap", desired, "--dry-run", "--json", check=False)
        assert dry.returncode == 1  # conflicts: a dry run says so by its exit code too
        planned = json.loads(dry.stdout)
        # (disk0, the default VM's own disk, is not in the file: apply detaches it)
        assert [s["action"] for s in planned["steps"]] == ["cache", "resize", "attach", "detach"]
        conflicts = planned["conflicts"]
        assert len(conflicts) == 2, conflicts
        assert any("missing.qcow2" in c and "attach" in c for c in conflicts)
        assert any(c.startswith("cache disk1:") and "write cache" in c for c in conflicts)
        real = await cli("apply", "ap", desired, "--json", check=False)
        assert real.returncode == 1
        error = json.loads(real.stdout.splitlines()[-1])["error"]
        assert error["type"] == "Unsupported"
        assert "nothing was changed" in error["message"]
        assert "missing.qcow2" in error["message"] and "write cache" in error["message"]
        # ... and on the one line of stderr, not only under -v.
        assert "missing.qcow2" in real.stderr.splitlines()[0]
        assert await listing("ap") == before  # the resize did not run

        # Rates in the CLI's units.
        desired.write_text(
            f'[[drive]]\nfile = "{disk}"\nformat = "qcow2"\ncache = "writeback"\n'
            f'throttle = {{bps_wr = "20M", iops = 300}}\n'
        )
        done = json.loads((await cli("apply", "ap", desired, "--json")).stdout)
        assert [s["action"] for s in done["steps"]] == ["throttle", "detach"]
        limits = (await listing("ap"))[str(disk)]["throttle"]
        assert isinstance(limits, dict)
        assert (limits["bps_wr"], limits["iops"]) == (20 * MIB, 300)
        assert json.loads((await cli("apply", "ap", desired, "--json")).stdout)["steps"] == []
    finally:
        await cli("down", "ap")


async def test_a_step_failing_after_the_check_names_what_was_done(
    guest: GuestImage, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockctl import open_vm
    from blockctl.types import Drive, ImageFormat
    from tests.integration.conftest import base_config

    first = await qcow2_image(images / "f.qcow2", b"", 16 * MIB)
    second = await qcow2_image(images / "s.qcow2", b"", 16 * MIB)
    desired = [
        apply_ops.DesiredDrive(drive=Drive(file=f, format=ImageFormat.QCOW2), size=size)
        for f, size in ((first, 32 * MIB), (second, None))
    ]
    async with open_vm(base_config(guest)) as vm:
        await drives.hotplug(vm, Drive(file=first, format=ImageFormat.QCOW2))

        async def refused(*args: object, **kwargs: object) -> None:
            raise CommandFailed("device_add", "GenericError", "injected: the bus said no")

        monkeypatch.setattr(drives, "hotplug", refused)
        with pytest.raises(PartiallyApplied) as stopped:
            await apply_ops.apply(vm, desired)
        failure = stopped.value
        assert [s.action for s in failure.done] == [apply_ops.Action.RESIZE]  # type: ignore[attr-defined]
        assert failure.failed.action is apply_ops.Action.ATTACH  # type: ignore[attr-defined]
        assert failure.not_done == ()
        message = str(failure)
        assert "step 2 of 2" in message and "Done: resize disk0" in message
        assert "injected: the bus said no" in message and "Run apply again" in message
        monkeypatch.undo()
        # Applying again plans only what is still missing.
        left = await apply_ops.apply(vm, desired, dry_run=True)
        assert [s.action for s in left.steps] == [apply_ops.Action.ATTACH]
