"""What augmentation multiplicity costs a step: K views per example against K times the rows.

Run: ``.venv/bin/python benchmarks/multiplicity_step.py`` (``--views K``, ``--examples B``,
``--blocks N``; a few minutes on two CPU cores). Writes
``benchmarks/results/multiplicity_step.json`` and ``.md``.

The Fashion-MNIST recipe's tanh CNN (``examples/fashion_mnist_recipe.py``), clipping norm 0.1,
noise multiplier 1, a fixed batch of ``B * K`` rows of 28x28 inputs. Three steps alternate in
blocks in one process: plain PyTorch on the ``B * K`` rows; dptorch with ``K`` views of each
of ``B`` examples (each example's gradient is the mean over its rows, clipped once); and
dptorch on ``B * K`` independent examples. The first ratio is what the views cost over
training on as many rows without privacy, the second what grouping the rows costs over
clipping each of them.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import fashion_mnist_recipe as recipe  # the tanh CNN
import interleaved  # the alternating-blocks timer
import training  # run_meta and the results writer

from dptorch import PrivacyEngine

DATASET_SIZE = 60_000


def _step(views: int, rows: tuple[torch.Tensor, torch.Tensor], private: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model = recipe.MODELS["tanh-cnn"]()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    x, y = rows
    if private:
        examples = len(x) // views
        # The loader only fixes q = examples / DATASET_SIZE; every step feeds the same rows.
        dataset = training.FixedSizeDataset(x[:examples], y[:examples], DATASET_SIZE)
        model, optimizer, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(dataset, batch_size=examples),
            noise_multiplier=1.0,
            max_grad_norm=0.1,
            augmentation_multiplicity=views,
        )
    return training.training_step(model, optimizer, nn.CrossEntropyLoss(), x, y)


def measure(views: int, examples: int, blocks: int) -> dict[str, object]:
    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    generator = torch.Generator().manual_seed(0)
    rows = (
        torch.randn(examples * views, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (examples * views,), generator=generator),
    )
    steps = {
        "plain": _step(1, rows, private=False),
        f"dptorch, {views} views of {examples} examples": _step(views, rows, private=True),
        f"dptorch, {examples * views} examples": _step(1, rows, private=True),
    }
    for step in [*steps.values(), *steps.values()]:
        step()
    return {"views": views, "examples": examples, **interleaved.alternate(steps, blocks, "plain")}


def write(result: dict[str, object], total_s: float) -> None:
    meta = training.run_meta(total_s)
    views, examples = result["views"], result["examples"]
    assert isinstance(views, int) and isinstance(examples, int)
    lines = [
        training.results_heading("Augmentation multiplicity, step cost", meta, training.THREADS),
        "",
        "Command: `.venv/bin/python benchmarks/multiplicity_step.py "
        f"--views {views} --examples {examples}`. The recipe's tanh CNN on {views * examples} "
        f"rows; steps alternate in blocks of {interleaved.BLOCK_STEPS}, {result['blocks']} "
        "blocks.",
        "",
        *interleaved.alternate_table(result, digits=1),
    ]
    training.save_results("multiplicity_step", {"meta": meta, **result}, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--views", type=int, default=4, help="K, views per example")
    parser.add_argument("--examples", type=int, default=256, help="B, examples per batch")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per step kind")
    args = parser.parse_args()
    started = time.perf_counter()
    result = measure(args.views, args.examples, args.blocks)
    write(result, time.perf_counter() - started)


if __name__ == "__main__":
    main()
