"""The fleet's workflows: deterministic code that routes work to hosts' task queues and
collects what comes back. They run in Temporal's sandbox: no I/O, activities named by string.

A fleet backup (``blockctl.fleet-backup``) starts one child workflow per VM
(``blockctl.vm-backup``, id ``FLEET-ID/backup/HOST/VM``), as many at once as its limits per
host and per repository allow, in the inventory's order. A child runs that VM's backup
activity on its host's queue; a VM whose backup failed fails its child (its error is there,
in Temporal, for ``fleet status``), and the parent records that error in the VM's result and
goes on with the others.

A fleet verify (``blockctl.fleet-verify``) and a fleet prune (``blockctl.fleet-prune``) run
their activities straight from the one workflow (no child per VM: nothing of theirs needs a
VM's own history), on each VM's host's queue: first ``blockctl.points`` (the VM's points, so
the plan is in the history: the point a verify checks, the points a prune started from),
then ``blockctl.verify`` of the newest or ``blockctl.prune``. Prunes run one at a time per
repository (each collects the repository's unreferenced chunks under its exclusive lock).
A fleet restore (``blockctl.fleet-restore``) runs the same way: ``blockctl.points``, then
``blockctl.restore`` of the point asked for (the newest when none is) into new files on the
VM's host.
A fleet snapshot (``blockctl.fleet-snapshot``) and a fleet commit (``blockctl.fleet-commit``)
run ``blockctl.snapshot`` or ``blockctl.commit`` of each VM on its host's queue, keyed by the
snapshot's tag: a retry finds in the chain what an earlier attempt did.
A fleet attach (``blockctl.fleet-attach``) and a fleet detach (``blockctl.fleet-detach``)
run ``blockctl.attach`` or ``blockctl.detach`` of one device of one VM on its host's queue,
keyed by the device's id (fixed before the first attempt): a retry finds the device an
earlier attempt added, or finds it gone.
A fleet list (``blockctl.fleet-list``) asks each named host's worker for its VMs.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Protocol

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    TimeoutError,
    TimeoutType,
)

with workflow.unsafe.imports_passed_through():
    from blockctl._fleet.inventory import (
        NO_TAKER,
        FleetBackupRequest,
        FleetBackupResult,
        FleetChainRequest,
        FleetChainResult,
        FleetPruneRequest,
        FleetPruneResult,
        FleetRestoreRequest,
        FleetRestoreResult,
        FleetVerifyRequest,
        FleetVerifyResult,
        HostVMs,
        ListRequest,
        ListResult,
        VMAttach,
        VMBackup,
        VMBackupRequest,
        VMBackupResult,
        VMChain,
        VMChainResult,
        VMDetach,
        VMPlugResult,
        VMPoints,
        VMPrune,
        VMPruneResult,
        VMRestore,
        VMRestoreResult,
        VMVerify,
        VMVerifyResult,
        task_queue,
        vm_workflow_id,
    )

#: The backup activity's name (blockctl._fleet.activities.BACKUP_VM: not imported here, the
#: sandbox would re-import the library behind it).
BACKUP_VM = "blockctl.backup"
POINTS = "blockctl.points"
VERIFY_VM = "blockctl.verify"
PRUNE_VM = "blockctl.prune"
RESTORE_VM = "blockctl.restore"
SNAPSHOT_VM = "blockctl.snapshot"
COMMIT_VM = "blockctl.commit"
LIST_VMS = "blockctl.list-vms"
ATTACH_VM = "blockctl.attach"
DETACH_VM = "blockctl.detach"
FLEET_ATTACH = "blockctl.fleet-attach"
FLEET_DETACH = "blockctl.fleet-detach"
#: A hot-plug is a few QMP commands; an unplug waits for the guest (its own timeout).
PLUG_TIMEOUT = timedelta(minutes=10)
FLEET_BACKUP = "blockctl.fleet-backup"
VM_BACKUP = "blockctl.vm-backup"
FLEET_VERIFY = "blockctl.fleet-verify"
FLEET_PRUNE = "blockctl.fleet-prune"
FLEET_RESTORE = "blockctl.fleet-restore"
FLEET_SNAPSHOT = "blockctl.fleet-snapshot"
FLEET_COMMIT = "blockctl.fleet-commit"
#: A snapshot's transaction is quick; a commit copies the overlay's data into its base.
CHAIN_TIMEOUT = timedelta(hours=1)
FLEET_LIST = "blockctl.fleet-list"
#: A backup is retried when its worker is lost (no heartbeat within the request's heartbeat
#: timeout: killed, its host down) or the VM's backup lock is still held by an attempt taken
#: for lost; the activity marks every other error final. A retry is safe: the activity's
#: request id makes it return the point an earlier attempt recorded (activities.py).
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)
BACKUP_TIMEOUT = timedelta(hours=1)  # as blockctl's own default deadline for a backup
#: A verify reads every chunk of a point; a prune's collection reads every index.
REPOSITORY_TIMEOUT = timedelta(hours=1)
#: Listing a runtime directory's records: a worker that took the task answers at once.
LIST_TIMEOUT = timedelta(seconds=60)
#: A VM's failure type: its child workflow fails with it (never retried: the activity
#: already was, as far as a retry could help).
VM_BACKUP_FAILED = "VMBackupFailed"


@workflow.defn(name=VM_BACKUP)
class VMBackupWorkflow:
    """One VM's backup: its activity on its host's queue. Fails (non-retryable) with the
    activity's error when the backup failed."""

    @workflow.run
    async def run(self, request: VMBackupRequest) -> VMBackupResult:
        b = request.backup
        try:
            result: VMBackupResult = await workflow.execute_activity(
                BACKUP_VM,
                b,
                result_type=VMBackupResult,
                task_queue=task_queue(b.host),
                activity_id=f"backup/{b.host}/{b.vm}",
                start_to_close_timeout=BACKUP_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=request.heartbeat_timeout),
                retry_policy=RETRY,
            )
        except ActivityError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise ApplicationError(str(cause), type=VM_BACKUP_FAILED, non_retryable=True) from None
        return result


class _Placed(Protocol):
    """Work on one host and into one repository (a VM's backup, verify, prune)."""

    @property
    def host(self) -> str: ...
    @property
    def repository(self) -> str: ...


class _Slots:
    """Which VMs' backups may start: at most ``per_host`` at once on one host and
    ``per_repository`` into one repository (0: no limit), in the request's order. Admitting
    is synchronous (no await between the check and the count), so the limits hold whatever
    order the workflow's tasks wake in."""

    def __init__(self, per_host: int, per_repository: int) -> None:
        self.per_host = per_host
        self.per_repository = per_repository
        self.hosts: dict[str, int] = {}
        self.repositories: dict[str, int] = {}
        self.waiting: list[tuple[_Placed, asyncio.Future[None]]] = []

    def _fits(self, b: _Placed) -> bool:
        return (not self.per_host or self.hosts.get(b.host, 0) < self.per_host) and (
            not self.per_repository or self.repositories.get(b.repository, 0) < self.per_repository
        )

    def _admit(self) -> None:
        for entry in list(self.waiting):
            b, admitted = entry
            if admitted.done():  # its wait was cancelled (the fleet run cancelled)
                self.waiting.remove(entry)
            elif self._fits(b):
                self.hosts[b.host] = self.hosts.get(b.host, 0) + 1
                self.repositories[b.repository] = self.repositories.get(b.repository, 0) + 1
                self.waiting.remove(entry)
                admitted.set_result(None)

    async def acquire(self, b: _Placed) -> None:
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((b, admitted))
        self._admit()
        await admitted

    def release(self, b: _Placed) -> None:
        self.hosts[b.host] -= 1
        self.repositories[b.repository] -= 1
        self._admit()


@workflow.defn(name=FLEET_BACKUP)
class FleetBackup:
    """Every VM of the request backed up in its own child workflow, each on its own host's
    queue, within the request's limits; one result per VM, in the request's order (a failed
    VM has its error, the others their point)."""

    @workflow.run
    async def run(self, request: FleetBackupRequest) -> FleetBackupResult:
        slots = _Slots(request.per_host, request.per_repository)
        results = await asyncio.gather(
            *(self._backup(b, request.heartbeat_timeout, slots) for b in request.backups)
        )
        return FleetBackupResult(list(results))

    async def _backup(self, b: VMBackup, heartbeat: float, slots: _Slots) -> VMBackupResult:
        await slots.acquire(b)
        try:
            result: VMBackupResult = await workflow.execute_child_workflow(
                VM_BACKUP,
                VMBackupRequest(b, heartbeat),
                result_type=VMBackupResult,
                id=vm_workflow_id(workflow.info().workflow_id, b.host, b.vm),
                # On its host's queue: the host's worker runs the child's workflow tasks,
                # and its activity (same queue) is handed over eagerly, with the task's
                # completion, not after another poll.
                task_queue=task_queue(b.host),
                memo={"host": b.host, "vm": b.vm, "repository": b.repository},
            )
        except ChildWorkflowError as exc:
            cause = exc.cause if exc.cause is not None else exc
            return VMBackupResult(host=b.host, vm=b.vm, repository=b.repository, error=str(cause))
        finally:
            slots.release(b)
        return result


def _error(exc: ActivityError) -> str:
    cause = exc.cause if exc.cause is not None else exc
    return str(cause)


async def _points(v: VMVerify, heartbeat: float) -> VMPoints:
    """The VM's points as its host's worker reads them, recorded in the workflow's history."""
    points: VMPoints = await workflow.execute_activity(
        POINTS,
        v,
        result_type=VMPoints,
        task_queue=task_queue(v.host),
        activity_id=f"points/{v.host}/{v.vm}",
        start_to_close_timeout=REPOSITORY_TIMEOUT,
        heartbeat_timeout=timedelta(seconds=heartbeat),
        retry_policy=RETRY,
    )
    return points


@workflow.defn(name=FLEET_VERIFY)
class FleetVerify:
    """Each VM's newest point verified by its host's worker, at most ``per_host`` at once on
    one host; one result per VM in the request's order (no point: ``point`` None; a failed
    verify: its error)."""

    @workflow.run
    async def run(self, request: FleetVerifyRequest) -> FleetVerifyResult:
        slots = _Slots(request.per_host, 0)
        results = await asyncio.gather(
            *(self._verify(v, request.heartbeat_timeout, slots) for v in request.vms)
        )
        return FleetVerifyResult(list(results))

    async def _verify(self, v: VMVerify, heartbeat: float, slots: _Slots) -> VMVerifyResult:
        await slots.acquire(v)
        try:
            points = await _points(v, heartbeat)
            if not points.points:
                return VMVerifyResult(v.host, v.vm, v.repository)
            result: VMVerifyResult = await workflow.execute_activity(
                VERIFY_VM,
                args=[v, points.points[-1]],
                result_type=VMVerifyResult,
                task_queue=task_queue(v.host),
                activity_id=f"verify/{v.host}/{v.vm}",
                start_to_close_timeout=REPOSITORY_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=heartbeat),
                retry_policy=RETRY,
            )
        except ActivityError as exc:
            return VMVerifyResult(v.host, v.vm, v.repository, error=_error(exc))
        finally:
            slots.release(v)
        return result


@workflow.defn(name=FLEET_PRUNE)
class FleetPrune:
    """Each VM pruned to its newest ``keep_last`` points by its host's worker, one prune at a
    time per repository; one result per VM in the request's order."""

    @workflow.run
    async def run(self, request: FleetPruneRequest) -> FleetPruneResult:
        slots = _Slots(0, 1)
        results = await asyncio.gather(
            *(self._prune(p, request.heartbeat_timeout, slots) for p in request.vms)
        )
        return FleetPruneResult(list(results))

    async def _prune(self, p: VMPrune, heartbeat: float, slots: _Slots) -> VMPruneResult:
        await slots.acquire(p)
        try:
            points = await _points(VMVerify(p.host, p.vm, p.repository), heartbeat)
            result: VMPruneResult = await workflow.execute_activity(
                PRUNE_VM,
                args=[p, points.points],
                result_type=VMPruneResult,
                task_queue=task_queue(p.host),
                activity_id=f"prune/{p.host}/{p.vm}",
                start_to_close_timeout=REPOSITORY_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=heartbeat),
                retry_policy=RETRY,
            )
        except ActivityError as exc:
            return VMPruneResult(p.host, p.vm, p.repository, error=_error(exc))
        finally:
            slots.release(p)
        return result


@workflow.defn(name=FLEET_RESTORE)
class FleetRestore:
    """Each VM's point (its newest, or the one named) restored by its host's worker into new
    files there, at most ``per_host`` at once on one host; one result per VM in the
    request's order (no point: ``point`` None; the named point missing, or a failed
    restore: its error)."""

    @workflow.run
    async def run(self, request: FleetRestoreRequest) -> FleetRestoreResult:
        slots = _Slots(request.per_host, 0)
        results = await asyncio.gather(
            *(self._restore(r, request.heartbeat_timeout, slots) for r in request.vms)
        )
        return FleetRestoreResult(list(results))

    async def _restore(self, r: VMRestore, heartbeat: float, slots: _Slots) -> VMRestoreResult:
        await slots.acquire(r)
        try:
            points = await _points(VMVerify(r.host, r.vm, r.repository), heartbeat)
            if r.point is None and not points.points:
                return VMRestoreResult(r.host, r.vm, r.repository)
            point = points.points[-1] if r.point is None else r.point
            if point not in points.points:
                return VMRestoreResult(
                    r.host,
                    r.vm,
                    r.repository,
                    error=f"no complete point {point} of {r.vm} in {r.repository}",
                )
            result: VMRestoreResult = await workflow.execute_activity(
                RESTORE_VM,
                args=[r, point],
                result_type=VMRestoreResult,
                task_queue=task_queue(r.host),
                activity_id=f"restore/{r.host}/{r.vm}",
                start_to_close_timeout=REPOSITORY_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=heartbeat),
                retry_policy=RETRY,
            )
        except ActivityError as exc:
            return VMRestoreResult(r.host, r.vm, r.repository, error=_error(exc))
        finally:
            slots.release(r)
        return result


class _Chained:
    """A VM's chain work is placed on its host only (``_Slots`` counts repositories too)."""

    def __init__(self, c: VMChain) -> None:
        self.host = c.host
        self.repository = ""


async def _chain(activity_name: str, c: VMChain, heartbeat: float, slots: _Slots) -> VMChainResult:
    """One VM's snapshot or commit on its host's queue."""
    placed = _Chained(c)
    await slots.acquire(placed)
    try:
        result: VMChainResult = await workflow.execute_activity(
            activity_name,
            c,
            result_type=VMChainResult,
            task_queue=task_queue(c.host),
            activity_id=f"{activity_name.removeprefix('blockctl.')}/{c.host}/{c.vm}",
            start_to_close_timeout=CHAIN_TIMEOUT,
            heartbeat_timeout=timedelta(seconds=heartbeat),
            retry_policy=RETRY,
        )
    except ActivityError as exc:
        return VMChainResult(c.host, c.vm, c.tag, error=_error(exc))
    finally:
        slots.release(placed)
    return result


@workflow.defn(name=FLEET_SNAPSHOT)
class FleetSnapshot:
    """Each VM's external snapshot ``tag`` taken by its host's worker, at most ``per_host``
    at once on one host; one result per VM in the request's order."""

    @workflow.run
    async def run(self, request: FleetChainRequest) -> FleetChainResult:
        slots = _Slots(request.per_host, 0)
        results = await asyncio.gather(
            *(_chain(SNAPSHOT_VM, c, request.heartbeat_timeout, slots) for c in request.vms)
        )
        return FleetChainResult(list(results))


@workflow.defn(name=FLEET_COMMIT)
class FleetCommit:
    """Each VM's external snapshot ``tag`` committed back by its host's worker, at most
    ``per_host`` at once on one host; one result per VM in the request's order."""

    @workflow.run
    async def run(self, request: FleetChainRequest) -> FleetChainResult:
        slots = _Slots(request.per_host, 0)
        results = await asyncio.gather(
            *(_chain(COMMIT_VM, c, request.heartbeat_timeout, slots) for c in request.vms)
        )
        return FleetChainResult(list(results))


async def _plug(activity_name: str, request: VMAttach | VMDetach, activity_id: str) -> VMPlugResult:
    """One device's attach or detach on its VM's host's queue; a failure is the result's
    error."""
    try:
        result: VMPlugResult = await workflow.execute_activity(
            activity_name,
            request,
            result_type=VMPlugResult,
            task_queue=task_queue(request.host),
            activity_id=activity_id,
            start_to_close_timeout=PLUG_TIMEOUT,
            heartbeat_timeout=timedelta(seconds=request.heartbeat_timeout),
            retry_policy=RETRY,
        )
    except ActivityError as exc:
        return VMPlugResult(request.host, request.vm, request.device_id, error=_error(exc))
    return result


@workflow.defn(name=FLEET_ATTACH)
class FleetAttach:
    """Image ``file`` hot-plugged into one VM as device ``device_id`` by its host's worker."""

    @workflow.run
    async def run(self, request: VMAttach) -> VMPlugResult:
        return await _plug(
            ATTACH_VM, request, f"attach/{request.host}/{request.vm}/{request.device_id}"
        )


@workflow.defn(name=FLEET_DETACH)
class FleetDetach:
    """Device ``device_id`` unplugged from one VM by its host's worker."""

    @workflow.run
    async def run(self, request: VMDetach) -> VMPlugResult:
        return await _plug(
            DETACH_VM, request, f"detach/{request.host}/{request.vm}/{request.device_id}"
        )


@workflow.defn(name=FLEET_LIST)
class FleetList:
    """Each host's VMs, from its worker; a host whose worker does not take the question
    within ``request.wait`` seconds (none polls its queue) has that said as its error."""

    @workflow.run
    async def run(self, request: ListRequest) -> ListResult:
        hosts = await asyncio.gather(
            *(self._list(h, request.waits.get(h, request.wait)) for h in request.hosts)
        )
        return ListResult(list(hosts))

    async def _list(self, host: str, wait: float) -> HostVMs:
        try:
            found: HostVMs = await workflow.execute_activity(
                LIST_VMS,
                host,
                result_type=HostVMs,
                task_queue=task_queue(host),
                activity_id=f"list/{host}",
                schedule_to_start_timeout=timedelta(seconds=wait),
                start_to_close_timeout=LIST_TIMEOUT,
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        except ActivityError as exc:
            cause = exc.cause
            if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
                return HostVMs(
                    host,
                    error=f"{NO_TAKER} {wait:.3g} s (is `blockctl fleet "
                    f"worker --host {host}` running?)",
                )
            return HostVMs(host, error=_error(exc))
        return found
