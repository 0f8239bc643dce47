"""The block graph, derived from replies recorded from real QEMU 7.2 (fixtures/qmp/).

Each fixture set also holds ``x-debug-query-block-graph``, QEMU's own (unstable) edge list:
the derived edges must equal it exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blockctl._graph import BlockGraph, NodeRole, image_filename
from blockctl._qmp.models import BlockDevice, NodeDetail, parse_list
from blockctl.errors import NodeNotFound

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "qmp"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def graph(prefix: str) -> BlockGraph:
    nodes = parse_list(
        load(f"{prefix}.query-named-block-nodes.json"), "query-named-block-nodes", NodeDetail
    )
    devices = parse_list(load(f"{prefix}.query-block.json"), "query-block", BlockDevice)
    return BlockGraph.from_qmp(nodes, devices)


def truth(prefix: str) -> set[tuple[str, str, str]]:
    """QEMU's own edges: (parent, child name, child), devices by their -device id."""
    raw = load(f"{prefix}.x-debug-query-block-graph.json")
    names = {n["id"]: n["name"] for n in raw["nodes"]}

    def name(node_id: int) -> str:
        return (
            str(names[node_id]).removeprefix("/machine/peripheral/").removesuffix("/virtio-backend")
        )

    return {(name(e["parent"]), e["name"], name(e["child"])) for e in raw["edges"]}


def derived(g: BlockGraph) -> set[tuple[str, str, str]]:
    edges = {(d.id, "root", d.root) for d in g.devices.values() if d.root}
    for n in g.nodes.values():
        if n.file_child:
            # blkdebug calls its child "image"
            edges.add((n.name, "image" if n.driver == "blkdebug" else "file", n.file_child))
        if n.backing:
            edges.add((n.name, "backing", n.backing))
    return edges


@pytest.mark.parametrize("prefix", ["chain3", "after-commit"])
def test_derived_edges_equal_qemus_own_graph(prefix: str) -> None:
    g = graph(prefix)
    assert derived(g) == truth(prefix)
    assert g.warnings == ()


def test_three_layer_chain_top_to_base() -> None:
    g = graph("chain3")
    assert [n.name for n in g.chain_of("disk0")] == ["drv0", "drv0-b1", "drv0-b2"]
    assert [n.driver for n in g.chain_of("drv0")] == ["qcow2", "qcow2", "raw"]
    assert [n.name for n in g.chain_of("drv0-b1")] == ["drv0-b1", "drv0-b2"]
    assert g.node("drv0").filename == "/fixtures/img/top.qcow2"  # from a json: name
    assert g.node("drv0-b2").read_only and not g.node("drv0").read_only
    assert g.node("drv0-file").role is NodeRole.PROTOCOL


def test_filters_are_skipped_to_the_format_node() -> None:
    g = graph("chain3")
    assert g.devices["disk1"].root == "drv1-cor"
    assert g.node("drv1-cor").role is NodeRole.FILTER
    assert [n.name for n in g.chain_of("disk1")] == ["drv1"]


def test_users_of_a_base_are_the_overlays_and_the_device() -> None:
    g = graph("chain3")
    users = {(u.kind, u.name, u.attached) for u in g.users_of("drv0-b2")}
    assert users == {
        ("overlay", "drv0-b1", True),
        ("overlay", "drv0", True),
        ("device", "disk0", True),
    }
    assert g.users_of("bk") == ()
    assert not g.attached("bk") and g.attached("drv0-b2-file")
    assert g.device_of("drv0-b1") == g.devices["disk0"]
    assert g.device_of("bk") is None


def test_after_an_active_commit_the_dropped_layers_are_stale_users() -> None:
    g = graph("after-commit")
    assert [n.name for n in g.chain_of("disk0")] == ["drv0-b2"]
    users = {(u.kind, u.name, u.attached) for u in g.users_of("drv0-b2")}
    assert users == {
        ("device", "disk0", True),
        ("overlay", "drv0-b1", False),
        ("overlay", "drv0", False),
    }
    assert not g.attached("drv0") and not g.attached("drv0-b1-file")


def test_dirty_bitmaps_are_parsed() -> None:
    g = graph("chain3")
    (bm0,) = g.node("drv0").dirty_bitmaps
    assert (bm0.name, bm0.persistent, bm0.recording, bm0.busy) == ("bm0", False, True, False)
    assert bm0.granularity == 65536 and not bm0.inconsistent
    (bm1,) = g.node("drv1").dirty_bitmaps
    assert bm1.persistent


def test_text_rendering() -> None:
    text = graph("chain3").render_text()
    assert text.splitlines()[:7] == [
        "disk0  (/machine/peripheral/disk0/virtio-backend)",
        "└── root: drv0  qcow2  rw  /fixtures/img/top.qcow2  bitmaps: bm0",
        "    ├── file: drv0-file  file  rw  /fixtures/img/top.qcow2",
        "    └── backing: drv0-b1  qcow2  ro  /fixtures/img/mid.qcow2",
        "        ├── file: drv0-b1-file  file  ro  /fixtures/img/mid.qcow2",
        "        └── backing: drv0-b2  raw  ro  /fixtures/img/base.raw",
        "            └── file: drv0-b2-file  file  ro  /fixtures/img/base.raw",
    ]
    assert "(not attached to a device)\n└── node: bk  qcow2" in text
    after = graph("after-commit").render_text()
    assert "backing: drv0-b2 (shown above)" in after


def test_json_rendering_is_serializable() -> None:
    data = graph("chain3").to_json()
    json.dumps(data)
    disk0 = next(d for d in data["devices"] if d["id"] == "disk0")
    assert disk0["chain"] == ["drv0", "drv0-b1", "drv0-b2"]
    drv0 = next(n for n in data["nodes"] if n["node_name"] == "drv0")
    assert drv0["backing"] == "drv0-b1" and drv0["file"] == "drv0-file"
    assert drv0["dirty_bitmaps"][0]["name"] == "bm0"
    # One key style in every --json output: snake_case, as drives, jobs and backups print.
    keys = {k for n in data["nodes"] for k in n} | {k for d in data["devices"] for k in d}
    assert not [k for k in keys if "-" in k]


def test_unknown_names_raise() -> None:
    g = graph("chain3")
    with pytest.raises(NodeNotFound):
        g.chain_of("nosuch")
    with pytest.raises(NodeNotFound):
        g.users_of("nosuch")


def test_an_image_opened_twice_is_a_warning_not_a_guess() -> None:
    """Two format nodes on one file (a shared read-only open) make the backing ambiguous."""
    nodes = load("chain3.query-named-block-nodes.json")
    twin = dict(next(n for n in nodes if n["node-name"] == "drv0-b1"), **{"node-name": "twin"})
    parsed = parse_list([*nodes, twin], "query-named-block-nodes", NodeDetail)
    devices = parse_list(load("chain3.query-block.json"), "query-block", BlockDevice)
    g = BlockGraph.from_qmp(parsed, devices)
    assert g.node("drv0").backing is None
    assert any("drv0: backing file" in w and "several" in w for w in g.warnings)
    assert "warning: drv0: backing file" in g.render_text()


def test_image_filename_reads_qemus_node_names() -> None:
    assert image_filename("/srv/a.qcow2") == "/srv/a.qcow2"
    # QEMU's json: name for a qcow2 node whose header names its backing file relatively
    # (measured, QEMU 7.2): the image is the innermost file, not the backing's.
    name = (
        'json:{"backing": {"driver": "raw", "file": {"driver": "file", "filename": '
        '"/srv/base.raw"}}, "driver": "qcow2", "file": {"driver": "file", "filename": '
        '"/srv/top.qcow2"}}'
    )
    assert image_filename(name) == "/srv/top.qcow2"
    assert image_filename("json:{not json") is None


def test_a_backups_filter_above_a_disk_passes_through_to_its_format_node() -> None:
    """During a backup QEMU puts a copy-before-write filter (an implicit ``#block…`` node
    named by the disk's plain filename) above the disk's top: the device's chain is still
    the four layers, not the top's protocol node (recorded from QEMU 7.2; the filter's
    ``target`` child, the fleecing node, is not a file or backing edge)."""
    g = graph("backup-fleecing")
    filters = [n for n in g.nodes.values() if n.driver == "copy-before-write"]
    (cbw,) = filters
    assert g.devices["disk0"].root == cbw.name
    assert cbw.file_child == "drv0"
    assert [n.name for n in g.chain_of("disk0")] == ["drv0", "drv0-b1", "drv0-b2", "drv0-b3"]
    # (QEMU also lists the backup job as a parent of the filter: "main node".)
    edges = {e for e in truth("backup-fleecing") if e[1] not in ("target", "main node")}
    assert edges == derived(g)
    (fleece,) = [n for n in g.nodes.values() if n.name.startswith("bcf") and n.driver == "qcow2"]
    assert fleece.backing == "drv0"
    device = g.device_of(fleece.backing)
    assert device is not None and device.id == "disk0"
    assert g.warnings == ()
