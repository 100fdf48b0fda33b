"""``DPOptimizer``: any ``torch.optim.Optimizer``, made to take DP-SGD steps.

``step()`` reads like the algorithm: clip every example's gradient, sum, add Gaussian noise
once, divide by the EXPECTED batch size, run the wrapped optimizer's update, tell the
listeners (the accountant) what ran. While accumulating (a logical batch split into physical
ones, see :class:`~dptorch.data.BatchMemoryManager`) ``step()`` only clips and adds to the
pending sum; the step that ends the logical batch releases it with one noise draw.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from dptorch.clipping import AutomaticClipping, ClippingPolicy, FlatClipping, PerLayerClipping
from dptorch.distributed import GradientSync
from dptorch.errors import DPTypeError, DPValueError, DPWarning, TrainingLoopError
from dptorch.fsdp import ShardedGradientSync
from dptorch.noise import gaussian_noise, noise_dtype, secure_grid, snap_to_grid
from dptorch.optimizers.release_buffers import ReleaseBuffers
from dptorch.per_sample.engine import ClippedBatch, ClipPlan, LossReduction, PerSampleEngine
from dptorch.secure_random import SecureRandom, compiled_transform_available
from dptorch.validation import check_noise_multiplier, check_positive_number

StepHook = Callable[["DPOptimizer"], None]
StepCheck = Callable[["DPOptimizer"], None]


@dataclass(frozen=True)
class StepStats:
    """What the last step saw. NOT private: computed from raw data, for diagnostics only.

    ``clipped_fraction`` and ``mean_norm`` are computed from ``norms`` and ``factors`` when
    first read, so a training loop that never reads them spends nothing on them.
    """

    batch_size: int
    nonfinite: int
    # [B] per-example gradient norms before clipping (NaN/inf kept); see dptorch.diagnostics.
    norms: torch.Tensor = field(repr=False, compare=False)
    # [B] the clipping factors applied (0 for a non-finite example).
    factors: torch.Tensor = field(repr=False, compare=False)

    @cached_property
    def clipped_fraction(self) -> float:
        """Share of the step's examples whose gradient was scaled down (factor below 1)."""
        if self.batch_size == 0:
            return 0.0
        return float((self.factors < 1).float().mean())

    @cached_property
    def mean_norm(self) -> float:
        """Mean of the finite per-example norms (NaN if none is finite; 0 for no examples)."""
        if self.batch_size == 0:
            return 0.0
        finite = torch.isfinite(self.norms)
        return float(self.norms[finite].mean()) if finite.any() else float("nan")


class DPOptimizer(Optimizer):
    """Wraps ``optimizer`` so that each ``step()`` is one DP-SGD step.

    The wrapper keeps the wrapped optimizer's interface: ``param_groups``, ``state``,
    ``defaults``, ``state_dict()``, ``load_state_dict()``, ``zero_grad()``, ``step(closure)``,
    and passes ``isinstance(opt, torch.optim.Optimizer)`` so learning-rate schedulers work.

    Args:
        optimizer: the optimizer to wrap (SGD, Adam, AdamW, ...).
        engine: where the clipped per-sample sums come from.
        noise_multiplier: sigma; the noise std on the sum is ``sigma * max_grad_norm``.
        max_grad_norm: C, the per-example clipping norm.
        expected_batch_size: ``q * N``, the divisor for ``loss_reduction="mean"``.
        loss_reduction: ``"mean"`` divides the noisy sum by ``expected_batch_size``;
            ``"sum"`` releases the noisy sum.
        generator: the noise source (global torch RNG when ``None``); a
            :class:`~dptorch.secure_random.SecureRandom` gives secure mode (CSPRNG noise in
            float64, released values rounded to a grid: see :mod:`dptorch.noise`).
        clipping: the clipping policy (:mod:`dptorch.clipping`); ``None`` means flat clipping
            at ``max_grad_norm``. The noise std is ``sigma`` times the policy's sensitivity.

    Privacy: each releasing step gives ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / divisor``
    for the examples of one logical batch, then calls every step hook once, so an accountant
    hooked here records exactly one ``(sigma, q)`` event per released gradient. Step checks
    (the privacy budget) run before anything else, so a refused step changes nothing.
    With :attr:`gradient_sync` set (distributed training), the sum runs over the examples of
    all ranks and only rank 0 adds noise, so the std on the summed release is ``sigma C``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        engine: PerSampleEngine,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        loss_reduction: LossReduction = "mean",
        generator: torch.Generator | SecureRandom | None = None,
        clipping: ClippingPolicy | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise DPTypeError(
                f"optimizer={type(optimizer).__name__} is not a torch.optim.Optimizer; build one "
                "over the model's parameters, e.g. torch.optim.SGD(model.parameters(), lr=0.1)."
            )
        if isinstance(optimizer, DPOptimizer):
            raise DPTypeError(
                "optimizer is already a DPOptimizer: make_private was called twice on it. "
                "Pass the original torch optimizer."
            )
        self.original_optimizer = optimizer
        self.engine = engine
        self.clipping: ClippingPolicy = (
            clipping if clipping is not None else FlatClipping(max_grad_norm)
        )
        self._noise_multiplier = self._checked_noise_multiplier(noise_multiplier)
        self.expected_batch_size = check_positive_number("expected_batch_size", expected_batch_size)
        if loss_reduction not in ("mean", "sum"):
            raise DPValueError(
                f"loss_reduction={loss_reduction!r} must be 'mean' or 'sum' (how the loss "
                "combines the examples of a batch)."
            )
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.last_step_stats: StepStats | None = None
        self._step_hooks: list[StepHook] = []
        self._step_checks: list[StepCheck] = []
        # The clipped sums of the physical batches seen so far in this logical batch.
        self._pending: ClippedBatch | None = None
        self._accumulating = False
        self._release_buffers = ReleaseBuffers()
        self.logical_steps = 0
        # Set by make_private(distributed=True): sums the noisy release over the ranks, with
        # noise drawn on one rank only (see dptorch.distributed.GradientSync).
        self.gradient_sync: GradientSync | None = None
        # What Optimizer.register_step_pre_hook / register_step_post_hook write to; step()
        # runs them, since Optimizer.__init__ (which would wrap step) is not called.
        self._optimizer_step_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Any] = OrderedDict()

    # -- the wrapped optimizer's interface -------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    @property
    def noise_multiplier(self) -> float:
        """sigma: the noise std on the clipped sum is ``noise_multiplier * max_grad_norm``.

        Settable between steps (noise schedulers do); the accountant records the value each
        releasing step used.
        """
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self._noise_multiplier = self._checked_noise_multiplier(value)

    def _checked_noise_multiplier(self, value: float) -> float:
        """``value``, validated, and refused up front if the clipping policy cannot split it
        (adaptive clipping's private count needs part of it), not at the next step."""
        value = check_noise_multiplier(value)
        split = getattr(self.clipping, "gradient_noise_multiplier", None)
        if split is not None:
            split(value)
        return value

    @property
    def gradient_noise_multiplier(self) -> float:
        """The multiplier of the noise on the clipped sum itself.

        Equal to :attr:`noise_multiplier`, except under adaptive clipping, whose private
        count takes part of the budget (see :class:`~dptorch.clipping.AdaptiveClipping`).
        """
        split = getattr(self.clipping, "gradient_noise_multiplier", None)
        return float(split(self._noise_multiplier)) if split is not None else self._noise_multiplier

    @property
    def max_grad_norm(self) -> float:
        """C: clipping norm, and the sensitivity the noise std ``sigma * C`` is scaled to.

        Settable between logical steps (clipping schedulers do), never inside a logical
        batch, whose physical parts must all be clipped to the norm its noise is scaled to.
        """
        if isinstance(self.clipping, PerLayerClipping):
            return self.clipping.sensitivity
        return self.clipping.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if self._pending is not None:
            raise TrainingLoopError(
                f"max_grad_norm={value!r} was set in the middle of a logical batch (after "
                "some of its physical batches were clipped to the old norm). Change the "
                "clipping norm only between logical steps: step a clipping scheduler when "
                "optimizer.is_accumulating is False, e.g. once per epoch."
            )
        if isinstance(self.clipping, FlatClipping):
            self.clipping = FlatClipping(value)
        elif isinstance(self.clipping, AutomaticClipping):
            self.clipping = replace(self.clipping, max_grad_norm=value)
        else:
            raise DPValueError(
                f"max_grad_norm cannot be set under {type(self.clipping).__name__}: it sets "
                "its own norms. Clipping schedulers work with flat and automatic clipping."
            )

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise DPValueError(
            "add_param_group on a DPOptimizer would train parameters whose per-sample gradients "
            "are not computed. Build the optimizer with all parameter groups before make_private."
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The pending clipped sum of an accumulating logical batch is kept: it lives here,
        # not in p.grad.
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.engine.clear()

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm="
            f"{self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
            f"optimizer={self.original_optimizer!r})"
        )

    # -- logical and physical batches ------------------------------------------------------
    @property
    def is_accumulating(self) -> bool:
        """Whether the current ``step()`` only accumulates (a physical batch, not the last).

        Schedulers and callbacks that count logical steps act only when this is False.
        """
        return self._accumulating

    def set_accumulating(self, accumulating: bool) -> None:
        """Make the following ``step()`` calls accumulate (True) or release (False).

        :class:`~dptorch.data.BatchMemoryManager` calls this for every physical batch it
        yields; use it directly only to split one logical batch yourself.

        Privacy: everything accumulated until the next releasing step gets one noise draw
        and one accounting step, so the physical batches in between must together be ONE
        Poisson-sampled logical batch, each example in at most one of them. Accumulating
        several sampled batches would be charged as one step while an example could count
        several times.
        """
        self._accumulating = bool(accumulating)

    def discard_accumulated(self) -> bool:
        """Drop the pending clipped sum of an unfinished logical batch; nothing is released.

        Returns:
            Whether there was a pending sum to drop.

        Privacy: nothing derived from the discarded batches leaves the optimizer, so
        nothing is accounted.
        """
        had_pending = self._pending is not None
        self._pending = None
        self._accumulating = False
        return had_pending

    # -- DP-SGD ----------------------------------------------------------------------------
    def attach_step_hook(self, hook: StepHook) -> None:
        """Call ``hook(self)`` after every releasing step (the accountant is attached here)."""
        self._step_hooks.append(hook)

    def attach_step_check(self, check: StepCheck) -> None:
        """Call ``check(self)`` at the start of every ``step()``, before anything changes.

        A check that raises refuses the step: no parameter, optimizer state, pending sum or
        listener is touched (the privacy budget is enforced this way).
        """
        self._step_checks.append(check)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        for check in self._step_checks:
            check(self)
        if self._accumulating:
            loss = _run(closure)
            self._pending = _accumulate(self._pending, self.engine.clip(self.clipping))
            self.engine.clear()
            return loss
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            pre_hook(self, (), {})
        loss = _run(closure)
        plan = self.engine.clip(self.clipping)
        pending, self._pending = self._pending, None
        if isinstance(self.gradient_sync, ShardedGradientSync):
            clipped = _accumulate(pending, plan)
            self.gradient_sync.release_shards(
                self, clipped, std=self._release_std(), divisor=self._divisor()
            )
        else:
            self._release_noisy_gradients(plan, pending)
            clipped = _merged_stats(pending, plan.result, sums={})  # sums are in p.grad
        update_norm = getattr(self.clipping, "update", None)
        if update_norm is not None:  # adaptive clipping: its noised count is in sigma
            update_norm(clipped.norms, self.expected_batch_size, self.generator)
        self.original_optimizer.step()
        self.engine.clear()
        self.last_step_stats = _stats(clipped)
        if clipped.nonfinite:
            _warn_nonfinite(clipped)
        self.logical_steps += 1
        for hook in self._step_hooks:
            hook(self)
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, (), {})
        return loss

    def _divisor(self) -> float:
        return self.expected_batch_size if self.loss_reduction == "mean" else 1.0

    def _release_std(self) -> float:
        """The noise std on each released (normalised) coordinate: ``sigma C / divisor``."""
        return self.gradient_noise_multiplier * self.clipping.sensitivity / self._divisor()

    def _release_noisy_gradients(self, plan: ClipPlan, pending: ClippedBatch | None) -> None:
        """Set every trainable ``p.grad`` to its noisy, normalised clipped sum.

        ``pending`` holds the sums of the logical batch's earlier physical parts, if any.
        """
        divisor = self._divisor()
        # (noise + sum) / divisor computed as noise' + sum / divisor with noise' drawn at std
        # sigma C / divisor, and each sum accumulated into the noise by its own contraction
        # (no sum tensor, no extra pass): p.grad is a view of the one noise buffer, which
        # the next release draws into again once those views are gone (ReleaseBuffers).
        std = self._release_std()
        release_std = std  # the grid of secure mode follows the noise actually released
        sync = self.gradient_sync
        if sync is not None and not sync.draws_noise:
            std = 0.0  # one rank draws the noise, so the all-reduced sum has it exactly once
        params = self.trainable_parameters()
        # One draw per (device, dtype) group, split into per-parameter views: one kernel
        # instead of one per parameter. Every coordinate still gets its own N(0, std^2).
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for param in params:
            groups.setdefault((param.device, noise_dtype(param.dtype)), []).append(param)
        # Secure mode computes the release in units of its output grid, so that snapping to
        # the grid is one rounding pass (see dptorch.noise.noise_grid).
        grid = secure_grid(release_std, self.generator)
        unit = 1.0 if grid is None else grid
        scale = 1.0 / (divisor * unit)
        for (device, dtype), members in groups.items():
            sizes = [p.numel() for p in members]
            # The memory the released gradients will view: last step's, if free again.
            reusable = self._release_buffers.reusable((device, dtype), sum(sizes))
            if grid is not None and sync is None and _fuses_secure_release(device, dtype):
                flat = self._secure_release_in_one_pass(
                    plan, pending, members, sizes, reusable, std / unit, scale, unit
                )
                self._hand_out(members, _param_views(members, sizes, flat), flat, (device, dtype))
                continue
            work = reusable
            if grid is not None and dtype != torch.float64:
                # Secure mode works in float64 and snaps into the release buffer at the end.
                work = self._release_buffers.secure_work((device, dtype), sum(sizes))
            flat = gaussian_noise(
                torch.Size([sum(sizes)]),
                std=std / unit,
                dtype=dtype,
                device=device,
                generator=self.generator,
                out=work,
            )
            views = _param_views(members, sizes, flat)
            for param, view in zip(members, views, strict=True):
                earlier = pending.sums.get(param) if pending is not None else None
                if earlier is not None:
                    view.add_(earlier, alpha=scale)
                plan.add_sum_(param, view, alpha=scale)
            if sync is not None:
                sync.sum_(flat)  # one collective per group, in the same order on every rank
            if grid is not None:
                snapped_into = reusable if work is not reusable else None
                flat = snap_to_grid(flat, grid, dtype, out=snapped_into)
                views = _param_views(members, sizes, flat)
            self._hand_out(members, views, flat, (device, dtype))

    def _secure_release_in_one_pass(
        self,
        plan: ClipPlan,
        pending: ClippedBatch | None,
        members: list[nn.Parameter],
        sizes: list[int],
        buffer: Tensor | None,
        std_units: float,
        scale: float,
        grid: float,
    ) -> Tensor:
        """Secure mode's release of a float32 CPU group without a float64 buffer.

        The clipped sums are accumulated in float32 into the release buffer (as the ordinary
        release accumulates them into its noise), then the compiled kernel replaces each sum
        ``s`` by ``grid * round(z + scale * s)`` with ``z`` drawn in float64 at
        ``std_units``: the values of the float64 path below (noise, plus the scaled sum in
        float64, snapped), in one pass.
        """
        assert isinstance(self.generator, SecureRandom)
        flat = buffer if buffer is not None else torch.empty(sum(sizes), dtype=torch.float32)
        flat.zero_()
        for param, view in zip(members, _param_views(members, sizes, flat), strict=True):
            earlier = pending.sums.get(param) if pending is not None else None
            if earlier is not None:
                view.add_(earlier)
            plan.add_sum_(param, view)
        return self.generator.snapped_release_(flat, std_units, scale, grid)

    def _hand_out(
        self,
        members: list[nn.Parameter],
        views: list[Tensor],
        flat: Tensor,
        key: tuple[torch.device, torch.dtype],
    ) -> None:
        """Set each member's ``.grad`` to its view of the released ``flat`` buffer (a copy in
        the parameter's dtype where that differs from the release's)."""
        released: list[Tensor] = []
        for param, view in zip(members, views, strict=True):
            grad = view if view.dtype == param.dtype else view.to(param.dtype)
            param.grad = grad
            self.engine.note_released(param, grad)
            released.append(grad)
        self._release_buffers.keep(key, flat, released)


def _param_views(members: list[nn.Parameter], sizes: list[int], flat: Tensor) -> list[Tensor]:
    """Each member's slice of ``flat``, shaped like the member (views: writes go to ``flat``).

    For the contiguous 1-D buffers the release uses, each view is made in one ``as_strided``
    on ``flat`` itself: the same views as ``split`` then ``view``, in a fifth of the time (a
    view of a split chunk costs ~5 us, every parameter, every step).
    """
    if flat.dim() != 1 or not flat.is_contiguous():
        return [
            chunk.view(param.shape) for param, chunk in zip(members, flat.split(sizes), strict=True)
        ]
    views: list[Tensor] = []
    offset = flat.storage_offset()
    for param, size in zip(members, sizes, strict=True):
        shape = param.shape
        views.append(flat.as_strided(shape, _contiguous_strides(shape), offset))
        offset += size
    return views


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (row-major)."""
    strides: list[int] = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _fuses_secure_release(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether secure mode's release of a (device, dtype) group runs as one compiled pass:
    float32 groups on the CPU, where the secure transform was built."""
    return device.type == "cpu" and dtype == torch.float32 and compiled_transform_available()


def _warn_nonfinite(clipped: ClippedBatch) -> None:
    warnings.warn(
        f"{clipped.nonfinite} of {clipped.batch_size} examples of this step had a NaN or "
        "inf gradient (NaN/inf in their inputs, targets or loss); each was zeroed, so it "
        "added nothing but noise. Check the data and the loss; "
        "optimizer.last_step_stats.nonfinite counts them.",
        DPWarning,
        stacklevel=3,
    )


def _run(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _accumulate(pending: ClippedBatch | None, plan: ClipPlan) -> ClippedBatch:
    """The logical batch so far: ``pending`` (its earlier physical parts) plus ``plan``'s part.

    The sums are kept in the noise dtype (float32 or better), as the release adds in it, and
    each new part is accumulated into them in place (they are this optimizer's own tensors),
    so a logical batch of many physical parts holds one sum per parameter, not one per part.
    """
    sums = {} if pending is None else dict(pending.sums)
    for param in plan.terms:
        total = sums.get(param)
        if total is None:
            sums[param] = plan.sum(param).to(noise_dtype(param.dtype))
        else:
            plan.add_sum_(param, total)
    if pending is None:
        return replace(plan.result, sums=sums)
    return _merged_stats(pending, plan.result, sums)


def _merged_stats(
    pending: ClippedBatch | None, new: ClippedBatch, sums: dict[Tensor, Tensor]
) -> ClippedBatch:
    """Norms, factors and counts of two disjoint parts of one logical batch, with ``sums``."""
    if pending is None:
        # ``replace`` re-runs the dataclass's __init__ (~10 us a step); skip it for no change.
        return new if not sums and not new.sums else replace(new, sums=sums)
    return replace(
        pending,
        sums=sums,
        batch_size=pending.batch_size + new.batch_size,
        norms=torch.cat([pending.norms, new.norms.to(pending.norms.dtype)]),
        factors=torch.cat([pending.factors, new.factors.to(pending.factors.dtype)]),
        nonfinite=pending.nonfinite + new.nonfinite,
    )


def _stats(clipped: ClippedBatch) -> StepStats:
    return StepStats(
        batch_size=clipped.batch_size,
        nonfinite=clipped.nonfinite,
        norms=clipped.norms.detach(),
        factors=clipped.factors.detach(),
    )
