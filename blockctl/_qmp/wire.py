"""The only module that spells QMP command and event names.

One typed async function per command. Replies become frozen dataclasses from
``blockctl._qmp.models``; callers above ``_qmp`` never see a raw reply.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import anyio

from blockctl._qmp import models as _models
from blockctl._qmp.models import (
    BlockDevice,
    BlockNode,
    Capabilities,
    Qcow2CreateOptions,
    StatusInfo,
    VersionInfo,
)
from blockctl._qmp.models import parse_list as _parse_list
from blockctl._qmp.session import Event, EventStream, QMPSession
from blockctl.errors import ConfigError, Conflict

# Events, by the name QEMU sends.
EVENT_SHUTDOWN = "SHUTDOWN"
EVENT_STOP = "STOP"
EVENT_DEVICE_DELETED = "DEVICE_DELETED"


async def query_version(session: QMPSession) -> VersionInfo:
    return VersionInfo.from_qmp(await session.execute("query-version"))


async def query_status(session: QMPSession) -> StatusInfo:
    return StatusInfo.from_qmp(await session.execute("query-status"))


async def query_block(session: QMPSession) -> tuple[BlockDevice, ...]:
    return _parse_list(await session.execute("query-block"), "query-block", BlockDevice)


#: How long a read of the node list waits for a concluded stream job to be dismissed (its
#: driver does that right after reading the outcome).
STREAM_DISMISS_WAIT = 10.0


async def _named_block_nodes(session: QMPSession) -> Any:
    """``query-named-block-nodes`` (flat), never while a stream job is concluded and not yet
    dismissed: QEMU (7.2 and 10.0.2, measured: ``scripts/repro_stream_query.py``) segfaults
    on it then. The job still holds the implicit copy-on-read filter it took out of the graph,
    now with no child, and ``bdrv_refresh_filename`` follows that missing child (NULL +
    0x40). Such a job's dismissal (its ``null`` transition) is waited for, and the read
    refused (:class:`Conflict`) if it does not come. A stream that concludes between the
    ``query-jobs`` here and the query is not seen: blockctl's own streams never sit concluded
    (:func:`block_stream`); another tool's may."""
    deadline = time.monotonic() + STREAM_DISMISS_WAIT
    # Listening before the jobs are read: a dismissal in between is not missed.
    with session.events("JOB_STATUS_CHANGE") as changes:
        while True:
            stuck = {
                job.id
                for job in await query_jobs(session)
                if job.type == "stream" and job.status is _models.JobStatus.CONCLUDED
            }
            if not stuck:
                return await session.execute("query-named-block-nodes", {"flat": True})
            left = deadline - time.monotonic()
            if left <= 0:
                job_id = sorted(stuck)[0]
                raise Conflict(
                    f"{session.label}: stream job {job_id} has concluded but was not dismissed "
                    f"within {STREAM_DISMISS_WAIT:g} s, and QEMU crashes (SIGSEGV) on "
                    "query-named-block-nodes until it is: the block graph was not read. Way "
                    f"out: `blockctl recover {session.label}` (a job blockctl started), or "
                    "dismiss it (QMP job-dismiss), then run the command again",
                    kind="stream",
                    job_id=job_id,
                )
            with anyio.move_on_after(left):
                await changes.wait_for(_dismissal_of(frozenset(stuck)))


def _dismissal_of(job_ids: frozenset[str]) -> Callable[[Event], bool]:
    """Whether an event is the ``null`` transition (the dismissal) of one of ``job_ids``."""
    return lambda e: e.data.get("id") in job_ids and e.data.get("status") == "null"


async def query_named_block_nodes(session: QMPSession) -> tuple[BlockNode, ...]:
    reply = await _named_block_nodes(session)
    return _parse_list(reply, "query-named-block-nodes", BlockNode)


async def query_capabilities(session: QMPSession) -> Capabilities:
    return Capabilities.from_qmp(await session.execute("query-qmp-schema"))


async def qom_get(session: QMPSession, path: str, prop: str) -> object:
    """A QOM property, as QEMU's JSON (its type depends on the property)."""
    result: object = await session.execute("qom-get", {"path": path, "property": prop})
    return result


async def query_name(session: QMPSession) -> str | None:
    """The name QEMU was started with (``-name``), or None."""
    reply = await session.execute("query-name")
    name = reply.get("name") if isinstance(reply, dict) else None
    return str(name) if name else None


async def qom_children(session: QMPSession, path: str) -> dict[str, str]:
    """The QOM children of ``path`` (``child<TYPE>`` properties): name → TYPE."""
    return {
        name: kind[len("child<") : -1]
        for name, kind in (await qom_list(session, path)).items()
        if kind.startswith("child<")
    }


async def pci_root_slots_used(session: QMPSession) -> set[int]:
    """The slots of PCI bus 0 that hold a device (``query-pci``; bus 0 is listed even before
    the guest's firmware numbers the buses behind bridges)."""
    reply = await session.execute("query-pci")
    return {int(d["slot"]) for bus in reply if int(bus["bus"]) == 0 for d in bus["devices"]}


async def system_powerdown(session: QMPSession) -> None:
    """Press the ACPI power button. The guest decides whether it powers off."""
    await session.execute("system_powerdown")


async def quit_qemu(session: QMPSession) -> None:
    """Ask QEMU to exit. The reply may be lost if QEMU closes the socket first."""
    await session.execute("quit")


async def system_reset(session: QMPSession) -> None:
    """Reset the machine; it also completes pending device removals."""
    await session.execute("system_reset")


async def stop(session: QMPSession) -> None:
    await session.execute("stop")


async def cont(session: QMPSession) -> None:
    await session.execute("cont")


@contextlib.contextmanager
def stop_events(session: QMPSession) -> Iterator[EventStream]:
    """QEMU's ``STOP``: the VM paused (by a drive's error policy, a client, …)."""
    with session.events(EVENT_STOP) as stream:
        yield stream


# Section: drives


async def blockdev_add(session: QMPSession, options: Mapping[str, Any]) -> None:
    """Add one node; ``options`` always name the driver (no probing) and a node-name."""
    _check_node_options(options)
    await session.execute("blockdev-add", dict(options))


def _check_node_options(options: Mapping[str, Any]) -> None:
    """Every node blockctl sends names its driver and node-name, and never disables locking
    (qemu-facts.md S1, T9); nested inline nodes (``file: {...}``) too."""
    if not isinstance(options.get("driver"), str) or not isinstance(options.get("node-name"), str):
        raise ConfigError("blockdev", f"node options without a driver or node-name: {options!r}")
    for key, value in options.items():
        if key == "locking" and value not in ("on", "auto"):
            raise ConfigError("blockdev", "blockctl never disables image locking")
        inline = isinstance(value, Mapping) and key in ("file", "backing", "data-file")
        if inline and "driver" not in value:
            raise ConfigError("blockdev", f"inline {key} node without a driver: {value!r}")


async def secret_add(session: QMPSession, secret: _models.SecretObject) -> None:
    """A ``secret`` object QEMU reads from a file (the secret itself is never sent)."""
    if set(secret) != {"qom-type", "id", "file", "format"}:
        raise ConfigError("secret", "a secret object is read from a file, never sent inline")
    await session.execute("object-add", dict(secret))


async def object_del(session: QMPSession, object_id: str) -> None:
    await session.execute("object-del", {"id": object_id})


async def blockdev_del(session: QMPSession, node_name: str) -> None:
    await session.execute("blockdev-del", {"node-name": node_name})


async def blockdev_reopen(session: QMPSession, options: Sequence[Mapping[str, Any]]) -> None:
    """Reopen nodes with *complete* option sets: anything omitted resets to its default."""
    for node in options:
        _check_node_options(node)
    await session.execute("blockdev-reopen", {"options": [dict(o) for o in options]})


async def device_add(session: QMPSession, options: Mapping[str, Any]) -> None:
    await session.execute("device_add", dict(options))


async def chardev_add(session: QMPSession, options: Mapping[str, Any]) -> None:
    await session.execute("chardev-add", dict(options))


async def query_chardev_labels(session: QMPSession) -> set[str]:
    """The ids of the chardevs QEMU has."""
    return {str(c["label"]) for c in await session.execute("query-chardev")}


async def chardev_remove(session: QMPSession, chardev_id: str) -> None:
    await session.execute("chardev-remove", {"id": chardev_id})


async def device_del(session: QMPSession, device_id: str) -> None:
    await session.execute("device_del", {"id": device_id})


async def qom_list(session: QMPSession, path: str) -> dict[str, str]:
    """QOM children and properties of ``path``: name → type."""
    reply = await session.execute("qom-list", {"path": path})
    return {str(p["name"]): str(p["type"]) for p in reply}


async def blockdev_open_tray(session: QMPSession, device_id: str, *, force: bool) -> None:
    await session.execute("blockdev-open-tray", {"id": device_id, "force": force})


async def blockdev_close_tray(session: QMPSession, device_id: str) -> None:
    await session.execute("blockdev-close-tray", {"id": device_id})


async def blockdev_remove_medium(session: QMPSession, device_id: str) -> None:
    await session.execute("blockdev-remove-medium", {"id": device_id})


async def blockdev_insert_medium(session: QMPSession, device_id: str, node_name: str) -> None:
    await session.execute("blockdev-insert-medium", {"id": device_id, "node-name": node_name})


async def block_resize(session: QMPSession, node_name: str, size: int) -> None:
    await session.execute("block_resize", {"node-name": node_name, "size": size})


async def block_set_io_throttle(
    session: QMPSession, device_id: str, limits: Mapping[str, int], group: str | None
) -> None:
    """Set the device's I/O limits; every one of the six base limits must be given."""
    arguments: dict[str, Any] = {"id": device_id, **limits}
    if group is not None:
        arguments["group"] = group
    await session.execute("block_set_io_throttle", arguments)


@contextlib.contextmanager
def device_deleted_events(session: QMPSession) -> Iterator[EventStream]:
    with session.events(EVENT_DEVICE_DELETED) as stream:
        yield stream


def is_device_deleted(event: Event, device_id: str) -> bool:
    """The DEVICE_DELETED that means ``device_id`` is gone.

    virtio devices send one for their backend first (only a ``path`` ending in
    ``/virtio-backend``, no ``device`` key); that one must not count.
    """
    if event.name != EVENT_DEVICE_DELETED:
        return False
    return bool(
        event.data.get("device") == device_id
        or event.data.get("path") == f"/machine/peripheral/{device_id}"
    )


# Section: snapshots


async def transaction_snapshot(session: QMPSession, pairs: list[tuple[str, str]]) -> None:
    """One ``transaction`` of ``blockdev-snapshot`` actions: every (node, overlay) pair is
    switched at the same point in time, or none is."""
    actions = [
        {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}
        for node, overlay in pairs
    ]
    await session.execute("transaction", {"actions": actions})


async def snapshot_save(
    session: QMPSession, *, job_id: str, tag: str, vmstate: str, devices: list[str]
) -> None:
    """Start an internal snapshot job (VM state into ``vmstate``). Such jobs are never
    auto-dismissed and report failure only in ``query-jobs``."""
    await session.execute(
        "snapshot-save", {"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices}
    )


async def snapshot_load(
    session: QMPSession, *, job_id: str, tag: str, vmstate: str, devices: list[str]
) -> None:
    await session.execute(
        "snapshot-load", {"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices}
    )


async def snapshot_delete(
    session: QMPSession, *, job_id: str, tag: str, devices: list[str]
) -> None:
    await session.execute("snapshot-delete", {"job-id": job_id, "tag": tag, "devices": devices})


# Section: backup


def _backup_data(
    job_id: str,
    fields: Mapping[str, Any],
    bitmap: str | None,
    bitmap_mode: str | None,
    compress: bool,
    speed: int | None,
    on_source_error: str | None,
    on_target_error: str | None,
) -> dict[str, Any]:
    """The data of a backup action: required fields, never auto-dismissed, optional ones only
    when given."""
    optional = {
        "bitmap": bitmap,
        "bitmap-mode": bitmap_mode,
        "compress": True if compress else None,
        "speed": speed,
        "on-source-error": on_source_error,
        "on-target-error": on_target_error,
    }
    return {
        "job-id": job_id,
        **fields,
        "auto-dismiss": False,
        **{k: v for k, v in optional.items() if v is not None},
    }


def backup_action(
    *,
    job_id: str,
    device: str,
    target: str,
    sync: str,
    bitmap: str | None = None,
    bitmap_mode: str | None = None,
    compress: bool = False,
    speed: int | None = None,
    on_source_error: str | None = None,
    on_target_error: str | None = None,
) -> dict[str, Any]:
    """One ``blockdev-backup`` action for a ``transaction`` (never auto-dismissed)."""
    fields = {"device": device, "target": target, "sync": sync}
    data = _backup_data(
        job_id, fields, bitmap, bitmap_mode, compress, speed, on_source_error, on_target_error
    )
    return {"type": "blockdev-backup", "data": data}


def drive_backup_action(
    *,
    job_id: str,
    device: str,
    target: str,
    target_format: str,
    sync: str,
    bitmap: str | None = None,
    bitmap_mode: str | None = None,
    compress: bool = False,
    speed: int | None = None,
    on_source_error: str | None = None,
    on_target_error: str | None = None,
) -> dict[str, Any]:
    """The legacy ``drive-backup`` action (deprecated by QEMU): into an image blockctl created
    (``mode: existing``), with its format named, so QEMU never probes it."""
    fields = {
        "device": device,
        "target": target,
        "format": target_format,
        "mode": "existing",
        "sync": sync,
    }
    data = _backup_data(
        job_id, fields, bitmap, bitmap_mode, compress, speed, on_source_error, on_target_error
    )
    return {"type": "drive-backup", "data": data}


def bitmap_add_action(node: str, name: str, *, persistent: bool = True) -> dict[str, Any]:
    """Add a dirty bitmap; ``persistent``: kept in the qcow2 image across clean restarts."""
    return {
        "type": "block-dirty-bitmap-add",
        "data": {"node": node, "name": name, "persistent": persistent},
    }


def bitmap_clear_action(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": name}}


async def transaction(
    session: QMPSession, actions: Sequence[Mapping[str, Any]], *, grouped: bool = False
) -> None:
    """Run ``actions`` atomically. ``grouped``: the jobs they start succeed or fail together."""
    arguments: dict[str, Any] = {"actions": [dict(a) for a in actions]}
    check_arguments("transaction", arguments)
    if grouped:
        arguments["properties"] = {"completion-mode": "grouped"}
    await session.execute("transaction", arguments)


async def bitmap_remove(session: QMPSession, node: str, name: str) -> None:
    await session.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


def bitmap_merge_action(node: str, target: str, bitmaps: Sequence[str]) -> dict[str, Any]:
    """Merge ``bitmaps`` (names on ``node``) into ``target``, as a transaction action."""
    data = {"node": node, "target": target, "bitmaps": list(bitmaps)}
    check_arguments("block-dirty-bitmap-merge", data)
    return {"type": "block-dirty-bitmap-merge", "data": data}


async def bitmap_merge(session: QMPSession, node: str, target: str, bitmaps: Sequence[str]) -> None:
    """``block-dirty-bitmap-merge``: ``target`` |= each of ``bitmaps`` (at least one)."""
    data = bitmap_merge_action(node, target, bitmaps)["data"]
    await session.execute("block-dirty-bitmap-merge", data)


def check_arguments(command: str, arguments: Mapping[str, Any] | None) -> None:
    """Refuse arguments that are schema-valid but known to crash QEMU (qemu-facts.md §0.5).

    ``block-dirty-bitmap-merge`` with an empty ``bitmaps`` list kills QEMU 7.2.22 with SIGSEGV,
    directly or as a ``transaction`` action; blockctl never sends it.
    """
    if command == "transaction" and arguments is not None:
        for action in arguments.get("actions") or ():
            if isinstance(action, Mapping):
                check_arguments(str(action.get("type")), action.get("data"))
    if command == "block-dirty-bitmap-merge":
        bitmaps = None if arguments is None else arguments.get("bitmaps")
        if not isinstance(bitmaps, list) or not bitmaps:
            raise ConfigError(
                "bitmaps",
                "block-dirty-bitmap-merge needs at least one source bitmap "
                "(an empty list crashes QEMU 7.2)",
            )


# Section: NBD exports (pull-mode backup)


def bitmap_disable_action(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}


def bitmap_enable_action(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": name}}


def bitmap_remove_action(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}}


async def nbd_server_start(session: QMPSession, socket_path: str) -> None:
    await session.execute(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket_path}}}
    )


async def nbd_server_stop(session: QMPSession) -> None:
    await session.execute("nbd-server-stop")


async def block_export_add(
    session: QMPSession,
    *,
    export_id: str,
    node: str,
    name: str,
    writable: bool,
    bitmaps: Sequence[tuple[str, str]] = (),
) -> None:
    """Export ``node`` over the NBD server as ``name``; ``bitmaps``: (node, bitmap) pairs
    whose dirty maps are offered as ``qemu:dirty-bitmap:<bitmap>`` (they must be disabled)."""
    arguments: dict[str, Any] = {
        "type": "nbd",
        "id": export_id,
        "node-name": node,
        "name": name,
        "writable": writable,
    }
    if bitmaps:
        arguments["bitmaps"] = [{"node": n, "name": b} for n, b in bitmaps]
    await session.execute("block-export-add", arguments)


async def block_export_del(session: QMPSession, export_id: str) -> None:
    await session.execute("block-export-del", {"id": export_id})


async def query_block_exports(session: QMPSession) -> tuple[_models.BlockExport, ...]:
    """The block exports QEMU (or a qemu-storage-daemon) runs, with their type and node."""
    return _parse_list(
        await session.execute("query-block-exports"), "query-block-exports", _models.BlockExport
    )


async def raw_command(
    session: QMPSession, command: str, arguments: Mapping[str, Any] | None
) -> object:
    """Any command, untyped: the CLI's ``blockctl qmp`` pass-through and nothing else."""
    if not command or not all(c.isascii() and (c.isalnum() or c in "-_") for c in command):
        raise ConfigError("command", f"{command!r} is not a QMP command name")
    check_arguments(command, arguments)
    result: object = await session.execute(command, arguments)
    return result


@contextlib.contextmanager
def shutdown_events(session: QMPSession) -> Iterator[EventStream]:
    with session.events(EVENT_SHUTDOWN) as stream:
        yield stream


# Section: jobs

#: The events a job driver listens to (register them before the command that starts a job).
JOB_EVENTS = tuple(kind.value for kind in _models.JobEventKind)


@contextlib.contextmanager
def job_events(session: QMPSession) -> Iterator[EventStream]:
    with session.events(*JOB_EVENTS) as stream:
        yield stream


def parse_job_event(event: Event) -> _models.JobEvent:
    """A job event as a typed record (only for events from :func:`job_events`)."""
    return _models.JobEvent.from_event(event.name, event.data)


async def query_jobs(session: QMPSession) -> tuple[_models.JobInfo, ...]:
    return _parse_list(await session.execute("query-jobs"), "query-jobs", _models.JobInfo)


async def block_job_io_status(session: QMPSession, job_id: str) -> str | None:
    """The job's ``io-status`` (``ok``, ``failed``, ``nospace``); None if it is not listed."""
    reply = await session.execute("query-block-jobs")
    for entry in _parse_list(reply, "query-block-jobs", _models.BlockJobIOStatus):
        if entry.job_id == job_id:
            return entry.io_status
    return None


async def query_named_block_node_details(session: QMPSession) -> tuple[_models.NodeDetail, ...]:
    """``query-named-block-nodes`` (flat) with image and dirty-bitmap details, for the graph."""
    reply = await _named_block_nodes(session)
    return _parse_list(reply, "query-named-block-nodes", _models.NodeDetail)


async def job_cancel(session: QMPSession, job_id: str) -> None:
    await session.execute("job-cancel", {"id": job_id})


async def job_pause(session: QMPSession, job_id: str) -> None:
    await session.execute("job-pause", {"id": job_id})


async def job_resume(session: QMPSession, job_id: str) -> None:
    await session.execute("job-resume", {"id": job_id})


async def job_complete(session: QMPSession, job_id: str) -> None:
    await session.execute("job-complete", {"id": job_id})


async def job_finalize(session: QMPSession, job_id: str) -> None:
    await session.execute("job-finalize", {"id": job_id})


async def job_dismiss(session: QMPSession, job_id: str) -> None:
    await session.execute("job-dismiss", {"id": job_id})


async def block_job_set_speed(session: QMPSession, job_id: str, speed: int) -> None:
    """Limit a block job to ``speed`` bytes/s; 0 removes the limit."""
    await session.execute("block-job-set-speed", {"device": job_id, "speed": speed})


def _job_options(
    job_id: str,
    speed: int | None,
    auto_finalize: bool,
    extra: Mapping[str, Any],
    *,
    auto_dismiss: bool = False,
) -> dict[str, Any]:
    """The options every blockctl job gets: its id, not auto-dismissed (so its outcome
    survives a controller crash: qemu-facts F3; a stream's way is :func:`block_stream`'s),
    and the optional speed limit."""
    options: dict[str, Any] = {"job-id": job_id, "auto-dismiss": auto_dismiss}
    if not auto_finalize:
        options["auto-finalize"] = False
    if speed is not None:
        options["speed"] = speed
    options.update({k: v for k, v in extra.items() if v is not None})
    return options


async def blockdev_backup(
    session: QMPSession,
    *,
    job_id: str,
    device: str,
    target: str,
    sync: str = "full",
    speed: int | None = None,
    auto_finalize: bool = True,
    bitmap: str | None = None,
    on_source_error: str | None = None,
    on_target_error: str | None = None,
) -> None:
    """Start a backup job of node ``device`` into the existing node ``target``."""
    extra = {
        "device": device,
        "target": target,
        "sync": sync,
        "bitmap": bitmap,
        "on-source-error": on_source_error,
        "on-target-error": on_target_error,
    }
    await session.execute("blockdev-backup", _job_options(job_id, speed, auto_finalize, extra))


async def blockdev_mirror(
    session: QMPSession,
    *,
    job_id: str,
    device: str,
    target: str,
    sync: str = "full",
    copy_mode: str | None = None,
    speed: int | None = None,
    auto_finalize: bool = True,
    on_source_error: str | None = None,
    on_target_error: str | None = None,
) -> None:
    """Start a mirror of node ``device`` into the existing node ``target``: READY once in
    sync, then ``job-complete`` moves ``device``'s users onto ``target``. ``copy_mode``
    ``write-blocking``: a guest write completes only once it is on the target too."""
    extra = {
        "device": device,
        "target": target,
        "sync": sync,
        "copy-mode": copy_mode,
        "on-source-error": on_source_error,
        "on-target-error": on_target_error,
    }
    await session.execute("blockdev-mirror", _job_options(job_id, speed, auto_finalize, extra))


async def block_commit(
    session: QMPSession,
    *,
    job_id: str,
    device: str,
    top_node: str | None = None,
    base_node: str | None = None,
    speed: int | None = None,
    auto_finalize: bool = True,
    backing_file: str | None = None,
    on_error: str | None = None,
) -> None:
    """Start a commit job. Without ``top_node`` it is an *active* commit (READY, then
    job-complete pivots the device onto ``base_node``)."""
    extra = {
        "device": device,
        "top-node": top_node,
        "base-node": base_node,
        "backing-file": backing_file,
        "on-error": on_error,
    }
    await session.execute("block-commit", _job_options(job_id, speed, auto_finalize, extra))


async def block_stream(
    session: QMPSession,
    *,
    job_id: str,
    device: str,
    base_node: str | None = None,
    speed: int | None = None,
    backing_file: str | None = None,
    on_error: str | None = None,
) -> None:
    """Start a stream job: copy the backing data above ``base_node`` into ``device``.

    It waits in PENDING for ``job-finalize`` (the job driver sends it) and QEMU dismisses it
    in the same step (``auto-finalize: false``, ``auto-dismiss: true``). A stream concluded
    and not yet dismissed holds its copy-on-read filter out of the graph with no child, and
    a ``query-named-block-nodes`` from any client then crashes QEMU 7.2 and 10.0.2 (QEMU
    issue #3149; README, "Live restore"). Queries sent in a loop through the stream's end
    crashed 10.0.2 in 9 of 20 runs with blockctl's read guard alone, 0 of 20 on each version
    this way (``scripts/repro_stream_query.py --mode hammer --pending``). The outcome still
    outlives a controller crash: a stream that copied everything waits in PENDING, one that
    failed left its backing in the graph."""
    extra = {
        "device": device,
        "base-node": base_node,
        "backing-file": backing_file,
        "on-error": on_error,
    }
    options = _job_options(job_id, speed, False, extra, auto_dismiss=True)
    await session.execute("block-stream", options)


async def blockdev_create(session: QMPSession, *, job_id: str, options: Qcow2CreateOptions) -> None:
    """Start a ``blockdev-create`` job: format the existing node ``options['file']`` (QEMU's
    own image code, no ``qemu-img`` process). Such jobs are never auto-dismissed."""
    await session.execute("blockdev-create", {"job-id": job_id, "options": dict(options)})
