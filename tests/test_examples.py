"""Smoke tests: every example runs end to end with a few steps and reports sane numbers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _load(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:  # as when run as a script: siblings are importable
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_text_classification_transformer_runs() -> None:
    result = _load("text_classification_transformer").main(["--epochs", "1", "--steps", "3"])
    assert result["steps"] == 3
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert 0.0 < result["epsilon"] < math.inf


def test_lora_gpt2_runs() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = _load("lora_gpt2").main(["--epochs", "1", "--steps", "3"])
    assert result["steps"] == 3
    assert math.isfinite(result["test_loss_before"]) and math.isfinite(result["test_loss_after"])
    assert 0.0 < result["epsilon"] < math.inf


def test_text_classification_lstm_runs() -> None:
    result = _load("text_classification_lstm").main(["--epochs", "1", "--steps", "3"])
    assert result["steps"] == 3
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert 0.0 < result["epsilon"] < math.inf
