"""Names of drives and VMs blockctl did not create: what a user can type back."""

from __future__ import annotations

import pytest

from blockctl._machine import check_identity
from blockctl._qmp.models import BlockDevice
from blockctl.errors import ConfigError


def device(qdev: str | None, backend: str) -> BlockDevice:
    reply: dict[str, object] = {"device": backend, "removable": False, "locked": False}
    if qdev is not None:
        reply["qdev"] = qdev
    return BlockDevice.from_qmp(reply)


def test_a_drive_is_named_by_its_device_id_else_its_block_backend() -> None:
    ours = device("/machine/peripheral/disk0/virtio-backend", "")
    assert (ours.device_id, ours.qom_path) == ("disk0", "/machine/peripheral/disk0")
    bare = device("disk3", "")  # QEMU 7.2 reports an IDE/SCSI device by its id
    assert (bare.device_id, bare.qom_path) == ("disk3", "/machine/peripheral/disk3")
    legacy = device("/machine/peripheral-anon/device[0]/virtio-backend", "drive0")
    assert legacy.device_id == "drive0"
    assert legacy.qom_path == "/machine/peripheral-anon/device[0]"
    ide = device("/machine/unattached/device[23]", "ide0-hd0")
    assert (ide.device_id, ide.qom_path) == ("ide0-hd0", "/machine/unattached/device[23]")
    assert device(None, "floating").device_id is None  # no guest device: not a drive


@pytest.mark.parametrize("name", ["ext1", "web-01.prod", "instance-0000001a", "A+B"])
def test_identities_that_name_files(name: str) -> None:
    assert check_identity(name) == name


@pytest.mark.parametrize("name", ["", "/tmp/ext.sock", "..", ".hidden", "a b", "x/y", "é"])
def test_identities_refused_with_the_way_out(name: str) -> None:
    with pytest.raises(ConfigError, match="--vm-name"):
        check_identity(name)
