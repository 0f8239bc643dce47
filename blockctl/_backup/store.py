"""The backup repository (format 2): fixed-size chunks named by their digest, stored once per
repository; a point is a per-disk index of chunk digests plus a manifest.

Layout (directories 0700, files 0600, whatever the umask)::

    REPO/config.json                      format, id, chunk size, digest, compression, encryption
    REPO/lock                             flock: shared while a backup writes or a point's NBD
                                          server (a live restore's) runs, exclusive for gc
    REPO/chunks/ab/abcdef…(64 hex)        one chunk: header + (zstd?) (AES-GCM?) payload
    REPO/points/<vm>/<point id>/          flock: shared while a point's NBD server runs; a
                                          prune deletes the point only holding it exclusively
    REPO/points/<vm>/<point id>/<device>.index
    REPO/points/<vm>/<point id>/manifest.json    the commit point of a backup

Crash safety: a chunk is written to a temporary file, fsynced and renamed (complete or absent);
an index is written only after every chunk it names and their directories are durable; the
manifest is written last, atomically (write, fsync, rename, fsync the directory). A point
without a manifest is not a point. Garbage collection takes the lock exclusively, so it never
sees the chunks of a backup that has not written its manifest yet, nor removes those a
point's NBD server serves (a live restore's, which may outlive its controller: the server
holds the lock itself, :mod:`.nbdkit_plugin`). Nor does a prune delete a point a server
serves (:meth:`Repository.serving`, :meth:`Repository.delete_point_unless_served`): a
recovery that must replace a dead server starts the new one from it.

The repository is untrusted input: every name read from it (point ids, VM and device names,
digests) is validated before it touches the filesystem, files are opened relative to
directory descriptors with ``O_NOFOLLOW`` (no symlink leads out), and sizes and counts are
bounded before anything is allocated.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from blockctl import _direct, _fsutil
from blockctl._backup.crypto import NONCE, TAG, RepositoryKey, new_key, unwrap
from blockctl.errors import (
    BackupCorrupt,
    BackupKeyError,
    ConfigError,
    MissingComponent,
    RepositoryBusy,
    RepositoryError,
    errno_symbol,
)

FORMAT = "blockctl-repository"
VERSION = 2
#: 4 MiB, as Proxmox Backup Server's fixed index: 2 fsyncs per 8 MiB and an index of 8 KiB per
#: GiB; `scripts/bench backup` measures the alternatives.
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 32 << 20  # one NBD request (QEMU's block_size_maximum)
#: Bounds checked before allocating anything read from the repository.
MAX_VIRTUAL_SIZE = 1 << 50  # 1 PiB
MAX_MANIFEST = 16 << 20
MAX_DISKS = 256
#: An index entry of 32 zero bytes is a chunk of zeros: never stored, never read.
ZERO_DIGEST = bytes(32)
DIGEST_SIZE = 32
#: Chunk digests of an unencrypted repository, recorded in its config.json: BLAKE3 for new
#: ones (3.9 GB/s here against SHA-256's 0.9-1.6: hashing was the largest CPU share of a
#: full backup, `scripts/bench backup`), SHA-256 for those made before it (still read and
#: written as they are). An encrypted repository names chunks by HMAC-SHA256 with its key.
DIGESTS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3"

_CHUNK_MAGIC = b"BCC2"
#: A chunk file's header: the magic and one byte of flags, then the payload.
CHUNK_HEADER = len(_CHUNK_MAGIC) + 1
_INDEX_MAGIC = b"BCI2"
_INDEX_HEADER = struct.Struct(">4sB3xQQ")  # magic, flags, virtual size, chunk size
_FLAG_ZSTD = 1
_FLAG_SEALED = 2
#: Bytes per sample of the compressibility probe (four per chunk).
_SAMPLE = 16 << 10

#: VM and device names as blockctl makes them and QEMU accepts them; nothing else is joined
#: to a path.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")
_POINT = re.compile(r"\d{8}T\d{6}\.\d{6}-[0-9a-f]{4}\Z")
_DIGEST_HEX = re.compile(r"[0-9a-f]{64}\Z")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise RepositoryError(f"{what} {value!r} is not a valid name (letters, digits, ._+-)")
    return value


def check_point_id(value: object) -> str:
    if not isinstance(value, str) or not _POINT.match(value):
        raise RepositoryError(f"point id {value!r} is not of the form 20261203T101500.123456-ab12")
    return value


#: A request id: printable ASCII without spaces (Temporal's workflow and activity ids fit).
_REQUEST_ID = re.compile(r"[!-~]{1,2048}")


def check_request_id(value: object, where: str | None = None) -> str:
    """A backup's request id; from a manifest (``where``): BackupCorrupt, else ConfigError."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    if where is not None:
        raise BackupCorrupt(f"{where}: malformed request id")
    raise ConfigError("request_id", f"{value!r}: 1-2048 printable ASCII characters, no spaces")


def new_point_id() -> str:
    """Sortable by time to the microsecond, unique: ``20261127T223700.123456-1a2b``."""
    now = time.time_ns() // 1000
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000))
    return f"{stamp}.{now % 1_000_000:06d}-{secrets.token_hex(2)}"


# Section: files, owner-only and atomic


def check_private_dir(path: Path, what: str = "repository") -> None:
    """Refuse a directory that others could write into or that is not ours (as ssh refuses
    a loose key file): they could plant chunks, indexes or symlinks."""
    try:
        _fsutil.check_private_dir(path, what)
    except ConfigError as exc:
        raise RepositoryError(str(exc)) from exc


def make_private_dir(path: Path) -> None:
    try:
        _fsutil.make_private_dir(path, what="repository directory")
    except ConfigError as exc:
        raise RepositoryError(str(exc)) from exc


def _plain_dir(path: Path, what: str) -> bool:
    """True if ``path`` is a directory (not a symlink to one), False if it is missing;
    anything else at ``path`` is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        raise BackupCorrupt(f"{what} {path} is not a plain directory (a symlink?): refused")
    return True


def _json(raw: bytes) -> Any:
    """``json.loads``, with a nesting too deep for the parser reported as what it is."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _hasher(digest: str) -> Callable[[Any], Any]:
    """The constructor of a repository's chunk digest (one of :data:`DIGESTS`)."""
    if digest == "sha256":
        return hashlib.sha256
    try:
        import blake3
    except ImportError as exc:
        raise MissingComponent(
            "the blake3 module (this repository's chunk digest)",
            "pip install blake3 (a dependency of blockctl: scripts/setup installs it)",
        ) from exc
    constructor: Callable[[Any], Any] = blake3.blake3
    return constructor


def _errno_text(exc: OSError) -> str:
    return f"{exc.strerror or exc} ({errno_symbol(exc.errno)})"


def _read_bounded(directory: Path, parts: tuple[str, ...], limit: int, what: str) -> bytes:
    """Read REPO-relative ``parts`` without following any symlink, at most ``limit`` bytes."""
    file_fd = _open_nofollow(directory, parts, what)
    try:
        info = os.fstat(file_fd)
        if not stat.S_ISREG(info.st_mode):
            raise BackupCorrupt(f"{what} is not a regular file")
        if info.st_size > limit:
            raise BackupCorrupt(f"{what} is {info.st_size} bytes, over the limit of {limit}")
        return _read_fd(file_fd, limit, what)
    finally:
        os.close(file_fd)


def _read_fd(file_fd: int, limit: int, what: str) -> bytes:
    chunks = []
    left = limit + 1
    while left > 0:
        data = os.read(file_fd, min(left, 16 << 20))
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    data = b"".join(chunks)
    if len(data) > limit:
        raise BackupCorrupt(f"{what} grew over the limit of {limit} bytes while read")
    return data


def _open_nofollow(directory: Path, parts: tuple[str, ...], what: str) -> int:
    """A descriptor of REPO-relative ``parts`` (each one name: no ``/``, no ``..``), opened
    one component at a time without following any symlink."""
    for part in parts:
        if not part or "/" in part or part in (".", ".."):
            raise RepositoryError(f"{what}: {part!r} is not a name inside the repository")
    fd = os.open(directory, _O_DIR)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _O_DIR, dir_fd=fd)
            except FileNotFoundError as exc:
                raise BackupCorrupt(f"{what}: {part}/ is missing") from exc
            except OSError as exc:
                raise BackupCorrupt(f"{what}: {part} is not a plain directory ({exc})") from exc
            os.close(fd)
            fd = nxt
        try:
            file_fd = os.open(parts[-1], _O_FILE, dir_fd=fd)
        except FileNotFoundError as exc:
            raise BackupCorrupt(f"{what} is missing") from exc
        except OSError as exc:
            raise BackupCorrupt(f"{what} is not a plain file ({exc})") from exc
    finally:
        os.close(fd)
    return file_fd


# Section: values


@dataclass(frozen=True, slots=True, kw_only=True)
class RepositoryConfig:
    id: str
    chunk_size: int
    digest: str  # "blake3" or "sha256" (older repositories), or "hmac-sha256" with a key
    compression: str  # "zstd" | "none"
    encryption: dict[str, Any] | None
    created: float

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: object, path: Path) -> RepositoryConfig:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RepositoryError(f"{path}: not a blockctl repository")
        if data.get("version") != VERSION:
            raise RepositoryError(
                f"{path}: repository format {data.get('version')!r}; this blockctl reads "
                f"format {VERSION} only (the qcow2-chain format 1 is gone: start a new one)"
            )
        try:
            config = cls(
                id=str(data["id"]),
                chunk_size=int(data["chunk_size"]),
                digest=str(data["digest"]),
                compression=str(data["compression"]),
                encryption=data.get("encryption"),
                created=float(data["created"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(f"{path}/config.json is malformed ({exc})") from exc
        _check_chunk_size(config.chunk_size)
        if config.digest not in (*DIGESTS, "hmac-sha256") or config.compression not in (
            "zstd",
            "none",
        ):
            raise RepositoryError(f"{path}: unknown digest or compression in config.json")
        if config.encryption is not None and not isinstance(config.encryption, dict):
            raise RepositoryError(f"{path}/config.json: malformed encryption record")
        if (config.digest == "hmac-sha256") != (config.encryption is not None):
            raise RepositoryError(f"{path}: config.json: digest and encryption disagree")
        return config


def _check_chunk_size(size: int) -> None:
    if not (MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE) or size & (size - 1):
        raise RepositoryError(
            f"chunk size {size}: a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )


@dataclass(slots=True)
class DiskIndex:
    """The chunks of one disk at one point: ``digests[32*i:32*i+32]`` is chunk ``i``."""

    virtual_size: int
    chunk_size: int
    digests: bytearray

    @classmethod
    def empty(cls, virtual_size: int, chunk_size: int) -> DiskIndex:
        count = math.ceil(virtual_size / chunk_size)
        return cls(virtual_size, chunk_size, bytearray(count * DIGEST_SIZE))

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def at(self, i: int) -> bytes:
        return bytes(self.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])

    def put(self, i: int, digest: bytes) -> None:
        self.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest

    def chunk_length(self, i: int) -> int:
        return min(self.chunk_size, self.virtual_size - i * self.chunk_size)

    def referenced(self) -> set[bytes]:
        view = memoryview(self.digests)
        found = {bytes(view[i : i + DIGEST_SIZE]) for i in range(0, len(view), DIGEST_SIZE)}
        found.discard(ZERO_DIGEST)
        return found

    def disk_digest(self) -> str:
        """The digest of the guest-visible disk at this point, derived from the index (no
        second pass over the data): equal disks give equal digests in one repository."""
        h = hashlib.sha256(b"blockctl-disk-v2\0")
        h.update(struct.pack(">QQ", self.virtual_size, self.chunk_size))
        h.update(self.digests)
        return h.hexdigest()

    def copy(self) -> DiskIndex:
        return DiskIndex(self.virtual_size, self.chunk_size, bytearray(self.digests))


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskPoint:
    """One disk of a backup point, with what the backup cost (one meaning in every mode)."""

    device: str
    node: str
    virtual_size: int
    chunk_size: int
    disk_digest: str
    chunks: int  # in the index
    zero_chunks: int  # chunks of zeros (not stored)
    bytes_read: int  # read from QEMU for this point
    bytes_new: int  # uncompressed bytes of chunks that were new to the repository
    bytes_stored: int  # what those new chunks take in the repository (compressed, sealed)
    seconds: float = 0.0

    @property
    def dedup_ratio(self) -> float | None:
        """Bytes read per byte new to the repository (higher is better)."""
        return None if not self.bytes_new else self.bytes_read / self.bytes_new

    @property
    def compression_ratio(self) -> float | None:
        return None if not self.bytes_stored else self.bytes_new / self.bytes_stored


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    id: str
    vm: str
    kind: str  # "full" | "incremental"
    parent: str | None  # the point an incremental read its unchanged chunks from
    checkpoint: str  # the dirty bitmap that records changes since this point
    started: float
    completed: float
    qemu: str
    disks: tuple[DiskPoint, ...]
    fallback_reason: str | None = None  # why an incremental was taken as a full backup
    consistency: str = "crash"  # "filesystem" when the guest was frozen at the point
    frozen_filesystems: int = 0
    # The caller's id of the request that took this point (a fleet activity's workflow and
    # activity): a retry of that request finds this point instead of taking a second one.
    request_id: str | None = None

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_new(self) -> int:
        return sum(d.bytes_new for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)

    def disk(self, device: str) -> DiskPoint:
        for disk in self.disks:
            if disk.device == device:
                return disk
        raise ConfigError(
            "device",
            f"backup {self.id} has no disk {device!r} "
            f"(it has {', '.join(d.device for d in self.disks)})",
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["disks"] = [asdict(d) for d in self.disks]
        if data["request_id"] is None:
            # Written only when set: a point taken without one is as before it existed.
            del data["request_id"]
        return {"format": VERSION, **data}

    @classmethod
    def from_json(cls, data: object, where: str) -> Manifest:
        try:
            if not isinstance(data, dict) or data.get("format") != VERSION:
                raise BackupCorrupt(f"{where}: not a format-{VERSION} manifest")
            values = {k: v for k, v in data.items() if k not in ("format", "mac")}
            disks_raw = values.pop("disks")
            if not isinstance(disks_raw, list) or not 1 <= len(disks_raw) <= MAX_DISKS:
                raise BackupCorrupt(f"{where}: 1 to {MAX_DISKS} disks expected")
            disks = tuple(DiskPoint(**d) for d in disks_raw)
            manifest = cls(disks=disks, **values)
        except (TypeError, ValueError, AttributeError) as exc:
            raise BackupCorrupt(f"{where}: malformed manifest ({exc})") from exc
        _check_types(manifest, _MANIFEST_TYPES, where)
        for disk in disks:
            _check_types(disk, _DISK_TYPES, f"{where}: disk")
        check_point_id(manifest.id)
        check_name(manifest.vm, "VM")
        if manifest.request_id is not None:
            check_request_id(manifest.request_id, where)
        if manifest.parent is not None:
            check_point_id(manifest.parent)
        if manifest.kind not in ("full", "incremental"):
            raise BackupCorrupt(f"{where}: unknown kind {manifest.kind!r}")
        for disk in disks:
            check_name(disk.device, "device")
            _check_chunk_size(disk.chunk_size)
            if not 0 < disk.virtual_size <= MAX_VIRTUAL_SIZE:
                raise BackupCorrupt(
                    f"{where}: {disk.device}: size {disk.virtual_size} out of range"
                )
            if not _DIGEST_HEX.match(disk.disk_digest):
                raise BackupCorrupt(f"{where}: {disk.device}: malformed disk digest")
        if len({d.device for d in disks}) != len(disks):
            raise BackupCorrupt(f"{where}: a device is listed twice")
        return manifest


_NUMBER = (int, float)
_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "vm": str,
    "kind": str,
    "parent": (str, type(None)),
    "checkpoint": str,
    "started": _NUMBER,
    "completed": _NUMBER,
    "qemu": str,
    "fallback_reason": (str, type(None)),
    "consistency": str,
    "frozen_filesystems": int,
    "request_id": (str, type(None)),
}
_DISK_TYPES: dict[str, type | tuple[type, ...]] = {
    "device": str,
    "node": str,
    "virtual_size": int,
    "chunk_size": int,
    "disk_digest": str,
    "chunks": int,
    "zero_chunks": int,
    "bytes_read": int,
    "bytes_new": int,
    "bytes_stored": int,
    "seconds": _NUMBER,
}


def _check_types(value: object, types: dict[str, type | tuple[type, ...]], where: str) -> None:
    """JSON gives any type anywhere: a size that is a string would fail later, far from here."""
    for name, kind in types.items():
        field_value = getattr(value, name)
        if isinstance(field_value, bool) or not isinstance(field_value, kind):
            raise BackupCorrupt(f"{where}: {name} is a {type(field_value).__name__}")
        if isinstance(field_value, float) and not math.isfinite(field_value):
            raise BackupCorrupt(f"{where}: {name} is {field_value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PointServer:
    """A running NBD server of a point of the repository, as ``/proc`` names it
    (:meth:`Repository.servers_holding`): its pid, the point it serves, and the VM whose
    live restore it serves (``into``; ``None`` outside a live restore)."""

    pid: int
    into: str | None
    vm: str | None
    point: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class GcResult:
    chunks_kept: int
    chunks_removed: int
    bytes_removed: int
    temporary_removed: int


# Section: the repository


@dataclass(slots=True)
class Repository:
    """An open repository. Use :meth:`init` to create one and :meth:`open` to use one."""

    path: Path
    config: RepositoryConfig
    key: RepositoryKey | None = None
    _zstd: Any = field(default=None, repr=False)
    #: The batch of :meth:`write_chunk`/:meth:`sync`/:meth:`discard` (a backup uses its own,
    #: :meth:`batch`: two backups sharing this object must not sync each other's chunks).
    _default: ChunkBatch | None = field(default=None, repr=False)
    #: The chunk digest's constructor (hashlib.sha256 or blake3.blake3); unused when keyed.
    _hash: Callable[[Any], Any] = field(default=hashlib.sha256, repr=False)

    # -- creation and opening

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression: str = "zstd",
        secret: bytes | None = None,
        digest: str = DEFAULT_DIGEST,
    ) -> Repository:
        """Create a repository at ``path`` (a new or empty directory), owner-only.
        ``secret``: encrypt it with a key wrapped by this secret (a key file's content); its
        chunks are then named by HMAC-SHA256 with that key, whatever ``digest`` says.
        ``digest``: the chunk digest of an unencrypted one (:data:`DIGESTS`)."""
        path = Path(path).absolute()
        _check_chunk_size(chunk_size)
        if compression not in ("zstd", "none"):
            raise ConfigError("compression", f"{compression!r}: zstd or none")
        if digest not in DIGESTS:
            raise ConfigError("digest", f"{digest!r}: {' or '.join(DIGESTS)}")
        if secret is None:
            _hasher(digest)  # a missing blake3 module said before anything is created
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RepositoryError(f"{path} exists and is not an empty directory")
        key, record = (None, None) if secret is None else new_key(secret)
        make_private_dir(path)
        check_private_dir(path)
        for sub in ("chunks", "points"):
            make_private_dir(path / sub)
        config = RepositoryConfig(
            id=uuid.uuid4().hex,
            chunk_size=chunk_size,
            digest=digest if key is None else "hmac-sha256",
            compression=compression,
            encryption=record,
            created=time.time(),
        )
        _fsutil.create_private_file(path / "lock")
        _fsutil.atomic_write_bytes(
            path / "config.json", json.dumps(config.to_json(), indent=1).encode()
        )
        return cls.open(path, secret=secret)

    @classmethod
    def open(
        cls, path: Path, *, secret: bytes | None = None, key: RepositoryKey | None = None
    ) -> Repository:
        """``secret`` unwraps an encrypted repository's key; ``key`` is that key already
        unwrapped (a helper process given it by its parent: no second scrypt)."""
        # The path the user named may be a symlink (followed once, here); inside the
        # repository nothing is followed.
        path = Path(path).resolve()
        if not (path / "config.json").exists():
            if not path.exists():
                raise RepositoryError(
                    f"no repository at {path}: create one with `blockctl backup init "
                    f"--repo {path}` (or Repository.init)"
                )
            raise RepositoryError(
                f"{path} is not a blockctl repository (no config.json); create one with "
                "`blockctl backup init`"
            )
        check_private_dir(path)
        raw = _read_bounded(path, ("config.json",), 1 << 20, f"{path}/config.json")
        try:
            data = _json(raw)
        except ValueError as exc:
            raise RepositoryError(f"{path}/config.json is not JSON ({exc})") from exc
        config = RepositoryConfig.from_json(data, path)
        for sub in ("chunks", "points"):
            try:
                present = _plain_dir(path / sub, "the repository's")
            except BackupCorrupt as exc:
                raise RepositoryError(str(exc)) from exc
            if not present:
                raise RepositoryError(f"{path}: {sub}/ is missing: the repository is damaged")
        if config.encryption is not None and key is not None:
            if key.key_id != config.encryption.get("key_id"):
                raise BackupKeyError(f"{path}: the key given is not this repository's")
        elif config.encryption is not None:
            if secret is None:
                raise BackupKeyError(
                    f"the repository {path} is encrypted (key id "
                    f"{config.encryption.get('key_id')}): give its key file (--key-file)"
                )
            key = unwrap(config.encryption, secret, path)
        else:
            key = None
        repo = cls(path=path, config=config, key=key)
        if key is None:
            repo._hash = _hasher(config.digest)
        if config.compression == "zstd":
            import zstandard

            repo._zstd = zstandard
        return repo

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    # -- locking

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool, wait: bool = True) -> Iterator[None]:
        """Shared while a backup writes or a point's NBD server runs (several may), exclusive
        for garbage collection."""
        with _fsutil.flocked(
            self.path / "lock",
            shared=not exclusive,
            wait=wait,
            busy=lambda: RepositoryBusy(self._busy_text(exclusive)),
            open_error=lambda exc: RepositoryError(
                f"{self.path}/lock: cannot open the repository's lock file (missing, or a "
                f"symlink: refused): {_errno_text(exc)}"
            ),
        ):
            yield

    def _busy_text(self, exclusive: bool) -> str:
        servers = self.servers_holding() if exclusive else []
        if not servers:
            return (
                f"{self.path} is in use by another process (a backup is writing, or a "
                "garbage collection is running): try again when it is done"
            )
        named = ", ".join(
            f"pid {s.pid}" + (f" (a live restore into the VM {s.into})" if s.into else "")
            for s in servers
        )
        ways = sorted({f"`blockctl recover {s.into}`" for s in servers if s.into})
        return (
            f"{self.path} is held by the NBD server of a backup point ({named}): a live "
            "restore's disk reads the chunks it serves, and a garbage collection could remove "
            "them; try again when the restore has finished"
            + (f" (if its controller died: {' and '.join(ways)} first)" if ways else "")
        )

    def servers_holding(self) -> list[PointServer]:
        """The NBD servers of this repository's points (nbdkit and blockctl's plugin,
        :mod:`.serve`) that hold its lock, as each one does while it runs: their pids, the
        point each serves (its ``vm=`` and ``point=`` parameters) and the VM whose live
        restore it serves (``into=``; ``None`` for a server outside a live restore). From
        ``/proc``: for naming them, never for deciding."""
        servers: list[PointServer] = []
        for pid in _fsutil.flock_holders(self.path / "lock"):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # gone since
            argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
            if not argv or Path(argv[0]).name != "nbdkit" or f"repo={self.path}" not in argv:
                continue
            params = {
                key: a.removeprefix(f"{key}=")
                for a in argv
                for key in ("into", "vm", "point")
                if a.startswith(f"{key}=")
            }
            servers.append(
                PointServer(
                    pid=pid, into=params.get("into"), vm=params.get("vm"), point=params.get("point")
                )
            )
        return servers

    @contextlib.contextmanager
    def serving(self, vm: str, point: str) -> Iterator[None]:
        """Held by a point's NBD server for as long as it runs (:mod:`.nbdkit_plugin`): the
        point's directory locked shared, then its manifest found (a complete point). A prune
        deletes a point only with that lock held exclusively
        (:meth:`delete_point_unless_served`), so a server either holds it first (and the
        point is kept) or waits for the deletion and finds no manifest (and does not start).
        The repository's own lock cannot tell this: servers and backups share it, and a
        prune cannot take it exclusively while any server runs."""
        missing = ConfigError("backup", f"no complete backup {point!r} of {vm} in {self.path}")
        try:
            directory = self._point_dir(vm, point)
            fd = os.open(directory, _O_DIR)
        except FileNotFoundError:
            raise missing from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits for a prune deleting this point
            try:
                os.stat("manifest.json", dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise missing from None
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- chunks

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.key is not None:
            return self.key.digest(data)
        digest: bytes = self._hash(data).digest()
        return digest

    def _chunk_path(self, digest: bytes) -> Path:
        hexd = digest.hex()
        return self.path / "chunks" / hexd[:2] / hexd

    def has_chunk(self, digest: bytes) -> bool:
        """A regular file by the chunk's name (a symlink there is not a chunk)."""
        try:
            return stat.S_ISREG(os.lstat(self._chunk_path(digest)).st_mode)
        except FileNotFoundError:
            return False

    def batch(self) -> ChunkBatch:
        """A new set of pending chunks: written by :meth:`ChunkBatch.write`, made durable by
        its :meth:`~ChunkBatch.sync` or dropped by its :meth:`~ChunkBatch.discard`."""
        return ChunkBatch(self)

    def _default_batch(self) -> ChunkBatch:
        if self._default is None:
            self._default = ChunkBatch(self)
        return self._default

    def write_chunk(self, digest: bytes, data: bytes | memoryview) -> int:
        """:meth:`ChunkBatch.write` in this repository's default batch."""
        return self._default_batch().write(digest, data)

    def sync(self) -> None:
        """:meth:`ChunkBatch.sync` of the default batch."""
        self._default_batch().sync()

    def discard(self) -> None:
        """:meth:`ChunkBatch.discard` of the default batch."""
        self._default_batch().discard()

    def _encode_chunk(
        self, digest: bytes, data: bytes | bytearray | memoryview
    ) -> tuple[bytes, bytes | bytearray | memoryview]:
        """The chunk file's header and payload, apart: written with one ``writev``, the
        payload (often the reader's own buffer) is never copied into a new 4 MiB object."""
        flags = 0
        payload: bytes | bytearray | memoryview = data
        if self._zstd is not None and self._compressible(data):
            packed = self._zstd.ZstdCompressor(level=1).compress(data)
            if len(packed) < len(data):
                payload, flags = packed, flags | _FLAG_ZSTD
        if self.key is not None:
            flags |= _FLAG_SEALED
            payload = self.key.seal(bytes(payload), digest + bytes([flags]))
        return _CHUNK_MAGIC + bytes([flags]), payload

    def _compressible(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether zstd is worth running on a chunk: four 16 KiB samples spread over it must
        shrink by 3 %. Incompressible data (media, encrypted or compressed files) is then
        stored as it is without compressing it whole first (that cost a full backup of random
        data more than half its speed, `scripts/bench backup`). A chunk compressible only
        between the samples is stored uncompressed: compression lost, never data."""
        if len(data) <= 4 * _SAMPLE:
            return True
        view = memoryview(data)
        step = (len(data) - _SAMPLE) // 3
        sample = b"".join(view[i * step : i * step + _SAMPLE] for i in range(4))
        packed = self._zstd.ZstdCompressor(level=1).compress(sample)
        return len(packed) < len(sample) * 0.97

    def read_chunk(self, digest: bytes, length: int, *, where: str = "") -> bytes:
        """The chunk's bytes, checked against its digest (and authenticated if encrypted)."""
        data = self.read_chunk_view(digest, length, where=where)
        return data if isinstance(data, bytes) else bytes(data)

    def read_chunk_view(self, digest: bytes, length: int, *, where: str = "") -> bytes | memoryview:
        """:meth:`read_chunk` without copying an uncompressed payload out of the file's
        bytes (restore and verify: a 4 MiB copy per chunk less)."""
        hexd = digest.hex()
        what = f"chunk {hexd[:16]}…{where}"
        blob = _read_bounded(self.path, ("chunks", hexd[:2], hexd), self.chunk_size + 4096, what)
        if len(blob) < 5 or blob[:4] != _CHUNK_MAGIC:
            raise BackupCorrupt(f"{what}: not a chunk (bad header)")
        flags = blob[4]
        payload: bytes | memoryview = memoryview(blob)[5:]
        if flags & _FLAG_SEALED:
            if self.key is None:
                raise BackupCorrupt(f"{what}: encrypted, but the repository is not")
            payload = self.key.open(bytes(payload), digest + bytes([flags]), what)
        elif self.key is not None:
            raise BackupCorrupt(f"{what}: not encrypted in an encrypted repository")
        if flags & _FLAG_ZSTD:
            if self._zstd is None:
                import zstandard

                self._zstd = zstandard
            try:
                # A frame says its size; decompress() would allocate it before any check.
                claimed = self._zstd.frame_content_size(payload)
                if claimed not in (-1, length):
                    raise BackupCorrupt(f"{what}: claims {claimed} bytes, {length} expected")
                payload = self._zstd.ZstdDecompressor().decompress(payload, max_output_size=length)
            except self._zstd.ZstdError as exc:
                raise BackupCorrupt(f"{what}: does not decompress ({exc})") from exc
        if len(payload) != length or self.digest(payload) != digest:
            raise BackupCorrupt(f"{what}: its content does not match its digest")
        return payload

    def chunk_digests(self) -> Iterator[bytes]:
        chunks = self.path / "chunks"
        for sub in sorted(os.listdir(chunks)):
            directory = chunks / sub
            if len(sub) != 2 or directory.is_symlink() or not directory.is_dir():
                continue
            for name in os.listdir(directory):
                if _DIGEST_HEX.match(name) and name.startswith(sub):
                    yield bytes.fromhex(name)

    # -- points

    def _point_dir(self, vm: str, point: str) -> Path:
        directory = self.path / "points" / check_name(vm, "VM") / check_point_id(point)
        _plain_dir(directory.parent, "VM directory")
        _plain_dir(directory, "point directory")
        return directory

    def vm_dir(self, vm: str) -> Path:
        """``points/<vm>``, made owner-only if missing; a symlink in its place is refused."""
        directory = self.path / "points" / check_name(vm, "VM")
        if not _plain_dir(directory, "VM directory"):
            make_private_dir(directory)
        return directory

    def begin_point(self, vm: str, point: str) -> Path:
        directory = self._point_dir(vm, point)
        make_private_dir(directory)
        return directory

    def write_index(self, vm: str, point: str, device: str, index: DiskIndex) -> None:
        """After :meth:`sync`: the index names only durable chunks."""
        check_name(device, "device")
        flags = 0
        header = _INDEX_HEADER.pack(_INDEX_MAGIC, flags, index.virtual_size, index.chunk_size)
        body = bytes(index.digests)
        if self.key is not None:
            header = _INDEX_HEADER.pack(
                _INDEX_MAGIC, _FLAG_SEALED, index.virtual_size, index.chunk_size
            )
            body = self.key.seal(body, header + f"{vm}/{point}/{device}".encode())
        try:
            _fsutil.atomic_write_bytes(
                self._point_dir(vm, point) / f"{device}.index", header + body
            )
        except OSError as exc:
            raise RepositoryError(
                f"repository {self.path}: writing the index of {device} in {vm}/{point}: "
                f"{_errno_text(exc)}"
            ) from exc

    def read_index(self, vm: str, point: str, device: str) -> DiskIndex:
        check_name(vm, "VM")
        check_name(device, "device")
        where = f"index of {device} in {vm}/{point}"
        parts = ("points", vm, check_point_id(point), f"{device}.index")
        fd = _open_nofollow(self.path, parts, where)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BackupCorrupt(f"{where} is not a regular file")
            header = os.pread(fd, _INDEX_HEADER.size, 0)
            if len(header) < _INDEX_HEADER.size:
                raise BackupCorrupt(f"{where}: truncated header")
            expected = self._index_length(header, where)
            # The header says how long the file is: checked before the body is read.
            if info.st_size != expected:
                raise BackupCorrupt(
                    f"{where}: {info.st_size} bytes where its header makes {expected} "
                    "(truncated, or not this index's body)"
                )
            raw = _read_fd(fd, expected, where)
        finally:
            os.close(fd)
        flags, size, chunk = _index_header(raw, where)
        body = raw[_INDEX_HEADER.size :]
        if flags & _FLAG_SEALED:
            if self.key is None:
                raise BackupCorrupt(f"{where}: encrypted, but the repository is not")
            aad = raw[: _INDEX_HEADER.size] + f"{vm}/{point}/{device}".encode()
            body = self.key.open(body, aad, where)
        elif self.key is not None:
            raise BackupCorrupt(f"{where}: not encrypted in an encrypted repository")
        count = math.ceil(size / chunk)
        if len(body) != count * DIGEST_SIZE:
            raise BackupCorrupt(
                f"{where}: {len(body)} bytes of digests, {count * DIGEST_SIZE} expected "
                "(truncated?)"
            )
        return DiskIndex(size, chunk, bytearray(body))

    def _index_length(self, header: bytes, where: str) -> int:
        flags, size, chunk = _index_header(header, where)
        sealed = NONCE + TAG if flags & _FLAG_SEALED else 0
        length: int = _INDEX_HEADER.size + math.ceil(size / chunk) * DIGEST_SIZE + sealed
        return length

    def write_manifest(self, manifest: Manifest) -> None:
        """The commit point of a backup: written last, atomically."""
        data = manifest.to_json()
        if self.key is not None:
            data["mac"] = self.key.sign(_canonical(data))
        try:
            _fsutil.atomic_write_bytes(
                self._point_dir(manifest.vm, manifest.id) / "manifest.json",
                json.dumps(data, indent=1).encode(),
            )
        except OSError as exc:
            raise RepositoryError(
                f"repository {self.path}: writing the manifest of {manifest.vm}/{manifest.id}: "
                f"{_errno_text(exc)}"
            ) from exc

    def read_manifest(self, vm: str, point: str) -> Manifest:
        where = f"manifest of {vm}/{point}"
        raw = _read_bounded(
            self.path,
            ("points", check_name(vm, "VM"), check_point_id(point), "manifest.json"),
            MAX_MANIFEST,
            where,
        )
        try:
            data = _json(raw)
        except ValueError as exc:
            raise BackupCorrupt(f"{where}: not JSON ({exc})") from exc
        if self.key is not None:
            if not isinstance(data, dict) or not isinstance(data.get("mac"), str):
                raise BackupCorrupt(f"{where}: unsigned in an encrypted repository")
            mac = data.pop("mac")
            if not hmac.compare_digest(mac.encode(), self.key.sign(_canonical(data)).encode()):
                raise BackupCorrupt(f"{where}: authentication failed (changed or damaged)")
            data["mac"] = mac
        manifest = Manifest.from_json(data, where)
        if manifest.id != point or manifest.vm != vm:
            raise BackupCorrupt(f"{where}: it names {manifest.vm}/{manifest.id}")
        return manifest

    def vms(self) -> list[str]:
        points = self.path / "points"
        # A symlink here is listed: point_ids refuses it (gc does not skip it silently).
        return sorted(n for n in os.listdir(points) if _NAME.match(n))

    def point_ids(self, vm: str) -> list[str]:
        """Every point directory of ``vm`` (with or without a manifest), oldest first."""
        directory = self.path / "points" / check_name(vm, "VM")
        if not _plain_dir(directory, "VM directory"):
            return []
        return sorted(n for n in os.listdir(directory) if _POINT.match(n))

    def manifests(self, vm: str) -> list[Manifest]:
        """Complete points only (a directory without a manifest is not a point), oldest
        first. A manifest that cannot be read is an error, not a gap."""
        found = []
        for point in self.point_ids(vm):
            if (self.path / "points" / vm / point / "manifest.json").exists():
                found.append(self.read_manifest(vm, point))
        return sorted(found, key=lambda m: (m.started, m.id))

    def get(self, vm: str, point: str) -> Manifest:
        check_name(vm, "VM")
        check_point_id(point)
        if not (self.path / "points" / vm / point / "manifest.json").exists():
            raise ConfigError("backup", f"no complete backup {point!r} of {vm} in {self.path}")
        return self.read_manifest(vm, point)

    def latest(self, vm: str) -> Manifest | None:
        manifests = self.manifests(vm)
        return manifests[-1] if manifests else None

    def delete_point(self, vm: str, point: str) -> None:
        """The manifest goes first: from then on it is not a point; the rest is removed.
        Whether a server serves it is not asked (an incomplete point has none):
        :meth:`delete_point_unless_served` for a complete one."""
        _remove_point(self._point_dir(vm, point))

    def delete_point_unless_served(self, vm: str, point: str) -> bool:
        """:meth:`delete_point`, unless an NBD server serves the point (holds
        :meth:`serving`): then nothing is removed and the answer is False. The decision is
        the kernel's lock on the point's directory, taken exclusively for the whole deletion
        (a server starting meanwhile waits, then finds no manifest); name the server with
        :meth:`servers_holding`."""
        return _remove_point(self._point_dir(vm, point), unless_served=True)

    def incomplete_points(self, vm: str) -> list[str]:
        return [
            p
            for p in self.point_ids(vm)
            if not (self.path / "points" / vm / p / "manifest.json").exists()
        ]

    # -- garbage collection

    def gc(self, *, wait: bool = False) -> GcResult:
        """Remove chunks no point references, and temporary files of dead writers. Takes the
        lock exclusively: no backup is between writing chunks and writing its manifest."""
        with self.lock(exclusive=True, wait=wait):
            referenced: set[bytes] = set()
            temporary = 0
            for vm in self.vms():
                for point in self.point_ids(vm):
                    directory = self.path / "points" / vm / point
                    if not (directory / "manifest.json").exists():
                        # No manifest and nobody writing (we hold the lock): a dead backup.
                        _remove_point(self._point_dir(vm, point))
                        temporary += 1
                        continue
                    manifest = self.read_manifest(vm, point)
                    for disk in manifest.disks:
                        index = self.read_index(vm, point, disk.device)
                        if (
                            index.disk_digest() != disk.disk_digest
                            or index.virtual_size != disk.virtual_size
                        ):
                            # What it references is unknown: removing anything could lose data.
                            raise BackupCorrupt(
                                f"the index of {disk.device} in {vm}/{point} does not match "
                                "its manifest: garbage collection refused (run verify)"
                            )
                        referenced |= index.referenced()
            kept = removed = removed_bytes = 0
            chunks = self.path / "chunks"
            for sub in sorted(os.listdir(chunks)):
                directory = chunks / sub
                if directory.is_symlink() or not directory.is_dir():
                    continue
                for name in os.listdir(directory):
                    path = directory / name
                    info = os.lstat(path)
                    if stat.S_ISDIR(info.st_mode):
                        continue  # not ours: a chunk or a temporary file is a file
                    if name.endswith(".tmp"):
                        path.unlink(missing_ok=True)
                        temporary += 1
                        continue
                    if not _DIGEST_HEX.match(name):
                        continue
                    if bytes.fromhex(name) in referenced:
                        kept += 1
                        continue
                    removed_bytes += info.st_size
                    path.unlink()
                    removed += 1
            return GcResult(
                chunks_kept=kept,
                chunks_removed=removed,
                bytes_removed=removed_bytes,
                temporary_removed=temporary,
            )


def _remove_point(directory: Path, *, unless_served: bool = False) -> bool:
    """Remove a point directory: its manifest first (from then on it is not a point), then
    its files, through a descriptor of the directory: a symlink in it is removed, never
    followed; a symlink in its place, or a directory in it, is refused. ``unless_served``:
    with the directory locked exclusively (:meth:`Repository.serving`), held until it is
    gone; a server's shared lock on it leaves it all in place (False)."""
    try:
        fd = os.open(directory, _O_DIR)
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise BackupCorrupt(f"{directory} is not a plain directory: refused ({exc})") from exc
    try:
        if unless_served:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink("manifest.json", dir_fd=fd)
            os.fsync(fd)
        for name in os.listdir(fd):
            try:
                os.unlink(name, dir_fd=fd)
            except IsADirectoryError as exc:
                raise BackupCorrupt(
                    f"{directory}/{name} is a directory: a point holds files only"
                ) from exc
        os.rmdir(directory)  # under the lock: a server waiting for it finds no manifest
        _fsutil.fsync_dir(directory.parent)
    finally:
        os.close(fd)
    return True


class ChunkBatch:
    """The chunks one backup writes, pending until :meth:`sync`.

    A chunk goes to a temporary file; :meth:`sync` makes every pending one durable with one
    ``syncfs`` and only then renames them to their names and fsyncs the directories, so a chunk
    under its name is complete after a crash (never a torn file a later backup would take for
    the chunk), and one flush replaces one fsync per chunk (`scripts/bench backup`).
    :meth:`discard` drops the pending ones of a backup that will not commit. Writes may come
    from several threads; :meth:`sync` and :meth:`discard` only after they are done.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._pending: dict[bytes, tuple[Path, Path]] = {}
        self._touched: set[str] = set()
        #: Chunk files written with O_DIRECT until the filesystem refuses it.
        self._direct = True

    def write(
        self,
        digest: bytes,
        data: bytes | bytearray | memoryview,
        *,
        frame: memoryview | None = None,
    ) -> int:
        """Store one chunk (its digest computed with :meth:`Repository.digest`). Returns the
        bytes written, 0 if the repository has it or this batch is writing it.

        ``frame``: a page-aligned buffer whose bytes ``[CHUNK_HEADER:CHUNK_HEADER+len(data)]``
        are ``data`` (the reader reads into it there), with room for the padding: a chunk
        stored as it is (neither compressed nor sealed) is then written from it with
        ``O_DIRECT`` after its header, without copying 4 MiB into another aligned buffer.
        The frame's other bytes are overwritten."""
        repo = self.repo
        path = repo._chunk_path(digest)
        directory = path.parent
        if not _plain_dir(directory, "chunk directory"):
            make_private_dir(directory)
            self._touched.add("")
        if digest in self._pending or repo.has_chunk(digest):
            return 0
        header, payload = repo._encode_chunk(digest, data)
        tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            self._write_file(tmp, header, payload, frame if payload is data else None)
            self._pending[digest] = (tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RepositoryError(
                f"repository {repo.path}: writing chunk {digest.hex()[:16]}…: {_errno_text(exc)}"
            ) from exc
        return len(header) + len(payload)

    def _write_file(
        self,
        tmp: Path,
        header: bytes,
        payload: bytes | bytearray | memoryview,
        frame: memoryview | None = None,
    ) -> None:
        """A new chunk file, written past the page cache where the filesystem allows it
        (:mod:`blockctl._direct`: new page-cache pages were most of an incremental's time),
        else buffered with its writeback started at once."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if self._direct:
            fd = _direct.open_direct(tmp, flags)
            if fd is None:
                self._direct = False  # this filesystem has no O_DIRECT (old tmpfs, FUSE)
            else:
                try:
                    os.fchmod(fd, 0o600)
                    if frame is not None:
                        length = _direct.pwrite_framed(fd, frame, header, len(payload))
                    else:
                        length = _direct.pwrite_direct(fd, (header, payload), 0)
                    if length % _direct.ALIGN:
                        os.ftruncate(fd, length)  # the padding cut off again
                    return
                except OSError as exc:
                    if not _direct.refused(exc):
                        raise
                    self._direct = False  # an alignment beyond ALIGN: written plainly below
                    os.unlink(tmp)
                finally:
                    os.close(fd)
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, header, payload)
            # Writeback starts now, while the next chunks are read: sync() then waits for
            # what is left instead of for every chunk of the backup.
            start_writeback(fd)
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Make every chunk of this batch durable and put it under its name: the data first
        (one ``syncfs`` of the repository's filesystem), then the renames, then the
        directories' entries. Only after this may an index name the chunks."""
        pending = list(self._pending.values())
        if pending:
            _syncfs(self.repo.path)
        for tmp, path in pending:
            os.replace(tmp, path)
            self._touched.add(path.parent.name)
        self._pending.clear()
        chunks = self.repo.path / "chunks"
        for name in sorted(self._touched):
            _fsutil.fsync_dir(chunks / name if name else chunks)
        self._touched.clear()

    def discard(self) -> None:
        """Drop the chunks of a backup that will not commit (their temporary files)."""
        for tmp, _path in self._pending.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._pending.clear()


def _index_header(raw: bytes, where: str) -> tuple[int, int, int]:
    """(flags, virtual size, chunk size) of an index, each checked before anything is sized
    by it."""
    magic, flags, size, chunk = _INDEX_HEADER.unpack_from(raw)
    if magic != _INDEX_MAGIC:
        raise BackupCorrupt(f"{where}: not an index")
    if not 0 < size <= MAX_VIRTUAL_SIZE:
        raise BackupCorrupt(f"{where}: disk size {size} out of range")
    try:
        _check_chunk_size(chunk)
    except RepositoryError as exc:
        raise BackupCorrupt(f"{where}: {exc}") from exc
    return flags, size, chunk


def _write_all(fd: int, header: bytes, payload: bytes | bytearray | memoryview) -> None:
    """``header`` then ``payload`` at the file's offset, short writes resumed."""
    views = [memoryview(header), memoryview(payload).cast("B")]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


_SYNC_FILE_RANGE_WRITE = 2


_libc: Any = None


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing the file's dirty pages back
    (``length`` 0: to its end) without waiting for them. No durability promise (an fsync or
    syncfs gives that later): the disk works while the next chunks are read or hashed, and
    the final flush waits for what is left, not for everything."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    with contextlib.suppress(AttributeError):
        _libc.sync_file_range(
            fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE
        )


def _syncfs(path: Path) -> None:
    """``syncfs(2)`` of the filesystem holding ``path`` (all its dirty data, one call)."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in data.items() if k != "mac"}, sort_keys=True, separators=(",", ":")
    ).encode()


def with_disks(manifest: Manifest, disks: tuple[DiskPoint, ...]) -> Manifest:
    return replace(manifest, disks=disks)
