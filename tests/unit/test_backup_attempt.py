"""The plan a backup with a request id records before its transaction (issue 19): a retry
of the same request reads it back to take over the killed attempt's frozen point, so it
round-trips exactly, and anything malformed is refused naming the record."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from blockctl._backup.operations import AttemptDisk, AttemptPlan, backup_job_id
from blockctl.errors import BackupCorrupt

WHERE = "/run/vm/backup-attempt.json"


def plan(**changes: Any) -> AttemptPlan:
    disks = (
        AttemptDisk(
            device="disk0",
            node="fmt0",
            driver="qcow2",
            virtual_size=64 << 20,
            number=0,
            base="blockctl-aaaa-20261204T101500.000001-ab12",
            reason=None,
            parent="20261204T101500.000001-ab12",
            fleece="bcf0-cd34",
            export="bcx0-cd34",
            job=backup_job_id("wf/run/backup", 0),
        ),
        AttemptDisk(
            device="disk1",
            node="fmt1",
            driver="raw",
            virtual_size=1 << 20,
            number=1,
            base=None,
            reason="no checkpoint of this repository on fmt1",
            parent=None,
            fleece="bcf1-cd34",
            export="bcx1-cd34",
            job=backup_job_id("wf/run/backup", 1),
        ),
    )
    value = AttemptPlan(
        request_id="wf/run/backup",
        vm="web",
        repository="0123abcd",
        point="20261205T055000.123456-cd34",
        bitmap="blockctl-aaaa-20261205T055000.123456-cd34",
        kind="incremental",
        started=1764913800.25,
        scratch="/tmp/bc-scratch-x1y2",
        disks=disks,
        consistency="filesystem",
        frozen_filesystems=2,
    )
    return dataclasses.replace(value, **changes)


def test_a_plan_round_trips_exactly() -> None:
    for value in (plan(), plan(consistency=None, frozen_filesystems=0)):
        again = AttemptPlan.loads(value.dumps(), WHERE)
        assert again == value
        assert again.socket == "/tmp/bc-scratch-x1y2/nbd.sock"


def test_job_ids_are_the_same_for_a_request_and_valid_qmp_ids() -> None:
    first, second = backup_job_id("wf/run/backup", 0), backup_job_id("wf/run/backup", 1)
    assert first == backup_job_id("wf/run/backup", 0)  # every attempt derives the same
    assert first != second and first != backup_job_id("wf/run/backup2", 0)
    for job in (first, second, backup_job_id("x" * 2048, 0)):
        # QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", job) and job.startswith("bc-backup-")


def edit(value: AttemptPlan, change: Any) -> bytes:
    record = json.loads(value.dumps())
    change(record)
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: r.update(version=2), "version-1"),
        (lambda r: r.pop("request_id"), "request_id"),
        (lambda r: r.update(request_id="has space"), "request id"),
        (lambda r: r.update(point="../../etc"), "point id"),
        (lambda r: r.update(kind="differential"), "kind"),
        (lambda r: r.update(started="yesterday"), "started"),
        (lambda r: r.update(scratch="/home"), "scratch"),
        (lambda r: r.update(consistency="application"), "consistency"),
        (lambda r: r.update(frozen_filesystems=True), "frozen_filesystems"),
        (lambda r: r.update(disks=[]), "no disks"),
        (lambda r: r["disks"][0].update(fleece="fmt0"), "not a backup's"),
        (lambda r: r["disks"][0].update(export="other"), "not a backup's"),
        (lambda r: r["disks"][0].update(job="bc-commit-1-abc"), "job"),
        (lambda r: r["disks"][1].update(number=0), "number"),
        (lambda r: r["disks"][0].update(virtual_size=0), "size"),
        (lambda r: r["disks"][0].update(parent=None), "base and parent"),
        (lambda r: r["disks"][1].update(node=None), "node"),
    ],
)
def test_a_malformed_plan_is_refused_naming_the_record(change: Any, named: str) -> None:
    with pytest.raises(BackupCorrupt, match=re.escape(WHERE)) as raised:
        AttemptPlan.loads(edit(plan(), change), WHERE)
    assert named in str(raised.value)


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[]", b"null"])
def test_a_record_that_is_not_a_plan_is_refused(data: bytes) -> None:
    with pytest.raises(BackupCorrupt, match=re.escape(WHERE)):
        AttemptPlan.loads(data, WHERE)
