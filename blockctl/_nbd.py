"""A small NBD client (fixed newstyle, structured replies) for pull-mode backups.

Enough of the protocol (github.com/NetworkBlockDevice/nbd doc/proto.md) to read a QEMU export's
allocation or dirty-bitmap map (``NBD_CMD_BLOCK_STATUS`` with one meta context), read data
(``NBD_CMD_READ``) and write it into another export (``NBD_CMD_WRITE``, ``NBD_CMD_FLUSH``).
Unix sockets only; one request in flight at a time (simple and enough for a sequential copy).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

import anyio
from anyio.abc import SocketStream

from blockctl.errors import ProtocolMismatch

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY = 0x67446698
_STRUCTURED_REPLY = 0x668E33EF

_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2
_OPT_GO = 7
_OPT_STRUCTURED_REPLY = 8
_OPT_SET_META_CONTEXT = 10
_REP_ACK = 1
_REP_INFO = 3
_REP_META_CONTEXT = 4
_INFO_EXPORT = 0

_CMD_READ = 0
_CMD_WRITE = 1
_CMD_DISC = 2
_CMD_FLUSH = 3
_CMD_BLOCK_STATUS = 7

_CHUNK_NONE = 0
_CHUNK_OFFSET_DATA = 1
_CHUNK_OFFSET_HOLE = 2
_CHUNK_BLOCK_STATUS = 5
_CHUNK_DONE = 1

#: base:allocation flags.
STATE_HOLE = 1
STATE_ZERO = 2
#: qemu:dirty-bitmap:NAME flag.
STATE_DIRTY = 1

MAX_REQUEST = 32 << 20


class NbdError(ProtocolMismatch):
    """The NBD server refused something or said something unexpected."""

    def __init__(self, message: str) -> None:
        super().__init__("nbd", message)


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    flags: int


class NbdClient:
    """One connection to one export. Use :meth:`connect` (an async context manager)."""

    def __init__(self, stream: SocketStream, size: int, context_id: int | None) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.size = size
        self._context_id = context_id
        self._handle = 0

    # Section: opening

    @classmethod
    async def open(cls, socket_path: str, export: str, meta_context: str | None) -> NbdClient:
        stream = await anyio.connect_unix(socket_path)
        try:
            return await cls._handshake(stream, export, meta_context)
        except BaseException:
            await stream.aclose()
            raise

    @classmethod
    async def _handshake(
        cls, stream: SocketStream, export: str, meta_context: str | None
    ) -> NbdClient:
        client = cls(stream, 0, None)
        magic, opt_magic, flags = struct.unpack(">QQH", await client._read(18))
        if magic != _NBDMAGIC or opt_magic != _IHAVEOPT or not flags & _FLAG_FIXED_NEWSTYLE:
            raise NbdError("not a fixed-newstyle NBD server")
        await stream.send(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | (flags & _FLAG_NO_ZEROES)))
        await client._option(_OPT_STRUCTURED_REPLY, b"")
        await client._expect_ack(_OPT_STRUCTURED_REPLY)
        name = export.encode()
        if meta_context is not None:
            query = meta_context.encode()
            await client._option(
                _OPT_SET_META_CONTEXT,
                struct.pack(">I", len(name))
                + name
                + struct.pack(">I", 1)
                + struct.pack(">I", len(query))
                + query,
            )
            while True:
                kind, data = await client._option_reply(_OPT_SET_META_CONTEXT)
                if kind == _REP_ACK:
                    break
                if kind == _REP_META_CONTEXT:
                    client._context_id = struct.unpack(">I", data[:4])[0]
            if client._context_id is None:
                raise NbdError(f"the export has no meta context {meta_context!r}")
        await client._option(_OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            kind, data = await client._option_reply(_OPT_GO)
            if kind == _REP_ACK:
                break
            if kind == _REP_INFO and struct.unpack(">H", data[:2])[0] == _INFO_EXPORT:
                client.size = struct.unpack(">Q", data[2:10])[0]
        return client

    async def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            try:
                self._buffer += await self._stream.receive()
            except anyio.EndOfStream:
                raise NbdError("the server closed the connection") from None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def _option(self, option: int, data: bytes) -> None:
        await self._stream.send(struct.pack(">QII", _IHAVEOPT, option, len(data)) + data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, got, kind, length = struct.unpack(">QIII", await self._read(20))
        data = await self._read(length)
        if magic != _REPLY_MAGIC or got != option:
            raise NbdError(f"bad reply to option {option}")
        if kind & 0x80000000:
            raise NbdError(f"option {option} refused: {data.decode(errors='replace')}")
        return kind, data

    async def _expect_ack(self, option: int) -> None:
        kind, _ = await self._option_reply(option)
        if kind != _REP_ACK:
            raise NbdError(f"option {option}: unexpected reply {kind}")

    # Section: transmission

    async def _request(self, command: int, offset: int, length: int, data: bytes = b"") -> int:
        self._handle += 1
        await self._stream.send(
            struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, command, self._handle, offset, length) + data
        )
        return self._handle

    async def _chunks(self, handle: int) -> list[tuple[int, bytes]]:
        """All reply chunks of one request: (type, payload)."""
        chunks: list[tuple[int, bytes]] = []
        while True:
            magic = struct.unpack(">I", await self._read(4))[0]
            if magic == _SIMPLE_REPLY:
                error, got = struct.unpack(">IQ", await self._read(12))
                if got != handle:
                    raise NbdError("reply for another request")
                if error:
                    raise NbdError(f"request failed with error {error}")
                return chunks
            if magic != _STRUCTURED_REPLY:
                raise NbdError(f"bad reply magic {magic:#x}")
            flags, kind, got, length = struct.unpack(">HHQI", await self._read(16))
            payload = await self._read(length)
            if got != handle:
                raise NbdError("reply for another request")
            if kind & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
                raise NbdError(
                    f"request failed with error {error}: {payload[6:].decode(errors='replace')}"
                )
            chunks.append((kind, payload))
            if flags & _CHUNK_DONE:
                return chunks

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self._context_id is None:
            raise NbdError("no meta context was negotiated")
        handle = await self._request(_CMD_BLOCK_STATUS, offset, min(length, 0xFFFFFFFF))
        extents = []
        position = offset
        for kind, payload in await self._chunks(handle):
            if kind != _CHUNK_BLOCK_STATUS:
                continue
            for i in range(4, len(payload), 8):
                ext_length, flags = struct.unpack(">II", payload[i : i + 8])
                extents.append(Extent(position, ext_length, flags))
                position += ext_length
        if not extents:
            raise NbdError(f"no block status for offset {offset}")
        return extents

    async def read(self, offset: int, length: int) -> bytes:
        handle = await self._request(_CMD_READ, offset, length)
        out = bytearray(length)
        for kind, payload in await self._chunks(handle):
            if kind == _CHUNK_OFFSET_DATA:
                at = struct.unpack(">Q", payload[:8])[0] - offset
                out[at : at + len(payload) - 8] = payload[8:]
            # _CHUNK_OFFSET_HOLE: zeros, already there
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> None:
        handle = await self._request(_CMD_WRITE, offset, len(data), data)
        await self._chunks(handle)

    async def flush(self) -> None:
        await self._chunks(await self._request(_CMD_FLUSH, 0, 0))

    async def aclose(self) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._request(_CMD_DISC, 0, 0)
        await self._stream.aclose()
