"""The per-sample engine: from one backward pass to the clipped sum ``sum_i c_i g_i``.

For every trainable parameter it gathers the terms of all layer calls that touched it,
takes per-example squared norms (ghost or instantiated, whichever is cheaper per layer, or as
forced), adds them over parameters into the per-example norm ``n_i``, asks the clipping policy
for factors ``c_i``, and forms each parameter's weighted sum in one contraction.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from dptorch.errors import DPValueError, TrainingLoopError
from dptorch.per_sample.capture import ActivationCapture, CallRecord
from dptorch.per_sample.grad_skipping import ParameterGradSkipper
from dptorch.per_sample.grouping import check_group_size, group_rows
from dptorch.per_sample.row_grams import RowGrams
from dptorch.per_sample.rules import (
    SUBTREE_OWNERS,
    RuleContext,
    has_dedicated_rule,
    has_registered_rule,
    owned_parameters,
    rule_for,
)
from dptorch.per_sample.terms import (
    GradTerm,
    NormRoute,
    OuterTerm,
    combined_norm_sq,
    merge_positions,
)

LossReduction = Literal["mean", "sum"]


class ClippingPolicy(Protocol):
    def factors(self, norms: Tensor) -> Tensor: ...


@dataclass
class ClippedBatch:
    """The result of one physical batch.

    Attributes:
        sums: per trainable parameter, ``sum_i c_i g_i`` (parameters no example touched are
            absent).
        batch_size: the realised number of examples.
        norms: per-example gradient norms before clipping. NOT private: diagnostics only.
        factors: per-example clipping factors. NOT private.
        nonfinite: how many examples had a NaN/inf gradient norm (their factor is 0).
    """

    sums: dict[Tensor, Tensor]
    batch_size: int
    norms: Tensor
    factors: Tensor
    nonfinite: int


@dataclass
class ClipPlan:
    """One physical batch clipped but not yet summed: its terms and per-example weights.

    Attributes:
        terms: per trainable parameter, the per-sample gradient terms of the batch.
        weights: per parameter, each example's clipping factor (times the row scale of a
            mean loss); the clipped sum of ``param`` is ``sum_i weights[param][i] g_i``.
        result: the batch's norms, factors and counts, with empty ``sums``.

    Privacy: both ways to form the sums (:meth:`sums`, :meth:`add_sum_`) compute the same
    ``sum_i c_i g_i``; only where the result is written differs.
    """

    terms: dict[Tensor, list[GradTerm]]
    weights: dict[Tensor, Tensor]
    result: ClippedBatch

    @property
    def _sanitize(self) -> bool:
        return self.result.nonfinite > 0

    def sums(self) -> dict[Tensor, Tensor]:
        """Each touched parameter's clipped sum as a new tensor."""
        return {param: self.sum(param) for param in self.terms}

    def sum(self, param: Tensor) -> Tensor:
        """``param``'s clipped sum as a new tensor (``param`` must have terms)."""
        return _sum_terms(self.terms[param], self.weights[param], sanitize=self._sanitize)

    def add_sum_(self, param: Tensor, out: Tensor, alpha: float = 1.0) -> None:
        """``out += alpha * (clipped sum of param)``, in place; nothing if no example touched
        ``param``. ``out`` has ``param``'s shape (a view of a contiguous buffer accumulates
        inside the contraction; any other is added to)."""
        for term in self.terms.get(param, ()):
            term.add_weighted_sum_(out, self.weights[param], alpha, sanitize=self._sanitize)


def modules_to_capture(root: nn.Module, trainable: frozenset[nn.Parameter]) -> dict[str, nn.Module]:
    """Every submodule that owns a trainable parameter, by dotted path.

    Modules inside a subtree owner (see ``SUBTREE_OWNERS``) are left to their owner.
    """
    chosen: dict[str, nn.Module] = {}
    owners: list[str] = []
    for path, module in root.named_modules():
        if any(path.startswith(owner + ".") for owner in owners):
            continue
        if any(p in trainable for _, p in owned_parameters(module)):
            chosen[path or "<root>"] = module
            if isinstance(module, SUBTREE_OWNERS) and not has_dedicated_rule(module):
                owners.append(path)
    return chosen


class PerSampleEngine:
    """Captures a module's layer calls and turns them into clipped per-sample sums.

    Args:
        module: the user's model; hooks are added by :meth:`attach`, removed by
            :meth:`detach`, and nothing else about the module changes.
        trainable: the parameters to compute private gradients for.
        batch_first: layout of sequence inputs (see :class:`RuleContext`).
        loss_reduction: ``"mean"`` if the loss averages over the batch (per-example
            gradients are then the output gradients times the realised batch size), ``"sum"``
            if it sums.
        norm_route: ``"auto"`` picks ghost or instantiated norms per layer by cost; the
            others force one route (for tests and benchmarks).
        verify: check once, on the first non-empty batch, that the captured per-sample
            gradients add up to autograd's gradient for every parameter.
        augmentation_multiplicity: ``K`` consecutive batch rows per example (its
            augmentations); the example's gradient is the mean over its rows, clipped as one
            (see :mod:`dptorch.per_sample.grouping`). 1 means one row per example.

    Privacy: the norms and sums are exact functions of each example's own gradient, so the
    clipped sum has the sensitivity the clipping policy states, whatever the route.
    """

    def __init__(
        self,
        module: nn.Module,
        trainable: Iterable[nn.Parameter],
        *,
        batch_first: bool = True,
        loss_reduction: LossReduction = "mean",
        norm_route: NormRoute = "auto",
        verify: bool = True,
        skip_param_grads: bool = True,
        augmentation_multiplicity: int = 1,
    ) -> None:
        if not isinstance(augmentation_multiplicity, int) or augmentation_multiplicity < 1:
            raise DPValueError(
                f"augmentation_multiplicity={augmentation_multiplicity!r} must be a positive "
                "integer: the number of consecutive batch rows (augmentations) per example."
            )
        self.augmentation_multiplicity = augmentation_multiplicity
        self.module = module
        self.trainable = frozenset(trainable)
        self._ordered = [p for p in module.parameters() if p in self.trainable]
        self.batch_first = batch_first
        self.loss_reduction = loss_reduction
        self.norm_route = norm_route
        self._verify_pending = verify
        captured = modules_to_capture(module, self.trainable)
        self.capture = ActivationCapture(captured, on_complete=self._evaluate_early)
        self._context = RuleContext(
            batch_first, self.trainable, self.capture, norm_route, augmentation_multiplicity
        )
        swaps = {
            m: [n for n, p in m._parameters.items() if p is not None and p in self.trainable]
            for m in captured.values()
            if skip_param_grads and has_dedicated_rule(m)
        }
        swaps = {m: names for m, names in swaps.items() if names}
        # Registered (user) rules are checked against autograd on the first step, so their
        # ordinary gradients are only skipped once that check has passed.
        on_trust = {m: n for m, n in swaps.items() if not (verify and has_registered_rule(m))}
        self.skipper = ParameterGradSkipper(on_trust)
        self._deferred_skipper = ParameterGradSkipper(
            {m: n for m, n in swaps.items() if m not in on_trust}
        )
        self._skipped = frozenset(self.skipper.parameters)
        # The gradients the optimizer released last, to tell them from foreign ones.
        # Weak references: a strong one would keep each step's released gradients (the
        # size of the model) alive after zero_grad() dropped them, into the next step's peak.
        self._released: dict[Tensor, tuple[weakref.ref[Tensor], int]] = {}
        # Stand-ins a wrapper swaps in for trainable parameters (see alias_parameters).
        self._owner_of: dict[Tensor, Tensor] = {}

    def alias_parameters(self, aliases: Mapping[Tensor, Tensor]) -> None:
        """Treat each key as the trainable parameter it maps to.

        FSDP2 puts an unsharded parameter in a layer's place during forward and backward;
        the rules see that one, and its terms are summed under the sharded parameter the
        optimizer holds (see :mod:`dptorch.fsdp`).
        """
        self._owner_of.update(aliases)
        self._context = replace(self._context, trainable=self.trainable | frozenset(self._owner_of))

    def attach(self) -> None:
        self.skipper.attach()  # first: the capture's hooks must see the outputs it replaces
        self.capture.attach()

    def detach(self) -> None:
        self.capture.detach()
        self.skipper.detach()
        self._deferred_skipper.detach()

    def note_released(self, param: Tensor, grad: Tensor) -> None:
        """Remember the gradient the optimizer stored in ``param.grad``."""
        self._released[param] = (weakref.ref(grad), grad._version)

    def clear(self) -> None:
        self.capture.clear()

    def has_pending_backward(self) -> bool:
        return any(record.has_grad for record in self.capture.records)

    # -- the computation -------------------------------------------------------------------
    def clipped_sum(self, policy: ClippingPolicy) -> ClippedBatch:
        """Clip and sum the per-sample gradients of the backward pass since :meth:`clear`."""
        plan = self.clip(policy)
        return replace(plan.result, sums=plan.sums())

    def clip(self, policy: ClippingPolicy) -> ClipPlan:
        """Per-example norms and clipping factors of the backward pass since :meth:`clear`.

        The weighted sums are left to the caller: :meth:`ClipPlan.sums`, or
        :meth:`ClipPlan.add_sum_` straight into a release buffer (the noise), which spares a
        parameter-sized tensor and a pass over it. Every check (no backward, several
        backwards, gradients the hooks did not see) runs here, before anything is released.
        """
        records = [r for r in self.capture.records if r.has_grad]
        if not records:
            raise TrainingLoopError(
                "optimizer.step() was called, but no backward pass reached the model since the "
                "last step. Run loss.backward() before each optimizer.step(), also for empty "
                "Poisson batches (their loss may be NaN; dptorch ignores it and adds noise only)."
            )
        passes = self.capture.backward_passes()
        if len(passes) > 1:
            raise TrainingLoopError(
                f"{len(passes)} backward passes ran since the last optimizer.step(). Accumulating "
                "gradients over several backward passes would put several batches under one "
                "noise draw and one accounting step. Call optimizer.step() after each backward "
                "(to split one logical batch into physical ones, iterate inside "
                "`with dptorch.BatchMemoryManager(data_loader=..., max_physical_batch_size=..., "
                "optimizer=...) as loader:`, which gives the whole logical batch one step)."
            )
        by_param = self._terms_by_parameter(records)
        rows = _common_batch_size(by_param, records)
        # Per-row gradients of a mean loss are the output gradients times the row count.
        scale = float(rows) if self.loss_reduction == "mean" else 1.0
        if self._verify_pending and rows > 0:
            self._verify_against_autograd(by_param, records)  # on rows: autograd sums rows
            self._verify_pending = False
            verified_now = True
        else:
            verified_now = False
        multiplicity = self.augmentation_multiplicity
        batch = check_group_size(rows, multiplicity)
        if multiplicity > 1:
            by_param = {p: [group_rows(t, multiplicity) for t in ts] for p, ts in by_param.items()}
        device = self._ordered[0].device if self._ordered else torch.device("cpu")
        dtype = torch.float64 if self._any_double() else torch.float32
        # Layers sharing an output gradient or an input share its Gram.
        grams = RowGrams(_dense_factors(by_param))
        param_norm_sq = {
            param: _as_dtype(combined_norm_sq(terms, self.norm_route, grams=grams), dtype)
            for param, terms in by_param.items()
        }
        del grams
        norms = _total(list(param_norm_sq.values()), batch, dtype, device).sqrt() * scale
        nonfinite = _count_nonfinite(norms)
        group_of = getattr(policy, "group_of", None)
        if group_of is None:
            factors = policy.factors(norms)
            shared = factors * scale  # one tensor for every parameter, not one each
            weights = dict.fromkeys(by_param, shared)
        else:
            weights, factors = _group_weights(policy, group_of, param_norm_sq, batch, scale)
        self._check_no_foreign_gradients()
        if verified_now:  # after the check above: this step's autograd .grad is expected
            self._trust_registered_rules()
        return ClipPlan(by_param, weights, ClippedBatch({}, batch, norms, factors, nonfinite))

    def _trust_registered_rules(self) -> None:
        """After the first check passed: skip the ordinary gradients of registered rules too.

        Its hooks go in front of the capture's, like the main skipper's, so the capture sees
        the outputs it may replace.
        """
        deferred = self._deferred_skipper.parameters
        if not deferred:
            return
        self._deferred_skipper.attach(prepend=True)
        self._skipped = self._skipped | frozenset(deferred)

    def _any_double(self) -> bool:
        return any(p.dtype == torch.float64 for p in self._ordered)

    def _evaluate_early(self, record: CallRecord) -> None:
        """Turn a dedicated-rule call into terms as soon as its output gradient arrives.

        Runs inside the backward pass (grad mode off), so the layer's input and output
        gradient are released as early as in non-private training instead of living until
        ``optimizer.step()``; instantiated terms keep only the ``[B, *param]`` gradients.
        Fallback (``torch.func``) calls wait for the step: they re-run a forward.
        """
        if has_dedicated_rule(record.module):
            record.release(self._apply_rule(record))

    def _apply_rule(self, record: CallRecord) -> list[GradTerm]:
        """The record's terms; a shape error inside a rule is reported with the layer's path."""
        try:
            return rule_for(record.module)(record.module, record, self._context)
        except RuntimeError as error:
            shapes = [tuple(a.shape) for a in record.args if isinstance(a, Tensor)]
            raise DPValueError(
                f"{record.path} ({type(record.module).__name__}) could not be split into "
                f"per-example gradients (inputs of shapes {shapes}): {error}. The first "
                "dimension of every input must be the batch, also for a single example "
                "(x.unsqueeze(0)); for [T, B, ...] inputs pass batch_first=False to "
                "make_private. Nothing was applied; call optimizer.zero_grad() and retry."
            ) from error

    def _terms_by_parameter(self, records: list[CallRecord]) -> dict[Tensor, list[GradTerm]]:
        by_param: dict[Tensor, list[GradTerm]] = {}
        for record in records:
            terms = record.terms
            if terms is None:
                terms = self._apply_rule(record)
            for term in terms:
                owner = self._owner_of.get(term.param, term.param)
                by_param.setdefault(owner, []).append(term)
        return {param: merge_positions(terms) for param, terms in by_param.items()}

    def _verify_against_autograd(
        self, by_param: dict[Tensor, list[GradTerm]], records: list[CallRecord]
    ) -> None:
        """Refuse gradients that reach a parameter outside the captured layer calls.

        A parameter used directly as a tensor (``x @ layer.weight.T``) or by a module that
        reads another module's weights gets gradient that no hook sees; its per-sample
        gradient would be incomplete and the clipping bound would not hold.
        """
        names = {p: name for name, p in self.module.named_parameters()}
        # torch.func re-runs a module with dropout under fresh masks, so its per-sample
        # gradients legitimately differ from autograd's; for those only a missing
        # contribution can be detected.
        redrawn = {
            p
            for r in records
            if _redraws_randomness(r.module)
            for _, p in owned_parameters(r.module)
        }
        problems = []
        for param in self._ordered:
            if param in self._skipped:
                continue  # no autograd gradient to compare; see _check_no_foreign_gradients
            reference = param.grad
            terms = by_param.get(param, [])
            if reference is None or not torch.isfinite(reference).all():
                continue
            captured = _sum_terms(terms, None, sanitize=False) if terms else None
            if captured is not None and param in redrawn:
                continue
            if captured is None:
                mismatch = bool(reference.abs().max() > 0)
            else:
                error = (captured.to(reference.dtype) - reference).norm()
                bound = 1e-3 * reference.norm() + 1e-6 * max(1.0, float(reference.numel()) ** 0.5)
                mismatch = bool(error > bound)
            if mismatch:
                problems.append(names.get(param, "<unnamed parameter>"))
        if problems:
            raise DPValueError(_FOREIGN_GRADIENT_MESSAGE.format(", ".join(problems)))

    def _check_no_foreign_gradients(self) -> None:
        """Parameters whose autograd gradient is skipped must not have received any."""
        problems = []
        for param in self._skipped:
            grad = param.grad
            if grad is None:
                continue
            released = self._released.get(param)
            if released is not None and grad is released[0]() and grad._version == released[1]:
                continue  # the optimizer's own last release, untouched
            if bool(grad.any()):
                problems.append(param)
        if problems:  # names are looked up only here, off the per-step path
            names = {p: name for name, p in self.module.named_parameters()}
            shown = sorted(names.get(p, "<unnamed parameter>") for p in problems)
            raise DPValueError(_FOREIGN_GRADIENT_MESSAGE.format(", ".join(shown)))


_FOREIGN_GRADIENT_MESSAGE = (
    "These parameters received gradient that dptorch's layer hooks did not see: {}. Their "
    "per-example gradients would be incomplete, so clipping could not bound each example's "
    "influence. Typical causes: a weight used directly as a tensor (e.g. x @ emb.weight.T) "
    "instead of by calling its module, a module that reads another module's weights, or a "
    "stale .grad from before make_private (call optimizer.zero_grad() first). Call the owning "
    "module instead, or register a rule for the custom module with "
    "dptorch.per_sample.register_rule."
)


def _group_weights(
    policy: ClippingPolicy,
    group_of: Callable[[Tensor], int],
    param_norm_sq: dict[Tensor, Tensor],
    batch: int,
    scale: float,
) -> tuple[dict[Tensor, Tensor], Tensor]:
    """Per-parameter weights under per-group clipping, and each example's smallest factor."""
    index = {param: group_of(param) for param in param_norm_sq}
    groups = len(policy.max_grad_norms)  # type: ignore[attr-defined]
    first = next(iter(param_norm_sq.values()), None)
    group_sq = torch.zeros(
        groups,
        batch,
        dtype=first.dtype if first is not None else torch.float32,
        device=first.device if first is not None else None,
    )
    for param, value in param_norm_sq.items():
        group_sq[index[param]] += value
    group_factors = policy.group_factors(group_sq.sqrt() * scale)  # type: ignore[attr-defined]
    weights = {param: group_factors[index[param]] * scale for param in param_norm_sq}
    return weights, group_factors.min(dim=0).values


def _as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without the call where it is already that dtype (a few
    microseconds a parameter, every step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _total(values: list[Tensor], batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The elementwise sum of ``[batch]`` tensors (zeros for none): one ``stack`` and one
    ``sum`` instead of one addition per parameter. With one value it is that tensor itself;
    callers must not write into the result."""
    if not values:
        return torch.zeros(batch, dtype=dtype, device=device)
    if len(values) == 1:
        return values[0]
    return torch.stack(values).sum(dim=0)


def _count_nonfinite(norms: Tensor) -> int:
    """How many of the (non-negative) norms are NaN or infinite.

    Their sum is finite exactly when each of them is, barring an overflow of the sum, which
    takes the exact count too: one reduction on the common path instead of four.
    """
    if math.isfinite(float(norms.sum())):
        return 0
    return int((~torch.isfinite(norms)).sum())


def _redraws_randomness(module: nn.Module) -> bool:
    """Whether re-running ``module`` in training mode draws new dropout masks."""
    if has_dedicated_rule(module) or not module.training:
        return False
    if float(getattr(module, "dropout", 0.0) or 0.0) > 0:  # nn.MultiheadAttention, RNNs
        return True
    return any(
        isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0 for sub in module.modules()
    )


def _dense_factors(by_param: dict[Tensor, list[GradTerm]]) -> Iterable[Tensor]:
    """Every dense factor (rows and cols) of the step's outer-product terms."""
    for terms in by_param.values():
        for term in terms:
            # One-position terms take their norms from row norms, never from a Gram.
            if isinstance(term, OuterTerm) and term.positions != 1:
                if isinstance(term.rows, Tensor):
                    yield term.rows
                yield term.cols


def _sum_terms(terms: list[GradTerm], weights: Tensor | None, sanitize: bool) -> Tensor:
    if weights is None:
        weights = torch.ones(terms[0].batch_size, device=_device_of(terms[0]))
    total = terms[0].weighted_sum(weights, sanitize)
    for term in terms[1:]:
        total = total + term.weighted_sum(weights, sanitize)
    return total


def _device_of(term: GradTerm) -> torch.device:
    return term.param.device


def _common_batch_size(by_param: dict[Tensor, list[GradTerm]], records: list[CallRecord]) -> int:
    sizes = {term.batch_size for terms in by_param.values() for term in terms}
    if len(sizes) > 1:
        paths = sorted({r.path for r in records})
        raise DPValueError(
            f"Layers saw different batch sizes {sorted(sizes)} in one step (layers: "
            f"{', '.join(paths)}). Every captured layer must see the batch dimension of the "
            "same examples; check batch_first= (False means inputs are [T, B, ...]), and "
            "look for a layer fed one row broadcast over the batch (e.g. position ids of "
            "shape [1, T]: give every example its own row, as "
            "dptorch.integrations.huggingface.per_example_position_ids does)."
        )
    return sizes.pop() if sizes else 0
