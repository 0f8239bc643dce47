"""scripts/mutation-score's own logic: naming a mutant's function, reading its change, and the
list of explained survivors (every entry well-formed, each in a function the scope mutates)."""

from __future__ import annotations

import fnmatch

from scripts import mutation_score as ms

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
