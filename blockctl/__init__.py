"""blockctl: drive QEMU's block layer on running guests, over QMP.

    async with blockctl.open_vm(config) as vm:
        print(await vm.status())

Errors are all :class:`blockctl.errors.BlockctlError`; value types live in
:mod:`blockctl.types`.

Each name below is imported on first use (``blockctl._lazy``): ``import blockctl``, which every
``import blockctl.X`` runs first, imports none of the modules behind them.
"""

import typing

from blockctl import _lazy

#: The distribution's version too: pyproject.toml reads it here.
__version__ = "0.1.0"

if typing.TYPE_CHECKING:
    from blockctl._agent import GuestAgent, Quiesce, Quiesced, connect_agent, quiesced
    from blockctl._console import CommandResult, GuestConsole
    from blockctl._guest import GuestImage, build_guest, find_guest
    from blockctl._machine import (
        VM,
        LaunchedVM,
        Timeouts,
        attach,
        launch_detached,
        open_vm,
        shutdown_detached,
    )
    from blockctl._qmp.models import (
        BlockDevice,
        BlockNode,
        CacheFlags,
        Capabilities,
        StatusInfo,
        VersionInfo,
    )
    from blockctl._qmp.session import Event, QMPSession
    from blockctl.errors import BlockctlError
    from blockctl.types import (
        Accel,
        Aio,
        BootConfig,
        CacheMode,
        DeprecatedInput,
        DetectZeroes,
        DeviceErrorPolicy,
        Discard,
        Drive,
        ErrorPolicy,
        ImageFormat,
        Interface,
        MachineConfig,
        Media,
    )

__all__ = [
    # Launching and attaching, most to least important
    "open_vm",
    "attach",
    "launch_detached",
    "shutdown_detached",
    "VM",
    "LaunchedVM",
    "Timeouts",
    "QMPSession",
    "Event",
    # Configuration
    "MachineConfig",
    "Drive",
    "BootConfig",
    "ImageFormat",
    "Interface",
    "Media",
    "CacheMode",
    "Aio",
    "Discard",
    "DetectZeroes",
    "Accel",
    "DeprecatedInput",
    "ErrorPolicy",
    "DeviceErrorPolicy",
    # Replies
    "StatusInfo",
    "VersionInfo",
    "BlockDevice",
    "BlockNode",
    "CacheFlags",
    "Capabilities",
    # The guest agent (qemu-ga) and filesystem-consistent quiesce
    "connect_agent",
    "quiesced",
    "Quiesce",
    "Quiesced",
    "GuestAgent",
    # The test guest
    "GuestImage",
    "GuestConsole",
    "CommandResult",
    "build_guest",
    "find_guest",
    # Errors (the whole tree is in blockctl.errors)
    "BlockctlError",
]

if not typing.TYPE_CHECKING:  # type checkers see the imports above, and no __getattr__
    # The same imports, made on first use.
    __getattr__, __dir__ = _lazy.exports(
        __name__,
        {
            "blockctl._agent": ("GuestAgent", "Quiesce", "Quiesced", "connect_agent", "quiesced"),
            "blockctl._console": ("CommandResult", "GuestConsole"),
            "blockctl._guest": ("GuestImage", "build_guest", "find_guest"),
            "blockctl._machine": (
                "VM",
                "LaunchedVM",
                "Timeouts",
                "attach",
                "launch_detached",
                "open_vm",
                "shutdown_detached",
            ),
            "blockctl._qmp.models": (
                "BlockDevice",
                "BlockNode",
                "CacheFlags",
                "Capabilities",
                "StatusInfo",
                "VersionInfo",
            ),
            "blockctl._qmp.session": ("Event", "QMPSession"),
            "blockctl.errors": ("BlockctlError",),
            "blockctl.types": (
                "Accel",
                "Aio",
                "BootConfig",
                "CacheMode",
                "DeprecatedInput",
                "DetectZeroes",
                "DeviceErrorPolicy",
                "Discard",
                "Drive",
                "ErrorPolicy",
                "ImageFormat",
                "Interface",
                "MachineConfig",
                "Media",
            ),
        },
    )
