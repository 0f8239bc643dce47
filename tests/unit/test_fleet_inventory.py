"""The fleet's inventory (pure: no Temporal), and ``blockctl fleet`` with no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockctl._fleet.inventory import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    FleetBackupRequest,
    VMBackup,
    load_inventory,
    parse_inventory,
    task_queue,
)
from blockctl.errors import ConfigError
from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[2]


def test_an_inventory_routes_each_vm_to_its_host_and_repository(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        'repository = "repo"\n'
        '[hosts.hv1]\nvms = ["web", "db"]\n'
        '[hosts."hv2.example"]\nvms = ["mail"]\nrepository = "/srv/hv2"\n'
    )
    assert load_inventory(inventory) == FleetBackupRequest(
        [
            VMBackup("hv1", "web", str(tmp_path / "repo")),
            VMBackup("hv1", "db", str(tmp_path / "repo")),
            VMBackup("hv2.example", "mail", "/srv/hv2"),
        ]
    )
    assert task_queue("hv2.example") == "blockctl@hv2.example"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"hosts": {"h": {"vms": ["a"]}}}, "hosts.h.repository"),
        ({"repository": "r"}, "hosts"),
        ({"repository": "r", "hosts": {}}, "hosts"),
        ({"repository": "r", "hosts": {"h": {"vms": ["a", "a"]}}}, "hosts.h.vms"),
        ({"repository": "r", "hosts": {"h": {"vms": ["Bad Name"]}}}, "hosts.h.vms"),
        ({"repository": "r", "hosts": {"h": {"vms": "a"}}}, "hosts.h.vms"),
        ({"repository": "r", "hosts": {"h": {"vms": ["a"], "vm": []}}}, "hosts.h.vm"),
        ({"repository": "r", "hosts": {"-h": {"vms": ["a"]}}}, "host"),
        ({"repository": "r", "hosts": {"h/x": {"vms": ["a"]}}}, "host"),
        ({"repository": "r", "host": {}}, "host"),
    ],
)
def test_a_wrong_inventory_is_refused_naming_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_inventory(data, Path("/base"))
    assert caught.value.field == field


def test_a_task_queue_name_is_checked() -> None:
    with pytest.raises(ConfigError):
        task_queue("a b")


def test_fleet_backup_without_a_server_fails_in_one_line(tmp_path: Path) -> None:
    """No server: exit 1, one line naming FleetError (and JSON with --json); the process
    leaves by the command's exit path (os._exit: the Temporal client's threads never meet
    the interpreter's finalization, sdk-python issue 300), so nothing more is printed."""
    try:
        import temporalio  # noqa: F401
    except ImportError:
        missing("temporalio (pip install 'blockctl[fleet]')")
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "r"\n[hosts.hv1]\nvms = ["web"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "backup", str(inventory),
         "--address", "127.0.0.1:1", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["error"]["type"] == "FleetError"
    (line,) = result.stderr.splitlines()
    assert line.startswith("blockctl: FleetError: cannot connect to Temporal at 127.0.0.1:1")


def test_fleet_worker_refuses_a_bad_host_name_before_connecting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "worker", "--host", "a b"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("blockctl: ConfigError: "), result.stderr


def test_a_request_carries_the_default_heartbeat_timeout() -> None:
    assert FleetBackupRequest([]).heartbeat_timeout == DEFAULT_HEARTBEAT_TIMEOUT == 30.0


@pytest.mark.parametrize("value", ["0", "0.5", "nan", "x", "86401"])
def test_fleet_backup_refuses_a_bad_heartbeat_timeout_as_usage(tmp_path: Path, value: str) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "r"\n[hosts.hv1]\nvms = ["web"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "backup", str(inventory),
         "--address", "127.0.0.1:1", "--heartbeat-timeout", value],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--heartbeat-timeout" in result.stderr and "1 to 86400" in result.stderr
