"""QEMU block jobs as blockctl drives them: hooks that observe a job, the records they get,
and adopting jobs another process started (to wait for, pause, resume or cancel them).

::

    from blockctl import chains, jobs
    from blockctl.types import ErrorPolicy

    class Progress:                        # any object with these methods is a JobHook
        def on_transition(self, t: jobs.JobTransition) -> None: ...
        def on_progress(self, p: jobs.JobProgress) -> None: print(p.done, p.total, p.eta)
        def on_io_error(self, e: jobs.JobIOError) -> None: ...

    control = jobs.JobControl(speed=50 << 20, on_error=ErrorPolicy.STOP, hooks=[Progress()])
    await chains.commit(vm, "disk0", control=control)   # backup, stream, snapshots: the same
    for job in await jobs.adopt_jobs(vm.session):    # jobs running in this VM, from any client
        await job.pause()
    await jobs.control_job(vm, job_id, "speed", speed=10 << 20)  # a backup's copy too

``JobControl`` is the one option group of every long-running operation (speed, deadline,
error policy, pause timeout, hooks), checked when made. A job succeeded only if it concluded
with no error and ``offset == length``.
"""

from blockctl._backup.control import control_job
from blockctl._jobs import (
    IGNORE_RETRIES,
    Job,
    JobControl,
    JobEnded,
    JobHook,
    JobIOError,
    JobProgress,
    JobResult,
    JobTransition,
    StructlogJobHook,
    adopt_jobs,
)
from blockctl._qmp.models import JobInfo, JobStatus

__all__ = [
    "adopt_jobs",
    "control_job",
    "Job",
    "JobControl",
    "JobHook",
    "StructlogJobHook",
    "JobTransition",
    "JobProgress",
    "JobIOError",
    "JobEnded",
    "JobResult",
    "JobInfo",
    "JobStatus",
    "IGNORE_RETRIES",
]
