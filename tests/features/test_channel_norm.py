"""private_channel_norm: its sensitivity, its noise, its accounting, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPTypeError, DPValueError, PrivacyEngine
from dptorch.accountants import create_accountant
from dptorch.features import ChannelNorm, private_channel_norm
from dptorch.features.channel_norm import clipped_moment_sum
from dptorch.secure_random import SecureRandom


def _features(count: int = 3000, seed: int = 0) -> torch.Tensor:
    """``[count, 3, 4, 4]`` with channel means 0.5 / -0.2 / 0.1 and stds 1 / 0.3 / 0.05."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, 3, 4, 4, generator=generator)
    return base * torch.tensor([1.0, 0.3, 0.05]).view(1, 3, 1, 1) + torch.tensor(
        [0.5, -0.2, 0.1]
    ).view(1, 3, 1, 1)


def test_statistics_match_the_exact_ones_within_the_noise() -> None:
    features = _features()
    accountant = create_accountant("rdp")
    norm = private_channel_norm(
        features,
        accountant=accountant,
        noise_multiplier=2.0,
        mean_bound=3.0,
        second_moment_bound=6.0,
        generator=torch.Generator().manual_seed(1),
    )
    exact_mean = features.mean(dim=(0, 2, 3))
    exact_std = features.transpose(0, 1).flatten(1).std(dim=1)
    # Clipping touches almost nothing with these bounds; the noise on each mean is
    # 2 * 3 / 3000 = 0.002 (std), so 5 stds is 0.01.
    torch.testing.assert_close(norm.channel_mean, exact_mean, atol=0.01, rtol=0)
    torch.testing.assert_close(norm.channel_std[:2], exact_std[:2], atol=0.02, rtol=0.02)
    # Channel 2's variance (0.0025) is below what the noise allows (floor 2 * 6 / 3000 =
    # 0.004): it is floored, never divided by less.
    assert norm.channel_std[2].item() >= math.sqrt(2 * 6 / 3000) - 1e-6
    normalised = norm(features)
    assert normalised.shape == features.shape
    assert normalised[:, 0].mean().abs() < 0.02 and abs(normalised[:, 0].std() - 1) < 0.03


def test_one_release_at_sample_rate_one_is_recorded() -> None:
    accountant = create_accountant("prv")
    private_channel_norm(
        _features(200),
        accountant=accountant,
        noise_multiplier=8.0,
        mean_bound=1.0,
        second_moment_bound=1.0,
    )
    assert accountant.history == [(8.0, 1.0, 1)]
    assert 0.4 < accountant.get_epsilon(1e-5) < 0.5  # the Gaussian mechanism at sigma 8


def test_one_example_moves_the_clipped_sum_by_at_most_one() -> None:
    features = _features(100)
    scales = torch.tensor([1.0] * 3 + [2.0] * 3, dtype=torch.float64)
    outlier = torch.full((1, 3, 4, 4), 1e6)
    for extra in (outlier, -outlier, features[:1] * 3):
        with_it = clipped_moment_sum(torch.cat([features, extra]), scales)
        without = clipped_moment_sum(features, scales)
        assert torch.linalg.vector_norm(with_it - without) <= 1.0 + 1e-12
    # Chunking changes nothing but memory.
    torch.testing.assert_close(
        clipped_moment_sum(features, scales, chunk_size=7), clipped_moment_sum(features, scales)
    )


def test_noise_has_the_stated_spread() -> None:
    # Released mean of channel 0 over 400 seeds: the noise std on it is
    # noise_multiplier * mean_bound / N = 4 * 2 / 500 = 0.016; the sample std of 400 draws
    # is within 10% of it with probability > 0.99.
    features = _features(500)
    means = []
    for seed in range(400):
        norm = private_channel_norm(
            features,
            accountant=create_accountant("rdp"),
            noise_multiplier=4.0,
            mean_bound=2.0,
            second_moment_bound=4.0,
            generator=torch.Generator().manual_seed(seed),
        )
        means.append(norm.channel_mean[0].item())
    spread = torch.tensor(means, dtype=torch.float64).std().item()
    assert abs(spread / 0.016 - 1) < 0.1


def test_secure_mode_draws_from_the_csprng_and_records_the_release() -> None:
    accountant = create_accountant("rdp")
    norm = private_channel_norm(
        _features(300),
        accountant=accountant,
        noise_multiplier=8.0,
        mean_bound=3.0,
        second_moment_bound=6.0,
        generator=SecureRandom(),
    )
    assert torch.isfinite(norm.channel_mean).all() and bool((norm.channel_std > 0).all())
    assert accountant.history == [(8.0, 1.0, 1)]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier=0.0"),
        ({"noise_multiplier": math.nan}, "noise_multiplier=nan"),
        ({"mean_bound": -1.0}, "mean_bound=-1.0"),
        ({"second_moment_bound": math.inf}, "second_moment_bound=inf"),
        ({"features": torch.ones(5)}, r"\[N, C, \*spatial\]"),
        ({"features": torch.ones(5, 2, dtype=torch.long)}, "floating-point"),
        ({"features": torch.full((5, 2), math.nan)}, "NaN"),
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"chunk_size": True}, "chunk_size=True"),
        ({"chunk_size": 2.5}, "chunk_size=2.5"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_recorded(
    change: dict[str, object], named: str
) -> None:
    accountant = create_accountant("rdp")
    arguments: dict[str, object] = {
        "features": _features(50),
        "noise_multiplier": 8.0,
        "mean_bound": 1.0,
        "second_moment_bound": 1.0,
        **change,
    }
    with pytest.raises(DPValueError, match=named):
        private_channel_norm(accountant=accountant, **arguments)  # type: ignore[arg-type]
    assert accountant.history == []


def test_an_accountant_is_required() -> None:
    with pytest.raises(DPTypeError, match=r"engine\.accountant"):
        private_channel_norm(
            _features(50),
            accountant=None,  # type: ignore[arg-type]
            noise_multiplier=8.0,
            mean_bound=1.0,
            second_moment_bound=1.0,
        )


def test_channel_norm_refuses_inputs_with_other_channels() -> None:
    norm = ChannelNorm(torch.zeros(3), torch.ones(3))
    with pytest.raises(DPValueError, match=r"\[B, 3, \.\.\.\]"):
        norm(torch.ones(2, 4, 5))
    with pytest.raises(DPValueError, match="std must be > 0"):
        ChannelNorm(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))


def test_the_release_is_counted_when_training_is_calibrated_to_a_target() -> None:
    features = _features(1000)
    labels = (features[:, 0].mean(dim=(1, 2)) > 0.5).long()
    engine = PrivacyEngine(accountant="rdp")
    norm = private_channel_norm(
        features,
        accountant=engine.accountant,
        noise_multiplier=8.0,
        mean_bound=3.0,
        second_moment_bound=6.0,
    )
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(48, 2))
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(features, labels), batch_size=100),
        target_epsilon=4.0,
        target_delta=1e-4,
        epochs=2,
        max_grad_norm=1.0,
    )
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert engine.accountant.history[0] == (8.0, 1.0, 1)
    assert 4.0 - 0.011 <= engine.get_epsilon(1e-4) <= 4.0
