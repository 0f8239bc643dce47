"""qemu-img, through the one subprocess door. Every call names the image format: no probing.

An image file :func:`create` or :func:`convert` makes is owner-only (0600) whatever the umask:
it holds a guest's data, and blockctl makes the images of its VMs (snapshot overlays, restored
disks, the run directory's disk) and the user's (``blockctl img create|convert``) this way
alike, as restic and borg do for what they write. The file is created empty with that mode
before qemu-img opens it (qemu-img keeps an existing file's mode), so no byte is ever readable
by others. A destination that already exists keeps its mode: the owner's choice. ``mode=``
asks for another mode; ``mode=None`` leaves it to qemu-img and the umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockctl import _binaries, _fsutil, _proc
from blockctl._log import get_logger
from blockctl.errors import ConfigError, ProcessFailed, ProtocolMismatch, UntrustedImage
from blockctl.types import ImageFormat

_log = get_logger()


def qemu_img_binary() -> str:
    """``$BLOCKCTL_QEMU_IMG``, else ``$BLOCKCTL_QEMU_PREFIX/bin/qemu-img``, else from PATH."""
    return _binaries.qemu_img()


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageLayer:
    """One image of a backing chain, as ``qemu-img info --backing-chain`` reports it."""

    filename: str
    format: ImageFormat
    virtual_size: int
    backing_filename: str | None
    backing_format: str | None
    data_file: str | None


async def create(
    path: Path,
    fmt: ImageFormat,
    *,
    size: int | None = None,
    backing: Path | str | None = None,
    backing_format: ImageFormat | None = None,
    unsafe: bool = False,
    mode: int | None = _fsutil.PRIVATE_FILE,
) -> None:
    """``qemu-img create``; a backing file always comes with its format (-F). A ``str``
    backing is written as given (a URL such as ``nfs://server/path``; a Path would fold its
    ``//``).

    ``unsafe`` (-u) does not open the backing file: needed when a running QEMU holds its lock
    (a live snapshot's overlay); ``size`` must then be given. A new file gets exactly ``mode``
    (default 0600), see the module's docstring.
    """
    argv = [qemu_img_binary(), "create", "-q", "-f", fmt.value]
    if backing is not None:
        if backing_format is None:
            raise ConfigError("backing_format", "a backing file needs its format")
        argv += ["-b", str(backing), "-F", backing_format.value]
        if unsafe:
            if size is None:
                raise ConfigError(
                    "size",
                    "an overlay made without opening its backing file needs an explicit size",
                )
            argv.append("-u")
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    with new_image_file(path, mode):
        await _proc.run(argv)


@contextlib.contextmanager
def new_image_file(path: Path, mode: int | None) -> Iterator[None]:
    """Around the qemu-img (or QEMU) call that writes image ``path``: if nothing is there, an
    empty file with exactly ``mode`` is created first, and removed again if the call fails.
    An existing file is left as it is (its mode is its owner's choice); ``mode=None`` does
    nothing. Any other obstacle (a missing directory, no permission) is left for the call to
    report in its usual words."""
    created = False
    if mode is not None:
        with contextlib.suppress(OSError):
            _fsutil.create_private_file(path, mode=mode)
            created = True
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


# Section: the rest of qemu-img (offline images; never on an image a running QEMU writes)

#: Limits for inspecting an image blockctl did not create (qemu-facts.md S3): a crafted header
#: must not make qemu-img eat the machine.
UNTRUSTED_CPU_SECONDS = 30
UNTRUSTED_ADDRESS_SPACE = 1 << 30

Progress = Callable[[float], None]
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _progress_parser(report: Progress | None) -> Callable[[bytes], None] | None:
    """qemu-img -p prints ``    (12.34/100%)\\r``; hand each new percentage to ``report``."""
    if report is None:
        return None
    pending = bytearray()

    def feed(chunk: bytes) -> None:
        pending.extend(chunk)
        matches = list(_PERCENT.finditer(pending))
        if matches:
            report(float(matches[-1].group(1)))
            del pending[: matches[-1].end()]

    return feed


def _limited(argv: list[str]) -> list[str]:
    return [
        "prlimit",
        f"--cpu={UNTRUSTED_CPU_SECONDS}",
        f"--as={UNTRUSTED_ADDRESS_SPACE}",
        "--",
        *argv,
    ]


def _json(done: _proc.Completed, what: str) -> Any:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise ProtocolMismatch(what, f"not JSON: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """An internal snapshot in a qcow2 image."""

    id: str
    name: str
    vm_state_size: int
    date: float

    @classmethod
    def from_info(cls, obj: Mapping[str, Any]) -> Snapshot:
        return cls(
            id=str(obj["id"]),
            name=str(obj["name"]),
            vm_state_size=int(obj.get("vm-state-size", 0)),
            date=float(obj.get("date-sec", 0)) + float(obj.get("date-nsec", 0)) / 1e9,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageInfo:
    """``qemu-img info --output=json`` of one image (QEMU 7.2 and 10.x shapes)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    dirty: bool
    backing_filename: str | None
    backing_format: str | None
    snapshots: tuple[Snapshot, ...]
    bitmaps: tuple[str, ...]
    corrupt: bool
    data_file: str | None

    @classmethod
    def from_info(cls, obj: Mapping[str, Any]) -> ImageInfo:
        try:
            specific = obj.get("format-specific", {}).get("data", {})
            return cls(
                filename=str(obj["filename"]),
                format=str(obj["format"]),
                virtual_size=int(obj["virtual-size"]),
                actual_size=None if obj.get("actual-size") is None else int(obj["actual-size"]),
                dirty=bool(obj.get("dirty-flag", False)),
                backing_filename=obj.get("full-backing-filename", obj.get("backing-filename")),
                backing_format=obj.get("backing-filename-format"),
                snapshots=tuple(Snapshot.from_info(s) for s in obj.get("snapshots", ())),
                bitmaps=tuple(str(b["name"]) for b in specific.get("bitmaps", ())),
                corrupt=bool(specific.get("corrupt", False)),
                data_file=specific.get("data-file"),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ProtocolMismatch("qemu-img info", f"unexpected output: {exc!r}") from None


async def info(
    path: Path, fmt: ImageFormat, *, backing_chain: bool = False, untrusted: bool = False
) -> tuple[ImageInfo, ...]:
    """The image (and with ``backing_chain`` its backing files, top first).

    ``untrusted`` runs qemu-img under CPU-time and address-space limits (prlimit).
    """
    argv = [qemu_img_binary(), "info", "-f", fmt.value, "--output=json"]
    if backing_chain:
        argv.append("--backing-chain")
    argv.append(str(path))
    done = await _proc.run(_limited(argv) if untrusted else argv)
    parsed = _json(done, "qemu-img info")
    entries = parsed if isinstance(parsed, list) else [parsed]
    return tuple(ImageInfo.from_info(e) for e in entries)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """``qemu-img check``: 0 clean, 1 check failed, 2 corrupt, 3 leaked clusters only."""

    returncode: int
    check_errors: int
    corruptions: int
    leaks: int

    @property
    def clean(self) -> bool:
        return self.returncode == 0

    @property
    def corrupt(self) -> bool:
        return self.returncode == 2 or self.corruptions > 0


async def check(path: Path, fmt: ImageFormat) -> CheckResult:
    done = await _proc.run(
        [qemu_img_binary(), "check", "-f", fmt.value, "--output=json", str(path)],
        ok_codes=frozenset({0, 2, 3}),
    )
    data = _json(done, "qemu-img check")
    return CheckResult(
        returncode=done.returncode,
        check_errors=int(data.get("check-errors", 0)),
        corruptions=int(data.get("corruptions", 0)),
        leaks=int(data.get("leaks", 0)),
    )


async def commit(
    path: Path,
    fmt: ImageFormat,
    *,
    base: Path | None = None,
    drop: bool = False,
    progress: Progress | None = None,
) -> None:
    """Merge ``path`` into its backing file (or down to ``base``). Offline only."""
    argv = [qemu_img_binary(), "commit", "-f", fmt.value, "-p"]
    if base is not None:
        argv += ["-b", str(base)]
    if drop:
        argv.append("-d")
    argv.append(str(path))
    await _proc.run(argv, on_output=_progress_parser(progress))


async def rebase(
    path: Path,
    fmt: ImageFormat,
    backing: Path | None,
    backing_format: ImageFormat | None,
    *,
    unsafe: bool = False,
    progress: Progress | None = None,
) -> None:
    """Point ``path`` at another backing file (``None``: flatten). ``unsafe`` only rewrites the
    header, without copying the data that differs."""
    argv = [qemu_img_binary(), "rebase", "-f", fmt.value, "-p"]
    if unsafe:
        argv.append("-u")
    if backing is None:
        argv += ["-b", ""]
    else:
        if backing_format is None:
            raise ConfigError("backing_format", "a backing file needs its format (-F)")
        argv += ["-b", str(backing), "-F", backing_format.value]
    argv.append(str(path))
    await _proc.run(argv, on_output=_progress_parser(progress))


async def convert(
    src: Path,
    src_fmt: ImageFormat,
    dst: Path,
    dst_fmt: ImageFormat,
    *,
    compress: bool = False,
    options: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    mode: int | None = _fsutil.PRIVATE_FILE,
) -> None:
    """``qemu-img convert`` to ``dst``; a new ``dst`` gets exactly ``mode`` (default 0600), see
    the module's docstring."""
    argv = [qemu_img_binary(), "convert", "-p", "-f", src_fmt.value, "-O", dst_fmt.value]
    if compress:
        argv.append("-c")
    if options:
        for key, value in options.items():
            if "," in key or "," in value or "=" in key:
                raise ConfigError("options", f"{key}={value}: commas are not allowed")
        argv += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    argv += [str(src), str(dst)]
    with new_image_file(dst, mode):
        await _proc.run(argv, on_output=_progress_parser(progress))


def _node_argv(objects: Iterable[Mapping[str, Any]]) -> list[str]:
    """``--object`` arguments (QEMU's JSON form: nothing to escape)."""
    return [arg for o in objects for arg in ("--object", json.dumps(dict(o)))]


def _json_filename(node: Mapping[str, Any]) -> str:
    """A ``json:`` filename: the node's options as QEMU's own JSON, built here from typed
    values (never a user's string handed over as options)."""
    return "json:" + json.dumps(dict(node))


async def node_virtual_size(node: Mapping[str, Any], objects: Iterable[Mapping[str, Any]]) -> int:
    """The virtual size of the image ``node`` opens (a format node over a protocol node, as
    a ``json:`` filename: an iSCSI LUN, an NFS image), read by ``qemu-img info``."""
    argv = [qemu_img_binary(), "info", *_node_argv(objects), "--output=json"]
    done = await _proc.run([*argv, _json_filename(node)])
    parsed = _json(done, "qemu-img info")
    try:
        return int(parsed["virtual-size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolMismatch("qemu-img info", f"unexpected output: {exc!r}") from None


async def convert_nodes(
    source: Mapping[str, Any],
    target: Mapping[str, Any],
    objects: Iterable[Mapping[str, Any]] = (),
    *,
    progress: Progress | None = None,
) -> None:
    """``qemu-img convert -n`` of the image ``source`` opens onto the existing one ``target``
    opens (both given as node options, each a format node over its protocol node): every
    byte of the target's first ``source``-size bytes written (no ``--target-is-zero``)."""
    argv = [qemu_img_binary(), "convert", "-p", "-n", *_node_argv(objects)]
    argv += ["-O", str(target["driver"]), _json_filename(source), _json_filename(target)]
    await _proc.run(argv, on_output=_progress_parser(progress))


async def resize(path: Path, fmt: ImageFormat, size: int, *, shrink: bool = False) -> None:
    argv = [qemu_img_binary(), "resize", "-q", "-f", fmt.value]
    if shrink:
        argv.append("--shrink")
    await _proc.run([*argv, str(path), str(size)])


async def snapshot(path: Path, action: str, tag: str | None = None) -> tuple[Snapshot, ...]:
    """Internal snapshots of a qcow2 image: ``list``, ``create``, ``apply`` or ``delete``."""
    flags = {"create": "-c", "apply": "-a", "delete": "-d"}
    if action != "list":
        if action not in flags or not tag:
            raise ConfigError("snapshot", "use list, or create/apply/delete with a tag")
        # `qemu-img snapshot` has no -f: name the format through a json: filename that we
        # build ourselves (json.dumps escapes the path; nothing is probed).
        spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}}
        await _proc.run(
            [qemu_img_binary(), "snapshot", flags[action], tag, "json:" + json.dumps(spec)]
        )
    (image,) = await info(path, ImageFormat.QCOW2)
    return image.snapshots


async def compare(
    a: Path, a_fmt: ImageFormat, b: Path, b_fmt: ImageFormat, *, strict: bool = False
) -> bool:
    """Whether the two images read the same (``strict``: also the same allocation)."""
    argv = [qemu_img_binary(), "compare", "-q", "-f", a_fmt.value, "-F", b_fmt.value]
    if strict:
        argv.append("-s")
    done = await _proc.run([*argv, str(a), str(b)], ok_codes=frozenset({0, 1}))
    return done.returncode == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Extent:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool


async def map_extents(path: Path, fmt: ImageFormat) -> tuple[Extent, ...]:
    done = await _proc.run([qemu_img_binary(), "map", "-f", fmt.value, "--output=json", str(path)])
    return tuple(
        Extent(
            start=int(e["start"]),
            length=int(e["length"]),
            depth=int(e["depth"]),
            present=bool(e.get("present", True)),
            zero=bool(e["zero"]),
            data=bool(e["data"]),
        )
        for e in _json(done, "qemu-img map")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Measure:
    required: int
    fully_allocated: int


async def measure(
    out_fmt: ImageFormat, *, size: int | None = None, image: tuple[Path, ImageFormat] | None = None
) -> Measure:
    """Bytes a new ``out_fmt`` image needs: for ``size`` bytes, or to hold ``image``."""
    argv = [qemu_img_binary(), "measure", "--output=json", "-O", out_fmt.value]
    if (size is None) == (image is None):
        raise ConfigError("measure", "give either a size or an image")
    if size is not None:
        argv += ["--size", str(size)]
    else:
        assert image is not None
        argv += ["-f", image[1].value, str(image[0])]
    data = _json(await _proc.run(argv), "qemu-img measure")
    return Measure(required=int(data["required"]), fully_allocated=int(data["fully-allocated"]))


# Section: untrusted images (qemu-facts.md S1-S3, T10)
#
# Every image blockctl did not create is read here before QEMU opens it. The chain is walked
# ONE LAYER AT A TIME (`qemu-img info -f FMT`, without --backing-chain, under prlimit): a
# backing file is opened by qemu-img only after the header that names it passed every rule,
# so a `json:`/URL backing never makes even qemu-img connect anywhere. The rules:
#
# - a backing file name that QEMU would parse as a protocol (a ':' before the first '/', as
#   QEMU's own path_has_protocol: `json:`, `nbd:`, `http://`, `file:` ...) is refused;
# - a backing file without its recorded format is refused (QEMU would probe it);
# - a backing file, or a VMDK extent, must resolve (realpath: symlinks and `../` followed) into
#   the directory tree of the image the user named, or into an allowed root
#   (``BLOCKCTL_IMAGE_ROOTS``, colon-separated, plus the caller's ``roots``);
# - an external data file (qcow2 `data-file`) is refused wherever it is: blockctl builds every
#   node explicitly and has no data-file node, and QEMU would open the header's name itself;
# - the layer must be an image of its declared (or recorded) format: qemu-img -f says so;
# - a chain that loops or is deeper than MAX_CHAIN layers is refused.
#
# A raw image is never probed and has no header: qcow2 bytes inside it are the guest's data
# (a guest may write them at any time, so refusing them at open time would protect nothing).
# QEMU opens it with driver "raw" and never interprets them; blockctl never opens any image
# without a format (tests/unit/test_hygiene.py). Such bytes are only logged
# (``blockctl.image.raw_with_header``), never refused.

#: Extra directories backing files may live in (colon-separated absolute paths).
IMAGE_ROOTS_ENV = "BLOCKCTL_IMAGE_ROOTS"
#: Deeper chains are refused (and loops are caught before this).
MAX_CHAIN = 64

# Format magics at offset 0 (and VDI's at 0x40): what a guest-written header looks like.
_MAGICS = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
)


def has_protocol(name: str) -> bool:
    """Whether QEMU would read ``name`` as ``protocol:...`` rather than as a file name (its
    ``path_has_protocol``: a colon before the first slash)."""
    return ":" in name.split("/", 1)[0]


def image_roots(extra: Iterable[Path | str] = ()) -> tuple[Path, ...]:
    """The allowed roots: ``$BLOCKCTL_IMAGE_ROOTS`` then ``extra``, each resolved (realpath).

    :raise ConfigError: a root is not an absolute path.
    """
    env = os.environ.get(IMAGE_ROOTS_ENV, "")
    named: list[tuple[str, str]] = [(IMAGE_ROOTS_ENV, p) for p in env.split(":") if p]
    named += [("image_roots", str(p)) for p in extra]
    roots = []
    for where, text in named:
        if not os.path.isabs(text) or "\0" in text:
            raise ConfigError(where, f"{text!r}: an image root must be an absolute path")
        roots.append(Path(os.path.realpath(text)))
    return tuple(roots)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def raw_header_format(path: Path) -> str | None:
    """The format whose magic the first bytes of ``path`` carry, if any (read by blockctl,
    never by QEMU: information for a log line, never a reason to open it differently)."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x44)
    except OSError:
        return None
    return next((name for at, magic, name in _MAGICS if head[at : at + len(magic)] == magic), None)


async def inspect_untrusted(
    path: Path,
    fmt: ImageFormat,
    *,
    roots: Iterable[Path | str] = (),
    where: str = "image",
) -> tuple[ImageLayer, ...]:
    """Check an image blockctl did not create and return its chain (top first), ready for
    explicit ``-blockdev``/``blockdev-add`` nodes with each layer's format.

    ``roots`` are allowed roots besides ``$BLOCKCTL_IMAGE_ROOTS`` and the directory tree of
    ``path`` itself. ``where`` names the configuration field in errors. Every launch, hot-plug
    and media insert goes through this (``blockctl._machine.inspect_drive``); an image restored
    from elsewhere should too.

    :raise UntrustedImage: see the rules above; QEMU has opened nothing.
    """
    top = Path(os.path.abspath(path))
    allowed = (Path(os.path.realpath(top)).parent, *image_roots(roots))
    shown = ", ".join(str(r) for r in allowed)
    layers: list[ImageLayer] = []
    seen: set[str] = set()
    current, current_fmt = top, fmt
    for _depth in range(MAX_CHAIN):
        real = os.path.realpath(current)
        if real in seen:
            raise UntrustedImage(where, str(current), f"the backing chain of {top} loops")
        seen.add(real)
        obj = await _untrusted_info(current, current_fmt, where)
        specific = obj.get("format-specific", {}).get("data", {})
        data_file = specific.get("data-file")
        if data_file is not None:
            raise UntrustedImage(
                where,
                str(current),
                f"{current} has an external data file ({str(data_file)[:120]!r}); blockctl does "
                "not open such images (QEMU would open whatever the header names)",
            )
        for extent in specific.get("extents", ()) if current_fmt is ImageFormat.VMDK else ():
            name = str(extent.get("filename", ""))
            target = name if os.path.isabs(name) else os.path.join(current.parent, name)
            if has_protocol(name) or not any(
                _inside(Path(os.path.realpath(target)), r) for r in allowed
            ):
                raise UntrustedImage(
                    where,
                    str(current),
                    f"{current} has an extent {name[:120]!r} outside the allowed roots ({shown})",
                )
        if current_fmt is ImageFormat.RAW and (seen_as := raw_header_format(current)):
            _log.warning(
                "blockctl.image.raw_with_header",
                image=str(current),
                header=seen_as,
                opened_as="raw",
            )
        backing = obj.get("backing-filename")
        backing_format = obj.get("backing-filename-format")
        full = obj.get("full-backing-filename")
        if backing is None:
            layers.append(_layer(current, current_fmt, obj, None, None))
            return tuple(layers)
        backing = str(backing)
        if has_protocol(backing) or (full is not None and has_protocol(str(full))):
            raise UntrustedImage(
                where,
                str(current),
                f"{current} has a backing file that is a protocol string "
                f"({backing[:120]!r}); refused",
            )
        if backing_format is None:
            raise UntrustedImage(
                where,
                str(current),
                f"{current} names backing file {backing} without its format; fix it with "
                "`qemu-img rebase -u -b BACKING -F FORMAT -f qcow2 IMAGE`",
            )
        try:
            next_fmt = ImageFormat(str(backing_format))
        except ValueError:
            raise UntrustedImage(
                where,
                str(current),
                f"{current} names a {backing_format!r} backing file, which blockctl does not open",
            ) from None
        # As QEMU combines them: relative to the directory of the image as it was named.
        backing_path = Path(
            backing if os.path.isabs(backing) else os.path.join(current.parent, backing)
        )
        resolved = Path(os.path.realpath(backing_path))
        if not any(_inside(resolved, r) for r in allowed):
            how = " (through '..')" if ".." in Path(backing).parts else ""
            raise UntrustedImage(
                where,
                str(current),
                f"{current} names backing file {backing!r}, which resolves to {resolved}{how}: "
                f"outside the allowed roots ({shown}); add its directory to "
                f"{IMAGE_ROOTS_ENV} if it is trusted",
            )
        layers.append(_layer(current, current_fmt, obj, str(backing_path), next_fmt.value))
        current, current_fmt = backing_path, next_fmt
    raise UntrustedImage(where, str(top), f"{top} has more than {MAX_CHAIN} backing layers")


def _layer(
    path: Path, fmt: ImageFormat, obj: Mapping[str, Any], backing: str | None, bfmt: str | None
) -> ImageLayer:
    return ImageLayer(
        filename=str(path),
        format=fmt,
        virtual_size=int(obj.get("virtual-size", 0)),
        backing_filename=backing,
        backing_format=bfmt,
        data_file=None,
    )


async def _untrusted_info(path: Path, fmt: ImageFormat, where: str) -> Mapping[str, Any]:
    """``qemu-img info`` of this one image (its backing file is not opened), under limits."""
    argv = [qemu_img_binary(), "info", "-f", fmt.value, "--output=json", str(path)]
    try:
        done = await _proc.run(_limited(argv))
    except ProcessFailed as exc:
        said = " ".join(line.strip() for line in exc.stderr.strip().splitlines())
        detail = said or f"exit code {exc.returncode}"
        if exc.returncode < 0 or exc.returncode >= 128:
            detail += " (qemu-img hit its CPU or memory limit)"
        raise UntrustedImage(
            where, str(path), f"cannot read {path} as {fmt.value}: {detail}"
        ) from exc
    obj = _json(done, "qemu-img info")
    if not isinstance(obj, dict) or obj.get("format") != fmt.value:
        raise UntrustedImage(where, str(path), f"cannot read {path} as {fmt.value}")
    return obj
