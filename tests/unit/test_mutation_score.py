"""scripts/mutation-score's own logic: naming a mutant's function, reading its change, the
list of explained survivors (every entry well-formed, each in a function the scope mutates), and
the per-test limit in a mutant's worker (tests/conftest.py)."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

from scripts import mutation_score as ms

ROOT = Path(__file__).resolve().parents[2]

DIFF = """--- blockctl/_journal.py
+++ blockctl/_journal.py
@@ -1,3 +1,3 @@
 def _state(chain, chains):
-    return "other"
+    return "OTHER"
"""


def test_a_mutant_names_its_function_and_method() -> None:
    assert ms.function_of("blockctl._journal.x_plan__mutmut_12") == "blockctl._journal.plan"
    assert ms.function_of("blockctl._journal.x__state__mutmut_9") == "blockctl._journal._state"
    assert ms.function_of("blockctl._jobs.xǁJobǁ_loop__mutmut_3") == "blockctl._jobs.Job._loop"


def test_the_change_is_the_removed_and_the_added_lines() -> None:
    assert ms.changed_lines(DIFF) == ('return "other"', 'return "OTHER"')


def test_every_explained_survivor_is_well_formed_and_in_scope() -> None:
    explained = ms.load_explained()  # raises SystemExit on an entry without kind or reason
    assert explained
    scopes = {
        ms.function_of(f"{ms.dotted(m.file)}.{f}__mutmut_1")
        for m in ms.MODULES.values()
        for f in m.functions
    }
    for function, was, now in explained:
        assert was != now
        assert any(fnmatch.fnmatchcase(function, s) for s in scopes), function


SLOW_TEST = """
import time


def test_slow() -> None:
    time.sleep({seconds})
"""


def run_slow_test(tmp_path: Path, seconds: float, **env: str) -> int:
    """pytest in a child on one test that sleeps, with tests/conftest.py's hooks; its exit code."""
    (tmp_path / "test_slow.py").write_text(SLOW_TEST.format(seconds=seconds))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MUTANT_", "BLOCKCTL_MUT"))}
    test = str(tmp_path / "test_slow.py")
    pytest = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", test]
    proc = subprocess.run(
        [sys.executable, *pytest, "--rootdir", str(tmp_path)],
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        check=False,
    )
    return proc.returncode


def test_a_mutants_test_past_the_limit_is_stopped_as_mutmuts_timeout(tmp_path: Path) -> None:
    code = run_slow_test(
        tmp_path,
        3,
        MUTANT_UNDER_TEST="blockctl._jobs.xǁJobǁ_loop__mutmut_1",
        BLOCKCTL_MUTATION_TEST_LIMIT="0.2",
    )
    assert code == 36
    assert status_by_exit_code[code] == "timeout"


def test_the_limit_times_only_a_mutants_tests(tmp_path: Path) -> None:
    """mutmut's stats and clean runs (no mutant named) are not timed, nor a run without a limit."""
    stats = run_slow_test(
        tmp_path, 0.5, MUTANT_UNDER_TEST="stats", BLOCKCTL_MUTATION_TEST_LIMIT="0.1"
    )
    assert stats == 0
    assert run_slow_test(tmp_path, 0.5, MUTANT_UNDER_TEST="x_f__mutmut_1") == 0
