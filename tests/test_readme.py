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
    if "get_epsilon" in BLOCKS[index]:
        printed = capsys.readouterr().out
        epsilon = float(re.search(r"epsilon = ([0-9.]+)", printed).group(1))  # type: ignore[union-attr]
        assert 0 < epsilon < 100
