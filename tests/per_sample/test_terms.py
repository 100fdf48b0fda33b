"""Accumulating a term's weighted sum into a release buffer equals forming it and adding it.

``add_weighted_sum_`` writes ``out + alpha * sum_i c_i g_i`` inside the contraction (the
optimizer passes views of its noise buffer); every kind of term is checked against its own
``weighted_sum`` and against per-example gradients summed one example at a time.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dptorch.per_sample.terms import DenseTerm, GradTerm, IndexRows, OuterTerm

B, T = 5, 3
ALPHA = 0.37


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _outer(
    rows: int,
    cols: int,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    positions: int = T,
    batch: int = B,
) -> OuterTerm:
    g = _generator()
    param = nn.Parameter(torch.zeros(groups * rows, cols, dtype=dtype))
    return OuterTerm(
        param,
        torch.randn(batch, groups, positions, rows, generator=g).to(dtype),
        torch.randn(batch, groups, positions, cols, generator=g).to(dtype),
    )


def _index_term(vocab: int = 7, dim: int = 4) -> OuterTerm:
    g = _generator()
    index = torch.randint(vocab, (B, T), generator=g)
    index[0, 1] = 2  # padding position: contributes nothing
    param = nn.Parameter(torch.zeros(vocab, dim))
    return OuterTerm(
        param, IndexRows(index, vocab, ignore=2), torch.randn(B, 1, T, dim, generator=g)
    )


def _dense() -> DenseTerm:
    return DenseTerm(nn.Parameter(torch.zeros(3, 4)), torch.randn(B, 3, 4, generator=_generator()))


def _instantiated() -> OuterTerm:
    term = _outer(4, 6)
    term.norm_sq("instantiate")  # keeps [B, R, C] for the weighted sum
    assert term._instantiated is not None
    return term


TERMS = {
    "dense": _dense,
    "outer, narrow rows": lambda: _outer(2, 6),
    "outer, narrow cols": lambda: _outer(6, 2),
    "outer, 2 groups": lambda: _outer(3, 4, groups=2),
    # One position ([B, in] Linear calls): a single addmm, the factors on the narrower side.
    "outer, one position, narrow rows": lambda: _outer(2, 6, positions=1),
    "outer, one position, narrow cols": lambda: _outer(6, 2, positions=1),
    "outer, index rows": _index_term,
    "outer, instantiated": _instantiated,
}


def _one_at_a_time(term: GradTerm, factors: Tensor) -> Tensor:
    """The oracle: each example's gradient built on its own, scaled and summed."""
    if isinstance(term, DenseTerm):
        return sum(factors[i] * term.grad_sample[i] for i in range(B))
    total = torch.zeros_like(term.param, dtype=torch.float64)
    for i in range(B):
        for t in range(term.cols.shape[2]):
            cols = term.cols[i, :, t].double()  # [g, C]
            if isinstance(term.rows, IndexRows):
                if term.rows.index[i, t] == term.rows.ignore:
                    continue
                total[term.rows.index[i, t]] += factors[i] * cols[0]
            else:
                rows = term.rows[i, :, t].double()  # [g, R]
                outer = torch.einsum("gr,gc->grc", rows, cols)
                total += factors[i] * outer.reshape(term.param.shape)
    return total.to(term.param.dtype)


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_accumulated_sum_equals_added_sum_and_oracle(kind: str) -> None:
    term = TERMS[kind]()
    factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
    start = torch.randn(term.param.shape, generator=torch.Generator().manual_seed(2))
    out = start.clone()
    term.add_weighted_sum_(out, factors, ALPHA)
    expected = start + ALPHA * term.weighted_sum(factors)
    torch.testing.assert_close(out, expected)
    oracle = start + ALPHA * _one_at_a_time(term, factors)
    torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_nonfinite_example_with_factor_zero_adds_nothing(kind: str) -> None:
    """Sanitised: an example dropped for a NaN gradient leaves the buffer finite."""
    term = TERMS[kind]()
    poisoned = term.grad_sample if isinstance(term, DenseTerm) else term.cols
    poisoned[0] = float("nan")
    if isinstance(term, OuterTerm) and term._instantiated is not None:
        term._instantiated[0] = float("nan")
    factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
    factors[0] = 0.0
    out = torch.zeros(term.param.shape)
    term.add_weighted_sum_(out, factors, ALPHA, sanitize=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ALPHA * term.weighted_sum(factors, sanitize=True))


def test_one_position_sum_equals_the_batched_contraction() -> None:
    """The single-matrix path (addmm) and the batched one (baddbmm) give the same sum."""
    for rows, cols in [(2, 6), (6, 2), (4, 4)]:
        term = _outer(rows, cols, positions=1)
        assert term._is_one_dense_matrix()
        factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
        start = torch.randn(term.param.shape, generator=torch.Generator().manual_seed(2))
        fast, batched = start.clone(), start.clone()
        term.add_weighted_sum_(fast, factors, ALPHA)
        # Two positions, the second all zeros: the same gradient through the batched path.
        padded = OuterTerm(
            term.param,
            torch.cat([term.rows, torch.zeros_like(term.rows)], dim=2),
            torch.cat([term.cols, torch.zeros_like(term.cols)], dim=2),
        )
        assert not padded._is_one_dense_matrix()
        padded.add_weighted_sum_(batched, factors, ALPHA)
        torch.testing.assert_close(fast, batched)


def test_one_position_sum_of_an_empty_batch_leaves_the_buffer() -> None:
    term = _outer(3, 4, positions=1, batch=0)
    out = torch.ones(term.param.shape)
    term.add_weighted_sum_(out, torch.zeros(0), ALPHA)
    torch.testing.assert_close(out, torch.ones(term.param.shape))


def test_half_precision_terms_add_into_a_float32_buffer() -> None:
    """Mixed precision: the sum is formed in the terms' dtype and added, as before fusion."""
    term = _outer(3, 4, dtype=torch.bfloat16)
    factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
    out = torch.ones(term.param.shape, dtype=torch.float32)
    term.add_weighted_sum_(out, factors, ALPHA)
    expected = 1 + ALPHA * term.weighted_sum(factors).float()
    torch.testing.assert_close(out, expected)


def test_non_contiguous_buffer_is_added_to() -> None:
    term = _outer(3, 4)
    factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
    storage = torch.zeros(4, 3)
    out = storage.t()  # [3, 4], not contiguous
    term.add_weighted_sum_(out, factors, ALPHA)
    torch.testing.assert_close(storage.t(), ALPHA * term.weighted_sum(factors))


def test_clip_plan_accumulates_what_clipped_sum_returns() -> None:
    """The engine's two ways to the clipped sum agree, parameter by parameter."""
    from dptorch.clipping import FlatClipping
    from dptorch.per_sample import PerSampleEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 3))
    engine = PerSampleEngine(model, list(model.parameters()))
    engine.attach()
    tokens = torch.randint(11, (B, 3))
    model(tokens).square().sum().backward()
    plan = engine.clip(FlatClipping(0.5))
    sums = plan.sums()
    for param in model.parameters():
        out = torch.full_like(param, 2.0)
        plan.add_sum_(param, out, alpha=ALPHA)
        torch.testing.assert_close(out, 2.0 + ALPHA * sums[param])
    engine.detach()


def _conv_inputs(wide: bool = False) -> tuple[nn.Conv2d, Tensor, Tensor]:
    """A small layer, or (``wide``) one whose weight dwarfs an example's input and output
    gradient, so its norms are formed one example at a time."""
    g = _generator()
    if wide:
        conv = nn.Conv2d(8, 16, 3)
        return conv, torch.randn(B, 8, 3, 3, generator=g), torch.randn(B, 16, 1, 1, generator=g)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    return conv, torch.randn(B, 3, 7, 7, generator=g), torch.randn(B, 4, 4, 4, generator=g)


@pytest.mark.parametrize("wide", [False, True])
def test_recomputed_conv_term_equals_the_instantiated_one(wide: bool) -> None:
    """Norms kept, gradients freed, the weighted sum recomputed by one batched kernel."""
    from dptorch.per_sample.rules.conv import _recomputed_weight_term, per_sample_conv_weight_grads

    conv, x, grad = _conv_inputs(wide)
    grads = per_sample_conv_weight_grads(x, grad, conv)
    dense = DenseTerm(conv.weight, grads)
    term = _recomputed_weight_term(conv, x, grad)
    factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(term.norm_sq(), dense.norm_sq())
    torch.testing.assert_close(term.weighted_sum(factors), _one_at_a_time(dense, factors))
    torch.testing.assert_close(term.instantiate(), grads)
    out = torch.ones_like(conv.weight)
    term.add_weighted_sum_(out, factors, ALPHA)
    torch.testing.assert_close(out, 1 + ALPHA * dense.weighted_sum(factors))


def test_recomputed_conv_term_drops_a_nonfinite_example() -> None:
    from dptorch.per_sample.rules.conv import _recomputed_weight_term, per_sample_conv_weight_grads

    conv, x, grad = _conv_inputs()
    grads = per_sample_conv_weight_grads(x, grad, conv)
    x[0, 0, 0, 0], grad[0, 1, 1, 1] = float("nan"), float("inf")
    term = _recomputed_weight_term(conv, x, grad)
    assert not torch.isfinite(term.norm_sq()[0]) and torch.isfinite(term.norm_sq()[1:]).all()
    factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
    factors[0] = 0.0
    out = torch.zeros_like(conv.weight)
    term.add_weighted_sum_(out, factors, ALPHA, sanitize=True)
    expected = ALPHA * DenseTerm(conv.weight, grads[1:]).weighted_sum(factors[1:])
    torch.testing.assert_close(out, expected)
    assert not torch.isfinite(term.weighted_sum(factors)).all()  # unsanitised: poisoned


@pytest.mark.parametrize("sanitize", [False, True])
def test_index_rows_add_into_a_float64_buffer_row_by_row(sanitize: bool) -> None:
    """Secure mode's float64 release: an embedding's rows are index-added into the buffer
    (converted), not summed densely in float32 and added; same values, to float32 rounding."""
    term = _index_term()
    if sanitize:
        term.cols[1] = float("nan")
    factors = torch.rand(B, generator=torch.Generator().manual_seed(1))
    if sanitize:
        factors[1] = 0.0
    start = torch.randn(term.param.shape, generator=torch.Generator().manual_seed(2))
    out = start.double()
    term.add_weighted_sum_(out, factors, ALPHA, sanitize=sanitize)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    expected = start.double() + ALPHA * term.weighted_sum(factors, sanitize=sanitize).double()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if not sanitize:
        oracle = start.double() + ALPHA * _one_at_a_time(term, factors).double()
        torch.testing.assert_close(out, oracle, rtol=1e-6, atol=1e-6)
