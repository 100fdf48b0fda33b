"""examples/distributed_demo.py runs, in one process and under torchrun with two ranks."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distributed_demo.py"

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_distributed_demo", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_runs_as_a_group_of_one() -> None:
    result = _load().main(["--epochs", "1", "--steps", "2"])
    assert result["steps"] == 2 and result["world_size"] == 1
    assert 0.0 < result["epsilon"] < math.inf
    assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_two_ranks_under_torchrun_train_the_same_model_as_one_process() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(EXAMPLE)]
    options = ["--epochs", "1", "--steps", "4"]
    done = subprocess.run(command + options, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = re.search(r"2 rank\(s\), 4 steps .*: (test accuracy .*)", done.stdout)
    assert summary is not None, done.stdout
    single = subprocess.run(
        [sys.executable, str(EXAMPLE), *options], capture_output=True, text=True, timeout=240
    )
    assert single.returncode == 0, single.stderr[-3000:]
    # Same batches, same noise (rank 0 draws it from the same seed): the same printed result.
    assert summary.group(1) in single.stdout


def test_the_docs_example_runs_on_two_ranks(two_ranks: list[dict]) -> None:
    epsilons = [result["doc_epsilon"] for result in two_ranks]
    assert epsilons[0] == epsilons[1]
    assert 0.0 < epsilons[0] < math.inf
