"""Recovery of operations a dead controller left half done (the crash journal), and of
backups (see :func:`blockctl.backup.recover`).

::

    from blockctl import recovery

    for r in await recovery.reconcile(vm):
        print(r.kind, r.verdict, r.message)

See the README's "Crash recovery" section for what is journaled and how it is decided.
"""

from blockctl._journal import Verdict
from blockctl._ops.recovery import Recovery, reconcile, reconcile_offline
from blockctl._ops.vm_recovery import RecoveryReport, recover_vm

__all__ = ["recover_vm", "reconcile", "reconcile_offline", "Recovery", "RecoveryReport", "Verdict"]
