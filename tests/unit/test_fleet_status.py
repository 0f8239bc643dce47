"""``blockctl fleet status``'s rendering (text and JSON) and its VMs' last points read from a
repository (pure: no Temporal; the integration test reads a real server's runs)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from blockctl import backup
from blockctl._cli.fleet import render_status
from blockctl._cli.main import build_parser
from blockctl._fleet.inventory import VMBackup
from blockctl._fleet.status import (
    FleetStatus,
    LastFailure,
    LastPoint,
    RunningBackup,
    RunStatus,
    VMFailure,
    VMStatus,
    VMWork,
    known_vms,
    to_json,
    vm_points,
)

T0 = 1_796_400_000.0


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


STATUS = FleetStatus(
    vms=[
        VMStatus("hv1", "web", "/r", LastPoint("20261204T171442.478113-bcbf", "full", T0)),
        VMStatus(
            "hv2",
            "mail",
            "/r2",
            None,
            running=[
                RunningBackup("n/backup/hv2/mail", T0 + 60, 2, "STARTED", T0 + 70, "lost"),
                RunningBackup("m/backup/hv2/mail", T0 + 61),
            ],
            last_failure=LastFailure(
                "a/backup/hv2/mail", "FAILED", T0 + 5, "VMNotFound: no VM named 'mail'"
            ),
        ),
        VMStatus("hv3", "dns", "/gone", None, unreadable="RepositoryError: no repository"),
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
        "HOST  VM    LAST POINT                   KIND  COMPLETED            RUNNING",
        f"hv1   web   20261204T171442.478113-bcbf  full  {stamp(T0)}",
        "hv2   mail  (no point)                                                    2",
        "hv3   dns   (no point)",
        "",
        f"hv2/mail: running n/backup/hv2/mail: attempt 2, STARTED, last heartbeat {stamp(T0 + 70)}"
        " (previous attempt: lost)",
        "hv2/mail: running m/backup/hv2/mail: its backup not scheduled yet",
        f"hv2/mail: last failure a/backup/hv2/mail (FAILED {stamp(T0 + 5)}): "
        "VMNotFound: no VM named 'mail'",
        "hv3/dns: repository not read: RepositoryError: no repository",
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
    text = render_status(FleetStatus(vms=STATUS.vms[2:], runs=[]))
    assert text.splitlines()[1:] == [
        "hv3   dns  (no point)",
        "",
        "hv3/dns: repository not read: RepositoryError: no repository",
        "",
        "no fleet backup runs on the server",
    ]
    assert render_status(FleetStatus(vms=[], runs=[])).splitlines() == [
        "no VM backups on the server",
        "",
        "no fleet backup runs on the server",
    ]


def test_the_json_has_the_raw_values_and_null_for_what_there_is_not() -> None:
    data = json.loads(json.dumps(to_json(STATUS)))
    web, mail, dns = data["vms"]
    assert web == {
        "host": "hv1",
        "vm": "web",
        "repository": "/r",
        "last_point": {"id": "20261204T171442.478113-bcbf", "kind": "full", "completed": T0},
        "unreadable": None,
        "state": None,
        "running": [],
        "last_failure": None,
        "last_verify": None,
        "last_prune": None,
        "last_restore": None,
    }
    assert data["hosts"] == []
    assert mail["last_point"] is None and mail["unreadable"] is None
    assert mail["running"] == [
        {
            "workflow_id": "n/backup/hv2/mail",
            "started": T0 + 60,
            "attempt": 2,
            "state": "STARTED",
            "last_heartbeat": T0 + 70,
            "last_failure": "lost",
        },
        {
            "workflow_id": "m/backup/hv2/mail",
            "started": T0 + 61,
            "attempt": None,
            "state": None,
            "last_heartbeat": None,
            "last_failure": None,
        },
    ]
    assert mail["last_failure"] == {
        "workflow_id": "a/backup/hv2/mail",
        "status": "FAILED",
        "closed": T0 + 5,
        "error": "VMNotFound: no VM named 'mail'",
    }
    assert dns["unreadable"] == "RepositoryError: no repository"
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
    backups = [VMBackup("hv1", "web", str(tmp_path / "repo"))]
    assert vm_points(backups) == [VMStatus("hv1", "web", str(tmp_path / "repo"), None)]


def test_a_repository_not_read_is_said_so_with_temporals_work(tmp_path: Path) -> None:
    failure = LastFailure("a/backup/hv1/web", "FAILED", T0, "RepositoryError: no repository")
    work = {("hv1", "web"): VMWork(str(tmp_path / "none"), last_failure=failure)}
    (status,) = vm_points(known_vms(work), work)
    assert (status.vm, status.last, status.last_failure) == ("web", None, failure)
    assert status.unreadable is not None and str(tmp_path / "none") in status.unreadable


@pytest.mark.parametrize("runs", ["0", "101", "-1", "x"])
def test_status_refuses_a_number_of_runs_out_of_range(
    runs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser()[0].parse_args(["fleet", "status", "--runs", runs])
    assert "a number of runs, 1 to 100" in capsys.readouterr().err


def test_workers_listed_vms_join_the_status_with_their_state(tmp_path: Path) -> None:
    """A VM a worker lists and the server never backed up is shown, with its state and no
    repository (without an inventory) or its host's (with one); a host whose worker did not
    answer is said so."""
    from blockctl._fleet.inventory import HostVMs, ListedVM
    from blockctl._fleet.status import with_workers_vms

    backup.init_repository(tmp_path / "repo")
    known = [VMBackup("hv1", "web", str(tmp_path / "repo"))]
    hosts = [
        HostVMs("hv1", [ListedVM("web", "running", 10), ListedVM("db", "dead", 11)]),
        HostVMs("hv2", error="worker not polling since then", last_poll=1700000000.5),
    ]
    backups, states = with_workers_vms(known, hosts)
    assert backups == [known[0], VMBackup("hv1", "db", "")]
    assert states == {("hv1", "web"): "running", ("hv1", "db"): "dead"}
    backups_inv, _ = with_workers_vms([], hosts, {"hv1": "/inv"})
    assert backups_inv == [VMBackup("hv1", "db", "/inv"), VMBackup("hv1", "web", "/inv")]
    vms = vm_points(backups, None, states)
    assert vms == [
        VMStatus("hv1", "web", str(tmp_path / "repo"), None, state="running"),
        VMStatus("hv1", "db", "", None, state="dead"),
    ]
    status = FleetStatus(vms, [], hosts)
    lines = render_status(status).splitlines()
    assert lines[0].split() == ["HOST", "VM", "STATE", "LAST", "POINT", "KIND", "COMPLETED",
                                "RUNNING"]  # fmt: skip
    assert lines[1].split() == ["hv1", "web", "running", "(no", "point)"]
    assert lines[2].split() == ["hv1", "db", "dead", "(no", "point)"]
    assert "hv2: VMs not listed: worker not polling since then" in lines
    data = json.loads(json.dumps(to_json(status)))
    assert [(v["vm"], v["state"], v["repository"]) for v in data["vms"]] == [
        ("web", "running", str(tmp_path / "repo")),
        ("db", "dead", None),
    ]
    assert data["hosts"] == [
        {
            "host": "hv1",
            "vms": [
                {"name": "web", "state": "running", "pid": 10},
                {"name": "db", "state": "dead", "pid": 11},
            ],
            "error": None,
            "last_poll": None,
        },
        {
            "host": "hv2",
            "vms": [],
            "error": "worker not polling since then",
            "last_poll": 1700000000.5,
        },
    ]


def test_a_vms_last_verify_and_prune_are_shown() -> None:
    """Each VM's last fleet verify (its point ok, damaged, or failed) and last fleet prune, a
    line each and in the JSON."""
    from blockctl._fleet.status import LastPrune, LastRestore, LastVerify, VMChecks, with_checks

    vms = with_checks(
        [VMStatus("hv1", "web", "/r", None), VMStatus("hv1", "db", "/r", None),
         VMStatus("hv2", "dns", "/r", None)],
        {
            ("hv1", "web"): VMChecks(
                LastVerify("v1", T0, "p9", True), LastPrune("q1", T0 + 1, 2, 1)
            ),
            ("hv1", "db"): VMChecks(
                LastVerify("v1", T0, "p8", False, ["chunk ab: bad"]),
                restore=LastRestore("r1", T0 + 2, "p8", ["/d/db.p8.disk0.qcow2"]),
            ),
            ("hv2", "dns"): VMChecks(restore=LastRestore("r1", T0 + 2, None, error="gone")),
        },
    )  # fmt: skip
    status = FleetStatus(vms, [])
    lines = render_status(status).splitlines()
    assert f"hv1/web: last verify v1 ({stamp(T0)}): p9 ok" in lines
    assert f"hv1/web: last prune q1 ({stamp(T0 + 1)}): deleted 2, kept 1" in lines
    assert f"hv1/db: last verify v1 ({stamp(T0)}): p8 DAMAGED: chunk ab: bad" in lines
    assert f"hv1/db: last restore r1 ({stamp(T0 + 2)}): p8 into /d/db.p8.disk0.qcow2" in lines
    assert [line for line in lines if line.startswith("hv2/dns")] == [
        f"hv2/dns: last restore r1 ({stamp(T0 + 2)}): FAILED: gone"
    ]
    web, db, dns = json.loads(json.dumps(to_json(status)))["vms"]
    assert web["last_verify"] == {
        "workflow_id": "v1", "closed": T0, "point": "p9", "ok": True, "problems": [],
        "error": None,
    }  # fmt: skip
    assert web["last_prune"] == {
        "workflow_id": "q1",
        "closed": T0 + 1,
        "deleted": 2,
        "kept": 1,
        "error": None,
    }
    assert db["last_verify"]["problems"] == ["chunk ab: bad"] and db["last_prune"] is None
    assert dns["last_verify"] is None and dns["last_prune"] is None
    assert web["last_restore"] is None
    assert db["last_restore"] == {
        "workflow_id": "r1", "closed": T0 + 2, "point": "p8",
        "files": ["/d/db.p8.disk0.qcow2"], "error": None,
    }  # fmt: skip
    assert dns["last_restore"]["error"] == "gone"


def test_hosts_whose_workers_are_not_polling_are_not_asked() -> None:
    """``fleet status``'s host lists: a host whose queue was never polled or not for longer
    than a live worker's poll cycle, or whose worker said it stopped and nothing polled
    after, is said so (with the server's last poll), not asked; a worker started after a
    stop (a later poll) is asked; with the workflows' queue not polled, nobody is asked."""
    from blockctl._fleet.status import not_polling

    now = 1_800_000_000.0
    last_poll = {
        "fresh": now - 5,
        "stale": now - 95,
        "never": None,
        "stopped": now - 40,
        "restarted": now - 2,
    }
    stopped = {"stopped": now - 38, "restarted": now - 30}
    hosts = list(last_poll)
    found = not_polling(hosts, last_poll, now - 1, stopped, now, live_poll=90, stop_margin=5)
    assert sorted(found) == ["never", "stale", "stopped"]
    assert {h: found[h].last_poll for h in found} == {
        "never": None,
        "stale": now - 95,
        "stopped": now - 40,
    }
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now - 95))
    assert found["stale"].error is not None
    assert found["stale"].error.startswith(f"worker not polling since {since} (blockctl@stale;")
    stop = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now - 38))
    assert f"; its worker stopped by {stop};" in (found["stopped"].error or "")
    assert "no poll of blockctl@never on record" in (found["never"].error or "")
    assert all(h.vms == [] for h in found.values())
    # Nothing polls the workflows' queue: every host is said so, none asked.
    none = not_polling(hosts, last_poll, now - 200, stopped, now, live_poll=90, stop_margin=5)
    assert sorted(none) == sorted(hosts)
    assert "no worker polls the workflows' queue blockctl-fleet since" in (
        none["fresh"].error or ""
    )
    assert none["fresh"].last_poll == now - 5


async def test_a_worker_silent_for_three_heartbeats_is_taken_as_stopped() -> None:
    """A worker killed -9 sends no final heartbeat: once its last one (either of its two
    pollers', the server's list) is older than ``WORKER_BEAT_LOST``, its host is taken as
    stopped by the next one due (not asked: asked, it cost the fleet list its 10 s wait); a
    fresh heartbeat of any of the host's workers keeps it running; a stop (its final
    heartbeat) counts on the host's own queue only, as before."""
    from google.protobuf.timestamp_pb2 import Timestamp
    from temporalio.api.enums.v1 import WorkerStatus
    from temporalio.api.worker.v1 import WorkerHeartbeat, WorkerInfo
    from temporalio.api.workflowservice.v1 import ListWorkersResponse

    from blockctl._fleet import worker

    now = 1_800_000_000.0
    running, down = WorkerStatus.WORKER_STATUS_RUNNING, WorkerStatus.WORKER_STATUS_SHUTDOWN

    def beat(host: str, queue: str, age: float, status: int = running) -> WorkerInfo:
        at = Timestamp()
        at.FromNanoseconds(int((now - age) * 1e9))
        return WorkerInfo(
            worker_heartbeat=WorkerHeartbeat(
                worker_identity=f"{worker.IDENTITY_PREFIX}{host} 1@m",
                task_queue=queue,
                status=status,  # type: ignore[arg-type]
                heartbeat_time=at,
            )
        )

    lost = worker.WORKER_BEAT_LOST
    infos = [
        beat("killed", "blockctl-fleet", lost + 10),  # its own queue's poller not listed
        beat("live", "blockctl@live", lost + 30),
        beat("live", "blockctl-fleet", 1),
        beat("quiet", "blockctl@quiet", lost - 1),
        beat("stopped", "blockctl@stopped", 40, down),
        beat("other-stopped", "blockctl-fleet", 40, down),  # not its host's queue
    ]

    class Service:
        async def list_workers(self, _request: Any) -> ListWorkersResponse:
            return ListWorkersResponse(workers_info=infos)

    class Client:
        namespace = "default"
        workflow_service = Service()

    found, beats = await worker._stopped_workers(Client(), now)  # type: ignore[arg-type]
    assert found == {
        "killed": now - lost - 10 + worker.WORKER_BEAT.total_seconds(),
        "stopped": now - 40,
    }
    assert beats == {"live": now - 1, "quiet": now - lost + 1}  # (each host's newest)


def test_a_host_whose_worker_heartbeat_is_overdue_has_until_it_is_lost_to_take_the_question() -> (
    None
):
    """A worker whose last heartbeat is on time (at most one beat old: a live worker's) has
    the whole wait to take the fleet list's question; one whose heartbeat is overdue has
    until it is ``WORKER_BEAT_LOST`` old (then taken as stopped, unless it beat again), at
    least 1 s; a host the server lists no worker heartbeat of has the whole wait."""
    from blockctl._fleet import worker
    from blockctl._fleet.status import question_wait

    now, beat, lost = 1_800_000_000.0, worker.WORKER_BEAT.total_seconds(), worker.WORKER_BEAT_LOST

    def waits(age: float | None) -> float:
        return question_wait(None if age is None else now - age, now, wait=10.0, lost=lost)

    assert lost - 10.0 >= beat  # (so that an on-time heartbeat leaves the whole wait)
    assert [waits(a) for a in (None, 0.0, beat, beat + 3, lost - 0.5, lost + 1)] == [
        10.0,
        10.0,
        10.0,
        lost - beat - 3,
        1.0,
        1.0,
    ]
