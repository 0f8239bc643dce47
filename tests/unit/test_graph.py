"""The block graph, derived from replies recorded from real QEMU 7.2 (fixtures/qmp/).

Each fixture set also holds ``x-debug-query-block-graph``, QEMU's own (unstable) edge list:
the derived edges must equal it exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from blockctl._graph import BlockGraph, GraphDevice, GraphNode, NodeRole, User, image_filename
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


# Section: exact outputs and the edges from_qmp cannot derive (found by mutation testing)


def node(
    name: str,
    driver: str,
    file: str,
    *,
    backing_file: str | None = None,
    read_only: bool = False,
    virtual_size: int | None = 1 << 20,
) -> NodeDetail:
    """A query-named-block-nodes entry: a recorded one (chain3's drv0-file) with the fields
    from_qmp reads replaced."""
    (recorded,) = [
        d
        for d in parse_list(
            load("chain3.query-named-block-nodes.json"), "query-named-block-nodes", NodeDetail
        )
        if d.node.node_name == "drv0-file"
    ]
    inner = replace(
        recorded.node,
        node_name=name,
        driver=driver,
        file=file,
        backing_file=backing_file,
        read_only=read_only,
        virtual_size=virtual_size,
    )
    return replace(recorded, node=inner, dirty_bitmaps=())


def device(device_id: str, root: str | None, qdev: str | None = "") -> BlockDevice:
    """A query-block entry for ``-device id=device_id`` with ``root`` inserted (or none)."""
    (recorded,) = [
        d
        for d in parse_list(load("chain3.query-block.json"), "query-block", BlockDevice)
        if d.device_id == "disk0"
    ]
    assert recorded.inserted is not None
    inserted = None if root is None else replace(recorded.inserted, node_name=root)
    path = f"/machine/peripheral/{device_id}" if qdev == "" else qdev
    return replace(recorded, qdev=path, device=device_id, inserted=inserted)


def json_name(value: object) -> str:
    return "json:" + json.dumps(value)


def test_json_output_is_exact() -> None:
    """Every key and value of ``--json`` (chain3): the shape scripts read."""

    def n(
        name: str,
        driver: str,
        role: str,
        filename: str,
        read_only: bool,
        size: int,
        file: str | None,
        backing: str | None,
        attached: bool,
        bitmaps: list[dict[str, object]] | None = None,
    ) -> dict[str, object]:
        return {
            "node_name": name,
            "driver": driver,
            "role": role,
            "filename": filename,
            "read_only": read_only,
            "virtual_size": size,
            "file": file,
            "backing": backing,
            "attached": attached,
            "dirty_bitmaps": bitmaps or [],
        }

    def bitmap(name: str, persistent: bool) -> dict[str, object]:
        return {
            "name": name,
            "count": 0,
            "granularity": 65536,
            "recording": True,
            "busy": False,
            "persistent": persistent,
            "inconsistent": False,
        }

    img, mib32, mib16 = "/fixtures/img/", 33554432, 16777216
    assert graph("chain3").to_json() == {
        "devices": [
            {
                "id": "disk0",
                "qdev": "/machine/peripheral/disk0/virtio-backend",
                "root": "drv0",
                "chain": ["drv0", "drv0-b1", "drv0-b2"],
            },
            {
                "id": "disk1",
                "qdev": "/machine/peripheral/disk1/virtio-backend",
                "root": "drv1-cor",
                "chain": ["drv1"],
            },
        ],
        "nodes": [
            n("bk", "qcow2", "format", img + "backup.qcow2", False, mib32, "bk-file", None, False),
            n(
                "bk-file",
                "file",
                "protocol",
                img + "backup.qcow2",
                False,
                197120,
                None,
                None,
                False,
            ),
            n(
                "drv0",
                "qcow2",
                "format",
                img + "top.qcow2",
                False,
                mib32,
                "drv0-file",
                "drv0-b1",
                True,
                [bitmap("bm0", persistent=False)],
            ),
            n(
                "drv0-b1",
                "qcow2",
                "format",
                img + "mid.qcow2",
                True,
                mib32,
                "drv0-b1-file",
                "drv0-b2",
                True,
            ),
            n(
                "drv0-b1-file",
                "file",
                "protocol",
                img + "mid.qcow2",
                True,
                197120,
                None,
                None,
                True,
            ),
            n(
                "drv0-b2",
                "raw",
                "format",
                img + "base.raw",
                True,
                mib32,
                "drv0-b2-file",
                None,
                True,
            ),
            n("drv0-b2-file", "file", "protocol", img + "base.raw", True, mib32, None, None, True),
            n("drv0-file", "file", "protocol", img + "top.qcow2", False, 197120, None, None, True),
            n(
                "drv1",
                "qcow2",
                "format",
                img + "data.qcow2",
                False,
                mib16,
                "drv1-file",
                None,
                True,
                [bitmap("bm1", persistent=True)],
            ),
            n(
                "drv1-cor",
                "copy-on-read",
                "filter",
                img + "data.qcow2",
                False,
                mib16,
                "drv1",
                None,
                True,
            ),
            n("drv1-file", "file", "protocol", img + "data.qcow2", False, 327680, None, None, True),
        ],
        "warnings": [],
    }


def test_text_output_is_exact() -> None:
    """The whole tree of each recorded graph: devices, stacks, what was shown above, nodes
    no device reaches, nameless bitmaps (``?``)."""
    assert graph("chain3").render_text() == (
        "disk0  (/machine/peripheral/disk0/virtio-backend)\n"
        "└── root: drv0  qcow2  rw  /fixtures/img/top.qcow2  bitmaps: bm0\n"
        "    ├── file: drv0-file  file  rw  /fixtures/img/top.qcow2\n"
        "    └── backing: drv0-b1  qcow2  ro  /fixtures/img/mid.qcow2\n"
        "        ├── file: drv0-b1-file  file  ro  /fixtures/img/mid.qcow2\n"
        "        └── backing: drv0-b2  raw  ro  /fixtures/img/base.raw\n"
        "            └── file: drv0-b2-file  file  ro  /fixtures/img/base.raw\n"
        "disk1  (/machine/peripheral/disk1/virtio-backend)\n"
        "└── root: drv1-cor  copy-on-read  rw  /fixtures/img/data.qcow2\n"
        "    └── file: drv1  qcow2  rw  /fixtures/img/data.qcow2  bitmaps: bm1\n"
        "        └── file: drv1-file  file  rw  /fixtures/img/data.qcow2\n"
        "(not attached to a device)\n"
        "└── node: bk  qcow2  rw  /fixtures/img/backup.qcow2\n"
        "    └── file: bk-file  file  rw  /fixtures/img/backup.qcow2\n"
    )
    assert graph("after-commit").render_text().splitlines()[7:] == [
        "(not attached to a device)",
        "└── node: bad  raw  rw  /fixtures/img/bad.raw",
        "    └── file: bad-dbg  blkdebug  rw  /fixtures/img/bad.raw",
        "        └── file: bad-file  file  rw  /fixtures/img/bad.raw",
        "└── node: bk  qcow2  rw  /fixtures/img/backup.qcow2",
        "    └── file: bk-file  file  rw  /fixtures/img/backup.qcow2",
        "└── node: drv0  qcow2  rw  /fixtures/img/top.qcow2  bitmaps: bm0",
        "    ├── file: drv0-file  file  rw  /fixtures/img/top.qcow2",
        "    └── backing: drv0-b1  qcow2  rw  /fixtures/img/mid.qcow2",
        "        ├── file: drv0-b1-file  file  rw  /fixtures/img/mid.qcow2",
        "        └── backing: drv0-b2 (shown above)",
    ]
    fleece = "/fixtures/tmp/bc-scratch-ja7v3fr9/fleece-disk0.qcow2"
    assert graph("backup-fleecing").render_text().splitlines()[:3] + (
        graph("backup-fleecing").render_text().splitlines()[-4:]
    ) == [
        "disk0  (/machine/peripheral/disk0/virtio-backend)",
        "└── root: #block028  copy-before-write  rw  /fixtures/img/D.qcow2  bitmaps: ?,?",
        "    └── file: drv0  qcow2  rw  /fixtures/img/D.qcow2  "
        "bitmaps: ?,bc-461e42d63f06-20261203T125622.482740-4eec",
        "(not attached to a device)",
        f"└── node: bcf0-4eec  qcow2  rw  {fleece}",
        f"    ├── file: bcf0-4eec-file  file  rw  {fleece}",
        "    └── backing: drv0 (shown above)",
    ]


def test_text_and_json_of_devices_without_a_medium_or_a_named_root() -> None:
    """An empty tray, a device without a qdev path, a root QEMU did not list as a named node
    (a warning), a stack whose first child has children of its own (the ``│`` rail), and
    nodes no device reaches listed from their tops even when a child sorts first."""
    nodes = [
        node("a-file", "file", "/z.qcow2"),
        node(
            "m-dbg",
            "blkdebug",
            json_name({"driver": "blkdebug", "image": {"driver": "file", "filename": "/z.qcow2"}}),
        ),
        node(
            "z-top",
            "qcow2",
            json_name(
                {
                    "driver": "qcow2",
                    "file": {
                        "driver": "blkdebug",
                        "image": {"driver": "file", "filename": "/z.qcow2"},
                    },
                }
            ),
            backing_file="/y.raw",
        ),
        node("y-base", "raw", "/y.raw"),
        node("y-base-file", "file", "/y.raw"),
    ]
    g = BlockGraph.from_qmp(
        nodes, [device("cd0", None), device("disk9", "ghost"), device("anon", None, qdev=None)]
    )
    assert g.warnings == ("device disk9: root node 'ghost' is not a named node",)
    assert g.node("z-top").file_child == "m-dbg" and g.node("z-top").backing == "y-base"
    assert g.render_text() == (
        "anon\n"
        "  (no medium)\n"
        "cd0  (/machine/peripheral/cd0)\n"
        "  (no medium)\n"
        "disk9  (/machine/peripheral/disk9)\n"
        "(not attached to a device)\n"
        "└── node: z-top  qcow2  rw  /z.qcow2\n"
        "    ├── file: m-dbg  blkdebug  rw  /z.qcow2\n"
        "    │   └── file: a-file  file  rw  /z.qcow2\n"
        "    └── backing: y-base  raw  rw  /y.raw\n"
        "        └── file: y-base-file  file  rw  /y.raw\n"
        "warning: device disk9: root node 'ghost' is not a named node\n"
    )
    assert g.to_json()["devices"] == [
        {"id": "anon", "qdev": None, "root": None, "chain": []},
        {"id": "cd0", "qdev": "/machine/peripheral/cd0", "root": None, "chain": []},
        {"id": "disk9", "qdev": "/machine/peripheral/disk9", "root": "ghost", "chain": []},
    ]
    assert g.to_json()["warnings"] == ["device disk9: root node 'ghost' is not a named node"]
    with pytest.raises(NodeNotFound, match=r"^device 'cd0' has no medium$") as info:
        g.chain_of("cd0")
    assert info.value.name == "cd0"
    with pytest.raises(NodeNotFound, match=r"^no block node named 'ghost'$") as missing:
        g.chain_of("disk9")
    assert missing.value.name == "ghost"


def test_a_backing_loop_is_listed_once() -> None:
    """Nodes whose backing links form a loop (stale ``backing_file`` strings can): every
    node is rendered, each once, and a chain stops at the first node it has already seen
    (a loop anywhere below the top, or a node backing itself)."""
    loop = [
        node("c1", "qcow2", "/c1.qcow2", backing_file="/c2.qcow2"),
        node("c1-file", "file", "/c1.qcow2"),
        node("c2", "qcow2", "/c2.qcow2", backing_file="/c1.qcow2"),
        node("c2-file", "file", "/c2.qcow2"),
    ]
    g = BlockGraph.from_qmp(loop, [])
    assert (g.node("c1").backing, g.node("c2").backing) == ("c2", "c1")
    assert g.render_text() == (
        "(not attached to a device)\n"
        "└── node: c1  qcow2  rw  /c1.qcow2\n"
        "    ├── file: c1-file  file  rw  /c1.qcow2\n"
        "    └── backing: c2  qcow2  rw  /c2.qcow2\n"
        "        ├── file: c2-file  file  rw  /c2.qcow2\n"
        "        └── backing: c1 (shown above)\n"
    )
    assert not g.attached("c1")

    def looped(links: Mapping[str, str]) -> BlockGraph:
        return BlockGraph(
            {
                name: GraphNode(
                    name=name,
                    driver="qcow2",
                    role=NodeRole.FORMAT,
                    filename=None,
                    qemu_filename=name,
                    read_only=False,
                    virtual_size=None,
                    file_child=None,
                    backing=backing,
                    backing_file=backing,
                    dirty_bitmaps=(),
                )
                for name, backing in links.items()
            },
            {"vda": GraphDevice(id="vda", qdev=None, root="a")},
        )

    class Counted(BlockGraph):
        """Fails instead of looping: chain_of looks each node up once."""

        lookups = 0

        def node(self, name: str) -> GraphNode:
            self.lookups += 1
            assert self.lookups < 20, "chain_of does not stop at a loop"
            return super().node(name)

        def parents_of(self, name: str) -> tuple[User, ...]:
            self.lookups += 1
            assert self.lookups < 20, "users_of does not stop at a loop"
            return super().parents_of(name)

    for links, chain in (
        ({"a": "a"}, ["a"]),
        ({"a": "b", "b": "b"}, ["a", "b"]),
        ({"a": "b", "b": "c", "c": "d", "d": "c"}, ["a", "b", "c", "d"]),
    ):
        g = looped(links)
        counted = Counted(g.nodes, g.devices)
        assert [n.name for n in counted.chain_of("vda")] == chain
        assert all(counted.attached(n) for n in links)
    # Users through a loop below the node asked about: each once.
    g = BlockGraph.from_qmp(loop, [])
    assert Counted(g.nodes, g.devices).users_of("c1-file") == (
        User(kind="parent", name="c1", via="c1-file", attached=False),
        User(kind="overlay", name="c2", via="c1", attached=False),
    )


def test_users_and_parents_name_the_link_they_use() -> None:
    g = graph("chain3")
    assert g.parents_of("drv0") == (User(kind="device", name="disk0", via="drv0", attached=True),)
    assert g.parents_of("drv0-file") == (
        User(kind="parent", name="drv0", via="drv0-file", attached=True),
    )
    assert g.users_of("drv0-b1") == (
        User(kind="overlay", name="drv0", via="drv0-b1", attached=True),
        User(kind="device", name="disk0", via="drv0", attached=True),
    )
    assert g.users_of("drv1-file") == (
        User(kind="parent", name="drv1", via="drv1-file", attached=True),
        User(kind="parent", name="drv1-cor", via="drv1", attached=True),
        User(kind="device", name="disk1", via="drv1-cor", attached=True),
    )
    assert g.parents_of("bk-file") == (
        User(kind="parent", name="bk", via="bk-file", attached=False),
    )


def test_a_shared_base_has_every_device_above_it_as_a_user() -> None:
    """Two devices on one base (and a device named like its root node, as a legacy
    ``-drive id=`` makes): each device is a user once."""
    nodes = [
        node("base", "raw", "/base.raw", read_only=True),
        node("base-file", "file", "/base.raw", read_only=True),
        node("vda", "qcow2", "/a.qcow2", backing_file="/base.raw"),
        node("vda-file", "file", "/a.qcow2"),
        node("top-b", "qcow2", "/b.qcow2", backing_file="/base.raw"),
        node("top-b-file", "file", "/b.qcow2"),
    ]
    g = BlockGraph.from_qmp(nodes, [device("vda", "vda"), device("vdb", "top-b")])
    assert g.warnings == ()
    assert g.users_of("base") == (
        User(kind="overlay", name="vda", via="base", attached=True),
        User(kind="overlay", name="top-b", via="base", attached=True),
        User(kind="device", name="vda", via="vda", attached=True),
        User(kind="device", name="vdb", via="top-b", attached=True),
    )


def test_layer_nodes_are_a_format_node_and_what_is_under_it() -> None:
    chain3, after = graph("chain3"), graph("after-commit")
    assert chain3.layer_nodes(chain3.node("drv0")) == ["drv0", "drv0-file"]
    # Through a blkdebug filter to the protocol node.
    assert after.layer_nodes(after.node("bad")) == ["bad", "bad-dbg", "bad-file"]
    # A filter's layer ends at the format node it sits on, not that node's file.
    assert chain3.layer_nodes(chain3.node("drv1-cor")) == ["drv1-cor", "drv1"]
    assert chain3.layer_nodes(chain3.node("drv0-file")) == ["drv0-file"]
    dangling = BlockGraph.from_qmp([node("x", "qcow2", "/x.qcow2")], [])
    assert dangling.layer_nodes(dangling.node("x")) == ["x"]
    loose = replace(chain3.node("drv0"), file_child="gone")
    assert chain3.layer_nodes(loose) == ["drv0"]


def test_recorded_fields_are_kept_as_qemu_reported_them() -> None:
    g = graph("chain3")
    top = g.node("drv0")
    assert top.qemu_filename.startswith('json:{"backing": {"driver": "qcow2"')
    assert top.backing_file == "/fixtures/img/mid.qcow2"
    assert top.virtual_size == 33554432 and g.node("drv1-file").virtual_size == 327680


def test_file_children_that_cannot_be_told_are_warnings() -> None:
    """A format node with no protocol node under its filename, a json: name whose file
    matches no node, and one whose file matches two: each a warning, never a guess. The
    nested file is found whatever the order of its keys (QEMU does not sort them)."""
    nodes = [
        node("orphan", "qcow2", "/o.qcow2"),
        node(
            "lost",
            "qcow2",
            json_name({"driver": "qcow2", "file": {"driver": "file", "filename": "/lost.qcow2"}}),
        ),
        node(
            "twice",
            "qcow2",
            json_name({"driver": "qcow2", "file": {"driver": "file", "filename": "/t.qcow2"}}),
        ),
        node("t-file", "file", "/t.qcow2"),
        node("t-file2", "file", "/t.qcow2"),
        node(
            "unsorted",
            "qcow2",
            json_name({"file": {"filename": "/u.qcow2", "driver": "file"}, "driver": "qcow2"}),
        ),
        node("u-file", "file", "/u.qcow2"),
    ]
    # A filter's json: name describes its child without the backing the child's own
    # json: name carries.
    mid_file = {"driver": "file", "filename": "/m.qcow2"}
    nodes += [
        node(
            "mid",
            "qcow2",
            json_name(
                {
                    "backing": {"driver": "raw", "file": {"driver": "file", "filename": "/r.raw"}},
                    "driver": "qcow2",
                    "file": mid_file,
                }
            ),
        ),
        node("mid-file", "file", "/m.qcow2"),
        node(
            "mid-cor",
            "copy-on-read",
            json_name({"driver": "copy-on-read", "file": {"driver": "qcow2", "file": mid_file}}),
        ),
    ]
    g = BlockGraph.from_qmp(nodes, [])
    assert g.node("unsorted").file_child == "u-file"
    assert g.node("mid-cor").file_child == "mid"
    assert g.warnings == (
        "orphan: cannot tell which node is its file child",
        "lost: no node matches its file child",
        "twice: several nodes match (['t-file', 't-file2']) its file child",
    )
    assert [g.node(n).file_child for n in ("orphan", "lost", "twice")] == [None, None, None]


def test_a_backing_file_shared_by_several_nodes() -> None:
    """Which node is the backing when several open its file: the one the overlay's json:
    name describes, else the one blockctl recorded (a hint QEMU's filename agrees with),
    else the lowest of a stack of filters; otherwise a warning. A unique match is taken
    as it is, whatever the json: name says of it."""
    base = [
        node("base", "qcow2", "/b.qcow2"),
        node("base-file", "file", "/b.qcow2"),
        node("base-raw", "raw", "/b.qcow2"),
    ]
    described = node(
        "top",
        "qcow2",
        json_name(
            {
                "backing": {"driver": "raw", "file": {"driver": "file", "filename": "/b.qcow2"}},
                "driver": "qcow2",
                "file": {"driver": "file", "filename": "/t.qcow2"},
            }
        ),
        backing_file="/b.qcow2",
    )
    top_file = node("top-file", "file", "/t.qcow2")
    plain = node("top", "qcow2", "/t.qcow2", backing_file="/b.qcow2")
    g = BlockGraph.from_qmp([*base, described, top_file], [])
    assert (g.node("top").backing, g.warnings) == ("base-raw", ())
    g = BlockGraph.from_qmp([*base, plain, top_file], [], backing_hints={"top": "base-raw"})
    assert (g.node("top").backing, g.warnings) == ("base-raw", ())
    g = BlockGraph.from_qmp([*base, plain, top_file], [], backing_hints={"top": "gone"})
    assert g.node("top").backing is None
    assert g.warnings == (
        "top: backing file '/b.qcow2' matches several nodes (['base', 'base-raw'])",
    )
    # An implicit filter above the base (a backup's copy-before-write, named by the base's
    # plain filename) shares its filename: the base is the lowest of the two.
    cbw = node("#block7", "copy-before-write", "/b.qcow2")
    g = BlockGraph.from_qmp([cbw, *base[:2], plain, top_file], [])
    assert g.node("#block7").file_child == "base"
    assert (g.node("top").backing, g.warnings) == ("base", ())
    # One node opens the file: it is the backing even if the json: name says raw.
    g = BlockGraph.from_qmp([*base[:2], described, top_file], [])
    assert (g.node("top").backing, g.warnings) == ("base", ())
    g = BlockGraph.from_qmp(
        [replace(plain, node=replace(plain.node, backing_file="/gone")), top_file], []
    )
    assert g.warnings == ("top: backing file '/gone' matches no open node",)


def test_a_json_name_that_is_not_an_object_names_no_image() -> None:
    assert image_filename("json:[1, 2]") is None
    assert image_filename('json:"/a.qcow2"') is None
