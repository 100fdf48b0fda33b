"""Row Grams shared between the parameters of one step.

Layers that share an output gradient also share the row factor of their ghost norms: the
input projection and the recurrent weight of a ``DPLSTM`` both have the gate gradient
``[B, T, 4H]`` as rows, and ``<g_t, g_s>`` over all step pairs, ``B T^2 4H`` multiply-adds,
is the largest part of their norms. Layers that read the same input share the other factor's
Gram the same way (the ``q``, ``k`` and ``v`` projections of a self-attention layer).
:class:`RowGrams` computes each such Gram once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor

_Key = tuple[int, tuple[int, ...], tuple[int, ...], str, str]


class RowGrams:
    """The Grams ``rows @ rows^T`` computed in one step, keyed by the memory of ``rows``.

    Two views with the same storage offset, shape and strides are the same factor. The
    entry keeps its ``rows`` alive, so its memory cannot be reused by another tensor while
    the cache exists, and an in-place change of the rows since (a new version) is a miss.
    Make one per step: nothing is ever evicted.

    Args:
        factors: every factor of the step's terms, if known: then only the Grams of factors
            that occur more than once are kept (a Gram used once is freed after its use
            instead of being held until the last norm of the step is taken). ``None`` keeps
            every Gram.
    """

    def __init__(self, factors: Iterable[Tensor] | None = None) -> None:
        self._grams: dict[_Key, tuple[Tensor, int, Tensor]] = {}
        self._shared: set[_Key] | None = None
        if factors is not None:
            seen: set[_Key] = set()
            self._shared = set()
            for factor in factors:
                key = _key(factor)
                (self._shared if key in seen else seen).add(key)

    def __len__(self) -> int:
        """How many Grams it holds."""
        return len(self._grams)

    def self_gram(self, rows: Tensor, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, or its result from an earlier call on the same rows."""
        key = _key(rows)
        if self._shared is not None and key not in self._shared:
            return compute()
        hit = self._grams.get(key)
        if hit is not None and hit[1] == rows._version:
            return hit[2]
        gram = compute()
        self._grams[key] = (rows, rows._version, gram)
        return gram


def _key(factor: Tensor) -> _Key:
    return (
        factor.data_ptr(),
        tuple(factor.shape),
        tuple(factor.stride()),
        str(factor.dtype),
        str(factor.device),
    )
