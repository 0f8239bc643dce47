"""MachineConfig → argv, pure: JSON nodes, generated names, no option injection."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockctl._argv import (
    ConsoleFd,
    ConsoleSocket,
    DriveSource,
    assign_slots,
    build_argv,
    plan_drive,
    plan_drives,
    qemu_opt_escape,
)
from blockctl._images import ImageLayer
from blockctl._machine import is_cd_drive
from blockctl.errors import ConfigError
from blockctl.types import (
    DEFAULT_HOTPLUG_SLOTS,
    MAX_HOTPLUG_SLOTS,
    Accel,
    Aio,
    BootConfig,
    CacheMode,
    DeprecatedInput,
    DetectZeroes,
    Discard,
    Drive,
    ImageFormat,
    Interface,
    MachineConfig,
    Media,
    NbdSource,
    drive_slot,
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


#: Under scripts/mutation-score (which sets BLOCKCTL_MUTATION) the first 30 examples of the
#: same fixed sequence: every mutant runs this test, and 300 examples cost seconds each.
STRING_EXAMPLES = 30 if os.environ.get("BLOCKCTL_MUTATION") else 300


@settings(max_examples=STRING_EXAMPLES, deadline=None)
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


# Section: exact command lines (found by mutation testing: every option and JSON key is what
# QEMU reads, so the whole argv is compared, not a few fields)


def test_every_option_of_a_full_machine_exactly() -> None:
    """q35 under KVM with every machine option, a second monitor and a pool, a console fd,
    the guest agent; drives: a qcow2 over a vmdk backing (native aio, unmap, detect-zeroes,
    O_DIRECT, serial, bootindex), a read-only host block device on SCSI, an empty SCSI
    cdrom, a qcow2 over NBD with copy-on-read, a qed with a snapshot overlay."""
    drives = (
        Drive(
            file=Path("/img/top.qcow2"),
            format=ImageFormat.QCOW2,
            aio=Aio.NATIVE,
            discard=Discard.UNMAP,
            detect_zeroes=DetectZeroes.UNMAP,
            serial="S1",
            bootindex=1,
            cache=CacheMode("none"),
        ),
        Drive(
            file=Path("/dev/sdz"), format=ImageFormat.RAW, read_only=True, interface=Interface.SCSI
        ),
        Drive(file=None, media=Media.CDROM, interface=Interface.SCSI),
        Drive(
            nbd=NbdSource(socket=Path("/run/nbd.sock"), export="exp"),
            format=ImageFormat.QCOW2,
            copy_on_read=True,
        ),
        Drive(
            file=Path("/img/s.qed"),
            format=ImageFormat.QED,
            snapshot=True,
            detect_zeroes=DetectZeroes.ON,
        ),
    )
    config = MachineConfig(
        machine="q35",
        memory_mib=512,
        cpus=2,
        no_shutdown=True,
        firmware=Path("/fw/bios.bin"),
        kernel=Path("/boot/vmlinuz"),
        initrd=Path("/boot/initrd"),
        append="console=ttyS0",
        hotplug_slots=2,
        deprecated_input=DeprecatedInput.REJECT,
        drives=drives,
    )
    sources = {
        0: DriveSource(
            chain=(
                layer("/img/top.qcow2", backing="/img/base.vmdk"),
                layer("/img/base.vmdk", ImageFormat.VMDK),
            )
        ),
        1: DriveSource(chain=(layer("/dev/sdz", ImageFormat.RAW),), block_device=True),
        4: DriveSource(
            chain=(layer("/img/s.qed", ImageFormat.QED),), overlay=Path("/run/ov.qcow2")
        ),
    }
    plans = plan_drives(config, sources)
    assert [(p.index, p.device_id, p.top_node) for p in plans] == [
        (0, "disk0", "drv0"),
        (1, "disk1", "drv1"),
        (2, "disk2", None),
        (3, "disk3", "drv3-cor"),
        (4, "disk4", "drv4-snap"),
    ]
    argv = build_argv(
        binary="qemu-system-x86_64",
        config=config,
        label="vm,1",
        accel=Accel.KVM,
        plans=plans,
        qmp_fd=3,
        monitor_path=Path("/run/a,b/qmp.sock"),
        console=ConsoleFd(fd=7),
        agent_socket=Path("/run/qga,0.sock"),
        monitor_pool=(Path("/run/p0.sock"), Path("/run/p1.sock")),
    )
    assert argv == [
        "qemu-system-x86_64",
        "-name",
        "guest=vm,,1,debug-threads=on",
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-m",
        "512M",
        "-smp",
        "2",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-compat",
        "deprecated-input=reject",
        "-cpu",
        "host",
        "-no-shutdown",
        "-bios",
        "/fw/bios.bin",
        "-kernel",
        "/boot/vmlinuz",
        "-initrd",
        "/boot/initrd",
        "-append",
        "console=ttyS0",
        "-chardev",
        "socket,id=qmp0,fd=3",
        "-mon",
        "chardev=qmp0,mode=control",
        "-chardev",
        "socket,id=qmp1,path=/run/a,,b/qmp.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp1,mode=control",
        "-chardev",
        "socket,id=qmp-pool-0,path=/run/p0.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp-pool-0,mode=control",
        "-chardev",
        "socket,id=qmp-pool-1,path=/run/p1.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp-pool-1,mode=control",
        "-chardev",
        "socket,id=ser0,fd=7",
        "-serial",
        "chardev:ser0",
        "-device",
        json.dumps({"driver": "pcie-root-port", "id": "hp0", "chassis": 1}),
        "-device",
        json.dumps({"driver": "pcie-root-port", "id": "hp1", "chassis": 2}),
        "-device",
        json.dumps({"driver": "virtio-scsi-pci", "id": "scsi0"}),
        "-blockdev",
        json.dumps(
            {
                "driver": "file",
                "node-name": "drv0-b1-file",
                "filename": "/img/base.vmdk",
                "cache": {"direct": True, "no-flush": False},
                "discard": "unmap",
                "read-only": True,
                "aio": "native",
                "auto-read-only": True,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "vmdk",
                "node-name": "drv0-b1",
                "file": "drv0-b1-file",
                "cache": {"direct": True, "no-flush": False},
                "discard": "unmap",
                "read-only": True,
                "backing": None,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "file",
                "node-name": "drv0-file",
                "filename": "/img/top.qcow2",
                "cache": {"direct": True, "no-flush": False},
                "discard": "unmap",
                "read-only": False,
                "aio": "native",
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "qcow2",
                "node-name": "drv0",
                "file": "drv0-file",
                "cache": {"direct": True, "no-flush": False},
                "discard": "unmap",
                "read-only": False,
                "backing": "drv0-b1",
                "detect-zeroes": "unmap",
            }
        ),
        "-device",
        json.dumps(
            {
                "id": "disk0",
                "driver": "virtio-blk-pci",
                "drive": "drv0",
                "write-cache": "on",
                "serial": "S1",
                "bootindex": 1,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "host_device",
                "node-name": "drv1-file",
                "filename": "/dev/sdz",
                "cache": {"direct": False, "no-flush": False},
                "discard": "ignore",
                "read-only": True,
                "auto-read-only": True,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "raw",
                "node-name": "drv1",
                "file": "drv1-file",
                "cache": {"direct": False, "no-flush": False},
                "discard": "ignore",
                "read-only": True,
            }
        ),
        "-device",
        json.dumps(
            {
                "id": "disk1",
                "driver": "scsi-hd",
                "bus": "scsi0.0",
                "scsi-id": 0,
                "lun": 0,
                "drive": "drv1",
                "write-cache": "on",
            }
        ),
        "-device",
        json.dumps({"id": "disk2", "driver": "scsi-cd", "bus": "scsi0.0", "scsi-id": 1, "lun": 0}),
        "-blockdev",
        json.dumps(
            {
                "driver": "nbd",
                "node-name": "drv3-file",
                "server": {"type": "unix", "path": "/run/nbd.sock"},
                "export": "exp",
                "cache": {"direct": False, "no-flush": False},
                "read-only": False,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "qcow2",
                "node-name": "drv3",
                "file": "drv3-file",
                "cache": {"direct": False, "no-flush": False},
                "discard": "ignore",
                "read-only": False,
                "backing": None,
            }
        ),
        "-blockdev",
        json.dumps({"driver": "copy-on-read", "node-name": "drv3-cor", "file": "drv3"}),
        "-device",
        json.dumps(
            {"id": "disk3", "driver": "virtio-blk-pci", "drive": "drv3-cor", "write-cache": "on"}
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "file",
                "node-name": "drv4-file",
                "filename": "/img/s.qed",
                "cache": {"direct": False, "no-flush": False},
                "discard": "ignore",
                "read-only": True,
                "auto-read-only": True,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "qed",
                "node-name": "drv4",
                "file": "drv4-file",
                "cache": {"direct": False, "no-flush": False},
                "discard": "ignore",
                "read-only": True,
                "backing": None,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "file",
                "node-name": "drv4-snap-file",
                "filename": "/run/ov.qcow2",
                "cache": {"direct": False, "no-flush": False},
                "discard": "ignore",
                "read-only": False,
            }
        ),
        "-blockdev",
        json.dumps(
            {
                "driver": "qcow2",
                "node-name": "drv4-snap",
                "file": "drv4-snap-file",
                "cache": {"direct": False, "no-flush": False},
                "discard": "ignore",
                "read-only": False,
                "backing": "drv4",
                "detect-zeroes": "on",
            }
        ),
        "-device",
        json.dumps(
            {"id": "disk4", "driver": "virtio-blk-pci", "drive": "drv4-snap", "write-cache": "on"}
        ),
        "-device",
        json.dumps({"driver": "virtio-serial-pci", "id": "vser0"}),
        "-chardev",
        "socket,id=qga0,path=/run/qga,,0.sock,server=on,wait=off",
        "-device",
        json.dumps(
            {
                "driver": "virtserialport",
                "bus": "vser0.0",
                "chardev": "qga0",
                "name": "org.qemu.guest_agent.0",
                "id": "qga0-port",
            }
        ),
    ]


def test_every_option_of_a_pc_machine_exactly() -> None:
    """pc under TCG: IDE disk and cdrom in the first free slots, a floppy in its unit, SCSI on
    bus 1 only, a console socket with its log, -boot, no second monitor."""
    drives = (
        Drive(
            file=Path("/img/a.raw"),
            format=ImageFormat.RAW,
            interface=Interface.IDE,
            cache=CacheMode("unsafe"),
        ),
        Drive(file=None, media=Media.CDROM, interface=Interface.IDE),
        Drive(file=Path("/img/f.raw"), format=ImageFormat.RAW, interface=Interface.FLOPPY, unit=1),
        Drive(
            file=Path("/img/s.raw"), format=ImageFormat.RAW, interface=Interface.SCSI, bus=1, unit=5
        ),
    )
    config = MachineConfig(drives=drives, boot=BootConfig(menu=False, strict=True))
    sources = {
        i: DriveSource(chain=(layer(f"/img/{name}.raw", ImageFormat.RAW),))
        for i, name in ((0, "a"), (2, "f"), (3, "s"))
    }
    argv = build_argv(
        binary="qemu",
        config=config,
        label="t",
        accel=Accel.TCG,
        plans=plan_drives(config, sources),
        qmp_fd=4,
        monitor_path=None,
        console=ConsoleSocket(path=Path("/run/c,1.sock"), log=Path("/run/c,1.log")),
    )
    raw = {"cache": {"direct": False, "no-flush": False}, "discard": "ignore", "read-only": False}
    unsafe = dict(raw, cache={"direct": False, "no-flush": True})

    def nodes(i: int, filename: str, opts: dict[str, object]) -> list[str]:
        protocol = {"driver": "file", "node-name": f"drv{i}-file", "filename": filename, **opts}
        fmt = {"driver": "raw", "node-name": f"drv{i}", "file": f"drv{i}-file", **opts}
        return ["-blockdev", json.dumps(protocol), "-blockdev", json.dumps(fmt)]

    def device(**fields: object) -> list[str]:
        return ["-device", json.dumps(fields)]

    assert argv == [
        *("qemu", "-name", "guest=t,debug-threads=on", "-machine", "pc", "-accel", "tcg"),
        *("-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none"),
        *("-boot", "menu=off,strict=on"),
        *("-chardev", "socket,id=qmp0,fd=4", "-mon", "chardev=qmp0,mode=control"),
        "-chardev",
        "socket,id=ser0,path=/run/c,,1.sock,server=on,wait=off,logfile=/run/c,,1.log",
        *("-serial", "chardev:ser0"),
        *device(driver="virtio-scsi-pci", id="scsi1"),
        *nodes(0, "/img/a.raw", unsafe),
        *device(
            id="disk0", driver="ide-hd", bus="ide.0", unit=0, drive="drv0", **{"write-cache": "on"}
        ),
        *device(id="disk1", driver="ide-cd", bus="ide.0", unit=1),
        *nodes(2, "/img/f.raw", raw),
        *device(id="disk2", driver="floppy", unit=1, drive="drv2"),
        *nodes(3, "/img/s.raw", raw),
        *device(
            id="disk3",
            driver="scsi-hd",
            bus="scsi1.0",
            **{"scsi-id": 5, "lun": 0, "drive": "drv3", "write-cache": "on"},
        ),
    ]


def test_hot_plugged_devices_without_a_slot() -> None:
    """A drive planned without a slot (hot-plug): SCSI on bus 0 with no id (QEMU picks one),
    IDE on bus 0 unit 0, a floppy in unit 0; q35's IDE has no unit."""
    scsi = Drive(file=None, media=Media.CDROM, interface=Interface.SCSI)
    ide = Drive(file=None, media=Media.CDROM, interface=Interface.IDE)
    floppy = Drive(file=Path("/f"), format=ImageFormat.RAW, interface=Interface.FLOPPY)
    source = DriveSource(chain=(layer("/f", ImageFormat.RAW),))
    assert plan_drive(0, scsi, None, "pc", None).device == {
        "id": "disk0",
        "driver": "scsi-cd",
        "bus": "scsi0.0",
    }
    assert plan_drive(1, ide, None, "pc", None).device == {
        "id": "disk1",
        "driver": "ide-cd",
        "bus": "ide.0",
        "unit": 0,
    }
    assert plan_drive(1, ide, None, "pc-q35-7.2", (3, 0)).device == {
        "id": "disk1",
        "driver": "ide-cd",
        "bus": "ide.3",
    }
    assert plan_drive(2, floppy, source, "pc", None).device == {
        "id": "disk2",
        "driver": "floppy",
        "unit": 0,
        "drive": "drv2",
    }
    with pytest.raises(
        ConfigError,
        match=r"^drive\.interface: floppy drives need machine type 'pc' "
        r"\(q35 has no floppy controller\)$",
    ) as info:
        plan_drive(2, floppy, source, "q35", None)
    assert info.value.field == "drive.interface"
    with pytest.raises(ConfigError, match="floppy"):
        plan_drive(2, floppy, source, "pc-q35-7.2", None)


def test_a_snapshot_drive_without_its_overlay_is_refused() -> None:
    drive = Drive(file=Path("/i.qcow2"), format=ImageFormat.QCOW2, snapshot=True)
    with pytest.raises(
        ConfigError, match=r"^drive\[0\]\.snapshot: no overlay was created$"
    ) as info:
        plan_drive(0, drive, DriveSource(chain=(layer("/i.qcow2"),)), "pc", None)
    assert info.value.field == "drive[0].snapshot"


@pytest.mark.parametrize(
    ("machine", "interface", "slots"),
    [
        ("pc", Interface.IDE, [(0, 0), (0, 1), (1, 0), (1, 1)]),
        ("q35", Interface.IDE, [(b, 0) for b in range(6)]),
        # A versioned q35 type is q35 too (it was given pc's 2 x 2 IDE slots).
        ("pc-q35-7.2", Interface.IDE, [(b, 0) for b in range(6)]),
        ("pc", Interface.FLOPPY, [(0, 0), (0, 1)]),
        ("pc", Interface.SCSI, [(0, u) for u in range(256)]),
    ],
)
def test_free_slots_run_out_at_the_controllers_size(
    machine: str, interface: Interface, slots: list[tuple[int, int]]
) -> None:
    """Every slot the machine's controllers have, in order, then a refusal naming the drive."""
    drive = (
        Drive(file=Path("/f"), format=ImageFormat.RAW, interface=interface)
        if interface is Interface.FLOPPY
        else Drive(file=None, media=Media.CDROM, interface=interface)
    )
    assert assign_slots([drive] * len(slots), machine) == slots
    with pytest.raises(ConfigError) as info:
        assign_slots([drive] * (len(slots) + 1), machine)
    assert info.value.field == f"drive[{len(slots)}]"
    assert str(info.value).endswith(f"no free {interface.value} slot left on {machine}")


def test_explicit_slots_are_kept_and_skipped() -> None:
    """A virtio drive needs no slot; a drive's explicit slot is not given to another."""
    ide = Drive(file=None, media=Media.CDROM, interface=Interface.IDE)
    virtio = Drive(file=Path("/v"), format=ImageFormat.RAW)
    fixed = Drive(file=None, media=Media.CDROM, interface=Interface.IDE, index=1)
    assert assign_slots([virtio, fixed, ide, ide, ide], "pc") == [
        None,
        (0, 1),
        (0, 0),
        (1, 0),
        (1, 1),
    ]


def test_a_versioned_q35_type_has_q35s_ide_slots() -> None:
    """'pc-q35-7.2' is a q35 machine: six IDE buses of one unit each, for an explicit index and
    for an explicit bus (it was given pc's two buses of two units)."""
    cdrom = Drive(file=None, media=Media.CDROM, interface=Interface.IDE, index=3)
    assert drive_slot(cdrom, "pc-q35-7.2") == (3, 0)
    assert drive_slot(cdrom, "pc") == (1, 1)
    on_bus5 = Drive(file=None, media=Media.CDROM, interface=Interface.IDE, bus=5, unit=0)
    assert MachineConfig(machine="pc-q35-7.2", drives=(on_bus5,)).drives == (on_bus5,)
    with pytest.raises(ConfigError, match="bus 5 unit 0 does not exist"):
        MachineConfig(machine="pc", drives=(on_bus5,))


def test_an_nbd_drive_detects_zeroes_on_its_format_node() -> None:
    drive = Drive(
        nbd=NbdSource(socket=Path("/run/nbd.sock")),
        format=ImageFormat.RAW,
        detect_zeroes=DetectZeroes.ON,
    )
    plan = plan_drive(0, drive, None, "pc", None)
    assert plan.nodes[1] == {
        "driver": "raw",
        "node-name": "drv0",
        "file": "drv0-file",
        "cache": {"direct": False, "no-flush": False},
        "discard": "ignore",
        "read-only": False,
        "detect-zeroes": "on",
    }


def test_a_drive_record_keeps_plain_copies_of_every_node() -> None:
    """What the registry stores: each node's options as its own plain JSON object, equal to
    what QEMU was sent and not the plan's object (a later change to one is not the other)."""
    drive = Drive(file=Path("/i.qcow2"), format=ImageFormat.QCOW2)
    plan = plan_drive(0, drive, DriveSource(chain=(layer("/i.qcow2"),)), "pc", None)
    record = plan.record_nodes()
    assert [type(n) for n in record] == [dict] * len(plan.nodes)
    assert list(record) == [dict(n) for n in plan.nodes]
    assert all(r is not n for r, n in zip(record, plan.nodes, strict=True))
    assert json.loads(json.dumps(record)) == list(record)


def test_a_cd_drive_under_a_cdrom_drive_opens_with_host_cdrom() -> None:
    """A cdrom drive over a host CD drive (the device answers CDROM_DRIVE_STATUS) gets QEMU's
    host_cdrom driver; over any other block device (a loop device over an ISO, which
    host_cdrom would call empty) and as a disk it stays host_device; a file stays file."""
    layers = (layer("/dev/sr0", ImageFormat.RAW),)
    cd_drive = DriveSource(chain=layers, block_device=True, cd_drive=True)
    loop = DriveSource(chain=layers, block_device=True)
    iso = DriveSource(chain=(layer("/a.iso", ImageFormat.RAW),))
    cdrom = Drive(
        file=Path("/dev/sr0"), format=ImageFormat.RAW, media=Media.CDROM, interface=Interface.SCSI
    )
    disk = Drive(file=Path("/dev/sr0"), format=ImageFormat.RAW)
    drivers = {
        name: (plan.nodes[0]["driver"], plan.device["driver"])
        for name, plan in {
            "cd drive": plan_drive(0, cdrom, cd_drive, "pc", None),
            "loop": plan_drive(0, cdrom, loop, "pc", None),
            "iso file": plan_drive(0, replace(cdrom, file=Path("/a.iso")), iso, "pc", None),
            "cd drive as a disk": plan_drive(0, disk, cd_drive, "pc", None),
        }.items()
    }
    assert drivers == {
        "cd drive": ("host_cdrom", "scsi-cd"),
        "loop": ("host_device", "scsi-cd"),
        "iso file": ("file", "scsi-cd"),
        "cd drive as a disk": ("host_device", "virtio-blk-pci"),
    }


def test_only_a_cd_drive_answers_the_cdrom_probe(tmp_path: Path) -> None:
    """The probe: a regular file and a device that is no CD drive (/dev/null: ENOTTY) are
    not CD drives, nor is a path that cannot be opened."""
    plain = tmp_path / "a.iso"
    plain.write_bytes(b"x")
    assert not any(is_cd_drive(p) for p in (plain, Path("/dev/null"), tmp_path / "missing"))
