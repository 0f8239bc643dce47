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


@workflow.defn(name="blockctl.fleet-backup")
class FleetBackup:
    """Every VM of the request backed up at once, each on its own host's queue; one result
    per VM, in the request's order (a failed VM has its error, the others their point)."""

    @workflow.run
    async def run(self, request: FleetBackupRequest) -> FleetBackupResult:
        heartbeat = timedelta(seconds=request.heartbeat_timeout)
        results = await asyncio.gather(*(self._backup(b, heartbeat) for b in request.backups))
        return FleetBackupResult(list(results))

    async def _backup(self, request: VMBackup, heartbeat: timedelta) -> VMBackupResult:
        try:
            result: VMBackupResult = await workflow.execute_activity(
                BACKUP_VM,
                request,
                result_type=VMBackupResult,
                task_queue=task_queue(request.host),
                activity_id=f"backup/{request.host}/{request.vm}",
                start_to_close_timeout=BACKUP_TIMEOUT,
                heartbeat_timeout=heartbeat,
                retry_policy=RETRY,
            )
        except ActivityError as exc:
            cause = exc.cause if exc.cause is not None else exc
            return VMBackupResult(
                host=request.host, vm=request.vm, repository=request.repository, error=str(cause)
            )
        return result
