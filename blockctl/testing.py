"""A fake QMP peer for unit tests of pure logic and error mapping (never for capabilities).

``FakeQMP(handler)`` speaks the QMP wire protocol over a socketpair: the greeting, capability
negotiation, then every command goes to ``handler(command, arguments)``, which returns the
``return`` value (or a :class:`FakeReply` carrying events to send before/after the reply) or
raises :class:`FakeError` to send an error reply. ``emit()`` sends events::

    async with FakeQMP(handler).serving() as fake:
        async with QMPSession.connect(fake.client_socket, label="t") as session:
            ...
The shape follows httpx's ``MockTransport``: a function in, a transport out.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import SocketStream

Handler = Callable[[str, Mapping[str, Any]], object]

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "fake"},
        "capabilities": ["oob"],
    }
}


@dataclass(frozen=True, slots=True)
class FakeReply:
    """Return from a handler to send events around the reply, as QEMU does: ``before`` go
    out before the reply (``job-dismiss`` sends the job's ``null`` transition first),
    ``after`` right after it (a job's first transitions follow the command's reply)."""

    value: object
    before: Sequence[tuple[str, Mapping[str, Any]]] = ()
    after: Sequence[tuple[str, Mapping[str, Any]]] = ()


class FakeError(Exception):
    """Raise from a handler to make the fake answer with a QMP error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class FakeQMP:
    """Serve QMP on one end of a socketpair; give ``client_socket`` to the code under test."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.client_socket, self._server_socket = socket.socketpair()
        self._stream: SocketStream | None = None
        self.received: list[tuple[str, Mapping[str, Any]]] = []

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[FakeQMP]:
        """Answer in the background for the duration of the block; hang up at its end."""
        self._stream = await SocketStream.from_socket(self._server_socket)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._loop)
            try:
                yield self
            finally:
                await self.close()
                self.client_socket.close()
                tg.cancel_scope.cancel()

    async def _send(self, obj: object) -> None:
        assert self._stream is not None
        await self._stream.send(json.dumps(obj).encode() + b"\n")

    async def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        await self._send(
            {
                "event": event,
                "data": dict(data or {}),
                "timestamp": {"seconds": 0, "microseconds": 0},
            }
        )

    async def close(self) -> None:
        """Hang up, as QEMU does when it exits."""
        if self._stream is not None:
            await self._stream.aclose()

    async def _loop(self) -> None:
        assert self._stream is not None
        await self._send(GREETING)
        # Like QEMU, parse a stream of JSON values: qemu.qmp sends no newline after a message.
        decoder = json.JSONDecoder()
        buffer = ""
        try:
            while True:
                buffer += (await self._stream.receive()).decode()
                while buffer.strip():
                    try:
                        msg, end = decoder.raw_decode(buffer.lstrip())
                    except json.JSONDecodeError:
                        break  # incomplete: wait for more
                    buffer = buffer.lstrip()[end:]
                    await self._answer(msg)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return

    async def _answer(self, msg: Mapping[str, Any]) -> None:
        command = msg["execute"]
        arguments = msg.get("arguments", {})
        reply: dict[str, Any] = {}
        if "id" in msg:
            reply["id"] = msg["id"]
        after: Sequence[tuple[str, Mapping[str, Any]]] = ()
        if command == "qmp_capabilities":
            reply["return"] = {}
        else:
            self.received.append((command, arguments))
            try:
                value = self.handler(command, arguments)
            except FakeError as exc:
                reply["error"] = {"class": exc.error_class, "desc": exc.desc}
            else:
                if isinstance(value, FakeReply):
                    for name, data in value.before:
                        await self.emit(name, data)
                    after = value.after
                    value = value.value
                reply["return"] = value
        await self._send(reply)
        for name, data in after:
            await self.emit(name, data)
