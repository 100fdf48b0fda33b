"""Save and resume a private run, budget included, atomically and without unpickling code.

A checkpoint holds everything the next step depends on: the model, the wrapped optimizer's
state, the accountant's history (the budget already spent), the DP settings (accountant, sigma,
C, q, expected batch size), the noise generator's state, torch's global RNG state, the Poisson
sampler's generator and position, and the state of any extra objects (LR schedulers, ...).
Resuming from step k on CPU with the same seeds then reproduces the uninterrupted run bit for
bit, and epsilon continues from the budget spent before the interruption.

Files hold only tensors and plain containers, so they are read with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.

Secure mode (a :class:`~dptorch.secure_random.SecureRandom` noise source) saves no state of
its CSPRNG, nor of the secure sampler: such a run resumes with the right budget and position
but fresh randomness, so it is never bit-reproducible (by design: nothing in the file lets
anyone replay its noise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dptorch.accountants import Accountant
from dptorch.checkpoint_guard import optimizer_problems, snapshot
from dptorch.data import DPDataLoader
from dptorch.errors import DPTypeError, DPValueError
from dptorch.fsdp_checkpoint import full_state, local_state
from dptorch.optimizers import DPOptimizer
from dptorch.safe_torch_file import atomic_save, check_weights_only, load_weights_only
from dptorch.secure_random import SecureRandom

__all__ = ["ResumeInfo", "Stateful", "load_checkpoint", "save_checkpoint"]

_FORMAT = "dptorch.checkpoint"
_VERSION = 1


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` (schedulers, counters, ...)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass(frozen=True)
class ResumeInfo:
    """Where a loaded checkpoint left off.

    Attributes:
        steps: DP steps the accountant had recorded (the budget already spent).
        position: batches of the interrupted pass already used; the data loader's next pass
            yields only the rest (``None`` if no loader was saved).
        metadata: the ``metadata`` dict given to :func:`save_checkpoint` (e.g. the epoch).
    """

    steps: int
    position: int | None
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    module: nn.Module,
    optimizer: DPOptimizer,
    accountant: Accountant,
    sample_rate: float,
    data_loader: DPDataLoader | None = None,
    extras: Mapping[str, Stateful] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint of a private run to ``path``, atomically.

    The file is written to a temporary file in the same directory, flushed and fsynced, then
    renamed over ``path`` with ``os.replace``: a crash at any point leaves either the previous
    checkpoint or the new one, never a torn file.

    Args:
        path: the checkpoint file.
        module: the model being trained.
        optimizer: the :class:`DPOptimizer` from ``make_private``.
        accountant: the accountant charging the run.
        sample_rate: q, the Poisson rate the accountant charges per step.
        data_loader: the :class:`DPDataLoader`, to continue its batches exactly.
        extras: named objects with ``state_dict``/``load_state_dict`` (LR schedulers, ...).
        metadata: small plain values to get back on load (epoch, best accuracy, ...).

    Privacy: the file holds the accountant's full history, so a run resumed from it reports
    the budget spent before the interruption plus what it spends after.
    In distributed training every rank calls this; rank 0 writes and the others wait until
    the file is complete (or raise if rank 0 failed), then every rank can load it.

    Raises:
        DPValueError: the optimizer is in the middle of a logical batch.
        DPTypeError: ``optimizer`` is not a DPOptimizer, ``data_loader`` is not a
            DPDataLoader, or a state holds a value ``torch.load(weights_only=True)`` cannot
            read back (its place is named).
    """
    _check_parts(optimizer, data_loader)
    if getattr(optimizer, "is_accumulating", False):
        raise DPValueError(
            "save_checkpoint was called in the middle of a logical batch (the optimizer holds "
            "the clipped sum of physical batches not yet released); that partial sum is not "
            "saved. Save after a step with optimizer.is_accumulating == False."
        )
    module_state, optimizer_state = full_state(module, optimizer)  # FSDP2: gathered, whole
    checkpoint = {
        "format": _FORMAT,
        "version": _VERSION,
        "privacy": _settings(optimizer, accountant, sample_rate),
        "accountant": accountant.state_dict(),
        "module": module_state,
        "optimizer": optimizer_state,
        "rng": _rng_state(optimizer),
        "data_loader": data_loader.state_dict() if data_loader is not None else None,
        "extras": {name: obj.state_dict() for name, obj in (extras or {}).items()},
        "metadata": dict(metadata or {}),
    }
    check_weights_only(checkpoint, "checkpoint")
    sync = optimizer.gradient_sync
    if sync is None:
        atomic_save(checkpoint, Path(path))
        return
    # Distributed: every rank holds the same state (see dptorch.distributed); rank 0 writes.
    with sync.one_writer(f"checkpoint {os.fspath(path)!r}") as writer:
        if writer:
            atomic_save(checkpoint, Path(path))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    module: nn.Module,
    optimizer: DPOptimizer,
    accountant: Accountant,
    sample_rate: float,
    data_loader: DPDataLoader | None = None,
    extras: Mapping[str, Stateful] | None = None,
    map_location: str | torch.device | None = "cpu",
) -> ResumeInfo:
    """Restore a run saved by :func:`save_checkpoint` into freshly built objects.

    Everything is checked before anything is changed: a refused checkpoint leaves the
    module, optimizer, accountant, RNGs and loader as they were. Torch's global RNG state is
    restored too (it draws the noise when the optimizer has no generator of its own).

    Args:
        path: the checkpoint file.
        module, optimizer, accountant, sample_rate, data_loader, extras: the new run's
            parts, built as for the saved run; the same ``extras`` names must be given.
        map_location: where tensors are loaded before being copied into place.

    Returns:
        A :class:`ResumeInfo` (steps done, position in the pass, metadata).

    Privacy: the accountant's history is replaced by the checkpoint's, so epsilon continues
    from the budget already spent. A checkpoint whose accountant, noise multiplier, clipping
    norm, sample rate, expected batch size or loss reduction differ from this run's is
    refused: continuing it under other settings would misstate what the run spends.

    Raises:
        DPValueError: the file is not a dptorch checkpoint, holds anything but tensors and
            plain containers, or disagrees with this run (every difference is reported).
    """
    _check_parts(optimizer, data_loader)
    saved = _read(Path(path), map_location)
    where = f"checkpoint {os.fspath(path)!r}"
    problems = _mismatches(saved["privacy"], _settings(optimizer, accountant, sample_rate))
    problems += _missing_parts(saved, optimizer, data_loader, extras or {})
    problems += _module_problems(saved["module"], module)
    problems += optimizer_problems(saved["optimizer"], optimizer)
    recorded = [tuple(e) for e in accountant.history]
    if recorded and recorded != [tuple(e) for e in saved["accountant"]["history"]]:
        problems.append(
            f"the accountant already recorded {len(accountant)} step(s) that are not the "
            "checkpoint's history; replacing them would under-report the budget spent. Load "
            "checkpoints into a new PrivacyEngine, before training"
        )
    if problems:
        raise DPValueError(
            f"{where} cannot resume this run:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nBuild the run with the checkpoint's settings (the same accountant, secure_mode, "
            "noise_multiplier, max_grad_norm, data and batch size), or start a new run."
        )
    # A damaged or hand-edited file can pass the checks above and fail half-way through;
    # then every part already loaded is put back, so a refusal never leaves a mixed run.
    undo = snapshot(module, optimizer, accountant, extras or {})
    try:
        module_state, optimizer_state = local_state(
            saved["module"], saved["optimizer"], module, optimizer
        )  # FSDP2: each rank's shards of the full tensors
        module.load_state_dict(module_state)
        optimizer.load_state_dict(optimizer_state)
        for name, obj in (extras or {}).items():
            obj.load_state_dict(saved["extras"][name])
        accountant.load_state_dict(saved["accountant"])
        _restore_rng(saved["rng"], optimizer)
        if data_loader is not None:  # last: it checks everything before it changes anything
            data_loader.load_state_dict(saved["data_loader"])
    except Exception as error:
        undo()
        raise DPValueError(
            f"{where} is damaged or was edited ({type(error).__name__}: {error}); nothing "
            "was loaded. Resume from another checkpoint written by save_checkpoint."
        ) from error
    loader_state = saved["data_loader"]
    return ResumeInfo(
        steps=len(accountant),
        position=None if loader_state is None else int(loader_state["position"]),
        metadata=dict(saved["metadata"]),
    )


# -- what is saved ---------------------------------------------------------------------------
def _settings(optimizer: DPOptimizer, accountant: Accountant, sample_rate: float) -> dict[str, Any]:
    return {
        "accountant": accountant.mechanism(),
        "noise_multiplier": float(optimizer.noise_multiplier),
        "max_grad_norm": float(optimizer.max_grad_norm),
        "sample_rate": float(sample_rate),
        "expected_batch_size": float(optimizer.expected_batch_size),
        "loss_reduction": optimizer.loss_reduction,
        "secure_mode": isinstance(optimizer.generator, SecureRandom),
    }


def _rng_state(optimizer: DPOptimizer) -> dict[str, Any]:
    generator = _noise_generator(optimizer)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "noise": generator.get_state() if generator is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], optimizer: DPOptimizer) -> None:
    torch.set_rng_state(state["torch"])
    generator = _noise_generator(optimizer)
    if generator is not None:
        generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _noise_generator(optimizer: DPOptimizer) -> torch.Generator | None:
    """The optimizer's own torch generator, whose state is saved (none in secure mode)."""
    generator = optimizer.generator
    return generator if isinstance(generator, torch.Generator) else None


def _is_secure(optimizer: DPOptimizer) -> bool:
    return isinstance(optimizer.generator, SecureRandom)


def _check_parts(optimizer: object, data_loader: object) -> None:
    if not isinstance(optimizer, DPOptimizer):
        raise DPTypeError(
            f"optimizer has type {type(optimizer).__name__}; pass the DPOptimizer that "
            "make_private returned (its noise settings are part of the checkpoint)."
        )
    if data_loader is not None and not isinstance(data_loader, DPDataLoader):
        raise DPTypeError(
            f"data_loader has type {type(data_loader).__name__}; pass the DPDataLoader that "
            "make_private returned, or data_loader=None."
        )


# -- what is checked on load -----------------------------------------------------------------
def _read(path: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    saved = load_weights_only(path, map_location)
    keys = (
        "privacy",
        "accountant",
        "module",
        "optimizer",
        "rng",
        "data_loader",
        "extras",
        "metadata",
    )
    if not (
        isinstance(saved, dict) and saved.get("format") == _FORMAT and set(keys) <= saved.keys()
    ):
        raise DPValueError(
            f"{str(path)!r} is not a dptorch checkpoint (no format={_FORMAT!r} header with "
            f"{', '.join(keys)}); write checkpoints with PrivacyEngine.save_checkpoint."
        )
    if saved.get("version") != _VERSION:
        raise DPValueError(
            f"checkpoint {str(path)!r} has version={saved.get('version')!r}; this dptorch "
            f"reads version {_VERSION}. Load it with the dptorch version that wrote it."
        )
    return saved


def _mismatches(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    return [
        f"{name}: checkpoint {saved.get(name)!r}, this run {value!r}"
        for name, value in ours.items()
        if saved.get(name) != value
    ]


def _missing_parts(
    saved: dict[str, Any],
    optimizer: DPOptimizer,
    data_loader: DPDataLoader | None,
    extras: Mapping[str, Stateful],
) -> list[str]:
    problems = []
    saved_noise = saved["rng"].get("noise") is not None
    if saved_noise and _noise_generator(optimizer) is None and not _is_secure(optimizer):
        problems.append(
            "noise generator: the saved run drew noise from its own generator, this run from "
            "torch's global RNG; pass noise_generator=torch.Generator() to make_private"
        )
    elif not saved_noise and _noise_generator(optimizer) is not None:
        problems.append(
            "noise generator: the saved run drew noise from torch's global RNG, this run from "
            "its own generator; leave noise_generator unset in make_private"
        )
    if (saved["data_loader"] is None) != (data_loader is None):
        problems.append(
            "data_loader: the checkpoint has a loader state but none was given (pass the "
            "DPDataLoader from make_private)"
            if data_loader is None
            else "data_loader: given, but the checkpoint saved none (pass data_loader=None)"
        )
    if saved["data_loader"] is not None and data_loader is not None:
        problems += [
            f"data_loader {p}"
            for p in _mismatches(saved["data_loader"], _loader_shape(data_loader))
        ]
    missing = sorted(set(saved["extras"]) - set(extras))
    unknown = sorted(set(extras) - set(saved["extras"]))
    if missing or unknown:
        problems.append(
            f"extras: the checkpoint has {sorted(saved['extras'])}, this run passed "
            f"{sorted(extras)}; pass the same names"
        )
    return problems


def _loader_shape(data_loader: DPDataLoader) -> dict[str, Any]:
    state = data_loader.state_dict()
    return {key: state[key] for key in ("sample_rate", "steps", "num_samples")}


def _module_problems(saved: Mapping[str, Tensor], module: nn.Module) -> list[str]:
    """Keys and shapes, checked up front: load_state_dict may copy some before it fails."""
    ours = module.state_dict()
    problems = [f"module: missing {k!r} in the checkpoint" for k in ours if k not in saved]
    problems += [f"module: unexpected {k!r} in the checkpoint" for k in saved if k not in ours]
    problems += [
        f"module: {k!r} has shape {tuple(saved[k].shape)} in the checkpoint, "
        f"{tuple(v.shape)} in this model"
        for k, v in ours.items()
        if k in saved and isinstance(saved[k], Tensor) and saved[k].shape != v.shape
    ]
    return problems
