"""``PrivacyEngine``: the front door. It checks, assembles and remembers; it computes nothing.

A user's loop stays as it was; ``make_private`` returns the same model (with hooks), a
:class:`DPOptimizer` and a Poisson-sampling :class:`DPDataLoader`, and the accountant hears of
every step the optimizer takes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dptorch.accountants import Accountant, create_accountant
from dptorch.accountants.calibration import check_delta_against_dataset, get_noise_multiplier
from dptorch.budget import PrivacyBudget
from dptorch.checkpoint import ResumeInfo, Stateful, load_checkpoint, save_checkpoint
from dptorch.clipping import CLIPPING_KINDS, ClippingPolicy, make_clipping_policy
from dptorch.data import DPDataLoader
from dptorch.data.distributed_sampler import DistributedDPDataLoader
from dptorch.data.sample_rate import resolve_sample_rate
from dptorch.distributed import (
    GradientSync,
    check_distributed_run,
    join_ranks,
    resolve_distributed,
)
from dptorch.errors import (
    DPError,
    DPTypeError,
    DPValueError,
    DPWarning,
    ParameterMismatchError,
    UnsupportedModuleError,
)
from dptorch.optimizers import DPOptimizer
from dptorch.per_sample import PerSampleEngine
from dptorch.per_sample.capture import is_captured, remove_capture_hooks
from dptorch.per_sample.engine import LossReduction
from dptorch.per_sample.terms import NormRoute
from dptorch.secure_random import SecureRandom
from dptorch.validation import check_noise_multiplier
from dptorch.validators import find_problems


class PrivacyEngine:
    """Makes a model, optimizer and data loader private, and reports the privacy spent.

    Args:
        accountant: ``"prv"`` (default, tight), ``"rdp"``, ``"gdp"`` (an approximation that can
            under-report) or an :class:`~dptorch.accountants.Accountant` instance.
        secure_mode: draw the noise and the Poisson batches from a CSPRNG
            (:class:`~dptorch.secure_random.SecureRandom`: AES-256-CTR keyed by
            ``os.urandom``, or ``os.urandom`` itself without ``cryptography``), and round
            released gradients to a grid against floating-point attacks. Secure runs are
            resumable from checkpoints but never bit-reproducible. See docs/hardening.md.
    """

    def __init__(self, *, accountant: str | Accountant = "prv", secure_mode: bool = False) -> None:
        if not isinstance(secure_mode, bool):
            raise DPTypeError(
                f"secure_mode={secure_mode!r} ({type(secure_mode).__name__}) must be True or False."
            )
        self.accountant = (
            create_accountant(accountant) if isinstance(accountant, str) else accountant
        )
        if not isinstance(self.accountant, Accountant):
            raise DPTypeError(
                f"accountant={accountant!r} must be a name such as 'rdp' or an Accountant."
            )
        self.secure_mode = secure_mode
        self._engines: list[PerSampleEngine] = []
        self.budget: PrivacyBudget | None = None
        self._sample_rates: list[tuple[DPOptimizer, float]] = []

    # -- the three-line API ----------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader[Any],
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        poisson_sampling: bool = True,
        loss_reduction: LossReduction = "mean",
        batch_first: bool = True,
        noise_generator: torch.Generator | None = None,
        clipping: str | ClippingPolicy = "flat",
        sample_rate: float | None = None,
        norm_route: NormRoute = "auto",
        augmentation_multiplicity: int = 1,
        max_epsilon: float | None = None,
        budget_delta: float | None = None,
        distributed: bool | None = None,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader[Any]]:
        """Return ``(module, optimizer, data_loader)`` ready for private training.

        ``module`` is returned as the same object with capture hooks attached (no wrapper;
        ``state_dict()`` keys unchanged); :meth:`detach` removes them. Nothing is changed if
        any argument is refused.

        Args:
            module: the model, in training mode, with no layer that mixes examples.
            optimizer: a torch optimizer over exactly the model's trainable parameters.
            data_loader: the training loader; with ``poisson_sampling`` it is replaced by a
                :class:`DPDataLoader` that samples each example with rate
                ``q = batch_size / len(dataset)``.
            noise_multiplier: sigma; noise std on the clipped sum is ``sigma * max_grad_norm``.
            max_grad_norm: C, the per-example L2 clipping norm.
            poisson_sampling: keep it ``True``: the accountant assumes Poisson sampling.
            loss_reduction: ``"mean"`` or ``"sum"``, as the loss combines a batch.
            batch_first: ``False`` if sequence inputs are ``[T, B, ...]``.
            noise_generator: generator for the noise (global torch RNG when ``None``).
            clipping: ``"flat"`` (default), ``"automatic"`` (normalised, Bu et al.),
                ``"per_layer"`` (``max_grad_norm`` one per trainable parameter, or one total
                split evenly), ``"adaptive"`` (the norm tracks the median, Andrew et al.; its
                private count is inside ``noise_multiplier``), or a policy object from
                :mod:`dptorch.clipping`. The noise std is ``noise_multiplier`` times the
                policy's sensitivity, so the accounting is the same for all.
            sample_rate: q, required when it cannot be read from the loader.
            norm_route: ``"auto"``, or force ``"ghost"`` / ``"instantiate"`` norms.
            augmentation_multiplicity: ``K`` consecutive batch rows per example (its
                augmentations, e.g. from :class:`dptorch.data.AugmentationMultiplicity`); each
                example's gradient is the mean over its rows, clipped once. Privacy is
                unchanged: the example is still the unit that is clipped and sampled.
            max_epsilon: a hard budget (see :meth:`set_budget`); give with ``budget_delta``.
            budget_delta: the delta at which ``max_epsilon`` is measured.
            distributed: train one model on all ranks of the ``torch.distributed`` process
                group (see :mod:`dptorch.distributed`); ``None`` means yes for a
                ``DistributedDataParallel`` model or a group of more than one rank. A DDP
                model is returned unwrapped (its ``.module``): train that, not the wrapper.
                A ``fully_shard`` (FSDP2) model is trained as it is (:mod:`dptorch.fsdp`).

        Privacy: each ``optimizer.step()`` releases a gradient with per-example sensitivity
        ``max_grad_norm`` plus ``N(0, (noise_multiplier * max_grad_norm)^2)`` noise and records
        ``(noise_multiplier, q)`` with the accountant, where q is the sampler's actual rate.
        """
        self._check_types(module, optimizer, data_loader)
        self._check_secure_options(noise_generator)
        module, sync = resolve_distributed(module, distributed)
        if self.secure_mode and sync is not None:
            raise DPValueError(
                "secure_mode=True does not support distributed training yet (each rank would "
                "need its own CSPRNG share of the batches); train on one process or use "
                "secure_mode=False."
            )
        if isinstance(clipping, str) and clipping not in CLIPPING_KINDS:
            raise DPValueError(
                f"clipping={clipping!r} is not available; use one of {CLIPPING_KINDS}."
            )
        if norm_route not in ("auto", "ghost", "instantiate"):
            raise DPValueError(
                f"norm_route={norm_route!r} must be 'auto', 'ghost' or 'instantiate'."
            )
        noise_multiplier = check_noise_multiplier(noise_multiplier)
        budget = _budget_from(max_epsilon, budget_delta)
        if is_captured(module):
            raise DPValueError(
                f"module ({type(module).__name__}) is already private (make_private was called "
                "on it before). Call engine.detach(module) first, or keep using the first result."
            )
        problems = find_problems(module)
        if problems:
            raise UnsupportedModuleError([str(p) for p in problems])
        trainable = _check_parameter_identity(module, optimizer)
        _check_no_meta_parameters(module)
        # Separate streams for sampling and noise: the noise stream draws ahead in a thread.
        secure = SecureRandom() if self.secure_mode else None
        sampling = SecureRandom() if self.secure_mode else None
        loader, q = self._private_loader(data_loader, poisson_sampling, sample_rate, sync, sampling)
        engine = PerSampleEngine(
            module,
            trainable,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            norm_route=norm_route,
            augmentation_multiplicity=augmentation_multiplicity,
        )
        expected_batch_size = q * _dataset_size(data_loader)
        policy = make_clipping_policy(clipping, max_grad_norm, trainable, expected_batch_size)
        dp_optimizer = DPOptimizer(
            optimizer,
            engine=engine,
            noise_multiplier=noise_multiplier,
            max_grad_norm=policy.sensitivity,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=secure if secure is not None else noise_generator,
            clipping=policy,
        )
        if sync is not None:
            check_distributed_run(sync, dp_optimizer, loader, q)
        dp_optimizer.attach_step_check(self._budget_check(q))
        dp_optimizer.attach_step_hook(self._accounting_hook(q))
        # Warnings and hooks come last, once every argument has been accepted.
        if noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0 adds no noise: training is NOT differentially private and "
                "the reported epsilon is infinite. Use it only to debug clipping.",
                DPWarning,
                stacklevel=2,
            )
        if not poisson_sampling:
            warnings.warn(
                "poisson_sampling=False: the loader's batches are not Poisson samples, but the "
                f"accountant assumes Poisson sampling at q={q:.6g}. The reported epsilon is NOT "
                "a guarantee for shuffled fixed-size batches.",
                DPWarning,
                stacklevel=2,
            )
        if sync is not None:
            join_ranks(sync, module, dp_optimizer)
        engine.attach()
        self._engines.append(engine)
        self._sample_rates.append((dp_optimizer, q))
        if budget is not None:
            self.budget = budget
        return module, dp_optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader[Any],
        target_epsilon: float,
        target_delta: float,
        max_grad_norm: float | Sequence[float],
        epochs: int | None = None,
        steps: int | None = None,
        epsilon_tolerance: float = 0.01,
        **options: Any,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader[Any]]:
        """:meth:`make_private` with the smallest noise that keeps epsilon <= the target.

        The noise is calibrated with this engine's accountant for the run that will really
        happen: the sample rate of the Poisson loader and ``epochs * len(loader)`` steps (or
        ``steps``). Other keyword arguments go to :meth:`make_private`.

        Privacy: after the planned number of steps, :meth:`get_epsilon` at ``target_delta``
        is at most ``target_epsilon``, counting what this engine's accountant had already
        recorded (a loaded checkpoint, a private statistic such as
        :func:`dptorch.features.private_channel_norm`): the noise is calibrated for that
        history plus the planned steps. Training longer spends more; set a budget to stop
        there.
        """
        if (epochs is None) == (steps is None):
            raise DPValueError(
                f"Pass exactly one of epochs= or steps= (got epochs={epochs!r}, steps={steps!r}): "
                "the noise needed depends on how many steps will run."
            )
        sample_rate = options.pop("sample_rate", None)
        poisson = options.get("poisson_sampling", True)
        self._check_types(module, optimizer, data_loader)
        planned_loader, q = self._private_loader(data_loader, poisson, sample_rate)
        total_steps = steps if steps is not None else _planned_steps(epochs, planned_loader)
        check_delta_against_dataset(target_delta, _dataset_size(data_loader))
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=q,
            steps=total_steps,
            accountant=self.accountant.mechanism(),
            epsilon_tolerance=epsilon_tolerance,
            prior_history=self.accountant.history,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            sample_rate=q,
            **options,
        )

    def get_epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta``, by this engine's accountant."""
        return self.accountant.get_epsilon(delta)

    # -- the privacy budget ----------------------------------------------------------------
    def set_budget(self, *, epsilon: float, delta: float) -> None:
        """Refuse any ``optimizer.step()`` that would take epsilon at ``delta`` past ``epsilon``.

        Applies to every optimizer this engine made private, from their next step on.

        Privacy: a refused step raises :class:`~dptorch.errors.PrivacyBudgetExceededError`
        before its gradient is released: parameters, optimizer state and accountant stay as
        they were after the last step within budget.
        """
        self.budget = PrivacyBudget(epsilon=epsilon, delta=delta)

    def budget_left(self) -> float:
        """Epsilon still available under the budget (0.0 once it is spent)."""
        return self._require_budget("budget_left").epsilon_left(self.accountant)

    def steps_left(self, optimizer: DPOptimizer | None = None) -> int:
        """Steps that still fit in the budget at the optimizer's current noise and rate.

        Args:
            optimizer: one this engine made private; the latest one when ``None``.
        """
        budget = self._require_budget("steps_left")
        known = [pair for pair in self._sample_rates if optimizer in (None, pair[0])]
        if not known:
            raise DPValueError(
                "steps_left needs an optimizer returned by this engine's make_private; "
                f"got {_show(optimizer)}."
            )
        chosen, q = known[-1]
        return budget.steps_left(
            self.accountant, noise_multiplier=chosen.noise_multiplier, sample_rate=q
        )

    def _require_budget(self, caller: str) -> PrivacyBudget:
        if self.budget is None:
            raise DPValueError(
                f"{caller}() needs a privacy budget; set one with engine.set_budget("
                "epsilon=..., delta=...) or make_private(..., max_epsilon=..., budget_delta=...)."
            )
        return self.budget

    def _budget_check(self, sample_rate: float) -> Any:
        def check_budget(optimizer: DPOptimizer) -> None:
            if self.budget is not None:  # read at each step: set_budget may come later
                self.budget.check_step(
                    self.accountant,
                    noise_multiplier=optimizer.noise_multiplier,
                    sample_rate=sample_rate,
                )

        return check_budget

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike[str],
        module: nn.Module,
        optimizer: DPOptimizer,
        data_loader: DataLoader[Any] | None = None,
        extras: Mapping[str, Stateful] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Atomically save the run, spent budget included.

        See :func:`dptorch.checkpoint.save_checkpoint` for what is saved and how.

        Privacy: the accountant's history is saved, so a resumed run keeps counting from it.
        """
        save_checkpoint(
            path,
            module=module,
            optimizer=optimizer,
            accountant=self.accountant,
            sample_rate=self._sample_rate_of(optimizer),
            data_loader=data_loader,  # type: ignore[arg-type]
            extras=extras,
            metadata=metadata,
        )

    def load_checkpoint(
        self,
        *,
        path: str | os.PathLike[str],
        module: nn.Module,
        optimizer: DPOptimizer,
        data_loader: DataLoader[Any] | None = None,
        extras: Mapping[str, Stateful] | None = None,
        map_location: str | torch.device | None = "cpu",
    ) -> ResumeInfo:
        """Resume a saved run into this engine's freshly built objects.

        See :func:`dptorch.checkpoint.load_checkpoint`; returns where the run left off.

        Privacy: epsilon continues from the saved history; a checkpoint whose accountant,
        sigma, C or q differ from this run's is refused with a DPValueError.
        """
        return load_checkpoint(
            path,
            module=module,
            optimizer=optimizer,
            accountant=self.accountant,
            sample_rate=self._sample_rate_of(optimizer),
            data_loader=data_loader,  # type: ignore[arg-type]
            extras=extras,
            map_location=map_location,
        )

    def _sample_rate_of(self, optimizer: DPOptimizer) -> float:
        for made, q in self._sample_rates:
            if made is optimizer:
                return q
        raise DPValueError(
            f"optimizer={_show(optimizer)} was not made private by this engine; pass the "
            "optimizer that this engine's make_private returned."
        )

    def detach(self, module: nn.Module | None = None) -> None:
        """Remove dptorch's hooks from ``module`` (all modules made private when ``None``).

        Afterwards the module behaves exactly as before ``make_private``; optimizers made for
        it must not be stepped again.
        """
        for engine in list(self._engines):
            if module is None or engine.module is module:
                engine.detach()
                self._engines.remove(engine)
        if module is not None:
            remove_capture_hooks(module)

    # -- parts -----------------------------------------------------------------------------
    def _accounting_hook(self, sample_rate: float) -> Any:
        accountant = self.accountant

        def record_step(optimizer: DPOptimizer) -> None:
            accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=sample_rate)

        return record_step

    @staticmethod
    def _check_types(module: object, optimizer: object, data_loader: object) -> None:
        if not isinstance(module, nn.Module):
            raise DPTypeError(f"module={_show(module)} must be a torch.nn.Module.")
        if isinstance(optimizer, DPOptimizer):
            raise DPTypeError(
                "optimizer is already a DPOptimizer (make_private was called on it). Pass the "
                "original torch optimizer."
            )
        if not isinstance(optimizer, Optimizer):
            raise DPTypeError(
                f"optimizer={_show(optimizer)} must be a torch.optim.Optimizer, e.g. "
                "torch.optim.SGD(model.parameters(), lr=0.1)."
            )
        if not isinstance(data_loader, DataLoader):
            raise DPTypeError(
                f"data_loader={_show(data_loader)} must be a torch.utils.data.DataLoader."
            )

    def _check_secure_options(self, noise_generator: object) -> None:
        if self.secure_mode and noise_generator is not None:
            raise DPValueError(
                f"noise_generator={noise_generator!r} was given with secure_mode=True; secure "
                "noise comes from a CSPRNG that cannot be seeded. Drop noise_generator, or "
                "use PrivacyEngine(secure_mode=False) for reproducible noise."
            )

    @staticmethod
    def _private_loader(
        data_loader: DataLoader[Any],
        poisson_sampling: bool,
        sample_rate: float | None,
        sync: GradientSync | None = None,
        secure: SecureRandom | None = None,
    ) -> tuple[DataLoader[Any], float]:
        if poisson_sampling:
            kind = DPDataLoader if sync is None else DistributedDPDataLoader
            loader = kind.from_data_loader(data_loader, sample_rate=sample_rate, generator=secure)
            return loader, loader.sample_rate
        return data_loader, resolve_sample_rate(data_loader, sample_rate)


def _budget_from(max_epsilon: float | None, budget_delta: float | None) -> PrivacyBudget | None:
    if max_epsilon is None and budget_delta is None:
        return None
    if max_epsilon is None or budget_delta is None:
        raise DPValueError(
            f"Pass both max_epsilon= and budget_delta= (got max_epsilon={max_epsilon!r}, "
            f"budget_delta={budget_delta!r}): a budget is an epsilon at a given delta."
        )
    return PrivacyBudget(epsilon=max_epsilon, delta=budget_delta)


def _planned_steps(epochs: int | None, loader: DataLoader[Any]) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DPValueError(f"epochs={epochs!r} must be a positive whole number of passes.")
    return epochs * len(loader)


def _show(value: object) -> str:
    """``'text' (str)``: the value and its type, shortened, for error messages."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _dataset_size(data_loader: DataLoader[Any]) -> int:
    try:
        return len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError as error:
        raise DPTypeError(
            "data_loader.dataset has no len(); private training needs a map-style dataset."
        ) from error


def _check_no_meta_parameters(module: nn.Module) -> None:
    """Parameters on the meta device have no values: training them cannot work."""
    meta = [name for name, p in module.named_parameters() if p.device.type == "meta"]
    if meta:
        shown = ", ".join(meta[:8]) + (" ..." if len(meta) > 8 else "")
        raise DPValueError(
            f"These parameters are on the meta device (shapes without values): {shown}. "
            "Materialise the model first, e.g. model.to_empty(device='cpu') and then "
            "model.load_state_dict(weights), before building the optimizer."
        )


def _check_parameter_identity(module: nn.Module, optimizer: Optimizer) -> list[nn.Parameter]:
    """The trainable parameters, once the optimizer is shown to hold exactly them."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    in_module = set(module.parameters())
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    stale = [p for p in in_optimizer if p not in in_module]
    optimized = set(in_optimizer)
    missing = [
        name for name, p in module.named_parameters() if p.requires_grad and p not in optimized
    ]
    if stale:
        raise ParameterMismatchError(
            f"The optimizer holds {len(stale)} parameter(s) that are not in the module. This "
            "usually means the model was changed (for example by ModuleValidator.fix) AFTER "
            "the optimizer was built, so the optimizer would update the old layers. Build the "
            "optimizer from the final model: model = ModuleValidator.fix(model); "
            "optimizer = torch.optim.SGD(model.parameters(), ...)."
        )
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ParameterMismatchError(
            f"These trainable parameters are not in the optimizer: {shown}. Their per-sample "
            "gradients would still count towards clipping but never be trained. Pass them to "
            "the optimizer, or freeze them with p.requires_grad_(False) before make_private."
        )
    return trainable


__all__ = ["DPError", "PrivacyEngine"]
