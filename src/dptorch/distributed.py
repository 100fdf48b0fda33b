"""Private training on several processes with ``torch.distributed`` (one DP-SGD run, W ranks).

One global step of W ranks is one DP-SGD step of one process on the union of their batches:

```
every rank: the same Poisson logical batch (common sampler seed), rows rank::W of it
  -> forward/backward on its own rows, clip each of its own examples to C
  -> local clipped sum / (q N)                  (q N: the GLOBAL expected batch size)
  -> rank 0 only adds N(0, (sigma C / (q N))^2)  (every other rank adds nothing)
  -> all-reduce (sum) of one flat buffer per (device, dtype)
  -> the same gradient on every rank -> the same update -> the same parameters
  -> one accounting step on every rank (identical accountants, identical epsilon)
```

DDP's own gradient reducer is not used: it would all-reduce the non-private autograd
gradients, and it waits for gradients that dptorch deliberately does not compute
(:mod:`dptorch.per_sample.grad_skipping`). ``make_private`` therefore accepts a
``DistributedDataParallel`` model but trains its ``.module``; dptorch all-reduces the clipped
sums itself. Every rank must call ``make_private`` and every ``optimizer.step()`` (also on an
empty local batch), which the Poisson loader guarantees by giving every rank the same number
of batches.

A ``fully_shard`` (FSDP2) model is trained as it is, with a
:class:`~dptorch.fsdp.ShardedGradientSync`: the clipped sums are reduce-scattered and every
rank adds the noise of its own shard (see :mod:`dptorch.fsdp`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dptorch.errors import DPValueError, TrainingLoopError

if TYPE_CHECKING:  # the optimizer imports this module
    from dptorch.optimizers.dp_optimizer import DPOptimizer

__all__ = [
    "GradientSync",
    "check_distributed_run",
    "check_same_on_all_ranks",
    "distributed_is_active",
    "join_ranks",
    "resolve_distributed",
    "unwrap_module",
]


@dataclass(frozen=True)
class GradientSync:
    """Sums released gradients over the ranks of ``group``; rank 0 draws the noise.

    Attributes:
        group: the process group (``None``: the default group).
        rank: this process's rank in ``group``.
        world_size: the number of ranks in ``group``.

    Privacy: exactly one rank (rank 0) draws Gaussian noise, so the all-reduced sum carries
    noise of std ``sigma * C`` once, not ``sqrt(W)`` times; every rank clips only its own
    examples, so the all-reduced clipped sum has per-example sensitivity C as in one process.
    """

    group: Any
    rank: int
    world_size: int

    @classmethod
    def from_group(cls, group: Any = None) -> GradientSync:
        """The sync for ``group`` (the default process group when ``None``)."""
        if not distributed_is_active():
            raise DPValueError(
                "distributed=True, but torch.distributed has no initialised process group. "
                "Call torch.distributed.init_process_group(...) on every rank first (torchrun "
                "sets the environment for init_process_group('gloo' or 'nccl'))."
            )
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def draws_noise(self) -> bool:
        """Whether this rank adds the step's noise (rank 0 only)."""
        return self.rank == 0

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes shared files such as checkpoints (rank 0 only)."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where small control tensors live for this backend (NCCL needs CUDA tensors)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum_(self, flat: Tensor) -> None:
        """Replace ``flat`` by its sum over all ranks, in place (identical on every rank)."""
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast_(self, tensor: Tensor) -> None:
        """Overwrite ``tensor`` with rank 0's value, in place."""
        moved = tensor.to(self.device)
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(moved, src=source, group=self.group)
        if moved is not tensor:
            tensor.copy_(moved)

    def broadcast_generator(self, generator: torch.Generator) -> None:
        """Give ``generator`` rank 0's state, so every rank draws the same numbers."""
        state = generator.get_state()  # uint8 [n]
        self.broadcast_(state)
        generator.set_state(state)

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                self.broadcast_(tensor.data)

    @contextlib.contextmanager
    def one_writer(self, what: str) -> Iterator[bool]:
        """Let rank 0 write ``what``; every rank leaves once it is written, or all raise.

        Yields whether this rank is the writer. Rank 0 then tells the others whether the
        write succeeded, so a failure is an error everywhere instead of a rank reading a
        file that was never written.
        """
        ok = torch.zeros(1, dtype=torch.int32)
        try:
            yield self.is_writer
            ok.fill_(1)
        finally:
            self.broadcast_(ok)  # rank 0 sends whether it wrote; the others receive it
        if not ok.item():
            raise TrainingLoopError(
                f"rank 0 failed to write {what}; see rank 0's error. Every rank stops so "
                "that none continues from a file that was not written."
            )


def distributed_is_active() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def wants_distributed(module: nn.Module, distributed: bool | None) -> bool:
    """Resolve ``make_private(distributed=...)``: ``None`` means "if running distributed".

    ``None`` turns it on for a ``DistributedDataParallel`` or ``fully_shard`` model, or when
    a process group with more than one rank is initialised.

    Raises:
        DPValueError: ``distributed=False`` for a ``fully_shard`` model.
    """
    from dptorch.fsdp import is_fully_sharded

    if distributed is False and is_fully_sharded(module):
        raise DPValueError(
            f"distributed=False, but module ({type(module).__name__}) is sharded with "
            "fully_shard (FSDP2): each rank holds only part of its parameters. Pass "
            "distributed=True (or leave it None), or pass the model without fully_shard."
        )
    if distributed is not None:
        return bool(distributed)
    if isinstance(module, DistributedDataParallel) or is_fully_sharded(module):
        return True
    return distributed_is_active() and dist.get_world_size() > 1


def unwrap_module(module: nn.Module) -> nn.Module:
    """The model dptorch trains: ``module.module`` for DDP, ``module`` itself otherwise.

    A ``fully_shard`` (FSDP2) model is trained as it is.
    """
    if isinstance(module, DistributedDataParallel):
        return module.module
    return module


def resolve_distributed(
    module: nn.Module, distributed: bool | None
) -> tuple[nn.Module, GradientSync | None]:
    """``make_private``'s first step: the model to train, and the sync if distributed.

    The sync of a ``fully_shard`` (FSDP2) model is a :class:`~dptorch.fsdp.ShardedGradientSync`.
    """
    from dptorch.fsdp import ShardedGradientSync, is_fully_sharded

    if not wants_distributed(module, distributed):
        return unwrap_module(module), None
    kind = ShardedGradientSync if is_fully_sharded(module) else GradientSync
    return unwrap_module(module), kind.from_group()


def check_distributed_run(
    sync: GradientSync, optimizer: DPOptimizer, loader: Any, sample_rate: float
) -> None:
    """Refuse what cannot run as one private step over all ranks; nothing is changed.

    Raises:
        DPValueError: adaptive clipping (its private count is taken per rank), settings
            that differ between ranks, or an FSDP2 model set up in a way the sharded release
            does not handle (see :func:`dptorch.fsdp.check_sharded_model`).
    """
    from dptorch.fsdp import ShardedGradientSync, check_sharded_model

    if isinstance(sync, ShardedGradientSync):  # raises on every rank alike, before collectives
        check_sharded_model(sync, optimizer.engine.module, optimizer.trainable_parameters())
    if getattr(optimizer.clipping, "update", None) is not None:
        raise DPValueError(
            f"clipping={type(optimizer.clipping).__name__} adapts its norm from a noisy count "
            "of each step's unclipped examples, which is not yet summed over ranks. Use "
            "clipping='flat', 'automatic' or 'per_layer' with distributed training."
        )
    settings = {
        "sample_rate": sample_rate,
        "noise_multiplier": optimizer.noise_multiplier,
        "max_grad_norm": optimizer.max_grad_norm,
        "expected_batch_size": optimizer.expected_batch_size,
        "loss_reduction (1 = mean)": float(optimizer.loss_reduction == "mean"),
        "trainable parameters": float(sum(p.numel() for p in optimizer.trainable_parameters())),
    }
    with contextlib.suppress(TypeError):  # a loader without len() (user's, non-Poisson)
        settings["batches per pass"] = float(len(loader))
    check_same_on_all_ranks(sync, settings)


def join_ranks(sync: GradientSync, module: nn.Module, optimizer: DPOptimizer) -> None:
    """``make_private``'s last step: start every rank from rank 0's model, sum every release.

    Privacy: from here on each ``optimizer.step()`` releases, on every rank, the same
    ``(sum over all ranks of clipped sums + N(0, (sigma C)^2)) / (q N)`` (for FSDP2, each
    rank its own shard of it: :func:`dptorch.fsdp.join_sharded`).
    """
    from dptorch.fsdp import ShardedGradientSync, join_sharded

    if isinstance(sync, ShardedGradientSync):
        join_sharded(sync, module, optimizer)
        return
    sync.broadcast_module(module)
    optimizer.gradient_sync = sync


def check_same_on_all_ranks(sync: GradientSync, settings: Mapping[str, float]) -> None:
    """Refuse a run whose ranks were given different DP settings (all differences reported).

    Privacy: the all-reduced step is private only if every rank clips to the same C, divides
    by the same expected batch size and samples at the same q that every accountant charges.
    """
    names = list(settings)
    ours = torch.tensor([float(settings[n]) for n in names], dtype=torch.float64)
    gathered = [torch.empty_like(ours, device=sync.device) for _ in range(sync.world_size)]
    dist.all_gather(gathered, ours.to(sync.device), group=sync.group)
    table = torch.stack([g.cpu() for g in gathered])  # [W, len(names)]
    differ = [
        f"{name}: " + ", ".join(f"rank {r}: {table[r, i].item():.6g}" for r in range(len(table)))
        for i, name in enumerate(names)
        if not bool((table[:, i] == table[0, i]).all())
    ]
    if differ:
        raise DPValueError(
            "The ranks were given different privacy settings, so their steps cannot be summed "
            "into one private step:\n  - "
            + "\n  - ".join(differ)
            + "\nPass the same dataset (its full length on every rank), batch size, "
            "noise_multiplier and max_grad_norm on every rank."
        )
