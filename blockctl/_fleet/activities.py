"""What a host's worker runs: blockctl's public operations on this host's VMs, as Temporal
activities. Only the worker of a VM's host talks QMP to it (the VM is found by name in this
process's runtime directory, ``BLOCKCTL_RUNTIME_DIR``).

A backup activity is idempotent: its request id (the workflow's id and run and the
activity's id, the same in every attempt) is recorded in the point's manifest, and
``backup.create`` given that id first recovers what an earlier attempt left on the VM and in
the repository (its fleecing job, nodes, export, incomplete point; its checkpoint bitmaps
settled), then returns that attempt's point if it was recorded, else backs up afresh. A
killed worker's copy cannot be continued (the worker itself read the export over NBD), so
"re-adopting" it means exactly that: recover, then one point.

Errors: a backup that raised is not retried (it failed on its own: the VM is gone, the
repository is full...) except :class:`~blockctl.errors.RepositoryBusy` (an earlier attempt of
a worker taken for lost still holds the VM's backup lock). A lost worker is retried by the
workflow's heartbeat timeout.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from temporalio import activity
from temporalio.exceptions import ApplicationError

from blockctl import attach, backup, jobs
from blockctl._fleet.inventory import VMBackup, VMBackupResult
from blockctl.errors import RepositoryBusy

#: The activity's name (workflows name it as a string: they never import this module).
BACKUP_VM = "blockctl.backup"
#: Heartbeats per heartbeat timeout while nothing else heartbeats (recovery, syncing the
#: chunks, writing the manifest): one lost or late heartbeat does not lose the worker.
BEATS_PER_TIMEOUT = 4


class _Heartbeat:
    """A job hook that heartbeats the activity with the copy's progress (done, total)."""

    def on_transition(self, transition: jobs.JobTransition) -> None:
        activity.heartbeat(transition.job_id, transition.status.value)

    def on_progress(self, progress: jobs.JobProgress) -> None:
        activity.heartbeat(progress.job_id, progress.done, progress.total)


async def _beat(interval: float) -> None:
    """Heartbeat every ``interval`` s: the worker is alive, whatever the backup is doing."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(interval)


def request_id(info: activity.Info) -> str:
    """The backup's request id: the same in every attempt of one activity of one workflow
    run (quoted: a manifest's request id is printable ASCII without spaces)."""
    return quote(f"temporal:{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}", "/:")


@activity.defn(name=BACKUP_VM)
async def backup_vm(request: VMBackup) -> VMBackupResult:
    """Back up VM ``request.vm`` of this host into ``request.repository`` (it must exist:
    ``blockctl backup init``); an incremental when the repository has a usable base. A retry
    returns the point an earlier attempt recorded, if it did."""
    info = activity.info()
    timeout = info.heartbeat_timeout
    beat = (
        None
        if timeout is None
        else asyncio.ensure_future(_beat(timeout.total_seconds() / BEATS_PER_TIMEOUT))
    )
    try:
        repo = backup.open_repository(request.repository)
        control = jobs.JobControl(hooks=[*jobs.JobControl().hooks, _Heartbeat()])
        async with attach(
            request.vm, command=f"blockctl fleet worker ({info.activity_id}#{info.attempt})"
        ) as vm:
            point = await backup.create(vm, repo, control=control, request_id=request_id(info))
    except RepositoryBusy:
        raise  # retried: the attempt holding the lock ends, or is found dead
    except Exception as exc:
        raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from exc
    finally:
        if beat is not None:
            beat.cancel()
    return VMBackupResult(
        host=request.host,
        vm=request.vm,
        repository=request.repository,
        point=point.id,
        kind=point.kind,
        bytes_read=point.bytes_read,
    )
