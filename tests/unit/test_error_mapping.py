"""Every qemu.qmp exception has a deliberate place in the BlockctlError tree."""

from __future__ import annotations

import inspect

import pytest
import qemu.qmp
from qemu.qmp import error as qmp_error
from qemu.qmp import events, message, models, protocol, qmp_client, util

from blockctl._qmp.session import QMP_ERROR_MAP, map_qmp_errors, translate
from blockctl.errors import BlockctlError, CommandFailed, ConnectionLost, QMPStateError


def qmp_exception_classes() -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    for module in (qemu.qmp, qmp_error, protocol, qmp_client, events, message, models, util):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, qmp_error.QMPError) and obj.__module__.startswith("qemu.qmp"):
                found.add(obj)
    return found


def test_the_scan_finds_the_known_classes() -> None:
    names = {cls.__name__ for cls in qmp_exception_classes()}
    assert {"ExecuteError", "ConnectError", "StateError", "ExecInterruptedError"} <= names


@pytest.mark.parametrize(
    "cls",
    sorted(qmp_exception_classes(), key=lambda c: str(getattr(c, "__qualname__", c))),
    ids=lambda c: str(getattr(c, "__qualname__", c)),
)
def test_every_qemu_qmp_exception_is_mapped(cls: type[BaseException]) -> None:
    assert cls in QMP_ERROR_MAP, f"{cls.__module__}.{cls.__qualname__} has no BlockctlError"
    assert issubclass(QMP_ERROR_MAP[cls], BlockctlError)


def test_state_error_after_loss_is_connection_lost() -> None:
    exc = protocol.StateError("not running", protocol.Runstate.IDLE, protocol.Runstate.RUNNING)
    assert isinstance(translate(exc, "query-status", None), QMPStateError)
    lost = translate(exc, "query-status", "QEMU was killed by SIGKILL")
    assert isinstance(lost, ConnectionLost) and "SIGKILL" in str(lost)


def test_state_error_while_disconnecting_is_connection_lost() -> None:
    """QEMU died and qemu.qmp saw the EOF before the session was told: a command sent then
    fails with "QMPClient is disconnecting", which is a lost connection, not a misuse."""
    exc = protocol.StateError(
        "QMPClient is disconnecting.", protocol.Runstate.DISCONNECTING, protocol.Runstate.RUNNING
    )
    lost = translate(exc, "job-cancel", None)
    assert isinstance(lost, ConnectionLost) and "job-cancel" in str(lost)


def test_interrupted_command_says_outcome_is_unknown() -> None:
    with pytest.raises(ConnectionLost, match="unknown"), map_qmp_errors("quit"):
        raise qmp_client.ExecInterruptedError("disconnected")


def test_command_failed_is_structured() -> None:
    assert issubclass(CommandFailed, BlockctlError)
