"""The documentation holds together: every relative link and anchor in the README, CONTRIBUTING, docs/ and examples/
resolves, and the API reference names every top-level export.

Anchors follow GitHub's rule for heading ids: lower case, punctuation dropped (letters, digits, `_` and `-` kept),
each space a `-`, and `-1`, `-2`, ... for repeated headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    + list((ROOT / "docs").glob("**/*.md"))
    + list((ROOT / "examples").glob("**/*.md"))
)
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their 1-based numbers."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's id for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = CODE_SPAN.sub(lambda m: m.group(2), text).lower()
    return "".join(c for c in text if c.isalnum() or c in "_- ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        out.extend((number, m.group(1)) for m in LINK.finditer(line))
    return out


def test_the_slug_follows_github():
    assert slug("The paper's table at CPU scale (`s2t-hf demo`)") == "the-papers-table-at-cpu-scale-s2t-hf-demo"
    assert slug("Symptom → cause → fix") == "symptom--cause--fix"
    assert slug("3. Fit the learned trigger (optional)") == "3-fit-the-learned-trigger-optional"
    assert slug("Three seeds (`benchmarks/demo_seeds.py`)") == "three-seeds-benchmarksdemo_seedspy"


def test_the_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"README.md", "CONTRIBUTING.md", "docs/index.md", "docs/settings.md"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(path):
    broken = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} (no heading with the id `{anchor}` in {resolved.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_api_reference_names_every_top_level_export():
    import s2t_hf

    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    intro = api.split("\n## ", 1)[0]
    missing = [name for name in s2t_hf.__all__ if name != "__version__" and f"`{name}`" not in intro]
    assert not missing, f"docs/api.md's introduction does not list these exports of `s2t_hf`: {missing}"
