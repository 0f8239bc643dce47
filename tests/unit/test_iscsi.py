"""iSCSI as a typed drive source: the URL and TOML forms, the nodes and devices QEMU gets
(scsi-hd, scsi-block passthrough, a CHAP secret object fed from a file), apply's matching."""

from __future__ import annotations

import contextlib
import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from blockctl._argv import DriveSource, build_argv, plan_drive, plan_drives, remote_file_node
from blockctl._cli import drives as cli_drives
from blockctl._cli import main as cli
from blockctl._graph import image_filename
from blockctl._ops import drives as drives_ops
from blockctl._ops.apply import Action, DesiredDrive, load_desired, plan
from blockctl.errors import BlockctlError, ConfigError, PassedThrough
from blockctl.types import (
    Accel,
    Drive,
    ImageFormat,
    Interface,
    IscsiSource,
    MachineConfig,
    Media,
    NfsSource,
    Passthrough,
)
from tests.unit.test_drives_logic import live

IQN = "iqn.2026-12.org.example:store"
URL = f"iscsi://127.0.0.1:3261/{IQN}/1"


def lun(**kwargs: object) -> IscsiSource:
    values: dict[str, object] = {"portal": "127.0.0.1:3261", "target": IQN, "lun": 1}
    values.update(kwargs)
    return IscsiSource(**values)  # type: ignore[arg-type]


def test_a_url_is_parsed_into_the_typed_form() -> None:
    source = IscsiSource.from_url(URL)
    assert source == lun()
    assert source.url == URL
    assert IscsiSource.from_url(f"iscsi://host.example/{IQN}/0").portal == "host.example:3260"
    assert IscsiSource.from_url(f"iscsi://[::1]:3262/{IQN}/7").portal == "[::1]:3262"


@pytest.mark.parametrize(
    ("url", "part"),
    [
        (f"nbd://127.0.0.1/{IQN}/1", "iscsi"),
        (f"iscsi://127.0.0.1:99999/{IQN}/1", "iscsi.portal"),
        (f"iscsi://127.0.0.1:x/{IQN}/1", "iscsi.portal"),
        (f"iscsi://bad_host!/{IQN}/1", "iscsi.portal"),
        (f"iscsi:///{IQN}/1", "iscsi.portal"),
        ("iscsi://127.0.0.1", "iscsi.target"),
        ("iscsi://127.0.0.1//1", "iscsi.target"),
        ("iscsi://127.0.0.1/not-an-iqn/1", "iscsi.target"),
        (f"iscsi://127.0.0.1/{IQN}", "iscsi.lun"),
        (f"iscsi://127.0.0.1/{IQN}/one", "iscsi.lun"),
        (f"iscsi://127.0.0.1/{IQN}/99999", "iscsi.lun"),
        (f"iscsi://127.0.0.1/{IQN}/1/extra", "iscsi.lun"),
        (f"iscsi://127.0.0.1/{IQN}/1?x=1", "iscsi"),
        (f"iscsi://bob%secret@127.0.0.1/{IQN}/1", "iscsi.password"),
        (f"iscsi://bob:secret@127.0.0.1/{IQN}/1", "iscsi.password"),
        (f"iscsi://bob@127.0.0.1/{IQN}/1", "iscsi.user"),
    ],
)
def test_a_malformed_url_is_refused_naming_the_part(url: str, part: str) -> None:
    with pytest.raises(ConfigError) as refused:
        IscsiSource.from_url(url)
    assert refused.value.field == part
    assert "secret" not in str(refused.value)  # a password in a URL is never echoed


def test_chap_needs_both_user_and_password_file() -> None:
    with pytest.raises(ConfigError, match="password_file"):
        lun(user="bob")
    with pytest.raises(ConfigError) as refused:
        lun(password_file=Path("/pw"))
    assert refused.value.field == "iscsi.user"


def test_toml_drive_with_an_iscsi_table_resolves_the_password_file(tmp_path: Path) -> None:
    doc = tomllib.loads(
        f"""
        [[drive]]
        format = "raw"
        if = "scsi"
        [drive.iscsi]
        portal = "127.0.0.1:3261"
        target = "{IQN}"
        lun = 1
        initiator-name = "iqn.2026-12.org.example:host"
        user = "bob"
        password-file = "chap.pw"
        """
    )
    config = MachineConfig.from_mapping(doc, base=tmp_path)
    source = config.drives[0].iscsi
    assert source is not None
    assert source.password_file == tmp_path / "chap.pw"
    assert source.initiator_name == "iqn.2026-12.org.example:host"
    with pytest.raises(ConfigError) as refused:
        MachineConfig.from_mapping(
            {"drive": [{"format": "raw", "iscsi": {"portal": "h", "target": IQN, "lun": -1}}]}
        )
    assert refused.value.field == "drive[0].iscsi.lun"


def test_drive_refuses_two_sources_and_a_snapshot_overlay() -> None:
    with pytest.raises(ConfigError, match="one of file, nbd or iscsi"):
        Drive(file=Path("/a.raw"), iscsi=lun(), format=ImageFormat.RAW)
    with pytest.raises(ConfigError, match="overlay"):
        Drive(iscsi=lun(), format=ImageFormat.RAW, snapshot=True)
    with pytest.raises(ConfigError, match="format"):
        Drive(iscsi=lun())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"interface": Interface.VIRTIO}, "drive.passthrough"),
        ({"format": ImageFormat.QCOW2}, "drive.passthrough"),
        ({"serial": "S1"}, "drive.serial"),
        ({"copy_on_read": True}, "drive.passthrough"),
        ({"iscsi": None, "file": Path("/dev/sdb")}, "drive.passthrough"),
    ],
)
def test_passthrough_needs_a_raw_iscsi_lun_on_scsi(kwargs: dict[str, object], field: str) -> None:
    values: dict[str, object] = {
        "iscsi": lun(),
        "format": ImageFormat.RAW,
        "interface": Interface.SCSI,
        "passthrough": True,
    }
    values.update(kwargs)
    with pytest.raises(ConfigError) as refused:
        Drive(**values)  # type: ignore[arg-type]
    assert refused.value.field == field


def test_nodes_and_device_of_an_iscsi_disk() -> None:
    drive = Drive(iscsi=lun(), format=ImageFormat.RAW, interface=Interface.SCSI)
    drive_plan = plan_drive(3, drive, None, "pc", None)
    assert drive_plan.nodes[0] == {
        "driver": "iscsi",
        "node-name": "drv3-file",
        "transport": "tcp",
        "portal": "127.0.0.1:3261",
        "target": IQN,
        "lun": 1,
        "cache": {"direct": False, "no-flush": False},
        "read-only": False,
    }
    assert drive_plan.nodes[1]["driver"] == "raw"
    assert drive_plan.nodes[1]["file"] == "drv3-file"
    assert drive_plan.device["driver"] == "scsi-hd"
    assert drive_plan.device["drive"] == "drv3"
    assert drive_plan.objects == ()
    named = Drive(
        iscsi=lun(initiator_name="iqn.2026-12.org.example:host"),
        format=ImageFormat.RAW,
        interface=Interface.SCSI,
    )
    node = plan_drive(0, named, None, "pc", None).nodes[0]
    assert node["initiator-name"] == "iqn.2026-12.org.example:host"  # type: ignore[typeddict-item]
    assert "user" not in node and "password-secret" not in node


def test_a_passed_through_lun_is_scsi_block_without_a_write_cache_property() -> None:
    drive = Drive(
        iscsi=lun(), format=ImageFormat.RAW, interface=Interface.SCSI, passthrough=Passthrough.BLOCK
    )
    device = plan_drive(0, drive, None, "pc", None).device
    assert device["driver"] == "scsi-block"
    # QEMU: "Property 'scsi-block.write-cache' not found"
    assert "write-cache" not in device


@pytest.mark.parametrize(
    ("given", "kind"),
    [(True, "scsi-block"), ("block", "scsi-block"), ("generic", "scsi-generic")],
)
def test_passthrough_from_toml_chooses_the_device(given: object, kind: str) -> None:
    drive = Drive.from_mapping(
        {"iscsi": URL, "format": "raw", "if": "scsi", "passthrough": given}, "drive[0]"
    )
    assert drive.passthrough is Passthrough(kind.removeprefix("scsi-"))
    device = plan_drive(0, drive, None, "pc", None).device
    assert device["driver"] == kind
    # Neither has the property: "Property 'scsi-generic.write-cache' not found"
    assert "write-cache" not in device and "serial" not in device
    emulated = Drive.from_mapping(
        {"iscsi": URL, "format": "raw", "if": "scsi", "passthrough": False}
    )
    assert emulated.passthrough is None
    assert plan_drive(0, emulated, None, "pc", None).device["driver"] == "scsi-hd"


@pytest.mark.parametrize(
    ("values", "field", "said"),
    [
        ({"passthrough": "sg"}, "drive[0].passthrough", "'generic' (scsi-generic)"),
        ({"passthrough": 1}, "drive[0].passthrough", "or false"),
        ({"passthrough": "generic", "werror": "stop"}, "drive[0].werror", "no rerror/werror"),
        ({"passthrough": "generic", "rerror": "stop"}, "drive[0].rerror", "no rerror/werror"),
        ({"passthrough": "generic", "werror": "report"}, "drive[0].werror", "no rerror/werror"),
        ({"passthrough": "generic", "if": "virtio"}, "drive[0].passthrough", "if = 'scsi'"),
    ],
)
def test_scsi_generic_refusals(values: dict[str, object], field: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Drive.from_mapping({"iscsi": URL, "format": "raw", "if": "scsi", **values}, "drive[0]")
    assert refused.value.field == field
    assert said in str(refused.value)
    # QEMU's own defaults are what scsi-generic has anyway.
    Drive.from_mapping(
        {
            **{"iscsi": URL, "format": "raw", "if": "scsi", "passthrough": "generic"},
            **{"rerror": "report", "werror": "enospc"},
        }
    )
    # scsi-block takes an error policy (its reads and writes are QEMU's requests).
    Drive.from_mapping(
        {"iscsi": URL, "format": "raw", "if": "scsi", "passthrough": "block", "werror": "stop"}
    )


def test_chap_password_goes_through_a_secret_object_read_from_the_file() -> None:
    drive = Drive(
        iscsi=lun(user="bob", password_file=Path("/etc/blockctl/chap.pw")),
        format=ImageFormat.RAW,
        interface=Interface.SCSI,
    )
    config = MachineConfig(drives=(drive,))
    plans = plan_drives(config, dict[int, DriveSource]())
    assert plans[0].objects == (
        {
            "qom-type": "secret",
            "id": "drv0-file-secret",
            "file": "/etc/blockctl/chap.pw",
            "format": "raw",
        },
    )
    node = plans[0].nodes[0]
    assert node["user"] == "bob"  # type: ignore[typeddict-item]
    assert node["password-secret"] == "drv0-file-secret"  # type: ignore[typeddict-item]
    argv = build_argv(
        binary="qemu",
        config=config,
        label="t",
        accel=Accel.TCG,
        plans=plans,
        qmp_fd=3,
        monitor_path=None,
        console=None,
    )
    # The secret object comes just before the node that names it, the rest is all there.
    at = argv.index("-object")
    assert json.loads(argv[at + 1])["id"] == "drv0-file-secret"
    assert argv[at + 2] == "-blockdev"
    assert json.loads(argv[at + 3])["password-secret"] == "drv0-file-secret"
    assert argv[0] == "qemu" and argv.count("-object") == 1


def test_an_iscsi_node_is_named_by_its_url() -> None:
    qemu_name = "json:" + json.dumps(
        {
            "driver": "raw",
            "file": {
                "driver": "iscsi",
                "portal": "127.0.0.1:3261",
                "target": IQN,
                "lun": "1",
                "transport": "tcp",
                "user": "bob",
            },
        }
    )
    assert image_filename(qemu_name) == URL
    # LUN 0 may be left out; without a portal or a target there is no URL.
    bare = {"driver": "iscsi", "portal": "h:3260", "target": IQN}
    assert image_filename("json:" + json.dumps(bare)) == f"iscsi://h:3260/{IQN}/0"
    for missing_key in ("portal", "target"):
        partial = {k: v for k, v in bare.items() if k != missing_key}
        assert image_filename("json:" + json.dumps(partial)) is None


def test_apply_matches_an_iscsi_disk_by_its_url(tmp_path: Path) -> None:
    wanted = DesiredDrive(
        drive=Drive(iscsi=lun(), format=ImageFormat.RAW, interface=Interface.SCSI)
    )
    assert plan([wanted], [live("disk0", URL, driver="scsi-hd")]).empty
    other = plan([wanted], [live("disk0", URL.replace("/1", "/2"), driver="scsi-hd")])
    assert [s.action for s in other.steps] == [Action.ATTACH, Action.DETACH]
    assert URL in other.steps[0].detail
    doc = tmp_path / "drives.toml"
    doc.write_text(f'[[drive]]\nformat = "raw"\nif = "scsi"\niscsi = "{URL}"\n')
    assert load_desired(doc)[0].drive.iscsi == lun()


@pytest.mark.parametrize("live_driver", ["scsi-hd", "scsi-block", "scsi-generic"])
def test_apply_reports_a_lun_passed_through_otherwise_as_a_conflict(live_driver: str) -> None:
    """A drives file asking for a LUN as one SCSI device while the VM has it as another
    (emulated, scsi-block, scsi-generic) is a conflict naming both: nothing live changes it."""
    for kind in (None, Passthrough.BLOCK, Passthrough.GENERIC):
        wanted = DesiredDrive(
            drive=Drive(
                iscsi=lun(), format=ImageFormat.RAW, interface=Interface.SCSI, passthrough=kind
            )
        )
        wanted_driver = kind.device_driver if kind else "scsi-hd"
        result = plan([wanted], [live("disk0", URL, driver=live_driver)])
        if wanted_driver == live_driver:
            assert result.empty
        else:
            assert result.steps == ()
            assert result.conflicts == (
                f"disk0: is {live_driver}, not {wanted_driver}; a LUN's passthrough is changed "
                "by detach + attach",
            )


def test_a_lun_conflict_does_not_stop_the_plan_of_the_other_drives() -> None:
    """After a LUN's passthrough conflict, the next desired drive is still planned."""
    conflicting = DesiredDrive(
        drive=Drive(
            iscsi=lun(), format=ImageFormat.RAW, interface=Interface.SCSI,
            passthrough=Passthrough.GENERIC,
        )
    )  # fmt: skip
    other = DesiredDrive(
        drive=Drive(iscsi=lun(lun=2), format=ImageFormat.RAW, interface=Interface.SCSI)
    )
    result = plan([conflicting, other], [live("disk0", URL, driver="scsi-hd")])
    assert len(result.conflicts) == 1 and "is scsi-hd, not scsi-generic" in result.conflicts[0]
    assert [s.action for s in result.steps] == [Action.ATTACH]
    assert lun(lun=2).url in result.steps[0].detail


def test_a_remote_images_node_is_the_one_a_vm_opens(tmp_path: Path) -> None:
    """remote_file_node (a restore onto a LUN or NFS image): the node plan_drive gives a VM
    for the same drive, and the CHAP secret object naming the password's file."""
    password = tmp_path / "pw"
    chap = lun(user="bob", password_file=password, initiator_name="iqn.2026-12.org.example:i")
    for source, objects in ((lun(), 0), (chap, 1)):
        drive = Drive(iscsi=source, format=ImageFormat.RAW)
        node, secrets = remote_file_node("t-file", drive)
        planned = plan_drive(0, drive, None, "q35", None)
        assert dict(node) == {**planned.nodes[0], "node-name": "t-file"} | (
            {"password-secret": "t-file-secret"} if objects else {}
        )
        assert len(secrets) == objects
    (secret,) = remote_file_node("t-file", Drive(iscsi=chap, format=ImageFormat.RAW))[1]
    assert secret == {
        "qom-type": "secret", "id": "t-file-secret", "file": str(password), "format": "raw",
    }  # fmt: skip
    found = dict(remote_file_node("t-file", Drive(iscsi=chap, format=ImageFormat.RAW))[0])
    assert (found["user"], found["initiator-name"], found["lun"]) == (
        "bob", "iqn.2026-12.org.example:i", 1,
    )  # fmt: skip
    nfs = NfsSource(server="10.0.0.1", path="/e/d.raw", user=7, group=8, readahead_size=4096)
    nfs_node, secrets = remote_file_node("n-file", Drive(nfs=nfs, format=ImageFormat.RAW))
    assert secrets == ()
    node_options = dict(nfs_node)
    assert {k: node_options[k] for k in ("driver", "node-name", "server", "path")} == {
        "driver": "nfs", "node-name": "n-file",
        "server": {"type": "inet", "host": "10.0.0.1"}, "path": "/e/d.raw",
    }  # fmt: skip
    assert (node_options["user"], node_options["group"], node_options["readahead-size"]) == (
        7, 8, 4096,
    )  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        remote_file_node("x", Drive(file=tmp_path / "f.raw", format=ImageFormat.RAW))
    assert (refused.value.field, refused.value.message) == (
        "drive", "an iSCSI LUN or an NFS image was expected",
    )  # fmt: skip


class _Reached(BlockctlError):
    """The CLI got as far as the hot-plug: the drive it built is recorded."""


def _cli_attach(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, Drive | None]:
    seen: dict[str, Drive] = {}

    @contextlib.asynccontextmanager
    async def fake_attach(target: str, vm_name: str | None = None) -> AsyncIterator[object]:
        yield object()

    async def fake_hotplug(_vm: object, drive: Drive, **_: object) -> None:
        seen["drive"] = drive
        raise _Reached("stop here")

    monkeypatch.setattr(cli_drives, "attach", fake_attach)
    monkeypatch.setattr(drives_ops, "hotplug", fake_hotplug)
    saved = structlog.get_config()  # the CLI configures logging for its process
    try:
        code = cli.main(["attach", *args])
    finally:
        structlog.configure(**saved)
    return code, seen.get("drive")


def test_cli_attach_parses_an_iscsi_url_into_the_typed_form(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password = tmp_path / "chap.pw"
    code, drive = _cli_attach(
        monkeypatch,
        "vm1",
        URL,
        "--format=raw",
        "--bus=scsi",
        "--passthrough",
        "--chap-user=bob",
        f"--chap-password-file={password}",
    )
    assert code == 1 and drive is not None  # _Reached
    assert drive.iscsi == lun(user="bob", password_file=password)
    assert drive.file is None and drive.passthrough is Passthrough.BLOCK
    code, drive = _cli_attach(
        monkeypatch, "vm1", URL, "--format=raw", "--bus=scsi", "--passthrough=generic"
    )
    assert drive is not None and drive.passthrough is Passthrough.GENERIC
    code, drive = _cli_attach(monkeypatch, "vm1", URL, "--format=raw", "--bus=scsi")
    assert drive is not None and drive.passthrough is None
    code, drive = _cli_attach(
        monkeypatch, "vm1", "/dev/sr0", "--format=raw", "--bus=scsi", "--cdrom"
    )
    assert drive is not None and drive.media is Media.CDROM and drive.read_only
    assert drive.file == Path("/dev/sr0")
    code, drive = _cli_attach(monkeypatch, "vm1", f"iscsi://127.0.0.1/{IQN}/x", "--format=raw")
    assert drive is None
    assert "iscsi.lun" in capsys.readouterr().err
    code, drive = _cli_attach(monkeypatch, "vm1", "/img/a.raw", "--format=raw", "--chap-user=bob")
    assert drive is None
    assert "chap-user" in capsys.readouterr().err


def test_passed_through_refusals_name_their_ways_out() -> None:
    """A snapshot or backup of several disks can leave the LUN out; a throttle names one disk,
    so its ways out are the target's own limits or an emulated LUN."""
    throttle = str(PassedThrough("throttle", "disk2", device_driver="scsi-generic"))
    assert throttle.startswith("throttle: disk2 is a passed-through LUN (scsi-generic)")
    assert "QEMU's I/O limits do not hold back" in throttle
    assert "leave disk2 out" not in throttle and "limit it on the target" in throttle
    snapshot = str(PassedThrough("snapshot", "disk2", device_driver="scsi-block"))
    assert "leave disk2 out (name the other disks)" in snapshot
