"""QMPSession against the fake peer: typed replies, mapped errors, waits that cannot hang."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from blockctl._qmp import wire
from blockctl._qmp.session import QMPSession, raise_single
from blockctl.errors import CommandFailed, ConfigError, ConnectionLost, ProtocolMismatch
from blockctl.testing import FakeError, FakeQMP


def handler(command: str, arguments: Mapping[str, Any]) -> object:
    if command == "query-status":
        return {"status": "running", "running": True, "singlestep": False}
    if command == "query-version":
        return {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": " Debian "}
    if command == "blockdev-del":
        raise FakeError("GenericError", f"Node {arguments['node-name']} is in use")
    if command == "query-block":
        return [{"device": "", "locked": False}]  # no 'removable': a shape we do not accept
    if command == "query-qmp-schema":
        return [
            {
                "name": "drive-backup",
                "meta-type": "command",
                "arg-type": "0",
                "ret-type": "0",
                "features": ["deprecated"],
            },
            {"name": "blockdev-backup", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
            {"name": "SHUTDOWN", "meta-type": "event", "arg-type": "0"},
        ]
    raise FakeError("CommandNotFound", f"The command {command} has not been found")


@contextlib.asynccontextmanager
async def fake_session() -> AsyncIterator[tuple[FakeQMP, QMPSession]]:
    async with (
        FakeQMP(handler).serving() as fake,
        QMPSession.connect(fake.client_socket, label="fake") as session,
    ):
        yield fake, session


async def test_typed_replies() -> None:
    async with fake_session() as (_fake, session):
        status = await wire.query_status(session)
        assert status.running and status.status == "running"
        version = await wire.query_version(session)
        assert str(version) == "7.2.22" and version.package == "Debian"


async def test_capabilities_come_from_the_schema() -> None:
    async with fake_session() as (_fake, session):
        caps = await wire.query_capabilities(session)
        assert caps.has("blockdev-backup") and not caps.has("nosuch")
        assert caps.is_deprecated("drive-backup") and not caps.is_deprecated("blockdev-backup")
        assert "SHUTDOWN" in caps.events


async def test_error_reply_becomes_command_failed() -> None:
    async with fake_session() as (_fake, session):
        with pytest.raises(CommandFailed) as info:
            await wire.raw_command(session, "blockdev-del", {"node-name": "hp1"})
        assert info.value.error_class == "GenericError"
        assert info.value.desc == "Node hp1 is in use"
        assert info.value.command == "blockdev-del"


async def test_unexpected_shape_is_protocol_mismatch() -> None:
    async with fake_session() as (_fake, session):
        with pytest.raises(ProtocolMismatch, match=r"query-block.*removable"):
            await wire.query_block(session)


async def test_raw_command_refuses_non_names() -> None:
    async with fake_session() as (_fake, session):
        with pytest.raises(ConfigError):
            await wire.raw_command(session, 'quit", "x', None)


async def test_every_command_and_error_is_logged() -> None:
    async with fake_session() as (_fake, session):
        with capture_logs() as logs:
            await wire.query_status(session)
            with pytest.raises(CommandFailed):
                await wire.raw_command(session, "nosuch", None)
        commands = [e for e in logs if e["event"] == "blockctl.qmp.command"]
        errors = [e for e in logs if e["event"] == "blockctl.qmp.error"]
        assert commands[0]["command"] == "query-status" and commands[0]["seconds"] >= 0
        assert errors[0]["command"] == "nosuch" and errors[0]["error_type"] == "CommandFailed"


async def test_event_arrives() -> None:
    async with fake_session() as (fake, session):
        with session.events("DEVICE_DELETED") as stream:
            await fake.emit("DEVICE_DELETED", {"path": "/machine/peripheral/d1/virtio-backend"})
            await fake.emit("DEVICE_DELETED", {"device": "d1", "path": "/machine/peripheral/d1"})
            event = await stream.wait_for(lambda e: e.data.get("device") == "d1")
        assert event.name == "DEVICE_DELETED"


async def test_event_wait_fails_when_peer_hangs_up() -> None:
    async with fake_session() as (fake, session):
        with session.events("SHUTDOWN") as stream, anyio.fail_after(10):
            await fake.close()
            with pytest.raises(ConnectionLost):
                await stream.next()
        with pytest.raises(ConnectionLost):
            await wire.query_status(session)


async def test_event_wait_fails_when_owner_marks_lost() -> None:
    async with fake_session() as (_fake, session):
        with session.events("SHUTDOWN") as stream, anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _mark_later(session))
                with pytest.raises(ConnectionLost, match="SIGKILL"):
                    await stream.next()


async def _mark_later(session: QMPSession) -> None:
    await anyio.sleep(0.05)
    session.mark_lost("QEMU was killed by SIGKILL")


async def test_vm_require_reads_the_schema_not_the_version() -> None:
    from blockctl._machine import VM
    from blockctl.errors import Unsupported

    async with fake_session() as (fake, session):
        vm = VM(session, name="fake", pid=None)
        await vm.require("blockdev-backup")
        with pytest.raises(Unsupported, match="deprecated"):
            await vm.require("drive-backup")
        with pytest.raises(Unsupported, match="no 'block-commit'"):
            await vm.require("block-commit")
        # The schema is asked once per session.
        assert [c for c, _ in fake.received].count("query-qmp-schema") == 1


def _raised_in_a_task_group(fail: Any) -> BaseException:
    """What :func:`raise_single` lets out of a task group in which ``fail`` raised."""

    async def run() -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fail)
        except BaseExceptionGroup as group:
            raise_single(group)

    try:
        anyio.run(run)
    except BaseException as exc:  # what came out is what the test inspects
        return exc
    raise AssertionError("nothing was raised")


def test_raise_single_unwraps_and_keeps_the_cause() -> None:
    async def fail() -> None:
        try:
            raise OSError(5, "Input/output error")
        except OSError as exc:
            raise ConfigError("file", "unreadable") from exc

    error = _raised_in_a_task_group(fail)
    assert isinstance(error, ConfigError)
    assert isinstance(error.__cause__, OSError)  # `from None` used to drop it


def test_raise_single_keeps_the_error_a_failing_cleanup_interrupted() -> None:
    async def fail() -> None:
        try:
            raise LookupError("the block's own error")
        finally:
            raise ConnectionLost("cleanup failed")

    error = _raised_in_a_task_group(fail)
    assert isinstance(error, ConnectionLost)
    assert isinstance(error.__context__, LookupError)
    assert not error.__suppress_context__


def test_raise_single_raises_a_group_of_several_as_is() -> None:
    async def fail() -> None:
        raise LookupError("one")

    async def run() -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fail)
                tg.start_soon(fail)
        except BaseExceptionGroup as group:
            raise_single(group)

    with pytest.raises(BaseExceptionGroup) as raised:
        anyio.run(run)
    assert len(raised.value.exceptions) == 2
