"""The documentation: the site builds with ``mkdocs build --strict``, and every code block of
docs/ (and of README.md) runs. The rules, and the markers a page may put before a block, are in
docs/development.md, "The docs test":

- ```python blocks run in order, one namespace per page, in a fresh temporary folder;
- ```toml blocks are configs and go through ``flowsim.load_config`` (``<!-- fragment -->``: a
  part of one, only parsed as TOML);
- other blocks are not run, except ```bash blocks marked ``<!-- run -->``: line by line, a
  ``flowsim …`` command through ``flowsim.cli.main`` (it must exit 0), anything else by bash;
- ``<!-- skip: REASON -->`` skips a block; ``<!-- file: NAME -->`` writes it to NAME first.

mkdocs is required, not optional: ``./dev.sh test`` installs the ``docs`` extra, and a docs build
that silently skipped would let the site rot.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.relative_to(DOCS).parts) + [ROOT / "README.md"]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
COMMENT = re.compile(r"^\s*<!--\s*(?P<name>[\w-]+)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")
MARKERS = {"skip", "file", "fragment", "run"}
RUNNABLE = {"python", "toml", "bash"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the markers in the comment lines just
    above each (blank lines between are allowed)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        close = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a code block that is never closed")
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : j]]
        markers, k = {}, i - 1
        while k >= 0 and (not lines[k].strip() or COMMENT.match(lines[k])):
            if comment := COMMENT.match(lines[k]):
                markers[comment["name"]] = comment["arg"] or ""
            k -= 1
        found.append(Block(path, i + 1, lang, "\n".join(body) + "\n", markers))
        i = j + 1
    return found


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


RUN_PAGES = [p for p in PAGES if any(b.lang in RUNNABLE and "skip" not in b.markers for b in blocks(p))]


def test_markers_are_known():
    """A misspelt marker would silently run (or skip) a block: every comment just above a
    block is a known marker, used on a block it applies to."""
    problems = []
    for path in PAGES:
        for block in blocks(path):
            for name, arg in block.markers.items():
                if name not in MARKERS:
                    problems.append(f"{block}: unknown marker <!-- {name} -->; known: {', '.join(sorted(MARKERS))}")
                elif name in ("skip", "file") and not arg:
                    problems.append(f"{block}: <!-- {name}: … --> needs {'a reason' if name == 'skip' else 'a file name'}")
                elif name == "run" and block.lang != "bash":
                    problems.append(f"{block}: <!-- run --> applies to ```bash blocks")
                elif name == "fragment" and block.lang != "toml":
                    problems.append(f"{block}: <!-- fragment --> applies to ```toml blocks")
    assert not problems, "\n".join(problems)


def _run_bash(block: Block, namespace: dict) -> None:
    from flowsim import cli

    text = block.code.replace("\\\n", " ")
    for line in text.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if argv[0] == "flowsim":
            code = cli.main(argv[1:])
            assert code == 0, f"{block}: `{line.strip()}` exited {code}"
        else:
            subprocess.run(line, shell=True, check=True, executable="/bin/bash")


def _close_clusters(namespace: dict) -> None:
    """A page that failed half-way may leave a dask cluster or client open."""
    if "distributed" not in sys.modules:
        return
    import distributed
    from distributed.deploy import Cluster

    for value in list(namespace.values()):
        if isinstance(value, (Cluster, distributed.Client)):
            try:
                value.close()
            except Exception:  # noqa: BLE001 (cleanup only)
                pass


@pytest.mark.parametrize("path", RUN_PAGES, ids=_page_id)
def test_code_blocks_run(path, tmp_path, monkeypatch):
    import flowsim as fs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    try:
        for block in blocks(path):
            if "skip" in block.markers:
                continue
            if "file" in block.markers:
                target = tmp_path / block.markers["file"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code, encoding="utf-8")
            if block.lang == "python":
                # blank lines in front: a traceback names the page's own line numbers
                code = compile("\n" * block.line + block.code, str(block.path), "exec")
                try:
                    exec(code, namespace)  # noqa: S102 (the docs' own examples)
                except KeyboardInterrupt as exc:  # would end the whole pytest session
                    raise AssertionError(f"{block}: KeyboardInterrupt escaped the block") from exc
            elif block.lang == "toml":
                if "fragment" in block.markers:
                    tomllib.loads(block.code)
                else:
                    fs.load_config(block.code)
            elif block.lang == "bash" and "run" in block.markers:
                _run_bash(block, namespace)
    finally:
        _close_clusters(namespace)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")


def _cli_words() -> list[str]:
    from flowsim.cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    words = []
    for name, subparser in sub.choices.items():
        words.append(f"flowsim {name}")
        words += [s for a in subparser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings]
    return words


def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` (every link, anchor and API name resolves; every page is in
    the nav), then: the CLI page names every subcommand and option of ``flowsim.cli.parser()``,
    and every image of every page is in the site."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[docs]' (./dev.sh test installs it)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"

    cli_page = html.unescape(re.sub(r"<[^>]+>", " ", (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")))
    missing = [word for word in _cli_words() if word not in cli_page]
    assert not missing, f"the CLI page lacks {missing}"

    broken = []
    for page in site.rglob("*.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+)"', page.read_text(encoding="utf-8")):
            if not src.startswith(("http:", "https:", "data:")) and not (page.parent / src).resolve().is_file():
                broken.append(f"{page.relative_to(site)}: {src}")
    assert not broken, f"images missing from the site: {broken}"


def test_readme_is_a_front_page():
    """README.md stays short, keeps the two commands, and every relative link and image in it
    (into docs/, STUDIES.md, …) names a file of the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md is the front page: at most 200 lines (the manual is docs/)"
    assert "./dev.sh study" in text and "./dev.sh test" in text
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http:", "https:", "mailto:", "#")):
            continue
        if not (ROOT / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"README.md links to missing files: {broken}"
