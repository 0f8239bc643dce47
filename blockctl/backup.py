"""Backups of running guests into a chunked, content-addressed repository (format 2).

::

    from blockctl import backup

    repo = backup.init_repository("/srv/backups")          # once; key_file=... to encrypt
    repo = backup.open_repository("/srv/backups")
    point = await backup.create(vm, repo)                  # incremental unless there is no base
    point = await backup.create(
        vm, repo, options=backup.BackupOptions(quiesce="if-possible"),
        control=jobs.JobControl(speed=100 << 20),          # from blockctl import jobs
    )
    await backup.restore(repo, vm.name, point.id, "disk0", Path("disk0.qcow2"))
    await backup.restore_live(vm, repo, vm.name, point.id, "disk0", Path("new.qcow2"))
    # a lost VM: launched from its config, the drive on disk0.qcow2 served by the point
    await backup.launch_live(config, repo, "web", point.id, "disk0", Path("disk0.qcow2"))
    report = await backup.verify(repo, vm.name, point.id)
    await backup.prune(repo, vm.name, keep_last=7)

See the README's "Backups" section for the guarantees.
"""

from blockctl._backup.live import (
    LiveLaunchResult as LiveLaunchResult,
)
from blockctl._backup.live import (
    LiveRestoreResult as LiveRestoreResult,
)
from blockctl._backup.live import (
    launch_live as launch_live,
)
from blockctl._backup.live import (
    restore_live as restore_live,
)
from blockctl._backup.operations import (
    STEPS as STEPS,
)
from blockctl._backup.operations import (
    BackupOptions as BackupOptions,
)
from blockctl._backup.operations import (
    PruneResult as PruneResult,
)
from blockctl._backup.operations import (
    RestoreResult as RestoreResult,
)
from blockctl._backup.operations import (
    ServedPoint as ServedPoint,
)
from blockctl._backup.operations import (
    Verification as Verification,
)
from blockctl._backup.operations import (
    backup as create,
)
from blockctl._backup.operations import (
    init_repository as init_repository,
)
from blockctl._backup.operations import (
    open_repository as open_repository,
)
from blockctl._backup.operations import (
    prune as prune,
)
from blockctl._backup.operations import (
    recover as recover,
)
from blockctl._backup.operations import (
    restore as restore,
)
from blockctl._backup.operations import (
    summary as summary,
)
from blockctl._backup.operations import (
    verify as verify,
)
from blockctl._backup.store import (
    DiskPoint as DiskPoint,
)
from blockctl._backup.store import (
    GcResult as GcResult,
)
from blockctl._backup.store import (
    Manifest as Manifest,
)
from blockctl._backup.store import (
    Repository as Repository,
)

__all__ = [
    "create",
    "restore",
    "restore_live",
    "launch_live",
    "verify",
    "prune",
    "recover",
    "summary",
    "init_repository",
    "open_repository",
    "BackupOptions",
    "Repository",
    "Manifest",
    "DiskPoint",
    "RestoreResult",
    "LiveRestoreResult",
    "LiveLaunchResult",
    "Verification",
    "PruneResult",
    "ServedPoint",
    "GcResult",
    "STEPS",
]
