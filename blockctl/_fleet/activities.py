"""What a host's worker runs: blockctl's public operations on this host's VMs, as Temporal
activities. Only the worker of a VM's host talks QMP to it (the VM is found by name in this
process's runtime directory, ``BLOCKCTL_RUNTIME_DIR``).

Slice 1: a backup. Retries are the workflow's to allow; it allows none yet, since a retried
backup would start a second one (deterministic job ids that re-adopt the running job are the
next slice).
"""

from __future__ import annotations

from temporalio import activity

from blockctl import attach, backup, jobs
from blockctl._fleet.inventory import VMBackup, VMBackupResult

#: The activity's name (workflows name it as a string: they never import this module).
BACKUP_VM = "blockctl.backup"


class _Heartbeat:
    """A job hook that heartbeats the activity with the copy's progress (done, total)."""

    def on_transition(self, transition: jobs.JobTransition) -> None:
        activity.heartbeat(transition.job_id, transition.status.value)

    def on_progress(self, progress: jobs.JobProgress) -> None:
        activity.heartbeat(progress.job_id, progress.done, progress.total)


@activity.defn(name=BACKUP_VM)
async def backup_vm(request: VMBackup) -> VMBackupResult:
    """Back up VM ``request.vm`` of this host into ``request.repository`` (it must exist:
    ``blockctl backup init``); an incremental when the repository has a usable base."""
    repo = backup.open_repository(request.repository)
    control = jobs.JobControl(hooks=[*jobs.JobControl().hooks, _Heartbeat()])
    async with attach(
        request.vm, command=f"blockctl fleet worker ({activity.info().activity_id})"
    ) as vm:
        point = await backup.create(vm, repo, control=control)
    return VMBackupResult(
        host=request.host,
        vm=request.vm,
        repository=request.repository,
        point=point.id,
        kind=point.kind,
        bytes_read=point.bytes_read,
    )
