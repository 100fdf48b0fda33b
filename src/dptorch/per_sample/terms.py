"""Per-sample gradient terms: what one layer call contributes to one parameter's gradient.

A term describes, for a batch of ``B`` examples, the per-example gradient of one parameter
without necessarily materialising it. Two shapes of term exist:

* :class:`DenseTerm` holds the instantiated per-example gradients ``[B, *param.shape]``; used
  where they are small (biases, normalisation weights) or for the ``torch.func`` fallback.
* :class:`OuterTerm` holds the two factors whose outer product, summed over positions, is the
  gradient: ``g_i = sum_t rows[i, t] (x) cols[i, t]`` (Linear: output gradient x input; Conv:
  the same on unfolded patches; Embedding: one-hot token x output gradient). From the factors
  it can give the per-example squared norm either by the *ghost norm*
  ``sum_{t,s} <rows_t, rows_s> <cols_t, cols_s>`` (Goodfellow 2015; Li et al. 2021,
  arXiv 2110.05679) or by instantiating ``g_i``, and the weighted sum ``sum_i c_i g_i`` in one
  contraction (Bu et al. 2022, arXiv 2210.00038).

Terms are linear in the gradient, so several terms of one parameter (a tied weight, a layer
called twice) add up; their cross inner products give the norm of the sum exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dptorch.per_sample.row_grams import RowGrams

NormRoute = Literal["auto", "ghost", "instantiate"]


def scale_samples(tensor: Tensor, factors: Tensor, sanitize: bool) -> Tensor:
    """Multiply each example's slice of ``tensor`` (batch dimension 0) by ``factors[i]``.

    With ``sanitize`` the slices of examples whose factor is 0 become exactly 0, even where
    they hold NaN or inf (``0 * nan`` is ``nan``), so a non-finite example cannot poison a sum.
    """
    shaped = factors.reshape((-1,) + (1,) * (tensor.dim() - 1)).to(tensor.dtype)
    scaled = tensor * shaped
    if sanitize:
        scaled = torch.where(shaped != 0, scaled, torch.zeros((), dtype=scaled.dtype))
    return scaled


def rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b, dim=-1)`` for two different tensors (for ``a`` with itself use
    :func:`rowwise_sq_norm`, which is faster).

    ``torch.linalg.vecdot`` (it conjugates ``a``, a no-op for the real tensors used here) where
    the CPU supports the dtype; the plain product-and-sum for half precision on the CPU. On the
    CPU both write the ``a * b`` product before summing.
    """
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return (a * b).sum(dim=-1)
    return torch.linalg.vecdot(a, b)


def rowwise_sq_norm(a: Tensor) -> Tensor:
    """``sum(a * a, dim=-1)``: each row's squared Euclidean norm.

    ``vector_norm`` is one fused reduction; ``vecdot`` and ``(a * a).sum`` first write the
    full product (measured on the CPU for ``[256, 8192]``: 0.15 ms against 0.53 ms, and 16x
    apart for ``[256, 401408]``, where the product no longer fits in cache). Squaring the
    root costs about one rounding (relative error ~1e-7 in float32). Half precision keeps
    the product-and-sum: its norm would be accumulated and returned in half.
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        return rowwise_dot(a, a)
    return torch.linalg.vector_norm(a, dim=-1).square()


@dataclass(eq=False)
class DenseTerm:
    """Instantiated per-example gradients ``grad_sample[i]`` of ``param``: ``[B, *param.shape]``."""

    param: Tensor
    grad_sample: Tensor
    # ``rowwise_sq_norm`` of ``grad_sample``, when the rule already had it (a Linear's bias
    # gradient is its output gradient, whose row norms the weight's norm needs too).
    known_norm_sq: Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.grad_sample.shape[0]

    def instantiate(self) -> Tensor:
        return self.grad_sample

    def norm_sq(self, route: NormRoute = "auto", grams: RowGrams | None = None) -> Tensor:
        if self.known_norm_sq is not None:
            return self.known_norm_sq
        flat = self.grad_sample.reshape(self.batch_size, self.param.numel())  # 0-dim params too
        return rowwise_sq_norm(flat)

    def weighted_sum(self, factors: Tensor, sanitize: bool = False) -> Tensor:
        if sanitize:
            return scale_samples(self.grad_sample, factors, sanitize).sum(dim=0)
        # One matrix-vector product: no scaled [B, *shape] copy.
        flat = factors.to(self.grad_sample.dtype) @ self.grad_sample.reshape(
            self.batch_size, self.param.numel()
        )
        return flat.view(self.param.shape)

    def add_weighted_sum_(
        self, out: Tensor, factors: Tensor, alpha: float, sanitize: bool = False
    ) -> None:
        """``out += alpha * sum_i c_i g_i``, written by the product itself (no sum tensor)."""
        grads = self.grad_sample.reshape(self.batch_size, self.param.numel())
        if sanitize or not _writes_into(out, grads):
            out.add_(self.weighted_sum(factors, sanitize), alpha=alpha)
            return
        vector = out if out.dim() == 1 else out.view(-1)
        vector.addmv_(grads.t(), factors.to(grads.dtype), alpha=alpha)


@dataclass(eq=False)
class IndexRows:
    """One-hot row factors given by indices: ``rows[i, t] = e_{index[i, t]}`` in ``R^size``.

    Positions whose index is ``ignore`` (an Embedding's ``padding_idx``) contribute nothing.
    """

    index: Tensor  # [B, T] int64
    size: int
    ignore: int | None = None

    def valid(self) -> Tensor:
        """``[B, T]`` float mask of the positions that carry gradient."""
        if self.ignore is None:
            return torch.ones(self.index.shape, dtype=torch.bool, device=self.index.device)
        return self.index != self.ignore


RowFactor = Tensor | IndexRows


def _row_gram(a: RowFactor, b: RowFactor, dtype: torch.dtype) -> Tensor:
    """``[B, g, Ta, Tb]`` inner products between row factors (dense ``[B, g, T, R]``)."""
    if isinstance(a, IndexRows) and isinstance(b, IndexRows):
        same = a.index.unsqueeze(2) == b.index.unsqueeze(1)  # [B, Ta, Tb]
        same = same & a.valid().unsqueeze(2) & b.valid().unsqueeze(1)
        return same.to(dtype).unsqueeze(1)
    if isinstance(a, IndexRows):
        return _row_gram(b, a, dtype).transpose(2, 3)
    if isinstance(b, IndexRows):
        # <rows_a[t], e_{idx_b[s]}> = rows_a[t, idx_b[s]]  -> gather along R.
        batch, groups, ta, _ = a.shape
        tb = b.index.shape[1]
        idx = b.index.clamp(min=0).reshape(batch, 1, 1, tb).expand(batch, groups, ta, tb)
        picked = torch.gather(a, 3, idx)  # [B, g, Ta, Tb]
        return picked * b.valid().reshape(batch, 1, 1, tb).to(dtype)
    return torch.matmul(a, b.transpose(2, 3))


@dataclass(eq=False)
class OuterTerm:
    """Per-example gradient ``g_i = sum_t rows[i, :, t] (x) cols[i, :, t]`` of ``param``.

    Shapes: ``rows`` is ``[B, g, T, R]`` (or :class:`IndexRows` with ``g = 1``), ``cols`` is
    ``[B, g, T, C]``; ``g`` counts convolution groups, and the ``[g, R, C]`` gradient is viewed
    as ``param.shape``.
    """

    param: Tensor
    rows: RowFactor
    cols: Tensor
    # The ghost norm ``inner(self)``, when the rule already had it (one position: the product
    # of the factors' row norms, taken while they were in cache during the backward pass).
    known_norm_sq: Tensor | None = field(default=None, repr=False)
    # Per-example gradients kept from an instantiated norm, so the weighted sum costs
    # B*R*C instead of B*T*R*C.
    _instantiated: Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.cols.shape[0]

    @property
    def positions(self) -> int:
        return self.cols.shape[2]

    @property
    def row_size(self) -> int:
        return self.rows.size if isinstance(self.rows, IndexRows) else self.rows.shape[3]

    def ghost_cost(self) -> float:
        """Multiply-adds of the ghost norm: ``B g T^2 (R + C)``."""
        b, g, t, c = self.cols.shape
        return float(b * g * t * t * (self.row_size + c))

    def instantiate_cost(self) -> float:
        """Multiply-adds of instantiating ``g_i``: ``B g T R C`` (sparse rows: ``B T C``)."""
        b, g, t, c = self.cols.shape
        if isinstance(self.rows, IndexRows):
            return float(b * t * c)
        return float(b * g * t * self.row_size * c)

    def cheaper_route(self) -> Literal["ghost", "instantiate"]:
        return "ghost" if self.ghost_cost() < self.instantiate_cost() else "instantiate"

    def instantiate(self) -> Tensor:
        """``[B, *param.shape]``; for index rows this is dense ``[B, R, C]`` (memory heavy)."""
        if isinstance(self.rows, IndexRows):
            b, _, t, c = self.cols.shape
            cols = self.cols[:, 0] * self.rows.valid().unsqueeze(-1).to(self.cols.dtype)
            out = torch.zeros(b, self.rows.size, c, dtype=self.cols.dtype, device=cols.device)
            out.scatter_add_(1, self.rows.index.clamp(min=0).unsqueeze(-1).expand(b, t, c), cols)
            return out.view(b, *self.param.shape)
        grads = torch.matmul(self.rows.transpose(2, 3), self.cols)  # [B, g, R, C]
        return grads.reshape(self.batch_size, *self.param.shape)

    def norm_sq(self, route: NormRoute = "auto", grams: RowGrams | None = None) -> Tensor:
        chosen = self.cheaper_route() if route == "auto" else route
        if chosen == "ghost":
            if self.known_norm_sq is not None:
                return self.known_norm_sq
            return self.inner(self, grams)
        if isinstance(self.rows, IndexRows):
            return self._sparse_rows_norm_sq()
        self._instantiated = self.instantiate()
        return rowwise_sq_norm(self._instantiated.flatten(1))

    def _sparse_rows_norm_sq(self) -> Tensor:
        # Segment-sum the output gradients of equal (example, index) pairs, then take norms:
        # ||sum_t e_{idx_t} G_t||^2 = sum_v ||sum_{t: idx_t = v} G_t||^2, at cost B*T*C.
        assert isinstance(self.rows, IndexRows)
        b, _, t, c = self.cols.shape
        valid = self.rows.valid().reshape(-1)
        keys = (
            torch.arange(b, device=valid.device).unsqueeze(1) * self.rows.size
            + self.rows.index.clamp(min=0)
        ).reshape(-1)[valid]
        cols = self.cols[:, 0].reshape(b * t, c)[valid]
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(unique.numel(), c, dtype=cols.dtype, device=cols.device)
        sums.index_add_(0, inverse, cols)
        out = torch.zeros(b, dtype=cols.dtype, device=cols.device)
        return out.index_add_(0, unique // self.rows.size, (sums * sums).sum(dim=1))

    def inner(self, other: OuterTerm, grams: RowGrams | None = None) -> Tensor:
        """Per-example ``<g_i, g'_i>`` by ghost inner products, never instantiating ``g_i``.

        ``grams`` shares a term's own row Gram with other terms of the step that have the
        same rows (see :mod:`dptorch.per_sample.row_grams`).
        """
        if self.positions == other.positions == 1 and not (
            isinstance(self.rows, IndexRows) or isinstance(other.rows, IndexRows)
        ):
            # One position ([B, d] inputs): <r r'> <c c'> per group, without B tiny matmuls.
            if other is self:
                rows_dot = rowwise_sq_norm(self.rows.flatten(2))  # [B, g]
                cols_dot = rowwise_sq_norm(self.cols.flatten(2))
            else:
                rows_dot = rowwise_dot(self.rows.flatten(2), other.rows.flatten(2))
                cols_dot = rowwise_dot(self.cols.flatten(2), other.cols.flatten(2))
            return (rows_dot * cols_dot).sum(dim=1)
        if grams is not None and other is self and isinstance(self.rows, Tensor):
            own = self.rows
            rows = grams.self_gram(own, lambda: _row_gram(own, own, self.cols.dtype))
        else:
            rows = _row_gram(self.rows, other.rows, self.cols.dtype)
        if grams is not None and other is self:
            # Layers that read the same input share its Gram too (an attention layer's q, k
            # and v projections): equal memory, shape and strides are the same tensor.
            inputs = self.cols
            cols = grams.self_gram(inputs, lambda: torch.matmul(inputs, inputs.transpose(2, 3)))
        else:
            cols = torch.matmul(self.cols, other.cols.transpose(2, 3))
        return (rows * cols).flatten(1).sum(dim=1)

    def weighted_sum(self, factors: Tensor, sanitize: bool = False) -> Tensor:
        if self._instantiated is not None:
            return DenseTerm(self.param, self._instantiated).weighted_sum(factors, sanitize)
        rows, cols = self._scaled_factors(factors, sanitize)
        if isinstance(rows, IndexRows):
            c = cols.shape[3]
            out = torch.zeros(rows.size, c, dtype=cols.dtype, device=cols.device)
            out.index_add_(0, rows.index.clamp(min=0).reshape(-1), _valid_cols(rows, cols))
            return out.view(self.param.shape)
        flat_rows, flat_cols = _contraction_operands(rows, cols)
        return torch.bmm(flat_rows, flat_cols).reshape(self.param.shape)

    def add_weighted_sum_(
        self, out: Tensor, factors: Tensor, alpha: float, sanitize: bool = False
    ) -> None:
        """``out += alpha * sum_i c_i g_i`` (``out`` shaped like ``param``), accumulated by
        the contraction itself: no sum tensor is allocated and no extra pass adds it."""
        if self._instantiated is not None:
            dense = DenseTerm(self.param, self._instantiated)
            dense.add_weighted_sum_(out, factors, alpha, sanitize)
            return
        if isinstance(self.rows, IndexRows) and _scatters_into(out, self.cols):
            # Index rows touch only the B*T rows their indices name: those are added into
            # ``out`` as they are, converted to its dtype if it differs (secure mode's float64
            # release), instead of forming a dense [vocab, C] sum and adding all of it.
            rows, cols = self._scaled_factors(factors, sanitize)
            assert isinstance(rows, IndexRows)
            flat = _valid_cols(rows, cols).to(out.dtype)
            index = rows.index.clamp(min=0).reshape(-1)
            out.view(rows.size, -1).index_add_(0, index, flat, alpha=alpha)
            return
        if sanitize or not _writes_into(out, self.cols):
            out.add_(self.weighted_sum(factors, sanitize), alpha=alpha)
            return
        if self._is_one_dense_matrix():
            self._add_one_position_sum_(out, factors, alpha)
            return
        rows, cols = self._scaled_factors(factors, sanitize=False)
        assert isinstance(rows, Tensor)  # index rows were added above
        flat_rows, flat_cols = _contraction_operands(rows, cols)
        out.view(flat_rows.shape[0], flat_rows.shape[1], -1).baddbmm_(
            flat_rows, flat_cols, alpha=alpha
        )

    def _is_one_dense_matrix(self) -> bool:
        """One position, one group, dense rows: the factors are ``[B, R]`` and ``[B, C]``
        matrices (a Linear called on ``[B, in]``)."""
        shape = self.cols.shape
        return shape[1] == 1 and shape[2] == 1 and isinstance(self.rows, Tensor)

    def _add_one_position_sum_(self, out: Tensor, factors: Tensor, alpha: float) -> None:
        """``out += alpha * G^T diag(c) A`` for ``[B, R]`` output gradients ``G`` and ``[B, C]``
        inputs ``A``: one ``addmm_`` into ``out``, the factors applied to the narrower matrix.

        The batched path (:func:`_contraction_operands`, ``baddbmm_``) gives the same sum;
        this one spares its permutes and reshapes, which on a small layer cost as much as
        the product (a few microseconds each, per parameter, per step).
        """
        scaled_rows, scaled_cols = self._scaled_factors(factors, sanitize=False)
        assert isinstance(scaled_rows, Tensor)
        b, _, _, c = scaled_cols.shape
        rows = scaled_rows.reshape(b, scaled_rows.shape[3])
        cols = scaled_cols.reshape(b, c)
        shape = (rows.shape[1], c)
        matrix = out if out.shape == shape else out.view(shape)  # a Linear's weight already is
        matrix.addmm_(rows.t(), cols, alpha=alpha)

    def _scaled_factors(self, factors: Tensor, sanitize: bool) -> tuple[RowFactor, Tensor]:
        """``rows`` and ``cols`` with each example's clipping factor applied to one of them."""
        rows = self.rows
        if not sanitize and isinstance(rows, Tensor) and rows.shape[3] < self.cols.shape[3]:
            # The factor can go into either side of the contraction; scaling the narrower
            # one copies less (a 1024 -> 256 Linear's rows are a quarter of its cols).
            return scale_samples(rows, factors, sanitize=False), self.cols
        cols = scale_samples(self.cols, factors, sanitize)
        if sanitize and not isinstance(rows, IndexRows):
            # The rows of a dropped example may hold NaN too, and NaN * 0 is NaN.
            rows = scale_samples(rows, (factors != 0).to(rows.dtype), sanitize=True)
        return rows, cols


@dataclass(eq=False)
class RecomputedTerm:
    """Per-example gradients whose squared norms were taken when formed, then freed.

    Where a layer's per-example gradients are much larger than its input and output gradient
    (a convolution with many channels and few output positions), keeping ``[B,
    *param.shape]`` from the backward pass to the release costs more memory than the
    activations it came from. This term keeps the norms and two ways to rebuild what the step
    needs later: ``form()`` forms the per-example gradients again (for a layer called twice,
    augmentation groups, the foreign-gradient check), ``contract(factors, sanitize)`` gives
    ``sum_i c_i g_i`` directly from the layer's input and output gradient (for a convolution,
    its ordinary batched weight gradient with each example's output gradient scaled by
    ``c_i``). Exact: the same clipped sum as the instantiated term, up to float rounding.

    With augmentation multiplicity the norms may already be those of each example's mean
    gradient over its ``rows_per_norm`` consecutive rows, taken in the backward pass; the term
    still counts rows (``batch_size``, ``form``, ``contract``) until
    :func:`~dptorch.per_sample.grouping.group_rows` turns it into a term over examples
    without forming anything.
    """

    param: Tensor
    norms_sq: Tensor
    form: Callable[[], Tensor] = field(repr=False)
    contract: Callable[[Tensor, bool], Tensor] = field(repr=False)
    rows_per_norm: int = 1

    @property
    def batch_size(self) -> int:
        return self.norms_sq.shape[0] * self.rows_per_norm

    def instantiate(self) -> Tensor:
        return self.form()

    def norm_sq(self, route: NormRoute = "auto", grams: RowGrams | None = None) -> Tensor:
        if self.rows_per_norm != 1:
            raise RuntimeError("a term over grouped rows must be grouped (group_rows) first")
        return self.norms_sq

    def weighted_sum(self, factors: Tensor, sanitize: bool = False) -> Tensor:
        return self.contract(factors, sanitize)

    def add_weighted_sum_(
        self, out: Tensor, factors: Tensor, alpha: float, sanitize: bool = False
    ) -> None:
        """``out += alpha * sum_i c_i g_i`` (the contraction makes a new tensor, then added)."""
        out.add_(self.contract(factors, sanitize), alpha=alpha)


GradTerm = DenseTerm | OuterTerm | RecomputedTerm


def _writes_into(out: Tensor, operand: Tensor) -> bool:
    """Whether a product of ``operand`` can accumulate into ``out`` in place: same dtype and
    device, and ``out`` one contiguous block (a view of a release buffer). Otherwise the sum
    is formed in the operand's dtype and added, as without fusion (mixed precision)."""
    return out.dtype == operand.dtype and out.device == operand.device and out.is_contiguous()


def _scatters_into(out: Tensor, operand: Tensor) -> bool:
    """Whether rows of ``operand`` can be index-added into ``out`` in place: same device and
    ``out`` one contiguous block; the dtype may differ (the few rows are converted)."""
    return out.device == operand.device and out.is_contiguous()


def _valid_cols(rows: IndexRows, cols: Tensor) -> Tensor:
    """``[B*T, C]`` output gradients of an index-rows term, zero at ignored positions."""
    b, _, t, c = cols.shape
    return (cols[:, 0] * rows.valid().unsqueeze(-1).to(cols.dtype)).reshape(b * t, c)


def _contraction_operands(rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``[g, R, B*T]`` and ``[g, B*T, C]``: one batched matmul per group contracts over
    examples and positions together."""
    b, g, t, c = cols.shape
    flat_rows = rows.permute(1, 3, 0, 2).reshape(g, rows.shape[3], b * t)
    return flat_rows, cols.permute(1, 0, 2, 3).reshape(g, b * t, c)


def merge_positions(terms: list[GradTerm]) -> list[GradTerm]:
    """Fuse outer-product terms of one parameter that differ only in their positions.

    ``sum_k sum_t rows^k_t (x) cols^k_t`` is one outer-product term over the concatenated
    positions, so the calls of a layer applied step by step (a recurrent cell, a layer reused
    T times) become one term: one ghost Gram or one instantiation and one weighted-sum
    contraction instead of ``T^2`` pairwise inner products or ``T`` contractions. Exact, so
    the clipped sum is unchanged.
    """
    if len(terms) < 2:
        return terms
    groups: dict[tuple[object, ...], list[OuterTerm]] = {}
    kept: list[GradTerm] = []
    for term in terms:
        key = _merge_key(term)
        if key is None:
            kept.append(term)
        else:
            groups.setdefault(key, []).append(term)  # type: ignore[arg-type]
    for group in groups.values():
        kept.append(group[0] if len(group) == 1 else _concat_positions(group))
    return kept


def _merge_key(term: GradTerm) -> tuple[object, ...] | None:
    if not isinstance(term, OuterTerm):
        return None
    b, g, _, c = term.cols.shape
    if isinstance(term.rows, IndexRows):
        return ("index", b, c, term.rows.size, term.rows.ignore, term.cols.dtype)
    return ("dense", b, g, term.row_size, c, term.cols.dtype, term.rows.dtype)


def _concat_positions(group: list[OuterTerm]) -> OuterTerm:
    first = group[0]
    cols = torch.cat([t.cols for t in group], dim=2)
    if isinstance(first.rows, IndexRows):
        indices = [t.rows.index for t in group if isinstance(t.rows, IndexRows)]
        index = torch.cat(indices, dim=1)  # [B, sum T]
        return OuterTerm(first.param, IndexRows(index, first.rows.size, first.rows.ignore), cols)
    dense = [t.rows for t in group if isinstance(t.rows, Tensor)]
    return OuterTerm(first.param, torch.cat(dense, dim=2), cols)


def combined_norm_sq(
    terms: list[GradTerm], route: NormRoute = "auto", grams: RowGrams | None = None
) -> Tensor:
    """Per-example squared norm of the SUM of several terms of one parameter."""
    if len(terms) == 1:
        return terms[0].norm_sq(route, grams)
    outer = [t for t in terms if isinstance(t, OuterTerm)]
    all_outer = len(outer) == len(terms) and len({t.cols.shape[1] for t in outer}) == 1
    any_index = any(isinstance(t.rows, IndexRows) for t in outer)
    if all_outer and (route == "ghost" or any_index or (route == "auto" and _ghost_wins(outer))):
        # ||sum_k g^k||^2 = sum_k ||g^k||^2 + 2 sum_{k<l} <g^k, g^l>
        total = outer[0].inner(outer[0], grams)
        for i, a in enumerate(outer):
            if i > 0:
                total = total + a.inner(a, grams)
            for b in outer[i + 1 :]:
                total = total + 2 * a.inner(b)
        return total
    summed = terms[0].instantiate()
    for term in terms[1:]:
        summed = summed + term.instantiate()
    return rowwise_sq_norm(summed.reshape(summed.shape[0], terms[0].param.numel()))


def _ghost_wins(terms: list[OuterTerm]) -> bool:
    b, g, _, c = terms[0].cols.shape
    positions = sum(t.positions for t in terms)
    rows = terms[0].row_size
    return b * g * positions**2 * (rows + c) < b * g * positions * rows * c
