"""Backing chains of a running guest: external snapshots (all disks at one point in time),
commit, stream, internal snapshots, and the block graph they work on.

::

    from blockctl import chains

    snap = await chains.external_snapshot(vm, "before-upgrade", quiesce="if-possible")
    ...
    control = jobs.JobControl(speed=50 << 20, hooks=[my_progress])   # from blockctl import jobs
    result = await chains.commit(vm, "disk0", control=control)

Long operations run as QEMU jobs; their ``control`` (:class:`blockctl.jobs.JobControl`) sets
speed, deadline, error policy, pause timeout and the hooks that receive their transitions and
progress. See the README's "Snapshots, chains and jobs" section.
"""

from blockctl._graph import BlockGraph, GraphDevice, GraphNode, NodeRole
from blockctl._ops.chains import (
    ChainResult,
    ExternalSnapshot,
    commit,
    delete_external,
    delete_internal,
    external_snapshot,
    list_external,
    list_internal,
    load_internal,
    overlay_name,
    save_internal,
    stream,
)
from blockctl._ops.nodes import flush_chain, read_graph

__all__ = [
    "external_snapshot",
    "delete_external",
    "list_external",
    "overlay_name",
    "commit",
    "stream",
    "flush_chain",
    "save_internal",
    "load_internal",
    "delete_internal",
    "list_internal",
    "read_graph",
    "ExternalSnapshot",
    "ChainResult",
    "BlockGraph",
    "GraphDevice",
    "GraphNode",
    "NodeRole",
]
