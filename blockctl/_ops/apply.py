"""Declarative drives: a file of desired drives → a plan against the live VM → apply.

The planner is pure (desired drives + the live drives as :class:`DriveInfo` → a :class:`Plan`);
the executor runs the plan's steps through :mod:`blockctl._ops.drives`. Applying the same file
twice gives an empty plan the second time.

Identity: a desired drive with ``device = "diskN"`` means that device (needed for cdroms,
whose medium changes); otherwise a disk is matched by its image file. Live disks that blockctl
created and the file does not mention are detached; drives blockctl did not create are never
touched.

File format (TOML)::

    [[drive]]
    file = "data.qcow2"     # plus any launch option: format, if, cache, serial, ...
    format = "qcow2"
    cache = "none"
    size = "2G"             # grow to this size (shrink only with allow-shrink = true)
    throttle = { bps_wr = 10485760 }

    [[drive]]
    device = "disk1"        # a cdrom: the medium it should hold (no file: empty)
    media = "cdrom"
    if = "ide"
    file = "install.iso"
    format = "raw"
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blockctl._machine import VM
from blockctl._ops import drives as ops
from blockctl._ops.drives import DriveInfo
from blockctl.errors import BlockctlError, ConfigError, PartiallyApplied, Unsupported
from blockctl.types import (
    CacheMode,
    Drive,
    Interface,
    Media,
    drive_paths_relative_to,
    parse_size,
)

_THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


@dataclass(frozen=True, slots=True, kw_only=True)
class DesiredDrive:
    drive: Drive
    device: str | None = None
    size: int | None = None
    allow_shrink: bool = False
    throttle: Mapping[str, int] | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str, base: Path | None) -> DesiredDrive:
        if not isinstance(data, Mapping):
            raise ConfigError(where, "must be a table")
        values = dict(data)
        device = values.pop("device", None)
        size = values.pop("size", None)
        allow_shrink = values.pop("allow-shrink", values.pop("allow_shrink", False))
        throttle = values.pop("throttle", None)
        if base is not None:
            values = drive_paths_relative_to(base, values, where)
        if device is not None and not isinstance(device, str):
            raise ConfigError(f"{where}.device", "must be a device id such as 'disk1'")
        if not isinstance(allow_shrink, bool):
            raise ConfigError(f"{where}.allow-shrink", "must be true or false")
        if throttle is not None:
            if not isinstance(throttle, Mapping) or set(throttle) - set(_THROTTLE_KEYS):
                raise ConfigError(f"{where}.throttle", f"a table of {', '.join(_THROTTLE_KEYS)}")
            rates: dict[str, int] = {}
            for key, value in throttle.items():
                if key.startswith("bps") and isinstance(value, str):
                    value = parse_size(value, f"{where}.throttle.{key}")  # "20M": the CLI's units
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ConfigError(
                        f"{where}.throttle.{key}",
                        "must be a non-negative integer"
                        + (" or a size such as '20M'" if key.startswith("bps") else ""),
                    )
                rates[key] = value
            throttle = rates
        return cls(
            drive=Drive.from_mapping(values, where),
            device=device,
            size=None if size is None else parse_size(size, f"{where}.size"),
            allow_shrink=bool(allow_shrink),
            throttle=throttle,
        )


def load_desired(path: Path) -> tuple[DesiredDrive, ...]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError("file", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"{path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"drive"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown key; a drives file has [[drive]] tables")
    items = data.get("drive", [])
    if not isinstance(items, list):
        raise ConfigError("drive", "use [[drive]] tables")
    return tuple(
        DesiredDrive.from_mapping(item, f"drive[{i}]", path.parent) for i, item in enumerate(items)
    )


class Action(enum.StrEnum):
    ATTACH = "attach"
    DETACH = "detach"
    MEDIA = "media"
    CACHE = "cache"
    RESIZE = "resize"
    THROTTLE = "throttle"


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    action: Action
    device: str | None  # None for an attach (the id is generated when it happens)
    detail: str
    desired: DesiredDrive | None = None
    cache: CacheMode | None = None

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action.value, "device": self.device, "detail": self.detail}


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    steps: tuple[Step, ...] = ()
    #: Differences a live change cannot make (e.g. the interface of a plugged disk).
    conflicts: tuple[str, ...] = field(default=())
    #: Set by :func:`apply`: disks whose unplug was asked for and that the guest has not
    #: released yet (their nodes stay; the next apply finishes the removal).
    pending: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.steps and not self.conflicts

    def render(self) -> str:
        if self.empty:
            return "nothing to do: the VM matches"
        lines = [f"  {s.action.value:<8} {s.device or '(new)':<8} {s.detail}" for s in self.steps]
        lines += [f"  CONFLICT {c}" for c in self.conflicts]
        lines += [f"  PENDING  {d:<8} not released by the guest yet" for d in self.pending]
        return "\n".join(lines)


def _same_file(a: Path | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).absolute() == Path(b)


def _source_name(drive: Drive) -> str:
    """The drive's storage as a live drive's ``file`` names it: the image file, or the
    URL of an iSCSI LUN or NFS image."""
    return drive.remote_url or str(drive.file)


def _same_source(drive: Drive, live_file: str | None) -> bool:
    if drive.remote_url is not None:
        return live_file == drive.remote_url
    return _same_file(drive.file, live_file)


#: The SCSI disk devices a LUN can be given to the guest as (emulated or passed through).
_SCSI_DISK_DRIVERS = frozenset({"scsi-hd", "scsi-block", "scsi-generic"})


def _scsi_device_driver(drive: Drive) -> str | None:
    """The SCSI disk device a desired drive asks for; None when it is no SCSI disk."""
    if drive.interface is not Interface.SCSI or drive.media is not Media.DISK:
        return None
    return drive.passthrough.device_driver if drive.passthrough else "scsi-hd"


def _live_cache_matches(live: DriveInfo, mode: CacheMode) -> bool:
    flags = live.cache
    return flags is not None and (flags.direct, flags.no_flush) == (mode.direct, mode.no_flush)


def plan(
    desired: Sequence[DesiredDrive], live: Sequence[DriveInfo], released: Sequence[str] = ()
) -> Plan:
    """What to do so that ``live`` matches ``desired``. Pure.

    ``released``: disks blockctl plugged whose device the guest has since released (an unplug
    that was pending) while their nodes are still open; each gets a detach that deletes them.
    """
    steps: list[Step] = [
        Step(action=Action.DETACH, device=d, detail="the guest released it: delete its nodes")
        for d in released
    ]
    conflicts: list[str] = []
    by_device = {d.device_id: d for d in live}
    matched: set[str] = set()
    for want in desired:
        drive = want.drive
        if want.device is not None:
            current = by_device.get(want.device)
            if current is None:
                conflicts.append(f"{want.device}: no such device in the VM")
                continue
        else:
            current = next(
                (d for d in live if d.device_id not in matched and _same_source(drive, d.file)),
                None,
            )
        if current is None:
            steps.append(
                Step(action=Action.ATTACH, device=None, detail=_describe(drive), desired=want)
            )
            continue
        matched.add(current.device_id)
        if drive.media is Media.CDROM:
            if not _same_file(drive.file, current.file) and not (
                drive.file is None and current.file is None
            ):
                target = "empty" if drive.file is None else str(drive.file)
                steps.append(
                    Step(
                        action=Action.MEDIA,
                        device=current.device_id,
                        detail=f"{current.file or 'empty'} → {target}",
                        desired=want,
                    )
                )
            continue
        if not _same_source(drive, current.file):
            conflicts.append(
                f"{current.device_id}: holds {current.file}, not {_source_name(drive)}; "
                "a disk's image is changed by detach + attach"
            )
            continue
        wanted_scsi = _scsi_device_driver(drive)
        if current.device_driver in _SCSI_DISK_DRIVERS and wanted_scsi not in (
            None,
            current.device_driver,
        ):
            conflicts.append(
                f"{current.device_id}: is {current.device_driver}, not {wanted_scsi}; a LUN's "
                "passthrough is changed by detach + attach"
            )
            continue
        if current.cache is not None and not _live_cache_matches(current, drive.cache):
            steps.append(
                Step(
                    action=Action.CACHE,
                    device=current.device_id,
                    detail=f"cache → {drive.cache.value}",
                    cache=drive.cache,
                )
            )
        if want.size is not None and current.size is not None and want.size != current.size:
            if want.size < current.size and not want.allow_shrink:
                conflicts.append(
                    f"{current.device_id}: size {want.size} < {current.size}; "
                    "set allow-shrink = true to shrink"
                )
            else:
                steps.append(
                    Step(
                        action=Action.RESIZE,
                        device=current.device_id,
                        detail=f"{current.size} → {want.size} bytes",
                        desired=want,
                    )
                )
        if want.throttle is not None and current.io_limits is not None:
            live_limits = {k: getattr(current.io_limits, k) for k in _THROTTLE_KEYS}
            wanted = {k: int(want.throttle.get(k, 0)) for k in _THROTTLE_KEYS}
            if live_limits != wanted:
                shown = ", ".join(f"{k}={v}" for k, v in wanted.items() if v) or "unlimited"
                steps.append(
                    Step(
                        action=Action.THROTTLE, device=current.device_id, detail=shown, desired=want
                    )
                )
    for current in live:
        # Only disks blockctl plugged (it knows their device driver) are removed; a cdrom
        # drive itself stays (its medium is what a file changes).
        if (
            current.device_id not in matched
            and current.device_driver is not None
            and not current.removable
        ):
            steps.append(
                Step(action=Action.DETACH, device=current.device_id, detail=str(current.file))
            )
    return Plan(steps=tuple(steps), conflicts=tuple(conflicts))


def _describe(drive: Drive) -> str:
    return (
        f"{_source_name(drive)} ({drive.format.value if drive.format else '-'}, "
        f"{drive.interface.value}, cache {drive.cache.value})"
    )


async def check(vm: VM, current: Plan) -> Plan:
    """The plan with what would make a step fail added to its conflicts, found before any
    step runs: an image that is missing, in use or refused by inspection, a cache mode the
    device's write cache cannot take, a drive that cannot be hot-plugged."""
    problems: list[str] = []
    for step in current.steps:
        want = step.desired
        try:
            if step.action is Action.ATTACH and want is not None:
                await ops.check_hotplug(vm, want.drive)
            elif step.action is Action.MEDIA and want is not None and want.drive.file is not None:
                await ops.check_medium(vm, want.drive.file, want.drive.format)
            elif step.action is Action.CACHE and step.device and step.cache is not None:
                await ops.check_cache(vm, step.device, step.cache)
        except BlockctlError as exc:
            problems.append(f"{step.action.value} {step.device or _describe_short(want)}: {exc}")
    return replace(current, conflicts=(*current.conflicts, *problems))


def _describe_short(want: DesiredDrive | None) -> str:
    if want is not None and want.drive.remote_url is not None:
        return want.drive.remote_url
    return "(new)" if want is None or want.drive.file is None else str(want.drive.file)


async def apply(
    vm: VM,
    desired: Sequence[DesiredDrive],
    *,
    dry_run: bool = False,
    unplug_timeout: float = 10.0,
) -> Plan:
    """Plan, check the whole plan (:func:`check`), and unless ``dry_run`` carry it out.

    A conflict stops it before any change (:class:`~blockctl.errors.Unsupported`, naming
    every conflict); a step that fails anyway stops it with
    :class:`~blockctl.errors.PartiallyApplied`, naming the steps done and not done. A detach
    the guest has not acknowledged within ``unplug_timeout`` seconds is not done: the result's
    ``pending`` names it.
    """
    live = await ops.list_drives(vm)  # (reconciles the registry with QEMU first)
    shown = {d.device_id for d in live}
    released = sorted(
        device_id
        for device_id, record in vm.registry.drives.items()
        if device_id not in shown and record.nodes
    )
    current = await check(vm, plan(desired, live, released))
    if dry_run or current.empty:
        return current
    if current.conflicts:
        raise Unsupported(
            "apply", "the plan has conflicts, nothing was changed: " + "; ".join(current.conflicts)
        )
    done: list[Step] = []
    pending: list[str] = []
    for step in current.steps:
        try:
            if await _carry_out(vm, step, unplug_timeout):
                assert step.device is not None
                pending.append(step.device)
        except BlockctlError as exc:
            left = current.steps[len(done) + 1 :]
            raise PartiallyApplied(
                f"apply stopped at step {len(done) + 1} of {len(current.steps)} "
                f"({step.action.value} {step.device or _describe_short(step.desired)}): {exc}. "
                f"Done: {_steps_text(done)}. Not done: {_steps_text(left)}. Run apply again "
                "to finish (a second apply plans only what is still missing)",
                done=tuple(done),
                failed=step,
                not_done=tuple(left),
            ) from exc
        done.append(step)
    return replace(current, pending=tuple(pending))


def _steps_text(steps: Sequence[Step]) -> str:
    if not steps:
        return "nothing"
    return ", ".join(f"{s.action.value} {s.device or _describe_short(s.desired)}" for s in steps)


async def _carry_out(vm: VM, step: Step, unplug_timeout: float) -> bool:
    """Carry out one step; True if it is left pending (an unplug the guest has not finished)."""
    want = step.desired
    if step.action is Action.ATTACH and want is not None:
        info = await ops.hotplug(vm, want.drive)
        if want.throttle:
            await ops.set_throttle(vm, info.device_id, want.throttle)
    elif step.action is Action.DETACH and step.device is not None:
        result = await ops.unplug(vm, step.device, timeout=unplug_timeout)
        return result.state is ops.UnplugState.PENDING
    elif step.action is Action.MEDIA and step.device is not None and want is not None:
        if want.drive.file is None:
            await ops.eject(vm, step.device, force=True)
        else:
            assert want.drive.format is not None
            await ops.change_medium(vm, step.device, want.drive.file, want.drive.format, force=True)
    elif step.action is Action.CACHE and step.device is not None and step.cache is not None:
        await ops.set_cache(vm, step.device, step.cache)
    elif step.action is Action.RESIZE and step.device and want and want.size:
        await ops.resize(vm, step.device, want.size, allow_shrink=want.allow_shrink)
    elif step.action is Action.THROTTLE and step.device and want and want.throttle is not None:
        await ops.set_throttle(vm, step.device, want.throttle)
    return False
