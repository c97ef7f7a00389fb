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
