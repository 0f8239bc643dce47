"""NFS as a typed drive source: the URL and TOML forms, the node QEMU gets (driver nfs, no
option string), the URL a live node reads back as, apply's matching and the CLI's attach."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from blockctl._argv import plan_drive
from blockctl._graph import image_filename
from blockctl._ops.apply import Action, DesiredDrive, load_desired, plan
from blockctl.errors import ConfigError
from blockctl.types import Drive, ImageFormat, MachineConfig, NfsSource, nfs_url
from tests.unit.test_drives_logic import live
from tests.unit.test_iscsi import _cli_attach, lun

URL = "nfs://127.0.0.1/srv/export/disk.qcow2"


def image(**kwargs: object) -> NfsSource:
    values: dict[str, object] = {"server": "127.0.0.1", "path": "/srv/export/disk.qcow2"}
    values.update(kwargs)
    return NfsSource(**values)  # type: ignore[arg-type]


def test_a_url_is_parsed_into_the_typed_form() -> None:
    assert NfsSource.from_url(URL) == image()
    assert NfsSource.from_url(URL).url == URL
    full = NfsSource.from_url(f"{URL}?uid=1000&gid=100&readahead=65536")
    assert full == image(user=1000, group=100, readahead_size=65536)
    # QEMU's own name of the node: readahead is not part of it.
    assert full.url == f"{URL}?uid=1000&gid=100"
    assert NfsSource.from_url("nfs://nas.example/e/sub/d.raw").path == "/e/sub/d.raw"


def test_the_url_is_qemus_name_for_the_node() -> None:
    """nfs.c's nfs_refresh_filename: uid and gid in the query only when non-zero."""
    assert nfs_url("h", "/e/f") == "nfs://h/e/f"
    assert nfs_url("h", "/e/f", 0, 0) == "nfs://h/e/f"
    assert nfs_url("h", "/e/f", 5, None) == "nfs://h/e/f?uid=5"
    assert nfs_url("h", "/e/f", 0, 7) == "nfs://h/e/f?gid=7"
    assert nfs_url("h", "/e/f", 5, 7) == "nfs://h/e/f?uid=5&gid=7"


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("iscsi://127.0.0.1/srv/d.raw", "nfs"),
        ("nfs:/127.0.0.1/srv/d.raw", "nfs"),
        ("nfs://127.0.0.1:2049/srv/d.raw", "nfs.server"),
        ("nfs:///srv/d.raw", "nfs.server"),
        ("nfs://bad_host!/srv/d.raw", "nfs.server"),
        ("nfs://[::1]/srv/d.raw", "nfs.server"),
        ("nfs://bob@127.0.0.1/srv/d.raw", "nfs.user"),
        ("nfs://bob:pw@127.0.0.1/srv/d.raw", "nfs.user"),
        ("nfs://127.0.0.1", "nfs.path"),
        ("nfs://127.0.0.1/d.raw", "nfs.path"),
        ("nfs://127.0.0.1/srv/", "nfs.path"),
        ("nfs://127.0.0.1/srv//d.raw", "nfs.path"),
        ("nfs://127.0.0.1/srv/../d.raw", "nfs.path"),
        ("nfs://127.0.0.1/srv/d.raw#x", "nfs"),
        ("nfs://127.0.0.1/srv/d raw", "nfs"),
        ("nfs://127.0.0.1/srv/d.raw?uid=x", "nfs.user"),
        ("nfs://127.0.0.1/srv/d.raw?gid=", "nfs.group"),
        ("nfs://127.0.0.1/srv/d.raw?gid", "nfs.group"),
        ("nfs://127.0.0.1/srv/d.raw?uid=1&uid=2", "nfs.user"),
        ("nfs://127.0.0.1/srv/d.raw?uid=4294967296", "nfs.user"),
        ("nfs://127.0.0.1/srv/d.raw?readahead=2097152", "nfs.readahead_size"),
        ("nfs://127.0.0.1/srv/d.raw?debug=2", "nfs.debug"),
        ("nfs://127.0.0.1/srv/d.raw?", "nfs"),
    ],
)
def test_a_malformed_url_is_refused_naming_the_part(url: str, part: str) -> None:
    with pytest.raises(ConfigError) as refused:
        NfsSource.from_url(url)
    assert refused.value.field == part


def test_a_port_is_refused_with_the_reason_and_the_way_out() -> None:
    with pytest.raises(ConfigError) as refused:
        NfsSource.from_url("nfs://127.0.0.1:2049/srv/d.raw")
    assert "portmapper on port 111" in refused.value.message
    assert "drop the :PORT" in refused.value.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"server": ""}, "nfs.server"),
        ({"server": "h:111"}, "nfs.server"),
        ({"path": "relative/d.raw"}, "nfs.path"),
        ({"path": "/srv/d\0.raw"}, "nfs.path"),
        ({"path": "/srv/d\n.raw"}, "nfs.path"),
        ({"path": "/srv/d?.raw"}, "nfs.path"),
        ({"path": "/srv/\udcff.raw"}, "nfs.path"),
        ({"path": "/srv/./d.raw"}, "nfs.path"),
        ({"path": 7}, "nfs.path"),
        ({"user": -1}, "nfs.user"),
        ({"user": True}, "nfs.user"),
        ({"group": 2**31}, "nfs.group"),
        ({"group": "100"}, "nfs.group"),
        ({"readahead_size": 1024 * 1024 + 1}, "nfs.readahead_size"),
        ({"readahead_size": -1}, "nfs.readahead_size"),
    ],
)
def test_a_bad_field_is_refused_by_name(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        image(**kwargs)
    assert refused.value.field == field


def test_limits_are_inclusive() -> None:
    assert image(user=2**31 - 1, group=0, readahead_size=1024 * 1024).user == 2**31 - 1
    assert image(readahead_size=0).readahead_size == 0


def test_toml_takes_a_table_or_a_url() -> None:
    doc = tomllib.loads(
        """
        [[drive]]
        format = "qcow2"
        [drive.nfs]
        server = "127.0.0.1"
        path = "/srv/export/disk.qcow2"
        user = 1000
        group = 100
        readahead-size = 131072

        [[drive]]
        format = "raw"
        nfs = "nfs://127.0.0.1/srv/export/other.raw?uid=1"
        """
    )
    config = MachineConfig.from_mapping(doc)
    assert config.drives[0].nfs == image(user=1000, group=100, readahead_size=131072)
    assert config.drives[1].nfs == image(path="/srv/export/other.raw", user=1)
    for bad, field in (
        ({"server": "h", "path": "/e"}, "drive[0].nfs.path"),
        ({"server": "h", "path": "/e/f", "port": 2049}, "drive[0].nfs.port"),
        ("nfs://h:1/e/f", "drive[0].nfs.server"),
        (5, "drive[0].nfs"),
    ):
        with pytest.raises(ConfigError) as refused:
            MachineConfig.from_mapping({"drive": [{"format": "raw", "nfs": bad}]})
        assert refused.value.field == field


def test_drive_refuses_two_sources_an_overlay_no_format_and_a_url_as_file() -> None:
    with pytest.raises(ConfigError, match="one of file, nbd, iscsi or nfs"):
        Drive(file=Path("/a.raw"), nfs=image(), format=ImageFormat.RAW)
    with pytest.raises(ConfigError, match="one of file, nbd, iscsi or nfs"):
        Drive(iscsi=lun(), nfs=image(), format=ImageFormat.RAW)
    with pytest.raises(ConfigError, match="overlay over NFS"):
        Drive(nfs=image(), format=ImageFormat.RAW, snapshot=True)
    with pytest.raises(ConfigError, match="format"):
        Drive(nfs=image())
    with pytest.raises(ConfigError) as refused:
        Drive.from_mapping({"file": URL, "format": "qcow2"}, "drive[2]")
    assert refused.value.field == "drive[2].file"
    assert f"nfs = {URL!r}" in refused.value.message
    assert Drive(nfs=image(), format=ImageFormat.QCOW2).remote_url == URL
    assert Drive(file=Path("/a.raw"), format=ImageFormat.RAW).remote_url is None


def test_nodes_of_an_nfs_disk() -> None:
    drive = Drive(
        nfs=image(user=1000, group=100, readahead_size=65536),
        format=ImageFormat.QCOW2,
        read_only=True,
    )
    drive_plan = plan_drive(2, drive, None, "pc", None)
    assert drive_plan.nodes[0] == {
        "driver": "nfs",
        "node-name": "drv2-file",
        "server": {"type": "inet", "host": "127.0.0.1"},
        "path": "/srv/export/disk.qcow2",
        "user": 1000,
        "group": 100,
        "readahead-size": 65536,
        "cache": {"direct": False, "no-flush": False},
        "read-only": True,
    }
    fmt = drive_plan.nodes[1]
    assert (fmt["driver"], fmt["file"], fmt["backing"]) == ("qcow2", "drv2-file", None)  # type: ignore[typeddict-item]
    assert drive_plan.device["drive"] == "drv2"
    assert drive_plan.objects == ()
    bare = plan_drive(0, Drive(nfs=image(), format=ImageFormat.RAW), None, "pc", None).nodes[0]
    assert not {"user", "group", "readahead-size"} & set(bare)


def test_an_nfs_node_is_named_by_its_url() -> None:
    # QEMU's plain filename of an nfs node is the URL itself.
    assert image_filename(URL) == URL
    nested = {"driver": "nfs", "server": {"type": "inet", "host": "127.0.0.1"}}
    flat = {"driver": "nfs", "server.type": "inet", "server.host": "127.0.0.1"}
    for server in (nested, flat):
        spec = {"driver": "qcow2", "file": {**server, "path": "/srv/export/disk.qcow2"}}
        assert image_filename("json:" + json.dumps(spec)) == URL
        # The ids as numbers or strings; a zero one is left out, as QEMU does.
        for user, group, url in (
            ("1000", 100, f"{URL}?uid=1000&gid=100"),
            (1000, "0", f"{URL}?uid=1000"),
            (0, 7, f"{URL}?gid=7"),
            ("x", True, URL),  # not ids: no query rather than a wrong one
        ):
            with_ids = {**spec["file"], "user": user, "group": group}  # type: ignore[dict-item]
            named = image_filename("json:" + json.dumps({"driver": "raw", "file": with_ids}))
            assert named == url
    for partial in ({"driver": "nfs", "path": "/e/f"}, {**nested}):
        assert image_filename("json:" + json.dumps(partial)) is None


def test_apply_matches_an_nfs_disk_by_its_url(tmp_path: Path) -> None:
    wanted = DesiredDrive(drive=Drive(nfs=image(), format=ImageFormat.QCOW2))
    assert plan([wanted], [live("disk0", URL)]).empty
    other = plan([wanted], [live("disk0", f"{URL}?uid=5")])
    assert [s.action for s in other.steps] == [Action.ATTACH, Action.DETACH]
    assert URL in other.steps[0].detail
    doc = tmp_path / "drives.toml"
    doc.write_text(f'[[drive]]\nformat = "qcow2"\nnfs = "{URL}"\n')
    assert load_desired(doc)[0].drive.nfs == image()


def test_cli_attach_parses_an_nfs_url_into_the_typed_form(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, drive = _cli_attach(monkeypatch, "vm1", f"{URL}?uid=1000", "--format=qcow2")
    assert code == 1 and drive is not None  # reached the hot-plug
    assert drive.nfs == image(user=1000)
    assert drive.file is None
    code, drive = _cli_attach(monkeypatch, "vm1", "nfs://127.0.0.1:2049/e/f", "--format=raw")
    assert drive is None
    assert "nfs.server" in capsys.readouterr().err
    code, drive = _cli_attach(monkeypatch, "vm1", URL, "--format=raw", "--chap-user=bob")
    assert drive is None
