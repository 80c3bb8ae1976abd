"""The README and docs: results tables equal to the committed metrics, a short README that links every
page, and no broken relative link or anchor."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from docs.generate import BLOCKS, ROOT, Metrics, doc_files, regenerate, render, stale_blocks

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")


# ------------------------------------------------------------------------------------------------
# Generated blocks


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_equals_what_the_metrics_render(path):
    stale = stale_blocks(path.read_text(), Metrics(), str(path))
    assert not stale, f"{path.relative_to(ROOT)}: blocks {stale} differ from metrics/*.json; run `make readme`"


def test_the_readme_quotes_the_comparison_and_table_1():
    names = re.findall(r"^<!-- metrics:([\w-]+) -->$", README.read_text(), re.MULTILINE)
    assert {"concept_maps", "salf_table1"} <= set(names)


def test_every_block_is_used_somewhere():
    used = {name for path in doc_files() for name in re.findall(r"^<!-- metrics:([\w-]+) -->$", path.read_text(), re.MULTILINE)}
    assert used == set(BLOCKS)


def test_a_tampered_block_is_detected():
    text = README.read_text()
    body = re.search(r"^<!-- metrics:concept_maps -->\n(.*?)^<!-- /metrics:concept_maps -->$", text, re.DOTALL | re.MULTILINE)[1]
    row = next(line for line in body.splitlines() if "`salf`" in line)
    tampered = text.replace(row, row.replace("| 0.", "| 1.", 1))
    assert tampered != text
    assert stale_blocks(tampered, Metrics()) == ["concept_maps"]
    assert regenerate(tampered, Metrics()) == text  # and `make readme` puts it back


def test_a_block_follows_the_metrics_it_renders(tmp_path):
    """Known answers from a hand-written metrics folder; a key that is absent renders as "–"."""
    (tmp_path / "evaluate.json").write_text(
        json.dumps(
            {
                "concept_maps": {"salf": {"avg": {"nra": 0.5, "nra_chance": -1e-17, "epg": 0.25, "hit": 1.0}}},
                "segmentation": {"salf": {"pixel_acc": 0.75, "miou": 0.125, "map": 0.5}, "centre": {"miou": 0.2}},
            }
        )
    )
    lines = render("concept_maps", Metrics(tmp_path)).splitlines()
    assert lines[2] == "| SALF-CBM (`salf`) | 0.500 | 0.000 | 0.250 | 1.000 | – | 0.750 | 0.125 | 0.500 |"
    assert lines[3] == "| centre (a centred Gaussian) | – | – | – | – | – | – | 0.200 | – |"
    (tmp_path / "fact.json").write_text(json.dumps({"fve": 0.9, "c2_delta": 0.0625, "completeness_max_rel_err": 3.8e-7, "gt_found": 4.0}))
    fact = {row.split(" | ")[1]: row.split(" | ")[2].rstrip(" |") for row in render("fact", Metrics(tmp_path)).splitlines()[2:]}
    assert fact["`fve`"] == "0.900" and fact["`c2_delta`"] == "0.062" and fact["`completeness_max_rel_err`"] == "3.8e-07"
    assert fact["`gt_found`"] == "4" and fact["`c2`"] == "–"
    (tmp_path / "compare.json").write_text(json.dumps({"methods": {
        "salf": {"causal": {"own": {"spearman": 0.75, "top1": 0.5, "coverage": 1.0}, "backbone": {"spearman": 0.25}},
                 "nra": 0.6, "l0": 4.0, "c2": {"delta": 0.375}},
        "rule": {"causal": {"own": {"spearman": -0.125}}, "c2": {"delta": None}},
    }}))
    lines = render("compare", Metrics(tmp_path)).splitlines()
    assert lines[2] == "| SALF-CBM (`salf`) | 0.750 | – | 0.500 | – | – | 1.000 | 0.250 | 0.600 | – | – | – | 4.0 | – | 0.375 |"
    assert lines[3] == "| the class rule's concepts (`rule`) | -0.125 | – | – | – | – | – | – | – | – | – | – | – | – | – |"
    summary = render("compare_summary", Metrics(tmp_path)).splitlines()
    assert summary[2] == "| SALF-CBM (`salf`) | 0.750 | 0.500 | 1.000 | 0.250 | 0.600 | – | – |"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_renders_without_metrics(tmp_path, name):
    """Other branches add and rename keys: an empty metrics folder must still render, all "–"."""
    body = render(name, Metrics(tmp_path))
    assert body.endswith("\n") and "|" in body


def test_unknown_and_unclosed_blocks_are_errors():
    with pytest.raises(ValueError, match="unknown metrics block 'nope'"):
        regenerate("<!-- metrics:nope -->\n<!-- /metrics:nope -->\n", Metrics())
    with pytest.raises(ValueError, match="no matching marker"):
        stale_blocks("<!-- metrics:stats -->\n| x |\n", Metrics())


# ------------------------------------------------------------------------------------------------
# README length and links


def test_readme_fits_on_two_screens():
    assert len(README.read_text().splitlines()) <= 200


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(README.parent / link).resolve() for link, _ in links(README.read_text())}
    assert PAGES and not [p.name for p in PAGES if p.resolve() not in targets]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, link targets and punctuation (backticks too) dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.MULTILINE):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def links(text: str) -> list[tuple[str, str]]:
    """(path, anchor) of every relative link outside code; path '' for an anchor in the same file."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    result = []
    for match in LINK.finditer(text):
        target = match[1] or match[2]
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        result.append((path, anchor))
    return result


def broken_links(path: Path) -> list[str]:
    broken = []
    for target, anchor in links(path.read_text()):
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            broken.append(f"{target}#{anchor}: no such heading")
    return broken


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_broken_relative_link(path):
    assert not broken_links(path), f"{path.relative_to(ROOT)}: {broken_links(path)}"


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "page.md").write_text("# A page\n\n## Step 2: `make` it\n\n## Step 2: `make` it\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](page.md#step-2-make-it) [ok](page.md#step-2-make-it-1) [ok](#top) [web](https://x.org/a.md)\n"
        "`[code](nowhere.md)`\n\n# Top\n\n"
        "[gone](missing.md) [bad anchor](page.md#step-3) ![img](img/none.png)\n"
    )
    assert broken_links(doc) == ["missing.md: no such file", "page.md#step-3: no such heading", "img/none.png: no such file"]


def ragged_rows(text: str) -> list[str]:
    """Table rows with another number of cells than their table's header (an unescaped | in a cell)."""
    ragged, width = [], None
    for line in FENCE.sub("", text).splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line)) - 2
        width = cells if width is None else width
        if cells != width:
            ragged.append(line)
    return ragged


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_are_well_formed(path):
    assert not ragged_rows(path.read_text())


def test_a_ragged_row_is_found():
    assert ragged_rows("| a | b |\n|---|---|\n| 1 \\| 2 | 3 |\n| x | y | z |\n\n| c |\n") == ["| x | y | z |"]


def test_make_readme_regenerates_the_docs():
    assert re.search(r"^readme: setup\n\t\$\(PY\) -m docs\.generate$", (ROOT / "Makefile").read_text(), re.MULTILINE)
