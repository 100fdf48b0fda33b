"""DPLSTM, DPGRU, DPRNN: equal to PyTorch's layers, and trainable under DP.

Per-sample exactness (one-example-at-a-time oracle) is checked by the recurrent cases of
``tests/per_sample/layer_cases.py``; this file checks the drop-in contract.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPTypeError, DPValueError, PrivacyEngine
from dptorch.layers import DPGRU, DPLSTM, DPRNN
from dptorch.layers.recurrent_base import DPRNNBase
from dptorch.per_sample.rules import has_dedicated_rule

F64 = torch.float64
B, T, D_IN, H = 4, 6, 3, 5

# name -> (stock type, DP type, extra constructor kwargs)
KINDS: dict[str, tuple[type[nn.RNNBase], type[DPRNNBase], dict[str, Any]]] = {
    "lstm": (nn.LSTM, DPLSTM, {}),
    "lstm_proj": (nn.LSTM, DPLSTM, {"proj_size": 2}),
    "gru": (nn.GRU, DPGRU, {}),
    "rnn_tanh": (nn.RNN, DPRNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, DPRNN, {"nonlinearity": "relu"}),
}
CONFIGS: list[dict[str, Any]] = [
    {},
    {"batch_first": True},
    {"num_layers": 2},
    {"bidirectional": True, "batch_first": True},
    {"num_layers": 2, "bidirectional": True},
    {"bias": False, "batch_first": True, "bidirectional": True},
]


def _pair(kind: str, **config: Any) -> tuple[nn.RNNBase, DPRNNBase]:
    stock_type, dp_type, extra = KINDS[kind]
    stock = stock_type(D_IN, H, **extra, **config, dtype=F64)
    return stock, dp_type.from_module(stock)


def _initial_state(kind: str, stock: nn.RNNBase, batch: int | None) -> Any:
    """Random ``h0`` (and ``c0``) requiring grad; ``batch=None`` for unbatched inputs."""
    stacked = stock.num_layers * (2 if stock.bidirectional else 1)
    lead = (stacked,) if batch is None else (stacked, batch)
    h0 = torch.randn(*lead, stock.proj_size or H, dtype=F64, requires_grad=True)
    if stock.mode != "LSTM":
        return h0
    return h0, torch.randn(*lead, H, dtype=F64, requires_grad=True)


def _flat(value: Any) -> list[Tensor]:
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, Tensor):
        return [value]
    return [t for item in value for t in _flat(item)]


def _run(
    module: nn.Module, x: Any, hx: Any, names: list[str]
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Outputs (flattened) and the gradients of a fixed random loss of all of them with
    respect to the parameters ``names`` (PyTorch's names) and the inputs."""
    inputs = [t for t in _flat((x, hx) if hx is not None else x) if t.requires_grad]
    outputs = _flat(module(x, hx))
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outputs)
    params = [getattr(module, name) for name in names]
    grads = torch.autograd.grad(loss, params + inputs)
    by_name = dict(zip(names, grads[: len(params)], strict=True))
    by_name |= {f"input{i}": g for i, g in enumerate(grads[len(params) :])}
    return outputs, by_name


def _assert_same(kind: str, stock: nn.RNNBase, layer: DPRNNBase, x: Any, hx: Any) -> None:
    names = [name for name, _ in stock.named_parameters()]
    expected_out, expected_grads = _run(stock, x, hx, names)
    got_out, got_grads = _run(layer, x, hx, names)
    assert len(got_out) == len(expected_out)
    for got, expected in zip(got_out, expected_out, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for name, expected in expected_grads.items():
        torch.testing.assert_close(
            got_grads[name],
            expected,
            rtol=1e-9,
            atol=1e-12,
            msg=lambda m, n=name: f"{kind}: {n}: {m}",
        )


# -- equality with PyTorch ------------------------------------------------------------------
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default"
)
@pytest.mark.parametrize("kind", KINDS)
def test_equal_outputs_and_gradients(kind: str, config: dict[str, Any], with_h0: bool) -> None:
    stock, layer = _pair(kind, **config)
    shape = (B, T, D_IN) if config.get("batch_first") else (T, B, D_IN)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    hx = _initial_state(kind, stock, B) if with_h0 else None
    _assert_same(kind, stock, layer, x, hx)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequences_of_different_lengths(kind: str, enforce_sorted: bool) -> None:
    stock, layer = _pair(kind, num_layers=2, bidirectional=True, batch_first=True)
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 4])
    padded = torch.randn(B, T, D_IN, dtype=F64, requires_grad=True)
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    hx = _initial_state(kind, stock, B)
    _assert_same(kind, stock, layer, packed, hx)
    out, _ = layer(packed)
    expected, _ = stock(packed)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, expected.batch_sizes)
    for field in ("sorted_indices", "unsorted_indices"):
        got, want = getattr(out, field), getattr(expected, field)
        assert (got is None and want is None) if enforce_sorted else torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input(kind: str) -> None:
    stock, layer = _pair(kind, bidirectional=True)
    x = torch.randn(T, D_IN, dtype=F64, requires_grad=True)
    _assert_same(kind, stock, layer, x, _initial_state(kind, stock, None))


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_skips_dropout_and_train_mode_applies_it(kind: str) -> None:
    stock, layer = _pair(kind, num_layers=2, dropout=0.5)
    stock.eval()
    layer.eval()
    x = torch.randn(T, B, D_IN, dtype=F64, requires_grad=True)
    _assert_same(kind, stock, layer, x, None)
    evaluated = _flat(layer(x))[0]
    layer.train()
    assert not torch.allclose(_flat(layer(x))[0], evaluated)


# -- state dicts, conversion, attributes ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips_both_ways(kind: str) -> None:
    stock_type, dp_type, extra = KINDS[kind]
    config = {"num_layers": 2, "bidirectional": True, **extra}
    stock = stock_type(D_IN, H, **config, dtype=F64)
    layer = dp_type(D_IN, H, **config, dtype=F64)
    assert list(layer.state_dict()) == list(stock.state_dict())
    layer.load_state_dict(stock.state_dict())  # strict
    x = torch.randn(T, B, D_IN, dtype=F64)
    torch.testing.assert_close(_flat(layer(x)), _flat(stock(x)))

    other = dp_type(D_IN, H, **config, dtype=F64)
    fresh = stock_type(D_IN, H, **config, dtype=F64)
    fresh.load_state_dict(other.state_dict())
    torch.testing.assert_close(_flat(fresh(x)), _flat(other(x)))


def test_state_dict_keys_inside_a_parent_match_the_stock_model() -> None:
    def model(layer: nn.Module) -> nn.Module:
        return nn.ModuleDict({"embed": nn.Embedding(7, D_IN), "rnn": layer, "out": nn.Linear(H, 2)})

    stock = model(nn.GRU(D_IN, H, bidirectional=True))
    private = model(DPGRU(D_IN, H, bidirectional=True))
    assert list(private.state_dict()) == list(stock.state_dict())
    private.load_state_dict(stock.state_dict())
    assert torch.equal(private["rnn"].weight_hh_l0_reverse, stock["rnn"].weight_hh_l0_reverse)


def test_torch_parameter_names_are_attributes() -> None:
    layer = DPLSTM(D_IN, H, num_layers=2, proj_size=2, bidirectional=True)
    assert layer.weight_ih_l1_reverse is layer.ih_l1_reverse.weight
    assert layer.bias_hh_l0 is layer.hh_l0.bias
    assert layer.weight_hr_l1 is layer.hr_l1.weight
    assert tuple(layer.weight_hh_l0.shape) == tuple(
        nn.LSTM(D_IN, H, proj_size=2).weight_hh_l0.shape
    )
    with pytest.raises(AttributeError):
        _ = layer.weight_ih_l2
    with pytest.raises(AttributeError):
        _ = DPLSTM(D_IN, H, bias=False).bias_ih_l0


@pytest.mark.parametrize("kind", KINDS)
def test_from_module_keeps_dtype_training_flag_and_frozen_parameters(kind: str) -> None:
    stock_type, dp_type, extra = KINDS[kind]
    stock = stock_type(D_IN, H, **extra, batch_first=True, dtype=F64).eval()
    stock.weight_hh_l0.requires_grad_(False)
    layer = dp_type.from_module(stock)
    assert not layer.training
    assert all(p.dtype == F64 for p in layer.parameters())
    assert not layer.weight_hh_l0.requires_grad and layer.weight_ih_l0.requires_grad
    assert layer.batch_first and layer.extra_repr() == stock.extra_repr()


def test_from_module_refuses_another_layer_type() -> None:
    with pytest.raises(DPTypeError, match=r"DPGRU.from_module needs an nn.GRU, got LSTM"):
        DPGRU.from_module(nn.LSTM(D_IN, H))


@pytest.mark.parametrize(
    ("make", "call", "match"),
    [
        (lambda: DPLSTM(D_IN, H), lambda m: m(torch.randn(T, B, D_IN + 1)), r"input_size=3"),
        (lambda: DPGRU(D_IN, H), lambda m: m(torch.randn(T, B, D_IN), torch.zeros(2, B, H)), "h0"),
        (lambda: DPLSTM(D_IN, H), lambda m: m(torch.randn(B, D_IN, 2, 2)), "3-d"),
        (lambda: DPRNN(D_IN, H, 1, "sigmoid"), None, "nonlinearity"),
        (lambda: DPGRU(D_IN, H, dropout=1.5), None, "dropout"),
        (lambda: DPLSTM(D_IN, H, proj_size=H), None, "proj_size"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(make: Any, call: Any, match: str) -> None:
    with pytest.raises(DPValueError, match=match):
        call(make()) if call is not None else make()


# -- private training ---------------------------------------------------------------------
class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = DPLSTM(8, 12, num_layers=2, dropout=0.2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))  # [B, T, 24]
        return self.head(out[:, -1])


@pytest.mark.filterwarnings("ignore::dptorch.DPWarning")
def test_make_private_trains_an_embedding_dplstm_classifier() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (256, 7), generator=gen)
    labels = (tokens[:, -1] < 10).long()
    model = _Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=64)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.3,
        max_grad_norm=1.0,
    )
    # Every recurrent parameter goes through a dedicated rule, none through torch.func.
    owners = [m for m in model.rnn.modules() if list(m.parameters(recurse=False))]
    assert len(owners) == 8 and all(has_dedicated_rule(m) for m in owners)  # 2 layers x 2 dirs

    def loss_now() -> float:
        with torch.no_grad():
            model.eval()
            value = float(nn.functional.cross_entropy(model(tokens), labels))
            model.train()
            return value

    before = loss_now()
    for _ in range(6):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert loss_now() < before - 0.1  # from 0.69 (chance) to 0.48 with these seeds
    assert 0 < engine.get_epsilon(delta=1e-5) < float("inf")


@pytest.mark.parametrize(
    ("layer", "recurrent_calls"),
    [
        # One call of each W_hh per layer and direction, whatever T is (the GRU's through a
        # tap of its own, as its reset gate multiplies W_hn h).
        (DPLSTM(D_IN, H, num_layers=2, bidirectional=True, batch_first=True), 4),
        (DPRNN(D_IN, H, bidirectional=True, batch_first=True), 2),
        (DPGRU(D_IN, H, num_layers=2, bidirectional=True, batch_first=True), 4),
    ],
    ids=["lstm", "rnn", "gru"],
)
def test_recurrent_weights_are_captured_once_per_sequence(
    layer: DPRNNBase, recurrent_calls: int
) -> None:
    from dptorch.per_sample.engine import PerSampleEngine

    engine = PerSampleEngine(layer, list(layer.parameters()))
    engine.attach()
    try:
        layer(torch.randn(B, T, D_IN))[0].sum().backward()
        recurrent = [r for r in engine.capture.records if r.path.startswith("hh_")]
        assert len(recurrent) == recurrent_calls
    finally:
        engine.detach()
