"""The one door to subprocesses.

Every process blockctl starts goes through here: argv lists only (never a shell), exit codes
always checked, and a child is killed and reaped when the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio
import anyio.abc

from blockctl import _binaries
from blockctl._log import get_logger
from blockctl.errors import MissingComponent, ProcessFailed

_log = get_logger()

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    """A finished helper process."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class _Raw:
    """What :func:`_run_raw` saw, output still bytes: each public runner decodes as it needs."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float


async def _run_raw(
    argv: Sequence[str],
    *,
    check: bool,
    stdin: bytes | None,
    env: Mapping[str, str] | None,
    cwd: Path | None,
    ok_codes: frozenset[int],
    on_output: Callable[[bytes], None] | None = None,
) -> _Raw:
    """The one place that starts a run-to-completion child, so text and binary callers share
    the not-installed mapping, the logging and the exit-code check. ``on_output`` sees stdout
    as it arrives (qemu-img's progress), not only at the end."""
    args = [str(a) for a in argv]
    started = time.monotonic()
    full_env = None if env is None else {**os.environ, **env}
    try:
        if on_output is None:
            result = await anyio.run_process(args, input=stdin, check=False, env=full_env, cwd=cwd)
            returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
        else:
            returncode, stdout, stderr = await _run_streaming(args, full_env, cwd, on_output)
    except FileNotFoundError as exc:
        raise MissingComponent(
            args[0], f"install it (on Debian: apt-get install the package that ships {args[0]})"
        ) from exc
    seconds = time.monotonic() - started
    raw = _Raw(
        argv=tuple(args),
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        seconds=seconds,
    )
    _log.debug("blockctl.proc.exited", argv=args, rc=raw.returncode, seconds=round(seconds, 4))
    if check and raw.returncode not in ok_codes:
        raise ProcessFailed(
            args,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
    return raw


async def _run_streaming(
    args: list[str],
    env: Mapping[str, str] | None,
    cwd: Path | None,
    on_output: Callable[[bytes], None],
) -> tuple[int, bytes, bytes]:
    out, err = bytearray(), bytearray()
    # Leaving the block kills and reaps the child if we are cancelled (anyio Process.aclose).
    async with await anyio.open_process(
        args, stdin=subprocess.DEVNULL, env=env, cwd=cwd
    ) as process:

        async def drain(
            stream: anyio.abc.ByteReceiveStream,
            sink: bytearray,
            callback: Callable[[bytes], None] | None,
        ) -> None:
            async for chunk in stream:
                sink += chunk
                if callback is not None:
                    callback(chunk)

        assert process.stdout is not None and process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, process.stdout, out, on_output)
            tg.start_soon(drain, process.stderr, err, None)
        returncode = await process.wait()
    return returncode, bytes(out), bytes(err)


async def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ok_codes: frozenset[int] = frozenset({0}),
    on_output: Callable[[bytes], None] | None = None,
) -> Completed:
    """Run ``argv`` to completion and return its output.

    :raise ProcessFailed: the exit code is not in ``ok_codes`` (and ``check`` is true).
    :raise MissingComponent: the program is not installed.
    Cancellation kills the child and waits for it before propagating (anyio's guarantee).
    """
    raw = await _run_raw(
        argv, check=check, stdin=stdin, env=env, cwd=cwd, ok_codes=ok_codes, on_output=on_output
    )
    return Completed(
        argv=raw.argv,
        returncode=raw.returncode,
        stdout=raw.stdout.decode(errors="replace"),
        stderr=raw.stderr.decode(errors="replace"),
        seconds=raw.seconds,
    )


async def run_bytes(
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> bytes:
    """Run ``argv`` to completion and return its stdout undecoded.

    For binary output (``cpio -o``), which :func:`run`'s text decoding would corrupt. Same
    guarantees as :func:`run`, always checked: a non-zero exit raises :class:`ProcessFailed`.
    """
    raw = await _run_raw(argv, check=True, stdin=stdin, env=env, cwd=cwd, ok_codes=frozenset({0}))
    return raw.stdout


def _child_setup(die_with_parent: bool, parent_pid: int) -> Callable[[], None]:
    if die_with_parent:
        # Imported and loaded here, in the parent: only such a spawn needs ctypes (a short
        # command does not pay for it), and the child after fork only calls.
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        # Sockets and logs QEMU creates are for its owner alone (the run dir is 0700 too).
        os.umask(0o077)
        if die_with_parent:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            # The parent may have died between fork and prctl: then nobody would kill us.
            if os.getppid() != parent_pid:
                os._exit(1)

    return setup


async def spawn(
    argv: Sequence[str],
    *,
    log: IO[bytes],
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = True,
) -> asyncio.subprocess.Process:
    """Start a long-running child (QEMU) with stdout and stderr going to ``log``.

    With ``die_with_parent`` the kernel kills the child when this process dies
    (PR_SET_PDEATHSIG), so a crashed controller never leaves QEMU behind. Without it the child
    gets its own session and outlives the controller (``blockctl up``). The caller owns reaping:
    see :func:`terminate`.
    """
    args = [str(a) for a in argv]
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=tuple(pass_fds),
            start_new_session=not die_with_parent,
            preexec_fn=_child_setup(die_with_parent, os.getpid()),
        )
    except FileNotFoundError as exc:
        raise MissingComponent(args[0], _binaries.install_hint("qemu-system-x86_64")) from exc
    _log.debug("blockctl.proc.spawned", argv=args, pid=process.pid)
    return process


async def terminate(process: asyncio.subprocess.Process, *, grace: float) -> int:
    """SIGTERM, wait ``grace`` seconds, SIGKILL, reap. Shielded: the child is always reaped."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace):
                return await process.wait()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        returncode = await process.wait()
    # Outside the with: mypy cannot know that a shielded scope never swallows the return.
    return returncode


async def reap(process: asyncio.subprocess.Process, *, grace: float) -> int:
    """Wait for a child that exits by itself (a daemon's launcher, once it has forked); if it
    has not after ``grace`` seconds, SIGKILL, never SIGTERM: a handler that runs in the
    launcher may touch what it shares with the daemon (nbdkit's quit pipe). Shielded."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(grace):
            return await process.wait()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        returncode = await process.wait()
    return returncode


# Section: processes this controller did not start (a previous controller's, by record)


def _stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of ``/proc/PID/stat`` (empty if there is no such process)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat_line[stat_line.rfind(")") + 2 :].split()


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if there is none."""
    try:
        return int(_stat_fields(pid)[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, pid_start: int | None) -> bool:
    """Process ``pid`` still runs and is the one that started at ``pid_start``. A zombie
    (exited, not reaped: a detached server whose parent is a PID 1 that does not reap) is
    not running."""
    if pid is None or pid_start is None:
        return False
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):  # field 3: the state
        return False
    return process_start(pid) == pid_start


async def stop_recorded(pid: int, pid_start: int | None, *, grace: float) -> bool:
    """Stop a process a previous controller started and recorded (pid and start time):
    SIGTERM, ``grace`` seconds, SIGKILL, until it is gone. A pid now used by another process
    is left alone. True if it was running."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # Checked after the pidfd is held: from here the pid cannot be reused under us.
        if not process_alive(pid, pid_start):
            return False
        with anyio.CancelScope(shield=True):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            with anyio.move_on_after(grace) as waited:
                await anyio.wait_readable(pidfd)
            if waited.cancelled_caught:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await anyio.wait_readable(pidfd)
        _log.info("blockctl.proc.stopped", pid=pid)
        return True
    finally:
        os.close(pidfd)
