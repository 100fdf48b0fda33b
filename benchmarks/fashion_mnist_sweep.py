"""The validation-only sweep behind the Fashion-MNIST recipe's hyperparameters.

Trains ``examples/fashion_mnist_recipe.py``'s tanh CNN privately on the first 55,000 training
images and scores ONLY the last 5,000 (held out of the training set) every 5 epochs, for the
raw weights and two EMAs of them; the test set is never read. One line per run is appended
to ``benchmarks/results/fashion_mnist_sweep.jsonl``.

    .venv/bin/python benchmarks/fashion_mnist_sweep.py --epochs 40 --lr 4
    .venv/bin/python benchmarks/fashion_mnist_sweep.py --epochs 40 --lr 4 --sched cos
    .venv/bin/python benchmarks/fashion_mnist_sweep.py --epochs 60 --batch 4096 --lr 4
    .venv/bin/python benchmarks/fashion_mnist_sweep.py --epochs 40 --lr 4 --augmentations 4
    .venv/bin/python benchmarks/fashion_mnist_sweep.py --dataset mnist --epochs 40 --lr 4
    .venv/bin/python benchmarks/fashion_mnist_sweep.py --eps 1 --epochs 20 --batch 1024 --lr 2 \
        --prior dead-leaves --prior-steps 4000
    .venv/bin/python benchmarks/fashion_mnist_sweep.py --dataset mnist --model scatter-linear
    .venv/bin/python benchmarks/fashion_mnist_sweep.py --dataset mnist --model scatter-linear \
        --feature-norm private

``--dataset mnist`` sweeps on the full MNIST (``make mnist``) the same way, into the same file
(each line records its dataset).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dptorch import BatchMemoryManager, PrivacyEngine
from dptorch.averaging import ParameterEMA
from dptorch.clipping import CLIPPING_KINDS, AdaptiveClipping, default_count_noise
from dptorch.data import AugmentationMultiplicity, flatten_views

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import fashion_mnist_recipe as recipe

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--C", type=float, default=0.1)
    parser.add_argument(
        "--clipping",
        choices=CLIPPING_KINDS,
        default="flat",
        help="make_private's clipping policy (C is adaptive clipping's initial norm)",
    )
    parser.add_argument(
        "--target-quantile",
        type=float,
        default=0.5,
        help="adaptive clipping's target fraction of unclipped examples",
    )
    parser.add_argument("--eps", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sched", choices=["none", "cos"], default="none")
    parser.add_argument("--model", choices=sorted(recipe.MODELS), default="tanh-cnn")
    parser.add_argument("--dataset", choices=recipe.DATASETS, default="fashion-mnist")
    parser.add_argument(
        "--augmentations",
        type=int,
        default=1,
        help="augmentation multiplicity K (shifts; flips too on Fashion-MNIST)",
    )
    parser.add_argument(
        "--views",
        choices=recipe.VIEW_CHOICES,
        default="dataset",
        help="the dataset's views (flips and shifts on Fashion-MNIST) or shifts only",
    )
    parser.add_argument("--feature-norm", choices=["group", "private"], default="group")
    parser.add_argument("--norm-noise", type=float, default=8.0)
    parser.add_argument("--prior", choices=["none", "dead-leaves"], default="none")
    parser.add_argument("--prior-steps", type=int, default=4000)
    parser.add_argument("--prior-file", type=Path, default=None)
    parser.add_argument(
        "--shift-average",
        action="store_true",
        help="also score the last epoch with predictions averaged over one-pixel shifts",
    )
    parser.add_argument(
        "--flip-average",
        action="store_true",
        help="also score the last epoch with predictions averaged over the image and its "
        "mirror image (Fashion-MNIST only)",
    )
    parser.add_argument(
        "--head-first-epochs",
        type=int,
        default=0,
        help="for this many first epochs the layers up to the model's Flatten (those a prior "
        "initialises) get learning rate 0, so only the classifier head moves (linear "
        "probing before fine-tuning); their noisy gradients are still released and "
        "accounted, the learning rate only decides what is applied",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="SGD weight decay (a function of the released weights only: no privacy cost)",
    )
    args = parser.parse_args()
    if args.head_first_epochs < 0 or args.weight_decay < 0:
        parser.error(
            "--head-first-epochs and --weight-decay must be at least 0 (got "
            f"{args.head_first_epochs} and {args.weight_decay})"
        )
    if args.target_quantile != 0.5 and args.clipping != "adaptive":
        parser.error("--target-quantile is adaptive clipping's; add --clipping adaptive")
    refusal = recipe.averaged_rule_refusal(
        args.model, args.dataset, args.shift_average, args.flip_average
    )
    if refusal is not None:
        parser.error(refusal)

    torch.manual_seed(args.seed)
    train_full, _ = recipe.load_dataset(args.dataset)  # the test split is not used
    train_full = recipe.model_inputs(args.model, train_full)  # scattering features, if any
    n = len(train_full)
    train: Dataset[Any] = Subset(train_full, range(n - 5000))
    validation = Subset(train_full, range(n - 5000, n))
    model = recipe.MODELS[args.model]()
    prior = recipe.apply_prior(model, args) if args.prior != "none" else None
    encoder_params = {id(p) for p in recipe.prior_encoder(model).parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in encoder_params], "role": "encoder"},
        {"params": [p for p in model.parameters() if id(p) not in encoder_params], "role": "head"},
    ]
    collate = None
    if args.augmentations > 1:  # K views per example, averaged before clipping
        views = recipe.augmentation_views(args.dataset, args.views)
        train = AugmentationMultiplicity(train, views, args.augmentations)
        collate = flatten_views
    engine = PrivacyEngine()
    if args.feature_norm == "private":  # accounted: recorded on the engine's accountant
        model = recipe.with_private_feature_norm(model, train, engine.accountant, args.norm_noise)
    sgd = torch.optim.SGD(
        [g for g in groups if g["params"]],
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
    )
    clipping: str | AdaptiveClipping = args.clipping
    if args.clipping == "adaptive":  # as make_private builds it, with the target asked for
        clipping = AdaptiveClipping(
            args.C,
            target_unclipped_quantile=args.target_quantile,
            count_noise=default_count_noise(args.batch),  # expected batch q N = args.batch
        )
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=sgd,
        data_loader=DataLoader(train, batch_size=args.batch, collate_fn=collate),
        target_epsilon=args.eps,
        target_delta=1e-5,
        max_grad_norm=args.C,
        epochs=args.epochs,
        clipping=clipping,
        augmentation_multiplicity=args.augmentations,
    )
    emas = {decay: ParameterEMA(model, decay=decay) for decay in (0.9, 0.99)}
    total_steps, step = args.epochs * len(loader), 0
    criterion = nn.CrossEntropyLoss()
    started, history = time.time(), []
    asked = {"shifts": args.shift_average, "flips": args.flip_average}
    averaged_rules = [rule for rule, wanted in asked.items() if wanted]  # scored at the end
    for epoch in range(args.epochs):
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=1024, optimizer=optimizer
        ) as batches:
            for x, y in batches:
                lr = args.lr
                if args.sched == "cos":
                    lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                for group in optimizer.param_groups:  # the lr of the coming logical step
                    frozen = group["role"] == "encoder" and epoch < args.head_first_epochs
                    group["lr"] = 0.0 if frozen else lr
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
                if optimizer.is_accumulating:
                    continue
                step += 1
                for ema in emas.values():
                    ema.update()
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            row = {"epoch": epoch + 1, "raw": recipe.accuracy(model, validation)}
            for decay, ema in emas.items():
                with ema.applied():
                    row[f"ema{decay}"] = recipe.accuracy(model, validation)
            for rule in averaged_rules if epoch + 1 == args.epochs else []:
                # The same weights scored by an averaged prediction rule: a paired
                # comparison, free of the run-to-run spread of separate trainings.
                row[f"raw+{rule}"] = recipe.accuracy(model, validation, rule=rule)
                with emas[0.99].applied():
                    row[f"ema0.99+{rule}"] = recipe.accuracy(model, validation, rule=rule)
            if isinstance(optimizer.clipping, AdaptiveClipping):  # C as its estimate moved it
                row["clip_norm"] = optimizer.clipping.max_grad_norm
            history.append(row)
            print(row, f"{time.time() - started:.0f}s", flush=True)
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sigma": optimizer.noise_multiplier,
        "eps": engine.get_epsilon(1e-5),
        "hist": history,
        "wall": time.time() - started,
        "prior": prior,
    }
    with (RESULTS / "fashion_mnist_sweep.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
