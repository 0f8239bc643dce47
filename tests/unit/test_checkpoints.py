"""The pure checkpoint planner (issue 13 item 1): for every state of a disk's dirty bitmaps,
what the next backup of one repository starts from and which transaction actions put the
bitmaps back in order.

Beside the named states, a sweep runs the planner over the product of every state of the
base, a failed attempt's bitmap, an older point's bitmap and the other parameters, and applies
the actions the way QEMU would (a busy bitmap cannot be removed, merged into or enabled; an
inconsistent one cannot be merged from or into; a merge needs at least one source), then checks
the one rule that matters: an incremental is offered only if the base holds every write since
the latest point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import pytest

from blockctl._backup import checkpoints
from blockctl._backup.checkpoints import bitmap_name, legacy_removals, plan
from blockctl._qmp import wire
from blockctl._qmp.models import DirtyBitmap

REPO = "0123456789abcdef0123456789abcdef"
OTHER_REPO = "fedcba9876543210fedcba9876543210"
P1 = "20261203T100000.000001-aaaa"
P2 = "20261203T100100.000002-bbbb"
FAILED = "20261203T100200.000003-cccc"  # an attempt after P2 that wrote no manifest
FAILED2 = "20261203T100300.000004-dddd"
NODE = "node-disk0"


def bm(
    name: str | None,
    *,
    recording: bool = True,
    busy: bool = False,
    inconsistent: bool = False,
) -> DirtyBitmap:
    return DirtyBitmap(
        name=name,
        count=0,
        granularity=65536,
        recording=recording,
        busy=busy,
        persistent=True,
        inconsistent=inconsistent,
    )


def mine(point: str, **state: Any) -> DirtyBitmap:
    return bm(bitmap_name(REPO, point), **state)


BASE = bitmap_name(REPO, P2)


def run(
    bitmaps: list[DirtyBitmap],
    *,
    latest: str | None = P2,
    committed: tuple[str, ...] = (P1, P2),
    in_latest: bool = True,
) -> checkpoints.DiskCheckpoint:
    return plan(
        device="disk0",
        node=NODE,
        driver="qcow2",
        bitmaps=bitmaps,
        repository_id=REPO,
        latest=latest,
        committed=committed,
        in_latest=in_latest,
    )


def names_in(action: dict[str, Any]) -> set[str]:
    data = action["data"]
    return {data.get("name"), data.get("target"), *data.get("bitmaps", ())} - {None}


# Section: the named states


def test_no_latest_point_means_full_and_stray_bitmaps_of_this_repository_go() -> None:
    result = run([], latest=None, committed=())
    assert (result.base, result.settle) == (None, ())
    assert result.reason is not None and "no earlier backup" in result.reason
    stray = run([mine(P2), bm("user-bitmap")], latest=None, committed=())
    assert stray.settle == (wire.bitmap_remove_action(NODE, BASE),)


def test_base_present_and_recording_gives_an_incremental_with_nothing_to_settle() -> None:
    result = run([mine(P2)])
    assert (result.base, result.reason, result.settle) == (BASE, None, ())


def test_bitmap_of_an_older_committed_point_is_removed_not_merged() -> None:
    result = run([mine(P1, recording=False), mine(P2)])
    assert result.base == BASE and result.reason is None
    assert result.settle == (wire.bitmap_remove_action(NODE, bitmap_name(REPO, P1)),)


def test_base_missing_says_qemu_restarted_or_bitmap_removed() -> None:
    result = run([mine(P1)])
    assert result.base is None
    assert result.reason is not None
    assert "restarted" in result.reason and "removed" in result.reason and P2 in result.reason
    assert result.settle == (wire.bitmap_remove_action(NODE, bitmap_name(REPO, P1)),)


def test_inconsistent_base_is_removed_with_its_reason() -> None:
    result = run([mine(P2, inconsistent=True)])
    assert result.base is None
    assert result.reason is not None and "inconsistent" in result.reason
    assert result.settle == (wire.bitmap_remove_action(NODE, BASE),)


def test_inconsistent_base_takes_the_failed_attempts_bitmap_with_it() -> None:
    result = run([mine(P2, inconsistent=True, recording=False), mine(FAILED)])
    assert result.base is None
    assert set(map(str, result.settle)) == {
        str(wire.bitmap_remove_action(NODE, BASE)),
        str(wire.bitmap_remove_action(NODE, bitmap_name(REPO, FAILED))),
    }


def test_busy_base_is_not_touched_and_not_used() -> None:
    result = run([mine(P2, busy=True, recording=False), mine(FAILED)])
    assert result.base is None
    assert result.reason is not None and "in use" in result.reason
    # Nothing names the base, and the failed attempt's record is kept for a later merge.
    assert result.settle == ()


def test_failed_attempt_after_latest_is_merged_into_the_disabled_base_then_removed() -> None:
    failed = bitmap_name(REPO, FAILED)
    result = run([mine(P2, recording=False), mine(FAILED)])
    assert (result.base, result.reason) == (BASE, None)
    assert result.settle == (
        wire.bitmap_merge_action(NODE, BASE, [failed]),
        wire.bitmap_remove_action(NODE, failed),
        wire.bitmap_enable_action(NODE, BASE),
    )


def test_two_failed_attempts_are_merged_in_one_action() -> None:
    one, two = bitmap_name(REPO, FAILED), bitmap_name(REPO, FAILED2)
    result = run([mine(P2, recording=False), mine(FAILED, recording=False), mine(FAILED2)])
    assert result.base == BASE
    assert result.settle[0] == wire.bitmap_merge_action(NODE, BASE, [one, two])
    assert result.settle[-1] == wire.bitmap_enable_action(NODE, BASE)


def test_leftover_whose_point_has_a_manifest_but_is_older_is_removed() -> None:
    old = bitmap_name(REPO, P1)
    result = run([mine(P1), mine(P2, recording=False), mine(FAILED)], committed=(P1, P2))
    assert result.base == BASE
    assert wire.bitmap_remove_action(NODE, old) in result.settle
    merges = [a for a in result.settle if a["type"] == "block-dirty-bitmap-merge"]
    assert merges == [wire.bitmap_merge_action(NODE, BASE, [bitmap_name(REPO, FAILED)])]


def test_failed_attempts_bitmap_that_is_inconsistent_is_not_merged_and_forces_full() -> None:
    # QEMU refuses to merge from an inconsistent bitmap (the whole transaction would fail,
    # and every later backup with it); what it recorded is lost, so the next backup is full.
    result = run([mine(P2, recording=False), mine(FAILED, inconsistent=True)])
    assert result.base is None
    assert result.reason is not None and "inconsistent" in result.reason
    assert all(a["type"] != "block-dirty-bitmap-merge" for a in result.settle)
    assert wire.bitmap_remove_action(NODE, bitmap_name(REPO, FAILED)) in result.settle


def test_failed_attempts_bitmap_that_is_busy_forces_full_and_is_not_touched() -> None:
    result = run([mine(P2, recording=False), mine(FAILED, busy=True)])
    assert result.base is None
    assert result.reason is not None and "in use" in result.reason
    assert all(bitmap_name(REPO, FAILED) not in names_in(a) for a in result.settle)


def test_disabled_base_without_any_record_of_the_writes_since_forces_full() -> None:
    result = run([mine(P2, recording=False)])
    assert result.base is None
    assert result.reason is not None and "not recorded" in result.reason


def test_bitmaps_of_other_repositories_and_tools_are_never_named() -> None:
    others = [
        bm(bitmap_name(OTHER_REPO, P2)),
        bm(bitmap_name(OTHER_REPO, FAILED), recording=False),
        bm(f"bc-{REPO[:11]}-{P2}"),  # one hex digit short of this repository's prefix
        bm(f"bc-{REPO[:12]}x-{P2}"),
        bm("libvirt-checkpoint-1"),
        bm("blockctl-inc"),
        bm(None),
    ]
    protected = {b.name for b in others if b.name is not None}
    for bitmaps, latest in (
        ([mine(P1), mine(P2, recording=False), mine(FAILED)], P2),
        ([mine(P2, inconsistent=True)], P2),
        ([mine(FAILED)], None),
        ([], P2),
    ):
        result = run(others + bitmaps, latest=latest)
        for action in result.settle:
            assert not names_in(action) & protected, action


@pytest.mark.parametrize(
    ("bitmaps", "latest", "in_latest", "reason"),
    [
        pytest.param(
            [],
            None,
            True,
            "the repository has no earlier backup of this VM holding disk0",
            id="first",
        ),
        pytest.param(
            [mine(P2)],
            P2,
            False,
            f"disk0 had another size in its last backup {P2} (resized since)",
            id="not-in-latest",
        ),
        pytest.param(
            [mine(P1)],
            P2,
            True,
            f"the VM has no checkpoint of the last backup {P2} on disk0: QEMU was restarted "
            "since without a clean shutdown (persistent bitmaps are written on clean close "
            "only), the disk's top layer changed (an external snapshot or a commit), or the "
            "bitmap was removed",
            id="base-missing",
        ),
        pytest.param(
            [mine(P2, inconsistent=True)],
            P2,
            True,
            f"the checkpoint of {P2} on disk0 is inconsistent: QEMU was killed while it was in use",
            id="base-inconsistent",
        ),
        pytest.param(
            [mine(P2, busy=True)],
            P2,
            True,
            f"the checkpoint of {P2} on disk0 is in use by another job or export",
            id="base-busy",
        ),
        pytest.param(
            [mine(P2, recording=False), mine(FAILED, inconsistent=True)],
            P2,
            True,
            f"the checkpoint of a failed backup after {P2} on disk0 is inconsistent: the writes "
            "since that backup are not all recorded",
            id="failed-inconsistent",
        ),
        pytest.param(
            [mine(P2, recording=False), mine(FAILED, busy=True)],
            P2,
            True,
            f"the checkpoint of a failed backup after {P2} on disk0 is in use: the writes since "
            "that backup are not all recorded",
            id="failed-busy",
        ),
        pytest.param(
            [mine(P2, recording=False)],
            P2,
            True,
            f"the checkpoint of {P2} on disk0 was left disabled and no checkpoint of the failed "
            "backup that disabled it is recording: the writes since are not recorded",
            id="base-disabled",
        ),
    ],
)
def test_the_reason_for_a_full_backup_is_exact(
    bitmaps: list[DirtyBitmap], latest: str | None, in_latest: bool, reason: str
) -> None:
    """The reason is all a user learns about why a backup was full (mutation testing showed
    any wording or a wrong state word in it went unnoticed)."""
    result = run(bitmaps, latest=latest, committed=(P1, P2) if latest else (), in_latest=in_latest)
    assert (result.device, result.node, result.base, result.reason) == ("disk0", NODE, None, reason)


def test_with_the_base_busy_even_an_unmergeable_leftover_is_kept_and_older_points_still_go() -> (
    None
):
    # Nothing after the latest point is touched while the base is busy (it is settled when
    # the base is free again), whatever its state and wherever it comes in the list; older
    # points' bitmaps, which hold nothing the next incremental needs, are removed all the same.
    older = bitmap_name(REPO, P1)
    for failed in (mine(FAILED), mine(FAILED, inconsistent=True)):
        result = run([failed, mine(P2, busy=True), mine(P1)])
        assert result.settle == (wire.bitmap_remove_action(NODE, older),)


def test_one_recording_leftover_among_several_keeps_the_disabled_base_usable() -> None:
    # The writes since the base was frozen are all in the recording leftover, wherever it
    # comes among the failed attempts' bitmaps.
    one, two = bitmap_name(REPO, FAILED), bitmap_name(REPO, FAILED2)
    result = run([mine(P2, recording=False), mine(FAILED), mine(FAILED2, recording=False)])
    assert (result.base, result.reason) == (BASE, None)
    assert result.settle[0] == wire.bitmap_merge_action(NODE, BASE, [one, two])


def test_a_bitmap_of_this_repository_not_named_after_a_point_is_removed_not_merged() -> None:
    # Only a name ending in a point's exact form is a failed attempt to merge; anything else
    # under the repository's prefix is removed (it can record nothing the point needs).
    stray = f"{checkpoints.repository_prefix(REPO)}not-a-point"
    assert checkpoints.point_of(stray, REPO) is None
    assert checkpoints.point_of(bitmap_name(REPO, FAILED), REPO) == FAILED
    result = run([mine(P2, recording=False), bm(stray)])
    assert result.base is None
    assert result.settle == (
        wire.bitmap_remove_action(NODE, stray),
        wire.bitmap_enable_action(NODE, BASE),
    )


def test_legacy_bitmaps_are_removed_unless_busy() -> None:
    bitmaps = [
        bm("blockctl-inc"),
        bm("blockctl-full", recording=False),
        bm("blockctl-inc.next"),
        bm("blockctl-full.next", busy=True),
        bm(BASE),
        bm("blockctl-inc2"),
        bm(None),
    ]
    assert legacy_removals(NODE, bitmaps) == [
        wire.bitmap_remove_action(NODE, "blockctl-inc"),
        wire.bitmap_remove_action(NODE, "blockctl-full"),
        wire.bitmap_remove_action(NODE, "blockctl-inc.next"),
    ]
    assert legacy_removals(NODE, []) == []


def test_persistent_only_for_qcow2() -> None:
    assert checkpoints.persistent_for("qcow2")
    assert not checkpoints.persistent_for("raw")


# Section: every state


STATES: dict[str, DirtyBitmap | None] = {
    "absent": None,
    "recording": bm("x"),
    "disabled": bm("x", recording=False),
    "busy": bm("x", busy=True),
    "busy-disabled": bm("x", busy=True, recording=False),
    "inconsistent": bm("x", inconsistent=True, recording=False),
}


@dataclass
class Bitmap:
    recording: bool
    busy: bool
    inconsistent: bool
    #: which stretches of time its bits cover: "L" (from the latest point to the failed
    #: attempt) and "F" (from the failed attempt until now)
    covers: set[str]


def apply(bitmaps: dict[str, Bitmap], actions: tuple[dict[str, Any], ...]) -> None:
    """The transaction as QEMU runs it; an action QEMU would refuse fails the test."""
    for action in actions:
        kind, data = action["type"], action["data"]
        assert data["node"] == NODE
        if kind == "block-dirty-bitmap-remove":
            target = bitmaps[data["name"]]
            assert not target.busy, f"QEMU refuses to remove busy {data['name']}"
            del bitmaps[data["name"]]
        elif kind == "block-dirty-bitmap-merge":
            target = bitmaps[data["target"]]
            assert data["bitmaps"], "a merge with no source crashes QEMU 7.2"
            assert not target.busy and not target.inconsistent
            for source in data["bitmaps"]:
                assert not bitmaps[source].inconsistent, "QEMU refuses an inconsistent source"
                target.covers |= bitmaps[source].covers
        elif kind == "block-dirty-bitmap-enable":
            target = bitmaps[data["name"]]
            assert not target.busy and not target.inconsistent
            target.recording = True
        else:
            raise AssertionError(f"unexpected action {kind}")


SWEEP = list(
    itertools.product(
        STATES,  # the base (latest point's bitmap)
        STATES,  # a failed attempt's bitmap (after the latest point)
        STATES,  # an older committed point's bitmap
        [True, False],  # in_latest
        [P2, None],  # latest
    )
)


@pytest.mark.parametrize(("base", "failed", "older", "in_latest", "latest"), SWEEP)
def test_every_state_settles_as_qemu_allows_and_never_offers_an_incremental_that_misses_writes(
    base: str, failed: str, older: str, in_latest: bool, latest: str | None
) -> None:
    given: list[DirtyBitmap] = [bm(bitmap_name(OTHER_REPO, P2)), bm("blockctl-inc")]
    model: dict[str, Bitmap] = {}
    for state, point, covers in (
        (base, P2, {"L"}),
        (failed, FAILED, {"F"}),
        (older, P1, {"O", "L"}),
    ):
        template = STATES[state]
        if template is None:
            continue
        name = bitmap_name(REPO, point)
        given.append(replace(template, name=name))
        model[name] = Bitmap(template.recording, template.busy, template.inconsistent, set(covers))
    committed = (P1, P2) if latest else ()
    result = run(given, latest=latest, committed=committed, in_latest=in_latest)
    apply(model, result.settle)
    for action in result.settle:
        assert names_in(action) <= set(model) | {bitmap_name(REPO, p) for p in (P1, P2, FAILED)}
        assert not names_in(action) & {"blockctl-inc", bitmap_name(OTHER_REPO, P2)}
    if result.base is None:
        assert result.reason
        return
    # An incremental is offered: after settling, the base is recording, consistent, and holds
    # every write since the latest point: the stretch before the failed attempt (its own
    # bits) and, if the base was frozen by that attempt, the attempt's stretch too.
    assert result.reason is None and latest == P2 and in_latest
    after = model[result.base]
    assert after.recording and not after.inconsistent and not after.busy
    frozen = not STATES[base].recording  # type: ignore[union-attr]
    assert "L" in after.covers
    if frozen:
        assert "F" in after.covers, "the writes since the failed attempt would be missed"
    remaining = {n for n in model if n.startswith(f"bc-{REPO[:12]}-")}
    stuck = {n for n in remaining if model[n].busy}
    assert remaining - stuck == {result.base}


def test_the_sweep_covers_every_state() -> None:
    assert len(SWEEP) == len(STATES) ** 3 * 4 >= 800
    offered = sum(
        1
        for base, failed, older, in_latest, latest in SWEEP
        if run(
            [
                replace(t, name=bitmap_name(REPO, p))
                for s, p in ((base, P2), (failed, FAILED), (older, P1))
                if (t := STATES[s]) is not None
            ],
            latest=latest,
            committed=(P1, P2) if latest else (),
            in_latest=in_latest,
        ).base
        is not None
    )
    assert 0 < offered < len(SWEEP)  # both outcomes are exercised
