"""Private training of FSDP2 models (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a DTensor shard at rest (what ``model.parameters()`` and the
optimizer hold) and swaps in a full ("unsharded") parameter for forward and backward. One
private step:

```
every rank: its share of the common Poisson batch (as with DDP, dptorch.distributed)
  -> forward/backward: FSDP all-gathers the parameters; dptorch's hooks capture each layer's
     inputs and output gradients, keyed by the unsharded parameter, then by its sharded owner
  -> full-size clipped sum of this rank's examples / (q N)        [transient, full size]
  -> one reduce-scatter per (device, dtype): each rank receives ITS shard of the sum over ranks
  -> each rank adds N(0, (sigma C / (q N))^2) to its own shard only, from its own stream
  -> p.grad = that shard, a DTensor like FSDP's own gradient; the user's optimizer steps on it
```

FSDP's own reduce-scatter of the ordinary gradients never runs: dptorch computes no ordinary
gradient for layers it clips (:mod:`dptorch.per_sample.grad_skipping`), so FSDP finds nothing
to reduce; a parameter that still gets an ordinary gradient is refused by the engine's
foreign-gradient check before anything is released.

Noise streams. Every coordinate must get its noise once and independently, so the ranks must
never draw with the same generator state. Each releasing step, every rank draws one integer
``s`` from the optimizer's noise generator (its state is made the same on every rank when
training starts) and seeds a fresh generator with ``s * W + rank``. The seeds of two ranks
differ for every ``s`` (they differ mod W), so their streams are distinct by construction,
whatever the user's generators; and the whole run's noise is a function of rank 0's noise
generator state, which is what a checkpoint saves (:mod:`dptorch.fsdp_checkpoint`). (With
several (device, dtype) groups of parameters, each group of each rank has its own stream:
see :func:`shard_seed`.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dptorch.distributed import GradientSync
from dptorch.errors import DPValueError
from dptorch.noise import gaussian_noise, noise_dtype

if TYPE_CHECKING:  # the optimizer imports this module
    from dptorch.optimizers.dp_optimizer import DPOptimizer
    from dptorch.per_sample.engine import ClippedBatch

__all__ = ["ShardedGradientSync", "is_fully_sharded", "shard_seed"]


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch without FSDP2
        return None
    return FSDPModule  # type: ignore[no-any-return]


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module`` or one of its submodules."""
    fsdp_module = _fsdp_module_class()
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in module.modules())


def shard_seed(base: int, stream: int, streams: int) -> int:
    """The seed of noise stream ``stream`` of ``streams`` for one step (distinct for any base).

    A step uses ``streams = W * groups`` streams, stream ``g * W + rank`` for rank ``rank``'s
    (device, dtype) group ``g``.

    Privacy: ``s * streams + stream`` differs between streams (it is ``stream`` mod
    ``streams``), so no two ranks, and no two groups of one rank, ever draw the same noise,
    even when the ranks' common generators agree (as they should).
    """
    return base * streams + stream


@dataclass(frozen=True)
class ShardedGradientSync(GradientSync):
    """Releases FSDP2 gradients: reduce-scatter of the clipped sums, noise on each own shard.

    Privacy: each coordinate of the model lives on exactly one rank, which adds
    ``N(0, (sigma C / (q N))^2)`` to it once, from a stream no other rank uses; the
    reduce-scatter sums every rank's clipped examples, so the released shard is exactly that
    of one process's ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / (q N)``.
    """

    @property
    def draws_noise(self) -> bool:
        """Every rank draws the noise of its own shard."""
        return True

    # -- the release -----------------------------------------------------------------------
    def release_shards(
        self, optimizer: DPOptimizer, clipped: ClippedBatch, *, std: float, divisor: float
    ) -> None:
        """Set every trainable ``p.grad`` to its shard of the noisy, normalised clipped sum.

        Args:
            optimizer: the DP optimizer (its trainable DTensor parameters, generator, engine).
            clipped: this rank's clipped sums, keyed by the sharded parameters, full size.
            std: the noise std on each released coordinate, ``sigma C / divisor``.
            divisor: ``q N`` (mean loss) or 1 (sum).
        """
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for param in optimizer.trainable_parameters():
            groups.setdefault((param.device, noise_dtype(param.dtype)), []).append(param)
        # One stream per (group, rank): W * len(groups) distinct seeds from one common draw.
        streams = self.world_size * len(groups)
        base = _draw_base(optimizer.generator, streams)
        for index, ((device, dtype), members) in enumerate(groups.items()):
            layouts = [_ShardLayout.of(p, self.world_size) for p in members]
            widths = [layout.padded_numel for layout in layouts]
            send = torch.zeros(self.world_size, sum(widths), dtype=dtype, device=device)
            for layout, column, param in zip(
                layouts, send.split(widths, dim=1), members, strict=True
            ):
                total = clipped.sums.get(param)
                if total is not None:  # no example touched it: its sum is 0
                    column.copy_(layout.rows_per_rank(total.to(dtype)))
            send.div_(divisor)
            received = self._reduce_scatter(send)  # [sum(widths)]: this rank's padded shards
            generator = torch.Generator(device=device)
            generator.manual_seed(shard_seed(base, index * self.world_size + self.rank, streams))
            # Padding coordinates get noise too (one draw for the buffer) and are never released.
            received.add_(
                gaussian_noise(
                    received.shape, std=std, dtype=dtype, device=device, generator=generator
                )
            )
            for layout, piece, param in zip(layouts, received.split(widths), members, strict=True):
                param.grad = layout.as_grad(piece, param)
                optimizer.engine.note_released(param, param.grad)

    def _reduce_scatter(self, send: Tensor) -> Tensor:
        """Row ``rank`` of the sum over ranks of ``send`` ``[W, n]``."""
        out = torch.empty(send.shape[1], dtype=send.dtype, device=send.device)
        # torch 2.13 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single.
        reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
        reduce_scatter(out, send.view(-1), op=dist.ReduceOp.SUM, group=self.group)
        return out


def _draw_base(generator: Any, streams: int) -> int:
    """One integer from the common noise stream (torch's global RNG when ``None``)."""
    device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    high = (2**63 - 1) // streams  # so that every shard_seed fits in int64
    return int(torch.randint(0, high, (1,), generator=generator, device=device).item())


@dataclass(frozen=True)
class _ShardLayout:
    """Where FSDP2 keeps each rank's shard of a parameter sharded along ``dim``.

    FSDP2 splits dimension ``dim`` into ``W`` chunks of ``ceil(size / W)`` (``torch.chunk``);
    the last ones may be shorter or empty. Each rank's chunk is padded to the full chunk size
    so that every rank's row of the reduce-scatter buffer has the same length.
    """

    shape: torch.Size
    dim: int
    chunk: int
    world_size: int

    @classmethod
    def of(cls, param: Tensor, world_size: int) -> _ShardLayout:
        placements: Any = param.placements  # type: ignore[attr-defined]
        dim = placements[0].dim  # checked to be one Shard(dim) by check_sharded_model
        chunk = math.ceil(param.shape[dim] / world_size)
        return cls(param.shape, dim, chunk, world_size)

    @property
    def padded_numel(self) -> int:
        return self.chunk * math.prod(self.shape) // max(self.shape[self.dim], 1)

    def rows_per_rank(self, full: Tensor) -> Tensor:
        """``full`` as ``[W, padded_numel]``: row ``r`` is rank ``r``'s chunk, zero-padded."""
        padded_size = self.chunk * self.world_size
        if padded_size != self.shape[self.dim]:
            pad = list(self.shape)
            pad[self.dim] = padded_size - self.shape[self.dim]
            full = torch.cat([full, full.new_zeros(pad)], dim=self.dim)
        chunks = full.unflatten(self.dim, (self.world_size, self.chunk))  # [..., W, chunk, ...]
        return chunks.movedim(self.dim, 0).reshape(self.world_size, -1)

    def as_grad(self, piece: Tensor, param: Tensor) -> Tensor:
        """This rank's padded chunk ``piece``, unpadded, as a DTensor shaped like ``param``."""
        from torch.distributed.tensor import DTensor

        local_shape = param.to_local().shape  # type: ignore[attr-defined]
        local = piece[: math.prod(local_shape)].view(local_shape).to(param.dtype)
        return DTensor.from_local(
            local,
            param.device_mesh,  # type: ignore[attr-defined]
            param.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )


def check_sharded_model(
    sync: GradientSync, module: nn.Module, trainable: Sequence[nn.Parameter]
) -> None:
    """Refuse FSDP2 set-ups the sharded release cannot handle (all problems at once).

    Raises:
        DPValueError: a trainable parameter not sharded by ``fully_shard`` over all ranks
            (replicated, HSDP, a 2-D mesh), ``fully_shard`` applied to a layer that owns
            parameters itself, or a layer without a built-in per-sample rule.
    """
    from dptorch.per_sample.engine import modules_to_capture
    from dptorch.per_sample.rules import has_dedicated_rule, has_registered_rule

    names: dict[Tensor, str] = {p: name for name, p in module.named_parameters()}
    problems = [
        f"parameter {names.get(p, '?')} is {_placement_problem(p, sync)}"
        for p in trainable
        if _placement_problem(p, sync)
    ]
    fsdp_module = _fsdp_module_class()
    wanted = frozenset(trainable)
    for path, sub in module.named_modules():
        owns = [n for n, p in sub.named_parameters(recurse=False) if p in wanted]
        if fsdp_module is not None and isinstance(sub, fsdp_module) and owns:
            problems.append(
                f"fully_shard was applied to {path or '<root>'} itself, which owns the "
                f"parameters {owns}; apply fully_shard to a module that contains it (its block) "
                "so that dptorch's per-layer hooks run inside FSDP's"
            )
    for path, sub in modules_to_capture(module, wanted).items():
        if not has_dedicated_rule(sub) or has_registered_rule(sub):
            problems.append(
                f"{path} ({type(sub).__name__}) has no built-in per-sample rule; its "
                "torch.func fallback (or a registered rule's first-step check) needs the "
                "unsharded parameters after backward, which FSDP2 has freed"
            )
    if problems:
        raise DPValueError(
            "This fully_shard (FSDP2) model cannot be trained privately yet:\n  - "
            + "\n  - ".join(problems)
            + "\nApply fully_shard to blocks of built-in layers (Linear, Conv, Embedding, "
            "LayerNorm, ...) and to the root, over all ranks; or train a replicated model with "
            "DistributedDataParallel (see docs/distributed.md)."
        )


def _placement_problem(param: Tensor, sync: GradientSync) -> str:
    """Why ``param`` is not a plain FSDP2 shard over all ranks of ``sync`` ('' if it is)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return "not sharded (call fully_shard on the root module too)"
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
        return f"placed as {placements} on a {mesh.ndim}-D mesh (only 1-D FSDP, not HSDP)"
    if mesh.size() != sync.world_size or mesh.get_local_rank() != sync.rank:
        return (
            f"sharded over a mesh of {mesh.size()} ranks (this is rank {mesh.get_local_rank()}"
            f" of it), not over the {sync.world_size} ranks of the process group"
        )
    return ""


def join_sharded(sync: ShardedGradientSync, module: nn.Module, optimizer: DPOptimizer) -> None:
    """``make_private``'s last step for FSDP2: map unsharded parameters, agree on the noise.

    Each FSDP module is unsharded in turn (one all-gather, on every rank in the same order)
    to learn which full parameter FSDP puts in place of each shard during forward and
    backward (the same object every step); the engine then keys that parameter's per-sample
    terms by the shard the optimizer holds. Buffers are copied from rank 0 (FSDP leaves them
    replicated); parameters are not: each coordinate has one owner.

    Privacy: from here on each ``optimizer.step()`` releases, on each rank, its shard of
    ``(sum over all ranks of clipped sums + N(0, (sigma C)^2)) / (q N)``.
    """
    with torch.no_grad():
        for buffer in module.buffers():
            sync.broadcast_(buffer)
    optimizer.engine.alias_parameters(_unsharded_aliases(module))
    if isinstance(optimizer.generator, torch.Generator):
        sync.broadcast_generator(optimizer.generator)
    optimizer.gradient_sync = sync


def _unsharded_aliases(module: nn.Module) -> dict[Tensor, Tensor]:
    """``{unsharded parameter: the sharded one it stands for}``, by module and attribute name."""
    fsdp_module = _fsdp_module_class()
    aliases: dict[Tensor, Tensor] = {}
    for sharded in [m for m in module.modules() if fsdp_module and isinstance(m, fsdp_module)]:
        at_rest: dict[tuple[nn.Module, str], Tensor | None] = {
            (sub, name): p for sub in module.modules() for name, p in sub._parameters.items()
        }
        sharded.unshard()  # type: ignore[operator]
        try:
            for (sub, name), owner in at_rest.items():
                current = sub._parameters[name]
                if current is not None and owner is not None and current is not owner:
                    aliases[current] = owner
        finally:
            sharded.reshard()  # type: ignore[operator]
    return aliases
