"""A small LSTM text classifier trained with DP-SGD, on real English sentences.

Data: sentences from the docstrings of Python's own standard library, labelled by the topic
of the modules they come from (concurrency, internet, numbers, files; see
``dptorch.datasets.text``). 1,300 sentences, balanced, 80% train / 20% test; chance
accuracy is 25%.

Model: word embeddings, a bidirectional :class:`dptorch.layers.DPLSTM` (a drop-in
``nn.LSTM`` whose per-sample gradients take the one ordinary backward pass) run over each
sentence's real words only (a ``PackedSequence``), and a linear head on the two final
hidden states. The privacy unit is one sentence.

    python examples/text_classification_lstm.py            # about 15 s on 2 cores: ~45% accuracy
    python examples/text_classification_lstm.py --epochs 5 --epsilon 3
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from text_classification_common import PAD, run
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from dptorch.layers import DPLSTM


class TextLSTM(nn.Module):
    def __init__(self, vocab: int, classes: int, dim: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.lstm = DPLSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, ids: Tensor) -> Tensor:  # [B, T] word ids, PAD at the end
        if len(ids) == 0:  # an empty Poisson batch: nothing to pack, the step adds noise only
            return self.head(torch.zeros(0, self.head.in_features))
        lengths = (ids != PAD).sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(
            self.words(ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = self.lstm(packed)  # h_n: [2, B, hidden], each direction's last state
        return self.head(torch.cat([h_n[0], h_n[1]], dim=1))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return run(
        TextLSTM,
        argv,
        description=(__doc__ or "").splitlines()[0],
        epochs=10,
        lr=1e-2,
    )


if __name__ == "__main__":
    main()
