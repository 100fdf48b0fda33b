"""The Python examples of docs/checkpoints.md and docs/monitoring.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("name", ["checkpoints.md", "monitoring.md"])
def test_doc_examples_run_in_order(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = _blocks(name)
    assert blocks, f"{name} lost its examples"
    monkeypatch.chdir(tmp_path)  # the examples write run.pt / train-log.csv
    namespace: dict[str, object] = {"__name__": f"__{name}__"}
    for index, block in enumerate(blocks):  # later blocks build on earlier ones
        exec(compile(block, f"{name} block {index}", "exec"), namespace)
