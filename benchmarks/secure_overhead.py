"""Secure mode's extra step time: ordinary and secure DP steps timed alternately, one process.

Run: ``.venv/bin/python benchmarks/secure_overhead.py`` (``--models mlp,cnn`` for a subset,
``--blocks N``). Writes ``benchmarks/results/secure_overhead.json`` and ``.md``.

This is ``interleaved.py`` (see its docstring for the method) with two modes: the ordinary
DP step (``dptorch-auto``, the reference) and the same model made private with
``PrivacyEngine(secure_mode=True)`` (``dptorch-secure``); both use ``norm_route="auto"``.
The reported overhead is the median over blocks of ``secure block / the ordinary block just
before it``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleaved

if __name__ == "__main__":
    interleaved.main(
        default_modes=("dptorch-auto", "dptorch-secure"),
        stem="secure_overhead",
        title="Secure-mode overhead",
    )
