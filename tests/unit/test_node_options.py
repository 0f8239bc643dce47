"""The typed node options build exactly the JSON blockctl sent before they were typed."""

from __future__ import annotations

from blockctl._qmp.models import CacheOptions, node_json, overlay_options


def test_an_overlay_without_cache_options() -> None:
    file, fmt = overlay_options("drv0-s1", "/images/d0.s1.qcow2", backing="drv0")
    assert node_json(file) == {
        "driver": "file",
        "node-name": "drv0-s1-file",
        "filename": "/images/d0.s1.qcow2",
    }
    assert node_json(fmt) == {
        "driver": "qcow2",
        "node-name": "drv0-s1",
        "file": "drv0-s1-file",
        "backing": "drv0",
    }


def test_an_overlay_backed_by_nothing_sends_null() -> None:
    _file, fmt = overlay_options("n", "/f", backing=None)
    assert "backing" in fmt and fmt["backing"] is None


def test_an_overlay_takes_the_cache_options_as_copies() -> None:
    cache: CacheOptions = {"direct": True, "no-flush": False}
    file, fmt = overlay_options("n", "/f", backing="b", cache=cache)
    assert file["cache"] == fmt["cache"] == {"direct": True, "no-flush": False}
    # Each node gets its own dict: a later change to one record does not reach the other.
    assert file["cache"] is not fmt["cache"] and file["cache"] is not cache


def test_node_json_is_a_plain_copy() -> None:
    file, _fmt = overlay_options("n", "/f", backing="b")
    plain = node_json(file)
    assert type(plain) is dict and plain == file and plain is not file
