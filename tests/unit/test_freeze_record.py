"""A freeze left by a dead controller: the record, the pure thaw planner, and reconcile.

``quiesced`` writes ``<run dir>/freeze-<id>.json`` before the freeze is sent and removes it only
after a verified thaw; :func:`blockctl._agent.plan_thaw` decides what reconcile does about a
record whose writer is gone. The fake agent of ``test_agent`` stands in for qemu-ga.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from blockctl import _agent
from blockctl._agent import FreezeRecord, FreezeStatus, ThawStep, plan_thaw, quiesced
from blockctl._journal import Unreadable, Verdict
from blockctl._ops import recovery
from blockctl.errors import ThawFailed
from tests.unit.test_agent import FakeAgent, serving


def record(**kw: object) -> FreezeRecord:
    base = FreezeRecord(
        path=Path("/run/x/freeze-1-ab.json"),
        operation="external snapshot",
        pid=4242,
        pid_start=77,
        started=1.0,
        mountpoints=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# Section: the pure decision


def test_a_live_writer_is_never_thawed_nor_asked() -> None:
    for status in (None, FreezeStatus.FROZEN, FreezeStatus.THAWED):
        plan = plan_thaw(record(), writer_alive=True, status=status)
        assert plan.step is ThawStep.LEAVE and plan.verdict is None
    assert plan_thaw(record(), writer_alive=True, agent_error="gone").step is ThawStep.LEAVE


def test_a_dead_writer_asks_then_thaws_then_reports() -> None:
    r = record()
    assert plan_thaw(r, writer_alive=False).step is ThawStep.ASK
    assert plan_thaw(r, writer_alive=False, status=FreezeStatus.FROZEN).step is ThawStep.THAW
    done = plan_thaw(r, writer_alive=False, status=FreezeStatus.THAWED, thawed=1)
    assert (done.step, done.verdict) == (ThawStep.DONE, "finished")
    assert done.message.startswith("thawed the guest's filesystems")
    assert "controller that died during external snapshot" in done.message


def test_already_thawed_drops_the_record() -> None:
    plan = plan_thaw(record(), writer_alive=False, status=FreezeStatus.THAWED)
    assert (plan.step, plan.verdict) == (ThawStep.DONE, "finished")
    assert "already thawed" in plan.message


def test_an_unreachable_agent_keeps_the_record_and_says_what_to_run() -> None:
    plan = plan_thaw(record(), writer_alive=False, agent_error="no guest-sync within 5 s")
    assert (plan.step, plan.verdict) == (ThawStep.KEEP, "needs-attention")
    assert "`blockctl agent VM thaw`" in plan.message and "no guest-sync" in plan.message
    # Lost after the thaw was sent: still unverified, still kept.
    late = plan_thaw(record(), writer_alive=False, agent_error="closed", thawed=1)
    assert late.step is ThawStep.KEEP


def test_still_frozen_after_the_thaw_is_kept() -> None:
    plan = plan_thaw(record(), writer_alive=False, status=FreezeStatus.FROZEN, thawed=0)
    assert (plan.step, plan.verdict) == (ThawStep.KEEP, "needs-attention")


def test_process_identity_is_pid_and_start_time() -> None:
    me = os.getpid()
    start = _agent.process_start(me)
    assert start is not None
    assert _agent.writer_alive(record(pid=me, pid_start=start))
    assert not _agent.writer_alive(record(pid=me, pid_start=start + 1))  # a reused PID
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    dead = int(child.stdout)
    if _agent.process_start(dead) is None:  # (unless the PID was reused at once)
        assert not _agent.writer_alive(record(pid=dead, pid_start=1))


# Section: the record around a freeze


async def test_the_record_exists_while_frozen_and_goes_after_the_thaw() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm:
        async with quiesced(vm, True, operation="op", mountpoints=["/mnt"]):
            [path] = vm.run_dir.glob("freeze-*")
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            data = json.loads(path.read_text())
            assert data["operation"] == "op" and data["pid"] == os.getpid()
            assert data["mountpoints"] == ["/mnt"]
            assert data["pid_start"] == _agent.process_start(os.getpid())
            [loaded] = _agent.load_freeze_records(vm.run_dir)
            assert isinstance(loaded, FreezeRecord) and _agent.writer_alive(loaded)
            # Reconcile meanwhile (another task, same process): the writer is alive.
            assert await recovery.reconcile_freezes(vm) == []
            assert fake.frozen == 1
        assert not list(vm.run_dir.glob("freeze-*"))


async def test_the_record_stays_when_the_thaw_fails() -> None:
    fake = FakeAgent(refuse={"guest-fsfreeze-thaw": ("GenericError", "thaw broke")})
    async with serving(fake) as vm:
        with pytest.raises(ThawFailed):
            async with quiesced(vm, True, operation="op"):
                pass
        assert len(list(vm.run_dir.glob("freeze-*"))) == 1


async def test_no_run_dir_no_record() -> None:
    assert _agent._write_freeze_record(None, "op", None) is None


# Section: reconcile with a dead writer


def dead_record(run_dir: Path, **kw: object) -> Path:
    path = run_dir / "freeze-999999-dead.json"
    data = {
        "version": 1,
        "operation": "external snapshot",
        "pid": os.getpid(),
        "pid_start": -1,  # this PID, another process: the writer is gone
        "started": 1.0,
        "mountpoints": None,
        **kw,
    }
    path.write_text(json.dumps(data))
    return path


async def test_reconcile_thaws_what_a_dead_controller_left_frozen() -> None:
    fake = FakeAgent()
    fake.frozen = 2
    async with serving(fake) as vm:
        path = dead_record(vm.run_dir)
        [r] = await recovery.reconcile_freezes(vm)
        assert fake.frozen == 0
        assert not path.exists()
        assert (r.kind, r.verdict, r.kept) == ("freeze", Verdict.FINISHED, False)
        assert "left frozen by a controller that died during external snapshot" in r.message
        assert r.done == ("thawed 2 filesystem(s)",)


async def test_reconcile_drops_a_record_when_already_thawed() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm:
        path = dead_record(vm.run_dir)
        [r] = await recovery.reconcile_freezes(vm)
        assert r.verdict is Verdict.FINISHED and "already thawed" in r.message
        assert not path.exists() and "guest-fsfreeze-thaw" not in fake.received


async def test_reconcile_keeps_the_record_when_the_agent_is_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hung agent is given up after 0.5 s instead of the default 5 (twice): the same path.
    monkeypatch.setattr(_agent, "connect_agent", partial(_agent.connect_agent, timeout=0.5))
    fake = FakeAgent(hang={"guest-sync"})
    async with serving(fake) as vm:
        path = dead_record(vm.run_dir)
        [r] = await recovery.reconcile_freezes(vm)
        assert (r.verdict, r.kept) == (Verdict.ATTENTION, True)
        assert "blockctl agent VM thaw" in r.message
        assert path.exists()
        # --forget drops it.
        [again] = await recovery.reconcile_freezes(vm, forget=True)
        assert not again.kept and not path.exists()


async def test_an_unreadable_record_is_reported_and_kept() -> None:
    async with serving(None) as vm:
        bad = vm.run_dir / "freeze-1-x.json"
        bad.write_text("{")
        (vm.run_dir / "freeze-2-y.tmp").write_text("torn")
        [item] = _agent.load_freeze_records(vm.run_dir)
        assert isinstance(item, Unreadable)
        assert not (vm.run_dir / "freeze-2-y.tmp").exists()
        [r] = await recovery.reconcile_freezes(vm)
        assert r.kept and r.verdict is Verdict.ATTENTION and bad.exists()


async def test_offline_the_record_is_reported_and_dropped(tmp_path: Path) -> None:
    path = dead_record(tmp_path)
    [r] = await recovery.reconcile_offline(tmp_path)
    assert (r.kind, r.verdict) == ("freeze", Verdict.QEMU_GONE)
    assert not path.exists()


def test_agent_thaw_removes_only_dead_writers_records(tmp_path: Path) -> None:
    dead = dead_record(tmp_path)
    live = tmp_path / "freeze-live.json"
    live.write_text(
        json.dumps(
            {
                "version": 1,
                "operation": "backup",
                "pid": os.getpid(),
                "pid_start": _agent.process_start(os.getpid()),
                "started": 2.0,
                "mountpoints": ["/mnt"],
            }
        )
    )
    assert _agent.remove_dead_freeze_records(tmp_path) == [dead.stem]
    assert live.exists() and not dead.exists()


# Section: `blockctl status` (which reads the records only when one is there)


def test_status_counts_freeze_records_live_and_dead(tmp_path: Path) -> None:
    from blockctl._cli.vm import operations_on_record

    assert operations_on_record(tmp_path) == ([], 0)
    assert operations_on_record(None) == ([], 0)
    mine = _agent._write_freeze_record(tmp_path, "external snapshot", None)
    assert mine is not None and mine.name.startswith("freeze-")
    dead = tmp_path / "freeze-1-dead.json"
    gone = record(path=dead, pid=2**22 + 1)  # above the largest pid Linux allows (2**22)
    dead.write_text(json.dumps(gone.to_json()))
    running, interrupted = operations_on_record(tmp_path)
    assert interrupted == 1
    assert [(r["kind"], r["pid"], r["id"]) for r in running] == [("freeze", os.getpid(), mine.stem)]
