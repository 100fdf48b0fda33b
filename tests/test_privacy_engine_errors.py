"""Every input ``PrivacyEngine.make_private`` refuses, every training-loop misuse, and detach.

Each refusal must raise the documented error type with a message that names the problem, and
must leave the model and optimizer exactly as they were (nothing half-applied).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import dptorch
from dptorch import ModuleValidator, PrivacyEngine
from dptorch.errors import (
    DPTypeError,
    DPValueError,
    ParameterMismatchError,
    SampleRateError,
    TrainingLoopError,
    UnsupportedModuleError,
)
from dptorch.per_sample import is_captured

N = 64
BATCH = 16


# --- tiny models and data ----------------------------------------------------------------


def _dataset() -> TensorDataset:
    return TensorDataset(torch.randn(N, 4), torch.randint(0, 2, (N,)))


def _loader(**kwargs: Any) -> DataLoader:
    kwargs.setdefault("batch_size", BATCH)
    return DataLoader(_dataset(), **kwargs)


def _mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.ReLU(), fc2=nn.Linear(8, 2)))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(BATCH, 4), torch.randint(0, 2, (BATCH,))


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _args(model: nn.Module | None = None, **overrides: Any) -> dict[str, Any]:
    """Valid ``make_private`` arguments for ``model`` (an MLP by default), then ``overrides``."""
    model = _mlp() if model is None else model
    args: dict[str, Any] = {
        "module": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "data_loader": _loader(),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
    }
    args.update(overrides)
    return args


def _private(
    model: nn.Module | None = None, **overrides: Any
) -> tuple[PrivacyEngine, nn.Module, dptorch.DPOptimizer, DataLoader]:
    engine = PrivacyEngine()
    module, optimizer, loader = engine.make_private(**_args(model, **overrides))
    return engine, module, optimizer, loader


class Stream(IterableDataset):
    """A stream of (x, y) pairs: no indexing, so no Poisson sampling."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = _dataset()
        return iter(zip(data.tensors[0], data.tensors[1], strict=True))


class StreamWithLength(Stream):
    """A stream that also reports a length; still not indexable."""

    def __len__(self) -> int:
        return N


class MyBatchSampler(BatchSampler):
    """A custom batch sampler: it may form batches any way it likes."""


def _weighted_sampler() -> WeightedRandomSampler:
    return WeightedRandomSampler(torch.rand(N) + 0.1, num_samples=N)


def _bn_model() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            fc=nn.Linear(4, 8),
            bn=nn.BatchNorm1d(8),
            head=nn.Linear(8, 2),
        )
    )


def _embedding_model(**embedding_kwargs: Any) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            emb=nn.Embedding(10, 4, **embedding_kwargs),
            flat=nn.Flatten(),
            head=nn.Linear(12, 2),
        )
    )


def _frozen_mlp() -> nn.Module:
    return _mlp().requires_grad_(False)


def _fixed_after_optimizer() -> dict[str, Any]:
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fixed = ModuleValidator.fix(model)  # new parameter objects: the optimizer is stale
    return _args(fixed, optimizer=optimizer)


def _missing_head_bias() -> dict[str, Any]:
    model = _mlp()
    params = [p for name, p in model.named_parameters() if name != "fc2.bias"]
    return _args(model, optimizer=torch.optim.SGD(params, lr=0.1))


# --- nothing half-applied ----------------------------------------------------------------


@dataclass
class _Before:
    """What a refused make_private must not change."""

    hooks: dict[str, list[int]]
    groups: list[dict[str, Any]] | None
    group_values: list[dict[str, Any]] = field(default_factory=list)
    state_len: int = 0


def _hooks(model: nn.Module) -> dict[str, list[int]]:
    return {
        name: [*sub._forward_hooks, *sub._forward_pre_hooks, *sub._backward_hooks]
        for name, sub in model.named_modules()
    }


def _record(args: dict[str, Any]) -> _Before:
    model, optimizer = args.get("module"), args.get("optimizer")
    hooks = _hooks(model) if isinstance(model, nn.Module) else {}
    if not isinstance(optimizer, torch.optim.Optimizer):
        return _Before(hooks, None)
    values = [
        {
            key: (list(value) if key == "params" else copy.deepcopy(value))
            for key, value in g.items()
        }
        for g in optimizer.param_groups
    ]
    return _Before(hooks, optimizer.param_groups, values, len(optimizer.state))


def _assert_nothing_applied(args: dict[str, Any], before: _Before) -> None:
    model, optimizer = args.get("module"), args.get("optimizer")
    if isinstance(model, nn.Module):
        assert _hooks(model) == before.hooks
        if not any(before.hooks.values()):
            assert all(not sub._forward_hooks for sub in model.modules())
            assert not is_captured(model)
    if before.groups is not None:
        assert optimizer.param_groups is before.groups
        assert len(optimizer.param_groups) == len(before.group_values)
        for group, old in zip(optimizer.param_groups, before.group_values, strict=True):
            assert group.keys() == old.keys()
            assert len(group["params"]) == len(old["params"])
            assert all(p is q for p, q in zip(group["params"], old["params"], strict=True))
            for key in old.keys() - {"params"}:
                assert group[key] == old[key], key
        assert len(optimizer.state) == before.state_len
        assert "step" not in vars(optimizer)  # the optimizer's step was not patched


# --- refused arguments: one table ----------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """``make_private(**build())`` must raise ``error`` with every one of ``words``."""

    id: str
    build: Callable[[], dict[str, Any]]
    error: type[Exception]
    words: tuple[str, ...]


def _eval_mlp() -> nn.Module:
    return _mlp().eval()


REFUSALS = [
    # the model
    Refusal(
        "eval-mode",
        lambda: _args(_eval_mlp()),
        UnsupportedModuleError,
        ("<root> (Sequential)", "eval mode", "model.train()"),
    ),
    Refusal(
        "no-trainable-parameters",
        lambda: _args(_frozen_mlp()),
        UnsupportedModuleError,
        ("<root> (Sequential)", "no trainable parameters", "requires_grad"),
    ),
    Refusal(
        "sparse-embedding",
        lambda: _args(_embedding_model(sparse=True)),
        UnsupportedModuleError,
        ("emb (Embedding)", "sparse", "sparse=False"),
    ),
    Refusal(
        "scale-grad-by-freq-embedding",
        lambda: _args(_embedding_model(scale_grad_by_freq=True)),
        UnsupportedModuleError,
        ("emb (Embedding)", "frequency", "scale_grad_by_freq=False"),
    ),
    Refusal(
        "batchnorm",
        lambda: _args(_bn_model()),
        UnsupportedModuleError,
        ("bn (BatchNorm1d)", "ModuleValidator.fix"),
    ),
    # parameter identity
    Refusal(
        "fix-after-optimizer",
        _fixed_after_optimizer,
        ParameterMismatchError,
        ("ModuleValidator.fix", "AFTER the optimizer was built", "not in the module"),
    ),
    Refusal(
        "parameter-missing-from-optimizer",
        _missing_head_bias,
        ParameterMismatchError,
        ("fc2.bias", "not in the optimizer"),
    ),
    # argument types
    Refusal(
        "module-not-a-module",
        lambda: _args(module="my model"),
        DPTypeError,
        ("module=", "(str) must be a torch.nn.Module"),
    ),
    Refusal(
        "optimizer-not-an-optimizer",
        lambda: _args(optimizer={"lr": 0.1}),
        DPTypeError,
        ("optimizer=", "(dict) must be a torch.optim.Optimizer"),
    ),
    Refusal(
        "data-loader-not-a-loader",
        lambda: _args(data_loader=[_batch()]),
        DPTypeError,
        ("data_loader=", "(list) must be a torch.utils.data.DataLoader"),
    ),
    # noise_multiplier
    Refusal(
        "noise-negative",
        lambda: _args(noise_multiplier=-0.5),
        DPValueError,
        ("noise_multiplier=-0.5", ">= 0"),
    ),
    Refusal(
        "noise-nan",
        lambda: _args(noise_multiplier=math.nan),
        DPValueError,
        ("noise_multiplier=nan", "finite"),
    ),
    Refusal(
        "noise-inf",
        lambda: _args(noise_multiplier=math.inf),
        DPValueError,
        ("noise_multiplier=inf", "finite"),
    ),
    # A string is a wrong *type*: errors.py documents DPTypeError for that, and
    # Accountant.step(noise_multiplier="1.0") already raises DPTypeError.
    Refusal(
        "noise-string",
        lambda: _args(noise_multiplier="1.0"),
        DPTypeError,
        ("noise_multiplier='1.0'", "number"),
    ),
    # max_grad_norm
    *[
        Refusal(
            f"max-grad-norm-{label}",
            lambda value=value: _args(max_grad_norm=value),
            DPValueError,
            (f"max_grad_norm={value!r}", "positive"),
        )
        for label, value in [
            ("zero", 0.0),
            ("negative", -1.0),
            ("inf", math.inf),
            ("nan", math.nan),
        ]
    ],
    # string options
    Refusal(
        "clipping-bogus",
        lambda: _args(clipping="bogus"),
        DPValueError,
        ("clipping='bogus'", "'flat'"),
    ),
    Refusal(
        "norm-route-bogus",
        lambda: _args(norm_route="bogus"),
        DPValueError,
        ("norm_route='bogus'", "'auto'", "'ghost'", "'instantiate'"),
    ),
    Refusal(
        "loss-reduction-bogus",
        lambda: _args(loss_reduction="bogus"),
        DPValueError,
        ("loss_reduction='bogus'", "'mean'", "'sum'"),
    ),
    # sampling
    Refusal(
        "weighted-sampler",
        lambda: _args(data_loader=_loader(sampler=_weighted_sampler())),
        SampleRateError,
        ("WeightedRandomSampler", "sample_rate="),
    ),
    Refusal(
        "custom-batch-sampler",
        lambda: _args(
            data_loader=DataLoader(
                _dataset(), batch_sampler=MyBatchSampler(SequentialSampler(range(N)), BATCH, False)
            )
        ),
        SampleRateError,
        ("batch_sampler", "MyBatchSampler", "sample_rate="),
    ),
    Refusal(
        "iterable-dataset",
        lambda: _args(data_loader=DataLoader(Stream(), batch_size=BATCH)),
        SampleRateError,
        ("Stream", "IterableDataset", "map-style"),
    ),
    Refusal(
        "iterable-dataset-with-sample-rate",
        lambda: _args(data_loader=DataLoader(Stream(), batch_size=BATCH), sample_rate=0.25),
        SampleRateError,
        ("Stream", "IterableDataset"),
    ),
    # Without Poisson sampling the accountant still charges q per step, so a stream (which
    # has no true q) and a q outside (0, 1] must be refused just the same.
    Refusal(
        "iterable-dataset-without-poisson",
        lambda: _args(
            data_loader=DataLoader(Stream(), batch_size=BATCH),
            sample_rate=0.25,
            poisson_sampling=False,
        ),
        SampleRateError,
        ("Stream", "IterableDataset"),
    ),
    Refusal(
        "iterable-dataset-with-length-without-poisson",
        lambda: _args(
            data_loader=DataLoader(StreamWithLength(), batch_size=BATCH),
            sample_rate=0.25,
            poisson_sampling=False,
        ),
        SampleRateError,
        ("StreamWithLength", "IterableDataset"),
    ),
    Refusal(
        "sample-rate-zero",
        lambda: _args(sample_rate=0.0),
        SampleRateError,
        ("sample_rate=0.0", "(0, 1]"),
    ),
    Refusal(
        "sample-rate-above-one-without-poisson",
        lambda: _args(sample_rate=2.0, poisson_sampling=False),
        SampleRateError,
        ("sample_rate=2.0", "(0, 1]"),
    ),
    Refusal(
        "sample-rate-negative-without-poisson",
        lambda: _args(sample_rate=-0.25, poisson_sampling=False),
        SampleRateError,
        ("sample_rate=-0.25", "(0, 1]"),
    ),
]


@pytest.mark.filterwarnings("ignore::dptorch.DPWarning")  # poisson_sampling=False warns first
@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_refused_arguments_raise_named_errors_and_change_nothing(case: Refusal) -> None:
    args = case.build()
    before = _record(args)
    engine = PrivacyEngine()
    with pytest.raises(case.error) as caught:
        engine.make_private(**args)
    message = str(caught.value)
    for word in case.words:
        assert word in message, f"{word!r} not in: {message}"
    assert isinstance(caught.value, dptorch.DPError)
    _assert_nothing_applied(args, before)
    assert engine.accountant.history == []


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (DPValueError, ValueError),
        (DPTypeError, TypeError),
        (UnsupportedModuleError, ValueError),
        (ParameterMismatchError, ValueError),
        (SampleRateError, ValueError),
        (TrainingLoopError, RuntimeError),
    ],
)
def test_errors_are_also_builtin_errors(error: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(error, dptorch.DPError)
    assert issubclass(error, builtin)


def test_one_error_lists_every_offending_submodule_with_the_fix() -> None:
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
            body=nn.Sequential(
                OrderedDict(
                    block=nn.Sequential(
                        nn.Conv2d(4, 4, 3),
                        nn.BatchNorm2d(4),
                        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                    )
                )
            ),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            head=nn.Linear(4, 2),
        )
    )
    args = _args(model)
    before = _record(args)
    with pytest.raises(UnsupportedModuleError) as caught:
        PrivacyEngine().make_private(**args)
    error = caught.value
    expected = [
        ("stem.1", "BatchNorm2d"),
        ("body.block.1", "BatchNorm2d"),
        ("body.block.2", "InstanceNorm2d"),
    ]
    assert len(error.problems) == len(expected)
    for (path, kind), line in zip(expected, error.problems, strict=True):
        assert line.startswith(f"{path} ({kind})"), line
        assert "ModuleValidator.fix" in line
        assert f"{path} ({kind})" in str(error)
    _assert_nothing_applied(args, before)

    # The advertised fix works: the fixed copy is accepted and trains.
    fixed = ModuleValidator.fix(model)
    _, module, optimizer, _ = _private(fixed)
    optimizer.zero_grad()
    F.cross_entropy(module(torch.randn(5, 3, 8, 8)), torch.randint(0, 2, (5,))).backward()
    optimizer.step()
    assert optimizer.last_step_stats is not None
    assert optimizer.last_step_stats.batch_size == 5


def test_make_private_twice_on_the_same_model_is_refused() -> None:
    model = _mlp()
    _private(model)
    args = _args(model)  # a fresh optimizer over the same, already private, model
    before = _record(args)
    with pytest.raises(DPValueError, match=r"already private.*detach") as caught:
        PrivacyEngine().make_private(**args)
    assert "Sequential" in str(caught.value)
    _assert_nothing_applied(args, before)  # the first engine's hooks, and no more


def test_passing_the_dp_optimizer_back_in_is_refused() -> None:
    model = _mlp()
    engine, _, dp_optimizer, _ = _private(model)
    engine.detach(model)  # so that only the optimizer is wrong
    args = _args(model, optimizer=dp_optimizer)
    before = _record(args)
    with pytest.raises(DPTypeError, match=r"already a DPOptimizer.*original torch optimizer"):
        PrivacyEngine().make_private(**args)
    _assert_nothing_applied(args, before)


# --- sampling: explicit rates and warnings -------------------------------------------------


@pytest.mark.parametrize(
    "loader",
    [
        pytest.param(lambda: _loader(sampler=_weighted_sampler()), id="weighted-sampler"),
        pytest.param(
            lambda: DataLoader(
                _dataset(), batch_sampler=MyBatchSampler(SequentialSampler(range(N)), BATCH, False)
            ),
            id="custom-batch-sampler",
        ),
    ],
)
def test_an_explicit_sample_rate_is_trusted_for_custom_samplers(
    loader: Callable[[], DataLoader],
) -> None:
    engine, model, optimizer, private_loader = _private(data_loader=loader(), sample_rate=0.25)
    assert isinstance(private_loader, dptorch.DPDataLoader)
    assert private_loader.sample_rate == 0.25
    assert optimizer.expected_batch_size == pytest.approx(0.25 * N)
    x, y = next(iter(private_loader))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert engine.accountant.history == [(1.0, 0.25, 1)]


def test_without_poisson_sampling_a_warning_says_epsilon_is_no_guarantee() -> None:
    data_loader = _loader(shuffle=True)
    with pytest.warns(dptorch.DPWarning, match=r"poisson_sampling=False.*NOT a guarantee"):
        _, _, _, loader = _private(data_loader=data_loader, poisson_sampling=False)
    assert loader is data_loader


def test_zero_noise_warns_that_training_is_not_private() -> None:
    with pytest.warns(dptorch.DPWarning, match=r"noise_multiplier=0.*NOT differentially private"):
        _private(noise_multiplier=0.0)


# --- training-loop errors ----------------------------------------------------------------


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("after_a_good_step", [False, True], ids=["first-step", "later-step"])
@pytest.mark.parametrize(
    "forward_without_backward", [False, True], ids=["no-forward", "forward-only"]
)
def test_step_without_backward_is_refused(
    after_a_good_step: bool, forward_without_backward: bool
) -> None:
    engine, model, optimizer, _ = _private()
    if after_a_good_step:
        optimizer.zero_grad()
        _loss(model, _batch()).backward()
        optimizer.step()
    if forward_without_backward:
        _loss(model, _batch())
    before = _params(model)
    with pytest.raises(TrainingLoopError, match=r"no backward pass.*loss\.backward\(\)"):
        optimizer.step()
    assert _same(_params(model), before)
    assert engine.accountant.history == ([(1.0, BATCH / N, 1)] if after_a_good_step else [])


def _two_batches(model: nn.Module) -> None:
    _loss(model, _batch()).backward()
    _loss(model, _batch()).backward()


def _same_loss_twice(model: nn.Module) -> None:
    loss = _loss(model, _batch())
    loss.backward(retain_graph=True)
    loss.backward()


@pytest.mark.parametrize("after_a_good_step", [False, True], ids=["first-step", "later-step"])
@pytest.mark.parametrize(
    "two_backwards",
    [_two_batches, _same_loss_twice],
    ids=["two-batches", "same-loss-twice"],
)
def test_two_backward_passes_before_one_step_are_refused(
    two_backwards: Callable[[nn.Module], None], after_a_good_step: bool
) -> None:
    engine, model, optimizer, _ = _private()
    if after_a_good_step:
        optimizer.zero_grad()
        _loss(model, _batch()).backward()
        optimizer.step()
    optimizer.zero_grad()
    two_backwards(model)
    before = _params(model)
    with pytest.raises(TrainingLoopError, match=r"2 backward passes.*BatchMemoryManager"):
        optimizer.step()
    assert _same(_params(model), before)
    assert len(engine.accountant.history) == (1 if after_a_good_step else 0)


class DirectWeightUse(nn.Module):
    """Calls its layer, and also multiplies by the layer's weight as a plain tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + x @ self.lin.weight.T  # [B, 2]


class ReadsWeightOf(nn.Module):
    """A head that borrows another module's weight (held outside the module tree)."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self._source = (source,)  # a tuple, so it is not registered as a submodule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self._source[0].weight)


class BorrowedWeightModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.tied_head = ReadsWeightOf(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.out(h) + self.tied_head(h)


@pytest.mark.parametrize(
    ("build", "parameter"),
    [(DirectWeightUse, "lin.weight"), (BorrowedWeightModel, "out.weight")],
    ids=["weight-as-tensor", "module-reads-another-modules-weight"],
)
def test_parameter_used_outside_its_module_is_refused_at_the_first_step(
    build: Callable[[], nn.Module], parameter: str
) -> None:
    engine, model, optimizer, _ = _private(build())
    optimizer.zero_grad()
    _loss(model, _batch()).backward()
    before = _params(model)
    with pytest.raises(DPValueError, match="did not see") as caught:
        optimizer.step()
    message = str(caught.value)
    assert parameter in message
    others = [n for n, _ in model.named_parameters() if n != parameter]
    assert not any(name in message for name in others), message
    assert _same(_params(model), before)
    assert engine.accountant.history == []


# --- detach ------------------------------------------------------------------------------


def test_detach_removes_every_hook_and_the_model_can_be_made_private_again() -> None:
    model = _mlp()
    user_hook_calls: list[int] = []
    model.fc1.register_forward_hook(lambda *_: user_hook_calls.append(1))
    user_hooks = _hooks(model)
    keys = list(model.state_dict().keys())
    x = torch.randn(BATCH, 4)
    with torch.no_grad():
        expected = model(x)

    engine, module, optimizer, _ = _private(model)
    assert module is model
    assert is_captured(model)
    assert list(model.state_dict().keys()) == keys  # no wrapper, even while private

    engine.detach(model)
    assert not is_captured(model)
    assert _hooks(model) == user_hooks  # the user's own hook stays; ours are gone
    assert all(not sub._forward_hooks for name, sub in model.named_modules() if name != "fc1")
    assert list(model.state_dict().keys()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert len(user_hook_calls) == 2

    # Private again, with the same (untouched) torch optimizer.
    again, _, dp_optimizer, _ = _private(model, optimizer=optimizer.original_optimizer)
    assert is_captured(model)
    dp_optimizer.zero_grad()
    _loss(model, _batch()).backward()
    dp_optimizer.step()
    assert again.accountant.history == [(1.0, BATCH / N, 1)]


def test_detach_without_arguments_detaches_every_model() -> None:
    first, second = _mlp(), _mlp()
    engine = PrivacyEngine()
    for model in (first, second):
        engine.make_private(**_args(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.detach()
    assert not is_captured(first)
    assert not is_captured(second)
