"""What each rank runs in the distributed tests (importable by spawned processes)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from dptorch import BatchMemoryManager, PrivacyBudgetExceededError, PrivacyEngine
from dptorch.errors import DPValueError

N, Q, STEPS, C, LR = 48, 0.25, 4, 0.5, 0.5
DELTA = 1e-5


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(11)
    return TensorDataset(
        torch.randn(N, 6, generator=generator), torch.randint(0, 3, (N,), generator=generator)
    )


def make_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def make_run(
    engine: PrivacyEngine, model: nn.Module, *, sigma: float, loader_seed: int = 7, **options: Any
) -> tuple[nn.Module, Any, Any]:
    loader = DataLoader(
        make_data(), batch_size=int(Q * N), generator=torch.Generator().manual_seed(loader_seed)
    )
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = torch.optim.SGD(inner.parameters(), lr=LR)
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


def train(model: nn.Module, optimizer: Any, loader: Any, steps: int) -> list[int]:
    """``steps`` steps (passes restart as needed); returns the local batch sizes."""
    sizes: list[int] = []
    criterion = nn.CrossEntropyLoss()
    while len(sizes) < steps:
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            sizes.append(len(y))
            if len(sizes) == steps:
                break
    return sizes


def run_physical_pass(model: nn.Module, optimizer: Any, loader: Any) -> int:
    """One pass in physical batches of at most 2 examples; returns the physical steps."""
    criterion = nn.CrossEntropyLoss()
    physical_steps = 0
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=2, optimizer=optimizer
    ) as physical:
        for x, y in physical:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            physical_steps += 1
    return physical_steps


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def equivalence_and_resume(rank: int, world_size: int, checkpoint: str) -> dict[str, Any]:
    """Noise 0 through a DDP wrapper; noise > 0 with BatchMemoryManager, budget, checkpoint."""
    out: dict[str, Any] = {}
    # 1. sigma = 0: the same parameters as one process on the same logical batches.
    ddp = DistributedDataParallel(make_model())
    model, optimizer, loader = make_run(PrivacyEngine(), ddp, sigma=0.0)
    out["unwrapped"] = model is ddp.module
    out["local_sizes"] = train(model, optimizer, loader, STEPS)
    out["noiseless"] = flat_params(model)

    # 2. sigma > 0 split into physical batches: ranks agree, one accounting step per step.
    engine = PrivacyEngine()
    model, optimizer, loader = make_run(
        engine, make_model(), sigma=1.0, noise_generator=torch.Generator().manual_seed(3)
    )
    out["physical_steps"] = run_physical_pass(model, optimizer, loader)
    out["logical_steps"] = optimizer.logical_steps
    out["noisy"] = flat_params(model)
    out["epsilon"] = engine.get_epsilon(DELTA)
    out["accounted_steps"] = len(engine.accountant)

    # 3. Checkpoint after 2 steps (rank 0 writes), resume on every rank, 2 more steps.
    engine = PrivacyEngine()
    options = {"noise_generator": torch.Generator().manual_seed(4)}
    model, optimizer, loader = make_run(engine, make_model(), sigma=1.0, **options)
    batches = iter(loader)  # one pass of 4 batches, interrupted after 2
    train(model, optimizer, batches, 2)
    engine.save_checkpoint(path=checkpoint, module=model, optimizer=optimizer, data_loader=loader)
    out["file_exists_after_save"] = Path(checkpoint).exists()
    train(model, optimizer, batches, 2)
    out["uninterrupted"] = flat_params(model)
    resumed_engine = PrivacyEngine()
    options = {"noise_generator": torch.Generator().manual_seed(99)}
    model, optimizer, loader = make_run(
        resumed_engine, make_model(), sigma=1.0, loader_seed=1, **options
    )
    info = resumed_engine.load_checkpoint(
        path=checkpoint, module=model, optimizer=optimizer, data_loader=loader
    )
    out["resumed_steps"] = info.steps
    out["resumed_batches"] = train(model, optimizer, loader, 2)
    out["resumed"] = flat_params(model)

    # 4. The budget refuses the same step on every rank, before any collective.
    engine = PrivacyEngine()
    model, optimizer, loader = make_run(engine, make_model(), sigma=1.0)
    engine.set_budget(epsilon=out["epsilon"] * 0.999, delta=DELTA)  # a bit less than 4 steps
    refused_at = None
    try:
        train(model, optimizer, loader, 10)
    except PrivacyBudgetExceededError:
        refused_at = len(engine.accountant)
    out["refused_at"] = refused_at
    return out


VARIANCE_N, VARIANCE_Q, VARIANCE_STEPS, VARIANCE_SIGMA, VARIANCE_C = 40, 0.1, 4, 1.5, 2.0
SPARSE_Q, SPARSE_STEPS = 0.02, 12  # expected global batch: 0.96 examples


def noise_and_empty_batches(rank: int, world_size: int) -> dict[str, Any]:
    """Noise of the summed release; tiny batches (empty on some ranks); refused set-ups."""
    out: dict[str, Any] = {}
    # 1. Inputs of zeros and no bias: the clipped sum is 0 and p.grad is the noise alone.
    # No DDP wrapper: make_private turns distributed on because the group has 2 ranks.
    data = TensorDataset(torch.zeros(VARIANCE_N, 100), torch.zeros(VARIANCE_N, dtype=torch.long))
    model = nn.Linear(100, 100, bias=False)  # 10,000 noise coordinates per step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=int(VARIANCE_Q * VARIANCE_N)),
        noise_multiplier=VARIANCE_SIGMA,
        max_grad_norm=VARIANCE_C,
        noise_generator=torch.Generator().manual_seed(1234 + rank),
    )
    grads = []
    for _, (x, y) in zip(range(VARIANCE_STEPS), loader, strict=False):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        grads.append(model.weight.grad.detach().flatten().clone())
    out["released"] = torch.cat(grads)  # [VARIANCE_STEPS * 10,000]

    # 2. Expected global batch of 1 over 2 ranks: most local batches are empty.
    data = make_data()
    engine = PrivacyEngine()
    model = make_model()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(
            data, batch_size=1, generator=torch.Generator().manual_seed(rank)
        ),  # different seeds per rank on purpose: the loader broadcasts rank 0's state
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=SPARSE_Q,
    )
    out["sparse_sizes"] = train(model, optimizer, loader, SPARSE_STEPS)
    out["sparse_params"] = flat_params(model)
    out["sparse_accounted"] = len(engine.accountant)
    out["sparse_epsilon"] = engine.get_epsilon(DELTA)

    # 3. Ranks given different settings are refused on every rank, before anything changes.
    model = make_model()
    try:
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(make_data(), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0 + rank,
        )
        out["mismatch_error"] = None
    except DPValueError as error:
        out["mismatch_error"] = str(error)

    # 4. Calibration picks the same sigma on every rank (checked equal across ranks, too).
    engine = PrivacyEngine()
    ddp = DistributedDataParallel(make_model())
    _, optimizer, _ = engine.make_private_with_epsilon(
        module=ddp,
        optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
        data_loader=DataLoader(make_data(), batch_size=int(Q * N)),
        target_epsilon=3.0,
        target_delta=DELTA,
        epochs=2,
        max_grad_norm=1.0,
    )
    out["calibrated_sigma"] = optimizer.noise_multiplier

    dist.barrier()
    return out


def doc_example(rank: int, world_size: int, code: str) -> dict[str, Any]:
    """Run a docs/distributed.md block in the group the harness made (its own is skipped)."""
    namespace: dict[str, Any] = {"__name__": "__docs_distributed__"}
    with (
        mock.patch.object(dist, "init_process_group"),
        mock.patch.object(dist, "destroy_process_group"),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        exec(compile(code, "docs/distributed.md", "exec"), namespace)
    return {"doc_epsilon": namespace["engine"].get_epsilon(DELTA)}


def all_scenarios(rank: int, world_size: int, checkpoint: str, doc_code: str) -> dict[str, Any]:
    """Every scenario in one process group: spawning ranks costs more than running them."""
    return {
        **equivalence_and_resume(rank, world_size, checkpoint),
        **noise_and_empty_batches(rank, world_size),
        **doc_example(rank, world_size, doc_code),
    }
