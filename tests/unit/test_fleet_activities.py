"""The fleet's snapshot, commit, attach and detach activities given what
``recovery.reconcile`` found on the VM (pure decision logic: the VM, its reconciliation and
its chain or devices are stand-ins; the
activities run in ``temporalio.testing.ActivityEnvironment``, no server, no QEMU). The
killed-worker retries on a real server and QEMU are tests/integration/test_fleet.py's."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from blockctl import chains, drives, recovery
from blockctl._fleet import activities
from blockctl._fleet.inventory import (
    VMAttach,
    VMChain,
    VMChainResult,
    VMDetach,
    VMPlugResult,
    plug_device_id,
)
from blockctl._journal import Verdict
from blockctl._ops.chains import overlay_name
from blockctl._ops.drives import _DEVICE_ID
from blockctl._registry import DriveRecord
from blockctl.errors import ConfigError, DriveNotFound
from blockctl.types import Drive, ImageFormat

REQUEST = VMChain("hv1", "web", "t2")


@dataclasses.dataclass
class StandIn:
    """The VM as the activity sees it: its name, identity and chain (device to files)."""

    name: str = "web"
    identity: str = "web"
    chain: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    changed: list[str] = dataclasses.field(default_factory=list)  # snapshot/commit calls


def found(verdict: Verdict, kept: bool) -> recovery.Recovery:
    return recovery.Recovery(
        op_id="op-1",
        kind="commit",
        what="commit of virtio0",
        step="switching",
        verdict=verdict,
        message="the graph is in neither state",
        kept=kept,
    )


@pytest.fixture
def vm(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    vm = StandIn()

    @asynccontextmanager
    async def attach(name: str, **_: Any) -> AsyncIterator[StandIn]:
        assert name == vm.name
        yield vm

    async def list_external(v: StandIn) -> dict[str, list[str]]:
        return v.chain

    async def external_snapshot(v: StandIn, tag: str, *_: Any) -> Any:
        v.changed.append(f"snapshot {tag}")
        raise AssertionError("not reached in these tests")

    async def delete_external(v: StandIn, tag: str) -> None:
        v.changed.append(f"commit {tag}")

    monkeypatch.setattr(activities, "attach", attach)
    monkeypatch.setattr(chains, "list_external", list_external)
    monkeypatch.setattr(chains, "external_snapshot", external_snapshot)
    monkeypatch.setattr(chains, "delete_external", delete_external)
    return vm


def retry() -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=2)
    return env


def reconciled(monkeypatch: pytest.MonkeyPatch, *results: recovery.Recovery) -> None:
    async def reconcile(_vm: Any) -> list[recovery.Recovery]:
        return list(results)

    monkeypatch.setattr(recovery, "reconcile", reconcile)


UNSETTLED = [
    found(Verdict.ATTENTION, kept=True),
    found(Verdict.RUNNING, kept=False),  # another client's operation, still running
    dataclasses.replace(found(Verdict.FINISHED, kept=True), kind="freeze"),  # guest frozen
]


@pytest.mark.parametrize("result", UNSETTLED, ids=lambda r: f"{r.verdict.value}-kept{r.kept}")
@pytest.mark.parametrize("activity_fn", [activities.snapshot_vm, activities.commit_vm])
async def test_a_retry_that_finds_an_unsettled_operation_fails_naming_it_and_the_way_out(
    vm: StandIn, monkeypatch: pytest.MonkeyPatch, result: recovery.Recovery, activity_fn: Any
) -> None:
    """A retry whose chain looks done (the snapshot's overlay there; the commit's gone) but
    whose reconciliation kept a record for attention (or found it running) must not report
    the snapshot or commit done (``reused``): it fails, final, naming the VM, the record
    and ``blockctl recover``; nothing is changed."""
    if activity_fn is activities.snapshot_vm:
        vm.chain = {"virtio0": [f"/d/{overlay_name('web', 'virtio0', 't2')}", "/d/web.qcow2"]}
    else:
        vm.chain = {"virtio0": ["/d/web.qcow2"]}
    reconciled(monkeypatch, result)
    with pytest.raises(ApplicationError) as failed:
        await retry().run(activity_fn, REQUEST)
    assert failed.value.non_retryable
    assert failed.value.type == "UnsafeOperation"
    message = str(failed.value)
    for part in ("web", "op-1", result.verdict.value, result.message, "blockctl recover web"):
        assert part in message, (part, message)
    assert "--forget" in message
    assert vm.changed == []


@pytest.mark.parametrize("verdict", [Verdict.FINISHED, Verdict.NOT_DONE, Verdict.FAILED])
async def test_a_retry_after_a_settled_operation_reports_the_earlier_attempts_work(
    vm: StandIn, monkeypatch: pytest.MonkeyPatch, verdict: Verdict
) -> None:
    """Settled records (finished, undone, failed with the chain as before) do not stop a
    retry: the tag's overlay in the chain is the earlier attempt's snapshot; its absence,
    the earlier attempt's commit."""
    overlay = f"/d/{overlay_name('web', 'virtio0', 't2')}"
    vm.chain = {"virtio0": [overlay, "/d/web.qcow2"]}
    reconciled(monkeypatch, found(verdict, kept=False))
    snap: VMChainResult = await retry().run(activities.snapshot_vm, REQUEST)
    assert (snap.reused, snap.overlays, snap.error) == (True, {"virtio0": overlay}, None)
    vm.chain = {"virtio0": ["/d/web.qcow2"]}
    done: VMChainResult = await retry().run(activities.commit_vm, REQUEST)
    assert (done.reused, done.overlays, done.error) == (True, {}, None)
    assert vm.changed == []


# Section: attach and detach of one device (the device id fixed before the first attempt)

ATTACH = VMAttach("hv1", "web", "/d/data.qcow2", "qcow2", "data1")
DETACH = VMDetach("hv1", "web", "data1")


@dataclasses.dataclass
class Registry:
    drives: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PlugStandIn:
    """The VM as the plug activities see it: its devices (id to file), blockctl's records of
    them, and the hot-plug and unplug calls made."""

    name: str = "web"
    devices: dict[str, str] = dataclasses.field(default_factory=dict)
    registry: Registry = dataclasses.field(default_factory=Registry)
    changed: list[str] = dataclasses.field(default_factory=list)


@pytest.fixture
def plug_vm(monkeypatch: pytest.MonkeyPatch) -> PlugStandIn:
    vm = PlugStandIn()

    @asynccontextmanager
    async def attach(name: str, **_: Any) -> AsyncIterator[PlugStandIn]:
        assert name == vm.name
        yield vm

    async def list_drives(v: PlugStandIn) -> list[Any]:
        return [SimpleNamespace(device_id=d, file=f) for d, f in v.devices.items()]

    async def hotplug(v: PlugStandIn, drive: Any, *, device_id: str) -> Any:
        v.changed.append(f"hotplug {device_id}")
        if str(drive.file) in v.devices.values():
            raise ConfigError("file", f"{drive.file} is already attached")
        if device_id in v.registry.drives:  # (its record is written first, under a new id)
            raise ConfigError("device_id", f"blockctl has a record of drive {device_id}")
        v.devices[device_id] = str(drive.file)
        v.registry.drives[device_id] = object()
        return SimpleNamespace(device_id=device_id, file=str(drive.file))

    async def unplug(v: PlugStandIn, device_id: str, **_: Any) -> Any:
        v.changed.append(f"unplug {device_id}")
        if device_id not in v.devices:
            if v.registry.drives.pop(device_id, None) is not None:  # its nodes deleted
                return SimpleNamespace(state=drives.UnplugState.REMOVED)
            raise DriveNotFound(device_id, f"the VM has no drive {device_id!r}")
        del v.devices[device_id]
        return SimpleNamespace(state=drives.UnplugState.REMOVED)

    monkeypatch.setattr(activities, "attach", attach)
    monkeypatch.setattr(drives, "list_drives", list_drives)
    monkeypatch.setattr(drives, "hotplug", hotplug)
    monkeypatch.setattr(drives, "unplug", unplug)
    return vm


async def test_an_attach_retry_that_finds_the_device_on_its_file_reports_it_not_attached_twice(
    plug_vm: PlugStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The earlier attempt's device_add went through (its worker then died): the retry finds
    device ``data1`` on the file, with blockctl's record, and reports it ``reused``."""
    plug_vm.devices["data1"] = ATTACH.file
    plug_vm.registry.drives["data1"] = object()
    reconciled(monkeypatch, found(Verdict.FINISHED, kept=False))
    result: VMPlugResult = await retry().run(activities.attach_vm, ATTACH)
    assert (result.device_id, result.file, result.state, result.reused, result.error) == (
        "data1",
        ATTACH.file,
        "attached",
        True,
        None,
    )
    assert plug_vm.changed == []
    # A first attempt (or a retry that finds no device) hot-plugs, under the fixed id.
    plug_vm.devices.clear()
    plug_vm.registry.drives.clear()
    first: VMPlugResult = await ActivityEnvironment().run(activities.attach_vm, ATTACH)
    assert (first.device_id, first.reused) == ("data1", False)
    assert plug_vm.changed == ["hotplug data1"]


async def test_an_attach_retry_refuses_a_device_of_that_id_on_another_file_or_without_record(
    plug_vm: PlugStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device ``data1`` on another file is not this attach's; on the file but without
    blockctl's record (the attempt killed between device_add and the record) it cannot be
    unplugged cleanly: both fail, final, nothing changed."""
    reconciled(monkeypatch)
    plug_vm.devices["data1"] = "/d/other.qcow2"
    plug_vm.registry.drives["data1"] = object()
    with pytest.raises(ApplicationError) as failed:
        await retry().run(activities.attach_vm, ATTACH)
    assert failed.value.non_retryable and failed.value.type == "ConfigError"
    assert "/d/other.qcow2" in str(failed.value) and "data1" in str(failed.value)
    plug_vm.devices["data1"] = ATTACH.file
    plug_vm.registry.drives.clear()
    with pytest.raises(ApplicationError) as unrecorded:
        await retry().run(activities.attach_vm, ATTACH)
    assert unrecorded.value.non_retryable and unrecorded.value.type == "UnsafeOperation"
    assert "device_del" in str(unrecorded.value)
    assert plug_vm.changed == []


def left_nodes(file: str) -> DriveRecord:
    """The record ``drives.hotplug`` writes before its first ``blockdev-add``, as
    ``reconcile`` leaves it once its process is gone with its nodes in QEMU, no device."""
    return DriveRecord(
        device_id="data1",
        device={"driver": "virtio-blk-pci", "id": "data1", "drive": "drv3"},
        nodes=(
            {"driver": "file", "filename": file, "node-name": "drv3f"},
            {"driver": "qcow2", "file": "drv3f", "node-name": "drv3"},
        ),
    )


async def test_an_attach_retry_that_finds_its_nodes_without_the_device_removes_them_first(
    plug_vm: PlugStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between its ``blockdev-add``s and its ``device_add``: blockctl's record of
    ``data1`` names the nodes on the file, QEMU has no device. The retry removes them
    (``drives.unplug``, as ``blockctl detach`` does), then hot-plugs: attached, not reused.
    A record of ``data1`` on another file is not this attach's: left alone (the hot-plug
    then refuses the id, final)."""
    reconciled(monkeypatch)
    plug_vm.registry.drives["data1"] = left_nodes(ATTACH.file)
    result: VMPlugResult = await retry().run(activities.attach_vm, ATTACH)
    assert (result.device_id, result.file, result.state, result.reused) == (
        "data1",
        ATTACH.file,
        "attached",
        False,
    )
    assert plug_vm.changed == ["unplug data1", "hotplug data1"]
    plug_vm.devices.clear()
    plug_vm.changed.clear()
    plug_vm.registry.drives["data1"] = left_nodes("/d/other.qcow2")
    with pytest.raises(ApplicationError) as failed:
        await retry().run(activities.attach_vm, ATTACH)
    assert failed.value.non_retryable and "data1" in str(failed.value)
    assert plug_vm.changed == ["hotplug data1"]
    assert plug_vm.registry.drives["data1"] == left_nodes("/d/other.qcow2")


async def test_a_detach_retry_that_finds_the_device_gone_reports_it_done(
    plug_vm: PlugStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The earlier attempt removed the device (its worker then died): the retry reports the
    detach done (``reused``); a first attempt finding no such device fails naming it."""
    reconciled(monkeypatch)
    result: VMPlugResult = await retry().run(activities.detach_vm, DETACH)
    assert (result.device_id, result.state, result.reused, result.error) == (
        "data1",
        "removed",
        True,
        None,
    )
    with pytest.raises(ApplicationError) as failed:
        await ActivityEnvironment().run(activities.detach_vm, DETACH)
    assert failed.value.non_retryable and failed.value.type == "DriveNotFound"
    assert "data1" in str(failed.value)
    plug_vm.devices["data1"] = ATTACH.file
    done: VMPlugResult = await retry().run(activities.detach_vm, DETACH)
    assert (done.state, done.reused) == ("removed", False)
    assert plug_vm.devices == {}


@pytest.mark.parametrize("result", UNSETTLED, ids=lambda r: f"{r.verdict.value}-kept{r.kept}")
@pytest.mark.parametrize("which", ["attach", "detach"])
async def test_a_plug_retry_that_finds_an_unsettled_operation_fails_naming_it(
    plug_vm: PlugStandIn, monkeypatch: pytest.MonkeyPatch, result: recovery.Recovery, which: str
) -> None:
    """A retry whose device looks done (attached on the file; gone) but whose reconciliation
    kept a record for attention (or found it running) fails, final, with the way out;
    nothing is changed."""
    if which == "attach":
        plug_vm.devices["data1"] = ATTACH.file
        plug_vm.registry.drives["data1"] = object()
    reconciled(monkeypatch, result)
    run = (
        retry().run(activities.attach_vm, ATTACH)
        if which == "attach"
        else retry().run(activities.detach_vm, DETACH)
    )
    with pytest.raises(ApplicationError) as failed:
        await run
    assert failed.value.non_retryable and failed.value.type == "UnsafeOperation"
    for part in (which, "op-1", result.verdict.value, "blockctl recover web"):
        assert part in str(failed.value), (part, str(failed.value))
    assert plug_vm.changed == []


def test_the_derived_device_id_is_fixed_by_the_path_and_a_qemu_id() -> None:
    """Without ``--id`` the device id comes from the file's path alone (the same in every
    attempt and every repeat of the command), one per path, and QEMU takes it as an id."""
    first = plug_device_id("/srv/img/data.qcow2")
    assert first == plug_device_id("/srv/img/data.qcow2")
    assert first != plug_device_id("/srv/img/data2.qcow2")
    assert _DEVICE_ID.fullmatch(first), first


@pytest.mark.parametrize("bad", ["1disk", "disk 1", "dísk", "", "a/b"])
async def test_hotplug_refuses_a_device_id_qemu_would_not_take_before_touching_the_vm(
    bad: str,
) -> None:
    with pytest.raises(ConfigError, match="not a device id"):
        await drives.hotplug(
            None,  # type: ignore[arg-type]
            Drive(file=Path("/d/data.qcow2"), format=ImageFormat.QCOW2),
            device_id=bad,
        )
