"""The only module that spells QMP command and event names.

One typed async function per command. Replies become frozen dataclasses from
``blockctl._qmp.models``; callers above ``_qmp`` never see a raw reply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from blockctl._qmp.models import BlockDevice, BlockNode, Capabilities, StatusInfo, VersionInfo
from blockctl._qmp.models import parse_list as _parse_list
from blockctl._qmp.session import Event, EventStream, QMPSession
from blockctl.errors import ConfigError

# Events, by the name QEMU sends.
EVENT_SHUTDOWN = "SHUTDOWN"
EVENT_DEVICE_DELETED = "DEVICE_DELETED"


async def query_version(session: QMPSession) -> VersionInfo:
    return VersionInfo.from_qmp(await session.execute("query-version"))


async def query_status(session: QMPSession) -> StatusInfo:
    return StatusInfo.from_qmp(await session.execute("query-status"))


async def query_block(session: QMPSession) -> tuple[BlockDevice, ...]:
    return _parse_list(await session.execute("query-block"), "query-block", BlockDevice)


async def query_named_block_nodes(session: QMPSession) -> tuple[BlockNode, ...]:
    reply = await session.execute("query-named-block-nodes", {"flat": True})
    return _parse_list(reply, "query-named-block-nodes", BlockNode)


async def query_capabilities(session: QMPSession) -> Capabilities:
    return Capabilities.from_qmp(await session.execute("query-qmp-schema"))


async def qom_get(session: QMPSession, path: str, prop: str) -> object:
    """A QOM property, as QEMU's JSON (its type depends on the property)."""
    result: object = await session.execute("qom-get", {"path": path, "property": prop})
    return result


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


# Section: drives


async def blockdev_add(session: QMPSession, options: Mapping[str, Any]) -> None:
    """Add one node; ``options`` always name the driver (no probing) and a node-name."""
    await session.execute("blockdev-add", dict(options))


async def blockdev_del(session: QMPSession, node_name: str) -> None:
    await session.execute("blockdev-del", {"node-name": node_name})


async def blockdev_reopen(session: QMPSession, options: list[Mapping[str, Any]]) -> None:
    """Reopen nodes with *complete* option sets: anything omitted resets to its default."""
    await session.execute("blockdev-reopen", {"options": [dict(o) for o in options]})


async def device_add(session: QMPSession, options: Mapping[str, Any]) -> None:
    await session.execute("device_add", dict(options))


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


async def raw_command(
    session: QMPSession, command: str, arguments: Mapping[str, Any] | None
) -> object:
    """Any command, untyped: the CLI's ``blockctl qmp`` pass-through and nothing else."""
    if not command or not all(c.isalnum() or c in "-_" for c in command):
        raise ConfigError("command", f"{command!r} is not a QMP command name")
    result: object = await session.execute(command, arguments)
    return result


@contextlib.contextmanager
def shutdown_events(session: QMPSession) -> Iterator[EventStream]:
    with session.events(EVENT_SHUTDOWN) as stream:
        yield stream
