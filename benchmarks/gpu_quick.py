"""Quick CUDA step-time check: plain PyTorch against dptorch on the MLP and MNIST CNN.

Run on a machine with a GPU: ``PYTHONPATH=src python benchmarks/gpu_quick.py``. Prints the
median of 50 steps after 10 warm-up steps (noise and accounting included); the last results
are in ``benchmarks/results/gpu_quick.md``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine

BATCH = 256


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1), nn.Flatten(),
        nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def median_step_ms(make: Callable[[], nn.Module], shape: tuple[int, ...], private: bool) -> float:
    device = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(BATCH, *shape, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    model = make().to(device)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if private:
        loader = DataLoader(TensorDataset(torch.zeros(60_000, 1)), batch_size=BATCH)
        _, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0,
        )  # fmt: skip
    times = []
    for _ in range(60):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[10:])
    return timed[len(timed) // 2] * 1000


def main() -> None:
    warnings.simplefilter("ignore")
    for name, make, shape in (("mlp", mlp, (784,)), ("cnn", cnn, (1, 28, 28))):
        for private in (False, True):
            label = "dptorch" if private else "plain"
            print(f"{name} {label} {median_step_ms(make, shape, private):.2f} ms")


if __name__ == "__main__":
    main()
