"""Saving and restoring where Poisson sampling stands, mid-pass included."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from dptorch import DPDataLoader, DPValueError
from dptorch.data import PoissonBatchSampler

STEPS = 5
PASSES = 3


def _loader(num_workers: int = 0, steps: int = STEPS) -> DPDataLoader:
    return DPDataLoader(
        TensorDataset(torch.arange(30)),
        sample_rate=0.2,
        steps=steps,
        generator=torch.Generator().manual_seed(3),
        num_workers=num_workers,
    )


def _batches(loader: DPDataLoader, passes: int) -> list[list[int]]:
    return [batch[0].tolist() for _ in range(passes) for batch in loader]


@pytest.mark.parametrize("used", range(1, STEPS * PASSES))
def test_a_restored_loader_yields_exactly_the_batches_not_yet_used(used: int) -> None:
    expected = _batches(_loader(), PASSES)
    first, seen = _loader(), []
    while len(seen) < used:
        for batch in first:
            seen.append(batch[0].tolist())
            if len(seen) == used:
                break
    state = first.state_dict()
    assert state["position"] == used % STEPS

    resumed = _loader()
    torch.manual_seed(123)  # nothing may depend on the global RNG
    resumed.load_state_dict(state)
    rest: list[list[int]] = []
    while len(seen) + len(rest) < len(expected):
        rest += [batch[0].tolist() for batch in resumed]
    assert seen + rest == expected


def test_prefetching_workers_do_not_move_the_saved_position() -> None:
    expected = _batches(_loader(), 1)
    first = _loader(num_workers=1)  # its sampler runs ahead of what the loop has received
    iterator = iter(first)
    seen = [next(iterator)[0].tolist() for _ in range(2)]
    state = first.state_dict()
    del iterator
    resumed = _loader()
    resumed.load_state_dict(state)
    assert seen + _batches(resumed, 1) == expected


def test_a_state_from_another_loader_is_refused() -> None:
    state = _loader().state_dict()
    with pytest.raises(DPValueError, match=r"steps: saved 5, this loader 6"):
        _loader(steps=6).load_state_dict(state)


def test_without_a_generator_the_loader_owns_one_seeded_from_torch() -> None:
    dataset = TensorDataset(torch.arange(30))
    torch.manual_seed(0)
    first = DPDataLoader(dataset, sample_rate=0.2)
    torch.manual_seed(0)
    second = DPDataLoader(dataset, sample_rate=0.2)
    assert first.generator is not None
    # Draws from the global RNG in between (dropout, noise) do not change the batches.
    batches = []
    for batch in second:
        torch.rand(100)
        batches.append(batch[0].tolist())
    assert _batches(first, 1) == batches


def test_a_global_generator_sampler_cannot_save_mid_pass() -> None:
    sampler = PoissonBatchSampler(30, 0.2, steps=STEPS)
    iterator = iter(sampler)
    next(iterator)
    with pytest.raises(DPValueError, match="global generator"):
        sampler.resume_state(consumed=1)
    assert sampler.resume_state(consumed=0)["skip"] == 0  # between passes it can


def test_malformed_sampler_states_are_refused() -> None:
    sampler = PoissonBatchSampler(30, 0.2, steps=STEPS, generator=torch.Generator())
    with pytest.raises(DPValueError, match="0 <= skip < steps=5"):
        sampler.load_resume_state({"generator_state": torch.zeros(3, dtype=torch.uint8), "skip": 5})
    with pytest.raises(DPValueError, match="0 <= skip < steps=5"):  # a bool is not a count
        sampler.load_resume_state(
            {"generator_state": torch.zeros(3, dtype=torch.uint8), "skip": True}
        )
    with pytest.raises(DPValueError, match="does not fit"):
        sampler.load_resume_state({"generator_state": torch.zeros(3, dtype=torch.uint8), "skip": 1})
