"""MachineConfig → argv, pure: JSON nodes, generated names, no option injection."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockctl._argv import DriveSource, build_argv, plan_drives, qemu_opt_escape
from blockctl._images import ImageLayer
from blockctl.errors import ConfigError
from blockctl.types import (
    DEFAULT_HOTPLUG_SLOTS,
    MAX_HOTPLUG_SLOTS,
    Accel,
    BootConfig,
    CacheMode,
    DeprecatedInput,
    Drive,
    ImageFormat,
    Interface,
    MachineConfig,
    Media,
)


def layer(
    name: str,
    fmt: ImageFormat = ImageFormat.QCOW2,
    backing: str | None = None,
    backing_format: str | None = None,
) -> ImageLayer:
    return ImageLayer(
        filename=name,
        format=fmt,
        virtual_size=1 << 20,
        backing_filename=backing,
        backing_format=backing_format,
        data_file=None,
    )


def argv_for(config: MachineConfig, sources: dict[int, DriveSource]) -> list[str]:
    return build_argv(
        binary="qemu-system-x86_64",
        config=config,
        label="t",
        accel=Accel.TCG,
        plans=plan_drives(config, sources),
        qmp_fd=3,
        monitor_path=Path("/run/x/qmp.sock"),
        console=None,
    )


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def blockdevs(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(v) for v in option_values(argv, "-blockdev")]


def devices(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(v) for v in option_values(argv, "-device")]


def test_never_a_drive_option() -> None:
    config = MachineConfig(drives=(Drive(file=Path("/i.qcow2"), format=ImageFormat.QCOW2),))
    argv = argv_for(config, {0: DriveSource(chain=(layer("/i.qcow2"),))})
    assert "-drive" not in argv
    nodes = blockdevs(argv)
    assert [n["node-name"] for n in nodes] == ["drv0-file", "drv0"]
    # The format is named and the header's backing file is not followed implicitly.
    assert nodes[1]["driver"] == "qcow2" and nodes[1]["backing"] is None


def test_backing_chain_is_explicit_bottom_up() -> None:
    chain = (
        layer("/top.qcow2", backing="/mid.qcow2", backing_format="qcow2"),
        layer("/mid.qcow2", backing="/base.raw", backing_format="raw"),
        layer("/base.raw", ImageFormat.RAW),
    )
    config = MachineConfig(drives=(Drive(file=Path("/top.qcow2"), format=ImageFormat.QCOW2),))
    nodes = blockdevs(argv_for(config, {0: DriveSource(chain=chain)}))
    names = [n["node-name"] for n in nodes]
    assert names == ["drv0-b2-file", "drv0-b2", "drv0-b1-file", "drv0-b1", "drv0-file", "drv0"]
    by_name = {n["node-name"]: n for n in nodes}
    assert by_name["drv0-b2"]["driver"] == "raw" and "backing" not in by_name["drv0-b2"]
    assert by_name["drv0-b1"]["backing"] == "drv0-b2"
    assert by_name["drv0"]["backing"] == "drv0-b1"
    assert by_name["drv0-b1"]["read-only"] is True and by_name["drv0"]["read-only"] is False


@pytest.mark.parametrize(
    ("cache", "direct", "no_flush", "wce"),
    [
        ("writeback", False, False, "on"),
        ("none", True, False, "on"),
        ("writethrough", False, False, "off"),
        ("directsync", True, False, "off"),
        ("unsafe", False, True, "on"),
    ],
)
def test_cache_mode_reaches_nodes_and_device(
    cache: str, direct: bool, no_flush: bool, wce: str
) -> None:
    config = MachineConfig(
        drives=(Drive(file=Path("/i.raw"), format=ImageFormat.RAW, cache=CacheMode(cache)),)
    )
    argv = argv_for(config, {0: DriveSource(chain=(layer("/i.raw", ImageFormat.RAW),))})
    for node in blockdevs(argv):
        assert node["cache"] == {"direct": direct, "no-flush": no_flush}
    assert devices(argv)[0]["write-cache"] == wce


def test_interfaces_and_slots() -> None:
    config = MachineConfig(
        drives=(
            Drive(file=Path("/a"), format=ImageFormat.RAW, interface=Interface.SCSI),
            Drive(file=Path("/b"), format=ImageFormat.RAW, interface=Interface.SCSI, unit=3),
            Drive(file=Path("/c"), format=ImageFormat.RAW, interface=Interface.IDE, index=3),
            Drive(file=None, media=Media.CDROM, interface=Interface.IDE),
            Drive(file=Path("/f"), format=ImageFormat.RAW, interface=Interface.FLOPPY, serial=None),
        )
    )
    sources = {
        i: DriveSource(chain=(layer(p, ImageFormat.RAW),))
        for i, p in ((0, "/a"), (1, "/b"), (2, "/c"), (4, "/f"))
    }
    devs = devices(argv_for(config, sources))
    assert devs[0] == {"driver": "virtio-scsi-pci", "id": "scsi0"}
    assert devs[1]["driver"] == "scsi-hd" and devs[1]["scsi-id"] == 0
    assert devs[2]["scsi-id"] == 3
    assert (devs[3]["driver"], devs[3]["bus"], devs[3]["unit"]) == ("ide-hd", "ide.1", 1)
    assert devs[4]["driver"] == "ide-cd" and "drive" not in devs[4]  # an empty tray
    assert (devs[4]["bus"], devs[4]["unit"]) == ("ide.0", 0)
    assert devs[5]["driver"] == "floppy" and devs[5]["drive"] == "drv4"


def test_snapshot_and_copy_on_read_layers() -> None:
    config = MachineConfig(
        drives=(
            Drive(
                file=Path("/i.qcow2"), format=ImageFormat.QCOW2, snapshot=True, copy_on_read=True
            ),
        )
    )
    source = DriveSource(chain=(layer("/i.qcow2"),), overlay=Path("/run/o.qcow2"))
    argv = argv_for(config, {0: source})
    nodes = {n["node-name"]: n for n in blockdevs(argv)}
    assert nodes["drv0"]["read-only"] is True  # the base is never written
    assert nodes["drv0-snap"]["backing"] == "drv0"
    assert nodes["drv0-snap-file"]["filename"] == "/run/o.qcow2"
    assert nodes["drv0-cor"] == {
        "driver": "copy-on-read",
        "node-name": "drv0-cor",
        "file": "drv0-snap",
    }
    assert devices(argv)[0]["drive"] == "drv0-cor"


def test_boot_option() -> None:
    config = MachineConfig(
        boot=BootConfig(
            order="cd", once="d", menu=True, splash=Path("/x,y.bmp"), splash_time=5, strict=False
        )
    )
    assert option_values(argv_for(config, {}), "-boot") == [
        "order=cd,once=d,menu=on,splash=/x,,y.bmp,splash-time=5,strict=off"
    ]


def test_deprecated_input_policy() -> None:
    # The default passes no -compat: QEMU's own default (accept) applies.
    assert option_values(argv_for(MachineConfig(), {}), "-compat") == []
    strict = MachineConfig(deprecated_input=DeprecatedInput.REJECT)
    assert option_values(argv_for(strict, {}), "-compat") == ["deprecated-input=reject"]
    # From TOML, by its spelled-out name; anything else is refused with the choices.
    from_toml = MachineConfig.from_mapping({"deprecated-input": "reject"})
    assert from_toml.deprecated_input is DeprecatedInput.REJECT
    with pytest.raises(ConfigError, match="accept, reject") as info:
        MachineConfig.from_mapping({"deprecated-input": "crash"})
    assert info.value.field == "deprecated_input"


def test_q35_gets_pcie_root_ports_for_hotplug() -> None:
    def ports(config: MachineConfig) -> list[dict[str, object]]:
        return [d for d in devices(argv_for(config, {})) if d["driver"] == "pcie-root-port"]

    # q35's root bus takes no hot-plugged device: 8 ports by default, each its own chassis.
    default = ports(MachineConfig(machine="q35"))
    assert [p["id"] for p in default] == [f"hp{i}" for i in range(DEFAULT_HOTPLUG_SLOTS)]
    assert len({p["chassis"] for p in default}) == DEFAULT_HOTPLUG_SLOTS
    assert len(ports(MachineConfig(machine="pc-q35-7.2", hotplug_slots=3))) == 3
    assert ports(MachineConfig(machine="q35", hotplug_slots=0)) == []
    assert ports(MachineConfig()) == []  # 'pc' hot-plugs on its own root bus
    assert MachineConfig.from_mapping({"machine": "q35", "hotplug-slots": 2}).hotplug_slots == 2
    with pytest.raises(ConfigError, match="q35") as info:
        MachineConfig(hotplug_slots=2)
    assert info.value.field == "hotplug_slots"
    for bad in (-1, MAX_HOTPLUG_SLOTS + 1, True, "4"):
        with pytest.raises(ConfigError, match="from 0 to"):
            MachineConfig(machine="q35", hotplug_slots=bad)  # type: ignore[arg-type]


def test_floppy_needs_pc() -> None:
    config = MachineConfig(
        machine="q35",
        drives=(Drive(file=Path("/f"), format=ImageFormat.RAW, interface=Interface.FLOPPY),),
    )
    with pytest.raises(ConfigError, match="floppy"):
        argv_for(config, {0: DriveSource(chain=(layer("/f", ImageFormat.RAW),))})


def test_qemu_opt_escape() -> None:
    assert qemu_opt_escape("/a,b,,c") == "/a,,b,,,,c"


paths = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0\n"),
    min_size=1,
    max_size=60,
).map(lambda s: "/" + s)


@settings(max_examples=300, deadline=None)
@given(
    path=paths,
    serial=st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20
    ),
)
def strings_never_become_options(path: str, serial: str) -> None:
    """Any path or serial either is refused, or round-trips as exactly one JSON value."""
    EXAMPLES["tried"] += 1
    try:
        drive = Drive(file=Path(path), format=ImageFormat.RAW, serial=serial)
    except ConfigError:
        EXAMPLES["refused"] += 1
        return
    config = MachineConfig(drives=(drive,))
    argv = argv_for(config, {0: DriveSource(chain=(layer(str(drive.file), ImageFormat.RAW),))})
    nodes = blockdevs(argv)
    assert nodes[0]["filename"] == str(drive.file)
    assert set(nodes[0]) == {"driver", "node-name", "filename", "cache", "discard", "read-only"}
    device = devices(argv)[0]
    assert device["serial"] == serial
    assert set(device) == {"id", "driver", "drive", "write-cache", "serial"}
    EXAMPLES["used"] += 1


#: Examples of the property above: tried, refused, used (each counted once its checks held).
EXAMPLES: Counter[str] = Counter()


def test_user_strings_never_become_options() -> None:
    """The property, and proof it tested something: most examples must be used (a Drive that
    refused every path or serial would pass every example)."""
    EXAMPLES.clear()
    strings_never_become_options()
    tried, used = EXAMPLES["tried"], EXAMPLES["used"]
    assert tried > 0
    assert used + EXAMPLES["refused"] == tried
    assert used >= 0.5 * tried, EXAMPLES
