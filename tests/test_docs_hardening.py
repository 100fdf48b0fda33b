"""The Python example of docs/hardening.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "hardening.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_has_examples() -> None:
    assert len(BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[index], f"hardening.md block {index}", "exec"), {"__name__": "__doc__"})
    epsilon = float(re.findall(r"epsilon = ([0-9.]+)", capsys.readouterr().out)[0])
    assert 0 < epsilon < 100
