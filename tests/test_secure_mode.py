"""Secure mode: CSPRNG noise and sampling, the float-attack grid, and secure checkpoints.

The transforms (words -> uniforms, Bernoulli, Gaussians) are pure functions, tested with
fixed, seeded words. Tests of the live CSPRNG cannot fix a seed (it has none, by design);
their tolerances are at least 6 standard errors, so a correct implementation fails one with
probability below 1e-8.
"""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptorch.optimizers.dp_optimizer as dp_optimizer
import dptorch.secure_random as secure_random
from dptorch import PrivacyEngine
from dptorch.data import DPDataLoader, PoissonBatchSampler
from dptorch.errors import DPTypeError, DPValueError, MissingDependencyError
from dptorch.noise import gaussian_noise, noise_grid, round_to_noise_grid_
from dptorch.secure_random import (
    SecureRandom,
    bernoulli_from_words,
    normal_from_words,
    normal_from_words_,
    uniform_from_words,
)

N = 64
BATCH = 16
BACKENDS = [
    "os",
    pytest.param(
        "aes-ctr",
        marks=pytest.mark.skipif(
            not secure_random._has_cryptography(), reason="needs cryptography"
        ),
    ),
]


def _words(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (count,), generator=generator, dtype=torch.int64)


# -- transforms ------------------------------------------------------------------------------
def test_uniforms_are_exact_53_bit_values_in_the_unit_interval() -> None:
    u = uniform_from_words(_words(10_000))
    assert u.dtype == torch.float64
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    scaled = u * 2.0**53
    assert torch.equal(scaled, scaled.round())  # every value is k 2^-53, exactly
    extremes = torch.tensor([0, -1], dtype=torch.int64)  # all-zero and all-one words
    assert uniform_from_words(extremes).tolist() == [0.0, 1.0 - 2.0**-53]


@pytest.mark.parametrize("p", [0.25, 0.1, 1e-6, 2.0**-60 * 3])
def test_bernoulli_threshold_is_exact_on_integers(p: float) -> None:
    numerator, denominator = p.as_integer_ratio()
    threshold = -((-numerator << 64) // denominator)  # ceil(p 2^64)

    def signed(unsigned: int) -> int:
        return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned

    below, at = signed(threshold - 1), signed(threshold)
    result = bernoulli_from_words(torch.tensor([below, at], dtype=torch.int64), p)
    assert result.tolist() == [True, False]


def test_bernoulli_edges_and_frequency() -> None:
    words = _words(200_000, seed=1)
    assert bool(bernoulli_from_words(words, 1.0).all())
    assert not bool(bernoulli_from_words(words, 0.0).any())
    rate = float(bernoulli_from_words(words, 0.3).double().mean())
    assert rate == pytest.approx(0.3, abs=6 * math.sqrt(0.3 * 0.7 / 200_000))
    with pytest.raises(DPValueError, match="probability"):
        bernoulli_from_words(words, 1.5)


def test_box_muller_draws_are_standard_normal() -> None:
    draws = normal_from_words(_words(2**18, seed=2))
    assert draws.dtype == torch.float64
    # Kolmogorov-Smirnov against N(0, 1); fixed words, so this is deterministic.
    assert stats.kstest(draws.numpy(), "norm").pvalue > 1e-3
    assert float(draws.mean()) == pytest.approx(0.0, abs=6 / math.sqrt(2**18))
    assert float(draws.var()) == pytest.approx(1.0, abs=6 * math.sqrt(2 / 2**18))


def test_the_tail_is_drawn_past_the_52_bit_cutoff() -> None:
    # A radius uniform with 52 zero bits is redrawn 2^-52 deeper: the radius can pass
    # sqrt(2 ln 2^53) ~ 8.57, where a plain 52-bit uniform would cut the Gaussian off.
    words = torch.tensor([0, 0], dtype=torch.int64)  # u1 bits 0, angle 0 -> n = radius
    calls: list[int] = []

    def deeper(count: int) -> torch.Tensor:
        calls.append(count)
        return torch.zeros(count, dtype=torch.int64) if len(calls) == 1 else _words(count)

    shallow = normal_from_words(words)
    deep = normal_from_words(words, deeper)
    assert words.tolist() == [0, 0]  # normal_from_words leaves its input alone
    assert float(shallow[0]) == pytest.approx(math.sqrt(-2 * math.log(0.5 * 2.0**-52)))
    assert calls == [1, 1]
    assert float(deep[0]) > 12.0  # two levels deeper: u1 < 2^-104
    assert abs(float(deep[1])) < 1e-13  # sin(2 pi): 0 up to rounding


def test_only_the_low_52_bits_of_each_word_are_used() -> None:
    # High bits (the sign bit included) must not reach the float's exponent.
    low = (1 << 51) | 12345  # u = 1/2 + 12345 2^-52
    words = torch.tensor([-1, low - 2**63, -1, low | (0xFFF << 52) - 2**64], dtype=torch.int64)
    draws = normal_from_words(words)
    assert bool(torch.isfinite(draws).all())
    # The all-ones word: u1 = 1 - 2^-53, a radius close to 0.
    assert abs(float(draws[0])) < 1e-7
    # u1 = 1/2 + (12345 + 1/2) 2^-52 and angle 2 pi (1/2 + 12345 2^-52), whatever the top bits.
    u1 = 0.5 + 12345.5 * 2.0**-52
    angle = 2 * math.pi * (0.5 + 12345 * 2.0**-52)
    expected = math.sqrt(-2 * math.log(u1)) * math.cos(angle)
    assert float(draws[1]) == pytest.approx(expected, rel=1e-12)


def test_in_place_and_copying_transforms_agree_and_scale() -> None:
    words = _words(1000, seed=3)
    reference = normal_from_words(words)
    scaled = normal_from_words_(words.clone(), scale=2.5)
    assert torch.allclose(scaled, 2.5 * reference, rtol=1e-15, atol=0.0)


def test_an_odd_number_of_words_is_refused() -> None:
    with pytest.raises(DPValueError, match="even number"):
        normal_from_words(_words(3))


# -- the live CSPRNG -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_are_independent_and_copies_are_rekeyed(backend: str) -> None:
    source = SecureRandom(backend)  # type: ignore[arg-type]
    assert source.backend == backend
    others = [SecureRandom(backend), copy.deepcopy(source), copy.copy(source)]  # type: ignore[arg-type]
    others.append(pickle.loads(pickle.dumps(source)))
    first = source.random_bytes(64)
    assert len(first) == 64
    assert all(other.random_bytes(64) != first for other in others)
    assert source.random_bytes(64) != first
    assert not hasattr(source, "get_state") and not hasattr(source, "manual_seed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_draws_have_the_right_moments(backend: str) -> None:
    source = SecureRandom(backend)  # type: ignore[arg-type]
    draws = source.normal(100_001)
    assert draws.shape == (100_001,)
    assert float(draws.mean()) == pytest.approx(0.0, abs=6 / math.sqrt(1e5))
    assert float(draws.std()) == pytest.approx(1.0, abs=6 * math.sqrt(0.5 / 1e5))
    included = source.bernoulli(100_000, 0.05)
    assert float(included.double().mean()) == pytest.approx(
        0.05, abs=6 * math.sqrt(0.05 * 0.95 / 1e5)
    )


@pytest.mark.parametrize("ahead", [False, True])
def test_large_draws_are_fresh_scaled_and_standard(ahead: bool) -> None:
    # ahead=True: split over threads, the second drawn ahead on the background thread.
    source = SecureRandom()
    count = 2**18 + 3  # past the threading threshold, and odd
    first = source.normal(count, 3.0, ahead=ahead)
    second = source.normal(count, 3.0, ahead=ahead)
    assert first.shape == second.shape == (count,)
    assert not bool((first == second).any())
    for draws in (first, second):
        assert bool(torch.isfinite(draws).all())
        assert float(draws.std()) == pytest.approx(3.0, abs=18 * math.sqrt(0.5 / count))
        assert stats.kstest(draws.numpy() / 3.0, "norm").pvalue > 1e-6


def test_a_forked_process_gets_a_new_key(monkeypatch: pytest.MonkeyPatch) -> None:
    if not secure_random._has_cryptography():
        pytest.skip("the os backend has no key of its own")
    source = SecureRandom("aes-ctr")
    before = source._encryptor
    monkeypatch.setattr(secure_random.os, "getpid", lambda: source._pid + 1)
    source.random_bytes(8)
    assert source._encryptor is not before


def test_unknown_and_missing_backends_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DPValueError, match="backend='fast'"):
        SecureRandom("fast")  # type: ignore[arg-type]
    monkeypatch.setattr(secure_random, "_has_cryptography", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'dptorch\[secure\]'"):
        SecureRandom("aes-ctr")
    assert SecureRandom().backend == "os"  # auto falls back to the kernel CSPRNG


# -- noise and the grid ----------------------------------------------------------------------
def test_secure_noise_is_float64_with_the_requested_std() -> None:
    noise = gaussian_noise(
        torch.Size([400, 500]),
        std=3.0,
        dtype=torch.float16,
        device=torch.device("cpu"),
        generator=SecureRandom(),
    )
    assert noise.shape == (400, 500) and noise.dtype == torch.float64
    assert float(noise.std()) == pytest.approx(3.0, rel=6 * math.sqrt(0.5 / 2e5))
    zero = gaussian_noise(
        torch.Size([3]),
        std=0.0,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=SecureRandom(),
    )
    assert zero.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("std", [1.0, 0.37, 1e-4, 12.5])
def test_released_values_land_on_a_grid_that_does_not_depend_on_the_sum(std: float) -> None:
    grid = noise_grid(std)
    assert 2.0**-24 * std <= grid < 2.0**-23 * std
    assert math.log2(grid) == int(math.log2(grid))  # a power of two: rounding is exact
    source = SecureRandom()
    # Sums that differ only in their lowest float bits (what float attacks read).
    for total in (0.0, 0.1, 0.1 + 2.0**-50, 1 / 3, 1e3 * std):
        released = torch.full((50_000,), total, dtype=torch.float64)
        released += gaussian_noise(
            released.shape,
            std=std,
            dtype=torch.float32,
            device=released.device,
            generator=source,
        )
        round_to_noise_grid_(released, std, source)
        steps = released / grid
        assert torch.equal(steps, steps.round())
        # The low bits of the grid index carry nothing of the sum: uniform mod 16.
        residues = torch.bincount((steps.long() % 16), minlength=16).double()
        expected = 50_000 / 16
        chi2 = float(((residues - expected) ** 2 / expected).sum())
        assert chi2 < stats.chi2.ppf(1 - 1e-8, df=15)


def test_rounding_is_a_no_op_outside_secure_mode() -> None:
    values = torch.tensor([0.123456789], dtype=torch.float64)
    round_to_noise_grid_(values, 1.0, torch.Generator())
    round_to_noise_grid_(values, 1.0, None)
    assert values.item() == 0.123456789
    round_to_noise_grid_(values, 0.0, SecureRandom())
    assert values.item() == 0.123456789


# -- the engine ------------------------------------------------------------------------------
def _dataset() -> TensorDataset:
    return TensorDataset(torch.randn(N, 4), torch.randint(0, 2, (N,)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _secure_run(model: nn.Module | None = None, **options: Any) -> tuple[Any, ...]:
    model = _mlp() if model is None else model
    engine = PrivacyEngine(secure_mode=True)
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(), batch_size=BATCH),
        noise_multiplier=options.pop("noise_multiplier", 1.0),
        max_grad_norm=1.0,
        **options,
    )
    return engine, module, optimizer, loader


def _train(module: nn.Module, optimizer: Any, loader: DataLoader, steps: int | None = None) -> int:
    done = 0
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        done += 1
        if done == steps:
            break
    return done


def test_make_private_in_secure_mode_uses_the_csprng_everywhere() -> None:
    engine, module, optimizer, loader = _secure_run()
    assert isinstance(optimizer.generator, SecureRandom)
    assert isinstance(loader, DPDataLoader)
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert isinstance(loader.batch_sampler.generator, SecureRandom)
    assert _train(module, optimizer, loader) == 4
    assert engine.accountant.history == [(1.0, BATCH / N, 4)]
    grid = noise_grid(1.0 * 1.0 / BATCH)
    for param in module.parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32
        steps = param.grad.double() / grid
        assert torch.equal(steps, steps.round())


def test_secure_noise_has_std_sigma_c_over_the_expected_batch_size() -> None:
    model = nn.Linear(100, 100, bias=False)
    _, module, optimizer, _ = _secure_run(model, noise_multiplier=2.0)
    optimizer.zero_grad()
    (0.0 * module(torch.randn(BATCH, 100)).sum()).backward()  # clipped sum is exactly zero
    optimizer.step()
    grad = module.weight.grad
    assert grad is not None
    assert float(grad.std()) == pytest.approx(2.0 / BATCH, rel=6 * math.sqrt(0.5 / 1e4))


def test_the_secure_release_carries_the_clipped_sum_over_the_expected_batch_size() -> None:
    # With almost no noise, secure and ordinary mode release the same clipped sum / (q N):
    # the grid-unit arithmetic (noise / grid, sum / (divisor grid), snapped back) must
    # neither rescale the sum nor change the divisor.
    x, y = torch.randn(BATCH, 4), torch.randint(0, 2, (BATCH,))
    released = []
    for secure in (False, True):
        torch.manual_seed(0)
        model = _mlp()
        engine = PrivacyEngine(secure_mode=secure)
        module, optimizer, _ = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(), batch_size=BATCH // 2),  # q N = BATCH / 2
            noise_multiplier=1e-9,
            max_grad_norm=0.5,
        )
        optimizer.zero_grad()
        F.cross_entropy(module(x), y, reduction="mean").backward()
        optimizer.step()
        released.append([p.grad.clone() for p in module.parameters()])
    for ordinary, secure_grad in zip(*released, strict=True):
        assert secure_grad.abs().max() > 1e-3  # a real, non-zero gradient
        torch.testing.assert_close(secure_grad, ordinary, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_the_release_buffer_is_reused_and_never_handed_out(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fused: the compiled one-pass release (float32 on the CPU), which needs no float64
    # buffer; otherwise the float64 work buffer path (other devices, distributed sums).
    if fused and not secure_random.compiled_transform_available():
        pytest.skip("the compiled secure transform is not built")
    if not fused:
        monkeypatch.setattr(dp_optimizer, "_fuses_secure_release", lambda *_: False)
    model = nn.Linear(100, 100, bias=False)
    _, module, optimizer, _ = _secure_run(model, noise_multiplier=2.0)
    released = []
    for _ in range(2):
        optimizer.zero_grad()
        (0.0 * module(torch.randn(BATCH, 100)).sum()).backward()
        optimizer.step()
        released.append(module.weight.grad)
    work = optimizer._release_buffers.secure_work_buffers()
    if fused:
        assert work == []
    else:
        (buffer,) = work
        assert buffer.dtype == torch.float64 and buffer.numel() == 100 * 100
    first, second = released
    assert first is not None and second is not None
    # Each step's gradient is its own tensor: a later step does not overwrite an earlier one.
    storages = {b.untyped_storage().data_ptr() for b in work}
    storages |= {g.untyped_storage().data_ptr() for g in (first, second)}
    assert len(storages) == len(work) + 2
    assert not torch.equal(first, second)
    for grad in (first, second):  # both released on the grid, with the right scale
        steps = grad.double() / noise_grid(2.0 / BATCH)
        assert torch.equal(steps, steps.round())
        assert float(grad.std()) == pytest.approx(2.0 / BATCH, rel=6 * math.sqrt(0.5 / 1e4))


def test_noise_drawn_into_a_buffer_and_wrong_buffers_refused() -> None:
    shape = torch.Size([300, 200])
    for generator, dtype in ((SecureRandom(), torch.float64), (torch.Generator(), torch.float32)):
        buffer = torch.empty(shape.numel(), dtype=dtype)
        noise = gaussian_noise(
            shape,
            std=2.0,
            dtype=torch.float32,
            device=torch.device("cpu"),
            generator=generator,
            out=buffer,
        )
        assert noise.shape == shape and noise.data_ptr() == buffer.data_ptr()
        assert float(noise.std()) == pytest.approx(2.0, rel=6 * math.sqrt(0.5 / 6e4))
    with pytest.raises(DPValueError, match=r"out= must be a contiguous torch\.float64"):
        gaussian_noise(
            shape,
            std=1.0,
            dtype=torch.float32,
            device=torch.device("cpu"),
            generator=SecureRandom(),
            out=torch.empty(shape.numel()),  # float32: secure draws are float64
        )
    with pytest.raises(DPValueError, match="cannot be used with ahead"):
        SecureRandom().normal(4, ahead=True, out=torch.empty(4, dtype=torch.float64))


def test_two_secure_runs_from_the_same_seed_differ() -> None:
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        _, module, optimizer, loader = _secure_run()
        _train(module, optimizer, loader, steps=1)
        grads.append(module[0].weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])


def test_adaptive_clipping_draws_its_count_noise_securely() -> None:
    _, module, optimizer, loader = _secure_run(clipping="adaptive")
    before = optimizer.max_grad_norm
    _train(module, optimizer, loader)
    assert optimizer.max_grad_norm != before


def test_secure_sampler_frequency_and_resume_position() -> None:
    sampler = PoissonBatchSampler(1000, 0.1, steps=60, generator=SecureRandom())
    batches = list(sampler)
    assert len(batches) == 60
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(100.0, abs=6 * math.sqrt(90 / 60))
    assert all(b == sorted(set(b)) for b in batches)
    state = sampler.resume_state(consumed=25)
    assert state["skip"] == 25 and state["generator_state"].numel() == 0
    sampler.load_resume_state(state)
    assert len(list(sampler)) == 35  # the rest of the interrupted pass: fresh draws
    assert len(list(sampler)) == 60
    with pytest.raises(DPValueError, match="cannot replay"):
        sampler.load_resume_state({"generator_state": torch.Generator().get_state(), "skip": 0})


@pytest.mark.parametrize(
    ("build", "error", "words"),
    [
        (lambda: PrivacyEngine(secure_mode="yes"), DPTypeError, ("secure_mode='yes'",)),  # type: ignore[arg-type]
        (
            lambda: _secure_run(noise_generator=torch.Generator().manual_seed(0)),
            DPValueError,
            ("noise_generator=", "secure_mode=True", "Drop noise_generator"),
        ),
    ],
    ids=["secure-mode-not-bool", "seeded-noise-in-secure-mode"],
)
def test_secure_mode_misuse_is_refused(build: Any, error: type[Exception], words: Any) -> None:
    with pytest.raises(error) as caught:
        build()
    for word in words:
        assert word in str(caught.value)


def test_secure_checkpoints_hold_no_randomness_state_and_resume_the_budget(
    tmp_path: Path,
) -> None:
    engine, module, optimizer, loader = _secure_run()
    iterator = iter(loader)
    for _ in range(3):  # three batches into a four-batch pass
        x, y = next(iterator)
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
    path = tmp_path / "secure.pt"
    engine.save_checkpoint(path=path, module=module, optimizer=optimizer, data_loader=loader)
    saved = torch.load(path, weights_only=True)
    assert saved["rng"]["noise"] is None
    assert saved["data_loader"]["generator_state"].numel() == 0
    assert saved["privacy"]["secure_mode"] is True

    resumed, module2, optimizer2, loader2 = _secure_run()
    info = resumed.load_checkpoint(
        path=path, module=module2, optimizer=optimizer2, data_loader=loader2
    )
    assert (info.steps, info.position) == (3, 3)
    assert resumed.get_epsilon(1e-5) == pytest.approx(engine.get_epsilon(1e-5))
    assert _train(module2, optimizer2, loader2) == 1  # the one batch left of the pass
    assert len(resumed.accountant) == 4

    plain = PrivacyEngine()
    model = _mlp()
    module3, optimizer3, loader3 = plain.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(), batch_size=BATCH),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    with pytest.raises(DPValueError, match="secure_mode: checkpoint True, this run False"):
        plain.load_checkpoint(path=path, module=module3, optimizer=optimizer3, data_loader=loader3)
    assert len(plain.accountant) == 0


@pytest.mark.gpu
def test_secure_noise_on_the_gpu_is_drawn_on_the_cpu_and_copied() -> None:
    device = torch.device("cuda")
    noise = gaussian_noise(
        torch.Size([1000, 100]),
        std=1.0,
        dtype=torch.float32,
        device=device,
        generator=SecureRandom(),
    )
    assert noise.device.type == "cuda" and noise.dtype == torch.float64
    assert float(noise.std()) == pytest.approx(1.0, rel=6 * math.sqrt(0.5 / 1e5))
    model = _mlp().to(device)
    engine = PrivacyEngine(secure_mode=True)
    module, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(), batch_size=BATCH),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    optimizer.zero_grad()
    x, y = torch.randn(BATCH, 4, device=device), torch.randint(0, 2, (BATCH,), device=device)
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    grad = module[0].weight.grad
    assert grad is not None and grad.device.type == "cuda"
    steps = grad.double() / noise_grid(1.0 / BATCH)
    assert torch.equal(steps, steps.round())


def test_a_scale_too_large_to_square_still_scales_the_draws() -> None:
    # The scale is folded into the radius as scale^2; above ~1e154 that overflows, and the
    # draws must still be the standard ones times the scale, not inf.
    words = _words(1000, seed=4)
    reference = normal_from_words(words)
    huge = normal_from_words_(words.clone(), scale=1e200)
    assert bool(torch.isfinite(huge).all())
    assert torch.allclose(huge, 1e200 * reference, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_a_scale_that_is_no_standard_deviation_is_refused(scale: float) -> None:
    with pytest.raises(DPValueError, match=r"scale=.*finite standard deviation"):
        SecureRandom("os").normal(4, scale)
