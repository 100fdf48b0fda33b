"""The Python examples of docs/transformers.md run as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_has_examples() -> None:
    assert len(BLOCKS) == 3


@pytest.mark.filterwarnings("ignore::dptorch.DPWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    for package in ("transformers", "peft"):
        imported = re.search(rf"^import {package}$", BLOCKS[index], flags=re.MULTILINE)
        if imported and importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package} (pip install 'dptorch[hf]')")
    exec(compile(BLOCKS[index], f"transformers.md block {index}", "exec"), {"__name__": "__doc__"})
    epsilon = float(re.findall(r"epsilon = ([0-9.]+)", capsys.readouterr().out)[0])
    assert 0 < epsilon < 100
