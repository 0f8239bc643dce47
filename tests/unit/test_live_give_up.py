"""What ``recover --forget`` deletes of a live restore into a CHAP LUN given up (its disk
detached), against the fake QMP peer: the LUN's nodes, top-down, and the ``secret`` object
its protocol node names, once that node is gone; a node QEMU refuses to delete (still in use)
keeps its secret, and both are said. The raw-file case runs on QEMU:
``tests/integration/test_live_restore.py::test_a_raw_restore_given_up_leaves_no_node_of_its_target``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockctl._journal import DeviceChains, Intent, OpKind, ServerRecord, Step
from blockctl._machine import VM
from blockctl._ops.recovery import _give_up_live
from blockctl._qmp.session import QMPSession
from blockctl.testing import FakeError, FakeQMP

SECRET = "drv1-target-file-secret"
LUN = "iscsi://127.0.0.1:3260/iqn.2026-12.test:lun/1"
LUN_NODES = (
    {"driver": "iscsi", "node-name": "drv1-target-file", "password-secret": SECRET},
    {"driver": "raw", "node-name": "drv1-target", "file": "drv1-target-file"},
)


def node(name: str, driver: str, file: str) -> dict[str, Any]:
    """One ``query-named-block-nodes`` entry, as QEMU gives it."""
    return {
        "node-name": name,
        "drv": driver,
        "file": file,
        "ro": False,
        "cache": {"writeback": True, "direct": False, "no-flush": False},
        "detect_zeroes": "off",
        "backing_file_depth": 0,
    }


@dataclass
class Qemu:
    """The nodes QEMU has (name: driver, file), the objects, and the nodes it refuses to
    delete (in use)."""

    nodes: dict[str, tuple[str, str]]
    objects: set[str]
    busy: set[str] = field(default_factory=set)
    commands: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, command: str, args: Mapping[str, Any]) -> object:
        if command == "query-jobs":
            return []
        if command == "query-named-block-nodes":
            return [node(name, *what) for name, what in self.nodes.items()]
        if command == "blockdev-del":
            self.commands.append((command, args["node-name"]))
            if args["node-name"] in self.busy:
                raise FakeError("GenericError", f"Node '{args['node-name']}' is busy")
            del self.nodes[args["node-name"]]
            return {}
        if command == "object-del":
            self.commands.append((command, args["id"]))
            self.objects.remove(args["id"])
            return {}
        raise AssertionError(command)


def given_up(tmp_path: Path) -> Intent:
    return Intent(
        id="mirror-1",
        kind=OpKind.MIRROR,
        vm="vm",
        step=Step.RUNNING,
        job_id="bc-mirror-1",
        devices={
            "disk1": DeviceChains(
                before=("drv1", "bclr"),
                after=("drv1-target",),
                files_before=(str(tmp_path / "overlay.qcow2"), "nbd+unix:///?socket=/s"),
                files_after=(LUN,),
                formats_before=("qcow2", "raw"),
            )
        },
        drop_nodes=("drv1", "bclr", "bclr-nbd"),
        drop_files=(str(tmp_path / "overlay.qcow2"),),
        add_nodes={"disk1": LUN_NODES},
        server=ServerRecord(pid=4242, pid_start=1, home=str(tmp_path / "nbd-1"), repo="/r"),
        secret_files={SECRET: str(tmp_path / "chap.pw")},
        what="live restore of disk0 (p1) into a LUN on disk1",
    )


async def give_up(qemu: Qemu, tmp_path: Path) -> list[str]:
    async with (
        FakeQMP(qemu).serving() as fake,
        QMPSession.connect(fake.client_socket, label="fake") as session,
    ):
        vm = VM(session, name="vm", pid=None, run_dir=tmp_path)
        return await _give_up_live(vm, given_up(tmp_path))


async def test_a_given_up_lun_restore_deletes_its_nodes_then_their_secret(
    tmp_path: Path,
) -> None:
    """The detach left the LUN's nodes (no record held them): deleted top-down, then the
    secret object; the overlay file (the guest's writes) is named, not removed."""
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"guest writes")
    disk0 = ("qcow2", str(tmp_path / "d0.qcow2"))
    qemu = Qemu(
        nodes={"drv1-target-file": ("iscsi", LUN), "drv1-target": ("raw", LUN), "drv0": disk0},
        objects={SECRET, "other-secret"},
    )
    done = await give_up(qemu, tmp_path)
    assert qemu.commands == [
        ("blockdev-del", "drv1-target"),
        ("blockdev-del", "drv1-target-file"),
        ("object-del", SECRET),
    ]
    assert qemu.nodes == {"drv0": disk0} and qemu.objects == {"other-secret"}
    assert done == [
        "deleted the target's nodes drv1-target, drv1-target-file",
        f"left the files {overlay} (what the guest wrote during the restore and the blocks "
        "copied are in them; remove them if not wanted)",
    ]
    assert overlay.exists()


async def test_given_up_with_its_disk_still_attached_its_overlay_is_said_open(
    tmp_path: Path,
) -> None:
    """``--forget`` without the detach first: the LUN's nodes (no device uses them) go, and
    the overlay the disk still runs on is said to be open in the VM, not left."""
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"guest writes")
    qemu = Qemu(
        nodes={
            "drv1-target-file": ("iscsi", LUN),
            "drv1-target": ("raw", LUN),
            "drv1": ("qcow2", str(overlay)),
        },
        objects={SECRET},
    )
    done = await give_up(qemu, tmp_path)
    assert done == [
        "deleted the target's nodes drv1-target, drv1-target-file",
        f"kept the files {overlay} open in the VM (its disk still runs on them: detach it "
        "before removing them)",
    ]


async def test_a_lun_node_still_in_use_keeps_its_secret_and_is_said(tmp_path: Path) -> None:
    """QEMU refuses to delete the protocol node (a job or device still uses it): its secret
    object stays (the node reads its password from it), and the refusal is said."""
    qemu = Qemu(
        nodes={"drv1-target-file": ("iscsi", LUN), "drv1-target": ("raw", LUN)},
        objects={SECRET},
        busy={"drv1-target-file"},
    )
    done = await give_up(qemu, tmp_path)
    assert ("object-del", SECRET) not in qemu.commands
    assert qemu.objects == {SECRET} and qemu.nodes == {"drv1-target-file": ("iscsi", LUN)}
    assert done[0] == "deleted the target's nodes drv1-target"
    assert done[1].startswith("kept the target's node drv1-target-file: ") and "busy" in done[1]
    assert len(done) == 2  # no file of it left here (the overlay was never made)
