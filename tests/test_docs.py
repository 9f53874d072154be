"""The README is a map and the manual in docs/ cannot drift: the options table is the one
TrainConfig generates, every option `train --help` shows is in it, every link of the README
reaches a page, and the manual's strict build fails on a broken link."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cifar_job.cli import main
from cifar_job.config import options_table
from cifar_job.stops import rules_table

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).with_name("mkdocs")


@pytest.mark.parametrize(
    ("page", "name", "table"),
    [("options", "options", options_table), ("stops", "rules", rules_table)],
)
def test_generated_tables_are_current(page, name, table) -> None:
    """The options table (from TrainConfig) and the stop rules (from stops.RULES)."""
    text = (ROOT / "docs" / f"{page}.md").read_text()
    pattern = rf"<!-- {name} table:[^\n]*-->\n(.*?)<!-- end of the {name} table -->"
    found = re.search(pattern, text, re.S)
    assert found is not None, f"docs/{page}.md lost its generated {name} table"
    assert found[1] == table(), f"docs/{page}.md is stale: run `make docs-options`"


def test_every_option_of_train_help_is_in_the_options_table() -> None:
    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    shown = set(re.findall(r"^\s+(--[a-z][a-z0-9-]+)", help_text, re.M))
    shown -= {"--help", "--config", "--print-config"}
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)", options_table(), re.M))
    assert shown and shown == documented


def test_readme_is_a_map_whose_links_reach_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    head = "\n".join(readme.splitlines()[:60])
    assert "make demo" in head and "make test" in head
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert page.name in nav, f"{page.name} is not in mkdocs.yml's nav"


@pytest.mark.skipif(not MKDOCS.exists(), reason="mkdocs is not installed (make install)")
def test_manual_builds_strictly_and_a_broken_link_fails_it(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy)

    def build() -> subprocess.CompletedProcess[str]:
        command = [str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")]
        return subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)

    built = build()
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "stops" / "index.html").exists()
    with open(copy / "docs" / "hours.md", "a") as page:
        page.write("\nSee [the ledger](hours.md#no-such-section).\n")
    broken = build()
    assert broken.returncode != 0
    assert "no-such-section" in broken.stderr
