"""Accountants by name: ``create_accountant("rdp")``.

The table is private and changes only through :func:`register_accountant`, so importing a
module can never silently replace an accountant another part of the program relies on.
"""

from __future__ import annotations

from dptorch.accountants.base import Accountant
from dptorch.accountants.gdp import GaussianAccountant
from dptorch.accountants.prv import PRVAccountant
from dptorch.accountants.rdp import RDPAccountant
from dptorch.errors import DPTypeError, DPValueError

_ACCOUNTANTS: dict[str, type[Accountant]] = {}


def register_accountant(name: str, cls: type[Accountant], *, overwrite: bool = False) -> None:
    """Makes ``create_accountant(name)`` return a new ``cls()``.

    Args:
        name: the name to register, e.g. ``"prv"``.
        cls: a concrete :class:`Accountant` subclass constructible with no arguments.
        overwrite: allow replacing an accountant already registered under ``name``.

    Raises:
        DPValueError: ``name`` is taken and ``overwrite`` is False, or ``name`` is empty.
        DPTypeError: ``name`` is not a str or ``cls`` is not an Accountant subclass.
    """
    if not isinstance(name, str):
        raise DPTypeError(f"name={name!r} has type {type(name).__name__}; pass a str.")
    if not name:
        raise DPValueError("name='' is empty; register the accountant under a non-empty name.")
    if not (isinstance(cls, type) and issubclass(cls, Accountant)):
        raise DPTypeError(
            f"cls={cls!r} is not a subclass of dptorch.accountants.Accountant; subclass it "
            "and implement mechanism() and get_epsilon()."
        )
    if name in _ACCOUNTANTS and not overwrite:
        raise DPValueError(
            f"name={name!r} is already registered to {_ACCOUNTANTS[name].__name__}; pick "
            "another name or pass overwrite=True to replace it."
        )
    _ACCOUNTANTS[name] = cls


def create_accountant(name: str) -> Accountant:
    """Returns a new, empty accountant of the kind registered as ``name``.

    Raises:
        DPValueError: no accountant is registered under ``name``.
    """
    try:
        cls = _ACCOUNTANTS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in sorted(_ACCOUNTANTS))
        raise DPValueError(
            f"name={name!r} is not a known accountant; choose one of {known}, or add yours "
            "with register_accountant()."
        ) from None
    return cls()


register_accountant(RDPAccountant.mechanism(), RDPAccountant)
register_accountant(GaussianAccountant.mechanism(), GaussianAccountant)
register_accountant(PRVAccountant.mechanism(), PRVAccountant)
