"""The documentation: a page per public module, and every Python example in it runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "optim",
    "lr_scheduler",
    "schedules",
    "swa_utils",
    "cli",
    "checkpoints",
    "param_groups",
    "in_backward",
    "storage",
]
FILES = [ROOT / "README.md", *(ROOT / "docs" / f"{p}.md" for p in PAGES)]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_a_page_per_public_module_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        assert (ROOT / "docs" / f"{page}.md").is_file()
        assert f"(docs/{page}.md)" in readme


def test_every_page_has_an_example():
    for path in FILES:
        if path.name != "cli.md":  # cli.md's examples are commands; it has one Python block
            assert len(python_blocks(path)) >= 1, path


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_python_examples_run(path, tmp_path, monkeypatch):
    # The blocks of one page share a namespace, in order, as a reader would paste them; files
    # they write land in a temporary folder.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(path)):
        exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)


def test_local_links_and_images_exist():
    for path in FILES:
        for target in re.findall(r"\]\(([^)#:]+)\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
