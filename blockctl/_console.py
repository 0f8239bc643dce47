"""The test guest's serial console: run shell commands and get their output and exit code.

QEMU's serial chardev is one end of a socketpair that blockctl holds the other end of, so no
byte is lost before we read (guest.md §3). The protocol:

- wait for ``GUESTPROTO-READY`` (printed by the guest's /init before each shell) and the prompt;
- send one raw line that turns echo, CRLF translation, prompts and job-control noise off;
- send each command as ``( CMD\\n) </dev/null 2>&1; printf '\\n__END_%s_%d\\n' NONCE $?``
  (a subshell, so ``exit`` ends only the command; shell state such as ``cd`` does not carry over)
  and read up to ``__END_NONCE_``: what came before is the output, what follows is ``$?``.
  ``printf`` assembles the tag, so an echoed command line never contains it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import anyio
from anyio.abc import SocketStream

from blockctl._log import get_logger
from blockctl.errors import ConnectionLost, GuestCommandFailed, GuestError, OperationTimeout

READY_BANNER = b"GUESTPROTO-READY"
_PROMPT = b"guest# "
_SETUP = b"set +m; stty -echo -onlcr; PS1=''; PS2=''\n"
# N_TTY's canonical line limit is 4095 bytes; past it the command never completes and its
# leftovers corrupt the next command. Large data goes through disks, not the console.
MAX_COMMAND_BYTES = 3900
_KEEP_TAIL = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """What one guest shell command printed (stdout and stderr together) and its exit code."""

    command: str
    returncode: int
    output: str


class GuestConsole:
    """A shell on the guest's serial console. One command at a time (a lock enforces it)."""

    def __init__(self, stream: SocketStream, label: str) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._tail = bytearray()
        self._lock = anyio.Lock()
        self._ready = False
        self._log = get_logger(vm=label)

    @property
    def recent_output(self) -> str:
        """The last few KiB the console printed, for error messages."""
        return self._tail.decode(errors="replace")

    async def _read_until(self, marker: bytes) -> bytes:
        while (pos := self._buffer.find(marker)) < 0:
            try:
                chunk = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise ConnectionLost("the guest's serial console closed (QEMU exited?)") from None
            self._buffer += chunk
            self._tail = (self._tail + chunk)[-_KEEP_TAIL:]
        head = bytes(self._buffer[:pos])
        del self._buffer[: pos + len(marker)]
        return head

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the guest's shell and put it into protocol mode."""
        async with self._lock:
            try:
                with anyio.fail_after(timeout):
                    await self._read_until(READY_BANNER)
                    await self._read_until(_PROMPT)
                    await self._stream.send(_SETUP)
                    # Echo is still on for this first exchange; the sync drains it.
                    await self._exchange("true")
            except TimeoutError:
                raise OperationTimeout(
                    "guest boot", timeout, f"console so far:\n{self.recent_output[-2000:]}"
                ) from None
            self._ready = True
            self._log.debug("blockctl.guest.ready")

    async def _exchange(self, command: str) -> tuple[int, str]:
        nonce = secrets.token_hex(6)
        # A subshell: `exit N` in a command ends the command with N, not the guest's shell.
        line = f"( {command}\n) </dev/null 2>&1; printf '\\n__END_%s_%d\\n' {nonce} $?\n"
        await self._stream.send(line.encode())
        output = await self._read_until(f"\n__END_{nonce}_".encode())
        status = await self._read_until(b"\n")
        if not re.fullmatch(rb"\d+", status):
            raise GuestError(f"garbled exit status {status!r} after {command!r}")
        return int(status), output.decode(errors="replace")

    async def run(self, command: str, *, timeout: float = 60.0) -> CommandResult:
        """Run ``command`` in the guest shell; its stdin is /dev/null."""
        if len(command.encode()) > MAX_COMMAND_BYTES:
            raise GuestError(
                f"command of {len(command.encode())} bytes is over the console's "
                f"{MAX_COMMAND_BYTES}-byte line limit; move data through a disk"
            )
        if not self._ready:
            raise GuestError("the console is not ready; call wait_ready() first")
        async with self._lock:
            try:
                with anyio.fail_after(timeout):
                    rc, output = await self._exchange(command)
            except TimeoutError:
                # The shell is now in an unknown state; refuse further commands.
                self._ready = False
                raise OperationTimeout(
                    f"guest command {command!r}",
                    timeout,
                    f"console so far:\n{self.recent_output[-2000:]}",
                ) from None
        self._log.debug("blockctl.guest.command", command=command, rc=rc, output_bytes=len(output))
        return CommandResult(command=command, returncode=rc, output=output)

    async def send_detached(self, command: str) -> None:
        """Send a command whose end the guest will never report (``poweroff -f``, ``reboot``).

        The console is unusable for :meth:`run` afterwards until :meth:`wait_ready` again.
        """
        async with self._lock:
            self._ready = False
            await self._stream.send(f"{command}\n".encode())

    async def check(self, command: str, *, timeout: float = 60.0) -> str:
        """Run ``command`` and return its output; :class:`GuestCommandFailed` if it fails."""
        result = await self.run(command, timeout=timeout)
        if result.returncode != 0:
            raise GuestCommandFailed(command, result.returncode, result.output)
        return result.output

    async def aclose(self) -> None:
        await self._stream.aclose()
