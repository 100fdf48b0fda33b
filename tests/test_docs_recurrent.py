"""The Python examples of docs/recurrent.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "recurrent.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_has_examples() -> None:
    assert len(BLOCKS) == 2


@pytest.mark.filterwarnings("ignore::dptorch.DPWarning")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[index], f"recurrent.md block {index}", "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out
    if "epsilon = " in out:
        assert 0 < float(re.findall(r"epsilon = ([0-9.]+)", out)[0]) < 100
    else:
        assert float(re.findall(r"max difference to nn.GRU = ([0-9.e+-]+)", out)[0]) < 1e-5
