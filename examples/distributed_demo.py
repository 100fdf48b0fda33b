"""The demo CNN trained with DP-SGD on several processes (torch.distributed, DDP).

Every rank holds the whole MNIST-5k training set and the same model. Each step, every rank
takes its share of one common Poisson batch, clips its own examples, and dptorch sums the
clipped gradients over the ranks with noise added once (by rank 0): the run is the same
private run as on one process, with the same epsilon, reported by every rank.

    torchrun --nproc_per_node=2 examples/distributed_demo.py --epochs 1   # CPU: gloo
    python examples/distributed_demo.py --epochs 1                        # one process

On GPUs the same command uses the nccl backend, one GPU per rank.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.cli import small_cnn
from dptorch.datasets import load_mnist_5k


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=256, help="expected GLOBAL batch")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started_here = _init_process_group()  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    try:
        return _train(args)
    finally:
        if started_here:
            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> dict[str, float]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = _device()
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the same model on every rank (make_private broadcasts too)
    train, test = load_mnist_5k(seed=args.seed)

    model = small_cnn().to(device)
    ids = [device.index] if device.type == "cuda" else None
    model = DistributedDataParallel(model, device_ids=ids)
    engine = PrivacyEngine()
    # A DDP model comes back unwrapped: dptorch sums the clipped gradients itself, so train
    # the returned module, not the DDP wrapper.
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr),
        data_loader=DataLoader(
            train,
            batch_size=args.batch_size,
            generator=torch.Generator().manual_seed(args.seed),
        ),
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
    )
    criterion = nn.CrossEntropyLoss()
    steps = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        for x, y in loader:  # this rank's share; it may be empty, the step still runs
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            steps += 1
            if steps == args.steps:
                break
        if rank == 0:
            print(f"epoch {epoch}: {steps} steps, epsilon {engine.get_epsilon(args.delta):.2f}")
        if steps == args.steps:
            break

    accuracy = _accuracy(model, test, device)
    epsilon = engine.get_epsilon(args.delta)
    if rank == 0:
        print(
            f"{world_size} rank(s), {steps} steps in {time.perf_counter() - start:.1f} s: "
            f"test accuracy {accuracy:.3f}, epsilon {epsilon:.2f} at delta {args.delta:g}"
        )
    return {
        "steps": steps,
        "test_accuracy": accuracy,
        "epsilon": epsilon,
        "world_size": world_size,
    }


def _init_process_group() -> bool:
    """Join torchrun's process group, or make a one-process group; True if started here."""
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # plain `python examples/distributed_demo.py`: a group of one, no port needed
        store = os.path.join(tempfile.mkdtemp(prefix="dptorch-demo-"), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return True


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    images, labels = data.tensors
    model.eval()
    with torch.no_grad():
        predictions = model(images.to(device)).argmax(dim=1).cpu()
    return float((predictions == labels).float().mean())


if __name__ == "__main__":
    main()
