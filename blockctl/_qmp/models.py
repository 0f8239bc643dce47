"""Frozen dataclasses parsed from QMP replies, once, at the boundary.

``from_qmp()`` checks the keys and types blockctl relies on and raises
:class:`~blockctl.errors.ProtocolMismatch` naming the command; keys it does not know are
ignored, so newer QEMUs that add fields still parse. No raw ``dict`` leaves ``blockctl._qmp``
except through :func:`blockctl._qmp.wire.raw_command`, the CLI's pass-through.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, TypeVar

from blockctl.errors import ProtocolMismatch

_T = TypeVar("_T")


def _obj(value: object, command: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolMismatch(command, f"{what} is not a JSON object: {value!r:.200}")
    return value


def _list(value: object, command: str, what: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ProtocolMismatch(command, f"{what} is not a JSON array: {value!r:.200}")
    return value


def _get(obj: Mapping[str, Any], key: str, kind: type[_T], command: str) -> _T:
    if key not in obj:
        raise ProtocolMismatch(command, f"missing key {key!r} in {sorted(obj)}")
    value = obj[key]
    # JSON has no int/bool distinction problem in Python except bool being an int.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolMismatch(command, f"{key!r} is {type(value).__name__}, not {kind.__name__}")
    return value


def _opt(obj: Mapping[str, Any], key: str, kind: type[_T], command: str) -> _T | None:
    return _get(obj, key, kind, command) if key in obj else None


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionInfo:
    """``query-version``: QEMU's version triple and the distribution's package string."""

    major: int
    minor: int
    micro: int
    package: str

    @classmethod
    def from_qmp(cls, reply: object, command: str = "query-version") -> VersionInfo:
        obj = _obj(reply, command, "reply")
        qemu = _obj(obj.get("qemu"), command, "qemu")
        return cls(
            major=_get(qemu, "major", int, command),
            minor=_get(qemu, "minor", int, command),
            micro=_get(qemu, "micro", int, command),
            package=_get(obj, "package", str, command).strip(),
        )

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusInfo:
    """``query-status``: whether the vCPUs run and QEMU's RunState name."""

    running: bool
    status: str

    @classmethod
    def from_qmp(cls, reply: object) -> StatusInfo:
        obj = _obj(reply, "query-status", "reply")
        return cls(
            running=_get(obj, "running", bool, "query-status"),
            status=_get(obj, "status", str, "query-status"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheFlags:
    """The three cache flags QEMU reports for a node."""

    writeback: bool
    direct: bool
    no_flush: bool

    @classmethod
    def from_qmp(cls, value: object, command: str) -> CacheFlags:
        obj = _obj(value, command, "cache")
        return cls(
            writeback=_get(obj, "writeback", bool, command),
            direct=_get(obj, "direct", bool, command),
            no_flush=_get(obj, "no-flush", bool, command),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class IoLimits:
    """A drive's I/O throttling (``block_set_io_throttle``); zero means unlimited."""

    bps: int = 0
    bps_rd: int = 0
    bps_wr: int = 0
    iops: int = 0
    iops_rd: int = 0
    iops_wr: int = 0
    group: str | None = None

    @property
    def limited(self) -> bool:
        return any((self.bps, self.bps_rd, self.bps_wr, self.iops, self.iops_rd, self.iops_wr))

    @classmethod
    def from_qmp(cls, obj: Mapping[str, Any], command: str) -> IoLimits:
        values = {
            k: _opt(obj, k, int, command) or 0
            for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
        }
        return cls(**values, group=_opt(obj, "group", str, command))


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockNode:
    """One entry of ``query-named-block-nodes`` (or ``query-block``'s ``inserted``)."""

    node_name: str
    driver: str
    file: str
    read_only: bool
    cache: CacheFlags
    detect_zeroes: str
    backing_file_depth: int
    backing_file: str | None
    virtual_size: int | None
    write_threshold: int
    io_limits: IoLimits

    @classmethod
    def from_qmp(cls, value: object, command: str = "query-named-block-nodes") -> BlockNode:
        obj = _obj(value, command, "node")
        image = obj.get("image")
        size = None
        if image is not None:
            size = _get(_obj(image, command, "image"), "virtual-size", int, command)
        return cls(
            node_name=_get(obj, "node-name", str, command),
            driver=_get(obj, "drv", str, command),
            file=_get(obj, "file", str, command),
            read_only=_get(obj, "ro", bool, command),
            cache=CacheFlags.from_qmp(obj.get("cache"), command),
            detect_zeroes=_get(obj, "detect_zeroes", str, command),
            backing_file_depth=_get(obj, "backing_file_depth", int, command),
            backing_file=_opt(obj, "backing_file", str, command),
            virtual_size=size,
            write_threshold=_opt(obj, "write_threshold", int, command) or 0,
            io_limits=IoLimits.from_qmp(obj, command),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockDevice:
    """One entry of ``query-block``: a guest device (``qdev``) and its inserted medium."""

    qdev: str | None
    device: str
    removable: bool
    locked: bool
    tray_open: bool | None
    inserted: BlockNode | None
    #: ``ok``, or ``failed``/``nospace`` once a failed request paused the VM (error policy
    #: ``stop``/``enospc``) until it is resumed; None for a device QEMU tracks none for.
    io_status: str | None = None

    @property
    def qom_path(self) -> str | None:
        """The guest device's QOM path (QMP's ``id`` arguments take it for any device)."""
        if self.qdev is None:
            return None
        path = self.qdev.removesuffix("/virtio-backend")  # virtio: ``…/disk0/virtio-backend``
        return path if path.startswith("/") else f"/machine/peripheral/{path}"

    @property
    def device_id(self) -> str | None:
        """The name a user types for this drive: the ``-device`` id; for a device without one
        (an anonymous ``-device``, a legacy ``-drive if=virtio|ide``, whose ``qdev`` is
        ``/machine/peripheral-anon/device[0]`` or ``/machine/unattached/…``) the name of its
        BlockBackend (``drive0``, ``ide0-hd0``), which QEMU keeps unique."""
        path = self.qom_path
        if path is None:
            return None
        if path.startswith("/machine/peripheral/"):
            return path.removeprefix("/machine/peripheral/")
        return self.device or path

    @classmethod
    def from_qmp(cls, value: object) -> BlockDevice:
        command = "query-block"
        obj = _obj(value, command, "entry")
        inserted = obj.get("inserted")
        return cls(
            qdev=_opt(obj, "qdev", str, command),
            device=_get(obj, "device", str, command),
            removable=_get(obj, "removable", bool, command),
            locked=_get(obj, "locked", bool, command),
            tray_open=_opt(obj, "tray_open", bool, command),
            inserted=None if inserted is None else BlockNode.from_qmp(inserted, command),
            io_status=_opt(obj, "io-status", str, command),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What this QEMU offers, from ``query-qmp-schema``: decide by feature, not by version."""

    commands: frozenset[str]
    deprecated_commands: frozenset[str]
    events: frozenset[str]

    def has(self, command: str) -> bool:
        return command in self.commands

    def is_deprecated(self, command: str) -> bool:
        return command in self.deprecated_commands

    @classmethod
    def from_qmp(cls, reply: object) -> Capabilities:
        command = "query-qmp-schema"
        commands: set[str] = set()
        deprecated: set[str] = set()
        events: set[str] = set()
        for entry in _list(reply, command, "reply"):
            obj = _obj(entry, command, "entry")
            kind = _get(obj, "meta-type", str, command)
            name = _get(obj, "name", str, command)
            if kind == "command":
                commands.add(name)
                if "deprecated" in obj.get("features", ()):
                    deprecated.add(name)
            elif kind == "event":
                events.add(name)
        if not commands:
            raise ProtocolMismatch(command, "the schema lists no commands")
        return cls(
            commands=frozenset(commands),
            deprecated_commands=frozenset(deprecated),
            events=frozenset(events),
        )


def parse_list(reply: object, command: str, item: type[_T]) -> tuple[_T, ...]:
    """Parse a JSON array reply with ``item.from_qmp`` for each element."""
    from_qmp = item.from_qmp  # type: ignore[attr-defined]
    return tuple(from_qmp(x) for x in _list(reply, command, "reply"))


# Section: jobs


class JobStatus(enum.StrEnum):
    """QEMU's ``JobStatus``: where a job is in its life (qemu-qmp-ref(7), since 2.12)."""

    UNDEFINED = "undefined"  # erroneous default; never visible
    CREATED = "created"  # created, not started
    RUNNING = "running"  # copying
    PAUSED = "paused"  # paused by the user or internally (drained sections pause briefly)
    READY = "ready"  # mirror/active commit: in sync, waiting for job-complete or job-cancel
    STANDBY = "standby"  # ready, but paused
    WAITING = "waiting"  # waiting for the other jobs of its transaction
    PENDING = "pending"  # work done; graph changes wait for job-finalize if auto-finalize=false
    ABORTING = "aborting"  # failing or cancelled; will conclude with an error
    CONCLUDED = "concluded"  # finished; stays listed until job-dismiss (auto-dismiss=false)
    NULL = "null"  # being dismantled (after job-dismiss)


#: Statuses after which a job does no more work.
JOB_FINAL = frozenset({JobStatus.CONCLUDED, JobStatus.NULL})


def _status(value: str, command: str) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        raise ProtocolMismatch(command, f"unknown job status {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobInfo:
    """One entry of ``query-jobs``. ``error`` present means the job failed (or was cancelled)."""

    id: str
    type: str
    status: JobStatus
    current_progress: int
    total_progress: int
    error: str | None

    @classmethod
    def from_qmp(cls, value: object, command: str = "query-jobs") -> JobInfo:
        obj = _obj(value, command, "job")
        return cls(
            id=_get(obj, "id", str, command),
            type=_get(obj, "type", str, command),
            status=_status(_get(obj, "status", str, command), command),
            current_progress=_get(obj, "current-progress", int, command),
            total_progress=_get(obj, "total-progress", int, command),
            error=_opt(obj, "error", str, command),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockJobIOStatus:
    """The I/O status of one block job (``query-block-jobs``): ``ok``, ``failed`` or
    ``nospace`` (the last error it met, kept while it is paused on it)."""

    job_id: str
    io_status: str

    @classmethod
    def from_qmp(cls, value: object, command: str = "query-block-jobs") -> BlockJobIOStatus:
        obj = _obj(value, command, "block job")
        return cls(
            job_id=_get(obj, "device", str, command),
            io_status=_opt(obj, "io-status", str, command) or "ok",
        )


class JobEventKind(enum.Enum):
    """Which job event a :class:`JobEvent` came from."""

    STATUS = "JOB_STATUS_CHANGE"
    READY = "BLOCK_JOB_READY"
    COMPLETED = "BLOCK_JOB_COMPLETED"
    CANCELLED = "BLOCK_JOB_CANCELLED"
    ERROR = "BLOCK_JOB_ERROR"
    PENDING = "BLOCK_JOB_PENDING"


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEvent:
    """A job event, parsed. ``status`` only for STATUS; offset/length/speed for the
    BLOCK_JOB_READY/COMPLETED/CANCELLED events; ``error`` only on a failed COMPLETED;
    ``operation``/``action`` only for ERROR."""

    kind: JobEventKind
    job_id: str
    status: JobStatus | None = None
    job_type: str | None = None
    offset: int | None = None
    length: int | None = None
    speed: int | None = None
    error: str | None = None
    operation: str | None = None
    action: str | None = None

    @classmethod
    def from_event(cls, name: str, data: Mapping[str, Any]) -> JobEvent:
        kind = JobEventKind(name)
        if kind is JobEventKind.STATUS:
            return cls(
                kind=kind,
                job_id=_get(data, "id", str, name),
                status=_status(_get(data, "status", str, name), name),
            )
        if kind is JobEventKind.PENDING:
            return cls(kind=kind, job_id=_get(data, "id", str, name), job_type=data.get("type"))
        if kind is JobEventKind.ERROR:
            return cls(
                kind=kind,
                job_id=_get(data, "device", str, name),
                operation=_opt(data, "operation", str, name),
                action=_opt(data, "action", str, name),
            )
        return cls(
            kind=kind,
            job_id=_get(data, "device", str, name),
            job_type=_opt(data, "type", str, name),
            offset=_get(data, "offset", int, name),
            length=_get(data, "len", int, name),
            speed=_opt(data, "speed", int, name),
            error=_opt(data, "error", str, name),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockExport:
    """One entry of ``query-block-exports``: ``node_name`` is the node it serves now (an
    export follows its node's replacement: a snapshot's overlay, an active commit's base);
    ``type`` is ``nbd``, ``vhost-user-blk``, …"""

    id: str
    type: str
    node_name: str

    @classmethod
    def from_qmp(cls, value: object, command: str = "query-block-exports") -> BlockExport:
        obj = _obj(value, command, "block export")
        return cls(
            id=_get(obj, "id", str, command),
            type=_get(obj, "type", str, command),
            node_name=_get(obj, "node-name", str, command),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DirtyBitmap:
    """One entry of a node's ``dirty-bitmaps`` (``BlockDirtyInfo``)."""

    name: str | None
    count: int
    granularity: int
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool

    @classmethod
    def from_qmp(cls, value: object, command: str) -> DirtyBitmap:
        obj = _obj(value, command, "dirty bitmap")
        return cls(
            name=_opt(obj, "name", str, command),
            count=_get(obj, "count", int, command),
            granularity=_get(obj, "granularity", int, command),
            recording=_get(obj, "recording", bool, command),
            busy=_get(obj, "busy", bool, command),
            persistent=_get(obj, "persistent", bool, command),
            inconsistent=_opt(obj, "inconsistent", bool, command) or False,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeDetail:
    """A ``query-named-block-nodes`` entry with what the block graph needs beyond
    :class:`BlockNode`: the image's own view of its backing file, and its dirty bitmaps."""

    node: BlockNode
    image_filename: str | None
    image_format: str | None
    backing_filename: str | None  # as written in the image header (may be relative)
    full_backing_filename: str | None  # resolved by QEMU
    dirty_bitmaps: tuple[DirtyBitmap, ...]
    snapshots: tuple[str, ...] = ()  # internal snapshot names in the image
    #: (name, vm-state-size) of each internal snapshot: 0 is a disk-only snapshot.
    vm_state_sizes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_qmp(cls, value: object, command: str = "query-named-block-nodes") -> NodeDetail:
        obj = _obj(value, command, "node")
        image = obj.get("image")
        img = {} if image is None else _obj(image, command, "image")
        return cls(
            node=BlockNode.from_qmp(obj, command),
            image_filename=_opt(img, "filename", str, command),
            image_format=_opt(img, "format", str, command),
            backing_filename=_opt(img, "backing-filename", str, command),
            full_backing_filename=_opt(img, "full-backing-filename", str, command),
            dirty_bitmaps=tuple(
                DirtyBitmap.from_qmp(b, command)
                for b in _list(obj.get("dirty-bitmaps", []), command, "dirty-bitmaps")
            ),
            snapshots=tuple(
                str(_get(_obj(s, command, "snapshot"), "name", str, command))
                for s in _list(img.get("snapshots", []), command, "snapshots")
            ),
            vm_state_sizes=tuple(
                (
                    str(_get(_obj(s, command, "snapshot"), "name", str, command)),
                    _get(_obj(s, command, "snapshot"), "vm-state-size", int, command),
                )
                for s in _list(img.get("snapshots", []), command, "snapshots")
            ),
        )


# Section: node options (what blockctl sends to blockdev-add and blockdev-create)
#
# QEMU's option names have hyphens, so these TypedDicts use the functional syntax. They type
# what blockctl builds (mypy checks the keys and their values); the JSON QEMU gets is the
# same dict. Options replayed from a drive's record stay plain JSON: they were built here.

#: ``cache`` of a node: ``direct`` (O_DIRECT) and ``no-flush`` (flushes are not passed down).
CacheOptions = TypedDict("CacheOptions", {"direct": bool, "no-flush": bool}, total=False)


class UnixAddress(TypedDict):
    """A UNIX socket address (QAPI ``SocketAddress``, ``type: unix``)."""

    type: Literal["unix"]
    path: str


#: A protocol node over a file or a host block device (``file``, ``host_device``; a cdrom
#: drive's block device ``host_cdrom``).
FileOptions = TypedDict(
    "FileOptions",
    {
        "driver": Literal["file", "host_device", "host_cdrom"],
        "node-name": str,
        "filename": str,
        "cache": NotRequired[CacheOptions],
        "discard": NotRequired[str],
        "read-only": NotRequired[bool],
        "auto-read-only": NotRequired[bool],
        "aio": NotRequired[str],
    },
)

#: A format node (``qcow2``, ``raw``, ... an :class:`~blockctl.types.ImageFormat` value) over
#: the protocol node ``file``. ``backing``: the node below, or None for none (sent as null:
#: QEMU must not open what the image's header names); absent for formats without backing.
FormatOptions = TypedDict(
    "FormatOptions",
    {
        "driver": str,
        "node-name": str,
        "file": str,
        "backing": NotRequired[str | None],
        "cache": NotRequired[CacheOptions],
        "discard": NotRequired[str],
        "read-only": NotRequired[bool],
        "detect-zeroes": NotRequired[str],
    },
)

#: A protocol node reading an NBD export.
NbdOptions = TypedDict(
    "NbdOptions",
    {
        "driver": Literal["nbd"],
        "node-name": str,
        "server": UnixAddress,
        "export": str,
        "reconnect-delay": NotRequired[int],
        "cache": NotRequired[CacheOptions],
        "read-only": NotRequired[bool],
    },
)

#: A protocol node on an iSCSI LUN (QEMU's libiscsi initiator). ``password-secret`` names a
#: ``secret`` object (:data:`SecretObject`) holding the CHAP password: never the password.
IscsiOptions = TypedDict(
    "IscsiOptions",
    {
        "driver": Literal["iscsi"],
        "node-name": str,
        "transport": Literal["tcp"],
        "portal": str,
        "target": str,
        "lun": int,
        "initiator-name": NotRequired[str],
        "user": NotRequired[str],
        "password-secret": NotRequired[str],
        "cache": NotRequired[CacheOptions],
        "read-only": NotRequired[bool],
    },
)


#: The ``NFSServer`` of an nfs node (its only transport is ``inet``; no port).
class InetServer(TypedDict):
    type: Literal["inet"]
    host: str


#: A protocol node on an image file over NFS (QEMU's libnfs client, NFSv3).
NfsOptions = TypedDict(
    "NfsOptions",
    {
        "driver": Literal["nfs"],
        "node-name": str,
        "server": InetServer,
        "path": str,
        "user": NotRequired[int],
        "group": NotRequired[int],
        "readahead-size": NotRequired[int],
        "cache": NotRequired[CacheOptions],
        "read-only": NotRequired[bool],
    },
)

#: A ``secret`` object whose data QEMU reads from ``file`` (``-object`` / ``object-add``):
#: the secret itself is never in a command line, a QMP message or a record.
SecretObject = TypedDict(
    "SecretObject",
    {"qom-type": Literal["secret"], "id": str, "file": str, "format": Literal["raw"]},
)

#: A ``copy-on-read`` filter over ``file``.
CopyOnReadOptions = TypedDict(
    "CopyOnReadOptions",
    {"driver": Literal["copy-on-read"], "node-name": str, "file": str},
)

#: What ``blockdev-add`` takes from blockctl's builders.
BlockdevOptions = (
    FileOptions | FormatOptions | NbdOptions | IscsiOptions | NfsOptions | CopyOnReadOptions
)


#: ``blockdev-create`` of a qcow2 image inside the existing protocol node ``file``.
class Qcow2CreateOptions(TypedDict):
    driver: Literal["qcow2"]
    file: str
    size: int


def node_json(options: BlockdevOptions) -> dict[str, Any]:
    """``options`` as the plain JSON object a drive's record keeps (a copy)."""
    return dict(options)


def overlay_options(
    name: str, filename: str, *, backing: str | None, cache: CacheOptions | None = None
) -> tuple[FileOptions, FormatOptions]:
    """A qcow2 overlay in ``filename``: its file node ``{name}-file`` and the format node
    ``name`` over it, backed by the node ``backing`` (None: sent as null, nothing opened)."""
    file: FileOptions = {"driver": "file", "node-name": f"{name}-file", "filename": filename}
    fmt: FormatOptions = {
        "driver": "qcow2",
        "node-name": name,
        "file": f"{name}-file",
        "backing": backing,
    }
    if cache is not None:
        file["cache"] = cache.copy()
        fmt["cache"] = cache.copy()
    return file, fmt
