"""``DPMultiheadAttention``: ``nn.MultiheadAttention`` with its projections as ``nn.Linear``.

Stock ``nn.MultiheadAttention`` keeps the query/key/value projections in one fused parameter
(``in_proj_weight``) that ``F.multi_head_attention_forward`` multiplies directly, so no
per-layer rule can see its inputs and dptorch must fall back to ``torch.func`` for the whole
attention (exact, but one more forward and backward per step). Here the four projections are
``nn.Linear`` submodules called as modules, so the one-pass ``Linear`` rule covers every
parameter, and the attention itself (softmax of ``q k^T``) owns none.

Same constructor, forward signature and outputs as ``nn.MultiheadAttention``;
:meth:`DPMultiheadAttention.from_module` converts a stock layer (equal outputs), and
``load_state_dict`` accepts a stock layer's state dict. ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` work with their attention replaced: the attributes their
inference fast path reads (``in_proj_weight``, ``in_proj_bias``, ``_qkv_same_embed_dim``,
``merge_masks``) exist and describe the same weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dptorch.errors import DPTypeError, DPValueError

__all__ = ["AppendedPosition", "DPMultiheadAttention"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class DPMultiheadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, arXiv 1706.03762) built from ``nn.Linear``.

    Args:
        embed_dim: model dimension E (the query's and the output's feature size).
        num_heads: number of heads; must divide ``embed_dim``.
        dropout: dropout probability on the attention weights (training only).
        bias: whether the four projections have biases.
        add_bias_kv: append a learned key and value (``bias_k``, ``bias_v``) to the keys and
            values of every example (kept in :class:`AppendedPosition` children
            ``key_bias`` / ``value_bias``, which have their own one-pass rule).
        add_zero_attn: append a zero key and value to every example.
        kdim: key feature size (default ``embed_dim``).
        vdim: value feature size (default ``embed_dim``).
        batch_first: inputs and outputs are ``[B, L, E]`` if ``True``, else ``[L, B, E]``.
        device: where to create the parameters.
        dtype: their dtype.

    Privacy: every example's output depends only on that example's own query, key and value
    (attention mixes positions, never examples), so per-sample gradients, and hence
    per-sample clipping, are exact. Under dptorch pass ``batch_first=`` to ``make_private``
    matching this layer's layout: the projections see its inputs as they are.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise DPValueError(
                f"DPMultiheadAttention(embed_dim={embed_dim}, num_heads={num_heads}): embed_dim "
                "must be a positive multiple of num_heads; choose num_heads dividing embed_dim."
            )
        if not 0.0 <= dropout < 1.0:
            raise DPValueError(f"DPMultiheadAttention(dropout={dropout}) must be in [0, 1).")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.key_bias: AppendedPosition | None = None
        self.value_bias: AppendedPosition | None = None
        if add_bias_kv:
            self.key_bias = AppendedPosition(embed_dim, **factory)
            self.value_bias = AppendedPosition(embed_dim, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The same distributions as nn.MultiheadAttention, so swapping layers before
        # training changes nothing statistically: its fused [3E, E] Xavier bound when the
        # three projections share a size, one Xavier bound per projection otherwise.
        if self._qkv_same_embed_dim:
            bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim))
            for name in _PROJECTIONS:
                nn.init.uniform_(getattr(self, name).weight, -bound, bound)
        else:
            for name in _PROJECTIONS:
                nn.init.xavier_uniform_(getattr(self, name).weight)
        for name in (*_PROJECTIONS, "out_proj"):
            layer = getattr(self, name)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        for extra in (self.bias_k, self.bias_v):
            if extra is not None:
                nn.init.xavier_normal_(extra)

    @property
    def bias_k(self) -> nn.Parameter | None:
        """The learned key appended to every example (``add_bias_kv``), ``[1, 1, E]``."""
        return None if self.key_bias is None else self.key_bias.weight

    @property
    def bias_v(self) -> nn.Parameter | None:
        """The learned value appended to every example (``add_bias_kv``), ``[1, 1, E]``."""
        return None if self.value_bias is None else self.value_bias.weight

    # -- what nn.Transformer*Layer reads ---------------------------------------------------
    @property
    def in_proj_weight(self) -> Tensor | None:
        """The fused ``[3E, E]`` projection weight, as stock attention stores it (a copy)."""
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> Tensor | None:
        """The fused ``[3E]`` projection bias (a copy), or ``None`` without biases."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # type: ignore[list-item]

    def merge_masks(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor
    ) -> tuple[Tensor | None, int | None]:
        """Masks in the form the fused inference kernel takes (as ``nn.MultiheadAttention``).

        Returns the mask and its type: 1 for a ``[B, S]`` padding mask alone, 2 for a
        ``[B, H, L, S]`` mask (the attention mask, combined with the padding mask if given).
        """
        if attn_mask is None:
            return key_padding_mask, (1 if key_padding_mask is not None else None)
        batch, length, _ = query.shape
        if attn_mask.dim() == 3:  # [B * H, L, L]
            merged = attn_mask.view(batch, self.num_heads, length, length)
        else:  # [L, L]
            merged = attn_mask.view(1, 1, length, length).expand(batch, self.num_heads, -1, -1)
        if key_padding_mask is not None:
            # bool + bool is a logical or; float masks add.
            merged = merged + key_padding_mask.view(batch, 1, 1, length)
        return merged, 2

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> DPMultiheadAttention:
        """A ``DPMultiheadAttention`` computing exactly what ``module`` computes.

        Same configuration, weights (copied), device, dtype, training flag and per-parameter
        ``requires_grad`` (a frozen fused weight freezes all three projections).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise DPTypeError(
                f"DPMultiheadAttention.from_module(module={type(module).__name__}) needs an "
                "nn.MultiheadAttention."
            )
        reference = module.out_proj.weight
        layer = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device=reference.device,
            dtype=reference.dtype,
        )
        layer.load_state_dict(module.state_dict())
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
        for name, param in layer.named_parameters():
            param.requires_grad_(_stock_name(name, module._qkv_same_embed_dim) not in frozen)
        return layer.train(module.training)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Accept nn.MultiheadAttention's keys: split the fused tensors into the projections.
        # The children load after this call from the same dict, so renamed keys reach them.
        for suffix in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}in_proj_{suffix}", None)
            if fused is not None:
                for name, part in zip(_PROJECTIONS, fused.chunk(3), strict=True):
                    state_dict[f"{prefix}{name}.{suffix}"] = part
        renamed = {f"{name}_weight": f"{name}.weight" for name in _PROJECTIONS}
        renamed.update(bias_k="key_bias.weight", bias_v="value_bias.weight")
        for old, new in renamed.items():
            value = state_dict.pop(prefix + old, None)
            if value is not None:
                state_dict[prefix + new] = value
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention.forward``.

        Args:
            query: ``[L, B, E]`` (``[B, L, E]`` with ``batch_first``), or ``[L, E]`` unbatched.
            key: ``[S, B, kdim]`` (or batch first / unbatched likewise).
            value: ``[S, B, vdim]``.
            key_padding_mask: ``[B, S]``; ``True`` (bool) marks keys to ignore, a float mask
                is added to the attention scores.
            need_weights: also return the attention weights (slower: no fused kernel).
            attn_mask: ``[L, S]`` or ``[B * num_heads, L, S]``, bool (``True`` = not allowed)
                or float (added).
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask; without ``attn_mask`` a
                causal mask is applied.

        Returns:
            ``(attn_output, attn_weights)``: the output in the query's layout, and the weights
            ``[B, L, S]`` (``[B, H, L, S]`` without averaging; after dropout, as PyTorch's) or
            ``None`` when ``need_weights`` is ``False``.
        """
        batched = query.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            query, key, value = (t.unsqueeze(batch_dim) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # The projections see the inputs in the caller's layout, so the engine's batch_first
        # applies to them exactly as to every other layer of the model.
        q = _batch_first(self.q_proj(query), self.batch_first)  # [B, L, E]
        k = _batch_first(self.k_proj(key), self.batch_first)  # [B, S, E]
        v = _batch_first(self.v_proj(value), self.batch_first)  # [B, S, E]
        batch, length, _ = q.shape
        mask = self._combined_mask(attn_mask, key_padding_mask, batch, length, k.shape[1], q)
        if self.key_bias is not None and self.value_bias is not None:
            k, v = self.key_bias(k), self.value_bias(v)  # [B, S + 1, E]
            mask = None if mask is None else F.pad(mask, (0, 1))
        q, k, v = (self._split_heads(t) for t in (q, k, v))  # [B, H, L|S, d]
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((*k.shape[:2], 1, k.shape[3]))], dim=2)
            v = torch.cat([v, v.new_zeros((*v.shape[:2], 1, v.shape[3]))], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # [B, H, L, S]
            if causal:
                mask = _causal_mask(length, k.shape[2], q)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), p=dropout)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal
            )
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)  # [B, L, E]
        if not self.batch_first:
            out = out.transpose(0, 1)  # [L, B, E]
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(batch_dim)
        return out, weights

    def _split_heads(self, tensor: Tensor) -> Tensor:
        batch, length, _ = tensor.shape
        return tensor.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _combined_mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        batch: int,
        length: int,
        source: int,
        like: Tensor,
    ) -> Tensor | None:
        """One additive float mask ``[B or 1, H or 1, L, S]`` from both masks, or ``None``."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, like)
            if mask.dim() == 3:  # [B * H, L, S]
                mask = mask.view(batch, self.num_heads, length, source)
            else:  # [L, S]
                mask = mask.view(1, 1, length, source)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, like).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )


def _batch_first(tensor: Tensor, batch_first: bool) -> Tensor:
    return tensor if batch_first else tensor.transpose(0, 1)


def _additive(mask: Tensor, like: Tensor) -> Tensor:
    """A bool mask (``True`` = masked out) as ``-inf``/0, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf")
        )
    if not mask.is_floating_point():
        raise DPTypeError(
            f"DPMultiheadAttention got a mask of dtype {mask.dtype}; pass a bool mask (True = "
            "ignore) or a float mask added to the attention scores."
        )
    return mask.to(like.dtype)


def _causal_mask(length: int, source: int, like: Tensor) -> Tensor:
    allowed = torch.ones(length, source, dtype=torch.bool, device=like.device).tril()
    return _additive(~allowed, like)


def _stock_name(name: str, fused: bool) -> str:
    """The ``nn.MultiheadAttention`` parameter a ``DPMultiheadAttention`` parameter comes from."""
    projection, _, kind = name.partition(".")
    if projection in ("key_bias", "value_bias"):
        return "bias_k" if projection == "key_bias" else "bias_v"
    if projection not in _PROJECTIONS:
        return name  # out_proj.*: same names
    if kind == "bias":
        return "in_proj_bias"  # stock keeps one fused bias even with kdim/vdim
    return "in_proj_weight" if fused else f"{projection}_weight"


class AppendedPosition(nn.Module):
    """Appends one learned vector to every example's sequence: ``[B, S, E] -> [B, S + 1, E]``.

    Attention's ``bias_k`` / ``bias_v``, as a module of its own so that dptorch sees its
    output gradient (the vector's per-example gradient is that gradient at the new position)
    instead of re-running the whole attention through ``torch.func``. Always batch first.
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, 1, dim, device=device, dtype=dtype))
        nn.init.xavier_normal_(self.weight)

    def forward(self, sequence: Tensor) -> Tensor:
        return torch.cat([sequence, self.weight.expand(sequence.shape[0], 1, -1)], dim=1)
