"""Backing chains of a running guest: external and internal snapshots, block-commit, stream.

Every job goes through the one job driver (:mod:`blockctl._jobs`); every decision about the
chain is made on the pure :class:`~blockctl._graph.BlockGraph` read from QEMU right before.

Rules (qemu-facts.md §0.1, F1, F2, F7, F11):

- A commit writes into ``base``. If anything else in the VM depends on ``base`` (another
  device's chain, an overlay outside this chain), that user would silently read changed data:
  refused unless ``allow_shared_base``. Images used by *other* QEMUs cannot be seen from here;
  the error message and the docs say so.
- Backing layers are opened read-only (as libvirt does); the layers a commit writes are
  reopened read-write first, with their complete option sets from the drive registry, and an
  intermediate commit's base is made read-only again afterwards.
- Nodes that leave a chain stay open in QEMU (holding their files) until ``blockdev-del``:
  they are deleted top-down after the job succeeded, and optionally their files.
- Internal snapshots (``snapshot-save``/``-load``/``-delete``) need every writable disk to be
  qcow2; QEMU reports the failure only in ``query-jobs``, so it is checked first.
- Untrusted images (qemu-facts.md S2): nothing here opens an image blockctl did not create.
  An external snapshot's overlays are made by blockctl (backing file and format recorded, the
  backing being a node QEMU already has open) and added with ``backing: null``; commit and
  stream work on nodes already open, which passed :func:`blockctl._images.inspect_untrusted`
  when they were launched or plugged.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from blockctl import _images, _journal
from blockctl._agent import (
    DEFAULT_FREEZE_DEADLINE,
    Quiesce,
    coerce_quiesce,
    quiesced,
    require_agent,
)
from blockctl._backup.control import relaying
from blockctl._graph import BlockGraph, GraphNode, NodeRole
from blockctl._jobs import DEFAULT_CONTROL, JobControl, JobResult, error_policy, start_job
from blockctl._log import get_logger
from blockctl._machine import VM
from blockctl._ops import conflicts, recovery
from blockctl._ops.nodes import delete_nodes, node_options, refuse_passed_through, set_read_only
from blockctl._ops.nodes import flush_chain as flush_chain  # re-exported: chains' own API
from blockctl._ops.nodes import read_graph as read_graph
from blockctl._qmp import wire
from blockctl._qmp.models import CacheOptions, node_json, overlay_options
from blockctl._registry import DriveRecord
from blockctl.errors import (
    BlockctlError,
    ConfigError,
    JobCancelled,
    JobFailed,
    NodeNotFound,
    SnapshotLoadFailed,
    UnsafeOperation,
)
from blockctl.types import ErrorPolicy, ImageFormat

_log = get_logger()
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_PREFIX = re.compile(r"^(drv\d+)")


def _check_tag(tag: str) -> None:
    if not _TAG.fullmatch(tag):
        raise ConfigError(
            "tag", f"{tag!r}: use 1-40 of A-Z a-z 0-9 _ . - (start with a letter or digit)"
        )


def _record_of(vm: VM, device: str) -> DriveRecord | None:
    return vm.registry.drives.get(device)


def _writable_disks(graph: BlockGraph, devices: Sequence[str] | None) -> list[str]:
    if devices is not None:
        for device in devices:
            if device not in graph.devices:
                raise NodeNotFound(device, f"the VM has no device {device!r}")
        return list(devices)
    return [
        dev.id
        for dev in graph.devices.values()
        if dev.root is not None and not graph.format_node(dev.id).read_only
    ]


# Section: external snapshots


@dataclass(frozen=True, slots=True, kw_only=True)
class ExternalSnapshot:
    """One point in time across disks: each device's new overlay (written from now on)."""

    tag: str
    overlays: dict[str, Path]
    frozen: dict[str, str]  # device → the image that now holds the point in time
    quiesced: bool = False  # the guest's filesystems were frozen at the point in time


async def external_snapshot(
    vm: VM,
    tag: str,
    directory: Path | None = None,
    *,
    devices: Sequence[str] | None = None,
    quiesce: Quiesce | bool | str = Quiesce.OFF,
    freeze_deadline: float = DEFAULT_FREEZE_DEADLINE,
) -> ExternalSnapshot:
    """Snapshot ``devices`` (default: every writable disk) at one point in time.

    New qcow2 overlays (backing file and its format always recorded) are created in
    ``directory`` (default: beside each disk's current image), added with ``blockdev-add``
    (``backing: null``), then switched in by ONE ``transaction`` of ``blockdev-snapshot``
    actions. On any failure the added nodes and the created files are removed.

    ``quiesce``: freeze the guest's filesystems (guest agent) just around the transaction, so
    the images hold clean filesystems (see :func:`blockctl._agent.quiesced`).
    """
    _check_tag(tag)
    routed = vm.daemon_disk("snapshot", devices)
    if routed is not None:
        if coerce_quiesce(quiesce) is not Quiesce.OFF:
            raise ConfigError(
                "quiesce",
                f"{routed} is a vhost-user-blk disk: blockctl does not freeze the guest around "
                "a snapshot taken in its qemu-storage-daemon yet; snapshot it without quiesce",
            )
        async with vm.on_storage_daemon(routed, "snapshot") as daemon:
            return await external_snapshot(daemon, tag, directory, devices=[routed])
    require_agent(vm, quiesce)
    await vm.require("transaction", "blockdev-snapshot", "blockdev-add")
    await recovery.settle(vm)
    graph = await read_graph(vm)
    chosen = _writable_disks(graph, devices)
    if not chosen:
        raise ConfigError("devices", "no writable disk to snapshot")
    await refuse_passed_through(vm, graph, chosen, "snapshot")
    plans: list[tuple[str, GraphNode, Path, str]] = []
    for device in chosen:
        top = graph.format_node(device)
        if top.read_only:
            raise ConfigError("devices", f"{device} is read-only: nothing to snapshot")
        if top.filename is None:
            raise UnsafeOperation(f"{device}: cannot tell which file {top.name} is")
        try:
            ImageFormat(top.driver)
        except ValueError:
            raise ConfigError(
                "devices",
                f"{device}: {top.driver} images cannot be snapshotted externally by blockctl",
            ) from None
        # A disk on a server (nfs://, iscsi://) has no directory here: the overlay is a local
        # file, and its header names the URL as it is (a Path would fold its "//").
        remote = "://" in top.filename
        if remote and directory is None:
            raise ConfigError(
                "directory",
                f"{device} is on {top.filename}: give a local directory for its overlay (--dir)",
            )
        # Nor has a block device (host_device): its directory is /dev, no place for an image.
        if directory is None and _is_block_device(top.filename):
            raise ConfigError(
                "directory",
                f"{device} is the block device {top.filename}: give a directory for its "
                "overlay (--dir)",
            )
        where = Path(top.filename).parent if directory is None else Path(directory).absolute()
        overlay = where / _overlay_name(vm, device, tag)
        if overlay.exists():
            raise ConfigError("overlay", f"{overlay} exists; choose another tag or directory")
        prefix = m.group(1) if (m := _PREFIX.match(top.name)) else f"ext-{device}"
        taken = {n for n in graph.nodes}
        k = 1
        while f"{prefix}-s{k}" in taken:
            k += 1
        plans.append((device, top, overlay, f"{prefix}-s{k}"))
    async with conflicts.claim(vm, "snapshot", chosen):
        op = _journal.begin(vm, _journal.snapshot_intent(vm.name, tag, graph, plans))
    created: list[Path] = []
    added: list[str] = []

    def cache_of(device: str, top: GraphNode) -> CacheOptions | None:
        """The old top's cache options: the overlay takes over its I/O (``blockctl cache``
        reopens every node of the drive with the options recorded here)."""
        recorded = node_options(_record_of(vm, device), top.name)
        cache: CacheOptions | None = None if recorded is None else recorded.get("cache")
        return cache

    try:
        for device, top, overlay, name in plans:
            # -u: do not open the backing file (QEMU holds its lock); size given explicitly.
            await _images.create(
                overlay,
                ImageFormat.QCOW2,
                size=top.virtual_size,
                backing=_backing_name(str(top.filename)),
                backing_format=ImageFormat(top.driver),
                unsafe=True,
            )
            created.append(overlay)
            file_node, format_node = overlay_options(
                name, str(overlay), backing=None, cache=cache_of(device, top)
            )
            await wire.blockdev_add(vm.session, file_node)
            added.append(f"{name}-file")
            await wire.blockdev_add(vm.session, format_node)
            added.append(name)
        op.step(_journal.Step.SWITCHING)
        async with quiesced(
            vm, quiesce, operation="external snapshot", freeze_deadline=freeze_deadline
        ) as point:
            await wire.transaction_snapshot(
                vm.session, [(top.name, name) for _d, top, _o, name in plans]
            )
    except BaseException:
        with anyio.CancelScope(shield=True):
            # Refused: still in use, the transaction took effect after all (cancelled while
            # QEMU executed it, say a freeze deadline). The guest writes into it now.
            in_use = set(await delete_nodes(vm, added, event="blockctl.snapshot.rollback_failed"))
            for (_d, _t, _o, name), path in zip(plans, created, strict=False):
                if name in in_use or f"{name}-file" in in_use:
                    _log.warning("blockctl.snapshot.overlay_kept", overlay=str(path))
                    continue  # never unlink an image QEMU has open
                path.unlink(missing_ok=True)
            if in_use:
                # The snapshot happened: the record stays and the next reconcile (any chain
                # operation, or blockctl recover) finds the post-state and finishes it.
                op.step(_journal.Step.CONCLUDED)
                op.release()
            else:
                op.abandoned()
        raise
    op.step(_journal.Step.CONCLUDED)
    # QEMU reopens each old top read-only once its overlay is in (blockdev-snapshot): the
    # records say so too, or the next reopen from them would make a backing layer writable.
    await _record_read_only(vm, [p[0] for p in plans])
    for device, top, overlay, name in plans:
        record = _record_of(vm, device)
        if record is not None:
            # Recorded as QEMU now has it: the overlay's backing is the old top.
            nodes = overlay_options(
                name, str(overlay), backing=top.name, cache=cache_of(device, top)
            )
            added_json = tuple(node_json(n) for n in nodes)
            vm.registry.put(replace(record, nodes=(*record.nodes, *added_json)))
    op.finished()
    _log.info("blockctl.snapshot.external", vm=vm.name, tag=tag, devices=[p[0] for p in plans])
    return ExternalSnapshot(
        tag=tag,
        overlays={d: o for d, _t, o, _n in plans},
        frozen={d: str(t.filename) for d, t, _o, _n in plans},
        quiesced=point.consistent,
    )


def _is_block_device(filename: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(filename).st_mode)
    except OSError:
        return False


def _backing_name(filename: str) -> Path | str:
    """How an overlay's header names its backing: a local path, or a server's URL as it is
    (``nfs://…``, ``iscsi://…``: a Path would fold the ``//``)."""
    return filename if "://" in filename else Path(filename)


async def _record_read_only(vm: VM, devices: Sequence[str]) -> None:
    """Record each node's read-only state as QEMU has it now, for ``devices``' records."""
    live = {n.node_name: n.read_only for n in await vm.block_nodes()}
    for device in devices:
        record = _record_of(vm, device)
        if record is None:
            continue
        nodes = tuple(
            {**n, "read-only": live[str(n["node-name"])]}
            if str(n["node-name"]) in live and bool(n.get("read-only")) != live[str(n["node-name"])]
            else n
            for n in record.nodes
        )
        if nodes != record.nodes:
            vm.registry.put(replace(record, nodes=nodes))


def _overlay_name(vm: VM, device: str, tag: str) -> str:
    return overlay_name(vm.identity, device, tag)


def overlay_name(identity: str, device: str, tag: str) -> str:
    """The file name of external snapshot ``tag``'s overlay of ``device`` (``identity``: the
    VM's): how a snapshot is found again in a chain."""
    return f"{identity}-{device}-{tag}.qcow2"


async def list_external(vm: VM) -> dict[str, list[str]]:
    """Each device's chain, top first, as image files (each layer below the top holds the
    disk as it was when the overlay above it was created)."""
    graph = await read_graph(vm)
    chains = {
        device.id: [str(n.filename) for n in graph.chain_of(device.id)]
        for device in graph.devices.values()
        if device.root is not None
    }
    # A vhost-user-blk disk's chain is in its qemu-storage-daemon.
    for device_id, record in vm.registry.drives.items():
        if record.daemon is not None and vm.daemon_disk("snapshot list", [device_id]):
            async with vm.on_storage_daemon(device_id, "snapshot list") as daemon:
                chains.update(await list_external(daemon))
    return chains


async def daemon_graphs(vm: VM) -> dict[str, BlockGraph]:
    """Each vhost-user-blk disk's block graph, read on its qemu-storage-daemon's QMP (QEMU's
    graph has none of such a disk's nodes)."""
    graphs = {}
    for device_id, record in vm.registry.drives.items():
        if record.daemon is not None and vm.daemon_disk("chain", [device_id]):
            async with vm.on_storage_daemon(device_id, "chain") as daemon:
                graphs[device_id] = await read_graph(daemon)
    return graphs


async def delete_external(
    vm: VM,
    tag: str,
    *,
    devices: Sequence[str] | None = None,
    control: JobControl = DEFAULT_CONTROL,
) -> list[ChainResult]:
    """Delete external snapshot ``tag``: merge each overlay it created down into the image
    below (commit; active or intermediate), then delete the overlay files. ``devices``: only
    on these disks (default: every disk that has it). ``control`` applies to each commit (its
    deadline, default 600 s, to each one)."""
    _check_tag(tag)
    if devices is not None and (routed := vm.daemon_disk("snapshot delete", devices)):
        async with vm.on_storage_daemon(routed, "snapshot delete") as daemon:
            return await delete_external(daemon, tag, devices=[routed], control=control)
    graph = await read_graph(vm)
    for device in devices or ():
        if device not in graph.devices:
            raise NodeNotFound(device, f"the VM has no device {device!r}")
    found = []
    for dev in graph.devices.values():
        if dev.root is None or (devices is not None and dev.id not in devices):
            continue
        for node in graph.chain_of(dev.id):
            if node.filename and Path(node.filename).name == _overlay_name(vm, dev.id, tag):
                found.append((dev.id, node))
    if not found:
        where = "this VM" if devices is None else ", ".join(devices)
        raise ConfigError("tag", f"no external snapshot {tag!r} on {where} (see `snapshot list`)")
    results = []
    for device, overlay in found:
        results.append(
            await commit(vm, device, top=overlay.name, delete_files=True, control=control)
        )
    return results


# Section: commit and stream


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainResult:
    """What a commit or stream did: the job's result and the layers that left the chain."""

    device: str
    job: JobResult
    removed_nodes: tuple[str, ...]
    removed_files: tuple[str, ...]
    chain: tuple[str, ...]  # the device's chain afterwards, top first (node names)


def _index(chain: Sequence[GraphNode], name: str, device: str, what: str) -> int:
    for i, node in enumerate(chain):
        if node.name == name or node.filename == name:
            return i
    names = ", ".join(n.name for n in chain)
    raise ConfigError(what, f"{name!r} is not in the backing chain of {device} ({names})")


async def _restore_read_only(vm: VM, device: str, names: Sequence[str], why: str) -> None:
    """Reopen the layers ``names`` (format nodes) read-only again, shielded from
    cancellation (a Ctrl-C or a deadline must not leave them writable) and bounded.

    A failure here does not hide the caller's error: it is logged with the nodes left
    writable (``blockctl.commit.read_only_not_restored``), and the truth check of the next
    listing (``blockctl chain``: ``rw``) shows them.
    """
    if not names:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(30) as scope:
        try:
            graph = await read_graph(vm)
            for name in names:
                if name in graph.nodes:
                    await set_read_only(vm, device, graph, graph.nodes[name], True)
        except BlockctlError as exc:
            _log.error(
                "blockctl.commit.read_only_not_restored",
                vm=vm.name,
                device=device,
                nodes=list(names),
                after=why,
                error=str(exc),
            )
            return
    if scope.cancelled_caught:
        _log.error(
            "blockctl.commit.read_only_not_restored",
            vm=vm.name,
            device=device,
            nodes=list(names),
            after=why,
            error="no answer within 30 s",
        )
    else:
        _log.info("blockctl.commit.read_only_restored", vm=vm.name, nodes=list(names), after=why)


def _shared_users(
    graph: BlockGraph, base: GraphNode, device: str, chain: Sequence[GraphNode]
) -> list[str]:
    """Who else reads ``base``: through the graph, or through another node opened on the same
    file (each drive opens its own backing nodes, so two chains can share a file, not a node)."""
    ours = {n.name for n in chain} | {base.name}
    others = []
    same_file = [
        n
        for n in graph.nodes.values()
        if n.role is NodeRole.FORMAT and n.filename == base.filename and n.name not in ours
    ]
    for node in (base, *same_file):
        if node is not base and graph.attached(node.name):
            others.append(f"node {node.name} (the same file)")
        for user in graph.users_of(node.name):
            if not user.attached:
                continue
            if user.kind == "device" and user.name != device:
                others.append(f"device {user.name}")
            elif user.kind == "overlay" and user.name not in ours:
                others.append(f"overlay {user.name}")
    return sorted(set(others))


async def _finish(
    vm: VM,
    device: str,
    graph_before: BlockGraph,
    dropped: list[GraphNode],
    delete_files: bool,
    result: JobResult,
    new_top: str | None = None,
) -> ChainResult:
    """Delete the ``dropped`` layers' nodes (and files), update the registry, report the chain.
    ``new_top``: the node that now heads the chain when ``device`` named the old top node
    itself rather than a device (an active commit pivoted away from it)."""
    removed: list[str] = []
    files: list[str] = []
    for layer in dropped:  # top-down
        for name in graph_before.layer_nodes(layer):
            await wire.blockdev_del(vm.session, name)
            removed.append(name)
    after = await read_graph(vm)
    record = _record_of(vm, device)
    if record is not None:
        nodes = tuple(n for n in record.nodes if n["node-name"] not in removed)
        # Backing links as QEMU has them now (a commit or stream rewired them).
        nodes = tuple(
            {**n, "backing": after.nodes[str(n["node-name"])].backing}
            if "backing" in n and str(n["node-name"]) in after.nodes
            else n
            for n in nodes
        )
        vm.registry.put(replace(record, nodes=nodes))
    dropped_files = [layer.filename for layer in dropped if layer.filename is not None]
    if delete_files and dropped_files:
        # The copied data and the new backing links may still sit in QEMU's caches: make
        # them durable before the only other copy goes.
        await flush_chain(vm, device)
        for filename in dropped_files:
            Path(filename).unlink(missing_ok=True)
            files.append(filename)
    return ChainResult(
        device=device,
        job=result,
        removed_nodes=tuple(removed),
        removed_files=tuple(files),
        chain=tuple(
            n.name
            for n in after.chain_of(
                device if new_top is None or device in after.devices else new_top
            )
        ),
    )


async def commit(
    vm: VM,
    device: str,
    *,
    top: str | None = None,
    base: str | None = None,
    allow_shared_base: bool = False,
    delete_files: bool = False,
    control: JobControl = DEFAULT_CONTROL,
) -> ChainResult:
    """Commit ``top`` (default: the active layer) down into ``base`` (default: the layer
    right below ``top``). Nodes and files may be given by node name or filename.

    An active commit waits for READY and pivots (``job-complete``); an intermediate one has no
    READY phase. Afterwards the layers between ``top`` and ``base`` are deleted from QEMU (and,
    with ``delete_files``, from disk).

    ``control``: speed, deadline (default 600 s), error policy, pause timeout and hooks (see
    :class:`~blockctl._jobs.JobControl`).

    :raise UnsafeOperation: something else in the VM uses ``base`` (see ``allow_shared_base``).
    :raise JobNeverReady: an active commit could not catch up with the guest's writes under
    ``control.speed`` within the deadline; raise the speed limit (``set_speed``) or drop it.
    """
    if vm.daemon_disk("commit", [device]) is not None:
        async with vm.on_storage_daemon(device, "commit") as daemon:
            return await commit(
                daemon,
                device,
                top=top,
                base=base,
                allow_shared_base=allow_shared_base,
                delete_files=delete_files,
                control=control,
            )
    await vm.require("block-commit", "blockdev-reopen", "job-dismiss")
    policy = error_policy(control.on_error)
    speed, hooks = control.speed, control.hooks
    await recovery.settle(vm)
    # First: what runs on the disk may also hide its chain (a backup's filter above it).
    await conflicts.refuse_conflicts(vm, "commit", [device])
    graph = await read_graph(vm)
    chain = graph.chain_of(device)
    top_i = 0 if top is None else _index(chain, top, device, "top")
    if base is None:
        if top_i + 1 >= len(chain):
            raise ConfigError("base", f"{chain[top_i].name} has no backing file to commit into")
        base_i = top_i + 1
    else:
        base_i = _index(chain, base, device, "base")
    if base_i <= top_i:
        raise ConfigError("base", f"{chain[base_i].name} is not below {chain[top_i].name}")
    top_node, base_node = chain[top_i], chain[base_i]
    users = _shared_users(graph, base_node, device, chain[:base_i])
    if users and not allow_shared_base:
        raise UnsafeOperation(
            f"{base_node.name} ({base_node.filename}) is also used by {', '.join(users)}: "
            "committing into it would change what they read. Pass allow_shared_base "
            "(--allow-shared-base) if that is intended. (Images used by other VMs cannot be "
            "seen from here.)"
        )
    active = top_i == 0
    async with conflicts.claim(vm, "commit", [device]):
        op = _journal.begin(
            vm,
            _journal.chain_intent(
                vm.name,
                _journal.OpKind.COMMIT,
                device,
                graph,
                top=top_i,
                base=base_i,
                delete_files=delete_files,
            ),
        )
    # The layers the job writes are reopened read-write; those that are backing layers after
    # the job (every one of them unless an active commit pivoted) go back to read-only in
    # every path, success or failure, cancelled or not (issue 16, defect 3): a writable
    # backing node holds the image's write lock, so nothing else could even read it.
    writable = [base_node]
    if not active:
        # The overlay above top gets its backing-file name rewritten: it must be writable.
        writable.append(chain[top_i - 1])
    restore = [n.name for n in writable if n.read_only]
    try:
        for node in writable:
            await set_read_only(vm, device, graph, node, False)
    except BaseException:
        await _restore_read_only(vm, device, restore, "commit.reopen_failed")
        op.abandoned()
        raise

    async def start(job_id: str) -> None:
        op.starting(job_id)
        await wire.block_commit(
            vm.session,
            job_id=job_id,
            device=chain[0].name,
            top_node=None if active else top_node.name,
            base_node=base_node.name,
            speed=speed,
            on_error=policy.value,
        )

    try:
        async with (
            op.watch(),
            start_job(
                vm.session, "commit", start, target=base_node.name, speed=speed, hooks=hooks
            ) as job,
            # In a qemu-storage-daemon: other processes reach the job through this one.
            relaying(vm, job),
        ):
            result = await job.wait(
                # An intermediate commit has no READY phase (issue 16, defect 4).
                complete_on_ready=active,
                deadline=control.deadline_or(600.0),
                hooks=(*hooks, op),
                pause_timeout=control.pause_timeout,
                retries=policy.retries,
            )
    except BaseException as exc:
        # qemu-facts F1/F2: a failed or cancelled commit has already written part of top's
        # data into base; top still reads correctly, base is no longer its point in time.
        # A cancel (by another client too) is an outcome someone asked for: not a warning.
        log = _log.info if isinstance(exc, JobCancelled) else _log.warning
        log("blockctl.commit.failed", vm=vm.name, device=device, base=base_node.name)
        await _restore_read_only(vm, device, restore, "commit.failed")
        raise
    if not active:
        await _restore_read_only(vm, device, restore, "commit.done")
    _log.info(
        "blockctl.commit.done",
        vm=vm.name,
        device=device,
        top=top_node.name,
        base=base_node.name,
        active=active,
    )
    done = await _finish(
        vm,
        device,
        graph,
        list(chain[top_i:base_i]),
        delete_files,
        result,
        new_top=base_node.name if active else None,
    )
    op.finished()
    return done


async def stream(
    vm: VM,
    device: str,
    *,
    base: str | None = None,
    delete_files: bool = False,
    control: JobControl = DEFAULT_CONTROL,
) -> ChainResult:
    """Copy the data of the layers above ``base`` (default: all of them) into the active layer,
    which then backs onto ``base`` (or onto nothing). The streamed-out layers are deleted.
    ``control`` as for :func:`commit` (default deadline 600 s)."""
    if vm.daemon_disk("stream", [device]) is not None:
        async with vm.on_storage_daemon(device, "stream") as daemon:
            return await stream(
                daemon, device, base=base, delete_files=delete_files, control=control
            )
    await vm.require("block-stream", "job-dismiss")
    policy = error_policy(control.on_error)
    speed, hooks = control.speed, control.hooks
    await recovery.settle(vm)
    # First: what runs on the disk may also hide its chain (a backup's filter above it).
    await conflicts.refuse_conflicts(vm, "stream", [device])
    graph = await read_graph(vm)
    chain = graph.chain_of(device)
    if len(chain) < 2:
        raise ConfigError("device", f"{device} has no backing file to stream from")
    base_i = len(chain) if base is None else _index(chain, base, device, "base")
    if base_i == 0:
        raise ConfigError("base", "the base must be below the active layer")
    base_name = None if base is None else chain[base_i].name
    async with conflicts.claim(vm, "stream", [device]):
        op = _journal.begin(
            vm,
            _journal.chain_intent(
                vm.name,
                _journal.OpKind.STREAM,
                device,
                graph,
                top=0,
                base=base_i,
                delete_files=delete_files,
            ),
        )

    async def start(job_id: str) -> None:
        op.starting(job_id)
        await wire.block_stream(
            vm.session,
            job_id=job_id,
            device=chain[0].name,
            base_node=base_name,
            speed=speed,
            on_error=policy.value,
        )

    async with (
        op.watch(),
        start_job(
            vm.session, "stream", start, target=chain[0].name, speed=speed, hooks=hooks
        ) as job,
        relaying(vm, job),
    ):
        result = await job.wait(
            complete_on_ready=False,
            deadline=control.deadline_or(600.0),
            hooks=(*hooks, op),
            pause_timeout=control.pause_timeout,
            retries=policy.retries,
        )
    done = await _finish(vm, device, graph, list(chain[1:base_i]), delete_files, result)
    op.finished()
    return done


# Section: internal snapshots (VM state + disks, inside the qcow2 images)


def _internal_targets(
    graph: BlockGraph, devices: Sequence[str] | None = None, vmstate: str | None = None
) -> tuple[list[str], list[str], str]:
    """The disks of an internal snapshot: (device ids, their format nodes, the vmstate node).

    ``devices`` None: every writable disk, each of which must be qcow2 (QEMU reports a
    writable disk that cannot hold a snapshot only inside the job). Given: exactly those
    disks, each of which must exist, have a medium, be writable and be qcow2; any other
    writable disk (a raw one, say) is left out of the snapshot, as QEMU allows. ``vmstate``:
    the disk that holds the VM state (default: the first one); it must be one of them.
    """
    chosen: list[str] = []
    if devices is None:
        for device in graph.devices.values():
            if device.root is None or graph.format_node(device.id).read_only:
                continue
            chosen.append(device.id)
    else:
        for device_id in devices:
            if device_id not in graph.devices:
                names = ", ".join(sorted(graph.devices)) or "none"
                raise NodeNotFound(
                    device_id, f"the VM has no device {device_id!r} (its devices: {names})"
                )
            if graph.devices[device_id].root is None:
                raise ConfigError("devices", f"{device_id} has no medium")
            if graph.format_node(device_id).read_only:
                raise ConfigError(
                    "devices", f"{device_id} is read-only: an internal snapshot writes into it"
                )
            if device_id not in chosen:
                chosen.append(device_id)
    nodes = []
    for device_id in chosen:
        node = graph.format_node(device_id)
        if node.driver != "qcow2":
            raise UnsafeOperation(
                f"{device_id} ({node.driver}) is writable but cannot hold internal snapshots; "
                "only qcow2 can (QEMU would report this only inside the job). Leave it out "
                "(--disk / devices= naming only the qcow2 disks; it is then not part of the "
                "snapshot), use an external snapshot, or make the disk read-only"
            )
        nodes.append(node.name)
    if not nodes:
        raise ConfigError("devices", "no writable qcow2 disk to hold the VM state")
    if vmstate is None:
        return chosen, nodes, nodes[0]
    if vmstate not in chosen:
        raise ConfigError(
            "vmstate",
            f"{vmstate!r} is not one of the snapshot's disks ({', '.join(chosen)}): the VM "
            "state goes into one of them",
        )
    return chosen, nodes, nodes[chosen.index(vmstate)]


async def _check_loadable(
    vm: VM, tag: str, chosen: Sequence[str], nodes: Sequence[str], vmstate: str
) -> None:
    """Refuse a ``snapshot-load`` that QEMU would refuse only after stopping the VM: every
    disk must have the snapshot, and the vmstate disk must hold VM state for it (from
    ``query-named-block-nodes``; nothing has been sent yet)."""
    details = {d.node.node_name: d for d in await wire.query_named_block_node_details(vm.session)}
    missing = [
        device
        for device, node in zip(chosen, nodes, strict=True)
        if node not in details or tag not in details[node].snapshots
    ]
    if missing:
        have = {
            device: list(details[node].snapshots) if node in details else []
            for device, node in zip(chosen, nodes, strict=True)
        }
        raise ConfigError(
            "tag",
            f"snapshot {tag!r} is not on {', '.join(missing)} (internal snapshots per disk: "
            f"{have}); nothing was changed. Load a tag every disk has, or name the disks "
            "that have it (--disk)",
        )
    sizes = dict(details[vmstate].vm_state_sizes)
    if sizes.get(tag, 0) <= 0:
        device = chosen[list(nodes).index(vmstate)]
        raise ConfigError(
            "tag",
            f"snapshot {tag!r} on {device} holds no VM state (a disk-only snapshot, or the "
            "VM state is on another disk: --vmstate); nothing was changed. A disk-only "
            "snapshot can be reverted only offline: blockctl down VM, then blockctl img "
            f"snapshot IMAGE apply {tag}",
        )


def _log_size(vm: VM) -> int:
    if vm.run_dir is None:
        return 0
    try:
        return (vm.run_dir / "qemu.log").stat().st_size
    except OSError:
        return 0


def _log_since(vm: VM, offset: int) -> tuple[str, ...]:
    """What QEMU wrote to its log since ``offset`` (its reasons are often only there)."""
    if vm.run_dir is None:
        return ()
    try:
        with open(vm.run_dir / "qemu.log", "rb") as f:
            f.seek(offset)
            text = f.read(64 * 1024).decode(errors="replace")
    except OSError:
        return ()
    return tuple(line for line in text.splitlines() if line.strip())[-20:]


#: QEMU's load_snapshot() reverts every disk, then loads the VM state: an error with this
#: text comes after the disks were reverted (QEMU 7.2 and 10.0: "Error -22 while loading VM
#: state"); any earlier error comes before anything changed.
_LOADING_STATE = "while loading VM state"


async def _load_failed(
    vm: VM, exc: JobFailed, chosen: Sequence[str], was_running: bool, log_offset: int
) -> SnapshotLoadFailed:
    """What a failed ``snapshot-load`` left: the run state, the disks reverted, whether the
    guest was resumed (only when nothing changed), and QEMU's log lines."""
    reverted = tuple(chosen) if _LOADING_STATE in (exc.error or "") else ()
    resumed = False
    state = "unknown"
    with anyio.CancelScope(shield=True):
        try:
            status = await vm.status()
            if not reverted and was_running and not status.running:
                # Nothing was reverted: the guest continues exactly where it was stopped.
                await wire.cont(vm.session)
                resumed = True
                status = await vm.status()
            state = status.status
        except BlockctlError as err:
            state = f"unknown ({err})"
    log = _log_since(vm, log_offset)
    if reverted:
        outcome = (
            f"QEMU had reverted {', '.join(reverted)} to the snapshot but not the RAM, and "
            f"left the VM {state}. blockctl does not resume it: the guest's memory no longer "
            "matches its disks. Load a snapshot that fits this VM, or restart it "
            "(blockctl down; the disks hold the snapshot's data)"
        )
    elif resumed:
        outcome = f"nothing was reverted; blockctl resumed the guest (now {state})"
    else:
        outcome = f"nothing was reverted; the VM is {state}"
    failed = SnapshotLoadFailed(
        f"{exc}; {outcome}"
        + ("\n  qemu.log:\n" + "\n".join(f"  | {x}" for x in log) if log else ""),
        job_id=exc.job_id,
        job_type=exc.job_type,
        target=exc.target,
        status=exc.status,
        error=exc.error,
        offset=exc.offset,
        length=exc.length,
    )
    failed.run_state = state
    failed.reverted = reverted
    failed.resumed = resumed
    failed.qemu_log = log
    return failed


async def _internal(
    vm: VM,
    kind: str,
    tag: str,
    control: JobControl,
    devices: Sequence[str] | None = None,
    vmstate: str | None = None,
) -> JobResult:
    _check_tag(tag)
    # QEMU's snapshot jobs take neither a speed nor an error policy.
    if control.speed is not None:
        raise ConfigError("speed", f"{kind} has no speed limit")
    if control.on_error is not ErrorPolicy.REPORT:
        raise ConfigError("on_error", f"{kind} has no error policy: it fails on an I/O error")
    hooks = control.hooks
    await vm.require(kind)
    chosen, nodes, vmstate_node = _internal_targets(await read_graph(vm), devices, vmstate)
    was_running = False
    log_offset = 0
    if kind == "snapshot-load":
        await _check_loadable(vm, tag, chosen, nodes, vmstate_node)
        was_running = (await vm.status()).running
        log_offset = _log_size(vm)

    async def start(job_id: str) -> None:
        if kind == "snapshot-save":
            await wire.snapshot_save(
                vm.session, job_id=job_id, tag=tag, vmstate=vmstate_node, devices=nodes
            )
        elif kind == "snapshot-load":
            await wire.snapshot_load(
                vm.session, job_id=job_id, tag=tag, vmstate=vmstate_node, devices=nodes
            )
        else:
            await wire.snapshot_delete(vm.session, job_id=job_id, tag=tag, devices=nodes)

    short = kind.removeprefix("snapshot-")  # job ids: bc-save-…, bc-load-…, bc-delete-…
    try:
        async with start_job(vm.session, short, start, job_type=kind, hooks=hooks) as job:
            return await job.wait(
                complete_on_ready=False, deadline=control.deadline_or(300.0), hooks=hooks
            )
    except JobFailed as exc:
        if kind != "snapshot-load":
            raise
        raise await _load_failed(vm, exc, chosen, was_running, log_offset) from exc


async def save_internal(
    vm: VM,
    tag: str,
    *,
    quiesce: Quiesce | bool | str = Quiesce.OFF,
    freeze_deadline: float = 60.0,
    devices: Sequence[str] | None = None,
    vmstate: str | None = None,
    control: JobControl = DEFAULT_CONTROL,
) -> JobResult:
    """``snapshot-save``: VM state and every writable disk (or the ``devices`` named: others
    are left out of the snapshot), inside the qcow2 images; the VM state goes into
    ``vmstate`` (a device id; default the first disk).

    ``quiesce``: the guest's filesystems are frozen for the whole job (QEMU stops the VM for
    it anyway). The saved memory holds the frozen state: a guest loaded from this snapshot
    resumes frozen, so thaw it afterwards (``blockctl agent VM thaw``).

    ``control``: the deadline (default 300 s) and hooks; a snapshot job has no speed limit or
    error policy (:class:`~blockctl.errors.ConfigError` if one is given). The same for
    :func:`load_internal` and :func:`delete_internal`.
    """
    vm.refuse_daemon_disks("internal snapshot", devices)
    require_agent(vm, quiesce)
    async with quiesced(
        vm, quiesce, operation="internal snapshot", freeze_deadline=freeze_deadline
    ):
        return await _internal(vm, "snapshot-save", tag, control, devices, vmstate)


async def load_internal(
    vm: VM,
    tag: str,
    *,
    devices: Sequence[str] | None = None,
    vmstate: str | None = None,
    control: JobControl = DEFAULT_CONTROL,
) -> JobResult:
    """``snapshot-load``: the guest continues from the saved state.

    Refused before anything is sent unless every disk has ``tag`` and the vmstate disk holds
    VM state for it (:class:`~blockctl.errors.ConfigError`; the VM runs on untouched).

    :raise SnapshotLoadFailed: QEMU failed midway; it says the VM's run state, which disks
        were reverted and whether the guest was resumed.
    """
    return await _internal(vm, "snapshot-load", tag, control, devices, vmstate)


async def delete_internal(
    vm: VM,
    tag: str,
    *,
    devices: Sequence[str] | None = None,
    control: JobControl = DEFAULT_CONTROL,
) -> JobResult:
    return await _internal(vm, "snapshot-delete", tag, control, devices)


async def list_internal(vm: VM) -> dict[str, tuple[str, ...]]:
    """Internal snapshot names per writable qcow2 disk (from the running QEMU)."""
    graph = await read_graph(vm)
    details = {d.node.node_name: d for d in await wire.query_named_block_node_details(vm.session)}
    result = {}
    for device in graph.devices.values():
        if device.root is None:
            continue
        node = graph.format_node(device.id)
        detail = details.get(node.name)
        result[device.id] = () if detail is None else detail.snapshots
    return result
