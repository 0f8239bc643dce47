"""The option groups (jobs.JobControl, backup.BackupOptions) are checked when made, and an
operation refuses a value it cannot honour before it touches the VM."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import pytest

from blockctl import backup, chains, jobs
from blockctl.agent import Quiesce
from blockctl.errors import ConfigError
from blockctl.types import ErrorPolicy


class Hook:
    def on_transition(self, transition: jobs.JobTransition) -> None: ...

    def on_progress(self, progress: jobs.JobProgress) -> None: ...


def test_job_control_defaults() -> None:
    control = jobs.JobControl()
    assert control.speed is None
    assert control.deadline is None and control.deadline_or(600.0) == 600.0
    assert control.on_error is ErrorPolicy.REPORT
    assert control.pause_timeout == 60.0
    assert len(control.hooks) == 1  # the structlog hook


def test_job_control_keeps_what_it_is_given() -> None:
    hook = Hook()
    control = jobs.JobControl(
        speed=1 << 20, deadline=5, on_error=ErrorPolicy.STOP, pause_timeout=0, hooks=[hook]
    )
    assert control.speed == 1 << 20
    assert control.deadline_or(600.0) == 5
    assert control.pause_timeout == 0
    assert control.hooks == (hook,)  # a tuple: the list given cannot change it afterwards
    assert control.on_error is ErrorPolicy.STOP


def test_job_control_takes_a_policy_by_name() -> None:
    control = jobs.JobControl(on_error=cast(Any, "enospc"))
    assert control.on_error is ErrorPolicy.ENOSPC


def test_job_control_is_frozen() -> None:
    control = jobs.JobControl()
    with pytest.raises(dataclasses.FrozenInstanceError):
        control.speed = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("speed", -1),
        ("speed", 0),
        ("speed", 1.5),
        ("speed", True),
        ("speed", "50M"),
        ("deadline", 0),
        ("deadline", -3.0),
        ("deadline", float("nan")),
        ("deadline", "600"),
        ("pause_timeout", -0.5),
        ("pause_timeout", float("nan")),
        ("pause_timeout", None),
        ("on_error", "sometimes"),
        ("hooks", "StructlogJobHook"),
        ("hooks", None),
    ],
)
def test_job_control_refuses_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as refused:
        jobs.JobControl(**{field: value})  # type: ignore[arg-type]
    assert refused.value.field == field


def test_backup_options_defaults_and_coercion() -> None:
    options = backup.BackupOptions()
    assert options.quiesce is Quiesce.OFF
    assert options.connections >= 1
    assert options.scratch_dir is None
    assert backup.BackupOptions(quiesce=cast(Any, True)).quiesce is Quiesce.REQUIRED
    assert backup.BackupOptions(quiesce=cast(Any, "if-possible")).quiesce is Quiesce.IF_POSSIBLE
    assert backup.BackupOptions(scratch_dir=cast(Any, "/tmp/x")).scratch_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("connections", 0),
        ("connections", -2),
        ("connections", 1.0),
        ("connections", True),
        ("freeze_deadline", 0),
        ("freeze_deadline", -1.0),
        ("freeze_deadline", float("nan")),
        ("quiesce", "maybe"),
    ],
)
def test_backup_options_refuse_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as refused:
        backup.BackupOptions(**{field: value})  # type: ignore[arg-type]
    assert refused.value.field == field


# The operations check these before anything else: no VM or repository is needed to see it
# (a VM would be touched first if they did not).
NO_VM: Any = None


async def test_a_backup_refuses_the_ignore_policy() -> None:
    with pytest.raises(ConfigError, match="ignore") as refused:
        await backup.create(NO_VM, NO_VM, control=jobs.JobControl(on_error=ErrorPolicy.IGNORE))
    assert refused.value.field == "on_error"


@pytest.mark.parametrize(
    ("control", "field"),
    [
        (jobs.JobControl(speed=1 << 20), "speed"),
        (jobs.JobControl(on_error=ErrorPolicy.STOP), "on_error"),
    ],
)
async def test_snapshot_jobs_refuse_what_they_cannot_honour(
    control: jobs.JobControl, field: str
) -> None:
    for operation in (chains.load_internal, chains.delete_internal):
        with pytest.raises(ConfigError) as refused:
            await operation(NO_VM, "tag1", control=control)
        assert refused.value.field == field
