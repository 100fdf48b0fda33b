"""Losses whose batch reduction keeps examples apart, as per-sample clipping needs.

dptorch's privacy unit is one example of the batch: for a language model, one sequence.
With ``loss_reduction="mean"`` the engine takes example ``i``'s gradient to be ``B`` times
the gradient of the batch loss with respect to ``i``'s outputs, which is right only when the
batch loss is ``(1/B) sum_i loss_i`` with ``loss_i`` a function of example ``i`` alone.

Hugging Face models' built-in loss (``model(input_ids, labels=labels).loss``) averages over
all non-ignored tokens of the batch: ``sum_i sum_t l_it / N`` with ``N`` the batch's total
token count. Each example's weight ``1/N`` then depends on how many tokens the OTHER
examples have, so adding or removing one sequence rescales every other sequence's gradient
before clipping, and the released sum no longer has sensitivity ``max_grad_norm``. Use
:func:`sequence_mean_cross_entropy` on the logits instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dptorch.errors import DPValueError

__all__ = ["sequence_mean_cross_entropy"]


def sequence_mean_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, *, shift: bool = False
) -> Tensor:
    """Cross-entropy averaged over each sequence's tokens, then over the sequences.

    Args:
        logits: ``[B, T, V]`` scores; ``logits[:, t]`` predicts ``labels[:, t]``.
        labels: ``[B, T]`` token ids; positions equal to ``ignore_index`` do not count.
        ignore_index: the label of positions to skip (padding, prompt tokens).
        shift: for causal language models given ``labels = input_ids`` (the Hugging Face
            convention): compare ``logits[:, :-1]`` with ``labels[:, 1:]``.

    Returns:
        A scalar: ``(1/B) sum_i mean_t l_it``. A sequence without any counted token adds 0;
        an empty batch gives 0 (a Poisson batch may be empty), not NaN.

    Privacy: each sequence's term depends on that sequence alone, so with
    ``loss_reduction="mean"`` dptorch's per-sample gradients are each sequence's own, and
    clipping bounds one sequence's influence (the unit of privacy is the sequence).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise DPValueError(
            f"sequence_mean_cross_entropy(logits={tuple(logits.shape)}, "
            f"labels={tuple(labels.shape)}) needs logits [B, T, V] and labels [B, T] with the "
            "same B and T (pass a model's .logits, not its output object)."
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    batch, length, vocab = logits.shape
    token_losses = F.cross_entropy(
        logits.reshape(batch * length, vocab),
        labels.reshape(batch * length),
        ignore_index=ignore_index,
        reduction="none",
    ).view(batch, length)  # [B, T]; 0 at ignored positions
    counted = (labels != ignore_index).sum(dim=1)  # [B]
    per_sequence = token_losses.sum(dim=1) / counted.clamp(min=1).to(token_losses.dtype)
    if batch == 0:
        return per_sequence.sum()  # 0, still attached to the graph
    return per_sequence.mean()
