"""A small transformer text classifier trained with DP-SGD, on real English sentences.

Data: sentences from the docstrings of Python's own standard library (every Python install
has them), labelled by the topic of the modules they come from: concurrency (asyncio,
threading, ...), internet (email, http, ...), numbers (decimal, fractions, statistics, ...)
and files (pathlib, shutil, tarfile, ...). See ``dptorch.datasets.text``. 1,300 sentences,
balanced, 80% train / 20% test; chance accuracy is 25%.

Model: word embeddings + learned positions, two ``nn.TransformerEncoderLayer`` whose
attention is :class:`dptorch.layers.DPMultiheadAttention` (every weight in ``nn.Linear``, so
per-sample gradients take one backward pass), mean pooling over the real tokens, a linear
head. The privacy unit is one sentence.

    python examples/text_classification_transformer.py            # about 25 s on 2 cores
    python examples/text_classification_transformer.py --epochs 3 --epsilon 3
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from text_classification_common import LENGTH, PAD, run
from torch import Tensor, nn

from dptorch.layers import DPMultiheadAttention


class TextTransformer(nn.Module):
    def __init__(self, vocab: int, classes: int, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.positions = nn.Embedding(LENGTH, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        layer.self_attn = DPMultiheadAttention.from_module(layer.self_attn)  # type: ignore[assignment]
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        batch, length = ids.shape
        # Positions indexed per example ([B, T], not [T] broadcast), so the position
        # embedding's gradient stays per example and can be clipped.
        positions = torch.arange(length, device=ids.device).expand(batch, length)
        padding = ids == PAD  # [B, T]
        hidden = self.encoder(
            self.words(ids) + self.positions(positions), src_key_padding_mask=padding
        )
        keep = (~padding).unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)  # [B, dim]
        return self.head(pooled)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return run(
        TextTransformer,
        argv,
        description=(__doc__ or "").splitlines()[0],
        epochs=20,
        lr=5e-3,
    )


if __name__ == "__main__":
    random.seed(0)
    main()
