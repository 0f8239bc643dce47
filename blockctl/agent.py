"""The guest agent (qemu-ga) and filesystem-consistent quiesce.

::

    from blockctl import agent

    async with agent.connect_agent(vm) as ga:
        print(await ga.fsfreeze_status())
    async with agent.quiesced(vm, "if-possible") as q:   # frozen inside, thawed after
        ...

See the README's "Guest agent" section.
"""

from blockctl._agent import (
    AgentInfo,
    Filesystem,
    FreezeStatus,
    FsDisk,
    GuestAgent,
    Quiesce,
    Quiesced,
    connect_agent,
    quiesced,
)

__all__ = [
    "connect_agent",
    "quiesced",
    "GuestAgent",
    "Quiesce",
    "Quiesced",
    "FreezeStatus",
    "AgentInfo",
    "Filesystem",
    "FsDisk",
]
