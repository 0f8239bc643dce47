"""A drive hot-plugged over run-time backing nodes (live restore, issue 18): the nodes come
first, the image backs onto the last of them, and only a qcow2 with no backing file may."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blockctl import _journal
from blockctl._argv import DrivePlan, DriveSource, over_backing, plan_drive
from blockctl._backup import live
from blockctl._backup.serve import PointExport, backing_nodes
from blockctl.errors import ConfigError
from blockctl.types import Drive, ImageFormat, MachineConfig
from tests.unit.test_argv import layer

BACKING = (
    {"driver": "nbd", "node-name": "bclr-1-nbd", "server": {"type": "unix", "path": "/s"}},
    {"driver": "raw", "node-name": "bclr-1", "file": "bclr-1-nbd", "read-only": True},
)


def plan(*chain: str, fmt: ImageFormat = ImageFormat.QCOW2) -> DrivePlan:
    drive = Drive(file=Path(chain[0]), format=fmt)
    source = DriveSource(chain=tuple(layer(c, fmt) for c in chain))
    return plan_drive(3, drive, source, "pc", None)


def test_backing_nodes_come_first_and_the_image_backs_onto_the_last() -> None:
    before = plan("/t.qcow2")
    after = over_backing(before, "drv3", BACKING)
    assert after.nodes[:2] == BACKING
    image = next(n for n in after.nodes if n["node-name"] == "drv3")
    assert dict(image)["backing"] == "bclr-1"
    # Nothing else changes: the other nodes and the device are the plan's.
    assert [n for n in after.nodes[2:] if n["node-name"] != "drv3"] == [
        n for n in before.nodes if n["node-name"] != "drv3"
    ]
    assert after.device == before.device and after.top_node == before.top_node


@pytest.mark.parametrize(
    "chain", [("/t.raw",), ("/t.qcow2", "/base.qcow2")], ids=["raw", "has a backing file"]
)
def test_only_a_qcow2_with_no_backing_file_takes_backing_nodes(chain: tuple[str, ...]) -> None:
    fmt = ImageFormat.RAW if chain[0].endswith(".raw") else ImageFormat.QCOW2
    with pytest.raises(ConfigError, match="qcow2 image with no backing file"):
        over_backing(plan(*chain, fmt=fmt), "drv3", BACKING)


def test_the_image_backs_onto_the_last_of_three_backing_nodes() -> None:
    three = (
        {"driver": "nbd", "node-name": "n0", "server": {"type": "unix", "path": "/s"}},
        {"driver": "raw", "node-name": "n1", "file": "n0"},
        {"driver": "raw", "node-name": "n2", "file": "n1"},
    )
    after = over_backing(plan("/t.qcow2"), "drv3", three)
    assert after.nodes[:3] == three
    assert dict(next(n for n in after.nodes if n["node-name"] == "drv3"))["backing"] == "n2"


def test_over_backing_refuses_what_is_no_qcow2_with_a_null_backing() -> None:
    """The refusal names the field and why; an image node not there, a raw node (even with
    a null backing), and a qcow2 node without a backing field are refused alike."""
    base = plan("/t.qcow2")
    image = next(n for n in base.nodes if n["node-name"] == "drv3")
    others = [n for n in base.nodes if n is not image]
    raw_null = {**image, "driver": "raw", "backing": None}
    no_field = {k: v for k, v in image.items() if k != "backing"}
    cases = [
        ("drv9", base),
        ("drv3", replace(base, nodes=(*others, raw_null))),  # type: ignore[arg-type]
        ("drv3", replace(base, nodes=(*others, no_field))),  # type: ignore[arg-type]
    ]
    for name, case in cases:
        with pytest.raises(ConfigError) as refused:
            over_backing(case, name, BACKING)
        assert refused.value.field == "drive.file"
        assert refused.value.message == (
            "a run-time backing node needs a qcow2 image with no backing file"
        )


# Section: which drive of a config a live launch brings back (backup.launch_live)


def launch_config(*drives: Drive) -> MachineConfig:
    return MachineConfig(name="lost", drives=drives)


def test_a_live_launch_brings_back_the_drive_whose_file_is_the_target() -> None:
    config = launch_config(
        Drive(file=Path("/i/boot.qcow2"), format=ImageFormat.QCOW2),
        Drive(file=Path("/i/data.qcow2"), format=ImageFormat.QCOW2),
        Drive(file=Path("/i/data.raw"), format=ImageFormat.RAW),
    )
    assert live._launch_drive(config, Path("/i/data.qcow2")) == (1, ImageFormat.QCOW2)
    assert live._launch_drive(config, Path("/i/boot.qcow2")) == (0, ImageFormat.QCOW2)
    assert live._launch_drive(config, Path("/i/data.raw")) == (2, ImageFormat.RAW)


@pytest.mark.parametrize("url", ["iscsi://127.0.0.1/iqn.2026-01.t:lun/1", Path("iscsi://h/i/1")])
def test_a_live_launch_refuses_a_lun_target_with_the_way_out(url: str | Path) -> None:
    """A LUN drive is not launched from a point (the CLI hands DEST as a Path, which folds
    the URL's // into /)."""
    with pytest.raises(ConfigError) as e:
        live._launch_target(url)
    assert e.value.field == "target" and "LUN drive is not launched" in e.value.message
    assert "--attach VM -O raw" in e.value.message


def test_a_live_launch_refuses_a_target_no_drive_has_and_names_the_files() -> None:
    config = launch_config(Drive(file=Path("/i/boot.qcow2"), format=ImageFormat.QCOW2))
    with pytest.raises(ConfigError, match=r"no drive of the config has the file /i/x.qcow2") as e:
        live._launch_drive(config, Path("/i/x.qcow2"))
    assert "/i/boot.qcow2" in e.value.message


@pytest.mark.parametrize(
    ("drive", "field", "says"),
    [
        (
            Drive(file=Path("/i/d.raw"), format=ImageFormat.VMDK),
            "drive[0].format",
            "a qcow2 or a raw drive",
        ),
        (
            Drive(file=Path("/i/d.raw"), format=ImageFormat.RAW, copy_on_read=True),
            "drive[0].copy_on_read",
            "drop copy_on_read",
        ),
        (
            Drive(file=Path("/i/d.raw"), format=ImageFormat.QCOW2, read_only=True),
            "drive[0]",
            "writable",
        ),
        (
            Drive(file=Path("/i/d.raw"), format=ImageFormat.QCOW2, snapshot=True),
            "drive[0]",
            "no snapshot",
        ),
    ],
)
def test_a_live_launch_refuses_a_drive_it_cannot_stream_into(
    drive: Drive, field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as e:
        live._launch_drive(launch_config(drive), Path("/i/d.raw"))
    assert e.value.field == field and says in e.value.message


def test_a_live_launch_records_its_copy_with_the_names_the_launch_plan_gives() -> None:
    """The copy's record, written before QEMU starts, names the device, the image node and
    the backup's nodes as the launch's drive plan makes them (recovery compares them with
    QEMU's chain): drive 3 over ``backing_nodes``."""
    export = PointExport(socket=Path("/run/x/s.sock"), pid=1, size=1, home=Path("/run/x"))
    record = _journal.ServerRecord(pid=1, pid_start=None, home="/run/x", point="p", device="d")
    intent = live._launch_intent("lost", 3, "bclr-1", Path("/t.qcow2"), export.socket, record)
    planned = over_backing(plan("/t.qcow2"), "drv3", backing_nodes("bclr-1", export.socket))
    ((device, chains),) = intent.devices.items()
    assert device == planned.device_id
    image = next(n for n in planned.nodes if dict(n).get("backing") == "bclr-1")
    assert chains.before == (image["node-name"], "bclr-1") and chains.after[0] == "drv3"
    backing = [str(n["node-name"]) for n in planned.nodes[:2]]
    assert sorted(intent.drop_nodes) == sorted(backing)
    assert intent.server == record and intent.kind is _journal.OpKind.STREAM
