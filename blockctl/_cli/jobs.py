"""``jobs``, and what the commands that run block jobs share: their progress lines, the
error-policy options, the job hooks."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from blockctl import _lazy
from blockctl._cli import interrupt
from blockctl._cli.common import Command, emit
from blockctl._cli.output import human_size, table
from blockctl._cli.progress import ProgressDisplay
from blockctl._jobs import (
    JobControl,
    JobHook,
    JobIOError,
    JobProgress,
    JobResult,
    JobSample,
    JobStatus,
    JobTransition,
    StructlogJobHook,
    adopt_jobs,
    measured_rate,
)
from blockctl._machine import VM, attach
from blockctl._qmp import wire
from blockctl._qmp.models import JOB_FINAL
from blockctl.errors import ConfigError
from blockctl.types import ErrorPolicy, parse_size

if TYPE_CHECKING:
    from blockctl._backup import control as control_ops
else:
    # Imported when first used: `status`, `drives`, `ls` and `--version` do not need it.
    control_ops = _lazy.module("blockctl._backup.control")


class JobBar:
    """A JobHook that shows each job's progress on stderr: bytes, rate and ETA, a line per job
    (blockctl._cli.progress; never with --json)."""

    def __init__(self, args: argparse.Namespace, label: str) -> None:
        self.args = args
        self.label = label
        self.display = ProgressDisplay(enabled=not args.json)

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status in (JobStatus.CONCLUDED, JobStatus.NULL):
            self.display.finish(transition.job_id)

    def on_progress(self, progress: JobProgress) -> None:
        if progress.total:
            self.display.update(
                progress.job_id,
                f"{self.label} ({progress.job_id})",
                progress.done,
                progress.total,
                rate=progress.rate,
                eta=progress.eta,
            )

    def on_io_error(self, error: JobIOError) -> None:
        side = "source read" if error.operation == "read" else "target write"
        if error.action == "stop":
            say_paused(self.args, error)
        elif error.action in ("retry", "ignore") and error.count == 1:
            print(
                f"blockctl: job {error.job_id}: {side} error, retrying (error policy ignore)",
                file=sys.stderr,
            )


def say_paused(args: argparse.Namespace, error: JobIOError) -> None:
    """The command that resumes a paused job. Said even with --json (on stderr): a paused
    job waits for a human to act."""
    side = "source read" if error.operation == "read" else "target write"
    words = getattr(args, "words", None) or ["VM"]
    vm = getattr(args, "vm", None) or words[0]
    print(
        f"blockctl: job {error.job_id} paused on a {side} error; fix the cause, then "
        f"run `blockctl jobs {vm} resume {error.job_id}` within "
        f"{error.pause_timeout:g} s, or it is cancelled",
        file=sys.stderr,
    )


def error_policy_options(parser: argparse.ArgumentParser, *flags: str) -> None:
    """``--on-error``-style options (QEMU's job error policies) and ``--pause-timeout``."""
    for flag in flags:
        parser.add_argument(
            flag,
            choices=[p.value for p in ErrorPolicy],
            default=ErrorPolicy.REPORT.value,
            help="on an I/O error: fail (report, the default), pause until resumed (stop), "
            "pause only when out of space (enospc), or retry (ignore; bounded)",
        )
    parser.add_argument(
        "--pause-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a job paused on an I/O error waits for `blockctl jobs VM resume ID`",
    )


def job_hooks(args: argparse.Namespace, label: str) -> tuple[JobHook, ...]:
    return (StructlogJobHook(), JobBar(args, label), interrupt.TRACKER)


def job_control(args: argparse.Namespace, hooks: Sequence[JobHook]) -> JobControl:
    """A job command's ``--speed``, ``--timeout``, ``--on-error`` and ``--pause-timeout``
    (those it has)."""
    speed = getattr(args, "speed", None)
    return JobControl(
        speed=None if speed is None else parse_size(speed, "speed"),
        deadline=args.timeout,
        on_error=ErrorPolicy(getattr(args, "on_error", ErrorPolicy.REPORT)),
        pause_timeout=getattr(args, "pause_timeout", 60.0),
        hooks=hooks,
    )


class Jobs(Command):
    name = "jobs"
    help = (
        "list a VM's jobs, whichever process started them, or pause, resume, re-speed or cancel one"
    )

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument(
            "action",
            nargs="?",
            default="list",
            choices=["list", "cancel", "pause", "resume", "speed"],
        )
        parser.add_argument("job", nargs="?")
        parser.add_argument("speed", nargs="?", help="bytes/s, for `speed` (0: unlimited)")
        parser.add_argument(
            "--sample",
            type=float,
            default=0.5,
            metavar="SECONDS",
            help="list: measure each job's rate over this long (default 0.5; 0: no rate/ETA)",
        )

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            if args.action == "list":
                # A concluded job is dismissed (its outcome read) only when no other client is
                # attached: otherwise its owner may be about to read it (issue 14).
                jobs = await adopt_jobs(vm.session, dismiss=not vm.other_clients())
                rates = await sample_rates(vm, args.sample) if jobs else {}
                rows: list[dict[str, Any]] = []
                for job in jobs:
                    info = await job.info()
                    rate, eta = rates.get(job.id, (None, None))
                    outcome = job.outcome
                    # "failed"/"nospace": paused on an I/O error, waiting for a resume.
                    io_status = await job.io_status() if info else None
                    status = info.status.value if info else "dismissed"
                    done = info.current_progress if info else None
                    total = info.total_progress if info else None
                    # A backup's job only holds its point in time; the copy (its progress,
                    # its pause) is the backup process's, asked on its control socket.
                    copy = await control_ops.ask(vm.run_dir, job.id, "status") if info else None
                    if copy is not None:
                        status, io_status = copy["status"], copy["io_status"]
                        done, total = copy["done"], copy["total"]
                    rows.append(
                        {
                            "id": job.id,
                            "type": job.type,
                            "status": status,
                            "io_status": io_status,
                            "done": done,
                            "total": total,
                            "percent": None
                            if not total or done is None
                            else round(100 * done / total, 1),
                            "outcome": None
                            if outcome is None
                            else ("ok" if isinstance(outcome, JobResult) else str(outcome)),
                            "rate": None if rate is None else round(rate),
                            "eta": None if eta is None else round(eta, 1),
                            "sampled": args.sample if job.id in rates else None,
                            "driven_by": None if copy is None else copy["pid"],
                            "speed": None if copy is None else copy["speed"],
                            "monitor": "qemu",
                        }
                    )
                # A job in a vhost-user-blk disk's daemon (a backup, a commit, a stream):
                # known from its control socket (its process holds the daemon's one monitor).
                for device, job_id, copy in await control_ops.daemon_jobs(vm):
                    done, total = copy["done"], copy["total"]
                    rows.append(
                        {
                            "id": job_id,
                            "type": copy.get("type", "backup"),
                            "status": copy["status"],
                            "io_status": copy["io_status"],
                            "done": done,
                            "total": total,
                            "percent": None if not total else round(100 * done / total, 1),
                            "outcome": None,
                            "rate": None,
                            "eta": None,
                            "sampled": None,
                            "driven_by": copy["pid"],
                            "speed": copy["speed"],
                            "monitor": f"qsd:{device}",
                        }
                    )
                emit(args, rows, job_table(rows) if rows else "no jobs")
                return 0
            if args.job is None:
                raise ConfigError("job", "give the job's id (see `blockctl jobs VM`)")
            speed = None if args.speed is None else parse_size(args.speed, "speed")
            by = await control_ops.control_job(vm, args.job, args.action, speed=speed)
        emit(
            args,
            {"job": args.job, "action": args.action, "by": by},
            f"{args.job}: {args.action} sent (to {SENT_TO[by]})",
        )
        return 0


#: Who carried out ``jobs VM ACTION ID`` (:func:`blockctl._backup.control.control_job`).
SENT_TO = {
    "backup": "the backup",
    "daemon": "the process driving it in the qemu-storage-daemon",
    "qemu": "QEMU",
}


def job_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``jobs`` rows as a headed table, sizes and rates in binary units."""

    def size(n: int | None) -> str | None:
        return None if n is None else human_size(n)

    def note(r: Mapping[str, Any]) -> str:
        words = [] if r["outcome"] is None else [str(r["outcome"])]
        if r["io_status"] not in (None, "ok"):
            words.append(f"paused on an I/O error: {r['io_status']}")
        if r.get("driven_by") is not None:
            verb = "copied" if r["type"] == "backup" else "driven"
            words.append(f"{verb} by pid {r['driven_by']}")
        if str(r.get("monitor")).startswith("qsd:"):
            words.append(f"in {r['monitor'][4:]}'s qemu-storage-daemon")
        return "; ".join(words)

    return table(
        ("ID", "TYPE", "STATUS", "DONE", "TOTAL", "%", "RATE", "ETA", "NOTE"),
        [
            (
                r["id"],
                r["type"],
                r["status"],
                size(r["done"]),
                size(r["total"]),
                r["percent"],
                None if r["rate"] is None else f"{human_size(r['rate'])}/s",
                None if r["eta"] is None else f"{r['eta']:.0f} s",
                note(r),
            )
            for r in rows
        ],
        right={"DONE", "TOTAL", "%", "RATE", "ETA"},
    )


async def sample_rates(vm: VM, interval: float) -> dict[str, tuple[float | None, float | None]]:
    """Each running job's measured rate and ETA: two ``query-jobs`` ``interval`` s apart
    (:func:`blockctl._jobs.measured_rate`). Nothing when ``interval`` is 0."""
    if interval <= 0:
        return {}

    async def sample() -> dict[str, JobSample]:
        samples = {}
        for j in await wire.query_jobs(vm.session):
            if j.status in JOB_FINAL:
                continue
            done, total = j.current_progress, j.total_progress
            copy = await control_ops.ask(vm.run_dir, j.id, "status")
            if copy is not None:  # a backup: its copy's progress, not its job's
                done, total = copy["done"], copy["total"]
            samples[j.id] = JobSample(at=time.monotonic(), done=done, total=total)
        return samples

    first = await sample()
    if not first:
        return {}
    await anyio.sleep(interval)
    second = await sample()
    return {i: measured_rate(first[i], second[i]) for i in first.keys() & second.keys()}
