"""DPMultiheadAttention: equal to nn.MultiheadAttention, and exact under per-sample clipping."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from dptorch import DPTypeError, DPValueError
from dptorch.layers import DPMultiheadAttention
from dptorch.per_sample.engine import modules_to_capture
from dptorch.per_sample.rules import has_dedicated_rule
from tests.per_sample.sequence_oracle import Batch, assert_matches_oracle

pytestmark = pytest.mark.filterwarnings("ignore::dptorch.DPWarning")

B, L, S, E, H = 5, 4, 6, 8, 2
F64 = torch.float64


def _randn(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64)


def _padding(keys: int = S) -> Tensor:
    mask = torch.zeros(B, keys, dtype=torch.bool)
    mask[0, -2:] = True
    mask[3, -1] = True
    return mask


# -- equality with nn.MultiheadAttention ------------------------------------------------------
# (batch_first, bias, add_bias_kv, add_zero_attn, kdim); vdim = 7 whenever kdim is set.
# Every option is on in some row and off in another, in both layouts.
CONFIGS = [
    (True, True, False, False, None),
    (False, True, False, False, None),
    (True, False, True, True, 5),
    (False, True, True, False, 5),
    (True, True, False, True, None),
    (False, False, False, True, 5),
]


@pytest.mark.parametrize(("batch_first", "bias", "bias_kv", "zero_attn", "kdim"), CONFIGS)
def test_from_module_gives_equal_outputs_and_weights(
    batch_first: bool, bias: bool, bias_kv: bool, zero_attn: bool, kdim: int | None
) -> None:
    vdim = None if kdim is None else 7
    stock = nn.MultiheadAttention(
        E,
        H,
        bias=bias,
        add_bias_kv=bias_kv,
        add_zero_attn=zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
        dtype=F64,
    )
    layer = DPMultiheadAttention.from_module(stock)
    q, k, v = _randn(B, L, E), _randn(B, S, kdim or E), _randn(B, S, vdim or E)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    masks: list[dict[str, Tensor]] = [
        {},
        {"key_padding_mask": _padding()},
        {"attn_mask": _randn(L, S)},
        {"attn_mask": _randn(L, S) > 1, "key_padding_mask": _padding()},
        {"attn_mask": _randn(B * H, L, S)},
    ]
    for mask, need_weights, average in itertools.product(masks, [True, False], [True, False]):
        want = stock(q, k, v, need_weights=need_weights, average_attn_weights=average, **mask)
        got = layer(q, k, v, need_weights=need_weights, average_attn_weights=average, **mask)
        torch.testing.assert_close(got[0], want[0])
        if need_weights:
            torch.testing.assert_close(got[1], want[1])
        else:
            assert got[1] is None


def test_unbatched_and_causal_inputs_match_stock() -> None:
    stock = nn.MultiheadAttention(E, H, dtype=F64)
    layer = DPMultiheadAttention.from_module(stock)
    x = _randn(L, E)  # unbatched
    for got, want in zip(layer(x, x, x), stock(x, x, x), strict=True):
        torch.testing.assert_close(got, want)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    x = _randn(L, B, E)
    for need_weights in (True, False):
        want = stock(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)[0]
        with_mask = layer(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        hint_only = layer(x, x, x, is_causal=True, need_weights=need_weights)  # mask built here
        torch.testing.assert_close(with_mask[0], want)
        torch.testing.assert_close(hint_only[0], want)


@pytest.mark.parametrize("training", [True, False])
def test_from_module_keeps_device_dtype_training_flag_and_frozen_parameters(
    training: bool,
) -> None:
    stock = nn.MultiheadAttention(E, H, dropout=0.25, dtype=F64).train(training)
    stock.in_proj_weight.requires_grad_(False)
    layer = DPMultiheadAttention.from_module(stock)
    assert layer.training is training and layer.dropout == 0.25
    assert {p.dtype for p in layer.parameters()} == {F64}
    assert {p.device for p in layer.parameters()} == {stock.out_proj.weight.device}
    frozen = {n for n, p in layer.named_parameters() if not p.requires_grad}
    assert frozen == {"q_proj.weight", "k_proj.weight", "v_proj.weight"}
    # The projections are plain nn.Linear, so the one-pass Linear rule covers them.
    assert all(
        type(getattr(layer, n)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj", "out_proj")
    )


def test_load_state_dict_accepts_a_stock_state_dict_with_separate_projections() -> None:
    stock = nn.MultiheadAttention(E, H, kdim=3, vdim=4, add_bias_kv=True, batch_first=True)
    layer = DPMultiheadAttention(E, H, kdim=3, vdim=4, add_bias_kv=True, batch_first=True)
    layer.load_state_dict(stock.state_dict())  # strict: every key must be used
    torch.testing.assert_close(layer.k_proj.weight, stock.k_proj_weight)
    torch.testing.assert_close(layer.v_proj.bias, stock.in_proj_bias[2 * E :])
    torch.testing.assert_close(layer.bias_v, stock.bias_v)
    # Fused views for the transformer fast path exist only when q, k, v share a size.
    assert layer.in_proj_weight is None and layer.in_proj_bias is not None


def test_bad_arguments_are_refused_with_the_fix() -> None:
    with pytest.raises(DPValueError, match="multiple of num_heads"):
        DPMultiheadAttention(10, 3)
    with pytest.raises(DPTypeError, match=r"nn\.MultiheadAttention"):
        DPMultiheadAttention.from_module(nn.Linear(2, 2))  # type: ignore[arg-type]
    layer = DPMultiheadAttention(E, H)
    x = torch.randn(L, 1, E)
    with pytest.raises(DPTypeError, match="bool mask"):
        layer(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long))


# -- transformer layers with the replacement ------------------------------------------------
def _replace_attention(module: nn.Module) -> nn.Module:
    fixed = copy.deepcopy(module)
    for parent in list(fixed.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, DPMultiheadAttention.from_module(child))
    return fixed


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_transformer_encoder_with_replacement_matches_stock(
    batch_first: bool, training: bool
) -> None:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    stock = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(training)
    replaced = _replace_attention(stock)
    x = torch.randn(3, 5, 16)
    x = x if batch_first else x.transpose(0, 1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            for kwargs in (
                {},
                {"src_key_padding_mask": padding},
                {"mask": causal, "is_causal": True},
            ):
                torch.testing.assert_close(replaced(x, **kwargs), stock(x, **kwargs))


def test_encoder_inference_fast_path_runs_with_the_fused_views(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In eval mode without gradients nn.TransformerEncoderLayer calls a fused kernel with
    # self_attn.in_proj_weight / in_proj_bias; they must describe the same weights.
    stock = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    replaced = _replace_attention(stock)
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counting(*args: object) -> Tensor:
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    x = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -1] = True
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": padding}, {"src_mask": torch.randn(5, 5) > 1}):
            torch.testing.assert_close(replaced(x, **kwargs), stock(x, **kwargs))
    assert len(calls) == 6  # both layers took the fast path, every time


@pytest.mark.parametrize("training", [True, False])
def test_transformer_decoder_layer_with_replacement_matches_stock(training: bool) -> None:
    stock = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0).train(training)
    replaced = _replace_attention(stock)
    assert isinstance(replaced.multihead_attn, DPMultiheadAttention)
    tgt, memory = torch.randn(5, 3, 16), torch.randn(7, 3, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    want = stock(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    torch.testing.assert_close(replaced(tgt, memory, tgt_mask=causal, tgt_is_causal=True), want)


# -- per-sample clipping against the one-example-at-a-time oracle ---------------------------
@dataclass(frozen=True)
class AttentionCase:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], Batch]
    call: Callable[[nn.Module, Batch], Tensor]  # -> output with the batch at out_dim
    out_dim: int = 0
    batch_first: bool = True

    def __str__(self) -> str:
        return self.name


def _self_attention_batch(batch_first: bool) -> Batch:
    x = _randn(B, L, E) if batch_first else _randn(L, B, E)
    return Batch(
        {
            "x": (x, 0 if batch_first else 1),
            "padding": (_padding(L), 0),
            "mask": (_randn(L, L), None),
            "target": (torch.randn_like(x), 0 if batch_first else 1),
        }
    )


def _cross_attention_batch() -> Batch:
    return Batch(
        {
            "q": (_randn(L, B, E), 1),
            "k": (_randn(S, B, 5), 1),
            "v": (_randn(S, B, 7), 1),
            "padding": (_padding(), 0),
            "mask": (_randn(L, S) > 1.2, None),
            "target": (_randn(L, B, E), 1),
            "weights_target": (_randn(B, H, L, S), 0),
        }
    )


def _cross_call(model: nn.Module, b: Batch) -> Tensor:
    out, weights = model(
        b["q"],
        b["k"],
        b["v"],
        key_padding_mask=b["padding"],
        attn_mask=b["mask"],
        average_attn_weights=False,
    )
    # The returned weights get gradient too: the need_weights path is checked as well.
    return torch.cat(
        [
            (out - b["target"]).pow(2).sum(dim=(0, 2)).unsqueeze(1),
            (weights * b["weights_target"]).flatten(1).sum(dim=1, keepdim=True),
        ],
        dim=1,
    )


def _encoder(batch_first: bool, norm_first: bool = False) -> Callable[[], nn.Module]:
    return lambda: _replace_attention(
        nn.TransformerEncoderLayer(
            E, H, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first, dtype=F64
        )
    )


def _decoder() -> nn.Module:
    return _replace_attention(nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, dtype=F64))


def _decoder_batch() -> Batch:
    tgt = _randn(L, B, E)
    return Batch(
        {
            "x": (tgt, 1),
            "memory": (_randn(S, B, E), 1),
            "padding": (_padding(), 0),
            "target": (torch.randn_like(tgt), 1),
        }
    )


CASES = [
    AttentionCase(
        "self_attention_batch_first_masks",
        lambda: DPMultiheadAttention(E, H, batch_first=True, dtype=F64),
        lambda: _self_attention_batch(True),
        lambda m, b: m(
            b["x"],
            b["x"],
            b["x"],
            key_padding_mask=b["padding"],
            attn_mask=b["mask"],
            need_weights=False,
        )[0],
    ),
    AttentionCase(
        "self_attention_seq_first",
        lambda: DPMultiheadAttention(E, H, dtype=F64),
        lambda: _self_attention_batch(False),
        lambda m, b: m(b["x"], b["x"], b["x"], key_padding_mask=b["padding"])[0],
        out_dim=1,
        batch_first=False,
    ),
    AttentionCase(
        "cross_attention_kdim_vdim_weights",
        lambda: DPMultiheadAttention(E, H, kdim=5, vdim=7, dtype=F64),
        _cross_attention_batch,
        _cross_call,
        batch_first=False,
    ),
    AttentionCase(
        # bias_k / bias_v belong to the attention itself: torch.func fallback for those two.
        "bias_kv_zero_attn",
        lambda: DPMultiheadAttention(
            E, H, add_bias_kv=True, add_zero_attn=True, batch_first=True, dtype=F64
        ),
        lambda: _self_attention_batch(True),
        lambda m, b: m(b["x"], b["x"], b["x"], key_padding_mask=b["padding"])[0],
    ),
    AttentionCase(
        "encoder_layer_batch_first",
        _encoder(True),
        lambda: _self_attention_batch(True),
        lambda m, b: m(b["x"], src_key_padding_mask=b["padding"]),
    ),
    AttentionCase(
        "encoder_layer_seq_first_norm_first",
        _encoder(False, norm_first=True),
        lambda: _self_attention_batch(False),
        lambda m, b: m(b["x"], src_mask=b["mask"]),
        out_dim=1,
        batch_first=False,
    ),
    AttentionCase(
        "decoder_layer",
        _decoder,
        _decoder_batch,
        lambda m, b: m(
            b["x"],
            b["memory"],
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(L, dtype=F64),
            tgt_is_causal=True,
            memory_key_padding_mask=b["padding"],
        ),
        out_dim=1,
        batch_first=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_clipped_sum_matches_one_example_at_a_time(case: AttentionCase) -> None:
    torch.manual_seed(0)
    model = case.make_model()
    batch = case.make_batch()

    def losses(m: nn.Module, b: Batch) -> Tensor:
        out = case.call(m, b)
        if case.name.startswith("cross"):
            return out.sum(dim=1)
        diff = (out - b["target"]).movedim(case.out_dim, 0)
        return diff.pow(2).flatten(1).sum(dim=1)

    assert_matches_oracle(model, losses, batch, batch_first=case.batch_first)


def test_no_attention_module_goes_through_the_torch_func_fallback() -> None:
    model = _encoder(True)()
    captured = modules_to_capture(model, frozenset(model.parameters()))
    kinds = {type(m) for m in captured.values()}
    assert kinds == {nn.Linear, nn.LayerNorm}, kinds
    with_bias_kv = DPMultiheadAttention(E, H, add_bias_kv=True)
    captured = modules_to_capture(with_bias_kv, frozenset(with_bias_kv.parameters()))
    assert all(has_dedicated_rule(m) for m in captured.values())
    assert {"key_bias", "value_bias"} <= set(captured)
