"""Every ``tuner ...`` command line in README.md and docs/ parses against the CLI's own options.

A renamed flag, a removed command or a value of the wrong type in the documentation fails here, not in
a reader's terminal. Each line is parsed by the same click command Typer builds for ``tuner``, with the
same types and required options, without running it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from tuner.cli import app

ROOT = Path(__file__).parents[1]
COMMANDS = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines(text: str) -> list[str]:
    """Lines of code blocks (fenced or indented) and inline code spans, continuation lines joined."""
    lines: list[str] = []
    fenced = False
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            lines.append(line.strip())
        else:
            lines += re.findall(r"`([^`]+)`", line)
    return lines


def documented_commands(path: Path) -> list[str]:
    commands = []
    for line in _code_lines(path.read_text()):
        line = line.split(" #")[0]
        for part in re.split(r"&&|;|\|", line):
            part = part.split(" > ")[0].strip()
            words = part.split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value tuner ...
                words.pop(0)
            if len(words) >= 2 and words[0] == "tuner" and not (len(words) == 2 and words[1] in COMMANDS):
                commands.append(" ".join(words))  # a full command line, not a mention of `tuner refit` in prose
    return commands


def parse(command: str) -> None:
    """Parse ``tuner ...`` as the CLI would, down to the leaf command; raise click's error if it does not."""
    args = [a.replace("…", "x") for a in shlex.split(command.replace('"$TUNER_STORAGE"', "sqlite:///x.db"))][1:]
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("tuner", list(args), resilient_parsing=False)
    while hasattr(cmd, "resolve_command"):  # a group: parse the subcommand with what follows it
        name, sub, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub


# click's UsageError, as the click that Typer carries names it (BadParameter is one of its kinds).
UsageError = typer.BadParameter.__mro__[1]

ALL = [(path.relative_to(ROOT).as_posix(), c) for path in DOCUMENTS for c in documented_commands(path)]


def test_the_documents_show_every_command():
    shown = {c.split()[1] for _, c in ALL}
    assert shown <= COMMANDS
    assert COMMANDS <= shown, f"no document shows a full command line for: {COMMANDS - shown}"


@pytest.mark.parametrize(("document", "command"), ALL, ids=[f"{d}: {c[:60]}" for d, c in ALL])
def test_each_documented_command_parses(document, command):
    try:
        parse(command)
    except UsageError as e:
        pytest.fail(f"{document}: `{command}`: {e.format_message()}")


def test_a_wrong_flag_is_caught():
    with pytest.raises(UsageError, match="--n-trails"):
        parse("tuner optimize --space s.yaml --n-trails 5")
    with pytest.raises(UsageError, match="valid integer"):
        parse("tuner refit --study s --seeds x")
