"""A repository is untrusted input (issue 21, item 3): crafted manifests, indexes, chunks and
configs — traversal names, absolute paths, symlinks, huge counts and sizes, truncated files,
digests that do not match, another repository's key, flipped bits — are each refused with a
specific :mod:`blockctl.errors` exception, and nothing outside the repository is read or
written.

Every case copies a small repository built with the store's own API (two points of one VM,
two disks, compressible and incompressible chunks, a zero chunk, a partial last chunk), damages
it, and runs one operation on it. Beside it lies a sentinel directory holding what a symlink or
a ``..`` could reach — valid copies of the repository's own points, chunks and config, so
following one would *succeed* — with old atimes and mtimes: afterwards every sentinel entry
has the same atime (nothing read or listed: the filesystem is mounted relatime, and the probe
below checks that a read is visible), mtime, ctime, size and content, and no entry appeared.
A restore's destination is gone after a failure. ``os.read`` is metered during the operation:
nothing huge is read into memory before being refused.

``verify`` reports damage instead of raising: its refusal is ``ok=False`` (:class:`Reported`).
Expected exceptions are compared by exact type (a BackupCorrupt where a RepositoryError is
expected fails, and the other way round).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockctl._backup import crypto
from blockctl._backup import operations as ops
from blockctl._backup.store import (
    DiskIndex,
    DiskPoint,
    Manifest,
    Repository,
)
from blockctl.errors import (
    BackupCorrupt,
    BackupKeyError,
    ConfigError,
    RepositoryError,
)
from blockctl.types import ImageFormat
from tests.figures import Tally, report, require_any

CHUNK = 64 << 10
SECRET = b"hostile-suite-secret"
OTHER_SECRET = b"another-repository-secret"
VM = "vm1"
P1 = "20261203T100000.000001-aaaa"
P2 = "20261203T100100.000002-bbbb"
OLD = 1_000_000_000  # 2001: any read of a sentinel entry moves its atime (relatime)
#: What one operation may read through os.read before the suite calls it unbounded.
READ_BUDGET = 64 << 20

_rng = random.Random(21)
PIECES: dict[str, bytes] = {
    "A": _rng.randbytes(CHUNK),
    "B": (b"compressible chunk of text " * (CHUNK // 16))[:CHUNK],
    "C": _rng.randbytes(CHUNK),  # disk0's last chunk: only its first half is the disk
    "D": _rng.randbytes(CHUNK),
    "E": _rng.randbytes(CHUNK),
    "Z": bytes(CHUNK),
}
LAYOUT = {
    P1: {"disk0": "ABZC", "disk1": "AD"},
    P2: {"disk0": "AEZC", "disk1": "AD"},
}


def disk_size(device: str, pieces: str) -> int:
    return len(pieces) * CHUNK - (CHUNK // 2 if device == "disk0" else 0)


class Reported(Exception):
    """verify's way of refusing: it returned ok=False with these problems."""


# Section: the repositories every case starts from


@dataclass(frozen=True)
class Golden:
    path: Path
    secret: bytes | None
    #: piece name -> its digest in this repository ("C" is the half chunk of disk0)
    digests: dict[str, bytes]
    #: another encrypted repository with the same points and content, another key
    other: Path | None = None
    other_digests: dict[str, bytes] = field(default_factory=dict)


def build(path: Path, secret: bytes | None) -> dict[str, bytes]:
    repo = Repository.init(path, chunk_size=CHUNK, secret=secret)
    digests: dict[str, bytes] = {}
    for n, (point, layout) in enumerate(LAYOUT.items()):
        repo.begin_point(VM, point)
        disks = []
        for device, pieces in layout.items():
            index = DiskIndex.empty(disk_size(device, pieces), CHUNK)
            for i, name in enumerate(pieces):
                data = PIECES[name][: index.chunk_length(i)]
                if not any(data):
                    continue
                digest = repo.digest(data)
                repo.write_chunk(digest, data)
                index.put(i, digest)
                digests[name] = digest
            repo.sync()
            repo.write_index(VM, point, device, index)
            disks.append(
                DiskPoint(
                    device=device,
                    node=f"node-{device}",
                    virtual_size=index.virtual_size,
                    chunk_size=CHUNK,
                    disk_digest=index.disk_digest(),
                    chunks=index.count,
                    zero_chunks=pieces.count("Z"),
                    bytes_read=index.virtual_size,
                    bytes_new=index.virtual_size,
                    bytes_stored=index.virtual_size,
                )
            )
        repo.write_manifest(
            Manifest(
                id=point,
                vm=VM,
                kind="full" if n == 0 else "incremental",
                parent=None if n == 0 else P1,
                checkpoint=f"bc-{repo.config.id[:12]}-{point}",
                started=1000.0 + n,
                completed=1001.0 + n,
                qemu="7.2.0",
                disks=tuple(disks),
            )
        )
    return digests


@pytest.fixture(scope="module")
def goldens(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Golden]:
    root = tmp_path_factory.mktemp("golden")
    with pytest.MonkeyPatch.context() as mp:
        # The lowest scrypt cost the format accepts: every encrypted case opens its repository.
        mp.setattr(crypto, "SCRYPT_N", 1 << 10)
        plain = Golden(root / "plain", None, build(root / "plain", None))
        enc_digests = build(root / "enc", SECRET)
        other_digests = build(root / "other", OTHER_SECRET)
    encrypted = Golden(root / "enc", SECRET, enc_digests, root / "other", other_digests)
    return {False: plain, True: encrypted}


# Section: the sentinel outside the repository


@dataclass
class Entry:
    kind: str
    atime: int
    mtime: int
    ctime: int
    size: int
    ino: int
    content: str | None


def _freeze_times(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.utime(Path(dirpath) / name, ns=(OLD * 10**9, OLD * 10**9))
        os.utime(dirpath, ns=(OLD * 10**9, OLD * 10**9))


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Sentinel:
    """A directory outside the repository that must stay exactly as it was."""

    def __init__(self, root: Path) -> None:
        self.root = root
        paths = [root]
        contents: dict[Path, str] = {}
        for dirpath, dirs, files in os.walk(root):
            for name in dirs:
                paths.append(Path(dirpath) / name)
            for name in files:
                paths.append(Path(dirpath) / name)
                contents[Path(dirpath) / name] = _hash(Path(dirpath) / name)
        _freeze_times(root)
        self.entries = {p: self._entry(p, contents.get(p)) for p in paths}

    @staticmethod
    def _entry(path: Path, content: str | None) -> Entry:
        info = os.lstat(path)
        return Entry(
            kind=stat.filemode(info.st_mode),
            atime=info.st_atime_ns,
            mtime=info.st_mtime_ns,
            ctime=info.st_ctime_ns,
            size=info.st_size,
            ino=info.st_ino,
            content=content,
        )

    def problems(self, *, atime: bool) -> list[str]:
        found = []
        # Metadata first (lstat reads nothing), then listings and contents (which do).
        for path, before in self.entries.items():
            try:
                now = self._entry(path, before.content)
            except FileNotFoundError:
                found.append(f"{path} was removed")
                continue
            for name in ("kind", "mtime", "ctime", "size", "ino") + (("atime",) if atime else ()):
                if getattr(now, name) != getattr(before, name):
                    found.append(f"{path}: {name} changed (something touched it)")
        for dirpath, dirs, files in os.walk(self.root):
            for name in dirs + files:
                if Path(dirpath) / name not in self.entries:
                    found.append(f"{Path(dirpath) / name} appeared")
        for path, before in self.entries.items():
            if before.content is not None and path.exists() and _hash(path) != before.content:
                found.append(f"{path}: content changed")
        return found


@pytest.fixture(scope="module")
def atime_visible(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether this filesystem shows a read in the atime (relatime or strictatime do)."""
    probe = tmp_path_factory.mktemp("atime") / "probe"
    probe.write_bytes(b"x")
    os.utime(probe, ns=(OLD * 10**9, OLD * 10**9))
    probe.read_bytes()
    visible = os.stat(probe).st_atime_ns != OLD * 10**9
    if not visible:
        report("hostile repository", "atime not updated on this filesystem: reads not checked")
    return visible


#: Each (crafted repository, operation), and which of its checks held.
HOSTILE = Tally(
    {
        "outside": "nothing outside the repository read or written, the root unchanged",
        "outcome": "refused with the specific error expected, or harmless",
    }
)
#: Operation -> whether it was refused (for the figure; set once every check held).
OUTCOMES: dict[str, bool] = {}

# Section: one case


@dataclass
class Ctx:
    root: Path
    golden: Golden
    repo: Path
    outside: Path
    out: Path
    vm: str = VM
    point: str = P2
    device: str = "disk0"
    secret: bytes | None = None

    @property
    def dest(self) -> Path:
        return self.out / "restored.raw"

    def chunk(self, name: str, *, other: bool = False) -> Path:
        digest = (self.golden.other_digests if other else self.golden.digests)[name]
        base = self.golden.other if other and self.golden.other else self.repo
        return base / "chunks" / digest.hex()[:2] / digest.hex()

    def index(self, point: str = P2, device: str = "disk0") -> Path:
        return self.repo / "points" / VM / point / f"{device}.index"

    def manifest(self, point: str = P2) -> Path:
        return self.repo / "points" / VM / point / "manifest.json"


def put(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def replace_with_symlink(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    put(path, bytes(data))


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_bytes())
    result = change(data)
    put(path, json.dumps(data if result is None else result).encode())


def edit_disk(point: str, which: str, **values: Any) -> Callable[[Ctx], None]:
    def mutate(ctx: Ctx) -> None:
        def change(data: dict[str, Any]) -> None:
            for disk in data["disks"]:
                if disk["device"] == which:
                    disk.update(values)

        edit_json(ctx.manifest(point), change)

    return mutate


def edit_manifest(point: str = P2, **values: Any) -> Callable[[Ctx], None]:
    return lambda ctx: edit_json(ctx.manifest(point), lambda data: data.update(values))


def edit_config(**values: Any) -> Callable[[Ctx], None]:
    return lambda ctx: edit_json(ctx.repo / "config.json", lambda data: data.update(values))


def edit_encryption(**values: Any) -> Callable[[Ctx], None]:
    def change(data: dict[str, Any]) -> None:
        record = data["encryption"]
        for key, value in values.items():
            if key.startswith("kdf_"):
                record["kdf"][key[4:]] = value
            elif value is None:
                del record[key]
            else:
                record[key] = value

    return lambda ctx: edit_json(ctx.repo / "config.json", change)


def truncate(
    path_of: Callable[[Ctx], Path], size: int | Callable[[int], int]
) -> Callable[[Ctx], None]:
    def mutate(ctx: Ctx) -> None:
        path = path_of(ctx)
        length = size(path.stat().st_size) if callable(size) else size
        os.truncate(path, length)

    return mutate


def symlink_out(
    path_of: Callable[[Ctx], Path], target_of: Callable[[Ctx], Path]
) -> Callable[[Ctx], None]:
    return lambda ctx: replace_with_symlink(path_of(ctx), target_of(ctx))


def zstd_bomb(ctx: Ctx) -> None:
    """A chunk whose zstd frame claims 1 TiB of content."""
    import zstandard

    writer = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=1 << 40)
    frame = writer.compress(b"a" * 100) + writer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    put(ctx.chunk("E"), b"BCC2" + bytes([1]) + frame)


def huge_index_header(ctx: Ctx) -> None:
    data = bytearray(ctx.index().read_bytes())
    data[8:16] = (1 << 50).to_bytes(8, "big")  # virtual size: 1 PiB
    put(ctx.index(), bytes(data))


def other_repository(kind: str) -> Callable[[Ctx], None]:
    """The same file from the other repository (same VM, point and device names, other key)."""

    def mutate(ctx: Ctx) -> None:
        assert ctx.golden.other is not None
        if kind == "chunk":
            source, target = ctx.chunk("E", other=True), ctx.chunk("E")
        elif kind == "index":
            source = ctx.golden.other / "points" / VM / P2 / "disk0.index"
            target = ctx.index()
        else:
            source = ctx.golden.other / "points" / VM / P2 / "manifest.json"
            target = ctx.manifest()
        put(target, source.read_bytes())

    return mutate


def plain_chunk_in_encrypted(ctx: Ctx) -> None:
    put(ctx.chunk("E"), b"BCC2" + bytes([0]) + PIECES["E"])


def plain_index_in_encrypted(ctx: Ctx) -> None:
    data = bytearray(ctx.index().read_bytes())
    data[4] = 0  # flags: not sealed; and a body of the right length for 4 digests
    put(ctx.index(), bytes(data[:24]) + bytes(4 * 32))


def move_index(ctx: Ctx) -> None:
    put(ctx.index(P2, "disk0"), ctx.index(P1, "disk0").read_bytes())


def swap_chunk(ctx: Ctx) -> None:
    put(ctx.chunk("E"), ctx.chunk("A").read_bytes())


def incomplete_point_symlink(ctx: Ctx) -> None:
    (ctx.repo / "points" / VM / "20261203T100200.000003-cccc").symlink_to(ctx.outside / "loose")


def chunk_is_a_directory(ctx: Ctx) -> None:
    ctx.chunk("E").unlink()
    ctx.chunk("E").mkdir(0o700)


def unreferenced_chunk_directory(ctx: Ctx) -> None:
    name = hashlib.sha256(b"a directory").hexdigest()
    (ctx.repo / "chunks" / name[:2] / name).mkdir(0o700, parents=True)
    (ctx.repo / "chunks" / name[:2] / "x.tmp").mkdir(0o700)


def incomplete_point_with_subdir(ctx: Ctx) -> None:
    point = ctx.repo / "points" / VM / "20261203T100200.000003-cccc"
    (point / "sub").mkdir(0o700, parents=True)
    (point / "disk0.index").write_bytes(b"partial")


def point_is_a_file(ctx: Ctx) -> None:
    put(ctx.repo / "points" / VM / "20261203T100200.000003-cccc", b"not a directory")


def vm_is_a_file(ctx: Ctx) -> None:
    shutil.rmtree(ctx.repo / "points" / VM)
    put(ctx.repo / "points" / VM, b"not a directory")


def unreferenced_chunk_symlink(ctx: Ctx) -> None:
    name = hashlib.sha256(b"nobody").hexdigest()
    directory = ctx.repo / "chunks" / name[:2]
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / name).symlink_to(ctx.outside / "secret.txt")


def flip_wrapped_key(ctx: Ctx) -> None:
    def change(data: dict[str, Any]) -> None:
        wrapped = data["encryption"]["wrapped_key"]
        data["encryption"]["wrapped_key"] = ("1" if wrapped[0] == "0" else "0") + wrapped[1:]

    edit_json(ctx.repo / "config.json", change)


def truncated_zstd_chunk_of_p1(ctx: Ctx) -> None:
    """B (compressible, stored with zstd) is in P1 only."""
    path = ctx.chunk("B")
    assert path.read_bytes()[4] == 1, "B is stored compressed"
    os.truncate(path, path.stat().st_size // 2)
    ctx.point = P1


def config_is_a_directory(ctx: Ctx) -> None:
    (ctx.repo / "config.json").unlink()
    (ctx.repo / "config.json").mkdir(0o700)


def encryption_string_without_key(ctx: Ctx) -> None:
    edit_config(encryption="aes")(ctx)
    ctx.secret = None


def nested_json(depth: int) -> Callable[[Path], None]:
    return lambda path: put(path, b"[" * depth + b"]" * depth)


def sparse(path_of: Callable[[Ctx], Path], size: int) -> Callable[[Ctx], None]:
    return lambda ctx: os.truncate(path_of(ctx), size)


def api(**values: Any) -> Callable[[Ctx], None]:
    """Hostile names passed to the API (a caller forwarding user input)."""

    def mutate(ctx: Ctx) -> None:
        for key, value in values.items():
            setattr(ctx, key, value)

    return mutate


# Section: the cases

R, C, K, G = RepositoryError, BackupCorrupt, BackupKeyError, ConfigError
#: ops that read a point: restore and verify of P2, the manifests, gc and prune (keep 1)
READERS = ("get", "manifests", "restore", "verify", "prune", "gc")


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Ctx], None]
    expect: dict[str, type[BaseException] | None]
    encrypted: bool = False


def readers(exc: type[BaseException], **overrides: type[BaseException] | None) -> dict[str, Any]:
    """Every reading op refused with ``exc`` (verify reports what get would raise as
    BackupCorrupt)."""
    expect: dict[str, Any] = dict.fromkeys(READERS, exc)
    if exc is C:
        expect["verify"] = Reported
    expect.update(overrides)
    return expect


def point_data(exc: type[BaseException] = C, **overrides: Any) -> dict[str, Any]:
    """A damaged index of P2: restore, verify, the index itself, and gc (which must know what
    P2 references before it removes anything) and so prune."""
    expect: dict[str, Any] = {
        "restore": exc,
        "verify": Reported,
        "index": exc,
        "gc": exc,
        "prune": exc,
    }
    expect.update(overrides)
    return expect


CHUNK_DATA: dict[str, Any] = {"restore": C, "verify": Reported}
OPEN_R: dict[str, Any] = {"open": R}
OPEN_K: dict[str, Any] = {"open": K}

CASES: list[Case] = [
    # -- names: traversal, absolute, slashes, in the manifest
    Case("manifest-vm-traversal", edit_manifest(vm="../x"), readers(R)),
    Case("manifest-vm-absolute", edit_manifest(vm="/etc"), readers(R)),
    Case("manifest-id-traversal", edit_manifest(id="../../outside/vm1"), readers(R)),
    Case("manifest-parent-traversal", edit_manifest(parent="../" + P1), readers(R)),
    Case(
        "manifest-device-traversal",
        edit_disk(P2, "disk0", device="../../../outside/secret.txt"),
        readers(R),
    ),
    Case("manifest-device-absolute", edit_disk(P2, "disk0", device="/etc/passwd"), readers(R)),
    Case("manifest-device-slash", edit_disk(P2, "disk0", device="a/b"), readers(R)),
    Case("manifest-device-dotdot", edit_disk(P2, "disk0", device=".."), readers(R)),
    Case("manifest-device-empty", edit_disk(P2, "disk0", device=""), readers(R)),
    Case("manifest-device-twice", edit_disk(P2, "disk1", device="disk0"), readers(C)),
    Case("manifest-names-another-point", edit_manifest(id=P1), readers(C)),
    Case("manifest-names-another-vm", edit_manifest(vm="vm2"), readers(C)),
    Case("manifest-unknown-kind", edit_manifest(kind="../full"), readers(C)),
    Case("manifest-request-id-number", edit_manifest(request_id=5), readers(C)),
    Case("manifest-request-id-newline", edit_manifest(request_id="a\nb"), readers(C)),
    # -- names passed to the API
    Case(
        "api-vm-traversal",
        api(vm="../../outside/vm1"),
        {
            "get": R,
            "manifests": R,
            "restore": R,
            "verify": R,
            "prune": R,
            "index": R,
            "write": R,
            "vm-lock": R,
        },
    ),
    Case(
        "api-vm-absolute",
        api(vm=str(Path("/tmp"))),
        {"get": R, "index": R, "prune": R, "write": R, "vm-lock": R},
    ),
    Case("api-vm-dotdot", api(vm=".."), {"get": R, "manifests": R, "index": R, "write": R}),
    Case(
        "api-point-traversal",
        api(point="../../../outside/vm1/" + P2),
        {
            "get": R,
            "restore": R,
            "verify": R,
            "index": R,
            "write": R,
        },
    ),
    Case(
        "api-device-traversal",
        api(device="../../../outside/vm1/" + P2 + "/disk0"),
        {
            "restore": G,
            "index": R,
            "write": R,
        },
    ),
    # -- symlinks out of the repository (to valid copies of what they replace)
    Case(
        "symlink-point-dir",
        symlink_out(lambda c: c.manifest().parent, lambda c: c.outside / VM / P2),
        {
            **readers(C),
            "index": C,
        },
    ),
    Case(
        "symlink-incomplete-point-dir",
        incomplete_point_symlink,
        {"gc": C, "prune": C, "recover": C},
    ),
    Case(
        "symlink-chunk",
        symlink_out(
            lambda c: c.chunk("E"),
            lambda c: c.outside / "chunks" / c.chunk("E").parent.name / c.chunk("E").name,
        ),
        {
            **CHUNK_DATA,
            "gc": None,
            "prune": None,
        },
    ),
    Case("symlink-unreferenced-chunk", unreferenced_chunk_symlink, {"gc": None, "verify": None}),
    Case(
        "symlink-chunk-subdir",
        symlink_out(
            lambda c: c.chunk("E").parent, lambda c: c.outside / "chunks" / c.chunk("E").parent.name
        ),
        {
            **CHUNK_DATA,
            "gc": None,
            "write": C,
        },
    ),
    Case(
        "symlink-index",
        symlink_out(lambda c: c.index(), lambda c: c.outside / VM / P2 / "disk0.index"),
        point_data(),
    ),
    Case(
        "symlink-manifest",
        symlink_out(lambda c: c.manifest(), lambda c: c.outside / VM / P2 / "manifest.json"),
        readers(C),
    ),
    Case(
        "symlink-vm-dir",
        symlink_out(lambda c: c.repo / "points" / VM, lambda c: c.outside / VM),
        {
            **readers(C),
            "index": C,
            "write": C,
            "vm-lock": C,
        },
    ),
    Case(
        "symlink-points-dir", symlink_out(lambda c: c.repo / "points", lambda c: c.outside), OPEN_R
    ),
    Case(
        "symlink-chunks-dir",
        symlink_out(lambda c: c.repo / "chunks", lambda c: c.outside / "chunks"),
        OPEN_R,
    ),
    Case(
        "symlink-config",
        symlink_out(lambda c: c.repo / "config.json", lambda c: c.outside / "config.json"),
        {"open": C},
    ),
    Case(
        "symlink-lock",
        symlink_out(lambda c: c.repo / "lock", lambda c: c.outside / "secret.txt"),
        {"gc": R, "prune": R},
    ),
    # -- a directory where a file belongs, a file where a directory belongs
    Case("chunk-is-a-directory", chunk_is_a_directory, {**CHUNK_DATA, "gc": None}),
    Case("unreferenced-chunk-is-a-directory", unreferenced_chunk_directory, {"gc": None}),
    Case(
        "incomplete-point-holds-a-directory", incomplete_point_with_subdir, {"gc": C, "recover": C}
    ),
    Case("point-is-a-file", point_is_a_file, {"gc": C, "recover": C, "manifests": None}),
    Case("vm-dir-is-a-file", vm_is_a_file, {**readers(C, get=G, restore=G, verify=G), "write": C}),
    # -- huge counts and sizes
    Case("index-claims-1PiB", huge_index_header, point_data()),
    Case("index-sparse-4GiB", sparse(lambda c: c.index(), 4 << 30), point_data()),
    Case(
        "index-chunk-size-1",
        lambda c: put(
            c.index(),
            c.index().read_bytes()[:16] + (1).to_bytes(8, "big") + c.index().read_bytes()[24:],
        ),
        point_data(),
    ),
    Case("manifest-1e6-disks", edit_manifest(disks=[{}] * 1_000_000), readers(C)),
    Case("manifest-100MB", sparse(lambda c: c.manifest(), 100 << 20), readers(C)),
    Case("manifest-nested-200k", lambda c: nested_json(200_000)(c.manifest()), readers(C)),
    Case("manifest-disk-2^60-bytes", edit_disk(P2, "disk0", virtual_size=1 << 60), readers(C)),
    Case("manifest-disk-size-string", edit_disk(P2, "disk0", virtual_size="131072"), readers(C)),
    Case("manifest-disk-digest-int", edit_disk(P2, "disk0", disk_digest=5), readers(C)),
    Case("manifest-started-string", edit_manifest(started="soon"), readers(C)),
    Case("manifest-completed-null", edit_manifest(completed=None), readers(C)),
    Case("manifest-chunk-size-3", edit_disk(P2, "disk0", chunk_size=3), readers(R)),
    Case("manifest-disks-not-list", edit_manifest(disks={"disk0": {}}), readers(C)),
    Case("manifest-not-object", lambda c: put(c.manifest(), b"[2]"), readers(C)),
    Case("chunk-sparse-1GiB", sparse(lambda c: c.chunk("E"), 1 << 30), CHUNK_DATA),
    Case("chunk-zstd-claims-1TiB", zstd_bomb, CHUNK_DATA),
    Case("config-nested-500k", lambda c: nested_json(500_000)(c.repo / "config.json"), OPEN_R),
    Case("config-100MB", sparse(lambda c: c.repo / "config.json", 100 << 20), {"open": C}),
    # -- truncated files
    Case("index-truncated-header", truncate(lambda c: c.index(), 10), point_data()),
    Case("index-truncated-body", truncate(lambda c: c.index(), lambda n: n - 7), point_data()),
    Case("index-empty", truncate(lambda c: c.index(), 0), point_data()),
    Case("chunk-truncated-3-bytes", truncate(lambda c: c.chunk("E"), 3), CHUNK_DATA),
    Case("chunk-truncated-raw", truncate(lambda c: c.chunk("E"), lambda n: n // 2), CHUNK_DATA),
    Case("chunk-truncated-zstd", truncated_zstd_chunk_of_p1, CHUNK_DATA),
    Case("chunk-empty", truncate(lambda c: c.chunk("E"), 0), CHUNK_DATA),
    Case("manifest-truncated", truncate(lambda c: c.manifest(), lambda n: n // 2), readers(C)),
    Case("manifest-empty", truncate(lambda c: c.manifest(), 0), readers(C)),
    Case("config-truncated", truncate(lambda c: c.repo / "config.json", lambda n: n // 2), OPEN_R),
    Case("config-empty", truncate(lambda c: c.repo / "config.json", 0), OPEN_R),
    # -- digests that do not match
    Case("chunk-of-other-content", swap_chunk, CHUNK_DATA),
    Case("chunk-missing", lambda c: c.chunk("E").unlink(), CHUNK_DATA),
    Case("chunk-bad-magic", lambda c: flip(c.chunk("E"), 0), CHUNK_DATA),
    Case("chunk-claims-sealed", lambda c: flip(c.chunk("E"), 4, 1), CHUNK_DATA),
    Case("chunk-bit-flipped", lambda c: flip(c.chunk("E"), 1000), CHUNK_DATA),
    Case("index-bit-flipped", lambda c: flip(c.index(), 24 + 40), point_data(index=None)),
    Case("index-of-another-point", move_index, point_data(index=None)),
    Case(
        "manifest-disk-digest-changed",
        edit_disk(P2, "disk0", disk_digest="ab" * 32),
        point_data(index=None),
    ),
    Case(
        "manifest-disk-digest-malformed",
        edit_disk(P2, "disk0", disk_digest="../" * 21 + "z"),
        readers(C),
    ),
    Case(
        "manifest-disk-size-changed",
        edit_disk(P2, "disk0", virtual_size=4 * CHUNK),
        point_data(index=None),
    ),
    # -- encrypted repository: flipped bits, another key, plaintext planted
    Case("enc-chunk-bit-flipped", lambda c: flip(c.chunk("E"), 100), CHUNK_DATA, True),
    Case(
        "enc-chunk-tag-flipped",
        lambda c: flip(c.chunk("E"), c.chunk("E").stat().st_size - 1),
        CHUNK_DATA,
        True,
    ),
    Case("enc-chunk-sealed-flag-cleared", lambda c: flip(c.chunk("E"), 4, 1), CHUNK_DATA, True),
    Case("enc-chunk-zstd-flag-set", lambda c: flip(c.chunk("E"), 4, 0), CHUNK_DATA, True),
    Case("enc-chunk-of-another-key", other_repository("chunk"), CHUNK_DATA, True),
    Case("enc-chunk-plaintext", plain_chunk_in_encrypted, CHUNK_DATA, True),
    Case("enc-chunk-of-other-content", swap_chunk, CHUNK_DATA, True),
    Case("enc-index-bit-flipped", lambda c: flip(c.index(), 24 + 40), point_data(), True),
    Case("enc-index-size-flipped", lambda c: flip(c.index(), 15), point_data(), True),
    Case("enc-index-sealed-flag-cleared", lambda c: flip(c.index(), 4, 1), point_data(), True),
    Case("enc-index-of-another-key", other_repository("index"), point_data(), True),
    Case("enc-index-of-another-point", move_index, point_data(), True),
    Case("enc-index-plaintext", plain_index_in_encrypted, point_data(), True),
    Case("enc-manifest-value-changed", edit_manifest(kind="full"), readers(C), True),
    Case(
        "enc-manifest-bit-flipped",
        lambda c: flip(c.manifest(), c.manifest().stat().st_size // 2),
        readers(C),
        True,
    ),
    Case("enc-manifest-unsigned", edit_manifest(mac=None), readers(C), True),
    Case(
        "enc-manifest-mac-removed",
        lambda c: edit_json(c.manifest(), lambda d: d.pop("mac")),
        readers(C),
        True,
    ),
    Case("enc-manifest-of-another-key", other_repository("manifest"), readers(C), True),
    # -- config.json
    Case("config-version-1", edit_config(version=1), OPEN_R),
    Case("config-version-3", edit_config(version=3), OPEN_R),
    Case("config-version-string", edit_config(version="2"), OPEN_R),
    Case("config-other-format", edit_config(format="restic"), OPEN_R),
    Case("config-not-object", lambda c: put(c.repo / "config.json", b"[]"), OPEN_R),
    Case("config-chunk-size-3", edit_config(chunk_size=3), OPEN_R),
    Case("config-chunk-size-string", edit_config(chunk_size="big"), OPEN_R),
    Case("config-unknown-digest", edit_config(digest="md5"), OPEN_R),
    Case("config-digest-without-key", edit_config(digest="hmac-sha256"), OPEN_R),
    Case(
        "config-is-a-directory",
        config_is_a_directory,
        {"open": C},
    ),
    Case("config-missing", lambda c: (c.repo / "config.json").unlink(), OPEN_R),
    Case("chunks-dir-missing", lambda c: shutil.rmtree(c.repo / "chunks"), OPEN_R),
    Case("enc-config-encryption-string", edit_config(encryption="aes"), OPEN_R, True),
    Case(
        "enc-config-encryption-string-no-key",
        encryption_string_without_key,
        OPEN_R,
        True,
    ),
    Case("enc-config-encryption-list", edit_config(encryption=[]), OPEN_R, True),
    Case("enc-config-encryption-removed", edit_config(encryption=None), OPEN_R, True),
    Case("enc-config-kdf-n-not-power-of-2", edit_encryption(kdf_n=1025), OPEN_K, True),
    Case("enc-config-kdf-memory-4GiB", edit_encryption(kdf_n=1 << 20, kdf_r=32), OPEN_K, True),
    Case("enc-config-kdf-n-huge", edit_encryption(kdf_n=1 << 40), OPEN_K, True),
    Case("enc-config-kdf-n-string", edit_encryption(kdf_n="many"), OPEN_K, True),
    Case("enc-config-kdf-unknown", edit_encryption(kdf_name="md5crypt"), OPEN_K, True),
    Case("enc-config-algorithm-unknown", edit_encryption(algorithm="rot13"), OPEN_K, True),
    Case("enc-config-wrapped-key-missing", edit_encryption(wrapped_key=None), OPEN_K, True),
    Case("enc-config-wrapped-key-short", edit_encryption(wrapped_key="00"), OPEN_K, True),
    Case("enc-config-wrapped-key-flipped", flip_wrapped_key, OPEN_K, True),
    Case("enc-config-salt-not-hex", edit_encryption(kdf_salt="../../etc"), OPEN_K, True),
    Case("enc-config-key-id-mismatch", edit_encryption(key_id="0" * 16), OPEN_K, True),
]
PARAMS = [
    pytest.param(case, op, expected, id=f"{case.id}-{op}")
    for case in CASES
    for op, expected in case.expect.items()
]


# Section: running one operation


@contextlib.contextmanager
def metered_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Fail the operation if it reads more than READ_BUDGET bytes: a size it was going to
    allocate was not bounded first."""
    total = [0]
    real = os.read

    def read(fd: int, n: int) -> bytes:
        data = real(fd, n)
        total[0] += len(data)
        if total[0] > READ_BUDGET:
            raise AssertionError(f"unbounded read: {total[0]} bytes read so far")
        return data

    with monkeypatch.context() as mp:
        mp.setattr(os, "read", read)
        yield total


async def run(op: str, ctx: Ctx) -> None:
    if op == "open":
        Repository.open(ctx.repo, secret=ctx.secret)
        return
    repo = Repository.open(ctx.repo, secret=ctx.secret)
    steps: dict[str, Callable[[], Any]] = {
        "get": lambda: repo.get(ctx.vm, ctx.point),
        "manifests": lambda: repo.manifests(ctx.vm),
        "index": lambda: repo.read_index(ctx.vm, ctx.point, ctx.device),
        "gc": repo.gc,
        "recover": lambda: remove_incomplete(repo, ctx),
        "write": lambda: write_point(repo, ctx),
        "vm-lock": lambda: vm_lock(repo, ctx),
    }
    waits: dict[str, Callable[[], Awaitable[Any]]] = {
        "restore": lambda: ops.restore(
            repo, ctx.vm, ctx.point, ctx.device, ctx.dest, ImageFormat.RAW
        ),
        "prune": lambda: ops.prune(repo, ctx.vm, keep_last=1),
    }
    if op == "verify":
        result = await ops.verify(repo, ctx.vm, ctx.point)
        if not result.ok:
            raise Reported("; ".join(result.problems))
        return
    if op in waits:
        await waits[op]()
        return
    steps[op]()


def remove_incomplete(repo: Repository, ctx: Ctx) -> None:
    """What recover does to the repository: remove the points without a manifest."""
    for point in repo.incomplete_points(ctx.vm):
        repo.delete_point(ctx.vm, point)


def vm_lock(repo: Repository, ctx: Ctx) -> None:
    """What every backup and recover takes first: the VM's lock file in points/<vm>/."""
    with ops._vm_lock(repo, ctx.vm):
        pass


def write_point(repo: Repository, ctx: Ctx) -> None:
    """What a backup writes: a chunk, an index and a manifest of a new point (the chunk's
    digest shares its directory with E's, so a symlinked chunk directory is on its path)."""
    prefix = ctx.golden.digests["E"].hex()[:2]
    n = 0
    while True:
        data = n.to_bytes(8, "big") * 4
        digest = repo.digest(data)
        if digest.hex()[:2] == prefix:
            break
        n += 1
    repo.write_chunk(digest, data)
    repo.sync()
    point = ctx.point if ctx.point != P2 else "20261203T100300.000004-dddd"
    repo.begin_point(ctx.vm, point)
    index = DiskIndex.empty(len(data), CHUNK)
    index.put(0, digest)
    repo.write_index(ctx.vm, point, ctx.device, index)


# Section: the tests


@pytest.fixture
def world(tmp_path: Path) -> Callable[[Golden], Ctx]:
    def make(golden: Golden) -> Ctx:
        repo = tmp_path / "repo"
        outside = tmp_path / "outside"
        out = tmp_path / "out"
        shutil.copytree(golden.path, repo, symlinks=True)
        outside.mkdir(mode=0o700)
        (outside / "secret.txt").write_bytes(b"not for the repository\n")
        shutil.copytree(golden.path / "points" / VM, outside / VM)
        shutil.copytree(golden.path / "chunks", outside / "chunks")
        shutil.copy(golden.path / "config.json", outside / "config.json")
        (outside / "loose").mkdir()
        (outside / "loose" / "a.txt").write_bytes(b"a")
        (outside / "loose" / "b.txt").write_bytes(b"b")
        out.mkdir(mode=0o700)
        return Ctx(
            root=tmp_path, golden=golden, repo=repo, outside=outside, out=out, secret=golden.secret
        )

    return make


@pytest.mark.parametrize(("case", "op", "expected"), PARAMS)
async def test_hostile_repository_is_refused_without_touching_the_outside(
    case: Case,
    op: str,
    expected: type[BaseException] | None,
    goldens: dict[bool, Golden],
    world: Callable[[Golden], Ctx],
    atime_visible: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = world(goldens[case.encrypted])
    case.mutate(ctx)
    with HOSTILE.case(f"{case.id}/{op}") as ok:
        sentinel = Sentinel(ctx.outside)
        top = sorted(p.name for p in ctx.root.iterdir())
        raised: BaseException | None = None
        with metered_reads(monkeypatch):
            try:
                await run(op, ctx)
            except Exception as exc:  # judged below, after the sentinel
                raised = exc
        touched = sentinel.problems(atime=atime_visible)
        assert touched == [], f"{case.id}/{op} touched the outside ({raised!r})"
        assert sorted(p.name for p in ctx.root.iterdir()) == top
        ok.add("outside")
        if raised is not None and not isinstance(raised, (RepositoryError, ConfigError, Reported)):
            raise raised
        if expected is None:
            assert raised is None, f"{case.id}/{op} should succeed harmlessly, raised {raised!r}"
        else:
            assert type(raised) is expected, (
                f"{case.id}/{op}: expected {expected.__name__}, got {raised!r}"
            )
        if op == "restore" and expected is not None:
            assert not ctx.dest.exists() and not ctx.dest.is_symlink()
            assert list(ctx.out.iterdir()) == []
        ok.add("outcome")
        OUTCOMES[f"{case.id}/{op}"] = expected is not None


def test_the_hostile_suite_is_not_empty() -> None:
    ops_seen = {op for case in CASES for op in case.expect}
    assert len(CASES) >= 100, len(CASES)
    assert len(PARAMS) >= 250, len(PARAMS)
    assert {"open", "get", "manifests", "restore", "verify", "gc", "prune", "index"} <= ops_seen
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


def test_zz_figures(request: pytest.FixtureRequest) -> None:
    """Print the figure, computed from the operations' checks; fails when none ran."""
    selected = sum(
        1
        for item in request.session.items
        if item.path == request.path and item.name.startswith("test_hostile_repository_")
    )
    HOSTILE.require_cases(selected)
    require_any(HOSTILE)
    complete = HOSTILE.complete()
    refused = sum(OUTCOMES[c] for c in complete)
    repositories = len({c.rsplit("/", 1)[0] for c in complete})
    report(
        "hostile repository",
        f"{repositories} crafted repositories, {len(complete)} operations on them passed "
        f"every check ({refused} refused with the specific error expected, "
        f"{len(complete) - refused} harmless); {HOSTILE.summary()}: {HOSTILE.phrases()}",
    )
