"""qemu-img, through the one subprocess door. Every call names the image format: no probing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockctl import _binaries, _proc
from blockctl.errors import ConfigError, ProtocolMismatch
from blockctl.types import ImageFormat


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
    backing: Path | None = None,
    backing_format: ImageFormat | None = None,
    unsafe: bool = False,
) -> None:
    """``qemu-img create``; a backing file always comes with its format (-F).

    ``unsafe`` (-u) does not open the backing file: needed when a running QEMU holds its lock
    (a live snapshot's overlay); ``size`` must then be given.
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
    await _proc.run(argv)


async def backing_chain(path: Path, fmt: ImageFormat) -> tuple[ImageLayer, ...]:
    """The image and its backing files, top first, read with the declared format.

    Run under CPU and memory limits: the image may come from anywhere (a guest-written header
    is the classic attack), and this runs before QEMU ever opens it.
    """
    layers = []
    for image in await info(path, fmt, backing_chain=True, untrusted=True):
        try:
            layer_format = ImageFormat(image.format)
        except ValueError:
            raise ConfigError(
                "format",
                f"{image.filename} is a {image.format!r} image, which blockctl does not open",
            ) from None
        layers.append(
            ImageLayer(
                filename=image.filename,
                format=layer_format,
                virtual_size=image.virtual_size,
                backing_filename=image.backing_filename,
                backing_format=image.backing_format,
                data_file=image.data_file,
            )
        )
    return tuple(layers)


def check_chain(chain: tuple[ImageLayer, ...], where: str) -> None:
    """Refuse chains QEMU would follow into places nobody named (qemu-facts.md S2)."""
    for layer in chain:
        if layer.data_file is not None:
            raise ConfigError(
                where,
                f"{layer.filename} has an external data file "
                f"({layer.data_file}); blockctl does not open such images",
            )
        backing = layer.backing_filename
        if backing is None:
            continue
        if backing.startswith("json:") or "://" in backing or backing.startswith("nbd:"):
            raise ConfigError(
                where,
                f"{layer.filename} has a backing file that is a protocol "
                f"string ({backing[:80]!r}); refused",
            )
        if layer.backing_format is None:
            raise ConfigError(
                where,
                f"{layer.filename} names backing file {backing} without "
                "its format; fix it with `qemu-img rebase -u -b BACKING -F FORMAT "
                "-f qcow2 IMAGE`",
            )


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
) -> None:
    argv = [qemu_img_binary(), "convert", "-p", "-f", src_fmt.value, "-O", dst_fmt.value]
    if compress:
        argv.append("-c")
    if options:
        for key, value in options.items():
            if "," in key or "," in value or "=" in key:
                raise ConfigError("options", f"{key}={value}: commas are not allowed")
        argv += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    argv += [str(src), str(dst)]
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
