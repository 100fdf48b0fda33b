"""What the two text-classification examples share: data split, private training, scoring.

Data: sentences from the docstrings of Python's own standard library, labelled by topic (see
``dptorch.datasets.text``); 80% train / 20% test, the vocabulary built on the train split only.
The privacy unit is one sentence: the loss is a mean over sentences, each term that
sentence's own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.datasets.text import build_vocabulary, encode_words, load_stdlib_sentences

LENGTH = 32  # words per sentence after cutting / padding
PAD = 0


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        ids, labels = data.tensors
        correct = (model(ids).argmax(dim=1) == labels).float().mean().item()
    model.train()
    return correct


def run(
    make_model: Callable[[int, int], nn.Module],
    argv: Sequence[str] | None,
    *,
    description: str,
    epochs: int,
    lr: float,
) -> dict[str, float]:
    """Train ``make_model(vocabulary size, classes)`` privately; returns the test results."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) size")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=lr)
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

    model = make_model(len(vocabulary) + 2, len(corpus.topics))
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
