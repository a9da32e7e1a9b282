"""The README is executable: every shell command and Python snippet in README.md and recipes/README.md runs as
pasted, in README order, in a fresh folder that holds the repo's recipes and a demo's trained folders
(`outputs/demo`, from a QUICK demo), the state a newcomer is in after `make demo`.

The only changes the test makes are budgets: a `tarkit fit` gets `--trainer.fast_dev_run=1`, `tarkit demo`
gets `--quick`, `tarkit ablate` gets `--max-steps 2`. `make` lines are not run here: `make test` is what CI
runs, and `make demo` runs `tarkit demo`, which the QUICK demo fixture runs.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tarkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "recipes/README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language and its text."""

    where: str
    language: str
    text: str


def blocks() -> list[Block]:
    found = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        for match in FENCE.finditer(text):
            if match.group(1) in ("bash", "python"):
                line = text.count("\n", 0, match.start()) + 1
                found.append(Block(f"{document}:{line}", match.group(1), match.group(2)))
    return found


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, each split as the shell would."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def with_test_budget(args: list[str]) -> list[str]:
    """``tarkit`` arguments with the test's budget added to long trainings."""
    rest = list(args)
    while rest and rest[0] in ("--root", "--verbose") or rest and rest[0].startswith("--root="):
        rest = rest[2:] if rest[0] == "--root" else rest[1:]
    command = rest[0] if rest else None
    if command == "fit" and "--print_config" not in args:
        return [*args, "--trainer.fast_dev_run=1"]
    if command == "demo":
        return [*args, "--quick"]
    if command == "ablate":
        extra = args.index("--") if "--" in args else len(args)
        return [*args[:extra], "--max-steps", "2", *args[extra:]]
    return args


def run_shell(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    while words and ASSIGNMENT.match(words[0]):  # VAR=value tarkit ...
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    if words[0] == "make":
        assert words[1] in ("demo", "test", "lint", "install", "clean"), f"unknown make target in {words}"
        return
    if words[:3] == [".venv/bin/python", "-m", "tarkit"] or words[:3] == ["python", "-m", "tarkit"]:
        args = words[3:]
    elif words[0] in ("tarkit", ".venv/bin/tarkit"):
        args = words[1:]
    else:
        raise AssertionError(f"the README test does not know how to run {shlex.join(words)!r}")
    try:
        status = main(with_test_budget(args))
    except SystemExit as err:  # LightningCLI's --help and --print_config exit
        status = err.code or 0
    assert status == 0, f"{shlex.join(words)} exited with {status}"


@pytest.fixture(scope="module")
def workspace(quick_demo, tmp_path_factory):
    """A folder like a fresh clone after `make demo`: recipes/ and outputs/demo/."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "recipes").symlink_to(ROOT / "recipes")
    (folder / "outputs").mkdir()
    (folder / "outputs" / "demo").symlink_to(quick_demo)
    return folder


@pytest.mark.parametrize("block", blocks(), ids=lambda b: b.where)
def test_readme_block_runs_as_pasted(block, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    if block.language == "python":
        exec(compile(block.text, block.where, "exec"), {"__name__": "__readme__"})
        return
    for words in shell_commands(block.text):
        run_shell(words, monkeypatch)


def test_every_tarkit_command_of_the_readme_is_seen():
    """The extraction itself: a README without runnable blocks would pass the test above vacuously."""
    found = blocks()
    assert sum(b.language == "python" for b in found) >= 3
    commands = [w for b in found if b.language == "bash" for w in shell_commands(b.text)]
    assert sum(w[0] in ("tarkit", ".venv/bin/tarkit") for w in commands) >= 15
