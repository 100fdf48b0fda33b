"""The distributed Poisson sampler splits exactly the batches one process would draw."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPValueError, PrivacyEngine
from dptorch.data import DistributedPoissonBatchSampler, PoissonBatchSampler


def _batches(sampler: PoissonBatchSampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_split_the_single_process_batches_evenly(world_size: int) -> None:
    n, q, steps = 97, 0.1, 30
    single = _batches(PoissonBatchSampler(n, q, steps, torch.Generator().manual_seed(5)))
    shares = [
        _batches(
            DistributedPoissonBatchSampler(
                n, q, steps, torch.Generator().manual_seed(5), rank=r, world_size=world_size
            )
        )
        for r in range(world_size)
    ]
    for t, batch in enumerate(single):
        parts = [share[t] for share in shares]
        assert sorted(i for part in parts for i in part) == batch  # each example exactly once
        sizes = [len(part) for part in parts]
        assert max(sizes) - min(sizes) <= 1
    assert all(len(share) == steps for share in shares)  # empty shares still come out


def test_resume_state_is_shared_by_all_ranks() -> None:
    # Every rank's generator is in the same state, so any rank's checkpoint resumes all.
    samplers = [
        DistributedPoissonBatchSampler(
            50, 0.2, 6, torch.Generator().manual_seed(1), rank=r, world_size=2
        )
        for r in range(2)
    ]
    for sampler in samplers:
        _batches(sampler)
    states = [s.resume_state(consumed=0)["generator_state"] for s in samplers]
    assert torch.equal(states[0], states[1])


@pytest.mark.parametrize(
    ("rank", "world_size", "match"),
    [(2, 2, "rank=2"), (-1, 2, "rank=-1"), (0, 0, "world_size=0"), (True, 2, "rank=True")],
)
def test_bad_rank_or_world_size_is_refused(rank: object, world_size: object, match: str) -> None:
    with pytest.raises(DPValueError, match=match):
        DistributedPoissonBatchSampler(10, 0.5, rank=rank, world_size=world_size)  # type: ignore[arg-type]


def test_distributed_without_a_process_group_is_refused() -> None:
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    with pytest.raises(DPValueError, match="init_process_group"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            distributed=True,
        )
