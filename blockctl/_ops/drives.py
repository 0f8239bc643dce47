"""Drives of a running guest: hot-plug, unplug, media, live cache mode, resize, throttling.

Node and device names are generated (``drvN…`` / ``diskN``) as at launch, never taken from the
user, and the options blockctl used for each node are kept in the VM's drive registry so that a
``blockdev-reopen`` can send the complete option set.

Unplug is a state machine (qemu-facts.md F6, guest.md §4)::

    present ──device_del──▶ unplug requested ──DEVICE_DELETED(device=id)──▶ device gone
       │                        │ deadline passes                              │
       │                        ▼                                              ▼
       │                   PENDING: nodes untouched           blockdev-del top-down ──▶ REMOVED
       └─ a repeat call from PENDING sends device_del again and waits again.

``blockdev-del`` is never sent before the matching ``DEVICE_DELETED``: QEMU would refuse it
("Node … is in use") and, worse, a guest that finishes the unplug later would find it gone.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from blockctl import _proc, _storage_daemon
from blockctl._argv import DrivePlan, DriveSource, over_backing, plan_drive
from blockctl._graph import BlockGraph, NodeRole, image_filename
from blockctl._log import get_logger
from blockctl._machine import (
    VM,
    LaunchedVM,
    check_iscsi,
    check_nbd,
    daemon_journal_dir,
    inspect_drive,
    vhost_image,
)
from blockctl._ops import conflicts
from blockctl._ops.nodes import delete_nodes, delete_secrets, read_graph, refuse_passed_through
from blockctl._qmp import wire
from blockctl._qmp.models import BlockDevice, BlockNode, CacheFlags, IoLimits
from blockctl._registry import DriveRecord, this_process
from blockctl.errors import (
    BlockctlError,
    CommandFailed,
    ConfigError,
    Conflict,
    DriveNotFound,
    InStorageDaemon,
    NoFreeSlot,
    Unsupported,
)
from blockctl.types import (
    MAX_HOTPLUG_SLOTS,
    CacheMode,
    Drive,
    ImageFormat,
    Interface,
    Media,
    is_pcie_machine,
)

_log = get_logger()

#: QEMU's id syntax (util/id.c: id_wellformed).
_DEVICE_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_OURS = re.compile(r"^(?:drv|disk)(\d+)")
_THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


class UnplugState(enum.StrEnum):
    REMOVED = "removed"  #: DEVICE_DELETED arrived and every node was deleted
    PENDING = "pending"  #: the guest has not released the device yet; nodes untouched


@dataclass(frozen=True, slots=True, kw_only=True)
class UnplugResult:
    device_id: str
    state: UnplugState
    deleted_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class VhostUserInfo:
    """The qemu-storage-daemon serving a vhost-user-blk disk, as its record and the host's
    process table have it (its QMP monitor is not asked: blockctl does not route to it yet)."""

    socket: str
    chardev: str
    daemon_pid: int | None
    #: The recorded process still runs (the same pid and start time).
    daemon_running: bool
    monitor: str | None
    file: str | None
    format: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "socket": self.socket,
            "chardev": self.chardev,
            "daemon_pid": self.daemon_pid,
            "daemon_running": self.daemon_running,
            "monitor": self.monitor,
            "file": self.file,
            "format": self.format,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class DriveInfo:
    """One drive of a VM as QEMU reports it, with what blockctl knows about it."""

    device_id: str
    device_driver: str | None
    removable: bool
    tray_open: bool | None
    top_node: str | None
    chain: tuple[BlockNode, ...]  # top first, down the backing chain
    pending_unplug: bool
    #: Throttling lives on the device's block backend: query-block reports it, not the nodes.
    io_limits: IoLimits | None
    #: The cache flags of the device's medium as ``query-block`` reports them. Only there is
    #: ``writeback`` the guest-visible write cache (WCE) of the block backend:
    #: ``query-named-block-nodes`` reports ``writeback: true`` for every node, whatever the
    #: device does (issue 16, defect 2).
    device_cache: CacheFlags | None
    #: The image file of each ``chain`` entry (the block graph's). QEMU's own name for a node
    #: (``BlockNode.file``) is a ``json:`` description when it cannot be a plain filename,
    #: e.g. when the image header names its backing file by a relative path.
    filenames: tuple[str | None, ...] = ()
    #: QEMU's I/O status of the device (``ok``, ``failed``, ``nospace``): ``failed`` or
    #: ``nospace`` on the drive whose failed request paused the VM (rerror/werror ``stop``
    #: or ``enospc``). None for a device QEMU tracks no I/O status for.
    io_status: str | None = None
    #: A vhost-user-blk disk: its qemu-storage-daemon (QEMU has none of its nodes, so
    #: ``chain`` is empty and ``top_node`` None: the image lives in the daemon).
    vhost_user: VhostUserInfo | None = None

    @property
    def io_error(self) -> bool:
        """Whether this drive's last request failed under a policy that pauses the VM."""
        return self.io_status not in (None, "ok")

    @property
    def format(self) -> str | None:
        formats = [n.driver for n in self.chain if n.driver not in ("copy-on-read", "throttle")]
        return formats[0] if formats else None

    @property
    def file(self) -> str | None:
        """The image file of the top layer (not a ``json:`` description of the chain)."""
        if self.filenames and self.filenames[0] is not None:
            return self.filenames[0]
        return self.chain[0].file if self.chain else None

    @property
    def size(self) -> int | None:
        return self.chain[0].virtual_size if self.chain else None

    @property
    def read_only(self) -> bool | None:
        return self.chain[0].read_only if self.chain else None

    @property
    def cache(self) -> CacheFlags | None:
        """The device's cache flags: write cache from the block backend (query-block),
        ``direct``/``no_flush`` from its top node."""
        return self.device_cache

    def to_json(self) -> dict[str, Any]:
        cache = self.cache
        limits = self.io_limits
        return {
            "device": self.device_id,
            "driver": self.device_driver,
            "removable": self.removable,
            "tray_open": self.tray_open,
            "node": self.top_node,
            "format": self.format,
            "file": self.file,
            "size": self.size,
            "read_only": self.read_only,
            "cache": None
            if cache is None
            else {"writeback": cache.writeback, "direct": cache.direct, "no_flush": cache.no_flush},
            "throttle": None
            if limits is None
            else {k: getattr(limits, k) for k in (*_THROTTLE_KEYS, "group")},
            "chain": [
                {"node": n.node_name, "driver": n.driver, "file": n.file, "filename": f}
                for n, f in zip(
                    self.chain,
                    self.filenames or (None,) * len(self.chain),
                    strict=True,
                )
            ],
            "pending_unplug": self.pending_unplug,
            "io_status": self.io_status,
            "vhost_user": None if self.vhost_user is None else self.vhost_user.to_json(),
        }


# Section: reading


async def list_drives(vm: VM) -> tuple[DriveInfo, ...]:
    """Every drive device of the VM, reconciled with blockctl's registry.

    Each drive's ``chain`` is the block graph's (:class:`~blockctl._graph.BlockGraph`, the one
    ``blockctl chain`` shows): the filters on top, then the format node and every backing
    layer's format node, top first. Protocol (``file``) nodes are not layers.
    """
    known = dict(vm.registry.drives)  # (what another client writes meanwhile is kept)
    devices = await vm.block_devices()
    details = await wire.query_named_block_node_details(vm.session)
    nodes = {d.node.node_name: d.node for d in details}
    vhost = await _vhost_devices(vm, known)
    vm.registry.reconcile([*(d.device_id or "" for d in devices), *vhost], nodes, known)
    graph = BlockGraph.from_qmp(details, devices, vm.registry.backing_hints())
    drives = []
    for dev in devices:
        device_id = dev.device_id or dev.device
        record = vm.registry.drives.get(device_id)
        chain = _chain(graph, device_id) if dev.inserted else ()
        drives.append(
            DriveInfo(
                device_id=device_id,
                device_driver=None if record is None else str(record.device.get("driver")),
                removable=dev.removable,
                tray_open=dev.tray_open,
                top_node=dev.inserted.node_name if dev.inserted else None,
                chain=tuple(nodes[n] for n in chain),
                filenames=tuple(_filename(graph, nodes, n) for n in chain),
                pending_unplug=record.pending_unplug if record else False,
                io_limits=dev.inserted.io_limits if dev.inserted else None,
                device_cache=dev.inserted.cache if dev.inserted else None,
                io_status=dev.io_status,
            )
        )
    for device_id, chardev in vhost.items():
        record = vm.registry.drives.get(device_id)
        if record is None or record.daemon is None:
            continue
        daemon = record.daemon
        pid = daemon.get("pid")
        drives.append(
            DriveInfo(
                device_id=device_id,
                device_driver=VHOST_USER_BLK_DEVICE,
                removable=False,
                tray_open=None,
                top_node=None,
                chain=(),
                pending_unplug=record.pending_unplug,
                io_limits=None,
                device_cache=None,
                vhost_user=VhostUserInfo(
                    socket=str(daemon.get("socket")),
                    chardev=chardev,
                    daemon_pid=pid,
                    daemon_running=_proc.process_alive(pid, daemon.get("pid_start")),
                    monitor=daemon.get("monitor"),
                    file=daemon.get("file"),
                    format=daemon.get("format"),
                ),
            )
        )
    # Devices whose unplug is pending but that QEMU no longer lists under query-block do not
    # exist: reconcile() above already dropped them.
    return tuple(drives)


#: QEMU's device for a vhost-user-blk disk.
VHOST_USER_BLK_DEVICE = "vhost-user-blk-pci"


async def _vhost_devices(vm: VM, records: Mapping[str, DriveRecord]) -> dict[str, str]:
    """The vhost-user-blk devices QEMU has (QOM; ``query-block`` does not list them) among
    the drives blockctl recorded with a daemon: device id → the id of its chardev."""
    if not any(r.daemon is not None for r in records.values()):
        return {}
    found = {}
    peripherals = await wire.qom_children(vm.session, "/machine/peripheral")
    for device_id, kind in peripherals.items():
        if kind == VHOST_USER_BLK_DEVICE and device_id in records:
            found[device_id] = str(await vm.qom_get(f"/machine/peripheral/{device_id}", "chardev"))
    return found


def _filename(graph: BlockGraph, nodes: Mapping[str, BlockNode], name: str) -> str | None:
    """A node's image file: the graph's, else read from QEMU's name for it (the graph leaves
    it unset when two protocol nodes open one file, e.g. two chains sharing a base)."""
    found = graph.nodes[name].filename
    return found if found is not None else image_filename(nodes[name].file)


def _chain(graph: BlockGraph, device_id: str) -> tuple[str, ...]:
    """The filters above the device's format node, then its backing chain (format nodes)."""
    device = graph.devices.get(device_id)
    if device is None or device.root is None or device.root not in graph.nodes:
        return ()
    names: list[str] = []
    node = graph.nodes[device.root]
    while node.role is NodeRole.FILTER and node.file_child is not None:
        names.append(node.name)
        if node.file_child not in graph.nodes:
            break
        node = graph.nodes[node.file_child]
    names.extend(n.name for n in graph.chain_of(device_id) if n.name not in names)
    return tuple(names)


async def _find(vm: VM, device_id: str) -> tuple[BlockDevice | None, DriveRecord | None]:
    devices = {d.device_id: d for d in await vm.block_devices()}
    return devices.get(device_id), vm.registry.drives.get(device_id)


async def _next_index(vm: VM) -> int:
    names = [n.node_name for n in await vm.block_nodes()]
    names += [d.device_id or "" for d in await vm.block_devices()]
    names += list(await wire.qom_list(vm.session, "/machine/peripheral"))
    names += list(vm.registry.drives)
    used = [int(m.group(1)) for n in names if (m := _OURS.match(n))]
    return max(used, default=-1) + 1


# Section: hot-plug slots

#: Slots on the root bus of a 'pc' machine (i440FX): QEMU places hot-plugged PCI devices there.
PCI_ROOT_SLOTS = 32
_PCI_HOTPLUGGED = ("virtio-blk-pci", "virtio-scsi-pci", "vhost-user-blk-pci")


@dataclass(frozen=True, slots=True, kw_only=True)
class HotplugSlots:
    """Where the VM's hot-plugged PCI devices (virtio disks, virtio-scsi controllers) go.

    On q35 (``pcie``) each goes into a PCIe root port: ``ports`` maps every port to the device
    in it (None: free). On 'pc' QEMU places them on the root bus: ``ports`` is empty and
    ``free_count`` is the number of its empty slots.
    """

    pcie: bool
    ports: tuple[tuple[str, str | None], ...]
    free_count: int

    @property
    def free(self) -> tuple[str, ...]:
        return tuple(port for port, device in self.ports if device is None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "pcie-root-port" if self.pcie else "pci",
            "free": self.free_count,
            "ports": dict(self.ports),
        }


async def hotplug_slots(vm: VM) -> HotplugSlots:
    """The VM's hot-plug slots as QEMU has them now (QOM: each device's ``parent_bus``)."""
    if not is_pcie_machine(str(await vm.qom_get("/machine", "type"))):
        used = await wire.pci_root_slots_used(vm.session)
        return HotplugSlots(pcie=False, ports=(), free_count=PCI_ROOT_SLOTS - len(used))
    holders: dict[str, str] = {}
    ports: list[str] = []
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        for name, kind in (await wire.qom_children(vm.session, parent)).items():
            if kind == "pcie-root-port" and parent == "/machine/peripheral":
                ports.append(name)  # a port's bus has the port's id: a device names it
                continue
            bus = str(await vm.qom_get(f"{parent}/{name}", "parent_bus"))
            # "/machine/peripheral/hp0/hp0": the bus of port hp0.
            head, _, _ = bus.rpartition("/")
            if head.startswith("/machine/peripheral/"):
                holders[head.rsplit("/", 1)[1]] = name
    ports.sort(key=lambda p: (len(p), p))
    slots = tuple((port, holders.get(port)) for port in ports)
    return HotplugSlots(pcie=True, ports=slots, free_count=sum(d is None for _, d in slots))


def _no_free_slot(vm: VM, device: Mapping[str, Any], slots: HotplugSlots) -> NoFreeSlot:
    what = f"{vm.name}: no free hot-plug slot for {device.get('id')} ({device['driver']})"
    scsi = (
        "attach disks with --bus scsi (one virtio-scsi controller holds hundreds of disks "
        "on one slot)"
    )
    if not slots.pcie:
        return NoFreeSlot(
            f"{what}: every slot of the PCI root bus is in use. Ways out: {scsi}, or detach a "
            "virtio disk (`blockctl drives` lists them)"
        )
    if not slots.ports:
        return NoFreeSlot(
            f"{what}: this q35 VM has no PCIe root port, and q35's root bus pcie.0 takes no "
            f"hot-plugged device. Ways out: relaunch it with hotplug-slots = N (blockctl makes N "
            f"ports, at most {MAX_HOTPLUG_SLOTS}), or {scsi} on a controller it already has"
        )
    held = ", ".join(f"{port}: {holder}" for port, holder in slots.ports)
    return NoFreeSlot(
        f"{what}: all {len(slots.ports)} PCIe root ports are in use ({held}). Ways out: {scsi}, "
        "detach a device, or relaunch with more ports (hotplug-slots = N, at most "
        f"{MAX_HOTPLUG_SLOTS})"
    )


async def _device_add_placed(vm: VM, device: Mapping[str, Any]) -> None:
    """``device_add``, into a free PCIe root port on q35 (another client may take the port
    first: then the next free one); a full bus becomes :class:`NoFreeSlot` with the ways out."""
    if device["driver"] not in _PCI_HOTPLUGGED:
        await wire.device_add(vm.session, device)
        return
    slots = await hotplug_slots(vm)
    if not slots.pcie:
        try:
            await wire.device_add(vm.session, device)
        except CommandFailed as exc:
            if "no slot/function available" not in str(exc):
                raise
            raise _no_free_slot(vm, device, slots) from exc
        return
    tried: set[str] = set()
    while free := [p for p in slots.free if p not in tried]:
        try:
            await wire.device_add(vm.session, {**device, "bus": free[0]})
            return
        except CommandFailed as exc:
            if "not available" not in str(exc):  # "PCI: slot 0 function 0 not available ..."
                raise
            tried.add(free[0])
            slots = await hotplug_slots(vm)
    raise _no_free_slot(vm, device, slots)


# Section: hot-plug


async def check_hotplug(
    vm: VM, drive: Drive, *, image_roots: Iterable[Path | str] = ()
) -> DriveSource | None:
    """Everything :func:`hotplug` checks before it changes anything (``apply`` checks a whole
    plan with it first): the drive can be hot-plugged, its image is not in use in this VM
    and passes inspection. Returns the inspected chain."""
    if drive.interface in (Interface.IDE, Interface.FLOPPY):
        raise ConfigError(
            "drive.interface",
            f"{drive.interface.value} has no hot-plug; use 'virtio' or 'scsi' (a cdrom's "
            "medium is changed with `blockctl media`)",
        )
    if drive.snapshot:
        raise ConfigError("drive.snapshot", "a throwaway overlay is only made at launch")
    if any(v is not None for v in (drive.bus, drive.unit, drive.index)):
        raise ConfigError("drive.unit", "hot-plugged drives are placed by QEMU")
    if drive.vhost_user_blk is not None:
        await _check_vhost_hotplug(vm)
        return await inspect_drive(vhost_image(drive), "vhost_user_blk.file", roots=image_roots)
    if drive.file is not None or drive.remote_url is not None:
        await _refuse_if_in_use(vm, drive)
    source = None if drive.file is None else await inspect_drive(drive, "file", roots=image_roots)
    if drive.nbd is not None:
        check_nbd(drive, "nbd")
    if drive.iscsi is not None:
        check_iscsi(drive, "iscsi")
    return source


async def _check_vhost_hotplug(vm: VM) -> LaunchedVM:
    """A vhost-user-blk disk is hot-plugged by the process that launched the VM (its daemon
    is that process's child, part of the VM's lifecycle) into a VM whose RAM is shared."""
    if not isinstance(vm, LaunchedVM):
        raise ConfigError(
            "vhost_user_blk",
            f"{vm.name}: a vhost-user-blk disk is hot-plugged by the process that launched the "
            "VM (its qemu-storage-daemon lives and dies with that process); this one attached "
            "to it. Use the launcher's VM object (open_vm), or attach the image as a plain file",
        )
    try:
        backend = str(await vm.qom_get("/machine", "memory-backend"))
        shared = bool(backend) and await vm.qom_get(backend, "share") is True
    except CommandFailed:
        shared = False
    if not shared:
        raise ConfigError(
            "shared_memory",
            f"{vm.name}: its guest RAM is not shared memory, and a vhost-user-blk disk needs it "
            "(the qemu-storage-daemon reads and writes the guest's buffers itself); QEMU cannot "
            "change that while the VM runs. Relaunch the VM with shared-memory = true "
            "(MachineConfig(shared_memory=True)), or attach the image as a plain file",
        )
    return vm


async def _hotplug_vhost(vm: VM, drive: Drive, source: DriveSource | None) -> DriveInfo:
    """Start the drive's daemon, then ``chardev-add`` and ``device_add``; a failure at any
    step undoes the others (shielded): no daemon, chardev or device is left."""
    launched = await _check_vhost_hotplug(vm)
    assert source is not None and drive.vhost_user_blk is not None and drive.format is not None
    index = await _next_index(vm)
    source = replace(source, vhost_socket=_storage_daemon.vhost_socket(launched.run_dir, index))
    plan = plan_drive(index, drive, source, "pc", None)
    assert plan.vhost is not None
    daemon = await launched.daemons.start(plan)
    chardev = False
    try:
        await wire.chardev_add(vm.session, plan.vhost.chardev_add())
        chardev = True
        await _device_add_placed(vm, plan.device)
    except BaseException:
        with anyio.CancelScope(shield=True):
            if chardev:
                with contextlib.suppress(BlockctlError):
                    await wire.chardev_remove(vm.session, plan.vhost.chardev_id)
            await launched.daemons.stop(plan.device_id)
        raise
    record = daemon.record(Path(drive.vhost_user_blk.file).absolute(), drive.format.value)
    vm.registry.put(
        DriveRecord(device_id=plan.device_id, device=plan.device, nodes=(), daemon=record)
    )
    _log.info("blockctl.drive.plugged", vm=vm.name, device=plan.device_id, daemon=daemon.pid)
    return await drive_info(vm, plan.device_id)


async def hotplug(
    vm: VM,
    drive: Drive,
    *,
    image_roots: Iterable[Path | str] = (),
    backing: Sequence[Mapping[str, Any]] = (),
    planned: Callable[[DrivePlan], None] | None = None,
    device_id: str | None = None,
) -> DriveInfo:
    """Add ``drive`` to the running guest: ``blockdev-add`` bottom-up, then ``device_add``.

    ``device_id``: the guest device's id (a letter, then letters, digits, ``-``, ``.``,
    ``_``); None: the next free ``diskN``. A caller that must find its device again (a
    retried fleet attach) fixes it up front.

    The image is inspected first (:func:`blockctl._images.inspect_untrusted`; ``image_roots``
    are allowed roots for its backing files besides ``$BLOCKCTL_IMAGE_ROOTS``). A failure at
    any step removes what this call added, in reverse order (shielded), and re-raises: no node
    or device is leaked.

    ``backing``: nodes (bottom-up) added below the image, the last of which becomes its
    backing node at run time, not named in its header (a live restore's NBD export). The
    image must then be a qcow2 with no backing file; the nodes belong to the drive's record
    and to its rollback like the others.

    ``planned``: called with the drive's plan (its device id and nodes) once it is known,
    before anything is added (a live restore journals what it is about to add there).
    """
    if device_id is not None and not _DEVICE_ID.fullmatch(device_id):
        raise ConfigError(
            "device_id",
            f"{device_id!r} is not a device id: a letter, then letters, digits, '-', '.', '_'",
        )
    source = await check_hotplug(vm, drive, image_roots=image_roots)
    if drive.vhost_user_blk is not None:
        if device_id is not None:
            raise ConfigError("device_id", "a vhost-user-blk disk's device id is not chosen")
        if backing or planned is not None:
            raise ConfigError("backing", "a vhost-user-blk disk's nodes live in its daemon")
        return await _hotplug_vhost(vm, drive, source)
    index = await _next_index(vm)
    machine = str(await vm.qom_get("/machine", "type"))
    plan = plan_drive(index, drive, source, machine, None)
    if backing:
        plan = over_backing(plan, f"drv{index}", backing)
    if device_id is not None:
        plan = replace(plan, device_id=device_id, device={**plan.device, "id": device_id})
    if planned is not None:
        planned(plan)
    record = DriveRecord(device_id=plan.device_id, device=plan.device, nodes=plan.record_nodes())
    # Recorded before QEMU is changed: a process killed after its device_add (before it could
    # write the record) leaves a device whose nodes blockctl knows, to list and unplug.
    await _record_plugging(vm, replace(record, plugging=this_process()))
    added_nodes: list[str] = []
    added_devices: list[str] = []
    added_objects: list[str] = []
    try:
        if drive.interface is Interface.SCSI:
            peripherals = await wire.qom_list(vm.session, "/machine/peripheral")
            if "scsi0" not in peripherals:
                await _device_add_placed(vm, {"driver": "virtio-scsi-pci", "id": "scsi0"})
                added_devices.append("scsi0")
        for secret in plan.objects:
            await wire.secret_add(vm.session, secret)
            added_objects.append(secret["id"])
        for node in plan.nodes:
            await wire.blockdev_add(vm.session, node)
            added_nodes.append(str(node["node-name"]))
        await _device_add_placed(vm, plan.device)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _rollback(vm, added_nodes, added_devices, added_objects)
            vm.registry.remove(plan.device_id)
        raise
    vm.registry.put(record)
    _log.info("blockctl.drive.plugged", vm=vm.name, device=plan.device_id, node=plan.top_node)
    return await drive_info(vm, plan.device_id)


async def _record_plugging(vm: VM, record: DriveRecord) -> None:
    """Write the record of a drive about to be hot-plugged, under an id no record has. A
    record of that id that QEMU no longer has is forgotten first (``list_drives``
    reconciles); one it has is another drive's."""
    if vm.registry.add(record):
        return
    await list_drives(vm)
    if vm.registry.add(record):
        return
    held = vm.registry.drives.get(record.device_id)
    if held is not None and held.plug_under_way:
        raise _plug_under_way(vm, held, "hotplug")
    raise ConfigError(
        "device_id",
        f"{vm.name}: blockctl has a record of drive {record.device_id} already (QEMU has its "
        f"device or nodes): give another device id, or detach it first (`blockctl detach "
        f"{vm.name} {record.device_id}`)",
    )


def _plug_under_way(vm: VM, record: DriveRecord, operation: str) -> Conflict:
    pid = (record.plugging or {}).get("pid")
    return Conflict(
        f"{vm.name}: {operation} of {record.device_id} refused: process {pid} is hot-plugging "
        "it; wait for it to end, then run the command again",
        kind="hotplug",
        device=record.device_id,
        pid=pid,
    )


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_image(url: str, other: str) -> bool:
    return url.partition("?")[0] == other.partition("?")[0]


async def _refuse_if_in_use(vm: VM, drive: Drive) -> None:
    """An image this VM already has open is refused by name, before qemu-img or QEMU trip
    over its write lock: attached as a device, or a backing layer of one (a read-only attach
    of a read-only layer is allowed: QEMU shares reads). An iSCSI LUN or an NFS image
    likewise, by its URL: QEMU takes no lock on either (libiscsi, libnfs), so a second writer
    would go unnoticed. NFS images compare without the URL's ?uid=&gid= (the same file under
    another uid is the same file)."""
    remote = drive.remote_url
    if remote is not None:
        field, named = "iscsi" if drive.iscsi is not None else "nfs", remote
    else:
        assert drive.file is not None
        field, named = "file", str(Path(drive.file).absolute())
    details = await wire.query_named_block_node_details(vm.session)
    graph = BlockGraph.from_qmp(details, await vm.block_devices(), vm.registry.backing_hints())
    nodes = {d.node.node_name: d.node for d in details}
    for node in graph.nodes.values():
        if node.role is not NodeRole.FORMAT:
            continue
        filename = _filename(graph, nodes, node.name)
        if filename is None or not (
            _same_image(filename, named)
            if remote is not None
            else _same_file(filename, Path(named))
        ):
            continue
        if (drive.read_only or drive.media is Media.CDROM) and node.read_only:
            continue
        device = graph.device_of(node.name)
        if device is None:
            where = f"open in this VM as node {node.name} (no device uses it)"
            way_out = "remove that node first"
        elif device.root is not None and graph.format_node(device.id).name == node.name:
            where = f"already attached as {device.id} (node {node.name})"
            way_out = f"use {device.id}, or detach it first (blockctl detach {vm.name} {device.id})"
        else:
            where = f"a backing layer of {device.id} (node {node.name})"
            way_out = (
                "attach it read-only (--read-only), or attach a copy or a new overlay on top of it"
            )
        raise ConfigError(field, f"{named} is {where}: {way_out}")


async def _rollback(
    vm: VM, nodes: list[str], devices: list[str], objects: Sequence[str] = ()
) -> None:
    await delete_nodes(vm, nodes, event="blockctl.drive.rollback_failed")
    await delete_secrets(vm, objects)
    for device_id in reversed(devices):
        # An empty controller: its removal needs no guest cooperation worth waiting for.
        with contextlib.suppress(BlockctlError):
            await wire.device_del(vm.session, device_id)


async def drive_info(vm: VM, device_id: str) -> DriveInfo:
    for info in await list_drives(vm):
        if info.device_id == device_id:
            return info
    raise DriveNotFound(device_id, f"the VM has no drive {device_id!r} (see `blockctl drives`)")


# Section: unplug


async def unplug(vm: VM, device_id: str, *, timeout: float = 10.0) -> UnplugResult:
    """Remove a drive: ``device_del``, wait for its ``DEVICE_DELETED``, then ``blockdev-del``.

    If the guest does not release the device within ``timeout`` the result is PENDING and the
    nodes stay; calling again is safe (it asks again, or finishes a removal that completed
    meanwhile).
    """
    device, record = await _find(vm, device_id)
    if record is not None and record.plug_under_way:
        raise _plug_under_way(vm, record, "unplug")
    peripherals = await wire.qom_list(vm.session, "/machine/peripheral")
    if device is None and device_id not in peripherals:
        if record is not None and record.nodes:
            # The device went away (e.g. the guest finished a pending unplug): finish up.
            return await _delete_nodes(vm, record)
        raise DriveNotFound(device_id, f"the VM has no drive {device_id!r} (already detached?)")
    if record is None:
        raise Unsupported(
            "unplug", f"{device_id!r} was not created by blockctl; its nodes are unknown"
        )
    with wire.device_deleted_events(vm.session) as events:
        # QEMU accepts device_del of a disk a job is writing: refused here, by name.
        async with conflicts.claim(vm, "unplug", [device_id]):
            vm.registry.set_pending(device_id, True)
            try:
                await wire.device_del(vm.session, device_id)
            except CommandFailed as exc:
                if "already in the process of unplug" not in exc.desc:
                    vm.registry.set_pending(device_id, False)
                    raise
        with anyio.move_on_after(timeout) as scope:
            await events.wait_for(lambda e: wire.is_device_deleted(e, device_id))
    if scope.cancelled_caught:
        _log.warning("blockctl.drive.unplug_pending", vm=vm.name, device=device_id, seconds=timeout)
        return UnplugResult(device_id=device_id, state=UnplugState.PENDING)
    return await _delete_nodes(vm, vm.registry.drives.get(device_id, record))


async def _stop_daemon(vm: VM, record: DriveRecord) -> None:
    """The unplugged vhost-user-blk disk's chardev is removed and its daemon stopped: by
    this process if it is the daemon's parent (reaped here), else by its recorded pid and
    start time (a pid reused since is left alone)."""
    assert record.daemon is not None
    chardev = str(record.daemon.get("chardev"))
    if chardev in await wire.query_chardev_labels(vm.session):
        await wire.chardev_remove(vm.session, chardev)
    if isinstance(vm, LaunchedVM) and record.device_id in vm.daemons.running:
        await vm.daemons.stop(record.device_id)
    else:
        pid = record.daemon.get("pid")
        if isinstance(pid, int):
            await _proc.stop_recorded(
                pid, record.daemon.get("pid_start"), grace=_storage_daemon.STOP_TIMEOUT
            )
    _log.info("blockctl.drive.daemon_stopped", vm=vm.name, device=record.device_id)
    if vm.run_dir is not None:
        _remove_daemon_dir(vm, daemon_journal_dir(vm.run_dir, record.device_id))


def _remove_daemon_dir(vm: VM, path: Path) -> None:
    """The stopped daemon's operations directory goes with it (its locks, sockets of no
    one), unless a record of an interrupted operation is in it: kept, and said."""
    if not path.is_dir():
        return
    records = sorted(p.name for p in path.glob("journal-*"))
    if records:
        _log.warning(
            "blockctl.drive.daemon_records_kept", vm=vm.name, dir=str(path), records=records
        )
        return
    shutil.rmtree(path, ignore_errors=True)


async def _delete_nodes(vm: VM, record: DriveRecord) -> UnplugResult:
    if record.daemon is not None:
        await _stop_daemon(vm, record)
    live = {n.node_name for n in await vm.block_nodes()}
    deleted = []
    for name in record.node_names:  # top-down
        if name in live:
            try:
                await wire.blockdev_del(vm.session, name)
            except CommandFailed:
                # Another client finishing the same removal deleted it first: not an error.
                if name in {n.node_name for n in await vm.block_nodes()}:
                    raise
                continue
            deleted.append(name)
    await delete_secrets(
        vm, [str(n["password-secret"]) for n in record.nodes if "password-secret" in n]
    )
    vm.registry.remove(record.device_id)
    _log.info("blockctl.drive.unplugged", vm=vm.name, device=record.device_id, nodes=deleted)
    return UnplugResult(
        device_id=record.device_id, state=UnplugState.REMOVED, deleted_nodes=tuple(deleted)
    )


# Section: removable media


async def eject(vm: VM, device_id: str, *, force: bool = False) -> None:
    """Open the tray and remove the medium (``force`` opens a tray the guest has locked)."""
    device, record = await _find(vm, device_id)
    if device is None:
        raise DriveNotFound(device_id, f"the VM has no drive {device_id!r}")
    if not device.removable:
        raise ConfigError("device", f"{device_id!r} has no removable medium")
    qom_id = device.qom_path or device_id
    await wire.blockdev_open_tray(vm.session, qom_id, force=force)
    if device.inserted is None:
        return
    try:
        await wire.blockdev_remove_medium(vm.session, qom_id)
    except CommandFailed as exc:
        if "not open" in exc.desc or "locked" in exc.desc:
            raise CommandFailed(
                exc.command,
                exc.error_class,
                f"{exc.desc}: the guest holds the tray locked; eject with force",
            ) from exc
        raise
    if record is not None:
        for name in record.node_names:
            with contextlib.suppress(CommandFailed):
                await wire.blockdev_del(vm.session, name)
        vm.registry.put(replace(record, nodes=()))


async def insert(
    vm: VM, device_id: str, file: Any, fmt: ImageFormat, *, image_roots: Iterable[Path | str] = ()
) -> DriveInfo:
    """Insert a medium into an empty drive and close the tray (the image inspected first, as
    for :func:`hotplug`)."""
    device, record = await _find(vm, device_id)
    if device is None or record is None:
        raise DriveNotFound(device_id, f"the VM has no drive {device_id!r} made by blockctl")
    if not device.removable:
        raise ConfigError("device", f"{device_id!r} has no removable medium")
    if device.inserted is not None:
        raise ConfigError("device", f"{device_id!r} holds a medium; eject it first (or change)")
    medium = Drive(file=file, format=fmt, interface=Interface.IDE, media=Media.CDROM)
    await _refuse_if_in_use(vm, medium)
    source = await inspect_drive(medium, "file", roots=image_roots)
    plan = plan_drive(await _next_index(vm), medium, source, "pc", None)
    added: list[str] = []
    try:
        for node in plan.nodes:
            await wire.blockdev_add(vm.session, node)
            added.append(str(node["node-name"]))
        await wire.blockdev_open_tray(vm.session, device_id, force=True)
        assert plan.top_node is not None
        await wire.blockdev_insert_medium(vm.session, device_id, plan.top_node)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _rollback(vm, added, [])
        raise
    vm.registry.put(replace(record, nodes=plan.record_nodes()))
    await wire.blockdev_close_tray(vm.session, device_id)
    return await drive_info(vm, device_id)


async def change_medium(
    vm: VM,
    device_id: str,
    file: Any,
    fmt: ImageFormat,
    *,
    force: bool = False,
    image_roots: Iterable[Path | str] = (),
) -> DriveInfo:
    # The new medium is checked before the old one is ejected.
    await check_medium(vm, file, fmt, image_roots=image_roots)
    await eject(vm, device_id, force=force)
    return await insert(vm, device_id, file, fmt, image_roots=image_roots)


async def check_medium(
    vm: VM, file: Any, fmt: ImageFormat | None, *, image_roots: Iterable[Path | str] = ()
) -> None:
    """What :func:`change_medium` checks first: the image is not in use in this VM (a
    read-only medium may share a read-only layer) and passes inspection."""
    if fmt is None:
        raise ConfigError("format", f"{file}: a medium needs its format")
    medium = Drive(file=file, format=fmt, interface=Interface.IDE, media=Media.CDROM)
    await _refuse_if_in_use(vm, medium)
    await inspect_drive(medium, "file", roots=image_roots)


# Section: cache, size, throttling


async def set_cache(vm: VM, device_id: str, mode: CacheMode) -> DriveInfo:
    """Change a live drive's cache mode with ``blockdev-reopen`` of its nodes.

    ``cache.direct`` and ``cache.no-flush`` change at runtime. The guest-visible write cache
    (WCE) is fixed when the device is realized; a mode that needs a different one is refused
    with the ways out: choose a mode with the same write cache, re-plug the drive with the new
    mode, or let the guest switch it (``/sys/block/vdX/cache_type``).
    """
    vm.refuse_daemon_disks("cache", [device_id])
    record = await check_cache(vm, device_id, mode)
    await vm.require("blockdev-reopen")
    new_cache = {"direct": mode.direct, "no-flush": mode.no_flush}
    nodes = tuple({**n, "cache": new_cache} if "cache" in n else n for n in record.nodes)
    # Complete option sets, every node of the drive in one atomic reopen.
    await wire.blockdev_reopen(vm.session, [n for n in nodes if "cache" in n])
    vm.registry.put(replace(record, nodes=nodes))
    _log.info("blockctl.drive.cache_changed", vm=vm.name, device=device_id, mode=mode.value)
    return await drive_info(vm, device_id)


async def check_cache(vm: VM, device_id: str, mode: CacheMode) -> DriveRecord:
    """Everything :func:`set_cache` checks before it changes anything; the drive's record."""
    vm.refuse_daemon_disks("cache", [device_id])
    device, record = await _find(vm, device_id)
    if device is None or device.inserted is None:
        raise DriveNotFound(device_id, f"the VM has no drive {device_id!r} with a medium")
    if record is None or not record.nodes:
        raise Unsupported(
            "cache",
            f"{device_id!r} was not created by blockctl: its node options are unknown, "
            "and blockdev-reopen resets every option it is not given",
        )
    wce = device.inserted.cache.writeback
    if mode.write_cache != wce:
        now = "on" if wce else "off"
        raise Unsupported(
            "cache",
            f"cache mode {mode.value!r} needs the device write cache "
            f"{'on' if mode.write_cache else 'off'}, but it is {now} and QEMU cannot change "
            f"it after the device is realized. Choose a mode with write cache {now} "
            f"({', '.join(m.value for m in CacheMode if m.write_cache == wce)}), or detach "
            "and attach the drive again with the new mode",
        )
    return record


#: The first qemu-storage-daemon whose vhost-user-blk export tells QEMU (and so the guest) of
#: a resize. Measured: on 7.2 a ``block_resize`` in the daemon grew its node and the guest
#: kept its size for 20 s; on 10.0.2 the guest saw the new size at once ("detected capacity
#: change"). Versions between were not measured: refused.
DAEMON_RESIZE_SINCE = (10, 0)


async def resize(vm: VM, device_id: str, size: int, *, allow_shrink: bool = False) -> DriveInfo:
    """Grow (or, with ``allow_shrink``, shrink) a live drive's image to ``size`` bytes. A
    vhost-user-blk disk's image is resized in its qemu-storage-daemon (from
    :data:`DAEMON_RESIZE_SINCE` on; refused before, naming the measured reason)."""
    if size <= 0 or size % 512:
        raise ConfigError("size", f"{size} is not a positive multiple of 512 bytes")
    if vm.daemon_disk("resize", [device_id]) is not None:
        return await _resize_in_daemon(vm, device_id, size, allow_shrink=allow_shrink)
    info = await drive_info(vm, device_id)
    node = next((n for n in info.chain if n.driver not in ("copy-on-read", "throttle")), None)
    if node is None or info.size is None:
        raise DriveNotFound(device_id, f"{device_id!r} has no medium to resize")
    if size < info.size and not allow_shrink:
        raise ConfigError(
            "size",
            f"{size} is smaller than the current {info.size} bytes; shrinking cuts off "
            "whatever the guest stored at the end. Pass allow_shrink (--shrink) to do it anyway",
        )
    try:
        await wire.block_resize(vm.session, node.node_name, size)
    except CommandFailed as exc:
        # file-posix ("Cannot grow device files") and iscsi ("Cannot grow iSCSI devices"):
        # a block device or a LUN has the size its storage gives it, read again here.
        if not exc.desc.startswith("Cannot grow"):
            raise
        what = (
            f"the iSCSI LUN {info.file}"
            if (info.file or "").startswith("iscsi://")
            else f"the block device {info.file}"
        )
        where = "the LUN on its target" if "LUN" in what else "the device"
        raise ConfigError(
            "size",
            f"cannot resize {device_id} to {size} bytes: it is {what}, whose size QEMU cannot "
            f"grow ({exc.desc}); nothing changed. Way out: grow {where} first (a loop "
            "device: its file, then `losetup -c`), then resize again to at most its new size",
        ) from exc
    return await drive_info(vm, device_id)


async def _resize_in_daemon(vm: VM, device_id: str, size: int, *, allow_shrink: bool) -> DriveInfo:
    """Resize the node a vhost-user-blk disk's export serves, in its daemon; the daemon's
    export tells QEMU, which tells the guest (on the daemons that do: see
    :data:`DAEMON_RESIZE_SINCE`)."""
    async with vm.on_storage_daemon(device_id, "resize") as daemon:
        version = await daemon.version()
        if (version.major, version.minor) < DAEMON_RESIZE_SINCE:
            raise InStorageDaemon(
                "resize",
                device_id,
                daemon_pid=daemon.pid,
                monitor=(vm.registry.drives[device_id].daemon or {}).get("monitor"),
                why=(
                    f"its qemu-storage-daemon is {version.major}.{version.minor}.{version.micro}, "
                    "whose vhost-user-blk export does not tell QEMU of a new size (measured on "
                    "7.2: the daemon's node grew, the guest's disk kept its size); blockctl "
                    "resizes such a disk from a 10.0 daemon on"
                ),
                way_out=(
                    "shut the VM down, grow the image offline (`blockctl img resize`), and "
                    "start it again; or run the VM with QEMU 10.0"
                ),
            )
        node_name = await daemon.export_node()
        node = next(n for n in await daemon.block_nodes() if n.node_name == node_name)
        current = node.virtual_size
        if current is not None and size < current and not allow_shrink:
            raise ConfigError(
                "size",
                f"{size} is smaller than the current {current} bytes; shrinking cuts off "
                "whatever the guest stored at the end. Pass allow_shrink (--shrink) to do it "
                "anyway",
            )
        await wire.block_resize(daemon.session, node_name, size)
        grown = next(n for n in await daemon.block_nodes() if n.node_name == node_name)
    info = await drive_info(vm, device_id)
    # QEMU has none of the disk's nodes: its size is the daemon's node's.
    return replace(info, chain=(grown,))


async def set_throttle(
    vm: VM, device_id: str, limits: Mapping[str, int], *, group: str | None = None
) -> DriveInfo:
    """Set I/O limits (bytes/s and operations/s; 0 = unlimited). Unnamed limits become 0."""
    vm.refuse_daemon_disks("throttle", [device_id])
    unknown = set(limits) - set(_THROTTLE_KEYS)
    if unknown:
        raise ConfigError("throttle", f"unknown limits {sorted(unknown)}; use {_THROTTLE_KEYS}")
    for key, value in limits.items():
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"throttle.{key}", "must be a non-negative integer")
    if (limits.get("bps") and (limits.get("bps_rd") or limits.get("bps_wr"))) or (
        limits.get("iops") and (limits.get("iops_rd") or limits.get("iops_wr"))
    ):
        raise ConfigError("throttle", "a total limit cannot be combined with read/write limits")
    device, _ = await _find(vm, device_id)
    if device is None or device.inserted is None:
        raise DriveNotFound(device_id, f"the VM has no drive {device_id!r} with a medium")
    # Measured (QEMU 7.2): limits set on a passed-through LUN show in query-block, but the
    # guest's writes (SG_IO ioctls) ignore them: 3 MiB under bps_wr=512K in 0.13 s.
    await refuse_passed_through(vm, await read_graph(vm), [device_id], "throttle")
    full = {k: int(limits.get(k, 0)) for k in _THROTTLE_KEYS}
    # For virtio the block backend sits on the device's virtio-backend child: address it by
    # the QOM path query-block reports, not by the proxy's id.
    await wire.block_set_io_throttle(vm.session, device.qdev or device_id, full, group)
    return await drive_info(vm, device_id)
