"""The fleet's workflows: deterministic code that routes work to hosts' task queues and
collects what comes back. They run in Temporal's sandbox: no I/O, activities named by string.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from blockctl._fleet.inventory import (
        FleetBackupRequest,
        FleetBackupResult,
        VMBackup,
        VMBackupResult,
        task_queue,
    )

#: The backup activity's name (blockctl._fleet.activities.BACKUP_VM: not imported here, the
#: sandbox would re-import the library behind it).
BACKUP_VM = "blockctl.backup"
#: One attempt: a retried backup would start a second one (re-adopting the running job by a
#: deterministic id is the next slice).
ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)
#: A worker that stops heartbeating (it heartbeats with the copy's progress) is taken as gone.
HEARTBEAT_TIMEOUT = timedelta(minutes=5)
BACKUP_TIMEOUT = timedelta(hours=1)  # as blockctl's own default deadline for a backup


@workflow.defn(name="blockctl.fleet-backup")
class FleetBackup:
    """Every VM of the request backed up at once, each on its own host's queue; one result
    per VM, in the request's order (a failed VM has its error, the others their point)."""

    @workflow.run
    async def run(self, request: FleetBackupRequest) -> FleetBackupResult:
        results = await asyncio.gather(*(self._backup(b) for b in request.backups))
        return FleetBackupResult(list(results))

    async def _backup(self, request: VMBackup) -> VMBackupResult:
        try:
            result: VMBackupResult = await workflow.execute_activity(
                BACKUP_VM,
                request,
                result_type=VMBackupResult,
                task_queue=task_queue(request.host),
                activity_id=f"backup/{request.host}/{request.vm}",
                start_to_close_timeout=BACKUP_TIMEOUT,
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=ONE_ATTEMPT,
            )
        except ActivityError as exc:
            cause = exc.cause if exc.cause is not None else exc
            return VMBackupResult(
                host=request.host, vm=request.vm, repository=request.repository, error=str(cause)
            )
        return result
