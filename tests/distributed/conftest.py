from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_ranks


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The results of :func:`workers.all_scenarios` on two gloo ranks (one spawn for all)."""
    checkpoint = tmp_path_factory.mktemp("distributed") / "run.pt"
    return run_ranks(
        workers.all_scenarios, checkpoint=str(checkpoint), doc_code=doc_blocks()[0], timeout=150
    )


def doc_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
