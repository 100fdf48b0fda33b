"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples() -> None:
    assert BLOCKS, "the README lost its usage example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    for name, value in re.findall(r"(epsilon|sigma) = ([0-9.]+)", printed):
        assert 0 < float(value) < 100, f"{name} = {value}"


CLI_LINES = [
    line.split("#")[0].split()[3:]
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    for line in block.splitlines()
    if line.startswith("python -m dptorch ") and " demo" not in line
]


@pytest.mark.parametrize("args", CLI_LINES, ids=lambda a: a[0])
def test_readme_cli_example_runs(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from dptorch.cli import main

    assert main(args) == 0
    assert capsys.readouterr().out.strip()
