"""Hostile and mistaken inputs not covered by test_privacy_engine_errors.py.

Every case must end in a clear answer (an error naming the argument, module path or file and
the fix, or a DPWarning where training can safely go on) and leave nothing half-applied: no
hooks attached, the optimizer, parameters, accountant and RNGs as they were. The table of
these cases and their answers is in docs/hardening.md.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptorch
from dptorch import PrivacyEngine
from dptorch.errors import DPTypeError, DPValueError, SampleRateError, TrainingLoopError
from tests.test_privacy_engine_errors import (
    BATCH,
    N,
    _args,
    _assert_nothing_applied,
    _batch,
    _dataset,
    _loss,
    _mlp,
    _params,
    _private,
    _record,
    _same,
)

# --- make_private: refused arguments ---------------------------------------------------------


def _meta_model() -> nn.Module:
    model = _mlp()
    model.fc2.to("meta")  # e.g. a layer left un-materialised after init on the meta device
    return model


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], dict[str, Any]]
    error: type[Exception]
    words: tuple[str, ...]


ARGUMENT_CASES = [
    Case("sample-rate-above-one", lambda: _args(sample_rate=1.5), SampleRateError,
         ("sample_rate=1.5", "(0, 1]", "batch_size / len(dataset)")),
    Case("sample-rate-string", lambda: _args(sample_rate="0.25"), DPTypeError,
         ("sample_rate='0.25'", "real number")),
    Case("sample-rate-nan", lambda: _args(sample_rate=math.nan), SampleRateError,
         ("sample_rate=nan", "(0, 1]")),
    Case("max-grad-norm-string", lambda: _args(max_grad_norm="1.0"), DPTypeError,
         ("max_grad_norm='1.0'", "must be a number")),
    Case("max-grad-norm-none", lambda: _args(max_grad_norm=None), DPTypeError,
         ("max_grad_norm=None", "must be a number")),
    Case("max-grad-norm-list-for-flat", lambda: _args(max_grad_norm=[1.0, 2.0]), DPTypeError,
         ("max_grad_norm=[1.0, 2.0]", "clipping='per_layer'")),
    Case("noise-none", lambda: _args(noise_multiplier=None), DPTypeError,
         ("noise_multiplier=None", "must be a number")),
    Case("noise-bool", lambda: _args(noise_multiplier=True), DPTypeError,
         ("noise_multiplier=True", "must be a number")),
    Case("meta-device-parameters", lambda: _args(_meta_model()), DPValueError,
         ("fc2.weight", "fc2.bias", "meta device", "to_empty")),
    Case("budget-without-delta", lambda: _args(max_epsilon=3.0), DPValueError,
         ("max_epsilon=3.0", "budget_delta=None", "both")),
]  # fmt: skip


@pytest.mark.parametrize("case", ARGUMENT_CASES, ids=[c.id for c in ARGUMENT_CASES])
def test_hostile_arguments_are_refused_and_change_nothing(case: Case) -> None:
    args = case.build()
    before = _record(args)
    engine = PrivacyEngine()
    with pytest.raises(case.error) as caught:
        engine.make_private(**args)
    for word in case.words:
        assert word in str(caught.value), f"{word!r} not in: {caught.value}"
    assert isinstance(caught.value, dptorch.DPError)
    _assert_nothing_applied(args, before)
    assert engine.accountant.history == []


def test_secure_mode_with_a_seeded_noise_generator_changes_nothing() -> None:
    args = _args(noise_generator=torch.Generator().manual_seed(0))
    before = _record(args)
    with pytest.raises(DPValueError, match="secure_mode=True"):
        PrivacyEngine(secure_mode=True).make_private(**args)
    _assert_nothing_applied(args, before)


# --- the training loop ---------------------------------------------------------------------


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize(
    ("poison", "bad"),
    [
        (lambda x: x.index_fill_(0, torch.tensor([3]), math.nan), 1),
        (lambda x: x.index_fill_(0, torch.tensor([0, 5]), math.inf), 2),
    ],
    ids=["nan-in-one-input", "inf-in-two-inputs"],
)
def test_nonfinite_inputs_are_zeroed_counted_and_warned(
    poison: Callable[[torch.Tensor], torch.Tensor], bad: int
) -> None:
    engine, model, optimizer, _ = _private()
    x, y = _batch()
    optimizer.zero_grad()
    F.cross_entropy(model(poison(x)), y).backward()
    with pytest.warns(dptorch.DPWarning, match=rf"{bad} of {BATCH} examples.*NaN or inf"):
        optimizer.step()
    assert optimizer.last_step_stats is not None
    assert optimizer.last_step_stats.nonfinite == bad
    assert _finite(model)
    assert engine.accountant.history == [(1.0, BATCH / N, 1)]  # the step ran and counts


@pytest.mark.filterwarnings("ignore:noise_multiplier=0:dptorch.DPWarning")
def test_an_infinite_loss_gives_a_noise_only_step_and_a_warning() -> None:
    engine, model, optimizer, _ = _private(noise_multiplier=0.0)
    before = _params(model)
    optimizer.zero_grad()
    (_loss(model, _batch()) * math.inf).backward()
    with pytest.warns(dptorch.DPWarning, match=f"{BATCH} of {BATCH} examples"):
        optimizer.step()
    assert _same(_params(model), before)  # sigma = 0 and every example zeroed: no change
    assert len(engine.accountant.history) == 1


def _non_scalar_loss(model: nn.Module) -> None:
    x, y = _batch()
    F.cross_entropy(model(x), y, reduction="none").backward()  # [B]: not a scalar


def _wrong_feature_size(model: nn.Module) -> None:
    model(torch.randn(BATCH, 5))


def _targets_of_another_batch(model: nn.Module) -> None:
    x, _ = _batch()
    F.cross_entropy(model(x), torch.randint(0, 2, (BATCH - 1,))).backward()


def _integer_inputs(model: nn.Module) -> None:
    model(torch.randint(0, 3, (BATCH, 4)))


def _unbatched_input(model: nn.Module) -> None:
    # One example without its batch dimension: the per-sample rule cannot split it.
    F.cross_entropy(model(torch.randn(4)).unsqueeze(0), torch.tensor([1])).backward()


@pytest.mark.parametrize(
    ("mistake", "error", "words"),
    [
        (_non_scalar_loss, RuntimeError, "only for scalar outputs"),
        (_wrong_feature_size, RuntimeError, "shapes cannot be multiplied"),
        (_targets_of_another_batch, ValueError, "batch_size"),
        (_integer_inputs, RuntimeError, "dtype"),
        (_unbatched_input, DPValueError, r"fc2 \(Linear\).*first dimension"),
    ],
    ids=["non-scalar-loss", "wrong-feature-size", "targets-mismatch", "int-inputs", "unbatched"],
)
def test_a_failed_forward_or_backward_changes_nothing_and_training_recovers(
    mistake: Callable[[nn.Module], None], error: type[Exception], words: str
) -> None:
    engine, model, optimizer, _ = _private()
    before = _params(model)
    optimizer.zero_grad()
    with pytest.raises(error, match=words):
        mistake(model)
    # Stepping now would release a gradient of nothing (or of half a batch): refused.
    with pytest.raises((TrainingLoopError, RuntimeError, DPValueError)):
        optimizer.step()
    assert _same(_params(model), before)
    assert engine.accountant.history == []
    optimizer.zero_grad()  # the next batch trains normally
    _loss(model, _batch()).backward()
    optimizer.step()
    assert engine.accountant.history == [(1.0, BATCH / N, 1)]


def test_a_second_step_without_a_new_backward_is_refused() -> None:
    engine, model, optimizer, _ = _private()
    optimizer.zero_grad()
    _loss(model, _batch()).backward()
    optimizer.step()
    before = _params(model)
    with pytest.raises(TrainingLoopError, match=r"no backward pass"):
        optimizer.step()
    assert _same(_params(model), before)
    assert len(engine.accountant.history) == 1


def test_two_poisson_batches_before_one_step_are_refused() -> None:
    engine, model, optimizer, loader = _private()
    batches = iter(loader)  # two Poisson batches (fixed seed: neither is empty)
    optimizer.zero_grad()
    for _ in range(2):
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
    before = _params(model)
    with pytest.raises(TrainingLoopError, match="2 backward passes"):
        optimizer.step()
    assert _same(_params(model), before)
    assert engine.accountant.history == []


# --- checkpoints -----------------------------------------------------------------------------


def _trained(tmp_path: Path, optimizer: type[torch.optim.Optimizer] = torch.optim.SGD) -> Path:
    model = _mlp()
    engine = PrivacyEngine()
    module, dp_optimizer, loader = engine.make_private(
        **_args(model, optimizer=optimizer(model.parameters(), lr=0.1))
    )
    for x, y in loader:
        dp_optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        dp_optimizer.step()
    path = tmp_path / "good.pt"
    engine.save_checkpoint(path=path, module=module, optimizer=dp_optimizer, data_loader=loader)
    return path


def _edited(path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    saved = torch.load(path, weights_only=True)
    edit(saved)
    out = path.with_name("edited.pt")
    torch.save(saved, out)
    return out


def _truncated(fraction: float) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        data = path.read_bytes()
        out = path.with_name(f"truncated-{fraction}.pt")
        out.write_bytes(data[: int(len(data) * fraction)])
        return out

    return make


def _random_bytes(path: Path) -> Path:
    out = path.with_name("noise.pt")
    out.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    return out


def _flipped_bytes(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    for index in range(100, len(data), 997):  # a few bytes in every part of the file
        data[index] ^= 0xFF
    out = path.with_name("flipped.pt")
    out.write_bytes(bytes(data))
    return out


class _Payload:
    """Pickled, it would run ``Path.touch`` on load: weights_only loading must refuse it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.target,))


def _code_payload(path: Path) -> Path:
    out = path.with_name("payload.pt")
    saved = torch.load(path, weights_only=True)
    saved["metadata"] = {"note": _Payload(path.with_name("pwned"))}
    with out.open("wb") as file:
        pickle.dump(saved, file, protocol=2)
    return out


def _other_model(path: Path) -> Path:
    def edit(saved: dict[str, Any]) -> None:
        wider = nn.Sequential(
            OrderedDict(fc1=nn.Linear(4, 16), act=nn.ReLU(), fc2=nn.Linear(16, 2))
        )
        saved["module"] = wider.state_dict()

    return _edited(path, edit)


CHECKPOINT_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("empty-file", _truncated(0.0), "could not be read"),
    ("truncated-10%", _truncated(0.1), "could not be read"),
    ("truncated-50%", _truncated(0.5), "could not be read"),
    ("truncated-last-byte", _truncated(0.999), "could not be read"),
    ("random-bytes", _random_bytes, "could not be read"),
    ("flipped-bytes", _flipped_bytes, "could not be read|damaged|cannot resume"),
    ("pickled-code", _code_payload, "could not be read"),
    ("a-directory", lambda p: p.parent, "could not be read"),
    ("other-model", _other_model, r"'fc1.weight' has shape \(16, 4\) in the checkpoint, \(8, 4\)"),
    ("wrong-version", lambda p: _edited(p, lambda s: s.update(version=99)), "version=99"),
    ("no-metadata", lambda p: _edited(p, lambda s: s.pop("metadata")), "not a dptorch"),
    (
        "history-garbage",
        lambda p: _edited(p, lambda s: s["accountant"].update(history="garbage")),
        "damaged or was edited",
    ),
    (
        "history-negative-steps",
        lambda p: _edited(p, lambda s: s["accountant"].update(history=[(1.0, 0.25, -5)])),
        "damaged or was edited",
    ),
    (
        "rng-state-garbage",
        lambda p: _edited(p, lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8))),
        "damaged or was edited",
    ),
    (
        "loader-position-out-of-range",
        lambda p: _edited(p, lambda s: s["data_loader"].update(position=99)),
        "damaged or was edited",
    ),
    (
        "optimizer-state-garbage",
        lambda p: _edited(p, lambda s: s.update(optimizer={"state": {}, "param_groups": []})),
        "optimizer state does not fit this SGD",
    ),
]


def _fresh() -> tuple[PrivacyEngine, nn.Module, Any, DataLoader]:
    return _private()


def _state(model: nn.Module, optimizer: Any, engine: PrivacyEngine) -> tuple[Any, ...]:
    return (
        _params(model),
        copy.deepcopy(optimizer.state_dict()),
        list(engine.accountant.history),
        torch.get_rng_state(),
    )


@pytest.mark.parametrize(
    ("name", "corrupt", "words"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_damaged_or_foreign_checkpoints_are_refused_and_change_nothing(
    tmp_path: Path, name: str, corrupt: Callable[[Path], Path], words: str
) -> None:
    bad = corrupt(_trained(tmp_path))
    engine, model, optimizer, loader = _fresh()
    before = _state(model, optimizer, engine)
    with pytest.raises(DPValueError, match=words):
        engine.load_checkpoint(path=bad, module=model, optimizer=optimizer, data_loader=loader)
    after = _state(model, optimizer, engine)
    assert _same(after[0], before[0])
    assert after[1] == before[1] and after[2] == before[2]
    assert torch.equal(after[3], before[3])
    assert not (tmp_path / "pwned").exists()  # no code from the file ever ran


def test_a_checkpoint_of_another_optimizer_type_is_refused(tmp_path: Path) -> None:
    path = _trained(tmp_path, optimizer=torch.optim.Adam)
    engine, model, optimizer, loader = _fresh()  # SGD
    before = _params(model)
    with pytest.raises(DPValueError, match="does not fit this SGD"):
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer, data_loader=loader)
    assert _same(_params(model), before) and len(optimizer.state) == 0


def test_a_missing_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    engine, model, optimizer, loader = _fresh()
    with pytest.raises(FileNotFoundError):
        engine.load_checkpoint(
            path=tmp_path / "absent.pt", module=model, optimizer=optimizer, data_loader=loader
        )


# --- devices ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_a_model_split_over_cpu_and_gpu_trains_with_noise_on_each_device() -> None:
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 8)
            self.second = nn.Linear(8, 2).cuda()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(torch.relu(self.first(x)).cuda())

    model = Split()
    engine = PrivacyEngine()
    module, optimizer, _ = engine.make_private(**_args(model))
    optimizer.zero_grad()
    x, y = _batch()
    F.cross_entropy(module(x), y.cuda()).backward()
    optimizer.step()
    assert module.first.weight.grad is not None and module.first.weight.grad.device.type == "cpu"
    assert module.second.weight.grad is not None
    assert module.second.weight.grad.device.type == "cuda"
    assert engine.accountant.history == [(1.0, BATCH / N, 1)]


def test_inputs_on_another_device_than_the_model_fail_before_anything_changes() -> None:
    engine, model, optimizer, _ = _private()
    before = _params(model)
    optimizer.zero_grad()
    with pytest.raises((RuntimeError, NotImplementedError)):
        _loss(model, (torch.randn(BATCH, 4, device="meta"), torch.randint(0, 2, (BATCH,))))
    with pytest.raises(TrainingLoopError):
        optimizer.step()
    assert _same(_params(model), before) and engine.accountant.history == []


def test_the_dataset_helper_is_what_the_cases_assume() -> None:
    assert len(_dataset()) == N  # the q = BATCH / N in the expected histories above


def test_an_example_without_its_batch_dimension_names_the_layer() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(0), nn.Linear(18, 2))
    loader = DataLoader(TensorDataset(torch.zeros(40, 1)), batch_size=8)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(DPValueError, match=r"2 \(Linear\).*first dimension .* must be the batch"):
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
