"""Augmentation multiplicity: several batch rows that belong to one example.

With ``K`` augmentations per example (De et al. 2022, arXiv 2204.13650, section 3.2) the batch
holds ``B * K`` rows, rows ``i*K .. i*K + K - 1`` being views of example ``i``. The example's
gradient is the mean of its rows' gradients, and THAT is what gets clipped, so each example
still moves the clipped sum by at most the clipping norm: the sensitivity, and hence the
accounting, is the same as with one row per example.

Grouping is exact and cheap on every term kind: an outer-product term's ``K`` rows become
``K * T`` positions of one example (the position sum is the row sum), instantiated
per-example gradients are averaged over their ``K`` rows (a recomputed term is formed again for
that).
"""

from __future__ import annotations

from torch import Tensor

from dptorch.errors import DPValueError
from dptorch.per_sample.terms import DenseTerm, GradTerm, IndexRows, OuterTerm, RecomputedTerm


def check_group_size(rows: int, multiplicity: int) -> int:
    """The number of examples in a batch of ``rows`` rows, or a clear error."""
    if rows % multiplicity:
        raise DPValueError(
            f"The batch has {rows} rows, which is not a multiple of "
            f"augmentation_multiplicity={multiplicity}. Each example must contribute exactly "
            f"{multiplicity} consecutive rows (its augmentations); build batches with "
            "dptorch.data.AugmentationMultiplicity or repeat each example that many times."
        )
    return rows // multiplicity


def group_rows(term: GradTerm, multiplicity: int) -> GradTerm:
    """``term`` over ``B * K`` rows as a term over ``B`` examples, each the mean of its rows."""
    if multiplicity == 1:
        return term
    examples = term.batch_size // multiplicity
    if isinstance(term, RecomputedTerm) and term.rows_per_norm == multiplicity:
        return _grouped_recomputed(term, examples, multiplicity)
    if isinstance(term, RecomputedTerm):
        # Its norms are of single rows; the mean over each example's rows needs the
        # per-row gradients themselves.
        term = DenseTerm(term.param, term.instantiate())
    if isinstance(term, DenseTerm):
        shape = term.grad_sample.shape[1:]
        grads = term.grad_sample.reshape(examples, multiplicity, *shape).mean(dim=1)
        return DenseTerm(term.param, grads)
    positions = term.cols.shape[2]
    cols = _fold(term.cols, examples, multiplicity) / multiplicity  # [B, g, K*T, C]
    if isinstance(term.rows, IndexRows):
        index = term.rows.index.reshape(examples, multiplicity * positions)
        return OuterTerm(term.param, IndexRows(index, term.rows.size, term.rows.ignore), cols)
    return OuterTerm(term.param, _fold(term.rows, examples, multiplicity), cols)


def _grouped_recomputed(term: RecomputedTerm, examples: int, multiplicity: int) -> RecomputedTerm:
    """A recomputed term whose norms are already of example means, over examples: example
    ``i``'s factor ``c_i`` weights each of its rows by ``c_i / K`` in the row contraction."""
    rows_form, rows_contract = term.form, term.contract

    def form() -> Tensor:
        grads = rows_form()
        return grads.reshape(examples, multiplicity, *grads.shape[1:]).mean(dim=1)

    def contract(factors: Tensor, sanitize: bool) -> Tensor:
        return rows_contract(factors.repeat_interleave(multiplicity) / multiplicity, sanitize)

    return RecomputedTerm(term.param, term.norms_sq, form, contract)


def _fold(factor: Tensor, examples: int, multiplicity: int) -> Tensor:
    """``[B*K, g, T, D]`` -> ``[B, g, K*T, D]``, example-major."""
    _, groups, positions, width = factor.shape
    return (
        factor.reshape(examples, multiplicity, groups, positions, width)
        .transpose(1, 2)
        .reshape(examples, groups, multiplicity * positions, width)
    )
