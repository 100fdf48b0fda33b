"""What each rank runs in the FSDP2 (``fully_shard``) tests (importable by spawned processes)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyBudgetExceededError, PrivacyEngine
from dptorch.errors import DPValueError
from tests.distributed import workers

N, Q, STEPS, C, LR = 48, 0.25, 4, 0.5, 0.5
DELTA = 1e-5
# Pure-noise scenario: inputs of zeros, so the clipped sum is 0 and p.grad is the noise.
NOISE_N, NOISE_Q, NOISE_STEPS, NOISE_SIGMA, NOISE_C = 40, 0.1, 4, 1.5, 2.0
NOISE_IN, NOISE_OUT = 100, 101  # 101 rows over 2 ranks: shards of 51 and 50 rows
SPARSE_Q, SPARSE_STEPS = 0.02, 12  # expected global batch 0.96: most local batches empty


class Net(nn.Module):
    """Two blocks for ``fully_shard`` plus a head owned by the root's FSDP group.

    Every dimension is odd, so no parameter splits evenly over two ranks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh())
        self.block2 = nn.Sequential(nn.Linear(7, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


def make_net() -> Net:
    torch.manual_seed(5)
    return Net()


def shard(model: nn.Module) -> nn.Module:
    """The usual FSDP2 pattern: each block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for child in (model.block1, model.block2):  # type: ignore[union-attr]
        fully_shard(child)
    fully_shard(model)
    return model


def make_run(
    engine: PrivacyEngine,
    model: nn.Module,
    *,
    sigma: float,
    adam: bool = False,
    loader_seed: int = 7,
    **options: Any,
) -> tuple[nn.Module, Any, Any]:
    """Momentum SGD (or AdamW) on the logical batches of workers.make_data."""
    loader = DataLoader(
        workers.make_data(),
        batch_size=int(Q * N),
        generator=torch.Generator().manual_seed(loader_seed),
    )
    optimizer = (
        torch.optim.AdamW(model.parameters(), lr=0.05)
        if adam
        else torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sigma = 0 warns, on purpose here
        return engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=C,
            **options,
        )


def full_params(model: nn.Module) -> torch.Tensor:
    """Every parameter, gathered whole from its shards (a collective), flattened."""
    parts = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # type: ignore[operator]
        parts.append(full.detach().flatten())
    return torch.cat(parts).clone()


def equivalence(rank: int, world_size: int) -> dict[str, Any]:
    """sigma = 0: sharded training; p.grad is a shard; ordinary gradients never appear."""
    out: dict[str, Any] = {}
    engine = PrivacyEngine()
    model, optimizer, loader = make_run(engine, shard(make_net()), sigma=0.0)
    out["local_sizes"] = workers.train(model, optimizer, loader, STEPS)
    out["noiseless"] = full_params(model)
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    out["grads_are_shards"] = all(
        isinstance(p.grad, DTensor) and p.grad.to_local().shape == p.to_local().shape
        for p in params
    )
    out["local_shapes"] = [tuple(p.to_local().shape) for p in params]
    out["momentum_is_sharded"] = all(
        isinstance(optimizer.state[p]["momentum_buffer"], DTensor) for p in params
    )

    # The same logical batches split into physical batches of at most 2 examples per rank.
    model, optimizer, loader = make_run(PrivacyEngine(), shard(make_net()), sigma=0.0)
    out["physical_steps"] = workers.run_physical_pass(model, optimizer, loader)
    out["physical_logical_steps"] = optimizer.logical_steps
    out["physical_noiseless"] = full_params(model)
    return out


def noise(rank: int, world_size: int) -> dict[str, Any]:
    """Zero inputs, no bias: the released gradient is the noise; each rank sends its shard."""
    from torch.distributed.fsdp import fully_shard

    data = TensorDataset(torch.zeros(NOISE_N, NOISE_IN), torch.zeros(NOISE_N, dtype=torch.long))
    model = nn.Sequential(nn.Sequential(nn.Linear(NOISE_IN, NOISE_OUT, bias=False)))
    fully_shard(model[0])
    fully_shard(model)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(data, batch_size=int(NOISE_Q * NOISE_N)),
        noise_multiplier=NOISE_SIGMA,
        max_grad_norm=NOISE_C,
        # The same seed on both ranks, on purpose: the ranks must still draw different noise.
        noise_generator=torch.Generator().manual_seed(1234),
    )
    shards = []
    for _, (x, y) in zip(range(NOISE_STEPS), loader, strict=False):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        shards.append(model[0][0].weight.grad.to_local().detach().flatten().clone())
    # FSDP's own reduce-scatter of ordinary gradients never fills p.grad: there are none.
    optimizer.zero_grad()
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    no_ordinary_grad = all(p.grad is None for p in model.parameters())
    optimizer.step()
    return {"noise_shards": torch.stack(shards), "no_ordinary_grad": no_ordinary_grad}


def empty_batches_and_epsilon(rank: int, world_size: int) -> dict[str, Any]:
    """Tiny batches, empty on one rank or both: no hang, one accounting step per step."""
    engine = PrivacyEngine()
    model = shard(make_net())
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(workers.make_data(), batch_size=1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=SPARSE_Q,
    )
    out: dict[str, Any] = {}
    out["sparse_sizes"] = workers.train(model, optimizer, loader, SPARSE_STEPS)
    out["sparse_accounted"] = len(engine.accountant)
    out["sparse_epsilon"] = engine.get_epsilon(DELTA)
    out["sparse_finite"] = bool(torch.isfinite(full_params(model)).all())
    return out


def budget_calibration_and_refusals(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    """The budget, make_private_with_epsilon, and what is refused (on every rank alike)."""
    out: dict[str, Any] = {}
    engine = PrivacyEngine()
    model, optimizer, loader = make_run(engine, shard(make_net()), sigma=1.0)
    engine.set_budget(epsilon=_epsilon_of(STEPS) * 0.999, delta=DELTA)  # a bit under 4 steps
    try:
        workers.train(model, optimizer, loader, 10)
        out["refused_at"] = None
    except PrivacyBudgetExceededError:
        out["refused_at"] = len(engine.accountant)

    engine = PrivacyEngine()
    model = shard(make_net())
    _, optimizer, _ = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(workers.make_data(), batch_size=int(Q * N)),
        target_epsilon=3.0,
        target_delta=DELTA,
        epochs=2,
        max_grad_norm=1.0,
    )
    out["calibrated_sigma"] = optimizer.noise_multiplier

    # Optimizer state a checkpoint could not put back in place (a plain tensor, not a shard).
    engine = PrivacyEngine()
    model, optimizer, loader = make_run(engine, shard(make_net()), sigma=1.0)
    optimizer.original_optimizer.state[next(model.parameters())]["extra"] = torch.zeros(3)
    refused = Path(directory) / "refused.pt"
    out["checkpoint_error"] = _error_of(
        lambda: engine.save_checkpoint(path=refused, module=model, optimizer=optimizer)
    )
    out["refused_file_exists"] = refused.exists()

    from torch.distributed.fsdp import fully_shard

    unsharded_root = make_net()  # blocks sharded, the head replicated: refused
    fully_shard(unsharded_root.block1)
    layer_sharded = nn.Sequential(nn.Linear(4, 3))  # fully_shard on the Linear itself
    fully_shard(layer_sharded[0])
    fully_shard(layer_sharded)
    for name, bad in (("unsharded_root", unsharded_root), ("layer_sharded", layer_sharded)):
        out[f"{name}_error"] = _error_of(
            lambda bad=bad: PrivacyEngine().make_private(
                module=bad,
                optimizer=torch.optim.SGD(bad.parameters(), lr=0.1),
                data_loader=DataLoader(workers.make_data(), batch_size=4),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
            )
        )
    dist.barrier()
    return out


def _epsilon_of(steps: int) -> float:
    engine = PrivacyEngine()
    for _ in range(steps):
        engine.accountant.step(noise_multiplier=1.0, sample_rate=Q)
    return engine.get_epsilon(DELTA)


def _error_of(action: Any) -> str | None:
    try:
        action()
    except DPValueError as error:
        return str(error)
    return None


def checkpoint_and_resume(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    """Noise on, AdamW: 2 steps, save, 2 more (A); new objects: load, 2 steps (B); rollback."""
    path, damaged = Path(directory) / "fsdp.pt", Path(directory) / "damaged.pt"
    out: dict[str, Any] = {}
    engine = PrivacyEngine()
    model, optimizer, loader = make_run(
        engine,
        shard(make_net()),
        sigma=1.0,
        adam=True,
        noise_generator=torch.Generator().manual_seed(4),
    )
    batches = iter(loader)  # one pass of 4 batches, interrupted after 2
    workers.train(model, optimizer, batches, 2)
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer, data_loader=loader)
    out["saved_params"] = full_params(model)
    workers.train(model, optimizer, batches, 2)
    out["uninterrupted"] = _local_state(model, optimizer)
    out["uninterrupted_epsilon"] = engine.get_epsilon(DELTA)

    # Fresh objects with other sampler and noise seeds: only the checkpoint can make B == A.
    resumed = PrivacyEngine()
    model, optimizer, loader = make_run(
        resumed,
        shard(make_net()),
        sigma=1.0,
        adam=True,
        loader_seed=1,
        noise_generator=torch.Generator().manual_seed(99),
    )
    info = resumed.load_checkpoint(path=path, module=model, optimizer=optimizer, data_loader=loader)
    out["resumed_steps"], out["resumed_position"] = info.steps, info.position
    out["resumed_batches"] = workers.train(model, optimizer, loader, 2)
    out["resumed"] = _local_state(model, optimizer)
    out["resumed_epsilon"] = resumed.get_epsilon(DELTA)

    # A file that passes every check but fails at the loader, after the model and optimizer
    # were loaded: everything must be put back on every rank.
    if rank == 0:
        saved = torch.load(path, weights_only=True)
        saved["data_loader"]["position"] = 99
        torch.save(saved, damaged)
    dist.barrier()
    fresh = PrivacyEngine()
    noise_generator = torch.Generator().manual_seed(5)
    model, optimizer, loader = make_run(
        fresh, shard(make_net()), sigma=1.0, adam=True, noise_generator=noise_generator
    )
    before = (_local_state(model, optimizer), torch.get_rng_state(), noise_generator.get_state())
    out["damaged_error"] = _error_of(
        lambda: fresh.load_checkpoint(
            path=damaged, module=model, optimizer=optimizer, data_loader=loader
        )
    )
    out["rolled_back"] = (
        torch.equal(_local_state(model, optimizer), before[0])
        and torch.equal(torch.get_rng_state(), before[1])
        and torch.equal(noise_generator.get_state(), before[2])
        and len(optimizer.state) == 0
        and len(fresh.accountant) == 0
        and all(isinstance(p, DTensor) for p in model.parameters())
    )
    dist.barrier()
    return out


def _local_state(model: nn.Module, optimizer: Any) -> torch.Tensor:
    """This rank's shards of the parameters and of every optimizer state, flattened."""
    parts = [p.to_local().detach().flatten() for p in model.parameters()]
    for p in model.parameters():
        for value in optimizer.state[p].values() if p in optimizer.state else ():
            local = value.to_local() if isinstance(value, DTensor) else value
            parts.append(local.detach().flatten().double())
    return torch.cat([part.double() for part in parts]).clone()


def all_scenarios(rank: int, world_size: int, doc_code: str, directory: str) -> dict[str, Any]:
    """Every FSDP2 scenario in one process group (spawning ranks costs more than running)."""
    here = os.getcwd()
    os.chdir(directory)  # the documented example writes its checkpoint to the working directory
    try:
        doc = workers.doc_example(rank, world_size, doc_code)
    finally:
        os.chdir(here)
    return {
        **equivalence(rank, world_size),
        **noise(rank, world_size),
        **empty_batches_and_epsilon(rank, world_size),
        **budget_calibration_and_refusals(rank, world_size, directory),
        **checkpoint_and_resume(rank, world_size, directory),
        **doc,
    }
