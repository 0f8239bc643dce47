"""The block graph of a running QEMU, as a pure value: no I/O, no QMP, no clock.

Built from parsed ``query-named-block-nodes`` (flat) and ``query-block`` replies
(:meth:`BlockGraph.from_qmp`): devices → root node → (filters) → format node → file child,
and backing chains. It answers the questions operations ask before touching anything:
:meth:`~BlockGraph.chain_of` (top → base), :meth:`~BlockGraph.users_of` (who depends on a
node: committing into a base that anything else uses would corrupt that user, qemu-facts
§0.1), rendering as a text tree and as JSON-ready dicts.

How edges are derived (QEMU 7.2 lists no children in ``query-named-block-nodes``):

- **Device → root**: exact, from ``query-block``'s ``inserted.node-name``.
- **Node → file child**: a node whose options cannot be written as a plain filename is named
  by a ``json:{...}`` pseudo-filename that nests its children's options; the child is the node
  whose own description equals the nested ``file`` (or ``image``, for blkdebug) object. A
  format node with a plain filename sits on the one protocol node with that filename.
- **Node → backing**: ``backing_file`` is the backing node's filename (QEMU reports the
  opened node's name, not the header string); the backing node is the non-protocol node with
  that filename, narrowed by the nested ``backing`` object of a ``json:`` name when present.

Limits (each becomes a :attr:`BlockGraph.warnings` entry rather than a guessed edge):

- the same image opened twice by two non-protocol nodes (e.g. read-only, shared) cannot be
  told apart by filename;
- a backing link cut live (``blockdev-reopen`` with ``backing: null``) may still show the old
  ``backing_file`` string; and a link QEMU made to a node with a different filename string
  (e.g. a relative name) is not found;
- implicit nodes (``#block…`` job filters such as ``commit_top``) are ordinary nodes here;
  ``query-block`` hides them above a device, so the device points at the node below.

Nodes that were dropped from a chain by a commit or stream still exist (and still hold their
backing links) until ``blockdev-del``; :meth:`BlockGraph.attached` says whether a device can
reach a node, and :meth:`BlockGraph.users_of` reports stale users separately.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blockctl._qmp.models import BlockDevice, DirtyBitmap, NodeDetail
from blockctl.errors import NodeNotFound
from blockctl.types import iscsi_url as _iscsi_url
from blockctl.types import nfs_url as _nfs_url

__all__ = ["BlockGraph", "GraphDevice", "GraphNode", "NodeRole", "User"]

#: Drivers that talk to storage (the bottom of a stack).
PROTOCOL_DRIVERS = frozenset(
    {
        "file",
        "host_device",
        "host_cdrom",
        "nbd",
        "null-co",
        "null-aio",
        "nvme",
        "nvme-io_uring",
        "iscsi",
        "rbd",
        "ssh",
        "http",
        "https",
        "ftp",
        "ftps",
        "gluster",
        "nfs",
        "vvfat",
        "io_uring",
        "virtio-blk-vhost-vdpa",
    }
)

#: Drivers that pass I/O through to one child (``file``, or ``image`` for blkdebug).
FILTER_DRIVERS = frozenset(
    {
        "copy-on-read",
        "throttle",
        "blkdebug",
        "blkverify",
        "blklogwrites",
        "preallocate",
        "compress",
        "copy-before-write",
        "snapshot-access",
        "commit_top",
        "mirror_top",
        "backup-top",
    }
)


class NodeRole(enum.StrEnum):
    PROTOCOL = "protocol"  # file, host_device, nbd, ...: the storage itself
    FORMAT = "format"  # qcow2, raw, ...: the guest-visible layout of one image
    FILTER = "filter"  # copy-on-read, throttle, blkdebug, job filters: pass-through


def role_of(driver: str) -> NodeRole:
    if driver in PROTOCOL_DRIVERS:
        return NodeRole.PROTOCOL
    if driver in FILTER_DRIVERS:
        return NodeRole.FILTER
    return NodeRole.FORMAT


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphNode:
    """One named node with its derived edges (node names, or None)."""

    name: str
    driver: str
    role: NodeRole
    filename: str | None  # the storage behind it (the protocol node's filename), if known
    qemu_filename: str  # what QEMU reports (may be a json: pseudo-filename)
    read_only: bool
    virtual_size: int | None
    file_child: str | None
    backing: str | None
    backing_file: str | None  # QEMU's backing_file string
    dirty_bitmaps: tuple[DirtyBitmap, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphDevice:
    """A guest device with a block backend: ``id`` is the ``-device`` id when there is one."""

    id: str
    qdev: str | None
    root: str | None  # None: no medium inserted


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    """Something that depends on a node. ``kind``: ``device`` (its root is at or above the
    node), ``overlay`` (backing link), ``parent`` (file/filter link). ``via`` is the node it
    uses directly; ``attached`` is whether a device can reach the user."""

    kind: str
    name: str
    via: str
    attached: bool


@dataclass(frozen=True, slots=True)
class _Raw:
    detail: NodeDetail
    descriptor: Mapping[str, Any] | None  # parsed json: pseudo-filename


def _json_name(filename: str) -> Mapping[str, Any] | None:
    if not filename.startswith("json:"):
        return None
    try:
        value = json.loads(filename[len("json:") :])
    except ValueError:
        return None
    return value if isinstance(value, Mapping) else None


def _child_spec(descriptor: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for key in ("file", "image"):
        child = descriptor.get(key)
        if isinstance(child, Mapping):
            return child
    return None


def _leaf_filename(descriptor: Mapping[str, Any]) -> str | None:
    current: Mapping[str, Any] | None = descriptor
    while current is not None:
        name = current.get("filename")
        if isinstance(name, str):
            return name
        if current.get("driver") == "iscsi":
            # An iSCSI LUN has no filename: its URL names it (never with credentials).
            return iscsi_url(current)
        if current.get("driver") == "nfs":
            # In a json: name, an NFS image is its options: its URL names it, as QEMU's own
            # filename of the node does.
            return nfs_url(current)
        current = _child_spec(current)
    return None


def iscsi_url(spec: Mapping[str, Any]) -> str | None:
    """``iscsi://portal/target/lun`` of an iscsi node's options (QEMU reports the LUN as a
    number or a string)."""
    portal, target, lun = spec.get("portal"), spec.get("target"), spec.get("lun", 0)
    if not isinstance(portal, str) or not isinstance(target, str):
        return None
    return _iscsi_url(portal, target, lun)


def nfs_url(spec: Mapping[str, Any]) -> str | None:
    """``nfs://server/path[?uid=U][&gid=G]`` of an nfs node's options (QEMU reports the ids
    as numbers or strings)."""
    server, path = spec.get("server"), spec.get("path")
    # Nested as blockctl sends it, or flattened ("server.host") as QEMU keeps a node's options.
    host = server.get("host") if isinstance(server, Mapping) else spec.get("server.host")
    if not isinstance(host, str) or not isinstance(path, str):
        return None
    ids = [spec.get(key) for key in ("user", "group")]
    user, group = (int(v) if isinstance(v, int | str) and str(v).isdigit() else None for v in ids)
    return _nfs_url(host, path, user, group)


def image_filename(qemu_name: str) -> str | None:
    """The image file a QEMU node name stands for: the name itself, or the innermost
    ``filename`` of a ``json:`` description (through ``file``/``image`` children)."""
    descriptor = _json_name(qemu_name)
    if descriptor is None:
        return None if qemu_name.startswith("json:") else qemu_name
    return _leaf_filename(descriptor)


def _key(descriptor: Mapping[str, Any]) -> str:
    """A comparable form of a node description, without its ``backing`` (a node's own
    description does not always carry it)."""

    def strip(value: object) -> object:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k != "backing"}
        return value

    return json.dumps(strip(descriptor), sort_keys=True)


class BlockGraph:
    """Nodes, devices and the edges between them. Immutable once built."""

    def __init__(
        self,
        nodes: Mapping[str, GraphNode],
        devices: Mapping[str, GraphDevice],
        warnings: Sequence[str] = (),
    ) -> None:
        self.nodes: Mapping[str, GraphNode] = dict(nodes)
        self.devices: Mapping[str, GraphDevice] = dict(devices)
        self.warnings: tuple[str, ...] = tuple(warnings)
        attached: set[str] = set()
        for device in self.devices.values():
            self._reach(device.root, attached)
        self._attached = frozenset(attached)

    # Section: building

    @classmethod
    def from_qmp(
        cls,
        nodes: Iterable[NodeDetail],
        devices: Iterable[BlockDevice],
        backing_hints: Mapping[str, str | None] | None = None,
    ) -> BlockGraph:
        """``backing_hints`` (node → the backing node it was opened with, as blockctl
        recorded it) settle what filenames cannot: two chains whose backing nodes open the
        same file. A hint is used only if QEMU's ``backing_file`` agrees with it."""
        raw = {d.node.node_name: _Raw(d, _json_name(d.node.file)) for d in nodes}
        hints = dict(backing_hints or {})
        warnings: list[str] = []

        def descriptor(name: str) -> Mapping[str, Any] | None:
            """The node as its parent's json: name would describe it."""
            r = raw[name]
            if r.descriptor is not None:
                return r.descriptor
            node = r.detail.node
            if role_of(node.driver) is NodeRole.PROTOCOL:
                return {"driver": node.driver, "filename": node.file}
            below = [
                n
                for n, o in raw.items()
                if o.descriptor is None
                and o.detail.node.file == node.file
                and role_of(o.detail.node.driver) is NodeRole.PROTOCOL
            ]
            if len(below) != 1:
                return None
            child = descriptor(below[0])
            return None if child is None else {"driver": node.driver, "file": child}

        descriptors = {name: descriptor(name) for name in raw}
        by_key: dict[str, list[str]] = {}
        for name, desc in descriptors.items():
            if desc is not None:
                by_key.setdefault(_key(desc), []).append(name)

        def file_child(name: str) -> str | None:
            node = raw[name].detail.node
            if role_of(node.driver) is NodeRole.PROTOCOL:
                return None
            if role_of(node.driver) is NodeRole.FILTER and raw[name].descriptor is None:
                # A filter named by a plain filename (an implicit job filter: a backup's
                # copy-before-write above a disk) passes through to that file's format node.
                formats = [
                    n
                    for n, o in raw.items()
                    if o.detail.node.file == node.file
                    and role_of(o.detail.node.driver) is NodeRole.FORMAT
                ]
                if len(formats) == 1:
                    return formats[0]
            desc = descriptors[name]
            spec = None if desc is None else _child_spec(desc)
            if spec is None:
                warnings.append(f"{name}: cannot tell which node is its file child")
                return None
            found = [n for n in by_key.get(_key(spec), []) if n != name]
            if len(found) != 1:
                what = "no node matches" if not found else f"several nodes match ({found})"
                warnings.append(f"{name}: {what} its file child")
                return None
            return found[0]

        def backing(name: str) -> str | None:
            node = raw[name].detail.node
            if node.backing_file is None:
                return None
            found = [
                n
                for n, o in raw.items()
                if n != name
                and o.detail.node.file == node.backing_file
                and role_of(o.detail.node.driver) is not NodeRole.PROTOCOL
            ]
            desc = raw[name].descriptor
            spec = None if desc is None else desc.get("backing")
            if isinstance(spec, Mapping) and len(found) > 1:
                wanted = _key(spec)
                found = [n for n in found if _key(descriptors[n] or {}) == wanted]
            hinted = hints.get(name)
            if len(found) > 1 and hinted in found:
                found = [hinted]
            if len(found) > 1:  # filters above the backing image share its filename
                found = _lowest_non_protocol(found, {n: file_child_of[n] for n in found})
            if len(found) != 1:
                what = "no open node" if not found else f"several nodes ({found})"
                warnings.append(f"{name}: backing file {node.backing_file!r} matches {what}")
                return None
            return found[0]

        file_child_of = {name: file_child(name) for name in raw}
        graph_nodes = {}
        for name, r in raw.items():
            node = r.detail.node
            desc = descriptors[name]
            graph_nodes[name] = GraphNode(
                name=name,
                driver=node.driver,
                role=role_of(node.driver),
                filename=_leaf_filename(desc) if desc is not None else None,
                qemu_filename=node.file,
                read_only=node.read_only,
                virtual_size=node.virtual_size,
                file_child=file_child_of[name],
                backing=backing(name),
                backing_file=node.backing_file,
                dirty_bitmaps=r.detail.dirty_bitmaps,
            )
        graph_devices = {}
        for dev in devices:
            dev_id = dev.device_id or dev.device
            root = None if dev.inserted is None else dev.inserted.node_name
            if root is not None and root not in graph_nodes:
                warnings.append(f"device {dev_id}: root node {root!r} is not a named node")
            graph_devices[dev_id] = GraphDevice(id=dev_id, qdev=dev.qdev, root=root)
        return cls(graph_nodes, graph_devices, warnings)

    # Section: questions

    def node(self, name: str) -> GraphNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise NodeNotFound(name, f"no block node named {name!r}") from None

    def _start(self, device_or_node: str) -> GraphNode:
        device = self.devices.get(device_or_node)
        if device is not None:
            if device.root is None:
                raise NodeNotFound(device_or_node, f"device {device_or_node!r} has no medium")
            return self.node(device.root)
        return self.node(device_or_node)

    def format_node(self, device_or_node: str) -> GraphNode:
        """The top image of a device or node: below any filters, above the protocol node."""
        node = self._start(device_or_node)
        while node.role is NodeRole.FILTER and node.file_child is not None:
            node = self.node(node.file_child)
        return node

    def layer_nodes(self, node: GraphNode) -> list[str]:
        """A format node and the protocol node(s) under it, top-down (the blockdev-del
        order): one layer of a chain as QEMU holds it."""
        names = [node.name]
        child = node.file_child
        while child is not None and child in self.nodes:
            names.append(child)
            below = self.nodes[child]
            child = below.file_child if below.role is not NodeRole.FORMAT else None
        return names

    def chain_of(self, device_or_node: str) -> tuple[GraphNode, ...]:
        """The backing chain, top first: the format node, then each backing node."""
        chain = [self.format_node(device_or_node)]
        seen = {chain[0].name}
        while chain[-1].backing is not None and chain[-1].backing not in seen:
            chain.append(self.node(chain[-1].backing))
            seen.add(chain[-1].name)
        return tuple(chain)

    def parents_of(self, name: str) -> tuple[User, ...]:
        """What uses ``name`` directly."""
        self.node(name)
        users = [
            User(kind="device", name=d.id, via=name, attached=True)
            for d in self.devices.values()
            if d.root == name
        ]
        for other in self.nodes.values():
            if other.backing == name:
                users.append(
                    User(
                        kind="overlay",
                        name=other.name,
                        via=name,
                        attached=self.attached(other.name),
                    )
                )
            if other.file_child == name:
                users.append(
                    User(
                        kind="parent", name=other.name, via=name, attached=self.attached(other.name)
                    )
                )
        return tuple(users)

    def users_of(self, name: str) -> tuple[User, ...]:
        """Everything that depends on ``name``, directly or through other nodes: overlays,
        filters and format nodes above it, and the devices on top (breadth-first)."""
        result: list[User] = []
        seen = {name}
        queue = [name]
        while queue:
            current = queue.pop(0)
            for user in self.parents_of(current):
                if user.kind == "device":
                    if all(u.name != user.name or u.kind != "device" for u in result):
                        result.append(user)
                elif user.name not in seen:
                    seen.add(user.name)
                    result.append(user)
                    queue.append(user.name)
        return tuple(result)

    def attached(self, name: str) -> bool:
        """Whether some device reaches ``name`` through root, file and backing links."""
        return name in self._attached

    def device_of(self, name: str) -> GraphDevice | None:
        """The device whose chain or stack contains ``name``, if any."""
        for user in self.users_of(name):
            if user.kind == "device":
                return self.devices[user.name]
        return next((d for d in self.devices.values() if d.root == name), None)

    def _reach(self, name: str | None, into: set[str]) -> None:
        while name is not None and name in self.nodes and name not in into:
            into.add(name)
            node = self.nodes[name]
            self._reach(node.file_child, into)
            name = node.backing

    # Section: rendering

    def render_text(self) -> str:
        """An indented tree: each device with its stack, then nodes no device reaches."""
        lines: list[str] = []
        shown: set[str] = set()
        for device in sorted(self.devices.values(), key=lambda d: d.id):
            lines.append(f"{device.id}" + (f"  ({device.qdev})" if device.qdev else ""))
            if device.root is None:
                lines.append("  (no medium)")
            elif device.root in self.nodes:
                self._render(device.root, "root", "", True, shown, lines)
        roots = [
            n
            for n in sorted(self.nodes)
            if n not in shown and not any(u.kind != "device" for u in self.parents_of(n))
        ]
        rest = roots + [n for n in sorted(self.nodes) if n not in shown and n not in roots]
        if any(n not in shown for n in rest):
            lines.append("(not attached to a device)")
            for name in rest:
                if name not in shown:
                    self._render(name, "node", "", True, shown, lines)
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines) + "\n"

    def _render(
        self, name: str, link: str, prefix: str, last: bool, shown: set[str], lines: list[str]
    ) -> None:
        node = self.nodes[name]
        branch = "└── " if last else "├── "
        if name in shown:
            lines.append(f"{prefix}{branch}{link}: {name} (shown above)")
            return
        shown.add(name)
        facts = [node.driver, "ro" if node.read_only else "rw"]
        if node.filename:
            facts.append(node.filename)
        if node.dirty_bitmaps:
            facts.append("bitmaps: " + ",".join(b.name or "?" for b in node.dirty_bitmaps))
        lines.append(f"{prefix}{branch}{link}: {name}  " + "  ".join(facts))
        children = [(k, c) for k, c in (("file", node.file_child), ("backing", node.backing)) if c]
        inner = prefix + ("    " if last else "│   ")
        for i, (kind, child) in enumerate(children):
            self._render(child, kind, inner, i == len(children) - 1, shown, lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: devices (with their chains), nodes, warnings."""
        devices = []
        for d in sorted(self.devices.values(), key=lambda d: d.id):
            chain = [n.name for n in self.chain_of(d.id)] if d.root in self.nodes else []
            devices.append({"id": d.id, "qdev": d.qdev, "root": d.root, "chain": chain})
        nodes = [
            {
                "node_name": n.name,
                "driver": n.driver,
                "role": n.role.value,
                "filename": n.filename,
                "read_only": n.read_only,
                "virtual_size": n.virtual_size,
                "file": n.file_child,
                "backing": n.backing,
                "attached": self.attached(n.name),
                "dirty_bitmaps": [
                    {
                        "name": b.name,
                        "count": b.count,
                        "granularity": b.granularity,
                        "recording": b.recording,
                        "busy": b.busy,
                        "persistent": b.persistent,
                        "inconsistent": b.inconsistent,
                    }
                    for b in n.dirty_bitmaps
                ],
            }
            for n in sorted(self.nodes.values(), key=lambda n: n.name)
        ]
        return {"devices": devices, "nodes": nodes, "warnings": list(self.warnings)}


def _lowest_non_protocol(names: list[str], file_child: Mapping[str, str | None]) -> list[str]:
    """Among nodes stacked on one image (filters over a format node), the lowest: the one
    none of the others sits on."""
    candidates = set(names)
    return [n for n in names if file_child[n] not in candidates] or names
