"""A live restore into a running VM killed around its hot-plug (issue 18): the copy's record
is written before the hot-plug (from its plan: device id, node names), naming the server,
the nodes the hot-plug adds and the files made for it, and rewritten from QEMU's graph once
the disk is attached. Here, without QEMU: the record as the restore writes it, read back
from the run directory, and what recovery plans from it (and does, for what needs no QMP)
when QEMU shows the device absent (killed before the ``device_add``) or present (killed
after it). (Killed right after the hot-plug, with QEMU: tests/integration/
test_live_restore.py, ``attached``.)"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from blockctl import _argv, _binaries, _images, _journal, _proc
from blockctl._backup import live
from blockctl._backup.serve import PointExport, backing_nodes
from blockctl._images import ImageLayer
from blockctl._journal import (
    DeleteFiles,
    DeleteNodes,
    Facts,
    Intent,
    RestartMirror,
    RestartStream,
    StopServer,
    Verdict,
)
from blockctl._ops import recovery
from blockctl.types import Drive, ImageFormat, Interface
from tests.unit.test_launch_windows import fake_server, orphan

BASE = "bclr-ab12"


def written(tmp_path: Path, server: int, raw: bool) -> tuple[Intent, list[Path]]:
    """The record ``restore_live`` writes before its hot-plug of disk 2 (the VM has disk0
    and disk1), read back from the run directory, and the files it names."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = tmp_path / ("t.raw" if raw else "t.qcow2")
    overlay = tmp_path / ".t.raw.live-overlay-ab12.qcow2"
    image = overlay if raw else target
    made = [overlay, target] if raw else [target]
    for path in made:
        path.write_bytes(b"new")
    source = _argv.DriveSource(
        chain=(
            ImageLayer(
                filename=str(image),
                format=ImageFormat.QCOW2,
                virtual_size=1 << 20,
                backing_filename=None,
                backing_format=None,
                data_file=None,
            ),
        )
    )
    drive = Drive(file=image, format=ImageFormat.QCOW2, interface=Interface.VIRTIO)
    socket = tmp_path / "srv" / "nbd.sock"
    plan = _argv.over_backing(
        _argv.plan_drive(2, drive, source, "pc", None), "drv2", backing_nodes(BASE, socket)
    )
    export = PointExport(socket=socket, pid=server, size=1 << 20, home=tmp_path / "srv")
    vm: Any = SimpleNamespace(name="vm1", run_dir=run_dir, session=SimpleNamespace(lost=False))
    call: Any = SimpleNamespace(
        vm=vm,
        repo=SimpleNamespace(path=tmp_path / "repo"),
        vm_name="src",
        point="p1",
        device="disk0",
        target=target,
        size=1 << 20,
        device_target=False,
    )
    intent = live._hotplug_intent(
        call, plan, BASE, export, created=made, overlay=overlay if raw else None
    )
    op = _journal.begin(vm, intent)
    op.release()  # the controller is gone
    (loaded,) = _journal.load_all(run_dir)
    assert isinstance(loaded, Intent)
    return loaded, made


def facts(plugged: tuple[str, ...], device: bool, server_alive: bool) -> Facts:
    """QEMU with disk0, and ``plugged`` of the hot-plug's nodes (disk2 attached: ``device``)."""
    chains = {"disk0": ("drv0",), **({"disk2": ("drv2", BASE)} if device else {})}
    return Facts(
        alive=True,
        nodes=frozenset({"drv0", "drv0-file", *plugged}),
        chains=chains,
        server_alive=server_alive,
    )


@pytest.mark.parametrize("raw", [False, True], ids=["qcow2", "raw"])
async def test_killed_before_the_device_was_added_recover_removes_what_it_made(
    tmp_path: Path, raw: bool
) -> None:
    """No device yet (killed before the hot-plug's first node, or between its nodes and its
    ``device_add``): the guest never had the disk, so the hot-plug's nodes, the files made
    for it and the server go; nothing else is touched."""
    server = orphan()
    started = _proc.process_start(server)
    try:
        intent, made = written(tmp_path, server, raw)
        assert intent.server is not None and intent.server.pid == server
        assert set(intent.hotplug_nodes) == {"drv2", "drv2-file", BASE, f"{BASE}-nbd"}
        # Killed between its blockdev-adds and its device_add: the nodes added go (top-down).
        half = _journal.plan(intent, facts((f"{BASE}-nbd", BASE), False, True))
        assert half.verdict is Verdict.NOT_DONE and half.forget, half
        assert half.message.startswith(f"{intent.describe()}: not done"), half.message
        assert half.actions == (
            DeleteNodes((BASE, f"{BASE}-nbd")),
            DeleteFiles(tuple(str(p) for p in made)),
            StopServer(intent.server),
        ), half.actions
        # Killed before any: the files and the server go, done here as recovery does them.
        plan = _journal.plan(intent, facts((), False, True))
        assert plan.verdict is Verdict.NOT_DONE, plan
        assert plan.actions == half.actions[1:], plan.actions
        vm: Any = SimpleNamespace(registry=SimpleNamespace(drives={}))
        for action in plan.actions:
            await recovery._act(vm, action)
        assert not any(p.exists() for p in made)
        assert not _proc.process_alive(server, started)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


@pytest.mark.parametrize("raw", [False, True], ids=["qcow2", "raw"])
async def test_a_file_written_since_it_was_made_is_kept_and_said(tmp_path: Path, raw: bool) -> None:
    """Killed after the ``device_add``, then the disk unplugged by another client before
    ``recover``: QEMU shows no device, as if never attached, but the guest wrote to the
    image. Recovery finds the file holding data (a qcow2 with a cluster allocated, a raw file
    with a data extent; as made, neither holds any), keeps it and says so, never removing
    what may be the guest's only writes; the rest goes as before."""
    server = orphan()
    try:
        intent, made = written(tmp_path, server, raw)
        for path in made:  # as the restore makes them: empty
            path.unlink()
            fmt = ImageFormat.QCOW2 if path.suffix == ".qcow2" else ImageFormat.RAW
            await _images.create(path, fmt, size=1 << 20)
            assert not await recovery._holds_data(path), path
        image = made[0]  # the device's image: the qcow2 target, a raw target's overlay
        await _proc.run([_binaries.qemu_io(), "-f", "qcow2", "-c", "write 64k 4k", str(image)])
        assert await recovery._holds_data(image)
        if raw:
            with open(made[1], "r+b") as file:
                file.seek(512 << 10)
                file.write(b"guest")
            assert await recovery._holds_data(made[1])
        assert not await recovery._holds_data(tmp_path / "absent")
        holding = frozenset(str(p) for p in made[: 1 + raw])
        plan = _journal.plan(intent, replace(facts((), False, True), holding_data=holding))
        assert plan.verdict is Verdict.ATTENTION and plan.forget, plan
        assert intent.server is not None
        assert plan.actions == (StopServer(intent.server),), plan.actions
        assert all(f in plan.message for f in holding) and "kept" in plan.message, plan.message
        assert plan.message.startswith(intent.describe()), plan.message
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


@pytest.mark.parametrize("raw", [False, True], ids=["qcow2", "raw"])
async def test_killed_once_the_device_was_added_recover_copies(tmp_path: Path, raw: bool) -> None:
    """The device is there, still on the backup (killed right after its ``device_add``,
    before the record was rewritten): the copy is started again (a raw target's mirror onto
    the target's nodes the record names), nothing removed."""
    server = orphan()
    try:
        intent, made = written(tmp_path, server, raw)
        plugged = ("drv2", "drv2-file", BASE, f"{BASE}-nbd")
        plan = _journal.plan(intent, facts(plugged, True, True))
        assert plan.verdict is None, plan
        want = (
            RestartMirror("disk2", "drv2", "drv2-target") if raw else RestartStream("disk2", "drv2")
        )
        assert plan.actions == (want,), plan.actions
        if raw:
            assert [n["node-name"] for n in intent.add_nodes["disk2"]] == [
                "drv2-target-file",
                "drv2-target",
            ]
        assert all(p.exists() for p in made)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


@pytest.mark.parametrize("qemu", [True, False], ids=["qemu-up", "qemu-gone"])
@pytest.mark.parametrize("raw", [False, True], ids=["qcow2", "raw"])
async def test_killed_before_its_record_named_the_servers_pid_recover_stops_it(
    tmp_path: Path, raw: bool, qemu: bool
) -> None:
    """The first record, written before the server starts (``_serving``), names the
    server's directory (no pid yet) and the files the restore makes, and no device: killed
    once the server listens (before its pid was recorded), ``recover`` finds the server by
    its pid file and stops it, and removes its directory and those files, whether QEMU is
    still up (the guest never had the disk) or gone."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = tmp_path / ("t.raw" if raw else "t.qcow2")
    made = [tmp_path / ".t.raw.live-overlay-ab12.qcow2", target] if raw else [target]
    for path in made:
        path.write_bytes(b"new")
    home = run_dir / "nbd-1"
    server = fake_server(home)
    started = _proc.process_start(server)
    vm: Any = SimpleNamespace(
        name="vm1",
        run_dir=run_dir,
        session=SimpleNamespace(lost=False),
        registry=SimpleNamespace(drives={}),
    )
    call: Any = SimpleNamespace(
        vm=vm,
        repo=SimpleNamespace(path=tmp_path / "repo"),
        vm_name="src",
        point="p1",
        device="disk0",
        target=target,
    )
    try:
        _journal.begin(vm, live._serving_intent(call, home, made, raw)).release()
        (intent,) = _journal.load_all(run_dir)
        assert isinstance(intent, Intent) and intent.server is not None
        assert intent.server.pid == 0 and intent.server.home == str(home)
        assert intent.devices == {} and intent.created_files == tuple(str(p) for p in made)
        plan = _journal.plan(intent, facts((), False, False) if qemu else Facts(alive=False))
        assert plan.verdict is Verdict.NOT_DONE and plan.forget, plan
        assert plan.message.startswith(f"{intent.describe()}: not done"), plan.message
        assert plan.actions == (
            DeleteFiles(tuple(str(p) for p in made)),
            StopServer(intent.server),
        ), plan.actions
        done = [await recovery._act(vm, action) for action in plan.actions]
        assert f"stopped the backup's server (pid {server})" in done, done
        assert not any(p.exists() for p in made) and not home.exists()
        assert not _proc.process_alive(server, started)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
