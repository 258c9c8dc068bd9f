"""The docs cannot drift: their code runs, their links resolve, their command lines name real flags.

Every ```python block of README.md and docs/*.md runs: the blocks of one page in order in one namespace (as a reader
pasting them into one session would), in an empty folder of their own; the pages one after another in one fresh
interpreter; a traceback names the page and its line. A block that cannot run here (it needs a GPU, a cluster or a
viewer) is preceded by the line ``<!-- no-test: REASON -->``: it must still compile, and it is reported as skipped
with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKING_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]  # the pages whose links are checked
NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^(`{3,})(.*)$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    skip: str | None  # the reason given in a no-test comment

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), (m.group(2).split() or [""])[0]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{page.name}:{i + 1}: unclosed code fence"
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = NO_TEST.search(before)
        out.append(Block(page, i + 2, lang, "\n".join(lines[i + 1 : end]) + "\n", reason and reason.group(1)))
        i = end + 1
    return out


def _python_blocks(page: Path) -> list[Block]:
    return [b for b in _blocks(page) if b.lang == "python"]


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# The pages run one after another in one interpreter (starting torch once), each page in a fresh namespace and in
# a folder of its own; the interpreter reports each page's traceback, or None, in a JSON file.
_RUNNER = """
import json, os, sys, traceback
pages, report = json.load(sys.stdin), sys.argv[1]
home, results = os.getcwd(), {}
for page, blocks in pages.items():
    os.makedirs(page.replace("/", "_"))
    os.chdir(page.replace("/", "_"))
    namespace = {"__name__": "__main__"}
    try:
        for line, code in blocks:
            exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
        results[page] = None
    except BaseException:
        results[page] = traceback.format_exc()
    os.chdir(home)
with open(report, "w") as f:
    json.dump(results, f)
"""
RUNNABLE = [p for p in PAGES if any(not b.skip for b in _python_blocks(p))]


@pytest.fixture(scope="module")
def page_errors(tmp_path_factory) -> dict[str, str | None]:
    folder = tmp_path_factory.mktemp("docs")
    pages = {_rel(p): [[b.line, b.code] for b in _python_blocks(p) if not b.skip] for p in RUNNABLE}
    report = folder / "errors.json"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", _RUNNER, str(report)], input=json.dumps(pages), cwd=folder,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and report.is_file(), f"the docs' code runner died:\n{result.stdout}\n{result.stderr}"
    return json.loads(report.read_text())


@pytest.mark.parametrize("page", RUNNABLE, ids=_rel)
def test_the_python_blocks_of_a_page_run(page, page_errors):
    error = page_errors[_rel(page)]
    assert error is None, f"a python block of {_rel(page)} failed:\n{error}"


_SKIPPED = [b for p in PAGES for b in _python_blocks(p) if b.skip]


@pytest.mark.parametrize("block", _SKIPPED, ids=[b.where for b in _SKIPPED])
def test_a_block_marked_no_test_compiles_and_is_skipped(block):
    compile(block.code, block.where, "exec")
    pytest.skip(f"{block.where} not run: {block.skip}")


def test_most_python_blocks_run():
    blocks = [b for p in PAGES for b in _python_blocks(p)]
    skipped = [b.where for b in blocks if b.skip]
    assert len(blocks) >= 10, f"only {len(blocks)} python blocks in the docs"
    assert len(skipped) * 4 <= len(blocks), f"too many blocks marked no-test: {skipped}"


def test_a_no_test_comment_stands_before_a_python_block():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if NO_TEST.search(line):
                after = next((x for x in lines[i + 1 :] if x.strip()), "")
                assert after.startswith("```python"), f"{_rel(page)}:{i + 1}: a no-test comment before {after!r}"


# -- links ----------------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are code, not links)."""
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, formatting and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").replace("*", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _links(page: Path) -> list[str]:
    text = _prose(page.read_text(encoding="utf-8"))
    return LINK.findall(text) + REF_LINK.findall(text)


@pytest.mark.parametrize("page", LINKING_PAGES, ids=_rel)
def test_every_relative_link_points_to_a_file_in_the_repository(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if ROOT.resolve() not in dest.parents and dest != ROOT.resolve():
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    orphans = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


# -- the README is a door -------------------------------------------------------------------------------------
def test_the_readme_is_short_and_keeps_the_two_quick_start_commands_ci_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 120, "README.md is the door: keep it short, move details into docs/"
    # the way .ci/run reads them
    blocks = re.findall(r"```bash\n(.*?)\n```", text[text.index("## Quick start"):], re.S)[:2]
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    assert blocks[0].startswith("pip install") and "napari-coordgate demo" in blocks[0]
    assert blocks[1].startswith("pip install") and "pytest" in blocks[1]


# -- the command-line page ------------------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from napari_coordgate.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _usage_lines() -> dict[str, str]:
    """docs/cli.md's usage block: command -> its usage text (continuation lines joined)."""
    block = next(b for b in _blocks(ROOT / "docs" / "cli.md") if b.lang == "" and "napari-coordgate" in b.code)
    usage: dict[str, str] = {}
    command = None
    for line in block.code.splitlines():
        m = re.match(r"napari-coordgate (\w+)", line)
        if m:
            command = m.group(1)
            usage[command] = usage.get(command, "") + " " + line
        elif command and line.startswith(" "):
            usage[command] += " " + line
    return usage


def test_the_cli_page_lists_every_command_with_exactly_its_flags():
    usage = _usage_lines()
    commands = _subparsers()
    assert set(usage) == set(commands), f"docs/cli.md usage lines vs commands: {sorted(usage)} / {sorted(commands)}"
    for name, sub in commands.items():
        written = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", usage[name]))
        options = [a.option_strings for a in sub._actions if a.option_strings and "--help" not in a.option_strings]
        missing = [" / ".join(o) for o in options if not written & set(o)]
        unknown = written - {s for o in options for s in o}
        assert not missing and not unknown, (
            f"docs/cli.md, `napari-coordgate {name}`: missing {missing}, unknown {sorted(unknown)} "
            f"(compare `napari-coordgate {name} --help`)"
        )
