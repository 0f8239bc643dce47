"""Drives of a running guest: hot-plug and unplug, removable media, live cache mode, resize,
throttling, hot-plug slots, and ``apply`` (make the drives match a declared set).

::

    from blockctl import Drive, ImageFormat, drives

    info = await drives.hotplug(vm, Drive(file=path, format=ImageFormat.QCOW2))
    await drives.resize(vm, info.device_id, 2 << 30)
    result = await drives.unplug(vm, info.device_id)   # result.state: removed | pending

See the README's "Drives of a running guest" section for the guarantees.
"""

from blockctl._ops.apply import Action, DesiredDrive, Plan, Step, apply, load_desired
from blockctl._ops.apply import plan as plan_apply
from blockctl._ops.drives import (
    DriveInfo,
    HotplugSlots,
    UnplugResult,
    UnplugState,
    change_medium,
    drive_info,
    eject,
    hotplug,
    hotplug_slots,
    insert,
    list_drives,
    resize,
    set_cache,
    set_throttle,
    unplug,
)

__all__ = [
    "hotplug",
    "unplug",
    "list_drives",
    "drive_info",
    "hotplug_slots",
    "eject",
    "insert",
    "change_medium",
    "set_cache",
    "resize",
    "set_throttle",
    "apply",
    "plan_apply",
    "load_desired",
    "DriveInfo",
    "HotplugSlots",
    "UnplugResult",
    "UnplugState",
    "DesiredDrive",
    "Plan",
    "Step",
    "Action",
]
