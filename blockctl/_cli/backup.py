"""The backup commands: ``backup``, ``restore`` and ``recover``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from blockctl import _lazy
from blockctl._cli import interrupt
from blockctl._cli.agent import add_quiesce_options, freeze_deadline_option, quiesce_option
from blockctl._cli.common import (
    Command,
    ExitCode,
    emit,
    global_options,
    image_location,
    iscsi_options,
    load_config,
)
from blockctl._cli.jobs import job_control, job_hooks, say_paused
from blockctl._cli.output import human_size
from blockctl._cli.progress import ProgressDisplay
from blockctl._jobs import JobIOError, JobProgress, JobTransition, StructlogJobHook
from blockctl._machine import attach
from blockctl._ops import drives
from blockctl.errors import ConfigError
from blockctl.types import Drive, ImageFormat, IscsiSource, NfsSource, coerce_enum, parse_size

if TYPE_CHECKING:
    from blockctl import backup as backup_ops
    from blockctl._ops import vm_recovery
else:
    # Imported when first used: `status`, `drives`, `ls` and `--version` need none of them.
    backup_ops = _lazy.module("blockctl.backup")
    vm_recovery = _lazy.module("blockctl._ops.vm_recovery")


class RecoverCommand(Command):
    name = "recover"
    help = "finish or report operations a stopped controller left (the journal vs QEMU)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("--repo", type=Path, help="also recover backups into this repository")
        parser.add_argument(
            "--key-file",
            type=Path,
            help="the repository's key file (encrypted; a live restore's server is replaced "
            "from it)",
        )
        parser.add_argument(
            "--forget", action="store_true", help="drop records that need attention (checked)"
        )
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")

    async def run(self, args: argparse.Namespace) -> int:
        repo = None if args.repo is None else open_repo(args)
        alive, results, notes = await vm_recovery.recover_vm(
            args.vm, repo=repo, deadline=args.timeout, forget=args.forget
        )
        data = {
            "qemu_running": alive,
            "operations": [r.to_json() for r in results],
            "backup": notes,
        }
        lines = [f"{r.verdict.value}: {r.message}" for r in results]
        lines += [f"backup: {n}" for n in notes]
        emit(args, data, "\n".join(lines) or "nothing to recover")
        return ExitCode.PENDING if any(r.kept for r in results) else ExitCode.OK


class BackupProgress:
    """A progress hook: a line per disk with bytes read, rate and ETA on stderr
    (blockctl._cli.progress: live on a terminal, a plain line every 5 s otherwise; nothing
    with --json), and the command that resumes a copy paused on a write error."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.display = ProgressDisplay(enabled=not args.json)

    def on_transition(self, transition: JobTransition) -> None:
        pass

    def on_io_error(self, error: JobIOError) -> None:
        say_paused(self.args, error)

    def on_progress(self, progress: JobProgress) -> None:
        if progress.job_type != "backup-read":
            return
        disk = progress.job_id.removeprefix("read-")
        self.display.update(
            disk,
            f"{disk} read",
            progress.done,
            progress.total,
            rate=progress.rate,
            eta=progress.eta,
        )


def repo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="the backup repository")
    parser.add_argument(
        "--key-file",
        type=Path,
        help="an encrypted repository's key file (mode 0600; its content is the secret)",
    )


def open_repo(args: argparse.Namespace) -> backup_ops.Repository:
    return backup_ops.open_repository(args.repo, key_file=args.key_file)


def manifest_json(manifest: backup_ops.Manifest) -> dict[str, Any]:
    return {**manifest.to_json(), **backup_ops.summary(manifest)}


def manifest_line(m: backup_ops.Manifest) -> str:
    figures = backup_ops.summary(m)
    dedup = figures["dedup_ratio"]
    ratio = "-" if dedup is None else f"{dedup:.1f}x"
    return (
        f"{m.id}  {m.kind:<11}  {human_size(m.bytes_read):>10}  {human_size(m.bytes_new):>10}  "
        f"{human_size(m.bytes_stored):>10}  {ratio:>6}  {m.consistency:<10}"
        + (f"  (full because {m.fallback_reason})" if m.fallback_reason else "")
    )


MANIFEST_HEADER = (
    f"{'POINT':<27}  {'KIND':<11}  {'READ':>10}  {'NEW':>10}  {'STORED':>10}  {'DEDUP':>6}  "
    "CONSISTENCY"
)


class BackupCommand(Command):
    name = "backup"
    help = "backups into a chunked repository: init, create, list, verify, prune, gc"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        p = sub.add_parser(
            "init", parents=[global_options(parent=False)], help="create a repository (owner-only)"
        )
        repo_options(p)
        p.add_argument("--chunk-size", help="fixed chunk size (default 4M; 64K to 32M)")
        p.add_argument("--compression", choices=["zstd", "none"], default="zstd")
        p = sub.add_parser(
            "create",
            parents=[global_options(parent=False)],
            help="back up a running VM (incremental since this repository's last point, or "
            "full when there is none)",
        )
        p.add_argument("vm")
        repo_options(p)
        p.add_argument("--full", action="store_true", help="read every non-zero chunk")
        p.add_argument("--disk", action="append", help="device (repeat; default: all)")
        p.add_argument("--connections", type=int, default=2, help="NBD connections per disk")
        p.add_argument(
            "--speed", help="read at most this many bytes/s, all disks together (e.g. 100M)"
        )
        p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
        p.add_argument(
            "--scratch-dir", type=Path, help="where the fleecing overlays go (default: TMPDIR)"
        )
        p.add_argument(
            "--on-error",
            choices=["report", "enospc", "stop"],
            default="report",
            help="a repository write error fails the backup (report, the default), or pauses "
            "the copy until `blockctl jobs VM resume ID`: when out of space (enospc), or on "
            "any write error (stop)",
        )
        p.add_argument(
            "--pause-timeout",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="how long a paused backup waits for the resume before it fails",
        )
        add_quiesce_options(p, "a backup")
        p = sub.add_parser(
            "list", parents=[global_options(parent=False)], help="a VM's backup points"
        )
        p.add_argument("vm")
        repo_options(p)
        p = sub.add_parser(
            "verify",
            parents=[global_options(parent=False)],
            help="check every chunk a point depends on (default: every point of the VM)",
        )
        p.add_argument("vm")
        p.add_argument("backup_id", nargs="?")
        repo_options(p)
        p.add_argument(
            "--sample", type=float, metavar="FRACTION", help="check this fraction of the chunks"
        )
        p = sub.add_parser(
            "prune",
            parents=[global_options(parent=False)],
            help="delete old points, then unreferenced chunks",
        )
        p.add_argument("vm")
        repo_options(p)
        p.add_argument("--keep", type=int, help="how many points to keep")
        p.add_argument(
            "--keep-within", type=float, metavar="SECONDS", help="also keep points newer than this"
        )
        p.add_argument("--no-gc", action="store_true", help="leave the chunks for a later gc")
        p = sub.add_parser(
            "gc", parents=[global_options(parent=False)], help="remove chunks no point references"
        )
        repo_options(p)

    async def run(self, args: argparse.Namespace) -> int:
        action = args.action
        if action == "init":
            key = None if args.key_file is None else args.key_file
            chunk = None if args.chunk_size is None else parse_size(args.chunk_size, "chunk_size")
            repo = backup_ops.init_repository(
                args.repo, key_file=key, chunk_size=chunk, compression=args.compression
            )
            emit(
                args,
                {
                    "repository": str(repo.path),
                    "id": repo.config.id,
                    "chunk_size": repo.chunk_size,
                    "compression": repo.config.compression,
                    "encrypted": repo.encrypted,
                },
                f"created {'an encrypted ' if repo.encrypted else 'a '}repository at {repo.path} "
                f"(chunks of {human_size(repo.chunk_size)}, {repo.config.compression})",
            )
            return 0
        repo = open_repo(args)
        if action == "list":
            manifests = repo.manifests(args.vm)
            lines = [MANIFEST_HEADER, *(manifest_line(m) for m in manifests)]
            emit(
                args,
                [manifest_json(m) for m in manifests],
                "\n".join(lines) if manifests else f"no backups of {args.vm} in {repo.path}",
            )
            return 0
        if action == "verify":
            ids = [args.backup_id] if args.backup_id else [m.id for m in repo.manifests(args.vm)]
            if not ids:
                raise ConfigError("backup", f"no backups of {args.vm} in {repo.path} to verify")
            reports = [
                await backup_ops.verify(repo, args.vm, point, sample=args.sample) for point in ids
            ]
            emit(
                args,
                [
                    {
                        "id": r.point,
                        "ok": r.ok,
                        "problems": list(r.problems),
                        "chunks_checked": r.chunks_checked,
                        "bytes_checked": r.bytes_checked,
                        "affected": list(r.affected),
                    }
                    for r in reports
                ],
                "\n".join(
                    f"{r.point}: ok ({r.chunks_checked} chunks, {human_size(r.bytes_checked)})"
                    if r.ok
                    else f"{r.point}: FAILED\n  " + "\n  ".join(r.problems)
                    for r in reports
                ),
            )
            return ExitCode.OK if all(r.ok for r in reports) else ExitCode.DIFFERENT
        if action == "prune":
            result = await backup_ops.prune(
                repo,
                args.vm,
                keep_last=args.keep,
                keep_within=args.keep_within,
                gc=not args.no_gc,
            )
            human = (
                f"deleted {len(result.deleted)} point(s), kept {len(result.kept)}; removed "
                f"{result.chunks_removed} chunk(s), {human_size(result.bytes_removed)}"
            )
            if result.gc_skipped:
                human += f"; chunks not collected: {result.gc_skipped}"
            for served in result.served:
                human += f"\nkept {served.point}: {served.reason}"
            emit(args, dataclasses.asdict(result), human)
            return 0
        if action == "gc":
            gc = await anyio.to_thread.run_sync(repo.gc)
            emit(
                args,
                dataclasses.asdict(gc),
                f"removed {gc.chunks_removed} chunk(s) ({human_size(gc.bytes_removed)}), "
                f"kept {gc.chunks_kept}",
            )
            return 0
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            manifest = await backup_ops.create(
                vm,
                repo,
                kind="full" if args.full else "incremental",
                devices=args.disk,
                options=backup_ops.BackupOptions(
                    quiesce=quiesce_option(args),
                    freeze_deadline=freeze_deadline_option(args),
                    connections=args.connections,
                    scratch_dir=args.scratch_dir,
                ),
                control=job_control(
                    args, (StructlogJobHook(), BackupProgress(args), interrupt.TRACKER)
                ),
            )
        note = f" (full because {manifest.fallback_reason})" if manifest.fallback_reason else ""
        emit(
            args,
            manifest_json(manifest),
            f"{manifest.id}: {manifest.kind} backup of {len(manifest.disks)} disk(s): read "
            f"{human_size(manifest.bytes_read)}, new {human_size(manifest.bytes_new)}, stored "
            f"{human_size(manifest.bytes_stored)}{note}",
        )
        return 0


class RestoreCommand(Command):
    name = "restore"
    help = "rebuild a disk at a backup point into a new image (every chunk verified)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("backup_id")
        parser.add_argument("device")
        parser.add_argument(
            "dest",
            help="a new file, a block device, an iSCSI LUN (-O raw; "
            "iscsi://host[:port]/iqn/lun) or an NFS image (nfs://server/path), both existing",
        )  # a str: a Path would fold a URL's // into /
        repo_options(parser)
        iscsi_options(parser)
        parser.add_argument(
            "-O",
            "--output-format",
            choices=["qcow2", "raw"],
            help="qcow2 unless given; with --launch: the config's drive's format",
        )
        parser.add_argument(
            "--attach", metavar="TARGET_VM", help="hot-plug the restored disk into this running VM"
        )
        parser.add_argument(
            "--launch",
            metavar="CONFIG",
            type=Path,
            help="with --live: launch the VM of this TOML config (as `up`), its drive whose "
            "file is DEST (qcow2, or raw: a new file or a block device) or whose LUN is DEST "
            "(raw, iscsi://host[:port]/iqn/lun) served by the point from the start",
        )
        parser.add_argument(
            "--live",
            action="store_true",
            help="with --attach: attach the disk at once and copy the point into it while the "
            "guest uses it (-O raw: a new raw file, a block device, an iscsi:// LUN or an nfs:// "
            "image, mirrored "
            "from an overlay); with --launch: start the VM on it at once",
        )
        parser.add_argument("--speed", help="--live: bytes/s limit of the copy (e.g. 50M)")
        parser.add_argument(
            "--timeout", type=float, default=3600.0, metavar="SECONDS", help="--live: the copy's"
        )

    async def run(self, args: argparse.Namespace) -> int:
        fmt = coerce_enum(ImageFormat, args.output_format or "qcow2", "output_format")
        if args.launch is not None and not args.live:
            raise ConfigError("launch", "--launch starts a VM on a --live restore: add --live")
        if args.live:
            if args.launch is not None:
                if args.attach:
                    raise ConfigError("launch", "--launch and --attach: give one of them")
                return await self._launch(args, open_repo(args), fmt)
            if not args.attach:
                raise ConfigError(
                    "live",
                    "--live needs --attach TARGET_VM (the running VM to restore into) or "
                    "--launch CONFIG (a VM to start on the restored disk)",
                )
            return await self._live(args, open_repo(args), fmt)
        if args.speed is not None:
            raise ConfigError("speed", "--speed limits a --live restore's copy")
        repo = open_repo(args)
        dest = image_location(args.dest, args)
        result = await backup_ops.restore(repo, args.vm, args.backup_id, args.device, dest, fmt)
        where = str(result.path) if isinstance(result.path, Path) else result.path.url
        attached = None
        if args.attach:
            if isinstance(result.path, IscsiSource):
                drive = Drive(iscsi=result.path, format=fmt)
            elif isinstance(result.path, NfsSource):
                drive = Drive(nfs=result.path, format=fmt)
            else:
                drive = Drive(file=result.path, format=fmt)
            async with attach(args.attach, vm_name=args.vm_name) as vm:
                attached = (await drives.hotplug(vm, drive)).device_id
        emit(
            args,
            {
                "restored": where,
                "format": fmt.value,
                "device": args.device,
                "point": args.backup_id,
                "bytes_written": result.bytes_written,
                "chunks_verified": result.chunks_verified,
                "seconds": result.seconds,
                "attached": attached,
            },
            f"restored {args.device} of {args.backup_id} to {where} "
            f"({human_size(result.bytes_written)} written, {result.chunks_verified} chunks "
            "verified)" + (f", attached to {args.attach} as {attached}" if attached else ""),
        )
        return 0

    async def _launch(
        self, args: argparse.Namespace, repo: backup_ops.Repository, fmt: ImageFormat
    ) -> int:
        config = load_config(args.launch, None)
        for option in ("initiator_name", "chap_user", "chap_password_file"):
            if getattr(args, option) is not None:
                raise ConfigError(
                    option.replace("_", "-"),
                    "with --launch the config's LUN drive gives how QEMU logs in: drop it",
                )
        result = await backup_ops.launch_live(
            config,
            repo,
            args.vm,
            args.backup_id,
            args.device,
            # A LUN or NFS drive is named by its URL (a Path would fold its // into /); a
            # path is made absolute by launch_live.
            args.dest if args.dest.startswith(("iscsi://", "nfs://")) else Path(args.dest),
            control=job_control(args, job_hooks(args, "restore")),
            target_format=None if args.output_format is None else fmt,
        )
        where = (
            result.path.url
            if isinstance(result.path, IscsiSource | NfsSource)
            else str(result.path)
        )
        emit(
            args,
            {
                "restored": where,
                "format": result.format.value,
                "device": args.device,
                "point": args.backup_id,
                "live": True,
                "launched": result.vm,
                "attached": result.device_id,
                "seconds_to_start": result.seconds_to_start,
                "seconds": result.seconds,
                "bytes_streamed": result.job.length,
            },
            f"launched {result.vm} with {args.device} of {args.backup_id} live as "
            f"{result.device_id} (running after {result.seconds_to_start:.2f} s, standalone on "
            f"{where} after {result.seconds:.2f} s)",
        )
        return 0

    async def _live(
        self, args: argparse.Namespace, repo: backup_ops.Repository, fmt: ImageFormat
    ) -> int:
        target = image_location(args.dest, args)
        async with attach(args.attach, vm_name=args.vm_name) as vm:
            result = await backup_ops.restore_live(
                vm,
                repo,
                args.vm,
                args.backup_id,
                args.device,
                target,
                control=job_control(args, job_hooks(args, "restore")),
                target_format=fmt,
            )
        where = (
            result.path.url
            if isinstance(result.path, IscsiSource | NfsSource)
            else str(result.path)
        )
        emit(
            args,
            {
                "restored": where,
                "format": fmt.value,
                "device": args.device,
                "point": args.backup_id,
                "live": True,
                "attached": result.device_id,
                "seconds_to_attach": result.seconds_to_attach,
                "seconds": result.seconds,
                "bytes_streamed": result.job.length,
            },
            f"restored {args.device} of {args.backup_id} live into {args.attach} as "
            f"{result.device_id} (attached after {result.seconds_to_attach:.2f} s, standalone "
            f"on {where} after {result.seconds:.2f} s)",
        )
        return 0
