"""DP-SGD over two gloo ranks on CPU equals DP-SGD in one process on the same logical batches."""

from __future__ import annotations

import warnings

import pytest
import torch

from dptorch import PrivacyEngine
from tests.distributed import workers

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

# Two ranks sum the same clipped terms in another order: float32 rounding only.
ATOL = 1e-5


def _single_process(sigma: float, *, physical: bool, noise_seed: int | None = None):
    engine = PrivacyEngine()
    options = (
        {} if noise_seed is None else {"noise_generator": torch.Generator().manual_seed(noise_seed)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = workers.make_run(
            engine, workers.make_model(), sigma=sigma, distributed=False, **options
        )
    if physical:
        workers.run_physical_pass(model, optimizer, loader)
    else:
        workers.train(model, optimizer, loader, workers.STEPS)
    return workers.flat_params(model), engine


def test_noiseless_two_ranks_match_one_process_through_a_ddp_wrapper(two_ranks: list[dict]) -> None:
    rank0, rank1 = two_ranks
    assert rank0["unwrapped"] and rank1["unwrapped"]
    expected, _ = _single_process(0.0, physical=False)
    torch.testing.assert_close(rank0["noiseless"], expected, rtol=0, atol=ATOL)
    assert torch.equal(rank0["noiseless"], rank1["noiseless"])  # all-reduce gives one result
    # Each logical batch was split evenly between the ranks.
    assert all(
        abs(a - b) <= 1 for a, b in zip(rank0["local_sizes"], rank1["local_sizes"], strict=True)
    )


def test_noisy_physical_batches_match_one_process_with_the_same_noise(
    two_ranks: list[dict],
) -> None:
    rank0, rank1 = two_ranks
    # Rank 0 draws the noise with the same generator as the single process: equal results
    # mean the noise was added exactly once, not once per rank.
    expected, engine = _single_process(1.0, physical=True, noise_seed=3)
    torch.testing.assert_close(rank0["noisy"], expected, rtol=0, atol=ATOL)
    assert torch.equal(rank0["noisy"], rank1["noisy"])
    steps = round(1 / workers.Q)
    assert rank0["logical_steps"] == rank1["logical_steps"] == steps
    assert rank0["accounted_steps"] == rank1["accounted_steps"] == steps
    assert rank0["epsilon"] == rank1["epsilon"] == engine.get_epsilon(workers.DELTA)


def test_checkpoint_written_once_resumes_every_rank_exactly(two_ranks: list[dict]) -> None:
    for result in two_ranks:
        assert result["file_exists_after_save"]
        assert result["resumed_steps"] == 2
        assert torch.equal(result["resumed"], result["uninterrupted"])


def test_budget_refuses_the_same_step_on_every_rank(two_ranks: list[dict]) -> None:
    assert two_ranks[0]["refused_at"] == two_ranks[1]["refused_at"] == workers.STEPS - 1
