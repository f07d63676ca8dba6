"""README.md's examples run as written, and its set-up commands are the ones .ci/run runs.

Every ```python block runs in its own Python process (so in a fresh namespace, relying on nothing it does not
define), in README order, with a temporary working directory. The first ```bash block (before the first section)
holds the two set-up commands: 1. install the examples extra and run the demo, 2. install the test extra, lint
and test; command 2 must be, command for command, what .ci/run runs in its fresh virtual environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
BLOCK_TIMEOUT_S = 600

_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str, lang: str):
    """(line number of the opening fence, body) of every ```lang block of ``text``, in order."""
    return [(text.count("\n", 0, m.start()) + 1, m.group("body")) for m in _FENCE.finditer(text)
            if m.group("lang").lower() == lang]


def _readme() -> str:
    return README.read_text(encoding="utf-8")


PYTHON_BLOCKS = fenced_blocks(_readme(), "python") if README.exists() else []


def test_readme_has_python_examples():
    assert PYTHON_BLOCKS, "README.md has no ```python block (tests/test_readme.py would check nothing)"


@pytest.mark.parametrize("line, code", [pytest.param(line, code, id=f"block{i + 1}-line{line}")
                                        for i, (line, code) in enumerate(PYTHON_BLOCKS)])
def test_readme_python_block_runs_as_written(line, code, tmp_path):
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONSTARTUP", None)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (f"README.md block at line {line} failed (exit {result.returncode}):\n"
                                    f"{result.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------------------
# The set-up commands
# ---------------------------------------------------------------------------------------------------------
def _commands(shell_text: str):
    """The commands of a shell text: comments and blank lines dropped, ``&&`` chains split."""
    commands = []
    for raw in shell_text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            commands.append([part.strip() for part in line.split("&&") if part.strip()])
    return commands


def _normalize(command: str):
    """Tokens of a command, with what does not change what runs removed: pip's -q, .ci/run's ``run_pytest``
    wrapper and ``env`` before variable assignments."""
    tokens = shlex.split(command)
    if tokens[:1] == ["run_pytest"]:
        tokens = tokens[1:]
    if tokens[:1] == ["env"]:
        tokens = tokens[1:]
    if tokens[1:4] == ["-m", "pip", "install"]:
        tokens = [t for t in tokens if t not in ("-q", "--quiet")]
    return tokens


def _setup_commands():
    text = _readme()
    top = text.split("\n## ", 1)[0]
    blocks = fenced_blocks(top, "bash") + fenced_blocks(top, "sh") + fenced_blocks(top, "shell")
    assert blocks, "README.md has no ```bash block of set-up commands before its first section"
    commands = _commands(sorted(blocks)[0][1])
    assert len(commands) == 2, f"README.md's set-up block should hold two commands; found {commands}"
    return commands


def _ci_commands():
    """The commands .ci/run runs at top level, less the fresh virtual environment it makes first."""
    commands = []
    for raw in CI_SCRIPT.read_text(encoding="utf-8").splitlines():
        if not raw or raw[0].isspace() or raw.startswith("#"):
            continue
        tokens = _normalize(raw)
        if tokens and (tokens[0] in ("python", "python3") or re.fullmatch(r"\w+=\S*", tokens[0])):
            if tokens[1:3] == ["-m", "venv"] or tokens[1:] == ["-m", "pip", "install", "--upgrade", "pip"]:
                continue
            commands.append(tokens)
    return commands


def test_readme_test_command_is_what_ci_runs():
    _, test_command = _setup_commands()
    assert [_normalize(c) for c in test_command] == _ci_commands(), (
        "README command 2 and .ci/run differ; README: " + " && ".join(test_command))


def _extras():
    """The names of pyproject.toml's optional-dependency groups (tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9][\w.-]*)\s*=", section, re.MULTILINE))


def test_readme_demo_command_names_an_existing_extra_and_script():
    demo_command, test_command = _setup_commands()
    extras = _extras()
    for command in demo_command + test_command:
        tokens = _normalize(command)
        for token in tokens:
            match = re.fullmatch(r"\.\[(?P<extras>[\w,-]+)\]", token)
            if match:
                for extra in match.group("extras").split(","):
                    assert extra in extras, f"README installs the extra {extra!r}, which pyproject.toml lacks"
        if tokens[:1] == ["python"] and len(tokens) > 1 and tokens[1].endswith(".py"):
            assert (ROOT / tokens[1]).is_file(), f"README runs {tokens[1]}, which is not in the repository"
