"""``blockctl fleet status``: every VM's last point, read from its repository, and the fleet
backups Temporal has (running, completed, failed), as plain values and their JSON form. No
temporalio here: the worker module reads the workflows (the only place that connects), the
CLI renders the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blockctl import backup
from blockctl._fleet.inventory import FleetBackupRequest


@dataclass(frozen=True, slots=True)
class LastPoint:
    id: str
    kind: str
    completed: float  # seconds since the epoch, as the manifest records it


@dataclass(frozen=True, slots=True)
class VMStatus:
    """One VM of the inventory and its repository's newest complete point (None: none)."""

    host: str
    vm: str
    repository: str
    last: LastPoint | None


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


def vm_points(request: FleetBackupRequest) -> list[VMStatus]:
    """Each VM of the inventory with its repository's newest complete point (by start)."""
    repositories: dict[str, backup.Repository] = {}
    found = []
    for b in request.backups:
        repo = repositories.get(b.repository)
        if repo is None:
            repo = repositories[b.repository] = backup.open_repository(b.repository)
        latest = repo.latest(b.vm)
        last = None if latest is None else LastPoint(latest.id, latest.kind, latest.completed)
        found.append(VMStatus(b.host, b.vm, b.repository, last))
    return found


def to_json(status: FleetStatus) -> dict[str, Any]:
    return {
        "vms": [
            {
                "host": v.host,
                "vm": v.vm,
                "repository": v.repository,
                "last_point": None
                if v.last is None
                else {"id": v.last.id, "kind": v.last.kind, "completed": v.last.completed},
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
    }
