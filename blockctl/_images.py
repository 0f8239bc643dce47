"""qemu-img, through the one subprocess door. Every call names the image format: no probing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockctl import _proc
from blockctl.errors import ConfigError, ProtocolMismatch
from blockctl.types import ImageFormat


def qemu_img_binary() -> str:
    return os.environ.get("BLOCKCTL_QEMU_IMG", "qemu-img")


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageLayer:
    """One image of a backing chain, as ``qemu-img info --backing-chain`` reports it."""

    filename: str
    format: ImageFormat
    virtual_size: int
    backing_filename: str | None
    backing_format: str | None
    data_file: str | None

    @classmethod
    def from_info(cls, obj: dict[str, Any]) -> ImageLayer:
        try:
            fmt = ImageFormat(obj["format"])
            specific = obj.get("format-specific", {}).get("data", {})
            return cls(
                filename=str(obj["filename"]),
                format=fmt,
                virtual_size=int(obj["virtual-size"]),
                backing_filename=obj.get("full-backing-filename", obj.get("backing-filename")),
                backing_format=obj.get("backing-filename-format"),
                data_file=specific.get("data-file") if isinstance(specific, dict) else None,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolMismatch("qemu-img info", f"unexpected output: {exc!r}") from None


async def create(
    path: Path,
    fmt: ImageFormat,
    *,
    size: int | None = None,
    backing: Path | None = None,
    backing_format: ImageFormat | None = None,
) -> None:
    """``qemu-img create``; a backing file always comes with its format (-F)."""
    argv = [qemu_img_binary(), "create", "-q", "-f", fmt.value]
    if backing is not None:
        if backing_format is None:
            raise ConfigError("backing_format", "a backing file needs its format")
        argv += ["-b", str(backing), "-F", backing_format.value]
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    await _proc.run(argv)


async def backing_chain(path: Path, fmt: ImageFormat) -> tuple[ImageLayer, ...]:
    """The image and its backing files, top first, read with the declared format."""
    done = await _proc.run(
        [qemu_img_binary(), "info", "-f", fmt.value, "--backing-chain", "--output=json", str(path)]
    )
    try:
        parsed = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise ProtocolMismatch("qemu-img info", f"not JSON: {exc}") from None
    entries = parsed if isinstance(parsed, list) else [parsed]
    return tuple(ImageLayer.from_info(e) for e in entries)


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
