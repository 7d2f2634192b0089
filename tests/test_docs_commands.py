"""Every `python -m jaxpt.<command> ...` that README.md, docs/*.md and BENCHMARKS.md show
is one a user can run as written.

Commands are collected from fenced code blocks (line continuations joined; `$ ` prompts,
environment-variable prefixes, `.venv/bin/` and `# comments` dropped) and from inline code
spans, which may wrap over lines. Usage notation is read as a reader reads it: an optional
group such as `[key=value ...]` or `[flags]` and a bare `...` are dropped, and `a|b` in a
word (`sft|grpo`) stands for one command per alternative. An inline span that is only
`python -m jaxpt.X`, with no arguments, names the command in prose: only its module is
checked.

For each command, in this process (nothing runs, nothing trains):
- the module exists and `python -m` can run it (a module, or a package with `__main__`),
  and its `main` is a `jaxpt.cli` command;
- its argv is accepted by that command's own parser, `jaxpt.cli.<name>.parse_args`
  (`--help` counts as accepted). Paths are not checked: argparse does not, so
  placeholders such as `DIR`, `<dir>` or `runs/...` parse;
- with `--config FILE`, the config loads with the command's overrides through the loader
  the command uses (`jaxpt.config.load_config` for train and plan): a dry run of the
  config. A config file that does not exist is a placeholder (`X.yaml`): its argv is
  still parsed, only loading it is skipped. An override naming a `runs/...` path that
  does not exist here (what an earlier documented command writes, such as
  `ppo.reward_model=runs/rm_tiny/hf`) points at an empty scratch directory for the load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
# Fewer would mean the collector stopped seeing the docs' commands, not that they are fine.
MIN_COMMANDS = 50

FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
PYTHON = re.compile(r"(?:^|/)python(?:3(?:\.\d+)?)?$")
MODULE = re.compile(r"jaxpt(?:\.[A-Za-z_]\w*)*")
OPTIONAL_GROUP = re.compile(r"(?<!\S)\[[^\]\n]*\]")
ALTERNATIVES = re.compile(r"[\w.-]+(?:\|[\w.-]+)+")
SHELL_SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = re.compile(r"^\d?>>?$|^<$")


@dataclasses.dataclass(frozen=True)
class DocCommand:
    path: str  # relative to the repository root
    line: int
    text: str  # as the doc writes it, one line
    module: str
    argv: tuple[str, ...]
    inline: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}: `{self.text}`"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _expand_alternatives(tokens: list[str]) -> list[list[str]]:
    """`sft|grpo` in a word: one argv per alternative (a value such as `a=b|c` is left)."""
    for i, token in enumerate(tokens):
        if ALTERNATIVES.fullmatch(token):
            return [
                argv
                for choice in token.split("|")
                for argv in _expand_alternatives([*tokens[:i], choice, *tokens[i + 1 :]])
            ]
    return [tokens]


def _commands_in(shell: str, comments: bool) -> list[tuple[str, list[str]]]:
    """(module, argv) of each `python -m jaxpt...` in one logical shell line. Shell
    operators count where they stand alone (`a | b`); inside a word `|` is notation."""
    shell = OPTIONAL_GROUP.sub(" ", shell)
    lexer = shlex.shlex(shell, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#" if comments else ""
    tokens = list(lexer)
    pieces, current = [], []
    for token in tokens:
        if token in SHELL_SEPARATORS:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    pieces.append(current)
    found = []
    for piece in pieces:
        for i in range(len(piece) - 2):
            if PYTHON.search(piece[i]) and piece[i + 1] == "-m":
                if MODULE.fullmatch(piece[i + 2]):
                    argv, skip = [], False
                    for token in piece[i + 3 :]:
                        if skip:
                            skip = False
                        elif REDIRECTS.match(token):
                            skip = True  # and its target
                        elif token != "...":
                            argv.append(token)
                    found.append((piece[i + 2], argv))
                break
    return found


def _strip_fences(text: str) -> str:
    """The text with fenced blocks blanked out, line numbers kept."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def collect_commands(path: Path) -> list[DocCommand]:
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(ROOT).as_posix()
    commands = []

    def add(line: int, shell: str, inline: bool) -> None:
        shown = " ".join(shell.split())
        for module, argv in _commands_in(shell, comments=not inline):
            for expanded in _expand_alternatives(argv):
                commands.append(DocCommand(name, line, shown, module, tuple(expanded), inline))

    for block in FENCE.finditer(text):
        start = _line_of(text, block.start(2))
        logical, first = "", None
        for offset, raw in enumerate(block.group(2).split("\n")):
            line = raw.rstrip()
            if first is None:
                first = start + offset
                line = re.sub(r"^\s*\$\s+", "", line)
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            if "jaxpt" in logical:
                add(first, logical, inline=False)
            logical, first = "", None

    prose = _strip_fences(text)
    for span in INLINE.finditer(prose):
        if "python" in span.group(1) and "jaxpt" in span.group(1):
            add(_line_of(prose, span.start()), span.group(1), inline=True)
    return commands


ALL_COMMANDS = [command for path in DOC_FILES for command in collect_commands(path)]


def _cli_module(module: str):
    """The `jaxpt.cli` module whose `main` runs for `python -m <module>`."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package is missing
        spec = None
    assert spec is not None, f"no module {module}"
    runnable = module
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        runnable = f"{module}.__main__"
        assert importlib.util.find_spec(runnable) is not None, f"{module} has no __main__"
    main = getattr(importlib.import_module(runnable), "main", None)
    assert main is not None, f"{runnable} has no main()"
    cli = sys.modules[main.__module__]
    assert cli.__name__.startswith("jaxpt.cli."), f"{runnable}.main is not a jaxpt.cli command"
    return cli


def _parse(cli, argv):
    """(namespace or None after --help, argparse's message or None)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return cli.parse_args(list(argv)), None
        except SystemExit as stop:
            if stop.code in (0, None):
                return None, None  # --help
            message = err.getvalue().strip().splitlines()  # usage lines, then the error
            return None, message[-1] if message else f"exit status {stop.code}"


def _config_loader(cli):
    """How the command reads `--config FILE` plus its overrides, or None."""
    name = cli.__name__.rsplit(".", 1)[-1]
    if name in ("train", "plan"):
        from jaxpt.config import load_config

        return lambda args: load_config(args.config, args.overrides)
    if name == "curate":
        from jaxpt.curation import load_curation_config

        return lambda args: load_curation_config(args.config, args.overrides)
    if name == "rejection_sample":
        from jaxpt.curation.rejection import load_rejection_config

        return lambda args: load_rejection_config(args.config, args.overrides)
    if name == "eval":
        return lambda args: cli.load_eval_config(args.config)
    return None


def test_docs_show_enough_commands():
    assert len(ALL_COMMANDS) >= MIN_COMMANDS, (
        f"found {len(ALL_COMMANDS)} `python -m jaxpt...` commands in "
        f"{[p.relative_to(ROOT).as_posix() for p in DOC_FILES]}; expected at least "
        f"{MIN_COMMANDS}: is the collector still reading the docs?"
    )
    per_file = {c.path for c in ALL_COMMANDS}
    assert "README.md" in per_file and any(p.startswith("docs/") for p in per_file)


def test_every_command_is_documented():
    """Each console script's command has at least one documented example."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    documented = {_cli_module(c.module).__name__ for c in ALL_COMMANDS}
    missing = sorted(
        f"{script} ({target})"
        for script, target in scripts.items()
        if target.split(":")[0] not in documented
    )
    assert not missing, f"no `python -m jaxpt...` example in the docs for {missing}"


def _with_scratch_outputs(args, scratch: Path):
    """`args` whose `key=runs/...` overrides that do not exist here (what an earlier
    documented command writes, such as `ppo.reward_model=runs/rm_tiny/hf`) name an empty
    scratch directory instead, so the config's own path checks pass."""
    overrides = []
    for override in getattr(args, "overrides", None) or []:
        key, sep, value = override.partition("=")
        if sep and value.startswith("runs/") and not (ROOT / value).exists():
            (scratch / value).mkdir(parents=True, exist_ok=True)
            override = f"{key}={scratch / value}"
        overrides.append(override)
    return argparse.Namespace(**{**vars(args), "overrides": overrides})


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.path}:{c.line}")
def test_documented_command_parses(command: DocCommand, tmp_path):
    try:
        cli = _cli_module(command.module)
    except AssertionError as error:
        pytest.fail(f"{command.where()}\n  python -m {command.module}: {error}")
    if command.inline and not command.argv:
        return  # the command named in prose
    args, problem = _parse(cli, command.argv)
    if problem is not None:
        pytest.fail(f"{command.where()}\n  does not parse as {list(command.argv)}:\n  {problem}")
    config = getattr(args, "config", None)
    loader = _config_loader(cli)
    if args is None or config is None or loader is None:
        return
    if not os.path.exists(ROOT / config):
        return  # a placeholder such as X.yaml: parsed, not loaded
    cwd = os.getcwd()
    os.chdir(ROOT)  # config paths in the docs are relative to the repository root
    try:
        loader(_with_scratch_outputs(args, tmp_path))
    except Exception as error:  # noqa: BLE001 - any failure is the doc's to report
        pytest.fail(
            f"{command.where()}\n  its config does not load: {type(error).__name__}: {error}"
        )
    finally:
        os.chdir(cwd)


# Links: relative targets exist, and #anchors into markdown files name a heading.


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    anchors = set()
    text = _strip_fences(path.read_text(encoding="utf-8"))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
        anchors.add(slug.replace(" ", "-"))
    return anchors


def _links():
    for path in DOC_FILES:
        text = _strip_fences(path.read_text(encoding="utf-8"))
        for match in LINK.finditer(text):
            target = match.group(1)
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                yield path, _line_of(text, match.start()), target


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for path, line, target in _links():
        if path != doc:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT).as_posix()}:{line}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{where} (no heading #{anchor} in {resolved.name})")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)
