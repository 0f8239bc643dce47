"""A drive hot-plugged over run-time backing nodes (live restore, issue 18): the nodes come
first, the image backs onto the last of them, and only a qcow2 with no backing file may."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from blockctl import _journal
from blockctl._argv import DrivePlan, DriveSource, over_backing, plan_drive
from blockctl._backup import live
from blockctl._backup.serve import PointExport, backing_nodes
from blockctl._ops import recovery
from blockctl.errors import ConfigError
from blockctl.types import (
    Drive,
    ImageFormat,
    Interface,
    IscsiSource,
    MachineConfig,
    NfsSource,
    Passthrough,
)
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


LUN_URL = "iscsi://127.0.0.1:3260/iqn.2026-01.t:lun/1"


def lun_drive(**kwargs: object) -> Drive:
    source = IscsiSource(
        portal="127.0.0.1",
        target="iqn.2026-01.t:lun",
        lun=1,
        user="carol",
        password_file=Path("/k/chap.pw"),
    )
    return Drive(iscsi=source, **{"format": ImageFormat.RAW, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "iscsi://127.0.0.1/iqn.2026-01.t:lun/1",
        LUN_URL,
        IscsiSource(portal="127.0.0.1", target="iqn.2026-01.t:lun", lun=1),
    ],
)
def test_a_live_launch_names_a_lun_by_its_url_with_the_port_spelled_out(
    url: str | IscsiSource,
) -> None:
    """A LUN target comes as its URL (a str: the CLI's DEST) or an IscsiSource; either is
    the URL the config's drive reads back as (``remote_url``: the default port given)."""
    assert live._launch_target(url) == LUN_URL


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (Path("iscsi://h/i/1"), "not this URL"),  # a Path folded the URL's // into /
        (Path("nfs://srv/export/d.raw"), "not this URL"),
        ("iscsi://127.0.0.1/iqn.2026-01.t:lun", "the path is /target-iqn/lun"),
    ],
)
def test_a_live_launch_refuses_a_target_it_cannot_name(url: str | Path, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        live._launch_target(url)
    assert e.value.field.startswith("target") and says in e.value.message, e.value


def test_a_live_launch_brings_back_the_lun_drive_by_its_url() -> None:
    config = launch_config(Drive(file=Path("/i/boot.qcow2"), format=ImageFormat.QCOW2), lun_drive())
    assert live._launch_drive(config, LUN_URL) == (1, ImageFormat.RAW)
    with pytest.raises(ConfigError) as e:
        live._launch_drive(config, LUN_URL.replace("/1", "/2"))
    assert e.value.field == "target" and f"its LUNs: {LUN_URL}" in e.value.message
    # A path never matches a LUN drive, nor a URL a file drive.
    with pytest.raises(ConfigError, match="no drive of the config has the file"):
        live._launch_drive(config, Path("/i/x.raw"))


def nfs_drive(**kwargs: object) -> Drive:
    source = NfsSource(server="127.0.0.1", path="/export/d.raw", user=1000, group=1000)
    return Drive(nfs=source, **{"format": ImageFormat.RAW, **kwargs})  # type: ignore[arg-type]


def test_a_live_launch_brings_back_the_nfs_drive_by_its_url() -> None:
    """An NFS image is named by its URL, with the config's uid and gid or without them (the
    same image); a qcow2 image on NFS is not launched onto (it would be streamed into)."""
    config = launch_config(Drive(file=Path("/i/boot.qcow2"), format=ImageFormat.QCOW2), nfs_drive())
    url = str(live._launch_target("nfs://127.0.0.1/export/d.raw"))
    assert live._launch_drive(config, url) == (1, ImageFormat.RAW)
    with_ids = str(live._launch_target(nfs_drive().nfs))  # type: ignore[arg-type]
    assert "uid=1000" in with_ids and live._launch_drive(config, with_ids) == (1, ImageFormat.RAW)
    with pytest.raises(ConfigError) as e:
        live._launch_drive(config, url.replace("d.raw", "e.raw"))
    assert e.value.field == "target" and "no drive of the config is the NFS image" in str(e.value)
    qcow2 = launch_config(nfs_drive(format=ImageFormat.QCOW2))
    with pytest.raises(ConfigError) as e:
        live._launch_drive(qcow2, url)
    assert e.value.field == "drive[0].format" and "an NFS drive launched" in str(e.value)


@pytest.mark.parametrize(
    ("drive", "field", "says"),
    [
        (lun_drive(format=ImageFormat.QCOW2), "drive[0].format", "a LUN drive launched"),
        (
            lun_drive(interface=Interface.SCSI, passthrough=Passthrough.BLOCK),
            "drive[0].passthrough",
            "launch it emulated",
        ),
        (lun_drive(read_only=True), "drive[0]", "writable"),
    ],
)
def test_a_live_launch_refuses_a_lun_drive_it_cannot_mirror_into(
    drive: Drive, field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as e:
        live._launch_drive(launch_config(drive), LUN_URL)
    assert e.value.field == field and says in e.value.message, e.value


def test_a_lun_launch_records_its_mirror_with_the_luns_nodes_and_the_password_file() -> None:
    """A CHAP LUN drive's launch: the record written before QEMU starts names the LUN's
    nodes as the launched VM gets them (``_target_nodes`` from the launch plan's overlay
    file node: what ``_copy_launched`` adds), its secret object's password file (never the
    password), the LUN by its URL, and the overlay as the file to drop."""
    drive = lun_drive()
    assert drive.iscsi is not None
    overlay = Path("/run/_live-overlays/live-overlay-ab12.qcow2")
    on_overlay = replace(drive, file=overlay, format=ImageFormat.QCOW2, iscsi=None)
    record = _journal.ServerRecord(pid=0, pid_start=None, home="/run/x", point="p", device="d")
    socket = Path("/run/x/s.sock")
    intent = live._launch_mirror_intent(
        "lost", 3, "bclr-1", overlay, on_overlay, drive.iscsi, 1 << 20, True, socket, record
    )
    source = DriveSource(chain=(layer(str(overlay), ImageFormat.QCOW2),))
    planned = over_backing(
        plan_drive(3, on_overlay, source, "pc", None), "drv3", backing_nodes("bclr-1", socket)
    )
    want = live._target_nodes(planned.record_nodes(), "drv3", drive.iscsi, 1 << 20, True)
    assert intent.add_nodes == {"disk3": want}
    lun_node, raw_node = want
    assert lun_node["driver"] == "iscsi" and lun_node["lun"] == 1
    assert lun_node["user"] == "carol" and "password" not in lun_node
    assert raw_node["file"] == lun_node["node-name"] and raw_node["size"] == 1 << 20
    assert intent.secret_files == {str(lun_node["password-secret"]): "/k/chap.pw"}
    (chains,) = intent.devices.values()
    assert chains.files_after == (LUN_URL,) and chains.after == (raw_node["node-name"],)
    assert chains.before == ("drv3", "bclr-1") and intent.drop_files == (str(overlay),)
    assert intent.kind is _journal.OpKind.MIRROR and LUN_URL in intent.what


class RecordedSession:
    """What recovery sends QEMU, in order; QEMU has the ``objects`` given."""

    def __init__(self, objects: tuple[str, ...]) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.objects = objects
        self.lost = False

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.sent.append((command, dict(arguments or {})))
        if command == "qom-list":
            return [{"name": o, "type": "child<secret>"} for o in self.objects]
        return {}


@pytest.mark.parametrize("secret_there", [False, True], ids=["no-secret", "secret-added"])
async def test_recover_adds_a_chap_luns_secret_before_its_node(
    tmp_path: Path, secret_there: bool
) -> None:
    """A LUN launch killed before it added the LUN's nodes: recovery's restarted mirror adds
    the CHAP secret object from the password file the record names (unless the controller
    had added it), then the LUN's nodes, then the mirror; without the secret QEMU refuses
    the node (its ``password-secret`` names no object)."""
    drive = lun_drive()
    assert drive.iscsi is not None
    overlay = tmp_path / "live-overlay-ab12.qcow2"
    on_overlay = replace(drive, file=overlay, format=ImageFormat.QCOW2, iscsi=None)
    record = _journal.ServerRecord(pid=0, pid_start=None, home="/run/x", point="p", device="d")
    socket = Path("/run/x/s.sock")
    planned = live._launch_mirror_intent(
        "lost", 0, "bclr-1", overlay, on_overlay, drive.iscsi, 1 << 20, True, socket, record
    )
    intent = replace(planned, id="op1")
    lun_node, raw_node = intent.add_nodes["disk0"]
    secret = str(lun_node["password-secret"])
    session = RecordedSession((secret,) if secret_there else ())

    async def block_nodes() -> list[Any]:
        return []

    vm: Any = SimpleNamespace(run_dir=tmp_path, session=session, block_nodes=block_nodes)
    action = _journal.RestartMirror("disk0", "drv0", str(raw_node["node-name"]))
    restarted = await recovery._restart_copy(vm, intent, action)
    added = (
        []
        if secret_there
        else [
            (
                "object-add",
                {"qom-type": "secret", "id": secret, "file": "/k/chap.pw", "format": "raw"},
            )
        ]
    )
    sent = [c for c in session.sent if c[0] != "qom-list"]
    assert sent[:-1] == [
        *added,
        ("blockdev-add", dict(lun_node)),
        ("blockdev-add", dict(raw_node)),
    ]
    mirror, arguments = sent[-1]
    assert mirror == "blockdev-mirror" and arguments["target"] == raw_node["node-name"]
    assert arguments["job-id"] == restarted.job_id


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
