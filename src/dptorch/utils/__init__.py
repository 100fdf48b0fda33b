"""Opacus-compatible import paths only; new code lives in modules named after its concept."""

from __future__ import annotations
