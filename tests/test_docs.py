"""docs/ALGORITHM.md stays true to the code that cites it and to the code it cites.

* every "ALGORITHM.md section N" (or "sections N and M", "sections N-M", "section N.M") written in tempflow/, bench/,
  README.md or configs/ names a numbered section heading of docs/ALGORITHM.md, and so does every "section N" /
  "section N (ii)" the page writes about itself;
* every `tempflow.x.y` name the page writes in backticks imports (module, then attributes);
* every tests/, bench/, configs/ file the page mentions exists, and every ``tests/x.py::test_name`` names a test
  function of that file.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ALGORITHM.md"

NUMBER = r"\d+(?:\.\d+)*"
ROMAN = r"\((?:i{1,3}|iv|v|vi{0,3})\)"
# "section 1", "sections 2 and 3", "sections 2-3", "sections 1, 2 and 3.1", optionally "section 3 (ii)"
SECTION_LIST = rf"(?P<list>{NUMBER}(?:\s*{ROMAN})?(?:\s*(?:,|and|or|to|-|–)\s*{NUMBER}(?:\s*{ROMAN})?)*)"
CODE_REF = re.compile(rf"ALGORITHM\.md[,:]?\s+sections?\s+{SECTION_LIST}")
DOC_REF = re.compile(rf"\bsections?\s+{SECTION_LIST}")
ITEM = re.compile(rf"(?P<number>{NUMBER})(?:\s*(?P<roman>{ROMAN}))?")
HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<title>.+?)\s*$", re.MULTILINE)
DOTTED = re.compile(r"`(tempflow(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"\b(?P<path>(?:tests|bench|configs)/[\w./-]+?\.(?:py|yaml|md))(?:::(?P<name>\w+))?")


def _doc() -> str:
    assert DOC.is_file(), "docs/ALGORITHM.md is missing"
    return DOC.read_text(encoding="utf-8")


def _sections(text: str) -> set[str]:
    """Section ids of the page's headings: "3" for "## 3. ...", "3.1" for "### 3.1 ...", and "3 (ii)" for a
    "### (ii) ..." heading inside section 3."""
    ids: set[str] = set()
    parent = None
    for m in HEADING.finditer(text):
        title = m["title"]
        number = re.match(rf"({NUMBER})(?:\.|\s|$)", title)
        roman = re.match(ROMAN, title)
        if number:
            ids.add(number[1])
            if len(m["level"]) == 2:
                parent = number[1]
        elif roman and parent is not None:
            ids.add(f"{parent} {roman[0]}")
        elif len(m["level"]) == 2:
            parent = None
    return ids


def _expand(ref_list: str) -> list[str]:
    """The section ids a reference list names; a range "2-3" of whole numbers also names those in between."""
    items = list(ITEM.finditer(ref_list))
    out = [f"{m['number']} {m['roman']}" if m["roman"] else m["number"] for m in items]
    for a, b in zip(items, items[1:], strict=False):
        between = ref_list[a.end() : b.start()]
        if re.search(r"-|–|\bto\b", between) and a["number"].isdigit() and b["number"].isdigit():
            out += [str(k) for k in range(int(a["number"]) + 1, int(b["number"]))]
    return out


def _code_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.yaml"))]
    files += sorted((ROOT / "tempflow").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    return [f for f in files if f.is_file()]


def _code_refs() -> list[tuple[str, str]]:
    """(where, section id) of every section reference to ALGORITHM.md in the code, the README and the configs."""
    refs = []
    for path in _code_files():
        text = path.read_text(encoding="utf-8")
        for m in CODE_REF.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            refs += [(f"{path.relative_to(ROOT)}:{line}", s) for s in _expand(m["list"])]
    return refs


def test_heading_parser_and_reference_expansion():
    text = "## 1. A\n### (i) x\n## 3. B\n### (ii) y\n### 3.4 z\n## Notes\n### (i) w\n"
    assert _sections(text) == {"1", "1 (i)", "3", "3 (ii)", "3.4"}
    assert _expand("2-3") == ["2", "3"] and _expand("2 and 3") == ["2", "3"]
    assert sorted(_expand("1, 3-5")) == ["1", "3", "4", "5"] and sorted(_expand("1-3 and 5")) == ["1", "2", "3", "5"]
    assert _expand("3 (ii)") == ["3 (ii)"] and _expand("3.1, 5") == ["3.1", "5"]
    assert [m["list"] for m in CODE_REF.finditer("(ALGORITHM.md, sections 2 and 3). ALGORITHM.md section 1)")] == [
        "2 and 3",
        "1",
    ]


def test_every_section_the_code_cites_exists():
    refs = _code_refs()
    assert len(refs) >= 5, "found almost no 'ALGORITHM.md section N' references: has the citation style changed?"
    sections = _sections(_doc())
    missing = [f"{where}: section {s}" for where, s in refs if s not in sections]
    assert not missing, f"docs/ALGORITHM.md has no heading for {missing}; its sections: {sorted(sections)}"


def test_the_page_keeps_the_shared_section_numbers():
    sections = _sections(_doc())
    assert {"1", "2", "3", "3 (i)", "3 (ii)", "3 (iii)", "4", "5"} <= sections


def test_every_section_the_page_cites_exists():
    text = _doc()
    sections = _sections(text)
    cited = [s for m in DOC_REF.finditer(text) for s in _expand(m["list"])]
    assert cited
    missing = sorted({s for s in cited if s not in sections})
    assert not missing, f"docs/ALGORITHM.md cites sections it does not have: {missing}"


def _dotted_names() -> list[str]:
    return sorted(set(DOTTED.findall(DOC.read_text(encoding="utf-8")))) if DOC.is_file() else []


def _resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name) and exc.name.startswith("tempflow"):
                continue  # not a module: an attribute of a shorter prefix
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_the_page_names_code():
    assert len(_dotted_names()) >= 20


@pytest.mark.parametrize("name", _dotted_names())
def test_every_dotted_name_resolves(name):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"docs/ALGORITHM.md names `{name}`, which does not resolve: {type(exc).__name__}: {exc}")


def test_every_file_and_test_the_page_mentions_exists():
    found = list(PATH.finditer(_doc()))
    assert any(m["path"].startswith("tests/") and m["name"] for m in found)
    problems = []
    for m in found:
        path = ROOT / m["path"]
        if not path.is_file():
            problems.append(f"{m['path']} does not exist")
        elif m["name"] and not re.search(rf"^\s*(?:async\s+)?def {m['name']}\(", path.read_text(encoding="utf-8"),
                                         re.MULTILINE):  # fmt: skip
            problems.append(f"{m['path']} has no function {m['name']}")
    assert not problems, "\n".join(sorted(set(problems)))
