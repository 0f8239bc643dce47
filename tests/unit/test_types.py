"""MachineConfig and Drive validate themselves and name the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl.errors import ConfigError
from blockctl.types import (
    Aio,
    BootConfig,
    CacheMode,
    Drive,
    ImageFormat,
    Interface,
    MachineConfig,
    Media,
)

IMG = Path("/img/disk.qcow2")


def error_of(fn: object, *args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value


def test_defaults_are_valid() -> None:
    drive = Drive(file=IMG, format=ImageFormat.QCOW2)
    assert drive.interface is Interface.VIRTIO
    assert drive.cache is CacheMode.WRITEBACK
    assert MachineConfig(drives=(drive,)).drives == (drive,)


def test_format_is_mandatory() -> None:
    err = error_of(Drive, file=IMG)
    assert err.field == "drive.format"
    assert "never probes" in err.message


def test_unknown_format_lists_the_known_ones() -> None:
    err = error_of(Drive, file=IMG, format="qcow3")
    assert err.field == "drive.format"
    assert "qcow2" in err.message and "'qcow3'" in err.message


def test_bad_cache_mode() -> None:
    err = error_of(Drive, file=IMG, format=ImageFormat.RAW, cache="fast")
    assert err.field == "drive.cache"
    assert "writethrough" in err.message


@pytest.mark.parametrize(
    ("mode", "write_cache", "direct", "no_flush"),
    [
        ("writeback", True, False, False),
        ("none", True, True, False),
        ("writethrough", False, False, False),
        ("directsync", False, True, False),
        ("unsafe", True, False, True),
    ],
)
def test_cache_modes_are_qemus_flag_table(
    mode: str, write_cache: bool, direct: bool, no_flush: bool
) -> None:
    cache = CacheMode(mode)
    assert (cache.write_cache, cache.direct, cache.no_flush) == (write_cache, direct, no_flush)


def test_cdrom_is_read_only_and_never_virtio() -> None:
    cd = Drive(file=IMG, format=ImageFormat.RAW, media=Media.CDROM, interface=Interface.IDE)
    assert cd.read_only
    assert (
        error_of(Drive, file=IMG, format=ImageFormat.RAW, media=Media.CDROM).field == "drive.media"
    )


def test_only_a_cdrom_may_be_empty() -> None:
    assert Drive(file=None, media=Media.CDROM, interface=Interface.SCSI).file is None
    assert error_of(Drive, file=None).field == "drive.file"


def test_native_aio_needs_direct_io() -> None:
    err = error_of(Drive, file=IMG, format=ImageFormat.RAW, aio=Aio.NATIVE)
    assert err.field == "drive.aio"
    assert (
        Drive(file=IMG, format=ImageFormat.RAW, aio=Aio.NATIVE, cache=CacheMode.NONE).aio.value
        == "native"
    )


@pytest.mark.parametrize("serial", ["x" * 21, "tab\there", ""])
def test_bad_serials(serial: str) -> None:
    assert error_of(Drive, file=IMG, format=ImageFormat.RAW, serial=serial).field == "drive.serial"


@pytest.mark.parametrize(
    "path",
    ['json:{"driver":"file"}', "nbd://host/x", "http://x/y", "file:/etc/passwd", "a\nb", "a\0b"],
)
def test_protocol_strings_and_control_characters_are_not_paths(path: str) -> None:
    assert error_of(Drive, file=path, format=ImageFormat.RAW).field == "drive.file"


def test_commas_and_spaces_are_fine_in_paths() -> None:
    drive = Drive(file=Path("/tmp/a,read-only=on b.qcow2"), format=ImageFormat.QCOW2)
    assert drive.file == Path("/tmp/a,read-only=on b.qcow2")


def test_two_drives_in_one_slot() -> None:
    drives = (
        Drive(file=IMG, format=ImageFormat.RAW, interface=Interface.IDE, bus=0, unit=1),
        Drive(file=IMG, format=ImageFormat.RAW, interface=Interface.IDE, index=1),
    )
    err = error_of(MachineConfig, drives=drives)
    assert err.field == "drive[1]"
    assert "drive[0]" in err.message


def test_ide_slots_depend_on_the_machine() -> None:
    drive = Drive(file=IMG, format=ImageFormat.RAW, interface=Interface.IDE, bus=2)
    assert error_of(MachineConfig, drives=(drive,)).field == "drive[0].unit"
    assert MachineConfig(machine="q35", drives=(drive,)).machine == "q35"


def test_duplicate_bootindex() -> None:
    drives = (
        Drive(file=IMG, format=ImageFormat.RAW, bootindex=1),
        Drive(file=IMG, format=ImageFormat.RAW, bootindex=1),
    )
    assert error_of(MachineConfig, drives=drives).field == "drive.bootindex"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_mib": 8}, "memory_mib"),
        ({"cpus": 0}, "cpus"),
        ({"machine": "pc,accel=kvm"}, "machine"),
        ({"accel": "hvf"}, "accel"),
        ({"name": "Bad Name"}, "name"),
        ({"initrd": "/x"}, "initrd"),
        ({"append": "quiet"}, "append"),
    ],
)
def test_machine_fields(kwargs: dict[str, object], field: str) -> None:
    assert error_of(MachineConfig, **kwargs).field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"order": "cz"}, "boot.order"),
        ({"order": "cc"}, "boot.order"),
        ({"once": "C"}, "boot.once"),
        ({"splash_time": 70000}, "boot.splash_time"),
        ({"menu": "yes"}, "boot.menu"),
    ],
)
def test_boot_fields(kwargs: dict[str, object], field: str) -> None:
    assert error_of(BootConfig, **kwargs).field == field


def test_from_mapping_names_the_table() -> None:
    data = {
        "name": "vm1",
        "drive": [
            {"file": "a.qcow2", "format": "qcow2"},
            {"file": "b.raw", "format": "raw", "cache": "bogus"},
        ],
    }
    err = error_of(MachineConfig.from_mapping, data, base=Path("/cfg"))
    assert err.field == "drive[1].cache"


def test_from_mapping_resolves_paths_and_aliases() -> None:
    data = {
        "name": "vm1",
        "memory": 128,
        "kernel": "k",
        "boot": {"order": "c", "splash-time": 10},
        "drive": [{"file": "a.qcow2", "format": "qcow2", "if": "scsi"}],
    }
    config = MachineConfig.from_mapping(data, base=Path("/cfg"))
    assert config.memory_mib == 128
    assert config.kernel == Path("/cfg/k")
    assert config.drives[0].file == Path("/cfg/a.qcow2")
    assert config.drives[0].interface is Interface.SCSI
    assert config.boot == BootConfig(order="c", splash_time=10)


def test_from_mapping_rejects_unknown_keys() -> None:
    err = error_of(
        MachineConfig.from_mapping, {"drive": [{"file": "a", "format": "raw", "wwn": "0x5000"}]}
    )
    assert err.field == "drive[0].wwn"
    assert "known:" in err.message
