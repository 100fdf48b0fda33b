"""Loading dptorch's optional compiled parts (built by setup.py where a C compiler exists).

Each extension has a torch fallback that computes the same thing, so a missing one is logged,
not raised: the install without a compiler still works, only slower.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

_logger = logging.getLogger(__name__)


def load_optional_extension(name: str, what: str, fallback: str) -> ModuleType | None:
    """``dptorch.<name>`` if it was built and loads, else ``None`` (logged at INFO).

    Args:
        name: the extension's module name inside the package (``"_gaussian_kernel"``).
        what: what it is, for the log line (``"compiled Gaussian kernel"``).
        fallback: what runs instead, for the log line (``"torch's sampler"``).
    """
    try:
        return importlib.import_module(f"dptorch.{name}")
    except ImportError as error:  # built without a compiler, or an unsupported platform
        _logger.info("dptorch's %s is unavailable (%s); using %s", what, error, fallback)
        return None
