"""A controller that dies: attach to VM, run one chain operation, kill -9 itself at a step.

``python -m tests.integration.crash_child VM KIND STEP JSON`` — KIND is ``commit``,
``stream`` or ``snapshot``; STEP a :class:`blockctl._journal.Step` value; JSON the
operation's keyword arguments. The process SIGKILLs itself right after the journal record for
STEP is on disk (``_journal.FAILPOINT``): the crash point is exact, never a race. Exit code 3:
the operation ended without reaching STEP (the test fails on it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import anyio

from blockctl import _journal
from blockctl._machine import attach
from blockctl._ops import chains


def die_at(kind: str, step: str) -> None:
    def failpoint(intent: _journal.Intent) -> None:
        if intent.kind.value == kind and intent.step.value == step:
            os.kill(os.getpid(), signal.SIGKILL)

    _journal.FAILPOINT = failpoint


async def main(vm_name: str, kind: str, kwargs: dict[str, Any]) -> None:
    async with attach(vm_name) as vm:
        if kind == "commit":
            await chains.commit(vm, **kwargs)
        elif kind == "stream":
            await chains.stream(vm, **kwargs)
        else:
            kwargs["devices"] = [kwargs.pop("device")]
            await chains.external_snapshot(vm, **kwargs)


if __name__ == "__main__":
    name, op_kind, at, args = sys.argv[1:5]
    die_at(op_kind, at)
    anyio.run(main, name, op_kind, json.loads(args), backend="asyncio")
    sys.exit(3)
