"""``docs/reliability.md`` lists faults with the tests that prove them: those tests exist."""

from __future__ import annotations

import re

from conftest import REPO


def test_every_test_the_reliability_table_cites_exists():
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    cited: list[tuple[str, str]] = []
    for cell in re.findall(r"^\|[^|]*\|[^|]*\|(.*)\|$", text, flags=re.M):
        path = None
        for ref in re.findall(r"`([^`]+)`", cell):
            if "::" in ref and not ref.startswith("::"):
                path, _, name = ref.partition("::")
            else:  # `::name`: another test of the file cited just before
                name = ref.removeprefix("::")
            cited.append((path, name.split("[")[0]))
    assert len(cited) > 30, f"the table cites only {len(cited)} tests"
    missing = [f"{path}::{name}" for path, name in cited
               if path is None or f"def {name}(" not in (REPO / path).read_text()]
    assert not missing, f"docs/reliability.md cites tests that do not exist: {missing}"
