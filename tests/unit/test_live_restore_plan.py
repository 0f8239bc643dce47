"""A drive hot-plugged over run-time backing nodes (live restore, issue 18): the nodes come
first, the image backs onto the last of them, and only a qcow2 with no backing file may."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl._argv import DrivePlan, DriveSource, over_backing, plan_drive
from blockctl.errors import ConfigError
from blockctl.types import Drive, ImageFormat
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
