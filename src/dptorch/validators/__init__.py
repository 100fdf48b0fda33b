"""Module validation (Opacus import path: ``dptorch.validators.ModuleValidator``)."""

from __future__ import annotations

from dptorch.validators.module_validator import ModuleValidator
from dptorch.validators.problems import ModuleProblem, find_problems

__all__ = ["ModuleProblem", "ModuleValidator", "find_problems"]
