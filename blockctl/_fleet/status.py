"""``blockctl fleet status``: every VM's last point, read from its repository, its running
backups and its last failed one (its child workflows, as Temporal has them), its state as its
host's worker lists it, and the fleet backups Temporal has (running, completed, failed), as
plain values and their JSON form. No
temporalio here: the worker module reads the workflows (the only place that connects), the
CLI renders the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from blockctl import backup
from blockctl._fleet.inventory import WORKFLOW_QUEUE, HostVMs, VMBackup, task_queue
from blockctl.errors import BlockctlError


def when(stamp: float | None) -> str:
    """A time as the fleet's messages give it (UTC: the server's and hosts' zones differ)."""
    if stamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def not_polling_host(host: str, last: float | None, why: str = "") -> HostVMs:
    """``host`` not asked for its VMs: its worker is not polling since ``last`` (the server's
    last poll of its queue; None: none on record), and ``why`` it is taken so."""
    if last is None:
        since = f"(the server has no poll of {task_queue(host)} on record"
    else:
        since = f"since {when(last)} ({task_queue(host)}"
    return HostVMs(
        host,
        error=f"worker not polling {since}{why}; is `blockctl fleet worker --host {host}` "
        "running?)",
        last_poll=last,
    )


def not_polling(
    hosts: list[str],
    last_poll: dict[str, float | None],
    workflows_last_poll: float | None,
    stopped: dict[str, float],
    now: float,
    *,
    live_poll: float,
    stop_margin: float,
) -> dict[str, HostVMs]:
    """The ``hosts`` not to ask for their VMs, each with why: its queue's last poll
    (``last_poll``) is none or older than ``live_poll`` s, or its worker said it stopped
    (``stopped``: when) and nothing polled more than ``stop_margin`` s after; every host,
    when the workflows' queue's last poll is none or older than ``live_poll`` s (nothing
    would run the question)."""
    answers: dict[str, HostVMs] = {}
    for h in hosts:
        last = last_poll.get(h)
        stop = stopped.get(h)
        if last is None or now - last > live_poll:
            answers[h] = not_polling_host(h, last)
        elif stop is not None and last <= stop + stop_margin:
            answers[h] = not_polling_host(h, last, f"; its worker stopped by {when(stop)}")
    asked = [h for h in hosts if h not in answers]
    if asked and (workflows_last_poll is None or now - workflows_last_poll > live_poll):
        why = (
            f"; no worker polls the workflows' queue {WORKFLOW_QUEUE} since "
            f"{when(workflows_last_poll)}"
        )
        answers.update({h: not_polling_host(h, last_poll.get(h), why) for h in asked})
    return answers


def question_wait(last_beat: float | None, now: float, *, wait: float, lost: float) -> float:
    """How long a host's worker has to take the fleet list's question: ``wait`` s, but not
    beyond the moment its worker's last heartbeat (``last_beat``, None: not listed) is
    ``lost`` s old, when it is taken as stopped unless it beat again meanwhile (a live
    worker beats every ``lost`` / 3 s: with ``lost`` - ``wait`` s at least one beat, a
    worker whose last beat is on time has the whole ``wait``); at least 1 s."""
    if last_beat is None:
        return wait
    return max(1.0, min(wait, last_beat + lost - now))


@dataclass(frozen=True, slots=True)
class LastPoint:
    id: str
    kind: str
    completed: float  # seconds since the epoch, as the manifest records it


@dataclass(frozen=True, slots=True)
class RunningBackup:
    """A VM's backup child workflow still open, and its backup activity as Temporal has it
    (``state`` SCHEDULED, STARTED, ...; none of these while the child has not scheduled it).
    ``last_failure``: the previous attempt's error (a worker taken for lost, ...)."""

    workflow_id: str
    started: float
    attempt: int | None = None
    state: str | None = None
    last_heartbeat: float | None = None
    last_failure: str | None = None


@dataclass(frozen=True, slots=True)
class LastFailure:
    """A VM's newest backup child workflow that did not complete (FAILED, TERMINATED, ...)."""

    workflow_id: str
    status: str
    closed: float | None
    error: str


@dataclass(frozen=True, slots=True)
class VMWork:
    """What Temporal has of one VM: its backups running and its last failed one, and the
    repository its newest backup was into."""

    repository: str
    running: list[RunningBackup] = field(default_factory=list)
    last_failure: LastFailure | None = None


@dataclass(frozen=True, slots=True)
class LastVerify:
    """A VM's result in the newest completed fleet verify that had it: the point checked
    (None: the VM had none), whether it was sound and its problems, or the error."""

    workflow_id: str
    closed: float | None
    point: str | None
    ok: bool
    problems: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LastPrune:
    """A VM's result in the newest completed fleet prune that had it: how many points it
    deleted and kept, or the error."""

    workflow_id: str
    closed: float | None
    deleted: int
    kept: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LastRestore:
    """A VM's result in the newest completed fleet restore that had it: the point restored
    (None: the VM had none) and its files, or the error."""

    workflow_id: str
    closed: float | None
    point: str | None
    files: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VMChecks:
    """A VM's last fleet verify, fleet prune and fleet restore (None: none among those
    looked at)."""

    verify: LastVerify | None = None
    prune: LastPrune | None = None
    restore: LastRestore | None = None


@dataclass(frozen=True, slots=True)
class VMStatus:
    """One VM and its repository's newest complete point (None: none; ``unreadable``: the
    repository could not be read, why; ``repository`` empty: none known, the VM listed by
    its worker and never backed up), its running backups and its last failed one, and its
    state as its host's worker listed it (running, dead; None: not asked, or not listed)."""

    host: str
    vm: str
    repository: str
    last: LastPoint | None
    running: list[RunningBackup] = field(default_factory=list)
    last_failure: LastFailure | None = None
    unreadable: str | None = None
    state: str | None = None
    checks: VMChecks = field(default_factory=VMChecks)


@dataclass(frozen=True, slots=True)
class VMFailure:
    host: str
    vm: str
    error: str


@dataclass(frozen=True, slots=True)
class RunStatus:
    """One fleet backup workflow run as Temporal reports it. ``status``: Temporal's name
    (RUNNING, COMPLETED, FAILED, TERMINATED, CANCELED, TIMED_OUT, ...). A completed run has
    its VM counts and failures (``backed_up``, ``failed``); a run that ended otherwise has
    ``error``; a running one has neither."""

    workflow_id: str
    run_id: str
    status: str
    started: float | None
    closed: float | None
    backed_up: int | None = None
    failed: list[VMFailure] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FleetStatus:
    vms: list[VMStatus]
    runs: list[RunStatus]  # newest first
    #: The hosts whose workers were asked for their VMs, with what they answered.
    hosts: list[HostVMs] = field(default_factory=list)


def vm_points(
    backups: list[VMBackup],
    work: dict[tuple[str, str], VMWork] | None = None,
    states: dict[tuple[str, str], str] | None = None,
) -> list[VMStatus]:
    """Each VM with its repository's newest complete point (by start), what ``work``
    (Temporal's) has of it and its state in ``states`` (its worker's listing). A repository
    that cannot be read is said so, VM by VM; a VM with no repository known has no point."""
    repositories: dict[str, backup.Repository | BlockctlError] = {}
    found = []
    for b in backups:
        state = (states or {}).get((b.host, b.vm))
        if not b.repository:
            known = (work or {}).get((b.host, b.vm), VMWork(""))
            found.append(
                VMStatus(b.host, b.vm, "", None, known.running, known.last_failure, state=state)
            )
            continue
        repo = repositories.get(b.repository)
        if repo is None:
            try:
                repo = backup.open_repository(b.repository)
            except BlockctlError as exc:
                repo = exc
            repositories[b.repository] = repo
        known = (work or {}).get((b.host, b.vm), VMWork(b.repository))
        if isinstance(repo, BlockctlError):
            found.append(
                VMStatus(b.host, b.vm, b.repository, None, known.running, known.last_failure,
                         unreadable=str(repo), state=state)
            )  # fmt: skip
            continue
        latest = repo.latest(b.vm)
        last = None if latest is None else LastPoint(latest.id, latest.kind, latest.completed)
        found.append(
            VMStatus(b.host, b.vm, b.repository, last, known.running, known.last_failure,
                     state=state)
        )  # fmt: skip
    return found


def with_checks(vms: list[VMStatus], checks: dict[tuple[str, str], VMChecks]) -> list[VMStatus]:
    """``vms``, each with its last fleet verify and prune from ``checks``."""
    return [replace(v, checks=checks.get((v.host, v.vm), VMChecks())) for v in vms]


def with_workers_vms(
    backups: list[VMBackup], hosts: list[HostVMs], repositories: dict[str, str] | None = None
) -> tuple[list[VMBackup], dict[tuple[str, str], str]]:
    """``backups`` and every VM the workers listed (``hosts``) that is not among them (into
    ``repositories``' repository of its host, else none known), by host then VM when
    ``backups`` came from the server; and each listed VM's state."""
    states = {(h.host, v.name): v.state for h in hosts for v in h.vms}
    named = {(b.host, b.vm) for b in backups}
    added = [
        VMBackup(host, vm, (repositories or {}).get(host, ""))
        for host, vm in sorted(states)
        if (host, vm) not in named
    ]
    return backups + added, states


def known_vms(work: dict[tuple[str, str], VMWork]) -> list[VMBackup]:
    """The VMs Temporal has backups of (by host, then VM), each with its newest backup's
    repository."""
    return [VMBackup(host, vm, work[host, vm].repository) for host, vm in sorted(work)]


def to_json(status: FleetStatus) -> dict[str, Any]:
    return {
        "vms": [
            {
                "host": v.host,
                "vm": v.vm,
                "repository": v.repository or None,
                "last_point": None
                if v.last is None
                else {"id": v.last.id, "kind": v.last.kind, "completed": v.last.completed},
                "unreadable": v.unreadable,
                "state": v.state,
                "running": [
                    {
                        "workflow_id": r.workflow_id,
                        "started": r.started,
                        "attempt": r.attempt,
                        "state": r.state,
                        "last_heartbeat": r.last_heartbeat,
                        "last_failure": r.last_failure,
                    }
                    for r in v.running
                ],
                "last_failure": None
                if v.last_failure is None
                else {
                    "workflow_id": v.last_failure.workflow_id,
                    "status": v.last_failure.status,
                    "closed": v.last_failure.closed,
                    "error": v.last_failure.error,
                },
                "last_verify": None
                if v.checks.verify is None
                else {
                    "workflow_id": v.checks.verify.workflow_id,
                    "closed": v.checks.verify.closed,
                    "point": v.checks.verify.point,
                    "ok": v.checks.verify.ok,
                    "problems": v.checks.verify.problems,
                    "error": v.checks.verify.error,
                },
                "last_prune": None
                if v.checks.prune is None
                else {
                    "workflow_id": v.checks.prune.workflow_id,
                    "closed": v.checks.prune.closed,
                    "deleted": v.checks.prune.deleted,
                    "kept": v.checks.prune.kept,
                    "error": v.checks.prune.error,
                },
                "last_restore": None
                if v.checks.restore is None
                else {
                    "workflow_id": v.checks.restore.workflow_id,
                    "closed": v.checks.restore.closed,
                    "point": v.checks.restore.point,
                    "files": v.checks.restore.files,
                    "error": v.checks.restore.error,
                },
            }
            for v in status.vms
        ],
        "runs": [
            {
                "workflow_id": r.workflow_id,
                "run_id": r.run_id,
                "status": r.status,
                "started": r.started,
                "closed": r.closed,
                "backed_up": r.backed_up,
                "failed": [{"host": f.host, "vm": f.vm, "error": f.error} for f in r.failed],
                "error": r.error,
            }
            for r in status.runs
        ],
        "hosts": [
            {
                "host": h.host,
                "vms": [{"name": v.name, "state": v.state, "pid": v.pid} for v in h.vms],
                "error": h.error,
                "last_poll": h.last_poll,
            }
            for h in status.hosts
        ],
    }


@dataclass(frozen=True, slots=True)
class ScheduledRun:
    """A fleet backup a schedule started: its workflow, when it was due and when it started."""

    workflow_id: str
    scheduled: float
    started: float


@dataclass(frozen=True, slots=True)
class ScheduleStatus:
    """A fleet backup schedule (``fleet schedule create``): its spec (``every`` seconds, or a
    ``cron`` line), the inventory it was made from and its VM count, its next runs and the
    recent runs it started (oldest first, as Temporal keeps them)."""

    name: str
    every: float | None
    cron: str | None
    inventory: str
    vms: int
    paused: bool
    next_runs: list[float] = field(default_factory=list)
    recent: list[ScheduledRun] = field(default_factory=list)


def schedules_to_json(schedules: list[ScheduleStatus]) -> dict[str, Any]:
    return {
        "schedules": [
            {
                "name": s.name,
                "every": s.every,
                "cron": s.cron,
                "inventory": s.inventory,
                "vms": s.vms,
                "paused": s.paused,
                "next_runs": s.next_runs,
                "recent": [
                    {"workflow_id": r.workflow_id, "scheduled": r.scheduled, "started": r.started}
                    for r in s.recent
                ],
            }
            for s in schedules
        ]
    }
