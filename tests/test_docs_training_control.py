"""The examples in docs/training-control.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "training-control.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_has_examples() -> None:
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[index], f"{DOC.name} block {index}", "exec"), {"__name__": "__doc__"})
    printed = capsys.readouterr().out
    assert printed.strip()
    for value in re.findall(r"epsilon = ([0-9.]+)", printed):
        assert 0 < float(value) < 100
