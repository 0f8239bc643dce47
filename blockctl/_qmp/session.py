"""The QMP session: the only module that imports ``qemu.qmp``.

It owns one :class:`qemu.qmp.QMPClient` and adds what the client lacks:

- every ``qemu.qmp`` exception becomes a :class:`~blockctl.errors.BlockctlError`
  (:func:`map_qmp_errors`, checked for completeness by ``tests/unit/test_error_mapping.py``);
- every wait is raced against the connection going away: a ``qemu.qmp`` listener goes silent
  when the socket dies, so a bare ``listener.get()`` could hang forever;
- every command, reply, error and event is logged as a structlog event with its duration.

Command names are not spelled here; ``blockctl._qmp.wire`` does that.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import anyio
from anyio.abc import TaskGroup
from qemu.qmp import EventListener, QMPClient, Runstate, qmp_client
from qemu.qmp import error as qmp_error
from qemu.qmp import events as qmp_events
from qemu.qmp import message as qmp_message
from qemu.qmp import protocol as qmp_protocol

from blockctl._log import get_logger
from blockctl.errors import (
    BlockctlError,
    CommandFailed,
    ConnectionLost,
    NodeBusy,
    ProtocolMismatch,
    QMPConnectFailed,
    QMPError,
    QMPStateError,
)

_T = TypeVar("_T")

#: qemu.qmp exception class → the BlockctlError class it becomes. Exact classes, not parents:
#: a new class in a future qemu.qmp must be placed here deliberately (the test checks).
QMP_ERROR_MAP: dict[type[BaseException], type[BlockctlError]] = {
    qmp_error.QMPError: QMPError,
    qmp_error.ProtocolError: ProtocolMismatch,
    qmp_protocol.ConnectError: QMPConnectFailed,
    qmp_protocol.StateError: QMPStateError,
    qmp_client.ExecuteError: CommandFailed,
    qmp_client.ExecInterruptedError: ConnectionLost,
    qmp_client._WrappedProtocolError: ProtocolMismatch,
    qmp_client.GreetingError: QMPConnectFailed,
    qmp_client.NegotiationError: QMPConnectFailed,
    qmp_client._MsgProtocolError: ProtocolMismatch,
    qmp_client.ServerParseError: ProtocolMismatch,
    qmp_client.BadReplyError: ProtocolMismatch,
    qmp_message.DeserializationError: ProtocolMismatch,
    qmp_message.UnexpectedTypeError: ProtocolMismatch,
    qmp_events.ListenerError: QMPError,
}


#: QEMU's refusal when a block job blocks an operation on a node (bdrv_op_is_blocked).
_NODE_BUSY = re.compile(
    r"Node '(?P<node>[^']*)' is busy: block device is in use by block job: (?P<kind>[\w-]+)"
)


def translate(exc: qmp_error.QMPError, command: str, lost_reason: str | None) -> BlockctlError:
    """The BlockctlError for ``exc``, raised by ``command`` (``"connect"`` while connecting)."""
    target = QMP_ERROR_MAP.get(type(exc))
    if target is None:  # an unknown subclass: use its nearest mapped parent
        target = next((QMP_ERROR_MAP[k] for k in type(exc).__mro__ if k in QMP_ERROR_MAP), QMPError)
    if target is CommandFailed and isinstance(exc, qmp_client.ExecuteError):
        busy = _NODE_BUSY.search(str(exc))
        if busy is not None:  # a block job holds the node: a conflict, named as one
            return NodeBusy(
                command, exc.error_class, str(exc), node=busy["node"], kind=busy["kind"]
            )
        return CommandFailed(command, exc.error_class, str(exc))
    if target is ProtocolMismatch:
        return ProtocolMismatch(command, str(exc))
    if target is QMPStateError and lost_reason is not None:
        return ConnectionLost(f"{command}: {lost_reason}")
    if (
        isinstance(exc, qmp_protocol.StateError)
        and exc.state is qmp_protocol.Runstate.DISCONNECTING
    ):
        # QEMU closed the connection (it exited) before the owner of the process noticed.
        return ConnectionLost(f"{command}: QEMU closed the QMP connection ({exc})")
    if target is ConnectionLost:
        return ConnectionLost(
            f"{command} was interrupted: {lost_reason or exc}; whether it took effect is unknown"
        )
    if target is QMPConnectFailed:
        cause = getattr(exc, "exc", None)
        detail = f"{exc}" + (f" ({cause!r})" if cause is not None else "")
        return QMPConnectFailed(f"QMP {command} failed: {detail}")
    return target(f"{command}: {exc}")


@contextlib.contextmanager
def map_qmp_errors(command: str, lost_reason: str | None = None) -> Iterator[None]:
    """Translate ``qemu.qmp`` exceptions raised in the block. Cancellation passes untouched."""
    try:
        yield
    except qmp_error.QMPError as exc:
        raise translate(exc, command, lost_reason) from exc


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside a (nested) group, or the group itself if there are several.

    anyio task groups wrap even a single failure; callers of blockctl get the plain error.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group


def raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise :func:`single_exception` of ``group`` with its own chain intact.

    ``raise leaf from None`` hides the group, but also the leaf's ``__cause__`` (a
    ``raise X from exc``) and its ``__context__`` (the error a failing cleanup interrupted:
    ``open_vm``'s block raised, then QEMU ignored ``quit``): the caller would see only the
    last error. The leaf's chain is put back as it was before it was re-raised."""
    leaf = single_exception(group)
    cause, context, suppress = leaf.__cause__, leaf.__context__, leaf.__suppress_context__
    try:
        raise leaf from None
    finally:
        leaf.__cause__, leaf.__context__, leaf.__suppress_context__ = cause, context, suppress


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One QMP event: its name, its ``data`` object and QEMU's timestamp (seconds)."""

    name: str
    data: Mapping[str, Any]
    timestamp: float


def _event_from_message(msg: Mapping[str, Any]) -> Event:
    stamp = msg.get("timestamp", {})
    seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    data = msg.get("data", {})
    if not isinstance(data, Mapping):
        raise ProtocolMismatch(str(msg.get("event")), "event data is not an object")
    return Event(name=str(msg["event"]), data=data, timestamp=seconds)


class EventStream:
    """Events registered before a command is sent, read after (qemu.qmp's listener idiom)."""

    def __init__(self, session: QMPSession, listener: EventListener) -> None:
        self._session = session
        self._listener = listener

    async def next(self) -> Event:
        """The next event; :class:`ConnectionLost` if QEMU goes away first."""
        msg = await self._session.until_lost(self._listener.get, "waiting for an event")
        return _event_from_message(msg)

    async def wait_for(self, predicate: Callable[[Event], bool]) -> Event:
        """Skip events until one satisfies ``predicate``."""
        while True:
            event = await self.next()
            if predicate(event):
                return event


class QMPSession:
    """One QMP connection to one QEMU.

    Open it with :meth:`connect` (an address or a connected socket) or :meth:`accept`. It is an
    async context manager; leaving it disconnects (shielded) and stops its background tasks.
    ``mark_lost()`` lets the owner of the QEMU process say it has exited, which wakes every
    waiter at once instead of leaving it to notice a closed socket.
    """

    def __init__(self, client: QMPClient, label: str) -> None:
        self._client = client
        self.label = label
        self._lost = anyio.Event()
        self._lost_reason: str | None = None
        self._tg: TaskGroup | None = None
        #: Set by the owner of the QEMU process: awaits its exit code, so a lost connection
        #: can be reported as "QEMU was killed by SIGKILL" rather than only "EOF".
        self.process_exit: Callable[[], Awaitable[int]] | None = None
        self._log = get_logger(vm=label)

    # Section: opening and closing

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        address: str | tuple[str, int] | socket.socket,
        *,
        label: str,
        timeout: float = 10.0,
        where: str | None = None,
    ) -> AsyncIterator[QMPSession]:
        """Connect to a QMP server: a unix socket path, (host, port), or a connected socket.

        ``where`` names the monitor in errors (default: ``address`` if it is a path or
        host:port, else ``label``)."""
        client = QMPClient(label)
        started = time.monotonic()
        try:
            with anyio.fail_after(timeout), map_qmp_errors("connect"):
                await client.connect(address)
        except TimeoutError:
            with anyio.CancelScope(shield=True):
                await _quiet_disconnect(client)
            if where is None:
                where = (
                    address
                    if isinstance(address, str)
                    else f"{address[0]}:{address[1]}"
                    if isinstance(address, tuple)
                    else label
                )
            raise QMPConnectFailed(
                f"QMP connect to {label}: the monitor {where} sent no greeting within "
                f"{timeout:g} s. A QMP monitor serves one client at a time: another client is "
                f"most likely attached to {where} (or QEMU is hung). Retry when it is done; a VM "
                "started with `blockctl up` has a pool of monitors for several clients"
            ) from None
        session = cls(client, label)
        session._log.debug("blockctl.qmp.connected", seconds=round(time.monotonic() - started, 4))
        async with session._running():
            yield session

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._watch_runstate)
                tg.start_soon(self._log_events)
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.aclose()
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise_single(group)

    async def aclose(self) -> None:
        """Disconnect. Errors from qemu.qmp's background tasks are logged, not raised."""
        if self._lost_reason is None:
            self._lost_reason = "the session was closed"
        self._lost.set()
        with anyio.CancelScope(shield=True):
            await _quiet_disconnect(self._client)

    def mark_lost(self, reason: str) -> None:
        """Declare the connection dead (e.g. the QEMU process exited): wakes every waiter."""
        if self._lost_reason is None:
            self._lost_reason = reason
        self._lost.set()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def lost_reason(self) -> str | None:
        return self._lost_reason

    async def wait_lost(self) -> None:
        await self._lost.wait()

    # Section: commands and events

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Send one command and return its ``return`` value. Only ``_qmp.wire`` calls this."""
        started = time.monotonic()
        try:
            if self._lost.is_set():
                raise ConnectionLost(f"{command}: {self._lost_reason}")
            # No race needed here (unlike event waits): qemu.qmp fails a pending command with
            # ExecInterruptedError as soon as the socket closes, which a dying QEMU does.
            with map_qmp_errors(command, self._lost_reason):
                result = await self._client.execute(command, arguments)
        except BlockctlError as exc:
            self._log.info(
                "blockctl.qmp.error",
                command=command,
                arguments=arguments,
                error=str(exc),
                error_type=type(exc).__name__,
                seconds=round(time.monotonic() - started, 4),
            )
            raise
        self._log.debug(
            "blockctl.qmp.command",
            command=command,
            arguments=arguments,
            reply=_loggable(result),
            seconds=round(time.monotonic() - started, 4),
        )
        return result

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[EventStream]:
        """Listen for ``names`` (all events if none). Enter *before* sending the command."""
        with self._client.listener(names or None) as listener:
            yield EventStream(self, listener)

    async def until_lost(self, fn: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Await ``fn()``, or raise :class:`ConnectionLost` as soon as the session is lost."""
        if self._lost.is_set():
            raise ConnectionLost(f"{what}: {self._lost_reason}")
        outcome: list[_T] = []
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await self._lost.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                outcome.append(await fn())
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise_single(group)
        if not outcome:
            raise ConnectionLost(f"{what}: {self._lost_reason}")
        return outcome[0]

    # Section: background tasks

    async def _watch_runstate(self) -> None:
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
        reason = "QEMU closed the QMP connection"
        if self.process_exit is not None:
            with anyio.move_on_after(2):
                reason = describe_exit(await self.process_exit())
        self.mark_lost(reason)
        self._log.debug("blockctl.qmp.disconnected", reason=self._lost_reason)

    async def _log_events(self) -> None:
        with self._client.listener() as listener:
            while True:
                msg = await listener.get()
                self._log.debug("blockctl.qmp.event", name=msg.get("event"), data=msg.get("data"))


def describe_exit(code: int) -> str:
    """A QEMU exit code as words: ``-9`` is "QEMU was killed by SIGKILL"."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"QEMU was killed by {name}"
    return f"QEMU exited with code {code}"


def _loggable(reply: object, limit: int = 2000) -> object:
    """The reply itself, or its size when it is too big to log (query-qmp-schema is ~200 KB)."""
    text = repr(reply)
    return reply if len(text) <= limit else f"<{len(text)} characters>"


async def _quiet_disconnect(client: QMPClient) -> None:
    try:
        await client.disconnect()
    except Exception as exc:
        get_logger().debug("blockctl.qmp.disconnect_error", error=repr(exc))
