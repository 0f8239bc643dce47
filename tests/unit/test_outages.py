"""Error policies (rerror/werror) and NBD reconnect: parsing, refusal, argv, io-status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from blockctl import _machine
from blockctl._argv import DriveSource, plan_drive
from blockctl._cli.drives import drive_row
from blockctl._cli.main import build_parser
from blockctl._images import ImageLayer
from blockctl._machine import VM
from blockctl._ops.drives import DriveInfo
from blockctl._qmp import wire
from blockctl._qmp.models import BlockDevice, StatusInfo
from blockctl.errors import ConfigError
from blockctl.types import (
    DeviceErrorPolicy,
    Drive,
    ImageFormat,
    Interface,
    MachineConfig,
    NbdSource,
)


def _source(name: str = "/i.raw") -> DriveSource:
    return DriveSource(
        chain=(
            ImageLayer(
                filename=name,
                format=ImageFormat.RAW,
                virtual_size=1 << 20,
                backing_filename=None,
                backing_format=None,
                data_file=None,
            ),
        )
    )


@pytest.mark.parametrize("interface", [Interface.VIRTIO, Interface.SCSI, Interface.IDE])
def test_the_policies_go_on_the_device(interface: Interface) -> None:
    drive = Drive(
        file=Path("/i.raw"),
        format=ImageFormat.RAW,
        interface=interface,
        rerror=DeviceErrorPolicy.STOP,
        werror=DeviceErrorPolicy.ENOSPC,
    )
    plan = plan_drive(0, drive, _source(), "pc", (0, 0))
    assert plan.device["rerror"] == "stop"
    assert plan.device["werror"] == "enospc"
    assert all("rerror" not in n and "werror" not in n for n in plan.nodes)


def test_no_policy_leaves_qemus_default() -> None:
    plan = plan_drive(0, Drive(file=Path("/i.raw"), format=ImageFormat.RAW), _source(), "pc", None)
    assert "rerror" not in plan.device
    assert "werror" not in plan.device


def test_a_toml_table_takes_the_policies() -> None:
    config = MachineConfig.from_mapping(
        {"drive": [{"file": "/a.raw", "format": "raw", "rerror": "report", "werror": "stop"}]}
    )
    assert config.drives[0].rerror is DeviceErrorPolicy.REPORT
    assert config.drives[0].werror is DeviceErrorPolicy.STOP


def test_an_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        Drive.from_mapping({"file": "/a.raw", "format": "raw", "werror": "pause"}, "drive[0]")
    assert info.value.field == "drive[0].werror"
    assert "report, ignore, enospc, stop" in info.value.message


def test_enospc_is_refused_for_reads() -> None:
    with pytest.raises(ConfigError) as info:
        Drive(file=Path("/a.raw"), format=ImageFormat.RAW, rerror=DeviceErrorPolicy.ENOSPC)
    assert info.value.field == "drive.rerror"
    assert "werror" in info.value.message and "'stop'" in info.value.message


def test_a_floppy_takes_no_policy_and_the_error_names_the_way_out() -> None:
    with pytest.raises(ConfigError) as info:
        Drive(
            file=Path("/a.raw"),
            format=ImageFormat.RAW,
            interface=Interface.FLOPPY,
            werror=DeviceErrorPolicy.STOP,
        )
    assert info.value.field == "drive.werror"
    assert "'virtio'" in info.value.message


def test_attach_parses_the_policy_flags() -> None:
    parser, _ = build_parser()
    args = parser.parse_args(
        ["attach", "vm", "/a.raw", "--format", "raw", "--rerror", "stop", "--werror", "stop"]
    )
    assert (args.rerror, args.werror) == ("stop", "stop")


def test_nbd_reconnect_delay_reaches_the_node() -> None:
    drive = Drive(
        nbd=NbdSource(socket=Path("/run/nbd.sock"), reconnect_delay=30),
        format=ImageFormat.RAW,
        werror=DeviceErrorPolicy.STOP,
    )
    plan = plan_drive(0, drive, None, "pc", None)
    assert plan.nodes[0]["driver"] == "nbd"
    assert plan.nodes[0].get("reconnect-delay") == 30
    no_delay = Drive(nbd=NbdSource(socket=Path("/run/nbd.sock")), format=ImageFormat.RAW)
    assert "reconnect-delay" not in plan_drive(0, no_delay, None, "pc", None).nodes[0]


@pytest.mark.parametrize("delay", [-1, 3601, 1.5, True, "10"])
def test_a_bad_reconnect_delay_is_refused(delay: object) -> None:
    with pytest.raises(ConfigError) as info:
        Drive.from_mapping(
            {"nbd": {"socket": "/run/n.sock", "reconnect_delay": delay}, "format": "raw"}
        )
    assert info.value.field == "nbd.reconnect_delay"


def test_query_block_io_status_names_the_failed_drive() -> None:
    reply = {
        "device": "",
        "qdev": "/machine/peripheral/disk1/virtio-backend",
        "removable": False,
        "locked": False,
        "io-status": "failed",
    }
    device = BlockDevice.from_qmp(reply)
    assert device.io_status == "failed"
    assert BlockDevice.from_qmp({**reply, "io-status": "ok"}).io_status == "ok"
    del reply["io-status"]
    assert BlockDevice.from_qmp(reply).io_status is None


@pytest.mark.parametrize(
    ("io_status", "failed"), [(None, False), ("ok", False), ("failed", True), ("nospace", True)]
)
def test_a_drive_is_in_error_only_on_a_failed_status(io_status: str | None, failed: bool) -> None:
    info = DriveInfo(
        device_id="disk1",
        device_driver="virtio-blk-pci",
        removable=False,
        tray_open=None,
        top_node="drv1",
        chain=(),
        pending_unplug=False,
        io_limits=None,
        device_cache=None,
        io_status=io_status,
    )
    assert info.io_error is failed
    assert info.to_json()["io_status"] == io_status
    assert (f"IO-ERROR({io_status})" in str(drive_row(info))) is failed


class FakeQEMU:
    """A VM paused on an I/O error whose first ``failing`` resumes pause it again at once
    (the retried requests fail while QEMU's NBD client reconnects)."""

    def __init__(self, status: str, failing: int) -> None:
        self.state = StatusInfo(running=status == "running", status=status)
        self.failing = failing
        self.conts = 0
        self.stops = 0
        self.session = self
        self.name = "vm"

    async def status(self) -> StatusInfo:
        return self.state

    async def cont(self) -> None:
        self.conts += 1
        paused_again = self.conts <= self.failing
        self.state = StatusInfo(
            running=not paused_again, status="io-error" if paused_again else "running"
        )
        if paused_again:
            self.stops += 1

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[FakeQEMU]:
        assert names == ("STOP",)
        self.stops = 0
        yield self

    async def next(self) -> None:
        """The STOP the last ``cont`` caused, if any; else nothing comes."""
        if not self.stops:
            await anyio.sleep_forever()
        self.stops -= 1


@pytest.fixture
def fake_cont(monkeypatch: pytest.MonkeyPatch) -> None:
    async def cont(session: FakeQEMU) -> None:
        await session.cont()

    monkeypatch.setattr(wire, "cont", cont)
    monkeypatch.setattr(_machine, "RESUME_SETTLE", 0.01)


@pytest.mark.usefixtures("fake_cont")
async def test_resume_resumes_again_a_vm_that_pauses_at_once() -> None:
    qemu = FakeQEMU("io-error", failing=1)
    status = await VM.resume(qemu, timeout=5)  # type: ignore[arg-type]
    assert status == StatusInfo(running=True, status="running")
    assert qemu.conts == 2


@pytest.mark.usefixtures("fake_cont")
async def test_resume_reports_storage_still_away_after_the_timeout() -> None:
    qemu = FakeQEMU("io-error", failing=10**6)
    status = await VM.resume(qemu, timeout=0)  # type: ignore[arg-type]
    assert status.status == "io-error"
    assert qemu.conts == 1


@pytest.mark.usefixtures("fake_cont")
async def test_resume_leaves_a_running_vm_alone() -> None:
    qemu = FakeQEMU("running", failing=0)
    assert (await VM.resume(qemu)).running  # type: ignore[arg-type]
    assert qemu.conts == 0
