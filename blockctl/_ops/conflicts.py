"""Conflicting operations, refused by name before anything changes (issue 14).

Two commits on one disk, unplugging a disk under a running commit, stream or backup, an
external snapshot during a commit of the same chain: QEMU refuses some of these only after
blockctl has already changed something (a commit reopens its base read-write first, and
putting it back read-only under the other commit fails), and accepts others outright
(``device_del`` of a disk a commit is writing). So each of these operations first asks what
is running, from QEMU's state and the records of the clients driving it:

- ``query-jobs``: every job, whichever process started it;
- the operation journal: a commit, stream or snapshot names its devices and job there; a record
  whose writer still runs (:func:`blockctl._journal.owner_alive`) gives the owner's pid;
- a backup's fleecing nodes (``bcf…``, backed by the disk's top node) name its disks, and
  ``<run dir>/backup.lock`` (held while a backup runs) names its process;
- a job none of these explains (started by another tool, or by a controller that is gone) is
  taken to concern every disk.

:func:`running_operations` and :func:`find_conflict` are pure; :func:`claim` runs the check
under ``<run dir>/ops.lock`` so that two clients cannot both pass it before either has
recorded its operation. What QEMU itself refuses because a job holds a node is mapped to
:class:`~blockctl.errors.NodeBusy` at the QMP boundary.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from blockctl import _fsutil, _journal, _proc
from blockctl._ops.nodes import read_graph
from blockctl._qmp import wire
from blockctl._qmp.models import JOB_FINAL, JobInfo
from blockctl.errors import Conflict, OperationTimeout

if TYPE_CHECKING:
    from blockctl._graph import BlockGraph
    from blockctl._machine import VM

#: Held (flock) by a backup of the VM for its whole run; its content names the process.
BACKUP_LOCK = _journal.BACKUP_LOCK
#: Held only while a client checks for conflicts and records its operation.
OPS_LOCK = "ops.lock"
#: A backup's fleecing nodes: ``bcf<n>-<point>`` (see blockctl._backup.operations).
FLEECE_PREFIX = "bcf"

#: What each action cannot run beside. A snapshot under a backup is left to QEMU.
_BLOCKED_BY: Mapping[str, frozenset[str]] = {
    "commit": frozenset({"commit", "stream", "snapshot", "backup", "job"}),
    "stream": frozenset({"commit", "stream", "snapshot", "backup", "job"}),
    "snapshot": frozenset({"commit", "stream", "snapshot", "job"}),
    "unplug": frozenset({"commit", "stream", "snapshot", "backup", "job"}),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """One operation running on a VM, as far as it can be known."""

    kind: str  # commit, stream, snapshot, backup; "job" for one only QEMU knows of
    what: str  # "commit of B.qcow2 into A.qcow2 on disk0"
    devices: frozenset[str] | None  # None: unknown, taken to be every disk
    job_ids: tuple[str, ...] = ()
    pid: int | None = None  # the process driving it, when known and alive

    def describe(self) -> str:
        facts = []
        if self.job_ids:
            facts.append(f"job{'s' if len(self.job_ids) > 1 else ''} {', '.join(self.job_ids)}")
        facts.append(f"pid {self.pid}" if self.pid is not None else "no live client drives it")
        return f"{self.what} ({'; '.join(facts)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "what": self.what,
            "devices": None if self.devices is None else sorted(self.devices),
            "job_ids": list(self.job_ids),
            "pid": self.pid,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupOwner:
    """A backup holds the VM's backup lock: its process, alive."""

    pid: int
    operation: str = "backup"


def running_operations(
    *,
    records: Iterable[tuple[_journal.Intent, bool]],
    jobs: Sequence[JobInfo],
    fleeces: Mapping[str, str],
    backup: BackupOwner | None,
) -> list[Running]:
    """Everything running, from the journal's records (each with whether its writer still
    drives it), QEMU's jobs, the backup's fleecing nodes (node → the disk it fleeces) and the
    backup lock's owner. Pure."""
    active = [j for j in jobs if j.status not in JOB_FINAL]
    explained: set[str] = set()
    found: list[Running] = []
    for intent, alive in records:
        job_listed = intent.job_id is not None and any(j.id == intent.job_id for j in active)
        if not alive and not job_listed:
            continue  # an interrupted operation with no job: recovery's business, not running
        if intent.job_id is not None:
            explained.add(intent.job_id)
        found.append(
            Running(
                kind=intent.kind.value,
                what=intent.describe()
                + ("" if alive else ", left by a controller that is gone (`blockctl recover`)"),
                devices=frozenset(intent.devices),
                job_ids=(intent.job_id,) if intent.job_id else (),
                pid=intent.pid if alive else None,
            )
        )
    backup_jobs = tuple(
        j.id for j in active if j.type == "backup" and j.id.startswith("bc-backup-")
    )
    if backup is not None or fleeces or backup_jobs:
        explained.update(backup_jobs)
        disks = frozenset(fleeces.values()) if fleeces else None
        found.append(
            Running(
                kind="backup",
                what=f"a backup of {', '.join(sorted(disks)) if disks else 'the VM'}",
                devices=disks,
                job_ids=backup_jobs,
                pid=None if backup is None else backup.pid,
            )
        )
    for job in active:
        if job.id not in explained:
            found.append(
                Running(
                    kind="job",
                    what=f"a {job.type} job blockctl has no record of ({job.status.value})",
                    devices=None,
                    job_ids=(job.id,),
                )
            )
    return found


def find_conflict(
    action: str, devices: Iterable[str], running: Sequence[Running]
) -> tuple[Running, str | None] | None:
    """The first running operation ``action`` on ``devices`` cannot run beside, with the
    device they share (None: the running one's disks are unknown). Pure."""
    blocked_by = _BLOCKED_BY[action]
    wanted = list(devices)
    for op in running:
        if op.kind not in blocked_by:
            continue
        if op.devices is None:
            return op, None
        shared = [d for d in wanted if d in op.devices]
        if shared:
            return op, shared[0]
    return None


def refusal(
    vm: str, action: str, devices: Sequence[str], op: Running, device: str | None
) -> Conflict:
    """The error for ``action`` refused because of ``op``."""
    on = device or ", ".join(devices)
    ways = [f"wait for it to end (`blockctl jobs {vm}`)"]
    if op.job_ids:
        ways.append(f"cancel it (`blockctl jobs {vm} cancel {op.job_ids[0]}`)")
    return Conflict(
        f"{action} of {on} refused: {op.describe()} is running on "
        f"{device or 'this VM'}; nothing was changed. {' or '.join(ways).capitalize()}, then "
        "run it again",
        kind=op.kind,
        job_id=op.job_ids[0] if op.job_ids else None,
        device=device,
        pid=op.pid,
    )


# Section: reading the facts


def fleecing_nodes(graph: BlockGraph) -> dict[str, str]:
    """A backup's fleecing nodes → the disk each one fleeces (its backing node's device)."""
    found = {}
    for node in graph.nodes.values():
        if not node.name.startswith(FLEECE_PREFIX) or node.backing is None:
            continue
        device = graph.device_of(node.backing)
        if device is not None:
            found[node.name] = device.id
    return found


def write_backup_owner(fd: int, operation: str) -> None:
    """Name this process in the backup lock it holds (``fd``), so others can say who."""
    pid = os.getpid()
    data = json.dumps(
        {
            "pid": pid,
            "pid_start": _proc.process_start(pid),
            "operation": operation,
            "started": time.time(),
        }
    ).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def clear_backup_owner(fd: int) -> None:
    os.ftruncate(fd, 0)


def read_backup_owner(run_dir: Path | None) -> BackupOwner | None:
    """The live process named in the VM's backup lock; None if none (or it is gone)."""
    if run_dir is None:
        return None
    try:
        data = json.loads((run_dir / BACKUP_LOCK).read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        pid, start = int(data["pid"]), data.get("pid_start")
    except (KeyError, TypeError, ValueError):
        return None
    if not _proc.process_alive(pid, None if start is None else int(start)):
        return None
    return BackupOwner(pid=pid, operation=str(data.get("operation", "backup")))


async def running_on(vm: VM) -> list[Running]:
    """What runs on ``vm`` now (QEMU's jobs and graph, the journal, the backup lock)."""
    jobs = await wire.query_jobs(vm.session)
    graph = await read_graph(vm)
    records = [
        (item, _journal.owner_alive(item))
        for item in _journal.load_all(vm.run_dir)
        if isinstance(item, _journal.Intent)
    ]
    return running_operations(
        records=records,
        jobs=jobs,
        fleeces=fleecing_nodes(graph),
        backup=read_backup_owner(vm.run_dir),
    )


async def refuse_conflicts(vm: VM, action: str, devices: Sequence[str]) -> None:
    """:raise Conflict: something running on ``devices`` rules ``action`` out."""
    hit = find_conflict(action, devices, await running_on(vm))
    if hit is not None:
        raise refusal(vm.name, action, devices, *hit)


@contextlib.asynccontextmanager
async def claim(
    vm: VM, action: str, devices: Sequence[str], *, timeout: float = 30.0
) -> AsyncIterator[None]:
    """Check for conflicts, and keep other clients from checking until the block ends (the
    block records the operation: its journal record, or its ``device_del``).

    :raise Conflict: see :func:`refuse_conflicts`.
    """
    if vm.run_dir is None:  # a QEMU blockctl did not start: no shared directory to lock in
        await refuse_conflicts(vm, action, devices)
        yield
        return
    async with contextlib.AsyncExitStack() as lock:
        with anyio.move_on_after(timeout) as scope:
            # Held for a check and one write: milliseconds. Created 0600 whatever the umask
            # (see "Private by construction").
            await lock.enter_async_context(
                _fsutil.flocked_polling(vm.run_dir / OPS_LOCK, poll=0.02, create=True)
            )
        if scope.cancelled_caught:
            raise OperationTimeout(
                f"the conflict check of {action} on {', '.join(devices)}",
                timeout,
                f"another client held {vm.run_dir / OPS_LOCK} all that time",
            )
        await refuse_conflicts(vm, action, devices)
        yield
