"""The operation journal: atomic records, and the pure reconcile planner (QEMU is the truth)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockctl import _journal as j
from blockctl import _proc
from blockctl._jobs import JobTransition
from blockctl._journal import (
    AdoptJob,
    DeleteFiles,
    DeleteNodes,
    DeviceChains,
    Facts,
    Intent,
    JobFact,
    OpKind,
    ReopenReadOnly,
    Step,
    UpdateRegistry,
    Verdict,
)
from blockctl._qmp.models import JobStatus

# disk0: overlay "ov" (ov.qcow2) → "top" (top.qcow2) → "base" (base.raw)
BEFORE = ("ov", "top", "base")
FILES = ("/i/ov.qcow2", "/i/top.qcow2", "/i/base.raw")


def commit_intermediate(step: Step = Step.RUNNING, **kw: object) -> Intent:
    base = Intent(
        id="commit-1",
        kind=OpKind.COMMIT,
        vm="vm",
        step=step,
        job_id="bc-commit-1-abc",
        devices={
            "disk0": DeviceChains(
                before=BEFORE,
                after=("ov", "base"),
                files_before=FILES,
                files_after=(FILES[0], FILES[2]),
            )
        },
        drop_nodes=("top", "top-file"),
        drop_files=(FILES[1],),
        read_only_after=(("disk0", "base"),),
        what="commit of top.qcow2 into base.raw on disk0",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def active_commit(step: Step) -> Intent:
    return Intent(
        id="commit-2",
        kind=OpKind.COMMIT,
        vm="vm",
        step=step,
        job_id="bc-commit-2-abc",
        active=True,
        devices={
            "disk0": DeviceChains(
                before=BEFORE, after=("top", "base"), files_before=FILES, files_after=FILES[1:]
            )
        },
        drop_nodes=("ov", "ov-file"),
        drop_files=(FILES[0],),
        delete_files=True,
    )


def snapshot(step: Step) -> Intent:
    return Intent(
        id="snapshot-1",
        kind=OpKind.SNAPSHOT,
        vm="vm",
        step=step,
        devices={
            "disk0": DeviceChains(
                before=BEFORE,
                after=("new", *BEFORE),
                files_before=FILES,
                files_after=("/i/new.qcow2", *FILES),
            )
        },
        add_nodes={
            "disk0": (
                {"driver": "file", "node-name": "new-file", "filename": "/i/new.qcow2"},
                {"driver": "qcow2", "node-name": "new", "file": "new-file", "backing": "ov"},
            )
        },
        created_files=("/i/new.qcow2",),
    )


def facts(
    chain: tuple[str, ...],
    *,
    jobs: dict[str, JobFact] | None = None,
    extra: tuple[str, ...] = (),
    files: tuple[str, ...] = (),
) -> Facts:
    nodes = {*chain, *(f"{n}-file" for n in chain), *extra}
    return Facts(
        alive=True,
        jobs=jobs or {},
        nodes=frozenset(nodes),
        files={f"n{i}": f for i, f in enumerate(files)},
        chains={"disk0": chain},
    )


# Section: storage


def test_records_are_written_atomically_0600_and_read_back(tmp_path: Path) -> None:
    intent = commit_intermediate()
    j.write(tmp_path, intent)
    path = j.path_of(tmp_path, intent.id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert j.load_all(tmp_path) == [intent]
    assert json.loads(path.read_text())["step"] == "running"
    assert not list(tmp_path.glob("*.tmp"))
    j.remove(tmp_path, intent.id)
    assert j.load_all(tmp_path) == []


def test_a_torn_temporary_file_is_ignored_and_a_bad_record_reported(tmp_path: Path) -> None:
    dead = tmp_path / "journal-x.json.0.tmp"  # a write that never got renamed (no pid 0)
    dead.write_text("{")
    live = tmp_path / f"journal-z.json.{os.getpid()}.tmp"  # a writer mid-write, alive
    live.write_text("{")
    (tmp_path / "journal-y.json").write_text('{"version": 99}')
    found = j.load_all(tmp_path)
    assert len(found) == 1
    assert isinstance(found[0], j.Unreadable)
    # The dead writer's file is cleaned up; the live writer's is left for its rename.
    assert not dead.exists() and live.exists()
    assert "version" in found[0].reason
    assert not (tmp_path / "journal-x.tmp").exists()


def test_op_handle_records_steps_and_leaves_nothing_when_finished(tmp_path: Path) -> None:
    seen: list[Step] = []
    lost = False
    j.FAILPOINT = lambda i: seen.append(i.step)
    try:
        op = j.Op(tmp_path, commit_intermediate(Step.PLANNED), lambda: lost)
        op.starting("bc-commit-9-000000")
        op.on_transition(
            JobTransition(
                job_id="bc-commit-9-000000",
                job_type="commit",
                status=JobStatus.RUNNING,
                previous=JobStatus.CREATED,
                seconds=0,
            )
        )
        assert j.load_all(tmp_path)[0] == op.intent
        op.abandoned()  # raised with QEMU still there: the caller has the error
        assert j.load_all(tmp_path) == []
        op = j.Op(tmp_path, commit_intermediate(Step.PLANNED), lambda: lost)
        lost = True
        op.abandoned()  # QEMU gone: kept for the report
        assert len(j.load_all(tmp_path)) == 1
        op.finished()
        assert j.load_all(tmp_path) == []
    finally:
        j.FAILPOINT = None
    assert seen == [Step.PLANNED, Step.STARTING, Step.RUNNING, Step.PLANNED]


def test_no_run_dir_means_no_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU blockctl did not launch has no run dir: the operation's steps are tracked, but
    nothing is written, removed, or offered to the failpoint."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(j, "write", lambda *args: calls.append(("write", args)))
    monkeypatch.setattr(j, "remove", lambda *args: calls.append(("remove", args)))
    monkeypatch.setattr(j, "FAILPOINT", lambda intent: calls.append(("failpoint", intent)))
    op = j.Op(None, commit_intermediate(), lambda: False)
    op.step(Step.CONCLUDED)
    assert op.intent.step is Step.CONCLUDED
    op.finished()
    assert calls == []


# Section: the planner


def test_a_running_job_is_adopted_and_an_active_commit_completed() -> None:
    running = {"bc-commit-1-abc": JobFact(status=JobStatus.RUNNING, error=None)}
    p = j.plan(commit_intermediate(), facts(BEFORE, jobs=running))
    assert p.verdict is None
    assert p.actions == (AdoptJob("bc-commit-1-abc", complete=False),)
    ready = {"bc-commit-2-abc": JobFact(status=JobStatus.READY, error=None)}
    p = j.plan(active_commit(Step.READY), facts(BEFORE, jobs=ready))
    assert p.actions == (AdoptJob("bc-commit-2-abc", complete=True),)


def test_a_paused_job_needs_attention_and_nothing_is_touched() -> None:
    paused = {"bc-commit-1-abc": JobFact(status=JobStatus.PAUSED, error=None)}
    p = j.plan(commit_intermediate(), facts(BEFORE, jobs=paused))
    assert p.verdict is Verdict.ATTENTION
    assert p.actions == ()
    assert not p.forget


def test_post_state_finishes_the_cleanup_the_dead_controller_did_not_do() -> None:
    # The job finished (graph rewired) but "top" was never blockdev-del'd.
    p = j.plan(commit_intermediate(Step.RUNNING), facts(("ov", "base"), extra=("top", "top-file")))
    assert p.verdict is Verdict.FINISHED
    assert p.actions == (
        DeleteNodes(("top", "top-file")),
        ReopenReadOnly("disk0", "base"),
        UpdateRegistry("disk0", ("top", "top-file"), ()),
    )
    assert "QEMU finished it" in p.message
    # Already deleted (the controller died after blockdev-del): only the registry is left.
    p = j.plan(commit_intermediate(Step.CONCLUDED), facts(("ov", "base")))
    assert p.actions == (
        ReopenReadOnly("disk0", "base"),
        UpdateRegistry("disk0", ("top", "top-file"), ()),
    )


def test_files_are_deleted_only_when_asked_and_not_open() -> None:
    p = j.plan(active_commit(Step.CONCLUDED), facts(("top", "base"), files=FILES[1:]))
    assert DeleteFiles((FILES[0],)) in p.actions
    p = j.plan(active_commit(Step.CONCLUDED), facts(("top", "base"), files=FILES))
    assert not [a for a in p.actions if isinstance(a, DeleteFiles)]
    # The file of a node being deleted is not "in use".
    p = j.plan(
        active_commit(Step.CONCLUDED),
        Facts(
            alive=True,
            nodes=frozenset({"top", "base", "ov", "ov-file"}),
            files={"ov-file": FILES[0], "top": FILES[1]},
            chains={"disk0": ("top", "base")},
        ),
    )
    assert p.actions[:2] == (DeleteNodes(("ov", "ov-file")), DeleteFiles((FILES[0],)))


def test_pre_state_is_not_done_and_says_what_base_holds() -> None:
    p = j.plan(commit_intermediate(Step.PLANNED), facts(BEFORE))
    assert p.verdict is Verdict.NOT_DONE
    assert "stopped before changing anything" in p.message
    assert p.actions == (ReopenReadOnly("disk0", "base"),)
    p = j.plan(commit_intermediate(Step.RUNNING), facts(BEFORE))
    assert p.verdict is Verdict.NOT_DONE
    assert "no longer a point in time" in p.message


def test_a_failed_adopted_job_is_reported_failed() -> None:
    intent = commit_intermediate(Step.RUNNING, error="commit job failed: EIO")
    p = j.plan(intent, facts(BEFORE))
    assert p.verdict is Verdict.FAILED
    assert "EIO" in p.message


def test_snapshot_rollback_and_completion() -> None:
    # Overlays added, switch never sent: the added nodes and the created file go.
    p = j.plan(snapshot(Step.SWITCHING), facts(BEFORE, extra=("new", "new-file")))
    assert p.verdict is Verdict.NOT_DONE
    assert p.actions == (DeleteNodes(("new", "new-file")), DeleteFiles(("/i/new.qcow2",)))
    # Switched: the registry learns the new nodes.
    p = j.plan(snapshot(Step.SWITCHING), facts(("new", *BEFORE)))
    assert p.verdict is Verdict.FINISHED
    assert p.actions == (UpdateRegistry("disk0", (), snapshot(Step.PLANNED).add_nodes["disk0"]),)


def test_anything_else_is_reported_and_kept() -> None:
    p = j.plan(commit_intermediate(), facts(("ov",)))
    assert p.verdict is Verdict.ATTENTION
    assert not p.forget
    assert p.actions == ()
    p = j.plan(commit_intermediate(Step.CONCLUDED), facts(BEFORE))
    assert p.verdict is Verdict.ATTENTION


@pytest.mark.parametrize(
    ("intent", "top", "note"),
    [
        (commit_intermediate(Step.RUNNING), FILES[0], "interrupted"),
        (commit_intermediate(Step.CONCLUDED), FILES[0], "had finished"),
        (active_commit(Step.RUNNING), FILES[0], "part of the committed data"),
        (active_commit(Step.READY), FILES[0], "READY"),
        (active_commit(Step.CONCLUDED), FILES[1], "had finished"),
        (snapshot(Step.PLANNED), FILES[0], "never switched"),
        (snapshot(Step.SWITCHING), "/i/new.qcow2", ""),
    ],
)
def test_qemu_gone_reports_the_top_on_disk(intent: Intent, top: str, note: str) -> None:
    p = j.plan(intent, Facts(alive=False))
    assert p.verdict is Verdict.QEMU_GONE
    assert p.tops == {"disk0": top}
    assert note in p.message
    assert p.actions == ()


NAMES = st.sampled_from(["ov", "top", "base", "new", "x"])


@given(
    intent=st.sampled_from(
        [
            *(commit_intermediate(s) for s in Step),
            *(active_commit(s) for s in Step),
            *(snapshot(s) for s in Step),
        ]
    ),
    chain=st.lists(NAMES, max_size=4, unique=True),
    extra=st.lists(st.sampled_from(["top", "ov", "new", "new-file", "top-file"]), max_size=3),
    files=st.lists(st.sampled_from([*FILES, "/i/new.qcow2"]), max_size=4),
    job=st.none() | st.sampled_from(list(JobStatus)),
    error=st.none() | st.just("boom"),
)
def test_the_planner_never_deletes_what_a_chain_uses(
    intent: Intent,
    chain: list[str],
    extra: list[str],
    files: list[str],
    job: JobStatus | None,
    error: str | None,
) -> None:
    """Whatever QEMU reports, no node in a live chain and no open file is ever deleted, and
    an operation is finished only when QEMU shows its result."""
    jobs = (
        {}
        if job is None or intent.job_id is None
        else {intent.job_id: JobFact(status=job, error=None)}
    )
    if error is not None:
        intent = replace(intent, error=error)
    f = facts(tuple(chain), jobs=jobs, extra=tuple(extra), files=tuple(files))
    p = j.plan(intent, f)
    for action in p.actions:
        if isinstance(action, DeleteNodes):
            assert not set(action.names) & set(chain)
        if isinstance(action, DeleteFiles):
            assert not set(action.paths) & set(files)
    if p.verdict is Verdict.FINISHED:
        assert tuple(chain) == intent.devices["disk0"].after
    if p.verdict is None:
        assert jobs


def test_qemu_gone_after_a_stream_or_commit_job_relinks_the_old_chain() -> None:
    fmts = {"formats_before": ("qcow2", "qcow2", "raw")}
    chains = replace(commit_intermediate().devices["disk0"], **fmts)
    intent = commit_intermediate(Step.CONCLUDED, devices={"disk0": chains})
    p = j.plan(intent, Facts(alive=False))
    assert p.actions == (j.Relink(FILES[0], "qcow2", FILES[1], "qcow2"),)
    assert p.tops == {"disk0": FILES[0]}
    # Before the job could run there is nothing to relink; an active commit never is.
    assert j.plan(replace(intent, step=Step.PLANNED), Facts(alive=False)).actions == ()
    assert j.plan(replace(active_commit(Step.CONCLUDED)), Facts(alive=False)).actions == ()


def test_the_graph_wins_over_a_recorded_error_and_a_dismissed_job_is_gone() -> None:
    intent = commit_intermediate(Step.RUNNING, error="job vanished; outcome unknown")
    assert j.plan(intent, facts(("ov", "base"))).verdict is Verdict.FINISHED
    being_dismissed = {"bc-commit-1-abc": JobFact(status=JobStatus.NULL, error=None)}
    p = j.plan(commit_intermediate(), facts(("ov", "base"), jobs=being_dismissed))
    assert p.verdict is Verdict.FINISHED


# Section: a record whose writer still runs (issue 14: another client's operation)


@given(
    intent=st.sampled_from(
        [
            *(commit_intermediate(s) for s in Step),
            *(active_commit(s) for s in Step),
            *(snapshot(s) for s in Step),
        ]
    ),
    chain=st.lists(NAMES, max_size=4, unique=True),
    job=st.none() | st.sampled_from(list(JobStatus)),
)
def test_a_live_writers_operation_is_running_and_left_alone(
    intent: Intent, chain: list[str], job: JobStatus | None
) -> None:
    """Whatever QEMU shows (no job yet, the job in any state, either chain), a record whose
    writer still runs is reported running by its pid: no action, never forgotten."""
    intent = replace(intent, pid=4242, pid_start=77)
    jobs = (
        {}
        if job is None or intent.job_id is None
        else {intent.job_id: JobFact(status=job, error=None)}
    )
    p = j.plan(intent, facts(tuple(chain), jobs=jobs), owner_alive=True)
    assert p.verdict is Verdict.RUNNING
    assert p.actions == ()
    assert not p.forget
    assert "running in process 4242" in p.message
    # The same record once its writer is gone: what it was before (adopt, finish, undo...).
    assert j.plan(intent, facts(tuple(chain), jobs=jobs)).verdict is not Verdict.RUNNING


def test_the_report_of_a_running_operation_is_exact() -> None:
    """What `recover` and `status` print for another client's operation, word for word."""
    intent = replace(commit_intermediate(Step.RUNNING), pid=4242, pid_start=77)
    assert intent.job_id
    chain = facts(("ov", "top", "base"))
    p = j.plan(intent, chain, owner_alive=True)
    assert p.forget is False
    assert p.message.partition(": running in process ")[2] == (
        f"4242 (step running, job {intent.job_id}); left to it"
    )
    planned = replace(intent, job_id=None, step=Step.PLANNED)
    p = j.plan(planned, chain, owner_alive=True)
    assert p.message.partition(": running in process ")[2] == "4242 (step planned); left to it"


def test_qemu_gone_wins_over_a_live_writer() -> None:
    p = j.plan(commit_intermediate(), Facts(alive=False), owner_alive=True)
    assert p.verdict is Verdict.QEMU_GONE


def test_records_name_their_writer_and_owner_alive_checks_it(tmp_path: Path) -> None:
    me = os.getpid()
    start = j.process_start(me)
    assert start is not None
    op = j.Op(tmp_path, replace(commit_intermediate(Step.PLANNED), pid=me, pid_start=start), bool)
    (loaded,) = j.load_all(tmp_path)
    assert isinstance(loaded, Intent) and (loaded.pid, loaded.pid_start) == (me, start)
    # This process drives it: alive. Once it no longer does (the record left behind for the
    # next reconcile), not alive, though the writer runs.
    assert j.owner_alive(loaded)
    op.release()
    assert not j.owner_alive(loaded)
    # Another process: alive while it runs with the same start time (a reused pid is not it).
    parent = os.getppid()
    parent_start = j.process_start(parent)
    other = replace(loaded, pid=parent, pid_start=parent_start)
    assert j.owner_alive(other)
    assert not j.owner_alive(replace(other, pid_start=(parent_start or 0) + 1))
    # A record from before records named their writer: not alive (interrupted, as before).
    assert not j.owner_alive(replace(loaded, pid=None, pid_start=None))


def test_a_zombie_is_not_alive() -> None:
    """A killed process nobody reaps (a detached server whose parent is a PID 1 that does not
    reap) keeps its pid and start time: still, it is gone (recovery must restart its server)."""
    child = subprocess.Popen(["sleep", "600"])
    try:
        start = _proc.process_start(child.pid)
        assert _proc.process_alive(child.pid, start)
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert _proc.process_start(child.pid) == start
        assert not _proc.process_alive(child.pid, start)
    finally:
        child.kill()
        child.wait()


def test_begin_names_the_writer(tmp_path: Path) -> None:
    class FakeSession:
        lost = False

    class FakeVM:
        run_dir = tmp_path
        session = FakeSession()

    op = j.begin(FakeVM(), replace(commit_intermediate(Step.PLANNED), id=""))  # type: ignore[arg-type]
    assert op.intent.pid == os.getpid()
    assert op.intent.pid_start == j.process_start(os.getpid())
    assert j.owner_alive(op.intent)
    op.finished()
    assert not j.owner_alive(op.intent)
    assert j.load_all(tmp_path) == []


# Section: what recovery reports (exact: these lines are the whole of what a user is told about
# an interrupted operation; mutation testing showed that any wording, a lost device name or a
# wrong step boundary in them went unnoticed)

WHAT = "commit of top.qcow2 into base.raw on disk0"
UNCHANGED = "The chain is unchanged and reads as before."
UNCHANGED_COMMIT = (
    "The chain is unchanged and reads as before; its base may already hold part of the "
    "committed data, so it is no longer a point in time of its own (qemu-facts F1/F2)."
)
DIVERGED = (
    "QEMU's graph is neither the state before nor the one expected after{extra} "
    "(disk0: {seen} (before: ov ← top ← base, expected after: ov ← base)). Nothing was "
    "changed; check the chain (`blockctl chain`), then `blockctl recover VM --forget` drops "
    "this record"
)
RELINK_NOTE = (
    "a finished stream or intermediate commit rewrites the backing link before QEMU flushes "
    "the copied data's metadata, so the image above the dropped layers is pointed back at them "
    "(they are unchanged by the job; nothing is lost either way): "
)
INTERRUPTED = "the job was interrupted; the chain below reads as before"
PART = "the base may hold part of the committed data (not a point in time)"
FINISHED_NOTE = "the job had finished; the dropped layers are no longer in the chain"


def with_formats(intent: Intent) -> Intent:
    fmts = ("qcow2", "qcow2", "raw")
    devices = {d: replace(c, formats_before=fmts) for d, c in intent.devices.items()}
    return replace(intent, devices=devices)


def job(status: JobStatus) -> dict[str, JobFact]:
    return {"bc-commit-1-abc": JobFact(status=status, error=None)}


@pytest.mark.parametrize(
    ("intent", "now", "verdict", "message"),
    [
        pytest.param(
            commit_intermediate(),
            facts(BEFORE, jobs=job(JobStatus.RUNNING)),
            None,
            f"{WHAT}: job bc-commit-1-abc is running; adopting it",
            id="adopt",
        ),
        pytest.param(
            commit_intermediate(),
            facts(BEFORE, jobs=job(JobStatus.PAUSED)),
            Verdict.ATTENTION,
            f"{WHAT}: job bc-commit-1-abc is paused: resume it (`blockctl jobs`) or cancel it, "
            "then run `blockctl recover` again",
            id="paused",
        ),
        pytest.param(
            commit_intermediate(Step.RUNNING),
            facts(("ov", "base")),
            Verdict.FINISHED,
            f"{WHAT}: done (QEMU finished it after the controller stopped; cleanup completed "
            "by recovery)",
            id="finished-by-qemu",
        ),
        pytest.param(
            commit_intermediate(Step.CONCLUDED),
            facts(("ov", "base")),
            Verdict.FINISHED,
            f"{WHAT}: done (cleanup completed by recovery)",
            id="finished",
        ),
        pytest.param(
            commit_intermediate(Step.RUNNING, error="EIO"),
            facts(BEFORE),
            Verdict.FAILED,
            f"{WHAT} failed: EIO. {UNCHANGED_COMMIT}",
            id="failed",
        ),
        pytest.param(
            commit_intermediate(Step.PLANNED),
            facts(BEFORE),
            Verdict.NOT_DONE,
            f"{WHAT}: not done: it stopped before changing anything. {UNCHANGED} Run it again "
            "if still wanted",
            id="not-done-planned",
        ),
        pytest.param(
            commit_intermediate(Step.STARTING),
            facts(BEFORE),
            Verdict.NOT_DONE,
            f"{WHAT}: not done: its job bc-commit-1-abc ended without changing the chain and "
            "its result went with the controller (it failed, was cancelled, or was never "
            f"created). {UNCHANGED_COMMIT} Run it again if still wanted",
            id="not-done-starting",
        ),
        pytest.param(
            snapshot(Step.SWITCHING),
            facts(BEFORE),
            Verdict.NOT_DONE,
            "snapshot on disk0: not done: the controller stopped before the switch took "
            f"effect. {UNCHANGED} Run it again if still wanted",
            id="not-done-snapshot",
        ),
        pytest.param(
            commit_intermediate(Step.CONCLUDED),
            facts(BEFORE),
            Verdict.ATTENTION,
            f"{WHAT}: "
            + DIVERGED.format(
                extra=" although the record says it took effect", seen="ov ← top ← base"
            ),
            id="diverged-although-concluded",
        ),
        pytest.param(
            commit_intermediate(),
            facts(("ov",)),
            Verdict.ATTENTION,
            f"{WHAT}: " + DIVERGED.format(extra="", seen="ov"),
            id="diverged",
        ),
        pytest.param(
            commit_intermediate(),
            Facts(alive=True),
            Verdict.ATTENTION,
            f"{WHAT}: " + DIVERGED.format(extra="", seen="no chain"),
            id="device-gone",
        ),
    ],
)
def test_the_report_of_each_verdict_is_exact(
    intent: Intent, now: Facts, verdict: Verdict | None, message: str
) -> None:
    p = j.plan(intent, now)
    assert (p.verdict, p.message) == (verdict, message)
    assert p.forget is (verdict is not Verdict.ATTENTION)


@pytest.mark.parametrize(
    ("intent", "message"),
    [
        pytest.param(
            with_formats(commit_intermediate(Step.STARTING)),
            f"{WHAT} was interrupted at step starting: QEMU is gone. On disk: disk0: top "
            f"/i/ov.qcow2. {INTERRUPTED}; {PART}; {RELINK_NOTE}ov.qcow2 → top.qcow2",
            id="commit-starting",
        ),
        pytest.param(
            commit_intermediate(Step.RUNNING),
            f"{WHAT} was interrupted at step running: QEMU is gone. On disk: disk0: top "
            f"/i/ov.qcow2. {INTERRUPTED}; {PART}",
            id="commit-running",
        ),
        pytest.param(
            with_formats(commit_intermediate(Step.CONCLUDED)),
            f"{WHAT} was interrupted at step concluded: QEMU is gone. On disk: disk0: top "
            f"/i/ov.qcow2. {FINISHED_NOTE}; {RELINK_NOTE}ov.qcow2 → top.qcow2",
            id="commit-concluded",
        ),
        pytest.param(
            active_commit(Step.READY),
            "commit on disk0 was interrupted at step ready: QEMU is gone. On disk: disk0: top "
            "/i/ov.qcow2. the commit was READY and blockctl was completing it: if the device "
            "had not switched yet, the top image is current (its chain is intact, used below); "
            "if it had, the base is, and writes after the switch are only there",
            id="active-ready",
        ),
        pytest.param(
            active_commit(Step.CONCLUDED),
            "commit on disk0 was interrupted at step concluded: QEMU is gone. On disk: disk0: "
            f"top /i/top.qcow2. {FINISHED_NOTE}",
            id="active-concluded",
        ),
        pytest.param(
            snapshot(Step.PLANNED),
            "snapshot on disk0 was interrupted at step planned: QEMU is gone. On disk: disk0: "
            "top /i/ov.qcow2. the overlays were never switched in; the created files are unused",
            id="snapshot-planned",
        ),
        pytest.param(
            commit_intermediate(Step.PLANNED),
            f"{WHAT} was interrupted at step planned: QEMU is gone. On disk: disk0: top "
            "/i/ov.qcow2.",
            id="commit-planned",
        ),
    ],
)
def test_the_report_with_qemu_gone_is_exact(intent: Intent, message: str) -> None:
    assert j.plan(intent, Facts(alive=False)).message == message


def test_a_snapshot_whose_switch_was_sent_is_not_reported_as_never_switched() -> None:
    p = j.plan(snapshot(Step.SWITCHING), Facts(alive=False))
    assert p.tops == {"disk0": "/i/new.qcow2"}
    assert "never switched" not in p.message


def two_devices(intent: Intent) -> Intent:
    """The same operation on disk0 and disk1 (disk1's files under /j/)."""
    chains = intent.devices["disk0"]

    def moved(files: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f.replace("/i/", "/j/") for f in files)

    disk1 = replace(
        chains, files_before=moved(chains.files_before), files_after=moved(chains.files_after)
    )
    return replace(intent, devices={"disk0": chains, "disk1": disk1}, what="")


def test_reports_on_two_devices_name_both() -> None:
    intent = with_formats(two_devices(commit_intermediate(Step.CONCLUDED)))
    p = j.plan(intent, Facts(alive=False))
    assert p.message == (
        "commit on disk0, disk1 was interrupted at step concluded: QEMU is gone. On disk: "
        f"disk0: top /i/ov.qcow2; disk1: top /j/ov.qcow2. {FINISHED_NOTE}; {RELINK_NOTE}"
        "ov.qcow2 → top.qcow2, ov.qcow2 → top.qcow2"
    )
    assert p.actions == (
        j.Relink("/i/ov.qcow2", "qcow2", "/i/top.qcow2", "qcow2"),
        j.Relink("/j/ov.qcow2", "qcow2", "/j/top.qcow2", "qcow2"),
    )
    p = j.plan(intent, replace(facts(BEFORE), chains={"disk0": BEFORE}))
    assert p.message == (
        "commit on disk0, disk1: QEMU's graph is neither the state before nor the one expected "
        "after (disk0: ov ← top ← base (before: ov ← top ← base, expected after: ov ← base); "
        "disk1: no chain (before: ov ← top ← base, "
        "expected after: ov ← base)). Nothing was changed; check the chain (`blockctl chain`), "
        "then `blockctl recover VM --forget` drops this record"
    )


def test_a_device_with_nothing_dropped_does_not_stop_the_relinks_of_the_next() -> None:
    intent = with_formats(two_devices(commit_intermediate(Step.CONCLUDED)))
    untouched = replace(intent.devices["disk0"], after=BEFORE, files_after=FILES)
    intent = replace(intent, devices={"disk0": untouched, "disk1": intent.devices["disk1"]})
    p = j.plan(intent, Facts(alive=False))
    assert p.actions == (j.Relink("/j/ov.qcow2", "qcow2", "/j/top.qcow2", "qcow2"),)


# Section: a live restore (a stream off a backup's NBD server, which the record names)

SERVER = j.ServerRecord(
    pid=4242,
    pid_start=777,
    home="/run/vm/nbd-1",
    repo="/r",
    source_vm="vm",
    point="p1",
    device="disk0",
)


def live_restore(step: Step = Step.RUNNING, **kw: object) -> Intent:
    base = Intent(
        id="stream-9",
        kind=OpKind.STREAM,
        vm="vm",
        step=step,
        job_id="bc-stream-9",
        devices={
            "disk1": DeviceChains(
                before=("drv1", "bclr"),
                after=("drv1",),
                files_before=("/t/new.qcow2", "nbd+unix:///?socket=/run/vm/nbd-1/sock"),
                files_after=("/t/new.qcow2",),
                formats_before=("qcow2", "raw"),
            )
        },
        drop_nodes=("bclr", "bclr-nbd"),
        drop_files=("nbd+unix:///?socket=/run/vm/nbd-1/sock",),
        server=SERVER,
        what="live restore of disk0 (p1) into new.qcow2 on disk1",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def live_facts(
    chain: tuple[str, ...], *, server_alive: bool, jobs: dict[str, JobFact] | None = None
) -> Facts:
    return Facts(
        alive=True,
        jobs=jobs or {},
        nodes=frozenset({*chain, "drv1-file", *(("bclr-nbd",) if "bclr" in chain else ())}),
        chains={"disk1": chain},
        server_alive=server_alive,
    )


def test_a_live_restore_record_round_trips_with_its_server(tmp_path: Path) -> None:
    intent = live_restore()
    j.write(tmp_path, intent)
    assert j.load_all(tmp_path) == [intent]
    assert json.loads(j.path_of(tmp_path, intent.id).read_text())["server"] == {
        "pid": 4242,
        "pid_start": 777,
        "home": "/run/vm/nbd-1",
        "repo": "/r",
        "source_vm": "vm",
        "point": "p1",
        "device": "disk0",
    }
    # A record without a server (every other operation) reads back without one.
    assert commit_intermediate().to_json()["server"] is None
    assert Intent.from_json(commit_intermediate().to_json()).server is None


def test_a_live_restore_whose_copy_runs_is_adopted() -> None:
    plan = j.plan(
        live_restore(),
        live_facts(
            ("drv1", "bclr"),
            server_alive=True,
            jobs={"bc-stream-9": JobFact(status=JobStatus.RUNNING, error=None)},
        ),
    )
    assert plan.verdict is None
    assert plan.actions == (AdoptJob("bc-stream-9", False),)


def test_a_finished_live_restore_deletes_the_backup_nodes_and_stops_the_server() -> None:
    plan = j.plan(live_restore(), live_facts(("drv1",), server_alive=True))
    assert plan.verdict is Verdict.FINISHED
    assert plan.actions == (
        UpdateRegistry("disk1", ("bclr", "bclr-nbd"), ()),
        j.StopServer(SERVER),
    )
    with_nodes = j.plan(
        live_restore(),
        replace(
            live_facts(("drv1",), server_alive=False),
            nodes=frozenset({"drv1", "drv1-file", "bclr", "bclr-nbd"}),
        ),
    )
    assert with_nodes.actions == (
        DeleteNodes(("bclr", "bclr-nbd")),
        UpdateRegistry("disk1", ("bclr", "bclr-nbd"), ()),
        j.StopServer(SERVER),
    )
    # A plain stream (no server) stops nothing.
    plain = j.plan(live_restore(server=None), live_facts(("drv1",), server_alive=False))
    assert not [a for a in plain.actions if isinstance(a, j.StopServer)]


def test_a_live_restore_on_the_backup_copies_again_while_its_server_runs() -> None:
    for step in (Step.STARTING, Step.RUNNING):
        plan = j.plan(live_restore(step), live_facts(("drv1", "bclr"), server_alive=True))
        assert plan.verdict is None
        assert plan.actions == (j.RestartStream("disk1", "drv1"),)
        assert plan.message == (
            "live restore of disk0 (p1) into new.qcow2 on disk1: the copy stopped before the "
            "end; starting it again"
        )


def test_a_live_restore_whose_copy_failed_or_whose_server_is_gone_needs_attention() -> None:
    failed = j.plan(
        live_restore(error="read error"), live_facts(("drv1", "bclr"), server_alive=True)
    )
    assert (failed.verdict, failed.actions, failed.forget) == (Verdict.ATTENTION, (), False)
    assert failed.message == (
        "live restore of disk0 (p1) into new.qcow2 on disk1: the copy failed: read error; the "
        "disk still reads the backup through its server (pid 4242), kept running; `blockctl "
        "recover` tries the copy again. Or give it up: detach the disk (`blockctl detach`), "
        "then `blockctl recover --forget` stops the server and deletes the copy's nodes; the "
        "backup point is unchanged"
    )
    # A server gone, from a record that does not say what it served: nothing to restart.
    unnamed = replace(SERVER, repo="")
    gone = j.plan(live_restore(server=unnamed), live_facts(("drv1", "bclr"), server_alive=False))
    assert (gone.verdict, gone.actions, gone.forget) == (Verdict.ATTENTION, (), False)
    assert gone.message == (
        "live restore of disk0 (p1) into new.qcow2 on disk1: the copy stopped; the backup's "
        "server (pid 4242) is gone: the blocks not copied yet cannot be read (the guest gets "
        "I/O errors on them). Or give it up: detach the disk (`blockctl detach`), then "
        "`blockctl recover --forget` stops the server and deletes the copy's nodes; the "
        "backup point is unchanged"
    )
    # A plain stream in the same state is "not done", as before.
    plain = j.plan(live_restore(server=None), live_facts(("drv1", "bclr"), server_alive=True))
    assert plain.verdict is Verdict.NOT_DONE


def test_a_live_restore_whose_server_is_gone_gets_a_new_one_then_copies_again() -> None:
    plan = j.plan(live_restore(), live_facts(("drv1", "bclr"), server_alive=False))
    assert plan.verdict is None
    assert plan.actions == (j.ReplaceServer("disk1", "drv1"),)
    assert plan.message == (
        "live restore of disk0 (p1) into new.qcow2 on disk1: the backup's server is gone; "
        "starting a new one"
    )
    # Once a new server could not be put in (the record's error): said, not tried again.
    failed = j.plan(
        live_restore(error="a new server of the backup could not be put in: x"),
        live_facts(("drv1", "bclr"), server_alive=False),
    )
    assert (failed.verdict, failed.actions) == (Verdict.ATTENTION, ())


def test_a_live_restore_with_qemu_gone_stops_the_server_and_says_the_target_is_partial() -> None:
    plan = j.plan(live_restore(), Facts(alive=False))
    assert plan.verdict is Verdict.QEMU_GONE
    assert plan.actions == (j.StopServer(SERVER),)  # no relink onto a server's URL
    assert plan.tops == {"disk1": "/t/new.qcow2"}
    # The guest's writes are in the target: the way on keeps them (never "restore again").
    assert plan.message.endswith(
        "a live restore: /t/new.qcow2 holds the guest's writes and the blocks copied so far, "
        "read over the backup's server (stopped now), whose place in the image is not written "
        "in it; the backup point is unchanged. To finish, keeping the guest's writes: "
        "`blockctl restore vm p1 disk0 /t/new.qcow2.base.raw --repo /r -O raw`, `qemu-img "
        "rebase -u -f qcow2 -F raw -b /t/new.qcow2.base.raw /t/new.qcow2`, `qemu-img rebase "
        "-f qcow2 -b '' /t/new.qcow2` (copies in the rest), then remove "
        "/t/new.qcow2.base.raw: /t/new.qcow2 stands alone"
    )
    # A record from before the source VM was recorded: the restore's own VM is named.
    unnamed = replace(SERVER, source_vm="")
    older = j.plan(live_restore(vm="vm2", server=unnamed), Facts(alive=False))
    assert "`blockctl restore vm2 p1 disk0 /t/new.qcow2.base.raw --repo /r -O raw`" in (
        older.message
    )
    # Concluded (the copy done, perhaps not flushed): the same way on is safe and says so.
    done = j.plan(live_restore(Step.CONCLUDED), Facts(alive=False))
    assert done.actions == (j.StopServer(SERVER),)
    assert done.tops == {"disk1": "/t/new.qcow2"}
    assert "rebase -u" in done.message


# Section: a live restore into a raw target (a mirror from an overlay, then a pivot)

TARGET_NODES = (
    {"driver": "file", "node-name": "drv1-target-file", "filename": "/t.raw"},
    {"driver": "raw", "node-name": "drv1-target", "file": "drv1-target-file"},
)
MIRROR_DROPS = ("drv1", "drv1-file", "bclr", "bclr-nbd")


def live_mirror(step: Step = Step.RUNNING) -> Intent:
    return Intent(
        id="mirror-1",
        kind=OpKind.MIRROR,
        vm="vm",
        step=step,
        job_id="bc-mirror-9",
        active=True,
        devices={
            "disk1": DeviceChains(
                before=("drv1", "bclr"),
                after=("drv1-target",),
                files_before=("/.t.raw.live-overlay-1.qcow2", "nbd+unix:///?socket=/s"),
                files_after=("/t.raw",),
                formats_before=("qcow2", "raw"),
            )
        },
        drop_nodes=MIRROR_DROPS,
        drop_files=("/.t.raw.live-overlay-1.qcow2",),
        delete_files=True,
        add_nodes={"disk1": TARGET_NODES},
        server=SERVER,
    )


def mirror_facts(chain: tuple[str, ...], **kwargs: Any) -> Facts:
    nodes = frozenset({*chain, *MIRROR_DROPS, "drv1-target-file"})
    return replace(live_facts(chain, **kwargs), nodes=nodes)


def test_a_live_mirror_that_runs_is_adopted_and_pivoted_at_ready() -> None:
    jobs = {"bc-mirror-9": JobFact(status=JobStatus.RUNNING, error=None)}
    plan = j.plan(live_mirror(), mirror_facts(("drv1", "bclr"), server_alive=True, jobs=jobs))
    assert plan.verdict is None
    assert plan.actions == (AdoptJob("bc-mirror-9", True),)


def test_a_pivoted_live_mirror_puts_the_target_in_the_registry_before_the_overlay_goes() -> None:
    plan = j.plan(live_mirror(Step.CONCLUDED), mirror_facts(("drv1-target",), server_alive=True))
    assert plan.verdict is Verdict.FINISHED
    assert plan.actions == (
        DeleteNodes(MIRROR_DROPS),
        UpdateRegistry("disk1", MIRROR_DROPS, TARGET_NODES),
        DeleteFiles(("/.t.raw.live-overlay-1.qcow2",)),
        j.StopServer(SERVER),
    )


def test_a_live_mirror_still_on_the_overlay_mirrors_again_while_its_server_runs() -> None:
    plan = j.plan(live_mirror(), mirror_facts(("drv1", "bclr"), server_alive=True))
    assert plan.verdict is None
    assert plan.actions == (j.RestartMirror("disk1", "drv1", "drv1-target"),)
    # The server gone: a new one is put in, as for a stream.
    gone = j.plan(live_mirror(), mirror_facts(("drv1", "bclr"), server_alive=False))
    assert gone.actions == (j.ReplaceServer("disk1", "drv1"),)


def test_a_live_mirror_whose_qemu_died_says_how_to_finish_keeping_the_writes() -> None:
    plan = j.plan(live_mirror(), Facts(alive=False))
    assert plan.verdict is Verdict.QEMU_GONE
    assert plan.tops == {"disk1": "/.t.raw.live-overlay-1.qcow2"}
    assert "qemu-img convert -n -f qcow2 -O raw /.t.raw.live-overlay-1.qcow2 /t.raw" in (
        plan.message
    )
    done = j.plan(live_mirror(Step.CONCLUDED), Facts(alive=False))
    assert done.tops == {"disk1": "/t.raw"}
    assert "had pivoted onto /t.raw" in done.message
