"""The documentation: every public name in the API reference with a docstring, the site's navigation, the README.

The site itself is built by ``bash scripts/docs.sh`` in ``.ci/run`` (``mkdocs build --strict``); these checks
are what a strict build does not see (a name left out of the reference, a page left out of the navigation)
or what should fail before that build runs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import tl_linmap

griffe = pytest.importorskip("griffe")  # the docs extra (mkdocstrings reads the source with it)
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
README_MAX_LINES = 250


@pytest.fixture(scope="module")
def package():
    """tl_linmap as mkdocstrings sees it: read from the source (static analysis), nothing imported."""
    logging.getLogger("griffe").setLevel(logging.ERROR)  # docstring style notes; the strict build reports those
    return griffe.load("tl_linmap", search_paths=[str(ROOT)], docstring_parser="google")


@pytest.fixture(scope="module")
def directives() -> dict[str, str]:
    """``::: identifier`` lines of the API reference pages -> the page that holds each."""
    found = {}
    for page in sorted(API.glob("*.md")):
        for identifier in re.findall(r"^::: *([\w.]+) *$", page.read_text(), flags=re.M):
            assert identifier not in found, f"{identifier} is rendered twice ({found[identifier]}, {page.name})"
            found[identifier] = page.name
    return found


def _documented_at(name: str) -> str:
    """The identifier the reference renders ``tl_linmap.<name>`` under: its defining module's path."""
    if name in tl_linmap.MODULES:
        return f"tl_linmap.{tl_linmap.MODULES[name]}"
    return f"tl_linmap.{tl_linmap.PUBLIC[name]}.{name}"


def _is_rendered(identifier: str, directives: dict[str, str]) -> bool:
    module = identifier.rsplit(".", 1)[0]
    return identifier in directives or (module in directives and module != "tl_linmap")


def test_every_public_name_is_in_the_api_reference(directives):
    missing = [name for name in tl_linmap.__all__ if not _is_rendered(_documented_at(name), directives)]
    assert not missing, f"not in any docs/api/*.md page (add '::: <module>.<name>'): {[_documented_at(n) for n in missing]}"


def test_every_public_name_has_a_docstring(package):
    bare = [name for name in tl_linmap.__all__ if not (package[_documented_at(name)[len("tl_linmap."):]].docstring or "")]
    assert not bare, f"public names without a docstring (the reference would show a bare heading): {bare}"


def test_every_public_function_says_its_arguments_and_what_it_returns(package):
    incomplete = []
    for name in tl_linmap.PUBLIC:
        obj = package[_documented_at(name)[len("tl_linmap."):]]
        if not obj.is_function:
            continue
        sections = {section.kind.value for section in obj.docstring.parsed}
        if [p for p in obj.parameters if p.name != "self"] and "parameters" not in sections:
            incomplete.append(f"{name}: no Args")
        if not sections & {"returns", "yields"}:
            incomplete.append(f"{name}: no Returns")
    assert not incomplete, incomplete


def test_every_rendered_identifier_exists_and_whole_modules_are_documented(package, directives):
    # A module rendered whole is one users import from: mkdocstrings leaves out its members without a docstring.
    bare = []
    for identifier in directives:
        obj = package[identifier[len("tl_linmap."):]]  # a KeyError names an identifier that does not exist
        if obj.is_module:
            bare += [
                f"{identifier}.{name}" for name, member in obj.members.items()
                if not name.startswith("_") and not member.is_alias and (member.is_function or member.is_class) and not member.docstring
            ]
    assert not bare, f"left out of the reference for want of a docstring: {bare}"


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


@pytest.fixture(scope="module")
def nav() -> list[str]:
    return _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])


def test_every_page_is_in_the_navigation_and_every_nav_page_exists(nav):
    written = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    generated = [page for page in nav if page.startswith("tutorials/") and page.endswith(".ipynb")]
    unlisted, absent = sorted(written - set(nav)), sorted(set(nav) - written - set(generated))
    assert not unlisted, f"docs pages missing from mkdocs.yml's nav (mkdocs builds them unlinked): {unlisted}"
    assert not absent, f"nav pages that do not exist: {absent}"


def test_the_tutorials_section_lists_every_tutorial(nav):
    listed = [page for page in nav if page.startswith("tutorials/") and page.endswith(".ipynb")]
    tutorials = sorted(f"tutorials/{path.stem}.ipynb" for path in (ROOT / "tutorials").glob("[0-9]*.py"))
    assert listed == tutorials  # scripts/docs.sh makes each from tutorials/<stem>.py where the tests left none


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/ (at most {README_MAX_LINES})"


def _readme_links() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not target.startswith(("http://", "https://", "#"))]


def test_readme_links_point_at_existing_pages(nav):
    links = _readme_links()
    assert any(link.startswith("docs/") for link in links), "the README links into docs/"
    broken = []
    for link in links:
        path = link.split("#")[0]
        if not (ROOT / path).exists():
            broken.append(link)
        elif path.startswith("docs/") and path.endswith(".md") and path[len("docs/"):] not in nav:
            broken.append(f"{link} (not in mkdocs.yml's nav)")
    assert not broken, f"README links to nothing (or to a page the site does not show): {broken}"


def test_readme_anchors_exist():
    text = (ROOT / "README.md").read_text()
    headings = {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip()).lower().replace(" ", "-") for line in text.splitlines() if line.startswith("#")}
    missing = [link for link in re.findall(r"\]\(#([^)]+)\)", text) if link not in headings]
    assert not missing, missing


@pytest.mark.slow
def test_the_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", text, flags=re.S).group(1)
    exec(compile(code, "README.md (Example)", "exec"), {})
    printed = capsys.readouterr().out
    assert float(printed.splitlines()[0]) < 1e-12  # the relative reconstruction error it prints
    assert printed.splitlines()[1].startswith("[(' Paris',")  # the predicted tokens, " Paris" first
