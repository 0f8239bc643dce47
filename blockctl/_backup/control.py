"""A backup's copy, driven from any process (issue 14): pause, resume, speed, cancel, progress.

A backup's QEMU job is a ``sync=none`` fleecing job that only holds the point in time; the
copy itself runs in the backup's own process (its reader threads). So another client cannot
pause or re-speed it through QEMU, and QEMU's progress for the job says nothing. While it
copies, the backup listens on ``<run dir>/control/<job id>.sock`` for each of its fleecing
jobs; ``blockctl jobs VM ...`` in any process asks there first (:func:`ask`), and QEMU only
for jobs without such a socket. One request per connection, one JSON line each way.

A commit or stream in a vhost-user-blk disk's qemu-storage-daemon is reached the same way
(:func:`relaying`): its driving process holds the daemon's one monitor connection, so no other
process can ask the daemon; it serves ``<D-qsd.ops>/control/<job id>.sock`` and carries each
request out on its own session (:class:`JobRelay`).

:class:`CopyControl` is the state both sides share: the reader threads take their bytes
through :meth:`CopyControl.admit` (which waits while paused and keeps to the speed limit) and
park in :meth:`CopyControl.pause_on_error` when the repository is out of space and the error
policy says to wait for a resume; the control server changes it from the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from blockctl._backup.reader import RateLimiter
from blockctl._jobs import Job, adopt_jobs
from blockctl._qmp import wire
from blockctl.errors import BlockctlError, ConfigError, JobCancelledByOther

if TYPE_CHECKING:
    from blockctl._machine import VM

#: Under the VM's run directory: one socket per fleecing job of a running backup.
CONTROL_DIR = "control"
VERBS = ("status", "pause", "resume", "speed", "cancel")
#: A socket path longer than this cannot be bound (sun_path is 108 bytes on Linux).
_SUN_PATH_MAX = 107


def socket_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / CONTROL_DIR / f"{job_id}.sock"


@dataclass(frozen=True, slots=True)
class ErrorPause:
    """The copy waits for a resume after a write error (the repository out of space)."""

    error: str
    count: int
    pause_timeout: float


class CopyControl:
    """Pause, speed and cancel state of one backup's copy, shared by its reader threads and
    its control server. ``rate``: bytes/s, None for no limit. ``clock`` is injectable."""

    def __init__(
        self,
        *,
        rate: int | None = None,
        on_error: str = "report",
        pause_timeout: float = 90.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ConfigError("speed", f"{rate} bytes/s: a speed limit must be positive")
        if on_error not in ("report", "enospc", "stop"):
            raise ConfigError("on_error", f"{on_error!r}: report, enospc or stop")
        self.rate = rate
        self.on_error = on_error
        self.pause_timeout = pause_timeout
        self._clock = clock
        self._cond = threading.Condition()
        self._limiter = None if rate is None else RateLimiter(rate, clock=clock)
        self._speed_changes = 0  # a reader waiting on the old speed takes its bytes anew
        self.paused = False
        self.error_pause: ErrorPause | None = None
        self._errors_seen = 0
        self._reported = 0  # error pauses already said to the hooks
        self.cancelled_by: int | None = None  # pid of the client that cancelled
        self.cancel_requested = anyio.Event()
        # What the status says: bytes read so far and to read, over every disk planned.
        self.done = 0
        self.total = 0

    # ---- the reader threads' side

    def admit(self, n: int, stop: threading.Event) -> bool:
        """Wait until ``n`` more bytes may be read: not while paused, and at the speed limit.
        False once ``stop`` is set (that reader's copy is ending)."""
        with self._cond:
            due: float | None = None  # when the granted bytes are paid for
            speed = self._speed_changes
            while not stop.is_set():
                if self.paused or self.error_pause is not None:
                    self._cond.wait()  # a resume, a stop or a cancel wakes it
                    continue
                if due is None or speed != self._speed_changes:
                    speed = self._speed_changes
                    wait = 0.0 if self._limiter is None else self._limiter.take(n)
                    due = self._clock() + wait
                left = due - self._clock()
                if left <= 0:
                    return True
                self._cond.wait(left)  # woken early by a pause, a new speed or the stop
            return False

    def wake(self) -> None:
        """A reader's ``stop`` was set: let it see that now."""
        with self._cond:
            self._cond.notify_all()

    def pause_on_error(self, exc: OSError, stop: threading.Event) -> bool:
        """After a failed write: True when it should be tried again (resumed in time), False
        when the error stands (the policy does not pause for it, nobody resumed it within the
        pause timeout, or the copy is stopping)."""
        if not self._pauses_for(exc):
            return False
        with self._cond:
            self._errors_seen += 1
            if self.error_pause is None:
                self.error_pause = ErrorPause(
                    error=os.strerror(exc.errno or 0) if exc.errno else str(exc),
                    count=self._errors_seen,
                    pause_timeout=self.pause_timeout,
                )
            deadline = time.monotonic() + self.pause_timeout
            while self.error_pause is not None and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not stop.is_set()

    def _pauses_for(self, exc: OSError) -> bool:
        if self.on_error == "stop":
            return True
        return self.on_error == "enospc" and exc.errno in (errno.ENOSPC, errno.EDQUOT)

    # ---- the event loop's side

    def new_error_pause(self) -> ErrorPause | None:
        """An error pause not yet said to the hooks (each is said once)."""
        with self._cond:
            pause = self.error_pause
            if pause is None or pause.count <= self._reported:
                return None
            self._reported = pause.count
            return pause

    def state(self) -> str:
        if self.error_pause is not None:
            return "paused"
        return "paused" if self.paused else "running"

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "status": self.state(),
                "io_status": "nospace" if self.error_pause is not None else "ok",
                "error": None if self.error_pause is None else self.error_pause.error,
                "done": self.done,
                "total": self.total,
                "speed": self.rate or 0,
                "pid": os.getpid(),
                "type": "backup",
            }

    async def act(self, verb: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out a control request (:data:`VERBS`); the copy's status after it."""
        if verb == "pause":
            self.pause()
        elif verb == "resume":
            self.resume()
        elif verb == "speed":
            self.set_speed(int(request["speed"]))
        elif verb == "cancel":
            pid = request.get("pid")
            self.cancel(pid if isinstance(pid, int) else None)
        elif verb != "status":
            raise ValueError(f"unknown verb {verb!r}")
        return self.status()

    def pause(self) -> None:
        with self._cond:
            self.paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self.paused = False
            self.error_pause = None  # the waiting write is tried again
            self._cond.notify_all()

    def set_speed(self, rate: int) -> None:
        """``rate`` bytes/s; 0: no limit."""
        if rate < 0:
            raise ConfigError("speed", f"{rate} bytes/s: a speed must be 0 (no limit) or more")
        with self._cond:
            self.rate = rate or None
            self._limiter = None if self.rate is None else RateLimiter(self.rate, clock=self._clock)
            self._speed_changes += 1
            self._cond.notify_all()

    def cancel(self, by: int | None) -> None:
        self.cancelled_by = by
        self.cancel_requested.set()


class JobRelay:
    """Control of a job this process drives on a qemu-storage-daemon's QMP (a commit or a
    stream of a vhost-user-blk disk), for other processes: each request is carried out on
    this process's session with the daemon, the one the daemon's monitor accepts. A cancel is
    sent as another client's would be (``job-cancel``, not :meth:`Job.cancel`), so the driver
    ends in :class:`~blockctl.errors.JobCancelledByOther` and undoes what it must, as for a
    job cancelled on QEMU's monitor."""

    def __init__(self, job: Job) -> None:
        self.job = job

    async def status(self) -> dict[str, Any]:
        job = self.job
        info = await job.info()
        io_status = await job.io_status() if info is not None else None
        return {
            "status": "concluded" if info is None else info.status.value,
            "io_status": io_status or "ok",
            "error": None if info is None else info.error,
            "done": 0 if info is None else info.current_progress,
            "total": 0 if info is None else info.total_progress,
            "speed": job.speed or 0,
            "pid": os.getpid(),
            "type": job.type or (info.type if info is not None else "job"),
        }

    async def act(self, verb: str, request: Mapping[str, Any]) -> dict[str, Any]:
        job = self.job
        if verb == "pause":
            await job.pause()
        elif verb == "resume":
            await job.resume()
        elif verb == "speed":
            rate = int(request["speed"])
            if rate < 0:
                raise ConfigError("speed", f"{rate} bytes/s: 0 (no limit) or more")
            await job.set_speed(rate)
        elif verb == "cancel":
            await wire.job_cancel(job.session, job.id)
        elif verb != "status":
            raise ValueError(f"unknown verb {verb!r}")
        return await self.status()


async def watch_cancel(control: CopyControl, job_id: str) -> None:
    """Raise :class:`JobCancelledByOther` once another client asks to cancel (run it in the
    copy's task group: the backup then ends as after any failure, nothing recorded)."""
    await control.cancel_requested.wait()
    done, total = control.done, control.total
    at = f"{100 * done / total:.0f} %" if total else "the start"
    by = f" (pid {control.cancelled_by})" if control.cancelled_by else ""
    raise JobCancelledByOther(
        f"backup job {job_id} was cancelled by another client{by} at {at}; the backup is not "
        "recorded and the checkpoints are as before it",
        job_id=job_id,
        job_type="backup",
        target=None,
        status="running",
        error="cancelled by another client",
        offset=done,
        length=total,
    )


async def _serve_one(control: CopyControl | JobRelay, stream: anyio.abc.ByteStream) -> None:
    async with stream:
        try:
            with anyio.fail_after(10):
                data = b""
                while not data.endswith(b"\n") and len(data) < 4096:
                    data += await stream.receive(4096)
            request = json.loads(data)
            reply: dict[str, Any] = {"ok": True, **await control.act(request.get("verb"), request)}
        except (
            anyio.EndOfStream,
            ValueError,
            KeyError,
            TypeError,
            BlockctlError,  # the daemon refused (a pause of a concluded job, ...)
            TimeoutError,
        ) as exc:
            reply = {"ok": False, "error": str(exc)}
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(json.dumps(reply).encode() + b"\n")


@contextlib.asynccontextmanager
async def relaying(vm: VM, job: Job) -> AsyncIterator[None]:
    """While the body drives ``job``: when ``vm`` is a qemu-storage-daemon (a vhost-user-blk
    disk's), serve the job's control socket in the disk's operations directory, so that
    ``blockctl jobs VM`` in another process lists, pauses, re-speeds and cancels it (the
    daemon's monitor takes this process alone while it runs). On QEMU nothing: other clients
    reach its jobs on its monitor."""
    from blockctl._machine import DaemonDisk

    if not isinstance(vm, DaemonDisk):
        yield
        return
    async with serving(JobRelay(job), vm.run_dir, [job.id]):
        yield


@contextlib.asynccontextmanager
async def serving(
    control: CopyControl | JobRelay, run_dir: Path | None, job_ids: Sequence[str]
) -> AsyncIterator[None]:
    """Listen for other clients on each job's control socket while the body runs; the
    sockets are removed when it ends. No run directory (a QEMU reached by its socket only):
    no control, and other clients drive the QEMU jobs alone."""
    if run_dir is None:
        yield
        return
    paths = [socket_path(run_dir, j) for j in job_ids]
    paths = [p for p in paths if len(os.fsencode(p)) <= _SUN_PATH_MAX]
    if not paths:
        yield
        return
    paths[0].parent.mkdir(mode=0o700, exist_ok=True)
    listeners: list[anyio.abc.SocketListener] = []
    try:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a socket a killed backup left
            listeners.append(await anyio.create_unix_listener(path))
            os.chmod(path, 0o600)
        async with anyio.create_task_group() as tg:

            async def accept(listener: anyio.abc.SocketListener) -> None:
                async def handle(stream: anyio.abc.SocketStream) -> None:
                    await _serve_one(control, stream)

                await listener.serve(handle)

            for listener in listeners:
                tg.start_soon(accept, listener)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for listener in listeners:
                with contextlib.suppress(OSError):
                    await listener.aclose()
            for path in paths:
                with contextlib.suppress(OSError):
                    path.unlink()


async def ask(
    run_dir: Path | None, job_id: str, verb: str, **fields: Any
) -> Mapping[str, Any] | None:
    """Send ``verb`` to the process that owns ``job_id`` (a backup, or a daemon's commit or
    stream); its reply, or None when nobody listens for that job (then it is QEMU's alone)."""
    if verb not in VERBS:
        raise ConfigError("verb", f"{verb!r}: one of {', '.join(VERBS)}")
    if run_dir is None:
        return None
    path = socket_path(run_dir, job_id)
    if not path.exists():
        return None
    try:
        with anyio.fail_after(10):
            async with await anyio.connect_unix(path) as stream:
                request = {"verb": verb, "pid": os.getpid(), **fields}
                await stream.send(json.dumps(request).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    data += await stream.receive(4096)
    except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError):
        return None  # a socket a killed backup left: nobody drives that copy any more
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ConfigError(verb, f"the process driving job {job_id} refused: {reply.get('error')}")
    return reply  # type: ignore[no-any-return]


def daemon_dirs(vm: VM) -> dict[str, Path]:
    """Each vhost-user-blk disk's operations directory (device → directory): a backup of such
    a disk runs in its qemu-storage-daemon and serves its control socket there."""
    if vm.run_dir is None:
        return {}
    from blockctl._machine import daemon_journal_dir

    return {
        device: daemon_journal_dir(vm.run_dir, device)
        for device, record in vm.registry.drives.items()
        if record.daemon is not None
    }


async def daemon_jobs(vm: VM) -> list[tuple[str, str, Mapping[str, Any]]]:
    """The jobs running in ``vm``'s qemu-storage-daemons: (device, job id, its status: a
    backup's copy's, or a commit's or stream's as its driving process reads it; ``type`` says
    which), asked on their control sockets. Not on the daemon's QMP: the process driving the
    job holds the daemon's one monitor connection while it runs."""
    found = []
    for device, directory in sorted(daemon_dirs(vm).items()):
        sockets = directory / CONTROL_DIR
        if not sockets.is_dir():
            continue
        for path in sorted(sockets.glob("*.sock")):
            job_id = path.name[: -len(".sock")]
            reply = await ask(directory, job_id, "status")
            if reply is not None:
                found.append((device, job_id, reply))
    return found


async def control_job(vm: VM, job_id: str, action: str, *, speed: int | None = None) -> str:
    """``pause``, ``resume``, ``speed`` (``speed`` bytes/s; 0: no limit) or ``cancel`` the
    job ``job_id`` of ``vm``, whichever process started it. A backup's job goes to the backup's
    process, which pauses, re-speeds or cancels its copy (a backup running in a vhost-user-blk
    disk's daemon too); a commit or stream in a daemon to the process driving it, which acts
    on the daemon's QMP; any other job to QEMU. Returns which acted: ``"backup"``,
    ``"daemon"`` (a daemon's commit or stream, through its driving process) or ``"qemu"``."""
    if action not in ("pause", "resume", "speed", "cancel"):
        raise ConfigError("action", f"{action!r}: pause, resume, speed or cancel")
    if action == "speed" and speed is None:
        raise ConfigError("speed", "give the new speed in bytes/s (0: unlimited)")
    # A concluded job is dismissed only when no other client is attached: its owner may be
    # about to read its outcome.
    jobs = await adopt_jobs(vm.session, dismiss=not vm.other_clients())
    target = next((j for j in jobs if j.id == job_id), None)
    fields = {} if speed is None else {"speed": speed}
    if target is None:
        # A backup in a qemu-storage-daemon: its job is the daemon's, its copy's control in
        # the disk's operations directory.
        for directory in daemon_dirs(vm).values():
            reply = await ask(directory, job_id, action, **fields)
            if reply is not None:
                return "backup" if reply.get("type", "backup") == "backup" else "daemon"
        raise ConfigError("job", f"no job {job_id!r} in {vm.name} (see `blockctl jobs`)")
    if await ask(vm.run_dir, job_id, action, **fields) is not None:
        return "backup"
    if action == "cancel":
        await target.cancel()
    elif action == "pause":
        await target.pause()
    elif action == "resume":
        await target.resume()
    else:
        assert speed is not None
        await target.set_speed(speed)
    return "qemu"
