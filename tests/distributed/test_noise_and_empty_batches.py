"""Noise is added once over all ranks; tiny batches (empty on some ranks) neither hang nor skip."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from dptorch import PrivacyEngine
from tests.distributed import workers

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def test_summed_release_has_the_noise_variance_of_one_process(
    two_ranks: list[dict[str, Any]],
) -> None:
    released = two_ranks[0]["released"].double()  # 40,000 draws of pure noise
    assert torch.equal(two_ranks[0]["released"], two_ranks[1]["released"])
    expected_batch = workers.VARIANCE_Q * workers.VARIANCE_N
    want = (workers.VARIANCE_SIGMA * workers.VARIANCE_C / expected_batch) ** 2
    # The sample variance of n normal draws has relative std sqrt(2 / n) = 0.7% here; 5% is
    # 7 standard errors, and noise from both ranks would give 2x (+100%).
    assert released.numel() == workers.VARIANCE_STEPS * 10_000
    assert abs(released.var().item() / want - 1) < 0.05
    assert abs(released.mean().item()) < 5 * (want / released.numel()) ** 0.5


def test_empty_local_batches_step_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = two_ranks
    sizes0, sizes1 = rank0["sparse_sizes"], rank1["sparse_sizes"]
    assert len(sizes0) == len(sizes1) == workers.SPARSE_STEPS
    # The point of the scenario: some steps had an empty batch on one rank only, or on both.
    assert any((a == 0) != (b == 0) for a, b in zip(sizes0, sizes1, strict=True))
    assert any(a == b == 0 for a, b in zip(sizes0, sizes1, strict=True))
    assert rank0["sparse_accounted"] == rank1["sparse_accounted"] == workers.SPARSE_STEPS
    assert torch.equal(rank0["sparse_params"], rank1["sparse_params"])


def test_epsilon_is_the_same_on_every_rank_and_in_one_process(
    two_ranks: list[dict[str, Any]],
) -> None:
    engine = PrivacyEngine()  # what one process running the same steps reports
    for _ in range(workers.SPARSE_STEPS):
        engine.accountant.step(noise_multiplier=1.0, sample_rate=workers.SPARSE_Q)
    expected = engine.get_epsilon(workers.DELTA)
    assert two_ranks[0]["sparse_epsilon"] == two_ranks[1]["sparse_epsilon"] == expected


def test_settings_that_differ_between_ranks_are_refused_on_every_rank(
    two_ranks: list[dict[str, Any]],
) -> None:
    for result in two_ranks:
        message = result["mismatch_error"]
        assert message is not None
        assert "max_grad_norm: rank 0: 1, rank 1: 2" in message


def test_make_private_with_epsilon_calibrates_the_same_sigma_as_one_process(
    two_ranks: list[dict[str, Any]],
) -> None:
    model = workers.make_model()
    _, optimizer, _ = PrivacyEngine().make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(workers.make_data(), batch_size=int(workers.Q * workers.N)),
        target_epsilon=3.0,
        target_delta=workers.DELTA,
        epochs=2,
        max_grad_norm=1.0,
    )
    sigmas = [result["calibrated_sigma"] for result in two_ranks]
    assert sigmas[0] == sigmas[1] == optimizer.noise_multiplier
