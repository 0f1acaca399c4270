"""MkDocs hooks of the flowsim site (mkdocs.yml `hooks:`).

- Files included whole from the repository root (``--8<-- "STUDIES.md"``, pymdownx.snippets)
  link their figures as ``docs/studies/…``, a path from the root. A Markdown preprocessor that
  runs after the snippets rewrites every ``](docs/…)`` link to the same file relative to the
  page, so STUDIES.md stays the one source and renders on GitHub and on the site alike.
- ``<!-- flowsim-cli-reference -->`` on a page is replaced by the reference of every
  subcommand and option of ``flowsim.cli.parser()``, so the CLI page cannot fall behind it.
"""

from __future__ import annotations

import argparse
import importlib.util
import posixpath
import re
import sys
from pathlib import Path

from markdown import Extension
from markdown.preprocessors import Preprocessor

ROOT = Path(__file__).resolve().parents[2]
CLI_MARKER = "<!-- flowsim-cli-reference -->"

_current_page: list[str] = [""]  # src_uri of the page being rendered (pages render one at a time)


class _DocsLinks(Preprocessor):
    """](docs/x) → ](x relative to the current page)."""

    pattern = re.compile(r"\]\(docs/([^)\s]+)")

    def run(self, lines: list[str]) -> list[str]:
        folder = posixpath.dirname(_current_page[0]) or "."
        return [self.pattern.sub(lambda m: "](" + posixpath.relpath(m.group(1), folder), line) for line in lines]


class _DocsLinksExtension(Extension):
    def extendMarkdown(self, md):  # noqa: N802 (Markdown's API)
        md.preprocessors.register(_DocsLinks(md), "flowsim_docs_links", 31)  # after snippets (32)


def on_config(config, **kwargs):
    config.markdown_extensions.append(_DocsLinksExtension())
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    _current_page[0] = page.file.src_uri
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def _cli_parser() -> argparse.ArgumentParser:
    """flowsim.cli.parser(), read from flowsim/cli.py alone when it can be (its top level
    imports only the standard library), so that the build does not import torch."""
    try:
        spec = importlib.util.spec_from_file_location("_flowsim_cli_for_docs", ROOT / "flowsim" / "cli.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.parser()
    except ImportError:
        sys.path.insert(0, str(ROOT))
        from flowsim.cli import parser

        return parser()


def _argument(action: argparse.Action) -> tuple[str, str]:
    if action.option_strings:
        names = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.nargs != 0:
            value = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices else action.dest.upper())
            names += f" `{value}`"
    else:
        names = f"`{action.metavar or action.dest.upper()}`"
    text = (action.help or "").replace("|", "\\|")
    if action.choices and action.option_strings:
        text += f" One of: {', '.join(f'`{c}`' for c in action.choices)}."
    if action.required and action.option_strings:
        text += " Required."
    if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
        text += f" Default: `{action.default}`."
    if isinstance(action, argparse._AppendAction):
        text += " Repeatable."
    return names, text.strip()


def cli_reference() -> str:
    """Markdown: per subcommand its usage and a table of its arguments."""
    parser = _cli_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in subparsers._choices_actions}
    out = []
    for name, sub in subparsers.choices.items():
        sub.prog = f"flowsim {name}"
        usage = " ".join(sub.format_usage().split())
        out += [f"## flowsim {name}", "", helps.get(name) or "", "", "```text", usage, "```", ""]
        out += ["| argument | meaning |", "|---|---|"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names, text = _argument(action)
            out.append(f"| {names} | {text} |")
        out.append("")
    return "\n".join(out)
