"""A controller that dies: attach to VM, run one operation, kill -9 itself at a step.

``python -m tests.integration.crash_child VM KIND STEP JSON`` — KIND is ``commit``,
``stream``, ``snapshot``, ``backup``, ``live`` (a live restore: ``repo``, ``point``,
``device``, ``target``, ``speed``), ``up`` (``blockctl up``: ``config``, a machine TOML;
STEP ``spawned`` or ``greeted``), ``live-raw`` (the same, into a new raw file, a block
device or an ``iscsi://`` LUN) or ``live-launch`` (VM is launched, not attached to: the
same keys, plus ``config``, a machine TOML whose drive on ``target`` comes back, and
``source_vm``, the VM of the point; ``live-launch-raw``: the same, the config's drive
raw (a file, a block device or a LUN: ``target`` its ``iscsi://`` URL), its record a
mirror's); STEP a :class:`blockctl._journal.Step` value (for a
backup: a name in ``blockctl.backup.STEPS``, or ``copy``; ``frozen``: right after a
quiesced operation's freeze is confirmed, via ``_agent.FAILPOINT``; for ``live-launch`` also
``spawned``, right after QEMU's process exists, before its greeting, and ``greeted``, once
the launch is complete, before the copy is journaled from QEMU's graph, via
``_machine.FAILPOINT``; for ``live``/``live-raw`` also ``attached``, right after the
hot-plug returned, before the record is rewritten from QEMU's graph, via
``_backup.live.FAILPOINT``; for the four live kinds also ``served``, right after the
backup's server listens, before the record names its pid, likewise; KIND ``recover``:
``blockctl recover VM``, no arguments, with STEP ``replacement-served`` or ``replaced``,
inside its replacement of a live restore's dead server, via ``_ops.recovery.FAILPOINT``);
JSON the operation's
keyword arguments (for a backup: ``repo``, and optionally ``kind``, ``devices``,
``scratch_dir`` and ``request_id``). The process SIGKILLs itself right
after the journal record for STEP is on disk (``_journal.FAILPOINT``), or, for a backup, at
the backup's failpoint STEP (``copy``: at the first progress record of the read, with the
fleecing job, nodes and export live): the crash point is exact, never a race. Exit code 3:
the operation ended without reaching STEP (the test fails on it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from blockctl import _agent, _journal, _machine, backup
from blockctl._backup import live
from blockctl._cli.common import load_config
from blockctl._jobs import JobProgress, JobTransition
from blockctl._machine import attach
from blockctl._ops import chains, recovery
from blockctl._ops.vm_recovery import recover_vm
from blockctl.backup import BackupOptions
from blockctl.jobs import JobControl
from blockctl.types import ImageFormat, IscsiSource


def die_at(kind: str, step: str) -> None:
    if kind == "recover":  # inside its replacement of a live restore's dead server
        recovery.FAILPOINT = stage_failpoint(step)
        return
    if step == "frozen":  # inside quiesced: the guest's freeze has just been confirmed
        _agent.FAILPOINT = lambda stage: os.kill(os.getpid(), signal.SIGKILL)
        return
    if step in ("attached", "served"):  # a live restore's hot-plug returned, its server up
        live.FAILPOINT = stage_failpoint(step)
        return
    if step in ("spawned", "greeted"):  # a detached launch, at QEMU's start
        _machine.FAILPOINT = stage_failpoint(step)
        return

    def failpoint(intent: _journal.Intent) -> None:
        if intent.kind.value == kind and intent.step.value == step:
            os.kill(os.getpid(), signal.SIGKILL)

    _journal.FAILPOINT = failpoint


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DieReading:
    """A job hook: SIGKILL this process at the backup's first progress record of its read
    (QEMU's fleecing job, nodes, NBD server and export are all live then)."""

    def on_transition(self, transition: JobTransition) -> None:
        pass

    def on_progress(self, progress: JobProgress) -> None:
        if progress.job_type == "backup-read":
            die()


def stage_failpoint(step: str) -> Callable[[str], None]:
    """A module's FAILPOINT hook that kills this process at the stage named ``step``."""

    def failpoint(at: str) -> None:
        if at == step:
            die()

    return failpoint


async def main(vm_name: str, kind: str, kwargs: dict[str, Any]) -> None:
    if kind == "recover":
        await recover_vm(vm_name)
        return
    if kind == "up":  # `blockctl up CONFIG`: a plain detached launch
        await _machine.launch_detached(load_config(Path(kwargs["config"]), vm_name))
        return
    if kind in ("live-launch", "live-launch-raw"):
        config = load_config(Path(kwargs["config"]), vm_name)
        await backup.launch_live(
            config,
            backup.open_repository(kwargs["repo"]),
            kwargs["source_vm"],
            kwargs["point"],
            kwargs["device"],
            # A LUN drive's target is its URL (a Path would fold its //).
            target if (target := kwargs["target"]).startswith("iscsi://") else Path(target),
            control=JobControl(speed=kwargs.get("speed")),
        )
        return
    async with attach(vm_name) as vm:
        if kind == "backup":
            step = kwargs.pop("step")
            repo = backup.open_repository(kwargs.pop("repo"))
            scratch = kwargs.pop("scratch_dir", None)
            await backup.create(
                vm,
                repo,
                kind=kwargs.pop("kind", "incremental"),
                devices=kwargs.pop("devices", None),
                request_id=kwargs.pop("request_id", None),
                _failpoint=stage_failpoint(step),
                options=BackupOptions(scratch_dir=None if scratch is None else Path(scratch)),
                control=JobControl(hooks=(DieReading(),) if step == "copy" else ()),
            )
        elif kind in ("live", "live-raw"):
            repo = backup.open_repository(kwargs.pop("repo"))
            await backup.restore_live(
                vm,
                repo,
                vm_name,
                kwargs["point"],
                kwargs["device"],
                (
                    IscsiSource.from_url(kwargs["target"])
                    if kwargs["target"].startswith("iscsi://")
                    else Path(kwargs["target"])
                ),
                control=JobControl(speed=kwargs.get("speed")),
                target_format=ImageFormat.RAW if kind == "live-raw" else ImageFormat.QCOW2,
            )
        elif kind == "commit":
            await chains.commit(vm, control=JobControl(speed=kwargs.pop("speed", None)), **kwargs)
        elif kind == "stream":
            await chains.stream(vm, control=JobControl(speed=kwargs.pop("speed", None)), **kwargs)
        else:
            kwargs["devices"] = [kwargs.pop("device")]
            await chains.external_snapshot(vm, **kwargs)


if __name__ == "__main__":
    name, op_kind, at, args = sys.argv[1:5]
    if op_kind == "backup":
        if at != "copy" and at not in backup.STEPS:
            sys.exit(f"no backup step {at!r}: {', '.join(backup.STEPS)} or copy")
    else:
        # A live restore's record is a stream's (with its server); into a raw target, a
        # mirror's.
        die_at(
            {
                "live": "stream",
                "live-launch": "stream",
                "live-raw": "mirror",
                "live-launch-raw": "mirror",
            }.get(op_kind, op_kind),
            at,
        )
    extra = {"step": at} if op_kind == "backup" else {}
    anyio.run(main, name, op_kind, {**json.loads(args), **extra}, backend="asyncio")
    sys.exit(3)
