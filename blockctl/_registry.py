"""What blockctl remembers about the drives it created, beside the VM (``<run dir>/drives.json``).

QEMU is the source of truth about which devices and nodes exist. What QEMU cannot tell is the
*options* each node was opened with (``query-named-block-nodes`` does not report ``discard``,
``aio`` or the child names), and ``blockdev-reopen`` resets every option it is not given. So
blockctl keeps the options it used, and :meth:`DriveRegistry.reconcile` drops whatever QEMU no
longer has. The file is rewritten atomically and durably, mode 0600
(:func:`blockctl._fsutil.atomic_write_bytes`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blockctl import _fsutil, _proc

Json = dict[str, Any]

FILE = "drives.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class DriveRecord:
    """One drive blockctl created: its device and its nodes' options (bottom-up)."""

    device_id: str
    device: Json
    nodes: tuple[Json, ...] = ()
    pending_unplug: bool = False
    #: A vhost-user-blk drive's qemu-storage-daemon (``nodes`` is then empty: QEMU has none):
    #: ``pid``, ``pid_start``, ``monitor`` (its QMP socket), ``socket`` (the vhost-user one),
    #: ``chardev`` (QEMU's chardev id), ``file``, ``format``, ``nodes`` (the daemon's).
    daemon: Json | None = None
    #: Written before a hot-plug's first change (``drives.hotplug``), by the process named
    #: here (``pid``, ``pid_start``); dropped once its ``device_add`` returned. While that
    #: process lives the record is not judged by what QEMU has (nothing need be added yet);
    #: once it is gone, what QEMU has is what it did (:meth:`DriveRegistry.reconcile`): a
    #: process killed after its ``device_add`` leaves a device whose nodes are known.
    plugging: Json | None = None

    @property
    def plug_under_way(self) -> bool:
        """Its hot-plug's process still runs (see ``plugging``)."""
        mark = self.plugging
        return mark is not None and _proc.process_alive(mark.get("pid"), mark.get("pid_start"))

    @property
    def node_names(self) -> tuple[str, ...]:
        """Top-down, the order in which ``blockdev-del`` must remove them."""
        return tuple(str(n["node-name"]) for n in reversed(self.nodes))

    @property
    def top_node(self) -> str | None:
        return None if not self.nodes else str(self.nodes[-1]["node-name"])

    def to_json(self) -> Json:
        return {
            "device_id": self.device_id,
            "device": self.device,
            "nodes": list(self.nodes),
            "pending_unplug": self.pending_unplug,
            **({} if self.daemon is None else {"daemon": self.daemon}),
            **({} if self.plugging is None else {"plugging": self.plugging}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DriveRecord:
        return cls(
            device_id=str(data["device_id"]),
            device=dict(data["device"]),
            nodes=tuple(dict(n) for n in data.get("nodes", ())),
            pending_unplug=bool(data.get("pending_unplug", False)),
            daemon=None if data.get("daemon") is None else dict(data["daemon"]),
            plugging=None if data.get("plugging") is None else dict(data["plugging"]),
        )


def this_process() -> Json:
    """The ``plugging`` mark of a record this process is hot-plugging."""
    pid = os.getpid()
    return {"pid": pid, "pid_start": _proc.process_start(pid)}


@dataclass(slots=True)
class DriveRegistry:
    """The drive records of one VM. ``path`` is None for a VM blockctl did not launch."""

    path: Path | None
    drives: dict[str, DriveRecord] = field(default_factory=dict)
    #: The file's bytes as last read or written; None: not read (missing).
    _raw: bytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, run_dir: Path | None) -> DriveRegistry:
        registry = cls(path=None if run_dir is None else run_dir / FILE)
        registry.refresh()
        return registry

    def refresh(self) -> None:
        """Read the file again if another client (or process) changed it since. Decided by
        the content: a file's (inode, mtime, size) can repeat across two quick rewrites (inode
        numbers are reused, mtime moves by the kernel's tick)."""
        if self.path is None:
            return
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self.drives, self._raw = {}, None
            return
        if raw == self._raw:
            return
        data = json.loads(raw)
        self.drives = {d["device_id"]: DriveRecord.from_json(d) for d in data.get("drives", [])}
        self._raw = raw

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """A read-modify-write of the file, one client at a time."""
        if self.path is None:
            yield
            return
        # The directory's own flock (the file is replaced on every write; nothing else locks
        # the run directory itself).
        with _fsutil.flocked(self.path.parent, directory=True):
            self.refresh()
            yield

    def save(self) -> None:
        if self.path is None:
            return
        data = {"drives": [d.to_json() for d in self.drives.values()]}
        raw = json.dumps(data, indent=1).encode()
        _fsutil.atomic_write_bytes(self.path, raw)
        self._raw = raw

    def put(self, record: DriveRecord) -> None:
        with self._changing():
            self.drives[record.device_id] = record
            self.save()

    def add(self, record: DriveRecord) -> bool:
        """Record a drive under an id no record has yet; False (nothing written) if one has."""
        with self._changing():
            if record.device_id in self.drives:
                return False
            self.drives[record.device_id] = record
            self.save()
            return True

    def remove(self, device_id: str) -> None:
        with self._changing():
            if self.drives.pop(device_id, None) is not None:
                self.save()

    def set_pending(self, device_id: str, pending: bool) -> None:
        with self._changing():
            record = self.drives.get(device_id)
            if record is not None and record.pending_unplug != pending:
                self.drives[device_id] = replace(record, pending_unplug=pending)
                self.save()

    def node_options(self, name: str) -> Json | None:
        for record in self.drives.values():
            for node in record.nodes:
                if node["node-name"] == name:
                    return node
        return None

    def backing_hints(self) -> dict[str, str | None]:
        """Node → the backing node blockctl opened it with (settles chains that share a file)."""
        return {
            str(n["node-name"]): n["backing"]
            for record in self.drives.values()
            for n in record.nodes
            if "backing" in n
        }

    def reconcile(
        self,
        devices: Iterable[str],
        nodes: Iterable[str],
        known: Mapping[str, DriveRecord] | None = None,
    ) -> None:
        """Forget what QEMU no longer has: QEMU is the source of truth. ``known``: the
        records as they were before QEMU was asked (default: all of them now); a record
        another client wrote since is not judged by a reply that predates it."""
        live_devices, live_nodes = set(devices), set(nodes)
        with self._changing():
            self._reconcile(live_devices, live_nodes, known)

    def _reconcile(
        self,
        live_devices: set[str],
        live_nodes: set[str],
        known: Mapping[str, DriveRecord] | None,
    ) -> None:
        changed = False
        for device_id, record in list(self.drives.items()):
            if known is not None and known.get(device_id) != record:
                continue
            if record.plugging is not None:
                if record.plug_under_way:
                    continue  # its hot-plug is under way
                # Its process is gone: QEMU's devices and nodes are what it did.
                record = replace(record, plugging=None)
                self.drives[device_id] = record
                changed = True
            kept = tuple(n for n in record.nodes if n["node-name"] in live_nodes)
            if device_id not in live_devices and not kept:
                del self.drives[device_id]
                changed = True
            elif kept != record.nodes or (device_id not in live_devices and record.pending_unplug):
                self.drives[device_id] = replace(record, nodes=kept)
                changed = True
        if changed:
            self.save()


class DaemonDriveRegistry(DriveRegistry):
    """The registry as an operation routed to a vhost-user-blk drive's qemu-storage-daemon
    sees it: that one drive, its ``nodes`` the daemon's (``daemon["nodes"]`` of the VM's
    record, where they are kept: QEMU has none of them). A ``put`` writes them back there, so
    the VM's record says which monitor holds each node."""

    __slots__ = ("_device", "_vm_registry")

    def __init__(self, vm_registry: DriveRegistry, device_id: str) -> None:
        super().__init__(path=None)
        self._vm_registry = vm_registry
        self._device = device_id
        self.refresh()

    def refresh(self) -> None:
        self._vm_registry.refresh()
        record = self._vm_registry.drives.get(self._device)
        if record is None or record.daemon is None:
            self.drives = {}
            return
        nodes = tuple(dict(n) for n in record.daemon.get("nodes", ()))
        self.drives = {self._device: replace(record, nodes=nodes)}

    def put(self, record: DriveRecord) -> None:
        if record.device_id != self._device:
            raise ValueError(f"{record.device_id} is not the daemon's drive {self._device}")
        with self._vm_registry._changing():
            current = self._vm_registry.drives.get(self._device)
            if current is not None and current.daemon is not None:
                daemon = {**current.daemon, "nodes": [dict(n) for n in record.nodes]}
                self._vm_registry.drives[self._device] = replace(current, daemon=daemon)
                self._vm_registry.save()
        self.refresh()

    def add(self, record: DriveRecord) -> bool:
        raise ValueError(f"{record.device_id}: a daemon's drive is hot-plugged into the VM")

    def remove(self, device_id: str) -> None:
        raise ValueError(f"{device_id}: a daemon's drive is removed by unplugging it from the VM")

    def set_pending(self, device_id: str, pending: bool) -> None:
        raise ValueError(f"{device_id}: a daemon's drive is unplugged from the VM")
