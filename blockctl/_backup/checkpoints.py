"""Checkpoints owned by a repository: which dirty bitmaps an incremental reads, and how a VM's
bitmaps are put back in order after a backup failed or its controller was killed. Pure: it
reads bitmap states and returns transaction actions; it sends nothing.

Each point P of repository R gets its own bitmap ``bc-<R id>-<P>`` on every disk, created
in the transaction that fixes the point, so it records every write after P. At rest each disk
has exactly one bitmap of R, enabled, named after R's latest point of that VM holding that
disk (disks backed up apart, like a vhost-user-blk disk in its daemon and QEMU's disks, each
have their own chain of points). A backup of R:

1. ``settle`` (below), then in one transaction: add ``bc-R-N`` for the new point N; for an
   incremental, disable ``bc-R-L`` (frozen at the point: what changed since L) and start the
   fleecing job. The frozen bitmap is exported with the point's view.
2. The copy, the chunks, the index, the manifest (the commit point).
3. Only then ``bc-R-L`` is removed. Before it, nothing of R's record was given up.

``settle`` with R's latest *committed* point L: a bitmap of R named after a point with no
manifest (a backup that failed or was killed) is merged into ``bc-R-L`` and removed — its
writes happened after L, so L's next incremental must still see them; ``bc-R-L`` is enabled
again; bitmaps of older committed points are removed. If ``bc-R-L`` was left disabled and the
writes since are not all in a mergeable bitmap (the failed backup's is busy, inconsistent, not
recording or gone), the next backup is full, with that reason: never an incremental that
misses a write. Bitmaps of other repositories, tools or users are never touched: no other
repository can change what R's next incremental sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from blockctl._qmp import wire
from blockctl._qmp.models import DirtyBitmap

PREFIX = "bc-"
_POINT = r"\d{8}T\d{6}\.\d{6}-[0-9a-f]{4}"
#: Bitmaps of blockctl's repository format 1 (one pair per VM, shared by every repository).
LEGACY_BITMAPS = ("blockctl-inc", "blockctl-full", "blockctl-inc.next", "blockctl-full.next")


def repository_prefix(repository_id: str) -> str:
    return f"{PREFIX}{repository_id[:12]}-"


def bitmap_name(repository_id: str, point: str) -> str:
    return repository_prefix(repository_id) + point


def point_of(bitmap: str, repository_id: str) -> str | None:
    prefix = repository_prefix(repository_id)
    if not bitmap.startswith(prefix):
        return None
    rest = bitmap[len(prefix) :]
    return rest if re.fullmatch(_POINT, rest) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskCheckpoint:
    """What a backup of one disk into one repository starts from."""

    device: str
    node: str
    #: The bitmap of the latest point, usable for an incremental (after ``settle``), or None.
    base: str | None
    #: Why the next backup of this disk must be full (None if ``base`` is usable).
    reason: str | None
    #: Transaction actions that restore the invariant (merge leftovers, enable, remove).
    settle: tuple[dict[str, Any], ...]


def plan(
    *,
    device: str,
    node: str,
    driver: str,
    bitmaps: Iterable[DirtyBitmap],
    repository_id: str,
    latest: str | None,
    committed: Sequence[str],
    in_latest: bool,
) -> DiskCheckpoint:
    """The checkpoint of ``device`` for the repository: ``latest`` is the repository's newest
    complete point of this VM holding this disk, ``committed`` every point of it that has a
    manifest,
    ``in_latest`` whether that point holds this disk (at this size)."""
    prefix = repository_prefix(repository_id)
    mine = [b for b in bitmaps if b.name is not None and b.name.startswith(prefix)]
    base_name = None if latest is None else bitmap_name(repository_id, latest)
    base = next((b for b in mine if b.name == base_name), None)
    done = set(committed)
    actions: list[dict[str, Any]] = []
    leftovers: list[str] = []
    recording_leftover = False
    #: Records of writes after the latest point that cannot be merged (busy, inconsistent).
    unmergeable: list[DirtyBitmap] = []
    for bitmap in mine:
        name = bitmap.name
        assert name is not None
        if bitmap is base:
            continue
        point = point_of(name, repository_id)
        after_latest = point is not None and point not in done and base is not None
        if bitmap.busy:
            if after_latest:
                unmergeable.append(bitmap)
            continue  # in use by an export or a job: not ours to change now
        if after_latest and base is not None and base.busy:
            continue  # kept: merged when the base is free again
        if after_latest and bitmap.inconsistent:
            # QEMU refuses to merge it; what it recorded is lost with it.
            unmergeable.append(bitmap)
            actions.append(wire.bitmap_remove_action(node, name))
        elif after_latest:
            leftovers.append(name)  # a failed or killed backup after the latest point
            recording_leftover |= bitmap.recording
        else:
            actions.append(wire.bitmap_remove_action(node, name))
    reason: str | None = None
    if latest is None:
        reason = f"the repository has no earlier backup of this VM holding {device}"
    elif not in_latest:
        reason = f"{device} had another size in its last backup {latest} (resized since)"
    elif base is None:
        reason = (
            f"the VM has no checkpoint of the last backup {latest} on {device}: QEMU was "
            "restarted since without a clean shutdown (persistent bitmaps are written on clean "
            "close only), the disk's top layer changed (an external snapshot or a commit), or "
            "the bitmap was removed"
        )
    elif base.inconsistent:
        reason = (
            f"the checkpoint of {latest} on {device} is inconsistent: QEMU was killed while it "
            "was in use"
        )
    elif base.busy:
        reason = f"the checkpoint of {latest} on {device} is in use by another job or export"
    elif not base.recording and unmergeable:
        # The base was frozen by a backup that failed; the writes since are only in that
        # backup's checkpoint, which cannot be merged now.
        state = "inconsistent" if any(b.inconsistent for b in unmergeable) else "in use"
        reason = (
            f"the checkpoint of a failed backup after {latest} on {device} is {state}: the "
            "writes since that backup are not all recorded"
        )
    elif not base.recording and not recording_leftover:
        reason = (
            f"the checkpoint of {latest} on {device} was left disabled and no checkpoint of the "
            "failed backup that disabled it is recording: the writes since are not recorded"
        )
    if base is not None and not base.busy:
        if base.inconsistent:
            actions.append(wire.bitmap_remove_action(node, base.name or ""))
            actions.extend(wire.bitmap_remove_action(node, name) for name in leftovers)
        else:
            if leftovers:
                actions.append(wire.bitmap_merge_action(node, base.name or "", leftovers))
            actions.extend(wire.bitmap_remove_action(node, name) for name in leftovers)
            if not base.recording:
                actions.append(wire.bitmap_enable_action(node, base.name or ""))
    return DiskCheckpoint(
        device=device,
        node=node,
        base=None if reason is not None else base_name,
        reason=reason,
        settle=tuple(actions),
    )


def persistent_for(driver: str) -> bool:
    """Only qcow2 keeps bitmaps across QEMU restarts; other formats get a bitmap that lives
    as long as the QEMU process (an incremental works until QEMU restarts)."""
    return driver == "qcow2"


def legacy_removals(node: str, bitmaps: Iterable[DirtyBitmap]) -> list[dict[str, Any]]:
    """Format 1's shared bitmaps: no repository of format 2 needs them."""
    return [
        wire.bitmap_remove_action(node, b.name)
        for b in bitmaps
        if b.name in LEGACY_BITMAPS and not b.busy
    ]
