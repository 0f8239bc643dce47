"""Crash recovery: reconcile the operation journal against QEMU, and carry the plan out.

The decisions are :func:`blockctl._journal.plan`'s (pure, unit-tested); this module reads the
facts from QEMU (``query-jobs``, ``query-named-block-nodes``, ``query-block``), runs the
actions, and returns one :class:`Recovery` per journaled operation. QEMU is the source of
truth: the record says what was intended, QEMU says what happened.

Entry points: :func:`reconcile` (a live VM; also run at the start of the next chain
operation, :func:`settle`), :func:`reconcile_offline` (QEMU is gone: report from the record)
and :func:`recover_vm` (by name, either case; ``blockctl recover VM``). Backups keep their own
record (the repository) and their own :func:`blockctl.backup.recover`; ``recover_vm``
runs it too when given the repository.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from blockctl import _agent, _argv, _images, _journal, _proc
from blockctl._backup.serve import (
    BACKUP_NODE_PREFIX,
    backing_nodes,
    serve_point,
    servers_in,
    socket_in,
)
from blockctl._backup.store import Repository
from blockctl._jobs import DEFAULT_HOOKS, Job, JobHook
from blockctl._journal import (
    AdoptJob,
    DeleteFiles,
    DeleteNodes,
    Facts,
    Intent,
    JobFact,
    OpKind,
    Relink,
    ReopenReadOnly,
    ReplaceServer,
    RestartMirror,
    RestartStream,
    Step,
    StopServer,
    Unreadable,
    UpdateRegistry,
    Verdict,
)
from blockctl._log import get_logger
from blockctl._machine import DAEMON_OPS_SUFFIX, VM
from blockctl._ops.nodes import (
    delete_nodes,
    delete_secrets,
    flush_chain,
    node_options,
    read_graph,
    set_read_only,
)
from blockctl._qmp import wire
from blockctl._qmp.models import JOB_FINAL, JobStatus
from blockctl.errors import (
    BackupKeyError,
    BlockctlError,
    CommandFailed,
    GuestAgentError,
    JobError,
    UnsafeOperation,
)
from blockctl.types import ImageFormat

if TYPE_CHECKING:
    pass

_log = get_logger()

#: A test's hook inside a server replacement (``replacement-served``: the new server listens
#: and is recorded, QEMU not told; ``replaced``: QEMU reads through it, the record not yet
#: following): ``tests/integration/crash_child.py`` kills the process there.
FAILPOINT: Callable[[str], None] | None = None

#: Plan/act rounds per record: adopt the job, then finish (a third round is a safety margin).
_ROUNDS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """What recovery found and did about one interrupted operation."""

    op_id: str
    kind: str
    what: str
    step: str  # how far the stopped controller had got
    verdict: Verdict
    message: str
    done: tuple[str, ...] = ()  # the actions carried out, for the log and --json
    tops: dict[str, str] = field(default_factory=dict)  # QEMU gone: device → top file on disk
    kept: bool = False  # the record stays (needs attention)
    #: The process that drives it (verdict ``running``: another client's live operation).
    owner_pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.op_id,
            "kind": self.kind,
            "what": self.what,
            "step": self.step,
            "verdict": self.verdict.value,
            "message": self.message,
            "done": list(self.done),
            "tops": self.tops,
            "kept": self.kept,
            "owner_pid": self.owner_pid,
        }


def _unreadable(item: Unreadable) -> Recovery:
    return Recovery(
        op_id=item.path.name,
        kind="?",
        what=str(item.path),
        step="?",
        verdict=Verdict.ATTENTION,
        message=f"{item.path}: unreadable journal record ({item.reason}); it was kept",
        kept=True,
    )


async def read_facts(vm: VM, intent: Intent | None = None) -> Facts:
    """What QEMU reports now (and whether ``intent``'s server, if it has one, still runs)."""
    graph = await read_graph(vm)
    jobs = {
        j.id: JobFact(status=j.status, error=j.error) for j in await wire.query_jobs(vm.session)
    }
    return Facts(
        alive=True,
        jobs=jobs,
        nodes=frozenset(graph.nodes),
        files={n.name: str(n.filename) for n in graph.nodes.values() if n.filename},
        chains={
            d.id: tuple(n.name for n in graph.chain_of(d.id))
            for d in graph.devices.values()
            if d.root is not None
        },
        server_alive=intent is not None
        and intent.server is not None
        and _proc.process_alive(intent.server.pid, intent.server.pid_start),
        holding_data=frozenset(
            [
                path
                for path in (intent.created_files if intent and intent.server else ())
                if await _holds_data(Path(path))
            ]
        ),
    )


async def _holds_data(path: Path) -> bool:
    """Whether a file a live restore made holds data now (was written since it was made, as
    made it holds none): a qcow2 (a target, an overlay; no backing file in its header) with
    any cluster allocated, a raw file with a non-zero byte in a data extent (``qemu-img
    create`` allocates a raw file's first block, zeros). Whatever cannot be read counts as
    holding data (it is kept, not removed)."""
    try:
        with open(path, "rb") as file:
            if file.read(4) != b"QFI\xfb":
                return await anyio.to_thread.run_sync(_raw_holds_data, file.fileno())
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        extents = await _images.map_extents(path, ImageFormat.QCOW2)
    except BlockctlError:
        return True
    return any(e.present and e.depth == 0 for e in extents)


def _raw_holds_data(fd: int) -> bool:
    offset = 0
    while True:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return False
            raise
        end = os.lseek(fd, offset, os.SEEK_HOLE)
        while offset < end:
            piece = os.pread(fd, min(end - offset, 1 << 20), offset)
            if not piece:
                return False
            if piece.count(0) != len(piece):
                return True
            offset += len(piece)


async def reconcile(
    vm: VM,
    *,
    deadline: float = 600.0,
    hooks: Sequence[JobHook] = DEFAULT_HOOKS,
    forget: bool = False,
    repositories: Sequence[Repository] = (),
) -> list[Recovery]:
    """Reconcile every journaled operation of ``vm`` (a live QEMU). ``forget``: drop the
    records that need attention too (after the operator checked them). ``repositories``:
    opened by the caller, an encrypted one with its key; a live restore's dead server is
    replaced from the one it served (without it, an encrypted repository's cannot be)."""
    # First the guest: a freeze left by a dead controller blocks every write in it.
    results = await reconcile_freezes(vm, forget=forget)
    for item in _journal.load_all(vm.run_dir):
        if isinstance(item, Unreadable):
            if forget:
                item.path.unlink(missing_ok=True)
            results.append(replace(_unreadable(item), kept=not forget))
            continue
        results.append(await _reconcile_one(vm, item, deadline, hooks, forget, repositories))
    for r in results:
        # Another client's operation in progress is not something recovery found wrong.
        log = _log.info if r.verdict is Verdict.RUNNING else _log.warning
        log("blockctl.recovery", vm=vm.name, op=r.op_id, verdict=r.verdict.value, message=r.message)
    return results


async def reconcile_freezes(vm: VM, *, forget: bool = False) -> list[Recovery]:
    """Thaw a guest left frozen by a controller that died between freeze and thaw (its
    record, :func:`blockctl._agent.plan_thaw`). Records of live controllers are left alone
    and not reported. ``forget``: drop the records that need attention too."""
    results = []
    for item in _agent.load_freeze_records(vm.run_dir):
        if isinstance(item, Unreadable):
            if forget:
                _journal.remove_durably(item.path)
            results.append(replace(_unreadable(item), kept=not forget))
            continue
        result = await _reconcile_freeze(vm, item)
        if result is None:
            continue
        if result.kept and forget:
            _journal.remove_durably(item.path)
            result = replace(result, kept=False)
        results.append(result)
    return results


async def _reconcile_freeze(vm: VM, record: _agent.FreezeRecord) -> Recovery | None:
    alive = _agent.writer_alive(record)
    plan = _agent.plan_thaw(record, writer_alive=alive)
    done: list[str] = []
    if plan.step is _agent.ThawStep.ASK:
        thawed: int | None = None
        try:
            async with _agent.connect_agent(vm) as ga:
                status = await ga.fsfreeze_status()
                plan = _agent.plan_thaw(record, writer_alive=alive, status=status)
                if plan.step is _agent.ThawStep.THAW:
                    thawed = await ga.fsfreeze_thaw(timeout=_agent.FREEZE_TIMEOUT)
                    done.append(f"thawed {thawed} filesystem(s)")
                    status = await ga.fsfreeze_status()
                    plan = _agent.plan_thaw(
                        record, writer_alive=alive, status=status, thawed=thawed
                    )
        except GuestAgentError as exc:
            plan = _agent.plan_thaw(record, writer_alive=alive, agent_error=str(exc), thawed=thawed)
    if plan.step is _agent.ThawStep.LEAVE:
        _log.info("blockctl.recovery.freeze_in_progress", vm=vm.name, pid=record.pid)
        return None
    assert plan.step in (_agent.ThawStep.DONE, _agent.ThawStep.KEEP), plan
    keep = plan.step is _agent.ThawStep.KEEP
    if not keep:
        _journal.remove_durably(record.path)
    return Recovery(
        op_id=record.id,
        kind="freeze",
        what=f"freeze of the guest's filesystems for {record.operation}",
        step="frozen",
        verdict=Verdict(plan.verdict or Verdict.ATTENTION.value),
        message=plan.message,
        done=tuple(done),
        kept=keep,
    )


async def _reconcile_one(
    vm: VM,
    intent: Intent,
    deadline: float,
    hooks: Sequence[JobHook],
    forget: bool,
    repositories: Sequence[Repository],
) -> Recovery:
    assert vm.run_dir is not None
    first_step = intent.step.value
    done: list[str] = []
    if intent.server is not None:
        # A live restore's copy is tried again on each recovery run (while its server runs).
        intent = replace(intent, error=None)
    if intent.job_id and not _journal.owner_alive(intent):
        # A stream its dead controller left concluded and not dismissed: QEMU would crash on
        # the graph read of read_facts (wire._named_block_nodes refuses it). Its outcome is
        # read and it is dismissed first, as the plan would adopt it.
        jobs = {j.id: j.status for j in await wire.query_jobs(vm.session)}
        if jobs.get(intent.job_id) is JobStatus.CONCLUDED:
            intent = await _adopt(vm, intent, AdoptJob(intent.job_id, False), deadline, hooks)
            done.append(f"adopted job {intent.job_id}: {intent.error or 'succeeded'}")
            _journal.write(vm.run_dir, intent)
    if intent.replacement is not None and not _journal.owner_alive(intent):
        intent = await _settle_replacement(vm, intent, done)
    plan = _journal.plan(
        intent, await read_facts(vm, intent), owner_alive=_journal.owner_alive(intent)
    )
    if plan.verdict is Verdict.RUNNING:
        # Another client drives it: its record is its own; not adopted, written or forgotten.
        return Recovery(
            op_id=intent.id,
            kind=intent.kind.value,
            what=intent.describe(),
            step=first_step,
            verdict=plan.verdict,
            message=plan.message,
            owner_pid=intent.pid,
        )
    for _ in range(_ROUNDS):
        if plan.verdict is not None:
            break
        for action in plan.actions:
            if isinstance(action, RestartStream | RestartMirror):
                intent = await _restart_copy(vm, intent, action)
                done.append(f"started the copy again: job {intent.job_id}")
                # Driven to its end at once, as the next plan would adopt it: no graph read
                # while the copy runs. A stream concluding just before a query-named-block-
                # nodes crashed QEMU 7.2 and 10.0.2 (wire._named_block_nodes).
                adopt = AdoptJob(intent.job_id or "", intent.active)
                intent = await _adopt(vm, intent, adopt, deadline, hooks)
                done.append(f"adopted job {adopt.job_id}: {intent.error or 'succeeded'}")
                _journal.write(vm.run_dir, intent)
                continue
            if isinstance(action, ReplaceServer):
                old = intent.server
                intent = await _replace_server(vm, intent, action, repositories)
                if intent.error is None:
                    assert old is not None and intent.server is not None
                    done.append(
                        f"started a new server of the backup (pid {intent.server.pid}; pid "
                        f"{old.pid} was gone) and put the disk on it"
                    )
                _journal.write(vm.run_dir, intent)
                continue
            assert isinstance(action, AdoptJob)
            intent = await _adopt(vm, intent, action, deadline, hooks)
            done.append(f"adopted job {action.job_id}: {intent.error or 'succeeded'}")
            _journal.write(vm.run_dir, intent)
        plan = _journal.plan(intent, await read_facts(vm, intent))
    verdict, message = plan.verdict or Verdict.ATTENTION, plan.message
    keep = not plan.forget
    try:
        for action in plan.actions:
            done.append(await _act(vm, action))
    except BlockctlError as exc:
        verdict, keep = Verdict.ATTENTION, True
        message = f"{message}; recovery could not finish: {exc} (run `blockctl recover` again)"
    if keep and not forget:
        _journal.write(vm.run_dir, intent)
    else:
        if keep and intent.server is not None:  # given up (--forget): its server goes too
            done.extend(await _give_up_live(vm, intent))
            done.append(await _act(vm, StopServer(intent.server)))
        _journal.remove(vm.run_dir, intent.id)
    return Recovery(
        op_id=intent.id,
        kind=intent.kind.value,
        what=intent.describe(),
        step=first_step,
        verdict=verdict,
        message=message,
        done=tuple(done),
        tops=dict(plan.tops),
        kept=keep and not forget,
    )


async def _give_up_live(vm: VM, intent: Intent) -> list[str]:
    """A live restore given up (``--forget``; its disk detached, as its message says, or
    not): a raw target's nodes and a CHAP LUN's ``secret`` object go too. No drive's record
    holds them before the pivot, so a detach leaves them, holding the target open. QEMU
    refuses to delete a node a device or job still uses: kept, and said. The files the
    restore made are named, not removed: what the guest wrote during it is in them."""
    done: list[str] = []
    present = {n.node_name for n in await vm.block_nodes()}
    for nodes in intent.add_nodes.values() if intent.kind is OpKind.MIRROR else ():
        names = [str(n["node-name"]) for n in nodes if str(n["node-name"]) in present]
        refused = await delete_nodes(vm, names, event="blockctl.recovery.live_node_kept")
        deleted = [n for n in reversed(names) if n not in refused]
        await delete_secrets(
            vm,
            [
                str(n["password-secret"])
                for n in nodes
                if "password-secret" in n and str(n["node-name"]) in deleted
            ],
        )
        if deleted:
            done.append(f"deleted the target's nodes {', '.join(deleted)}")
        for name, exc in refused.items():
            done.append(f"kept the target's node {name}: {exc}")
    targets = [f for chains in intent.devices.values() for f in chains.files_after]
    made = dict.fromkeys(
        f for f in (*intent.created_files, *intent.drop_files, *targets) if Path(f).is_file()
    )
    still_open = {n.file for n in await vm.block_nodes()}
    left = [f for f in made if f not in still_open]
    if left:
        done.append(
            f"left the files {', '.join(left)} (what the guest wrote during the restore and "
            "the blocks copied are in them; remove them if not wanted)"
        )
    if in_use := [f for f in made if f in still_open]:
        done.append(
            f"kept the files {', '.join(in_use)} open in the VM (its disk still runs on them: "
            "detach it before removing them)"
        )
    return done


async def _adopt(
    vm: VM, intent: Intent, action: AdoptJob, deadline: float, hooks: Sequence[JobHook]
) -> Intent:
    """Drive the dead controller's job to its end (at full speed), and record the outcome."""
    info = next((j for j in await wire.query_jobs(vm.session) if j.id == action.job_id), None)
    if info is None:
        return intent  # gone meanwhile: the next plan reads the graph
    job = Job(vm.session, info.id, job_type=info.type, auto_finalize=None, status=info.status)
    if info.status not in JOB_FINAL:
        with contextlib.suppress(CommandFailed):
            await job.set_speed(0)  # the dead controller's limit was for its own pacing
    if action.complete and info.status is JobStatus.READY:
        await job.complete()
    # A PENDING job (auto-finalize: false) is finalized by the driver once it listens: a
    # stream is auto-dismissed, and its final event is all that tells its outcome.
    try:
        await job.wait(complete_on_ready=action.complete, deadline=deadline, hooks=hooks)
    except JobError as exc:
        return replace(intent, error=str(exc))
    return replace(intent, step=Step.CONCLUDED)


async def _restart_copy(vm: VM, intent: Intent, action: RestartStream | RestartMirror) -> Intent:
    """Start a live restore's copy again; the record names the new job before it exists."""
    assert vm.run_dir is not None
    kind = "mirror" if isinstance(action, RestartMirror) else "stream"
    job_id = f"bc-{kind}-{secrets.token_hex(3)}"
    intent = replace(intent, job_id=job_id, step=Step.STARTING, error=None)
    _journal.write(vm.run_dir, intent)
    if isinstance(action, RestartMirror):
        # A launch's record is written before QEMU starts: a controller killed before it
        # added the target's nodes leaves them to add here (bottom-up, as recorded).
        present = {n.node_name for n in await vm.block_nodes()}
        objects: dict[str, str] | None = None  # QEMU's objects, read once if needed
        for node in intent.add_nodes.get(action.device, ()):
            if str(node["node-name"]) in present:
                continue
            secret = str(node.get("password-secret", ""))
            if secret in intent.secret_files:
                # A CHAP LUN's node names its secret object: added first (from the password
                # file the record names) unless the dead controller added it already.
                if objects is None:
                    objects = await wire.qom_list(vm.session, "/objects")
                if secret not in objects:
                    await wire.secret_add(
                        vm.session, _argv.password_secret(secret, intent.secret_files[secret])
                    )
            await wire.blockdev_add(vm.session, node)
        await wire.blockdev_mirror(
            vm.session,
            job_id=job_id,
            device=action.node,
            target=action.target,
            copy_mode="write-blocking",
        )
    else:
        await wire.block_stream(vm.session, job_id=job_id, device=action.node)
    return intent


def _served_repository(vm: VM, path: str, opened: Sequence[Repository]) -> Repository:
    """The repository a live restore's server served: the caller's, when it opened that one
    (an encrypted repository's key is unwrapped only there), else opened here."""
    for repo in opened:
        if repo.path == Path(path).resolve():
            return repo
    try:
        return Repository.open(Path(path))
    except BackupKeyError as exc:
        raise BackupKeyError(
            f"{exc}: `blockctl recover {vm.name} --repo {path} --key-file KEY` replaces the "
            "server with the key"
        ) from exc


async def _replace_server(
    vm: VM, intent: Intent, action: ReplaceServer, repositories: Sequence[Repository]
) -> Intent:
    """A new server of the same point; new backup nodes on it become ``action.node``'s
    backing (``blockdev-reopen``: the measured way on, ``notes/backup-data-path.md``), the
    old ones are deleted, the old server's directory removed. The record names the new
    server and its nodes (``replacement``) before the server starts, and follows the swap
    once QEMU made it: a recover killed in between is finished or undone by the next one
    (:func:`_settle_replacement`). A failure is undone and recorded as the operation's error
    (the next plan says what is left)."""
    old = intent.server
    assert old is not None and vm.run_dir is not None
    run_dir = vm.run_dir
    record = vm.registry.drives.get(action.device)
    image = node_options(record, action.node)
    if record is None or image is None:
        return replace(intent, error=f"{action.node} was not opened by blockctl")
    base = f"{BACKUP_NODE_PREFIX}{secrets.token_hex(2)}"

    def starting(home: Path) -> None:
        # Recorded before the server starts: a recover killed from here on leaves a record
        # naming it (found by its directory), for the next one to stop or to take on.
        nonlocal intent
        replacement = replace(old, pid=0, pid_start=None, home=str(home))
        intent = replace(intent, replacement=replacement, replacement_base=base)
        _journal.write(run_dir, intent)

    try:
        repo = _served_repository(vm, old.repo, repositories)
        size = repo.read_index(old.source_vm, old.point, old.device).virtual_size
        async with serve_point(
            repo,
            old.source_vm,
            old.point,
            old.device,
            Path(old.home).parent,
            size=size,
            detached=True,
            into=vm.name,
            starting=starting,
        ) as export:
            export.keep_running = True  # it serves the disk from now on
    except BlockctlError as exc:
        return await _undo_replacement(vm, intent, f"{exc}")
    assert intent.replacement is not None
    new = replace(intent.replacement, pid=export.pid, pid_start=_proc.process_start(export.pid))
    intent = replace(intent, replacement=new)
    _journal.write(run_dir, intent)
    if FAILPOINT is not None:
        FAILPOINT("replacement-served")
    try:
        for node in backing_nodes(base, export.socket):
            await wire.blockdev_add(vm.session, node)
        await wire.blockdev_reopen(vm.session, [{**image, "backing": base}])
    except BlockctlError as exc:
        return await _undo_replacement(vm, intent, f"{exc}")
    if FAILPOINT is not None:
        FAILPOINT("replaced")
    return await _swapped(vm, intent, action.device, action.node)


async def _settle_replacement(vm: VM, intent: Intent, done: list[str]) -> Intent:
    """A server replacement a killed recover left: finished if QEMU's graph shows the disk's
    image on the new backup nodes, else undone (its nodes and server go; the next plan
    replaces the old server again). The record is written either way."""
    assert intent.replacement is not None and vm.run_dir is not None
    (device, chains), *_ = intent.devices.items()
    node = chains.before[0]
    graph = await read_graph(vm)
    image = graph.nodes.get(node)
    if image is not None and image.backing == intent.replacement_base:
        intent = await _swapped(vm, intent, device, node)
        done.append(
            "finished putting in the new server of the backup a killed recovery had started "
            f"(pid {intent.server.pid if intent.server else 'none'})"
        )
    else:
        intent = await _undo_replacement(vm, intent, None)
        done.append("undid the server replacement a killed recovery had not finished")
    _journal.write(vm.run_dir, intent)
    return intent


async def _undo_replacement(vm: VM, intent: Intent, error: str | None) -> Intent:
    """The new server and its backup nodes go (those that exist); the record names the old
    server alone again, with ``error`` if the replacement failed."""
    base = intent.replacement_base
    present = {n.node_name for n in await vm.block_nodes()}
    ours = [n for n in (f"{base}-nbd", base) if base and n in present]
    await delete_nodes(vm, ours, event="blockctl.recovery.live_node_kept")
    if intent.replacement is not None:
        await _stop_server(intent.replacement)
    intent = replace(intent, replacement=None, replacement_base="")
    if error is not None:
        intent = replace(intent, error=f"a new server of the backup could not be put in: {error}")
    return intent


async def _swapped(vm: VM, intent: Intent, device: str, node: str) -> Intent:
    """QEMU reads the disk through the replacement's nodes: the old backup nodes and the old
    server's directory go, and the drive record and the journal's chains name the new ones.
    Each step holds if done again (a recover killed inside it)."""
    new, base, old = intent.replacement, intent.replacement_base, intent.server
    # The new server's pid was recorded before its nodes were added.
    assert new is not None and new.pid and old is not None
    await _stop_server(old)  # gone already (that is why it was replaced): its directory
    # The old backup nodes (a raw target's overlay is dropped at the end too, but stays):
    # raw first (it holds the nbd node).
    old_backup = [n for n in intent.drop_nodes if n.startswith(BACKUP_NODE_PREFIX)]
    present = {n.node_name for n in await vm.block_nodes()}
    old_nodes = sorted((n for n in old_backup if n in present), key=lambda n: n.endswith("-nbd"))
    await delete_nodes(vm, old_nodes[::-1], event="blockctl.recovery.live_node_kept")
    # In the record, each old backup node's place is taken by its new counterpart.
    socket = socket_in(Path(new.home))
    new_nbd, new_raw = backing_nodes(base, socket)
    swapped = {**{n: new_nbd for n in old_backup if n.endswith("-nbd")}}
    swapped.update({n: new_raw for n in old_backup if not n.endswith("-nbd")})
    record = vm.registry.drives.get(device)
    if record is not None:
        vm.registry.put(
            replace(
                record,
                nodes=tuple(
                    swapped.get(str(n["node-name"]))
                    or ({**n, "backing": base} if n["node-name"] == node else n)
                    for n in record.nodes
                ),
            )
        )
    chains = intent.devices[device]
    names = {n: base for n in old_backup if not n.endswith("-nbd")}
    url = f"nbd+unix:///?socket={socket}"
    old_url = chains.files_before[1] if len(chains.files_before) > 1 else None
    devices = {
        **intent.devices,
        device: replace(
            chains,
            before=tuple(names.get(n, n) for n in chains.before),
            files_before=(*chains.files_before[:1], url, *chains.files_before[2:]),
        ),
    }
    kept = tuple(n for n in intent.drop_nodes if n not in old_backup)
    return replace(
        intent,
        server=new,
        replacement=None,
        replacement_base="",
        devices=devices,
        drop_nodes=(*kept, base, f"{base}-nbd"),
        drop_files=(*(f for f in intent.drop_files if f != old_url), url),
    )


#: Searches for a server recorded before its pid (each after stopping what the last found).
SERVER_SEARCHES = 5


async def _stop_server(server: _journal.ServerRecord) -> str:
    if server.pid:
        ended = await _proc.stop_recorded(server.pid, server.pid_start, grace=5.0)
        shutil.rmtree(server.home, ignore_errors=True)
        return f"{'stopped' if ended else 'found gone'} the backup's server (pid {server.pid})"
    # Recorded before it started: found by its pid file or its command line. Searched again
    # once what was found is stopped: an nbdkit stopped as it forked into the background
    # leaves the child it forked.
    stopped: list[int] = []
    for _ in range(SERVER_SEARCHES):
        found = servers_in(Path(server.home))
        if not found:
            break
        for pid, start in found:
            if await _proc.stop_recorded(pid, start, grace=5.0):
                stopped.append(pid)
    shutil.rmtree(server.home, ignore_errors=True)
    if not stopped:
        return "found gone the backup's server (pid none)"
    return f"stopped the backup's server (pid {', '.join(map(str, stopped))})"


async def _act(vm: VM, action: _journal.Action) -> str:
    match action:
        case StopServer(server):
            return await _stop_server(server)
        case DeleteNodes(names):
            present = {n.node_name for n in await vm.block_nodes()}
            for name in names:
                if name in present:
                    await wire.blockdev_del(vm.session, name)
            return f"deleted nodes {', '.join(names)}"
        case DeleteFiles(paths):
            # Make what the surviving chains hold durable before the old layers go.
            for device in list(vm.registry.drives):
                await flush_chain(vm, device)
            for path in paths:
                Path(path).unlink(missing_ok=True)
            return f"deleted files {', '.join(paths)}"
        case ReopenReadOnly(device, node):
            graph = await read_graph(vm)
            if node in graph.nodes:
                await set_read_only(vm, device, graph, graph.nodes[node], True)
            return f"{node} read-only again"
        case UpdateRegistry(device, remove, add):
            record = vm.registry.drives.get(device)
            if record is None:
                return f"{device}: not in the drive registry"
            graph = await read_graph(vm)
            have = {str(n["node-name"]) for n in record.nodes}
            nodes = [n for n in record.nodes if n["node-name"] not in remove]
            nodes += [dict(a) for a in add if a["node-name"] not in have]
            nodes = [
                {**n, "backing": graph.nodes[str(n["node-name"])].backing}
                if "backing" in n and str(n["node-name"]) in graph.nodes
                else n
                for n in nodes
            ]
            vm.registry.put(replace(record, nodes=tuple(nodes)))
            return f"{device}: drive registry updated"
        case _:
            raise AssertionError(action)


async def reconcile_offline(run_dir: Path, *, never_ran: bool = False) -> list[Recovery]:
    """QEMU is gone: report each record (which file is each device's top on disk now, and
    what is uncertain), repair the backing links a finished job may have left unflushed
    (:class:`~blockctl._journal.Relink`), then drop the record: it has been reported, and
    QEMU cannot be asked. ``never_ran``: no record of QEMU was ever written in ``run_dir``
    (a launch killed before QEMU's spawn): a live launch's record that still names the files
    it made has them removed."""
    results = []
    for freeze in _agent.load_freeze_records(run_dir):
        if isinstance(freeze, Unreadable):
            results.append(_unreadable(freeze))
            continue
        # QEMU is gone and its guest with it: nothing can still be frozen.
        results.append(
            Recovery(
                op_id=freeze.id,
                kind="freeze",
                what=f"freeze of the guest's filesystems for {freeze.operation}",
                step="frozen",
                verdict=Verdict.QEMU_GONE,
                message=(
                    f"the guest's filesystems were frozen for {freeze.operation} by a "
                    "controller that stopped before thawing; QEMU is gone, and with it the "
                    "guest: nothing stays frozen"
                ),
            )
        )
        _journal.remove_durably(freeze.path)
    results += await _journal_offline(run_dir, "", never_ran)
    # A vhost-user-blk disk's operations kept their records in its daemon's directory; the
    # daemon died with QEMU (it is the launcher's child, stopped when QEMU exits).
    for daemon_dir in sorted(run_dir.glob(f"*{DAEMON_OPS_SUFFIX}")):
        device = daemon_dir.name[: -len(DAEMON_OPS_SUFFIX)]
        if daemon_dir.is_dir() and not daemon_dir.is_symlink():
            results += await _journal_offline(
                daemon_dir, f" (in {device}'s qemu-storage-daemon, gone with QEMU)", False
            )
    return results


async def _journal_offline(run_dir: Path, where: str, never_ran: bool) -> list[Recovery]:
    """The offline pass over the journal records in ``run_dir`` (QEMU's run directory or a
    daemon's operations directory, said by ``where``)."""
    results = []
    for item in _journal.load_all(run_dir):
        if isinstance(item, Unreadable):
            results.append(_unreadable(item))
            continue
        done = []
        if item.replacement is not None:  # a recover killed inside it: nothing reads it now
            done.append(await _stop_server(item.replacement))
            item = replace(item, replacement=None, replacement_base="")
        plan = _journal.plan(item, Facts(alive=False, qemu_never_ran=never_ran))
        for action in plan.actions:
            if isinstance(action, StopServer):
                done.append(await _stop_server(action.server))
                continue
            if isinstance(action, DeleteFiles):  # a live launch's, QEMU never started
                for path in action.paths:
                    Path(path).unlink(missing_ok=True)
                done.append(f"deleted files {', '.join(action.paths)}")
                continue
            assert isinstance(action, Relink)
            try:
                formats = ImageFormat(action.fmt), ImageFormat(action.backing_fmt)
            except ValueError:
                formats = None
            if formats is None or not Path(action.backing).exists():
                done.append(f"{action.path} could not be relinked to {action.backing}")
                continue
            await _images.rebase(
                Path(action.path), formats[0], Path(action.backing), formats[1], unsafe=True
            )
            done.append(f"{action.path} backs onto {action.backing} again")
        results.append(
            Recovery(
                op_id=item.id,
                kind=item.kind.value,
                what=item.describe() + where,
                step=item.step.value,
                verdict=Verdict.QEMU_GONE,
                message=plan.message,
                tops=dict(plan.tops),
                done=tuple(done),
            )
        )
        _journal.remove(run_dir, item.id)
        _log.warning("blockctl.recovery", op=item.id, verdict="qemu-gone", message=plan.message)
    return results


async def settle(vm: VM) -> None:
    """Before a chain operation: finish or report what an earlier controller left.

    :raise UnsafeOperation: a record needs attention (the graph is in neither state).
    """
    if not _journal.load_all(vm.run_dir) and not _agent.load_freeze_records(vm.run_dir):
        return
    # A freeze that could not be thawed is reported (logged) but does not block the chain
    # operations: they do not depend on the guest's filesystems, and the agent may be gone.
    stuck = [
        r for r in await reconcile(vm) if r.verdict is Verdict.ATTENTION and r.kind != "freeze"
    ]
    if stuck:
        raise UnsafeOperation(
            "an interrupted operation needs attention first: " + "; ".join(r.message for r in stuck)
        )
