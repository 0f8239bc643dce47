"""The operation journal: what a long chain operation intends, on disk, before it acts.

A commit, a stream or an external snapshot changes QEMU's graph, blockctl's drive registry
and sometimes files, in several steps; a controller killed between two of them (kill -9, a
lost SSH session) must not leave a half-done operation nobody knows about (qemu-facts F1-F3,
as VDSM's live merge and libvirt do). So, before the first step, the operation writes an
*intent record* to ``<run dir>/journal-<id>.json`` (atomically: temporary file, fsync, rename,
mode 0600): its kind, devices, job id, the nodes and files involved and each device's chain
before and after. Each step rewrites it; the finished operation removes it.

:func:`plan` is the pure reconcile planner: one record and what QEMU reports now
(:class:`Facts`; QEMU is the source of truth) give a :class:`Plan` of actions and a verdict.
:mod:`blockctl._ops.recovery` reads the facts and carries the plan out.

Rules of :func:`plan`:

- QEMU gone: nothing can be asked; the verdict says truthfully which image is the top of each
  device's chain as the files on disk describe it, and what is uncertain.
- Our job still listed: adopt it (an active commit that is READY is completed), then plan
  again with its outcome recorded in the record.
- No job, every chain as expected after: finish the cleanup (delete dropped nodes, update the
  registry, delete files if asked).
- No job, every chain as before: the operation did not happen (or failed): undo what was added
  and report "not done".
- Anything else: report, keep the record, change nothing.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import shlex
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockctl import _fsutil
from blockctl._graph import BlockGraph, GraphNode
from blockctl._log import get_logger
from blockctl._proc import process_alive as process_alive
from blockctl._proc import process_start as process_start
from blockctl._qmp.models import JobStatus, node_json, overlay_options

if TYPE_CHECKING:
    from blockctl._jobs import JobProgress, JobTransition
    from blockctl._machine import VM

_log = get_logger()

PREFIX = "journal-"
#: ``<run dir>/freeze-<id>.json``: a freeze by a controller that has not thawed yet
#: (:mod:`blockctl._agent` writes them; named here so that a reader of the run dir can tell
#: whether there is one without importing the guest agent's module).
FREEZE_PREFIX = "freeze-"
#: ``<run dir>/backup.lock``: held (flock) by a backup for its whole run, naming its process
#: (:mod:`blockctl._ops.conflicts` writes and reads it; named here for readers below it).
BACKUP_LOCK = "backup.lock"
SUFFIX = ".json"
VERSION = 1

Json = dict[str, Any]


class OpKind(enum.StrEnum):
    COMMIT = "commit"
    STREAM = "stream"
    SNAPSHOT = "snapshot"
    #: A live restore into a raw target: the disk runs on a temporary qcow2 overlay over the
    #: backup, mirrored (write-blocking) into the target, which the device pivots onto.
    MIRROR = "mirror"


class Step(enum.StrEnum):
    """How far the operation got, in order. Each is written before what it names happens."""

    PLANNED = "planned"  # intent recorded; nothing changed yet
    STARTING = "starting"  # the job command is about to be sent (job id known)
    RUNNING = "running"  # the job exists in QEMU
    READY = "ready"  # an active commit is READY; job-complete follows at once
    SWITCHING = "switching"  # snapshot: overlays added, the transaction is about to be sent
    CONCLUDED = "concluded"  # job succeeded (or snapshot switched): only cleanup is left

    @property
    def order(self) -> int:
        return list(Step).index(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceChains:
    """One device's chain (node names and files, top first) before and after the operation."""

    before: tuple[str, ...]
    after: tuple[str, ...]
    files_before: tuple[str, ...]
    files_after: tuple[str, ...]
    formats_before: tuple[str, ...] = ()  # each layer's format driver, for an offline relink

    def to_json(self) -> Json:
        return {
            "before": list(self.before),
            "after": list(self.after),
            "files_before": list(self.files_before),
            "files_after": list(self.files_after),
            "formats_before": list(self.formats_before),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceChains:
        return cls(
            before=tuple(data["before"]),
            after=tuple(data["after"]),
            files_before=tuple(data["files_before"]),
            files_after=tuple(data["files_after"]),
            formats_before=tuple(data.get("formats_before", ())),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerRecord:
    """A live restore's NBD server: started by the operation, it outlives a killed controller
    (the guest's disk reads through it until the copy ends), so the record names it."""

    #: 0: recorded before it started (recovery finds it by the pid file in ``home``).
    pid: int
    pid_start: int | None
    home: str  # its private directory (socket, log, pid file), removed with it
    # What it serves (for the way on once QEMU is gone: restore the point, rebase onto it).
    repo: str = ""
    source_vm: str = ""  # the VM the point belongs to in the repository
    point: str = ""
    device: str = ""

    def to_json(self) -> Json:
        return {
            "pid": self.pid,
            "pid_start": self.pid_start,
            "home": self.home,
            "repo": self.repo,
            "source_vm": self.source_vm,
            "point": self.point,
            "device": self.device,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServerRecord:
        return cls(
            pid=int(data["pid"]),
            pid_start=_int_or_none(data.get("pid_start")),
            home=str(data["home"]),
            repo=str(data.get("repo", "")),
            source_vm=str(data.get("source_vm", "")),
            point=str(data.get("point", "")),
            device=str(data.get("device", "")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent:
    """One journaled operation (the content of one ``journal-<id>.json``)."""

    id: str
    kind: OpKind
    vm: str
    step: Step = Step.PLANNED
    job_id: str | None = None
    active: bool = False  # an active commit or a mirror (READY, then pivot)
    devices: Mapping[str, DeviceChains] = field(default_factory=dict)
    #: Nodes to ``blockdev-del`` once the job succeeded, top-down (format before file).
    drop_nodes: tuple[str, ...] = ()
    #: Files of the dropped layers; deleted only with ``delete_files``.
    drop_files: tuple[str, ...] = ()
    delete_files: bool = False
    #: Snapshot: node options added (device → options, file node first) and files created.
    add_nodes: Mapping[str, tuple[Json, ...]] = field(default_factory=dict)
    created_files: tuple[str, ...] = ()
    #: Intermediate commit: (device, node) reopened read-write, read-only again at the end.
    read_only_after: tuple[tuple[str, str], ...] = ()
    #: A job outcome learnt while reconciling (the error), or None.
    error: str | None = None
    started: float = 0.0
    #: For messages: "commit of top.qcow2 into base.raw on disk0".
    what: str = ""
    #: The writer: its pid and start time (clock ticks since boot, ``/proc/PID/stat``), so
    #: that a reused pid is not mistaken for it. A record whose writer still runs is another
    #: client's operation in progress, not an interrupted one (:func:`owner_alive`).
    pid: int | None = None
    pid_start: int | None = None
    #: A live restore (a stream off a backup's NBD server): its server.
    server: ServerRecord | None = None
    #: A live restore's new server recovery is putting in place of ``server`` (gone): its
    #: backup nodes are ``replacement_base`` and ``replacement_base``-nbd. Until QEMU's graph
    #: shows the disk's image on them, the chains still name the old nodes; recovery then
    #: finishes the swap or undoes it before anything else (a recover killed inside it).
    replacement: ServerRecord | None = None
    replacement_base: str = ""
    #: A live restore's record written before its hot-plug: the nodes the hot-plug adds
    #: (top-down); ``created_files`` then names the files made for it. Both cleared once the
    #: disk is attached (the record rewritten from QEMU's graph).
    hotplug_nodes: tuple[str, ...] = ()
    #: A live restore onto a CHAP LUN: its ``secret`` object's id → the password file's name
    #: (never the password), for the way on once QEMU is gone.
    secret_files: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return self.what or f"{self.kind.value} on {', '.join(self.devices)}"

    def to_json(self) -> Json:
        return {
            "version": VERSION,
            "id": self.id,
            "kind": self.kind.value,
            "vm": self.vm,
            "step": self.step.value,
            "job_id": self.job_id,
            "active": self.active,
            "devices": {d: c.to_json() for d, c in self.devices.items()},
            "drop_nodes": list(self.drop_nodes),
            "drop_files": list(self.drop_files),
            "delete_files": self.delete_files,
            "add_nodes": {d: list(n) for d, n in self.add_nodes.items()},
            "created_files": list(self.created_files),
            "read_only_after": [list(p) for p in self.read_only_after],
            "error": self.error,
            "started": self.started,
            "what": self.what,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "server": None if self.server is None else self.server.to_json(),
            "replacement": None if self.replacement is None else self.replacement.to_json(),
            "replacement_base": self.replacement_base,
            "hotplug_nodes": list(self.hotplug_nodes),
            "secret_files": dict(self.secret_files),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Intent:
        if data.get("version") != VERSION:
            raise ValueError(f"journal version {data.get('version')!r}, expected {VERSION}")
        return cls(
            id=str(data["id"]),
            kind=OpKind(data["kind"]),
            vm=str(data["vm"]),
            step=Step(data["step"]),
            job_id=data.get("job_id"),
            active=bool(data.get("active", False)),
            devices={d: DeviceChains.from_json(c) for d, c in data["devices"].items()},
            drop_nodes=tuple(data.get("drop_nodes", ())),
            drop_files=tuple(data.get("drop_files", ())),
            delete_files=bool(data.get("delete_files", False)),
            add_nodes={d: tuple(dict(o) for o in n) for d, n in data.get("add_nodes", {}).items()},
            created_files=tuple(data.get("created_files", ())),
            read_only_after=tuple((str(a), str(b)) for a, b in data.get("read_only_after", ())),
            error=data.get("error"),
            started=float(data.get("started", 0.0)),
            what=str(data.get("what", "")),
            pid=_int_or_none(data.get("pid")),
            pid_start=_int_or_none(data.get("pid_start")),
            server=None if data.get("server") is None else ServerRecord.from_json(data["server"]),
            replacement=None
            if data.get("replacement") is None
            else ServerRecord.from_json(data["replacement"]),
            replacement_base=str(data.get("replacement_base", "")),
            hotplug_nodes=tuple(str(n) for n in data.get("hotplug_nodes", ())),
            secret_files={str(k): str(v) for k, v in data.get("secret_files", {}).items()},
        )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


# Section: the writer


#: The operations in progress in this process (by record id): a record this process wrote
#: but no longer drives (an operation that raised and left it for the next reconcile) is not
#: "alive" even though its writer is.
_IN_PROGRESS: weakref.WeakValueDictionary[str, Op] = weakref.WeakValueDictionary()


def owner_alive(intent: Intent) -> bool:
    """The operation of ``intent`` is still being driven by its writer: another live process
    (same pid and start time), or an :class:`Op` in progress in this one. False for a record
    written before records named their writer."""
    if intent.pid == os.getpid():
        return intent.id in _IN_PROGRESS
    return process_alive(intent.pid, intent.pid_start)


# Section: storage


def path_of(run_dir: Path, op_id: str) -> Path:
    return run_dir / f"{PREFIX}{op_id}{SUFFIX}"


def write(run_dir: Path, intent: Intent) -> None:
    """Replace the record atomically: a reader sees the old or the new one, never a mix."""
    _fsutil.atomic_write_bytes(
        path_of(run_dir, intent.id), json.dumps(intent.to_json(), indent=1).encode()
    )


def discard_if_stale(path: Path) -> bool:
    """For a loader meeting a temporary file: True if it is one (to be skipped); it is removed
    only when its writer is gone. Another controller may be between its write and its rename
    right now: deleting its file would make that rename fail and its operation with it."""
    if path.suffix != _fsutil.TMP_SUFFIX:
        return False
    pid = path.stem.rpartition(".")[2]
    if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
        path.unlink(missing_ok=True)  # the rename that would have published it never came
    return True


def remove(run_dir: Path, op_id: str) -> None:
    remove_durably(path_of(run_dir, op_id))


def remove_durably(path: Path) -> None:
    """Unlink ``path`` (if there) and fsync its directory."""
    path.unlink(missing_ok=True)
    _fsutil.fsync_dir(path.parent)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record that cannot be read (a newer blockctl's, or damaged): reported, kept."""

    path: Path
    reason: str


def load_all(run_dir: Path | None) -> list[Intent | Unreadable]:
    """Every record in ``run_dir``, oldest first. Leftover temporary files are removed (the
    rename that would have published them never happened)."""
    if run_dir is None or not run_dir.is_dir():
        return []
    found: list[Intent | Unreadable] = []
    for path in sorted(run_dir.glob(f"{PREFIX}*")):
        if discard_if_stale(path):
            continue
        try:
            found.append(Intent.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            found.append(Unreadable(path, str(exc)))
    found.sort(key=lambda i: i.started if isinstance(i, Intent) else 0.0)
    return found


# Section: the handle an operation holds

#: Test hook: called with the record right after each write (crash tests kill the process
#: here, so a "crash at step X" is exact, never a race).
FAILPOINT: Callable[[Intent], None] | None = None


class Op:
    """A journaled operation in progress. Also a job hook: READY is recorded as it happens."""

    def __init__(self, run_dir: Path | None, intent: Intent, session_lost: Callable[[], bool]):
        self.run_dir = run_dir
        self.intent = intent
        self._lost = session_lost
        _IN_PROGRESS[intent.id] = self
        self._write()

    def _write(self) -> None:
        if self.run_dir is None:
            return  # a QEMU blockctl did not launch: no run dir, nothing is journaled
        write(self.run_dir, self.intent)
        if FAILPOINT is not None:
            FAILPOINT(self.intent)

    def step(self, step: Step, **changes: Any) -> None:
        self.intent = replace(self.intent, step=step, **changes)
        self._write()

    def starting(self, job_id: str) -> None:
        self.step(Step.STARTING, job_id=job_id)

    def finished(self) -> None:
        """Done, cleanup included: the record goes."""
        self.release()
        if self.run_dir is not None:
            remove(self.run_dir, self.intent.id)

    def abandoned(self) -> None:
        """The operation raised. With QEMU still there, the operation's own error handling
        ran and the caller gets the exception: the record goes, unless only cleanup was left
        (then the next reconcile finishes it). With QEMU gone the record stays: the next
        reconcile reports what the images on disk now hold."""
        self.release()
        if not self._lost() and self.intent.step is not Step.CONCLUDED:
            self.finished()

    def release(self) -> None:
        """No longer driven by this process: a record left behind is for reconcile."""
        if _IN_PROGRESS.get(self.intent.id) is self:
            del _IN_PROGRESS[self.intent.id]

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[None]:
        """Around the job: CONCLUDED once it succeeded; :meth:`abandoned` if it raised."""
        try:
            yield
        except BaseException:
            self.abandoned()
            raise
        self.step(Step.CONCLUDED)

    # JobHook
    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is JobStatus.READY and self.intent.step.order < Step.READY.order:
            self.step(Step.READY)
        elif transition.status is JobStatus.RUNNING and self.intent.step is Step.STARTING:
            self.step(Step.RUNNING)

    def on_progress(self, progress: JobProgress) -> None:
        pass


def begin(vm: VM, intent: Intent) -> Op:
    return begin_at(vm.run_dir, intent, lambda: vm.session.lost)


def begin_at(run_dir: Path | None, intent: Intent, session_lost: Callable[[], bool]) -> Op:
    """:func:`begin` without a session yet (a record written before QEMU starts)."""
    pid = os.getpid()
    intent = replace(
        intent,
        id=intent.id or f"{intent.kind.value}-{secrets.token_hex(4)}",
        started=time.time(),
        pid=pid,
        pid_start=process_start(pid),
    )
    return Op(run_dir, intent, session_lost)


# Section: the planner


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFact:
    status: JobStatus
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What QEMU reports now (empty when ``alive`` is False)."""

    alive: bool
    jobs: Mapping[str, JobFact] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()
    files: Mapping[str, str] = field(default_factory=dict)  # node → the file it has open
    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device → nodes
    server_alive: bool = False  # the record's server (a live restore's) still runs
    #: QEMU gone, and it never ran: no record of it was ever written (a live launch killed
    #: before QEMU's spawn, in its run directory only journal records).
    qemu_never_ran: bool = False
    #: Files a live restore made (its record's ``created_files``) that hold data now: written
    #: since they were made (a disk attached and then unplugged by another client).
    holding_data: frozenset[str] = frozenset()


class Verdict(enum.StrEnum):
    FINISHED = "finished"  # the operation took effect; its cleanup is done
    NOT_DONE = "not-done"  # it did not take effect; what it had added is undone
    FAILED = "failed"  # its job ended with an error; the chain is as before
    QEMU_GONE = "qemu-gone"  # QEMU died: reported from the record and the files on disk
    ATTENTION = "needs-attention"  # neither state, or a paused job: nothing changed, kept
    RUNNING = "running"  # its writer still drives it (another client): left alone


@dataclass(frozen=True, slots=True)
class AdoptJob:
    job_id: str
    complete: bool  # complete it at READY (an active commit)


@dataclass(frozen=True, slots=True)
class DeleteNodes:
    names: tuple[str, ...]  # top-down


@dataclass(frozen=True, slots=True)
class DeleteFiles:
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReopenReadOnly:
    device: str
    node: str


@dataclass(frozen=True, slots=True)
class Relink:
    """Offline (QEMU gone): point ``path`` back at ``backing`` (``qemu-img rebase -u``)."""

    path: str
    fmt: str
    backing: str
    backing_fmt: str


@dataclass(frozen=True, slots=True)
class UpdateRegistry:
    device: str
    remove: tuple[str, ...]
    add: tuple[Json, ...]


@dataclass(frozen=True, slots=True)
class StopServer:
    """Stop a live restore's NBD server (if its pid is still that process) and remove its
    directory."""

    server: ServerRecord


@dataclass(frozen=True, slots=True)
class ReplaceServer:
    """A live restore's server is gone (the guest's disk cannot read what is not copied yet):
    start a new one, put new backup nodes on it under ``node`` (``blockdev-reopen``), delete
    the old ones; then plan again (copy again)."""

    device: str
    node: str


@dataclass(frozen=True, slots=True)
class RestartMirror:
    """A live restore's mirror into its raw target stopped with the disk still on the
    overlay: start it again from ``node`` into ``target`` (the whole disk again; a new job
    id), then plan again (adopt it: READY, then the pivot)."""

    device: str
    node: str
    target: str


@dataclass(frozen=True, slots=True)
class RestartStream:
    """A live restore's copy stopped with the disk still on the backup: start it again (a
    new job id), then plan again (adopt it)."""

    device: str
    node: str


Action = (
    AdoptJob
    | DeleteNodes
    | DeleteFiles
    | ReopenReadOnly
    | UpdateRegistry
    | Relink
    | StopServer
    | ReplaceServer
    | RestartStream
    | RestartMirror
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """``verdict`` None: run ``actions`` (one :class:`AdoptJob`) and plan again. Otherwise the
    actions finish the operation and ``forget`` says whether the record then goes."""

    verdict: Verdict | None
    actions: tuple[Action, ...]
    message: str
    forget: bool = True
    tops: Mapping[str, str] = field(default_factory=dict)  # QEMU gone: device → top file


_ACTIVE_JOB = frozenset(
    {
        JobStatus.CREATED,
        JobStatus.RUNNING,
        JobStatus.READY,
        JobStatus.WAITING,
        JobStatus.PENDING,
        JobStatus.ABORTING,
        JobStatus.CONCLUDED,
    }
)


def plan(intent: Intent, facts: Facts, *, owner_alive: bool = False) -> Plan:
    """Decide what to do about one journaled operation, from what QEMU reports now.

    ``owner_alive``: the process that wrote the record still drives the operation
    (:func:`owner_alive`): it is another client's operation in progress, whatever QEMU shows
    (its job may not exist yet, or have just ended), and is left alone. With QEMU gone
    nothing runs any more, whoever is alive."""
    what = intent.describe()
    if not facts.alive:
        if facts.qemu_never_ran and intent.server is not None and intent.created_files:
            return _plan_never_started(intent, what)
        if intent.server is not None and not intent.devices:
            return _plan_never_attached(intent, facts, what)
        return _plan_gone(intent, what)
    if owner_alive:
        its_job = f", job {intent.job_id}" if intent.job_id else ""
        return Plan(
            verdict=Verdict.RUNNING,
            actions=(),
            forget=False,
            message=(
                f"{what}: running in process {intent.pid} (step {intent.step.value}{its_job}); "
                "left to it"
            ),
        )
    attached = any(d in facts.chains for d in intent.devices)
    # No device at all: a live restore's record written before its server started, never
    # rewritten from the hot-plug's plan.
    if intent.server is not None and (intent.hotplug_nodes or not intent.devices) and not attached:
        return _plan_never_attached(intent, facts, what)
    job = facts.jobs.get(intent.job_id) if intent.job_id else None
    if job is not None and job.status is not JobStatus.NULL:  # NULL: being dismissed = gone
        if job.status in _ACTIVE_JOB:
            complete = intent.active  # an active commit or a mirror: pivot at READY
            return Plan(
                verdict=None,
                actions=(AdoptJob(intent.job_id or "", complete),),
                message=f"{what}: job {intent.job_id} is {job.status.value}; adopting it",
            )
        return Plan(
            verdict=Verdict.ATTENTION,
            actions=(),
            forget=False,
            message=(
                f"{what}: job {intent.job_id} is {job.status.value}: resume it (`blockctl jobs`) "
                "or cancel it, then run `blockctl recover` again"
            ),
        )
    states = {d: _state(facts.chains.get(d, ()), c) for d, c in intent.devices.items()}
    restore = tuple(ReopenReadOnly(d, n) for d, n in intent.read_only_after if n in facts.nodes)
    if states and all(s == "after" for s in states.values()):
        actions: list[Action] = []
        present = tuple(n for n in intent.drop_nodes if n in facts.nodes)
        if present:
            actions.append(DeleteNodes(present))
        used = _in_use(facts, present)
        unused = tuple(f for f in intent.drop_files if f not in used)
        registry = [
            UpdateRegistry(
                device, tuple(intent.drop_nodes), tuple(intent.add_nodes.get(device, ()))
            )
            for device in intent.devices
        ]
        if intent.kind is OpKind.MIRROR:
            # The target's nodes enter the registry first: the flush before the overlay file
            # goes then covers them (the overlay is given up once the target is durable).
            actions.extend(registry)
        if intent.delete_files and unused:
            actions.append(DeleteFiles(unused))
        actions.extend(restore)
        if intent.kind is not OpKind.MIRROR:
            actions.extend(registry)
        by = (
            "QEMU finished it after the controller stopped; "
            if intent.step.order < (Step.CONCLUDED.order)
            else ""
        )
        if intent.server is not None:
            actions.append(StopServer(intent.server))
        return Plan(
            verdict=Verdict.FINISHED,
            actions=tuple(actions),
            message=f"{what}: done ({by}cleanup completed by recovery)",
        )
    if intent.server is not None and states and all(s == "before" for s in states.values()):
        return _plan_live_unfinished(intent, facts, what)
    # A failed job never changes the graph: the post-state above wins over a recorded error
    # (e.g. "outcome unknown" when someone else dismissed the job).
    if intent.error is not None:
        return Plan(
            verdict=Verdict.FAILED,
            actions=(*_rollback(intent, facts), *restore),
            message=f"{what} failed: {intent.error}. {_unchanged(intent)}",
        )
    if states and all(s == "before" for s in states.values()):
        if intent.step is Step.CONCLUDED:
            return _diverged(intent, facts, what, "the record says it took effect")
        if intent.step.order >= Step.STARTING.order and intent.kind is not OpKind.SNAPSHOT:
            why = (
                f"its job {intent.job_id} ended without changing the chain and its result went "
                "with the controller (it failed, was cancelled, or was never created)"
            )
        elif intent.step is Step.PLANNED:
            why = "it stopped before changing anything"
        else:
            why = "the controller stopped before the switch took effect"
        return Plan(
            verdict=Verdict.NOT_DONE,
            actions=(*_rollback(intent, facts), *restore),
            message=f"{what}: not done: {why}. {_unchanged(intent)} Run it again if still wanted",
        )
    return _diverged(intent, facts, what, "")


def _plan_live_unfinished(intent: Intent, facts: Facts, what: str) -> Plan:
    """A live restore whose copy stopped (failed, cancelled, or its result lost with the
    controller) while the disk still reads the backup through the server: copy again once
    per recovery run while the server runs; otherwise say what is left and the ways out."""
    assert intent.server is not None
    (device, chains), *_ = intent.devices.items()
    if facts.server_alive and intent.error is None and intent.kind is OpKind.MIRROR:
        target = str(intent.add_nodes[device][-1]["node-name"])
        return Plan(
            verdict=None,
            actions=(RestartMirror(device, chains.before[0], target),),
            message=f"{what}: the copy stopped before the pivot; starting it again",
        )
    if facts.server_alive and intent.error is None:
        return Plan(
            verdict=None,
            actions=(RestartStream(device, chains.before[0]),),
            message=f"{what}: the copy stopped before the end; starting it again",
        )
    if intent.error is None and intent.server.repo:
        return Plan(
            verdict=None,
            actions=(ReplaceServer(device, chains.before[0]),),
            message=f"{what}: the backup's server is gone; starting a new one",
        )
    why = f"the copy failed: {intent.error}" if intent.error else "the copy stopped"
    if facts.server_alive:
        server = (
            f"the disk still reads the backup through its server (pid {intent.server.pid}), "
            "kept running; `blockctl recover` tries the copy again"
        )
    else:
        server = (
            f"the backup's server (pid {intent.server.pid}) is gone: the blocks not copied "
            "yet cannot be read (the guest gets I/O errors on them)"
        )
    return Plan(
        verdict=Verdict.ATTENTION,
        actions=(),
        forget=False,
        message=(
            f"{what}: {why}; {server}. Or give it up: detach the disk (`blockctl detach`), "
            "then `blockctl recover --forget` stops the server and deletes the copy's nodes; "
            "the backup point is unchanged"
        ),
    )


def _state(chain: Sequence[str], chains: DeviceChains) -> str:
    if tuple(chain) == chains.after:
        return "after"
    if tuple(chain) == chains.before:
        return "before"
    return "other"


def _unchanged(intent: Intent) -> str:
    if intent.kind is OpKind.COMMIT and intent.step.order >= Step.STARTING.order:
        return (
            "The chain is unchanged and reads as before; its base may already hold part of the "
            "committed data, so it is no longer a point in time of its own (qemu-facts F1/F2)."
        )
    return "The chain is unchanged and reads as before."


def _in_use(facts: Facts, deleting: Sequence[str]) -> set[str]:
    """Files some node keeps open, apart from the nodes about to be deleted."""
    gone = set(deleting)
    return {f for node, f in facts.files.items() if node not in gone}


def _rollback(intent: Intent, facts: Facts) -> tuple[Action, ...]:
    """Undo a snapshot's additions that are not in any chain."""
    in_chains = {n for chain in facts.chains.values() for n in chain}
    added = [str(o["node-name"]) for opts in intent.add_nodes.values() for o in reversed(opts)]
    stale = tuple(n for n in added if n in facts.nodes and n not in in_chains)
    actions: list[Action] = []
    if stale:
        actions.append(DeleteNodes(stale))
    used = _in_use(facts, stale)
    files = tuple(f for f in intent.created_files if f not in used)
    if files:
        actions.append(DeleteFiles(files))
    return tuple(actions)


def _diverged(intent: Intent, facts: Facts, what: str, note: str) -> Plan:
    seen = "; ".join(
        f"{d}: {' ← '.join(facts.chains.get(d, ())) or 'no chain'} (before: "
        f"{' ← '.join(c.before)}, expected after: {' ← '.join(c.after)})"
        for d, c in intent.devices.items()
    )
    extra = f" although {note}" if note else ""
    return Plan(
        verdict=Verdict.ATTENTION,
        actions=(),
        forget=False,
        message=(
            f"{what}: QEMU's graph is neither the state before nor the one expected after"
            f"{extra} ({seen}). Nothing was changed; check the chain (`blockctl chain`), then "
            "`blockctl recover VM --forget` drops this record"
        ),
    )


def _relinks(intent: Intent) -> tuple[Relink, ...]:
    """Stream and intermediate commit: once the job may have run, restore the backing link of
    the image above the dropped layers to the first of them (qemu-facts F1: those layers are
    only read by the job, so the old chain reads the same data, flushed or not)."""
    if intent.kind is OpKind.SNAPSHOT or intent.active or intent.server is not None:
        return ()  # (a live restore's backing is a server, not a file)
    if intent.step.order < Step.STARTING.order:
        return ()
    links = []
    for chains in intent.devices.values():
        files, fmts = chains.files_before, chains.formats_before
        dropped = [i for i, f in enumerate(files) if f not in chains.files_after]
        if not dropped or len(fmts) != len(files) or dropped[0] == 0:
            continue
        above = dropped[0] - 1
        links.append(Relink(files[above], fmts[above], files[above + 1], fmts[above + 1]))
    return tuple(links)


def _plan_gone(intent: Intent, what: str) -> Plan:
    """QEMU is gone: say which file is each device's top now, and what is not known."""
    tops: dict[str, str] = {}
    notes: list[str] = []
    took_effect = intent.step is Step.CONCLUDED
    for device, chains in intent.devices.items():
        if intent.kind is OpKind.SNAPSHOT:
            # Once the switch may have been sent, the overlay is the top either way: it holds
            # the writes made after it, or none and backs onto the old top.
            switched = intent.step.order >= Step.SWITCHING.order
            files = chains.files_after if switched else chains.files_before
        else:
            files = chains.files_after if took_effect else chains.files_before
        if files:
            tops[device] = files[0]
    if intent.kind is OpKind.SNAPSHOT and intent.step.order < Step.SWITCHING.order:
        notes.append("the overlays were never switched in; the created files are unused")
    elif intent.kind is OpKind.COMMIT and intent.active and intent.step is Step.READY:
        notes.append(
            "the commit was READY and blockctl was completing it: if the device had not "
            "switched yet, the top image is current (its chain is intact, used below); if it "
            "had, the base is, and writes after the switch are only there"
        )
    elif not took_effect and intent.step.order >= Step.STARTING.order:
        notes.append("the job was interrupted; the chain below reads as before")
        if intent.kind is OpKind.COMMIT:
            notes.append("the base may hold part of the committed data (not a point in time)")
    elif took_effect:
        notes.append("the job had finished; the dropped layers are no longer in the chain")
    if intent.server is not None:
        notes.append(_live_way_on(intent, intent.server, tops))
    relinks = _relinks(intent)
    if relinks:
        notes.append(
            "a finished stream or intermediate commit rewrites the backing link before QEMU "
            "flushes the copied data's metadata, so the image above the dropped layers is "
            "pointed back at them (they are unchanged by the job; nothing is lost either way): "
            + ", ".join(f"{Path(r.path).name} → {Path(r.backing).name}" for r in relinks)
        )
    chain_text = "; ".join(f"{d}: top {f}" for d, f in tops.items())
    stop = () if intent.server is None else (StopServer(intent.server),)
    return Plan(
        verdict=Verdict.QEMU_GONE,
        actions=(*relinks, *stop),
        tops=tops,
        message=(
            f"{what} was interrupted at step {intent.step.value}: QEMU is gone. "
            f"On disk: {chain_text}. {'; '.join(notes)}".rstrip()
        ),
    )


def _plan_never_started(intent: Intent, what: str) -> Plan:
    """A live launch's record written before QEMU's spawn, which still names the files the
    launch made (the spawn rewrites it without them), and no QEMU record: QEMU never ran,
    so nothing wrote to those files (an empty target, an overlay): they go, with the
    server."""
    assert intent.server is not None
    files = ", ".join(intent.created_files)
    return Plan(
        verdict=Verdict.QEMU_GONE,
        actions=(DeleteFiles(intent.created_files), StopServer(intent.server)),
        message=(
            f"{what}: the launch stopped before QEMU started; nothing ran on the files it "
            f"made ({files}): removed, with the backup's server; the backup point is unchanged"
        ),
    )


def _plan_never_attached(intent: Intent, facts: Facts, what: str) -> Plan:
    """A live restore's record written before its hot-plug (never rewritten once the disk was
    attached), and no device of it in QEMU, or one written before its server started (no
    device named; QEMU there or not): the guest never had the disk, so nothing wrote to the
    files made for it. The nodes the hot-plug had added so far, those files and the server
    go. A file that holds data all the same was written since it was made (the disk attached
    and then unplugged by another client before this recovery): it is kept, and said."""
    assert intent.server is not None
    present = tuple(n for n in intent.hotplug_nodes if n in facts.nodes)
    used = _in_use(facts, present)
    files = tuple(f for f in intent.created_files if f not in used)
    kept = tuple(f for f in files if f in facts.holding_data)
    files = tuple(f for f in files if f not in facts.holding_data)
    actions: list[Action] = []
    if present:
        actions.append(DeleteNodes(present))
    if files:
        actions.append(DeleteFiles(files))
    actions.append(StopServer(intent.server))
    removed = ", ".join((*present, *files)) or "none"
    if kept:
        return Plan(
            verdict=Verdict.ATTENTION,
            actions=tuple(actions),
            message=(
                f"{what}: not done, and not attached now, but {', '.join(kept)} holds data "
                "written since the restore made it (the disk was attached, then unplugged by "
                f"another client?): kept. Removed the rest ({removed}) and stopped the backup's "
                "server; the backup point is unchanged. Check what the kept file holds, "
                "then remove it and restore again"
            ),
        )
    return Plan(
        verdict=Verdict.NOT_DONE,
        actions=tuple(actions),
        message=(
            f"{what}: not done: the controller stopped before the disk was attached (the guest "
            f"never had it); removed what it had made ({removed})"
            " and stopped the backup's server; the backup point is unchanged. Run it again if "
            "still wanted"
        ),
    )


def _live_way_on(intent: Intent, server: ServerRecord, tops: Mapping[str, str]) -> str:
    """A live restore whose QEMU is gone: what the target holds and how to make it whole
    without losing the guest's writes (they are in it; restoring again would drop them)."""
    target = next(iter(tops.values()), "TARGET")
    base = f"{target}.base.raw"
    repo = f" --repo {server.repo}" if server.repo else ""
    source = (
        f"{server.source_vm or intent.vm} {server.point or 'POINT'} {server.device or 'DEVICE'}"
    )
    if intent.kind is OpKind.MIRROR:
        return _mirror_way_on(intent, source, repo)
    return (
        f"a live restore: {target} holds the guest's writes and the blocks copied so far, "
        "read over the backup's server (stopped now), whose place in the image is not "
        "written in it; the backup point is unchanged. To finish, keeping the guest's writes: "
        f"`blockctl restore {source} {base}{repo} -O raw`, "
        f"`qemu-img rebase -u -f qcow2 -F raw -b {base} {target}`, "
        f"`qemu-img rebase -f qcow2 -b '' {target}` (copies in the rest), then remove {base}: "
        f"{target} stands alone"
    )


def _mirror_way_on(intent: Intent, source: str, repo: str) -> str:
    """A live restore into a raw target whose QEMU is gone."""
    chains = next(iter(intent.devices.values()), None)
    overlay = chains.files_before[0] if chains and chains.files_before else "OVERLAY"
    target = chains.files_after[0] if chains and chains.files_after else "TARGET"
    if intent.step is Step.CONCLUDED:
        return (
            f"a live restore into a raw target: the device had pivoted onto {target}, which "
            f"holds the whole disk; the overlay {overlay} is no longer needed (remove it); "
            "the backup point is unchanged"
        )
    base = f"{overlay}.base.raw"
    # A LUN's or an NFS image's URL is the target's name to qemu-img too (its own initiator
    # or NFS client writes it); quoted, as an nfs URL may carry ?uid=U&gid=G. A CHAP LUN's
    # URL cannot carry the password: the target is given as options naming a secret object
    # that qemu-img reads from the password file.
    into = f"-O raw {overlay} {shlex.quote(target)}"
    added = next(iter(intent.add_nodes.values()), ())
    lun = added[0] if added else {}
    secret = str(lun.get("password-secret", ""))
    if lun.get("driver") == "iscsi" and secret in intent.secret_files:
        options = {
            "driver": "raw",
            **{f"file.{k}": v for k, v in lun.items() if k not in ("node-name", "cache")},
        }
        spec = ",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in options.items())
        password_file = intent.secret_files[secret].replace(",", ",,")
        obj = f"secret,id={secret},file={password_file},format=raw"
        into = f"--object {shlex.quote(obj)} --target-image-opts {overlay} {shlex.quote(spec)}"
    return (
        f"a live restore into a raw target: {overlay} holds the guest's writes, {target} only "
        "part of the copy; the backup point is unchanged. To finish, keeping the guest's "
        f"writes: `blockctl restore {source} {base}{repo} -O raw`, "
        f"`qemu-img rebase -u -f qcow2 -F raw -b {base} {overlay}`, "
        f"`qemu-img convert -n -f qcow2 {into}`, then remove "
        f"{overlay} and {base}: {target} stands alone"
    )


# Section: records for each operation


def _chains(before: Sequence[GraphNode], after: Sequence[GraphNode]) -> DeviceChains:
    return DeviceChains(
        before=tuple(n.name for n in before),
        after=tuple(n.name for n in after),
        files_before=tuple(str(n.filename) for n in before),
        files_after=tuple(str(n.filename) for n in after),
        formats_before=tuple(n.driver for n in before),
    )


def chain_intent(
    vm: str,
    kind: OpKind,
    device: str,
    graph: BlockGraph,
    *,
    top: int,
    base: int,
    delete_files: bool,
) -> Intent:
    """A commit (``chain[top]`` … above ``chain[base]`` merged into it) or a stream (the
    layers ``chain[1:base]`` merged into ``chain[0]``) of ``device``'s chain in ``graph``."""
    chain = graph.chain_of(device)
    if kind is OpKind.STREAM:
        dropped, after = chain[1:base], (chain[0], *chain[base:])
        into = Path(str(chain[0].filename)).name
    else:
        dropped, after = chain[top:base], (*chain[:top], *chain[base:])
        into = Path(str(chain[base].filename)).name
    names = ", ".join(Path(str(n.filename)).name for n in dropped)
    active = kind is OpKind.COMMIT and top == 0
    label = f"{'active ' if active else ''}{kind.value} of {names} into {into} on {device}"
    return Intent(
        id="",
        kind=kind,
        vm=vm,
        active=active,
        devices={device: _chains(chain, after)},
        drop_nodes=tuple(n for layer in dropped for n in graph.layer_nodes(layer)),
        drop_files=tuple(str(n.filename) for n in dropped if n.filename is not None),
        delete_files=delete_files,
        read_only_after=() if kind is OpKind.STREAM or active else ((device, chain[base].name),),
        what=label,
    )


def snapshot_intent(
    vm: str, tag: str, graph: BlockGraph, plans: Sequence[tuple[str, GraphNode, Path, str]]
) -> Intent:
    """An external snapshot: per device (device, old top, overlay file, new node name)."""
    devices: dict[str, DeviceChains] = {}
    add: dict[str, tuple[Json, ...]] = {}
    for device, top, overlay, name in plans:
        chain = graph.chain_of(device)
        before = _chains(chain, chain)
        devices[device] = replace(
            before,
            after=(name, *before.before),
            files_after=(str(overlay), *before.files_before),
        )
        add[device] = tuple(
            node_json(n) for n in overlay_options(name, str(overlay), backing=top.name)
        )
    return Intent(
        id="",
        kind=OpKind.SNAPSHOT,
        vm=vm,
        devices=devices,
        add_nodes=add,
        created_files=tuple(str(p[2]) for p in plans),
        what=f"external snapshot {tag} of {', '.join(devices)}",
    )
