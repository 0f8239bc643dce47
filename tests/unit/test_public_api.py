"""The public names are exactly the curated ones, and the README's example uses only them."""

from __future__ import annotations

import ast
import importlib
import re
import types
from pathlib import Path

import pytest

import blockctl
import blockctl.errors

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_MODULES = (
    "blockctl",
    "blockctl.errors",
    "blockctl.types",
    "blockctl.drives",
    "blockctl.chains",
    "blockctl.jobs",
    "blockctl.backup",
    "blockctl.agent",
    "blockctl.recovery",
)
DEFINING = ("blockctl.errors", "blockctl.types")
EXAMPLE = ROOT / "tests" / "unit" / "library_example.py"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_equals_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    # dir() and getattr(): ``blockctl`` imports its names on first use (PEP 562).
    public = {
        n
        for n, value in ((n, getattr(module, n)) for n in dir(module))
        if not n.startswith("_")
        and not isinstance(value, types.ModuleType)
        # errors and types define what they export and import helpers (typing names,
        # ConfigError) to do it; every other public module only re-exports: all it holds
        and (
            name not in DEFINING
            or getattr(value, "__module__", name) == name
            or (n.isupper() and not callable(value))
        )
        and n != "annotations"  # from __future__ import annotations
    }
    assert sorted(module.__all__) == sorted(public), name
    assert len(module.__all__) == len(set(module.__all__))


def test_every_error_is_a_blockctl_error() -> None:
    classes = [getattr(blockctl.errors, n) for n in blockctl.errors.__all__]
    classes = [c for c in classes if isinstance(c, type)]
    assert len(classes) > 40
    for cls in classes:
        assert issubclass(cls, blockctl.errors.BlockctlError)


def test_public_modules_only_reexport() -> None:
    """A public module defines nothing itself: the code lives in private modules, which never
    import a public one (no cycle through the public face)."""
    for name in PUBLIC_MODULES[3:]:
        module = importlib.import_module(name)
        for export in module.__all__:
            value = getattr(module, export)
            owner = getattr(value, "__module__", None)
            if owner is not None:
                assert owner.startswith("blockctl._"), (name, export, owner)
    private = [p for p in (ROOT / "blockctl").rglob("*.py") if "/_" in str(p.relative_to(ROOT))]
    for path in private:
        if path.parent.name in ("_cli", "_fleet"):  # faces too: they use the others
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = [f"{node.module}.{a.name}" for a in node.names]
                for target in [node.module, *imported]:
                    assert target not in PUBLIC_MODULES[3:], (path, target)


def test_the_fleet_uses_only_the_public_library() -> None:
    """The fleet (blockctl._fleet) sits above the library as a user of it would: it imports
    blockctl's public modules and its own, nothing else of blockctl."""
    allowed = ("blockctl", *PUBLIC_MODULES)
    for path in (ROOT / "blockctl" / "_fleet").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("blockctl")
            ):
                assert node.module in allowed or node.module.startswith("blockctl._fleet"), (
                    path.name,
                    node.module,
                )
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("blockctl"), (path.name, alias.name)


def test_the_readme_example_is_the_checked_example() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## The library\n", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    example = EXAMPLE.read_text()
    body = example.split('"""', 2)[2].lstrip("\n")  # without the module docstring
    assert block.group(1) == body


def test_the_example_uses_public_names_only() -> None:
    tree = ast.parse(EXAMPLE.read_text())
    modules = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    ]
    assert all(m is None or not re.search(r"(^|\.)_", m) for m in modules), modules
    assert "blockctl" in modules


@pytest.mark.parametrize("entry", ["open_vm", "attach"])
def test_trio_is_refused_at_the_entry_points_with_the_way_out(entry: str) -> None:
    import anyio

    from blockctl.errors import ConfigError
    from blockctl.types import MachineConfig

    async def main() -> None:
        target = blockctl.open_vm(MachineConfig()) if entry == "open_vm" else None
        context = target if target is not None else blockctl.attach("/nonexistent/qmp.sock")
        async with context:
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="asyncio") as refused:
        anyio.run(main, backend="trio")
    assert f"{entry}() needs asyncio" in str(refused.value)
    assert "backend='asyncio'" in str(refused.value)
