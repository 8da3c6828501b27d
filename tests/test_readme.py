"""The README's CLI tables against the click commands: every option `tl COMMAND --help` shows has a row
under the command's `### `tl COMMAND`` heading, and no row names a flag the command lacks.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

import cli

README = Path(__file__).resolve().parent.parent / "README.md"
COMMAND_HEADING = re.compile(r"^### `tl ([a-z][a-z-]*)")
ANY_HEADING = re.compile(r"^#{1,3} ")
FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9-]*")
ONCE_FOR_ALL = {"--config"}  # described once, in the README's "Recipes" section


def option_spellings(command: click.Command) -> list[tuple[str, set[str]]]:
    """Each option of `command` as (its name in a message, its long flags): `--flip/--no-flip` and
    `--lr-factors, --lr-factor` are one option with two spellings each."""
    options = []
    for param in command.params:
        if isinstance(param, click.Option):
            flags = [flag for flag in param.opts if flag.startswith("--")]
            negative = [flag for flag in param.secondary_opts if flag.startswith("--")]
            name = ", ".join(flags) + "".join(f"/{flag}" for flag in negative)
            options.append((name, {*flags, *negative}))
    return options


def documented_flags(readme: str) -> dict[str, set[str]]:
    """Command name -> the flags written in backticks in the first column of the tables under its
    `### `tl NAME ...`` heading(s), up to the next heading of level 1 to 3."""
    flags: dict[str, set[str]] = {}
    command = None
    previous_was_table = in_code = False
    for line in readme.splitlines():
        if line.lstrip().startswith("```"):  # a `# comment` in a code block is no heading
            in_code = not in_code
        if in_code:
            previous_was_table = False
            continue
        if ANY_HEADING.match(line):
            heading = COMMAND_HEADING.match(line)
            command = heading.group(1) if heading else None
            if command:
                flags.setdefault(command, set())
            previous_was_table = False
            continue
        is_row = line.lstrip().startswith("|")
        if command and is_row and previous_was_table:  # a table's first line is its header: skipped
            first_cell = line.strip().strip("|").split("|")[0]
            if not re.fullmatch(r"\s*:?-+:?\s*", first_cell):  # the |---| separator
                for span in re.findall(r"`([^`]+)`", first_cell):
                    flags[command].update(FLAG.findall(span))
        previous_was_table = is_row
    return flags


def readme_problems(readme: str, commands: dict[str, click.Command]) -> list[str]:
    """What the README's tables get wrong about `commands`, one line each (empty when they agree)."""
    documented = documented_flags(readme)
    problems = []
    for name, command in sorted(commands.items()):
        if name not in documented:
            problems.append(f"tl {name}: no '### `tl {name}`' section in the README")
            continue
        options = option_spellings(command)
        for option, spellings in options:
            if not spellings & (documented[name] | ONCE_FOR_ALL):
                problems.append(f"tl {name}: option {option} has no row in the README's table")
        known = set().union(*(spellings for _, spellings in options))
        for flag in sorted(documented[name] - known):
            problems.append(f"tl {name}: the README's table names {flag}, which the command does not have")
    for name in sorted(set(documented) - set(commands)):
        problems.append(f"the README has a section for tl {name}, which is no command")
    return problems


@pytest.fixture(scope="module")
def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def test_the_readme_tables_list_every_option_and_no_other(readme_text):
    problems = readme_problems(readme_text, dict(cli.tl.commands))
    assert not problems, "README.md and cli.py disagree:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(cli.tl.commands))
def test_every_command_has_a_table_row(readme_text, name):
    assert documented_flags(readme_text).get(name), f"no options table under '### `tl {name}`' in README.md"


def test_a_removed_row_is_named(readme_text):
    row = next(line for line in readme_text.splitlines() if line.startswith("| `--max-iter"))
    incomplete = readme_text.replace(row + "\n", "")
    assert readme_problems(incomplete, dict(cli.tl.commands)) == [
        "tl fit-head: option --max-iter has no row in the README's table"]


def test_an_option_added_to_the_cli_without_a_row_is_named(readme_text):
    fit_head = cli.tl.commands["fit-head"]
    grown = click.Command("fit-head", params=[*fit_head.params, click.Option(["--new-knob"], type=int),
                                              click.Option(["--shiny/--no-shiny"])])
    commands = {**cli.tl.commands, "fit-head": grown}
    assert readme_problems(readme_text, commands) == [
        "tl fit-head: option --new-knob has no row in the README's table",
        "tl fit-head: option --shiny/--no-shiny has no row in the README's table",
    ]


def test_a_flag_the_command_lacks_and_a_missing_section_are_named(readme_text):
    extra = readme_text.replace("| `--verify` |", "| `--verify`, `--repair` |", 1)
    assert "`--repair`" in extra
    assert readme_problems(extra, dict(cli.tl.commands)) == [
        "tl info: the README's table names --repair, which the command does not have"]
    without_info = re.sub(r"^### `tl info.*?(?=^### )", "", readme_text, flags=re.S | re.M)
    assert readme_problems(without_info, dict(cli.tl.commands)) == [
        "tl info: no '### `tl info`' section in the README"]


def test_pairs_and_aliases_count_under_either_spelling():
    command = click.Command("demo", params=[click.Option(["--flip/--no-flip"]),
                                             click.Option(["--lr-factors", "--lr-factor", "lr_factors"]),
                                             click.Option(["--config"])])
    for row in ("`--flip/--no-flip`", "`--no-flip`", "`--flip`"):
        readme = f"### `tl demo`\n\n| option | meaning |\n|---|---|\n| {row}, `--lr-factor` | x |\n"
        assert readme_problems(readme, {"demo": command}) == []
    header_only = "### `tl demo`\n\n| `--flip` | meaning |\n|---|---|\n| `--lr-factors` | x |\n"
    assert readme_problems(header_only, {"demo": command}) == [
        "tl demo: option --flip/--no-flip has no row in the README's table"]
