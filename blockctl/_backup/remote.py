"""Restore onto a remote image: an iSCSI LUN or an image on an NFS server.

No kernel initiator or NFS mount here (or on many hosts): the image is written by QEMU's own
initiator (libiscsi) or NFS client (libnfs), the ones a VM uses for it, through
``qemu-img convert -n``. The data comes from the point's NBD export (:func:`serve_point`, the
live restore's server), which checks each chunk against its digest as it serves it, so
nothing unverified reaches the image and no scratch copy of the disk is made.

A raw image is written in three steps, so that a restore stopped midway (failed or killed)
never leaves something that passes for the disk: the first chunk (partition table,
superblock, boot sector) is zeroed, the rest of the disk is written, then the first chunk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from blockctl import _argv, _images
from blockctl._backup.serve import serve_point
from blockctl._backup.store import DiskIndex, Repository
from blockctl._log import get_logger
from blockctl.errors import BlockctlError, ConfigError, ProcessFailed
from blockctl.types import Drive, ImageFormat, IscsiSource, NfsSource

_log = get_logger()

RemoteImage = IscsiSource | NfsSource


def describe(dest: RemoteImage) -> str:
    """How messages name the image (its URL, never a credential)."""
    return f"iSCSI LUN {dest.url}" if isinstance(dest, IscsiSource) else f"NFS image {dest.url}"


def _target(dest: RemoteImage, fmt: ImageFormat) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The image's format node over QEMU's protocol node for it, and its secret objects."""
    drive = (
        Drive(iscsi=dest, format=fmt)
        if isinstance(dest, IscsiSource)
        else Drive(nfs=dest, format=fmt)
    )
    file_node, objects = _argv.remote_file_node("target-file", drive)
    file_options = {
        k: v for k, v in file_node.items() if k not in ("node-name", "cache", "read-only")
    }
    return {"driver": fmt.value, "file": file_options}, objects


async def size_of(dest: RemoteImage) -> int:
    """The bytes the LUN or the NFS image holds, read by ``qemu-img info`` (QEMU's own
    initiator or client, with the credentials the source names): no VM needed."""
    target, objects = _target(dest, ImageFormat.RAW)
    return await _images.node_virtual_size(target, objects)


def _window(node: dict[str, Any], offset: int, size: int) -> dict[str, Any]:
    """``node`` seen from ``offset`` for ``size`` bytes (the raw driver's window)."""
    assert node["driver"] == "raw"
    return {**node, "offset": offset, "size": size}


async def restore_onto(
    repo: Repository,
    vm_name: str,
    point: str,
    device: str,
    index: DiskIndex,
    dest: RemoteImage,
    fmt: ImageFormat,
) -> None:
    """Write ``device`` at ``point`` onto the existing image ``dest`` (refused before anything
    is written when it is smaller than the disk, or a LUN asked for qcow2)."""
    what = describe(dest)
    if isinstance(dest, IscsiSource) and fmt is not ImageFormat.RAW:
        raise ConfigError("format", f"{what}: a LUN is written raw (-O raw)")
    size = index.virtual_size
    target, objects = _target(dest, fmt)
    have = await _images.node_virtual_size(target, objects)
    if have < size:
        raise ConfigError(
            "dest",
            f"{what} holds {have} bytes, {device} at {point} {size}: nothing was written; grow "
            "it on its server first (or give a larger one), then restore again",
        )
    with tempfile.TemporaryDirectory(prefix="blockctl-restore-") as home:
        async with serve_point(repo, vm_name, point, device, Path(home), size=size) as export:
            source: dict[str, Any] = {
                "driver": "raw",
                "file": {"driver": "nbd", "server": {"type": "unix", "path": str(export.socket)}},
            }
            first = min(index.chunk_size, size)
            if fmt is ImageFormat.RAW and size > first:
                zeros = {"driver": "null-co", "size": first, "read-zeroes": True}
                steps = [
                    ({"driver": "raw", "file": zeros}, _window(target, 0, first)),
                    (_window(source, first, size - first), _window(target, first, size - first)),
                    (_window(source, 0, first), _window(target, 0, first)),
                ]
            else:
                steps = [(source, _window(target, 0, size) if fmt is ImageFormat.RAW else target)]
            partly = (
                f"{what} is partly written (its first chunk zeros until the last step): "
                "restore again before using it"
            )
            try:
                for step_source, step_target in steps:
                    await _images.convert_nodes(step_source, step_target, objects)
            except ProcessFailed as exc:
                reading = "while reading" in (exc.reason or "")
                cause = (
                    "reading the point failed (nbdkit serves a chunk that does not match its "
                    "digest as EIO): `blockctl backup verify` names the damaged chunks and "
                    "the points they affect; restore another point"
                    if reading
                    else f"writing {what} failed: check its server and the network"
                )
                raise BlockctlError(
                    f"restore of {device} at {point} onto {what}: {exc.reason or exc}; "
                    f"{cause}. {partly}"
                ) from exc
            except BaseException as exc:
                exc.add_note(partly)
                raise
    _log.info("blockctl.restore.remote", image=dest.url, device=device, point=point)
