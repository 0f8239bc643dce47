"""The fleet's snapshot and commit activities given what ``recovery.reconcile`` found on the
VM (pure decision logic: the VM, its reconciliation and its chain are stand-ins; the
activities run in ``temporalio.testing.ActivityEnvironment``, no server, no QEMU). The
killed-worker retries on a real server and QEMU are tests/integration/test_fleet.py's."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from blockctl import chains, recovery
from blockctl._fleet import activities
from blockctl._fleet.inventory import VMChain, VMChainResult
from blockctl._journal import Verdict
from blockctl._ops.chains import overlay_name

REQUEST = VMChain("hv1", "web", "t2")


@dataclasses.dataclass
class StandIn:
    """The VM as the activity sees it: its name, identity and chain (device to files)."""

    name: str = "web"
    identity: str = "web"
    chain: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    changed: list[str] = dataclasses.field(default_factory=list)  # snapshot/commit calls


def found(verdict: Verdict, kept: bool) -> recovery.Recovery:
    return recovery.Recovery(
        op_id="op-1",
        kind="commit",
        what="commit of virtio0",
        step="switching",
        verdict=verdict,
        message="the graph is in neither state",
        kept=kept,
    )


@pytest.fixture
def vm(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    vm = StandIn()

    @asynccontextmanager
    async def attach(name: str, **_: Any) -> AsyncIterator[StandIn]:
        assert name == vm.name
        yield vm

    async def list_external(v: StandIn) -> dict[str, list[str]]:
        return v.chain

    async def external_snapshot(v: StandIn, tag: str, *_: Any) -> Any:
        v.changed.append(f"snapshot {tag}")
        raise AssertionError("not reached in these tests")

    async def delete_external(v: StandIn, tag: str) -> None:
        v.changed.append(f"commit {tag}")

    monkeypatch.setattr(activities, "attach", attach)
    monkeypatch.setattr(chains, "list_external", list_external)
    monkeypatch.setattr(chains, "external_snapshot", external_snapshot)
    monkeypatch.setattr(chains, "delete_external", delete_external)
    return vm


def retry() -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=2)
    return env


def reconciled(monkeypatch: pytest.MonkeyPatch, *results: recovery.Recovery) -> None:
    async def reconcile(_vm: Any) -> list[recovery.Recovery]:
        return list(results)

    monkeypatch.setattr(recovery, "reconcile", reconcile)


UNSETTLED = [
    found(Verdict.ATTENTION, kept=True),
    found(Verdict.RUNNING, kept=False),  # another client's operation, still running
    dataclasses.replace(found(Verdict.FINISHED, kept=True), kind="freeze"),  # guest frozen
]


@pytest.mark.parametrize("result", UNSETTLED, ids=lambda r: f"{r.verdict.value}-kept{r.kept}")
@pytest.mark.parametrize("activity_fn", [activities.snapshot_vm, activities.commit_vm])
async def test_a_retry_that_finds_an_unsettled_operation_fails_naming_it_and_the_way_out(
    vm: StandIn, monkeypatch: pytest.MonkeyPatch, result: recovery.Recovery, activity_fn: Any
) -> None:
    """A retry whose chain looks done (the snapshot's overlay there; the commit's gone) but
    whose reconciliation kept a record for attention (or found it running) must not report
    the snapshot or commit done (``reused``): it fails, final, naming the VM, the record
    and ``blockctl recover``; nothing is changed."""
    if activity_fn is activities.snapshot_vm:
        vm.chain = {"virtio0": [f"/d/{overlay_name('web', 'virtio0', 't2')}", "/d/web.qcow2"]}
    else:
        vm.chain = {"virtio0": ["/d/web.qcow2"]}
    reconciled(monkeypatch, result)
    with pytest.raises(ApplicationError) as failed:
        await retry().run(activity_fn, REQUEST)
    assert failed.value.non_retryable
    assert failed.value.type == "UnsafeOperation"
    message = str(failed.value)
    for part in ("web", "op-1", result.verdict.value, result.message, "blockctl recover web"):
        assert part in message, (part, message)
    assert "--forget" in message
    assert vm.changed == []


@pytest.mark.parametrize("verdict", [Verdict.FINISHED, Verdict.NOT_DONE, Verdict.FAILED])
async def test_a_retry_after_a_settled_operation_reports_the_earlier_attempts_work(
    vm: StandIn, monkeypatch: pytest.MonkeyPatch, verdict: Verdict
) -> None:
    """Settled records (finished, undone, failed with the chain as before) do not stop a
    retry: the tag's overlay in the chain is the earlier attempt's snapshot; its absence,
    the earlier attempt's commit."""
    overlay = f"/d/{overlay_name('web', 'virtio0', 't2')}"
    vm.chain = {"virtio0": [overlay, "/d/web.qcow2"]}
    reconciled(monkeypatch, found(verdict, kept=False))
    snap: VMChainResult = await retry().run(activities.snapshot_vm, REQUEST)
    assert (snap.reused, snap.overlays, snap.error) == (True, {"virtio0": overlay}, None)
    vm.chain = {"virtio0": ["/d/web.qcow2"]}
    done: VMChainResult = await retry().run(activities.commit_vm, REQUEST)
    assert (done.reused, done.overlays, done.error) == (True, {}, None)
    assert vm.changed == []
