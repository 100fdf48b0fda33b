"""FSDP2 (fully_shard) over two gloo ranks on CPU: one private step of one process, sharded."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from dptorch import PrivacyEngine
from tests.distributed import fsdp_workers, workers
from tests.distributed.conftest import doc_blocks
from tests.distributed.harness import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

# Two ranks sum the same clipped terms in another order, then each updates its shard with
# the same float32 arithmetic as one process: rounding only.
ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def fsdp_ranks(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The results of :func:`fsdp_workers.all_scenarios` on two gloo ranks (one spawn)."""
    # The FSDP2 example, then its checkpoint block (which continues it).
    doc_code = "\n".join(code for code in doc_blocks() if "fully_shard" in code)
    return run_ranks(
        fsdp_workers.all_scenarios,
        doc_code=doc_code,
        directory=str(checkpoint_dir),
        timeout=150,
    )


def _one_process(sigma: float) -> torch.Tensor:
    model = fsdp_workers.make_net()
    model, optimizer, loader = fsdp_workers.make_run(
        PrivacyEngine(), model, sigma=sigma, distributed=False
    )
    workers.train(model, optimizer, loader, fsdp_workers.STEPS)
    return workers.flat_params(model)


def test_noiseless_sharded_training_matches_one_process(fsdp_ranks: list[dict]) -> None:
    rank0, rank1 = fsdp_ranks
    expected = _one_process(0.0)
    torch.testing.assert_close(rank0["noiseless"], expected, rtol=0, atol=ATOL)
    assert torch.equal(rank0["noiseless"], rank1["noiseless"])  # gathered from the same shards
    # Uneven shards: 7 rows as 4 + 3, 5 as 3 + 2, 3 as 2 + 1.
    assert rank0["local_shapes"][:2] == [(4, 6), (4,)]
    assert rank1["local_shapes"][:2] == [(3, 6), (3,)]
    assert rank0["local_shapes"][-2:] == [(2, 5), (2,)]
    assert rank1["local_shapes"][-2:] == [(1, 5), (1,)]


def test_gradients_and_optimizer_state_stay_sharded(fsdp_ranks: list[dict]) -> None:
    for result in fsdp_ranks:
        assert result["no_ordinary_grad"]  # after backward, before step: FSDP reduced nothing
        assert result["grads_are_shards"]
        assert result["momentum_is_sharded"]


def test_batch_memory_manager_gives_every_rank_the_same_physical_batches(
    fsdp_ranks: list[dict],
) -> None:
    rank0, rank1 = fsdp_ranks
    # Every forward all-gathers: unequal numbers of physical batches would hang.
    assert rank0["physical_steps"] == rank1["physical_steps"] > fsdp_workers.STEPS
    assert rank0["physical_logical_steps"] == rank1["physical_logical_steps"] == fsdp_workers.STEPS
    torch.testing.assert_close(rank0["physical_noiseless"], _one_process(0.0), rtol=0, atol=ATOL)


def test_each_shard_gets_the_noise_of_one_process_independently(fsdp_ranks: list[dict]) -> None:
    shards = [result["noise_shards"].double() for result in fsdp_ranks]  # [steps, rows * 100]
    assert [s.shape[1] for s in shards] == [51 * fsdp_workers.NOISE_IN, 50 * fsdp_workers.NOISE_IN]
    expected_batch = fsdp_workers.NOISE_Q * fsdp_workers.NOISE_N
    want = (fsdp_workers.NOISE_SIGMA * fsdp_workers.NOISE_C / expected_batch) ** 2
    for released in shards:
        # 20,000+ draws: the sample variance has relative std sqrt(2 / n) < 1%; 5% is > 5
        # standard errors, and noise from both ranks on one shard would give +100%.
        assert abs(released.var().item() / want - 1) < 0.05
        assert abs(released.mean().item()) < 5 * (want / released.numel()) ** 0.5
    # Both ranks were given the same noise seed; their shards' noise must still differ.
    # The correlation of 20,000 independent pairs has std 0.007: 0.05 is 7 of them, and the
    # same stream on both ranks would give 1.
    width = shards[1].shape[1]
    pairs = torch.stack([shards[0][:, :width].flatten(), shards[1].flatten()])
    assert abs(torch.corrcoef(pairs)[0, 1].item()) < 0.05


def test_empty_local_batches_neither_hang_nor_skip(fsdp_ranks: list[dict]) -> None:
    sizes0, sizes1 = (result["sparse_sizes"] for result in fsdp_ranks)
    assert len(sizes0) == len(sizes1) == fsdp_workers.SPARSE_STEPS
    assert any((a == 0) != (b == 0) for a, b in zip(sizes0, sizes1, strict=True))
    assert any(a == b == 0 for a, b in zip(sizes0, sizes1, strict=True))
    for result in fsdp_ranks:
        assert result["sparse_accounted"] == fsdp_workers.SPARSE_STEPS
        assert result["sparse_finite"]


def test_epsilon_is_the_same_on_every_rank_and_in_one_process(fsdp_ranks: list[dict]) -> None:
    engine = PrivacyEngine()
    for _ in range(fsdp_workers.SPARSE_STEPS):
        engine.accountant.step(noise_multiplier=1.0, sample_rate=fsdp_workers.SPARSE_Q)
    expected = engine.get_epsilon(fsdp_workers.DELTA)
    assert fsdp_ranks[0]["sparse_epsilon"] == fsdp_ranks[1]["sparse_epsilon"] == expected


def test_budget_and_calibration_agree_with_one_process(fsdp_ranks: list[dict]) -> None:
    assert fsdp_ranks[0]["refused_at"] == fsdp_ranks[1]["refused_at"] == fsdp_workers.STEPS - 1
    model = fsdp_workers.make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, optimizer, _ = PrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(workers.make_data(), batch_size=int(workers.Q * workers.N)),
            target_epsilon=3.0,
            target_delta=workers.DELTA,
            epochs=2,
            max_grad_norm=1.0,
        )
    sigmas = [result["calibrated_sigma"] for result in fsdp_ranks]
    assert sigmas[0] == sigmas[1] == optimizer.noise_multiplier


def test_unsupported_set_ups_are_refused_with_a_way_out(fsdp_ranks: list[dict]) -> None:
    for result in fsdp_ranks:
        assert "state 'extra' of parameter block1.0.weight" in result["checkpoint_error"]
        assert "a plain tensor of shape (3,)" in result["checkpoint_error"]
        assert not result["refused_file_exists"]
        assert "head.weight is not sharded" in result["unsharded_root_error"]
        assert "call fully_shard on the root module too" in result["unsharded_root_error"]
        assert "fully_shard was applied to 0 itself" in result["layer_sharded_error"]


def test_the_documented_fsdp_example_runs(fsdp_ranks: list[dict]) -> None:
    epsilons = [result["doc_epsilon"] for result in fsdp_ranks]
    assert epsilons[0] == epsilons[1]
    assert 0 < epsilons[0] < float("inf")


def test_a_resumed_sharded_run_continues_bit_for_bit(fsdp_ranks: list[dict]) -> None:
    for result in fsdp_ranks:
        assert result["resumed_steps"] == 2 and result["resumed_position"] == 2
        assert len(result["resumed_batches"]) == 2
        # Each rank's parameter shards and AdamW state shards (and step counts), exactly.
        assert torch.equal(result["resumed"], result["uninterrupted"])
        assert result["resumed_epsilon"] == result["uninterrupted_epsilon"]
    assert not torch.equal(fsdp_ranks[0]["resumed"], fsdp_ranks[1]["resumed"])  # own shards


def test_a_load_that_fails_half_way_changes_nothing_on_any_rank(fsdp_ranks: list[dict]) -> None:
    for result in fsdp_ranks:
        assert "damaged or was edited" in result["damaged_error"]
        assert result["rolled_back"]


def test_the_file_is_a_one_process_checkpoint(fsdp_ranks: list[dict], checkpoint_dir: Path) -> None:
    """Full tensors under the usual keys: a plain model and optimizer load it as it is."""
    engine = PrivacyEngine()
    model, optimizer, loader = fsdp_workers.make_run(
        engine,
        fsdp_workers.make_net(),
        sigma=1.0,
        adam=True,
        distributed=False,
        noise_generator=torch.Generator(),
    )
    info = engine.load_checkpoint(
        path=checkpoint_dir / "fsdp.pt", module=model, optimizer=optimizer, data_loader=loader
    )
    assert info.steps == 2
    assert torch.equal(workers.flat_params(model), fsdp_ranks[0]["saved_params"])
    assert all(
        optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters()
    )  # full moments, not rank 0's shards
