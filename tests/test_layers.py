"""The layers of docs/design.md hold: no module imports one of a higher layer, no modules import each other in a circle
(scripts/import_graph.py, every import counted, also those inside functions)."""

from __future__ import annotations

import importlib.util

from .conftest import REPO


def test_no_import_runs_upward_or_in_a_circle():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    graph_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_mod)
    graph = graph_mod.imports(REPO / "aid_cli")
    assert graph_mod.cycles(graph) == []
    assert graph_mod.upward(graph) == []
    assert "cli" not in {t.split(".")[0] for mod, targets in graph.items() if not mod.startswith("cli")
                         for t in targets}  # nothing but the command line imports the command line


def test_every_citation_of_the_notes_resolves():
    """`method.md §n` and `design.md` in the code name notes that are in docs/, with a section n."""
    import re

    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "method.md").read_text(), re.M))
    assert (REPO / "docs" / "design.md").is_file()
    for path in [*(REPO / "aid_cli").rglob("*.py"), *(REPO / "scripts").glob("*.py")]:
        for cited in re.findall(r"method\.md ((?:§\d+[–-]?)+)", path.read_text()):
            assert set(re.findall(r"\d+", cited)) <= sections, (path, cited)
