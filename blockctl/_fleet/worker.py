"""A host's worker and the fleet's client calls: the only place that connects to Temporal."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, timedelta
from typing import Any, TypeVar

import anyio
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import (
    PendingActivityState,
    PendingWorkflowTaskState,
    TaskQueueType,
    WorkerStatus,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    GetWorkflowExecutionHistoryRequest,
    ListWorkersRequest,
)
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleDescription,
    ScheduleIntervalSpec,
    ScheduleListActionStartWorkflow,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.runtime import Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from blockctl._fleet.activities import (
    attach_vm,
    backup_vm,
    commit_vm,
    detach_vm,
    list_vms,
    prune_vm,
    restore_vm,
    snapshot_vm,
    verify_vm,
    vm_points,
)
from blockctl._fleet.inventory import (
    NO_TAKER,
    WORKFLOW_QUEUE,
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
    VMBackupResult,
    VMDetach,
    VMPlugResult,
    check_host,
    plug_workflow_id,
    split_vm_workflow_id,
    task_queue,
    with_listed,
)
from blockctl._fleet.status import (
    LastFailure,
    LastPrune,
    LastRestore,
    LastVerify,
    RunningBackup,
    RunStatus,
    ScheduledRun,
    ScheduleStatus,
    VMChecks,
    VMFailure,
    VMWork,
    not_polling,
    not_polling_host,
    question_wait,
    when,
)
from blockctl._fleet.workflows import (
    FLEET_BACKUP,
    FLEET_PRUNE,
    FLEET_VERIFY,
    FleetAttach,
    FleetBackup,
    FleetCommit,
    FleetDetach,
    FleetList,
    FleetPrune,
    FleetRestore,
    FleetSnapshot,
    FleetVerify,
    VMBackupWorkflow,
)
from blockctl.errors import BlockctlError

DEFAULT_ADDRESS = "127.0.0.1:7233"
#: A worker's identity starts with this and its host's name (then its PID and machine).
IDENTITY_PREFIX = "blockctl-worker:"
DEFAULT_NAMESPACE = "default"
#: How long in all ``fleet_backup`` keeps waiting for a workflow's result while the server
#: does not answer (restarted, its host rebooting): the SDK's own retries give up after 10 s.
RECONNECT_WINDOW = 600.0
#: How long a fleet list may run beyond its hosts' wait before it is given up (no worker
#: polls the workflows' queue: nothing runs it).
LIST_RUN_TIMEOUT = 10.0
#: A queue the server has not seen polled for longer than this has no live worker: a live
#: worker polls again as soon as a long poll returns, and the server answers an idle long
#: poll empty within a minute (measured: a worker's last poll is at most ~55 s old).
LIVE_POLL = 90.0
#: How long a workflow's next task waits on the queue of the worker that ran its last one
#: (its cached state, "sticky") before any worker takes it and replays the history. The
#: SDK's default is 10 s, all of it lost when that worker was killed: measured, a fleet
#: activity retried after its worker's kill -9 took ~17 s from the kill (5 s heartbeat
#: timeout, 1 s retry interval, then 10 s for the workflow's next task). Replaying one
#: fleet workflow's history is cheap (tens of events), a sticky task waits under a second on
#: a busy worker (README "Fleet"): 2 s.
STICKY_TIMEOUT = timedelta(seconds=2)
#: How long a fleet list may wait for a worker to take its workflow before the server's
#: last poll of the workflows' queue is looked at (a live worker's waiting poll takes it
#: at once; ``list_hosts_vms``).
PICKUP_WAIT = 3.0
#: A worker stopping ends its waiting polls just after its final heartbeat (measured: ms
#: apart): a poll later than this after that heartbeat is a worker started since.
STOP_POLL_MARGIN = 5.0
#: A poller the server saw longer ago than this is taken as gone (a live worker polls again
#: at least every minute: a long poll returns empty after 60 s).
POLLER_FRESH = 120.0
#: How often a worker tells the server it is alive (the SDK's worker heartbeat, listed by
#: ListWorkers). A worker killed -9 sends no final heartbeat: its last one ages, and once
#: older than ``WORKER_BEAT_LOST`` its host is taken as stopped then (``_stopped_workers``),
#: not asked (asked, a host with no worker costs the fleet list its 10 s wait).
WORKER_BEAT = timedelta(seconds=5)
WORKER_BEAT_LOST = 3 * WORKER_BEAT.total_seconds()
#: The codes of a server that is not there (yet): its restart, a lost connection.
_UNREACHABLE = {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED}


class FleetError(BlockctlError):
    """The Temporal server could not be reached, or refused a call."""


async def connect(
    address: str, namespace: str = DEFAULT_NAMESPACE, runtime: Runtime | None = None
) -> Client:
    try:
        return await Client.connect(address, namespace=namespace, runtime=runtime)
    except (RuntimeError, RPCError) as exc:
        raise FleetError(f"cannot connect to Temporal at {address}: {exc}") from None


async def run_worker(
    host: str,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Poll ``blockctl@HOST`` (this host's activities) and the fleet's workflow queue until
    cancelled; then stop polling and let the running activities finish."""
    # Its own runtime: worker heartbeats every WORKER_BEAT (the SDK's default is 60 s).
    runtime = Runtime(telemetry=TelemetryConfig(), worker_heartbeat_interval=WORKER_BEAT)
    client = await connect(address, namespace, runtime)
    # The workflows import only the inventory's values from blockctl: let them through.
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("blockctl")
    )
    # The identity names the host: ``worker_hosts`` finds the hosts whose workers poll.
    identity = f"{IDENTITY_PREFIX}{check_host(host)} {os.getpid()}@{socket.gethostname()}"
    workers = [
        Worker(
            client,
            task_queue=task_queue(host),
            activities=[
                backup_vm,
                vm_points,
                verify_vm,
                prune_vm,
                restore_vm,
                snapshot_vm,
                commit_vm,
                attach_vm,
                detach_vm,
                list_vms,
            ],
            # Each VM's backup workflow runs on its host's queue (FleetBackup).
            workflows=[VMBackupWorkflow],
            workflow_runner=runner,
            identity=identity,
            sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
        ),
        Worker(
            client,
            task_queue=WORKFLOW_QUEUE,
            workflows=[
                FleetBackup,
                VMBackupWorkflow,
                FleetVerify,
                FleetPrune,
                FleetRestore,
                FleetSnapshot,
                FleetCommit,
                FleetAttach,
                FleetDetach,
                FleetList,
            ],
            workflow_runner=runner,
            identity=identity,
            sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
        ),
    ]
    # Plain asyncio tasks, outside anyio's cancel scopes: anyio cancels every await of a
    # cancelled scope again, which would cut the workers' own shutdown short and leave tasks
    # that the event loop's close then waits on for ever.
    runs = [asyncio.ensure_future(w.run()) for w in workers]
    try:
        if on_ready is not None:
            on_ready()
        # Until cancelled (Ctrl-C), or a worker stops by itself (its error is raised below).
        await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
    finally:
        with anyio.CancelScope(shield=True):
            for w, run in zip(workers, runs, strict=True):
                if not run.done():
                    await w.shutdown()
            ended = await asyncio.gather(*runs, return_exceptions=True)
    for outcome in ended:
        if isinstance(outcome, BaseException):
            raise FleetError(f"the worker of {host} stopped: {outcome}") from outcome
    raise FleetError(f"the worker of {host} stopped")


async def fleet_backup(
    request: FleetBackupRequest,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    workflow_id: str | None = None,
) -> FleetBackupResult:
    """Run the fleet backup workflow over ``request`` and wait for its result, through a
    restart of the server: its state is in its database, the workflow goes on, and so does
    the wait (the SDK reconnects; a call that fails with the server unreachable is made again
    for up to ``RECONNECT_WINDOW`` s in all). Hosts ``request`` names without VMs are asked
    for theirs first (``with_listed``)."""
    if request.listed:
        found = await list_hosts_vms([h.host for h in request.listed], address, namespace)
        request = with_listed(request, found)
    return await _run_workflow(
        FleetBackup.run,
        request,
        FleetBackupResult,
        workflow_id or f"fleet-backup-{uuid.uuid4()}",
        "the fleet backup",
        address,
        namespace,
    )


_Result = TypeVar("_Result")


async def _run_workflow(
    run: Any,
    request: object,
    result_type: type[_Result],
    workflow_id: str,
    what: str,
    address: str,
    namespace: str,
    execution_timeout: timedelta | None = None,
    join_running: bool = False,
) -> _Result:
    """Start workflow ``run`` on ``request`` and wait for its result, through a restart of
    the server (``fleet_backup``); ``execution_timeout``: the workflow's, if any;
    ``join_running``: a run of ``workflow_id`` still running is waited for, not refused."""
    client = await connect(address, namespace)
    try:
        handle = await client.start_workflow(
            run,
            request,
            id=workflow_id,
            task_queue=WORKFLOW_QUEUE,
            result_type=result_type,
            execution_timeout=execution_timeout,
            id_conflict_policy=(
                WorkflowIDConflictPolicy.USE_EXISTING
                if join_running
                else WorkflowIDConflictPolicy.FAIL
            ),
        )
        unreachable_since: float | None = None
        while True:
            try:
                result: _Result = await handle.result()
                return result
            except RPCError as exc:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if exc.status not in _UNREACHABLE or now - unreachable_since > RECONNECT_WINDOW:
                    raise
                await asyncio.sleep(1.0)  # the server restarting: wait for it, not poll hot
    except (RPCError, WorkflowFailureError) as exc:
        cause = getattr(exc, "cause", None) or exc
        raise FleetError(f"{what} failed: {cause}") from None


async def fleet_verify(
    request: FleetVerifyRequest,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    workflow_id: str | None = None,
) -> FleetVerifyResult:
    """Run the fleet verify workflow over ``request`` and wait for its result."""
    return await _run_workflow(
        FleetVerify.run,
        request,
        FleetVerifyResult,
        workflow_id or f"fleet-verify-{uuid.uuid4()}",
        "the fleet verify",
        address,
        namespace,
    )


async def fleet_prune(
    request: FleetPruneRequest,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    workflow_id: str | None = None,
) -> FleetPruneResult:
    """Run the fleet prune workflow over ``request`` and wait for its result."""
    return await _run_workflow(
        FleetPrune.run,
        request,
        FleetPruneResult,
        workflow_id or f"fleet-prune-{uuid.uuid4()}",
        "the fleet prune",
        address,
        namespace,
    )


async def fleet_restore(
    request: FleetRestoreRequest,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    workflow_id: str | None = None,
) -> FleetRestoreResult:
    """Run the fleet restore workflow over ``request`` and wait for its result."""
    return await _run_workflow(
        FleetRestore.run,
        request,
        FleetRestoreResult,
        workflow_id or f"fleet-restore-{uuid.uuid4()}",
        "the fleet restore",
        address,
        namespace,
    )


async def fleet_chain(
    action: str,
    request: FleetChainRequest,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    workflow_id: str | None = None,
) -> FleetChainResult:
    """Run the fleet snapshot (``action`` "snapshot") or commit ("commit") workflow over
    ``request`` and wait for its result."""
    run = FleetSnapshot.run if action == "snapshot" else FleetCommit.run
    return await _run_workflow(
        run,
        request,
        FleetChainResult,
        workflow_id or f"fleet-{action}-{uuid.uuid4()}",
        f"the fleet {action}",
        address,
        namespace,
    )


async def fleet_plug(
    request: VMAttach | VMDetach,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
) -> VMPlugResult:
    """Run the fleet attach (a ``VMAttach``) or detach (a ``VMDetach``) workflow of one
    device and wait for its result. Its id is the device's (``plug_workflow_id``): the same
    command again while it runs waits for that run."""
    attaching = isinstance(request, VMAttach)
    action = "attach" if attaching else "detach"
    run: Any = FleetAttach.run if attaching else FleetDetach.run
    return await _run_workflow(
        run,
        request,
        VMPlugResult,
        plug_workflow_id(action, request.host, request.vm, request.device_id),
        f"the fleet {action}",
        address,
        namespace,
        join_running=True,
    )


async def _last_polls(
    client: Client, queue: str, kind: TaskQueueType.ValueType
) -> dict[str, float]:
    """By poller identity: when the server last saw it poll ``queue`` (seconds since the
    epoch, the server's clock). A poll is recorded when it starts: an idle live worker's
    long poll is answered empty within a minute and it polls again at once."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
        )
    )
    return {
        p.identity: p.last_access_time.ToDatetime().replace(tzinfo=UTC).timestamp()
        for p in response.pollers
        if p.HasField("last_access_time")
    }


async def _stopped_workers(client: Client, now: float) -> tuple[dict[str, float], dict[str, float]]:
    """By host: when its worker said it was shutting down, for a host all of whose worker
    instances on its queue the server lists said so (the SDK's final worker heartbeat, sent
    as it stops), or fell silent (a worker killed sends none: its last heartbeat older than
    ``WORKER_BEAT_LOST`` at ``now``, the client's clock against the server's); and, for each
    other host, its worker's newest heartbeat. Both empty when the server lists no workers
    (one without worker heartbeats)."""
    try:
        response = await client.workflow_service.list_workers(
            ListWorkersRequest(namespace=client.namespace, page_size=1000)
        )
    except RPCError:
        return {}, {}
    stopped: dict[str, float] = {}
    running: dict[str, float] = {}
    gone = {WorkerStatus.WORKER_STATUS_SHUTTING_DOWN, WorkerStatus.WORKER_STATUS_SHUTDOWN}
    for info in response.workers_info:
        beat = info.worker_heartbeat
        if not beat.worker_identity.startswith(IDENTITY_PREFIX):
            continue
        host = beat.worker_identity.removeprefix(IDENTITY_PREFIX).split(" ", 1)[0]
        at = beat.heartbeat_time.ToDatetime().replace(tzinfo=UTC).timestamp()
        if beat.status not in gone:
            # Either of the worker process's two pollers (its queue's, the workflows'): the
            # server does not always list both.
            if now - at <= WORKER_BEAT_LOST:
                running[host] = max(at, running.get(host, at))
                continue
            # Silent for WORKER_BEAT_LOST (killed -9, its host down): it stopped before its
            # next heartbeat was due.
            at += WORKER_BEAT.total_seconds()
        elif beat.task_queue != task_queue(host):
            continue
        stopped[host] = max(at, stopped.get(host, at))
    return {h: at for h, at in stopped.items() if h not in running}, running


async def list_hosts_vms(
    hosts: list[str], address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE
) -> ListResult:
    """Each host's VMs, as its worker lists them: the hosts asked at once, in one fleet
    list workflow (a host whose worker does not answer: its error). A host is not asked,
    and has "worker not polling since T" (T: the server's last poll of its queue, also in
    ``last_poll``), when the server has not seen its queue polled for ``LIVE_POLL`` s, or
    its worker said it stopped (its final heartbeat) and none has polled since. If no worker
    has polled the workflows' queue since the list started, ``PICKUP_WAIT`` s later (a live
    worker's waiting poll takes the workflow at once and polls again), the list is
    terminated and each host asked has that said; else the list has its run timeout. A
    host whose worker's heartbeat is overdue (older than one beat) has until it is
    ``WORKER_BEAT_LOST`` old to take the question (``question_wait``), not the whole wait;
    one that did not, and whose worker has not beaten since, is then said not polling
    (stopped by then), as if it had not been asked."""
    if not hosts:
        return ListResult([])
    client = await connect(address, namespace)
    activity = TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    now = time.time()
    try:
        (stopped, beats), flow_polls, host_polls = await asyncio.gather(
            _stopped_workers(client, now),
            _last_polls(client, WORKFLOW_QUEUE, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
            asyncio.gather(*(_last_polls(client, task_queue(h), activity) for h in hosts)),
        )
    except RPCError as exc:
        raise FleetError(f"cannot describe the fleet's task queues at {address}: {exc}") from None
    last_poll = {
        h: max(polls.values(), default=None) for h, polls in zip(hosts, host_polls, strict=True)
    }
    answers = not_polling(
        hosts,
        last_poll,
        max(flow_polls.values(), default=None),
        stopped,
        now,
        live_poll=LIVE_POLL,
        stop_margin=STOP_POLL_MARGIN,
    )
    asked = [h for h in hosts if h not in answers]
    if asked:
        request = ListRequest(asked)
        waits = {
            h: question_wait(beats.get(h), now, wait=request.wait, lost=WORKER_BEAT_LOST)
            for h in asked
        }
        request = ListRequest(asked, waits={h: w for h, w in waits.items() if w < request.wait})
        found = await _list(client, request, last_poll)
        answers.update({h.host: h for h in found})
        late = [h for h in request.waits if (answers[h].error or "").startswith(NO_TAKER)]
        if late:
            answers.update(await _stopped_since(client, late))
    return ListResult([answers[h] for h in hosts])


async def _stopped_since(client: Client, hosts: list[str]) -> dict[str, HostVMs]:
    """Of ``hosts``, whose workers did not take the question in their shortened wait, those
    now taken as stopped (silent for ``WORKER_BEAT_LOST``, nothing polled since): "not
    polling", as ``list_hosts_vms`` says of a host it does not ask."""
    now = time.time()
    activity = TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    try:
        (stopped, _), host_polls = await asyncio.gather(
            _stopped_workers(client, now),
            asyncio.gather(*(_last_polls(client, task_queue(h), activity) for h in hosts)),
        )
    except RPCError:
        return {}
    last_poll = {
        h: max(polls.values(), default=None) for h, polls in zip(hosts, host_polls, strict=True)
    }
    # (the workflows' queue was polled: a worker ran the list)
    return not_polling(
        hosts,
        last_poll,
        now,
        {h: at for h, at in stopped.items() if h in hosts},
        now,
        live_poll=LIVE_POLL,
        stop_margin=STOP_POLL_MARGIN,
    )


async def _list(
    client: Client, request: ListRequest, last_poll: dict[str, float | None]
) -> list[HostVMs]:
    """``request.hosts``' VMs from the fleet list workflow (``list_hosts_vms``)."""
    hosts = request.hosts
    try:
        handle = await client.start_workflow(
            FleetList.run,
            request,
            id=f"fleet-list-{uuid.uuid4()}",
            task_queue=WORKFLOW_QUEUE,
            execution_timeout=timedelta(seconds=request.wait + LIST_RUN_TIMEOUT),
        )
        try:
            taken: ListResult = await asyncio.wait_for(handle.result(), PICKUP_WAIT)
            return taken.hosts
        except TimeoutError:
            pass
        run = await handle.describe()
        task = run.raw_description.pending_workflow_task
        flow_polls = await _last_polls(
            client, WORKFLOW_QUEUE, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
        )
        flow_last = max(flow_polls.values(), default=None)
        started = run.start_time.timestamp()
        never_taken = (
            run.raw_description.HasField("pending_workflow_task")
            and task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED
            and task.attempt == 1
        )
        if never_taken and (flow_last is None or flow_last < started):
            why = (
                f"; no worker has polled the workflows' queue {WORKFLOW_QUEUE} since "
                f"{when(flow_last)}, before the list {handle.id} was started"
            )
            await handle.terminate(reason=f"no worker polls {WORKFLOW_QUEUE}{why}")
            return [not_polling_host(h, last_poll[h], why) for h in hosts]
        result: ListResult = await handle.result()
        return result.hosts
    except (RPCError, WorkflowFailureError) as exc:
        cause = getattr(exc, "cause", None) or exc
        error = f"listing the hosts' VMs failed: {cause} (is any worker running?)"
        return [HostVMs(h, error=error) for h in hosts]


async def worker_hosts(
    address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE
) -> list[str]:
    """The hosts whose workers the server has seen polling the workflow queue in the last
    ``POLLER_FRESH`` s (the server keeps its pollers for a few minutes: a worker stopped
    less than that ago is still taken as there)."""
    client = await connect(address, namespace)
    try:
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=WORKFLOW_QUEUE),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
    except RPCError as exc:
        raise FleetError(f"cannot describe the fleet's task queue at {address}: {exc}") from None
    hosts = set()
    now = time.time()
    for poller in response.pollers:
        if poller.HasField("last_access_time"):
            seen = poller.last_access_time.ToDatetime().replace(tzinfo=UTC).timestamp()
            if now - seen > POLLER_FRESH:
                continue
        if poller.identity.startswith(IDENTITY_PREFIX):
            hosts.add(poller.identity.removeprefix(IDENTITY_PREFIX).split(" ", 1)[0])
    return sorted(hosts)


#: The workflows ``fleet status`` lists: the fleet backups, newest first.
_FLEET_BACKUPS = "WorkflowType = 'blockctl.fleet-backup'"


async def _run_vms(client: Client, workflow_id: str, run_id: str) -> set[tuple[str, str]]:
    """The (host, VM) pairs a fleet backup run was started with: its input, read from the
    first event of its history (one event fetched, whatever the run's size)."""
    response = await client.workflow_service.get_workflow_execution_history(
        GetWorkflowExecutionHistoryRequest(
            namespace=client.namespace,
            execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            maximum_page_size=1,
        )
    )
    started = response.history.events[0].workflow_execution_started_event_attributes
    (request,) = await client.data_converter.decode(started.input.payloads, [FleetBackupRequest])
    return {(b.host, b.vm) for b in request.backups}


async def recent_runs(
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    limit: int = 5,
    vms: set[tuple[str, str]] | None = None,
) -> list[RunStatus]:
    """The last ``limit`` fleet backup runs Temporal lists (newest first; a run just started
    may take a moment to be listed), each with its outcome: a completed run's per-VM
    failures, another ended run's error. Given ``vms`` (host, VM): only the runs that back
    up at least one of them (as started: their input)."""
    client = await connect(address, namespace)
    runs: list[RunStatus] = []
    try:
        async for wf in client.list_workflows(_FLEET_BACKUPS):
            if len(runs) >= limit:
                break
            if vms is not None and not vms & await _run_vms(client, wf.id, wf.run_id):
                continue
            handle = client.get_workflow_handle(
                wf.id, run_id=wf.run_id, result_type=FleetBackupResult
            )
            # The list is the server's visibility store, updated after the fact: the run's
            # own state says whether it is still running.
            run = await handle.describe()
            status = run.status.name if run.status is not None else "UNSPECIFIED"
            started = run.start_time.timestamp()
            closed = None if run.close_time is None else run.close_time.timestamp()
            if run.status == WorkflowExecutionStatus.RUNNING:
                runs.append(RunStatus(wf.id, wf.run_id, status, started, closed))
                continue
            try:
                result = await handle.result(follow_runs=False)
            except WorkflowFailureError as exc:
                error = str(exc.cause or exc)
                runs.append(RunStatus(wf.id, wf.run_id, status, started, closed, error=error))
                continue
            failed = [VMFailure(r.host, r.vm, r.error) for r in result.results if r.error]
            backed_up = len(result.results) - len(failed)
            runs.append(RunStatus(wf.id, wf.run_id, status, started, closed, backed_up, failed))
    except RPCError as exc:
        raise FleetError(f"cannot list the fleet backups at {address}: {exc}") from None
    return runs


#: The VMs' backup child workflows, newest first.
_VM_BACKUPS = "WorkflowType = 'blockctl.vm-backup'"
#: How many of the newest VM backups ``vm_work`` looks at (a VM not among them: nothing).
VM_BACKUPS_LISTED = 1000


async def vm_work(
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    limit: int = VM_BACKUPS_LISTED,
) -> dict[tuple[str, str], VMWork]:
    """By (host, VM), from the newest ``limit`` VM backup child workflows: the repository
    of the newest, those still running (each with its activity's attempt, state, last
    heartbeat and previous attempt's error, as ``describe`` has them) and the newest that
    did not complete, with its error."""
    client = await connect(address, namespace)
    work: dict[tuple[str, str], VMWork] = {}
    try:
        async for wf in client.list_workflows(_VM_BACKUPS, limit=limit):
            named = split_vm_workflow_id(wf.id)
            if named is None:
                continue
            key = named[1:]
            known = work.get(key)
            if known is None:
                memo = await wf.memo()
                known = work[key] = VMWork(str(memo.get("repository", "")))
            handle = client.get_workflow_handle(wf.id, run_id=wf.run_id, result_type=VMBackupResult)
            if wf.status == WorkflowExecutionStatus.RUNNING:
                # The list lags behind the run: its own state says if it still runs.
                run = await handle.describe()
                if run.status == WorkflowExecutionStatus.RUNNING:
                    known.running.append(_running(wf.id, run))
                    continue
                status, close_time = run.status, run.close_time
            else:
                status, close_time = wf.status, wf.close_time
            if status == WorkflowExecutionStatus.COMPLETED or known.last_failure is not None:
                continue
            try:
                await handle.result(follow_runs=False)
                continue  # completed after all (listed before it closed)
            except WorkflowFailureError as exc:
                error = str(exc.cause or exc)
            closed = None if close_time is None else close_time.timestamp()
            name = status.name if status is not None else "UNSPECIFIED"
            work[key] = replace(known, last_failure=LastFailure(wf.id, name, closed, error))
    except RPCError as exc:
        raise FleetError(f"cannot list the VM backups at {address}: {exc}") from None
    return work


#: The fleet verifies and prunes, newest first.
_FLEET_CHECKS = (
    "WorkflowType = 'blockctl.fleet-verify' OR WorkflowType = 'blockctl.fleet-prune' "
    "OR WorkflowType = 'blockctl.fleet-restore'"
)
#: How many of the newest fleet verify, prune and restore runs ``vm_checks`` looks at.
CHECK_RUNS_LISTED = 100


async def vm_checks(
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    limit: int = CHECK_RUNS_LISTED,
) -> dict[tuple[str, str], VMChecks]:
    """By (host, VM): its result in the newest completed fleet verify and fleet prune among
    the newest ``limit`` of those runs (a run still going, or that did not complete, has no
    result to show)."""
    client = await connect(address, namespace)
    verifies: dict[tuple[str, str], LastVerify] = {}
    prunes: dict[tuple[str, str], LastPrune] = {}
    restores: dict[tuple[str, str], LastRestore] = {}
    result_types: dict[str, type] = {
        FLEET_VERIFY: FleetVerifyResult,
        FLEET_PRUNE: FleetPruneResult,
    }
    try:
        async for wf in client.list_workflows(_FLEET_CHECKS, limit=limit):
            closed = None if wf.close_time is None else wf.close_time.timestamp()
            handle = client.get_workflow_handle(
                wf.id,
                run_id=wf.run_id,
                result_type=result_types.get(wf.workflow_type, FleetRestoreResult),
            )
            if wf.status != WorkflowExecutionStatus.COMPLETED:
                # The list lags behind the run: its own state says if it completed.
                run = await handle.describe()
                if run.status != WorkflowExecutionStatus.COMPLETED:
                    continue
                closed = None if run.close_time is None else run.close_time.timestamp()
            result = await handle.result(follow_runs=False)
            if isinstance(result, FleetRestoreResult):
                for r in result.results:
                    restores.setdefault(
                        (r.host, r.vm), LastRestore(wf.id, closed, r.point, r.files, r.error)
                    )
            elif isinstance(result, FleetVerifyResult):
                for v in result.results:
                    verifies.setdefault(
                        (v.host, v.vm),
                        LastVerify(wf.id, closed, v.point, v.ok, v.problems, v.error),
                    )
            else:
                for p in result.results:
                    prunes.setdefault(
                        (p.host, p.vm),
                        LastPrune(wf.id, closed, len(p.deleted), len(p.kept), p.error),
                    )
    except (RPCError, WorkflowFailureError) as exc:
        raise FleetError(
            f"cannot list the fleet verifies, prunes and restores at {address}: {exc}"
        ) from None
    return {
        key: VMChecks(verifies.get(key), prunes.get(key), restores.get(key))
        for key in verifies.keys() | prunes.keys() | restores.keys()
    }


def _running(workflow_id: str, run: WorkflowExecutionDescription) -> RunningBackup:
    started = run.start_time.timestamp()
    pending = run.raw_description.pending_activities
    if not pending:
        return RunningBackup(workflow_id, started)
    activity = pending[0]  # a VM's backup has one activity
    heartbeat = (
        activity.last_heartbeat_time.ToDatetime().replace(tzinfo=UTC).timestamp()
        if activity.HasField("last_heartbeat_time")
        else None
    )
    failure = activity.last_failure.message if activity.HasField("last_failure") else None
    return RunningBackup(
        workflow_id,
        started,
        attempt=activity.attempt,
        state=PendingActivityState.Name(activity.state).removeprefix("PENDING_ACTIVITY_STATE_"),
        last_heartbeat=heartbeat,
        last_failure=failure,
    )


def _spec(every: float | None, cron: str | None) -> ScheduleSpec:
    return (
        ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=every))])
        if every is not None
        else ScheduleSpec(cron_expressions=[cron or ""])
    )


def _action(
    name: str, request: FleetBackupRequest, inventory: str, every: float | None, cron: str | None
) -> ScheduleActionStartWorkflow:
    """The schedule's action: the fleet backup of ``request``. Its memo (each run's too)
    says what ``fleet schedule list`` shows: the spec as given (the server turns a cron line
    into calendars), the inventory and its VM count; unlike a schedule's own memo, an update
    replaces it."""
    return ScheduleActionStartWorkflow(
        FleetBackup.run,
        request,
        id=name,
        task_queue=WORKFLOW_QUEUE,
        memo={"every": every, "cron": cron, "inventory": inventory, "vms": len(request.backups)},
    )


async def create_schedule(
    name: str,
    request: FleetBackupRequest,
    inventory: str,
    every: float | None = None,
    cron: str | None = None,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
) -> None:
    """A Temporal Schedule ``name`` that runs the fleet backup of ``request`` (the inventory
    as read now) every ``every`` seconds or at the ``cron`` line's times. A run still going
    when the next is due: that next one is skipped (Temporal's SKIP overlap policy). Its
    runs' workflow ids are ``NAME-<due time>`` (Temporal's)."""
    client = await connect(address, namespace)
    try:
        await client.create_schedule(
            name,
            Schedule(
                action=_action(name, request, inventory, every, cron),
                spec=_spec(every, cron),
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
            ),
            memo={"every": every, "cron": cron, "inventory": inventory,
                  "vms": len(request.backups)},
        )  # fmt: skip
    except ScheduleAlreadyRunningError:
        raise FleetError(
            f"a schedule named {name!r} exists (fleet schedule delete it first)"
        ) from None
    except RPCError as exc:
        raise FleetError(f"cannot create the schedule {name!r} at {address}: {exc}") from None


async def update_schedule(
    name: str,
    request: FleetBackupRequest,
    inventory: str,
    every: float | None = None,
    cron: str | None = None,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
) -> None:
    """Schedule ``name`` runs the fleet backup of ``request`` from its next run on (a run
    going on ends as it would), every ``every`` seconds or at the ``cron`` line's times if
    one is given, else at the times it had; its policy, state and recent runs stay."""
    client = await connect(address, namespace)

    async def updater(given: ScheduleUpdateInput) -> ScheduleUpdate:
        schedule = given.description.schedule
        action = schedule.action
        if not (
            isinstance(action, ScheduleActionStartWorkflow) and action.workflow == FLEET_BACKUP
        ):
            raise FleetError(f"the schedule {name!r} does not run a fleet backup: not updated")
        if every is None and cron is None:
            was = await _schedule_memo(client, given.description)
            kept_every, kept_cron = was.get("every"), was.get("cron")
            spec = schedule.spec
            new_every = None if kept_every is None else float(kept_every)
            new_cron = None if kept_cron is None else str(kept_cron)
        else:
            spec, new_every, new_cron = _spec(every, cron), every, cron
        return ScheduleUpdate(
            replace(
                schedule, action=_action(name, request, inventory, new_every, new_cron), spec=spec
            )
        )

    try:
        await client.get_schedule_handle(name).update(updater)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise FleetError(f"no schedule named {name!r} at {address}") from None
        raise FleetError(f"cannot update the schedule {name!r} at {address}: {exc}") from None


async def _schedule_memo(client: Client, description: ScheduleDescription) -> dict[str, Any]:
    """What ``_action`` put in the action's memo; a schedule made before it kept these in its
    own memo."""
    action = description.schedule.action
    fields = action.memo if isinstance(action, ScheduleActionStartWorkflow) else None
    if fields and "inventory" in fields:
        keys = list(fields)
        values = await client.data_converter.decode([fields[k] for k in keys])
        return dict(zip(keys, values, strict=True))
    return dict(await description.memo())


async def list_schedules(
    address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE
) -> list[ScheduleStatus]:
    """The fleet backup schedules on the server, by name (the server lists a schedule a
    moment after it is made or deleted), each as it is now (``describe``: an update shows at
    once)."""
    client = await connect(address, namespace)
    found = []
    try:
        async for entry in await client.list_schedules():
            action = None if entry.schedule is None else entry.schedule.action
            if not (
                isinstance(action, ScheduleListActionStartWorkflow)
                and action.workflow == FLEET_BACKUP
            ):
                continue
            try:
                description = await client.get_schedule_handle(entry.id).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    continue  # deleted since it was listed
                raise
            memo = await _schedule_memo(client, description)
            info = description.info
            recent = [
                ScheduledRun(
                    r.action.workflow_id, r.scheduled_at.timestamp(), r.started_at.timestamp()
                )
                for r in info.recent_actions
                if isinstance(r.action, ScheduleActionExecutionStartWorkflow)
            ]
            every, cron = memo.get("every"), memo.get("cron")
            found.append(
                ScheduleStatus(
                    entry.id,
                    None if every is None else float(every),
                    None if cron is None else str(cron),
                    str(memo.get("inventory", "")),
                    int(memo.get("vms", 0)),
                    description.schedule.state.paused,
                    [t.timestamp() for t in info.next_action_times],
                    recent,
                )
            )
    except RPCError as exc:
        raise FleetError(f"cannot list the schedules at {address}: {exc}") from None
    return sorted(found, key=lambda s: s.name)


async def delete_schedule(
    name: str, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE
) -> None:
    """Delete schedule ``name``: no more runs start; a run going on goes on to its end."""
    client = await connect(address, namespace)
    try:
        await client.get_schedule_handle(name).delete()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise FleetError(f"no schedule named {name!r} at {address}") from None
        raise FleetError(f"cannot delete the schedule {name!r} at {address}: {exc}") from None
