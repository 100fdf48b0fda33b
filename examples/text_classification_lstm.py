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

import argparse
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.datasets.text import build_vocabulary, encode_words, load_stdlib_sentences
from dptorch.layers import DPLSTM

LENGTH = 32  # words per sentence after cutting / padding
PAD = 0


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


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        ids, labels = data.tensors
        correct = (model(ids).argmax(dim=1) == labels).float().mean().item()
    model.train()
    return correct


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) size")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    corpus = load_stdlib_sentences(seed=args.seed)
    cut = int(0.8 * len(corpus.sentences))
    vocabulary = build_vocabulary(corpus.sentences[:cut], size=2000)  # train split only
    ids = encode_words(corpus.sentences, vocabulary, LENGTH)
    labels = torch.tensor(corpus.labels)
    train = TensorDataset(ids[:cut], labels[:cut])
    test = TensorDataset(ids[cut:], labels[cut:])
    print(f"{len(train)} train / {len(test)} test sentences, topics {corpus.topics}")

    model = TextLSTM(len(vocabulary) + 2, len(corpus.topics))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(train, batch_size=args.batch_size),
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
    )
    print(f"noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {args.epsilon}")
    criterion = nn.CrossEntropyLoss()  # mean over sentences: each term is one sentence's own
    steps, loss = 0, float("nan")
    for epoch in range(args.epochs):
        for batch_ids, batch_labels in loader:
            optimizer.zero_grad()
            batch_loss = criterion(model(batch_ids), batch_labels)
            batch_loss.backward()
            optimizer.step()
            steps += 1
            loss = batch_loss.item() if len(batch_labels) else loss
            if args.steps is not None and steps >= args.steps:
                break
        print(f"epoch {epoch + 1}: loss {loss:.3f}, eps {engine.get_epsilon(args.delta):.2f}")
        if args.steps is not None and steps >= args.steps:
            break
    result = {
        "test_accuracy": accuracy(model, test),
        "epsilon": engine.get_epsilon(args.delta),
        "steps": float(steps),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"test accuracy {result['test_accuracy']:.3f} (chance 0.25), epsilon "
        f"{result['epsilon']:.2f} at delta {args.delta}, {steps} steps, {result['seconds']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
