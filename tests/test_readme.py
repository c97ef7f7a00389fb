"""The README's network table is generated from the registry; this keeps the two from drifting apart."""
from __future__ import annotations

from pathlib import Path

import model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_network_table_matches_the_registry() -> None:
    text = README.read_text()
    start, end = "<!-- models-table:start -->\n", "<!-- models-table:end -->"
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == model.markdown_table(num_classes=101, clip=(16, 112, 112)), (
        "README table is stale: paste the output of `asym3d models --markdown` between the markers")


def test_readme_first_screen_has_the_two_commands() -> None:
    first_screen = "\n".join(README.read_text().splitlines()[:15])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_code_map_names_every_module() -> None:
    text = README.read_text()
    code_map = text[text.index("## Where things are"):]
    code_map = code_map[:code_map.index("```", code_map.index("```") + 3)]
    modules = sorted(p for package in ("pipeline", "model") for p in (README.parent / package).glob("*.py")
                     if p.name != "__init__.py")
    missing = [f"{p.parent.name}/{p.name}" for p in modules if p.name not in code_map]
    assert not missing, f"README's 'Where things are' does not name {', '.join(missing)}"
