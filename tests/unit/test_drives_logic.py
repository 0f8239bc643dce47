"""Pure parts of the drive operations: the apply planner, the registry, event matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl._ops.apply import Action, DesiredDrive, Plan, Step, load_desired, plan
from blockctl._ops.drives import DriveInfo
from blockctl._qmp import wire
from blockctl._qmp.models import BlockNode, CacheFlags, IoLimits
from blockctl._qmp.session import Event
from blockctl._registry import DriveRecord, DriveRegistry
from blockctl.errors import ConfigError
from blockctl.types import CacheMode, Drive, ImageFormat, Interface, Media, parse_size


def node(name: str, file: str, *, direct: bool = False, size: int = 1 << 26) -> BlockNode:
    return BlockNode(
        node_name=name,
        driver="qcow2",
        file=file,
        read_only=False,
        cache=CacheFlags(writeback=True, direct=direct, no_flush=False),
        detect_zeroes="off",
        backing_file_depth=0,
        backing_file=None,
        virtual_size=size,
        write_threshold=0,
        io_limits=IoLimits(),
    )


def live(
    device: str,
    file: str | None,
    *,
    driver: str | None = "virtio-blk-pci",
    removable: bool = False,
    direct: bool = False,
    size: int = 1 << 26,
    limits: IoLimits | None = None,
) -> DriveInfo:
    chain = () if file is None else (node(f"drv{device[-1]}", file, direct=direct, size=size),)
    return DriveInfo(
        device_id=device,
        device_driver=driver,
        removable=removable,
        tray_open=False if removable else None,
        top_node=chain[0].node_name if chain else None,
        chain=chain,
        pending_unplug=False,
        io_limits=limits or IoLimits(),
        device_cache=chain[0].cache if chain else None,
    )


def want(
    file: str | None,
    *,
    cache: CacheMode = CacheMode.WRITEBACK,
    interface: Interface = Interface.VIRTIO,
    media: Media = Media.DISK,
    device: str | None = None,
    size: int | None = None,
    allow_shrink: bool = False,
    throttle: dict[str, int] | None = None,
) -> DesiredDrive:
    drive = Drive(
        file=None if file is None else Path(file),
        format=None if file is None else ImageFormat.QCOW2,
        cache=cache,
        interface=interface,
        media=media,
    )
    return DesiredDrive(
        drive=drive, device=device, size=size, allow_shrink=allow_shrink, throttle=throttle
    )


def test_matching_state_is_an_empty_plan() -> None:
    assert plan([want("/a.qcow2")], [live("disk0", "/a.qcow2")]).empty


def test_attach_detach_and_live_changes() -> None:
    result = plan(
        [
            want("/a.qcow2", cache=CacheMode.NONE, size=1 << 27, throttle={"bps": 100}),
            want("/new.qcow2"),
        ],
        [
            live("disk0", "/a.qcow2"),
            live("disk1", "/old.qcow2"),
            live("disk2", "/foreign.qcow2", driver=None),
        ],
    )
    actions = [(s.action, s.device) for s in result.steps]
    assert actions == [
        (Action.CACHE, "disk0"),
        (Action.RESIZE, "disk0"),
        (Action.THROTTLE, "disk0"),
        (Action.ATTACH, None),
        (Action.DETACH, "disk1"),
    ]  # disk2 was not made by blockctl: untouched
    assert not result.conflicts


def test_a_released_disk_gets_a_detach_that_deletes_its_nodes_and_the_rest_is_planned() -> None:
    # disk3's unplug was pending; the guest has released it since, its nodes still open.
    result = plan([want("/a.qcow2")], [live("disk0", "/a.qcow2")], released=["disk3"])
    assert [(s.action, s.device) for s in result.steps] == [(Action.DETACH, "disk3")]
    assert result.steps[0].detail == "the guest released it: delete its nodes"
    assert not result.empty
    # Nothing released and nothing to change: empty.
    assert plan([want("/a.qcow2")], [live("disk0", "/a.qcow2")], released=[]).empty


def test_a_pending_unplug_is_rendered() -> None:
    step = Step(action=Action.DETACH, device="disk1", detail="/old.qcow2")
    text = Plan(steps=(step,), pending=("disk1",)).render()
    assert text.splitlines()[-1].split()[:2] == ["PENDING", "disk1"]
    assert "not released by the guest" in text


def test_shrink_without_permission_is_a_conflict() -> None:
    result = plan([want("/a.qcow2", size=1 << 20)], [live("disk0", "/a.qcow2")])
    assert not result.steps
    assert "allow-shrink" in result.conflicts[0]
    allowed = plan([want("/a.qcow2", size=1 << 20, allow_shrink=True)], [live("disk0", "/a.qcow2")])
    assert [s.action for s in allowed.steps] == [Action.RESIZE]


def test_cdrom_medium_by_device() -> None:
    cd = live("disk3", "/one.iso", driver="ide-cd", removable=True)
    change = plan(
        [want("/two.iso", device="disk3", media=Media.CDROM, interface=Interface.IDE)], [cd]
    )
    assert [(s.action, s.device) for s in change.steps] == [(Action.MEDIA, "disk3")]
    eject = plan([want(None, device="disk3", media=Media.CDROM, interface=Interface.IDE)], [cd])
    assert eject.steps[0].detail.endswith("→ empty")
    # A cdrom drive not mentioned is left alone (only its medium is ever managed).
    assert plan([], [cd]).empty


def test_unknown_device_is_a_conflict() -> None:
    result = plan([want("/a.iso", device="disk9", media=Media.CDROM, interface=Interface.IDE)], [])
    assert result.conflicts == ("disk9: no such device in the VM",)


def test_every_kind_of_step_and_conflict_exactly_and_each_lets_the_next_drive_be_planned() -> None:
    """The whole plan, field by field (what each step shows and carries to the executor), with
    each early decision (a conflict, an attach, a medium) placed before other drives, so a
    planner that stopped at one would miss the rest."""

    def cdrom(file: str | None, device: str | None = None) -> DesiredDrive:
        return want(file, device=device, media=Media.CDROM, interface=Interface.IDE)

    wants = [
        cdrom("/a.iso", device="cd9"),  # no such device
        want("/new.qcow2"),  # attach
        cdrom(None),  # attach of an empty cdrom drive
        cdrom("/two.iso", device="disk3"),  # medium change
        cdrom("/same.iso", device="disk7"),  # the same medium: nothing
        cdrom(None, device="disk8"),  # empty and empty: nothing
        want("/x.qcow2", device="disk1"),  # another image: a conflict
        want("/a.qcow2", cache=CacheMode.NONE, size=1 << 27, throttle={"bps": 100, "iops": 7}),
        want("/s.qcow2", size=1 << 20),  # shrink without permission
        want("/u.qcow2", throttle={}),  # limits removed
        want("/e.qcow2", size=1 << 26, throttle={}),  # the same size and limits: nothing
    ]
    lives = [
        live("disk0", "/a.qcow2"),
        live("disk1", "/old.qcow2"),
        live("disk2", "/foreign.qcow2", driver=None),
        live("disk3", "/one.iso", driver="ide-cd", removable=True),
        live("disk4", "/s.qcow2"),
        live("disk5", "/u.qcow2", limits=IoLimits(bps=5, iops_wr=7)),
        live("disk6", "/gone.qcow2"),
        live("disk7", "/same.iso", driver="ide-cd", removable=True),
        live("disk8", None, driver="ide-cd", removable=True),
        live("disk9", "/e.qcow2"),
    ]
    result = plan(wants, lives)
    assert result == Plan(
        steps=(
            Step(
                action=Action.ATTACH,
                device=None,
                detail="/new.qcow2 (qcow2, virtio, cache writeback)",
                desired=wants[1],
            ),
            Step(
                action=Action.ATTACH,
                device=None,
                detail="None (-, ide, cache writeback)",
                desired=wants[2],
            ),
            Step(
                action=Action.MEDIA, device="disk3", detail="/one.iso → /two.iso", desired=wants[3]
            ),
            Step(action=Action.CACHE, device="disk0", detail="cache → none", cache=CacheMode.NONE),
            Step(
                action=Action.RESIZE,
                device="disk0",
                detail=f"{1 << 26} → {1 << 27} bytes",
                desired=wants[7],
            ),
            Step(
                action=Action.THROTTLE, device="disk0", detail="bps=100, iops=7", desired=wants[7]
            ),
            Step(action=Action.THROTTLE, device="disk5", detail="unlimited", desired=wants[9]),
            Step(action=Action.DETACH, device="disk6", detail="/gone.qcow2"),
        ),
        conflicts=(
            "cd9: no such device in the VM",
            "disk1: holds /old.qcow2, not /x.qcow2; a disk's image is changed by detach + attach",
            f"disk4: size {1 << 20} < {1 << 26}; set allow-shrink = true to shrink",
        ),
    )
    eject = plan([cdrom(None, device="disk3")], [lives[3]])
    assert eject.steps == (
        Step(
            action=Action.MEDIA,
            device="disk3",
            detail="/one.iso → empty",
            desired=eject.steps[0].desired,
        ),
    )
    insert = plan([cdrom("/one.iso", device="disk8")], [lives[8]])
    assert [s.detail for s in insert.steps] == ["empty → /one.iso"]


def test_load_desired(tmp_path: Path) -> None:
    path = tmp_path / "drives.toml"
    path.write_text(
        '[[drive]]\nfile = "d.qcow2"\nformat = "qcow2"\nsize = "2G"\nthrottle = { bps_wr = 1000 }\n'
    )
    (desired,) = load_desired(path)
    assert desired.drive.file == tmp_path / "d.qcow2"
    assert desired.size == 2 << 30
    assert desired.throttle == {"bps_wr": 1000}
    path.write_text('[[drive]]\nfile = "d.qcow2"\nformat = "qcow2"\ncache = "fast"\n')
    with pytest.raises(ConfigError, match=r"drive\[0\]\.cache"):
        load_desired(path)


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(4096) == 4096
    for bad in ("lots", "-1M", "1.5G"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_registry_round_trip_and_reconcile(tmp_path: Path) -> None:
    registry = DriveRegistry.load(tmp_path)
    nodes = (
        {"driver": "file", "node-name": "drv0-file", "filename": "/a"},
        {"driver": "qcow2", "node-name": "drv0", "file": "drv0-file"},
    )
    registry.put(DriveRecord(device_id="disk0", device={"driver": "virtio-blk-pci"}, nodes=nodes))
    again = DriveRegistry.load(tmp_path)
    assert again.drives["disk0"].node_names == ("drv0", "drv0-file")  # top-down
    assert again.node_options("drv0-file") == nodes[0]
    again.set_pending("disk0", True)
    assert DriveRegistry.load(tmp_path).drives["disk0"].pending_unplug
    # QEMU no longer has the device nor its nodes: forget them.
    again.reconcile(devices=[], nodes=["drv9"])
    assert DriveRegistry.load(tmp_path).drives == {}


def test_only_the_device_event_counts_as_deleted() -> None:
    backend = Event(
        name="DEVICE_DELETED",
        timestamp=0,
        data={"path": "/machine/peripheral/disk1/virtio-backend"},
    )
    device = Event(
        name="DEVICE_DELETED",
        timestamp=0,
        data={"device": "disk1", "path": "/machine/peripheral/disk1"},
    )
    other = Event(name="DEVICE_DELETED", timestamp=0, data={"device": "disk10"})
    assert not wire.is_device_deleted(backend, "disk1")
    assert wire.is_device_deleted(device, "disk1")
    assert not wire.is_device_deleted(other, "disk1")
