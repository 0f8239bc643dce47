"""The guest agent (qemu-ga): a small typed client, and filesystem-consistent quiesce.

qemu-ga speaks JSON lines on a virtio-serial port (``org.qemu.guest_agent.0``), which QEMU
exposes as a listening unix socket in the VM's run directory (``qga.sock``, see
:data:`blockctl._machine.AGENT_SOCKET`). It is not QMP: there is no greeting, no capabilities
negotiation, one client at a time, and replies *survive reconnects* (qga.md §2). So this is its
own small client on a raw socket, not ``qemu.qmp``:

- after every connect, :meth:`GuestAgent.sync` sends ``guest-sync`` with a random id and skips
  everything until the reply to the last id it sent (stale replies of earlier clients, parse
  errors provoked by someone's ``0xFF`` sentinel). ``guest-sync-delimited`` is never used;
- every command carries a unique ``id`` (qemu-ga echoes it) and a deadline
  (``anyio.fail_after``); lines with another id, or none, are stale and skipped;
- the agent's errors become :class:`~blockctl.errors.GuestAgentError` subclasses, its replies
  frozen dataclasses.

:func:`quiesced` is the safety part: freeze → the point-in-time operation → thaw, where the
thaw runs in a shielded ``finally`` on every path (error, cancellation, the freeze deadline), the
freeze count is checked against what the guest has mounted, and the thaw is verified with
``guest-fsfreeze-status``. qemu-ga never thaws by itself, disconnecting does not thaw, and it
ignores SIGTERM while frozen: a guest left frozen stays frozen. So a freeze is recorded in the
VM's run dir before it is sent (``freeze-<id>.json``, removed after a verified thaw): a
controller killed in between leaves the record, and :func:`plan_thaw` (pure) decides what
reconcile (:mod:`blockctl._ops.recovery`) does about it.

Only this module spells qemu-ga command names (tests/unit/test_hygiene.py checks it).
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from blockctl import _fsutil, _journal
from blockctl._log import get_logger
from blockctl._machine import AGENT_SOCKET, VM
from blockctl._proc import process_alive, process_start
from blockctl.errors import (  # re-exported for callers of this module
    AgentCommandFailed,
    AgentFrozen,
    AgentNotConfigured,
    AgentUnavailable,
    ConfigError,
    FreezeDeadlineExceeded,
    GuestAgentError,
    QuiesceFailed,
    ThawFailed,
)

__all__ = [
    "AgentCommand",
    "AgentInfo",
    "Filesystem",
    "FsDisk",
    "FreezeRecord",
    "FreezeStatus",
    "GuestAgent",
    "Quiesce",
    "Quiesced",
    "ThawPlan",
    "ThawStep",
    "agent_socket",
    "coerce_quiesce",
    "connect_agent",
    "load_freeze_records",
    "plan_thaw",
    "process_start",
    "remove_dead_freeze_records",
    "writer_alive",
    "quiesced",
    "require_agent",
]

_log = get_logger()

#: Connect + ``guest-sync``, and each ordinary command (ping, info, status, fsinfo, thaw).
DEFAULT_TIMEOUT = 5.0
#: ``guest-fsfreeze-freeze`` flushes the guest's dirty data first (≈80 ms per 16 MiB on TCG).
FREEZE_TIMEOUT = 60.0
#: How long the point-in-time operation may keep the guest frozen before blockctl thaws it and
#: fails the operation.
DEFAULT_FREEZE_DEADLINE = 10.0
# Resend guest-sync with a new id this often until any reply arrives (the agent may still be
# starting: data sent before it opens the port is held and answered later, qga.md §2).
_SYNC_RESEND = 1.0
_MAX_LINE = 4 << 20
# qemu-ga disables most commands while frozen and says so with this class and phrase.
_FROZEN_PHRASE = "frozen state"


class FreezeStatus(enum.StrEnum):
    THAWED = "thawed"
    FROZEN = "frozen"


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentCommand:
    name: str
    enabled: bool
    success_response: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentInfo:
    """``guest-info``: the agent's version and its commands (some disabled by policy)."""

    version: str
    commands: tuple[AgentCommand, ...]

    def enabled(self, name: str) -> bool:
        return any(c.name == name and c.enabled for c in self.commands)


@dataclass(frozen=True, slots=True, kw_only=True)
class FsDisk:
    """A disk under a guest filesystem, as the guest sees it (``dev`` may be unknown)."""

    dev: str | None
    bus_type: str
    serial: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Filesystem:
    """One mounted filesystem on a block device (``guest-get-fsinfo``)."""

    name: str
    mountpoint: str
    type: str
    disks: tuple[FsDisk, ...]
    used_bytes: int | None
    total_bytes: int | None


def _bad_reply(command: str, reply: object) -> GuestAgentError:
    return GuestAgentError(f"unexpected reply to {command} from the guest agent: {reply!r:.200}")


def _map_error(command: str, error: object) -> GuestAgentError:
    if not isinstance(error, Mapping):
        return _bad_reply(command, error)
    error_class = str(error.get("class", "GenericError"))
    desc = str(error.get("desc", ""))
    if error_class == "CommandNotFound" and _FROZEN_PHRASE in desc:
        return AgentFrozen(command, error_class, desc)
    return AgentCommandFailed(command, error_class, desc)


class GuestAgent:
    """A connection to one VM's qemu-ga. Make it with :meth:`connect` (or
    :func:`connect_agent`); it is synced before it is handed out."""

    def __init__(self, stream: SocketStream, *, path: Path, label: str) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._lock = anyio.Lock()
        self._prefix = secrets.token_hex(4)
        self._counter = 0
        self.path = path
        self.label = label
        #: Lines skipped as stale by the last sync (replies meant for earlier clients).
        self.stale_skipped = 0
        self._closed = False

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, path: Path, *, label: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncIterator[GuestAgent]:
        """Connect to the agent socket at ``path`` and resync; closed when the block exits.

        :raise AgentNotConfigured: no such socket.
        :raise AgentUnavailable: no sync reply within ``timeout`` (agent not running, hung,
            or another client connected).
        """
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_unix(path)
        except TimeoutError:
            raise AgentUnavailable("connect", timeout, f"connecting to {path} hangs") from None
        except FileNotFoundError:
            raise AgentNotConfigured(f"no guest-agent socket at {path}") from None
        except OSError as exc:
            raise AgentUnavailable(
                "connect", timeout, f"{path}: {exc.strerror} (is QEMU still running?)"
            ) from None
        agent = cls(stream, path=path, label=label or str(path))
        try:
            await agent.sync(timeout=timeout)
            yield agent
        finally:
            await agent.aclose()

    async def aclose(self) -> None:
        """Close the connection (idempotent). The agent serves the next client then."""
        if not self._closed:
            self._closed = True
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()

    # Section: the wire

    async def _send(self, message: Mapping[str, Any]) -> None:
        try:
            await self._stream.send(json.dumps(message).encode() + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise GuestAgentError(f"the guest agent's channel is closed: {exc!r}") from None

    async def _receive(self) -> dict[str, Any] | None:
        """The next line as a JSON object, or None for a line that is not one."""
        try:
            line = await self._reader.receive_until(b"\n", _MAX_LINE)
        except anyio.DelimiterNotFound:
            raise GuestAgentError(
                f"the guest agent sent a line longer than {_MAX_LINE} bytes"
            ) from None
        except (
            anyio.IncompleteRead,
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            raise GuestAgentError(
                "the guest agent's channel closed (QEMU exited or closed the socket)"
            ) from None
        # 0xFF is the sentinel of guest-sync-delimited (another client's): not part of JSON.
        try:
            value = json.loads(line.lstrip(b"\xff").decode("utf-8", "replace"))
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def sync(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``guest-sync`` with a random id; everything before the reply to the last id sent
        is stale and skipped. Resends (new id) every second until any reply arrives, so an
        agent that is still starting is waited for.

        :raise AgentUnavailable: no reply within ``timeout``.
        """
        sent: list[int] = []
        skipped = 0
        started = time.monotonic()
        try:
            with anyio.fail_after(timeout):
                async with self._lock:
                    answered = False
                    while True:
                        if not answered:
                            sent.append(secrets.randbelow(1 << 52) + 1)
                            await self._send(
                                {"execute": "guest-sync", "arguments": {"id": sent[-1]}}
                            )
                        deadline = math.inf if answered else anyio.current_time() + _SYNC_RESEND
                        with anyio.CancelScope(deadline=deadline) as scope:
                            while True:
                                reply = await self._receive()
                                value = None if reply is None else reply.get("return")
                                if isinstance(value, int) and value in sent:
                                    if value == sent[-1]:
                                        break
                                    answered = True
                                    scope.deadline = math.inf
                                else:
                                    skipped += 1
                        if not scope.cancelled_caught:
                            break
        except TimeoutError:
            raise AgentUnavailable(
                "guest-sync",
                timeout,
                "is qemu-ga running in the guest (and no other client connected)?",
            ) from None
        self.stale_skipped = skipped
        _log.debug(
            "blockctl.agent.sync",
            vm=self.label,
            attempts=len(sent),
            stale=skipped,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> object:
        """Run an agent command, untyped (``blockctl agent`` uses the typed ones below).

        :raise AgentUnavailable: no reply within ``timeout``.
        :raise AgentFrozen: the agent refuses it while the guest is frozen.
        :raise AgentCommandFailed: any other error reply.
        """
        self._counter += 1
        ident = f"bc-{self._prefix}-{self._counter}"
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = dict(arguments)
        try:
            with anyio.fail_after(timeout):
                async with self._lock:
                    await self._send(message)
                    while True:
                        reply = await self._receive()
                        if reply is not None and reply.get("id") == ident:
                            break
                        _log.debug("blockctl.agent.stale_reply", vm=self.label, command=command)
        except TimeoutError:
            raise AgentUnavailable(command, timeout, "qemu-ga may be hung") from None
        if "error" in reply:
            raise _map_error(command, reply["error"])
        if "return" not in reply:
            raise _bad_reply(command, reply)
        return reply["return"]

    # Section: typed commands

    async def ping(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def info(self) -> AgentInfo:
        reply = await self.execute("guest-info")
        if not isinstance(reply, Mapping) or not isinstance(reply.get("supported_commands"), list):
            raise _bad_reply("guest-info", reply)
        return AgentInfo(
            version=str(reply.get("version", "")),
            commands=tuple(
                AgentCommand(
                    name=str(c.get("name")),
                    enabled=bool(c.get("enabled")),
                    success_response=bool(c.get("success-response", True)),
                )
                for c in reply["supported_commands"]
                if isinstance(c, Mapping)
            ),
        )

    async def fsfreeze_status(self) -> FreezeStatus:
        reply = await self.execute("guest-fsfreeze-status")
        if reply not in tuple(FreezeStatus):
            raise _bad_reply("guest-fsfreeze-status", reply)
        return FreezeStatus(str(reply))

    async def fsfreeze_freeze(
        self, mountpoints: Sequence[str] | None = None, *, timeout: float = FREEZE_TIMEOUT
    ) -> int:
        """Freeze every block-device filesystem, or just ``mountpoints``; the number frozen.

        A wrong mountpoint is not an error for qemu-ga (it freezes 0): check the count.
        """
        if mountpoints is None:
            reply = await self.execute("guest-fsfreeze-freeze", timeout=timeout)
            command = "guest-fsfreeze-freeze"
        else:
            command = "guest-fsfreeze-freeze-list"
            reply = await self.execute(command, {"mountpoints": list(mountpoints)}, timeout=timeout)
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise _bad_reply(command, reply)
        return reply

    async def fsfreeze_thaw(self, *, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Thaw everything frozen (0 when nothing was: not an error); the number thawed."""
        reply = await self.execute("guest-fsfreeze-thaw", timeout=timeout)
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise _bad_reply("guest-fsfreeze-thaw", reply)
        return reply

    async def get_fsinfo(self) -> tuple[Filesystem, ...]:
        reply = await self.execute("guest-get-fsinfo")
        if not isinstance(reply, list):
            raise _bad_reply("guest-get-fsinfo", reply)
        result = []
        for fs in reply:
            if not isinstance(fs, Mapping) or not isinstance(fs.get("mountpoint"), str):
                raise _bad_reply("guest-get-fsinfo", fs)
            disks = tuple(
                FsDisk(
                    dev=d.get("dev") if isinstance(d.get("dev"), str) else None,
                    bus_type=str(d.get("bus-type", "")),
                    serial=d.get("serial") if isinstance(d.get("serial"), str) else None,
                )
                for d in fs.get("disk", [])
                if isinstance(d, Mapping)
            )
            used, total = fs.get("used-bytes"), fs.get("total-bytes")
            result.append(
                Filesystem(
                    name=str(fs.get("name", "")),
                    mountpoint=fs["mountpoint"],
                    type=str(fs.get("type", "")),
                    disks=disks,
                    used_bytes=used if isinstance(used, int) else None,
                    total_bytes=total if isinstance(total, int) else None,
                )
            )
        return tuple(result)


# Section: finding a VM's agent


def agent_socket(vm: VM) -> Path:
    """The agent socket of a VM blockctl launched (``guest_agent=True``) or attached by name.

    :raise AgentNotConfigured: the VM has no guest-agent channel.
    """
    if vm.run_dir is None:
        raise AgentNotConfigured(
            f"{vm.name}: attached by socket path, so its guest-agent socket is unknown; "
            "attach by VM name"
        )
    path = vm.run_dir / AGENT_SOCKET
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise AgentNotConfigured(
            f"VM {vm.name!r} has no guest-agent channel ({path} missing); launch it with "
            "guest-agent = true (MachineConfig(guest_agent=True)) and a guest running qemu-ga"
        )
    return path


def require_agent(vm: VM, quiesce: Quiesce | bool | str) -> None:
    """Fail before anything is created when quiesce is required and the VM has no agent
    channel at all (whether the agent answers is found out at the freeze)."""
    if coerce_quiesce(quiesce) is Quiesce.REQUIRED:
        agent_socket(vm)


@contextlib.asynccontextmanager
async def connect_agent(vm: VM, *, timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[GuestAgent]:
    """A synced connection to ``vm``'s guest agent for the block's duration."""
    async with GuestAgent.connect(agent_socket(vm), label=vm.name, timeout=timeout) as agent:
        yield agent


# Section: quiesce


class Quiesce(enum.StrEnum):
    """Whether to freeze the guest's filesystems around a point-in-time operation."""

    OFF = "off"
    #: Fail (before anything happened) when there is no agent to freeze with.
    REQUIRED = "required"
    #: Freeze if an agent answers; otherwise go on crash-consistent, with a logged warning.
    IF_POSSIBLE = "if-possible"


def coerce_quiesce(value: Quiesce | bool | str) -> Quiesce:
    """``True`` means :attr:`Quiesce.REQUIRED`, ``False`` :attr:`Quiesce.OFF`."""
    if isinstance(value, bool):
        return Quiesce.REQUIRED if value else Quiesce.OFF
    try:
        return Quiesce(value)
    except ValueError:
        raise ConfigError(
            "quiesce", f"{value!r}: one of {', '.join(q.value for q in Quiesce)}, or a bool"
        ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Quiesced:
    """What :func:`quiesced` did: ``frozen`` filesystems (0 when crash-consistent);
    ``skipped`` says why there was no freeze when it was only asked for if possible."""

    mode: Quiesce
    frozen: int
    consistent: bool
    skipped: str | None = None


@contextlib.asynccontextmanager
async def quiesced(
    vm: VM,
    quiesce: Quiesce | bool | str = Quiesce.REQUIRED,
    *,
    operation: str,
    mountpoints: Sequence[str] | None = None,
    freeze_deadline: float = DEFAULT_FREEZE_DEADLINE,
    timeout: float = DEFAULT_TIMEOUT,
    freeze_timeout: float = FREEZE_TIMEOUT,
) -> AsyncIterator[Quiesced]:
    """Freeze the guest's filesystems for the block (the point-in-time operation), then thaw.

    - The thaw runs in a shielded ``finally``: on success, error, cancellation and when the
      freeze itself failed or was cancelled half-way (it may have taken effect). It is checked
      with ``guest-fsfreeze-status``; if it cannot be done, :class:`ThawFailed` says so loudly.
    - The block runs under a deadline of ``freeze_deadline`` seconds from the freeze; past it,
      the block is cancelled, the guest thawed and :class:`FreezeDeadlineExceeded` raised.
    - The count is checked: the freeze must cover every filesystem ``guest-get-fsinfo`` lists
      (or every listed mountpoint), else :class:`QuiesceFailed` (after the thaw).
    - A guest already frozen by someone else is refused (:class:`QuiesceFailed`) and not thawed.
    - ``Quiesce.REQUIRED`` without a reachable agent raises before anything happens;
      ``Quiesce.IF_POSSIBLE`` logs ``blockctl.agent.quiesce_skipped`` and runs the block
      crash-consistent. ``Quiesce.OFF`` just runs the block.

    ``operation`` names the operation in logs and errors.
    """
    mode = coerce_quiesce(quiesce)
    if mode is Quiesce.OFF:
        yield Quiesced(mode=mode, frozen=0, consistent=False, skipped="quiesce off")
        return
    async with contextlib.AsyncExitStack() as stack:
        agent: GuestAgent | None = None
        skipped: str | None = None
        try:
            agent = await stack.enter_async_context(connect_agent(vm, timeout=timeout))
        except GuestAgentError as exc:  # not configured, not answering, channel closed
            if mode is Quiesce.REQUIRED:
                raise
            skipped = str(exc)
            _log.warning(
                "blockctl.agent.quiesce_skipped",
                vm=vm.name,
                operation=operation,
                reason=skipped,
                note="the operation goes on crash-consistent",
            )
        if agent is None:
            yield Quiesced(mode=mode, frozen=0, consistent=False, skipped=skipped)
            return
        async with _frozen(
            agent,
            run_dir=vm.run_dir,
            mode=mode,
            operation=operation,
            mountpoints=mountpoints,
            freeze_deadline=freeze_deadline,
            freeze_timeout=freeze_timeout,
            timeout=timeout,
        ) as done:
            yield done


@contextlib.asynccontextmanager
async def _frozen(
    agent: GuestAgent,
    *,
    run_dir: Path | None,
    mode: Quiesce,
    operation: str,
    mountpoints: Sequence[str] | None,
    freeze_deadline: float,
    freeze_timeout: float,
    timeout: float,
) -> AsyncIterator[Quiesced]:
    log = _log.bind(vm=agent.label, operation=operation)
    if await agent.fsfreeze_status() is FreezeStatus.FROZEN:
        raise QuiesceFailed(
            f"{agent.label}: the guest's filesystems are already frozen (by another client?); "
            "blockctl does not thaw a freeze it did not make: `blockctl agent VM thaw` if "
            "nothing should stay frozen"
        )
    if mountpoints is None:
        expected = len({fs.mountpoint for fs in await agent.get_fsinfo()})
    else:
        expected = len(set(mountpoints))
    count = 0
    started = time.monotonic()
    frozen_at: float | None = None
    # Before the freeze is sent: a controller killed from here on leaves this record, and the
    # next reconcile thaws the guest (see plan_thaw). Gone only after a verified thaw.
    try:
        record = _write_freeze_record(run_dir, operation, mountpoints)
    except OSError as exc:
        raise QuiesceFailed(
            f"{agent.label}: could not record the freeze in {run_dir} ({exc.strerror}); "
            "nothing was frozen"
        ) from exc
    try:
        count = await agent.fsfreeze_freeze(mountpoints, timeout=freeze_timeout)
        frozen_at = time.monotonic()
        if FAILPOINT is not None:
            FAILPOINT("frozen")
        log.info(
            "blockctl.agent.freeze",
            count=count,
            expected=expected,
            mountpoints=None if mountpoints is None else list(mountpoints),
            ms=round((frozen_at - started) * 1000, 1),
        )
        if count < expected:
            raise QuiesceFailed(
                f"{agent.label}: the agent froze {count} of {expected} filesystems"
                + ("" if mountpoints is None else f" (asked for {list(mountpoints)})")
                + "; a copy would not be consistent. Check the mountpoints (qemu-ga freezes "
                "0 for a path that is not a mounted block-device filesystem)",
                frozen=count,
                expected=expected,
            )
        if expected == 0:
            log.warning("blockctl.agent.nothing_to_freeze", note="no filesystem is mounted")
        with anyio.CancelScope(deadline=anyio.current_time() + freeze_deadline) as scope:
            yield Quiesced(mode=mode, frozen=count, consistent=True)
        if scope.cancelled_caught:
            log.error("blockctl.agent.freeze_deadline", seconds=freeze_deadline)
            raise FreezeDeadlineExceeded(operation, freeze_deadline)
    finally:
        with anyio.CancelScope(shield=True):
            await _thaw(agent, log, frozen=count, frozen_at=frozen_at, timeout=timeout)
            if record is not None:  # not reached when the thaw failed: the record stays
                _journal.remove_durably(record)


async def _thaw(
    agent: GuestAgent, log: Any, *, frozen: int, frozen_at: float | None, timeout: float
) -> None:
    """Thaw and check; on a broken connection, once more on a fresh one. Shielded caller.

    Waits up to FREEZE_TIMEOUT for the reply: a freeze still flushing is answered first.
    """
    started = time.monotonic()
    try:
        thawed = await agent.fsfreeze_thaw(timeout=FREEZE_TIMEOUT)
        status = await agent.fsfreeze_status()
    except GuestAgentError as first:
        if isinstance(first, AgentCommandFailed):
            log.error("blockctl.agent.thaw_failed", error=str(first))
            raise ThawFailed(
                f"{agent.label}: the agent refused to thaw ({first}); the guest's filesystems "
                "may still be frozen: retry `blockctl agent VM thaw`"
            ) from first
        log.warning("blockctl.agent.thaw_retry", error=str(first))
        # The agent serves one client at a time: let go of this connection first.
        await agent.aclose()
        try:
            async with GuestAgent.connect(agent.path, label=agent.label, timeout=timeout) as again:
                thawed = await again.fsfreeze_thaw(timeout=FREEZE_TIMEOUT)
                status = await again.fsfreeze_status()
        except GuestAgentError as exc:
            log.error("blockctl.agent.thaw_failed", error=str(exc))
            raise ThawFailed(
                f"{agent.label}: could not thaw the guest's filesystems ({exc}); they may "
                "still be frozen: retry `blockctl agent VM thaw`"
            ) from exc
    now = time.monotonic()
    log.info(
        "blockctl.agent.thaw",
        count=thawed,
        frozen=frozen,
        ms=round((now - started) * 1000, 1),
        frozen_ms=None if frozen_at is None else round((now - frozen_at) * 1000, 1),
        status=status.value,
    )
    if status is not FreezeStatus.THAWED:
        log.error("blockctl.agent.thaw_failed", status=status.value)
        raise ThawFailed(f"{agent.label}: the agent still reports {status.value} after thawing")
    if thawed != frozen:
        log.warning("blockctl.agent.thaw_count_differs", thawed=thawed, frozen=frozen)


# Section: the freeze record (crash safety of a freeze)

#: ``<run dir>/freeze-<id>.json``: a freeze by a controller that has not thawed yet.
FREEZE_PREFIX = _journal.FREEZE_PREFIX

#: Test hook: called with ``"frozen"`` right after the freeze returned and its count was
#: checked (crash tests SIGKILL the process here: the guest is then frozen, nobody thaws).
FAILPOINT: Callable[[str], None] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FreezeRecord:
    """A controller is freezing (or has frozen) the guest for ``operation``. ``pid`` and
    ``pid_start`` (the process's start time in clock ticks since boot, ``/proc/PID/stat``)
    identify the writer, so a reused PID is not mistaken for it."""

    path: Path
    operation: str
    pid: int
    pid_start: int | None
    started: float
    mountpoints: tuple[str, ...] | None

    @property
    def id(self) -> str:
        return self.path.stem

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "operation": self.operation,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "started": self.started,
            "mountpoints": None if self.mountpoints is None else list(self.mountpoints),
        }

    @classmethod
    def from_json(cls, path: Path, data: Mapping[str, Any]) -> FreezeRecord:
        if data.get("version") != 1:
            raise ValueError(f"freeze record version {data.get('version')!r}, expected 1")
        points = data.get("mountpoints")
        start = data.get("pid_start")
        return cls(
            path=path,
            operation=str(data["operation"]),
            pid=int(data["pid"]),
            pid_start=None if start is None else int(start),
            started=float(data["started"]),
            mountpoints=None if points is None else tuple(str(p) for p in points),
        )


def writer_alive(record: FreezeRecord) -> bool:
    """The process that wrote ``record`` still runs (same PID and same start time)."""
    return process_alive(record.pid, record.pid_start)


def _write_freeze_record(
    run_dir: Path | None, operation: str, mountpoints: Sequence[str] | None
) -> Path | None:
    if run_dir is None:
        return None  # attached by socket path: no run dir, nothing to record in
    pid = os.getpid()
    path = run_dir / f"{FREEZE_PREFIX}{pid}-{secrets.token_hex(4)}.json"
    record = FreezeRecord(
        path=path,
        operation=operation,
        pid=pid,
        pid_start=process_start(pid),
        started=time.time(),
        mountpoints=None if mountpoints is None else tuple(mountpoints),
    )
    _fsutil.atomic_write_bytes(path, json.dumps(record.to_json(), indent=1).encode())
    return path


def load_freeze_records(run_dir: Path | None) -> list[FreezeRecord | _journal.Unreadable]:
    """Every freeze record in ``run_dir``, oldest first (leftover temporary files removed)."""
    if run_dir is None or not run_dir.is_dir():
        return []
    found: list[FreezeRecord | _journal.Unreadable] = []
    for path in sorted(run_dir.glob(f"{FREEZE_PREFIX}*")):
        if _journal.discard_if_stale(path):
            continue
        try:
            found.append(FreezeRecord.from_json(path, json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            found.append(_journal.Unreadable(path, str(exc)))
    found.sort(key=lambda r: r.started if isinstance(r, FreezeRecord) else 0.0)
    return found


def remove_dead_freeze_records(run_dir: Path | None) -> list[str]:
    """After a verified thaw (``blockctl agent VM thaw``): drop the records of controllers
    that are gone; the ids removed. A live writer's record is its own to remove."""
    removed = []
    for record in load_freeze_records(run_dir):
        if isinstance(record, FreezeRecord) and not writer_alive(record):
            _journal.remove_durably(record.path)
            removed.append(record.id)
    return removed


class ThawStep(enum.StrEnum):
    LEAVE = "leave"  # the writer is alive: its operation is in progress; do nothing
    ASK = "ask"  # ask the agent for guest-fsfreeze-status, then plan again
    THAW = "thaw"  # thaw, ask the status again, then plan again with ``thawed`` set
    DONE = "done"  # drop the record; report
    KEEP = "keep"  # keep the record; report (needs attention)


@dataclass(frozen=True, slots=True, kw_only=True)
class ThawPlan:
    step: ThawStep
    message: str = ""
    #: The outcome for the report: "finished" or "needs-attention" (None: no report).
    verdict: str | None = None


def plan_thaw(
    record: FreezeRecord,
    *,
    writer_alive: bool,
    status: FreezeStatus | None = None,
    agent_error: str | None = None,
    thawed: int | None = None,
) -> ThawPlan:
    """What to do about a freeze record (pure). ``status``: what the agent reports (None: not
    asked yet); ``agent_error``: it could not be reached or asked; ``thawed``: the count of
    the thaw recovery already sent (the status is then the one read after it)."""
    what = f"left frozen by a controller that died during {record.operation}"
    retry = "run `blockctl agent VM thaw` (or `blockctl recover VM` again)"
    if writer_alive:
        return ThawPlan(
            step=ThawStep.LEAVE,
            message=f"controller {record.pid} is still running {record.operation}; "
            "its freeze is its own to thaw",
        )
    if agent_error is not None:
        what_then = "after thawing" if thawed is not None else "so the freeze status is unknown"
        return ThawPlan(
            step=ThawStep.KEEP,
            verdict="needs-attention",
            message=(
                f"the guest's filesystems may still be {what} (pid {record.pid}): the guest "
                f"agent could not be asked ({agent_error}) {what_then}; {retry}"
            ),
        )
    if status is None:
        return ThawPlan(step=ThawStep.ASK)
    if thawed is not None:
        if status is FreezeStatus.THAWED:
            return ThawPlan(
                step=ThawStep.DONE,
                verdict="finished",
                message=f"thawed the guest's filesystems ({thawed}), {what}",
            )
        return ThawPlan(
            step=ThawStep.KEEP,
            verdict="needs-attention",
            message=f"the guest's filesystems, {what}, still report {status.value} after a "
            f"thaw; {retry}",
        )
    if status is FreezeStatus.FROZEN:
        return ThawPlan(step=ThawStep.THAW)
    return ThawPlan(
        step=ThawStep.DONE,
        verdict="finished",
        message=f"the guest's filesystems, {what}, were already thawed (by someone else, or "
        "the freeze never took effect); record dropped",
    )
