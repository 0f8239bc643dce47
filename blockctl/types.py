"""Public value types: enums and the frozen, validated machine configuration.

Every configuration object checks itself on construction and raises
:class:`~blockctl.errors.ConfigError` naming the field, so a bad config fails before QEMU
is started. Checks that need the file system (does the image exist, is the socket path short
enough) run at launch, in ``blockctl._machine.preflight``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from blockctl.errors import ConfigError

__all__ = [
    "DEFAULT_HOTPLUG_SLOTS",
    "MAX_HOTPLUG_SLOTS",
    "MAX_SIZE",
    "coerce_enum",
    "drive_paths_relative_to",
    "drive_slot",
    "is_pcie_machine",
    "iscsi_url",
    "nfs_url",
    "parse_size",
    "relative_to",
    "Accel",
    "Aio",
    "BootConfig",
    "CacheMode",
    "DeprecatedInput",
    "DetectZeroes",
    "DeviceErrorPolicy",
    "Discard",
    "Drive",
    "ErrorPolicy",
    "ImageFormat",
    "Interface",
    "IscsiSource",
    "MachineConfig",
    "Media",
    "NbdSource",
    "NfsSource",
    "Passthrough",
    "VhostUserBlkSource",
]


class ImageFormat(enum.StrEnum):
    """Image formats blockctl opens. There is no "auto": blockctl never probes a format."""

    RAW = "raw"
    QCOW2 = "qcow2"
    QED = "qed"
    VMDK = "vmdk"
    VDI = "vdi"
    VPC = "vpc"
    VHDX = "vhdx"


class Interface(enum.StrEnum):
    """How the drive is presented to the guest (``-drive if=``)."""

    VIRTIO = "virtio"
    SCSI = "scsi"
    IDE = "ide"
    FLOPPY = "floppy"


class Media(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"


class Passthrough(enum.StrEnum):
    """How a LUN is passed through to the guest (TOML ``passthrough = "block"`` or
    ``"generic"``; ``true`` is ``"block"``). Either way the guest's SCSI commands go to the
    target as they are (SG_IO, which QEMU's ``iscsi`` node answers itself)."""

    #: ``scsi-block``: reads and writes go through QEMU's block layer as requests (rerror /
    #: werror apply), every other command is passed on.
    BLOCK = "block"
    #: ``scsi-generic``: every command, reads and writes too, is passed on as it is (no
    #: rerror/werror, no write-cache or serial of QEMU's).
    GENERIC = "generic"

    @property
    def device_driver(self) -> str:
        return "scsi-block" if self is Passthrough.BLOCK else "scsi-generic"


class CacheMode(enum.StrEnum):
    """QEMU's five cache modes, each a combination of three flags (qemu-system(1), -drive)."""

    WRITEBACK = "writeback"
    NONE = "none"
    WRITETHROUGH = "writethrough"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"

    @property
    def write_cache(self) -> bool:
        """The device's write cache: the guest sees a volatile cache and must flush."""
        return self in (CacheMode.WRITEBACK, CacheMode.NONE, CacheMode.UNSAFE)

    @property
    def direct(self) -> bool:
        """O_DIRECT on the host file: bypass the host page cache."""
        return self in (CacheMode.NONE, CacheMode.DIRECTSYNC)

    @property
    def no_flush(self) -> bool:
        """Ignore the guest's flush requests (data is lost on a host crash)."""
        return self is CacheMode.UNSAFE


class Aio(enum.StrEnum):
    THREADS = "threads"
    NATIVE = "native"
    IO_URING = "io_uring"


class Discard(enum.StrEnum):
    IGNORE = "ignore"
    UNMAP = "unmap"


class DetectZeroes(enum.StrEnum):
    OFF = "off"
    ON = "on"
    UNMAP = "unmap"


class ErrorPolicy(enum.StrEnum):
    """What a block job does on an I/O error (QEMU's ``on-error`` and friends).

    ``report`` (QEMU's default): the job fails. ``stop``: it pauses until resumed (blockctl
    waits ``pause_timeout`` seconds for that, then cancels it). ``enospc``: ``stop`` on "no
    space left", ``report`` on anything else. ``ignore``: retry the failing request, a bounded
    number of times (then the job fails): a transient fault is ridden out, a persistent one
    still fails the job. (blockctl runs the job with QEMU's ``stop`` and resumes it itself:
    QEMU's own ``ignore`` retries in a tight loop that floods the QMP monitor.)
    """

    REPORT = "report"
    STOP = "stop"
    ENOSPC = "enospc"
    IGNORE = "ignore"


class DeviceErrorPolicy(enum.StrEnum):
    """What a guest device does when its image fails a read (``rerror``) or a write
    (``werror``): QEMU's ``BlockdevOnError`` on ``-device``.

    ``report``: the guest sees the I/O error. ``ignore``: the request completes as if it had
    succeeded (data may be lost). ``stop``: QEMU pauses the whole VM (run state ``io-error``,
    event ``BLOCK_IO_ERROR``) and retries the failed requests on resume: the guest sees no
    error, so an outage of a remote image server is ridden out. ``enospc`` (writes only):
    ``stop`` on "no space left", ``report`` on anything else. Unset: QEMU's ``auto``
    (``enospc`` for writes, ``report`` for reads, device-dependent).
    """

    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"


class Accel(enum.StrEnum):
    """``auto`` uses KVM only where it can really run a guest, TCG otherwise."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class DeprecatedInput(enum.StrEnum):
    """What QEMU does with deprecated QMP commands and arguments (``-compat deprecated-input``).

    ``reject`` makes QEMU refuse them (``drive-backup`` → CommandNotFound, ``block-commit top``
    → "Deprecated parameter top disabled by policy"), so a use of a deprecated interface fails
    loudly instead of breaking on a later QEMU; blockctl's own tests run with it.
    """

    ACCEPT = "accept"
    REJECT = "reject"


_E = TypeVar("_E", bound=enum.Enum)

# What QEMU's -machine, and identifiers of ours, may look like; anything else is refused rather
# than passed through to an option string.
#: PCIe root ports a q35 VM gets at launch unless its config says otherwise (libvirt adds a
#: few free ones too); each holds one hot-plugged PCI device. A virtio-scsi controller on one
#: port holds hundreds of disks.
DEFAULT_HOTPLUG_SLOTS = 8
#: The root complex has 32 slots, some used by the chipset and the cold-plugged devices.
MAX_HOTPLUG_SLOTS = 24


def is_pcie_machine(machine: str) -> bool:
    """A q35 machine type ('q35', 'pc-q35-7.2'): its root bus pcie.0 has no hot-plug."""
    return "q35" in machine


_MACHINE_TYPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_BOOT_DRIVES = re.compile(r"[a-p]*")
_MAX_SERIAL = 20  # virtio-blk and IDE truncate serials longer than 20 bytes


def _enum(kind: type[_E], value: object, where: str) -> _E:
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise ConfigError(where, f"{value!r} is not one of: {allowed}") from None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def relative_to(base: Path, value: str, where: str) -> Path:
    """A path from a file (TOML) resolved against the file's directory ``base``, after the
    checks of a path: a protocol string (``http://…``) is refused as such, not joined to
    ``base`` and then reported missing."""
    return base / _check_path(value, where)


def drive_paths_relative_to(base: Path, item: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A ``[[drive]]`` table with its paths (``file``, ``iscsi.password-file``) resolved
    against ``base`` (see :func:`relative_to`)."""
    values = dict(item)
    if isinstance(values.get("file"), str):
        values["file"] = relative_to(base, values["file"], f"{where}.file")
    iscsi = values.get("iscsi")
    if isinstance(iscsi, Mapping):
        iscsi = dict(iscsi)
        for key in ("password-file", "password_file"):
            if isinstance(iscsi.get(key), str):
                iscsi[key] = relative_to(base, iscsi[key], f"{where}.iscsi.{key}")
        values["iscsi"] = iscsi
    for key in ("vhost-user-blk", "vhost_user_blk"):
        vhost = values.get(key)
        if isinstance(vhost, Mapping) and isinstance(vhost.get("file"), str):
            values[key] = {**vhost, "file": relative_to(base, vhost["file"], f"{where}.{key}.file")}
    return values


def _check_path(value: object, where: str) -> Path:
    if not isinstance(value, str | Path):
        raise ConfigError(where, f"expected a file path, got {type(value).__name__}")
    text = str(value)
    if not text or "\0" in text or "\n" in text:
        raise ConfigError(where, "a path must be non-empty and contain no NUL or newline")
    if not _utf8(text):
        # QEMU's JSON options carry Unicode text: an undecodable file name (a lone surrogate
        # from os.fsdecode) would reach QEMU as some other name.
        raise ConfigError(where, f"{text!r} is not valid UTF-8 text")
    # A protocol prefix would be read as a URL or JSON by some QEMU front-ends; blockctl takes
    # plain local paths only.
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text):
        raise ConfigError(
            where,
            f"{text!r} looks like a protocol string (json:, nbd:, "
            "http:, ...); give a local path (./name if it really has a colon)",
        )
    return Path(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdSource:
    """An NBD export on a local unix socket (e.g. served by ``qemu-nbd``) as a drive's image."""

    socket: Path
    export: str = ""
    #: Seconds QEMU's NBD client keeps requests waiting, while it reconnects, after the
    #: server went away, before failing them (QEMU's ``reconnect-delay``; 0: fail at once).
    #: Requests that outlast it fail, and the drive's ``rerror``/``werror`` decide what the
    #: guest sees. QEMU's client reconnects after a lost connection either way.
    reconnect_delay: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket", _check_path(self.socket, "nbd.socket"))
        delay = self.reconnect_delay
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= 3600:
            raise ConfigError("nbd.reconnect_delay", f"whole seconds from 0 to 3600, got {delay!r}")
        if (
            not isinstance(self.export, str)
            or "\0" in self.export
            or not _utf8(self.export)
            or len(self.export.encode()) > 4096
        ):
            raise ConfigError("nbd.export", "an export name is a string of at most 4096 bytes")

    @classmethod
    def from_mapping(cls, data: object, where: str) -> NbdSource:
        if not isinstance(data, Mapping):
            raise ConfigError(where, 'use a table: nbd = { socket = "/path", export = "" }')
        return _from_mapping(cls, data, where, aliases={})


#: iSCSI names (RFC 3720 3.2.6.3): ``iqn.YYYY-MM.reversed.domain[:anything]``, ``eui.`` + 16
#: hex digits, ``naa.`` + 16 or 32 hex digits; at most 223 bytes. No ``/`` (the URL's separator).
_ISCSI_NAME = re.compile(
    r"(?:iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(?::[A-Za-z0-9.:_-]+)?"
    r"|eui\.[0-9A-Fa-f]{16}|naa\.(?:[0-9A-Fa-f]{16}|[0-9A-Fa-f]{32}))",
    re.ASCII,
)
_MAX_ISCSI_NAME = 223
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\]", re.ASCII)
#: A LUN in SAM's flat space addressing (what tgt and libiscsi take).
_MAX_LUN = 16383
_ISCSI_PORT = 3260


def _iscsi_name(value: object, where: str) -> str:
    if (
        not isinstance(value, str)
        or len(value) > _MAX_ISCSI_NAME
        or not _ISCSI_NAME.fullmatch(value)
    ):
        raise ConfigError(
            where,
            f"{value!r} is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:name] "
            "(lower case), eui.<16 hex> or naa.<16 or 32 hex>",
        )
    return value


def iscsi_url(portal: str, target: str, lun: object) -> str:
    """``iscsi://portal/target/lun``: the one name of a LUN, in blockctl's output and in the
    graph read from QEMU (never with credentials)."""
    return f"iscsi://{portal}/{target}/{lun}"


@dataclass(frozen=True, slots=True, kw_only=True)
class IscsiSource:
    """A LUN of an iSCSI target as a drive's storage, reached by QEMU's own initiator
    (libiscsi, driver ``iscsi``; no kernel initiator).

    Attributes:
        portal: ``host:port`` of the target's portal (port 3260 when left out).
        target: the target's IQN.
        lun: the logical unit number.
        initiator_name: the IQN QEMU logs in as (QEMU's default when None).
        user, password_file: CHAP credentials; the password is read by QEMU from the file
            (a ``secret`` object), never put on a command line, in a log or a record.
    """

    portal: str
    target: str
    lun: int = 0
    initiator_name: str | None = None
    user: str | None = None
    password_file: Path | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "portal", _portal(self.portal, "iscsi.portal"))
        _iscsi_name(self.target, "iscsi.target")
        if (
            isinstance(self.lun, bool)
            or not isinstance(self.lun, int)
            or not 0 <= self.lun <= _MAX_LUN
        ):
            raise ConfigError("iscsi.lun", f"{self.lun!r}: a LUN from 0 to {_MAX_LUN}")
        if self.initiator_name is not None:
            _iscsi_name(self.initiator_name, "iscsi.initiator_name")
        if self.user is not None and (
            not isinstance(self.user, str) or not re.fullmatch(r"[\x21-\x7e]{1,255}", self.user)
        ):
            raise ConfigError("iscsi.user", "a CHAP user name is 1-255 printable ASCII characters")
        if self.password_file is not None:
            put(self, "password_file", _check_path(self.password_file, "iscsi.password_file"))
        if (self.user is None) != (self.password_file is None):
            raise ConfigError(
                "iscsi.password_file" if self.user is not None else "iscsi.user",
                "CHAP needs both user and password_file (a file holding the password)",
            )

    @property
    def url(self) -> str:
        """``iscsi://portal/target/lun``: how QEMU's tools and blockctl's output name it
        (never the credentials)."""
        return iscsi_url(self.portal, self.target, self.lun)

    @classmethod
    def from_url(cls, url: str, where: str = "iscsi") -> IscsiSource:
        """``iscsi://host[:port]/target-iqn/lun`` parsed into its parts; a malformed URL is a
        ConfigError naming the part. Credentials in the URL are refused (a password would be
        in the clear in the shell's history and the process list): CHAP is given apart."""
        prefix = "iscsi://"
        if not isinstance(url, str) or not url.startswith(prefix):
            raise ConfigError(where, f"{url!r} is not an iscsi://host[:port]/target/lun URL")
        rest = url[len(prefix) :]
        if any(c in rest for c in "?#") or any(c.isspace() for c in rest):
            raise ConfigError(where, "an iscsi:// URL takes no query, fragment or spaces")
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            userinfo = netloc.rpartition("@")[0]
            if ":" in userinfo or "%" in userinfo:
                raise ConfigError(
                    f"{where}.password",
                    "no password in a URL (it would be visible to every user of the host); "
                    "give the CHAP user and a password file (0600) instead",
                )
            raise ConfigError(
                f"{where}.user",
                "give the CHAP user apart from the URL, with its password file "
                "(user + password_file; on the command line --chap-user, --chap-password-file)",
            )
        if not slash:
            raise ConfigError(f"{where}.target", "missing: iscsi://host[:port]/target/lun")
        parts = path.split("/")
        if len(parts) != 2 or not parts[0]:
            raise ConfigError(
                f"{where}.target" if not parts[0] else f"{where}.lun",
                f"{path!r}: the path is /target-iqn/lun",
            )
        target, lun_text = parts
        if not lun_text.isascii() or not lun_text.isdigit():
            raise ConfigError(f"{where}.lun", f"{lun_text!r}: a LUN is a number")
        return cls(portal=netloc, target=target, lun=int(lun_text))

    @classmethod
    def from_mapping(cls, data: object, where: str) -> IscsiSource:
        """From a TOML table (or an ``iscsi://`` URL string); errors name ``where``."""
        try:
            if isinstance(data, str):
                return cls.from_url(data, "iscsi")
            if not isinstance(data, Mapping):
                raise ConfigError(
                    where,
                    'use a table: iscsi = { portal = "host:3260", target = "iqn...", lun = 1 }',
                )
            return _from_mapping(cls, data, "iscsi", aliases={})
        except ConfigError as exc:
            if exc.field == "iscsi" or exc.field.startswith("iscsi."):
                raise ConfigError(where + exc.field[len("iscsi") :], exc.message) from None
            raise


def _portal(value: object, where: str) -> str:
    """``host[:port]`` checked, with the port made explicit."""
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"{value!r}: give host:port, e.g. 127.0.0.1:3260")
    host, port_text = value, ""
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ConfigError(where, f"{value!r}: an IPv6 address is written [addr]:port")
        host, port_text = value[: close + 1], value[close + 1 :]
        if port_text and not port_text.startswith(":"):
            raise ConfigError(where, f"{value!r}: expected :port after the address")
        port_text = port_text[1:]
    elif ":" in value:
        host, _, port_text = value.rpartition(":")
    if not _HOST.fullmatch(host):
        raise ConfigError(where, f"{host!r} is not a host name or IP address")
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(where, f"{port_text!r} is not a TCP port (1-65535)")
        port = int(port_text)
    else:
        port = _ISCSI_PORT
    return f"{host}:{port}"


#: QEMU's nfs driver (nfs.c) clamps a larger readahead to 1 MiB with a warning: refused here.
_MAX_NFS_READAHEAD = 1024 * 1024
#: libnfs takes uid and gid as a C int.
_MAX_NFS_ID = 2**31 - 1
#: The URL query keys of QEMU's nfs:// syntax that blockctl takes, and the fields they fill.
_NFS_QUERY = {"uid": "user", "gid": "group", "readahead": "readahead_size"}
_NFS_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})", re.ASCII)


def nfs_url(server: str, path: str, user: int | None = None, group: int | None = None) -> str:
    """``nfs://server/path[?uid=U][&gid=G]``: the one name of an image over NFS, in blockctl's
    output and in the graph read from QEMU. It is QEMU's own name for an nfs node
    (``nfs_refresh_filename``: uid and gid only when non-zero), so a live disk's filename
    reads back equal to its source's URL."""
    query = [f"{key}={value}" for key, value in (("uid", user), ("gid", group)) if value]
    return f"nfs://{server}{path}" + (f"?{'&'.join(query)}" if query else "")


def _nfs_id(value: object, where: str) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_NFS_ID
    ):
        raise ConfigError(where, f"{value!r}: a numeric id from 0 to {_MAX_NFS_ID}")


@dataclass(frozen=True, slots=True, kw_only=True)
class NfsSource:
    """An image file on an NFS server as a drive's storage, reached by QEMU's own NFSv3
    client (libnfs, driver ``nfs``; the host mounts nothing).

    QEMU mounts the directory holding ``path`` (the export, or a directory in it) and asks
    the server's portmapper (port 111) for the MOUNT and NFS ports: its nfs driver has no
    port or protocol-version option, so neither has this.

    Attributes:
        server: the server's host name or IPv4 address.
        path: the image's absolute path on the server (export path + file path).
        user, group: the uid and gid QEMU sends (AUTH_SYS); the server's squashing applies.
        readahead_size: libnfs read-ahead in bytes, at most 1 MiB (None: libnfs's default).
    """

    server: str
    path: str
    user: int | None = None
    group: int | None = None
    readahead_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.server, str) or not _NFS_HOST.fullmatch(self.server):
            raise ConfigError(
                "nfs.server",
                f"{self.server!r} is not a host name or IPv4 address (no port: QEMU asks the "
                "server's portmapper on port 111)",
            )
        path = self.path
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or any(c in path for c in "\0\n?#")
            or not _utf8(path)
        ):
            raise ConfigError(
                "nfs.path",
                f"{path!r}: the image's absolute path on the server, e.g. /export/disk.qcow2 "
                "(UTF-8, no NUL, newline, ? or #)",
            )
        directory, _, name = path.rpartition("/")
        if not directory or not name or "" in directory.split("/")[1:]:
            raise ConfigError(
                "nfs.path",
                f"{path!r}: give /export/.../file (QEMU mounts the directory holding the file)",
            )
        if any(part in (".", "..") for part in path.split("/")):
            raise ConfigError("nfs.path", f"{path!r}: no . or .. components")
        _nfs_id(self.user, "nfs.user")
        _nfs_id(self.group, "nfs.group")
        size = self.readahead_size
        if size is not None and (
            isinstance(size, bool)
            or not isinstance(size, int)
            or not 0 <= size <= _MAX_NFS_READAHEAD
        ):
            raise ConfigError(
                "nfs.readahead_size", f"{size!r}: bytes from 0 to {_MAX_NFS_READAHEAD} (1 MiB)"
            )

    @property
    def url(self) -> str:
        """``nfs://server/path[?uid=U][&gid=G]``, QEMU's name for the node (see :func:`nfs_url`)."""
        return nfs_url(self.server, self.path, self.user, self.group)

    @classmethod
    def from_url(cls, url: str, where: str = "nfs") -> NfsSource:
        """``nfs://server/path/to/file[?uid=U&gid=G&readahead=BYTES]`` (QEMU's nfs URL)
        parsed into its parts; a malformed URL is a ConfigError naming the part."""
        prefix = "nfs://"
        if not isinstance(url, str) or not url.startswith(prefix):
            raise ConfigError(where, f"{url!r} is not an nfs://server/path/to/file URL")
        rest, question, query = url[len(prefix) :].partition("?")
        if "#" in rest or "#" in query or any(c.isspace() for c in url):
            raise ConfigError(where, "an nfs:// URL takes no fragment or spaces")
        if question and not query:
            raise ConfigError(where, "a '?' with no options after it: drop it")
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            raise ConfigError(
                f"{where}.user",
                "NFS (AUTH_SYS) has no user name or password: give a numeric ?uid=U&gid=G",
            )
        if ":" in netloc:
            raise ConfigError(
                f"{where}.server",
                f"{netloc!r}: no port (QEMU's nfs driver has no port option: it asks the "
                "server's portmapper on port 111); drop the :PORT",
            )
        if not netloc:
            raise ConfigError(f"{where}.server", "missing: nfs://server/path/to/file")
        if not slash:
            raise ConfigError(f"{where}.path", "missing: nfs://server/path/to/file")
        values: dict[str, Any] = {"server": netloc, "path": "/" + path}
        for item in query.split("&") if question else ():
            key, eq, text = item.partition("=")
            if key not in _NFS_QUERY:
                raise ConfigError(
                    f"{where}.{key or '?'}",
                    f"unknown nfs:// URL option; known: {', '.join(_NFS_QUERY)}",
                )
            field = _NFS_QUERY[key]
            if field in values:
                raise ConfigError(f"{where}.{field}", f"?{key}= given twice")
            if not eq or not text.isascii() or not text.isdigit():
                raise ConfigError(f"{where}.{field}", f"{key}={text!r}: a number")
            values[field] = int(text)
        return cls(**values)

    @classmethod
    def from_mapping(cls, data: object, where: str) -> NfsSource:
        """From a TOML table (or an ``nfs://`` URL string); errors name ``where``."""
        try:
            if isinstance(data, str):
                return cls.from_url(data, "nfs")
            if not isinstance(data, Mapping):
                raise ConfigError(
                    where, 'use a table: nfs = { server = "host", path = "/export/disk.qcow2" }'
                )
            return _from_mapping(cls, data, "nfs", aliases={})
        except ConfigError as exc:
            if exc.field == "nfs" or exc.field.startswith("nfs."):
                raise ConfigError(where + exc.field[len("nfs") :], exc.message) from None
            raise


@dataclass(frozen=True, slots=True, kw_only=True)
class VhostUserBlkSource:
    """A local image served to the guest by a ``qemu-storage-daemon`` of its own, over a
    vhost-user-blk socket (``-device vhost-user-blk-pci``): the guest's I/O goes to the daemon
    through shared guest memory, not through QEMU's block layer.

    blockctl starts one daemon per such drive before QEMU (or on hot-plug) and stops and reaps
    it with the VM (or on unplug). The image's nodes live in the daemon, not in QEMU: QEMU's
    ``query-block`` does not list the disk, and block operations would have to go to the
    daemon's own QMP monitor (blockctl refuses them for now, naming the daemon).

    Attributes:
        file: the image (a local file or block device); its format is the drive's ``format``.
    """

    file: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "file", _check_path(self.file, "vhost_user_blk.file"))

    @classmethod
    def from_mapping(cls, data: object, where: str) -> VhostUserBlkSource:
        """From a TOML table; errors name ``where``."""
        if not isinstance(data, Mapping):
            raise ConfigError(where, 'use a table: vhost-user-blk = { file = "disk.qcow2" }')
        try:
            return _from_mapping(cls, data, "vhost_user_blk", aliases={})
        except ConfigError as exc:
            if exc.field.startswith("vhost_user_blk"):
                raise ConfigError(where + exc.field[len("vhost_user_blk") :], exc.message) from None
            raise


@dataclass(frozen=True, slots=True, kw_only=True)
class Drive:
    """One drive, with the options of QEMU's ``-drive``, launched as ``-blockdev`` nodes.

    Attributes:
        file: the image; ``None`` only for an empty cdrom tray.
        format: the image format, mandatory with ``file``: blockctl never probes.
        interface, media: how the guest sees it; a cdrom is read-only and never virtio.
        bus, unit, index: placement as with ``-drive``; ``index`` derives bus and unit.
        cache: one of QEMU's five cache modes.
        snapshot: writes go to a throwaway qcow2 overlay deleted at shutdown.
        copy_on_read: a copy-on-read filter on top, populating the image from its backing.
        bootindex: boot priority of this device (lower boots first).
    """

    file: Path | None = None
    format: ImageFormat | None = None
    interface: Interface = Interface.VIRTIO
    media: Media = Media.DISK
    bus: int | None = None
    unit: int | None = None
    index: int | None = None
    cache: CacheMode = CacheMode.WRITEBACK
    aio: Aio = Aio.THREADS
    read_only: bool = False
    serial: str | None = None
    snapshot: bool = False
    copy_on_read: bool = False
    discard: Discard = Discard.IGNORE
    detect_zeroes: DetectZeroes = DetectZeroes.OFF
    bootindex: int | None = None
    nbd: NbdSource | None = None
    iscsi: IscsiSource | None = None
    nfs: NfsSource | None = None
    #: The image is served by a qemu-storage-daemon over vhost-user-blk (TOML
    #: ``vhost-user-blk = { file = "..." }``); the VM's guest RAM must be shared memory.
    vhost_user_blk: VhostUserBlkSource | None = None
    #: SCSI LUN passthrough: the guest gets the LUN itself (``scsi-block`` or
    #: ``scsi-generic``: SCSI commands go to the target, the guest sees its vendor, VPD
    #: pages, ...), not an emulated disk. ``True`` (TOML ``true``) is :attr:`Passthrough.BLOCK`.
    passthrough: Passthrough | None = None
    #: What the device does on a failed read / write (:class:`DeviceErrorPolicy`); None:
    #: QEMU's default. ``stop`` pauses the VM until it is resumed (``blockctl resume``).
    rerror: DeviceErrorPolicy | None = None
    werror: DeviceErrorPolicy | None = None

    def __post_init__(self) -> None:
        self._validate("drive")

    def _validate(self, where: str) -> None:
        put = object.__setattr__
        if isinstance(self.file, str) and self.file.startswith(("nfs://", "iscsi://")):
            kind = self.file.partition(":")[0]
            raise ConfigError(
                f"{where}.file", f"a remote image is given as {kind} = {self.file!r}, not as file"
            )
        if self.file is not None:
            put(self, "file", _check_path(self.file, f"{where}.file"))
        if self.format is not None:
            put(self, "format", _enum(ImageFormat, self.format, f"{where}.format"))
        put(self, "interface", _enum(Interface, self.interface, f"{where}.interface"))
        put(self, "media", _enum(Media, self.media, f"{where}.media"))
        put(self, "cache", _enum(CacheMode, self.cache, f"{where}.cache"))
        put(self, "aio", _enum(Aio, self.aio, f"{where}.aio"))
        put(self, "discard", _enum(Discard, self.discard, f"{where}.discard"))
        put(
            self, "detect_zeroes", _enum(DetectZeroes, self.detect_zeroes, f"{where}.detect_zeroes")
        )
        for name in ("rerror", "werror"):
            if getattr(self, name) is not None:
                put(self, name, _enum(DeviceErrorPolicy, getattr(self, name), f"{where}.{name}"))
        if self.rerror is DeviceErrorPolicy.ENOSPC:
            raise ConfigError(
                f"{where}.rerror",
                "'enospc' is for writes (werror): a read never runs out of space; "
                "use rerror = 'stop' or 'report'",
            )
        if self.interface is Interface.FLOPPY and (self.rerror or self.werror):
            raise ConfigError(
                f"{where}.rerror" if self.rerror else f"{where}.werror",
                "QEMU's floppy device takes no rerror/werror: use if = 'virtio', 'scsi' or "
                "'ide' for an error policy, or drop it",
            )
        for name in ("bus", "unit", "index", "bootindex"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ConfigError(
                    f"{where}.{name}", f"must be a non-negative integer, got {value!r}"
                )
        for name in ("read_only", "snapshot", "copy_on_read"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{where}.{name}", "must be true or false")
        passthrough: object = self.passthrough
        if passthrough is True:
            put(self, "passthrough", Passthrough.BLOCK)
        elif passthrough is False:
            put(self, "passthrough", None)
        elif passthrough is not None:
            try:
                put(
                    self,
                    "passthrough",
                    Passthrough(passthrough if isinstance(passthrough, str) else ""),
                )
            except ValueError:
                raise ConfigError(
                    f"{where}.passthrough",
                    f"{passthrough!r}: true or 'block' (scsi-block), 'generic' (scsi-generic), "
                    "or false",
                ) from None

        if self.nbd is not None:
            if not isinstance(self.nbd, NbdSource):
                put(self, "nbd", NbdSource.from_mapping(self.nbd, f"{where}.nbd"))
            if self.file is not None:
                raise ConfigError(f"{where}.nbd", "give either file or nbd, not both")
            if self.snapshot:
                raise ConfigError(f"{where}.snapshot", "no throwaway overlay over NBD")
        if self.iscsi is not None:
            if not isinstance(self.iscsi, IscsiSource):
                put(self, "iscsi", IscsiSource.from_mapping(self.iscsi, f"{where}.iscsi"))
            if self.file is not None or self.nbd is not None:
                raise ConfigError(f"{where}.iscsi", "give one of file, nbd or iscsi")
            if self.snapshot:
                raise ConfigError(f"{where}.snapshot", "no throwaway overlay over iSCSI")
        if self.nfs is not None:
            if not isinstance(self.nfs, NfsSource):
                put(self, "nfs", NfsSource.from_mapping(self.nfs, f"{where}.nfs"))
            if self.file is not None or self.nbd is not None or self.iscsi is not None:
                raise ConfigError(f"{where}.nfs", "give one of file, nbd, iscsi or nfs")
            if self.snapshot:
                raise ConfigError(f"{where}.snapshot", "no throwaway overlay over NFS")
        if self.vhost_user_blk is not None:
            self._validate_vhost(where)
        if self.passthrough:
            if self.iscsi is None:
                raise ConfigError(
                    f"{where}.passthrough",
                    f"LUN passthrough ({self.passthrough.device_driver}) needs an iscsi LUN "
                    "(the host has no SCSI devices blockctl passes through)",
                )
            if self.interface is not Interface.SCSI or self.media is not Media.DISK:
                raise ConfigError(f"{where}.passthrough", "a passed-through LUN needs if = 'scsi'")
            if self.format is not ImageFormat.RAW and self.format is not None:
                raise ConfigError(
                    f"{where}.passthrough",
                    "the guest reads the LUN itself: the format must be 'raw'",
                )
            if self.serial is not None:
                raise ConfigError(
                    f"{where}.serial", "a passed-through LUN reports the target's own serial"
                )
            if self.copy_on_read or self.detect_zeroes is not DetectZeroes.OFF:
                raise ConfigError(
                    f"{where}.passthrough",
                    "SCSI commands bypass the block layer: no copy_on_read or detect_zeroes",
                )
            # QEMU: "Device doesn't support drive option werror" for anything but its defaults.
            if self.passthrough is Passthrough.GENERIC and (
                self.rerror not in (None, DeviceErrorPolicy.REPORT)
                or self.werror not in (None, DeviceErrorPolicy.ENOSPC)
            ):
                raise ConfigError(
                    f"{where}.rerror"
                    if self.rerror not in (None, DeviceErrorPolicy.REPORT)
                    else f"{where}.werror",
                    "scsi-generic takes no rerror/werror policy (the guest gets the target's "
                    "own errors): drop it, or pass the LUN through as 'block' (scsi-block)",
                )
        if (
            self.file is None
            and self.nbd is None
            and self.iscsi is None
            and self.nfs is None
            and self.vhost_user_blk is None
        ):
            if self.media is not Media.CDROM:
                raise ConfigError(
                    f"{where}.file", "a disk needs an image file; only a cdrom may start empty"
                )
            if self.format is not None:
                raise ConfigError(f"{where}.format", "an empty cdrom has no format")
        elif self.format is None:  # an image, from a file, over NBD, iSCSI or NFS
            raise ConfigError(
                f"{where}.format",
                "the image format is mandatory (blockctl never probes formats); "
                "use 'qcow2' or 'raw', see `qemu-img info -f FORMAT FILE`",
            )
        if self.media is Media.CDROM:
            if self.interface in (Interface.VIRTIO, Interface.FLOPPY):
                raise ConfigError(
                    f"{where}.media",
                    f"a cdrom needs interface 'ide' or 'scsi', not {self.interface.value!r}",
                )
            # Like -drive media=cdrom: a cdrom is read-only whatever the user says.
            put(self, "read_only", True)
        if self.aio is Aio.NATIVE and not self.cache.direct:
            raise ConfigError(
                f"{where}.aio",
                "aio 'native' needs O_DIRECT: use cache 'none' or 'directsync', or aio 'threads'",
            )
        if self.index is not None and (self.bus is not None or self.unit is not None):
            raise ConfigError(f"{where}.index", "give either index, or bus/unit, not both")
        if self.serial is not None:
            if not isinstance(self.serial, str) or not re.fullmatch(r"[\x20-\x7e]+", self.serial):
                raise ConfigError(f"{where}.serial", "must be printable ASCII")
            if len(self.serial) > _MAX_SERIAL:
                raise ConfigError(
                    f"{where}.serial",
                    f"at most {_MAX_SERIAL} characters (QEMU truncates longer serials silently)",
                )
        if self.interface is Interface.FLOPPY and self.serial is not None:
            raise ConfigError(f"{where}.serial", "a floppy has no serial number")
        if self.snapshot and self.read_only:
            raise ConfigError(f"{where}.snapshot", "a read-only drive needs no snapshot overlay")
        if self.copy_on_read and self.read_only:
            raise ConfigError(
                f"{where}.copy_on_read",
                "copy-on-read writes to the image; the drive cannot be read-only",
            )
        if self.detect_zeroes is DetectZeroes.UNMAP and self.discard is not Discard.UNMAP:
            raise ConfigError(f"{where}.detect_zeroes", "'unmap' needs discard = 'unmap'")

    def _validate_vhost(self, where: str) -> None:
        """A vhost-user-blk disk: a virtio disk whose device (vhost-user-blk-pci) has none of
        the block-backend options of QEMU's other disks."""
        key = f"{where}.vhost_user_blk"
        if not isinstance(self.vhost_user_blk, VhostUserBlkSource):
            object.__setattr__(
                self, "vhost_user_blk", VhostUserBlkSource.from_mapping(self.vhost_user_blk, key)
            )
        if any(s is not None for s in (self.file, self.nbd, self.iscsi, self.nfs)):
            raise ConfigError(key, "give one of file, nbd, iscsi, nfs or vhost_user_blk")
        if self.interface is not Interface.VIRTIO or self.media is not Media.DISK:
            raise ConfigError(key, "a vhost-user-blk drive is a virtio disk (if = 'virtio')")
        refused = {
            "snapshot": (self.snapshot, "no throwaway overlay: the image lives in the daemon"),
            "copy_on_read": (self.copy_on_read, "no copy-on-read filter in the daemon (yet)"),
            "serial": (
                self.serial is not None,
                "vhost-user-blk-pci has no serial property (the daemon answers the guest's "
                "serial request itself)",
            ),
            "rerror": (
                self.rerror is not None or self.werror is not None,
                "vhost-user-blk-pci takes no rerror/werror: errors are the daemon's",
            ),
        }
        for name, (given, why) in refused.items():
            if given:
                raise ConfigError(f"{where}.{name}", why)

    @property
    def remote_url(self) -> str | None:
        """The URL of the drive's iSCSI LUN or NFS image: how the live disk's file reads back
        from QEMU (blockctl matches and refuses a second writer by it). None otherwise."""
        if self.iscsi is not None:
            return self.iscsi.url
        if self.nfs is not None:
            return self.nfs.url
        return None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "drive") -> Drive:
        """Build from a TOML table, with errors naming ``where`` (e.g. ``drive[1].cache``)."""
        return _from_mapping(cls, data, where, aliases={"if": "interface"})


@dataclass(frozen=True, slots=True, kw_only=True)
class BootConfig:
    """``-boot``: order of drive letters (c disk, d cdrom, a floppy, n network) and menu."""

    order: str | None = None
    once: str | None = None
    menu: bool | None = None
    splash: Path | None = None
    splash_time: int | None = None
    strict: bool | None = None

    def __post_init__(self) -> None:
        for name in ("order", "once"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value or not _BOOT_DRIVES.fullmatch(value):
                raise ConfigError(f"boot.{name}", f"{value!r}: use drive letters a-p, e.g. 'cd'")
            if len(set(value)) != len(value):
                raise ConfigError(f"boot.{name}", f"{value!r} names a drive letter twice")
        for name in ("menu", "strict"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"boot.{name}", "must be true or false")
        if self.splash is not None:
            object.__setattr__(self, "splash", _check_path(self.splash, "boot.splash"))
        if self.splash_time is not None and (
            not isinstance(self.splash_time, int) or not 0 <= self.splash_time <= 0xFFFF
        ):
            raise ConfigError("boot.splash_time", "milliseconds from 0 to 65535")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> BootConfig:
        return _from_mapping(cls, data, "boot", aliases={"splash-time": "splash_time"})


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    """A whole VM. Attributes mirror the qemu-system options they become.

    ``name`` registers the VM under the runtime directory so that other processes find it
    (``blockctl ls``); a VM without a name is private to the process that launched it.
    """

    name: str | None = None
    memory_mib: int = 256
    cpus: int = 1
    machine: str = "pc"
    accel: Accel = Accel.AUTO
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    firmware: Path | None = None
    drives: tuple[Drive, ...] = ()
    boot: BootConfig | None = None
    # Keep QEMU alive (status 'shutdown') when the guest powers off, so its state can be read.
    no_shutdown: bool = False
    # reject: QEMU refuses deprecated QMP commands and arguments (-compat deprecated-input=reject).
    deprecated_input: DeprecatedInput = DeprecatedInput.ACCEPT
    # Where backing files of the drives' images may live besides each image's own directory
    # tree (and $BLOCKCTL_IMAGE_ROOTS); absolute paths (TOML: relative to the file).
    image_roots: tuple[Path, ...] = ()
    # A guest-agent channel: virtio-serial port org.qemu.guest_agent.0 on <run dir>/qga.sock
    # (TOML: guest-agent = true). The guest must run qemu-ga on it (blockctl._agent).
    guest_agent: bool = False
    # PCIe root ports made at launch on a q35 machine (TOML: hotplug-slots): q35's root bus
    # takes no hot-plugged device, so each hot-plugged PCI device (a virtio disk, a virtio-scsi
    # controller) needs a free port. None: 8 on q35, 0 elsewhere ('pc' hot-plugs on pci.0).
    hotplug_slots: int | None = None
    # Guest RAM as a shared memfd (TOML: shared-memory), which vhost-user devices need: the
    # storage daemon reads and writes the guest's buffers itself. None: on when a drive is
    # vhost-user-blk, off otherwise; true lets vhost-user-blk disks be hot-plugged later.
    shared_memory: bool | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        if not isinstance(self.guest_agent, bool):
            raise ConfigError("guest_agent", f"{self.guest_agent!r}: true or false")
        if self.name is not None and (
            not isinstance(self.name, str) or not _VM_NAME.fullmatch(self.name)
        ):
            raise ConfigError(
                "name", f"{self.name!r}: use 1-32 of a-z 0-9 _ - (start with a letter or digit)"
            )
        if not isinstance(self.memory_mib, int) or not 16 <= self.memory_mib <= 1 << 20:
            raise ConfigError("memory_mib", f"{self.memory_mib!r}: MiB from 16 to 1048576")
        if not isinstance(self.cpus, int) or not 1 <= self.cpus <= 256:
            raise ConfigError("cpus", f"{self.cpus!r}: from 1 to 256")
        if not isinstance(self.machine, str) or not _MACHINE_TYPE.fullmatch(self.machine):
            raise ConfigError(
                "machine",
                f"{self.machine!r} is not a machine type name "
                "(see qemu-system-x86_64 -machine help)",
            )
        put(self, "accel", _enum(Accel, self.accel, "accel"))
        if self.hotplug_slots is None:
            put(
                self, "hotplug_slots", DEFAULT_HOTPLUG_SLOTS if is_pcie_machine(self.machine) else 0
            )
        elif (
            isinstance(self.hotplug_slots, bool)
            or not isinstance(self.hotplug_slots, int)
            or not 0 <= self.hotplug_slots <= MAX_HOTPLUG_SLOTS
        ):
            raise ConfigError(
                "hotplug_slots", f"{self.hotplug_slots!r}: from 0 to {MAX_HOTPLUG_SLOTS}"
            )
        elif self.hotplug_slots and not is_pcie_machine(self.machine):
            raise ConfigError(
                "hotplug_slots",
                f"PCIe root ports are for q35 machines; {self.machine!r} hot-plugs PCI devices "
                "on its own bus (leave hotplug-slots unset)",
            )
        put(
            self,
            "deprecated_input",
            _enum(DeprecatedInput, self.deprecated_input, "deprecated_input"),
        )
        for name in ("kernel", "initrd", "firmware"):
            value = getattr(self, name)
            if value is not None:
                put(self, name, _check_path(value, name))
        if isinstance(self.image_roots, str | Path) or not isinstance(self.image_roots, Sequence):
            raise ConfigError("image_roots", "a list of absolute directory paths")
        roots = tuple(_check_path(r, "image_roots") for r in self.image_roots)
        if not all(r.is_absolute() for r in roots):
            raise ConfigError("image_roots", "each root must be an absolute path")
        put(self, "image_roots", roots)
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("initrd", "an initrd needs a kernel")
        if self.append is not None:
            if self.kernel is None:
                raise ConfigError("append", "a kernel command line needs a kernel")
            if not isinstance(self.append, str) or "\0" in self.append or "\n" in self.append:
                raise ConfigError("append", "must be one line of text")
        if not isinstance(self.drives, tuple):
            put(self, "drives", tuple(self.drives))
        for i, drive in enumerate(self.drives):
            if not isinstance(drive, Drive):
                raise ConfigError(f"drive[{i}]", "expected a Drive")
        _check_placement(self.drives, self.machine)
        vhost = [i for i, d in enumerate(self.drives) if d.vhost_user_blk is not None]
        if self.shared_memory is None:
            put(self, "shared_memory", bool(vhost))
        elif not isinstance(self.shared_memory, bool):
            raise ConfigError("shared_memory", f"{self.shared_memory!r}: true or false")
        elif vhost and not self.shared_memory:
            raise ConfigError(
                f"drive[{vhost[0]}].vhost_user_blk",
                "a vhost-user-blk disk needs the guest's RAM as shared memory: drop "
                "shared-memory = false",
            )
        bootindexes = [d.bootindex for d in self.drives if d.bootindex is not None]
        if len(bootindexes) != len(set(bootindexes)):
            raise ConfigError("drive.bootindex", "two drives have the same bootindex")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: Path | None = None) -> MachineConfig:
        """Build from a parsed TOML document. Relative paths resolve against ``base``."""
        data = dict(data)
        raw_drives = data.pop("drive", [])
        if not isinstance(raw_drives, list):
            raise ConfigError("drive", "use [[drive]] tables")
        drives = []
        for i, item in enumerate(raw_drives):
            if not isinstance(item, Mapping):
                raise ConfigError(f"drive[{i}]", "must be a table")
            item = dict(item)
            if base is not None:
                item = drive_paths_relative_to(base, item, f"drive[{i}]")
            drives.append(Drive.from_mapping(item, f"drive[{i}]"))
        raw_boot = data.pop("boot", None)
        boot = None
        if raw_boot is not None:
            if not isinstance(raw_boot, Mapping):
                raise ConfigError("boot", "must be a table")
            raw_boot = dict(raw_boot)
            if base is not None and isinstance(raw_boot.get("splash"), str):
                raw_boot["splash"] = relative_to(base, raw_boot["splash"], "boot.splash")
            boot = BootConfig.from_mapping(raw_boot)
        if base is not None:
            for key in ("kernel", "initrd", "firmware"):
                if isinstance(data.get(key), str):
                    data[key] = relative_to(base, data[key], key)
            if isinstance(data.get("image-roots"), list):
                data["image-roots"] = [
                    relative_to(base, r, "image-roots") if isinstance(r, str) else r
                    for r in data["image-roots"]
                ]
        data["drives"] = tuple(drives)
        data["boot"] = boot
        return _from_mapping(
            cls, data, "", aliases={"memory": "memory_mib", "no-shutdown": "no_shutdown"}
        )


_T = TypeVar("_T")


def _from_mapping(
    cls: type[_T], data: Mapping[str, Any], where: str, aliases: Mapping[str, str]
) -> _T:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key.replace("-", "_"))
        if name not in known:
            prefix = f"{where}." if where else ""
            options = ", ".join(sorted(known))
            raise ConfigError(f"{prefix}{key}", f"unknown option; known: {options}")
        kwargs[name] = value
    if cls is Drive:
        kwargs.setdefault("file", None)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(where or "config", str(exc)) from None
    except ConfigError as exc:
        # Drive validates itself as "drive"; name the table the user wrote ("drive[2]").
        if cls is Drive and exc.field.startswith("drive.") and where != "drive":
            raise ConfigError(where + exc.field[len("drive") :], exc.message) from None
        raise


def _check_placement(drives: Sequence[Drive], machine: str) -> None:
    """Two drives may not claim the same slot; IDE and floppy slots are limited."""
    taken: dict[tuple[Interface, int, int], int] = {}
    for i, drive in enumerate(drives):
        slot = drive_slot(drive, machine)
        if slot is None:
            continue
        bus, unit = slot
        if drive.interface is Interface.IDE:
            buses, units = (6, 1) if is_pcie_machine(machine) else (2, 2)
            if bus >= buses or unit >= units:
                raise ConfigError(
                    f"drive[{i}].unit",
                    f"IDE on {machine} has {buses} buses with "
                    f"{units} unit(s) each; bus {bus} unit {unit} does not exist",
                )
        if drive.interface is Interface.FLOPPY and (bus != 0 or unit > 1):
            raise ConfigError(f"drive[{i}].unit", "a floppy controller has units 0 and 1 only")
        key = (drive.interface, bus, unit)
        if key in taken:
            raise ConfigError(
                f"drive[{i}]",
                f"{drive.interface.value} bus {bus} unit {unit} is "
                f"already used by drive[{taken[key]}]",
            )
        taken[key] = i


def drive_slot(drive: Drive, machine: str) -> tuple[int, int] | None:
    """(bus, unit) as ``-drive`` derives them, or None when the device is placed by QEMU."""
    if drive.interface is Interface.VIRTIO:
        return None
    per_bus = {
        Interface.IDE: 1 if is_pcie_machine(machine) else 2,
        Interface.SCSI: 7,
        Interface.FLOPPY: 2,
    }[drive.interface]
    if drive.index is not None:
        return divmod(drive.index, per_bus)
    if drive.bus is None and drive.unit is None:
        return None
    return (drive.bus or 0, drive.unit or 0)


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE | re.ASCII)
#: QMP sizes are int64: a larger number would only earn an error from QEMU.
MAX_SIZE = (1 << 63) - 1


def parse_size(value: object, where: str = "size") -> int:
    """Bytes from an int or a string like ``64M``, ``1G``, ``512K`` (binary units, as qemu-img)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        if match is None:
            raise ConfigError(where, f"{value!r} is not a size (e.g. 1073741824, 64M, 1G)")
        number, unit = match.groups()
        size = int(number) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit.upper()]
    if size < 0:
        raise ConfigError(where, "must not be negative")
    if size > MAX_SIZE:
        raise ConfigError(where, f"{value!r} is larger than {MAX_SIZE} bytes")
    return size


def coerce_enum(kind: type[_E], value: object, where: str) -> _E:
    """Public helper for CLI arguments: ``value`` as ``kind`` or a ConfigError naming ``where``."""
    return _enum(kind, value, where)
