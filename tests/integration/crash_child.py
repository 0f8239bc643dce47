"""A controller that dies: attach to VM, run one operation, kill -9 itself at a step.

``python -m tests.integration.crash_child VM KIND STEP JSON`` — KIND is ``commit``,
``stream``, ``snapshot`` or ``backup``; STEP a :class:`blockctl._journal.Step` value (for a
backup: a job status; ``frozen``: right after a quiesced operation's freeze is confirmed, via
``_agent.FAILPOINT``); JSON the operation's keyword arguments. The process SIGKILLs itself
right after the journal record for STEP is on disk (``_journal.FAILPOINT``), or, for a backup,
when its job reaches that status (a job hook): the crash point is exact, never a race. Exit
code 3: the operation ended without reaching STEP (the test fails on it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import anyio

from blockctl import _agent, _journal
from blockctl._jobs import JobProgress, JobStatus, JobTransition
from blockctl._machine import attach
from blockctl._ops import backup, chains


def die_at(kind: str, step: str) -> None:
    if step == "frozen":  # inside quiesced: the guest's freeze has just been confirmed
        _agent.FAILPOINT = lambda stage: os.kill(os.getpid(), signal.SIGKILL)
        return

    def failpoint(intent: _journal.Intent) -> None:
        if intent.kind.value == kind and intent.step.value == step:
            os.kill(os.getpid(), signal.SIGKILL)

    _journal.FAILPOINT = failpoint


class DieAt:
    """A job hook: SIGKILL this process when a job reaches ``status`` (before the driver
    acts on it: a concluded job is then neither read nor dismissed)."""

    def __init__(self, status: str) -> None:
        self.status = JobStatus(status)

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status is self.status:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_progress(self, progress: JobProgress) -> None:
        pass


async def main(vm_name: str, kind: str, kwargs: dict[str, Any]) -> None:
    async with attach(vm_name) as vm:
        if kind == "backup":
            kwargs.pop("device")
            repo = kwargs.pop("repo")
            mode = backup.BackupKind(kwargs.pop("mode"))
            await backup.backup(vm, repo, kind=mode, hooks=(DieAt(kwargs.pop("status")),))
        elif kind == "commit":
            await chains.commit(vm, **kwargs)
        elif kind == "stream":
            await chains.stream(vm, **kwargs)
        else:
            kwargs["devices"] = [kwargs.pop("device")]
            await chains.external_snapshot(vm, **kwargs)


if __name__ == "__main__":
    name, op_kind, at, args = sys.argv[1:5]
    die_at(op_kind, at)
    extra = {"status": at} if op_kind == "backup" else {}
    anyio.run(main, name, op_kind, {**json.loads(args), **extra}, backend="asyncio")
    sys.exit(3)
