"""The README against the code: every command it shows names options that exist, with the subcommand it uses.

Each fenced shell block is read command by command (backslash continuations joined); for each command that runs
one of the project's CLIs, every `--flag` after the script or module must appear in that CLI's `--help` (the
help is generated from the options dataclass, so it is the code's own list).

    .venv/bin/python -m pytest -q tests/test_readme.py
"""
import contextlib
import importlib
import io
import re
import shlex
import sys

import pytest
from conftest import ROOT

from minillm.tasks import gec, translation

SCRIPTS = {"train_pretrain.py": "train_pretrain", "train_sft.py": "train_sft", "train_orpo.py": "train_orpo",
           "evaluate.py": "evaluate", "demo/sample_world.py": "sample_world"}
SUBCOMMANDS = {"minillm.prepare": ("prepare", "info"), "minillm.tokenizer": ("train",), "minillm.vocab": ("extend",),
               "minillm.instructions": ("translate", "mix")}


def shell_commands(markdown: str) -> list[list[str]]:
    """The commands of every ```bash / ```sh / bare ``` block, as shlex tokens (comment lines dropped)."""
    commands, block, shell = [], None, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            if block is None:
                block, shell = [], line.strip("`").strip() in ("", "bash", "sh", "shell")
            else:
                if shell:
                    for command in "\n".join(block).replace("\\\n", " ").splitlines():
                        if command.strip() and not command.lstrip().startswith("#"):
                            with contextlib.suppress(ValueError):  # an unbalanced quote: not a command
                                commands.append(shlex.split(command, comments=True))
                block = None
        elif block is not None:
            block.append(line)
    return [c for c in commands if c]


def cli_call(tokens: list[str]):
    """(module name, subcommand or None, the arguments after them) of a command that runs a project CLI."""
    for i, token in enumerate(tokens):
        if token in SCRIPTS:
            return SCRIPTS[token], None, tokens[i + 1:]
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("minillm."):
            module, rest = tokens[i + 1], tokens[i + 2:]
            if module in SUBCOMMANDS:
                sub = rest[0] if rest and rest[0] in SUBCOMMANDS[module] else SUBCOMMANDS[module][0]
                return module, sub, rest[1:] if rest and rest[0] == sub else rest
            return module, None, rest
    return None


def help_flags(module: str, sub: str | None) -> set[str]:
    if module == "sample_world":
        sys.path.insert(0, str(ROOT / "demo"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(module).main([sub, "--help"] if sub else ["--help"])
    return set(re.findall(r"^  (--[\w-]+)", out.getvalue(), flags=re.M)) | {"--help", "--config"}


CALLS = [c for c in map(cli_call, shell_commands((ROOT / "README.md").read_text(encoding="utf-8"))) if c]


def test_the_readme_shows_every_cli():
    shown = {(module, sub) for module, sub, _ in CALLS}
    assert {("train_pretrain", None), ("train_sft", None), ("train_orpo", None), ("evaluate", None),
            ("minillm.prepare", "prepare"), ("minillm.serve", None)} <= shown, shown


@pytest.mark.parametrize("module, sub", sorted({(m, s) for m, s, _ in CALLS}, key=str))
def test_every_option_the_readme_shows_exists(module, sub):
    known = help_flags(module, sub)
    used = {arg.split("=")[0] for _, _, args in (c for c in CALLS if c[:2] == (module, sub))
            for arg in args if arg.startswith("--")}
    assert used - known == set(), f"{module} {sub or ''}: the README shows options its --help does not list"


def test_the_default_prompts_are_documented_as_they_are():
    """The translation and Estonian GEC defaults, as the README writes them (a line break as \\n)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for template in (translation.default_templates({})[0], gec.DEFAULT_PROMPTS["et"]):
        assert "`" + template.replace("\n", "\\n") + "`" in readme, template
