"""MachineConfig → qemu-system argv. Pure and sync: no I/O, so it is tested without QEMU.

Block nodes and devices are emitted as JSON (``-blockdev '{...}'``, ``-device '{...}'``), so no
user string is ever parsed as QEMU options: a filename ``a,read-only=on`` stays a filename
(qemu-facts.md S5). The few QemuOpts strings left (chardev paths, ``-boot``) carry only paths
blockctl chose or validated, with commas doubled as QEMU documents.
Node names and device ids are generated (``drv0``, ``disk0``), never taken from the user.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

from blockctl._images import ImageLayer
from blockctl._qmp.models import (
    BlockdevOptions,
    CacheOptions,
    FileOptions,
    FormatOptions,
    IscsiOptions,
    NbdOptions,
    NfsOptions,
    SecretObject,
    node_json,
)
from blockctl.errors import ConfigError
from blockctl.types import (
    Accel,
    Aio,
    BootConfig,
    DeprecatedInput,
    DetectZeroes,
    Drive,
    Interface,
    IscsiSource,
    MachineConfig,
    Media,
    drive_slot,
    is_pcie_machine,
)

Json = dict[str, Any]


def qemu_opt_escape(value: str) -> str:
    """Escape a value for a QemuOpts string: a comma is written as two (qemu-system(1))."""
    return value.replace(",", ",,")


@dataclass(frozen=True, slots=True, kw_only=True)
class DriveSource:
    """What preflight learnt about a drive's image on disk.

    ``chain`` is the image and its backing files (top first); ``block_device`` says to use
    the ``host_device`` protocol driver (``host_cdrom`` for a cdrom drive when ``cd_drive``:
    the device answers as a CD drive); ``overlay`` is the throwaway qcow2 for ``snapshot``.
    """

    chain: tuple[ImageLayer, ...]
    block_device: bool = False
    #: The block device is a CD drive: the kernel answers its CDROM_DRIVE_STATUS ioctl (the
    #: test QEMU's own probe makes). A loop device does not (EINVAL), and QEMU's host_cdrom
    #: reports such a device empty ("No medium found"): it stays host_device.
    cd_drive: bool = False
    overlay: Path | None = None
    #: A vhost-user-blk drive: the socket its qemu-storage-daemon serves it on.
    vhost_socket: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VhostPlan:
    """The qemu-storage-daemon side of a vhost-user-blk drive: its nodes (bottom-up), its
    export of the top one on ``socket``, and the chardev QEMU connects to it with."""

    nodes: tuple[BlockdevOptions, ...]
    export: Json
    socket: Path
    chardev_id: str

    def chardev_option(self) -> str:
        """QEMU's ``-chardev`` (a client socket: the daemon listens)."""
        return f"socket,id={self.chardev_id},path={qemu_opt_escape(str(self.socket))}"

    def chardev_add(self) -> Json:
        """The same chardev as ``chardev-add`` arguments (hot-plug)."""
        return {
            "id": self.chardev_id,
            "backend": {
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": str(self.socket)}},
                    "server": False,
                },
            },
        }


def daemon_argv(binary: str, plan: VhostPlan, *, qmp_fd: int, monitor: Path) -> list[str]:
    """The qemu-storage-daemon command line for one vhost-user-blk drive: its nodes and
    export as JSON (no user string parsed as options), QMP on the socketpair end ``qmp_fd``
    (the launcher's) and on the listening socket ``monitor`` (other processes')."""
    argv = [binary]
    for node in plan.nodes:
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--export", json.dumps(plan.export)]
    argv += ["--chardev", f"socket,id=qmp0,fd={qmp_fd}", "--monitor", "chardev=qmp0"]
    argv += [
        "--chardev",
        f"socket,id=qmp1,path={qemu_opt_escape(str(monitor))},server=on,wait=off",
        "--monitor",
        "chardev=qmp1",
    ]
    return argv


@dataclass(frozen=True, slots=True, kw_only=True)
class DrivePlan:
    """The -blockdev nodes (bottom-up, as QEMU needs them) and the -device of one drive."""

    index: int
    device_id: str
    top_node: str | None
    nodes: tuple[BlockdevOptions, ...]
    device: Json
    #: ``secret`` objects the nodes name (an iSCSI CHAP password), made before them.
    objects: tuple[SecretObject, ...] = ()
    #: A vhost-user-blk drive: what its qemu-storage-daemon serves (``nodes`` is then empty:
    #: QEMU has none of the drive's nodes, only the device and its chardev).
    vhost: VhostPlan | None = None

    def record_nodes(self) -> tuple[Json, ...]:
        """The nodes as the plain JSON a drive's record keeps."""
        return tuple(node_json(n) for n in self.nodes)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleFd:
    """The serial console is a socket fd blockctl holds the other end of."""

    fd: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleSocket:
    """The serial console is a listening unix socket (for VMs that outlive the controller),
    with everything the guest prints also kept in ``log``."""

    path: Path
    log: Path


def _cache_opts(drive: Drive) -> CacheOptions:
    return {"direct": drive.cache.direct, "no-flush": drive.cache.no_flush}


def protocol_node(
    name: str,
    filename: str,
    drive: Drive,
    *,
    block_device: bool,
    read_only: bool,
    cd_drive: bool = False,
) -> FileOptions:
    # A host CD drive under a cdrom drive is host_cdrom: QEMU asks the drive whether a disc
    # is in and passes the guest's eject and tray lock on to it.
    driver: Literal["file", "host_device", "host_cdrom"] = (
        "file"
        if not block_device
        else "host_cdrom"
        if cd_drive and drive.media is Media.CDROM
        else "host_device"
    )
    node: FileOptions = {
        "driver": driver,
        "node-name": name,
        "filename": filename,
        "cache": _cache_opts(drive),
        "discard": drive.discard.value,
        "read-only": read_only,
    }
    if drive.aio is not Aio.THREADS:
        node["aio"] = drive.aio.value
    if read_only:
        # Lets a later block-commit reopen a backing file read-write (as libvirt does).
        node["auto-read-only"] = True
    return node


def _format_node(
    name: str,
    fmt: str,
    file_node: str,
    drive: Drive,
    *,
    backing: str | None,
    has_backing_field: bool,
    read_only: bool,
    top: bool,
) -> FormatOptions:
    node: FormatOptions = {
        "driver": fmt,
        "node-name": name,
        "file": file_node,
        "cache": _cache_opts(drive),
        "discard": drive.discard.value,
        "read-only": read_only,
    }
    if has_backing_field:
        # Explicit even when null: QEMU must not open a backing file named in the header.
        node["backing"] = backing
    if top and drive.detect_zeroes is not DetectZeroes.OFF:
        node["detect-zeroes"] = drive.detect_zeroes.value
    return node


def _supports_backing(fmt: str) -> bool:
    return fmt in ("qcow2", "qed", "vmdk")


def secret_id(node_name: str) -> str:
    """The id of the ``secret`` object holding the CHAP password of iSCSI node ``node_name``."""
    return f"{node_name}-secret"


def _iscsi_node(name: str, drive: Drive) -> tuple[IscsiOptions, tuple[SecretObject, ...]]:
    assert drive.iscsi is not None
    source = drive.iscsi
    node: IscsiOptions = {
        "driver": "iscsi",
        "node-name": name,
        "transport": "tcp",
        "portal": source.portal,
        "target": source.target,
        "lun": source.lun,
        "cache": _cache_opts(drive),
        "read-only": drive.read_only,
    }
    if source.initiator_name is not None:
        node["initiator-name"] = source.initiator_name
    objects: tuple[SecretObject, ...] = ()
    if source.password_file is not None:
        assert source.user is not None  # IscsiSource: CHAP has both or neither
        secret = chap_secret(name, source)
        node["user"] = source.user
        node["password-secret"] = secret["id"]
        objects = (secret,)
    return node, objects


def chap_secret(node_name: str, source: IscsiSource) -> SecretObject:
    """The ``secret`` object holding the CHAP password of iSCSI node ``node_name``: QEMU
    reads the password from the file itself, so only the file's name is sent."""
    assert source.password_file is not None
    return password_secret(secret_id(node_name), str(Path(source.password_file).absolute()))


def password_secret(object_id: str, password_file: str) -> SecretObject:
    """The ``secret`` object ``object_id`` QEMU reads from ``password_file`` (a journal
    record names the file, never the password)."""
    return {"qom-type": "secret", "id": object_id, "file": password_file, "format": "raw"}


def _nfs_node(name: str, drive: Drive) -> NfsOptions:
    assert drive.nfs is not None
    source = drive.nfs
    node: NfsOptions = {
        "driver": "nfs",
        "node-name": name,
        "server": {"type": "inet", "host": source.server},
        "path": source.path,
        "cache": _cache_opts(drive),
        "read-only": drive.read_only,
    }
    if source.user is not None:
        node["user"] = source.user
    if source.group is not None:
        node["group"] = source.group
    if source.readahead_size is not None:
        node["readahead-size"] = source.readahead_size
    return node


def remote_file_node(name: str, drive: Drive) -> tuple[BlockdevOptions, tuple[SecretObject, ...]]:
    """The protocol node of a drive on an iSCSI LUN or an NFS image (QEMU's own initiator or
    NFS client), with the ``secret`` objects it needs: the same node a VM would open."""
    if drive.iscsi is not None:
        return _iscsi_node(name, drive)
    if drive.nfs is not None:
        return _nfs_node(name, drive), ()
    raise ConfigError("drive", "an iSCSI LUN or an NFS image was expected")


def plan_drive(
    i: int, drive: Drive, source: DriveSource | None, machine: str, slot: tuple[int, int] | None
) -> DrivePlan:
    """The nodes and device for drive ``i``; ``source`` is None only for an empty cdrom."""
    nodes: list[BlockdevOptions] = []
    objects: tuple[SecretObject, ...] = ()
    top: str | None = None
    remote = drive.nbd is not None or drive.iscsi is not None or drive.nfs is not None
    if remote and drive.format is not None:
        # The image's header is on the server: no chain was read, so a qcow2 over NBD, iSCSI
        # or NFS is opened with backing null rather than whatever its header names.
        if drive.iscsi is not None:
            iscsi, objects = _iscsi_node(f"drv{i}-file", drive)
            nodes.append(iscsi)
        elif drive.nfs is not None:
            nodes.append(_nfs_node(f"drv{i}-file", drive))
        else:
            assert drive.nbd is not None
            nbd: NbdOptions = {
                "driver": "nbd",
                "node-name": f"drv{i}-file",
                "server": {"type": "unix", "path": str(drive.nbd.socket)},
                "export": drive.nbd.export,
                "cache": _cache_opts(drive),
                "read-only": drive.read_only,
            }
            if drive.nbd.reconnect_delay:
                nbd["reconnect-delay"] = drive.nbd.reconnect_delay
            nodes.append(nbd)
        nodes.append(
            _format_node(
                f"drv{i}",
                drive.format.value,
                f"drv{i}-file",
                drive,
                backing=None,
                has_backing_field=_supports_backing(drive.format.value),
                read_only=drive.read_only,
                top=True,
            )
        )
        top = f"drv{i}"
        if drive.copy_on_read:
            nodes.append({"driver": "copy-on-read", "node-name": f"drv{i}-cor", "file": top})
            top = f"drv{i}-cor"
    elif source is not None:
        chain = source.chain
        # Bottom-up: a node can only reference nodes defined before it.
        below: str | None = None
        for depth in range(len(chain) - 1, -1, -1):
            layer = chain[depth]
            name = f"drv{i}" if depth == 0 else f"drv{i}-b{depth}"
            is_backing_layer = depth > 0
            read_only = drive.read_only or is_backing_layer or drive.snapshot
            nodes.append(
                protocol_node(
                    f"{name}-file",
                    layer.filename,
                    drive,
                    block_device=source.block_device and depth == 0,
                    cd_drive=source.cd_drive and depth == 0,
                    read_only=read_only,
                )
            )
            nodes.append(
                _format_node(
                    name,
                    layer.format.value,
                    f"{name}-file",
                    drive,
                    backing=below,
                    has_backing_field=_supports_backing(layer.format.value),
                    read_only=read_only,
                    top=depth == 0 and not drive.snapshot,
                )
            )
            below = name
        top = f"drv{i}"
        if drive.snapshot:
            if source.overlay is None:
                raise ConfigError(f"drive[{i}].snapshot", "no overlay was created")
            nodes.append(
                protocol_node(
                    f"drv{i}-snap-file",
                    str(source.overlay),
                    drive,
                    block_device=False,
                    read_only=False,
                )
            )
            nodes.append(
                _format_node(
                    f"drv{i}-snap",
                    "qcow2",
                    f"drv{i}-snap-file",
                    drive,
                    backing=top,
                    has_backing_field=True,
                    read_only=False,
                    top=True,
                )
            )
            top = f"drv{i}-snap"
        if drive.copy_on_read:
            nodes.append({"driver": "copy-on-read", "node-name": f"drv{i}-cor", "file": top})
            top = f"drv{i}-cor"
    device_id = f"disk{i}"
    if drive.vhost_user_blk is not None:
        return _vhost_plan(i, device_id, drive, source, top, nodes)
    return DrivePlan(
        index=i,
        device_id=device_id,
        top_node=top,
        nodes=tuple(nodes),
        device=_device(device_id, drive, top, machine, slot),
        objects=objects,
    )


def _vhost_plan(
    i: int,
    device_id: str,
    drive: Drive,
    source: DriveSource | None,
    top: str | None,
    nodes: Sequence[BlockdevOptions],
) -> DrivePlan:
    """The nodes built for the image go to the daemon; QEMU gets the device and a chardev."""
    if source is None or source.vhost_socket is None or top is None:
        raise ConfigError(f"drive[{i}].vhost_user_blk", "no daemon socket was planned")
    export: Json = {
        "type": "vhost-user-blk",
        "id": f"drv{i}-export",
        "node-name": top,
        "addr": {"type": "unix", "path": str(source.vhost_socket)},
        "writable": not drive.read_only,
    }
    vhost = VhostPlan(
        nodes=tuple(nodes), export=export, socket=source.vhost_socket, chardev_id=f"drv{i}-vhost"
    )
    # The guest-visible write cache is the device's (config-wce), fixed at realize as for
    # virtio-blk; direct and no-flush are the daemon's nodes' options.
    device: Json = {
        "driver": "vhost-user-blk-pci",
        "id": device_id,
        "chardev": vhost.chardev_id,
        "config-wce": drive.cache.write_cache,
    }
    if drive.bootindex is not None:
        device["bootindex"] = drive.bootindex
    return DrivePlan(
        index=i, device_id=device_id, top_node=None, nodes=(), device=device, vhost=vhost
    )


def _device(
    device_id: str, drive: Drive, top: str | None, machine: str, slot: tuple[int, int] | None
) -> Json:
    cdrom = drive.media is Media.CDROM
    device: Json = {"id": device_id}
    if drive.interface is Interface.VIRTIO:
        device["driver"] = "virtio-blk-pci"
    elif drive.interface is Interface.SCSI:
        kind = (
            "scsi-cd"
            if cdrom
            else drive.passthrough.device_driver
            if drive.passthrough
            else "scsi-hd"
        )
        device.update(driver=kind, bus=f"scsi{(slot or (0, 0))[0]}.0")
        if slot is not None:
            device.update({"scsi-id": slot[1], "lun": 0})
        # Without a slot (hot-plug), QEMU picks a free SCSI id on the bus.
    elif drive.interface is Interface.IDE:
        bus, unit = slot or (0, 0)
        device.update(driver="ide-cd" if cdrom else "ide-hd", bus=f"ide.{bus}")
        if not is_pcie_machine(machine):
            device["unit"] = unit
    else:
        if is_pcie_machine(machine):
            raise ConfigError(
                "drive.interface",
                "floppy drives need machine type 'pc' (q35 has no floppy controller)",
            )
        device.update(driver="floppy", unit=(slot or (0, 0))[1])
    if top is not None:
        device["drive"] = top
    if not cdrom and drive.interface is not Interface.FLOPPY and not drive.passthrough:
        # The guest-visible write cache is part of the cache mode and fixed at realize.
        # (scsi-block and scsi-generic have none: the guest talks to the LUN's own cache.)
        device["write-cache"] = "on" if drive.cache.write_cache else "off"
    if drive.serial is not None:
        device["serial"] = drive.serial
    if drive.bootindex is not None:
        device["bootindex"] = drive.bootindex
    # On the device, not the node: the policy is the guest's view of a failed request.
    if drive.rerror is not None:
        device["rerror"] = drive.rerror.value
    if drive.werror is not None:
        device["werror"] = drive.werror.value
    return device


def assign_slots(drives: Sequence[Drive], machine: str) -> list[tuple[int, int] | None]:
    """Explicit slots as given; IDE, SCSI and floppy drives without one get the next free slot."""
    slots: list[tuple[int, int] | None] = [drive_slot(d, machine) for d in drives]
    taken = {(d.interface, s) for d, s in zip(drives, slots, strict=True) if s is not None}
    limits = {
        Interface.IDE: (6, 1) if is_pcie_machine(machine) else (2, 2),
        Interface.SCSI: (1, 256),
        Interface.FLOPPY: (1, 2),
    }
    for i, drive in enumerate(drives):
        if slots[i] is not None or drive.interface is Interface.VIRTIO:
            continue
        buses, units = limits[drive.interface]
        free = next(
            (
                (b, u)
                for b in range(buses)
                for u in range(units)
                if (drive.interface, (b, u)) not in taken
            ),
            None,
        )
        if free is None:
            raise ConfigError(
                f"drive[{i}]", f"no free {drive.interface.value} slot left on {machine}"
            )
        slots[i] = free
        taken.add((drive.interface, free))
    return slots


def over_backing(
    plan: DrivePlan, image_node: str, backing: Sequence[Mapping[str, Any]]
) -> DrivePlan:
    """``plan`` with ``backing`` below its image node, which backs onto the last of them."""
    image = next((n for n in plan.nodes if n["node-name"] == image_node), None)
    if image is None or image["driver"] != "qcow2" or image.get("backing", "") is not None:
        raise ConfigError(
            "drive.file", "a run-time backing node needs a qcow2 image with no backing file"
        )
    top = str(backing[-1]["node-name"])
    # The backing nodes are the caller's (an NBD client with options blockctl's builders do
    # not make): sent as given.
    below = [cast(BlockdevOptions, dict(n)) for n in backing]
    nodes = [cast(BlockdevOptions, {**n, "backing": top}) if n is image else n for n in plan.nodes]
    return replace(plan, nodes=(*below, *nodes))


def plan_drives(config: MachineConfig, sources: Mapping[int, DriveSource]) -> tuple[DrivePlan, ...]:
    slots = assign_slots(config.drives, config.machine)
    return tuple(
        plan_drive(i, d, sources.get(i), config.machine, slots[i])
        for i, d in enumerate(config.drives)
    )


def boot_option(boot: BootConfig) -> str:
    parts = []
    if boot.order is not None:
        parts.append(f"order={boot.order}")
    if boot.once is not None:
        parts.append(f"once={boot.once}")
    if boot.menu is not None:
        parts.append(f"menu={'on' if boot.menu else 'off'}")
    if boot.splash is not None:
        parts.append(f"splash={qemu_opt_escape(str(boot.splash))}")
    if boot.splash_time is not None:
        parts.append(f"splash-time={boot.splash_time}")
    if boot.strict is not None:
        parts.append(f"strict={'on' if boot.strict else 'off'}")
    return ",".join(parts)


#: The id of the guest's RAM when it is shared memory (``MachineConfig.shared_memory``).
SHARED_RAM_ID = "ram0"

#: The virtio-serial port name qemu-ga looks for (and every management stack uses).
AGENT_PORT_NAME = "org.qemu.guest_agent.0"


def agent_args(socket_path: Path) -> list[str]:
    """A virtio-serial controller and the guest agent's port, backed by a listening unix
    socket (``wait=off``: QEMU does not wait for a client; one client at a time is served)."""
    return [
        "-device",
        json.dumps({"driver": "virtio-serial-pci", "id": "vser0"}),
        "-chardev",
        f"socket,id=qga0,path={qemu_opt_escape(str(socket_path))},server=on,wait=off",
        "-device",
        json.dumps(
            {
                "driver": "virtserialport",
                "bus": "vser0.0",
                "chardev": "qga0",
                "name": AGENT_PORT_NAME,
                "id": "qga0-port",
            }
        ),
    ]


def pool_args(sockets: Sequence[Path]) -> list[str]:
    """One QMP monitor per socket (chardev ``qmp-pool-N``), each serving one client at a
    time (``wait=off``: QEMU does not wait for a client to start). QEMU has no limit on the
    number of monitors; every monitor gets every event, and QEMU runs their commands one at
    a time in its main loop."""
    argv: list[str] = []
    for i, path in enumerate(sockets):
        argv += [
            "-chardev",
            f"socket,id=qmp-pool-{i},path={qemu_opt_escape(str(path))},server=on,wait=off",
            "-mon",
            f"chardev=qmp-pool-{i},mode=control",
        ]
    return argv


#: Device ids of the PCIe root ports blockctl makes at launch (hp0, hp1, ...): the port's
#: bus has the same name, which a hot-plugged device names as its ``bus``.
HOTPLUG_PORT_PREFIX = "hp"


def hotplug_port_args(count: int) -> list[str]:
    """``count`` PCIe root ports (q35), each a hot-plug slot for one PCI device. Each port
    needs its own chassis number; the guest's ACPI hot-plug handles them (no 5 s pciehp wait)."""
    argv: list[str] = []
    for i in range(count):
        port = {"driver": "pcie-root-port", "id": f"{HOTPLUG_PORT_PREFIX}{i}", "chassis": i + 1}
        argv += ["-device", json.dumps(port)]
    return argv


def build_argv(
    *,
    binary: str,
    config: MachineConfig,
    label: str,
    accel: Accel,
    plans: Sequence[DrivePlan],
    qmp_fd: int,
    monitor_path: Path | None,
    console: ConsoleFd | ConsoleSocket | None,
    agent_socket: Path | None = None,
    monitor_pool: Sequence[Path] = (),
) -> list[str]:
    """The full qemu-system command line (``agent_socket``: the guest agent's channel;
    ``monitor_pool``: more QMP monitors, one listening socket each, see :func:`pool_args`)."""
    argv = [
        binary,
        "-name",
        f"guest={qemu_opt_escape(label)},debug-threads=on",
        "-machine",
        config.machine,
        "-accel",
        accel.value,
        "-m",
        f"{config.memory_mib}M",
        "-smp",
        str(config.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    if config.shared_memory:
        # Guest RAM as a shared memfd: a vhost-user backend maps the guest's buffers itself.
        argv[argv.index("-machine") + 1] += f",memory-backend={SHARED_RAM_ID}"
        ram = {
            "qom-type": "memory-backend-memfd",
            "id": SHARED_RAM_ID,
            "size": config.memory_mib << 20,
            "share": True,
        }
        argv += ["-object", json.dumps(ram)]
    if config.deprecated_input is not DeprecatedInput.ACCEPT:
        argv += ["-compat", f"deprecated-input={config.deprecated_input.value}"]
    if accel is Accel.KVM:
        argv += ["-cpu", "host"]
    if config.no_shutdown:
        argv.append("-no-shutdown")
    if config.firmware is not None:
        argv += ["-bios", str(config.firmware)]
    if config.kernel is not None:
        argv += ["-kernel", str(config.kernel)]
    if config.initrd is not None:
        argv += ["-initrd", str(config.initrd)]
    if config.append is not None:
        argv += ["-append", config.append]
    if config.boot is not None and (opt := boot_option(config.boot)):
        argv += ["-boot", opt]
    argv += ["-chardev", f"socket,id=qmp0,fd={qmp_fd}", "-mon", "chardev=qmp0,mode=control"]
    if monitor_path is not None:
        argv += [
            "-chardev",
            f"socket,id=qmp1,path={qemu_opt_escape(str(monitor_path))},server=on,wait=off",
            "-mon",
            "chardev=qmp1,mode=control",
        ]
    argv += pool_args(monitor_pool)
    if isinstance(console, ConsoleFd):
        argv += ["-chardev", f"socket,id=ser0,fd={console.fd}", "-serial", "chardev:ser0"]
    elif isinstance(console, ConsoleSocket):
        argv += [
            "-chardev",
            f"socket,id=ser0,path={qemu_opt_escape(str(console.path))},server=on,wait=off,"
            f"logfile={qemu_opt_escape(str(console.log))}",
            "-serial",
            "chardev:ser0",
        ]
    argv += hotplug_port_args(config.hotplug_slots or 0)
    scsi_buses = sorted(
        {
            int(p.device["bus"][len("scsi") :].split(".")[0])
            for p in plans
            if p.device["driver"].startswith("scsi-")
        }
    )
    for bus in scsi_buses:
        argv += ["-device", json.dumps({"driver": "virtio-scsi-pci", "id": f"scsi{bus}"})]
    for plan in plans:
        for secret in plan.objects:
            argv += ["-object", json.dumps(secret)]
        for node in plan.nodes:
            argv += ["-blockdev", json.dumps(node)]
        if plan.vhost is not None:
            argv += ["-chardev", plan.vhost.chardev_option()]
        argv += ["-device", json.dumps(plan.device)]
    if agent_socket is not None:
        argv += agent_args(agent_socket)
    return argv
