"""A backup that fails at any step records no point and loses no write (issue 13).

Every case starts from a good point P (its reference image taken with the VM paused). The
guest writes W1 (random data, 1 MiB at the start of three distinct 4 MiB chunks, O_DIRECT and
fsync), a backup fails at step S, and then:

- the failure is the injected one (its own type), or ENOSPC naming what was being written;
- no new point is recorded and no incomplete point directory is left;
- QEMU holds nothing of the attempt: no fleecing node (``bcf*``), no export, no job; the
  scratch directory holds no file;
- the repository's checkpoint on the disk is exactly one bitmap, recording, named after P,
  and its dirty count still covers W1;
- the guest writes W2 (another chunk) and the next incremental succeeds, reads exactly the
  W1 and W2 chunks, and restores equal to a reference taken with the VM paused: W1 was not
  lost.

The steps: every name in ``operations.STEPS`` ("after-manifest": the point *is* recorded and
restores exactly; the previous checkpoint may linger until the failure path, a recovery or the
next backup settles it), a failure during the copy
(``_fail_after_chunks=1``), real ENOSPC at the chunk writes (a small tmpfs that fills, then
grows), at the index write and at the manifest write (the tmpfs filled at the step before),
the controller killed -9 at every step and mid-copy (a child process, then
``backup.recover``; the guest writes between the kill and the recovery, into the attempt's
new bitmap only), and QEMU killed -9 after the transaction (restarted on the same disk: the
next backup is full with a true reason, and exact).

The in-process failures run with the guest idle during the attempt (nothing awaits inside a
failpoint); writes that land in an attempt's own bitmap and must be merged back are the
controller-kill cases (the failure path and recovery settle the checkpoints with the same code).
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from blockctl import GuestImage, open_vm
from blockctl._backup import checkpoints
from blockctl._backup import operations as ops
from blockctl._backup.store import Manifest, Repository
from blockctl._console import GuestConsole
from blockctl._fsutil import TMP_SUFFIX
from blockctl._jobs import JobIOError, JobProgress, JobTransition
from blockctl._machine import VM, attach, launch_detached, shutdown_detached
from blockctl._qmp import wire
from blockctl._qmp.models import DirtyBitmap
from blockctl.backup import BackupOptions
from blockctl.errors import ConnectionLost, RepositoryError
from blockctl.jobs import JobControl
from tests.conftest import missing
from tests.figures import Tally, report, require_any
from tests.integration.conftest import MIB, qcow2_image, qemu_binary, run, shell_prompt_in
from tests.integration.test_backup import config
from tests.integration.test_repository import restore_equals, same

pytestmark = pytest.mark.guest

ROOT = Path(__file__).parents[2]
DISK_MIB = 64
CHUNK = 4 * MIB  # the repository's default chunk size (asserted)
#: Per fault point, the checks that held (the figure counts only points that passed all).
FAULTS = Tally(
    {
        "error": "the failure reported as itself",
        "no-point": "no point recorded (after-manifest: the point restores exactly)",
        "nothing-left": "nothing left in QEMU, the repository or the scratch directory",
        "checkpoint": "the checkpoint kept (one bitmap, recording, named after the last good "
        "point, covering the writes since)",
        "next-exact": "the next backup restores equal to a reference taken with the VM paused",
        "copied": "the copy failed midway (some chunks read, not all)",
        "gc": "a writer killed mid-copy left chunk temporaries (recovery keeps them), which "
        "gc removed",
    }
)
#: The checks every fault point runs ("copied": only a failure during the copy; "gc": only
#: a controller killed during the copy).
EVERY = frozenset(FAULTS.checks) - {"copied", "gc"}


class Injected(Exception):
    """The failure a failpoint raises."""


def fail_at(step: str) -> Callable[[str], None]:
    def failpoint(at: str) -> None:
        assert at in ops.STEPS
        if at == step:
            raise Injected(step)

    return failpoint


class Progress:
    """A JobHook keeping the backup's progress records (the read's bytes done / total)."""

    def __init__(self) -> None:
        self.records: list[JobProgress] = []

    def on_transition(self, transition: JobTransition) -> None:
        pass

    def on_progress(self, progress: JobProgress) -> None:
        if progress.job_type == "backup-read":
            self.records.append(progress)

    def on_io_error(self, error: JobIOError) -> None:
        pass


# Section: the guest, the checkpoint, the references


class Writes:
    """The guest's writes, one chunk set per case (W1: three chunks, W2: a fourth)."""

    def __init__(self, console: GuestConsole) -> None:
        self.console = console

    async def dd(self, chunk: int, within_kib: int, kib: int) -> None:
        offset_kib = chunk * (CHUNK // 1024) + within_kib
        await self.console.check(
            f"dd if=/dev/urandom of=/dev/vda bs=64k seek={offset_kib // 64} count={kib // 64} "
            "oflag=direct conv=fsync 2>/dev/null"
        )

    @staticmethod
    def chunks(case: int) -> tuple[tuple[int, int, int], int]:
        """W1's three chunks and W2's chunk for case ``case`` (distinct within a case)."""
        return (1 + case % 16, (6 + case) % 16, (11 + case) % 16), (3 + case) % 16

    async def w1(self, case: int) -> int:
        for chunk in self.chunks(case)[0]:
            await self.dd(chunk, 0, 1024)
        return 3 * MIB

    async def w2(self, case: int) -> int:
        await self.dd(self.chunks(case)[1], 1024, 512)
        return 512 * 1024


async def my_bitmaps(vm: VM, repo: Repository) -> list[DirtyBitmap]:
    """The repository's bitmaps on the VM's one qcow2 disk (its format node: while a
    fleecing job runs, a copy-before-write filter sits above it)."""
    [disk] = [
        d
        for d in await wire.query_named_block_node_details(vm.session)
        if d.node.driver == "qcow2" and not d.node.node_name.startswith("bcf")
    ]
    prefix = checkpoints.repository_prefix(repo.config.id)
    return [b for b in disk.dirty_bitmaps if b.name is not None and b.name.startswith(prefix)]


async def checkpoint_of(vm: VM, repo: Repository, point: str, covers: int, what: str) -> int:
    """The repository's one checkpoint: named after ``point``, recording, at least ``covers``
    bytes dirty. Returns its dirty count."""
    found = await my_bitmaps(vm, repo)
    assert len(found) == 1, f"{what}: the repository's checkpoints on disk0: {found}"
    [bitmap] = found
    assert bitmap.name == checkpoints.bitmap_name(repo.config.id, point), (what, bitmap)
    assert bitmap.recording and not bitmap.inconsistent and not bitmap.busy, (what, bitmap)
    assert bitmap.count >= covers, (what, bitmap.count, covers)
    return bitmap.count


def temporaries(repo: Repository) -> list[Path]:
    """Every temporary file in the repository (chunks' and atomic writes' alike)."""
    return sorted(p for p in repo.path.rglob("*") if p.name.endswith(TMP_SUFFIX))


async def nothing_left(
    vm: VM, repo: Repository, name: str, points: list[str], scratch: Path, what: str
) -> None:
    """No point but ``points``, no incomplete point (every entry of the VM's point
    directory, whatever its name, with or without a manifest), no temporary file anywhere in
    the repository, nothing of a backup left in QEMU, no scratch file."""
    assert [m.id for m in repo.manifests(name)] == points, what
    # (Its ".lock" is the one-backup-per-VM lock file: it stays.)
    entries = sorted(e for e in os.listdir(repo.path / "points" / name) if e != ".lock")
    assert entries == sorted(points), f"{what}: left in the point directory: {entries}"
    assert temporaries(repo) == [], f"{what}: temporary files left: {temporaries(repo)}"
    nodes = [n.node_name for n in await vm.block_nodes() if n.node_name.startswith("bcf")]
    assert nodes == [], (what, nodes)
    assert await wire.query_block_exports(vm.session) == (), what
    assert await wire.query_jobs(vm.session) == (), what
    files = [p for p in scratch.rglob("*") if not p.is_dir()]
    assert files == [], (what, files)


async def reference(vm: VM, disk: Path, out: Path) -> Path:
    """The disk as the guest sees it now (the VM must be paused: QEMU flushed it)."""
    ref = out / f"ref-{len(list(out.glob('ref-*')))}.raw"
    await run(qemu_binary("qemu-img"), "convert", "-U", "-f", "qcow2", "-O", "raw", disk, ref)
    return ref


async def paused_backup(
    vm: VM, repo: Repository, disk: Path, out: Path, *, scratch_dir: Path
) -> tuple[Path, Manifest]:
    """A reference, then a backup, with the VM paused (the point and the reference are the
    same instant)."""
    await wire.stop(vm.session)
    try:
        ref = await reference(vm, disk, out)
        manifest = await ops.backup(vm, repo, options=BackupOptions(scratch_dir=scratch_dir))
    finally:
        await wire.cont(vm.session)
    return ref, manifest


async def next_incremental(
    vm: VM,
    repo: Repository,
    name: str,
    disk: Path,
    out: Path,
    *,
    parent: str,
    chunks_read: int,
    scratch: Path,
    what: str,
) -> Manifest:
    """The incremental after a failure: complete, reads exactly the chunks written since
    ``parent``, restores equal to its reference, leaves one checkpoint named after it."""
    ref, manifest = await paused_backup(vm, repo, disk, out, scratch_dir=scratch)
    assert manifest.kind == "incremental" and manifest.parent == parent, (what, manifest)
    assert manifest.disk("disk0").bytes_read == chunks_read * CHUNK, (what, manifest)
    assert await restore_equals(repo, name, manifest.id, "disk0", ref, out), (
        f"{what}: the next incremental does not restore the guest's disk"
    )
    await checkpoint_of(vm, repo, manifest.id, 0, f"{what}: after the next incremental")
    await nothing_left(
        vm, repo, name, [m.id for m in repo.manifests(name)], scratch, f"{what} (next)"
    )
    ref.unlink()
    return manifest


# Section: a failure at each step, and during the copy


async def test_failure_at_every_step_records_nothing_and_loses_no_write(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    repo = ops.init_repository(tmp_path / "R")
    assert repo.chunk_size == CHUNK
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    cases: list[tuple[str, dict[str, Any], type[Exception]]] = [
        (step, {"_failpoint": fail_at(step)}, Injected) for step in ops.STEPS
    ]
    # One connection: the copy stops right after its first chunk, one of W1's three.
    one = BackupOptions(scratch_dir=scratch, connections=1)
    cases.insert(3, ("copy", {"_fail_after_chunks": 1, "options": one}, OSError))
    async with open_vm(config(guest, "faults", disk)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        guest_writes = Writes(vm.console)
        await guest_writes.dd(0, 0, 2048)
        _ref0, good = await paused_backup(vm, repo, disk, tmp_path, scratch_dir=scratch)
        assert good.kind == "full"
        for n, (step, fault, error) in enumerate(cases):
            what = f"failure at {step}"
            required = EVERY | ({"copied"} if step == "copy" else set())
            with FAULTS.case(step, required=required) as ok:
                w1 = await guest_writes.w1(n)
                before = await checkpoint_of(vm, repo, good.id, w1, f"{what}: before")
                points = [m.id for m in repo.manifests("faults")]
                progress = Progress()
                await wire.stop(vm.session)
                try:
                    ref = await reference(vm, disk, tmp_path)
                    with pytest.raises(error) as raised:
                        await ops.backup(
                            vm,
                            repo,
                            **{"options": BackupOptions(scratch_dir=scratch), **fault},
                            control=JobControl(hooks=[progress]),
                        )
                finally:
                    await wire.cont(vm.session)
                if isinstance(raised.value, OSError):
                    assert raised.value.errno == errno.EIO and "injected" in str(raised.value)
                else:
                    assert str(raised.value) == step
                ok.add("error")
                if step == "copy":
                    # Midway: W1's three chunks to read, one read (and stored, then dropped)
                    # before the failure. A bitmap that lost the copied chunk shows below.
                    last = progress.records[-1]
                    assert (last.done, last.total) == (CHUNK, 3 * CHUNK), last
                    ok.add("copied")
                if step == "after-manifest":
                    # The manifest is the commit point: this point exists and is exact.
                    [recorded] = [m for m in repo.manifests("faults") if m.id not in points]
                    assert recorded.parent == good.id
                    assert await restore_equals(repo, "faults", recorded.id, "disk0", ref, tmp_path)
                    ok.add("no-point")
                    await nothing_left(vm, repo, "faults", [*points, recorded.id], scratch, what)
                    ok.add("nothing-left")
                    # Its checkpoint records; the previous one may linger (disabled) until the
                    # next backup settles it.
                    names = {b.name for b in await my_bitmaps(vm, repo)}
                    new = checkpoints.bitmap_name(repo.config.id, recorded.id)
                    assert new in names
                    assert names <= {new, checkpoints.bitmap_name(repo.config.id, good.id)}
                    ok.add("checkpoint")
                    good, chunks = recorded, 1  # the next incremental reads W2's chunk only
                else:
                    assert [m.id for m in repo.manifests("faults")] == points, what
                    ok.add("no-point")
                    await nothing_left(vm, repo, "faults", points, scratch, what)
                    ok.add("nothing-left")
                    after = await checkpoint_of(vm, repo, good.id, w1, f"{what}: after")
                    assert after == before, (what, before, after)
                    ok.add("checkpoint")
                    chunks = 4  # W1's three and W2's
                ref.unlink()
                await guest_writes.w2(n)
                good = await next_incremental(
                    vm,
                    repo,
                    "faults",
                    disk,
                    tmp_path,
                    parent=good.id,
                    chunks_read=chunks,
                    scratch=scratch,
                    what=what,
                )
                ok.add("next-exact")


# Section: ENOSPC


@asynccontextmanager
async def small_tmpfs(path: Path, size: str) -> AsyncIterator[Path]:
    if os.geteuid() != 0:
        missing("root (to mount a small tmpfs)")
    path.mkdir()
    await run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path)
    try:
        yield path
    finally:
        await run("umount", "-l", path)  # lazy: a failed case may still hold a file open


def fill(mount: Path) -> Path:
    """Fill the file system up: no page is left for anything else."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write_until_full(block: int) -> None:
        while True:
            os.write(fd, b"\xff" * block)

    try:
        for block in (MIB, 4096):
            with pytest.raises(OSError, match="No space left") as full:
                write_until_full(block)
            assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def test_enospc_at_chunk_index_and_manifest_writes(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    """The repository on a 4 MiB tmpfs: the full backup (1 MiB of data) fits; W1 (3 MiB) does
    not, the chunk writes fail midway. The tmpfs grows; then it is filled by hand right before
    the index write, and right before the manifest write. Each failure names ENOSPC and what
    was being written; each next incremental is complete and exact."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    async with (
        small_tmpfs(tmp_path / "small", "4m") as mount,
        open_vm(config(guest, "full", disk)) as vm,
    ):
        assert vm.console is not None
        await vm.console.wait_ready()
        repo = ops.init_repository(mount / "R")  # zstd: a chunk stores its 1 MiB of data
        guest_writes = Writes(vm.console)
        await guest_writes.dd(0, 0, 1024)
        _ref, good = await paused_backup(vm, repo, disk, tmp_path, scratch_dir=scratch)
        filler: Path | None = None

        def fill_at(step: str) -> Callable[[str], None]:
            def failpoint(at: str) -> None:
                nonlocal filler
                if at == step:
                    filler = fill(mount)

            return failpoint

        cases: list[tuple[str, dict[str, Any], str]] = [
            ("chunk", {}, "writing chunk"),
            ("index", {"_failpoint": fill_at("after-chunks")}, "writing the index of disk0"),
            ("manifest", {"_failpoint": fill_at("after-index")}, "writing the manifest"),
        ]
        for n, (where, fault, message) in enumerate(cases):
            what = f"ENOSPC at the {where} write"
            required = EVERY | ({"copied"} if where == "chunk" else set())
            with FAULTS.case(f"ENOSPC@{where}", required=required) as ok:
                w1 = await guest_writes.w1(n)
                before = await checkpoint_of(vm, repo, good.id, w1, f"{what}: before")
                points = [m.id for m in repo.manifests("full")]
                progress = Progress()
                with pytest.raises(RepositoryError, match="ENOSPC") as raised:
                    await ops.backup(
                        vm,
                        repo,
                        **fault,
                        options=BackupOptions(scratch_dir=scratch),
                        control=JobControl(hooks=[progress]),
                    )
                assert type(raised.value) is RepositoryError, raised.value  # not a subclass
                assert message in str(raised.value), (what, str(raised.value))
                ok.add("error")
                if where == "chunk":
                    # The file system filled up midway: some of W1's chunks were read and
                    # stored (then dropped), not all.
                    last = progress.records[-1]
                    assert 0 < last.done < last.total == 3 * CHUNK, last
                    ok.add("copied")
                assert [m.id for m in repo.manifests("full")] == points, what
                ok.add("no-point")
                await nothing_left(vm, repo, "full", points, scratch, what)
                ok.add("nothing-left")
                after = await checkpoint_of(vm, repo, good.id, w1, what)
                assert after == before, (what, before, after)
                ok.add("checkpoint")
                if where == "chunk":
                    await run("mount", "-o", "remount,size=64m", mount)
                else:
                    assert filler is not None
                    filler.unlink()
                await guest_writes.w2(n)
                good = await next_incremental(
                    vm,
                    repo,
                    "full",
                    disk,
                    tmp_path,
                    parent=good.id,
                    chunks_read=4,
                    scratch=scratch,
                    what=what,
                )
                ok.add("next-exact")


# Section: the controller is killed -9


@asynccontextmanager
async def detached(guest: GuestImage, name: str, disk: Path) -> AsyncIterator[GuestConsole]:
    """A VM that outlives its controllers (``blockctl up``), and a shell on its console
    socket; always stopped."""
    record = await launch_detached(config(guest, name, disk))
    try:
        assert record.console_socket is not None and record.console_log is not None
        await shell_prompt_in(Path(record.console_log))
        stream = await anyio.connect_unix(record.console_socket)
        console = GuestConsole(stream, name)
        try:
            # The prompt was printed before we listened: a fresh shell prints the banner and
            # the prompt the console waits for.
            await stream.send(b"exit\n")
            await console.wait_ready()
            yield console
        finally:
            await console.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await shutdown_detached(name)


async def kill_controller_at(
    name: str, step: str, repo: Repository, scratch: Path, request_id: str | None = None
) -> None:
    """``crash_child`` attaches to the VM, runs an incremental (of ``request_id``) and
    SIGKILLs itself at ``step``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args: dict[str, Any] = {"repo": str(repo.path), "scratch_dir": str(scratch)}
    if request_id is not None:
        args["request_id"] = request_id
    argv = [sys.executable, "-m", "tests.integration.crash_child", name, "backup", step]
    done = await anyio.run_process([*argv, json.dumps(args)], check=False, env=env, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr.decode()[-2000:])


#: Where the child dies: every step, and "copy" (its first progress record of the read, with
#: QEMU's fleecing job, nodes, NBD server and export all live). At "after-server-start" QEMU's
#: NBD server runs with no export yet: recovery must still stop it, or every later backup is
#: refused ("NBD server already running"; seen in a fleet run where a worker died with two
#: backups in flight).
KILL_STEPS = (
    "before-transaction",
    "after-transaction",
    "after-server-start",
    "copy",
    *ops.STEPS[3:],
)
#: What each kill leaves before recovery: (fleecing nodes, job, export, the incomplete point's
#: files, the repository's bitmaps: the last good point's and the attempt's, and whether the
#: good one records).
KILL_LEAVES: dict[str, tuple[bool, bool, bool, list[str] | None, str]] = {
    "before-transaction": (False, False, False, [], "good, recording"),
    "after-transaction": (True, True, False, [], "good + new, frozen"),
    "after-server-start": (True, True, False, [], "good + new, frozen"),
    "copy": (True, True, True, [], "good + new, frozen"),
    "after-chunks": (False, False, False, [], "good + new, frozen"),
    "after-index": (False, False, False, ["disk0.index"], "good + new, frozen"),
    "after-manifest": (False, False, False, None, "good + new, frozen"),
}


async def left_behind(
    vm: VM, repo: Repository, name: str, good: str
) -> tuple[bool, bool, bool, list[str] | None, str]:
    nodes = any(n.node_name.startswith("bcf") for n in await vm.block_nodes())
    jobs = bool(await wire.query_jobs(vm.session))
    exports = bool(await wire.query_block_exports(vm.session))
    incomplete = repo.incomplete_points(name)
    files = (
        sorted(os.listdir(repo.path / "points" / name / incomplete[0]))
        if len(incomplete) == 1
        else None
    )
    bitmaps = {b.name: b for b in await my_bitmaps(vm, repo)}
    base = bitmaps.pop(checkpoints.bitmap_name(repo.config.id, good), None)
    assert base is not None, bitmaps
    state = "recording" if base.recording else "frozen"
    return nodes, jobs, exports, files, f"good{' + new' if bitmaps else ''}, {state}"


async def test_controller_killed_at_every_step_then_recovered_loses_no_write(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    repo = ops.init_repository(tmp_path / "R")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    async with detached(guest, "killed", disk) as console:
        guest_writes = Writes(console)
        await guest_writes.dd(0, 0, 2048)
        async with attach("killed") as vm:
            _ref, good = await paused_backup(vm, repo, disk, tmp_path, scratch_dir=scratch)
        for n, step in enumerate(KILL_STEPS):
            what = f"controller killed at {step}"
            required = EVERY | ({"gc"} if step == "copy" else set())
            with FAULTS.case(f"controller-kill@{step}", required=required) as ok:
                w1 = await guest_writes.w1(n)
                points = [m.id for m in repo.manifests("killed")]
                async with attach("killed") as vm:
                    await wire.stop(vm.session)
                    ref = await reference(vm, disk, tmp_path)
                try:
                    await kill_controller_at("killed", step, repo, scratch)
                finally:
                    async with attach("killed") as vm:
                        await wire.cont(vm.session)
                # The guest writes before anything is recovered: after the transaction, these
                # writes are only in the killed attempt's new bitmap.
                w2 = await guest_writes.w2(n)
                async with attach("killed") as vm:
                    # What the killed controller left: the crash point is the one asked for.
                    left = await left_behind(vm, repo, "killed", good.id)
                    assert left == KILL_LEAVES[step], what
                    ok.add("error")
                    notes = await ops.recover(vm, repo)
                    if step == "after-manifest":
                        [recorded] = [m for m in repo.manifests("killed") if m.id not in points]
                        assert recorded.parent == good.id
                        assert await restore_equals(
                            repo, "killed", recorded.id, "disk0", ref, tmp_path
                        )
                        points.append(recorded.id)
                        good, chunks = recorded, 1
                        covers = w2
                    else:
                        assert any("incomplete point" in note for note in notes), (what, notes)
                        assert [m.id for m in repo.manifests("killed")] == points, what
                        chunks, covers = 4, w1 + w2
                    ok.add("no-point")
                    # A writer killed while it stored chunks leaves their temporary files:
                    # recovery does not touch the chunk store, gc removes dead writers' ones.
                    temporary = temporaries(repo)
                    if step == "copy":
                        assert temporary, f"{what}: no chunk was being written?"
                        pids = {int(p.name.split(".")[-3]) for p in temporary}
                        assert not any(Path(f"/proc/{pid}").exists() for pid in pids), pids
                        assert repo.gc().temporary_removed == len(temporary)
                        ok.add("gc")
                    else:
                        assert temporary == [], what
                    await nothing_left(vm, repo, "killed", points, scratch, what)
                    ok.add("nothing-left")
                    await checkpoint_of(vm, repo, good.id, covers, what)
                    ok.add("checkpoint")
                    ref.unlink()
                    good = await next_incremental(
                        vm,
                        repo,
                        "killed",
                        disk,
                        tmp_path,
                        parent=good.id,
                        chunks_read=chunks,
                        scratch=scratch,
                        what=what,
                    )
                    ok.add("next-exact")
        good = await killed_mid_copy_then_retried(
            guest_writes, repo, disk, scratch, tmp_path, good, len(KILL_STEPS)
        )
        # Nothing of any attempt is left in the temporary directories either.
        assert [p for p in scratch.rglob("*") if not p.is_dir()] == []


async def killed_mid_copy_then_retried(
    guest_writes: Writes,
    repo: Repository,
    disk: Path,
    scratch: Path,
    out: Path,
    good: Manifest,
    case: int,
) -> Manifest:
    """Issue 19: a controller killed mid-copy of a backup with a request id leaves QEMU
    holding its frozen point; the retry of the same request takes it over (the same QEMU
    job, the same point), and what it records is the first attempt's instant, not the
    writes made since. Then: a point that is no longer whole (its export removed by hand)
    is recovered and taken afresh, with the later writes."""
    request = "wf-1/backup/killed"
    job_id = ops.backup_job_id(request, 0)
    await guest_writes.w1(case)
    async with attach("killed") as vm:
        await wire.stop(vm.session)
        ref = await reference(vm, disk, out)  # the first attempt's instant
    try:
        await kill_controller_at("killed", "copy", repo, scratch, request)
    finally:
        async with attach("killed") as vm:
            await wire.cont(vm.session)
    await guest_writes.w2(case)  # after the kill: not in the first attempt's point
    async with attach("killed") as vm:
        [attempt] = repo.incomplete_points("killed")
        [job] = await wire.query_jobs(vm.session)
        assert (job.id, job.status.value) == (job_id, "running"), job
        with capture_logs() as logs:
            again = await ops.backup(
                vm, repo, request_id=request, options=BackupOptions(scratch_dir=scratch)
            )
        events = [e for e in logs if e["event"] == "blockctl.backup.readopted"]
        assert [e["jobs"] for e in events] == [[job_id]], logs
        assert (again.id, again.request_id, again.parent) == (attempt, request, good.id)
        assert [m.id for m in repo.manifests("killed")][-2:] == [good.id, again.id]
        repo.gc()  # the killed writer's chunk temporaries (recovery leaves them to gc)
        assert await restore_equals(repo, "killed", again.id, "disk0", ref, out), (
            "the re-adopted point is not the first attempt's instant"
        )
        ref.unlink()
        # The writes made after the kill are in the next incremental (one chunk).
        readopted = await next_incremental(
            vm,
            repo,
            "killed",
            disk,
            out,
            parent=again.id,
            chunks_read=1,
            scratch=scratch,
            what="after the re-adopted backup",
        )
    # Not whole: the export is gone. Recovered, and a fresh point holds every write.
    request = "wf-2/backup/killed"
    await guest_writes.w1(case + 1)
    await kill_controller_at("killed", "copy", repo, scratch, request)
    async with attach("killed") as vm:
        [attempt] = repo.incomplete_points("killed")
        [export] = await wire.query_block_exports(vm.session)
        await wire.block_export_del(vm.session, export.id)
        await guest_writes.w2(case + 1)
        await wire.stop(vm.session)
        try:
            ref = await reference(vm, disk, out)
            with capture_logs() as logs:
                fresh = await ops.backup(
                    vm, repo, request_id=request, options=BackupOptions(scratch_dir=scratch)
                )
        finally:
            await wire.cont(vm.session)
        reasons = [e["reason"] for e in logs if e["event"] == "blockctl.backup.not_readopted"]
        assert reasons == [f"its NBD export {export.id} is gone"], logs
        assert fresh.id != attempt and fresh.request_id == request
        assert fresh.parent == readopted.id and fresh.bytes_read == 4 * CHUNK, fresh
        assert await restore_equals(repo, "killed", fresh.id, "disk0", ref, out)
        ref.unlink()
        repo.gc()
        await nothing_left(
            vm, repo, "killed", [m.id for m in repo.manifests("killed")], scratch, "fresh"
        )
    return fresh


# Section: QEMU is killed -9


async def test_qemu_killed_after_the_transaction_next_backup_is_full_and_exact(
    guest: GuestImage, images: Path, tmp_path: Path
) -> None:
    repo = ops.init_repository(tmp_path / "R")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    disk = await qcow2_image(images / "d0.qcow2", b"", DISK_MIB * MIB)
    async with open_vm(config(guest, "qkill", disk)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        guest_writes = Writes(vm.console)
        await guest_writes.dd(0, 0, 2048)
        _ref, good = await paused_backup(vm, repo, disk, tmp_path, scratch_dir=scratch)
        await guest_writes.w1(0)
        pid = vm.pid
        assert pid is not None

        def kill_qemu(step: str) -> None:
            if step == "after-transaction":
                pidfd = os.pidfd_open(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                    select.select([pidfd], [], [])  # returns once QEMU is gone: exact
                finally:
                    os.close(pidfd)

        # QEMU's bitmaps die with it: no checkpoint to keep; the next backup is full.
        with FAULTS.case("qemu-kill@after-transaction", required=EVERY - {"checkpoint"}) as ok:
            with pytest.raises(ConnectionLost):
                await ops.backup(
                    vm, repo, _failpoint=kill_qemu, options=BackupOptions(scratch_dir=scratch)
                )
            ok.add("error")
            await after_qemu_kill(guest, repo, disk, tmp_path, scratch, good.id, ok)


async def after_qemu_kill(
    guest: GuestImage,
    repo: Repository,
    disk: Path,
    tmp_path: Path,
    scratch: Path,
    good: str,
    ok: set[str],
) -> None:
    assert [m.id for m in repo.manifests("qkill")] == [good]
    assert sorted(os.listdir(repo.path / "points" / "qkill")) == [".lock", good]
    ok.add("no-point")
    assert [p for p in scratch.rglob("*") if not p.is_dir()] == []
    # A new QEMU on the same disk.
    async with open_vm(config(guest, "qkill", disk)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        guest_writes = Writes(vm.console)
        await guest_writes.w2(0)
        ref, again = await paused_backup(vm, repo, disk, tmp_path, scratch_dir=scratch)
        assert again.kind == "full", again
        assert again.fallback_reason is not None
        assert (
            "QEMU was restarted" in again.fallback_reason or "inconsistent" in again.fallback_reason
        ), again.fallback_reason
        await checkpoint_of(vm, repo, again.id, 0, "after the full backup")
        await nothing_left(vm, repo, "qkill", [good, again.id], scratch, "QEMU killed")
        ok.add("nothing-left")
    assert await restore_equals(repo, "qkill", again.id, "disk0", ref, tmp_path)
    assert await same(disk, "qcow2", ref)  # the guest's disk itself reads the same
    ok.add("next-exact")


def test_zz_report_backup_fault_figures() -> None:
    """Runs last in this module: the figure line for the README, computed from the fault
    points' checks; fails if no fault point ran."""
    require_any(FAULTS)
    report(
        "backup faults",
        f"{len(FAULTS.complete())} backup fault points survived "
        f"[{', '.join(FAULTS.complete())}]; {FAULTS.summary()}: {FAULTS.phrases()}",
    )
