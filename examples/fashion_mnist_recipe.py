"""Fashion-MNIST at a fixed epsilon: an end-to-end private CNN with the accuracy recipe.

The recipe combines, each as a dptorch feature that keeps the guarantee:

* a Tramer-Boneh style CNN with tanh activations (bounded activations suit clipped training,
  Papernot et al. 2020, arXiv 2007.14191) and GroupNorm;
* large logical batches (``--batch-size``, Poisson-sampled) split into physical ones by
  ``BatchMemoryManager``;
* augmentation multiplicity (``--augmentations K``: K random shifts/flips per example,
  averaged before clipping; De et al. 2022, arXiv 2204.13650);
* an exponential moving average of the weights, evaluated instead of the last iterate
  (post-processing);
* the noise multiplier calibrated to ``--epsilon`` at delta 1e-5 for exactly the planned
  number of steps (``make_private_with_epsilon``, PRV accountant).

Data: the real Fashion-MNIST (60,000 / 10,000) from the Debian package
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

Hyperparameters are chosen on a validation split held out of the TRAINING set
(``--validation``, the last 5,000 training images), never on the test set; the test set is
scored once, at the end. Results are appended to ``--output`` as JSON lines.

    python examples/fashion_mnist_recipe.py --epsilon 3 --seed 0
    python examples/fashion_mnist_recipe.py --epsilon 1 --seed 0
    python examples/fashion_mnist_recipe.py --smoke        # seconds, on a slice of the data
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from dptorch import BatchMemoryManager, PrivacyEngine
from dptorch.averaging import ParameterEMA
from dptorch.data import AugmentationMultiplicity, flatten_views
from dptorch.datasets import load_fashion_mnist

DELTA = 1e-5


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 8, stride=2, padding=3),  # [B, 32, 14, 14]
        nn.GroupNorm(8, 32),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),  # [B, 32, 13, 13]
        nn.Conv2d(32, 64, 4, stride=2),  # [B, 64, 5, 5]
        nn.GroupNorm(8, 64),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),  # [B, 64, 4, 4]
        nn.Flatten(),
        nn.Linear(1024, 64),
        nn.Tanh(),
        nn.Linear(64, 10),
    )


def augment(image: Tensor) -> Tensor:
    """A random horizontal flip and a random shift of up to 2 pixels (zero padded)."""
    if bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
    padded = nn.functional.pad(image, (2, 2, 2, 2))
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,)))
    return padded[..., dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset | Subset[Any], batch: int = 1000) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch):
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += int(y.numel())
    model.train()
    return correct / max(total, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    train_full, test = load_fashion_mnist()
    n = len(train_full)
    if args.smoke:
        train_full = Subset(train_full, range(2000))  # type: ignore[assignment]
        test = Subset(test, range(500))  # type: ignore[assignment]
        n = 2000
    holdout = args.validation if not args.smoke else 200
    train = Subset(train_full, range(n - holdout)) if holdout else train_full
    validation = Subset(train_full, range(n - holdout, n)) if holdout else None

    if args.augmentations > 1:
        train = AugmentationMultiplicity(train, augment, args.augmentations)  # type: ignore[assignment]
        collate = flatten_views
    else:
        collate = None
    loader = DataLoader(train, batch_size=args.batch_size, collate_fn=collate)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    engine = PrivacyEngine()
    model, optimizer, private_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=args.epsilon,
        target_delta=DELTA,
        max_grad_norm=args.max_grad_norm,
        epochs=args.epochs,
        augmentation_multiplicity=args.augmentations,
    )
    ema = ParameterEMA(model, decay=args.ema) if args.ema > 0 else None
    criterion = nn.CrossEntropyLoss()
    physical = args.physical_batch  # examples; each brings --augmentations rows
    started = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        with BatchMemoryManager(
            data_loader=private_loader, max_physical_batch_size=physical, optimizer=optimizer
        ) as batches:
            for x, y in batches:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
                if ema is not None and not optimizer.is_accumulating:
                    ema.update()
        if validation is not None and (epoch + 1) % args.eval_every == 0:
            scored = ema.applied() if ema is not None else _nothing(model)
            with scored:
                val = accuracy(model, validation)
            history.append({"epoch": epoch + 1, "validation_accuracy": val})
            print(
                f"epoch {epoch + 1}/{args.epochs}  validation {val:.4f}  "
                f"epsilon {engine.get_epsilon(DELTA):.3f}  {time.perf_counter() - started:.0f}s",
                flush=True,
            )
    with ema.applied() if ema is not None else _nothing(model):
        test_accuracy = accuracy(model, test)
    return {
        "dataset": "fashion-mnist" + (" (smoke slice)" if args.smoke else ""),
        "seed": args.seed,
        "target_epsilon": args.epsilon,
        "epsilon": engine.get_epsilon(DELTA),
        "delta": DELTA,
        "noise_multiplier": optimizer.noise_multiplier,
        "test_accuracy": test_accuracy,
        "history": history,
        "wall_s": time.perf_counter() - started,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
    }


class _nothing:
    """A do-nothing context manager standing in for ``ema.applied()``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2048, help="expected logical batch")
    parser.add_argument("--physical-batch", type=int, default=512)
    parser.add_argument("--augmentations", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    parser.add_argument("--ema", type=float, default=0.99, help="0 disables averaging")
    parser.add_argument("--validation", type=int, default=5000)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny slice, for tests")
    parser.add_argument("--output", type=Path, default=None, help="append the result (JSON)")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size, args.physical_batch = 1, 256, 128
    result = run(args)
    print(
        f"test accuracy {result['test_accuracy']:.4f} at epsilon {result['epsilon']:.3f} "
        f"(delta {DELTA}), sigma {result['noise_multiplier']:.3f}, {result['wall_s']:.0f}s"
    )
    if args.output is not None:
        with args.output.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    if not math.isfinite(result["epsilon"]):
        raise SystemExit("epsilon is not finite")


if __name__ == "__main__":
    main()
