"""The loader of dptorch's optional compiled parts: a missing one is logged, never raised."""

from __future__ import annotations

import logging

import pytest

from dptorch._extensions import load_optional_extension


def test_a_missing_extension_gives_none_and_says_what_runs_instead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="dptorch._extensions"):
        loaded = load_optional_extension("_not_built_here", "compiled test part", "the fallback")
    assert loaded is None
    message = caplog.records[-1].getMessage()
    assert "compiled test part is unavailable" in message
    assert "using the fallback" in message


def test_a_built_extension_is_returned() -> None:
    kernel = load_optional_extension("_gaussian_kernel", "compiled Gaussian kernel", "torch")
    assert kernel is not None, "the kernel did not build; reinstall with a C compiler"
    assert hasattr(kernel, "fill")
