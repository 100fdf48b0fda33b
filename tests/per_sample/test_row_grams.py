"""RowGrams: a row Gram shared by terms with the same rows, and only by those."""

from __future__ import annotations

import torch

from dptorch.per_sample.row_grams import RowGrams


def _counting(grams: RowGrams, rows: torch.Tensor, calls: list[int]) -> torch.Tensor:
    def compute() -> torch.Tensor:
        calls.append(1)
        return rows @ rows.transpose(-1, -2)

    return grams.self_gram(rows, compute)


def test_views_of_the_same_rows_share_one_gram() -> None:
    grads = torch.randn(3, 5, 8)
    grams, calls = RowGrams(), []
    first = _counting(grams, grads.reshape(3, 1, 5, 8), calls)
    second = _counting(grams, grads.reshape(3, 1, 5, 8), calls)  # another view object
    assert len(calls) == 1 and second is first


def test_other_rows_and_changed_rows_are_computed_again() -> None:
    grads = torch.randn(3, 5, 8)
    grams, calls = RowGrams(), []
    _counting(grams, grads.reshape(3, 1, 5, 8), calls)
    _counting(grams, grads[:, :4].reshape(3, 1, 4, 8), calls)  # same start, other shape
    _counting(grams, grads.clone().reshape(3, 1, 5, 8), calls)  # equal values, other memory
    grads.mul_(2.0)  # in place: a new version of the same memory
    changed = _counting(grams, grads.reshape(3, 1, 5, 8), calls)
    assert len(calls) == 4
    rows = grads.reshape(3, 1, 5, 8)
    torch.testing.assert_close(changed, rows @ rows.transpose(-1, -2))


def test_terms_that_read_the_same_input_share_its_gram() -> None:
    """q, k, v projections of one input: one input Gram, three output-gradient Grams, and
    the same norms as without sharing."""
    from torch import nn

    from dptorch.per_sample.terms import OuterTerm

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, 1, 6, 8, generator=generator)
    terms = [
        OuterTerm(
            nn.Parameter(torch.zeros(5, 8)), torch.randn(4, 1, 6, 5, generator=generator), inputs
        )
        for _ in range(3)
    ]
    grams = RowGrams()
    shared = [term.inner(term, grams) for term in terms]
    assert len(grams) == 4
    for term, norm_sq in zip(terms, shared, strict=True):
        torch.testing.assert_close(norm_sq, term.inner(term))


def test_a_gram_used_once_is_not_kept() -> None:
    """Given the step's factors, only those occurring twice are cached: a Gram used by one
    term is freed after its use rather than held until the step's last norm."""
    shared, alone = torch.randn(3, 1, 5, 8), torch.randn(3, 1, 5, 8)
    grams, calls = RowGrams([shared, shared, alone]), []
    first = _counting(grams, shared, calls)
    assert _counting(grams, shared, calls) is first
    _counting(grams, alone, calls)
    assert len(calls) == 2 and len(grams) == 1
