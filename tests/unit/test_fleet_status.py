"""``blockctl fleet status``'s rendering (text and JSON) and its VMs' last points read from a
repository (pure: no Temporal; the integration test reads a real server's runs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from blockctl import backup
from blockctl._cli.fleet import render_status
from blockctl._cli.main import build_parser
from blockctl._fleet.inventory import FleetBackupRequest, VMBackup
from blockctl._fleet.status import (
    FleetStatus,
    LastPoint,
    RunStatus,
    VMFailure,
    VMStatus,
    to_json,
    vm_points,
)

T0 = 1_796_400_000.0


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


STATUS = FleetStatus(
    vms=[
        VMStatus("hv1", "web", "/r", LastPoint("20261204T171442.478113-bcbf", "full", T0)),
        VMStatus("hv2", "mail", "/r2", None),
    ],
    runs=[
        RunStatus("fleet-backup-b", "run-b", "RUNNING", T0 + 60, None),
        RunStatus(
            "fleet-backup-a",
            "run-a",
            "COMPLETED",
            T0,
            T0 + 5,
            backed_up=1,
            failed=[VMFailure("hv2", "mail", "VMNotFound: no VM named 'mail'")],
        ),
        RunStatus("nightly", "run-n", "TERMINATED", T0 - 60, T0 - 30, error="terminated by me"),
    ],
)


def test_the_text_has_every_vm_its_last_point_or_none_and_every_run_with_its_outcome() -> None:
    lines = render_status(STATUS).splitlines()
    assert lines == [
        "HOST  VM    LAST POINT                   KIND  COMPLETED",
        f"hv1   web   20261204T171442.478113-bcbf  full  {stamp(T0)}",
        "hv2   mail  (no point)",
        "",
        "WORKFLOW        STATUS      STARTED              CLOSED               BACKED UP  FAILED",
        f"fleet-backup-b  RUNNING     {stamp(T0 + 60)}",
        f"fleet-backup-a  COMPLETED   {stamp(T0)}  {stamp(T0 + 5)}          1       1",
        f"nightly         TERMINATED  {stamp(T0 - 60)}  {stamp(T0 - 30)}",
        "",
        "fleet-backup-a: hv2/mail: VMNotFound: no VM named 'mail'",
        "nightly: terminated by me",
    ]


def test_the_text_says_when_the_server_has_no_run() -> None:
    text = render_status(FleetStatus(vms=STATUS.vms[1:], runs=[]))
    assert text.splitlines()[1:] == [
        "hv2   mail  (no point)",
        "",
        "no fleet backup runs on the server",
    ]


def test_the_json_has_the_raw_values_and_null_for_what_there_is_not() -> None:
    data = json.loads(json.dumps(to_json(STATUS)))
    assert data["vms"] == [
        {
            "host": "hv1",
            "vm": "web",
            "repository": "/r",
            "last_point": {"id": "20261204T171442.478113-bcbf", "kind": "full", "completed": T0},
        },
        {"host": "hv2", "vm": "mail", "repository": "/r2", "last_point": None},
    ]
    running, completed, terminated = data["runs"]
    assert running == {
        "workflow_id": "fleet-backup-b",
        "run_id": "run-b",
        "status": "RUNNING",
        "started": T0 + 60,
        "closed": None,
        "backed_up": None,
        "failed": [],
        "error": None,
    }
    assert (completed["backed_up"], completed["failed"], completed["error"]) == (
        1,
        [{"host": "hv2", "vm": "mail", "error": "VMNotFound: no VM named 'mail'"}],
        None,
    )
    assert (terminated["status"], terminated["error"]) == ("TERMINATED", "terminated by me")


def test_a_vm_never_backed_up_has_no_last_point(tmp_path: Path) -> None:
    backup.init_repository(tmp_path / "repo")
    request = FleetBackupRequest([VMBackup("hv1", "web", str(tmp_path / "repo"))])
    assert vm_points(request) == [VMStatus("hv1", "web", str(tmp_path / "repo"), None)]


@pytest.mark.parametrize("runs", ["0", "101", "-1", "x"])
def test_status_refuses_a_number_of_runs_out_of_range(
    runs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser()[0].parse_args(["fleet", "status", "fleet.toml", "--runs", runs])
    assert "a number of runs, 1 to 100" in capsys.readouterr().err
