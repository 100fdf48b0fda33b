"""docs/audit.md stays true: its Python examples run, its commands parse."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from dptorch.audit_cli import add_audit_commands

DOC = (Path(__file__).resolve().parents[2] / "docs" / "audit.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)
COMMANDS = [
    shlex.split(line.split("#")[0].lstrip("! "))[4:]
    for block in re.findall(r"```bash\n(.*?)```", DOC, flags=re.DOTALL)
    for line in block.splitlines()
    if "python -m dptorch audit" in line
]


def test_doc_has_examples() -> None:
    assert len(BLOCKS) == 3 and len(COMMANDS) == 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[index], f"audit.md block {index}", "exec"), {"__name__": "__doc__"})
    for lower, upper in re.findall(
        r"epsilon = ([0-9.]+) \(audit\) \S+ ([0-9.]+)", capsys.readouterr().out
    ):
        assert float(lower) >= 0 and 0 < float(upper) < 100


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_doc_command_parses(args: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_audit_commands(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["audit", *args])
    assert parsed.command == "audit"
