"""A host's worker and the fleet's client calls: the only place that connects to Temporal."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import anyio
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from blockctl._fleet.activities import backup_vm
from blockctl._fleet.inventory import (
    WORKFLOW_QUEUE,
    FleetBackupRequest,
    FleetBackupResult,
    task_queue,
)
from blockctl._fleet.workflows import FleetBackup
from blockctl.errors import BlockctlError

DEFAULT_ADDRESS = "127.0.0.1:7233"
DEFAULT_NAMESPACE = "default"


class FleetError(BlockctlError):
    """The Temporal server could not be reached, or refused a call."""


async def connect(address: str, namespace: str = DEFAULT_NAMESPACE) -> Client:
    try:
        return await Client.connect(address, namespace=namespace)
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
    client = await connect(address, namespace)
    # The workflows import only the inventory's values from blockctl: let them through.
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("blockctl")
    )
    workers = [
        Worker(client, task_queue=task_queue(host), activities=[backup_vm]),
        Worker(client, task_queue=WORKFLOW_QUEUE, workflows=[FleetBackup], workflow_runner=runner),
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
    """Run the fleet backup workflow over ``request`` and wait for its result."""
    client = await connect(address, namespace)
    try:
        return await client.execute_workflow(
            FleetBackup.run,
            request,
            id=workflow_id or f"fleet-backup-{uuid.uuid4()}",
            task_queue=WORKFLOW_QUEUE,
        )
    except (RPCError, WorkflowFailureError) as exc:
        cause = getattr(exc, "cause", None) or exc
        raise FleetError(f"the fleet backup failed: {cause}") from None
