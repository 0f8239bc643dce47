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
from blockctl._qmp.session import EventStream, QMPSession
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


async def stop(session: QMPSession) -> None:
    await session.execute("stop")


async def cont(session: QMPSession) -> None:
    await session.execute("cont")


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
