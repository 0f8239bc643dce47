"""The promise ledger (tests/promises.py) checked against the README and the code, without
running a mutant: every quote is in its README section, every test node id exists, every
mutation's ``find`` occurs exactly once and the mutated file compiles, every promise section is
covered, and the README's ledger table is the ledger's. ``scripts/mutants`` runs the mutants."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.promises import PROMISES, SECTIONS, Mutation, Promise, mutations, render_table

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
LEDGER_HEADING = "Promise ledger"


def normalized(text: str) -> str:
    return " ".join(text.split())


def sections(readme: str) -> dict[str, str]:
    """Each heading's text (outside code fences): up to the next heading of its level or
    above, so a ``##`` section holds its ``###`` subsections. The ledger's own subsection is
    left out of every section (its table names the promises, it does not make them)."""
    lines = readme.splitlines()
    headings: list[tuple[int, int, str]] = []
    fenced = False
    for n, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#+) (.+)$", line)):
            headings.append((n, len(m.group(1)), m.group(2).strip()))
    ledger = next((h for h in headings if h[2] == LEDGER_HEADING), None)
    out = {}
    for i, (start, level, title) in enumerate(headings):
        end = next((s for s, lv, _t in headings[i + 1 :] if lv <= level), len(lines))
        body = lines[start + 1 : end]
        if ledger is not None and title != LEDGER_HEADING and start < ledger[0] < end:
            ledger_end = next(
                (s for s, lv, _t in headings if s > ledger[0] and lv <= ledger[1]), len(lines)
            )
            body = lines[start + 1 : ledger[0]] + lines[ledger_end:end]
        out[title] = "\n".join(body)
    return out


SECTION_TEXT = sections(README)


def test_ids_are_unique_and_every_promise_has_tests_and_a_mutation() -> None:
    ids = [p.id for p in PROMISES]
    assert len(ids) == len(set(ids))
    assert all(p.tests and p.mutations for p in PROMISES)
    assert len(PROMISES) >= 30


def test_every_promise_section_is_in_the_readme_and_covered() -> None:
    missing = [s for s in SECTIONS if s not in SECTION_TEXT]
    assert missing == []
    uncovered = [s for s in SECTIONS if not any(p.section == s for p in PROMISES)]
    assert uncovered == []
    assert {p.section for p in PROMISES} <= set(SECTIONS)


@pytest.mark.parametrize("promise", PROMISES, ids=[p.id for p in PROMISES])
def test_the_quote_is_in_its_readme_section(promise: Promise) -> None:
    assert normalized(promise.quote) in normalized(SECTION_TEXT[promise.section]), (
        f"{promise.id}: the README's section {promise.section!r} no longer says {promise.quote!r}"
    )


@pytest.mark.parametrize(
    ("key", "mutation"), [(k, m) for k, _p, m in mutations()], ids=[k for k, _p, _m in mutations()]
)
def test_the_mutation_applies_exactly_once_and_compiles(key: str, mutation: Mutation) -> None:
    assert mutation.file.startswith("blockctl/") and mutation.find != mutation.replace
    text = (ROOT / mutation.file).read_text()
    assert text.count(mutation.find) == 1, f"{key}: {mutation.file} has the find text " + (
        f"{text.count(mutation.find)} times"
    )
    compile(text.replace(mutation.find, mutation.replace), mutation.file, "exec")


def test_every_test_node_id_exists() -> None:
    ids = sorted({t for p in PROMISES for t in p.tests})
    assert all(t.startswith("tests/") for t in ids)
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-2000:]
    names = {line for line in collected.stdout.splitlines() if "::" in line}
    for node in ids:  # a file, a function (all its parameters) or one parametrized case
        assert any(n == node or n.startswith((node + "::", node + "[")) for n in names), node


def test_the_readme_ledger_table_is_the_ledger() -> None:
    """The table under "Promise ledger" (Reliability) is ``render_table()``: regenerate it
    with ``scripts/mutants --markdown`` (every row must say killed)."""
    assert LEDGER_HEADING in SECTION_TEXT, "README: no 'Promise ledger' subsection"
    assert render_table() in SECTION_TEXT[LEDGER_HEADING] + "\n", (
        "README's ledger table differs from tests/promises.py: paste render_table()"
    )
    counts = f"{len(PROMISES)} promises, {len(mutations())} mutations, all killed"
    assert counts in normalized(SECTION_TEXT[LEDGER_HEADING])
